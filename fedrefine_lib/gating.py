"""Source weighting for multi-sender FedRefine: how much of each source (the receiver's own
cache and each sender's projected cache) a receiver uses, per query.

Weights are a tensor ``[B, 1 + J]``: column 0 the receiver's own cache, column ``1 + j``
the engine's ``j``-th sender. ``federation.FedRefine`` uses them as:

- ``residual``: ``C = C_r + sum_j w_j * Delta_j`` (``Delta_j``: sender ``j``'s projected
  residual, ``federation.project``); ``w_0`` is not used (the own cache is the base);
- ``concat``: ``w_j`` multiplies the attention mass the receiver gives sender ``j``'s block
  (``log w_j`` on those attention logits) and ``w_0`` that of its own prompt cache (the own
  cache is never masked).

A sender weight of exactly 0 *closes* that sender: it has no effect at all (its residual
is not added / its block is masked), and a sender closed for a whole batch is not even run
and sends nothing. Policies (all callables ``policy(query) -> [B, 1 + J]``):

- :class:`EqualWeights`: every source 1 (the reference C2C's unweighted sum of residuals);
- :class:`SubsetSelection`: 1 for a fixed sender subset, or per domain (the paper's
  prior-knowledge selection; :func:`prior_subsets` picks each domain's best subset on
  the validation split; :func:`domain_lookup` finds a query's domain);
- :class:`LearnedGate`: a trained ``gate.Gate`` (one per receiver) reading the receiver's
  own view of the query (``gate.pooled_features``): either source weights trained through
  the fused cache by the answer loss (``train.train_gate``), or a router that opens the one
  sender it predicts serves the query best (``train.train_gate_selection`` on
  :func:`source_success` or :func:`selection_targets` of validation questions).

:func:`oracle_correct` gives the per-question oracle selection (an upper bound);
:func:`targets_by_domain` and :func:`weights_by_domain` tabulate what a gate learns from
and what it does.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import nn

from fedrefine_lib.gate import OWN, Gate, GateQuery, pooled_features
from fedrefine_lib.prompts import Messages


class Policy(Protocol):
    name: str

    def __call__(self, query: GateQuery) -> torch.Tensor: ...


def _ones(query: GateQuery) -> torch.Tensor:
    return torch.ones(query.mask.shape[0], 1 + len(query.senders), device=query.mask.device)


# ----------------------------------------------------------------------- policies


class EqualWeights:
    """Every sender with weight 1: the reference C2C's unweighted sum of residuals."""

    name = "equal"

    def __call__(self, query: GateQuery) -> torch.Tensor:
        return _ones(query)


class SubsetSelection:
    """Hard selection: weight 1 for the chosen senders, 0 (closed) for the others.

    Args:
        subsets: one sender subset for every query, or ``{domain: subset}`` (the paper's
            prior-knowledge selection, e.g. from :func:`prior_subsets`).
        domain_of: chat -> domain, needed with a per-domain dict (:func:`domain_lookup`).
    """

    def __init__(
        self,
        subsets: Sequence[str] | Mapping[str, Sequence[str]],
        domain_of: Callable[[Messages], str] | None = None,
        name: str | None = None,
    ):
        self.per_domain = isinstance(subsets, Mapping)
        if self.per_domain and domain_of is None:
            raise ValueError("Per-domain subsets need domain_of (e.g. gating.domain_lookup(items)).")
        self.subsets = {k: tuple(v) for k, v in subsets.items()} if self.per_domain else tuple(subsets)
        self.domain_of = domain_of
        self.name = name or ("prior" if self.per_domain else "subset")

    def chosen(self, messages: Messages) -> tuple[str, ...]:
        if not self.per_domain:
            return self.subsets
        domain = self.domain_of(messages)
        if domain not in self.subsets:
            raise KeyError(f"No sender subset for domain {domain!r}; the selection knows {sorted(self.subsets)}.")
        return self.subsets[domain]

    def __call__(self, query: GateQuery) -> torch.Tensor:
        weights = torch.zeros(len(query.messages_batch), 1 + len(query.senders), device=query.mask.device)
        weights[:, 0] = 1.0
        for b, messages in enumerate(query.messages_batch):
            for name in self.chosen(messages):
                if name not in query.senders:
                    raise ValueError(
                        f"The selection chose sender {name!r}, which this engine does not have (it has "
                        f"{query.senders}); build the engine with every sender the selection may choose."
                    )
                weights[b, 1 + query.senders.index(name)] = 1.0
        return weights


def domain_lookup(items: Sequence[dict]) -> Callable[[Messages], str]:
    """Chat -> domain of the MCQ item whose ``question_stem`` it asks (the longest stem
    found in the last message wins). Raises naming the chat when none matches."""
    stems = sorted(((it["question_stem"], it.get("domain")) for it in items), key=lambda s: -len(s[0]))
    if any(d is None for _, d in stems):
        raise ValueError("Every item needs a 'domain' field for domain_lookup.")

    def domain_of(messages: Messages) -> str:
        text = messages[-1]["content"]
        for stem, domain in stems:
            if stem in text:
                return domain
        raise KeyError(f"No item's question_stem appears in the chat {text[:80]!r}; pass the items it asks about.")

    return domain_of


