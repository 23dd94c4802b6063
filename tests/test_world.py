"""The mini world: knowledge and splits, tokenizers, model shapes, smoke builds
(determinism, schemas, cache, no leakage) and the real build's files when present."""

from __future__ import annotations

import collections
import json
import os
import re
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from fedrefine_lib import data
from fedrefine_lib.world import DOMAINS, RELATIONS, WorldConfig, build_world, load_world, mini_models
from fedrefine_lib.world.knowledge import make_knowledge
from fedrefine_lib.world.records import chat_records, mcq_items, pair_domains, pair_items
from fedrefine_lib.world.templates import (
    PRIVATE_PREFIXES,
    QUESTIONS,
    STATEMENTS,
    parse_question,
    parse_statement,
    question,
    rephrase_check,
    split_private,
    statement,
)

REAL_WORLD = Path(__file__).resolve().parent.parent / "data" / "mini" / "0"


# ----------------------------------------------------------------- knowledge


def test_default_knowledge_sizes_and_splits():
    cfg = WorldConfig()
    k = make_knowledge(0, cfg.entities, cfg.users)
    items = mcq_items(k.select(splits=("test",)), 0, "test", k.users)
    per_domain = collections.Counter(it["domain"] for it in items)
    assert set(per_domain) == set(DOMAINS) and min(per_domain.values()) >= 64 and len(items) >= 320
    val = mcq_items(k.select(splits=("val",)), 0, "val", k.users)
    assert len(val) >= len(items)  # validation carries every design decision
    by_split = {s: set(k.entities(splits=(s,))) for s in ("train", "val", "test", "pool")}
    for a in by_split:
        for b in by_split:
            if a < b:
                assert not by_split[a] & by_split[b], f"{a} and {b} share entities"
    assert len(set(k.users)) == cfg.users and not set(k.users) & set(k.all_entities)
    assert make_knowledge(0, cfg.entities, cfg.users) == k and make_knowledge(1, cfg.entities, cfg.users) != k
    with pytest.raises(ValueError, match="'eval' to 'test'"):
        make_knowledge(0, {"train": 1, "val": 1, "eval": 1, "pool": 1})


def test_mcq_items_distractors_balance_and_private_prefix():
    k = make_knowledge(0, WorldConfig().entities, 10)
    items = mcq_items(k.select(splits=("test",)), 0, "test", k.users)
    for it in items:
        values = RELATIONS[it["domain"]][it["relation"]]
        assert set(it["choices"]["text"]) <= set(values) and len(set(it["choices"]["text"])) == 4
        data.validate_mcq(it)
        parsed = parse_question(it["question_stem"])
        assert (parsed.entity, parsed.relation, parsed.user) == (it["entity"], it["relation"], it["private"][0])
    keys = collections.Counter(it["answerKey"] for it in items)
    assert min(keys.values()) / len(items) > 0.18, keys
    assert len({split_private(it["question_stem"])[1] == it["question_stem"] for it in items}) == 1  # all prefixed


def test_pair_items_need_two_senders_and_one_fact_halves_the_options():
    knows = {n: s.domains for n, s in mini_models().items()}
    domains = pair_domains(knows, "mini-qwen3-0.6b")
    assert ("biology", "physics") not in domains and all("science" not in p for p in domains) and len(domains) == 5
    k = make_knowledge(0, WorldConfig().entities)
    facts = {f.fact_id: f for f in k.facts}
    items = pair_items(k, "test", 0, domains, 8)
    assert len(items) == 8 * len(domains) and len({it["question_stem"] for it in items}) == len(items)
    for it in items:
        data.validate_mcq(it)
        first, second = (facts[i] for i in it["fact_ids"])
        assert first.split == second.split == "test" and it["domain"] in {f"{a}+{b}" for a, b in domains}
        options = [t.split(" and ") for t in it["choices"]["text"]]
        right = options[it["choices"]["label"].index(it["answerKey"])]
        assert right == [first.value, second.value] and len({tuple(o) for o in options}) == 4
        for part in (0, 1):  # knowing one fact leaves exactly two options
            assert sum(o[part] == right[part] for o in options) == 2
        assert it["fact1"] == f"{statement(first)} {statement(second)}"


