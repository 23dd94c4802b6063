"""Saving and loading modules as safetensors + JSON (never pickle), strictly.

A saved module is a directory with ``<weights_file>`` (safetensors) and ``<config_file>``
(JSON: the caller's metadata plus ``tensors``, every tensor's shape, ``sha256``, the weights
file's checksum, and ``config_sha256``, the checksum of everything else in the JSON).
:func:`load_module` checks, in order: both files present, the config's checksum (an edited
layer map, kind or width is refused), the JSON parses into the caller's config, the format
version, the caller's own check (e.g. the model pair), the weights' checksum, that the
weights file's header lists exactly the tensors and shapes the config implies (worked out on
the ``meta`` device, before anything is allocated), and that every weight is finite. Saving
refuses non-finite weights. Every failure says what differs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file


class LoadError(ValueError):
    """A saved module cannot be loaded as asked (the message says what differs)."""


class MissingFileError(LoadError, FileNotFoundError):
    """A file of the saved module is missing."""


def sha256(path: Path) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_module(
    module: torch.nn.Module, directory: str | Path, weights_file: str, config_file: str, meta: dict[str, Any]
) -> Path:
    """Write ``module``'s state dict to ``directory/weights_file`` and ``meta`` (plus the tensor
    shapes and the weights' sha256) to ``directory/config_file``."""
    directory = Path(directory)
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    bad = sorted(k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all()))
    if bad:
        raise ValueError(f"Not saving to {directory}: tensors {bad} hold NaN or inf (training diverged?).")
    directory.mkdir(parents=True, exist_ok=True)
    save_file(state, str(directory / weights_file), metadata={"format": "pt"})
    meta = {**meta, "tensors": {k: list(v.shape) for k, v in state.items()}, "sha256": sha256(directory / weights_file)}
    meta["config_sha256"] = config_digest(meta)
    (directory / config_file).write_text(json.dumps(meta, indent=2))
    return directory


def config_digest(meta: dict[str, Any]) -> str:
    """Hex sha256 of a saved config's JSON without its own ``config_sha256``."""
    body = {k: v for k, v in meta.items() if k != "config_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def strict_config(cls: type, meta: dict[str, Any]) -> Any:
    """``cls(**meta["config"])`` (``cls`` a dataclass) with every field present and no other: a
    missing key would silently take its default (ValueError naming the keys)."""
    config = meta.get("config")
    if not isinstance(config, dict):
        raise ValueError("it has no 'config' object")
    names = [f.name for f in dataclasses.fields(cls)]
    if missing := [n for n in names if n not in config]:
        raise ValueError(f"config lacks {missing}")
    if extra := sorted(set(config) - set(names)):
        raise ValueError(f"config has unknown keys {extra}")
    return cls(**config)


def header_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a safetensors file's header (nothing else is read)."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        if not 0 < size <= 100_000_000:
            raise ValueError(f"header length {size} is not that of a safetensors file")
        header = json.loads(f.read(size))
    return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}


def load_module(
    directory: str | Path,
    weights_file: str,
    config_file: str,
    *,
    format_version: int,
    parse: Callable[[dict[str, Any]], Any],
    build: Callable[[Any], torch.nn.Module],
    check: Callable[[Any], None] | None = None,
    what: str = "module",
    error: type[LoadError] = LoadError,
    missing: type[LoadError] = MissingFileError,
) -> torch.nn.Module:
    """Load a module saved by :func:`save_module`, strictly, in eval mode.

    Args:
        parse: the saved JSON -> the module's config (KeyError, TypeError or ValueError: corrupt).
        build: config -> a fresh module with the expected tensors.
        check: config -> None, raising if the module does not fit what the caller has
            (e.g. the model pair); runs before the weights are read.
        what: the module's name in messages (``"fuser"``, ``"gate"``).
        error, missing: the exception classes raised (a corrupt or mismatching module; a
            missing file).
    """
    directory = Path(directory)
    for name in (config_file, weights_file):
        if not (directory / name).is_file():
            raise missing(f"No {name} in {directory}: not a saved {what} (save one with save_pretrained).")
    fix = f"Re-save or retrain the {what}."
    try:
        meta = json.loads((directory / config_file).read_text())
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
        if meta.get("config_sha256") != config_digest(meta):
            raise ValueError(
                "its config_sha256 does not match its contents (edited after saving, or saved by an older version)"
            )
        config = parse(meta)
    except json.JSONDecodeError as e:
        raise error(
            f"Corrupt {directory / config_file}: not valid JSON ({e}; cut short by an interrupted write?). {fix}"
        ) from e
    except (KeyError, TypeError, ValueError) as e:
        raise error(f"Corrupt {directory / config_file}: {e}. {fix}") from e
    if meta.get("format_version") != format_version:
        raise error(
            f"{directory / config_file} has format_version {meta.get('format_version')}, "
            f"this library reads {format_version}. {fix}"
        )
    if check is not None:
        check(config)
    digest = sha256(directory / weights_file)
    if meta.get("sha256") != digest:
        raise error(
            f"Corrupt {directory / weights_file}: sha256 {digest[:12]}... differs from the "
            f"{str(meta.get('sha256'))[:12]}... recorded at save time. {fix}"
        )
    try:
        saved = header_shapes(directory / weights_file)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise error(f"Corrupt {directory / weights_file}: {e}. {fix}") from e
    with torch.device("meta"):  # the shapes the config implies, without allocating them
        expected = {k: tuple(v.shape) for k, v in build(config).state_dict().items()}
    missing_tensors = sorted(set(expected) - set(saved))
    extra = sorted(set(saved) - set(expected))
    reshaped = [
        f"{k}: saved {saved[k]}, expected {expected[k]}"
        for k in sorted(set(expected) & set(saved))
        if saved[k] != expected[k]
    ]
    if missing_tensors or extra or reshaped:
        parts = [
            f"missing tensors {missing_tensors}" if missing_tensors else "",
            f"unexpected tensors {extra}" if extra else "",
            f"wrong shapes {reshaped}" if reshaped else "",
        ]
        raise error(f"{directory / weights_file} does not match its config: " + "; ".join(p for p in parts if p) + ".")
    try:
        state = load_file(str(directory / weights_file))
    except Exception as e:  # safetensors raises its own error types
        raise error(f"Corrupt {directory / weights_file}: {e}. {fix}") from e
    bad = sorted(k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all()))
    if bad:
        raise error(f"{directory / weights_file}: tensors {bad} hold NaN or inf. {fix}")
    module = build(config)
    module.load_state_dict(state, strict=True)
    return module.eval()
