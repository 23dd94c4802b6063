"""Inference engines: how a receiver's prompt cache is built, and greedy decoding from it.

An *engine* implements ``prefill(messages_batch, assistant_prefix=None) -> Prefill``: the
receiver's prompt ids and a cache covering every prompt token but the last. Decoding
(:func:`generate`) and scoring (``evaluate``) start from any engine's :class:`Prefill` by
feeding the last prompt token with the receiver's own weights, so the last prompt token
and every generated token use the receiver's own KV, and senders do no decoding work.

Engines here: :class:`Standalone` (receiver alone), :class:`C2C` (one sender, one fuser,
fusion at prefill only) and :class:`FedRefine` (several senders, ``residual``, ``concat`` or
``prefix`` fusion, a selection policy or learned gate from ``fedrefine_lib.gating``). The T2T
baseline's sender side is :func:`t2t_notes`.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator, Protocol, Sequence

import torch
from transformers import DynamicCache

from fedrefine_lib import data
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
            receiver layer ``[B, H, P + T-1, D]``; the last prompt token is fed by the consumer.
        trace: what building it cost.
        prefix_mask: ``[B, P]`` mask of ``P`` cache columns placed *before* the receiver's
            own prompt (``concat`` fusion: the senders' projected caches), or None (``P = 0``).
            Prefix columns take no position: the receiver's tokens keep their own positions.
        cache_bias: ``[B, P + T-1]`` added to the attention logits of every query on those
            cache columns (``concat`` fusion: ``log w`` of each column's source, so a source's
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

    def select(self, index: torch.Tensor | list[int]) -> "Prefill":
        """Rows ``index`` of the batch (e.g. one copy per answer option)."""
        idx = torch.as_tensor(index, dtype=torch.long, device=self.input_ids.device)
        prefix = None if self.prefix_mask is None else self.prefix_mask[idx]
        bias = None if self.cache_bias is None else self.cache_bias[idx]
        return Prefill(self.input_ids[idx], self.attention_mask[idx], self.cache.select(idx), self.trace, prefix, bias)


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


def sender_prefill(sender, alignment: Alignment, trace: Trace, wire_dtype: str = "bfloat16", link: str = "sender->receiver",
                   rows: torch.Tensor | None = None, last: int | None = None) -> KVCache:
    """Run the sender over its aligned prompt (every position kept) and record the bytes
    its cache takes on the wire (``kv.kv_bytes`` per sample, real tokens only).

    Args:
        rows: ``[B]`` bool, the samples whose cache is actually sent (a selection policy
            closed the others); None: all. Only those count on the wire.
        last: send only the cache of the last ``last`` prompt positions (block fusers'
            ``sender_positions``; prompts are left padded, so these are every prompt's last
            tokens); None: every position. The caller cuts the alignment to match
            (:func:`last_positions`).
    Returns:
        per sender layer ``[B, Hs, S, Ds]`` (``S = min(last, prompt width)`` with ``last``).
    """
    dev = _device(sender.model)
    with trace.time("sender_prefill"):
        cache = full_prefill(sender.model, alignment.sender_ids.to(dev), alignment.sender_mask.to(dev))
    mask = alignment.sender_mask
    if last is not None:
        cache = cache.map(lambda t: t[:, :, -last:])
        cache.seq_len = cache.keys[0].shape[2]
        mask = mask[:, -last:]
    sent = mask if rows is None else mask[rows.to(mask.device)]
    lengths = sent.sum(1).tolist()
    trace.bytes[link] = trace.bytes.get(link, 0) + sum(kvlib.kv_bytes(sender.model.config, n, wire_dtype) for n in lengths)
    trace.tokens["sender_prompt"] = trace.tokens.get("sender_prompt", 0) + int(sum(lengths))
    return cache


def last_positions(alignment: Alignment, last: int) -> Alignment:
    """The alignment of a sender that sends only its last ``last`` prompt positions: its ids
    and mask cut to ``[B, min(last, S)]`` (block fusion, where nothing is aligned)."""
    return replace(alignment, sender_ids=alignment.sender_ids[:, -last:],
                               sender_mask=alignment.sender_mask[:, -last:])


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


SenderView = Callable[[list[Messages]], list[Messages]]
"""What a sender reads, given the receiver's batch of chats (one chat back per chat)."""


