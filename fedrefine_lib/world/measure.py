"""Acceptance measurements of a built ``mini`` world (for ``results/mini/world.json``).

* standalone MCQ accuracy per model x domain on the held-out test set (option
  log-likelihood, 95 % Wilson CI) — via ``fedrefine_lib.evaluate.score_mcq`` — and on
  the two-fact test questions per domain pair;
* the receiver's oracle accuracy (the true fact, or both facts, given as a context note);
* T2T background sentences: share per sender x domain that state the right value for
  the asked entity and relation;
* rephrasing fidelity: share of the receiver's rephrased test questions that keep entity
  and relation, share that drop the private prefix, share reworded, with examples;
* parameter ratios to the receiver, and the acceptance summary (:func:`acceptance`);
* leakage: test entities found in fuser-training chat records (must be 0).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from tqdm.auto import tqdm

from ..data import background_messages, context_note, load_chat_records, load_mcq, rephrase_messages
from ..decode import generate
from ..engine import Standalone
from ..evaluate import score_mcq
from ..models import LoadedModel, ModelSpec, load_model
from ..results import to_jsonable
from ..stats import Estimate, cluster_accuracy, item_clusters
from .build import World
from .templates import parse_statement, rephrase_check, statement


def load_world_model(world: World, name: str) -> LoadedModel:
    """A world model loaded through the library's loader (eval mode, left padding)."""
    return load_model(ModelSpec(name=name, source=str(world.model_dir(name))))


def _by_domain(items: list[dict], correct: list[bool]) -> dict[str, Estimate]:
    """Accuracy per domain and over all items (key ``all``), with cluster-bootstrap
    intervals over the items' entities."""
    clusters = item_clusters(items)
    groups: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        groups.setdefault(it["domain"], []).append(i)
    per = {
        d: cluster_accuracy([correct[i] for i in idx], [clusters[i] for i in idx]) for d, idx in sorted(groups.items())
    }
    return {**per, "all": cluster_accuracy(correct, clusters)}


def _answers(
    loaded: LoadedModel, conversations: list[list[dict]], max_new_tokens: int = 24, batch_size: int = 32
) -> list[str]:
    """Greedy answers of one model (the library's decoder), stripped."""
    out: list[str] = []
    for i in range(0, len(conversations), batch_size):
        texts, _ = generate(Standalone(loaded), conversations[i : i + batch_size], max_new_tokens)
        out += [t.strip() for t in texts]
    return out


def leaked_entities(world: World) -> list[str]:
    """Test entities that occur (as whole words) in any fuser-training chat record."""
    eval_entities = {f["entity"] for f in world.facts() if f["split"] == "test"}
    words: set[str] = set()
    for record in load_chat_records(world.chat_train_path):
        for m in record:
            words |= set(re.findall(r"[A-Za-z]+", m["content"]))
    return sorted(eval_entities & words)


def standalone(loaded: LoadedModel, items: list[dict]) -> dict[str, Estimate]:
    """Held-out accuracy per domain (and ``all``) of one model alone."""
    result = score_mcq(loaded, items, method="loglik", batch_size=32, progress=False)
    return _by_domain(items, result.correct)


def oracle(loaded: LoadedModel, items: list[dict], facts: dict[str, dict]) -> dict[str, Estimate]:
    """Accuracy with the true fact (a two-fact item: both facts) given as the context note."""
    notes = [context_note([it.get("fact1") or statement(_fact(facts[it["fact_id"]]))]) for it in items]
    result = score_mcq(loaded, items, method="loglik", batch_size=32, contexts=notes, progress=False)
    return _by_domain(items, result.correct)


def background_correctness(loaded: LoadedModel, items: list[dict], facts: dict[str, dict]) -> dict:
    """Share of background sentences stating the right value of the asked fact, per domain."""
    texts = _answers(loaded, [background_messages(it["question_stem"]) for it in items])
    correct, well_formed = [], []
    for it, text in zip(items, texts):
        fact, parsed = facts[it["fact_id"]], parse_statement(text)
        well_formed.append(parsed is not None)
        correct.append(
            parsed is not None
            and (parsed.entity, parsed.relation, parsed.value) == (fact["entity"], fact["relation"], fact["value"])
        )
    return {
        **_by_domain(items, correct),
        "well_formed": sum(well_formed) / max(1, len(well_formed)),
        "examples": [{"question": it["question_stem"], "background": t} for it, t in list(zip(items, texts))[:3]],
    }


