"""Fusers: project a sender's KV cache into a receiver's cache space (DESIGN §2).

``FuserConfig.kind`` picks one of three kinds, one per fusion mode of ``federation.FedRefine``.
``residual`` (:class:`ResidualFuser`, the reference C2C fuser), per receiver layer ``t``
(reading sender layer ``layer_map[t]``), separate weights for keys and values::

    h = FFN^depth(Linear([K_s ; K_r]))        # [B, N, hidden]; aligned, post-RoPE caches
    proj = Linear(FFN(h)) -> [B, N, Hr, Dr]  # projection branch (zero-initialised)
    w = Linear(FFN(h)) -> [B, N, Hr]          # weight branch
    K_out = K_r + g_K * sigmoid(w_K) * proj_K

``concat`` and ``prefix`` (:class:`BlockFuser`) read the sender cache alone and make a cache
*block* the receiver reads before its own cache (nothing aligned; the sender may read another
text): ``K_t = g_K * Linear(FFN(FFN^depth(Linear(K_s))))`` as ``[B, Hr, S, Dr]``. In ``concat``
only the receiver's last prompt token and answer read the block; in ``prefix`` its prompt is
prefilled on top of it. A projector learns to be read one way, so the kinds never mix.

FFN block: ``x + Dropout(W2 GELU(W1 RMSNorm(x)))``. The gate ``g`` is one logit per layer and
K/V, initialised at ``gate_init``: in training ``sigmoid((l + noise) / tau)`` with logistic
noise (binary Gumbel-softmax), ``tau`` annealed by the trainer; at inference ``1[l > threshold]``
or an override (:meth:`Fuser.set_gates`). A fresh residual fuser is an exact identity.
Saved as ``fuser.safetensors`` + ``fuser_config.json``; :func:`load_fuser` loads any kind strictly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedrefine_lib import kv as kvlib
from fedrefine_lib.align import get_aligner
from fedrefine_lib.align import layer_map as make_layer_map
from fedrefine_lib.kv import KVCache
from fedrefine_lib.safe_io import LoadError, load_module, save_module, strict_config

WEIGHTS_FILE = "fuser.safetensors"
CONFIG_FILE = "fuser_config.json"
FORMAT_VERSION = 1
KINDS = ("residual", "concat", "prefix")
"""Fuser kinds, one per fusion mode: ``residual`` (C2C), ``concat`` and ``prefix`` (blocks)."""


class FuserLoadError(LoadError):
    """A saved fuser cannot be loaded as asked (the message says what differs)."""


class PairMismatchError(FuserLoadError):
    """The fuser was trained for another receiver/sender pair."""


class MissingFuserFileError(FuserLoadError, FileNotFoundError):
    """A file of the saved fuser is missing."""


# --------------------------------------------------------------------------- config

PAIR_FIELDS = (
    "receiver_name", "sender_name", "receiver_layers", "sender_layers", "receiver_kv_heads",
    "sender_kv_heads", "receiver_head_dim", "sender_head_dim", "receiver_vocab", "sender_vocab",
)  # fmt: skip


def pair_info(receiver, sender) -> dict[str, Any]:
    """What identifies a (receiver, sender) pair of ``LoadedModel``-like objects
    (``.name``, ``.model``, ``.tokenizer``): names, layer counts, KV heads, head dims, vocab sizes."""
    info = {}
    for side, m in (("receiver", receiver), ("sender", sender)):
        values = (m.name, *kvlib.kv_shape(m.model.config), len(m.tokenizer))
        info |= {f"{side}_{k}": v for k, v in zip(("name", "layers", "kv_heads", "head_dim", "vocab"), values)}
    return info


def check_pair_info(saved: dict[str, Any], actual: dict[str, Any]) -> None:
    """Raise :class:`PairMismatchError` naming every pair field where ``saved`` != ``actual``."""
    diffs = [
        f"{k}: fuser has {saved.get(k)!r}, models have {actual[k]!r}" for k in PAIR_FIELDS if saved.get(k) != actual[k]
    ]
    if diffs:
        raise PairMismatchError(
            f"Fuser {saved.get('receiver_name')} <- {saved.get('sender_name')} does not fit the pair "
            f"{actual['receiver_name']} <- {actual['sender_name']}: "
            + "; ".join(diffs)
            + ". Load the fuser trained for this pair (or train one)."
        )


@dataclass
class FuserConfig:
    """Shape of a fuser, its kind and the pair it belongs to.

    Attributes:
        receiver_*/sender_*: the pair (names, layers, KV heads, head dims, vocab sizes).
        kind: ``residual`` (C2C), ``concat`` or ``prefix`` (see the module docstring).
        layer_map: sender layer read by each receiver layer (``receiver_layers`` entries).
        layer_map_kind: how ``layer_map`` was made (``align.layer_map`` kinds) or "custom".
        aligner: token aligner the fuser was trained with (residual fusion aligns tokens).
        hidden: width of the fuser MLPs (1024 in the paper; small for CPU).
        depth: FFN blocks in the shared trunk (each branch adds one more).
        ffn_mult: FFN inner width = ``ffn_mult * hidden`` (1 with hidden 1024: the reference's
            ~0.5 B parameters for Qwen3-0.6B <- Qwen2.5-0.5B). dropout: inside FFN blocks.
        gate_init: initial gate logit (reference: 0; positive starts with the gates mostly open).
        sender_positions: block kinds only: the sender sends the cache of its last ``n`` prompt
            positions (those that read the whole prompt); None sends all (residual: needs None).
    """

    receiver_name: str
    sender_name: str
    receiver_layers: int
    sender_layers: int
    receiver_kv_heads: int
    sender_kv_heads: int
    receiver_head_dim: int
    sender_head_dim: int
    receiver_vocab: int | None = None
    sender_vocab: int | None = None
    kind: str = "residual"
    layer_map: list[int] = field(default_factory=list)
    layer_map_kind: str = "top_down"
    aligner: str = "identity"
    hidden: int = 128
    depth: int = 1
    ffn_mult: int = 1
    dropout: float = 0.0
    gate_init: float = 0.0
    sender_positions: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Unknown fuser kind {self.kind!r}; use one of {KINDS}.")
        n = self.sender_positions
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(
                f"sender_positions={n!r}: give a whole number >= 1 of last prompt "
                "positions the sender sends, or None to send them all."
            )
        if n is not None and self.kind == "residual":
            raise ValueError(
                f"A residual fuser adds a residual on every receiver position aligned with the sender, so it "
                f"cannot take only the sender's last positions (sender_positions={n}); leave sender_positions "
                "None, or use a concat or prefix fuser (kind='concat')."
            )
        if not self.layer_map:
            self.layer_map = make_layer_map(self.receiver_layers, self.sender_layers, self.layer_map_kind)
        if len(self.layer_map) != self.receiver_layers or not all(0 <= i < self.sender_layers for i in self.layer_map):
            raise ValueError(
                f"layer_map {self.layer_map} must give one sender layer in [0, {self.sender_layers}) "
                f"for each of the {self.receiver_layers} receiver layers."
            )

    @classmethod
    def for_pair(cls, receiver, sender, *, kind: str = "residual", layer_map: str | list[int] = "top_down",
                 aligner: str | None = None, **sizes: Any) -> FuserConfig:  # fmt: skip
        """Config for ``receiver`` <- ``sender`` (``LoadedModel``-like objects).

        Args:
            kind: ``residual``, ``concat`` or ``prefix``.
            layer_map: a kind from :func:`align.layer_map` or an explicit list.
            aligner: token aligner name; default identity for the same tokenizer, else span.
            sizes: ``hidden``, ``depth``, ``ffn_mult``, ``dropout``, ``gate_init``, ``sender_positions``.
        """
        info = pair_info(receiver, sender)
        name = get_aligner(aligner, receiver.tokenizer, sender.tokenizer).name
        if isinstance(layer_map, str):
            return cls(**info, kind=kind, layer_map_kind=layer_map, aligner=name, **sizes)
        return cls(**info, kind=kind, layer_map=list(layer_map), layer_map_kind="custom", aligner=name, **sizes)

    @property
    def is_block(self) -> bool:
        """Whether the fuser makes a cache block (``concat``, ``prefix``), not a residual."""
        return self.kind != "residual"

    @property
    def label(self) -> str:
        """A short description for tables: kind, aligner (residual), layer map, positions sent."""
        if not self.is_block:
            return f"{self.kind}: {self.aligner} + {self.layer_map_kind}"
        n = self.sender_positions
        positions = "all positions" if n is None else "last position" if n == 1 else f"last {n} positions"
        return f"{self.kind}: {self.layer_map_kind}, {positions}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- modules


class FFNBlock(nn.Module):
    """``x + Dropout(W2 GELU(W1 RMSNorm(x)))`` on ``[..., hidden]``."""

    def __init__(self, hidden: int, mult: int, dropout: float):
        super().__init__()
        self.norm = nn.RMSNorm(hidden, eps=1e-6)
        self.w1 = nn.Linear(hidden, mult * hidden)
        self.w2 = nn.Linear(mult * hidden, hidden)
        self.act = nn.GELU()
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(self.w2(self.act(self.w1(self.norm(x)))))


class Projector(nn.Module):
    """One receiver layer's residual key (or value) projector:
    ``(sender [B, N, Hs*Ds], receiver [B, N, Hr*Dr]) -> sigmoid(w) * proj`` as ``[B, N, Hr, Dr]``."""

    def __init__(self, sender_dim: int, heads: int, head_dim: int, hidden: int, depth: int, mult: int, dropout: float):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.inp = nn.Linear(sender_dim + heads * head_dim, hidden)
        self.trunk = nn.Sequential(*[FFNBlock(hidden, mult, dropout) for _ in range(depth)])
        self.proj_block = FFNBlock(hidden, mult, dropout)
        self.proj_out = nn.Linear(hidden, heads * head_dim)
        self.weight_block = FFNBlock(hidden, mult, dropout)
        self.weight_out = nn.Linear(hidden, heads)
        nn.init.zeros_(self.proj_out.weight)  # fuser at init == receiver alone
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, sender: torch.Tensor, receiver: torch.Tensor) -> torch.Tensor:
        h = self.trunk(self.inp(torch.cat([sender, receiver], dim=-1)))
        proj = self.proj_out(self.proj_block(h)).unflatten(-1, (self.heads, self.head_dim))
        weight = torch.sigmoid(self.weight_out(self.weight_block(h))).unsqueeze(-1)
        return weight * proj


class SenderProjector(nn.Module):
    """One receiver layer's block key (or value) projector from the sender cache alone:
    ``[B, S, Hs*Ds] -> [B, S, Hr, Dr]``."""

    def __init__(self, sender_dim: int, heads: int, head_dim: int, hidden: int, depth: int, mult: int, dropout: float):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.inp = nn.Linear(sender_dim, hidden)
        self.trunk = nn.Sequential(*[FFNBlock(hidden, mult, dropout) for _ in range(depth)])
        self.out_block = FFNBlock(hidden, mult, dropout)
        self.out = nn.Linear(hidden, heads * head_dim)

    def forward(self, sender: torch.Tensor) -> torch.Tensor:
        return self.out(self.out_block(self.trunk(self.inp(sender)))).unflatten(-1, (self.heads, self.head_dim))


class Fuser(nn.Module):
    """What every fuser kind shares: its config, per-layer K/V gates, the pair check, saving.

    Attributes:
        gate_logits: ``[receiver_layers, 2]`` (column 0 keys, 1 values), init ``gate_init``.
        temperature: Gumbel-sigmoid temperature used in training (set by the trainer).
        gate_threshold: inference gate is open where ``gate_logits > gate_threshold``.
    """

    projector: type[nn.Module] = Projector

    def __init__(self, config: FuserConfig):
        super().__init__()
        self.config = c = config
        args = (c.sender_kv_heads * c.sender_head_dim, c.receiver_kv_heads, c.receiver_head_dim)
        args += (c.hidden, c.depth, c.ffn_mult, c.dropout)
        self.key_projectors = nn.ModuleList(self.projector(*args) for _ in range(c.receiver_layers))
        self.value_projectors = nn.ModuleList(self.projector(*args) for _ in range(c.receiver_layers))
        self.gate_logits = nn.Parameter(torch.full((c.receiver_layers, 2), float(c.gate_init)))
        self.temperature = 1.0
        self.gate_threshold = 0.0
        self._gate_override: torch.Tensor | None = None

    @property
    def kind(self) -> str:
        """The fusion mode this fuser is trained and run in (``federation.FedRefine`` modes)."""
        return self.config.kind

    def set_gates(self, value: bool | Sequence[bool] | Sequence[Sequence[bool]] | torch.Tensor | None) -> None:
        """Override the inference gates: ``True``/``False`` for every layer, one bool per
        layer, ``[layers, 2]`` for keys/values separately, or ``None`` to go back to
        ``1[gate_logits > gate_threshold]``. Training (Gumbel) gates ignore the override."""
        if value is None:
            self._gate_override = None
            return
        g = torch.as_tensor(value, dtype=torch.float32)
        g = g.reshape(1, 1) if g.dim() == 0 else g
        g = g[:, None] if g.dim() == 1 else g
        self._gate_override = g.expand(self.config.receiver_layers, 2).clone()

    def gates(self) -> torch.Tensor:
        """Current gate values ``[layers, 2]``: Gumbel-sigmoid samples in training, hard at inference."""
        logits = self.gate_logits
        if self.training:
            u = torch.rand_like(logits).clamp(1e-6, 1 - 1e-6)
            return torch.sigmoid((logits + torch.log(u) - torch.log1p(-u)) / self.temperature)
        if self._gate_override is not None:
            return self._gate_override.to(logits)
        return (logits > self.gate_threshold).to(logits.dtype)

    def check_pair(self, receiver, sender) -> None:
        """Raise :class:`PairMismatchError` listing every field in which (receiver, sender)
        differ from the pair this fuser was built for."""
        check_pair_info(self.config.to_dict(), pair_info(receiver, sender))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``fuser.safetensors`` and ``fuser_config.json`` into ``directory``."""
        meta = {"format_version": FORMAT_VERSION, "config": self.config.to_dict()}
        return save_module(self, directory, WEIGHTS_FILE, CONFIG_FILE, meta)


