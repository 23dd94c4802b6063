"""Uncertainty of accuracies whose items share entities: cluster bootstrap intervals and
paired tests of one method against another on the same items.

Questions about one entity are not independent (a model that knows an entity tends to
answer all its questions), so an interval that treats items as independent (Wilson) is
too narrow. Every function here resamples *clusters* (entities) with replacement, keeping
each cluster's items together; ``n_boot`` resamples from a fixed ``seed`` make every
interval reproducible. Shapes: ``N`` items, ``C`` clusters, ``B`` bootstrap resamples.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

N_BOOT = 2000
LEVEL = 0.95


@dataclass(frozen=True)
class Estimate:
    """A share with its 95 % interval: a cluster bootstrap (``clusters`` resampled, ``n``
    items) or, from :func:`wilson_accuracy`, Wilson's (every item its own cluster)."""

    value: float
    n: int
    ci_low: float
    ci_high: float
    clusters: int

    def __str__(self) -> str:
        return f"{100 * self.value:.1f}% [{100 * self.ci_low:.1f}, {100 * self.ci_high:.1f}] (n={self.n})"


@dataclass(frozen=True)
class Difference:
    """``a - b`` on the same items: the difference of accuracies with its paired
    cluster-bootstrap interval and two-sided p-value, and McNemar's exact p-value on the
    items where exactly one of the two is right (which ignores the clustering)."""

    a: float
    b: float
    diff: float
    ci_low: float
    ci_high: float
    p_value: float
    mcnemar_p: float
    a_only: int
    b_only: int
    n: int
    clusters: int

    @property
    def significant(self) -> bool:
        """The 95 % interval of the difference excludes 0."""
        return self.ci_low > 0 or self.ci_high < 0

    def __str__(self) -> str:
        return (
            f"{100 * self.diff:+.1f} pt [{100 * self.ci_low:+.1f}, {100 * self.ci_high:+.1f}] "
            f"(paired bootstrap p={self.p_value:.3g}, McNemar p={self.mcnemar_p:.3g}, n={self.n})"
        )


