"""A fuser recipe trial on the validation split: train a profile's main fuser with some
training or shape settings changed, then score the receiver alone and C2C on held-out
validation questions, paired. Design choices for a profile (``train:``, ``fuser:``) are made
from these reports, never from the test split.

Each trial's fuser is stored in the study's hub under its own variant
(``trial-<settings>``), so re-running a trial reuses it and no trial replaces the main fuser.

    python -m fedrefine_lib.fuser_trial --profile smol --set lr=1e-3 --set epochs=2 --out F
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from . import federation
from .jobs import FuserJob
from .results import summarize, to_jsonable
from .study import Study, open_study

TRAIN_KEYS = ("lr", "epochs", "max_steps", "weight_decay", "warmup_ratio", "batch_size", "seed")
"""Settings a trial may change in the profile's ``train:`` block; any other key is a ``fuser:`` option."""


def trial_variant(settings: dict[str, Any]) -> str:
    """The hub variant of a trial: its changed settings in key order (``trial-epochs2-lr0.001``)."""
    return "trial-" + "-".join(f"{k}{v}" for k, v in sorted(settings.items())) if settings else "trial-profile"


def run_trial(
    study: Study, settings: dict[str, Any], split: str = "val", limit: int | None = None, sender: str | None = None
) -> dict[str, Any]:
    """Train (or reuse) the trial's fuser for ``sender`` (default: the profile's last) -> the
    receiver and score ``split``: receiver alone, C2C, and their paired difference."""
    train_over = {k: v for k, v in settings.items() if k in TRAIN_KEYS}
    fuser_over = {k: v for k, v in settings.items() if k not in TRAIN_KEYS}
    receiver, s = study.model(study.receiver), study.model(sender or study.senders[-1])
    options = study.fuser_options(**fuser_over)
    job = FuserJob(s.name, receiver.name, trial_variant(settings), study.fusion, options)
    start = time.perf_counter()
    study.train_fusers([job], study.chat_records(), study.train_config(**train_over))
    trained = time.perf_counter() - start
    hub = study.hub()
    fuser, training = hub.get(s, receiver, job.variant), hub.training(s.name, receiver.name, job.variant)
    items = study.mcq(split, limit=limit)
    alone = study.score(receiver, items, progress=False)
    c2c = study.score(federation.C2C(receiver, s, fuser), items, progress=False)
    return {
        "settings": settings,
        "variant": job.variant,
        "split": split,
        "items": len(items),
        "fuser_options": options,
        "train_config": training["config"],
        "steps": training["steps"],
        "final_loss": training["losses"][-1],
        "gate_logits": training.get("gate_logits"),
        "accuracy": {"receiver alone": summarize(alone), "c2c": summarize(c2c)},
        "paired": {"c2c - receiver alone": c2c.compare(alone)},
        "seconds": {"train_or_load": round(trained, 1), "total": round(time.perf_counter() - start, 1)},
    }


def _value(text: str) -> Any:
    """A ``--set`` value as JSON where it parses (numbers, lists, true/false), else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="smol")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", default="val", choices=("val",), help="trials never read the test split")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a changed setting")
    parser.add_argument("--out", default=None, help="write the report as JSON here")
    args = parser.parse_args(argv)
    bad = [kv for kv in args.set if "=" not in kv]
    if bad:
        parser.error(f"--set {bad[0]!r}: write KEY=VALUE, e.g. --set lr=1e-3.")
    settings = {k: _value(v) for k, v in (kv.split("=", 1) for kv in args.set)}
    report = to_jsonable(run_trial(open_study(args.profile, args.seed), settings, args.split, args.limit))
    text = json.dumps(report, indent=1, sort_keys=True)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    print(json.dumps({k: report[k] for k in ("variant", "steps", "final_loss", "accuracy", "paired")}, indent=1))


if __name__ == "__main__":
    main()
