"""wire: framing checks, and real multi-process transport (gloo over loopback) with dead, slow and corrupt senders.

The process tests run their ranks through ``wire.launch`` (spawn), so every rank function here is top-level and this
module imports nothing heavy: each child imports it.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict
from functools import partial

import pytest
import torch.distributed as dist

from fedrefine_lib import wire

T = 1.5  # the receiver's per-message timeout in the process tests
LAUNCH_S = 90.0  # generous: spawning and importing torch on a loaded 2-core machine
BLOBS = [b"", b"\x00", b"kv" * 1000, bytes(range(256)) * 4096]  # the last is 1 MiB


# --------------------------------------------------------------------------- rank functions (top-level for spawn)


def tagged(request: dict) -> bytes:
    """A sender's work: its rank and the request's text, ``repeat`` times; optional sleep, optional failure."""
    time.sleep(request.get("sleep", 0.0))
    if request.get("fail_on") == dist.get_rank():
        raise ValueError("boom")
    return f"rank {dist.get_rank()}: {request['text']};".encode() * request.get("repeat", 1)


def dies(request: dict) -> bytes:
    os._exit(1)


def too_slow(request: dict) -> bytes:
    time.sleep(T + 1.0)
    return b"late"


def plain(replies: dict[int, wire.Reply]) -> dict[int, dict]:
    return {r: asdict(reply) for r, reply in replies.items()}


def framing_receiver() -> dict:
    got = [wire.recv_bytes(1, T) for _ in BLOBS]
    errors = []
    for _ in ("payload", "length"):
        try:
            wire.recv_bytes(1, T)
            errors.append("no error")
        except wire.CorruptPayload as e:
            errors.append(str(e))
    return {"got": got, "errors": errors}


def framing_sender() -> None:
    for blob in BLOBS:
        assert wire.send_bytes(blob, 0, T) == wire.HEADER_BYTES + len(blob)
    wire.send_bytes(b"a payload", 0, T, corrupt="payload")
    try:  # the receiver refuses the header, so the payload is never taken
        wire.send_bytes(b"a payload", 0, T, corrupt="length")
    except wire.TransportError:
        pass


def twice_then_stop(timeout_s: float = T) -> dict:
    senders = wire.RemoteSenders(timeout_s=timeout_s)
    first = senders.request({"text": "hi"})
    second = senders.request({"text": "again"})
    return {"first": plain(first), "second": plain(second), "told": senders.stop(), "down": senders.down}


def two_sender_receiver() -> dict:
    senders = wire.RemoteSenders(timeout_s=T)
    first = senders.request({"text": "hi", "repeat": 1000})
    failed = senders.request({"text": "x", "fail_on": 2})
    start = time.perf_counter()
    slept = senders.request({"text": "zz", "sleep": 0.6})
    parallel_s = time.perf_counter() - start
    out = {"first": plain(first), "failed": plain(failed), "slept": plain(slept), "parallel_s": parallel_s}
    return out | {"told": senders.stop(), "down": senders.down}


def crashes() -> None:
    raise ValueError("kaboom in rank 0")


# --------------------------------------------------------------------------- framing, in process


def test_frame_round_trip_is_exact():
    for blob in BLOBS:
        data = wire.frame(blob)
        assert len(data) == wire.HEADER_BYTES + len(blob)
        assert wire.unframe(data) == blob


@pytest.mark.parametrize(
    "damage, cause",
    [
        (lambda d: d.__setitem__(0, d[0] ^ 1), "bad magic"),
        (lambda d: d.__setitem__(8, d[8] ^ 1), "header checksum mismatch"),  # the length field
        (lambda d: d.__setitem__(-1, d[-1] ^ 1), "CRC32 mismatch"),
        (lambda d: d.pop(), "length mismatch"),
        (lambda d: d.extend(b"!"), "length mismatch"),
        (lambda d: d.__delitem__(slice(10, None)), "shorter than the header"),
    ],
    ids=["magic", "length-field", "payload", "truncated", "trailing", "no-header"],
)
def test_frame_corruption_is_named(damage, cause):
    data = bytearray(wire.frame(b"hello, wire"))
    damage(data)
    with pytest.raises(wire.CorruptPayload, match=cause):
        wire.unframe(bytes(data), peer=3)


def test_request_refuses_other_ops():
    with pytest.raises(ValueError, match="op 'run' only"):
        wire.RemoteSenders([1]).request({"op": "stop"})


def test_init_from_env_joins_a_one_rank_group(monkeypatch):
    port = wire.free_port()
    monkeypatch.setenv("MASTER_ADDR", wire.LOOPBACK)
    for key, value in {"MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1", "GLOO_SOCKET_IFNAME": "lo"}.items():
        monkeypatch.setenv(key, value)
    try:
        assert wire.init_from_env(timeout_s=30, num_threads=None) == (0, 1)
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------- real processes


def test_bytes_cross_the_wire_exactly_and_corruption_is_caught():
    out = wire.launch([framing_receiver, framing_sender], LAUNCH_S)
    assert out["got"] == BLOBS
    crc, length = out["errors"]
    assert "CRC32 mismatch" in crc and "rank 1" in crc
    assert "header checksum mismatch" in length and "rank 1" in length


def test_two_senders_answer_in_parallel_and_stop():
    serve = partial(wire.serve, tagged, T)
    out = wire.launch([two_sender_receiver, serve, serve], LAUNCH_S)
    for r in (1, 2):
        reply = out["first"][r]
        assert reply["ok"] and reply["data"] == f"rank {r}: hi;".encode() * 1000
        assert reply["payload_bytes"] == len(reply["data"])
        assert reply["wire_bytes"] == wire.HEADER_BYTES + 1 + reply["payload_bytes"]  # + the status byte
        assert 0 < reply["seconds"] < T
    assert out["failed"][1]["ok"] and not out["failed"][2]["ok"]
    assert "handler on sender rank 2 raised ValueError: boom" in out["failed"][2]["error"]
    assert all(out["slept"][r]["ok"] and out["slept"][r]["seconds"] >= 0.6 for r in (1, 2))
    assert out["parallel_s"] < 1.1  # two 0.6 s handlers at once, not one after the other
    assert out["told"] == [1, 2] and out["down"] == {}  # and launch returned: both senders exited


def test_a_dead_sender_is_reported_not_waited_for():
    out = wire.launch(
        [twice_then_stop, partial(wire.serve, dies, T), partial(wire.serve, tagged, T)], LAUNCH_S, tolerate={1}
    )
    dead = out["first"][1]
    assert not dead["ok"] and "rank 1" in dead["error"] and "connection closed" in dead["error"]
    assert dead["seconds"] < T  # noticed at once, not by timing out
    assert out["second"][1]["error"] == f"sender rank 1 is down: {dead['error']}"
    assert out["first"][2]["data"] == b"rank 2: hi;" and out["second"][2]["data"] == b"rank 2: again;"
    assert out["told"] == [2] and list(out["down"]) == [1]


def test_a_slow_sender_times_out_and_is_marked_down():
    out = wire.launch([twice_then_stop, partial(wire.serve, too_slow, T), partial(wire.serve, tagged, T)], LAUNCH_S)
    slow = out["first"][1]
    assert not slow["ok"] and f"rank 1 timed out after {T:g} s" in slow["error"]
    assert T * 0.9 <= slow["seconds"] < T + 1.0
    assert out["second"][1]["error"].startswith("sender rank 1 is down: ")
    # rank 2 is unaffected: gloo's timeout closed only the (0, 1) pair group, not the whole context
    assert out["first"][2]["ok"] and out["second"][2]["ok"] and out["told"] == [2]


def test_a_corrupt_reply_is_caught_and_the_sender_marked_down():
    corrupt = partial(wire.serve, tagged, T, corrupt="payload")
    out = wire.launch([twice_then_stop, corrupt, partial(wire.serve, tagged, T)], LAUNCH_S)
    assert "CRC32 mismatch" in out["first"][1]["error"] and "rank 1" in out["first"][1]["error"]
    assert out["second"][1]["error"].startswith("sender rank 1 is down: corrupt frame")
    assert out["first"][2]["ok"] and out["told"] == [2]


def test_launch_raises_with_the_crash_traceback():
    with pytest.raises(wire.LaunchError) as info:
        wire.launch([crashes, partial(os._exit, 3)], LAUNCH_S)
    text = str(info.value)
    assert "rank 0 raised" in text and "Traceback" in text and "ValueError: kaboom in rank 0" in text
    assert "rank 1 exited with code 3 without reporting" in text


@pytest.mark.slow
def test_launch_kills_ranks_that_overrun():
    start = time.monotonic()
    with pytest.raises(wire.LaunchError, match=r"overran 8 s; ranks \[0\]"):
        wire.launch([partial(time.sleep, 60)], timeout_s=8)
    assert time.monotonic() - start < 20
