"""Multi-sender FedRefine (issue 6): residual, concat and prefix fusion, closed sources, hub errors."""

import dataclasses
import json

import pytest
import torch

from fedrefine_lib import evaluate, federation, gating, kv, train
from fedrefine_lib.decode import generate
from fedrefine_lib.engine import Prefill, Standalone, continue_prefill
from fedrefine_lib.fuser import BlockFuser, FuserConfig, FuserLoadError, build_fuser, load_fuser
from fedrefine_lib.gate import Gate, GateConfig
from fedrefine_lib.hub import FuserHub, FuserJob, MissingFuserError
from fedrefine_lib.kv import KVCache
from fedrefine_lib.safe_io import config_digest

PROMPTS = [
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What colour does zorblat glow, and why?"},
    ],
    [{"role": "user", "content": "Fox?"}],
    [{"role": "user", "content": "Kevani river flows through the northern valley of Tressa."}],
]
SENDERS = ("qwen2", "llama", "gemma3")  # same tokenizer, own tokenizer, sliding-window layers


def random_fuser(loaded_models, sender, receiver="qwen3", kind="residual", seed=0, **options):
    torch.manual_seed(seed)
    fuser = build_fuser(
        FuserConfig.for_pair(loaded_models[receiver], loaded_models[sender], kind=kind, hidden=16, **options)
    )
    with torch.no_grad():
        for p in fuser.parameters():
            p.normal_(0, 0.3)
    fuser.eval().set_gates(True)
    return fuser


def engine(loaded_models, senders, mode="residual", receiver="qwen3", **kw):
    fusers = {s: random_fuser(loaded_models, s, receiver, mode, seed=sorted(loaded_models).index(s)) for s in senders}
    return federation.FedRefine(loaded_models[receiver], [loaded_models[s] for s in senders], fusers, mode=mode, **kw)


class Fixed:
    """A policy returning given weights (rows of the batch, columns own + senders)."""

    name = "fixed"

    def __init__(self, weights):
        self.w = torch.as_tensor(weights, dtype=torch.float32)

    def __call__(self, query):
        return self.w[: len(query.messages_batch)]


def logits(eng, prompts):
    with torch.no_grad():
        pre = eng.prefill(prompts)
        return pre, continue_prefill(eng.receiver.model, pre)[:, -1]


def test_equal_weight_residual_with_one_sender_is_c2c(loaded_models):
    multi = engine(loaded_models, ["llama"])
    c2c = federation.C2C(multi.receiver, multi.senders[0], multi.fusers[0])
    (a, la), (b, lb) = logits(multi, PROMPTS), logits(c2c, PROMPTS)
    assert all(torch.equal(x, y) for x, y in zip(a.cache.keys + a.cache.values, b.cache.keys + b.cache.values))
    assert torch.equal(la, lb) and a.trace.bytes == b.trace.bytes
    assert {"tokenize", "receiver_prefill", "gating", "alignment", "sender_prefill", "projection", "combine"} == set(
        a.trace.seconds
    )


@pytest.mark.parametrize("mode", ["residual", "concat", "prefix"])
def test_closed_source_has_no_effect(loaded_models, mode):
    """Gate weight 0 for a sender == the engine without that sender, bit for bit; it is
    not run and sends nothing."""
    gate = Gate(GateConfig.for_receiver(loaded_models["qwen3"], ["qwen2", "llama"]))
    with torch.no_grad():
        gate.out.weight.normal_(0, 1.0)
    learned = gating.LearnedGate(gate)

    def closing_llama(query):
        w = learned(query).clone()
        w[:, query.senders.index("llama") + 1] = 0.0
        return w

    both = engine(loaded_models, ["qwen2", "llama"], mode, policy=closing_llama)
    alone = engine(loaded_models, ["qwen2"], mode, policy=learned)
    (a, la), (b, lb) = logits(both, PROMPTS), logits(alone, PROMPTS)
    assert all(torch.equal(x, y) for x, y in zip(a.cache.keys + a.cache.values, b.cache.keys + b.cache.values))
    assert torch.equal(la, lb)
    assert set(a.trace.bytes) == {"qwen2->qwen3"} and a.trace.bytes == b.trace.bytes
    assert generate(both, PROMPTS, 4)[0] == generate(alone, PROMPTS, 4)[0]
    # The gate's weights for the open sender did shape the cache (not a trivially equal test).
    equal = engine(loaded_models, ["qwen2"], mode)
    assert not torch.allclose(logits(equal, PROMPTS)[1], lb)


