"""Headroom before any fuser is trained: whether a profile's own models leave collaboration
anything to do, measured on held-out items (00 for every profile without a ``mini`` world).

For each item: the receiver alone (it never sees the senders' private context), each sender
alone with its device's private context (``engine.Standalone(holds_context=True)``; for
items without one, what its weights know), and the oracle: the receiver with the supporting
fact, or the sender's records, in its own prompt (``Study.fact_notes``). Fusion can at best
move the receiver from its own accuracy towards the better of the two. The bars (issue #21):
each sender and the oracle at least :data:`MIN_GAIN` above the receiver alone, paired on the
same items.

    python -m fedrefine_lib.headroom --profile smol --split val --limit 96
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from .engine import Standalone
from .models import PLAIN_CHAT_TEMPLATE
from .results import summarize, to_jsonable
from .study import open_study

MIN_GAIN = 0.30
"""Accuracy points (as a share) by which a sender and the oracle must beat the receiver alone."""


def model_facts(loaded) -> dict[str, Any]:
    """Architecture, size and tokenizer facts of one loaded model (``LoadedModel``)."""
    cfg = loaded.model.config
    text = getattr(cfg, "text_config", cfg)
    return {
        "architecture": type(loaded.model).__name__,
        "parameters": int(loaded.model.num_parameters()),
        "layers": int(text.num_hidden_layers),
        "hidden": int(text.hidden_size),
        "heads": int(text.num_attention_heads),
        "kv_heads": int(getattr(text, "num_key_value_heads", text.num_attention_heads)),
        "head_dim": int(getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads),
        "vocab_size": int(text.vocab_size),
        "tokenizer": type(loaded.tokenizer).__name__,
        "chat_template": "plain (base model)" if _plain(loaded.tokenizer) else "the model's own",
    }


def _plain(tokenizer) -> bool:
    return tokenizer.chat_template == PLAIN_CHAT_TEMPLATE


def measure_headroom(study, split: str = "val", limit: int | None = None, batch_size: int = 8) -> dict[str, Any]:
    """The headroom report of ``study``'s receiver and senders on ``split`` (see the module
    docstring): models, accuracies with cluster-bootstrap intervals, paired differences
    against the receiver alone, and ``acceptance`` (the bars and whether each holds)."""
    items = study.mcq(split, limit=limit)
    options = {len(it["choices"]["label"]) for it in items}
    start = time.perf_counter()
    receiver = study.model(study.receiver)
    results = {"receiver alone": study.score(receiver, items, batch_size=batch_size, progress=False)}
    results["oracle"] = study.score(
        receiver, [_without_context(it) for it in items], contexts=study.fact_notes(items),
        batch_size=batch_size, progress=False,
    )  # fmt: skip
    for name in study.senders:
        sender = Standalone(study.model(name), holds_context=True)
        results[f"{name} with its context"] = study.score(sender, items, batch_size=batch_size, progress=False)
    base = results["receiver alone"]
    paired = {f"{k} - receiver alone": r.compare(base) for k, r in results.items() if k != "receiver alone"}
    bars = {k: d.diff >= MIN_GAIN for k, d in paired.items()}
    report = {
        "split": split,
        "items": len(items),
        "chance": 1 / max(options) if len(options) == 1 else None,
        "scoring": study.settings.get("scoring", "loglik"),
        "models": {n: model_facts(study.model(n)) for n in [study.receiver, *study.senders]},
        "accuracy": {k: summarize(r) for k, r in results.items()},
        "paired": paired,
        "acceptance": {"min_gain": MIN_GAIN, "holds": bars, "all": all(bars.values())},
        "seconds": round(time.perf_counter() - start, 1),
    }
    return report


def _without_context(item: dict) -> dict:
    return {k: v for k, v in item.items() if k != "private_context"}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="smol")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", default="val", choices=("val", "test"))
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--scoring", default=None, help="override the profile's scoring method")
    parser.add_argument("--task", nargs="*", default=[], metavar="KEY=INT", help="override task options")
    parser.add_argument("--out", default=None, help="write the report as JSON here")
    args = parser.parse_args(argv)
    task = {key: int(value) for key, value in (kv.split("=", 1) for kv in args.task)}
    study = open_study(args.profile, args.seed, task=task or None)
    if args.scoring:
        study.settings["scoring"] = args.scoring
    report = to_jsonable(measure_headroom(study, args.split, args.limit))
    report["task"] = study.settings.get("task")
    text = json.dumps(report, indent=1, sort_keys=True)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    print(json.dumps({k: report[k] for k in ("accuracy", "acceptance", "seconds")}, indent=1)[:4000])


if __name__ == "__main__":
    main()