def _weights(clusters: Sequence[str], n_boot: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(W, index)``: resample counts per cluster ``W`` [B, C] and each item's cluster
    index [N]."""
    names, index = np.unique(np.asarray([str(c) for c in clusters]), return_inverse=True)
    c = len(names)
    rng = np.random.default_rng(seed)
    return rng.multinomial(c, np.full(c, 1.0 / c), size=n_boot), index


def _sums(values: np.ndarray, index: np.ndarray, c: int) -> np.ndarray:
    """Per-cluster sums [C] of item ``values`` [N]."""
    return np.bincount(index, weights=values, minlength=c)


def _check(correct: Sequence[bool], clusters: Sequence[str], name: str = "correct") -> None:
    if len(correct) != len(clusters):
        raise ValueError(
            f"{name} has {len(correct)} items but clusters has {len(clusters)}: give one cluster (entity) per item."
        )


def cluster_accuracy(
    correct: Sequence[bool], clusters: Sequence[str], n_boot: int = N_BOOT, seed: int = 0, level: float = LEVEL
) -> Estimate:
    """Share of True in ``correct`` with a percentile interval from resampling ``clusters``
    (one label per item, e.g. its entity). ``nan`` value for no items. When every item
    agrees (0 % or 100 %) every resample does too, and the interval is Wilson's with the
    number of clusters as the sample size."""
    _check(correct, clusters)
    n = len(correct)
    if n == 0:
        return Estimate(float("nan"), 0, 0.0, 1.0, 0)
    x = np.asarray(correct, dtype=float)
    w, index = _weights(clusters, n_boot, seed)
    c = w.shape[1]
    if x.min() == x.max():  # all right or all wrong: every resample agrees, so use Wilson on C clusters
        return Estimate(float(x[0]), n, *_wilson(float(x[0]), c, level), c)
    stats = (w @ _sums(x, index, c)) / (w @ _sums(np.ones(n), index, c))  # [B]
    lo, hi = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
    return Estimate(float(x.mean()), n, float(lo), float(hi), c)


def wilson_accuracy(correct: Sequence[bool], level: float = LEVEL) -> Estimate:
    """Share of True in ``correct`` with Wilson's score interval, items taken as independent
    (``nan`` value for no items)."""
    n = len(correct)
    if n == 0:
        return Estimate(float("nan"), 0, 0.0, 1.0, 0)
    p = sum(bool(c) for c in correct) / n
    return Estimate(p, n, *_wilson(p, n, level), n)


def _wilson(p: float, n: int, level: float) -> tuple[float, float]:
    """Wilson score interval of a share ``p`` out of ``n``."""
    z = statistics.NormalDist().inv_cdf((1 + level) / 2)
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_p(a_only: int, b_only: int) -> float:
    """Exact two-sided McNemar p-value from the discordant counts (binomial, p = 1/2)."""
    k, m = min(a_only, b_only), a_only + b_only
    if m == 0:
        return 1.0
    tail = sum(math.comb(m, i) for i in range(k + 1)) / 2**m
    return min(1.0, 2 * tail)


def paired_difference(
    a_correct: Sequence[bool],
    b_correct: Sequence[bool],
    clusters: Sequence[str],
    n_boot: int = N_BOOT,
    seed: int = 0,
    level: float = LEVEL,
) -> Difference:
    """Accuracy of ``a`` minus that of ``b`` on the same items, resampling clusters for
    both at once. The p-value is twice the smaller share of resampled differences on
    either side of 0 (at least ``1 / n_boot``)."""
    _check(a_correct, clusters, "a_correct")
    _check(b_correct, clusters, "b_correct")
    n = len(clusters)
    if n == 0:
        raise ValueError("paired_difference needs at least one item.")
    a, b = np.asarray(a_correct, dtype=float), np.asarray(b_correct, dtype=float)
    w, index = _weights(clusters, n_boot, seed)
    c = w.shape[1]
    counts = w @ _sums(np.ones(n), index, c)
    diffs = (w @ _sums(a - b, index, c)) / counts  # [B]
    lo, hi = np.quantile(diffs, [(1 - level) / 2, (1 + level) / 2])
    p = 2 * min(np.mean(diffs <= 0), np.mean(diffs >= 0))
    a_only, b_only = int(np.sum((a == 1) & (b == 0))), int(np.sum((a == 0) & (b == 1)))
    return Difference(
        a=float(a.mean()),
        b=float(b.mean()),
        diff=float((a - b).mean()),
        ci_low=float(lo),
        ci_high=float(hi),
        p_value=float(min(1.0, max(p, 1.0 / n_boot))),
        mcnemar_p=mcnemar_p(a_only, b_only),
        a_only=a_only,
        b_only=b_only,
        n=n,
        clusters=c,
    )


def gap_closed(
    base: Sequence[bool],
    method: Sequence[bool],
    upper: Sequence[bool],
    clusters: Sequence[str],
    n_boot: int = N_BOOT,
    seed: int = 0,
    level: float = LEVEL,
) -> Estimate:
    """Share of the gap from ``base`` to ``upper`` that ``method`` closes,
    ``(method - base) / (upper - base)`` on the same items, with a paired cluster-bootstrap
    interval (resamples where the gap is 0 are dropped; ``nan`` if the gap itself is 0)."""
    for name, xs in (("base", base), ("method", method), ("upper", upper)):
        _check(xs, clusters, name)
    x0, x1, xu = (np.asarray(v, dtype=float) for v in (base, method, upper))
    n = len(clusters)
    gap = float((xu - x0).mean()) if n else 0.0
    if gap == 0.0:
        return Estimate(float("nan"), n, float("nan"), float("nan"), len(set(clusters)))
    w, index = _weights(clusters, n_boot, seed)
    c = w.shape[1]
    gained, gaps = w @ _sums(x1 - x0, index, c), w @ _sums(xu - x0, index, c)
    ratios = gained[gaps != 0] / gaps[gaps != 0]
    lo, hi = np.quantile(ratios, [(1 - level) / 2, (1 + level) / 2])
    return Estimate(float((x1 - x0).mean()) / gap, n, float(lo), float(hi), c)


def item_clusters(items: Sequence[dict]) -> list[str]:
    """One cluster label per MCQ item: its ``entity``, else the entities of its
    ``fact_ids`` (``domain/entity/relation``) joined by ``+``, else its ``id``."""
    out = []
    for it in items:
        if it.get("entity"):
            out.append(str(it["entity"]))
        elif it.get("fact_ids"):
            out.append("+".join(str(f).split("/")[1] if f.count("/") == 2 else str(f) for f in it["fact_ids"]))
        else:
            out.append(str(it.get("id", len(out))))
    return out
