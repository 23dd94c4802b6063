"""Per-layer KV caches: reading them out of a transformers 5.x ``Cache``, rebuilding a
cache a model can continue from, and sizes in bytes (``transport`` encodes them for the wire).

Shapes: every layer holds ``keys`` and ``values`` of ``[batch, kv_heads, seq, head_dim]``.
Sliding-window layers (Gemma-3) hold only their last ``window - 1`` positions; the true
number of tokens seen is kept in :attr:`KVCache.seq_len` and restored on rebuild.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, PretrainedConfig
from transformers.cache_utils import Cache

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
"""Transport dtypes a cache can be encoded in."""


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"bfloat16"`` or ``torch.bfloat16`` -> ``torch.bfloat16``; anything else is an error."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"Unsupported transport dtype {dtype}; use one of {sorted(DTYPES)}.")
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"Unsupported transport dtype {dtype!r}; use one of {sorted(DTYPES)}.")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass
class KVCache:
    """A model's prompt cache as plain tensors.

    Attributes:
        keys: per layer ``[batch, kv_heads, seq_l, head_dim]`` (``seq_l <= seq_len``;
            smaller only on sliding-window layers).
        values: per layer, same shapes as ``keys``.
        seq_len: number of tokens the cache has seen.
        sliding: per layer, True where the layer is a sliding-window layer.
        present: per layer, False where the layer was not transmitted (``transport``: its
            tensors are zeros, and a fuser reading it gives no fusion).
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    seq_len: int
    sliding: list[bool] = field(default_factory=list)
    present: list[bool] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.keys) != len(self.values):
            raise ValueError(f"{len(self.keys)} key layers but {len(self.values)} value layers.")
        if not self.sliding:
            self.sliding = [False] * len(self.keys)
        if not self.present:
            self.present = [True] * len(self.keys)
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            if k.dim() != 4 or k.shape[:3] != v.shape[:3]:
                raise ValueError(
                    f"Layer {i}: keys {tuple(k.shape)} and values {tuple(v.shape)} must both be "
                    "[batch, kv_heads, seq, head_dim] with matching batch, heads and seq."
                )

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    @classmethod
    def from_cache(cls, cache: Cache) -> KVCache:
        """Read the per-layer tensors out of a transformers ``Cache`` (no copy)."""
        layers = getattr(cache, "layers", None)
        if not layers:
            raise TypeError(f"Expected a transformers 5.x Cache with `.layers`, got {type(cache).__name__}.")
        keys, values, sliding = [], [], []
        for i, layer in enumerate(layers):
            if not getattr(layer, "is_initialized", True) or layer.keys is None:
                raise ValueError(f"Cache layer {i} is empty: run a prefill before reading the cache.")
            keys.append(layer.keys)
            values.append(layer.values)
            sliding.append(bool(getattr(layer, "is_sliding", False)))
        return cls(keys, values, seq_len=int(cache.get_seq_length()), sliding=sliding)

    def to_cache(self, config: PretrainedConfig | None = None) -> DynamicCache:
        """A ``DynamicCache`` the model with ``config`` can continue decoding from.

        With a config, the cache gets the model's own layer types (sliding-window layers
        included) and the true sequence length is restored on sliding layers.
        """
        cache = DynamicCache(config=config) if config is not None else DynamicCache()
        while len(cache.layers) < self.num_layers:  # no config, or a config without layer types
            cache.layers.append(type(cache.layers[0])() if cache.layers else _dynamic_layer())
        if len(cache.layers) != self.num_layers:
            raise ValueError(
                f"The cache has {self.num_layers} layers but the model config builds "
                f"{len(cache.layers)}: this cache belongs to another model."
            )
        for i, layer in enumerate(cache.layers):
            k, v = self.keys[i], self.values[i]
            if getattr(layer, "is_sliding", False):
                window = layer.sliding_window
                k, v = k[:, :, -(window - 1) :], v[:, :, -(window - 1) :]
            layer.lazy_initialization(k, v)
            layer.keys, layer.values = k, v
            if hasattr(layer, "cumulative_length"):
                layer.cumulative_length = self.seq_len
        return cache

    def map(self, fn) -> KVCache:
        """Apply ``fn(tensor) -> tensor`` to every key and value tensor."""
        keys, values = [fn(k) for k in self.keys], [fn(v) for v in self.values]
        return KVCache(keys, values, self.seq_len, list(self.sliding), list(self.present))

    def to(self, dtype: torch.dtype | str | None = None, device: torch.device | str | None = None) -> KVCache:
        dt = resolve_dtype(dtype) if dtype is not None else None
        return self.map(lambda t: t.to(dtype=dt or t.dtype, device=device or t.device))

    def select(self, index: torch.Tensor | list[int]) -> KVCache:
        """Rows ``index`` of the batch (e.g. to repeat a prompt cache per answer option)."""
        idx = torch.as_tensor(index, dtype=torch.long, device=self.keys[0].device)
        return self.map(lambda t: t.index_select(0, idx))

    def nbytes(self, dtype: torch.dtype | str | None = None) -> int:
        """Bytes of all tensors, in their own dtype or as if cast to ``dtype``."""
        total = 0
        for t in (*self.keys, *self.values):
            size = resolve_dtype(dtype).itemsize if dtype is not None else t.element_size()
            total += t.numel() * size
        return total

    def bytes_per_token(self, dtype: torch.dtype | str | None = None) -> float:
        """Measured bytes per token per sequence of the batch."""
        return self.nbytes(dtype) / (self.seq_len * self.batch_size)


