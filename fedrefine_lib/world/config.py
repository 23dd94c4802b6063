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
        patience: phase-2 checks without a better one (own-domain accuracy, note target
            first) after which training stops and keeps its best check's weights.
        stop_accuracy: own-domain validation MCQ accuracy that ends training, in every
            known domain (each val fact of the domain asked in every question template).
        note_accuracy: per model name, the context-note validation accuracy also required
            before stopping (the receiver's, for the oracle and T2T); the other models learn
            notes in phase 2 without waiting for them.
        batch_size, lr, warmup_steps, weight_decay, beta2: optimiser settings (AdamW);
            ``lr_overrides`` per model (the deeper Qwen2 "1.5b" without q/k-norm stays on
            the memorisation plateau at 3e-3 and, with some tokenizer draws, at 2e-3).
        phase2_lr_scale: factor (>= 0) on the learning rate from the step phase 2 begins: the
            facts memorised in phase 1 stay put while the new tasks are learnt (receiver,
            seed 0: own domain 0.98-1.0 across phase-2 checks at 0.3x, 0.91-1.0 at 1x; notes
            reach 0.95 at the same step).
        ema_decay: in [0, 1); the weights checked, kept and saved are an exponential moving
            average of the trained ones with this decay per step (0: the raw weights). At a
            constant learning rate a tiny model's recall swings from one check to the next
            (Llama, seed 0: held-out geography 0.75-0.97 across checks) and early stopping
            keeps a lucky check; the average moves smoothly.
        tie_embeddings: tie input and output embeddings (the paper's models do; untied
            memorises facts markedly sooner at these sizes).
        phase1_accuracy: own-domain validation accuracy (lowest known domain) that ends the knowledge-only
            phase 1 (see :mod:`.corpus`).
        statement_passes: times every statement template of every known fact
            appears per epoch.
        note_examples / rephrase_examples / filler_examples / copy_examples: per-epoch
            counts (phase 2).
        chat_variants: chat records per fuser-training fact (MCQ and background).
        filler_records: general filler chat records added to the fuser-training file.
        workers: models pretrained at once (one thread each).
    """

    entities: dict[str, int] = field(default_factory=lambda: {"train": 24, "val": 6, "eval": 26, "pool": 10})
    qwen_vocab: int = 2200
    llama_vocab: int = 1000
    model_scale: str = "full"
    max_steps: dict[str, int] = field(
        default_factory=lambda: {
            "mini-qwen3-0.6b": 3000,
            "mini-qwen2.5-0.5b": 3000,
            "mini-qwen2.5-coder-0.5b": 3000,
            "mini-qwen2.5-1.5b": 3500,
            "mini-llama3.2-1b": 3500,
        }
    )
    min_steps: int = 200
    eval_every: int = 100
    patience: int = 6
    stop_accuracy: float = 0.95
    note_accuracy: dict[str, float] = field(default_factory=lambda: {"mini-qwen3-0.6b": 0.95})
    batch_size: int = 32
    lr: float = 3e-3
    lr_overrides: dict[str, float] = field(
        default_factory=lambda: {"mini-qwen2.5-1.5b": 1e-3, "mini-llama3.2-1b": 2e-3}
    )
    warmup_steps: int = 100
    weight_decay: float = 0.01
    beta2: float = 0.98
    phase2_lr_scale: float = 0.3
    ema_decay: float = 0.99
    tie_embeddings: bool = False
    phase1_accuracy: float = 0.9
    statement_passes: int = 2
    note_examples: int = 600
    rephrase_examples: int = 120
    filler_examples: int = 40
    copy_examples: int = 150
    chat_variants: int = 3
    filler_records: int = 200
    workers: int = 2

    def __post_init__(self) -> None:
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(
                f"WorldConfig.ema_decay={self.ema_decay}: use a decay in [0, 1) "
                "(0 keeps the raw weights; 0.99 averages over about 100 steps)."
            )
        if self.phase2_lr_scale < 0.0:
            raise ValueError(
                f"WorldConfig.phase2_lr_scale={self.phase2_lr_scale}: use a factor >= 0 "
                "on the learning rate (1 keeps it unchanged in phase 2)."
            )

    @classmethod
    def smoke(cls) -> WorldConfig:
        """A tiny world that builds in well under a minute (tests, CI)."""
        names = (
            "mini-qwen3-0.6b",
            "mini-qwen2.5-0.5b",
            "mini-qwen2.5-coder-0.5b",
            "mini-qwen2.5-1.5b",
            "mini-llama3.2-1b",
        )
        return cls(
            entities={"train": 3, "val": 2, "eval": 3, "pool": 2},
            qwen_vocab=600,
            llama_vocab=450,
            model_scale="smoke",
            max_steps={n: 12 for n in names},
            min_steps=12,
            eval_every=6,
            batch_size=16,
            warmup_steps=4,
            phase1_accuracy=0.0,
            ema_decay=0.5,
            note_examples=20,
            rephrase_examples=10,
            filler_examples=5,
            copy_examples=10,
            chat_variants=1,
            filler_records=5,
        )

    def to_dict(self) -> dict:
        return asdict(self)

    def hash(self) -> str:
        """Short stable hash of the config (part of the cache key)."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:10]

    @property
    def is_default(self) -> bool:
        return self == WorldConfig()