def rotate(k: int = 1) -> SenderView:
    """The wrong-cache control: sample ``b`` of a batch is read by the sender as sample
    ``(b + k) mod B`` (e.g. the next question), so any gain left is the fuser's, not the
    sender cache's. Needs batches in which the shift moves every sample (``k mod B != 0``)."""

    def view(messages_batch: list[Messages]) -> list[Messages]:
        n = len(messages_batch)
        if n == 0 or k % n == 0:
            raise ValueError(
                f"rotate({k}) on a batch of {n} gives every sample its own text back, so the control would "
                "silently equal plain C2C; use a batch size (and item count) where no batch has a size "
                f"dividing {k} (e.g. drop or pad a last batch of one item)."
            )
        return [messages_batch[(b + k) % n] for b in range(n)]

    view.__name__ = f"rotate({k})"
    return view


class C2C:
    """Cache-to-cache: the sender's prompt cache, projected by the fuser, refines the
    receiver's prompt cache (all prompt tokens but the last).

    Args:
        aligner: token aligner (default: the fuser's).
        wire_dtype: dtype the sender's cache is counted in on the wire.
        sender_view: what the sender reads instead of the receiver's chats (a control
            such as :func:`rotate`); None: the same chats as the receiver.
    """

    def __init__(self, receiver, sender, fuser: torch.nn.Module, aligner: str | Aligner | None = None,
                 wire_dtype: str = "bfloat16", sender_view: SenderView | None = None):
        self.receiver, self.sender, self.fuser = receiver, sender, fuser
        core = getattr(fuser, "module", fuser)
        core.check_pair(receiver, sender)
        self.aligner = get_aligner(aligner or core.config.aligner, receiver.tokenizer, sender.tokenizer)
        self.wire_dtype = wire_dtype
        self.sender_view = sender_view
        self.link = f"{sender.name}->{receiver.name}"

    def prompt_caches(self, messages_batch: list[Messages], assistant_prefix: str | None = None) -> PromptCaches:
        """Align, then prefill sender and receiver (no gradients)."""
        trace = Trace()
        sender_batch = self.sender_view(list(messages_batch)) if self.sender_view is not None else None
        with trace.time("alignment"):  # both tokenizations and the token map
            alignment = self.aligner(messages_batch, self.receiver.tokenizer, self.sender.tokenizer, assistant_prefix,
                                     sender_messages_batch=sender_batch)
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


# ---------------------------------------------------------------- multi-sender

MODES = ("residual", "concat", "prefix")
MIN_WEIGHT = 1e-6
"""``concat``/``prefix``: weights below this count as this in ``log w`` (0 masks a block)."""


@dataclass
class MultiCaches:
    """What the frozen LLMs contribute to a multi-sender prefill (reusable across gate or
    fuser training epochs).

    Attributes:
        messages_batch: the receiver's ``B`` chats.
        receiver_ids, receiver_mask: ``[B, T]`` receiver prompt, left padded.
        receiver_cache: the receiver's own cache, per layer ``[B, Hr, T-1, Dr]``.
        alignments: per sender, its prompt (``residual``: aligned to the receiver;
            ``concat``: its own tokens, ``sender_index`` all -1); None if not run.
        sender_caches: per sender, its full cache ``[B, Hs, S_j, Ds]`` or None (closed for
            the whole batch: never run).
        trace: what building them cost.
    """

    messages_batch: list[Messages]
    receiver_ids: torch.Tensor
    receiver_mask: torch.Tensor
    receiver_cache: KVCache
    alignments: list[Alignment | None]
    sender_caches: list[KVCache | None]
    trace: Trace