def _dynamic_layer():
    from transformers.cache_utils import DynamicLayer

    return DynamicLayer()


# --------------------------------------------------------------------------- sizes


def _text_config(config: PretrainedConfig) -> PretrainedConfig:
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def kv_shape(config: PretrainedConfig) -> tuple[int, int, int]:
    """``(layers, kv_heads, head_dim)`` read from a model config."""
    c = _text_config(config)
    heads = c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    return c.num_hidden_layers, kv_heads, head_dim


def sliding_windows(config: PretrainedConfig) -> list[int | None]:
    """Per layer: the number of positions a sliding layer keeps after prefill, else None."""
    c = _text_config(config)
    layers, _, _ = kv_shape(c)
    types = getattr(c, "layer_types", None) or ["full_attention"] * layers
    window = getattr(c, "sliding_window", None)
    return [window - 1 if t == "sliding_attention" and window else None for t in types]


def kv_bytes(config: PretrainedConfig, seq_len: int, dtype: torch.dtype | str = "bfloat16") -> int:
    """Bytes of one sequence's cache after prefilling ``seq_len`` tokens (sliding layers capped)."""
    _, kv_heads, head_dim = kv_shape(config)
    size = resolve_dtype(dtype).itemsize
    kept = sum(seq_len if w is None else min(seq_len, w) for w in sliding_windows(config))
    return 2 * kept * kv_heads * head_dim * size


def kv_bytes_per_token(config: PretrainedConfig, dtype: torch.dtype | str = "bfloat16") -> int:
    """2 · layers · kv_heads · head_dim · bytes per element: the cache one token adds
    on full-attention layers (the paper's "KV bytes per token")."""
    layers, kv_heads, head_dim = kv_shape(config)
    return 2 * layers * kv_heads * head_dim * resolve_dtype(dtype).itemsize


# ------------------------------------------------------------------------ forward


def position_ids_from_mask(attention_mask: torch.Tensor, past_length: int = 0) -> torch.Tensor:
    """Positions that skip left padding.

    Args:
        attention_mask: ``[batch, past + new]``, 1 for real tokens.
        past_length: how many leading columns are already in the cache.
    Returns:
        ``[batch, new]`` positions (padding gets position 0).
    """
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp(min=0)[:, past_length:]


