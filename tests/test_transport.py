"""Transport encodings: exact bytes, lossless round trips, bounded quantisation error, clear
errors for a truncated, corrupted or foreign payload, layer budgets, and the engine seeing the
decoded cache."""

import pytest
import torch

from fedrefine_lib import federation, transport
from fedrefine_lib import kv as kvlib
from fedrefine_lib.engine import continue_prefill
from fedrefine_lib.fuser import BlockFuser, FuserConfig, ResidualFuser
from fedrefine_lib.kv import KVCache
from fedrefine_lib.transport import EncodedKV, Encoding, PayloadError

PROMPTS = [
    [{"role": "user", "content": "What colour does zorblat glow, and why?"}],
    [{"role": "user", "content": "Fox?"}],
]
ENCODINGS = [Encoding(d) for d in ("float32", "bfloat16", "float16", "int8", "int4")] + [
    Encoding("int8", keys="token"),
    Encoding("int4", keys="token"),
    Encoding("int4", layers=(0, 2)),
]


def cache(layers=3, heads=2, seq=5, dim=8, batch=1, seed=0) -> KVCache:
    g = torch.Generator().manual_seed(seed)
    shape = (batch, heads, seq, dim)
    return KVCache(
        [torch.randn(shape, generator=g) * (1 + i) for i in range(layers)],
        [torch.randn(shape, generator=g) for _ in range(layers)],
        seq,
    )


@pytest.mark.parametrize("encoding", ENCODINGS, ids=lambda e: e.label)
def test_payload_bytes_are_exact_and_the_formula_agrees(loaded_models, encoding):
    config = loaded_models["llama"].model.config
    layers, heads, dim = kvlib.kv_shape(config)
    kv = cache(layers, heads, 7, dim)
    enc = transport.encode(kv, encoding, "m")
    assert enc.payload_bytes == transport.payload_bytes(config, 7, encoding)
    back = transport.decode(EncodedKV.from_bytes(enc.to_bytes()), "m")
    assert back.present == [i in encoding.sent(layers) for i in range(layers)]


def test_float_round_trips_are_exact_and_quantisation_error_is_bounded():
    kv = cache(seq=16)
    back = transport.decode(transport.encode(kv, Encoding("float32"), "m"), "m")
    for a, b in zip(kv.keys + kv.values, back.keys + back.values):
        assert torch.equal(a, b)
    bf = transport.decode(transport.encode(kv, Encoding("bfloat16"), "m"))
    assert torch.equal(bf.keys[1], kv.keys[1].bfloat16().float())
    for bits, enc in ((8, Encoding("int8")), (4, Encoding("int4")), (4, Encoding("int4", keys="token"))):
        back = transport.decode(transport.encode(kv, enc, "m"))
        for t, (a, b) in enumerate(zip(kv.keys + kv.values, back.keys + back.values)):
            axis = (2,) if t < kv.num_layers and enc.keys == "channel" else (1, 3)
            step = (a.amax(axis, keepdim=True) - a.amin(axis, keepdim=True)) / (2**bits - 1)
            assert bool(((a - b).abs() <= step / 2 + 1e-2 * step + 1e-3).all())  # half a step, fp16 scales
    big = cache(heads=4, seq=64, dim=32)  # scales are a small share once groups are large
    small = transport.encode(big, Encoding("int4"), "m").payload_bytes
    assert small < transport.encode(big, Encoding("bfloat16"), "m").payload_bytes / 3.5


def test_unsent_layers_decode_to_zeros_of_their_own_shape():
    kv = cache(seq=5)
    kv.keys[1], kv.values[1] = kv.keys[1][:, :, -3:], kv.values[1][:, :, -3:]  # a sliding layer keeping 3
    kv.sliding = [False, True, False]
    back = transport.decode(transport.encode(kv, Encoding("int8", layers=(0, 2)), "m"), "m")
    assert back.present == [True, False, True] and back.sliding == kv.sliding
    assert back.keys[1].shape == (1, 2, 3, 8) and back.values[1].shape == (1, 2, 3, 8)
    assert not back.keys[1].any() and back.keys[2].shape == kv.keys[2].shape


def test_bad_payloads_are_errors_never_a_wrong_cache():
    enc = transport.encode(cache(), Encoding("int8"), "sender-a:3x2x8")
    with pytest.raises(PayloadError, match="truncated"):
        transport.decode(EncodedKV(enc.header, enc.payload[:-1]))
    flipped = bytearray(enc.payload)
    flipped[3] ^= 0xFF
    with pytest.raises(PayloadError, match="CRC32"):
        transport.decode(EncodedKV(enc.header, bytes(flipped)))
    with pytest.raises(PayloadError, match="another model"):
        transport.decode(enc, "sender-b:3x2x8")
    with pytest.raises(PayloadError, match="header"):
        transport.decode(EncodedKV(b"{not json", enc.payload))
    with pytest.raises(ValueError, match="batch 1"):
        transport.encode(cache(batch=2), Encoding(), "m")
    with pytest.raises(ValueError, match="Unsupported"):
        Encoding("int3")
    with pytest.raises(ValueError, match="layers"):
        transport.encode(cache(), Encoding(layers=(5,)), "m")


def test_roundtrip_sends_each_query_without_its_padding():
    kv = cache(batch=3, seq=6)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]])
    back, sizes = transport.roundtrip(kv, mask, Encoding("float32"), "m")
    assert sizes == [2 * 3 * 2 * n * 8 * 4 for n in (4, 6, 0)]  # K and V, 3 layers, 2 heads, dim 8, fp32
    assert torch.equal(back.keys[0][0, :, 2:], kv.keys[0][0, :, 2:]) and not back.keys[0][0, :, :2].any()
    assert torch.equal(back.values[2][1], kv.values[2][1]) and not back.keys[0][2].any()