class ResidualFuser(Fuser):
    """The C2C fuser: projects an aligned sender cache into residuals on the receiver's cache."""

    def forward(self, sender: KVCache, receiver: KVCache, fuse_mask: torch.Tensor) -> tuple[list, list]:
        """Residuals to add to the receiver's cache.

        Args:
            sender: aligned sender cache, one entry per *receiver* layer (already mapped
                through ``layer_map``), ``[B, Hs, N, Ds]``; see ``align.align_cache``.
            receiver: the receiver's own cache for the same ``N`` positions, ``[B, Hr, N, Dr]``.
            fuse_mask: ``[B, N]`` bool, False where no sender token exists (residual 0).
        Returns:
            ``(key_residuals, value_residuals)``: per receiver layer ``[B, Hr, N, Dr]`` in
            the receiver's dtype, ``g * sigmoid(w) * proj`` masked by ``fuse_mask``.
        """
        self._check_shapes(sender, receiver)
        gates = self.gates()
        dtype = self.gate_logits.dtype
        mask = fuse_mask[:, :, None, None].to(dtype=dtype, device=self.gate_logits.device)
        out: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        projectors = (self.key_projectors, self.value_projectors)
        for t in range(self.config.receiver_layers):
            for j, (s, r) in enumerate(((sender.keys[t], receiver.keys[t]), (sender.values[t], receiver.values[t]))):
                s_flat = s.transpose(1, 2).flatten(2).to(dtype)  # [B, N, Hs*Ds]
                r_flat = r.transpose(1, 2).flatten(2).to(dtype)  # [B, N, Hr*Dr]
                delta = gates[t, j] * projectors[j][t](s_flat, r_flat) * mask  # [B, N, Hr, Dr]
                out[j].append(delta.transpose(1, 2).to(r.dtype))
        return out

    def _check_shapes(self, sender: KVCache, receiver: KVCache) -> None:
        c = self.config
        problems = []
        if sender.num_layers != c.receiver_layers or receiver.num_layers != c.receiver_layers:
            problems.append(
                f"expected {c.receiver_layers} aligned layers, got sender {sender.num_layers}, "
                f"receiver {receiver.num_layers}"
            )
        else:
            s, r = sender.keys[0], receiver.keys[0]
            if (s.shape[1], s.shape[3]) != (c.sender_kv_heads, c.sender_head_dim):
                problems.append(f"sender KV {tuple(s.shape)} is not [B, {c.sender_kv_heads}, N, {c.sender_head_dim}]")
            if (r.shape[1], r.shape[3]) != (c.receiver_kv_heads, c.receiver_head_dim):
                problems.append(
                    f"receiver KV {tuple(r.shape)} is not [B, {c.receiver_kv_heads}, N, {c.receiver_head_dim}]"
                )
            if s.shape[2] != r.shape[2]:
                problems.append(f"sender has {s.shape[2]} aligned positions, receiver {r.shape[2]}")
        if problems:
            raise ValueError(
                f"Fuser for {c.receiver_name} <- {c.sender_name} got caches of another shape: "
                + "; ".join(problems)
                + ". Align the sender cache with align.align_cache first."
            )


