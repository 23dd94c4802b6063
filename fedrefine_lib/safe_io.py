"""Saving modules as safetensors + JSON (never pickle), with a checksum for strict loading."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch


def sha256(path: Path) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_module(module: torch.nn.Module, directory: str | Path, weights_file: str, config_file: str,
                meta: dict[str, Any]) -> Path:
    """Write ``module``'s state dict to ``directory/weights_file`` and ``meta`` (plus the tensor
    shapes and the weights' sha256) to ``directory/config_file``."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(directory / weights_file), metadata={"format": "pt"})
    meta = {**meta, "tensors": {k: list(v.shape) for k, v in state.items()},
            "sha256": sha256(directory / weights_file)}
    (directory / config_file).write_text(json.dumps(meta, indent=2))
    return directory
