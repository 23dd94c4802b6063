"""Is the answer in the cache? A linear probe on a model's prompt KV cache.

C2C can only move what the sender's cache holds. This probe asks, per layer, whether the
answer to a question can be read *linearly* from the keys and values a model stores for
one prompt position (by default the last, the one a concat fuser sends and a residual
fuser does not): a multinomial logistic regression from ``[K ; V]`` of that position to the
answer text, fitted on training chat records and scored on held-out MCQ items. Probing the
receiver's own cache on the same questions is the control (it does not know the answers).

    table = answer_probe(sender, train_pairs, test_pairs)   # layer -> held-out accuracy
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from fedrefine_lib.data import answer_text, mcq_messages
from fedrefine_lib.engine import prefill
from fedrefine_lib.prompts import Messages, encode_prompts, holder_view

Pair = tuple[Messages, str]
"""A prompt and the answer text it should lead to."""

MAX_CLASSES = 1000
"""The probe classifies into the distinct training answers; free-text answers do not fit."""


def record_pairs(records: Sequence[Messages]) -> list[Pair]:
    """``(prompt, answer)`` of chat records (the final assistant turn is the answer)."""
    return [(list(r[:-1]), r[-1]["content"]) for r in records]


def item_pairs(items: Sequence[dict]) -> list[Pair]:
    """``(prompt, correct option text)`` of MCQ items, with the log-likelihood prompt."""
    return [(mcq_messages(it), answer_text(it)) for it in items]


def closed_answers(pairs: Sequence[Pair], max_classes: int = MAX_CLASSES) -> bool:
    """Whether the answers form a closed set small enough to probe (e.g. MCQ option texts)."""
    return len({a for _, a in pairs}) <= max_classes


@torch.no_grad()
def cache_features(model, messages_batch: Sequence[Messages], position: int = -1, batch_size: int = 32) -> torch.Tensor:
    """Keys and values of one prompt position, per layer.

    Args:
        model: a ``models.LoadedModel``.
        position: index into the prompt (negative from the end; prompts are left padded,
            so ``-1`` is every prompt's last token).
    Returns:
        ``[N, layers, 2 * H * D]`` float32: ``[K ; V]`` with heads flattened.
    """
    if position >= 0:
        raise ValueError("position counts from the end of the prompt (e.g. -1 for the last token).")
    device = next(model.model.parameters()).device
    out = []
    for i in range(0, len(messages_batch), batch_size):
        chats = [holder_view(m) for m in messages_batch[i : i + batch_size]]  # a sender reads its own context
        ids, mask = encode_prompts(model.tokenizer, chats)
        cache = prefill(model.model, ids.to(device), mask.to(device))
        per_layer = [
            torch.cat([k[:, :, position].flatten(1), v[:, :, position].flatten(1)], dim=-1)  # [B, 2HD]
            for k, v in zip(cache.keys, cache.values)
        ]
        out.append(torch.stack(per_layer, dim=1).float().cpu())
    return torch.cat(out)


def fit_linear(
    x: torch.Tensor, y: torch.Tensor, classes: int, steps: int = 300, lr: float = 1e-2, l2: float = 1e-3
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression on standardised features (full batch, Adam, zero
    start: deterministic without touching the global RNG).

    Args:
        x: ``[N, F]``; y: ``[N]`` class ids in ``[0, classes)``.
    Returns:
        ``(weight [F, classes], mean [F], std [F])``.
    """
    mean, std = x.mean(0), x.std(0) + 1e-5
    z = (x - mean) / std
    w = torch.zeros(x.shape[1], classes, requires_grad=True)
    opt = torch.optim.Adam([w], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(z @ w, y) + l2 * w.pow(2).sum()
        loss.backward()
        opt.step()
    return w.detach(), mean, std


def answer_probe(
    model, train: Sequence[Pair], test: Sequence[Pair], position: int = -1, steps: int = 300
) -> dict[int, float]:
    """Held-out accuracy of a per-layer linear probe reading the answer from the cache.

    Args:
        model: a ``models.LoadedModel`` (the sender, or the receiver as the control).
        train: ``(prompt, answer)`` pairs to fit on (fuser-training records).
        test: held-out pairs; an answer never seen in ``train`` counts as wrong (the probe
            cannot name it), so no item is skipped.
        position: prompt position probed (from the end).
    Returns:
        layer -> accuracy on ``test``.
    """
    if not train or not test:
        raise ValueError("answer_probe needs training and test pairs.")
    if not closed_answers(train):
        raise ValueError(
            f"The training answers have more than {MAX_CLASSES} distinct texts (free text?): the probe "
            "needs short answers from a closed set, e.g. MCQ records (`chat_train_kinds: [mcq]`)."
        )
    classes = sorted({answer for _, answer in train})
    index = {a: i for i, a in enumerate(classes)}
    x_train = cache_features(model, [m for m, _ in train], position)
    x_test = cache_features(model, [m for m, _ in test], position)
    y_train = torch.tensor([index[a] for _, a in train])
    y_test = torch.tensor([index.get(a, -1) for _, a in test])
    accuracy = {}
    for layer in range(x_train.shape[1]):
        w, mean, std = fit_linear(x_train[:, layer], y_train, len(classes), steps)
        predicted = (((x_test[:, layer] - mean) / std) @ w).argmax(-1)
        accuracy[layer] = (predicted == y_test).float().mean().item()
    return accuracy