def prior_subsets(
    results: Mapping[Sequence[str], Any],
    metric: Callable[[Sequence[bool]], float] | None = None,
    sizes: Sequence[int] | None = None,
) -> dict[str, tuple[str, ...]]:
    """The paper's prior-knowledge selection: per domain, the sender subset with the best
    accuracy on the *validation* split.

    Args:
        results: sender subset (tuple of names; ``()`` = receiver alone) -> its
            ``evaluate.McqResult`` on validation items (with ``domain``).
        sizes: consider only subsets of these sizes (e.g. ``[1]``: route to one sender,
            ``[2]``: the best two); None: every subset.
    Returns:
        ``{domain: subset}``; ties go to the smaller subset, then name order.
    """
    metric = metric or (lambda c: sum(c) / len(c))
    per_domain: dict[str, list[tuple[float, int, tuple[str, ...]]]] = {}
    for subset, result in results.items():
        if sizes is not None and len(subset) not in sizes:
            continue
        groups: dict[str, list[bool]] = {}
        for d, c in zip(result.domains, result.correct):
            groups.setdefault(str(d), []).append(bool(c))
        for d, correct in groups.items():
            per_domain.setdefault(d, []).append((-metric(correct), len(subset), tuple(sorted(subset))))
    return {d: min(cands)[2] for d, cands in sorted(per_domain.items())}


def _same_items(results: list[Any]) -> list[str]:
    if not results:
        raise ValueError("Give at least one result.")
    ids = results[0].ids
    for r in results[1:]:
        if r.ids != ids:
            raise ValueError("The results cover different items (ids differ); score every subset on the same items.")
    return ids


def oracle_correct(
    results: Mapping[Sequence[str], Any], knows: Mapping[str, Sequence[str]] | None = None
) -> list[bool]:
    """Per-question oracle selection (upper bound): item ``i`` is right if any subset's
    result gets it right. All results must cover the same items in the same order.

    With ``knows`` (sender -> the domains it knows) only the receiver alone and subsets
    whose every sender knows the item's domain (one of a two-fact item's ``a+b``) count: a
    sender that cannot know the answer never wins by luck (over 16 subsets, sending every
    sender another question's cache still "scored" 72.7 % in version 7)."""
    keys = list(results)
    ids = _same_items([results[k] for k in keys])
    first = results[keys[0]]
    out = []
    for i in range(len(ids)):
        domains = set(str(first.domains[i]).split("+")) if knows is not None else set()
        allowed = [k for k in keys if knows is None or all(domains & set(knows.get(s, ())) for s in k)]
        out.append(any(results[k].correct[i] for k in allowed))
    return out


def route_results(results: Mapping[Sequence[str], Any], choice: Mapping[str, Sequence[str]]) -> Any:
    """Per item, the outcome of the subset ``choice`` names for its domain (e.g. from
    :func:`prior_subsets` on validation): routing applied to results already scored, such
    as delegation (``{(sender,): the sender's own result}``) or a text protocol's
    single-sender runs. Returns an ``McqResult``-like copy of the first result with the
    routed items' predictions, correctness and scores."""
    keys = {tuple(sorted(k)): k for k in results}
    ids = _same_items(list(results.values()))
    first = next(iter(results.values()))
    routed = copy.copy(first)
    fields = ("predictions", "correct", "scores", "outputs")
    for name in fields:
        setattr(routed, name, list(getattr(first, name)))
    for i in range(len(ids)):
        domain = str(first.domains[i])
        if domain not in choice:
            raise KeyError(f"No subset chosen for domain {domain!r} (choice has {sorted(choice)}).")
        key = keys.get(tuple(sorted(choice[domain])))
        if key is None:
            raise KeyError(f"No result for the subset {choice[domain]} chosen for {domain!r}.")
        for name in fields:
            values = getattr(results[key], name)
            if len(values) == len(ids):
                getattr(routed, name)[i] = values[i]
    routed.trace = type(first.trace)()
    return routed


class LearnedGate:
    """A trained :class:`Gate` as a selection policy.

    Args:
        threshold: weights at or below it are closed (exactly 0; their senders are not
            run). 0 keeps every sender the gate's sigmoid leaves open.
    """

    name = "gate"

    def __init__(self, gate: Gate, threshold: float = 0.0):
        self.gate, self.threshold = gate, threshold

    @torch.no_grad()
    def __call__(self, query: GateQuery) -> torch.Tensor:
        w = self.gate.weights(query)
        return torch.where(w > self.threshold, w, torch.zeros_like(w))


# ----------------------------------------------------------------------- targets


