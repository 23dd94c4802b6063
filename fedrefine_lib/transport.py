"""Transport encodings of a sender's cache: what actually goes on the wire, and back.

An :class:`Encoding` says how one query's cache is sent:

- ``dtype``: ``float32``, ``bfloat16``, ``float16`` (a cast), or ``int8`` / ``int4``
  (asymmetric min-max quantisation in the spirit of KIVI: values per token (one group of all
  heads and dims), keys per channel over the tokens, or per token with ``keys="token"``; a
  float16 scale and zero point per group travel in the payload; int4 codes are packed two
  per byte);
- ``layers``: the sender layers sent (None: all). A receiver layer whose fuser reads an unsent
  layer gets no fusion (its block or residual is zero, as under a closed gate);
  :func:`read_layers` gives the layers a fuser reads (sending only those is lossless) and
  :func:`layers_by_gate` a smaller budget ranked by the fuser's gates;
- ``noise``: a privacy defence (``fedrefine_lib.privacy``): the sender adds Gaussian noise of
  standard deviation ``noise`` times each tensor's RMS (per layer, keys and values apart)
  before encoding, drawn from torch's global generator (seed it for a reproducible run).

Which prompt positions are sent is the fuser's ``sender_positions`` (the engine cuts the cache
before encoding). :func:`encode` works on one query (``B = 1``), so a batch's padding is never
sent and every query's payload is exact; :func:`roundtrip` encodes each query of a batch on
its own and decodes it back, so a fuser sees exactly what a receiver would.

Payload layout, per sent layer, keys then values: the codes (or cast tensor bytes), then for
quantised tensors the float16 scales and zero points. The JSON header names the model the
cache belongs to and carries a CRC32 of the payload, so a payload for another model, a
truncated or a corrupted payload is an error, never a wrong cache.

Shapes: a query's cache holds per layer ``[1, H, S, D]`` (``H`` KV heads, ``S`` positions,
``D`` head dim); a batch ``[B, H, S, D]`` with a ``[B, S]`` mask (left padded).
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PretrainedConfig

from fedrefine_lib import kv as kvlib
from fedrefine_lib.kv import KVCache

FORMAT = 1
QUANTISED = {"int8": 8, "int4": 4}
"""Quantised transport dtypes and their bits per element."""
KEY_GROUPS = ("channel", "token")
SCALE_DTYPE = torch.float16


@dataclass(frozen=True)
class EncodedKV:
    """A cache ready for the wire: a small JSON header and the payload (tensor data and scales)."""

    header: bytes
    payload: bytes

    @property
    def payload_bytes(self) -> int:
        """Bytes of tensor data on the wire (what bandwidth is spent on; the header is not counted)."""
        return len(self.payload)

    def to_bytes(self) -> bytes:
        return struct.pack("<I", len(self.header)) + self.header + self.payload

    @classmethod
    def from_bytes(cls, blob: bytes) -> EncodedKV:
        if len(blob) < 4 or len(blob) < 4 + struct.unpack("<I", blob[:4])[0]:
            raise PayloadError(f"A KV message of {len(blob)} bytes is shorter than its header says: truncated.")
        (n,) = struct.unpack("<I", blob[:4])
        return cls(blob[4 : 4 + n], blob[4 + n :])


class PayloadError(ValueError):
    """A payload cannot be decoded as asked (the message names the cause)."""


@dataclass(frozen=True)
class Encoding:
    """How a sender's cache is sent (module docstring).

    Attributes:
        dtype: ``float32`` | ``bfloat16`` | ``float16`` | ``int8`` | ``int4``.
        keys: quantised keys' scale groups: ``channel`` (one per channel over a query's tokens,
            KIVI) or ``token`` (one per token and head, like the values).
        layers: sender layers sent, sorted; None: every layer.
        noise: relative standard deviation of the Gaussian noise added before encoding (0: none).
    """

    dtype: str = "bfloat16"
    keys: str = "channel"
    layers: tuple[int, ...] | None = None
    noise: float = 0.0

    def __post_init__(self) -> None:
        if self.dtype not in QUANTISED:
            kvlib.resolve_dtype(self.dtype)  # raises for unknown dtypes
        if self.keys not in KEY_GROUPS:
            raise ValueError(f"Encoding keys must be one of {KEY_GROUPS}, got {self.keys!r}.")
        if self.layers is not None:
            layers = tuple(sorted({int(i) for i in self.layers}))
            if not layers or layers[0] < 0:
                raise ValueError(f"Encoding layers must be non-negative layer indices, got {self.layers!r}.")
            object.__setattr__(self, "layers", layers)
        if not (math.isfinite(self.noise) and self.noise >= 0):
            raise ValueError(f"Encoding noise is a relative standard deviation >= 0, got {self.noise!r}.")

    @property
    def bits(self) -> int | None:
        """Bits per quantised element, or None for a cast."""
        return QUANTISED.get(self.dtype)

    @property
    def label(self) -> str:
        name = self.dtype + (f"/keys-{self.keys}" if self.bits and self.keys != "channel" else "")
        name += "" if self.layers is None else f", {len(self.layers)} layers"
        return name + (f", noise {self.noise:g}" if self.noise else "")

    def with_layers(self, layers: Sequence[int] | None) -> Encoding:
        return Encoding(self.dtype, self.keys, None if layers is None else tuple(layers), self.noise)

    def sent(self, num_layers: int) -> list[int]:
        """The sender layers this encoding sends for a model of ``num_layers``."""
        if self.layers is None:
            return list(range(num_layers))
        if self.layers[-1] >= num_layers:
            raise ValueError(f"Encoding sends layer {self.layers[-1]} but the sender has {num_layers} layers.")
        return list(self.layers)


def model_id(name: str, config: PretrainedConfig) -> str:
    """What a payload names as its model: the model's name and cache shape."""
    layers, heads, head_dim = kvlib.kv_shape(config)
    return f"{name}:{layers}x{heads}x{head_dim}"


