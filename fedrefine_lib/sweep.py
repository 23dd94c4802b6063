"""Accuracy as senders are added: score every sender subset, by KV (FedRefine) or by
text (T2T), and summarise per number of senders (the paper's Fig. 3a)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import combinations
from typing import Any

import pandas as pd

from . import data
from .evaluate import McqResult, accuracy
from .federation import FedRefine
from .t2t import t2t_notes
from .trace import Trace

Subset = tuple[str, ...]
Score = Callable[..., McqResult]  # (engine_or_model, items, contexts=None) -> McqResult


def subsets(names: Sequence[str], sizes: Sequence[int] | None = None) -> list[Subset]:
    """Every subset of ``names`` (the empty one = receiver alone), smallest first."""
    sizes = range(len(names) + 1) if sizes is None else sizes
    return [tuple(c) for k in sizes for c in combinations(names, k)]


def kv_sweep(
    score: Score,
    receiver,
    senders: Sequence,
    fusers,
    items: Sequence[dict],
    *,
    mode: str | None = None,
    sender_views=None,
    only: Sequence[Subset] | None = None,
    policy=None,
) -> dict[Subset, McqResult]:
    """Score ``items`` with every sender subset through FedRefine (closed senders do not run).

    Args:
        score: e.g. ``study.score``.
        fusers: ``{sender name: fuser}`` for every sender (e.g. ``hub.FuserHub.fusers``);
            their kind sets the fusion mode (``mode``, if given, must match).
        only: the subsets to score (default: all).
        policy: the selection policy within each subset (e.g. a ``gating.LearnedGate`` over
            all the senders, which weighs just the subset's); None: equal weights.
    """
    names = [s.name for s in senders]
    out = {}
    for subset in only or subsets(names):
        if not subset:
            out[subset] = score(receiver, items)
            continue
        chosen = [s for s in senders if s.name in subset]
        engine = FedRefine(receiver, chosen, fusers, mode=mode, sender_views=sender_views, policy=policy)
        out[subset] = score(engine, items)
    return out


def t2t_sweep(
    score: Score,
    receiver,
    senders: Sequence,
    items: Sequence[dict],
    *,
    stems=None,
    only: Sequence[Subset] | None = None,
    max_new_tokens: int = 32,
    protocol: str = "background",
    scoring: str = "loglik",
) -> tuple[dict[Subset, McqResult], Trace]:
    """Score ``items`` with every sender subset by text (``protocol``, see
    :data:`.t2t.PROTOCOLS`; ``scoring`` as ``score`` scores, so an answer relay asks in the same
    form): each sender writes once; a subset's note joins its senders' texts. Returns results
    and the senders' trace."""
    names = [s.name for s in senders]
    _, texts, trace = t2t_notes(
        senders,
        items,
        receiver=receiver,
        stems=stems,
        max_new_tokens=max_new_tokens,
        protocol=protocol,
        scoring=scoring,
        progress=False,
    )
    out = {}
    for subset in only or subsets(names):
        if not subset:
            out[subset] = score(receiver, items)
            continue
        notes = [data.context_note([t for n, t in zip(names, row) if n in subset]) for row in texts]
        out[subset] = score(receiver, items, contexts=notes)
    return out, trace


def by_size(results: dict[Subset, McqResult], focus: Callable[[str | None], bool] | None = None) -> pd.DataFrame:
    """Per number of senders k: mean, min and max accuracy over the subsets of size k."""
    rows = []
    for subset, result in results.items():
        correct = [c for c, d in zip(result.correct, result.domains) if focus is None or focus(d)]
        rows.append(
            {
                "k": len(subset),
                "subset": " + ".join(subset) or "(receiver alone)",
                "accuracy": accuracy(correct).value,
                "n": len(correct),
            }
        )
    frame = pd.DataFrame(rows)
    return frame.groupby("k")["accuracy"].agg(["mean", "min", "max", "count"]).reset_index()


def table(results: dict[Subset, McqResult]) -> pd.DataFrame:
    """One row per subset: its accuracy with 95 % CI and per-domain accuracy."""
    rows = []
    for subset, result in results.items():
        acc = result.accuracy()
        row: dict[str, Any] = {
            "k": len(subset),
            "subset": " + ".join(subset) or "(receiver alone)",
            "accuracy": acc.value,
            "ci_low": acc.ci_low,
            "ci_high": acc.ci_high,
        }
        row |= {d: a.value for d, a in result.accuracy_by("domain").items()}
        rows.append(row)
    return pd.DataFrame(rows)
