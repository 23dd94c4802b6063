"""The fuser hub: the server's store of every fuser F_ij (sender i -> receiver j).

Layout on disk::

    <root>/index.json                       # one entry per stored fuser
    <root>/<sender>--<receiver>/<variant>/  # fuser.safetensors, fuser_config.json,
                                            # train.json (loss curve, configs, data hash)

``variant`` names a recipe of the same pair (``"default"``, or ablations such as
``"reencode"``). A stored fuser is reused only while the recipe that made it is unchanged
(fuser config, training config, training data hash, both models' fingerprints: weights,
tokenizer, chat template, and the fingerprint of the world the models come from); otherwise
it is retrained, and the fuser of the other recipe is kept aside (``.<variant>.replaced-*``).

Concurrent and interrupted runs cannot corrupt the hub (:mod:`.store`): a pair's directory is
written to a staging directory and published whole; one trainer of a pair at a time (a second
waits, then reuses the result); readers hold a shared lock and get a fuser whose config is the
one its recipe names; a corrupt or incomplete pair is moved aside with a warning and retrained.
Names are single path components, so nothing is written outside the root. Recipes, jobs and
ablations (:func:`recipe`, :class:`FuserJob`, :func:`ablation_jobs`) live in :mod:`.jobs`.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from .fuser import Fuser, FuserConfig, FuserLoadError, MissingFuserFileError, build_fuser, load_fuser
from .jobs import (
    ABLATIONS,
    BLOCK_ONLY_OPTIONS,
    FuserJob,
    ablation_jobs,
    as_json,
    check_ablations,
    default_variant,
    recipe,
    records_hash,
)
from .prompts import Record
from .ranks import first_rank_locked, from_first_rank, launch_state
from .store import check_name, lock_path, locked, publish, quarantine, reading, staging_dir
from .train import TrainConfig, TrainResult, train_fuser

INDEX_FILE = "index.json"
LOCK_FILE = ".index.lock"
TRAIN_FILE = "train.json"
__all__ = [
    "ABLATIONS", "BLOCK_ONLY_OPTIONS", "FuserHub", "FuserJob", "MissingFuserError", "ablation_jobs",
    "check_ablations", "default_variant", "recipe", "records_hash",
]  # fmt: skip


_RETRAIN = "FuserHub.get_or_train moves the pair aside and trains it again (or remove its directory)."


class MissingFuserError(KeyError):
    """The hub holds no fuser for a requested ordered pair."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0])


