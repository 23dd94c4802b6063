"""Real message transport: a receiver (rank 0) and J senders (ranks 1..J) exchange framed bytes over gloo
point-to-point (loopback TCP under :func:`launch`). It moves bytes; a sender's work is the caller's handler.

Frame: int64[4] header ``(MAGIC, length, CRC32(payload), CRC32(first three words))``, then the payload as one uint8
tensor (none when empty). Gloo behaviour (torch 2.13) this relies on, exercised by ``tests/test_wire.py``:

* ``Work.wait(timeout)`` expiring raises "Timed out waiting ...ms" and closes *every pair of that group's context*
  (gloo ``signalException``; later ops: "Application timeout caused pair closure"). One timeout on the default group
  would cut rank 0 off from all senders, so :func:`init_from_env` makes a two-rank group per (receiver, sender).
* a dead peer: the pending ``wait``, or the next ``isend``/``irecv`` itself, raises "Connection closed by peer" at
  once, no hang. Sends are rendezvous: ``isend().wait()`` returns once the peer posted the matching recv.
* a message longer than the posted buffer aborts the receiving *process* (``EnforceNotMet``), a shorter one fills it
  silently: hence the header checksum, so a corrupt length is refused before the payload recv is posted.
* ``Work.is_completed()`` stays False for a gloo recv until ``wait``: :class:`RemoteSenders` waits in one thread per
  sender (``wait`` releases the GIL).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import queue
import socket
import struct
import sys
import time
import traceback
import zlib
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

import torch
import torch.distributed as dist

MAGIC = 0x4652_5749_5245_0001  # "FRWIRE", version 1
HEADER_WORDS = 4
HEADER_BYTES = 8 * HEADER_WORDS
MAX_PAYLOAD = 1 << 36  # 64 GiB: anything longer is a corrupt length
DEFAULT_TIMEOUT_S = 60.0
LOOPBACK = "127.0.0.1"
OK, ERR = b"\x00", b"\x01"  # first byte of a sender's reply payload
_PAIRS: dict[tuple[int, int], Any] = {}  # (low rank, high rank) -> its two-rank process group
Corruption = Literal["payload", "magic", "length"]  # fault injection: flip a payload byte, break magic, bump length


class TransportError(Exception):
    """Base of the transport's failures (the message names the peer rank and the cause)."""


class TransportTimeout(TransportError, TimeoutError):
    """A peer did not complete a send/receive within the timeout (gloo closes that link afterwards)."""


class CorruptPayload(TransportError, ValueError):
    """A frame failed its checks: bad magic, header checksum/length, or payload CRC32."""


class PeerGone(TransportError, ConnectionError):
    """The link to a peer is closed: its process died or it closed the link after a timeout."""


class LaunchError(RuntimeError):
    """A launched rank failed, crashed or overran (the message carries its traceback text)."""


# --------------------------------------------------------------------------- framing


def _header(blob: bytes) -> list[int]:
    words = [MAGIC, len(blob), zlib.crc32(blob)]
    return [*words, zlib.crc32(struct.pack("<3q", *words))]


def _check_header(words: Sequence[int], peer: int) -> tuple[int, int]:
    magic, length, crc, header_crc = (int(w) for w in words)
    if magic != MAGIC:
        raise CorruptPayload(f"corrupt frame from rank {peer}: bad magic {magic:#x} (expected {MAGIC:#x}).")
    if zlib.crc32(struct.pack("<3q", magic, length, crc)) != header_crc:
        raise CorruptPayload(f"corrupt frame from rank {peer}: header checksum mismatch (length field {length}).")
    if not 0 <= length <= MAX_PAYLOAD:
        raise CorruptPayload(f"corrupt frame from rank {peer}: length {length} out of range [0, {MAX_PAYLOAD}].")
    return length, crc


def _check_payload(payload: bytes, length: int, crc: int, peer: int) -> bytes:
    if len(payload) != length:
        raise CorruptPayload(f"corrupt frame from rank {peer}: length mismatch, header {length} B, got {len(payload)}.")
    if zlib.crc32(payload) != crc:
        raise CorruptPayload(f"corrupt frame from rank {peer}: CRC32 mismatch over {length} B of payload.")
    return payload