class BlockFuser(Fuser):
    """Projects a sender's prompt cache (every position, or the last ``sender_positions`` the
    engine keeps) into a cache block for the receiver (``concat`` and ``prefix`` kinds)."""

    projector = SenderProjector

    def forward(self, sender: KVCache) -> KVCache:  # type: ignore[override]
        """The projected block.

        Args:
            sender: the sender's prompt cache, per *sender* layer ``[B, Hs, S, Ds]``: every
                position (``engine.prefill``), or the last ``S = sender_positions`` the
                sender sends (``engine.sender_prefill(last=...)``).
        Returns:
            per receiver layer ``[B, Hr, S, Dr]`` (in the fuser's dtype), ``g * proj``.
        """
        c = self.config
        if sender.num_layers != c.sender_layers:
            raise ValueError(
                f"Block fuser {c.receiver_name} <- {c.sender_name} expects the sender's {c.sender_layers} layers, "
                f"got {sender.num_layers}: pass the sender's full prompt cache."
            )
        for layer in set(c.layer_map):
            k = sender.keys[layer]
            if k.shape[2] != sender.seq_len or (k.shape[1], k.shape[3]) != (c.sender_kv_heads, c.sender_head_dim):
                raise ValueError(
                    f"Sender layer {layer} holds {tuple(k.shape)}, expected [B, {c.sender_kv_heads}, "
                    f"{sender.seq_len}, {c.sender_head_dim}]: prefill with every position kept (engine.prefill)."
                )
        gates = self.gates()
        dtype = self.gate_logits.dtype
        out: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        projectors = (self.key_projectors, self.value_projectors)
        for t, layer in enumerate(c.layer_map):
            for j, s in enumerate((sender.keys[layer], sender.values[layer])):
                flat = s.transpose(1, 2).flatten(2).to(dtype)  # [B, S, Hs*Ds]
                out[j].append((gates[t, j] * projectors[j][t](flat)).transpose(1, 2))  # [B, Hr, S, Dr]
        return KVCache(*out, sender.seq_len)