def rephrase_fidelity(loaded: LoadedModel, items: list[dict]) -> dict:
    """Of the greedy rephrasings of the items' questions: the share keeping entity and
    relation (per domain and ``all``), the share dropping the private prefix, the share
    doing both (``faithful_and_private``) and the share in a new template, with CIs."""
    texts = _answers(loaded, [rephrase_messages(it["question_stem"]) for it in items])
    checks = [rephrase_check(it["question_stem"], t) for it, t in zip(items, texts)]
    clusters = item_clusters(items)
    return {
        **_by_domain(items, [f for f, _, _ in checks]),
        "private_dropped": cluster_accuracy([d for _, d, _ in checks], clusters),
        "faithful_and_private": cluster_accuracy([f and d for f, d, _ in checks], clusters),
        "reworded": cluster_accuracy([r for _, _, r in checks], clusters),
        "examples": [{"question": it["question_stem"], "rephrased": t} for it, t in list(zip(items, texts))[:6]],
    }


def acceptance(report: dict, world: World) -> dict:
    """The world's acceptance numbers: each model's lowest own-domain and highest
    other-domain test accuracy, the receiver's oracle, rephrasing fidelity, the parameter
    ratios to the receiver, and the models whose pretraining fell short: stopped by the step
    cap instead of the stop criteria (``step_cap``), or never past phase 1 (``phase1_only``, phase 0 included:
    knowledge not at ``phase1_accuracy`` on validation, so notes, private prefixes and
    two-fact questions were never trained)."""
    out: dict = {"own_min": {}, "other_max": {}}
    for name, by_domain in report["standalone"].items():
        known = world.knows[name]
        out["own_min"][name] = min(by_domain[d].value for d in known)
        out["other_max"][name] = max(a.value for d, a in by_domain.items() if d != "all" and d not in known)
    out["oracle"] = report["oracle"]["all"].value
    out["pair_oracle"] = report["pair_oracle"]["all"].value
    out["rephrase_fidelity"] = report["rephrase"]["faithful_and_private"].value
    receiver = report["models"][world.receiver]["parameters"]
    out["parameter_ratio"] = {n: round(m["parameters"] / receiver, 2) for n, m in report["models"].items()}
    built = world.manifest["models"]
    out["step_cap"] = sorted(n for n, m in built.items() if not m["early_stopped"])
    out["phase1_only"] = short_of_phase2(built)
    return out


def short_of_phase2(built: dict[str, dict]) -> list[str]:
    """Models (manifest ``models`` entries) whose saved weights come from before phase 2:
    stuck in phase 0 (statements never completed) or phase 1 (questions never answered)."""
    return sorted(n for n, m in built.items() if m.get("final", {}).get("phase", 0) < 2)


def _fact(row: dict):
    from .knowledge import Fact

    return Fact(**row)


def measure_world(
    world: World, out_path: str | Path | None = None, progress: bool = True, limit: int | None = None
) -> dict:
    """All acceptance numbers of ``world`` (accuracies as ``evaluate.Accuracy``); written as
    JSON to ``out_path`` if given. ``limit``: score only the first held-out questions."""
    t0 = time.time()
    items = load_mcq(world.mcq_test_path)[:limit]
    pairs = load_mcq(world.mcq_path("pair_test"))[:limit]
    facts = {f["fact_id"]: f for f in world.facts()}
    report: dict = {
        "seed": world.seed,
        "root": str(world.root),
        "config_hash": world.manifest["config_hash"],
        "scoring": "option log-likelihood after the chat-template prompt (evaluate.score_mcq)",
        "models": {},
        "standalone": {},
        "pair_standalone": {},
        "background": {},
        "build_seconds": world.manifest["seconds"],
        "counts": world.manifest["counts"],
    }
    for name in tqdm(world.models, desc="measure", disable=not progress):
        info = world.manifest["models"][name]
        report["models"][name] = {
            k: info[k]
            for k in (
                "architecture",
                "parameters",
                "layers",
                "hidden",
                "heads",
                "kv_heads",
                "head_dim",
                "vocab_size",
                "tokenizer",
                "domains",
                "paper_model",
                "steps",
                "seconds",
            )
        }
        loaded = load_world_model(world, name)
        report["standalone"][name] = standalone(loaded, items)
        report["pair_standalone"][name] = standalone(loaded, pairs)
        if name == world.receiver:
            report["oracle"] = oracle(loaded, items, facts)
            report["pair_oracle"] = oracle(loaded, pairs, facts)
            report["rephrase"] = rephrase_fidelity(loaded, items)
        else:
            report["background"][name] = background_correctness(loaded, items, facts)
    report["leaked_test_entities"] = leaked_entities(world)
    report["acceptance"] = acceptance(report, world)
    report["measure_seconds"] = round(time.time() - t0, 1)
    if out_path is not None:
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        Path(out_path).write_text(json.dumps(to_jsonable(report), indent=1))
    return report