def frame(blob: bytes) -> bytes:
    """``blob`` as one frame in bytes (header + payload): what :func:`send_bytes` puts on the wire."""
    return struct.pack(f"<{HEADER_WORDS}q", *_header(blob)) + blob


def unframe(data: bytes, peer: int = -1) -> bytes:
    """Inverse of :func:`frame`, with every check :func:`recv_bytes` makes; raises :class:`CorruptPayload`."""
    if len(data) < HEADER_BYTES:
        raise CorruptPayload(f"corrupt frame from rank {peer}: {len(data)} B is shorter than the header.")
    length, crc = _check_header(struct.unpack(f"<{HEADER_WORDS}q", data[:HEADER_BYTES]), peer)
    return _check_payload(data[HEADER_BYTES:], length, crc, peer)


def _reason(text: str) -> str:
    if "Connection closed by peer" in text or "Connection reset by peer" in text:
        return "connection closed by the peer (its process died or it dropped the link)"
    if "pair closure" in text:
        return "link already closed after an earlier timeout on it"
    return text.strip().splitlines()[0].split("] ", 1)[-1]


def _run(post: Callable[[], Any], peer: int, timeout_s: float, what: str) -> None:
    """Post one gloo p2p op and wait for it; gloo's RuntimeErrors become TransportTimeout / PeerGone."""
    try:
        done = post().wait(timeout=timedelta(seconds=max(timeout_s, 1e-3)))  # timedelta(0) would mean "PG default"
    except RuntimeError as e:
        if "Timed out" in str(e):
            raise TransportTimeout(f"{what} rank {peer} timed out after {timeout_s:g} s.") from e
        raise PeerGone(f"{what} rank {peer} failed: {_reason(str(e))}.") from e
    if done is False:
        raise TransportTimeout(f"{what} rank {peer} timed out after {timeout_s:g} s.")


def send_bytes(
    blob: bytes, dst: int, timeout_s: float = DEFAULT_TIMEOUT_S, *, corrupt: Corruption | None = None
) -> int:
    """Send one frame to rank ``dst``; returns the bytes put on the wire. ``corrupt``: fault injection (tests)."""
    words, payload = _header(blob), bytearray(blob)
    if corrupt == "payload" and payload:
        payload[0] ^= 0xFF
    elif corrupt == "magic":
        words[0] ^= 1
    elif corrupt == "length":
        words[1] += 1
    elif corrupt is not None:
        raise ValueError(f"Unknown corruption {corrupt!r} (or an empty payload to corrupt).")
    header, group = torch.tensor(words, dtype=torch.int64), _group(dst)
    _run(lambda: dist.isend(header, dst, group=group), dst, timeout_s, "sending a header to")
    if payload:
        tensor = torch.frombuffer(payload, dtype=torch.uint8)
        _run(lambda: dist.isend(tensor, dst, group=group), dst, timeout_s, "sending a payload to")
    return HEADER_BYTES + len(payload)


def recv_bytes(src: int, timeout_s: float = DEFAULT_TIMEOUT_S) -> bytes:
    """Receive one frame from rank ``src``; ``timeout_s`` bounds the wait for the header, then for the payload."""
    header, group = torch.zeros(HEADER_WORDS, dtype=torch.int64), _group(src)
    _run(lambda: dist.irecv(header, src, group=group), src, timeout_s, "receiving a header from")
    length, crc = _check_header(header.tolist(), src)
    payload = torch.zeros(length, dtype=torch.uint8)
    if length:
        _run(lambda: dist.irecv(payload, src, group=group), src, timeout_s, "receiving a payload from")
    return _check_payload(payload.numpy().tobytes(), length, crc, src)


# --------------------------------------------------------------------------- sender and receiver