class FedRefine:
    """Multi-sender FedRefine (paper Eq. 3-4): a receiver refines its prompt cache with the
    caches of several senders, each through its fuser F_{sender->receiver}, weighted per
    query by a selection policy or learned gate (``fedrefine_lib.gating``).

    Modes:
        ``residual``: ``C = C_r + sum_j w_j * Delta_j`` with ``Delta_j`` sender ``j``'s C2C
            residual (:func:`project`); senders read the receiver's text (or a
            ``sender_views`` control), aligned token by token.
        ``concat``: ``C = [P_1(C_1) ; ... ; P_S(C_S) ; C_r]`` along the sequence, each
            block with its own mask and no position of its own in the receiver
            (:attr:`Prefill.prefix_mask`); source ``j``'s weight multiplies the attention
            mass every receiver query gives its block (``log w_j`` is added to those
            attention logits, :attr:`Prefill.cache_bias`; ``w_0`` for the own prompt cache):
            1 is plain concatenation, 0 masks a sender block (the own cache is never
            masked, only down-weighted to :data:`MIN_WEIGHT`); ``P_j`` is a
            ``concat.ConcatFuser`` reading sender ``j``'s cache alone, so senders may read
            different texts (``sender_views``), with no token alignment. The receiver's own
            prompt cache is its plain prefill: only its last prompt token and the answer
            tokens read the blocks.
        ``prefix``: as ``concat``, but ``C = [P_1(C_1) ; ... ; P_S(C_S) ; C_r']`` where
            ``C_r'`` is the receiver's prompt (all tokens but the last) prefilled *on top of*
            the blocks, so every prompt token may read them (with the same ``log w_j`` on
            their columns). The receiver's prefill waits for the senders' caches instead of
            running beside them; no sender decodes. ``P_j`` is a ``concat.PrefixFuser`` (the projector of
            ``concat``, trained to be read this way).

    A weight of exactly 0 closes a source (no effect); a sender closed for every query of
    a batch is not run and sends nothing.

    Args:
        receiver: ``LoadedModel``.
        senders: ``LoadedModel``s (weight columns ``1..S`` in this order).
        fusers: sender name -> fuser, or a ``hub.FuserHub`` (loads F_{sender->receiver}
            of ``variant``; default variant ``"default"`` for residual, ``"concat"`` for concat).
        policy: ``GateQuery -> [B, 1 + S]`` weights (``gating.EqualWeights``,
            ``gating.SubsetSelection``, ``gating.LearnedGate``); None: all weights 1.
        sender_views: what senders read instead of the receiver's chats: one view for all or
            ``{sender name: view}`` (e.g. each its own rephrasing; a :func:`rotate` control).
        aligners: ``residual`` only: one aligner for all, or per sender (default: each fuser's).
        wire_dtype: dtype the sender caches are counted in on the wire.
    """

    def __init__(self, receiver, senders: Sequence, fusers, *, mode: str = "residual", policy=None,
                 variant: str | None = None, sender_views: SenderView | dict[str, SenderView] | None = None,
                 aligners: str | Aligner | dict[str, str | Aligner] | None = None, wire_dtype: str = "bfloat16"):
        from fedrefine_lib.concat import fusion_kind

        if mode not in MODES:
            raise ValueError(f"Unknown fusion mode {mode!r}; use one of {MODES}.")
        names = [s.name for s in senders]
        if len(set(names)) != len(names) or receiver.name in names:
            raise ValueError(f"Senders must be distinct models other than the receiver; got {names} for {receiver.name!r}.")
        if mode == "prefix" and any(kvlib.sliding_windows(receiver.model.config)):
            raise ValueError(f"prefix fusion prefills the receiver's prompt after the sender blocks, but {receiver.name!r} has "
                             "sliding-window layers, whose windows would count the blocks and the padding of a batch; use "
                             "concat fusion for this receiver.")
        self.receiver, self.senders, self.mode, self.policy = receiver, list(senders), mode, policy
        self.sender_names = names
        self.wire_dtype = wire_dtype
        self.fusers = [self._fuser(fusers, s, variant) for s in self.senders]
        for s, f in zip(self.senders, self.fusers):
            if fusion_kind(f) != mode:
                raise ValueError(f"The fuser {s.name}->{receiver.name} is a {fusion_kind(f)} fuser but the engine runs {mode!r} "
                                 "fusion; use fuser.C2CFuser for 'residual', concat.ConcatFuser for 'concat' and "
                                 "concat.PrefixFuser for 'prefix' (hub.FuserJob(kind=...) trains each).")
            getattr(f, "module", f).check_pair(receiver, s)
        self.views = [self._per_sender(sender_views, s.name, "sender_views") for s in self.senders]
        self.aligners = [None if mode != "residual" else get_aligner(
            self._per_sender(aligners, s.name, "aligners") or getattr(f, "module", f).config.aligner,
            receiver.tokenizer, s.tokenizer) for s, f in zip(self.senders, self.fusers)]

    def _fuser(self, fusers, sender, variant):
        if isinstance(fusers, dict):
            if sender.name not in fusers:
                raise KeyError(f"No fuser for {sender.name}->{self.receiver.name}: the fusers given are for "
                               f"{sorted(fusers)}. Give one per sender (or a FuserHub).")
            return fusers[sender.name]
        from fedrefine_lib.hub import default_variant

        return fusers.get(sender, self.receiver, variant or default_variant(self.mode))  # names a missing pair

    @staticmethod
    def _per_sender(value, name: str, what: str):
        if isinstance(value, dict):
            return value.get(name)
        return value

    @property
    def links(self) -> list[str]:
        return [f"{s}->{self.receiver.name}" for s in self.sender_names]

    # -------------------------------------------------------------- LLM work

    def _receiver(self, messages_batch: list[Messages], assistant_prefix: str | None, trace: Trace):
        with trace.time("tokenize"):
            ids, mask = encode_prompts(self.receiver.tokenizer, messages_batch, assistant_prefix)
        dev = _device(self.receiver.model)
        ids, mask = ids.to(dev), mask.to(dev)
        cache = receiver_prefill(self.receiver, ids, mask, trace)
        trace.tokens["prompt"] = trace.tokens.get("prompt", 0) + int(mask.sum())
        return ids, mask, cache

    def _senders(self, messages_batch, ids, mask, assistant_prefix, open_rows: torch.Tensor, trace: Trace):
        alignments: list[Alignment | None] = []
        caches: list[KVCache | None] = []
        for j, (sender, view, aligner, link) in enumerate(zip(self.senders, self.views, self.aligners, self.links)):
            rows = open_rows[:, j]
            if not bool(rows.any()):
                alignments.append(None)
                caches.append(None)
                continue
            sender_batch = view(list(messages_batch)) if view is not None else None
            with trace.time("alignment"):
                if aligner is None:  # concat, prefix: the sender's own tokens, nothing to align
                    s_ids, s_mask = encode_prompts(sender.tokenizer, sender_batch or messages_batch, assistant_prefix)
                    a = Alignment(ids, mask, s_ids, s_mask, torch.full_like(ids, -1))
                else:
                    a = aligner(messages_batch, self.receiver.tokenizer, sender.tokenizer, assistant_prefix,
                                sender_messages_batch=sender_batch)
                    if not torch.equal(a.receiver_ids.to(ids.device), ids):
                        raise RuntimeError(f"The {aligner.name} aligner tokenized the receiver prompt differently from "
                                           "encode_prompts; both must render with align.render.")
            a.sender_index = a.sender_index.to(ids.device)
            last = getattr(self.fusers[j], "module", self.fusers[j]).config.sender_positions
            caches.append(sender_prefill(sender, a, trace, self.wire_dtype, link, rows=rows, last=last))
            alignments.append(a if last is None else last_positions(a, last))
        return alignments, caches

    def prompt_caches(self, messages_batch: list[Messages], assistant_prefix: str | None = None,
                      open_rows: torch.Tensor | None = None) -> MultiCaches:
        """Tokenize and prefill the receiver and every sender (no gradients).

        Args:
            open_rows: ``[B, S]`` bool, which sender serves which query (None: all).
        """
        trace = Trace()
        ids, mask, cache = self._receiver(messages_batch, assistant_prefix, trace)
        if open_rows is None:
            open_rows = torch.ones(len(messages_batch), len(self.senders), dtype=torch.bool, device=ids.device)
        alignments, caches = self._senders(messages_batch, ids, mask, assistant_prefix, open_rows, trace)
        return MultiCaches(list(messages_batch), ids, mask, cache, alignments, caches, trace)

    def weights(self, messages_batch: list[Messages], receiver_cache: KVCache, receiver_mask: torch.Tensor,
                trace: Trace | None = None) -> torch.Tensor:
        """The policy's weights ``[B, 1 + S]`` (all 1 without a policy), checked."""
        from fedrefine_lib.gating import GateQuery

        B = len(messages_batch)
        trace = trace if trace is not None else Trace()
        with trace.time("gating"):
            if self.policy is None:
                w = torch.ones(B, 1 + len(self.senders), device=receiver_mask.device)
            else:
                w = self.policy(GateQuery(list(messages_batch), receiver_cache, receiver_mask, list(self.sender_names)))
        if tuple(w.shape) != (B, 1 + len(self.senders)) or not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
            raise ValueError(f"Policy {getattr(self.policy, 'name', self.policy)!r} gave weights {tuple(w.shape)}; expected "
                             f"finite, non-negative [{B}, {1 + len(self.senders)}] (own cache, then {self.sender_names}).")
        return w

    @torch.no_grad()
    def receiver_view(self, messages_batch: list[Messages]) -> tuple[KVCache, torch.Tensor]:
        """The receiver's own prompt cache (per layer ``[B, H, N, D]``) and its mask
        ``[B, N]``: what a gate sees of a query (no sender runs)."""
        _, mask, cache = self._receiver(messages_batch, None, Trace())
        return cache, mask[:, :-1]

    @torch.no_grad()
    def source_weights(self, messages_batch: list[Messages]) -> torch.Tensor:
        """The policy's weights ``[B, 1 + S]`` for a batch, from the receiver's own prefill
        only (no sender runs): what the gate decides, for inspection."""
        return self.weights(messages_batch, *self.receiver_view(messages_batch))

    # ------------------------------------------------------------ projection

    def project(self, caches: MultiCaches, trace: Trace | None = None) -> list:
        """Each run sender's projection (differentiable in the fusers when grad is on):
        ``residual``: ``(key_residuals, value_residuals)`` per receiver layer
        ``[B, Hr, T-1, Dr]``; ``concat``, ``prefix``: a block ``KVCache`` ``[B, Hr, S_j, Dr]``; None for
        senders not run. Time goes to ``trace`` (``caches.trace`` is never changed)."""
        out = []
        with (trace if trace is not None else Trace()).time("projection"):
            for fuser, a, sender_cache in zip(self.fusers, caches.alignments, caches.sender_caches):
                if sender_cache is None:
                    out.append(None)
                elif self.mode == "residual":
                    out.append(project(fuser, sender_cache, caches.receiver_cache, a.sender_index[:, :-1]))
                else:
                    dev = caches.receiver_cache.keys[0].device
                    out.append(fuser(sender_cache.to(device=dev)))
        return out

    def combine(self, caches: MultiCaches, projections: list, weights: torch.Tensor, trace: Trace | None = None) -> Prefill:
        """The weighted multi-sender prompt cache (differentiable in ``weights``).

        Args:
            weights: ``[B, 1 + S]`` (own cache, then the senders).
            trace: the call's trace so far (default: a copy of ``caches.trace``).
        """
        trace = trace if trace is not None else Trace().add(caches.trace)
        own = caches.receiver_cache
        dtype, dev = own.keys[0].dtype, own.keys[0].device
        w = weights.to(device=dev)
        for j, p in enumerate(projections):
            if p is None and bool((w[:, 1 + j] > 0).any()):
                raise ValueError(f"Sender {self.sender_names[j]} was not run but has a non-zero weight; run "
                                 "prompt_caches with open_rows covering every query it serves.")
        with trace.time("combine"):
            if self.mode == "residual":
                keys, values = list(own.keys), list(own.values)
                for j, p in enumerate(projections):
                    if p is None:
                        continue
                    scale = w[:, 1 + j, None, None, None].to(dtype)
                    keys = [k + scale * d for k, d in zip(keys, p[0])]
                    values = [v + scale * d for v, d in zip(values, p[1])]
                cache = KVCache(keys, values, own.seq_len, list(own.sliding))
                return Prefill(caches.receiver_ids, caches.receiver_mask, cache, trace)
            # concat, prefix: a source's weight multiplies the attention mass it gets (log w on its columns).
            log_w = torch.log(w.float().clamp_min(MIN_WEIGHT))
            blocks, masks, biases = [], [], []
            for j, (p, a) in enumerate(zip(projections, caches.alignments)):
                if p is None:
                    continue
                blocks.append(p)
                masks.append(a.sender_mask.to(dev) * (w[:, 1 + j] > 0).to(a.sender_mask.dtype)[:, None])
                biases.append(log_w[:, 1 + j, None].expand(-1, p.seq_len))
            prefix = torch.cat(masks, dim=1) if masks else caches.receiver_mask[:, :0]
        if self.mode == "prefix" and blocks:  # its own stage: a second receiver prefill
            own = self._prefill_on(caches, _stack(blocks, dtype), prefix, torch.cat(biases, dim=1), trace)
        with trace.time("combine"):
            blocks.append(own)
            biases.append(log_w[:, 0, None].expand(-1, own.seq_len))
            cache = _stack(blocks, dtype)
            cache.sliding = list(own.sliding)
            return Prefill(caches.receiver_ids, caches.receiver_mask, cache, trace, prefix, torch.cat(biases, dim=1))

    def _prefill_on(self, caches: MultiCaches, senders: KVCache, prefix_mask: torch.Tensor, bias: torch.Tensor,
                    trace: Trace) -> KVCache:
        """``prefix``: the receiver's prompt (all tokens but the last) prefilled on top of the
        sender blocks ``senders`` (per layer ``[B, Hr, P, Dr]``, ``prefix_mask`` ``[B, P]``,
        ``bias`` ``[B, P]`` the ``log w`` of their columns); differentiable in the blocks.

        Returns:
            the receiver's prompt KV, per layer ``[B, Hr, T-1, Dr]`` (the blocks not included).
        """
        model, own = self.receiver.model, caches.receiver_cache
        ids, mask = caches.receiver_ids, caches.receiver_mask
        P = senders.seq_len
        with trace.time("receiver_prefill_on_senders"):
            _, cache = forward(model, ids[:, :-1], torch.cat([prefix_mask.to(mask), mask[:, :-1]], dim=1),
                               senders.to_cache(), prefix_mask, bias)  # plain layers: every position kept
        out = KVCache.from_cache(cache)
        return KVCache([k[:, :, P:] for k in out.keys], [v[:, :, P:] for v in out.values], own.seq_len, list(own.sliding))

    def fuse(self, caches: MultiCaches, weights: torch.Tensor | None = None) -> Prefill:
        """Project and combine (``train.train_fuser`` calls this with the single sender's
        fuser trainable); ``weights`` default to the policy's."""
        trace = Trace().add(caches.trace)
        if weights is None:
            weights = self.weights(caches.messages_batch, caches.receiver_cache, caches.receiver_mask[:, :-1], trace)
        return self.combine(caches, self.project(caches, trace), weights, trace)

    def prefill(self, messages_batch: list[Messages], assistant_prefix: str | None = None) -> Prefill:
        """Receiver prefill, the policy's weights, then only the senders it opens."""
        trace = Trace()
        ids, mask, cache = self._receiver(messages_batch, assistant_prefix, trace)
        w = self.weights(messages_batch, cache, mask[:, :-1], trace)
        alignments, sender_caches = self._senders(messages_batch, ids, mask, assistant_prefix, w[:, 1:] > 0, trace)
        caches = MultiCaches(list(messages_batch), ids, mask, cache, alignments, sender_caches, trace)
        return self.combine(caches, self.project(caches, trace), w, trace)


