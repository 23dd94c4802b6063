"""Federated refinement across processes: a receiver and two senders on loopback answer like
the same engine in one process; the bytes that cross are the encoder's payloads; a dead sender
or a foreign payload is a recorded fallback, never a wrong cache or a hang."""

import os
from functools import partial

import pytest
import torch
from conftest import save_model_dir

from fedrefine_lib import federation, remote, transport, wire
from fedrefine_lib.evaluate import score_mcq
from fedrefine_lib.fuser import BlockFuser, FuserConfig, load_fuser
from fedrefine_lib.kv import KVCache
from fedrefine_lib.models import ModelSpec, load_model
from fedrefine_lib.trace import Trace
from fedrefine_lib.transport import Encoding

ITEMS = [
    {
        "id": f"q{i}", "question_stem": stem, "domain": "science", "answerKey": "A",
        "choices": {"label": ["A", "B", "C"], "text": ["blue", "a red light", "zorblat"]},
    }
    for i, stem in enumerate(["What colour does zorblat glow?", "Which river flows through Tressa?", "Fox?"])
]  # fmt: skip
NAMES = {"receiver": "llama", "s1": "qwen2", "s2": "gemma3"}


@pytest.fixture(scope="module")
def pair_dirs(tiny_models, tmp_path_factory):
    """Saved tiny models (receiver Llama, senders Qwen2 and Gemma3) and a random concat fuser per sender."""
    root = tmp_path_factory.mktemp("remote")
    specs = {}
    for role, key in NAMES.items():
        save_model_dir(*tiny_models[key], root / role)
        specs[role] = ModelSpec(role, str(root / role))
    loaded = {role: load_model(spec) for role, spec in specs.items()}
    fuser_dirs = []
    for i, s in enumerate(("s1", "s2")):
        torch.manual_seed(i)
        fuser = BlockFuser(
            FuserConfig.for_pair(loaded["receiver"], loaded[s], kind="concat", hidden=8, sender_positions=2)
        )
        with torch.no_grad():
            for p in fuser.parameters():
                p.normal_(0, 0.3)
        fuser_dirs.append(str(fuser.save_pretrained(root / f"fuser-{s}")))
    return specs, loaded, tuple(fuser_dirs)


def _job(specs, fuser_dirs, **kw):
    return remote.ReceiverJob(
        specs["receiver"], (specs["s1"], specs["s2"]), fuser_dirs, tuple(ITEMS), timeout_s=20, **kw
    )


def _die(*_args) -> None:
    os._exit(3)  # a sender process that dies before serving


def test_pack_round_trip_and_bad_replies():
    kv = KVCache([torch.randn(1, 2, 3, 4)], [torch.randn(1, 2, 3, 4)], 3)
    enc = transport.encode(kv, Encoding("int8"), "m")
    data = remote.pack([enc, None], {"sender": "s"})
    back, meta = remote.unpack(data)
    assert back[1] is None and back[0].payload == enc.payload and meta["sizes"] == [len(enc.to_bytes()), 0]
    with pytest.raises(transport.PayloadError, match="head"):
        remote.unpack(data[:-1])


@pytest.mark.slow
def test_a_receiver_and_two_senders_answer_as_one_process_would(pair_dirs):
    specs, loaded, fuser_dirs = pair_dirs
    enc = Encoding("int8")
    out = remote.run(
        _job(specs, fuser_dirs, batch_sizes=(1, 3)), [remote.SenderJob(specs[s], enc, 2) for s in ("s1", "s2")], 120
    )
    fusers = {s: load_fuser(d) for s, d in zip(("s1", "s2"), fuser_dirs)}
    local = federation.FedRefine(loaded["receiver"], [loaded["s1"], loaded["s2"]], fusers, transport=enc)
    with torch.no_grad():
        expected = score_mcq(local, ITEMS, batch_size=3, progress=False)
    for b in ("1", "3"):
        assert out[b]["correct"] == expected.correct and not out[b]["fallbacks"]
        assert out[b]["payload_bytes"] == expected.trace.total_bytes  # the encoder's payloads, exactly
        assert out[b]["payload_bytes"] < out[b]["packed_bytes"] < out[b]["wire_bytes"]  # + headers, + frames
        assert set(out[b]["per_sender"]["sender_prefill"]) == {"s1", "s2"} and out[b]["wall_s"] > 0


@pytest.mark.slow
def test_a_dead_sender_is_a_recorded_fallback_to_the_others(pair_dirs):
    specs, loaded, fuser_dirs = pair_dirs
    job = _job(specs, fuser_dirs, batch_sizes=(3,))
    fns = [
        partial(remote.serve_receiver, job),
        partial(remote.serve_sender, remote.SenderJob(specs["s1"], Encoding()), 20),
        _die,
    ]
    out = wire.launch(fns, 120, tolerate=[2])["3"]
    assert {f["sender"] for f in out["fallbacks"]} == {"s2"} and len(out["correct"]) == 3
    assert out["payload_bytes"] > 0  # s1 still served


def test_a_foreign_or_corrupt_payload_is_refused_not_fused():
    kv = KVCache([torch.randn(1, 2, 3, 4)], [torch.randn(1, 2, 3, 4)], 3)
    engine = remote.RemoteFedRefine(None, None, {}, {"s1": "s1:1x2x4"})

    def reply(model: str, flip: bool = False, sender: str = "s1") -> wire.Reply:
        data = bytearray(remote.pack([transport.encode(kv, Encoding(), model)], {"sender": sender}))
        if flip:
            data[-1] ^= 0xFF
        return wire.Reply(True, bytes(data), None, len(data) + 33, len(data), 0.0)

    assert engine._decode("s1", reply("s1:1x2x4"), Trace()) is not None
    bad = [
        (reply("other:1x2x4"), "another model"),
        (reply("s1:1x2x4", True), "CRC32"),
        (reply("s1:1x2x4", sender="s2"), "came from"),
        (wire.Reply(False, error="rank 2 is down"), "down"),
    ]
    for bad, cause in bad:
        assert engine._decode("s1", bad, Trace()) is None and cause in engine.fallbacks[-1]["reason"]
