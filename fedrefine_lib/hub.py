"""The fuser hub: the server's store of every fuser F_ij (sender i -> receiver j).

Layout on disk::

    <root>/index.json                       # one entry per stored fuser
    <root>/<sender>--<receiver>/<variant>/  # fuser.safetensors, fuser_config.json,
                                            # train.json (loss curve, configs, data hash)

``variant`` names a recipe of the same pair (``"default"``, or ablations such as
``"reencode"``). A stored fuser is reused only while the recipe that made it is unchanged
(fuser config, training config and training data hash); otherwise it is retrained.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .concat import ConcatFuser
from .fuser import CONFIG_FILE, C2CFuser, FuserConfig
from .train import Record, TrainConfig, TrainResult, train_fuser

FUSER_CLASSES: dict[str, type[C2CFuser]] = {"residual": C2CFuser, "concat": ConcatFuser}
INDEX_FILE = "index.json"
TRAIN_FILE = "train.json"
_VOLATILE = {"progress", "loss_curve_path"}  # training settings that do not change the result


class MissingFuserError(KeyError):
    """The hub holds no fuser for a requested ordered pair."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0])


def records_hash(records: Sequence[Record]) -> str:
    """Short sha256 of the training records (part of a fuser's recipe)."""
    return hashlib.sha256(json.dumps(list(records), sort_keys=True).encode()).hexdigest()[:16]


def recipe(fuser_config: FuserConfig, train_config: TrainConfig, data_hash: str) -> dict[str, Any]:
    """What determines a trained fuser, as JSON-ready data."""
    train = {k: v for k, v in train_config.to_dict().items() if k not in _VOLATILE}
    return {"fuser": fuser_config.to_dict(), "train": train, "data": data_hash}


def fuser_class(directory: Path) -> type[C2CFuser]:
    """The fuser class a saved fuser directory holds (by the ``kind`` in its config JSON)."""
    path = directory / CONFIG_FILE
    kind = json.loads(path.read_text()).get("kind", "residual") if path.is_file() else "residual"
    if kind not in FUSER_CLASSES:
        raise ValueError(f"{path}: unknown fuser kind {kind!r}; known: {sorted(FUSER_CLASSES)}.")
    return FUSER_CLASSES[kind]


