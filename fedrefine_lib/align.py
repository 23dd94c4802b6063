"""Alignment between a receiver and a sender: which sender layer feeds each receiver
layer (layer maps), and which sender token feeds each receiver prompt token (token
aligners).

Every model applies its *own* chat template to the *same* messages. Template and special
tokens are never fused by the ``span`` and ``reencode`` aligners: their receiver positions
map to ``-1`` ("no sender token"; the receiver keeps its own KV there). The ``identity``
aligner (same tokenizer) lets the sender read the receiver's exact token sequence, so every
position, template included, has a one-to-one partner and is fused.

Shapes: a batch of ``B`` prompts gives receiver ids ``[B, T]`` and sender ids ``[B, S]``,
both left padded, and ``sender_index`` ``[B, T]`` holding, per receiver position, the
column of the sender token it fuses with (``-1`` for template tokens and padding).

Controls: every aligner accepts ``sender_messages_batch``, what the sender reads when it is
*not* the receiver's text (e.g. a different question, the wrong-cache control). ``identity``
then pairs by position (clamped to the sender's length) and ``span`` by character position
relative to each content segment (clamped to the sender's segment); ``reencode`` has no
meaning for different texts and refuses.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, replace
from typing import Protocol

import torch

from fedrefine_lib.kv import KVCache
from fedrefine_lib.prompts import Messages, Rendered, left_pad, pad_id, render, shared_view

LAYER_MAPS = ("bottom_up", "top_down", "depth", "top")


# --------------------------------------------------------------------------- layers


def layer_map(receiver_layers: int, sender_layers: int, kind: str = "top_down") -> list[int]:
    """The sender layer that feeds each receiver layer.

    Args:
        receiver_layers: ``T``, the receiver's number of layers.
        sender_layers: ``S``, the sender's number of layers.
        kind: ``"bottom_up"`` (t -> min(t, S-1), the FedRefine paper's layer-by-layer from
            the bottom), ``"top_down"`` (C2C's last-aligned: t -> clamp(t + S - T, 0, S-1)),
            ``"depth"`` (uniform relative depth: t -> floor(t (S-1) / (T-1) + 1/2)), or
            ``"top"`` (every receiver layer reads the sender's last layer, t -> S-1: the
            layer whose keys and values carry most of what the sender concluded).
    Returns:
        ``T`` sender layer indices.
    """
    T, S = receiver_layers, sender_layers
    if T < 1 or S < 1:
        raise ValueError(f"Layer counts must be positive, got receiver={T}, sender={S}.")
    if kind == "bottom_up":
        return [min(t, S - 1) for t in range(T)]
    if kind == "top_down":
        return [min(max(t + S - T, 0), S - 1) for t in range(T)]
    if kind == "top":
        return [S - 1] * T
    if kind == "depth":
        if T == 1:
            return [S - 1]
        return [int(t * (S - 1) / (T - 1) + 0.5) for t in range(T)]  # round half up
    raise ValueError(f"Unknown layer map {kind!r}; use one of {LAYER_MAPS}.")


# ------------------------------------------------------------------------- tokens


@dataclass
class Alignment:
    """A batch aligned for fusion.

    Attributes:
        receiver_ids, receiver_mask: ``[B, T]`` receiver prompt, left padded.
        sender_ids, sender_mask: ``[B, S]`` sender prompt, left padded.
        sender_index: ``[B, T]`` long; column in ``sender_ids`` fused into each receiver
            position, ``-1`` where the receiver keeps its own KV (template, padding).
    """

    receiver_ids: torch.Tensor
    receiver_mask: torch.Tensor
    sender_ids: torch.Tensor
    sender_mask: torch.Tensor
    sender_index: torch.Tensor

    def last(self, n: int) -> Alignment:
        """The alignment of a sender that sends only its last ``n`` prompt positions: its ids
        and mask cut to ``[B, min(n, S)]`` (block fusion, where nothing is aligned)."""
        return replace(self, sender_ids=self.sender_ids[:, -n:], sender_mask=self.sender_mask[:, -n:])


class Aligner(Protocol):
    """``__call__`` aligns a batch; ``sender_messages_batch`` (default: the receiver's
    ``messages_batch``) is what the sender reads, one chat per receiver chat."""

    name: str

    def __call__(
        self,
        messages_batch: list[Messages],
        receiver_tokenizer,
        sender_tokenizer,
        assistant_prefix: str | None = None,
        sender_messages_batch: list[Messages] | None = None,
    ) -> Alignment: ...


def _sender_batch(messages_batch: list[Messages], sender_messages_batch: list[Messages] | None) -> list[Messages]:
    """What the sender reads (the receiver's chats by default), checked one-to-one."""
    if sender_messages_batch is None:
        return messages_batch
    if len(sender_messages_batch) != len(messages_batch):
        raise ValueError(
            f"Got {len(sender_messages_batch)} sender chats for {len(messages_batch)} receiver chats; "
            "give the sender one chat per receiver chat."
        )
    return sender_messages_batch


def _batch(
    receiver_rows: list[list[int]],
    sender_rows: list[list[int]],
    index_rows: list[list[int]],
    receiver_tokenizer,
    sender_tokenizer,
) -> Alignment:
    """Left-pad per-sample rows and shift sender indices into padded columns."""
    r_ids, r_mask = left_pad(receiver_rows, pad_id(receiver_tokenizer))
    s_ids, s_mask = left_pad(sender_rows, pad_id(sender_tokenizer))
    index = torch.full(r_ids.shape, -1, dtype=torch.long)
    for b, (r, s, idx) in enumerate(zip(receiver_rows, sender_rows, index_rows)):
        shift = s_ids.shape[1] - len(s)
        row = torch.tensor(idx, dtype=torch.long)
        row = torch.where(row >= 0, row + shift, row)
        index[b, r_ids.shape[1] - len(r) :] = row
    return Alignment(r_ids, r_mask, s_ids, s_mask, index)


def _content_position(rendered: Rendered, token: int) -> tuple[int, int] | None:
    """``(segment, offset)`` of the token's last character within its content segment,
    or None for template / special tokens."""
    start, end = rendered.offsets[token]
    if end <= start:
        return None
    last = end - 1
    for k, (a, b) in enumerate(rendered.segments):
        if a <= last < b:
            return k, last - a
    return None


class IdentityAligner:
    """Same tokenizer: the sender reads the receiver's exact tokens (receiver's template);
    receiver position t fuses with sender position t, template tokens included."""

    name = "identity"

    def __init__(self) -> None:
        self._checked: set[tuple[int, int]] = set()  # tokenizer pairs already compared

    def __call__(
        self, messages_batch, receiver_tokenizer, sender_tokenizer, assistant_prefix=None, sender_messages_batch=None
    ) -> Alignment:
        pair = (id(receiver_tokenizer), id(sender_tokenizer))
        if pair not in self._checked and receiver_tokenizer.get_vocab() != sender_tokenizer.get_vocab():
            raise ValueError(
                "The identity aligner needs the same tokenizer on both sides; these vocabularies "
                "differ. Use aligner='span' (or 'reencode')."
            )
        self._checked.add(pair)
        rows = [render(receiver_tokenizer, m, assistant_prefix).ids for m in messages_batch]
        sender_batch = _sender_batch(messages_batch, sender_messages_batch)
        s_rows = [render(receiver_tokenizer, m, assistant_prefix).ids for m in sender_batch]
        index = [[min(t, len(s) - 1) for t in range(len(r))] for r, s in zip(rows, s_rows)]
        return _batch(rows, s_rows, index, receiver_tokenizer, sender_tokenizer)


class SpanAligner:
    """Different tokenizers, no information lost: the sender reads its own natural
    tokenization of its own rendering; each receiver content token fuses with the sender
    token whose character span covers the receiver token's last character (its offset in
    its content segment, clamped to the sender's segment when the sender reads another text;
    segments pair from the last one back, so a receiver segment without a partner is not fused)."""

    name = "span"

    def __call__(
        self, messages_batch, receiver_tokenizer, sender_tokenizer, assistant_prefix=None, sender_messages_batch=None
    ) -> Alignment:
        r_rows, s_rows, idx_rows = [], [], []
        for messages, sender_messages in zip(messages_batch, _sender_batch(messages_batch, sender_messages_batch)):
            r = render(receiver_tokenizer, messages, assistant_prefix)
            s = render(sender_tokenizer, sender_messages, assistant_prefix)
            starts = [a for a, _ in s.offsets]
            shift = len(s.segments) - len(r.segments)  # segments pair from the end (last turn with last turn)
            idx = []
            for t in range(len(r.ids)):
                pos = _content_position(r, t)
                k = -1 if pos is None else pos[0] + shift
                if k < 0:
                    idx.append(-1)
                    continue
                a, b = s.segments[k]
                idx.append(-1 if b <= a else _covering_token(s, a + min(pos[1], b - a - 1), starts))
            r_rows.append(r.ids)
            s_rows.append(s.ids)
            idx_rows.append(idx)
        return _batch(r_rows, s_rows, idx_rows, receiver_tokenizer, sender_tokenizer)


class SpanTemplateAligner(SpanAligner):
    """:class:`SpanAligner` that also fuses chat-template tokens: the template text between
    two content segments (e.g. the end of the user turn and the assistant generation prompt)
    is paired gap by gap, token by token from the end of each gap. Different templates have
    different lengths, so a receiver template token reads the sender template token at the same
    distance from the next content (clamped). Content tokens pair exactly as in ``span``."""

    name = "span_template"

    def __call__(
        self, messages_batch, receiver_tokenizer, sender_tokenizer, assistant_prefix=None, sender_messages_batch=None
    ) -> Alignment:
        base = super().__call__(
            messages_batch, receiver_tokenizer, sender_tokenizer, assistant_prefix, sender_messages_batch
        )
        index = base.sender_index.clone()
        pairs = zip(messages_batch, _sender_batch(messages_batch, sender_messages_batch))
        for b, (messages, sender_messages) in enumerate(pairs):
            r = render(receiver_tokenizer, messages, assistant_prefix)
            s = render(sender_tokenizer, sender_messages, assistant_prefix)
            r_gaps, s_gaps = _template_gaps(r), _template_gaps(s)
            shift = len(s.segments) - len(r.segments)
            r_pad = index.shape[1] - len(r.ids)
            s_pad = base.sender_ids.shape[1] - len(s.ids)
            for gap, tokens in r_gaps.items():
                partner = s_gaps.get(gap + shift)
                if not partner:
                    continue
                for j, t in enumerate(reversed(tokens)):  # j-th token from the end of the gap
                    index[b, r_pad + t] = s_pad + partner[max(0, len(partner) - 1 - j)]
        base.sender_index = index
        return base


def _template_gaps(rendered: Rendered) -> dict[int, list[int]]:
    """Template tokens grouped by the gap they sit in (gap g lies before content segment g)."""
    gaps: dict[int, list[int]] = {}
    for t, (a, b) in enumerate(rendered.offsets):
        if _content_position(rendered, t) is not None:
            continue
        gap = sum(1 for _, end in rendered.segments if end <= a)
        gaps.setdefault(gap, []).append(t)
    return gaps


def _covering_token(rendered: Rendered, char: int, starts: list[int]) -> int:
    """Index of the last token whose span covers ``char`` (the one that completes it), else
    the last token starting before it (a tokenizer that dropped the character)."""
    j = bisect.bisect_right(starts, char) - 1
    for t in range(j, -1, -1):
        a, b = rendered.offsets[t]
        if a <= char < b:
            return t
    return max(j, -1)


class ReencodeAligner:
    """The original C2C's lossy alignment: each receiver content token's text is
    re-encoded with the sender tokenizer and one sender token is kept (the first, or the
    longest with ``strategy="longest"``), so the sender reads one token per receiver token
    instead of its natural tokenization. Template pieces are the sender's own template."""

    name = "reencode"

    def __init__(self, strategy: str = "first"):
        if strategy not in ("first", "longest"):
            raise ValueError(f"Unknown reencode strategy {strategy!r}; use 'first' or 'longest'.")
        self.strategy = strategy

    def _one(self, tokenizer, text: str) -> int | None:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            return None
        if self.strategy == "first":
            return ids[0]
        return max(ids, key=lambda i: len(tokenizer.decode([i])))

    def __call__(
        self, messages_batch, receiver_tokenizer, sender_tokenizer, assistant_prefix=None, sender_messages_batch=None
    ) -> Alignment:
        if sender_messages_batch is not None and sender_messages_batch != messages_batch:
            raise ValueError(
                "The reencode aligner makes the sender read the receiver's own tokens, so it cannot give the "
                "sender a different text; use aligner='span' (or 'identity') for sender views and controls."
            )
        r_rows, s_rows, idx_rows = [], [], []
        for messages in messages_batch:
            r = render(receiver_tokenizer, messages, assistant_prefix)
            s = render(sender_tokenizer, messages, assistant_prefix)
            # Receiver content tokens per segment, as (receiver position, its in-segment text).
            per_segment: list[list[tuple[int, str]]] = [[] for _ in r.segments]
            for t in range(len(r.ids)):
                pos = _content_position(r, t)
                if pos is not None:
                    a, b = r.offsets[t]
                    seg_start = r.segments[pos[0]][0]
                    per_segment[pos[0]].append((t, r.text[max(a, seg_start) : b]))
            s_ids: list[int] = []
            idx = [-1] * len(r.ids)
            cursor = 0
            for k, (a, b) in enumerate(s.segments):
                s_ids += _plain_ids(sender_tokenizer, s.text[cursor:a])
                for t, piece in per_segment[k]:
                    one = self._one(sender_tokenizer, piece)
                    if one is not None:
                        idx[t] = len(s_ids)
                        s_ids.append(one)
                cursor = b
            s_ids += _plain_ids(sender_tokenizer, s.text[cursor:])
            r_rows.append(r.ids)
            s_rows.append(s_ids)
            idx_rows.append(idx)
        return _batch(r_rows, s_rows, idx_rows, receiver_tokenizer, sender_tokenizer)


def _plain_ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


ALIGNERS = {
    "identity": IdentityAligner,
    "span": SpanAligner,
    "span_template": SpanTemplateAligner,
    "reencode": ReencodeAligner,
}


def get_aligner(aligner: str | Aligner | None, receiver_tokenizer=None, sender_tokenizer=None) -> Aligner:
    """An aligner by name; ``None`` picks ``identity`` for the same tokenizer, else ``span``."""
    if aligner is None:
        same = (
            receiver_tokenizer is not None
            and sender_tokenizer is not None
            and (receiver_tokenizer.get_vocab() == sender_tokenizer.get_vocab())
        )
        aligner = "identity" if same else "span"
    if isinstance(aligner, str):
        if aligner not in ALIGNERS:
            raise ValueError(f"Unknown token aligner {aligner!r}; use one of {sorted(ALIGNERS)}.")
        return ALIGNERS[aligner]()
    return aligner


# ------------------------------------------------------------------------- caches


def align_cache(sender: KVCache, sender_index: torch.Tensor, layers: list[int]) -> tuple[KVCache, torch.Tensor]:
    """Gather the sender's KV at each receiver position, for each receiver layer.

    Args:
        sender: full (every position) sender cache, ``[B, Hs, S, Ds]`` per sender layer.
        sender_index: ``[B, N]`` sender column per receiver position, ``-1`` for none.
        layers: the layer map, one sender layer per receiver layer.
    Returns:
        a cache with one entry per receiver layer, ``[B, Hs, N, Ds]`` (zeros where the
        index is -1), and ``fuse_mask`` ``[B, N]`` bool, True where a sender token exists.
    """
    for layer in set(layers):
        if sender.keys[layer].shape[2] != sender.seq_len:
            raise ValueError(
                f"Sender layer {layer} holds {sender.keys[layer].shape[2]} positions but the prompt "
                f"has {sender.seq_len}: fusion needs every position (prefill without a sliding-window cache)."
            )
    fuse_mask = sender_index >= 0
    index = sender_index.clamp(min=0).to(sender.keys[0].device)

    def gather(t: torch.Tensor) -> torch.Tensor:  # [B, H, S, D] -> [B, H, N, D]
        B, H, _, D = t.shape
        idx = index[:, None, :, None].expand(B, H, index.shape[1], D)
        out = t.gather(2, idx)
        return out * fuse_mask[:, None, :, None].to(out.dtype).to(out.device)

    keys = [gather(sender.keys[l]) for l in layers]
    values = [gather(sender.values[l]) for l in layers]
    return KVCache(keys, values, seq_len=index.shape[1]), fuse_mask


def alignment_table(aligner: str | Aligner, messages: Messages, receiver_tokenizer, sender_tokenizer):
    """For one prompt: each receiver token and the sender token it fuses with ("-" where
    the receiver keeps its own KV: template tokens). A pandas DataFrame, for reading. Only
    the shared text is aligned (``prompts.shared_view``: private context has no receiver token)."""
    import pandas as pd

    messages = shared_view(messages)
    a = get_aligner(aligner, receiver_tokenizer, sender_tokenizer)([messages], receiver_tokenizer, sender_tokenizer)
    real = a.receiver_mask[0].bool()
    rows = []
    for r_id, s_col in zip(a.receiver_ids[0][real].tolist(), a.sender_index[0][real].tolist()):
        sender = "-" if s_col < 0 else sender_tokenizer.decode([int(a.sender_ids[0, s_col])])
        rows.append({"receiver token": receiver_tokenizer.decode([r_id]), "sender token": sender})
    return pd.DataFrame(rows)
