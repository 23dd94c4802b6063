"""Choosing cache or text communication per request from network state and a latency budget
(the paper's future direction), and serving a stream of requests over a changing link.

An :class:`Option` is one way to answer a query (the receiver alone, a text protocol, KV at one
transport encoding and layer budget, for a set of senders), with its accuracy and its
per-query compute and bytes *measured on the validation split*. :func:`choose` picks, for the
current link, the most accurate option whose estimated latency

    latency = compute_s + network.transmission_seconds(link_bytes, link)

meets the budget, or the fastest if none does. :func:`serve` runs a policy over a stream of
requests on a :func:`bandwidth_trace`, and scores each request with the chosen option's
correctness on a *test* question: right and within the budget, or not.

Compute is taken as measured (every stage but ``transmission``, senders one after another);
the link is the first-order model of ``network.Link``. Both are estimates the policy plans
with; the measured-vs-modelled comparison is ``wire``'s.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import pandas as pd
import torch

from fedrefine_lib.network import Link, Links, transmission_seconds
from fedrefine_lib.trace import Trace


@dataclass(frozen=True)
class Option:
    """One way to answer a query, as measured on the validation split.

    Attributes:
        name: e.g. ``"standalone"``, ``"text: answer relay"``, ``"kv int4"``.
        accuracy: validation accuracy (what :func:`choose` ranks by).
        compute_s: seconds of computation per query (every stage but transmission).
        link_bytes: bytes per link per query (none: nothing is sent).
    """

    name: str
    accuracy: float
    compute_s: float
    link_bytes: Mapping[str, float] = field(default_factory=dict)

    @classmethod
    def from_trace(cls, name: str, accuracy: float, trace: Trace, queries: int) -> Option:
        """Per-query cost measured by an engine's trace over ``queries`` queries (any
        ``transmission`` stage excluded)."""
        if queries < 1:
            raise ValueError(f"queries must be >= 1, got {queries}.")
        compute = sum(s for k, s in trace.seconds.items() if k != "transmission")
        return cls(name, accuracy, compute / queries, {k: b / queries for k, b in trace.bytes.items()})

    @property
    def bytes_per_query(self) -> float:
        return float(sum(self.link_bytes.values()))

    def latency(self, links: Links, parallel: bool = True) -> float:
        """Estimated seconds for one query: compute plus its bytes over ``links`` (one message)."""
        return self.compute_s + transmission_seconds(self.link_bytes, links, 1, parallel)


@dataclass(frozen=True)
class Decision:
    """The option chosen for one request and its estimated latency."""

    option: str
    latency_s: float
    within_budget: bool
    reason: str


def choose(options: Sequence[Option], links: Links, budget_s: float) -> Decision:
    """The most accurate option meeting ``budget_s`` on ``links`` (ties: the faster); if none
    meets it, the fastest (``within_budget=False``)."""
    if not options:
        raise ValueError("choose needs at least one option (e.g. the receiver alone).")
    if not budget_s > 0:
        raise ValueError(f"The latency budget must be > 0 s, got {budget_s}.")
    latency = {o.name: o.latency(links) for o in options}
    meets = [o for o in options if latency[o.name] <= budget_s]
    if meets:
        best = max(meets, key=lambda o: (o.accuracy, -latency[o.name]))
        return Decision(best.name, latency[best.name], True, f"most accurate within {budget_s:g} s")
    fastest = min(options, key=lambda o: latency[o.name])
    return Decision(fastest.name, latency[fastest.name], False, f"no option meets {budget_s:g} s; the fastest")


def fixed(name: str) -> Callable[[Sequence[Option], Links, float], Decision]:
    """A policy that always uses option ``name`` (e.g. always-KV, always-text)."""

    def policy(options: Sequence[Option], links: Links, budget_s: float) -> Decision:
        by_name = {o.name: o for o in options}
        if name not in by_name:
            raise KeyError(f"No option {name!r}; have {sorted(by_name)}.")
        t = by_name[name].latency(links)
        return Decision(name, t, t <= budget_s, "fixed")

    policy.__name__ = f"always {name}"
    return policy


def bandwidth_trace(
    n: int, low_mbps: float, high_mbps: float, rtt_ms: float = 40.0, *, seed: int = 0, persistence: float = 0.9
) -> list[Link]:
    """``n`` link states: log-bandwidth follows a seeded AR(1) walk (``persistence`` per request)
    between ``low_mbps`` and ``high_mbps`` (a stand-in for a measured trace)."""
    if not 0 < low_mbps < high_mbps or not 0 <= persistence < 1 or n < 1:
        raise ValueError(f"Need n >= 1, 0 < low < high and 0 <= persistence < 1; got {n}, {low_mbps}, {high_mbps}.")
    g = torch.Generator().manual_seed(seed)
    lo, hi = math.log(low_mbps), math.log(high_mbps)
    mid, spread = (lo + hi) / 2, (hi - lo) / 2
    x, links = 0.0, []
    for i in range(n):
        x = persistence * x + math.sqrt(1 - persistence**2) * float(torch.randn((), generator=g))
        level = mid + spread * math.tanh(x)
        links.append(Link(f"t{i}", math.exp(level), rtt_ms))
    return links


def serve(
    policy: Callable[[Sequence[Option], Links, float], Decision],
    options: Sequence[Option],
    links: Sequence[Link],
    budget_s: float,
    correct: Mapping[str, Sequence[bool]],
) -> pd.DataFrame:
    """Serve request ``i`` on link state ``links[i]`` with test question ``i mod n``.

    Args:
        correct: option name -> per test question, whether that option answers it right
            (one order of questions for every option).
    Returns:
        one row per request: ``bandwidth_mbps``, ``option``, ``latency_s``, ``within_budget``,
        ``correct`` (right answer) and ``served`` (right and within the budget).
    """
    sizes = {len(v) for v in correct.values()}
    if len(sizes) != 1 or not sizes.pop():
        raise ValueError("`correct` must give every option the same non-empty list of test questions.")
    n = len(next(iter(correct.values())))
    rows = []
    for i, link in enumerate(links):
        d = policy(options, link, budget_s)
        if d.option not in correct:
            raise KeyError(f"The policy chose {d.option!r}, which has no test correctness (have {sorted(correct)}).")
        right = bool(correct[d.option][i % n])
        rows.append(
            {
                "request": i, "bandwidth_mbps": link.bandwidth_mbps, "option": d.option, "latency_s": d.latency_s,
                "within_budget": d.within_budget, "correct": right, "served": right and d.within_budget,
            }
        )  # fmt: skip
    return pd.DataFrame(rows)


def sweep(
    policies: Mapping[str, Callable],
    options: Sequence[Option],
    bandwidths_mbps: Sequence[float],
    budgets_s: float | Sequence[float],
    correct: Mapping[str, Sequence[bool]],
    rtt_ms: float = 40.0,
) -> pd.DataFrame:
    """Each policy at each fixed (bandwidth, budget) over every test question: the share
    answered right within the budget (``served``), within the budget at all, and the option
    chosen (one row per policy, bandwidth and budget)."""
    budgets = [budgets_s] if isinstance(budgets_s, (int, float)) else list(budgets_s)
    n = len(next(iter(correct.values())))
    rows = []
    for budget in budgets:
        for bw in bandwidths_mbps:
            link = Link(f"{bw:g} Mbit/s", bw, rtt_ms)
            for name, policy in policies.items():
                out = serve(policy, options, [link] * n, budget, correct)
                rows.append(
                    {
                        "budget_s": budget, "bandwidth_mbps": bw, "policy": name, "served": out["served"].mean(),
                        "within_budget": out["within_budget"].mean(), "option": out["option"].iloc[0],
                        "latency_s": out["latency_s"].iloc[0],
                    }
                )  # fmt: skip
    return pd.DataFrame(rows)


def against_fixed(table: pd.DataFrame, policy: str, fixed_policies: Sequence[str]) -> pd.DataFrame:
    """Per (budget, bandwidth) of a :func:`sweep`: ``policy``'s served share minus the best of
    ``fixed_policies`` (positive: the policy serves more requests right within the budget)."""
    served = table.pivot_table(index=["budget_s", "bandwidth_mbps"], columns="policy", values="served")
    return (served[policy] - served[list(fixed_policies)].max(axis=1)).rename("margin").reset_index()


def checks(grid: pd.DataFrame, margin: pd.DataFrame, policy: str = "qos policy", tol: float = 1e-12) -> dict:
    """What a :func:`sweep` of ``policy`` and :func:`against_fixed`'s ``margin`` show: whether
    it is never worse than the better fixed protocol, in how many cells it is better or worse,
    and in how many it chose a KV option (names starting ``kv``)."""
    m = margin["margin"]
    chosen = grid[grid["policy"] == policy]["option"]
    return {
        "never_worse_than_best_fixed": bool((m >= -tol).all()), "strictly_better_somewhere": bool((m > tol).any()),
        "cells_better": int((m > tol).sum()), "cells_worse": int((m < -tol).sum()), "cells": len(m),
        "kv_chosen_cells": int(chosen.str.startswith("kv").sum()),
    }  # fmt: skip


def stream_summary(streams: Mapping[str, pd.DataFrame]) -> dict:
    """Per policy's :func:`serve` stream: share served, share within budget, options chosen."""
    return {
        name: {
            "served": float(s["served"].mean()),
            "within_budget": float(s["within_budget"].mean()),
            "options": s["option"].value_counts().to_dict(),
        }
        for name, s in streams.items()
    }