def build_fuser(config: FuserConfig) -> Fuser:
    """A fresh fuser of ``config.kind`` (the initial weights come from the global RNG)."""
    return (BlockFuser if config.is_block else ResidualFuser)(config)


def unwrap(fuser: nn.Module) -> Fuser:
    """The fuser inside an Accelerate/DDP wrapper (or the fuser itself)."""
    return getattr(fuser, "module", fuser)


def load_fuser(directory: str | Path, receiver=None, sender=None, kind: str | None = None) -> Fuser:
    """Load a saved fuser of any kind, strictly (see ``safe_io.load_module``).

    Args:
        receiver, sender: ``LoadedModel``-like pair to check against (recommended).
        kind: the kind the caller expects (None: any).
    Raises:
        MissingFuserFileError (a file is missing), PairMismatchError (another pair; fields
        listed), FuserLoadError (another kind, corrupt file or checksum, tensors that differ).
    """
    if (receiver is None) != (sender is None):
        raise ValueError("Pass both receiver and sender (or neither) to load_fuser.")

    def check(config: FuserConfig) -> None:
        if kind is not None and config.kind != kind:
            raise FuserLoadError(
                f"{directory} holds a {config.kind!r} fuser, not a {kind!r} one: run it in {config.kind} fusion "
                f"(load_fuser(..., kind={config.kind!r})), or train a {kind} fuser."
            )
        if receiver is not None:
            check_pair_info(config.to_dict(), pair_info(receiver, sender))

    return load_module(
        directory, WEIGHTS_FILE, CONFIG_FILE, format_version=FORMAT_VERSION,
        parse=lambda meta: strict_config(FuserConfig, meta), build=build_fuser, check=check,
        what="fuser", error=FuserLoadError, missing=MissingFuserFileError,
    )  # fmt: skip