def _stack(blocks: Sequence[KVCache], dtype: torch.dtype) -> KVCache:
    """Caches placed one after another along the sequence, per layer ``[B, H, sum S_i, D]``."""
    layers = range(blocks[0].num_layers)
    keys = [torch.cat([b.keys[t].to(dtype) for b in blocks], dim=2) for t in layers]
    values = [torch.cat([b.values[t].to(dtype) for b in blocks], dim=2) for t in layers]
    return KVCache(keys, values, keys[0].shape[2])


def pair_engine(receiver, sender, fuser: torch.nn.Module, sender_view: SenderView | None = None):
    """The one-sender engine for ``fuser``, whatever its kind: :class:`C2C` for a residual
    ``fuser.C2CFuser``, :class:`FedRefine` in the fuser's mode for a ``concat.ConcatFuser``
    (``concat``) or ``concat.PrefixFuser`` (``prefix``).

    Args:
        sender_view: what the sender reads instead of the receiver's chats (e.g. the
            :func:`rotate` wrong-cache control); None: the same chats.
    """
    from fedrefine_lib.concat import fusion_kind, is_concat

    if is_concat(fuser):
        return FedRefine(receiver, [sender], {sender.name: fuser}, mode=fusion_kind(fuser), sender_views=sender_view)
    return C2C(receiver, sender, fuser, sender_view=sender_view)


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
    mask = prefill.full_mask
    if continuation is not None:
        ids = torch.cat([ids, continuation.to(ids.device)], dim=1)
        cm = continuation_mask if continuation_mask is not None else torch.ones_like(continuation)
        mask = torch.cat([mask, cm.to(mask)], dim=1)
    logits, _ = forward(model, ids, mask, prefill.cache.to_cache(model.config), prefill.prefix_mask, prefill.cache_bias)
    return logits


