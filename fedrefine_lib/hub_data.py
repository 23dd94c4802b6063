"""Data sources of a profile: local files, hub data sets fetched once, validation splits.

A profile's ``data:`` block names each source (``chat_train``, ``mcq_train``, ``mcq_val``,
``mcq_test``, ...) as a local JSONL/Parquet file or as a hub data set id. Hub sets are read
with ``datasets.load_dataset`` (split from the key: ``*_train`` -> ``train``, ``*_test`` ->
``test``; the MCQ configuration from ``data.mcq_config``; ``chat_train_limit`` records
streamed, not the whole set) and written once, rows in the hub's own schema, as JSONL under
``data/<profile>/hub/``, where :mod:`fedrefine_lib.data` parses them like any local file:

* teknium/OpenHermes-2.5: ``{"conversations": [{"from": "system"|"human"|"gpt", "value"}]}``;
* allenai/openbookqa: ``id``, ``question_stem``, ``choices{text,label}``, ``answerKey``
  (configuration ``additional`` adds ``fact1``, the oracle's supporting fact).

Overrides, for a machine without the hub: ``data.local`` maps a key to a file in the hub's
schema (relative paths from the repository root), or is one directory holding
``<key>.jsonl`` files (``tests/fixtures/paper/`` shows the schemas). A validation split
may be carved from a training split, deterministically, never from test:
``mcq_val: {carve: mcq_train, size: 500, seed: 0}``.

    python -m fedrefine_lib.hub_data --profile paper    # fetch once, where the hub is reachable
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .data import FROM_OF, ROLE_OF, write_jsonl
from .models import REPO_ROOT, load_profile

SPLIT_OF = {"train": "train", "val": "validation", "test": "test"}
"""A data key's last part (``mcq_train`` -> ``train``) -> the hub split it reads."""


class HubDataUnavailableError(OSError):
    """A hub data set cannot be read (offline, unreachable) and no local file replaces it."""


def is_hub_id(source: str) -> bool:
    """``owner/name`` that is not a path (``./x/y``, ``/x/y``, ``x/y/z``, ``x/y.jsonl`` and existing ones are)."""
    path_like = source.startswith((".", "/", "~")) or source.endswith((".jsonl", ".json", ".parquet"))
    return source.count("/") == 1 and not path_like and not Path(source).exists()


def hub_split(key: str) -> str:
    """The hub split a data key reads (``chat_train`` -> ``train``)."""
    part = key.rsplit("_", 1)[-1]
    if part not in SPLIT_OF:
        raise ValueError(f"Data key {key!r} names no split; end it in one of {sorted(SPLIT_OF)} (e.g. mcq_test).")
    return SPLIT_OF[part]


def local_override(sources: Mapping[str, Any], key: str) -> Path | None:
    """The file ``data.local`` names for ``key`` (a map, or a directory of ``<key>.jsonl``), if any."""
    local = sources.get("local")
    if not local:
        return None
    if isinstance(local, str):
        folder = _from_repo(local)
        if not folder.is_dir():
            raise FileNotFoundError(
                f"data.local names the directory {folder}, which does not exist. Point it at a directory of "
                "<key>.jsonl files in the hub data sets' schemas (see tests/fixtures/paper/)."
            )
        path = folder / f"{key}.jsonl"
        return path if path.is_file() else None  # keys it lacks come from their named source
    if not isinstance(local, Mapping):
        raise ValueError(f"data.local must be a directory or a map of data keys to files, got {local!r}.")
    if key not in local:
        return None
    path = _from_repo(str(local[key]))
    if not path.is_file():
        raise FileNotFoundError(
            f"data.local.{key} names {path}, which does not exist. Point it at a JSONL file in the hub "
            "data set's schema (see tests/fixtures/paper/), or drop it to read the hub."
        )
    return path


def _from_repo(path: str) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else REPO_ROOT / p


def source_file(sources: Mapping[str, Any], key: str, cache: Path) -> Path:
    """The local file holding data source ``key``: ``data.local``'s, the named file, or the hub
    set's export under ``cache`` (fetched on first use).

    Raises:
        FileNotFoundError: a named local file is missing.
        HubDataUnavailableError: a hub set that cannot be fetched and has no local override.
    """
    local = local_override(sources, key)
    if local is not None:
        return local
    source = str(sources[key])
    if Path(source).exists():
        return Path(source)
    if not is_hub_id(source):
        raise FileNotFoundError(f"Data file {source} does not exist. Build the world first or fix the profile config.")
    config = sources.get("mcq_config") if key.startswith("mcq") else None
    limit = sources.get("chat_train_limit") if key == "chat_train" else None
    return fetch(source, hub_split(key), cache, config=config, limit=limit, key=key)


def export_name(dataset: str, split: str, config: str | None = None, limit: int | None = None) -> str:
    """The export's file name, e.g. ``allenai--openbookqa.additional.test.jsonl``."""
    parts = [dataset.replace("/", "--"), config, split, f"first{limit}" if limit else None]
    return ".".join(p for p in parts if p) + ".jsonl"


