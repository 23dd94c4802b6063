"""Sizes and budgets of a ``mini`` world build (seed-independent)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class WorldConfig:
    """Everything a build depends on besides the seed.

    Attributes:
        entities: entities per domain for each split (``train``, ``val``, ``eval``,
            ``pool``); every entity has one fact per relation (4 per domain).
        qwen_vocab / llama_vocab: BPE vocabulary sizes of the two tokenizer families.
        model_scale: ``"full"`` or ``"smoke"`` (tiny shapes, see :mod:`.models`).
        max_steps: per model name, the step cap (early stopping usually ends sooner).
        min_steps: no early stop before this many steps.
        eval_every: steps between early-stopping checks.
        stop_accuracy: own-domain validation MCQ accuracy that ends training.
        stop_note_accuracy: context-note (oracle) validation accuracy also required.
        batch_size, lr, warmup_steps, weight_decay: optimiser settings.
        note_examples / rephrase_examples / filler_examples: per-epoch counts.
        chat_variants: chat records per fuser-training fact (MCQ and background).
        filler_records: general filler chat records added to the fuser-training file.
        workers: models pretrained at once (one thread each).
    """

    entities: dict[str, int] = field(default_factory=lambda: {"train": 24, "val": 6, "eval": 26, "pool": 10})
    qwen_vocab: int = 1400
    llama_vocab: int = 900
    model_scale: str = "full"
    max_steps: dict[str, int] = field(default_factory=lambda: {
        "mini-qwen3-0.6b": 3000, "mini-qwen2.5-0.5b": 3000, "mini-qwen2.5-coder-0.5b": 3000,
        "mini-qwen2.5-1.5b": 3000, "mini-llama3.2-1b": 4000})
    min_steps: int = 200
    eval_every: int = 100
    stop_accuracy: float = 0.98
    stop_note_accuracy: float = 0.95
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    note_examples: int = 250
    rephrase_examples: int = 200
    filler_examples: int = 40
    chat_variants: int = 3
    filler_records: int = 200
    workers: int = 2

    @classmethod
    def smoke(cls) -> "WorldConfig":
        """A tiny world that builds in well under a minute (tests, CI)."""
        names = ("mini-qwen3-0.6b", "mini-qwen2.5-0.5b", "mini-qwen2.5-coder-0.5b",
                 "mini-qwen2.5-1.5b", "mini-llama3.2-1b")
        return cls(entities={"train": 3, "val": 2, "eval": 3, "pool": 2}, qwen_vocab=600,
                   llama_vocab=450, model_scale="smoke", max_steps={n: 12 for n in names},
                   min_steps=12, eval_every=6, batch_size=16, warmup_steps=4,
                   note_examples=20, rephrase_examples=10, filler_examples=5,
                   chat_variants=1, filler_records=5)

    def to_dict(self) -> dict:
        return asdict(self)

    def hash(self) -> str:
        """Short stable hash of the config (part of the cache key)."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:10]

    @property
    def is_default(self) -> bool:
        return self == WorldConfig()
