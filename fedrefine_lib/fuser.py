"""The C2C fuser: projects a sender's KV cache into a receiver's cache space (DESIGN §2).

Per receiver layer ``t`` (reading sender layer ``layer_map[t]``), with separate weights for
keys and values::

    x = [K_s ; K_r]                        # [B, N, Hs*Ds + Hr*Dr], both post-RoPE
    h = FFN^depth(Linear(x))               # [B, N, hidden]
    P = Linear(FFN(h)) -> [B, N, Hr, Dr]   # projection branch (zero-initialised)
    w = Linear(FFN(h)) -> [B, N, Hr]       # weight branch
    K_out = K_r + g_K * sigmoid(w_K) * P_K

FFN block: ``x + Dropout(W2 GELU(W1 RMSNorm(x)))``. The gate ``g`` is one learnable logit
per layer and per K/V, initialised at ``gate_init`` (0 as in the reference): in training ``sigmoid((l + noise) / tau)`` with
logistic noise (the difference of two Gumbels, i.e. the binary Gumbel-softmax) and ``tau``
annealed by the trainer; at inference the hard gate ``1[l > threshold]``, or an override
set with :meth:`C2CFuser.set_gates`. The zero-initialised projection makes a fresh fuser
an exact identity: fused cache == receiver's cache.

Saved as ``fuser.safetensors`` + ``fuser_config.json`` (the pair it belongs to, the layer
map, the aligner, the file's sha256). Loading is strict and says what differs.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from fedrefine_lib import kv as kvlib
from fedrefine_lib.safe_io import save_module, sha256
from fedrefine_lib.align import layer_map as make_layer_map
from fedrefine_lib.kv import KVCache

WEIGHTS_FILE = "fuser.safetensors"
CONFIG_FILE = "fuser_config.json"
FORMAT_VERSION = 1


class FuserLoadError(ValueError):
    """A saved fuser cannot be loaded as asked (the message says what differs)."""


class PairMismatchError(FuserLoadError):
    """The fuser was trained for another receiver/sender pair."""


class MissingFuserFileError(FuserLoadError, FileNotFoundError):
    """A file of the saved fuser is missing."""


# --------------------------------------------------------------------------- config

PAIR_FIELDS = (
    "receiver_name", "sender_name", "receiver_layers", "sender_layers", "receiver_kv_heads",
    "sender_kv_heads", "receiver_head_dim", "sender_head_dim", "receiver_vocab", "sender_vocab",
)


def pair_info(receiver, sender) -> dict[str, Any]:
    """What identifies a (receiver, sender) pair of ``LoadedModel``-like objects
    (``.name``, ``.model``, ``.tokenizer``): names, layer counts, KV heads, head dims, vocab sizes."""
    info = {}
    for side, m in (("receiver", receiver), ("sender", sender)):
        layers, heads, head_dim = kvlib.kv_shape(m.model.config)
        info |= {
            f"{side}_name": m.name,
            f"{side}_layers": layers,
            f"{side}_kv_heads": heads,
            f"{side}_head_dim": head_dim,
            f"{side}_vocab": len(m.tokenizer),
        }
    return info


@dataclass
class FuserConfig:
    """Shape of a fuser and the pair it belongs to.

    Attributes:
        receiver_*/sender_*: the pair (names, layers, KV heads, head dims, vocab sizes).
        layer_map: sender layer read by each receiver layer (``receiver_layers`` entries).
        layer_map_kind: how ``layer_map`` was made (``align.layer_map`` kinds) or "custom".
        aligner: token aligner the fuser was trained with.
        hidden: width of the fuser MLPs (1024 in the paper; small for CPU).
        depth: FFN blocks in the shared trunk (each branch adds one more).
        ffn_mult: FFN inner width = ``ffn_mult * hidden`` (1: hidden 1024 gives the
            reference's ~0.5 B parameters for Qwen3-0.6B <- Qwen2.5-0.5B).
        dropout: dropout inside FFN blocks (training only).
        gate_init: initial gate logit (reference: 0, a fair coin under Gumbel noise and a
            closed hard gate; a positive value starts with the gates mostly open).
        sender_positions: block fusers (``concat``, ``prefix``) only: the sender sends the cache
            of its last ``sender_positions`` prompt positions (those that have read the whole
            prompt) instead of every position; None sends all. A residual fuser fuses every
            aligned position and needs None.
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
        if self.sender_positions is not None and (isinstance(self.sender_positions, bool)
                                                  or not isinstance(self.sender_positions, int) or self.sender_positions < 1):
            raise ValueError(f"sender_positions={self.sender_positions!r}: give a whole number >= 1 of last prompt "
                             "positions the sender sends, or None to send them all.")
        if not self.layer_map:
            self.layer_map = make_layer_map(self.receiver_layers, self.sender_layers, self.layer_map_kind)
        if len(self.layer_map) != self.receiver_layers or not all(0 <= l < self.sender_layers for l in self.layer_map):
            raise ValueError(
                f"layer_map {self.layer_map} must give one sender layer in [0, {self.sender_layers}) "
                f"for each of the {self.receiver_layers} receiver layers."
            )

    @classmethod
    def for_pair(
        cls, receiver, sender, *, layer_map: str | list[int] = "top_down", aligner: str | None = None, **sizes: Any
    ) -> "FuserConfig":
        """Config for ``receiver`` <- ``sender`` (``LoadedModel``-like objects).

        Args:
            layer_map: a kind from :func:`align.layer_map` or an explicit list.
            aligner: token aligner name; default identity for the same tokenizer, else span.
            sizes: ``hidden``, ``depth``, ``ffn_mult``, ``dropout``, ``gate_init``,
                ``sender_positions``.
        """
        from fedrefine_lib.align import get_aligner

        info = pair_info(receiver, sender)
        name = get_aligner(aligner, receiver.tokenizer, sender.tokenizer).name
        if isinstance(layer_map, str):
            return cls(**info, layer_map_kind=layer_map, aligner=name, **sizes)
        return cls(**info, layer_map=list(layer_map), layer_map_kind="custom", aligner=name, **sizes)

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
    """One receiver layer's key (or value) projector.

    ``forward(sender [B, N, Hs*Ds], receiver [B, N, Hr*Dr]) -> sigmoid(w) * P`` as
    ``[B, N, Hr, Dr]``.
    """

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


class C2CFuser(nn.Module):
    """Projects an aligned sender cache into residuals on the receiver's cache.

    Attributes:
        gate_logits: ``[receiver_layers, 2]`` (column 0 keys, 1 values), init 0.
        temperature: Gumbel-sigmoid temperature used in training (set by the trainer).
        gate_threshold: inference gate is open where ``gate_logits > gate_threshold``.
    """

    kind = "residual"
    """The fusion mode this fuser is trained and run in (``federation.FedRefine`` modes)."""

    def __init__(self, config: FuserConfig):
        super().__init__()
        if self.kind == "residual" and config.sender_positions is not None:
            raise ValueError(f"A residual fuser adds a residual on every receiver position aligned with the sender, so it "
                             f"cannot take only the sender's last positions (sender_positions={config.sender_positions}); "
                             "leave sender_positions None, or use a concat/prefix fuser (concat.ConcatFuser).")
        self.config = config
        c = config
        sender_dim = c.sender_kv_heads * c.sender_head_dim
        args = (sender_dim, c.receiver_kv_heads, c.receiver_head_dim, c.hidden, c.depth, c.ffn_mult, c.dropout)
        self.key_projectors = nn.ModuleList(Projector(*args) for _ in range(c.receiver_layers))
        self.value_projectors = nn.ModuleList(Projector(*args) for _ in range(c.receiver_layers))
        self.gate_logits = nn.Parameter(torch.full((c.receiver_layers, 2), float(c.gate_init)))
        self.temperature = 1.0
        self.gate_threshold = 0.0
        self._gate_override: torch.Tensor | None = None

    # ----------------------------------------------------------------- gates

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

    # --------------------------------------------------------------- forward

    def forward(
        self, sender: KVCache, receiver: KVCache, fuse_mask: torch.Tensor
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Residuals to add to the receiver's cache.

        Args:
            sender: aligned sender cache, one entry per *receiver* layer (already mapped
                through ``layer_map``), ``[B, Hs, N, Ds]``; see ``align.align_cache``.
            receiver: the receiver's own cache for the same ``N`` positions, ``[B, Hr, N, Dr]``.
            fuse_mask: ``[B, N]`` bool, False where no sender token exists (residual 0).
        Returns:
            ``(key_residuals, value_residuals)``: per receiver layer ``[B, Hr, N, Dr]`` in
            the receiver's dtype, ``g * sigmoid(w) * P`` masked by ``fuse_mask``.
        """
        self._check_shapes(sender, receiver)
        gates = self.gates()
        dtype = self.gate_logits.dtype
        mask = fuse_mask[:, :, None, None].to(dtype=dtype, device=self.gate_logits.device)
        out: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        for t in range(self.config.receiver_layers):
            for j, (projectors, s, r) in enumerate(
                ((self.key_projectors, sender.keys[t], receiver.keys[t]),
                 (self.value_projectors, sender.values[t], receiver.values[t]))
            ):
                s_flat = s.transpose(1, 2).flatten(2).to(dtype)  # [B, N, Hs*Ds]
                r_flat = r.transpose(1, 2).flatten(2).to(dtype)  # [B, N, Hr*Dr]
                delta = gates[t, j] * projectors[t](s_flat, r_flat) * mask  # [B, N, Hr, Dr]
                out[j].append(delta.transpose(1, 2).to(r.dtype))
        return out

    def _check_shapes(self, sender: KVCache, receiver: KVCache) -> None:
        c = self.config
        problems = []
        if sender.num_layers != c.receiver_layers or receiver.num_layers != c.receiver_layers:
            problems.append(
                f"expected {c.receiver_layers} aligned layers, got sender {sender.num_layers}, receiver {receiver.num_layers}"
            )
        else:
            s, r = sender.keys[0], receiver.keys[0]
            if (s.shape[1], s.shape[3]) != (c.sender_kv_heads, c.sender_head_dim):
                problems.append(f"sender KV {tuple(s.shape)} is not [B, {c.sender_kv_heads}, N, {c.sender_head_dim}]")
            if (r.shape[1], r.shape[3]) != (c.receiver_kv_heads, c.receiver_head_dim):
                problems.append(f"receiver KV {tuple(r.shape)} is not [B, {c.receiver_kv_heads}, N, {c.receiver_head_dim}]")
            if s.shape[2] != r.shape[2]:
                problems.append(f"sender has {s.shape[2]} aligned positions, receiver {r.shape[2]}")
        if problems:
            raise ValueError(
                f"Fuser for {c.receiver_name} <- {c.sender_name} got caches of another shape: "
                + "; ".join(problems) + ". Align the sender cache with align.align_cache first."
            )

    # ------------------------------------------------------------ pair check

    def check_pair(self, receiver, sender) -> None:
        """Raise :class:`PairMismatchError` listing every field in which (receiver, sender)
        differ from the pair this fuser was built for."""
        check_pair_info(self.config.to_dict(), pair_info(receiver, sender))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # --------------------------------------------------------------- saving

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``fuser.safetensors`` and ``fuser_config.json`` into ``directory``."""
        return save_module(self, directory, WEIGHTS_FILE, CONFIG_FILE,
                           {"format_version": FORMAT_VERSION, "config": self.config.to_dict()})

    @classmethod
    def from_pretrained(cls, directory: str | Path, receiver=None, sender=None) -> "C2CFuser":
        """Load a fuser strictly.

        Args:
            receiver, sender: ``LoadedModel``-like pair to check against (recommended).
        Raises:
            MissingFuserFileError: a file is missing.
            PairMismatchError: the fuser belongs to another pair (fields listed).
            FuserLoadError: corrupt file, checksum mismatch, missing/extra/reshaped tensors.
        """
        from safetensors.torch import load_file

        directory = Path(directory)
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            if not (directory / name).is_file():
                raise MissingFuserFileError(
                    f"No {name} in {directory}: not a saved fuser (save one with C2CFuser.save_pretrained)."
                )
        try:
            meta = json.loads((directory / CONFIG_FILE).read_text())
            config = FuserConfig(**meta["config"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise FuserLoadError(f"Corrupt {directory / CONFIG_FILE}: {e}. Re-save or retrain the fuser.") from e
        if meta.get("format_version") != FORMAT_VERSION:
            raise FuserLoadError(
                f"{directory / CONFIG_FILE} has format_version {meta.get('format_version')}, this library reads {FORMAT_VERSION}."
            )
        if receiver is not None and sender is not None:
            check_pair_info(meta["config"], pair_info(receiver, sender))
        elif receiver is not None or sender is not None:
            raise ValueError("Pass both receiver and sender (or neither) to from_pretrained.")
        digest = sha256(directory / WEIGHTS_FILE)
        if meta.get("sha256") != digest:
            raise FuserLoadError(
                f"Corrupt {directory / WEIGHTS_FILE}: sha256 {digest[:12]}... differs from the "
                f"{str(meta.get('sha256'))[:12]}... recorded at save time. Re-save or retrain the fuser."
            )
        try:
            state = load_file(str(directory / WEIGHTS_FILE))
        except Exception as e:  # safetensors raises its own error types
            raise FuserLoadError(f"Corrupt {directory / WEIGHTS_FILE}: {e}. Re-save or retrain the fuser.") from e
        fuser = cls(config)
        expected = {k: tuple(v.shape) for k, v in fuser.state_dict().items()}
        missing = sorted(set(expected) - set(state))
        extra = sorted(set(state) - set(expected))
        reshaped = [f"{k}: saved {tuple(state[k].shape)}, expected {expected[k]}"
                    for k in sorted(set(expected) & set(state)) if tuple(state[k].shape) != expected[k]]
        if missing or extra or reshaped:
            parts = [f"missing tensors {missing}" if missing else "", f"unexpected tensors {extra}" if extra else "",
                     f"wrong shapes {reshaped}" if reshaped else ""]
            raise FuserLoadError(
                f"{directory / WEIGHTS_FILE} does not match its config: " + "; ".join(p for p in parts if p) + "."
            )
        fuser.load_state_dict(state, strict=True)
        return fuser.eval()


def check_pair_info(saved: dict[str, Any], actual: dict[str, Any]) -> None:
    """Raise :class:`PairMismatchError` naming every pair field where ``saved`` != ``actual``."""
    diffs = [f"{k}: fuser has {saved.get(k)!r}, models have {actual[k]!r}" for k in PAIR_FIELDS if saved.get(k) != actual[k]]
    if diffs:
        raise PairMismatchError(
            f"Fuser {saved.get('receiver_name')} <- {saved.get('sender_name')} does not fit the pair "
            f"{actual['receiver_name']} <- {actual['sender_name']}: " + "; ".join(diffs)
            + ". Load the fuser trained for this pair (or train one)."
        )

