"""What an eavesdropper recovers from a transmitted cache: inversion with the sender's weights.

Attack (a) of the privacy study ("Shadow in the Cache"): whoever holds the sender's weights
and one query's transmitted cache recovers its tokens left to right. At position ``t``, with
the tokens ``x_<t`` already recovered, every candidate token ``v`` is run through the model
after ``x_<t`` and its key and value at ``layer`` are compared with the transmitted ones; the
nearest candidate is ``x_t``. The model is run only up to ``layer`` (a hook stops it there), so a
shallow layer costs a fraction of a forward pass per candidate. A lossy encoding
(``transport``'s int8/int4) or added noise moves the transmitted tensors away from every
candidate's; the nearest one is still taken, and the recovery measures say how often it is right.

A payload of the last ``n`` positions only (a block fuser's ``sender_positions``) is inverted
from its first sent position (``start``; the attacker is granted the prompt's length) with no
prefix: exact at the first layer, whose keys and values depend on the token and its position
alone, and guesswork deeper in the model.

Attack (b), :class:`InversionDecoder`: a network trained on public, non-evaluation chats to map
one layer's key and value at a position to that position's token (the ``token`` head) and, at
the last position, to the set of tokens the whole prompt holds (the ``bag`` head): the attack a
last-position payload has to face, since attention has mixed every earlier token into it.

Shapes: ``H`` KV heads, ``S`` positions, ``D`` head dim, ``V`` candidates (the vocabulary),
``F = 2 H D`` features of a position (its keys and values, heads concatenated).
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from transformers import DynamicCache

from fedrefine_lib.kv import KVCache
from fedrefine_lib.prompts import holder_view, render
from fedrefine_lib.transport import Encoding, decode, encode


class _Reached(Exception):
    """Raised by the hook on the attacked layer: the forward pass has what it needs."""


def _layer_kv(
    model: torch.nn.Module, layer: int, input_ids: torch.Tensor, cache: DynamicCache, start: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``input_ids`` ``[B, N]`` at positions ``start..`` after ``cache`` up to ``layer``;
    returns that layer's keys and values of the new positions ``[B, H, N, D]``."""
    decoder = model.get_decoder()
    hook = decoder.layers[layer].register_forward_hook(lambda *_: (_ for _ in ()).throw(_Reached()))
    positions = torch.arange(start, start + input_ids.shape[1])[None].expand(input_ids.shape[0], -1)
    try:
        decoder(input_ids=input_ids, cache=cache, position_ids=positions, use_cache=True)
    except _Reached:
        pass
    finally:
        hook.remove()
    n = input_ids.shape[1]
    return cache.layers[layer].keys[:, :, -n:], cache.layers[layer].values[:, :, -n:]


def _replicated(prefix: DynamicCache, upto: int, batch: int) -> DynamicCache:
    """A fresh cache holding ``prefix``'s layers ``0..upto`` repeated ``batch`` times."""
    out = DynamicCache()
    for i in range(upto + 1):
        layer = prefix.layers[i] if i < len(prefix.layers) else None
        if layer is None or getattr(layer, "keys", None) is None or layer.keys.numel() == 0:
            return DynamicCache()  # no prefix yet (position 0)
        out.update(layer.keys.expand(batch, -1, -1, -1), layer.values.expand(batch, -1, -1, -1), i)
    return out


