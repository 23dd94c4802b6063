"""Gating network and selection policies (issue 6)."""

import json

import pytest
import torch
from test_multi import PROMPTS, engine, logits

from fedrefine_lib import federation, gate_training, gating, train
from fedrefine_lib import gate as gatelib
from fedrefine_lib.engine import Standalone
from fedrefine_lib.evaluate import McqResult
from fedrefine_lib.safe_io import config_digest
from fedrefine_lib.train import TrainConfig


def query(loaded_models, senders, prompts=PROMPTS):
    pre = Standalone(loaded_models["qwen3"]).prefill(prompts)
    return gatelib.GateQuery(prompts, pre.cache, pre.attention_mask[:, :-1], list(senders))


def test_fresh_gate_is_equal_weights(loaded_models):
    gate = gatelib.Gate(gatelib.GateConfig.for_receiver(loaded_models["qwen3"], ["qwen2", "llama"]))
    q = query(loaded_models, ["qwen2", "llama"])
    assert torch.equal(gating.LearnedGate(gate)(q), gating.EqualWeights()(q))
    eq = engine(loaded_models, ["qwen2", "llama"], policy=gating.EqualWeights())
    gated = engine(loaded_models, ["qwen2", "llama"], policy=gating.LearnedGate(gate))
    assert torch.equal(logits(eq, PROMPTS)[1], logits(gated, PROMPTS)[1])


def test_pooled_features_ignore_padding(loaded_models):
    batch = gatelib.pooled_features(query(loaded_models, []).receiver_cache, query(loaded_models, []).mask)
    for b, p in enumerate(PROMPTS):
        one = query(loaded_models, [], [p])
        torch.testing.assert_close(
            batch[b : b + 1], gatelib.pooled_features(one.receiver_cache, one.mask), atol=1e-5, rtol=1e-4
        )


def test_pooled_features_are_the_maximum_over_real_tokens():
    from fedrefine_lib.kv import KVCache

    values = torch.tensor([[1.0, 9.0, -2.0], [5.0, -1.0, 0.5]]).reshape(2, 1, 3, 1)  # [B=2, H=1, N=3, D=1]
    cache = KVCache([torch.zeros_like(values)], [values], 3)
    mask = torch.tensor([[1, 0, 1], [1, 1, 1]])  # 9.0 sits on a padding position
    assert gatelib.pooled_features(cache, mask).tolist() == [[1.0], [5.0]]


def test_gate_maps_engine_senders_to_its_columns(loaded_models):
    gate = gatelib.Gate(gatelib.GateConfig.for_receiver(loaded_models["qwen3"], ["qwen2", "llama", "gemma3"]))
    with torch.no_grad():
        gate.out.bias.copy_(torch.tensor([0.0, 1.0, 2.0, 3.0]))
    w = gating.LearnedGate(gate)(query(loaded_models, ["gemma3", "qwen2"]))
    torch.testing.assert_close(w[0], 2 * torch.sigmoid(torch.tensor([0.0, 3.0, 1.0])))
    with pytest.raises(ValueError, match="no weight for \\['mystery'\\]"):
        gate.weights(query(loaded_models, ["mystery"]))
    closed = gating.LearnedGate(gate, threshold=1.5)(query(loaded_models, ["qwen2", "llama"]))
    assert (closed[:, 1] == 0).all() and (closed[:, 2] > 0).all()