# ------------------------------------------------------------------- quantisation


def _groups(kind: str, encoding: Encoding) -> tuple[int, ...]:
    """The axes of ``[1, H, S, D]`` one scale is shared along: the tokens (one scale per
    channel) or the heads and head dims (one scale per token)."""
    return (2,) if kind == "keys" and encoding.keys == "channel" else (1, 3)


def _tensor_bytes(shape: Sequence[int], kind: str, encoding: Encoding) -> int:
    """Payload bytes of one ``[1, H, S, D]`` tensor."""
    n = math.prod(shape)
    if encoding.bits is None:
        return n * kvlib.resolve_dtype(encoding.dtype).itemsize
    groups = n // math.prod(shape[a] for a in _groups(kind, encoding))
    return math.ceil(n * encoding.bits / 8) + 2 * groups * SCALE_DTYPE.itemsize


def _quantise(t: torch.Tensor, bits: int, axis: tuple[int, ...]) -> bytes:
    levels = 2**bits - 1
    x = t.float()
    lo, hi = x.amin(axis, keepdim=True), x.amax(axis, keepdim=True)
    scale, zero = ((hi - lo) / levels).to(SCALE_DTYPE), lo.to(SCALE_DTYPE)
    if not (torch.isfinite(scale).all() and torch.isfinite(zero).all()):
        raise PayloadError("Cache values exceed float16's range, so their int scales cannot be sent; use bfloat16.")
    step = scale.float().clamp_min(torch.finfo(SCALE_DTYPE).tiny)
    codes = ((x - zero.float()) / step).round().clamp(0, levels).to(torch.uint8).flatten()
    if bits == 4:
        codes = torch.cat([codes, codes.new_zeros(codes.numel() % 2)])
        codes = codes[0::2] | (codes[1::2] << 4)
    raw = (c.contiguous().view(torch.uint8).numpy().tobytes() for c in (codes, scale, zero))
    return b"".join(raw)


def _dequantise(buf: torch.Tensor, shape: list[int], bits: int, axis: tuple[int, ...]) -> torch.Tensor:
    n = math.prod(shape)
    n_codes = math.ceil(n * bits / 8)
    group_shape = [1 if a in axis else d for a, d in enumerate(shape)]
    g = math.prod(group_shape) * SCALE_DTYPE.itemsize
    codes = buf[:n_codes]
    if bits == 4:
        codes = torch.stack([codes & 0x0F, codes >> 4], dim=1).flatten()[:n]
    scale = buf[n_codes : n_codes + g].view(SCALE_DTYPE).reshape(group_shape).float()
    zero = buf[n_codes + g : n_codes + 2 * g].view(SCALE_DTYPE).reshape(group_shape).float()
    return codes.float().reshape(shape) * scale + zero


# ---------------------------------------------------------------------- encode