def test_templates_parse_back():
    k = make_knowledge(0, WorldConfig.smoke().entities)
    for f in k.facts[:40]:
        for t in range(len(STATEMENTS)):
            p = parse_statement(statement(f, t))
            assert (p.entity, p.relation, p.value, p.template) == (f.entity, f.relation, f.value, t)
        for t in range(len(QUESTIONS)):
            p = parse_question(question(f.entity, f.relation, t))
            assert (p.entity, p.relation, p.template, p.user) == (f.entity, f.relation, t, None)
            for k in range(len(PRIVATE_PREFIXES)):
                p = parse_question(question(f.entity, f.relation, t, "Vakor", k))
                assert (p.entity, p.relation, p.template, p.user) == (f.entity, f.relation, t, "Vakor")
    assert parse_statement("The color of Zorb is gas.") is None  # value of another relation


def test_rephrase_check_crafted_cases():
    q = "My name is Vakor. What is the color of Zorb?"
    assert rephrase_check(q, "Tell me the color of Zorb.") == (True, True, True)
    assert rephrase_check(q, "What is the color of Zorb ?") == (True, True, False)  # same template
    assert rephrase_check(q, "I am Vakor. Tell me the color of Zorb.") == (True, False, True)  # keeps the user
    assert rephrase_check(q, "Tell me the taste of Zorb.")[0] is False  # other relation
    assert rephrase_check(q, "Tell me the color of Blib.")[0] is False  # other entity
    assert rephrase_check(q, "Vakor wants the color of Zorb.")[:2] == (False, False)  # unparsed, names the user
    assert rephrase_check(q, "Zorb, color?")[:2] == (False, True)  # unparsed, the user dropped
    assert rephrase_check("What is the color of Zorb?", "I am Blix. Tell me the color of Zorb.")[1] is True


def test_chat_records_use_only_train_facts():
    k = make_knowledge(0, WorldConfig().entities, 10)
    domains = pair_domains({n: s.domains for n, s in mini_models().items()}, "mini-qwen3-0.6b")
    rows = chat_records(k, 0, variants=2, filler=20, private_share=0.5, pairs=(domains, 4))
    train = set(k.entities(splits=("train",)))
    other = set(k.all_entities) - train
    seen_domains, kinds, private = set(), collections.Counter(), 0
    for row in rows:
        words = set(re.findall(r"[A-Za-z]+", json.dumps(row["conversations"])))
        assert not words & other
        seen_domains.add(row["domain"])
        kinds[row["kind"]] += 1
        private += bool(words & set(k.users))
    assert seen_domains == set(DOMAINS) | {"general"} | {f"{a}+{b}" for a, b in domains}
    assert kinds["pair"] == 4 * len(domains) and 0.3 < private / (kinds["mcq"] + kinds["background"]) < 0.7


def test_pretraining_corpus_keeps_held_out_questions_unseen():
    """Val and test facts appear only as statements of known domains: never in a question form,
    a note or a two-fact question; their names are rephrased only with relations no held-out
    question asks; private prefixes only from ``private_from_phase`` on."""
    from fedrefine_lib.world.corpus import pretraining_examples

    cfg = WorldConfig(private_from_phase=2)
    k = make_knowledge(0, cfg.entities, cfg.users)
    held_out = set(k.entities(splits=("val", "test")))
    asked = {(f.entity, f.relation) for f in k.select(splits=("val", "test"))}
    for phase in (1, 2):
        examples = pretraining_examples(
            k, ["science"], rephrase=True, config=cfg, seed=0, model="m", epoch=0, phase=phase
        )
        for ex in examples:
            if ex.kind in ("statement", "copy"):
                continue
            if ex.kind == "rephrase":  # held-out names, never a held-out question
                for text in (ex.messages[-1]["content"].split("Question: ")[-1], ex.answer):
                    p = parse_question(text)
                    assert p is not None and (p.entity, p.relation) not in asked, text
                continue
            words = set(re.findall(r"[A-Za-z]+", json.dumps(ex.messages) + (ex.answer or "")))
            assert not words & held_out, (ex.kind, words & held_out)
            if phase == 1:
                assert not words & set(k.users), ex.kind
        kinds = collections.Counter(ex.kind for ex in examples)
        if phase == 2:
            assert (
                kinds["rephrase"] == cfg.rephrase_examples
                and kinds["pair"] == cfg.pair_examples + cfg.pair_note_examples
            )