def forward(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache,
            prefix_mask: torch.Tensor | None = None, cache_bias: torch.Tensor | None = None):
    """``kv.forward`` continuing a cache whose first ``P`` columns are a position-less
    prefix (``prefix_mask`` ``[B, P]``): the new tokens' positions do not count it.

    Args:
        input_ids: ``[B, new]``; attention_mask: ``[B, P + past + new]``.
        cache_bias: ``[B, C]`` added to every new token's attention logits on the first
            ``C`` cache columns (see :func:`biased_attention_mask`), or None.
    Returns:
        logits ``[B, new, vocab]`` and the updated transformers cache.
    """
    if prefix_mask is None and cache_bias is None:
        return kvlib.forward(model, input_ids, attention_mask, cache)
    past = cache.get_seq_length()
    shift = 0 if prefix_mask is None else prefix_mask.to(attention_mask).sum(1, keepdim=True)
    positions = (kvlib.position_ids_from_mask(attention_mask, past) - shift).clamp(min=0)
    mask = attention_mask
    if cache_bias is not None:
        mask = _biased_masks(model, cache, attention_mask, input_ids.shape[1], cache_bias)
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
    return out.logits, out.cache


def _biased_masks(model: torch.nn.Module, cache, attention_mask: torch.Tensor, new: int, bias: torch.Tensor):
    """The 4D mask(s) for :func:`forward`: one for full attention, and for a model with
    sliding-window layers (``config.layer_types``) the mapping transformers takes, whose
    sliding mask keeps the window and covers only the columns those layers still hold."""
    full = biased_attention_mask(attention_mask, new, bias, model.dtype)  # [B, 1, new, L]
    windows = kvlib.sliding_windows(model.config)
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