def encode(kv: KVCache, encoding: Encoding, model: str) -> EncodedKV:
    """One query's cache (per layer ``[1, H, S, D]``) as header + payload.

    Args:
        model: :func:`model_id` of the model whose cache this is (checked on decode).
    """
    if kv.batch_size != 1:
        raise ValueError(f"encode takes one query's cache (batch 1), got batch {kv.batch_size}; use roundtrip.")
    chunks, shapes = [], []
    for i in encoding.sent(kv.num_layers):
        for kind, t in (("keys", kv.keys[i]), ("values", kv.values[i])):
            t = t.detach().to("cpu")
            if encoding.noise:
                t = t.float() + encoding.noise * t.float().pow(2).mean().sqrt() * torch.randn(t.shape)
            shapes.append(list(t.shape))
            if encoding.bits is None:
                chunks.append(
                    t.to(kvlib.resolve_dtype(encoding.dtype)).contiguous().view(torch.uint8).numpy().tobytes()
                )
            else:
                chunks.append(_quantise(t, encoding.bits, _groups(kind, encoding)))
    payload = b"".join(chunks)
    sent = encoding.sent(kv.num_layers)
    first = [shapes[0], shapes[1]]
    unsent = {  # the zeros decode puts in an unsent layer: shaped like the first sent one, unless
        str(i): s  # (a sliding layer holding fewer positions) its own shape differs
        for i in range(kv.num_layers)
        if i not in sent and (s := [list(kv.keys[i].shape), list(kv.values[i].shape)]) != first
    }
    header = {
        "format": FORMAT, "model": model, "dtype": encoding.dtype, "keys": encoding.keys,
        "layers": sent, "noise": encoding.noise, "num_layers": kv.num_layers, "seq_len": kv.seq_len,
        "sliding": kv.sliding, "shapes": shapes, "unsent_shapes": unsent, "crc32": zlib.crc32(payload),
    }  # fmt: skip
    return EncodedKV(json.dumps(header, separators=(",", ":")).encode(), payload)


def decode(encoded: EncodedKV, model: str | None = None) -> KVCache:
    """Inverse of :func:`encode`: float32 tensors ``[1, H, S, D]`` per layer; unsent layers
    hold zeros and ``present`` False.

    Args:
        model: the :func:`model_id` expected; a payload of another model is an error.
    Raises:
        PayloadError: unreadable header, another model, wrong CRC, or a payload whose
            length differs from what the header describes.
    """
    try:
        header = json.loads(encoded.header)
        encoding = Encoding(header["dtype"], header["keys"], tuple(header["layers"]))
    except (ValueError, KeyError, TypeError) as e:
        raise PayloadError(f"Unreadable KV payload header ({e}): the payload is corrupted or not a cache.") from e
    if header.get("format") != FORMAT:
        raise PayloadError(f"KV payload format {header.get('format')!r}; this library reads format {FORMAT}.")
    if model is not None and header["model"] != model:
        raise PayloadError(f"The payload holds a cache of {header['model']}, not of {model}: another model sent it.")
    shapes = header["shapes"]
    kinds = ["keys", "values"] * len(header["layers"])
    sizes = [_tensor_bytes(s, k, encoding) for s, k in zip(shapes, kinds)]
    if sum(sizes) != len(encoded.payload):
        raise PayloadError(
            f"The KV payload has {len(encoded.payload)} bytes but its header describes {sum(sizes)}: "
            "truncated or padded."
        )
    if zlib.crc32(encoded.payload) != header["crc32"]:
        raise PayloadError("The KV payload's CRC32 does not match its header: it was corrupted in transit.")
    buf = torch.frombuffer(bytearray(encoded.payload), dtype=torch.uint8) if encoded.payload else None
    tensors, offset = [], 0
    for shape, kind, size in zip(shapes, kinds, sizes):
        part = buf[offset : offset + size]
        offset += size
        if encoding.bits is None:
            tensors.append(part.view(kvlib.resolve_dtype(encoding.dtype)).reshape(shape).float())
        else:
            tensors.append(_dequantise(part, shape, encoding.bits, _groups(kind, encoding)))
    n = header["num_layers"]
    keys, values, present = [None] * n, [None] * n, [False] * n
    for j, i in enumerate(header["layers"]):
        keys[i], values[i], present[i] = tensors[2 * j], tensors[2 * j + 1], True
    for i in range(n):
        if not present[i]:
            k_shape, v_shape = header.get("unsent_shapes", {}).get(str(i), shapes[:2])
            keys[i], values[i] = torch.zeros(k_shape), torch.zeros(v_shape)
    return KVCache(keys, values, header["seq_len"], header["sliding"], present)


def payload_bytes(config: PretrainedConfig, n_tokens: int, encoding: Encoding) -> int:
    """Payload bytes of one query's cache of ``n_tokens`` positions (every position kept)."""
    layers, heads, head_dim = kvlib.kv_shape(config)
    shape = [1, heads, n_tokens, head_dim]
    return len(encoding.sent(layers)) * sum(_tensor_bytes(shape, k, encoding) for k in ("keys", "values"))


