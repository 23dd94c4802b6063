"""Inference engines: how a receiver's prompt cache is built, and greedy decoding from it.

An *engine* implements ``prefill(messages_batch, assistant_prefix=None) -> Prefill``: the
receiver's prompt ids and a cache covering every prompt token but the last. Decoding
(:func:`generate`) and scoring (``evaluate``) start from any engine's :class:`Prefill` by
feeding the last prompt token with the receiver's own weights, so the last prompt token
and every generated token use the receiver's own KV, and senders do no decoding work.

Engines here: :class:`Standalone` (receiver alone) and :class:`C2C` (one sender, one fuser,
fusion at prefill only). Multi-sender engines reuse :func:`sender_prefill` and
:func:`project` (one sender's projected residual) and combine residuals their own way.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Protocol

import torch
from transformers import DynamicCache

from fedrefine_lib import kv as kvlib
from fedrefine_lib.align import Aligner, Alignment, Messages, align_cache, encode_prompts, get_aligner
from fedrefine_lib.kv import KVCache

# --------------------------------------------------------------------------- trace


@dataclass
class Trace:
    """What one call cost.

    Attributes:
        seconds: per stage (``tokenize`` or ``alignment``, ``sender_prefill``,
            ``receiver_prefill``, ``projection``, ``decode``, ...), wall-clock seconds.
        bytes: per link (``"sender->receiver"``), bytes the transmitted caches take on the wire.
        tokens: counts (``prompt``, ``sender_prompt``, ``generated``), real tokens only.
    """

    seconds: dict[str, float] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)

    @property
    def total_seconds(self) -> float:
        return sum(self.seconds.values())

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())

    def add(self, other: "Trace") -> "Trace":
        """Accumulate ``other`` into this trace (in place); returns self."""
        for mine, theirs in ((self.seconds, other.seconds), (self.bytes, other.bytes), (self.tokens, other.tokens)):
            for k, v in theirs.items():
                mine[k] = mine.get(k, 0) + v
        return self

    @contextmanager
    def time(self, stage: str) -> Iterator[None]:
        """Add the wall-clock time of the ``with`` body to ``stage`` (synchronising CUDA)."""
        _sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            _sync()
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start

    def to_dict(self) -> dict:
        return {"seconds": dict(self.seconds), "total_seconds": self.total_seconds,
                "bytes": dict(self.bytes), "total_bytes": self.total_bytes, "tokens": dict(self.tokens)}


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


# ------------------------------------------------------------------------- prefill


@dataclass
class Prefill:
    """A receiver prompt ready to continue.

    Attributes:
        input_ids, attention_mask: ``[B, T]`` receiver prompt, left padded.
        cache: KV of the first ``T - 1`` prompt tokens (fused for C2C), one entry per
            receiver layer ``[B, H, T-1, D]``; the last prompt token is fed by the consumer.
        trace: what building it cost.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    cache: KVCache
    trace: Trace

    def select(self, index: torch.Tensor | list[int]) -> "Prefill":
        """Rows ``index`` of the batch (e.g. one copy per answer option)."""
        idx = torch.as_tensor(index, dtype=torch.long, device=self.input_ids.device)
        return Prefill(self.input_ids[idx], self.attention_mask[idx], self.cache.select(idx), self.trace)


class Engine(Protocol):
    """Builds receiver prompt caches. ``receiver`` is a ``models.LoadedModel``."""

    receiver: object

    def prefill(self, messages_batch: list[Messages], assistant_prefix: str | None = None) -> Prefill: ...