def test_closed_source_per_query_residual(loaded_models):
    """Closing a sender for one query of a batch leaves that query exactly as without it,
    and only the queries it serves count on its link."""
    w = [[1.0, 0.7, 1.3], [1.0, 0.7, 0.0], [1.0, 0.7, 0.5]]
    both = engine(loaded_models, ["qwen2", "llama"], policy=Fixed(w))
    alone = engine(loaded_models, ["qwen2"], policy=Fixed([r[:2] for r in w]))
    (a, _), (b, _) = logits(both, PROMPTS), logits(alone, PROMPTS)
    for x, y in zip(a.cache.keys + a.cache.values, b.cache.keys + b.cache.values):
        assert torch.equal(x[1], y[1]) and not torch.equal(x[0], y[0])
    c2c = federation.C2C(both.receiver, both.senders[1], both.fusers[1])
    lengths = c2c.aligners[0](PROMPTS, both.receiver.tokenizer, both.senders[1].tokenizer).sender_mask.sum(1)
    cfg = both.senders[1].model.config
    from fedrefine_lib import kv

    assert a.trace.bytes["llama->qwen3"] == sum(kv.kv_bytes(cfg, int(n)) for i, n in enumerate(lengths) if i != 1)


@pytest.mark.parametrize("mode", ["concat", "prefix"])
def test_concat_with_no_open_sender_is_the_receiver_alone(loaded_models, mode):
    closed = engine(loaded_models, ["llama"], mode, policy=Fixed([[1.0, 0.0]] * 3))
    (a, la), (_, lb) = logits(closed, PROMPTS), logits(Standalone(closed.receiver), PROMPTS)
    assert a.prefix_mask.shape == (3, 0) and torch.equal(la, lb)
    # Closed for one query only: its sender block is masked, the query reads as alone.
    partly = engine(loaded_models, ["llama"], mode, policy=Fixed([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0]]))
    p, lp = logits(partly, PROMPTS)
    assert p.prefix_mask[1].sum() == 0 and p.prefix_mask[0].sum() > 0
    torch.testing.assert_close(lp[1], lb[1], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(lp[0], lb[0])


def rephrase(text: str) -> str:
    return text.replace("What", "Which thing").replace("river", "stream")


VIEWS = {
    "qwen2": lambda batch: [[{**m, "content": rephrase(m["content"])} for m in chat] for chat in batch],
    "llama": lambda batch: [chat[-1:] + [{"role": "user", "content": "In short."}] for chat in batch],
}


@pytest.mark.parametrize("mode", ["concat", "prefix"])
@pytest.mark.parametrize(
    "receiver,senders",
    [
        ("qwen3", ["qwen2", "llama"]),
        ("qwen3", ["gemma3", "llama"]),
        ("gemma3", ["llama", "qwen2"]),
        ("llama", ["qwen3"]),
    ],
)
def test_concat_senders_on_different_texts_batched_equals_per_sample(loaded_models, receiver, senders, mode):
    views = {s: VIEWS.get(s, VIEWS["qwen2"]) for s in senders}
    if mode == "prefix" and receiver == "gemma3":  # sliding-window receivers are refused
        with pytest.raises(ValueError, match="sliding-window layers.*concat"):
            engine(loaded_models, senders, mode, receiver=receiver, sender_views=views)
        return
    eng = engine(loaded_models, senders, mode, receiver=receiver, sender_views=views)
    pre, batch_logits = logits(eng, PROMPTS)
    assert pre.cache.seq_len == pre.prefix_mask.shape[1] + pre.input_ids.shape[1] - 1
    texts, trace = generate(eng, PROMPTS, max_new_tokens=6)
    assert set(trace.bytes) == {f"{s}->{receiver}" for s in senders}
    for b, prompt in enumerate(PROMPTS):
        one, lo = logits(eng, [prompt])
        torch.testing.assert_close(batch_logits[b : b + 1], lo, atol=1e-5, rtol=1e-4)
        assert generate(eng, [prompt], max_new_tokens=6)[0] == [texts[b]]
    # The senders really read their own texts: another view changes the result.
    plain = engine(loaded_models, senders, mode, receiver=receiver)
    assert not torch.allclose(logits(plain, PROMPTS)[1], batch_logits)


@pytest.mark.parametrize("mode", ["residual", "concat", "prefix"])
def test_residual_batched_equals_per_sample_and_scores(loaded_models, mode):
    eng = engine(loaded_models, ["qwen2", "llama", "gemma3"], mode, policy=Fixed([[1.0, 0.5, 1.0, 0.0]] * 3))
    _, batch_logits = logits(eng, PROMPTS)
    for b, prompt in enumerate(PROMPTS):
        torch.testing.assert_close(batch_logits[b : b + 1], logits(eng, [prompt])[1], atol=1e-5, rtol=1e-4)
    items = [
        {
            "id": f"q{i}",
            "question_stem": s,
            "answerKey": "B",
            "domain": "x",
            "choices": {"label": ["A", "B"], "text": ["blue", "red"]},
        }
        for i, s in enumerate(["Glow?", "Flows?", "Jumps?"])
    ]
    result = evaluate.score_mcq(eng, items, batch_size=2, progress=False)
    assert result.accuracy().n == 3 and set(result.trace.bytes) == {"qwen2->qwen3", "llama->qwen3"}
    one = evaluate.score_mcq(eng, items[2:], progress=False)
    assert one.scores[0] == pytest.approx(result.scores[2], abs=1e-4)


def test_hub_missing_pair_is_named(loaded_models, tmp_path):
    hub = FuserHub(tmp_path / "hub")
    r = loaded_models["qwen3"]
    fuser = random_fuser(loaded_models, "qwen2")
    hub.put(fuser, train.TrainResult([1.0], {}, 1, 0.0), {"test": 1})
    eng = federation.FedRefine(r, [loaded_models["qwen2"]], hub.fusers(r, [loaded_models["qwen2"]]))
    assert torch.equal(eng.fusers[0].gate_logits, fuser.gate_logits) and eng.mode == "residual"
    with pytest.raises(MissingFuserError, match=r"llama->qwen3/default.*train_missing"):
        hub.fusers(r, [loaded_models["qwen2"], loaded_models["llama"]])
    with pytest.raises(MissingFuserError, match=r"qwen2->qwen3/concat"):
        hub.fusers(r, [loaded_models["qwen2"]], "concat")
    concat = random_fuser(loaded_models, "qwen2", kind="concat")
    hub.put(concat, train.TrainResult([1.0], {}, 1, 0.0), {"test": 1}, variant="concat")
    eng = federation.FedRefine(r, [loaded_models["qwen2"]], hub.fusers(r, [loaded_models["qwen2"]], "concat"))
    assert isinstance(eng.fusers[0], BlockFuser) and eng.mode == "concat"
    with pytest.raises(ValueError, match="kinds \\['concat'\\] but the engine runs 'residual'"):
        federation.FedRefine(r, [loaded_models["qwen2"]], {"qwen2": concat}, mode="residual")
    with pytest.raises(ValueError, match="kinds \\['concat', 'residual'\\]"):
        federation.FedRefine(
            r,
            [loaded_models["qwen2"], loaded_models["llama"]],
            {"qwen2": concat, "llama": random_fuser(loaded_models, "llama")},
        )
    with pytest.raises(ValueError, match="holds fusers of kinds .*'concat'.*not 'prefix'"):
        hub.fusers(r, [loaded_models["qwen2"]], "prefix", variant="concat")
    prefix = random_fuser(loaded_models, "qwen2", kind="prefix")
    hub.put(prefix, train.TrainResult([1.0], {}, 1, 0.0), {"test": 1}, variant="prefix")
    assert (
        federation.FedRefine(r, [loaded_models["qwen2"]], hub.fusers(r, [loaded_models["qwen2"]], "prefix")).mode
        == "prefix"
    )
    with pytest.raises(KeyError, match="llama->qwen3"):
        federation.FedRefine(r, [loaded_models["llama"]], {"qwen2": fuser})


def test_block_fuser_save_load_strict(loaded_models, tmp_path):
    fuser = random_fuser(loaded_models, "llama", kind="concat")
    fuser.save_pretrained(tmp_path / "c")
    back = load_fuser(tmp_path / "c", loaded_models["qwen3"], loaded_models["llama"], kind="concat")
    assert type(back) is BlockFuser and back.kind == "concat"
    assert all(torch.equal(a, b) for a, b in zip(fuser.state_dict().values(), back.state_dict().values()))
    random_fuser(loaded_models, "llama").save_pretrained(tmp_path / "r")
    with pytest.raises(FuserLoadError, match="'residual' fuser, not a 'concat'.*kind='residual'"):
        load_fuser(tmp_path / "r", kind="concat")
    # A prefix fuser has the same tensors, but was trained to be read another way: refused.
    random_fuser(loaded_models, "llama", kind="prefix").save_pretrained(tmp_path / "p")
    with pytest.raises(FuserLoadError, match="'prefix' fuser, not a 'concat'"):
        load_fuser(tmp_path / "p", kind="concat")
    assert load_fuser(tmp_path / "p", loaded_models["qwen3"], loaded_models["llama"]).kind == "prefix"
    # A config whose kind was edited no longer matches the weights' tensors.
    meta = json.loads((tmp_path / "c" / "fuser_config.json").read_text())
    meta["config"]["kind"] = "residual"
    (tmp_path / "c" / "fuser_config.json").write_text(json.dumps(meta))
    with pytest.raises(FuserLoadError, match="config_sha256 does not match"):
        load_fuser(tmp_path / "c")
    meta["config_sha256"] = config_digest(meta)  # re-signed: the weights still do not fit
    (tmp_path / "c" / "fuser_config.json").write_text(json.dumps(meta))
    with pytest.raises(FuserLoadError, match="does not match its config"):
        load_fuser(tmp_path / "c")


def test_a_fuser_saved_without_a_config_checksum_is_refused(loaded_models, tmp_path):
    """Files saved before the checksum covered the config load no more: retrain them."""
    random_fuser(loaded_models, "llama", kind="concat").save_pretrained(tmp_path / "old")
    meta = json.loads((tmp_path / "old" / "fuser_config.json").read_text())
    del meta["config_sha256"]
    (tmp_path / "old" / "fuser_config.json").write_text(json.dumps(meta))
    with pytest.raises(FuserLoadError, match="saved by an older version.*retrain"):
        load_fuser(tmp_path / "old")


@pytest.mark.parametrize("kind", ["concat", "prefix"])
def test_block_fuser_trains_with_the_one_training_loop(loaded_models, kind):
    """``train.train_fuser`` trains a concat or prefix fuser in its own fusion mode."""
    r, s = loaded_models["qwen3"], loaded_models["llama"]
    fuser = build_fuser(FuserConfig.for_pair(r, s, kind=kind, hidden=8, gate_init=2.0))
    assert federation.C2C(r, s, fuser).mode == kind
    records = [[{"role": "user", "content": f"Fox {i}?"}, {"role": "assistant", "content": "blue"}] for i in range(4)]
    before = [p.detach().clone() for p in fuser.parameters()]
    result = train.train_fuser(
        r,
        s,
        fuser,
        records,
        train.TrainConfig(lr=1e-2, batch_size=2, epochs=2, cpu=True, cache_prompts=True, progress=False),
    )
    assert result.steps == 4 and all(torch.isfinite(torch.tensor(result.losses)))
    assert any(not torch.equal(a, b) for a, b in zip(before, fuser.parameters()))


def test_reused_caches_keep_their_trace(loaded_models):
    eng = engine(loaded_models, ["qwen2", "llama"])
    with torch.no_grad():
        caches = eng.prompt_caches(PROMPTS)
        before = dict(caches.trace.seconds)
        a, b = eng.fuse(caches), eng.fuse(caches)
    assert caches.trace.seconds == before and "projection" not in before
    assert set(a.trace.seconds) - set(before) == {"gating", "projection", "combine"}
    assert a.trace.total_seconds == pytest.approx(sum(a.trace.seconds.values()))
    assert all(torch.equal(x, y) for x, y in zip(a.cache.values, b.cache.values))


@pytest.mark.parametrize("mode", ["residual", "concat", "prefix"])
def test_c2c_runs_every_fuser_kind(loaded_models, mode):
    fuser = random_fuser(loaded_models, "llama", kind=mode)
    receiver, sender = loaded_models["qwen3"], loaded_models["llama"]
    eng = federation.C2C(receiver, sender, fuser)
    assert isinstance(eng, federation.FedRefine) and eng.mode == mode
    same = federation.FedRefine(receiver, [sender], {sender.name: fuser}, mode=mode)
    (_, la), (_, lb) = logits(eng, PROMPTS), logits(same, PROMPTS)
    assert torch.allclose(la, lb, atol=1e-5)
    _, alone = logits(Standalone(receiver), PROMPTS)
    assert not torch.allclose(la, alone, atol=1e-4)  # the sender's cache really reaches the receiver
    wrong = federation.C2C(receiver, sender, fuser, sender_view=federation.rotate(1))
    _, lw = logits(wrong, PROMPTS)
    assert not torch.allclose(la, lw, atol=1e-4)  # the control really feeds other caches


@pytest.mark.parametrize("receiver", ["qwen3", "llama", "gemma3"])
def test_concat_weight_multiplies_a_blocks_attention_mass(loaded_models, receiver):
    """In concat fusion a sender weight w adds log w to its block's attention logits: weight 2
    is exactly the block placed twice, and with every weight 1 the biased 4D mask equals the
    plain 2D one (gemma3: sliding-window layers and a prompt longer than the window)."""
    senders = ["qwen2"] if receiver != "qwen2" else ["llama"]
    eng = engine(loaded_models, senders, "concat", receiver=receiver)
    caches = eng.prompt_caches(PROMPTS)
    (block,) = eng.project(caches)
    with torch.no_grad():
        doubled = eng.combine(caches, [block], torch.tensor([[1.0, 2.0]] * 3))
        ones = eng.combine(caches, [block], torch.ones(3, 2))
        model = eng.receiver.model
        twice_keys = [torch.cat([b, k], dim=2) for b, k in zip(block.keys, ones.cache.keys)]
        twice_values = [torch.cat([b, v], dim=2) for b, v in zip(block.values, ones.cache.values)]
        twice = Prefill(
            ones.input_ids,
            ones.attention_mask,
            KVCache(twice_keys, twice_values, twice_keys[0].shape[2], list(ones.cache.sliding)),
            ones.trace,
            torch.cat([ones.prefix_mask, ones.prefix_mask], dim=1),
        )
        la = continue_prefill(model, doubled)
        lb = continue_prefill(model, twice)
        torch.testing.assert_close(la, lb, atol=1e-5, rtol=1e-4)
        plain = Prefill(ones.input_ids, ones.attention_mask, ones.cache, ones.trace, ones.prefix_mask)
        torch.testing.assert_close(continue_prefill(model, ones), continue_prefill(model, plain), atol=1e-5, rtol=1e-4)
        assert not torch.allclose(la, continue_prefill(model, ones), atol=1e-4)


@pytest.mark.parametrize("receiver", ["qwen3", "llama"])
def test_prefix_prompt_reads_the_sender_blocks(loaded_models, receiver):
    """In prefix fusion the receiver's prompt tokens are prefilled reading the blocks (with
    their log-weights), and the gradient reaches the fuser through them; in concat fusion
    the prompt cache is the receiver's own prefill, bit for bit."""
    sender = "qwen2" if receiver == "llama" else "llama"
    concat, prefix = (engine(loaded_models, [sender], mode, receiver=receiver) for mode in ("concat", "prefix"))
    prefix.fusers[0].load_state_dict(concat.fusers[0].state_dict())  # the same projector, read two ways
    caches = concat.prompt_caches(PROMPTS)
    own = caches.receiver_cache
    with torch.no_grad():
        (block,) = concat.project(caches)
        c, p = concat.combine(caches, [block], torch.ones(3, 2)), prefix.combine(caches, [block], torch.ones(3, 2))
    P = block.seq_len
    assert all(torch.equal(k[:, :, P:], o) for k, o in zip(c.cache.keys, own.keys))
    assert all(torch.equal(k[:, :, :P], b) for k, b in zip(p.cache.keys, block.keys))  # the blocks themselves
    assert "receiver_prefill_on_senders" in p.trace.seconds and "receiver_prefill_on_senders" not in c.trace.seconds
    real = caches.receiver_mask[:, :-1].bool()
    assert not torch.allclose(
        p.cache.keys[-1][:, :, P:].transpose(1, 2)[real], own.keys[-1].transpose(1, 2)[real], atol=1e-4
    )
    # A lower weight on the block changes what the prompt reads from it.
    with torch.no_grad():
        half = prefix.combine(caches, [block], torch.tensor([[1.0, 0.5]] * 3))
    assert not torch.allclose(half.cache.values[-1][:, :, P:], p.cache.values[-1][:, :, P:], atol=1e-5)
    # Differentiable: the prompt KV of the top layer carries gradient back to the bottom layer's projector.
    fuser = prefix.fusers[0]
    (p_block,) = prefix.project(caches)
    grad = torch.autograd.grad(
        prefix.combine(caches, [p_block], torch.ones(3, 2)).cache.values[-1][:, :, P:].sum(),
        fuser.value_projectors[0].out.weight,
    )[0]
    assert grad.abs().sum() > 0


@pytest.mark.parametrize("mode", ["concat", "prefix"])
def test_sender_sends_only_its_last_positions(loaded_models, mode, tmp_path):
    """``sender_positions=n``: a block fuser's sender sends the cache of its last ``n`` prompt
    positions only. The block is the projection of exactly those positions of the full cache,
    only their bytes count on the wire, and the receiver sees an ``n``-column block."""
    r, s = loaded_models["qwen3"], loaded_models["llama"]
    full = random_fuser(loaded_models, "llama", kind=mode)
    last = build_fuser(dataclasses.replace(full.config, sender_positions=2))
    last.load_state_dict(full.state_dict())
    last.eval().set_gates(True)
    eng_full, eng_last = (federation.FedRefine(r, [s], {s.name: f}, mode=mode) for f in (full, last))
    with torch.no_grad():
        c_full, c_last = eng_full.prompt_caches(PROMPTS), eng_last.prompt_caches(PROMPTS)
        (block,) = eng_last.project(c_last)
        whole = c_full.sender_caches[0]
        tail = KVCache([k[:, :, -2:] for k in whole.keys], [v[:, :, -2:] for v in whole.values], 2)
        expected = full(tail)
    sent = c_last.sender_caches[0]
    assert sent.seq_len == 2 and all(torch.equal(k[:, :, -2:], t) for k, t in zip(whole.keys, sent.keys))
    assert torch.equal(c_last.alignments[0].sender_mask, c_full.alignments[0].sender_mask[:, -2:])
    assert all(torch.equal(a, b) for a, b in zip(block.keys + block.values, expected.keys + expected.values))
    link = eng_last.links[0]
    assert c_last.trace.bytes[link] == len(PROMPTS) * kv.kv_bytes(s.model.config, 2, "bfloat16")
    assert c_full.trace.bytes[link] > 5 * c_last.trace.bytes[link]
    pre, la = logits(eng_last, PROMPTS)
    assert pre.prefix_mask.shape[1] == 2
    _, alone = logits(Standalone(r), PROMPTS)
    assert not torch.allclose(la, alone, atol=1e-4)  # the two positions reach the receiver
    last.save_pretrained(tmp_path / "f")
    assert load_fuser(tmp_path / "f", r, s, kind=mode).config.sender_positions == 2


def test_sender_positions_is_for_block_fusers_only(loaded_models):
    r, s = loaded_models["qwen3"], loaded_models["llama"]
    with pytest.raises(ValueError, match="whole number >= 1"):
        FuserConfig.for_pair(r, s, hidden=8, sender_positions=0)
    with pytest.raises(ValueError, match="residual fuser.*concat"):
        FuserConfig.for_pair(r, s, hidden=8, sender_positions=1)
    assert FuserConfig.for_pair(r, s, kind="concat", hidden=8, sender_positions=1).sender_positions == 1
    # One profile's options serve every kind: residual jobs drop the block-only option.
    assert FuserJob("llama", "qwen3", "default", "residual", {"hidden": 8, "sender_positions": 1}).options == {
        "hidden": 8
    }
    assert FuserJob("llama", "qwen3", "concat", "concat", {"sender_positions": 1}).options == {"sender_positions": 1}