def _answer(handler: Callable[[dict], bytes], message: bytes, rank: int) -> bytes | None:
    """A sender's reply payload to one request: OK + data, ERR + the error text; None for ``{"op": "stop"}``."""
    try:
        request = json.loads(message)
        if request.get("op") == "stop":
            return None
        if request.get("op") != "run":
            raise ValueError(f"unknown op {request.get('op')!r}")
        data = handler(request)
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError(f"handler returned {type(data).__name__}, not bytes")
        return OK + bytes(data)
    except Exception as e:
        return ERR + f"handler on sender rank {rank} raised {type(e).__name__}: {e}\n{traceback.format_exc()}".encode()


def serve(
    handler: Callable[[dict], bytes],
    timeout_s: float = DEFAULT_TIMEOUT_S,
    *,
    idle_timeout_s: float = 3600.0,
    receiver: int = 0,
    corrupt: Corruption | None = None,
) -> int:
    """Sender loop: answer the receiver's ``{"op": "run", ...}`` with ``handler(request)`` until ``{"op": "stop"}``.

    A handler exception goes back as an error reply (the receiver gets its traceback). The loop also ends, with a
    note on stderr, when the link breaks (receiver gone, or it gave up on us). ``timeout_s`` bounds each reply's send,
    ``idle_timeout_s`` the wait for the next request. ``corrupt`` is fault injection on replies. Returns replies sent.
    """
    rank, served = dist.get_rank(), 0
    try:
        while (reply := _answer(handler, recv_bytes(receiver, idle_timeout_s), rank)) is not None:
            send_bytes(reply, receiver, timeout_s, corrupt=corrupt)
            served += 1
    except TransportError as e:
        print(f"[wire] sender rank {rank} stops after {served} replies: {e}", file=sys.stderr, flush=True)
    return served


@dataclass(frozen=True)
class Reply:
    """One sender's answer. ``wire_bytes``: bytes received (header included); ``payload_bytes``: ``len(data)``;
    ``seconds``: wall time from sending the request to the reply's arrival."""

    ok: bool
    data: bytes | None = None
    error: str | None = None
    wire_bytes: int = 0
    payload_bytes: int = 0
    seconds: float = 0.0


