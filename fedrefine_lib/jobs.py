"""What the fuser hub trains: recipes (what determines a trained fuser), jobs (one fuser of a
pair, mode and options) and the ablations of a pair's main fuser, each one change from its
recipe. Re-exported by :mod:`.hub`."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .fuser import KINDS, FuserConfig
from .prompts import Record
from .train import TrainConfig

_VOLATILE = {"progress", "loss_curve_path"}  # training settings that do not change the result
_NEWER = {"max_record_tokens": None}  # settings added later: left out at their default, so fusers
# stored before they existed keep their recipe

BLOCK_ONLY_OPTIONS: tuple[str, ...] = ("sender_positions",)
"""``FuserConfig`` options that only concat and prefix (block) fusers take."""


def records_hash(records: Sequence[Record]) -> str:
    """Short sha256 of the training records (part of a fuser's recipe)."""
    return hashlib.sha256(json.dumps(list(records), sort_keys=True).encode()).hexdigest()[:16]


def recipe(
    fuser_config: FuserConfig,
    train_config: TrainConfig,
    data_hash: str,
    models: dict[str, str] | None = None,
    world: str | None = None,
) -> dict[str, Any]:
    """What determines a trained fuser, as JSON data (``models``: role -> fingerprint;
    ``world``: the fingerprint of the world config the models and data come from)."""
    train = {
        k: v for k, v in train_config.to_dict().items() if k not in _VOLATILE and not (k in _NEWER and v == _NEWER[k])
    }
    made = {"fuser": fuser_config.to_dict(), "train": train, "data": data_hash, "models": models or {}, "world": world}
    return as_json(made)


def as_json(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists), for comparing recipes."""
    return json.loads(json.dumps(value))


def default_variant(kind: str) -> str:
    """The hub variant a fusion mode's main fusers are stored under: ``"default"`` for
    residual C2C fusers, the mode's name (``"concat"``) otherwise."""
    if kind not in KINDS:
        raise ValueError(f"Unknown fuser kind {kind!r}; known: {list(KINDS)}.")
    return "default" if kind == "residual" else kind


@dataclass(frozen=True)
class FuserJob:
    """One fuser for :meth:`FuserHub.train_missing`: F_{sender->receiver} of ``variant``,
    a ``kind`` (a fusion mode: ``"residual"``, ``"concat"`` or ``"prefix"``) and
    ``FuserConfig.for_pair`` options.

    Options only block fusers take (:data:`BLOCK_ONLY_OPTIONS`, e.g. ``sender_positions``)
    are dropped from a residual job, so one profile's ``fuser:`` options serve every kind.
    """

    sender: str
    receiver: str
    variant: str = "default"
    kind: str = "residual"
    options: dict[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(
                f"FuserJob {self.sender}->{self.receiver}: unknown kind {self.kind!r}; use one of {list(KINDS)}."
            )
        if self.kind == "residual":
            object.__setattr__(self, "options", {k: v for k, v in self.options.items() if k not in BLOCK_ONLY_OPTIONS})

    @classmethod
    def main(cls, sender: str, receiver: str, kind: str, **options: Any) -> FuserJob:
        """The pair's main fuser of a fusion mode (stored under :func:`default_variant`)."""
        return cls(sender, receiver, default_variant(kind), kind, options)


ABLATIONS = ("fusion", "prefix", "positions", "reencode", "span_template", "layer_map")
"""Ablations of a pair's main fuser (:func:`ablation_jobs`)."""


def check_ablations(names: Sequence[str]) -> None:
    """Refuse anything but a list of names from :data:`ABLATIONS`, naming the allowed ones."""
    if not isinstance(names, (list, tuple)) or set(names) - set(ABLATIONS):
        raise ValueError(f"ablations={names!r}: give a list of names from {ABLATIONS} (or [] for none).")


def ablation_jobs(
    sender: str, receiver: str, fusion: str, options: dict[str, Any], names: Sequence[str]
) -> dict[str, FuserJob]:
    """The fusers of an ablation of F_{sender->receiver}, each one change from the main recipe
    (fusion mode ``fusion``, ``FuserConfig.for_pair`` ``options``).

    Args:
        names: from :data:`ABLATIONS`: ``fusion`` (the other of residual / concat), ``prefix``
            (prefix fusion), ``positions`` (block modes: every prompt position sent, or only
            the last), ``reencode`` and ``span_template`` (residual fusion with that aligner),
            ``layer_map`` (each other layer map of ``top``, ``top_down``, ``bottom_up``).
    Returns:
        ``{ablation label: job}`` (``"layer_map <kind>"`` for each other layer map), each
        stored under its own hub variant.
    """
    check_ablations(names)
    other_mode = "residual" if fusion == "concat" else "concat"
    layer_map = options.get("layer_map", "top_down")
    map_kind = layer_map if isinstance(layer_map, str) else "custom"
    positions = options.get("sender_positions")
    changes = {  # ablation -> (hub variant, fusion mode, change to the fuser options)
        "fusion": (default_variant(other_mode), other_mode, {}),
        **({"prefix": (default_variant("prefix"), "prefix", {})} if fusion != "prefix" else {}),
        **({"positions": (f"{fusion}_{'all_positions' if positions else 'last_position'}", fusion,
                          {"sender_positions": None if positions else 1})} if fusion != "residual" else {}),
        "reencode": ("reencode", "residual", {"aligner": "reencode"}),
        "span_template": ("span_template", "residual", {"aligner": "span_template"}),
        **{f"layer_map {m}": (f"{fusion}_{m}", fusion, {"layer_map": m})
           for m in ("top", "top_down", "bottom_up") if m != map_kind},
    }  # fmt: skip
    return {
        name: FuserJob(sender, receiver, variant, kind, {**options, **change})
        for name, (variant, kind, change) in changes.items()
        if name.split()[0] in names
    }
