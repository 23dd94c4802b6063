"""The fuser hub: the server's store of every fuser F_ij (sender i -> receiver j).

Layout on disk::

    <root>/index.json                       # one entry per stored fuser
    <root>/<sender>--<receiver>/<variant>/  # fuser.safetensors, fuser_config.json,
                                            # train.json (loss curve, configs, data hash)

``variant`` names a recipe of the same pair (``"default"``, or ablations such as
``"reencode"``). A stored fuser is reused only while the recipe that made it is unchanged
(fuser config, training config, training data hash and both models' fingerprints: weights,
tokenizer, chat template); otherwise it is retrained.

Concurrent and interrupted runs cannot corrupt the hub (:mod:`.store`): a pair's directory is
written to a staging directory and published whole by rename; one trainer of a pair at a time
(a second waits, then reuses the result); readers hold a shared lock; a corrupt or incomplete
pair is moved aside with a warning and retrained. Names are single path components, so
nothing is written outside the root.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .fuser import KINDS, Fuser, FuserConfig, FuserLoadError, build_fuser, load_fuser
from .prompts import Record
from .store import check_name, lock_path, locked, publish, quarantine, staging_dir
from .train import TrainConfig, TrainResult, train_fuser

BLOCK_ONLY_OPTIONS: tuple[str, ...] = ("sender_positions",)
"""``FuserConfig`` options that only concat and prefix (block) fusers take."""
INDEX_FILE = "index.json"
LOCK_FILE = ".index.lock"
TRAIN_FILE = "train.json"
_VOLATILE = {"progress", "loss_curve_path"}  # training settings that do not change the result


class MissingFuserError(KeyError):
    """The hub holds no fuser for a requested ordered pair."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0])


def records_hash(records: Sequence[Record]) -> str:
    """Short sha256 of the training records (part of a fuser's recipe)."""
    return hashlib.sha256(json.dumps(list(records), sort_keys=True).encode()).hexdigest()[:16]


def recipe(
    fuser_config: FuserConfig, train_config: TrainConfig, data_hash: str, models: dict[str, str] | None = None
) -> dict[str, Any]:
    """What determines a trained fuser, as JSON-ready data (``models``: role -> fingerprint)."""
    train = {k: v for k, v in train_config.to_dict().items() if k not in _VOLATILE}
    return {"fuser": fuser_config.to_dict(), "train": train, "data": data_hash, "models": models or {}}


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