class RemoteSenders:
    """Receiver side (rank 0): send a request to every live sender at once, then gather each reply.

    A sender that died, timed out or sent a corrupt frame yields ``ok=False`` with the reason and is marked down for
    good (later requests skip it at once). A handler error is ``ok=False`` too, but the sender stays up.
    """

    def __init__(self, ranks: Sequence[int] | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.ranks = list(range(1, dist.get_world_size())) if ranks is None else list(ranks)
        self.timeout_s = timeout_s
        self.down: dict[int, str] = {}
        self._pool = ThreadPoolExecutor(max_workers=max(len(self.ranks), 1), thread_name_prefix="wire")

    def request(self, payload: dict) -> dict[int, Reply]:
        """``{"op": "run", **payload}`` to every live sender in parallel; their replies by rank."""
        message = {"op": "run", **payload}
        if message["op"] != "run":
            raise ValueError(f"request() sends op 'run' only, got {message['op']!r} (use stop()).")
        blob = json.dumps(message, separators=(",", ":")).encode()
        futures = {r: self._pool.submit(self._exchange, r, blob) for r in self.ranks if r not in self.down}
        return {r: futures[r].result() if r in futures else self._down_reply(r) for r in self.ranks}

    def _down_reply(self, rank: int) -> Reply:
        return Reply(False, error=f"sender rank {rank} is down: {self.down[rank]}")

    def _exchange(self, rank: int, blob: bytes) -> Reply:
        start = time.perf_counter()
        try:
            send_bytes(blob, rank, self.timeout_s)
            reply = recv_bytes(rank, self.timeout_s)
            if reply[:1] not in (OK, ERR):
                raise CorruptPayload(f"corrupt reply from rank {rank}: unknown status byte {reply[:1]!r}.")
        except TransportError as e:
            self.down.setdefault(rank, str(e))  # one thread per rank: distinct keys
            return Reply(False, error=str(e), seconds=time.perf_counter() - start)
        seconds, wire = time.perf_counter() - start, HEADER_BYTES + len(reply)
        if reply[:1] == ERR:
            return Reply(False, error=reply[1:].decode(errors="replace"), wire_bytes=wire, seconds=seconds)
        return Reply(True, data=reply[1:], wire_bytes=wire, payload_bytes=len(reply) - 1, seconds=seconds)

    def stop(self) -> list[int]:
        """Tell every live sender to exit; returns the ranks told (those down are unreachable and left alone)."""
        told = []
        for r in self.ranks:
            if r in self.down:
                continue
            try:
                send_bytes(b'{"op":"stop"}', r, self.timeout_s)
                told.append(r)
            except TransportError as e:
                self.down.setdefault(r, str(e))
        self._pool.shutdown()
        return told


# --------------------------------------------------------------------------- launching


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port free on ``host`` right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def init_from_env(timeout_s: float = 600.0, num_threads: int | None = 1, receiver: int = 0) -> tuple[int, int]:
    """Join the gloo group from MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE (set by torchrun or :func:`launch`), then
    make the (receiver, sender) pair groups. Collective: every rank calls it, at start-up. Returns (rank, world)."""
    if num_threads:
        torch.set_num_threads(num_threads)
    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=timedelta(seconds=timeout_s))
    for r in range(dist.get_world_size()):
        pair = (min(r, receiver), max(r, receiver))
        if r != receiver and pair not in _PAIRS:
            _PAIRS[pair] = dist.new_group(list(pair), timeout=timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


def _group(peer: int) -> Any:
    """The two-rank group of this rank and ``peer`` (None, the default group, without :func:`init_from_env`)."""
    return _PAIRS.get((min(peer, dist.get_rank()), max(peer, dist.get_rank())))


def _child(rank: int, world: int, port: int, fn: Callable[[], Any], results: Any, pg_timeout_s: float) -> None:
    os.environ.update(MASTER_ADDR=LOOPBACK, MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    if os.path.exists("/sys/class/net/lo"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    code = 0
    try:
        init_from_env(pg_timeout_s)
        value = fn()
        results.put(("ok", rank, value if rank == 0 else None))
    except BaseException:
        results.put(("error", rank, traceback.format_exc()))
        code = 1
    finally:
        if dist.is_initialized():
            _PAIRS.clear()
            dist.destroy_process_group()
    sys.exit(code)


def launch(
    fns: Sequence[Callable[[], Any]],
    timeout_s: float = 300.0,
    *,
    tolerate: Collection[int] = (),
    pg_timeout_s: float | None = None,
) -> Any:
    """Run ``fns[r]`` as rank ``r`` in its own spawned process, all joined in one gloo group over loopback.

    ``fns`` must be picklable (top-level functions, or ``functools.partial`` of them). Returns rank 0's return value
    (keep it plain data: JSON-able values and bytes). Raises :class:`LaunchError` with the traceback text when a rank
    raised, or exited without reporting (killed, ``os._exit``), unless it is in ``tolerate`` (never rank 0); and when
    the whole run overruns ``timeout_s`` (every rank still running is killed).
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port, world = free_port(), len(fns)
    args = [(r, world, port, fn, results, pg_timeout_s or timeout_s) for r, fn in enumerate(fns)]
    procs = [ctx.Process(target=_child, args=a, name=f"wire-rank{a[0]}", daemon=True) for a in args]
    for p in procs:
        p.start()
    reports: dict[int, tuple[str, Any]] = {}

    def take(wait_s: float) -> bool:
        try:
            kind, rank, value = results.get(timeout=wait_s)
        except queue.Empty:
            return False
        reports[rank] = (kind, value)
        return True

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(p.is_alive() for p in procs):
        take(0.1)
    overrun = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join(5)
    while take(0.2):  # reports still in the pipe when the last rank exited
        pass
    problems = [f"launch overran {timeout_s:g} s; ranks {overrun} were still running and were killed."] * bool(overrun)
    for r, p in enumerate(procs):
        if (r in tolerate and r != 0) or r in overrun:
            continue
        kind, value = reports.get(r, ("missing", None))
        if kind == "error":
            problems.append(f"rank {r} raised:\n{value}")
        elif kind == "missing":
            problems.append(f"rank {r} exited with code {p.exitcode} without reporting (killed, os._exit, or crash).")
    if problems:
        raise LaunchError("\n".join(problems))
    return reports[0][1]