def encode_batch(kv: KVCache, mask: torch.Tensor, encoding: Encoding, model: str) -> list[EncodedKV | None]:
    """Each query of a batch on its own: its real (left-padded) positions only.

    Args:
        kv: per layer ``[B, H, S, D]``; mask: ``[B, S]``, 1 for real tokens (a row of zeros is a
            query not sent: None).
    """
    S = mask.shape[1]
    out: list[EncodedKV | None] = []
    for b in range(mask.shape[0]):
        n = int(mask[b].sum())
        if n == 0:
            out.append(None)
            continue
        rows = [k[b : b + 1, :, S - n :] for k in kv.keys], [v[b : b + 1, :, S - n :] for v in kv.values]
        out.append(encode(KVCache(*rows, n, kv.sliding), encoding, model))
    return out


def decode_batch(
    encoded: Sequence[EncodedKV | None], model: str | None = None, width: int | None = None
) -> tuple[KVCache, torch.Tensor]:
    """Inverse of :func:`encode_batch`: the queries left padded to ``width`` (default: the
    longest), zeros on padding and on queries not sent.

    Returns:
        per layer ``[B, H, width, D]`` (float32; ``present`` from the payloads) and its mask ``[B, width]``.
    """
    decoded = [None if e is None else decode(e, model) for e in encoded]
    sent = [d for d in decoded if d is not None]
    if not sent:
        raise ValueError("decode_batch got no payload at all (every query was closed); nothing to decode.")
    width = width or max(d.seq_len for d in sent)
    first = sent[0]
    B, L = len(decoded), first.num_layers
    shape = lambda t: (B, t.shape[1], width, t.shape[3])  # noqa: E731
    keys = [torch.zeros(shape(first.keys[i])) for i in range(L)]
    values = [torch.zeros(shape(first.values[i])) for i in range(L)]
    mask = torch.zeros(B, width, dtype=torch.long)
    for b, d in enumerate(decoded):
        if d is None:
            continue
        n = d.seq_len
        if n > width or d.num_layers != L or d.present != first.present:
            raise PayloadError(f"Query {b}'s payload ({n} positions, {d.num_layers} layers) does not fit the batch.")
        for i in range(L):
            keys[i][b, :, width - n :], values[i][b, :, width - n :] = d.keys[i][0], d.values[i][0]
        mask[b, width - n :] = 1
    return KVCache(keys, values, width, list(first.sliding), list(first.present)), mask


def roundtrip(kv: KVCache, mask: torch.Tensor, encoding: Encoding, model: str) -> tuple[KVCache, list[int]]:
    """Each query of a batch encoded on its own and decoded back (:func:`encode_batch`,
    :func:`decode_batch`): what the receiver gets.

    Args:
        kv: per layer ``[B, H, S, D]``; mask: ``[B, S]``, 1 for real tokens (rows of all zeros
            are queries not sent: nothing is encoded for them).
    Returns:
        the decoded batch per layer ``[B, H, S, D]`` (float32, zeros on padding and on unsent
        rows and layers, on ``kv``'s device), and each query's payload bytes (0 for a row not sent).
    """
    encoded = encode_batch(kv, mask, encoding, model)
    sizes = [0 if e is None else e.payload_bytes for e in encoded]
    if not any(sizes):
        return kv.map(torch.zeros_like), sizes
    back, _ = decode_batch(encoded, model, width=mask.shape[1])
    return back.to(device=kv.keys[0].device), sizes


# ------------------------------------------------------------------ layer budgets


def read_layers(fuser) -> list[int]:
    """The sender layers a fuser reads (its ``layer_map``): sending only these is lossless."""
    return sorted(set(fuser.config.layer_map))


def layers_by_gate(fuser, budget: int) -> list[int]:
    """The ``budget`` sender layers whose readers' gates are most open (sum over receiver layers
    reading it of ``sigmoid`` of its K and V gate logits); ties go to the deeper layer."""
    if budget < 1:
        raise ValueError(f"A layer budget must be >= 1, got {budget}.")
    logits = fuser.gate_logits.detach().float()
    score: dict[int, float] = {}
    for t, layer in enumerate(fuser.config.layer_map):
        score[layer] = score.get(layer, 0.0) + float(torch.sigmoid(logits[t]).sum())
    ranked = sorted(score, key=lambda layer: (score[layer], layer), reverse=True)
    return sorted(ranked[:budget])