def full_prefill(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> KVCache:
    """Prefill without gradients keeping *every* position on every layer (sliding-window
    layers included; the attention itself still uses the model's own masks).

    Args:
        input_ids, attention_mask: ``[B, S]``, left padded.
    Returns:
        per layer ``[B, H, S, D]``.
    """
    with torch.no_grad():
        _, cache = kvlib.forward(model, input_ids, attention_mask, DynamicCache())
    out = KVCache.from_cache(cache)
    out.sliding = [bool(w) for w in kvlib.sliding_windows(model.config)]
    return out


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def receiver_prefill(receiver, input_ids: torch.Tensor, attention_mask: torch.Tensor, trace: Trace) -> KVCache:
    """The receiver's own cache of all prompt tokens but the last, ``[B, H, T-1, D]``."""
    if input_ids.shape[1] < 2:
        raise ValueError("A prompt needs at least two tokens (the cache covers all but the last).")
    with trace.time("receiver_prefill"):
        return full_prefill(receiver.model, input_ids[:, :-1], attention_mask[:, :-1])


class Standalone:
    """The receiver alone: its own prompt cache."""

    def __init__(self, receiver):
        self.receiver = receiver

    def prefill(self, messages_batch: list[Messages], assistant_prefix: str | None = None) -> Prefill:
        trace = Trace()
        with trace.time("tokenize"):
            ids, mask = encode_prompts(self.receiver.tokenizer, messages_batch, assistant_prefix)
        dev = _device(self.receiver.model)
        ids, mask = ids.to(dev), mask.to(dev)
        cache = receiver_prefill(self.receiver, ids, mask, trace)
        trace.tokens["prompt"] = int(mask.sum())
        return Prefill(ids, mask, cache, trace)


# --------------------------------------------------------------------------- C2C


def sender_prefill(sender, alignment: Alignment, trace: Trace, wire_dtype: str = "bfloat16", link: str = "sender->receiver") -> KVCache:
    """Run the sender over its aligned prompt (every position kept) and record the bytes
    its cache takes on the wire (``kv.kv_bytes`` per sample, real tokens only)."""
    dev = _device(sender.model)
    with trace.time("sender_prefill"):
        cache = full_prefill(sender.model, alignment.sender_ids.to(dev), alignment.sender_mask.to(dev))
    lengths = alignment.sender_mask.sum(1).tolist()
    trace.bytes[link] = trace.bytes.get(link, 0) + sum(kvlib.kv_bytes(sender.model.config, n, wire_dtype) for n in lengths)
    trace.tokens["sender_prompt"] = trace.tokens.get("sender_prompt", 0) + int(sum(lengths))
    return cache


def project(
    fuser: torch.nn.Module, sender_cache: KVCache, receiver_cache: KVCache, sender_index: torch.Tensor
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One sender's projected residual on the receiver's cache.

    Args:
        fuser: a ``C2CFuser`` (possibly wrapped by Accelerate/DDP).
        sender_cache: full sender cache ``[B, Hs, S, Ds]`` per sender layer.
        receiver_cache: receiver cache ``[B, Hr, N, Dr]`` per receiver layer.
        sender_index: ``[B, N]`` sender column per receiver position (``-1``: none).
    Returns:
        ``(key_residuals, value_residuals)``, per receiver layer ``[B, Hr, N, Dr]``.
    """
    config = getattr(fuser, "module", fuser).config
    dev = receiver_cache.keys[0].device
    aligned, fuse_mask = align_cache(sender_cache, sender_index.to(sender_cache.keys[0].device), config.layer_map)
    aligned = aligned.to(device=dev)
    return fuser(aligned, receiver_cache, fuse_mask.to(dev))


def add_residuals(cache: KVCache, residuals: tuple[list[torch.Tensor], list[torch.Tensor]]) -> KVCache:
    """``cache + residual`` layer by layer (keys and values)."""
    dk, dv = residuals
    return KVCache([k + d for k, d in zip(cache.keys, dk)], [v + d for v, d in zip(cache.values, dv)],
                   cache.seq_len, list(cache.sliding))


@dataclass
class PromptCaches:
    """Everything the frozen LLMs contribute to a C2C prefill (reusable across fuser
    training epochs): the alignment, the sender's full cache, the receiver's own cache."""

    alignment: Alignment
    sender_cache: KVCache
    receiver_cache: KVCache
    trace: Trace

    def to(self, device: torch.device | str) -> "PromptCaches":
        a = self.alignment
        al = Alignment(*(t.to(device) for t in (a.receiver_ids, a.receiver_mask, a.sender_ids, a.sender_mask, a.sender_index)))
        return PromptCaches(al, self.sender_cache.to(device=device), self.receiver_cache.to(device=device), self.trace)


class C2C:
    """Cache-to-cache: the sender's prompt cache, projected by the fuser, refines the
    receiver's prompt cache (all prompt tokens but the last)."""

    def __init__(self, receiver, sender, fuser: torch.nn.Module, aligner: str | Aligner | None = None,
                 wire_dtype: str = "bfloat16"):
        self.receiver, self.sender, self.fuser = receiver, sender, fuser
        core = getattr(fuser, "module", fuser)
        core.check_pair(receiver, sender)
        self.aligner = get_aligner(aligner or core.config.aligner, receiver.tokenizer, sender.tokenizer)
        self.wire_dtype = wire_dtype
        self.link = f"{sender.name}->{receiver.name}"

    def prompt_caches(self, messages_batch: list[Messages], assistant_prefix: str | None = None) -> PromptCaches:
        """Align, then prefill sender and receiver (no gradients)."""
        trace = Trace()
        with trace.time("alignment"):  # both tokenizations and the token map
            alignment = self.aligner(messages_batch, self.receiver.tokenizer, self.sender.tokenizer, assistant_prefix)
        dev = _device(self.receiver.model)
        alignment.receiver_ids, alignment.receiver_mask = alignment.receiver_ids.to(dev), alignment.receiver_mask.to(dev)
        sender_cache = sender_prefill(self.sender, alignment, trace, self.wire_dtype, self.link)
        receiver_cache = receiver_prefill(self.receiver, alignment.receiver_ids, alignment.receiver_mask, trace)
        trace.tokens["prompt"] = int(alignment.receiver_mask.sum())
        return PromptCaches(alignment, sender_cache, receiver_cache, trace)

    def fuse(self, caches: PromptCaches) -> Prefill:
        """Apply the fuser (differentiable in the fuser's parameters when grad is enabled)."""
        trace = Trace().add(caches.trace)
        a = caches.alignment
        with trace.time("projection"):
            residuals = project(self.fuser, caches.sender_cache, caches.receiver_cache, a.sender_index[:, :-1])
            fused = add_residuals(caches.receiver_cache, residuals)
        return Prefill(a.receiver_ids, a.receiver_mask, fused, trace)

    def prefill(self, messages_batch: list[Messages], assistant_prefix: str | None = None) -> Prefill:
        return self.fuse(self.prompt_caches(messages_batch, assistant_prefix))


# ------------------------------------------------------------------------ decoding


def continue_prefill(
    model: torch.nn.Module, prefill: Prefill, continuation: torch.Tensor | None = None,
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
    mask = prefill.attention_mask
    if continuation is not None:
        ids = torch.cat([ids, continuation.to(ids.device)], dim=1)
        cm = continuation_mask if continuation_mask is not None else torch.ones_like(continuation)
        mask = torch.cat([mask, cm.to(mask)], dim=1)
    logits, _ = kvlib.forward(model, ids, mask, prefill.cache.to_cache(model.config))
    return logits


def stop_token_ids(receiver) -> set[int]:
    """End-of-turn ids: the tokenizer's eos and the generation config's eos ids."""
    ids = set()
    for value in (receiver.tokenizer.eos_token_id, getattr(getattr(receiver.model, "generation_config", None), "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(value)
    return ids


@torch.no_grad()
def generate(
    engine: Engine, messages_batch: list[Messages], max_new_tokens: int = 32, assistant_prefix: str | None = None
) -> tuple[list[str], Trace]:
    """Greedy decoding from the engine's prompt cache; batched with left padding.

    Returns:
        the generated texts (up to the first end-of-turn token, special tokens dropped)
        and the trace (the engine's prefill stages plus ``decode``).
    """
    receiver = engine.receiver
    model, tok = receiver.model, receiver.tokenizer
    pre = engine.prefill(messages_batch, assistant_prefix)
    trace = Trace().add(pre.trace)
    stops = torch.tensor(sorted(stop_token_ids(receiver)), dtype=torch.long, device=pre.input_ids.device)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    B = pre.input_ids.shape[0]
    done = torch.zeros(B, dtype=torch.bool, device=pre.input_ids.device)
    generated: list[torch.Tensor] = []
    with trace.time("decode"):
        cache = pre.cache.to_cache(model.config)
        step_ids, mask = pre.input_ids[:, -1:], pre.attention_mask
        for _ in range(max_new_tokens):
            logits, cache = kvlib.forward(model, step_ids, mask, cache)
            nxt = logits[:, -1].argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            generated.append(nxt)
            done |= torch.isin(nxt, stops)
            if bool(done.all()):
                break
            step_ids = nxt[:, None]
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    texts = []
    rows = torch.stack(generated, 1).tolist() if generated else [[] for _ in range(B)]
    stop_set = set(stops.tolist())
    n_new = 0
    for row in rows:
        cut = next((i for i, t in enumerate(row) if t in stop_set), len(row))
        n_new += cut
        texts.append(tok.decode(row[:cut], skip_special_tokens=True))
    trace.tokens["generated"] = n_new
    return texts, trace