@torch.no_grad()
def invert_cache(
    model: torch.nn.Module,
    sent: KVCache,
    layer: int = 0,
    candidates: Sequence[int] | None = None,
    chunk: int = 1024,
    start: int = 0,
    shortlist: int | None = None,
) -> list[int]:
    """Recover the token ids of one query's transmitted cache (greedy, left to right).

    Args:
        model: the sender's causal LM (the attacker holds its weights).
        sent: the transmitted cache, batch 1, per layer ``[1, H, S, D]`` (decoded, any encoding);
            ``layer`` must be present in it.
        layer: the sender layer matched against (shallow layers invert best).
        candidates: token ids tried at each position (default: the whole vocabulary).
        chunk: candidates run at once.
        start: the prompt position of the first sent position (a last-``n`` payload of an
            ``S0``-token prompt: ``S0 - n``); the positions before it are not in the payload.
        shortlist: at the first layer, when its values do not depend on the position (rotary
            models: checked, :func:`position_free_values`), try at each position only the
            ``shortlist`` candidates whose values are nearest (one matrix product instead of a
            pass over the vocabulary: what makes a 262k vocabulary searchable on a CPU). None:
            every candidate at every position.
    Returns:
        ``S`` recovered token ids.
    """
    if sent.batch_size != 1:
        raise ValueError(f"invert_cache takes one query's cache (batch 1), got batch {sent.batch_size}.")
    if not sent.present[layer]:
        raise ValueError(f"Layer {layer} was not transmitted; attack a layer the payload holds: "
                         f"{[i for i, p in enumerate(sent.present) if p]}.")  # fmt: skip
    model.eval()
    device = next(model.parameters()).device
    vocab = torch.tensor(
        list(candidates) if candidates is not None else range(model.config.get_text_config().vocab_size)
    )
    target_k, target_v = sent.keys[layer][0].float().to(device), sent.values[layer][0].float().to(device)  # [H, S, D]
    table = _values_table(model, vocab, chunk) if shortlist and layer == 0 else None  # [V, H*D]
    recovered: list[int] = []
    prefix = DynamicCache()
    for t in range(target_k.shape[1]):
        best, best_d = -1, float("inf")
        tried = vocab
        if table is not None:
            near = torch.cdist(target_v[:, t].flatten()[None], table)[0]  # [V]
            tried = vocab[near.topk(min(shortlist, len(vocab)), largest=False).indices.cpu()]
        for ids in tried.split(chunk):
            cache = _replicated(prefix, layer, len(ids))
            k, v = _layer_kv(model, layer, ids[:, None].to(device), cache, start + t)  # [V, H, 1, D]
            d = (k[:, :, 0].float() - target_k[:, t]).pow(2).sum((1, 2)) + (v[:, :, 0].float() - target_v[:, t]).pow(
                2
            ).sum((1, 2))  # [V]
            i = int(d.argmin())
            if float(d[i]) < best_d:
                best, best_d = int(ids[i]), float(d[i])
        recovered.append(best)
        prefix = DynamicCache()  # the prefix's own cache, rebuilt with the recovered token appended
        _layer_kv(model, layer, torch.tensor([recovered], device=device), prefix, start)
    return recovered


_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _values_table(model: torch.nn.Module, vocab: torch.Tensor, chunk: int) -> torch.Tensor | None:
    """:func:`position_free_values`, computed once per model and candidate set."""
    key = hash(tuple(vocab.tolist()))
    tables = _TABLES.setdefault(model, {})
    if key not in tables:
        tables[key] = position_free_values(model, vocab, chunk)
    return tables[key]


@torch.no_grad()
def position_free_values(model: torch.nn.Module, vocab: torch.Tensor, chunk: int = 1024) -> torch.Tensor | None:
    """Every candidate's first-layer values ``[V, H*D]`` when they do not depend on the position
    (checked for a few candidates at a second position: true of rotary models, not of models
    adding position embeddings), else None."""
    device = next(model.parameters()).device

    def values(ids: torch.Tensor, position: int) -> torch.Tensor:
        return _layer_kv(model, 0, ids[:, None].to(device), DynamicCache(), position)[1][:, :, 0].flatten(1).float()

    table = torch.cat([values(ids, 0) for ids in vocab.split(chunk)])
    probe = vocab[:8]
    return table if torch.allclose(values(probe, 7), table[: len(probe)], atol=1e-4, rtol=1e-3) else None


def token_recovery(true_ids: Sequence[int], recovered: Sequence[int]) -> float:
    """Share of positions whose token was recovered exactly."""
    if len(true_ids) != len(recovered) or not true_ids:
        raise ValueError(f"Compare equal, non-empty sequences ({len(true_ids)} vs {len(recovered)} tokens).")
    return sum(a == b for a, b in zip(true_ids, recovered)) / len(true_ids)


def string_recovery(private: Sequence[str], recovered_text: str) -> float:
    """Share of the query's private strings (names, identifiers) found in the recovered text
    (case-insensitive); 0 when there are none to find is not defined: an error."""
    if not private:
        raise ValueError("No private strings given: there is nothing whose recovery could be measured.")
    text = recovered_text.lower()
    return sum(p.lower() in text for p in private) / len(private)


def sent_cache(
    model: torch.nn.Module, tokenizer, messages, assistant_prefix: str | None = None
) -> tuple[list[int], KVCache]:
    """The ``S0`` token ids a sender renders for ``messages`` as their holder (its private
    context included: the cache it transmits was built over it; ``assistant_prefix`` as the
    scoring prompt has it) and that cache (every position, float32, on the CPU)."""
    ids = render(tokenizer, holder_view(messages), assistant_prefix).ids
    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=torch.tensor([ids], device=next(model.parameters()).device), cache=cache, use_cache=True)
    return ids, KVCache.from_cache(cache).map(lambda t: t.float().cpu())


