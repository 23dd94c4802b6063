"""Pretraining trials: one ``mini`` model under a changed world config, on validation only.

The evidence behind the build's settings (:class:`~.config.WorldConfig`): a trial pretrains
one model of the world of ``seed`` exactly as a build with the changed config would (same
knowledge, tokenizers trained afresh from that config) and writes its validation history.
Nothing of the test split is read::

    python -m fedrefine_lib.world.trial --model mini-qwen2.5-coder-0.5b --set weight_decay=0.1 \\
        --out results/mini/world_trials/coder_wd0.1.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from .config import WorldConfig
from .corpus import tokenizer_texts
from .knowledge import make_knowledge
from .models import mini_models
from .pretrain import pretrain_model
from .tokenization import train_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def run_trial(name: str, seed: int, overrides: dict, max_steps: int | None = None) -> dict:
    """Pretrain model ``name`` of the world of ``seed`` under ``WorldConfig`` with
    ``overrides``; return the config changes, steps, seconds and validation history."""
    config = WorldConfig.from_dict({**WorldConfig().to_dict(), **overrides})
    if max_steps is not None:
        config = WorldConfig.from_dict({**config.to_dict(), "max_steps": {**config.max_steps, name: max_steps}})
    family = mini_models(config.model_scale)[name].tokenizer
    size = config.qwen_vocab if family == "qwen" else config.llama_vocab
    knowledge = make_knowledge(seed, config.entities, config.users)
    with tempfile.TemporaryDirectory() as tmp:
        train_tokenizer(family, *tokenizer_texts(knowledge, config, seed), size).save_pretrained(Path(tmp, "tok"))
        log = pretrain_model(
            name, seed, config.to_dict(), str(Path(tmp, "tok")), str(Path(tmp, "model")), progress=False
        )
    keep = ("steps", "seconds", "early_stopped", "phase2_step", "restored_step", "final", "history")
    return {"model": name, "seed": seed, "overrides": overrides, "max_steps": max_steps, **{k: log[k] for k in keep}}


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON", help="a WorldConfig field")
    parser.add_argument("--max-steps", type=int, default=None, help="this model's step cap")
    parser.add_argument("--out", required=True, help="the trial's JSON (not overwritten)")
    args = parser.parse_args()
    out = Path(args.out)
    if out.exists():
        raise SystemExit(f"{out} exists; trials are evidence and are never overwritten: choose another --out.")
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or key not in WorldConfig.__dataclass_fields__:
            raise SystemExit(f"--set {item!r}: use KEY=VALUE with KEY a WorldConfig field.")
        overrides[key] = _value(value)
    result = run_trial(args.model, args.seed, overrides, args.max_steps)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    for h in result["history"]:
        print(h["step"], h["phase"], h.get("val_by_domain"), h.get("val_rephrase_fidelity"), h["seconds"])
    print(f"{args.model}: {result['steps']} steps, {result['seconds']} s, phase 2 from {result['phase2_step']}")


if __name__ == "__main__":
    main()
