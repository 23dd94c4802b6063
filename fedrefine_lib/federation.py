"""The fusion engine: a receiver refines its prompt cache with the caches of 1..N senders
(paper Eq. 3-4), each through its fuser F_{sender->receiver}, weighted per query by a policy.

:class:`FedRefine` is the one engine; :func:`C2C` is FedRefine with one sender and every
weight 1 (the paper's cache-to-cache). The fusers' kind sets the fusion mode:

``residual``: ``C = C_r + sum_j w_j * Delta_j`` with ``Delta_j`` sender ``j``'s C2C residual
    (:func:`project`); senders read the receiver's text (or a ``sender_views`` control),
    aligned token by token.
``concat``: ``C = [F_1(C_1) ; ... ; F_J(C_J) ; C_r]`` along the sequence, each block with its
    own mask and no position of its own in the receiver (``Prefill.prefix_mask``); source
    ``j``'s weight multiplies the attention mass every receiver query gives its block
    (``log w_j`` on those attention logits, ``Prefill.cache_bias``; ``w_0`` for the own
    prompt cache): 1 is plain concatenation, 0 masks a sender block (the own cache is never
    masked, only down-weighted to :data:`MIN_WEIGHT`). The fuser ``F_j`` reads sender ``j``'s cache
    alone, so senders may read different texts, with no token alignment. Only the
    receiver's last prompt token and the answer tokens read the blocks.
``prefix``: as ``concat``, but the receiver's prompt (all tokens but the last) is prefilled
    *on top of* the blocks, so every prompt token may read them (with the same ``log w_j``);
    the receiver's prefill waits for the senders' caches instead of running beside them.

A weight of exactly 0 closes a source (no effect); a sender closed for every query of a
batch is not run and sends nothing. No sender decodes.

Shapes: ``B`` queries; receiver prompt ``[B, T]``; sender ``j`` prompt ``[B, S_j]``; caches
per layer ``[B, H, N, D]``; weights ``[B, 1 + J]`` (own cache, then the ``J`` senders).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from fedrefine_lib import kv as kvlib
from fedrefine_lib.align import Aligner, Alignment, align_cache, get_aligner
from fedrefine_lib.engine import Prefill, encode_receiver, sender_prefill
from fedrefine_lib.fuser import KINDS, Fuser, unwrap
from fedrefine_lib.gate import GateQuery
from fedrefine_lib.kv import KVCache
from fedrefine_lib.prompts import Messages, encode_prompts, has_context, holder_view
from fedrefine_lib.trace import Trace
from fedrefine_lib.transport import Encoding

MODES = KINDS
"""Fusion modes, one per fuser kind: ``residual``, ``concat``, ``prefix``."""
MIN_WEIGHT = 1e-6
"""Block modes: weights below this count as this in ``log w`` (0 masks a block)."""

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


def project(fuser: torch.nn.Module, sender_cache: KVCache, receiver_cache: KVCache, sender_index: torch.Tensor):
    """One sender's residual on the receiver's cache (``residual`` mode).

    Args:
        fuser: a ``fuser.ResidualFuser`` (possibly wrapped by Accelerate/DDP).
        sender_cache: full sender cache ``[B, Hs, S, Ds]`` per sender layer.
        receiver_cache: receiver cache ``[B, Hr, N, Dr]`` per receiver layer.
        sender_index: ``[B, N]`` sender column per receiver position (``-1``: none).
    Returns:
        ``(key_residuals, value_residuals)``, per receiver layer ``[B, Hr, N, Dr]``.
    """
    dev = receiver_cache.keys[0].device
    index = sender_index.to(sender_cache.keys[0].device)
    aligned, fuse_mask = align_cache(sender_cache, index, unwrap(fuser).config.layer_map)
    return fuser(aligned.to(device=dev), receiver_cache, fuse_mask.to(dev))


@dataclass
class Caches:
    """What the frozen LLMs contribute to a fused prefill (reusable across fuser or gate
    training epochs).

    Attributes:
        messages_batch: the receiver's ``B`` chats.
        receiver_ids, receiver_mask: ``[B, T]`` receiver prompt, left padded.
        receiver_cache: the receiver's own cache, per layer ``[B, Hr, T-1, Dr]``.
        alignments: per sender, its prompt (``residual``: aligned to the receiver; block
            modes: its own tokens, the last ``sender_positions`` kept); None if not run.
        sender_caches: per sender, its cache ``[B, Hs, S_j, Ds]`` or None (closed for the
            whole batch: never run).
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
    """A receiver refining its prompt cache with 1..N senders' caches (module docstring).

    Args:
        receiver: ``LoadedModel``.
        senders: ``LoadedModel``s (weight columns ``1..J`` in this order).
        fusers: sender name -> its fuser for this receiver (e.g. ``hub.FuserHub.fusers``);
            every fuser of one kind, which sets the fusion mode.
        mode: the fusion mode expected (None: the fusers' kind); a mismatch is an error.
        policy: ``GateQuery -> [B, 1 + J]`` weights (``gating.EqualWeights``,
            ``gating.SubsetSelection``, ``gating.LearnedGate``); None: all weights 1.
        sender_views: what senders read instead of the receiver's chats: one view for all or
            ``{sender name: view}`` (e.g. each its own rephrasing; a :func:`rotate` control).
        aligners: ``residual`` only: one aligner for all, or per sender (default: each fuser's).
        wire_dtype: dtype the sender caches are counted in on the wire (no ``transport``).
        transport: how each sender's cache is sent (``transport.Encoding``: one for all or per
            sender name): each query is encoded and decoded, its exact payload counted, and
            the fusers see the decoded cache; None: counted at ``wire_dtype``, not encoded.
    """

    def __init__(
        self,
        receiver,
        senders: Sequence,
        fusers: Mapping[str, torch.nn.Module],
        *,
        mode: str | None = None,
        policy=None,
        sender_views: SenderView | dict[str, SenderView] | None = None,
        aligners: str | Aligner | dict[str, str | Aligner] | None = None,
        wire_dtype: str = "bfloat16",
        transport: Encoding | dict[str, Encoding] | None = None,
    ):
        names = [s.name for s in senders]
        if not names or len(set(names)) != len(names) or receiver.name in names:
            raise ValueError(
                f"Senders must be distinct models other than the receiver; got {names} for {receiver.name!r}."
            )
        missing = [n for n in names if n not in fusers]
        if missing:
            raise KeyError(
                f"No fuser for {', '.join(f'{n}->{receiver.name}' for n in missing)}: the fusers given are for "
                f"{sorted(fusers)}. Give one per sender (e.g. FuserHub.fusers(receiver, senders, kind))."
            )
        self.fusers = [fusers[n] for n in names]
        kinds = {unwrap(f).kind for f in self.fusers}
        self.mode = mode or next(iter(kinds))
        if self.mode not in MODES:
            raise ValueError(f"Unknown fusion mode {self.mode!r}; use one of {MODES}.")
        if kinds != {self.mode}:
            raise ValueError(
                f"The fusers for {receiver.name} are of kinds {sorted(kinds)} but the engine runs {self.mode!r} "
                f"fusion; give fusers of one kind, trained for {self.mode!r} fusion (FuserConfig(kind=...), "
                "hub.FuserJob(kind=...))."
            )
        if self.mode == "prefix" and any(kvlib.sliding_windows(receiver.model.config)):
            raise ValueError(
                f"prefix fusion prefills the receiver's prompt after the sender blocks, but {receiver.name!r} has "
                "sliding-window layers, whose windows would count the blocks and the padding of a batch; use "
                "concat fusion for this receiver."
            )
        for s, f in zip(senders, self.fusers):
            unwrap(f).check_pair(receiver, s)
        self.receiver, self.senders, self.policy = receiver, list(senders), policy
        self.sender_names, self.wire_dtype = names, wire_dtype
        self.views = [_per_sender(sender_views, n) for n in names]
        self.transports = [_per_sender(transport, n) for n in names]
        self.aligners = [
            None
            if self.mode != "residual"
            else get_aligner(_per_sender(aligners, s.name) or unwrap(f).config.aligner, receiver.tokenizer, s.tokenizer)
            for s, f in zip(self.senders, self.fusers)
        ]

    @property
    def links(self) -> list[str]:
        return [f"{s}->{self.receiver.name}" for s in self.sender_names]

    # -------------------------------------------------------------- LLM work

    def _senders(self, messages_batch, ids, mask, assistant_prefix, open_rows: torch.Tensor, trace: Trace):
        alignments: list[Alignment | None] = []
        caches: list[KVCache | None] = []
        for j, (sender, view, aligner, link) in enumerate(zip(self.senders, self.views, self.aligners, self.links)):
            encoding = self.transports[j]
            rows = open_rows[:, j]
            if not bool(rows.any()):
                alignments.append(None)
                caches.append(None)
                continue
            sender_batch = view(list(messages_batch)) if view is not None else None
            with trace.time("alignment"):
                if aligner is None:  # block modes: the sender's own tokens, nothing to align
                    chats = [holder_view(m) for m in sender_batch or messages_batch]  # it reads its private context
                    s_ids, s_mask = encode_prompts(sender.tokenizer, chats, assistant_prefix)
                    a = Alignment(ids, mask, s_ids, s_mask, torch.full_like(ids, -1))
                else:
                    if any(has_context(m) for m in sender_batch or messages_batch):
                        raise ValueError(
                            f"The chats hold private context for {sender.name!r}, which residual fusion cannot "
                            "use: it aligns the sender's tokens to the receiver's text, which has none. Use a "
                            "block fuser (concat or prefix) for the private-context task."
                        )
                    a = aligner(
                        messages_batch, self.receiver.tokenizer, sender.tokenizer, assistant_prefix,
                        sender_messages_batch=sender_batch,
                    )  # fmt: skip
                    if not torch.equal(a.receiver_ids.to(ids.device), ids):
                        raise RuntimeError(
                            f"The {aligner.name} aligner tokenized the receiver prompt differently from "
                            "encode_prompts; both must render with prompts.render."
                        )
            a.sender_index = a.sender_index.to(ids.device)
            last = unwrap(self.fusers[j]).config.sender_positions
            caches.append(sender_prefill(sender, a, trace, self.wire_dtype, link, rows, last, encoding))
            alignments.append(a if last is None else a.last(last))
        return alignments, caches

    def prompt_caches(
        self, messages_batch: list[Messages], assistant_prefix: str | None = None, open_rows: torch.Tensor | None = None
    ) -> Caches:
        """Tokenize and prefill the receiver and every sender (no gradients).

        Args:
            open_rows: ``[B, J]`` bool, which sender serves which query (None: all).
        """
        trace = Trace()
        ids, mask, cache = encode_receiver(self.receiver, messages_batch, assistant_prefix, trace)
        if open_rows is None:
            open_rows = torch.ones(len(messages_batch), len(self.senders), dtype=torch.bool, device=ids.device)
        alignments, caches = self._senders(messages_batch, ids, mask, assistant_prefix, open_rows, trace)
        return Caches(list(messages_batch), ids, mask, cache, alignments, caches, trace)

    def weights(
        self,
        messages_batch: list[Messages],
        receiver_cache: KVCache,
        receiver_mask: torch.Tensor,
        trace: Trace | None = None,
    ) -> torch.Tensor:
        """The policy's weights ``[B, 1 + J]`` (all 1 without a policy), checked."""
        B = len(messages_batch)
        trace = trace if trace is not None else Trace()
        with trace.time("gating"):
            if self.policy is None:
                w = torch.ones(B, 1 + len(self.senders), device=receiver_mask.device)
            else:
                w = self.policy(GateQuery(list(messages_batch), receiver_cache, receiver_mask, list(self.sender_names)))
        if tuple(w.shape) != (B, 1 + len(self.senders)) or not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
            raise ValueError(
                f"Policy {getattr(self.policy, 'name', self.policy)!r} gave weights {tuple(w.shape)}; expected "
                f"finite, non-negative [{B}, {1 + len(self.senders)}] (own cache, then {self.sender_names})."
            )
        return w

    @torch.no_grad()
    def receiver_view(self, messages_batch: list[Messages]) -> tuple[KVCache, torch.Tensor]:
        """The receiver's own prompt cache (per layer ``[B, H, N, D]``) and its mask
        ``[B, N]``: what a gate sees of a query (no sender runs)."""
        _, mask, cache = encode_receiver(self.receiver, messages_batch, None, Trace())
        return cache, mask[:, :-1]

    @torch.no_grad()
    def source_weights(self, messages_batch: list[Messages]) -> torch.Tensor:
        """The policy's weights ``[B, 1 + J]`` for a batch, from the receiver's own prefill
        only (no sender runs): what the gate decides, for inspection."""
        return self.weights(messages_batch, *self.receiver_view(messages_batch))

    # ------------------------------------------------------------ fusion

    def project(self, caches: Caches, trace: Trace | None = None) -> list:
        """Each run sender's projection (differentiable in the fusers when grad is on):
        ``residual``: ``(key_residuals, value_residuals)`` per receiver layer
        ``[B, Hr, T-1, Dr]``; block modes: a block ``KVCache`` ``[B, Hr, S_j, Dr]``; None for
        senders not run. Time goes to ``trace`` (``caches.trace`` is never changed)."""
        out = []
        dev = caches.receiver_cache.keys[0].device
        with (trace if trace is not None else Trace()).time("projection"):
            for fuser, a, sender_cache in zip(self.fusers, caches.alignments, caches.sender_caches):
                if sender_cache is None:
                    out.append(None)
                    continue
                if self.mode == "residual":
                    p = project(fuser, sender_cache, caches.receiver_cache, a.sender_index[:, :-1])
                else:
                    p = fuser(sender_cache.to(device=dev))
                out.append(_without_unsent(p, sender_cache.present, unwrap(fuser).config.layer_map))
        return out

    def combine(self, caches: Caches, projections: list, weights: torch.Tensor, trace: Trace | None = None) -> Prefill:
        """The weighted prompt cache (differentiable in ``weights`` and the projections).

        Args:
            weights: ``[B, 1 + J]`` (own cache, then the senders).
            trace: the call's trace so far (default: a copy of ``caches.trace``).
        """
        trace = trace if trace is not None else Trace().add(caches.trace)
        own = caches.receiver_cache
        dtype, dev = own.keys[0].dtype, own.keys[0].device
        w = weights.to(device=dev)
        for j, p in enumerate(projections):
            if p is None and bool((w[:, 1 + j] > 0).any()):
                raise ValueError(
                    f"Sender {self.sender_names[j]} was not run but has a non-zero weight; run "
                    "prompt_caches with open_rows covering every query it serves."
                )
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
            # Block modes: a source's weight multiplies the attention mass it gets (log w on its columns).
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

    def _prefill_on(
        self, caches: Caches, senders: KVCache, prefix_mask: torch.Tensor, bias: torch.Tensor, trace: Trace
    ) -> KVCache:
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
            full_mask = torch.cat([prefix_mask.to(mask), mask[:, :-1]], dim=1)
            _, cache = kvlib.forward(model, ids[:, :-1], full_mask, senders.to_cache(), prefix_mask, bias)
        out = KVCache.from_cache(cache)  # plain layers: every position kept
        return KVCache(
            [k[:, :, P:] for k in out.keys], [v[:, :, P:] for v in out.values], own.seq_len, list(own.sliding)
        )

    def fuse(self, caches: Caches, weights: torch.Tensor | None = None) -> Prefill:
        """Project and combine (training calls this with the fusers trainable); ``weights``
        default to the policy's."""
        trace = Trace().add(caches.trace)
        if weights is None:
            weights = self.weights(caches.messages_batch, caches.receiver_cache, caches.receiver_mask[:, :-1], trace)
        return self.combine(caches, self.project(caches, trace), weights, trace)

    def prefill(self, messages_batch: list[Messages], assistant_prefix: str | None = None) -> Prefill:
        """Receiver prefill, the policy's weights, then only the senders it opens."""
        trace = Trace()
        ids, mask, cache = encode_receiver(self.receiver, messages_batch, assistant_prefix, trace)
        w = self.weights(messages_batch, cache, mask[:, :-1], trace)
        alignments, sender_caches = self._senders(messages_batch, ids, mask, assistant_prefix, w[:, 1:] > 0, trace)
        caches = Caches(list(messages_batch), ids, mask, cache, alignments, sender_caches, trace)
        return self.combine(caches, self.project(caches, trace), w, trace)