class FuserHub:
    """All fusers of a set of models, one directory per ordered pair and variant."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ paths/index

    def pair_dir(self, sender: str, receiver: str, variant: str = "default") -> Path:
        return self.root / f"{sender}--{receiver}" / variant

    def index(self) -> dict[str, dict[str, Any]]:
        path = self.root / INDEX_FILE
        return json.loads(path.read_text()) if path.is_file() else {}

    def _write_index(self, index: dict[str, dict[str, Any]]) -> None:
        (self.root / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    @staticmethod
    def key(sender: str, receiver: str, variant: str = "default") -> str:
        return f"{sender}->{receiver}/{variant}"

    def has(self, sender: str, receiver: str, variant: str = "default", recipe: dict | None = None) -> bool:
        """Whether F_{sender->receiver} is stored (and, given ``recipe``, made by it)."""
        entry = self.index().get(self.key(sender, receiver, variant))
        if entry is None or not (self.pair_dir(sender, receiver, variant) / TRAIN_FILE).is_file():
            return False
        return recipe is None or entry.get("recipe") == json.loads(json.dumps(recipe))

    # ----------------------------------------------------------------- get / put

    def get(self, sender, receiver, variant: str = "default") -> C2CFuser:
        """F_{sender->receiver}. ``sender``/``receiver`` are names or ``LoadedModel``s (then
        the pair is checked strictly against the models)."""
        s_name, r_name = getattr(sender, "name", sender), getattr(receiver, "name", receiver)
        if not self.has(s_name, r_name, variant):
            stored = sorted(self.index())
            raise MissingFuserError(
                f"The hub at {self.root} has no fuser {self.key(s_name, r_name, variant)} "
                f"(sender {s_name!r} -> receiver {r_name!r}). Stored: {stored or 'none'}. "
                "Train it with FuserHub.train_missing(...) or FuserHub.get_or_train(...)."
            )
        models = (receiver, sender) if hasattr(sender, "model") and hasattr(receiver, "model") else (None, None)
        directory = self.pair_dir(s_name, r_name, variant)
        return fuser_class(directory).from_pretrained(directory, *models)

    def training(self, sender: str, receiver: str, variant: str = "default") -> dict[str, Any]:
        """The stored training record (loss curve, configs) of a fuser."""
        return json.loads((self.pair_dir(sender, receiver, variant) / TRAIN_FILE).read_text())

    def put(self, fuser: C2CFuser, result: TrainResult, recipe: dict[str, Any], variant: str = "default",
            **extra: Any) -> Path:
        """Store a trained fuser with its training record and add it to the index."""
        c = fuser.config
        directory = fuser.save_pretrained(self.pair_dir(c.sender_name, c.receiver_name, variant))
        (directory / TRAIN_FILE).write_text(json.dumps({**result.to_dict(), "recipe": recipe}, indent=2) + "\n")
        index = self.index()
        tail = result.losses[-max(1, len(result.losses) // 10):]
        index[self.key(c.sender_name, c.receiver_name, variant)] = {
            "sender": c.sender_name, "receiver": c.receiver_name, "variant": variant,
            "path": str(directory.relative_to(self.root)), "parameters": fuser.num_parameters(),
            "layer_map": c.layer_map_kind, "aligner": c.aligner, "hidden": c.hidden,
            "final_loss": sum(tail) / len(tail), "steps": result.steps, "recipe": recipe, **extra,
        }
        self._write_index(index)
        return directory

    def annotate(self, sender: str, receiver: str, variant: str = "default", **fields: Any) -> None:
        """Add fields (e.g. ``heldout_gain``) to a stored fuser's index entry."""
        index = self.index()
        index[self.key(sender, receiver, variant)].update(fields)
        self._write_index(index)

    # ----------------------------------------------------------------- training

    def get_or_train(
        self, receiver, sender, records: Sequence[Record], *, variant: str = "default",
        train_config: TrainConfig | None = None, kind: str = "residual", **fuser_options: Any,
    ) -> tuple[C2CFuser, dict[str, Any]]:
        """F_{sender->receiver} made by this recipe: loaded if stored, else trained and stored.

        Args:
            receiver, sender: ``LoadedModel``s.
            records: fuser-training chat records.
            kind: ``"residual"`` (C2C) or ``"concat"`` (``concat.ConcatFuser``).
            fuser_options: passed to ``FuserConfig.for_pair`` (``layer_map``, ``aligner``,
                ``hidden``, ``depth``, ...).
        Returns:
            the fuser (eval mode) and its training record (``losses``, ``config``, ...).
        """
        train_config = train_config or TrainConfig()
        config = FuserConfig.for_pair(receiver, sender, **fuser_options)
        wanted = {**recipe(config, train_config, records_hash(records)), "kind": kind}
        if not self.has(sender.name, receiver.name, variant, wanted):
            torch.manual_seed(train_config.seed)  # the fuser's initial weights are part of the recipe
            fuser = FUSER_CLASSES[kind](config)
            result = train_fuser(receiver, sender, fuser, records, replace(train_config, loss_curve_path=None),
                                 aligner=config.aligner)
            self.put(fuser.eval(), result, wanted, variant)
        return self.get(sender, receiver, variant), self.training(sender.name, receiver.name, variant)

    def train_missing(
        self, load: Callable[[str], Any], pairs: Sequence[tuple[str, str]], records: Sequence[Record], *,
        variant: str = "default", train_config: TrainConfig | None = None, kind: str = "residual",
        **fuser_options: Any,
    ) -> list[str]:
        """Train every ``(sender, receiver)`` pair not yet stored with this recipe.

        Args:
            load: model name -> ``LoadedModel`` (e.g. ``study.model``).
        Returns:
            keys of the pairs that were trained (the others were already present).
        """
        from tqdm.auto import tqdm

        trained = []
        for sender, receiver in tqdm(pairs, desc="fuser hub"):
            r, s = load(receiver), load(sender)
            config = FuserConfig.for_pair(r, s, **fuser_options)
            wanted = {**recipe(config, train_config or TrainConfig(), records_hash(records)), "kind": kind}
            if not self.has(sender, receiver, variant, wanted):
                self.get_or_train(r, s, records, variant=variant, train_config=train_config, kind=kind,
                                  **fuser_options)
                trained.append(self.key(sender, receiver, variant))
        return trained

    def summary(self):
        """One row per stored fuser: pair, parameters, layer map, aligner, loss, gain."""
        import pandas as pd

        cols = ["sender", "receiver", "variant", "parameters", "layer_map", "aligner", "hidden",
                "steps", "final_loss", "heldout_gain"]
        rows = [{c: e.get(c) for c in cols} for e in self.index().values()]
        return pd.DataFrame(rows, columns=cols)
