"""Building (once) and loading the ``mini`` world.

``build_world(seed)`` writes everything under ``root/<seed>/`` (non-default configs
under ``root/<seed>-<config hash>/``): facts, chat records and MCQ files (hub
schemas), the two tokenizers and the five models (``save_pretrained``, safetensors),
and ``manifest.json`` (config, hashes, build times). A later call with the same seed
and config loads from there; a changed config or world version rebuilds.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import shutil
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ..data import write_jsonl
from .config import WorldConfig
from .corpus import tokenizer_texts
from .knowledge import DOMAINS, make_knowledge
from .models import RECEIVER, SENDERS, mini_models
from .pretrain import pretrain_model
from .records import chat_records, mcq_items, pair_domains, pair_items
from .tokenization import train_tokenizer

#: Bump when the world's generation code changes in a way that changes its files.
WORLD_VERSION = 12
DATA_FILES = (
    "facts.jsonl",
    "chat_train.jsonl",
    "mcq_val.jsonl",
    "mcq_test.jsonl",
    "mcq_pair_val.jsonl",
    "mcq_pair_test.jsonl",
)


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class World:
    """A built ``mini`` world on disk (see :func:`build_world`)."""

    root: Path
    manifest: dict = field(repr=False)

    @property
    def seed(self) -> int:
        return self.manifest["seed"]

    @property
    def config(self) -> WorldConfig:
        return WorldConfig.from_dict(self.manifest["config"])

    @property
    def domains(self) -> list[str]:
        return list(self.manifest["domains"])

    @property
    def receiver(self) -> str:
        return self.manifest["receiver"]

    @property
    def senders(self) -> list[str]:
        return list(self.manifest["senders"])

    @property
    def models(self) -> list[str]:
        return [self.receiver, *self.senders]

    @property
    def knows(self) -> dict[str, list[str]]:
        """Model name -> domains it was pretrained on."""
        return {k: list(v) for k, v in self.manifest["knows"].items()}

    def model_dir(self, name: str) -> Path:
        """Directory loadable by ``AutoModelForCausalLM`` and ``AutoTokenizer``."""
        if name not in self.manifest["knows"]:
            raise KeyError(f"No model {name!r} in the mini world; models: {self.models}.")
        return self.root / "models" / name

    def tokenizer_dir(self, family: str) -> Path:
        return self.root / "tokenizers" / family

    @property
    def facts_path(self) -> Path:
        return self.root / "facts.jsonl"

    @property
    def chat_train_path(self) -> Path:
        return self.root / "chat_train.jsonl"

    @property
    def mcq_val_path(self) -> Path:
        return self.root / "mcq_val.jsonl"

    @property
    def mcq_test_path(self) -> Path:
        return self.root / "mcq_test.jsonl"

    def mcq_path(self, split: str) -> Path:
        """The MCQ file of ``split``: ``val``, ``test``, ``pair_val`` or ``pair_test``."""
        path = self.root / f"mcq_{split}.jsonl"
        if path.name not in DATA_FILES:
            raise KeyError(f"No MCQ split {split!r} in the mini world; use val, test, pair_val or pair_test.")
        return path

    @property
    def users(self) -> list[str]:
        """The user names queries carry as private information."""
        return list(self.manifest.get("users", []))

    def facts(self) -> list[dict]:
        """Every fact (``fact_id, domain, split, entity, relation, value``)."""
        return [json.loads(line) for line in self.facts_path.read_text().splitlines() if line]


def world_dir(seed: int, config: WorldConfig, root: str | Path) -> Path:
    """``root/<seed>`` for the default config, else ``root/<seed>-<config hash>``."""
    return Path(root) / (str(seed) if config.is_default else f"{seed}-{config.hash()}")


def _cache_key(seed: int, config: WorldConfig) -> dict:
    return {"seed": seed, "config_hash": config.hash(), "world_version": WORLD_VERSION}


def load_world(path: str | Path) -> World:
    """Load a complete world directory (raises if the build never finished)."""
    path = Path(path)
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(
            f"{path} holds no finished mini world (no manifest.json); "
            "run fedrefine_lib.world.build_world(seed) to build it."
        )
    return World(path, json.loads(manifest_path.read_text()))


def build_world(
    seed: int = 0,
    config: WorldConfig | None = None,
    root: str | Path = "data/mini",
    progress: bool = True,
    force: bool = False,
) -> World:
    """Build the ``mini`` world for ``seed`` (or load it from the cache).

    Args:
        seed: every random choice derives from it; same seed and config, same bytes.
        config: sizes and budgets (default :class:`WorldConfig`; ``WorldConfig.smoke()``
            for tests).
        root: cache root; the world goes to :func:`world_dir`.
        progress: show tqdm bars and per-model times.
        force: rebuild even if a matching cache exists.

    A finished world that is replaced (another version or config, or ``force``) is moved
    aside, not deleted.
    """
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"build_world(seed={seed!r}): the seed is an int (e.g. 0), not {type(seed).__name__}.")
    config = config or WorldConfig()
    out = world_dir(seed, config, root)
    if not force and (out / "manifest.json").is_file():
        world = load_world(out)
        if all(world.manifest.get(k) == v for k, v in _cache_key(seed, config).items()):
            return world
    _clear(out)
    out.mkdir(parents=True)
    t0 = time.time()
    knowledge = make_knowledge(seed, config.entities, config.users)
    specs = mini_models(config.model_scale)
    pairs = pair_domains({n: s.domains for n, s in specs.items()}, RECEIVER)
    write_jsonl([f.to_dict() for f in knowledge.facts], out / "facts.jsonl")
    records = chat_records(
        knowledge, seed, config.chat_variants, config.filler_records, config.private_share, (pairs, config.pair_items)
    )
    write_jsonl(records, out / "chat_train.jsonl")
    for split in ("val", "test"):
        facts = knowledge.select(splits=(split,))
        write_jsonl(mcq_items(facts, seed, split, knowledge.users), out / f"mcq_{split}.jsonl")
        write_jsonl(pair_items(knowledge, split, seed, pairs, config.pair_items), out / f"mcq_pair_{split}.jsonl")
    texts, prompts = tokenizer_texts(knowledge, config, seed)
    for family, size in (("qwen", config.qwen_vocab), ("llama", config.llama_vocab)):
        train_tokenizer(family, texts, prompts, size).save_pretrained(out / "tokenizers" / family)
    data_seconds = time.time() - t0
    logs = _pretrain_all(seed, config, out, progress)
    manifest = {
        **_cache_key(seed, config),
        "config": config.to_dict(),
        "domains": list(DOMAINS),
        "receiver": RECEIVER,
        "senders": list(SENDERS),
        "knows": {n: list(s.domains) for n, s in specs.items()},
        "users": list(knowledge.users),
        "pair_domains": [list(p) for p in pairs],
        "models": {n: _model_info(specs[n], out / "models" / n, logs[n]) for n in specs},
        "files": {f: sha256_file(out / f) for f in DATA_FILES},
        "counts": {
            "facts": len(knowledge.facts),
            **{f[: -len(".jsonl")]: _count_lines(out / f) for f in DATA_FILES[1:]},
        },
        "seconds": {
            "data_and_tokenizers": round(data_seconds, 1),
            "models": {n: logs[n]["seconds"] for n in specs},
            "total": round(time.time() - t0, 1),
        },
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
    short = [n for n, log in logs.items() if log["phase2_step"] is None]
    if short:
        warnings.warn(
            f"mini world (seed {seed}): {short} never reached phase1_accuracy={config.phase1_accuracy} on "
            "validation within their step cap, so they never trained notes, private prefixes or two-fact "
            "questions; world.json's acceptance block lists them (phase1_only). Try another seed or a larger "
            "max_steps for them.",
            stacklevel=2,
        )
    if progress:
        print(
            f"mini world (seed {seed}) built in {manifest['seconds']['total']:.0f} s at {out}; "
            + ", ".join(f"{n} {s:.0f} s" for n, s in manifest["seconds"]["models"].items())
        )
    return World(out, manifest)


def _clear(out: Path) -> None:
    """Make room for a build at ``out``: a finished world (another version or config, or
    ``force``) is moved aside to ``.<name>.replaced-<time>`` beside it, never deleted; an
    unfinished build (no manifest) is removed."""
    if (out / "manifest.json").is_file():
        aside = out.parent / f".{out.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
        out.rename(aside)
        warnings.warn(f"The mini world at {out} is being rebuilt; the previous one is kept at {aside}.", stacklevel=3)
    elif out.exists():
        shutil.rmtree(out)


def _count_lines(path: Path) -> int:
    return sum(1 for line in path.read_text().splitlines() if line)


def _model_info(spec, path: Path, log: dict) -> dict:
    config = json.loads((path / "config.json").read_text())
    return {
        "architecture": config["architectures"][0],
        "tokenizer": spec.tokenizer,
        "domains": list(spec.domains),
        "parameters": log["parameters"],
        "layers": spec.layers,
        "hidden": spec.hidden,
        "heads": spec.heads,
        "kv_heads": spec.kv_heads,
        "head_dim": spec.head_dim,
        "vocab_size": config["vocab_size"],
        "paper_model": spec.paper_id,
        "steps": log["steps"],
        "early_stopped": log["early_stopped"],
        "restored_step": log.get("restored_step"),
        "seconds": log["seconds"],
        "final": log["final"],
        "weights_sha256": sha256_file(path / "model.safetensors"),
    }


def _pretrain_all(seed: int, config: WorldConfig, out: Path, progress: bool) -> dict[str, dict]:
    """Pretrain the five models, ``config.workers`` at a time (one thread each),
    longest jobs first: a model with a note target (the receiver, which learns notes
    last and longest), then by step cap x width x depth x domains known. The order only
    schedules the work; every model's weights are the same in any order."""
    specs = mini_models(config.model_scale)
    order = sorted(
        specs,
        key=lambda n: (
            n not in config.note_accuracy,
            -config.max_steps[n] * specs[n].hidden * specs[n].layers * len(specs[n].domains),
        ),
    )
    jobs = {
        n: dict(
            name=n,
            seed=seed,
            config=config.to_dict(),
            tokenizer_dir=str(out / "tokenizers" / specs[n].tokenizer),
            out_dir=str(out / "models" / n),
            position=i % max(1, config.workers),
            progress=progress,
        )
        for i, n in enumerate(order)
    }
    if config.workers <= 1:
        import torch

        threads = torch.get_num_threads()
        try:
            return {n: pretrain_model(**jobs[n]) for n in order}
        finally:
            torch.set_num_threads(threads)
    with ProcessPoolExecutor(config.workers, mp_context=mp.get_context("spawn")) as pool:
        futures = {n: pool.submit(pretrain_model, **jobs[n]) for n in order}
        return {n: futures[n].result() for n in order}