def C2C(
    receiver,
    sender,
    fuser: Fuser | torch.nn.Module,
    *,
    aligner: str | Aligner | None = None,
    sender_view: SenderView | None = None,
    wire_dtype: str = "bfloat16",
    transport: Encoding | None = None,
) -> FedRefine:
    """Cache-to-cache: ``sender``'s prompt cache, through ``fuser`` (any kind), refines the
    receiver's: :class:`FedRefine` with one sender and weight 1.

    Args:
        aligner: residual fusers only: the token aligner (default: the fuser's).
        sender_view: what the sender reads instead of the receiver's chats (e.g. the
            :func:`rotate` wrong-cache control); None: the same chats.
        transport: how the sender's cache is sent (``transport.Encoding``; see :class:`FedRefine`).
    """
    return FedRefine(
        receiver, [sender], {sender.name: fuser}, aligners=aligner, sender_views=sender_view, wire_dtype=wire_dtype,
        transport=transport,
    )  # fmt: skip


def _without_unsent(projection, present: list[bool], layer_map: list[int]):
    """A projection with no fusion (zeros, as under a closed gate) on every receiver layer
    reading a sender layer that was not transmitted (``KVCache.present``)."""
    if all(present):
        return projection
    keys, values = (projection.keys, projection.values) if isinstance(projection, KVCache) else projection
    keys = [k if present[s] else torch.zeros_like(k) for k, s in zip(keys, layer_map)]
    values = [v if present[s] else torch.zeros_like(v) for v, s in zip(values, layer_map)]
    return KVCache(keys, values, projection.seq_len) if isinstance(projection, KVCache) else (keys, values)


def _per_sender(value, name: str):
    return value.get(name) if isinstance(value, dict) else value


def _stack(blocks: Sequence[KVCache], dtype: torch.dtype) -> KVCache:
    """Caches placed one after another along the sequence, per layer ``[B, H, sum S_j, D]``."""
    layers = range(blocks[0].num_layers)
    keys = [torch.cat([b.keys[t].to(dtype) for b in blocks], dim=2) for t in layers]
    values = [torch.cat([b.values[t].to(dtype) for b in blocks], dim=2) for t in layers]
    return KVCache(keys, values, keys[0].shape[2])