def test_layer_budgets_rank_by_gate_and_read_layers_follow_the_map(loaded_models):
    r, s = loaded_models["qwen3"], loaded_models["llama"]
    fuser = BlockFuser(FuserConfig.for_pair(r, s, kind="concat", hidden=8, layer_map="top"))
    assert transport.read_layers(fuser) == [fuser.config.sender_layers - 1]
    fuser = BlockFuser(FuserConfig.for_pair(r, s, kind="concat", hidden=8))
    read, layer_map = transport.read_layers(fuser), fuser.config.layer_map
    assert len(read) >= 3, "the test needs a fuser reading three sender layers"
    middle, bottom = read[len(read) // 2], read[0]
    logits = torch.full((fuser.config.receiver_layers, 2), -6.0)  # every gate shut ...
    logits[[t for t, s in enumerate(layer_map) if s == middle]] = 6.0  # ... but the middle layer's readers
    logits[[t for t, s in enumerate(layer_map) if s == bottom]] = 0.0  # half open
    with torch.no_grad():
        fuser.gate_logits.copy_(logits)
    assert transport.layers_by_gate(fuser, 1) == [middle]  # not the top layer: the gates decide
    assert transport.layers_by_gate(fuser, 2) == sorted([middle, bottom])
    with torch.no_grad():
        fuser.gate_logits.zero_()  # all equal: ties go to the deeper layers
    assert transport.layers_by_gate(fuser, 2) == read[-2:]
    assert transport.layers_by_gate(fuser, 99) == read
    with pytest.raises(ValueError, match="budget"):
        transport.layers_by_gate(fuser, 0)


def _engine(loaded_models, kind, **kw):
    r, s = loaded_models["qwen3"], loaded_models["llama"]
    torch.manual_seed(0)
    cls = ResidualFuser if kind == "residual" else BlockFuser
    fuser = cls(FuserConfig.for_pair(r, s, kind=kind, hidden=16, layer_map="top_down"))
    with torch.no_grad():
        for p in fuser.parameters():
            p.normal_(0, 0.3)
    fuser.eval().set_gates(True)
    return federation.C2C(r, s, fuser, **kw), fuser


@pytest.mark.parametrize("kind", ["concat", "residual"])
def test_the_engine_sees_the_decoded_cache_and_counts_its_payload(loaded_models, kind):
    plain, fuser = _engine(loaded_models, kind)
    with torch.no_grad():
        ref = continue_prefill(plain.receiver.model, plain.prefill(PROMPTS))[:, -1]
        lossless, _ = _engine(loaded_models, kind, transport=Encoding("float32"))
        pre = lossless.prefill(PROMPTS)
        torch.testing.assert_close(continue_prefill(plain.receiver.model, pre)[:, -1], ref)
        config = loaded_models["llama"].model.config
        lengths = _sender_lengths(lossless)
        assert pre.trace.bytes[lossless.links[0]] == sum(
            transport.payload_bytes(config, n, Encoding("float32")) for n in lengths
        )
        lossy, _ = _engine(loaded_models, kind, transport=Encoding("int4"))
        pre4 = lossy.prefill(PROMPTS)
        assert pre4.trace.bytes[lossy.links[0]] < pre.trace.bytes[lossless.links[0]] / 4
        assert not torch.allclose(continue_prefill(plain.receiver.model, pre4)[:, -1], ref)
        # Unsent layers: the receiver layers reading them get no fusion, others are untouched.
        unsent = fuser.config.layer_map[0]
        sent = [i for i in range(fuser.config.sender_layers) if i != unsent]
        partial, _ = _engine(loaded_models, kind, transport=Encoding("float32", layers=sent))
        caches = partial.prompt_caches(PROMPTS)
        projections = partial.project(caches)[0]
        keys = projections.keys if kind == "concat" else projections[0]
        full = lossless.project(lossless.prompt_caches(PROMPTS))[0]
        full_keys = full.keys if kind == "concat" else full[0]
        for t, layer in enumerate(fuser.config.layer_map):
            if layer == unsent:
                assert not keys[t].any()
            else:
                torch.testing.assert_close(keys[t], full_keys[t])


def _sender_lengths(engine) -> list[int]:
    caches = engine.prompt_caches(PROMPTS)
    return caches.alignments[0].sender_mask.sum(1).tolist()


def test_noise_is_added_at_its_relative_scale_before_encoding_and_named_in_the_label():
    kv = cache(seq=64, dim=32)
    torch.manual_seed(0)
    back = transport.decode(transport.encode(kv, Encoding("float32", noise=0.5), "m"))
    for a, b in zip(kv.keys + kv.values, back.keys + back.values):
        ratio = float((b - a).pow(2).mean().sqrt() / a.pow(2).mean().sqrt())
        assert 0.45 < ratio < 0.55  # one tensor's RMS scales its noise: deeper (larger) layers get more
    assert transport.decode(transport.encode(kv, Encoding("float32", noise=0.0), "m")).keys[0].equal(kv.keys[0])
    enc = Encoding("int4", layers=(1,), noise=0.25)
    assert enc.label == "int4, 1 layers, noise 0.25" and enc.with_layers((0, 2)).noise == 0.25
    plain = Encoding("int4", layers=(1,))
    assert transport.encode(kv, enc, "m").payload_bytes == transport.encode(kv, plain, "m").payload_bytes  # no bytes
    for bad in (-0.1, float("nan")):
        with pytest.raises(ValueError, match="noise"):
            Encoding("float32", noise=bad)
