"""The concatenation fuser (FedRefine Eq. 4 taken literally): a sender's projected cache is
placed *before* the receiver's own cache along the sequence axis, so the sender may read a
different text than the receiver (e.g. its own rephrasing) and no token alignment is needed.

The projector reads the sender cache alone. Per receiver layer ``t`` (reading sender layer
``layer_map[t]``), with separate weights for keys and values::

    x = K_s                                  # [B, S, Hs*Ds], post-RoPE sender keys
    h = FFN(FFN^depth(Linear(x)))            # [B, S, hidden]
    K_t = g_K * Linear(h) -> [B, Hr, S, Dr]  # a cache block in the receiver's space

``g`` is the C2C per-layer gate (Gumbel-sigmoid in training, hard at inference, see
``fuser.C2CFuser``). It scales the projected keys and values; a closed layer leaves zero
keys and values (the block then adds nothing to that layer's output but still takes
attention mass, so the engine removes a *source* by masking its block, never by gates).

A :class:`ConcatFuser` is a ``C2CFuser`` with other projectors: same config, gates, pair
check, strict save/load (plus ``"kind": "concat"`` in its JSON, checked on load).
Training: ``train.train_fuser`` with the engine from :meth:`ConcatFuser.make_engine`.

A :class:`PrefixFuser` is the same projector trained and run in ``prefix`` fusion: the
receiver prefills its own prompt *on top of* the projected block, so every prompt token
may read it, not only the last one (``federation.FedRefine``). It is stored as
``"kind": "prefix"``: a projector learns to be read in one way, so the two never mix.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from fedrefine_lib.fuser import CONFIG_FILE, C2CFuser, FFNBlock, FuserConfig, FuserLoadError
from fedrefine_lib.kv import KVCache

KIND = "concat"


class SenderProjector(nn.Module):
    """One receiver layer's key (or value) projector from the sender cache alone:
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


class ConcatFuser(C2CFuser):
    """Projects a sender's prompt cache (every position, or the last ``config.sender_positions``
    the engine keeps) into a cache block for the receiver."""

    kind = KIND

    def __init__(self, config: FuserConfig):
        super().__init__(config)  # gates, temperature, config; its residual projectors are replaced
        c = config
        args = (c.sender_kv_heads * c.sender_head_dim, c.receiver_kv_heads, c.receiver_head_dim, c.hidden, c.depth,
                c.ffn_mult, c.dropout)
        self.key_projectors = nn.ModuleList(SenderProjector(*args) for _ in range(c.receiver_layers))
        self.value_projectors = nn.ModuleList(SenderProjector(*args) for _ in range(c.receiver_layers))

    def forward(self, sender: KVCache) -> KVCache:  # type: ignore[override]
        """The projected block.

        Args:
            sender: the sender's prompt cache, per *sender* layer ``[B, Hs, S, Ds]``: every
                position (``federation.full_prefill``), or the last ``S = sender_positions`` the
                sender sends (``federation.sender_prefill(last=...)``).
        Returns:
            per receiver layer ``[B, Hr, S, Dr]`` (in the fuser's dtype), ``g * P``.
        """
        c = self.config
        if sender.num_layers != c.sender_layers:
            raise ValueError(
                f"Concat fuser {c.receiver_name} <- {c.sender_name} expects the sender's {c.sender_layers} layers, "
                f"got {sender.num_layers}: pass the sender's full prompt cache."
            )
        for layer in set(c.layer_map):
            k = sender.keys[layer]
            if k.shape[2] != sender.seq_len or (k.shape[1], k.shape[3]) != (c.sender_kv_heads, c.sender_head_dim):
                raise ValueError(
                    f"Sender layer {layer} holds {tuple(k.shape)}, expected [B, {c.sender_kv_heads}, "
                    f"{sender.seq_len}, {c.sender_head_dim}]: prefill with every position kept (federation.full_prefill)."
                )
        gates = self.gates()
        dtype = self.gate_logits.dtype
        keys, values = [], []
        for t, layer in enumerate(c.layer_map):
            for j, (projectors, s, out) in enumerate(((self.key_projectors, sender.keys[layer], keys),
                                                      (self.value_projectors, sender.values[layer], values))):
                flat = s.transpose(1, 2).flatten(2).to(dtype)  # [B, S, Hs*Ds]
                out.append((gates[t, j] * projectors[t](flat)).transpose(1, 2))  # [B, Hr, S, Dr]
        return KVCache(keys, values, sender.seq_len)

    def make_engine(self, receiver, sender, fuser: nn.Module | None = None, aligner=None):
        """The single-sender engine that trains and runs this fuser (``train.train_fuser``
        hook): a ``federation.FedRefine`` in this fuser's mode (:attr:`kind`). ``fuser``:
        this fuser or its Accelerate/DDP wrapper; ``aligner`` is ignored (no token alignment)."""
        from fedrefine_lib.federation import FedRefine

        return FedRefine(receiver, [sender], {sender.name: fuser if fuser is not None else self}, mode=self.kind)

    def save_pretrained(self, directory: str | Path) -> Path:
        directory = super().save_pretrained(directory)
        meta = json.loads((directory / CONFIG_FILE).read_text())
        meta["kind"] = self.kind
        (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, receiver=None, sender=None) -> "ConcatFuser":
        """Strict load (see ``C2CFuser.from_pretrained``); refuses a fuser of another kind."""
        path = Path(directory) / CONFIG_FILE
        if path.is_file():
            try:
                kind = json.loads(path.read_text()).get("kind", "residual")
            except json.JSONDecodeError as e:
                raise FuserLoadError(f"Corrupt {path}: {e}. Re-save or retrain the fuser.") from e
            if kind != cls.kind:
                loader = next((c.__name__ for c in (C2CFuser, ConcatFuser, PrefixFuser) if c.kind == kind), "FuserHub.get")
                raise FuserLoadError(
                    f"{directory} holds a {kind!r} fuser, not a {cls.kind!r} one: load it with {loader}.from_pretrained "
                    f"({kind} fusion), or train a {cls.__name__} for {cls.kind} fusion."
                )
        return super().from_pretrained(directory, receiver, sender)


class PrefixFuser(ConcatFuser):
    """A :class:`ConcatFuser` trained and run in ``prefix`` fusion (the receiver prefills its
    prompt reading the projected block)."""

    kind = "prefix"


def is_concat(fuser: nn.Module) -> bool:
    """Whether ``fuser`` (possibly wrapped by Accelerate/DDP) projects a sender's cache alone
    into a block (:class:`ConcatFuser`, :class:`PrefixFuser`)."""
    return isinstance(getattr(fuser, "module", fuser), ConcatFuser)


def fusion_kind(fuser: nn.Module) -> str:
    """The fusion mode ``fuser`` (possibly wrapped) is trained for: ``residual``, ``concat``
    or ``prefix``."""
    return getattr(fuser, "module", fuser).kind