def test_gate_save_load_strict(loaded_models, tmp_path):
    r = loaded_models["qwen3"]
    gate = gatelib.Gate(gatelib.GateConfig.for_receiver(r, ["qwen2", "llama"], hidden=8))
    with torch.no_grad():
        gate.out.weight.normal_()
    gate.save_pretrained(tmp_path / "g")
    back = gatelib.Gate.from_pretrained(tmp_path / "g", r, ["qwen2", "llama"])
    assert all(torch.equal(a, b) for a, b in zip(gate.state_dict().values(), back.state_dict().values()))
    with pytest.raises(gatelib.GateLoadError, match="senders"):
        gatelib.Gate.from_pretrained(tmp_path / "g", r, ["llama", "qwen2"])
    with pytest.raises(gatelib.GateLoadError, match="receiver_name"):
        gatelib.Gate.from_pretrained(tmp_path / "g", loaded_models["llama"], ["qwen2", "llama"])
    weights = tmp_path / "g" / gatelib.WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(gatelib.GateLoadError, match="sha256"):
        gatelib.Gate.from_pretrained(tmp_path / "g")
    with pytest.raises(gatelib.GateLoadError, match="not a saved gate"):
        gatelib.Gate.from_pretrained(tmp_path / "nothing")
    # A config without `hidden` (re-signed, so its checksum passes) names the key, not a default width.
    gate.save_pretrained(tmp_path / "h")
    meta = json.loads((tmp_path / "h" / gatelib.CONFIG_FILE).read_text())
    del meta["config"]["hidden"]
    meta["config_sha256"] = config_digest(meta)
    (tmp_path / "h" / gatelib.CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(gatelib.GateLoadError, match=r"gate_config.json: config lacks \['hidden'\]"):
        gatelib.Gate.from_pretrained(tmp_path / "h")


def result(ids, domains, correct):
    r = McqResult("loglik")
    r.ids, r.domains, r.correct = list(ids), list(domains), list(correct)
    return r


def test_prior_subsets_and_oracle():
    ids, doms = ["a", "b", "c", "d"], ["bio", "bio", "geo", "geo"]
    results = {
        (): result(ids, doms, [False, False, True, False]),
        ("x",): result(ids, doms, [True, False, False, False]),
        ("y",): result(ids, doms, [False, False, True, False]),
        ("x", "y"): result(ids, doms, [True, True, True, True]),
    }
    assert gating.prior_subsets(results) == {"bio": ("x", "y"), "geo": ("x", "y")}
    del results[("x", "y")]
    assert gating.prior_subsets(results) == {"bio": ("x",), "geo": ()}  # geo: () ties ("y",); smaller wins
    assert gating.oracle_correct(results) == [True, False, True, False]
    with pytest.raises(ValueError, match="different items"):
        gating.oracle_correct({(): result(ids, doms, [True] * 4), ("x",): result(ids[::-1], doms, [True] * 4)})
    # only senders that know the domain count: x knows bio, y knows geo
    assert gating.oracle_correct(results, knows={"x": ["bio"], "y": ["geo"]}) == [True, False, True, False]
    assert gating.oracle_correct(results, knows={"x": ["geo"], "y": ["bio"]}) == [False, False, True, False]
    pair = {(): result(ids, ["bio+geo"] * 4, [False] * 4), ("x",): result(ids, ["bio+geo"] * 4, [True] * 4)}
    assert gating.oracle_correct(pair, knows={"x": ["geo"]}) == [True] * 4  # x knows one of the two


def test_route_results_picks_the_chosen_subset_per_domain():
    ids, doms = ["a", "b", "c", "d"], ["bio", "bio", "geo", "geo"]
    results = {
        ("x",): result(ids, doms, [True, False, False, False]),
        ("y",): result(ids, doms, [False, True, True, False]),
    }
    routed = gating.route_results(results, {"bio": ("x",), "geo": ("y",)})
    assert routed.correct == [True, False, True, False] and routed.ids == ids
    assert results[("x",)].correct == [True, False, False, False]  # inputs untouched
    with pytest.raises(KeyError, match="geo"):
        gating.route_results(results, {"bio": ("x",)})
    with pytest.raises(KeyError, match="no result|No result"):
        gating.route_results(results, {"bio": ("z",), "geo": ("y",)})


def test_prior_selection_per_domain(loaded_models):
    items = [
        {"question_stem": "What colour does zorblat glow", "domain": "chem"},
        {"question_stem": "Fox", "domain": "animals"},
        {"question_stem": "Kevani river", "domain": "geo"},
    ]
    policy = gating.SubsetSelection(
        {"chem": ["llama"], "animals": [], "geo": ["qwen2", "llama"]}, gating.domain_lookup(items)
    )
    w = policy(query(loaded_models, ["qwen2", "llama"]))
    assert w.tolist() == [[1, 0, 1], [1, 0, 0], [1, 1, 1]]
    with pytest.raises(ValueError, match="does not have"):
        policy(query(loaded_models, ["qwen2"]))
    with pytest.raises(KeyError, match="question_stem"):
        gating.domain_lookup(items[:1])(PROMPTS[1])
    # As an engine policy: the closed senders are not run for those queries.
    eng = engine(loaded_models, ["qwen2", "llama"], policy=policy)
    pre, _ = logits(eng, PROMPTS)
    alone = Standalone(loaded_models["qwen3"]).prefill(PROMPTS)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(pre.cache.values, alone.cache.values))