def test_phase0_corpus_holds_only_statements():
    """Phase 0 is the known facts as statements and nothing else: no question of any kind."""
    from fedrefine_lib.world.corpus import pretraining_examples

    cfg = WorldConfig()
    k = make_knowledge(0, cfg.entities, cfg.users)
    examples = pretraining_examples(k, ["code"], rephrase=True, config=cfg, seed=0, model="m", epoch=0, phase=0)
    assert {ex.kind for ex in examples} == {"statement"}
    known = len(k.select(domains=["code"], splits=("train", "val", "test")))
    assert sum(ex.text.count(".") for ex in examples) == known * 4 * cfg.statement_passes


def test_pretraining_runs_phase0_until_the_cloze_bar(smoke_worlds, tmp_path):
    """With ``phase0_cloze`` set, checks run statements-only (phase 0, cloze recorded) until the
    own validation facts complete at the bar; a bar above 1 keeps the model in phase 0."""
    from fedrefine_lib.world.pretrain import pretrain_model

    world, name = smoke_worlds[0], "mini-qwen2.5-0.5b"
    smoke = WorldConfig.smoke()

    def run(bar: float, tag: str) -> dict:
        config = {**smoke.to_dict(), "phase0_cloze": bar, "max_steps": {**smoke.max_steps, name: 18}}
        return pretrain_model(name, 3, config, str(world.tokenizer_dir("qwen")), str(tmp_path / tag), progress=False)

    stuck, passed = run(1.01, "stuck"), run(1e-9, "passed")
    assert [h["phase"] for h in stuck["history"]] == [0, 0, 0] and stuck["phase1_step"] is None
    assert all("val_accuracy" not in h and 0.0 <= h["val_cloze"] <= 1.0 for h in stuck["history"])
    assert passed["phase1_step"] == 6 and [h["phase"] for h in passed["history"]][:2] == [0, 1]


def test_model_shapes_are_heterogeneous():
    specs = mini_models("full")
    shapes = {(s.layers, s.hidden, s.heads, s.kv_heads, s.head_dim) for s in specs.values()}
    assert len(shapes) == 4  # the two 0.5b models share a shape, like the paper's
    for attr in ("layers", "hidden", "heads", "head_dim"):
        assert len({getattr(s, attr) for s in specs.values()}) >= 3, attr
    # KV heads: two values, like the paper's models (8 for Qwen3/Llama, 2 for Qwen2.5)
    assert (
        specs["mini-qwen3-0.6b"].kv_heads == specs["mini-llama3.2-1b"].kv_heads != specs["mini-qwen2.5-1.5b"].kv_heads
    )
    known = [d for s in specs.values() if s.name != "mini-qwen3-0.6b" for d in s.domains]
    assert set(known) == set(DOMAINS)
    assert len(specs["mini-qwen3-0.6b"].domains) <= 2
    assert max(specs.values(), key=lambda s: len(s.domains)).name == "mini-qwen2.5-1.5b"
    assert {s.arch for s in specs.values()} == {"qwen3", "qwen2", "llama"}


