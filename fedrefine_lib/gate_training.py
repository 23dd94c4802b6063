"""Gate training, through the one loop of ``train`` (``train.fit``): a gate's source weights
by the answer loss through the fused multi-sender cache (:func:`train_gate`), or a router on
which source serves each validation question best (:func:`train_gate_selection`);
:func:`fit_gate` picks either by name, as the notebooks do. The LLMs and fusers stay frozen.

Shapes: ``B`` queries per batch, ``N`` validation questions, ``J`` senders.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from fedrefine_lib.data import mcq_messages, mcq_records
from fedrefine_lib.decode import stop_token_ids
from fedrefine_lib.federation import FedRefine
from fedrefine_lib.gate import Gate, GateConfig, GateQuery, pooled_features
from fedrefine_lib.gating import query_features, selection_targets, source_success
from fedrefine_lib.prompts import Record, right_pad, split_record
from fedrefine_lib.train import TrainConfig, TrainResult, answer_loss, batches, fit, freeze


def _prepare_gate(gate: Gate, engine: FedRefine) -> torch.device:
    """Freeze the engine's models and fusers and put ``gate`` in training mode on the receiver's device."""
    if gate.config.receiver_name != engine.receiver.name:
        raise ValueError(
            f"The gate belongs to receiver {gate.config.receiver_name!r}, the engine's receiver is "
            f"{engine.receiver.name!r}."
        )
    for m in (engine.receiver, *engine.senders):
        freeze(m.model)
    for f in engine.fusers:
        f.eval().requires_grad_(False)
    dev = next(engine.receiver.model.parameters()).device
    gate.float().to(dev).train()
    return dev


def train_gate(
    engine: FedRefine, gate: Gate, records: Sequence[Record], config: TrainConfig | None = None
) -> TrainResult:
    """Train ``gate`` (in place) by the answer loss, the receiver, senders and fusers frozen.

    Loss: the receiver's answer loss (final assistant turn) with the gated multi-sender cache
    of ``engine`` (its policy is ignored here). The LLM caches and the frozen fusers'
    projections of every batch are computed once, before training (they also fit the gate's
    feature standardisation); only the gate's weights change.

    Args:
        records: chat records ending with the assistant turn (e.g. ``data.mcq_records`` of
            validation questions, in which different senders help on different domains).
    """
    config = config or TrainConfig()
    if not records:
        raise ValueError("No training records.")
    if gate.config.output != "weights":
        raise ValueError(
            "train_gate trains weights through the fused cache; a router (output='route') is not "
            "differentiable: train it with train_gate_selection."
        )
    dev = _prepare_gate(gate, engine)
    tok, stops = engine.receiver.tokenizer, stop_token_ids(engine.receiver)
    prepared = []
    for idx in batches(len(records), config):
        prompts, answers = zip(*(split_record(tok, records[i], stops) for i in idx))
        with torch.no_grad():
            caches = engine.prompt_caches(list(prompts))
            projections = engine.project(caches)
        query = GateQuery(
            caches.messages_batch, caches.receiver_cache, caches.receiver_mask[:, :-1], engine.sender_names
        )
        prepared.append((query, caches, projections, *right_pad(list(answers), dev)))
    gate.fit_features(torch.cat([pooled_features(q.receiver_cache, q.mask) for q, *_ in prepared]).to(dev))

    def make_loss(wrapped: torch.nn.Module) -> Callable[[int], torch.Tensor]:
        def loss_of(b: int) -> torch.Tensor:
            query, caches, projections, ans_ids, ans_mask = prepared[b]
            prefill = engine.combine(caches, projections, wrapped.weights(query))
            return answer_loss(engine.receiver.model, prefill, ans_ids, ans_mask)

        return loss_of

    return fit(gate, len(prepared), make_loss, config, desc=f"gate {gate.config.receiver_name}")


def train_gate_selection(
    engine: FedRefine, gate: Gate, items: Sequence[dict], targets: torch.Tensor, config: TrainConfig | None = None,
    batch_size: int = 64,
) -> TrainResult:  # fmt: skip
    """Train a router gate (``output="route"``, in place) on validation questions, from the
    receiver's own view of each question; at inference it opens the source it scores
    highest (none when that is the own cache). Two kinds of ``targets``:

    - ``[N, 1 + J]`` per-source success in [0, 1] (``gating.source_success``): one binary
      cross-entropy per source, so each score estimates the chance that source answers the
      question right and the router opens the source with the best expected accuracy;
    - ``[N]`` best-source indices (``gating.selection_targets``): cross-entropy of the softmax
      over the sources, a classifier of the single best source of each question.

    Args:
        items: MCQ items asked with ``data.mcq_messages``; targets in the gate's source
            order ``[own, *senders]``.
    """
    config = config or TrainConfig()
    if gate.config.output != "route":
        raise ValueError("train_gate_selection trains a router; build the gate with GateConfig(output='route').")
    sources = 1 + len(gate.config.senders)
    if tuple(targets.shape) == (len(items), sources) and targets.is_floating_point():
        if bool((targets < 0).any() | (targets > 1).any()):
            raise ValueError("Per-source success targets must be probabilities in [0, 1] (gating.source_success).")
        objective = F.binary_cross_entropy_with_logits
    elif tuple(targets.shape) == (len(items),) and not targets.is_floating_point():
        if bool((targets < 0).any() | (targets >= sources).any()):
            raise ValueError(
                f"Best-source targets must be indices in 0..{sources - 1} (own cache, then {gate.config.senders})."
            )
        objective = F.cross_entropy
    else:
        raise ValueError(
            f"targets must be [{len(items)}, {sources}] per-source success probabilities "
            f"(gating.source_success) or [{len(items)}] best-source indices (gating.selection_targets); "
            f"got {tuple(targets.shape)} {targets.dtype}."
        )
    dev = _prepare_gate(gate, engine)
    chats = [mcq_messages(it) for it in items]
    features = torch.cat([query_features(engine, chats[i : i + batch_size]) for i in range(0, len(items), batch_size)])
    gate.fit_features(features.to(dev))
    features, targets, fixed = features.to(dev), targets.to(dev), batches(len(items), config)

    def make_loss(wrapped: torch.nn.Module) -> Callable[[int], torch.Tensor]:
        return lambda b: objective(wrapped.logits(features[fixed[b]]), targets[fixed[b]])

    return fit(gate, len(fixed), make_loss, config, desc=f"gate {gate.config.receiver_name} (router)")


GATE_OBJECTIVES = ("selection", "answer")
GATE_TARGETS = ("domain", "question", "best")
GATE_DATA = ("val", "train")


def check_gate_choice(objective: str, targets: str = "domain", data: str = "val") -> None:
    """Refuse an unknown gate objective, router target or answer-loss data, naming what is allowed."""
    choices = (("gate_objective", objective, GATE_OBJECTIVES), ("gate_targets", targets, GATE_TARGETS))
    for name, value, allowed in (*choices, ("gate_data", data, GATE_DATA)):
        if value not in allowed:
            raise ValueError(f"{name}={value!r}: use one of {allowed}.")


def fit_gate(
    engine: FedRefine,
    objective: str,
    *,
    val_items: Sequence[dict],
    val_results: Mapping[Sequence[str], Any] | None = None,
    targets: str = "domain",
    records: Sequence[Record] | None = None,
    config: TrainConfig | None = None,
    **gate_options: Any,
) -> tuple[Gate, TrainResult, torch.Tensor | None]:
    """A gate for ``engine``'s receiver and senders, trained by ``objective``.

    Args:
        objective: ``"selection"``: a router learns which single source serves each
            validation question best (needs ``val_results``: subset -> ``McqResult`` on
            ``val_items``, at least the receiver alone and each single sender);
            ``"answer"``: source weights trained by the answer loss on ``records`` (default:
            the validation questions as records).
        targets: selection only: ``"domain"`` (each source's validation accuracy on the
            question's domain), ``"question"`` (whether it got that question right) or
            ``"best"`` (the single best source of each question).
        gate_options: ``gate.GateConfig`` fields (``hidden``, ``open_margin``, ...).
    Returns:
        the gate (eval mode), its training result and the router targets (None for ``answer``).
    """
    check_gate_choice(objective, targets)
    if objective == "answer":
        gate = Gate(GateConfig.for_receiver(engine.receiver, engine.senders, **gate_options))
        result = train_gate(engine, gate, records if records is not None else mcq_records(val_items), config)
        return gate, result, None
    if val_results is None:
        raise ValueError("A selection gate learns from val_results (e.g. sweep.kv_sweep on the validation items).")
    gate = Gate(GateConfig.for_receiver(engine.receiver, engine.senders, output="route", **gate_options))
    names = engine.sender_names
    if targets == "best":
        target = selection_targets(val_results, val_items, names)
    else:
        target = source_success(val_results, val_items, names, by="domain" if targets == "domain" else None)
    return gate, train_gate_selection(engine, gate, val_items, target, config), target