class FuserHub:
    """All fusers of a set of models, one directory per ordered pair and variant."""

    def __init__(self, root: str | Path, world: str | None = None):
        """``world``: fingerprint of the world config the models and data come from (e.g.
        ``study.Study.world_fingerprint``), part of every recipe this hub makes, so the fusers
        of one world config are never reused for another."""
        self.root = Path(root)
        self.world = world
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
                "aside (or delete it): get_or_train and train_missing then list each stored fuser again when it "
                "is asked for, without retraining it."
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
        except FuserLoadError:
            return False
        return recipe is None or stored == as_json(recipe)

    # ----------------------------------------------------------------- get / put

    def get(self, sender, receiver, variant: str = "default") -> Fuser:
        """F_{sender->receiver}. ``sender``/``receiver`` are names or ``LoadedModel``s (then
        the pair is checked strictly against the models).

        Raises:
            MissingFuserError (not in the index), FuserLoadError (the pair's files are
            missing, corrupt, or do not match each other; the error names the file).
        """
        s_name, r_name = getattr(sender, "name", sender), getattr(receiver, "name", receiver)
        if self.key(s_name, r_name, variant) not in self.index():
            stored = sorted(self.index())
            raise MissingFuserError(
                f"The hub at {self.root} has no fuser {self.key(s_name, r_name, variant)} "
                f"(sender {s_name!r} -> receiver {r_name!r}). Stored: {stored or 'none'}. "
                "Train it with FuserHub.train_missing(...) or FuserHub.get_or_train(...)."
            )
        loaded = self._load(sender, receiver, variant)
        assert loaded is not None  # no recipe asked for
        return loaded[0]

    def _load(self, sender, receiver, variant: str, recipe: dict | None = None) -> tuple[Fuser, dict] | None:
        """The pair's fuser and training record, read under one shared lock (never half of a
        publication, never one publication's weights with another's record); None when
        ``recipe`` is given and the stored one differs."""
        s_name, r_name = getattr(sender, "name", sender), getattr(receiver, "name", receiver)
        models = (receiver, sender) if hasattr(sender, "model") and hasattr(receiver, "model") else (None, None)
        directory = self.pair_dir(s_name, r_name, variant)
        with reading(directory):  # never half of a publication
            record = self._record(directory)
            if recipe is not None and record.get("recipe") != as_json(recipe):
                return None
            try:
                fuser = load_fuser(directory, *models)
            except FuserLoadError as err:
                raise type(err)(f"{err} (Hub pair {self.key(s_name, r_name, variant)}: {_RETRAIN})") from err
        made_by = record.get("recipe", {}).get("fuser")
        if made_by is not None and made_by != as_json(fuser.config.to_dict()):
            raise FuserLoadError(
                f"{directory}: the fuser's config differs from the recipe in its {TRAIN_FILE} (files of two "
                f"different runs). {_RETRAIN}"
            )
        return fuser, record

    def _record(self, directory: Path) -> dict[str, Any]:
        """A pair's ``train.json``, or FuserLoadError naming the file, the cause and the fix."""
        path = directory / TRAIN_FILE
        try:
            record = json.loads(path.read_text())
        except FileNotFoundError as err:
            raise MissingFuserFileError(
                f"{path} is missing: the hub's index lists this pair but its directory is incomplete. {_RETRAIN}"
            ) from err
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise FuserLoadError(
                f"Corrupt {path}: not valid JSON ({err}; cut short by an interrupted write?). {_RETRAIN}"
            ) from err
        if not isinstance(record, dict):
            raise FuserLoadError(f"Corrupt {path}: not a JSON object. {_RETRAIN}")
        return record

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
        """The stored training record (loss curve, configs, recipe) of a fuser (FuserLoadError
        when it is missing or corrupt)."""
        directory = self.pair_dir(sender, receiver, variant)
        with reading(directory):  # never half of a publication
            return self._record(directory)

    def put(
        self, fuser: Fuser, result: TrainResult, recipe: dict[str, Any], variant: str = "default", **extra: Any
    ) -> Path:
        """Store a trained fuser with its training record (published whole, see :mod:`.store`)
        and add it to the index."""
        c = fuser.config
        directory = self.pair_dir(c.sender_name, c.receiver_name, variant)
        record = {**result.to_dict(), "recipe": recipe}
        staging = staging_dir(directory)
        try:
            fuser.save_pretrained(staging)
            (staging / TRAIN_FILE).write_text(json.dumps(record, indent=2) + "\n")
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)  # nothing half-written stays behind
            raise

        def index_it() -> None:
            self._index_entry(fuser, record, variant, **extra)

        def other_recipe(old: Path) -> bool:  # a fuser of another recipe is kept aside, not deleted
            try:
                return json.loads((old / TRAIN_FILE).read_text()).get("recipe") != as_json(recipe)
            except (OSError, ValueError, AttributeError):
                return True

        publish(staging, directory, then=index_it, keep=other_recipe)  # weights and index entry change together
        return directory

    def _index_entry(self, fuser: Fuser, record: dict[str, Any], variant: str, **extra: Any) -> None:
        """Write a stored fuser's index entry from the fuser and its training record."""
        c, losses = fuser.config, record.get("losses") or [float("nan")]
        tail = losses[-max(1, len(losses) // 10) :]
        entry = {
            "sender": c.sender_name,
            "receiver": c.receiver_name,
            "variant": variant,
            "path": str(self.pair_dir(c.sender_name, c.receiver_name, variant).relative_to(self.root)),
            "parameters": fuser.num_parameters(),
            "layer_map": c.layer_map_kind,
            "aligner": c.aligner,
            "hidden": c.hidden,
            "final_loss": sum(tail) / len(tail),
            "steps": record.get("steps"),
            "recipe": record.get("recipe"),
            **extra,
        }
        with self._updating_index() as index:
            index[self.key(c.sender_name, c.receiver_name, variant)] = entry

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
        ranks = launch_state(train_config.cpu)  # every rank of a launch trains; the first locks, writes
        with first_rank_locked(lock_path(directory, "train"), ranks):  # one trainer per pair; the next reuses it
            stored = self._reusable(sender, receiver, variant, wanted) if ranks.is_main_process else None
            if from_first_rank(stored is not None, ranks):  # every rank decides alike
                return stored if ranks.is_main_process else self._load(sender, receiver, variant, wanted)
            torch.manual_seed(train_config.seed)  # the fuser's initial weights are part of the recipe
            fuser = build_fuser(config)
            result = train_fuser(
                receiver, sender, fuser, records, replace(train_config, loss_curve_path=None), aligner=config.aligner
            )
            if ranks.is_main_process:
                self.put(fuser.eval(), result, wanted, variant)
            ranks.wait_for_everyone()
            stored = self._load(sender, receiver, variant, wanted)
            assert stored is not None  # just published, under this pair's training lock
            return stored

    def _reusable(self, sender, receiver, variant: str, wanted: dict[str, Any]) -> tuple[Fuser, dict] | None:
        """The stored fuser of recipe ``wanted``, or None (a corrupt one is quarantined)."""
        if not self.pair_dir(sender.name, receiver.name, variant).exists():
            return None
        try:
            stored = self._load(sender, receiver, variant, wanted)
        except FuserLoadError as err:  # corrupt or incomplete: set aside, train again
            quarantine(self.pair_dir(sender.name, receiver.name, variant), f"{type(err).__name__}: {err}")
            return None
        entry = self.index().get(self.key(sender.name, receiver.name, variant), {})
        if stored is not None and entry.get("recipe") != stored[1]["recipe"]:  # a writer died before its
            self._index_entry(stored[0], stored[1], variant)  # index update: redo it
        return stored

    def recipe_for(
        self,
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
        return recipe(config, train_config or TrainConfig(), records_hash(records), models, self.world)

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
                    self.world,
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
    world: str | None = None,
) -> str:
    """One :meth:`FuserHub.train_missing` job in a worker process (one torch thread)."""
    from .models import load_model

    torch.set_num_threads(1)
    receiver, sender = load_model(receiver_spec, cache_dir), load_model(sender_spec, cache_dir)
    FuserHub(root, world).get_or_train(
        receiver, sender, records, variant=job.variant, train_config=train_config, kind=job.kind, **job.options
    )
    return FuserHub.key(job.sender, job.receiver, job.variant)