def biased_attention_mask(attention_mask: torch.Tensor, new: int, bias: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
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
    rows, trace = generate_ids(engine, messages_batch, max_new_tokens, assistant_prefix)
    tok = engine.receiver.tokenizer
    return [tok.decode(row, skip_special_tokens=True) for row in rows], trace


@torch.no_grad()
def generate_ids(
    engine: Engine, messages_batch: list[Messages], max_new_tokens: int = 32, assistant_prefix: str | None = None
) -> tuple[list[list[int]], Trace]:
    """Greedy decoding like :func:`generate`, returning token ids.

    Returns:
        per prompt, the generated ids up to (not including) the first end-of-turn token,
        and the trace; ``trace.tokens["generated"]`` is the total of those ids.
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
        step_ids, mask = pre.input_ids[:, -1:], pre.full_mask
        for _ in range(max_new_tokens):
            logits, cache = forward(model, step_ids, mask, cache, pre.prefix_mask, pre.cache_bias)
            nxt = logits[:, -1].argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            generated.append(nxt)
            done |= torch.isin(nxt, stops)
            if bool(done.all()):
                break
            step_ids = nxt[:, None]
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    rows = torch.stack(generated, 1).tolist() if generated else [[] for _ in range(B)]
    stop_set = set(stops.tolist())
    out = [row[: next((i for i, t in enumerate(row) if t in stop_set), len(row))] for row in rows]
    trace.tokens["generated"] = sum(len(r) for r in out)
    return out, trace


# ----------------------------------------------------------------------------- T2T

TOKEN_ID_BYTES = 4
"""Bytes of one token id on the wire (an int32), the text payload of T2T."""


@torch.no_grad()
def t2t_notes(
    senders: Sequence, items: Sequence[dict], *, receiver: str | object = "receiver", max_new_tokens: int = 32,
    batch_size: int = 8, stems: Sequence[str] | dict[str, Sequence[str]] | None = None, progress: bool = True,
) -> tuple[list[str], list[list[str]], Trace]:
    """The T2T baseline's sender side (DESIGN §2): each sender writes background text for
    each question stem (no options; ``data.background_messages``, greedy, its own template),
    and the receiver later reads all senders' texts as one context note::

        notes, texts, trace = t2t_notes(senders, items, receiver=receiver)
        result = evaluate.score_mcq(receiver, items, contexts=notes)  # receiver side
        total = Trace().add(trace).add(result.trace)

    Args:
        senders: ``LoadedModel``s (in the order their texts appear in the note).
        items: MCQ items (``question_stem`` is read).
        receiver: the receiver (or its name), for the link names ``"<sender>-><receiver>"``.
        stems: what the senders read instead of ``question_stem``: one list for every
            sender (e.g. the receiver's rephrasing) or a dict sender name -> list.
    Returns:
        per item the context note (``data.context_note``), per item the senders' texts,
        and the trace: stages ``sender_prefill`` (tokenize + prefill) and ``sender_decode``;
        bytes per link = generated token ids x :data:`TOKEN_ID_BYTES`; tokens
        ``sender_generated``.
    """
    from tqdm.auto import tqdm

    r_name = getattr(receiver, "name", receiver)
    trace = Trace()
    texts: list[list[str]] = [[] for _ in items]
    stages = {"tokenize": "sender_prefill", "receiver_prefill": "sender_prefill", "decode": "sender_decode"}
    for sender in senders:
        own = _sender_stems(stems, sender.name, items)
        engine = Standalone(sender)
        n_ids = 0
        for i in tqdm(range(0, len(items), batch_size), desc=f"T2T {sender.name}", disable=not progress):
            batch = [data.background_messages(s) for s in own[i : i + batch_size]]
            rows, t = generate_ids(engine, batch, max_new_tokens)
            for stage, seconds in t.seconds.items():
                key = stages.get(stage)
                if key is None:
                    raise RuntimeError(f"Unexpected stage {stage!r} in a sender's generation trace; map it in t2t_notes.")
                trace.seconds[key] = trace.seconds.get(key, 0.0) + seconds
            for j, row in enumerate(rows):
                texts[i + j].append(sender.tokenizer.decode(row, skip_special_tokens=True).strip())
            n_ids += sum(len(r) for r in rows)
        link = f"{sender.name}->{r_name}"
        trace.bytes[link] = trace.bytes.get(link, 0) + n_ids * TOKEN_ID_BYTES
        trace.tokens["sender_generated"] = trace.tokens.get("sender_generated", 0) + n_ids
    return [data.context_note(t) for t in texts], texts, trace


def _sender_stems(stems, sender: str, items: Sequence[dict]) -> list[str]:
    if stems is None:
        return [it["question_stem"] for it in items]
    if isinstance(stems, dict):
        if sender not in stems:
            raise KeyError(f"stems has no entry for sender {sender!r} (it has {sorted(stems)}); give one list per sender.")
        stems = stems[sender]
    if len(stems) != len(items):
        raise ValueError(f"Got {len(stems)} stems for {len(items)} items; give one stem per item.")
    return list(stems)