@dataclass(frozen=True)
class Transmitted:
    """One query as it leaves the sender: its prompt ids (what an attack should recover) and
    the payload as an eavesdropper decodes it, positions ``start..S0-1``."""

    ids: list[int]
    kv: KVCache
    start: int

    @property
    def first_layer(self) -> int:
        """The shallowest layer the payload holds (the one attacks invert best)."""
        return self.kv.present.index(True)


def transmit(ids: list[int], kv: KVCache, encoding: Encoding, positions: int | None = None) -> Transmitted:
    """What is on the wire for one query's cache ``kv`` (per layer ``[1, H, S0, D]``): its last
    ``positions`` positions (None: all), encoded and decoded (noise and quantisation included)."""
    start = 0 if positions is None else max(0, len(ids) - positions)
    cut = kv.map(lambda t: t[:, :, start:])
    cut.seq_len = len(ids) - start
    return Transmitted(ids, decode(encode(cut, encoding, "attacked")), start)


Strings = Mapping[str, Sequence[str]]
"""Named sets of one query's sensitive strings, e.g. ``{"private": [user name], "entity": [...]}``:
each set ``k`` gives a measure ``k_recovery``."""


def recovery(
    sent: Transmitted, recovered: Sequence[int], tokenizer, strings: Strings | None = None, bag: set[int] | None = None
) -> dict[str, float | bool | None]:
    """Measures of one attack on one query: ``token_recovery`` over all ``S0`` prompt positions
    (``recovered`` holds the tokens of the sent positions; unsent ones count as missed),
    ``exact_query``, and per named set ``k`` of ``strings`` ``k_recovery``: the share of its
    strings found in the recovered text or, given a ``bag`` of recovered token ids, whose every
    token is in it (tokenized alone and after a space); None for an empty set."""
    full = [-1] * sent.start + list(recovered)
    out: dict[str, float | bool | None] = {
        "token_recovery": token_recovery(sent.ids, full), "exact_query": full == sent.ids,
    }  # fmt: skip
    text = tokenizer.decode(list(recovered))
    for key, found in (strings or {}).items():
        if not found:
            out[f"{key}_recovery"] = None
        elif bag is None:
            out[f"{key}_recovery"] = string_recovery(found, text)
        else:
            forms = [[tokenizer(v, add_special_tokens=False)["input_ids"] for v in (p, " " + p)] for p in found]
            out[f"{key}_recovery"] = sum(any(set(ids) <= bag for ids in f) for f in forms) / len(found)
    return out


def attack_greedy(
    model, tokenizer, sent: Transmitted, strings: Strings | None = None, layer: int | None = None,
    shortlist: int | None = None,
) -> dict:  # fmt: skip
    """Attack (a) on one transmitted query at ``layer`` (default: the shallowest sent;
    ``shortlist``: :func:`invert_cache`'s)."""
    layer = sent.first_layer if layer is None else layer
    got = invert_cache(model, sent.kv, layer=layer, start=sent.start, shortlist=shortlist)
    return {"attack": "greedy inversion", "layer": layer, **recovery(sent, got, tokenizer, strings)}


def attack_table(
    model, tokenizer, queries: Sequence, encodings: Sequence[Encoding], layer: int = 0,
    private: Sequence[Sequence[str]] | None = None, positions: int | None = None,
) -> pd.DataFrame:  # fmt: skip
    """Attack (a) on each query's cache (``positions``: its last ones only) sent in each
    encoding: one row per encoding with the mean token recovery, the share of queries
    recovered exactly and (``private``: per query its private strings) the share of private
    strings found in the recovered text."""
    sent = [sent_cache(model, tokenizer, q) for q in queries]
    rows = []
    for enc in encodings:
        got = [
            attack_greedy(
                model,
                tokenizer,
                transmit(ids, kv, enc, positions),
                {"private": (private or [()] * len(sent))[i]},
                layer,
            )
            for i, (ids, kv) in enumerate(sent)
        ]
        rows.append({"encoding": enc.label, "layer": layer, "queries": len(sent), **mean_recovery(got)})
    return pd.DataFrame(rows)


def mean_recovery(rows: Sequence[dict]) -> dict[str, float | None]:
    """The mean over queries of each measure (every numeric field but ``layer``; each over the
    queries where it is defined, None where it never is)."""
    keys = dict.fromkeys(k for r in rows for k, v in r.items() if k != "layer" and not isinstance(v, str))
    out = {}
    for key in keys:
        got = [float(r[key]) for r in rows if r.get(key) is not None]
        out[key] = sum(got) / len(got) if got else None
    return out