def forward(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    cache: Cache | KVCache | None = None,
    prefix_mask: torch.Tensor | None = None,
    cache_bias: torch.Tensor | None = None,
    logits_to_keep: int | None = None,
) -> tuple[torch.Tensor, Cache]:
    """One forward pass continuing ``cache`` (if any) with left-padding-aware positions: the
    one way this library runs a model on top of a cache.

    Args:
        input_ids: ``[B, new]``.
        attention_mask: ``[B, P + past + new]`` covering the cached and the new tokens.
        cache: a transformers cache or a :class:`KVCache` (rebuilt for this model); None
            starts an empty cache with the model's own layer types (sliding layers capped).
        prefix_mask: ``[B, P]`` mask of the cache's first ``P`` columns when they are a
            position-less prefix (block fusion: the senders' projected caches); the new
            tokens' positions do not count it. None: no prefix.
        cache_bias: ``[B, C]`` added to every new token's attention logits on the first ``C``
            cache columns (see :func:`biased_attention_mask`), or None.
        logits_to_keep: compute the LM head on the last this many positions only (a prefill
            that keeps just the cache: 1; a 262k-token vocabulary's head is most of a small
            model's prefill); None: every position.
    Returns:
        logits ``[B, new or logits_to_keep, vocab]`` and the updated transformers cache.
    """
    if isinstance(cache, KVCache):
        cache = cache.to_cache(model.config)
    past = cache.get_seq_length() if cache is not None else 0
    if attention_mask is None:
        attention_mask = torch.ones(input_ids.shape[0], past + input_ids.shape[1], dtype=torch.long)
    attention_mask = attention_mask.to(input_ids.device)
    if cache is None:
        cache = DynamicCache(config=model.config)
    positions = position_ids_from_mask(attention_mask, past)
    if prefix_mask is not None:
        positions = (positions - prefix_mask.to(attention_mask).sum(1, keepdim=True)).clamp(min=0)
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and positions.numel() and int(positions.max()) >= limit:
        raise ValueError(
            f"Position {int(positions.max())} is past {type(model).__name__}'s max_position_embeddings={limit}: "
            "the prompt (with its cache) is too long for the model. Shorten it (fewer or shorter context notes "
            "or records) or use a model with a longer context; nothing is truncated silently."
        )
    mask = attention_mask
    if cache_bias is not None:
        mask = _biased_masks(model, cache, attention_mask, input_ids.shape[1], cache_bias)
    head = {} if logits_to_keep is None else {"logits_to_keep": logits_to_keep}
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True, **head)
    return out.logits, out.cache


def _biased_masks(model: torch.nn.Module, cache: Cache, attention_mask: torch.Tensor, new: int, bias: torch.Tensor):
    """The 4D mask(s) for :func:`forward` with a ``cache_bias``: one for full attention, and for
    a model with sliding-window layers (``config.layer_types``) the mapping transformers takes,
    whose sliding mask keeps the window and covers only the columns those layers still hold."""
    full = biased_attention_mask(attention_mask, new, bias, model.dtype)  # [B, 1, new, L]
    windows = sliding_windows(model.config)
    sliding = [i for i, w in enumerate(windows) if w is not None]
    if not sliding:
        return full
    window = windows[sliding[0]] + 1  # the config's sliding_window
    kv_length, kv_offset = cache.layers[sliding[0]].get_mask_sizes(new)
    L, dev = attention_mask.shape[1], attention_mask.device
    query = L - new + torch.arange(new, device=dev)
    near = torch.arange(L, device=dev)[None, :] > query[:, None] - window  # [new, L]
    windowed = full.masked_fill(~near, torch.finfo(full.dtype).min)[..., kv_offset : kv_offset + kv_length]
    return {"full_attention": full, "sliding_attention": windowed}


def biased_attention_mask(
    attention_mask: torch.Tensor, new: int, bias: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """The additive 4D mask of ``new`` query tokens continuing a cache, with a bias on the
    first cache columns (transformers uses a 4D mask as given).

    Args:
        attention_mask: ``[B, L]`` over the cache and the new tokens (1 = real).
        bias: ``[B, C]``, ``C <= L - new``, added to the logits on the first ``C`` columns.
    Returns:
        ``[B, 1, new, L]`` in ``dtype``: the bias where a query may attend (a real column at
        or before its own), the dtype's minimum elsewhere.
    """
    B, L = attention_mask.shape
    past = L - new
    if bias.shape[0] != B or bias.shape[1] > past:
        raise ValueError(f"cache_bias {tuple(bias.shape)} must cover at most the {past} cache columns of {B} rows.")
    dev = attention_mask.device
    causal = torch.arange(L, device=dev)[None, :] <= past + torch.arange(new, device=dev)[:, None]  # [new, L]
    allowed = causal[None] & attention_mask.bool()[:, None, :]  # [B, new, L]
    full = torch.zeros(B, L, device=dev, dtype=torch.float32)
    full[:, : bias.shape[1]] = bias.to(device=dev, dtype=torch.float32)
    floor = torch.finfo(dtype).min
    return torch.where(allowed, full[:, None, :], torch.full_like(full[:, None, :], floor))[:, None].to(dtype)
