"""Engines: how a receiver's prompt cache is built before it answers.

An *engine* implements ``prefill(messages_batch, assistant_prefix=None) -> Prefill``: the
receiver's prompt ids and a cache covering every prompt token but the last. Decoding
(``decode.generate``) and scoring (``evaluate``) continue any engine's :class:`Prefill` by
feeding the last prompt token with the receiver's own weights (:func:`continue_prefill`), so
the last prompt token and every generated token use the receiver's own KV, and senders do
no decoding work.

This module holds the pieces every engine shares: :func:`prefill` (a prompt cache with every
position kept), :func:`receiver_prefill`, :func:`sender_prefill` (with the bytes it puts on
the wire) and :class:`Standalone` (the receiver alone). ``federation`` holds the fusion
engine (``FedRefine``, and ``C2C``: FedRefine with one sender).

Shapes: ``B`` prompts; receiver prompt ``[B, T]``; sender prompt ``[B, S]``; a cache holds
``[B, H, N, D]`` per layer (``H`` KV heads, ``D`` head dim); ``P`` prefix columns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import DynamicCache

from fedrefine_lib import kv as kvlib
from fedrefine_lib import transport as codec
from fedrefine_lib.align import Alignment
from fedrefine_lib.kv import KVCache
from fedrefine_lib.prompts import Messages, encode_prompts, holder_view, shared_view
from fedrefine_lib.trace import Trace


@dataclass
class Prefill:
    """A receiver prompt ready to continue.

    Attributes:
        input_ids, attention_mask: ``[B, T]`` receiver prompt, left padded.
        cache: KV of the first ``T - 1`` prompt tokens (fused for C2C), one entry per
            receiver layer ``[B, H, P + T-1, D]``; the last prompt token is fed by the consumer.
        trace: what building it cost.
        prefix_mask: ``[B, P]`` mask of ``P`` cache columns placed *before* the receiver's
            own prompt (block fusion: the senders' projected caches), or None (``P = 0``).
            Prefix columns take no position: the receiver's tokens keep their own positions.
        cache_bias: ``[B, P + T-1]`` added to the attention logits of every query on those
            cache columns (block fusion: ``log w`` of each column's source, so a source's
            weight multiplies the attention mass it gets), or None (no bias).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    cache: KVCache
    trace: Trace
    prefix_mask: torch.Tensor | None = None
    cache_bias: torch.Tensor | None = None

    @property
    def full_mask(self) -> torch.Tensor:
        """``[B, P + T]``: the mask over the cache columns and the last prompt token."""
        if self.prefix_mask is None:
            return self.attention_mask
        return torch.cat([self.prefix_mask.to(self.attention_mask), self.attention_mask], dim=1)

    def select(self, index: torch.Tensor | list[int]) -> Prefill:
        """Rows ``index`` of the batch (e.g. one copy per answer option)."""
        idx = torch.as_tensor(index, dtype=torch.long, device=self.input_ids.device)
        prefix = None if self.prefix_mask is None else self.prefix_mask[idx]
        bias = None if self.cache_bias is None else self.cache_bias[idx]
        return Prefill(self.input_ids[idx], self.attention_mask[idx], self.cache.select(idx), self.trace, prefix, bias)


class Engine(Protocol):
    """Builds receiver prompt caches. ``receiver`` is a ``models.LoadedModel``."""

    receiver: object

    def prefill(self, messages_batch: list[Messages], assistant_prefix: str | None = None) -> Prefill: ...


def device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def prefill(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> KVCache:
    """Prefill without gradients keeping *every* position on every layer (sliding-window
    layers included; the attention itself still uses the model's own masks).

    Args:
        input_ids, attention_mask: ``[B, S]``, left padded.
    Returns:
        per layer ``[B, H, S, D]``.
    """
    with torch.no_grad():
        _, cache = kvlib.forward(model, input_ids, attention_mask, DynamicCache(), logits_to_keep=1)  # cache only
    out = KVCache.from_cache(cache)
    out.sliding = [bool(w) for w in kvlib.sliding_windows(model.config)]
    return out


def receiver_prefill(receiver, input_ids: torch.Tensor, attention_mask: torch.Tensor, trace: Trace) -> KVCache:
    """The receiver's own cache of all prompt tokens but the last, ``[B, H, T-1, D]``."""
    if input_ids.shape[1] < 2:
        raise ValueError("A prompt needs at least two tokens (the cache covers all but the last).")
    with trace.time("receiver_prefill"):
        return prefill(receiver.model, input_ids[:, :-1], attention_mask[:, :-1])


def sender_prefill(
    sender,
    alignment: Alignment,
    trace: Trace,
    wire_dtype: str = "bfloat16",
    link: str = "sender->receiver",
    rows: torch.Tensor | None = None,
    last: int | None = None,
    transport: codec.Encoding | None = None,
) -> KVCache:
    """Run the sender over its prompt (every position kept) and record the bytes its cache
    takes on the wire: with a ``transport`` encoding, each query's exact payload, and the cache
    returned is the decoded one (what a receiver gets, with the encoding's loss); without,
    ``kv.kv_bytes`` per sample at ``wire_dtype`` (real tokens only) and the cache as computed.

    Args:
        rows: ``[B]`` bool, the samples whose cache is actually sent (a selection policy
            closed the others); None: all. Only those count on the wire.
        last: send only the cache of the last ``last`` prompt positions (block fusers'
            ``sender_positions``; prompts are left padded, so these are every prompt's last
            tokens); None: every position. The caller cuts the alignment to match
            (``Alignment.last``).
    Returns:
        per sender layer ``[B, Hs, S, Ds]`` (``S = min(last, prompt width)`` with ``last``).
    """
    dev, name = device_of(sender.model), getattr(sender, "name", "sender")
    with trace.time_sender("sender_prefill", name):
        cache = prefill(sender.model, alignment.sender_ids.to(dev), alignment.sender_mask.to(dev))
    mask = alignment.sender_mask
    if last is not None:
        cache = cache.map(lambda t: t[:, :, -last:])
        cache.seq_len = cache.keys[0].shape[2]
        mask = mask[:, -last:]
    sent = mask if rows is None else mask * rows.to(mask.device)[:, None].to(mask.dtype)
    lengths = sent.sum(1).tolist()
    if transport is None:
        trace.count("bytes", link, sum(kvlib.kv_bytes(sender.model.config, n, wire_dtype) for n in lengths))
    else:
        with trace.time_sender("transport_codec", name):
            cache, sizes = codec.roundtrip(cache, sent, transport, codec.model_id(name, sender.model.config))
        trace.count("bytes", link, sum(sizes))
    trace.count("tokens", "sender_prompt", int(sum(lengths)))
    return cache


def encode_receiver(
    receiver, messages_batch: list[Messages], assistant_prefix: str | None, trace: Trace, holds_context: bool = False
):
    """The receiver's prompt ``[B, T]`` (ids, mask; on its device) and its own cache of all
    tokens but the last; counts the prompt tokens.

    Args:
        holds_context: the chats' private context is on this model's device, so it reads it
            (``prompts.holder_view``); otherwise it is dropped (``prompts.shared_view``).
    """
    view = holder_view if holds_context else shared_view
    with trace.time("tokenize"):
        ids, mask = encode_prompts(receiver.tokenizer, [view(m) for m in messages_batch], assistant_prefix)
    dev = device_of(receiver.model)
    ids, mask = ids.to(dev), mask.to(dev)
    cache = receiver_prefill(receiver, ids, mask, trace)
    trace.count("tokens", "prompt", int(mask.sum()))
    return ids, mask, cache


class Standalone:
    """One model alone: its own prompt cache.

    Args:
        holds_context: the model runs on the device holding the chats' private context and
            reads it (a sender answering or writing T2T text); False (the receiver alone):
            it never sees it.
    """

    def __init__(self, receiver, holds_context: bool = False):
        self.receiver, self.holds_context = receiver, holds_context

    def prefill(self, messages_batch: list[Messages], assistant_prefix: str | None = None) -> Prefill:
        trace = Trace()
        ids, mask, cache = encode_receiver(self.receiver, messages_batch, assistant_prefix, trace, self.holds_context)
        return Prefill(ids, mask, cache, trace)


def continue_prefill(
    model: torch.nn.Module,
    prefill: Prefill,
    continuation: torch.Tensor | None = None,
    continuation_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits after feeding the last prompt token (+ an optional continuation) on the prefill cache.

    Args:
        continuation: ``[B, L]`` tokens after the prompt (right padded), or None.
        continuation_mask: ``[B, L]``, 1 for real continuation tokens.
    Returns:
        ``[B, 1 + L, vocab]``: position 0 predicts the first continuation token.
    """
    ids = prefill.input_ids[:, -1:]
    mask = prefill.full_mask
    if continuation is not None:
        ids = torch.cat([ids, continuation.to(ids.device)], dim=1)
        cm = continuation_mask if continuation_mask is not None else torch.ones_like(continuation)
        mask = torch.cat([mask, cm.to(mask)], dim=1)
    cache = prefill.cache.to_cache(model.config)
    logits, _ = kvlib.forward(model, ids, mask, cache, prefill.prefix_mask, prefill.cache_bias)
    return logits