def test_model_sizes_follow_the_papers_ratios():
    """Receiver 0.6 : senders 0.5, 0.5, 1.5, 1.0 (Qwen3-0.6B vs Qwen2.5-0.5B, -Coder-0.5B,
    -1.5B, Llama-3.2-1B): the "1.5b" has at least 2.5x the receiver's parameters."""
    cfg = WorldConfig()
    vocab = {"qwen": cfg.qwen_vocab, "llama": cfg.llama_vocab}
    n = {
        name: sum(p.numel() for p in s.build(vocab[s.tokenizer], 0, 1, None, name in cfg.tied).parameters())
        for name, s in mini_models().items()
    }
    ratio = {name: n[name] / n["mini-qwen3-0.6b"] for name in n}
    assert ratio["mini-qwen2.5-1.5b"] >= 2.5
    assert ratio["mini-qwen2.5-0.5b"] == ratio["mini-qwen2.5-coder-0.5b"] and 0.7 < ratio["mini-qwen2.5-0.5b"] < 1.0
    assert 1.4 < ratio["mini-llama3.2-1b"] < 2.0


# -------------------------------------------------------------- smoke builds


@pytest.fixture(scope="module")
def smoke_worlds(tmp_path_factory):
    """Two independent smoke builds of seed 3 (and the first one's wall time)."""
    roots = [tmp_path_factory.mktemp("a"), tmp_path_factory.mktemp("b")]
    t0 = time.time()
    first = build_world(3, WorldConfig.smoke(), roots[0], progress=False)
    seconds = time.time() - t0
    second = build_world(3, WorldConfig.smoke(), roots[1], progress=False)
    return first, second, seconds


def test_smoke_build_is_fast(smoke_worlds):
    assert smoke_worlds[2] < 60


def test_smoke_build_is_deterministic(smoke_worlds):
    a, b, _ = smoke_worlds
    assert a.manifest["files"] == b.manifest["files"]
    for name in a.models:
        assert a.manifest["models"][name]["weights_sha256"] == b.manifest["models"][name]["weights_sha256"], name
        assert (a.model_dir(name) / "tokenizer.json").read_bytes() == (
            b.model_dir(name) / "tokenizer.json"
        ).read_bytes()


def test_world_api_and_schemas(smoke_worlds):
    world = smoke_worlds[0]
    assert world.receiver == "mini-qwen3-0.6b" and len(world.senders) == 4
    assert world.domains == list(DOMAINS) and set(world.knows) == set(world.models)
    records = data.load_chat_records(world.chat_train_path)
    assert records and all(r[-1]["role"] == "assistant" for r in records)
    for path in (world.mcq_val_path, world.mcq_test_path):
        items = data.load_mcq(path)
        assert items and all(it["domain"] in DOMAINS and it["private"] for it in items)
    for split in ("pair_val", "pair_test"):
        items = data.load_mcq(world.mcq_path(split))
        assert items and all(len(it["fact_ids"]) == 2 for it in items)
    with pytest.raises(KeyError, match="pair_test"):
        world.mcq_path("eval")
    splits = collections.Counter(f["split"] for f in world.facts())
    assert set(splits) == {"train", "val", "test", "pool"}
    assert world.users and world.config == WorldConfig.smoke()
    with pytest.raises(KeyError, match="mini-qwen3-0.6b"):
        world.model_dir("nope")


def test_model_dirs_tokenize_like_their_family(smoke_worlds):
    """AutoTokenizer picks the class from the model type (Qwen2Tokenizer for qwen2); every
    model directory must still encode exactly like the family tokenizer it trained with."""
    from transformers import AutoTokenizer

    world = smoke_worlds[0]
    text = "Note: The color of Zorblax is red.\nQuestion: What is it?\nA. red\nB. gas"
    for name in world.models:
        family = "llama" if "llama" in name else "qwen"
        fam_tok = AutoTokenizer.from_pretrained(world.tokenizer_dir(family))
        tok = AutoTokenizer.from_pretrained(world.model_dir(name))
        msgs = [{"role": "user", "content": text}]
        prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        assert prompt == fam_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        for s in (prompt, "red", "The color of Zorblax is red."):
            assert tok(s, add_special_tokens=False)["input_ids"] == fam_tok(s, add_special_tokens=False)["input_ids"], (
                name,
                s,
            )