@pytest.mark.parametrize("mode", ["residual", "concat"])
def test_train_gate_learns_with_frozen_fusers(loaded_models, mode):
    eng = engine(loaded_models, ["qwen2", "llama"], mode)
    fuser_before = [p.detach().clone() for f in eng.fusers for p in f.parameters()]
    gate = gatelib.Gate(
        gatelib.GateConfig.for_receiver(loaded_models["qwen3"], ["qwen2", "llama"], mode=mode, hidden=8)
    )
    records = [[{"role": "user", "content": f"Fox {i}?"}, {"role": "assistant", "content": "blue"}] for i in range(4)]

    def loss() -> float:  # the records' answer loss with the gate as the policy (same frozen fusers)
        return train.lm_loss(engine(loaded_models, ["qwen2", "llama"], mode, policy=gating.LearnedGate(gate)), records)

    before = loss()
    res = gate_training.train_gate(
        eng, gate, records, TrainConfig(lr=5e-2, batch_size=2, epochs=4, warmup_ratio=0.0, progress=False)
    )
    assert res.steps == 8 and loss() < before
    assert all(torch.equal(a, b) for a, b in zip(fuser_before, (p for f in eng.fusers for p in f.parameters())))
    w = gating.LearnedGate(gate)(query(loaded_models, ["qwen2", "llama"]))
    assert not torch.equal(w, torch.ones_like(w))


def test_gate_init_depends_on_its_seed_only(loaded_models):
    import dataclasses

    config = gatelib.GateConfig.for_receiver(loaded_models["qwen3"], ["qwen2", "llama"])
    torch.manual_seed(1)
    a = gatelib.Gate(config)
    torch.manual_seed(2)
    torch.rand(7)  # other work before the gate is built must not change it
    b = gatelib.Gate(config)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.inp.weight, gatelib.Gate(dataclasses.replace(config, seed=1)).inp.weight)


def test_selection_targets_name_the_best_source():
    items = [
        {"id": i, "choices": {"label": ["A", "B"], "text": ["x", "y"]}, "answerKey": k}
        for i, k in (("a", "A"), ("b", "B"), ("c", "A"))
    ]

    def scored(scores):
        r = result(["a", "b", "c"], ["d"] * 3, [True] * 3)
        r.scores = scores
        return r

    results = {
        (): scored([[0.0, 0.0], [0.0, 1.0], [2.0, 0.0]]),
        ("x",): scored([[1.0, 0.0], [0.0, 0.5], [1.0, 0.0]]),  # best on a
        ("y",): scored([[0.5, 0.0], [0.0, 3.0], [2.0, 0.0]]),
    }  # best on b, ties the receiver on c
    assert gating.selection_targets(results, items, ["x", "y"]).tolist() == [1, 2, 0]
    with pytest.raises(KeyError, match="single sender"):
        gating.selection_targets({(): results[()]}, items, ["x"])
    with pytest.raises(ValueError, match="exactly these items"):
        gating.selection_targets(results, items[::-1], ["x", "y"])


def test_source_success_per_question_and_per_domain():
    items = [{"id": i, "domain": d} for i, d in (("a", "bio"), ("b", "bio"), ("c", "geo"))]
    results = {
        (): result("abc", ["bio", "bio", "geo"], [False, False, True]),
        ("x",): result("abc", ["bio", "bio", "geo"], [True, False, False]),
        ("y",): result("abc", ["bio", "bio", "geo"], [True, True, True]),
    }
    assert gating.source_success(results, items, ["x", "y"], by=None).tolist() == [[0, 1, 1], [0, 0, 1], [1, 0, 1]]
    assert gating.source_success(results, items, ["x", "y"]).tolist() == [[0, 0.5, 1], [0, 0.5, 1], [1, 0, 1]]
    assert gating.source_success(results, items, ["y"]).tolist() == [[0, 1], [0, 1], [1, 1]]
    with pytest.raises(KeyError, match="single sender"):
        gating.source_success({(): results[()]}, items, ["x"])
    with pytest.raises(ValueError, match="exactly these items"):
        gating.source_success(results, items[::-1], ["x"])
    with pytest.raises(ValueError, match="by="):
        gating.source_success(results, items, ["x"], by="relation")
    with pytest.raises(ValueError, match="have none"):
        gating.source_success(results, [{"id": i} for i in "abc"], ["x"])