def _single_source_results(
    results: Mapping[Sequence[str], Any], items: Sequence[dict], senders: Sequence[str], per_option: bool = False
) -> list:
    """``[results[()], results[(s,)] for s in senders]``, checked to score ``items`` in order."""
    needed = [(), *[(s,) for s in senders]]
    missing = [k for k in needed if tuple(k) not in results]
    if missing:
        raise KeyError(f"Gate targets need results for the receiver alone and each single sender; missing {missing}.")
    ids = [str(it["id"]) for it in items]
    for k in needed:
        r = results[k]
        if [str(i) for i in r.ids] != ids or (per_option and not all(r.scores)):
            raise ValueError(
                "The results must score exactly these items, in order"
                + (", with per-option scores (method 'loglik' or 'letter')." if per_option else ".")
            )
    return [results[k] for k in needed]


def source_success(
    results: Mapping[Sequence[str], Any], items: Sequence[dict], senders: Sequence[str], by: str | None = "domain"
) -> torch.Tensor:
    """How well each source serves each question: ``[N, 1 + J]`` over ``[own, *senders]``
    (column 0: the receiver alone; column ``1 + j``: with sender ``j`` alone).

    Args:
        results: subset -> ``evaluate.McqResult`` on ``items`` (at least ``()`` and every
            single sender ``(j,)``; e.g. ``sweep.kv_sweep`` on the validation split).
        by: ``"domain"``: each source's accuracy over the questions of the question's
            domain (``item["domain"]``); ``None``: whether it answered this question right
            (0/1, a far noisier signal: on the mini world a router learns little from it).
    """
    runs = _single_source_results(results, items, senders)
    correct = torch.tensor([r.correct for r in runs], dtype=torch.float32).T  # [N, 1 + J]
    if by is None:
        return correct
    if by != "domain":
        raise ValueError(f"source_success(by={by!r}): use 'domain' or None.")
    unlabelled = [str(it.get("id")) for it in items if "domain" not in it]
    if unlabelled:
        raise ValueError(
            f"source_success(by='domain') needs each item's 'domain'; items {unlabelled[:5]} have none. "
            "Pass by=None for per-question targets."
        )
    groups = [str(it["domain"]) for it in items]
    means = {g: correct[[i for i, x in enumerate(groups) if x == g]].mean(0) for g in set(groups)}
    return torch.stack([means[g] for g in groups])


def selection_targets(
    results: Mapping[Sequence[str], Any], items: Sequence[dict], senders: Sequence[str]
) -> torch.Tensor:
    """The best source for each question: ``[N]`` indices over ``[own, *senders]``, the one
    whose run gives the right option the highest probability (softmax over the options'
    scores): ``0`` when the receiver alone beats every single sender (ties go to the lower
    index, so to the receiver alone)."""
    runs = _single_source_results(results, items, senders, per_option=True)

    def right_prob(result) -> torch.Tensor:
        return torch.stack(
            [
                torch.softmax(torch.tensor(sc, dtype=torch.float64), 0)[it["choices"]["label"].index(it["answerKey"])]
                for sc, it in zip(result.scores, items)
            ]
        )

    return torch.stack([right_prob(r) for r in runs], dim=1).argmax(1)  # first maximum: the receiver alone wins ties


@torch.no_grad()
def query_features(engine, messages_batch: list[Messages]) -> torch.Tensor:
    """``gate.pooled_features`` of the receiver's own prefill of each chat, ``[B, F]``."""
    cache, mask = engine.receiver_view(messages_batch)
    return pooled_features(cache, mask)


def targets_by_domain(targets: torch.Tensor, items: Sequence[dict], sources: Sequence[str]):
    """What a router learns from, per domain: the mean of ``targets`` (``[N, 1 + J]`` per-source
    success, or ``[N]`` best-source indices, one-hot here) over each domain's ``items``; a
    pandas DataFrame (rows: domains, columns: ``sources``)."""
    import pandas as pd

    one_hot = targets if targets.is_floating_point() else nn.functional.one_hot(targets, len(sources))
    frame = pd.DataFrame(one_hot.float().cpu().numpy(), columns=list(sources))
    return frame.groupby([it["domain"] for it in items]).mean()


@torch.no_grad()
def weights_by_domain(engine, items: Sequence[dict], messages: Callable[[dict], Messages], batch_size: int = 32):
    """The mean weight ``engine``'s policy gives each source per domain of ``items`` (from the
    receiver's own prefill only; no sender runs); a pandas DataFrame (rows: domains, columns:
    ``own`` and the engine's senders). For a router (0/1 weights), ``own`` is the share of
    questions the receiver answers alone.

    Args:
        messages: item -> the chat the receiver is asked (e.g. ``data.mcq_messages``).
    """
    import pandas as pd

    gate = getattr(engine.policy, "gate", None)
    route = isinstance(gate, Gate) and gate.config.output == "route"
    rows = []
    for i in range(0, len(items), batch_size):
        batch = items[i : i + batch_size]
        w = engine.source_weights([messages(it) for it in batch])
        if route:
            w[:, 0] = 1 - w[:, 1:].sum(1)
        rows += [
            {"domain": it["domain"], **dict(zip([OWN, *engine.sender_names], wi.tolist()))} for it, wi in zip(batch, w)
        ]
    return pd.DataFrame(rows).groupby("domain").mean()