class FuserHub:
    """All fusers of a set of models, one directory per ordered pair and variant."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ paths/index

    def pair_dir(self, sender: str, receiver: str, variant: str = "default") -> Path:
        """Where F_{sender->receiver} of ``variant`` lives (names checked: one path component each)."""
        check_name(sender, "Sender name")
        check_name(receiver, "Receiver name")
        return self.root / f"{sender}--{receiver}" / check_name(variant, "Hub variant")

    def index(self) -> dict[str, dict[str, Any]]:
        path = self.root / INDEX_FILE
        if not path.is_file():
            return {}
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(
                f"The hub index {path} is not valid JSON ({err}); it lists the fusers stored beside it. Move it "
                "aside: the hub then sees no fuser and trains each again when asked."
            ) from err

    @contextmanager
    def _updating_index(self) -> Iterator[dict[str, dict[str, Any]]]:
        """Read, change and write the index under a file lock (workers of
        :meth:`train_missing` store fusers at the same time)."""
        with locked(self.root / LOCK_FILE):
            index = self.index()
            yield index
            tmp = self.root / f"{INDEX_FILE}.tmp"
            tmp.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
            os.replace(tmp, self.root / INDEX_FILE)  # readers see the old or the new index, never half

    @staticmethod
    def key(sender: str, receiver: str, variant: str = "default") -> str:
        return f"{sender}->{receiver}/{variant}"

    def has(self, sender: str, receiver: str, variant: str = "default", recipe: dict | None = None) -> bool:
        """Whether F_{sender->receiver} is stored (and, given ``recipe``, made by it: the
        recipe in the pair's own ``train.json``, published with its weights)."""
        if self.key(sender, receiver, variant) not in self.index():
            return False
        try:
            stored = self.training(sender, receiver, variant).get("recipe")
        except (FileNotFoundError, json.JSONDecodeError):
            return False
        return recipe is None or stored == json.loads(json.dumps(recipe))

    # ----------------------------------------------------------------- get / put

    def get(self, sender, receiver, variant: str = "default") -> Fuser:
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
        with locked(lock_path(directory), shared=True):  # never half of a pair being published
            return load_fuser(directory, *models)

    def fusers(self, receiver, senders, kind: str = "residual", variant: str | None = None) -> dict[str, Fuser]:
        """Every sender's fuser for ``receiver`` of one fusion mode, ``{sender name: fuser}``
        (what ``federation.FedRefine`` takes), loaded strictly against the models.

        Args:
            variant: the hub variant (default: the mode's main fusers, :func:`default_variant`).
        """
        variant = variant or default_variant(kind)
        fusers = {s.name: self.get(s, receiver, variant) for s in senders}
        wrong = {name: f.kind for name, f in fusers.items() if f.kind != kind}
        if wrong:
            raise ValueError(
                f"Hub variant {variant!r} holds fusers of kinds {wrong}, not {kind!r}; name the variant "
                f"that holds the {kind} fusers."
            )
        return fusers

    def training(self, sender: str, receiver: str, variant: str = "default") -> dict[str, Any]:
        """The stored training record (loss curve, configs, recipe) of a fuser."""
        directory = self.pair_dir(sender, receiver, variant)
        with locked(lock_path(directory), shared=True):
            return json.loads((directory / TRAIN_FILE).read_text())

    def put(
        self, fuser: Fuser, result: TrainResult, recipe: dict[str, Any], variant: str = "default", **extra: Any
    ) -> Path:
        """Store a trained fuser with its training record (published whole, see :mod:`.store`)
        and add it to the index."""
        c = fuser.config
        directory = self.pair_dir(c.sender_name, c.receiver_name, variant)
        staging = staging_dir(directory)
        try:
            fuser.save_pretrained(staging)
            (staging / TRAIN_FILE).write_text(json.dumps({**result.to_dict(), "recipe": recipe}, indent=2) + "\n")
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)  # nothing half-written stays behind
            raise
        tail = result.losses[-max(1, len(result.losses) // 10) :]
        entry = {
            "sender": c.sender_name,
            "receiver": c.receiver_name,
            "variant": variant,
            "path": str(directory.relative_to(self.root)),
            "parameters": fuser.num_parameters(),
            "layer_map": c.layer_map_kind,
            "aligner": c.aligner,
            "hidden": c.hidden,
            "final_loss": sum(tail) / len(tail),
            "steps": result.steps,
            "recipe": recipe,
            **extra,
        }

        def index_it() -> None:
            with self._updating_index() as index:
                index[self.key(c.sender_name, c.receiver_name, variant)] = entry

        publish(staging, directory, then=index_it)  # weights and index entry change together
        return directory

    def annotate(self, sender: str, receiver: str, variant: str = "default", **fields: Any) -> None:
        """Add fields (e.g. ``heldout_gain``) to a stored fuser's index entry."""
        with self._updating_index() as index:
            index[self.key(sender, receiver, variant)].update(fields)

    # ----------------------------------------------------------------- training

    def get_or_train(
        self,
        receiver,
        sender,
        records: Sequence[Record],
        *,
        variant: str = "default",
        train_config: TrainConfig | None = None,
        kind: str = "residual",
        **fuser_options: Any,
    ) -> tuple[Fuser, dict[str, Any]]:
        """F_{sender->receiver} made by this recipe: loaded if stored, else trained and stored.

        Args:
            receiver, sender: ``LoadedModel``s.
            records: fuser-training chat records.
            kind: ``"residual"`` (C2C), ``"concat"`` or ``"prefix"`` (``fuser.FuserConfig.kind``).
            fuser_options: passed to ``FuserConfig.for_pair`` (``layer_map``, ``aligner``,
                ``hidden``, ``depth``, ...).
        Returns:
            the fuser (eval mode) and its training record (``losses``, ``config``, ...).
        """
        train_config = train_config or TrainConfig()
        config = FuserConfig.for_pair(receiver, sender, kind=kind, **fuser_options)
        wanted = self.recipe_for(receiver, sender, records, train_config, kind, **fuser_options)
        directory = self.pair_dir(sender.name, receiver.name, variant)
        with locked(lock_path(directory, "train")):  # one trainer of a pair; the next one reuses its fuser
            if self.has(sender.name, receiver.name, variant, wanted):
                try:
                    return self.get(sender, receiver, variant), self.training(sender.name, receiver.name, variant)
                except FuserLoadError as err:  # corrupt or incomplete: set aside, train again
                    quarantine(directory, f"{type(err).__name__}: {err}")
            torch.manual_seed(train_config.seed)  # the fuser's initial weights are part of the recipe
            fuser = build_fuser(config)
            result = train_fuser(
                receiver, sender, fuser, records, replace(train_config, loss_curve_path=None), aligner=config.aligner
            )
            self.put(fuser.eval(), result, wanted, variant)
            return self.get(sender, receiver, variant), self.training(sender.name, receiver.name, variant)

    @staticmethod
    def recipe_for(
        receiver,
        sender,
        records: Sequence[Record],
        train_config: TrainConfig | None = None,
        kind: str = "residual",
        **fuser_options: Any,
    ) -> dict[str, Any]:
        """The recipe a fuser of this pair, kind, options, settings, data and models is stored under."""
        config = FuserConfig.for_pair(receiver, sender, kind=kind, **fuser_options)
        models = {"receiver": receiver.fingerprint, "sender": sender.fingerprint}
        return recipe(config, train_config or TrainConfig(), records_hash(records), models)

    def train_missing(
        self,
        load: Callable[[str], Any],
        jobs: Sequence[FuserJob],
        records: Sequence[Record],
        *,
        train_config: TrainConfig | None = None,
        workers: int = 1,
        spec: Callable[[str], Any] | None = None,
        cache_dir: str | Path | None = None,
    ) -> list[str]:
        """Train every job's fuser not yet stored with its recipe.

        Args:
            load: model name -> ``LoadedModel`` (e.g. ``study.model``).
            workers: fusers trained at once, each in its own process with one torch thread
                (the same result as one by one). More than 1 needs ``spec``.
            spec: model name -> ``models.ModelSpec`` (e.g. ``study.profile.spec``), so a
                worker can load the models; ``cache_dir``: where GGUF conversions are cached.
        Returns:
            keys of the fusers that were trained (the others were already present).
        """
        missing = []
        for job in jobs:
            r, s = load(job.receiver), load(job.sender)
            if not self.has(
                job.sender,
                job.receiver,
                job.variant,
                self.recipe_for(r, s, records, train_config, job.kind, **job.options),
            ):
                missing.append(job)
        if workers > 1 and len(missing) > 1:
            if spec is None:
                raise ValueError(
                    "train_missing(workers > 1) needs spec (model name -> ModelSpec) to load models in the workers."
                )
            args = [
                (
                    str(self.root),
                    spec(j.receiver),
                    spec(j.sender),
                    j,
                    list(records),
                    train_config,
                    None if cache_dir is None else str(cache_dir),
                )
                for j in missing
            ]
            with ProcessPoolExecutor(min(workers, len(missing)), mp_context=mp.get_context("spawn")) as pool:
                for future in [pool.submit(_train_job, *a) for a in args]:
                    future.result()
        else:
            from tqdm.auto import tqdm

            for job in tqdm(missing, desc="fuser hub", disable=not missing):
                self.get_or_train(
                    load(job.receiver),
                    load(job.sender),
                    records,
                    variant=job.variant,
                    train_config=train_config,
                    kind=job.kind,
                    **job.options,
                )
        return [self.key(j.sender, j.receiver, j.variant) for j in missing]

    def summary(self):
        """One row per stored fuser: pair, parameters, layer map, aligner, loss, gain."""
        import pandas as pd

        cols = ["sender", "receiver", "variant", "parameters", "layer_map", "aligner", "hidden", "steps"]
        cols += ["final_loss", "heldout_gain"]
        rows = [{c: e.get(c) for c in cols} for e in self.index().values()]
        return pd.DataFrame(rows, columns=cols)


def _train_job(
    root: str,
    receiver_spec,
    sender_spec,
    job: FuserJob,
    records: list[Record],
    train_config: TrainConfig | None,
    cache_dir: str | None,
) -> str:
    """One :meth:`FuserHub.train_missing` job in a worker process (one torch thread)."""
    from .models import load_model

    torch.set_num_threads(1)
    receiver, sender = load_model(receiver_spec, cache_dir), load_model(sender_spec, cache_dir)
    FuserHub(root).get_or_train(
        receiver, sender, records, variant=job.variant, train_config=train_config, kind=job.kind, **job.options
    )
    return FuserHub.key(job.sender, job.receiver, job.variant)