@pytest.mark.parametrize("objective", ["success", "best_source"])
def test_router_gate_learns_who_serves_where(loaded_models, tmp_path, objective):
    from fedrefine_lib.data import mcq_messages

    eng = engine(loaded_models, ["qwen2", "llama"], "concat")
    kinds = {
        "animals": "Which fox {} is the fastest?",
        "rivers": "How long is the Kevani river {}?",
        "colours": "What colour is the zorblat {}?",
    }
    items = [
        {
            "id": f"{k}{i}",
            "question_stem": q.format(i),
            "choices": {"label": ["A", "B"], "text": ["x", "y"]},
            "answerKey": "A",
        }
        for k, q in kinds.items()
        for i in range(6)
    ]
    best = torch.tensor([1] * 6 + [2] * 6 + [0] * 6)  # qwen2 serves animals, llama rivers, nobody colours
    # Per-source success: the best source right 80 % of the time, the others 30 %.
    targets = best if objective == "best_source" else 0.3 + 0.5 * torch.nn.functional.one_hot(best, 3).float()
    gate = gatelib.Gate(
        gatelib.GateConfig.for_receiver(
            loaded_models["qwen3"], ["qwen2", "llama"], mode="concat", hidden=8, output="route"
        )
    )
    res = gate_training.train_gate_selection(
        eng, gate, items, targets, TrainConfig(lr=5e-2, batch_size=6, epochs=30, warmup_ratio=0.0, progress=False)
    )
    assert res.steps == 90 and res.losses[-1] < res.losses[0]
    features = gating.query_features(eng, [mcq_messages(it) for it in items])
    expected = torch.tensor([[1.0, 1, 0]] * 6 + [[1.0, 0, 1]] * 6 + [[1.0, 0, 0]] * 6)
    assert torch.equal(gate(features), expected)
    gate.save_pretrained(tmp_path / "g")  # the standardisation travels with the weights
    back = gatelib.Gate.from_pretrained(tmp_path / "g", loaded_models["qwen3"], ["qwen2", "llama"])
    assert torch.equal(back(features), expected)
    # As a policy of an engine with llama only: river questions go to llama, colour questions to nobody.
    q = gatelib.GateQuery(
        [mcq_messages(it) for it in items], *eng.receiver_view([mcq_messages(it) for it in items]), ["llama"]
    )
    assert torch.equal(gating.LearnedGate(back)(q)[6:], expected[6:, [0, 2]])
    with pytest.raises(ValueError, match="router"):
        gate_training.train_gate_selection(
            eng,
            gatelib.Gate(gatelib.GateConfig.for_receiver(loaded_models["qwen3"], ["qwen2", "llama"])),
            items,
            targets,
        )
    for bad, cause in (
        (targets[:5], "must be"),
        (best.float()[:, None].expand(18, 3) * 2, "probabilities"),
        (best + 3, "indices"),
    ):
        with pytest.raises(ValueError, match=cause):
            gate_training.train_gate_selection(eng, gate, items, bad)
    with pytest.raises(ValueError, match="not differentiable"):
        gate_training.train_gate(
            eng, gate, [[{"role": "user", "content": "Fox?"}, {"role": "assistant", "content": "blue"}]]
        )
    # What the router does and learnt from, per domain (03's tables).
    items = [dict(it, domain=it["id"].rstrip("0123456789")) for it in items]
    routed = federation.FedRefine(eng.receiver, eng.senders, dict(zip(eng.sender_names, eng.fusers)),
                                  policy=gating.LearnedGate(gate))  # fmt: skip
    table = gating.weights_by_domain(routed, items, mcq_messages, batch_size=5)
    assert table.loc["animals"].tolist() == [0.0, 1.0, 0.0] and table.loc["colours"].tolist() == [1.0, 0.0, 0.0]
    learnt = gating.targets_by_domain(targets, items, gate.config.sources)
    assert learnt.loc["rivers", "llama"] == pytest.approx(1.0 if objective == "best_source" else 0.8)


def test_gate_choices_are_checked_by_name():
    gate_training.check_gate_choice("selection", "domain", "val")
    for args, name in ((("router",), "gate_objective"), (("answer", "best", "all"), "gate_data"),
                       (("selection", "per_domain"), "gate_targets")):  # fmt: skip
        with pytest.raises(ValueError, match=f"{name}=.*use one of"):
            gate_training.check_gate_choice(*args)


def test_router_opens_a_sender_only_past_the_margin():
    """Scores are logits of each source's predicted chance of a right answer (own, s1, s2)."""

    def router(chances, margin):
        gate = gatelib.Gate(gatelib.GateConfig("r", ["s1", "s2"], 1, 1, 2, output="route", open_margin=margin))
        with torch.no_grad():
            gate.out.bias.copy_(torch.logit(torch.tensor(chances)))
        return gate(torch.zeros(1, 2))[0].tolist()

    # The receiver already knows the domain: senders within the margin stay closed.
    assert router([0.90, 0.93, 0.80], 0.05) == [1.0, 0.0, 0.0]
    assert router([0.90, 0.93, 0.80], 0.0) == [1.0, 1.0, 0.0]  # no margin: the best score wins
    # A sender that knows what the receiver does not is opened (the best one only).
    assert router([0.30, 0.60, 0.90], 0.05) == [1.0, 0.0, 1.0]
    assert router([0.90, 0.90, 0.90], 0.0) == [1.0, 0.0, 0.0]  # ties go to the receiver alone
    with pytest.raises(ValueError, match="open_margin"):
        gatelib.GateConfig("r", ["s1"], 1, 1, 2, output="route", open_margin=1.5)