def fetch(
    dataset: str,
    split: str,
    cache: Path,
    config: str | None = None,
    limit: int | None = None,
    key: str = "data",
) -> Path:
    """Fetch ``dataset`` (its ``split``, the first ``limit`` rows) once with
    ``datasets.load_dataset`` and write it under ``cache`` as JSONL in its own schema."""
    out = Path(cache) / export_name(dataset, split, config, limit)
    if out.is_file():
        return out
    try:
        from datasets import load_dataset
        from datasets.exceptions import DatasetsError
    except ImportError as err:  # pragma: no cover - a dependency of the project
        raise HubDataUnavailableError(f"{err}; install the project (`make venv`).") from err
    try:
        rows = load_dataset(dataset, config, split=split, streaming=limit is not None)
        rows = [_plain(r) for r in (itertools.islice(rows, limit) if limit else rows)]
    except (OSError, DatasetsError, ValueError) as err:
        offline = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_DATASETS_OFFLINE")
        raise HubDataUnavailableError(
            f"Data source {key!r}: hub data set {dataset!r} (config {config}, split {split!r}) cannot be read: "
            f"{str(err).splitlines()[0] if str(err) else type(err).__name__}"
            + (" (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set)" if offline else "")
            + f", and no local file replaces it. Fix: fetch it once where the hub is reachable "
            f"(`python -m fedrefine_lib.hub_data --profile <profile>`, then copy {out.parent}), or name a "
            f"local file in the same schema under `data: {{local: {{{key}: PATH}}}}` in the profile "
            "(tests/fixtures/paper/ shows the schemas)."
        ) from err
    if key.startswith("chat"):
        rows, dropped = _usable_chats(rows)
        if dropped:
            print(f"{dataset}: {dropped} of {len(rows) + dropped} records dropped (not ending in a 'gpt' turn)")
    tmp = write_jsonl(rows, out.with_suffix(".tmp"))
    tmp.replace(out)  # atomic: an interrupted fetch leaves no half file behind
    return out


def _plain(row: Mapping[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(dict(row), default=str))


def _usable_chats(rows: list[dict]) -> tuple[list[dict], int]:
    """Records whose turns all have known roles and whose last turn is the assistant's."""

    def ok(row: dict) -> bool:
        conv = row.get("conversations") or []
        return (
            bool(conv) and all(t.get("from") in ROLE_OF for t in conv) and conv[-1].get("from") == FROM_OF["assistant"]
        )

    kept = [r for r in rows if ok(r)]
    return kept, len(rows) - len(kept)


def carve(items: list[dict], size: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Split ``items`` into (rest, validation): ``size`` items drawn with ``seed``, both in file order."""
    if not 0 < size < len(items):
        raise ValueError(f"A validation split of {size} items needs more than {size} training items; got {len(items)}.")
    chosen = set(random.Random(seed).sample(range(len(items)), size))
    return [it for i, it in enumerate(items) if i not in chosen], [it for i, it in enumerate(items) if i in chosen]


def carve_spec(sources: Mapping[str, Any], key: str) -> dict[str, Any] | None:
    """``{"carve": <training key>, "size": int, "seed": int}`` when ``key`` is carved, else None."""
    spec = sources.get(key)
    if not isinstance(spec, Mapping):
        return None
    if set(spec) - {"carve", "size", "seed"} or "carve" not in spec or "size" not in spec:
        raise ValueError(
            f"data.{key} must be a file, a hub id, or {{carve: <train key>, size: N, seed: S}}; got {spec!r}."
        )
    if hub_split(spec["carve"]) != "train":
        raise ValueError(
            f"data.{key} is carved from {spec['carve']!r}; carve validation items from a training split only."
        )
    return {"seed": 0, **spec}


def carved_from(sources: Mapping[str, Any], key: str) -> list[dict[str, Any]]:
    """The carve specs of the splits carved from training source ``key``."""
    specs = [carve_spec(sources, k) for k, v in sources.items() if k != "local" and isinstance(v, Mapping)]
    return [s for s in specs if s and s["carve"] == key]


def fetch_profile(sources: Mapping[str, Any], cache: Path, keys: Iterable[str] | None = None) -> dict[str, Path]:
    """Every hub source of a ``data:`` block (or ``keys``) as its local file."""
    keys = keys or [k for k, v in sources.items() if isinstance(v, str) and k.rsplit("_", 1)[-1] in SPLIT_OF]
    return {key: source_file(sources, key, cache) for key in keys}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Fetch a profile's hub data sets once, as JSONL in their schemas.")
    parser.add_argument("--profile", default="paper")
    parser.add_argument("--data-dir", default=str(REPO_ROOT / "data"))
    args = parser.parse_args(argv)
    profile = load_profile(args.profile)
    for key, path in fetch_profile(
        profile.settings.get("data", {}), Path(args.data_dir) / profile.name / "hub"
    ).items():
        print(f"{key}: {path}")


if __name__ == "__main__":
    main()