def test_models_load_with_auto_classes(smoke_worlds):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    world = smoke_worlds[0]
    vocabs = {}
    for name in world.models:
        model = AutoModelForCausalLM.from_pretrained(world.model_dir(name))
        tok = AutoTokenizer.from_pretrained(world.model_dir(name))
        assert tok.pad_token is not None and tok.chat_template
        assert model.config.vocab_size == len(tok)
        enc = tok("The color of Zorblax is red.", return_offsets_mapping=True)
        assert len(enc["offset_mapping"]) == len(enc["input_ids"])
        prompt = tok.apply_chat_template(
            [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
        )
        assert ("<|im_start|>assistant\n" if "llama" not in name else "<|end_header_id|>\n\n") in prompt
        vocabs[name] = len(tok)
    assert vocabs["mini-llama3.2-1b"] != vocabs["mini-qwen3-0.6b"]
    assert vocabs["mini-qwen2.5-0.5b"] == vocabs["mini-qwen3-0.6b"]


def test_cache_reload_and_config_change(smoke_worlds, tmp_path):
    world = smoke_worlds[0]
    t0 = time.time()
    again = build_world(3, WorldConfig.smoke(), world.root.parent, progress=False)
    assert time.time() - t0 < 2 and again.manifest == world.manifest
    assert load_world(world.root).manifest == world.manifest
    other = WorldConfig(**{**WorldConfig.smoke().to_dict(), "lr": 1e-3})
    assert other.hash() != WorldConfig.smoke().hash()
    from fedrefine_lib.world import world_dir

    assert world_dir(3, other, "r") != world_dir(3, WorldConfig.smoke(), "r") != world_dir(3, WorldConfig(), "r")
    assert world_dir(3, WorldConfig(), "r") == Path("r/3")


def test_pretraining_out_of_patience_keeps_its_best_check(smoke_worlds, tmp_path):
    """A model that never meets the stop criteria stops after `patience` checks without a
    better one and saves the weights of its best check, not its last: bit-identical to a run
    that simply ends at that step."""
    from fedrefine_lib.world.build import sha256_file
    from fedrefine_lib.world.pretrain import pretrain_model

    world, name = smoke_worlds[0], "mini-qwen2.5-0.5b"
    smoke = WorldConfig.smoke()
    base = {**smoke.to_dict(), "eval_every": 3, "min_steps": 3, "stop_accuracy": 2.0}  # never stops on accuracy
    log = pretrain_model(
        name,
        3,
        {**base, "max_steps": {**smoke.max_steps, name: 90}, "patience": 2},
        str(world.tokenizer_dir("qwen")),
        str(tmp_path / "patient"),
        progress=False,
    )
    phase2 = [h for h in log["history"] if h["phase"] == 2]
    best = max(phase2, key=lambda h: h["val_accuracy"])  # the first of the best
    assert not log["early_stopped"] and log["steps"] == best["step"] + 2 * 3 < 90
    assert log["restored_step"] == best["step"] and log["final"]["step"] == best["step"]
    ended = pretrain_model(
        name,
        3,
        {**base, "max_steps": {**smoke.max_steps, name: best["step"]}, "patience": 100},
        str(world.tokenizer_dir("qwen")),
        str(tmp_path / "ended"),
        progress=False,
    )
    assert ended["steps"] == best["step"] and ended["restored_step"] is None
    assert sha256_file(tmp_path / "patient" / "model.safetensors") == sha256_file(
        tmp_path / "ended" / "model.safetensors"
    )


def test_pretraining_saves_the_moving_average_of_the_weights(smoke_worlds, tmp_path):
    """With ``ema_decay`` d the saved weights after two steps are d * w1 + (1 - d) * w2,
    where w1, w2 are the raw weights after one and two steps (the average starts at w1)."""
    import torch
    from safetensors.torch import load_file

    from fedrefine_lib.world.pretrain import pretrain_model

    world, name = smoke_worlds[0], "mini-qwen2.5-0.5b"
    smoke = WorldConfig.smoke()

    def weights(steps: int, decay: float) -> dict:
        out = tmp_path / f"{steps}-{decay}"
        pretrain_model(
            name,
            3,
            {**smoke.to_dict(), "max_steps": {**smoke.max_steps, name: steps}, "ema_decay": decay},
            str(world.tokenizer_dir("qwen")),
            str(out),
            progress=False,
        )
        return load_file(out / "model.safetensors")

    w1, w2, averaged = weights(1, 0.0), weights(2, 0.0), weights(2, 0.25)
    assert any(not torch.equal(w1[k], w2[k]) for k in w1)
    for k in w1:
        torch.testing.assert_close(averaged[k], 0.25 * w1[k] + 0.75 * w2[k])


def test_phase2_learning_rate_scale_applies_from_the_next_step(smoke_worlds, tmp_path):
    """With ``phase2_lr_scale=0`` nothing moves once phase 2 begins (here at the first check,
    step 6): a 12-step run saves exactly the weights of a run that ends at step 6; at the
    default scale the weights keep moving."""
    from fedrefine_lib.world.build import sha256_file
    from fedrefine_lib.world.pretrain import pretrain_model

    world, name = smoke_worlds[0], "mini-qwen2.5-0.5b"
    smoke = WorldConfig.smoke()

    def digest(steps: int, scale: float) -> str:
        out = tmp_path / f"{steps}-{scale}"
        log = pretrain_model(
            name,
            3,
            {
                **smoke.to_dict(),
                "max_steps": {**smoke.max_steps, name: steps},
                "ema_decay": 0.0,
                "phase2_lr_scale": scale,
            },
            str(world.tokenizer_dir("qwen")),
            str(out),
            progress=False,
        )
        assert log["phase2_step"] == 6
        return sha256_file(out / "model.safetensors")

    assert digest(12, 0.0) == digest(6, 0.0)
    assert digest(12, 0.3) != digest(6, 0.3)


def test_world_config_rejects_bad_training_settings():
    with pytest.raises(ValueError, match="ema_decay=1.0"):
        WorldConfig(ema_decay=1.0)
    with pytest.raises(ValueError, match="phase2_lr_scale=-0.5"):
        WorldConfig(phase2_lr_scale=-0.5)


def test_no_leakage_smoke(smoke_worlds):
    from fedrefine_lib.world.measure import leaked_entities

    assert leaked_entities(smoke_worlds[0]) == []


# ----------------------------------------------------------- the real build


@pytest.mark.skipif(
    not (REAL_WORLD / "manifest.json").is_file(), reason="the full mini world (data/mini/0) is not built"
)
def test_no_leakage_real_build():
    """No evaluation fact (nor its entity) appears in any fuser-training record."""
    from fedrefine_lib.world.measure import leaked_entities

    world = load_world(REAL_WORLD)
    assert leaked_entities(world) == []
    eval_facts = [f for f in world.facts() if f["split"] == "test"]
    words = set(re.findall(r"[A-Za-z]+", world.chat_train_path.read_text()))
    assert not {f["entity"] for f in eval_facts} & words
    test_ids = {it["fact_id"] for it in data.load_mcq(world.mcq_test_path)}
    assert test_ids == {f["fact_id"] for f in eval_facts}
    pair_ids = {i for it in data.load_mcq(world.mcq_path("pair_test")) for i in it["fact_ids"]}
    assert pair_ids <= test_ids


def test_a_trial_pretrains_one_model_on_validation_only(tmp_path):
    """``world.trial`` runs one model under changed settings and returns its validation history;
    its CLI refuses to overwrite a trial or to set an unknown field."""
    import subprocess
    import sys

    from fedrefine_lib.world.trial import run_trial

    overrides = {**WorldConfig.smoke().to_dict(), "eval_every": 3}
    result = run_trial("mini-qwen2.5-0.5b", 3, overrides, max_steps=6)
    assert result["steps"] == 6 and [h["step"] for h in result["history"]] == [3, 6]
    assert not any("test" in key for h in result["history"] for key in h)
    (tmp_path / "t.json").write_text("{}")
    cli = [sys.executable, "-m", "fedrefine_lib.world.trial", "--model", "mini-qwen2.5-0.5b"]
    done = subprocess.run([*cli, "--out", str(tmp_path / "t.json")], capture_output=True, text=True)
    assert done.returncode != 0 and "never overwritten" in done.stderr
    done = subprocess.run(
        [*cli, "--set", "nosuch=1", "--out", str(tmp_path / "u.json")], capture_output=True, text=True
    )
    assert done.returncode != 0 and "WorldConfig field" in done.stderr


def test_a_bad_seed_or_a_rebuild_never_deletes_a_world(tmp_path):
    """``seed="0"`` is refused before anything is touched; a finished world that is rebuilt is
    moved aside (kept), an unfinished one removed."""
    from fedrefine_lib.world import build_world
    from fedrefine_lib.world.build import _clear

    finished = tmp_path / "0"
    finished.mkdir()
    (finished / "manifest.json").write_text("{}")
    with pytest.raises(TypeError, match="seed='0'.*an int"):
        build_world("0", WorldConfig.smoke(), tmp_path)
    assert (finished / "manifest.json").is_file()
    with pytest.warns(UserWarning, match="previous one is kept"):
        _clear(finished)
    kept = list(tmp_path.glob(".0.replaced-*"))
    assert not finished.exists() and len(kept) == 1 and (kept[0] / "manifest.json").is_file()
    unfinished = tmp_path / "1"
    unfinished.mkdir()
    _clear(unfinished)
    assert not unfinished.exists()


def test_private_prefixes_from_phase_one_when_asked():
    """``private_from_phase=1`` (the default) puts users' private prefixes on phase-1
    questions too; 2 keeps phase 1 free of them; other values are refused."""
    from fedrefine_lib.world.corpus import pretraining_examples

    cfg = WorldConfig()
    k = make_knowledge(0, cfg.entities, cfg.users)

    def users_in_phase1(config: WorldConfig) -> int:
        examples = pretraining_examples(k, ["code"], rephrase=False, config=config, seed=0, model="m", epoch=0, phase=1)
        words = [set(re.findall(r"[A-Za-z]+", json.dumps(ex.messages))) for ex in examples if ex.messages]
        return sum(bool(w & set(k.users)) for w in words)

    assert users_in_phase1(cfg) > 0
    assert users_in_phase1(WorldConfig(private_from_phase=2)) == 0
    with pytest.raises(ValueError, match="private_from_phase=3"):
        WorldConfig(private_from_phase=3)


def test_decay_groups_spare_vectors_when_asked():
    """A model in ``spare_vectors`` keeps its norm gains and biases undecayed; every
    parameter is in exactly one group either way; the config round-trips through JSON."""
    from fedrefine_lib.world.pretrain import _decay_groups

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    cfg = WorldConfig(spare_vectors=("m",))
    assert WorldConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    for name, decayed in (("other", 4), ("m", 1)):
        groups = _decay_groups(model, name, cfg)
        assert sum(len(g["params"]) for g in groups) == 4
        assert sum(len(g["params"]) for g in groups if g["weight_decay"] == cfg.weight_decay) == decayed
        assert all(g["weight_decay"] == 0.0 for g in groups if g["weight_decay"] != cfg.weight_decay)


def test_acceptance_lists_models_stuck_in_phase_0_or_1():
    from fedrefine_lib.world.measure import short_of_phase2

    built = {"a": {"final": {"phase": 0}}, "b": {"final": {"phase": 1}}, "c": {"final": {"phase": 2}}, "d": {}}
    assert short_of_phase2(built) == ["a", "b", "d"]
