"""Encoding examples into token ids the same way evaluation does, and batching them.

A chat example is encoded as ``tok(prompt) + tok(answer) + [end_of_turn]`` with each
segment encoded separately (``add_special_tokens=False``), where ``prompt`` is the
model's chat template with the generation prompt — exactly how scorers encode an
MCQ option after the prompt. Plain documents are ``[doc_start] + tok(text) + [doc_end]``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from .tasks import Example
from .tokenization import FAMILIES


@dataclass(frozen=True)
class Encoded:
    """Token ids of one example and which positions are trained (label != -100)."""

    ids: tuple[int, ...]
    labels: tuple[int, ...]


def encode(example: Example, tok, family: str) -> Encoded:
    """Encode one example; loss on the whole document or on the answer + end of turn."""
    fam = FAMILIES[family]
    if example.text is not None:
        ids = tok(example.text, add_special_tokens=False)["input_ids"]
        ids = ([tok.convert_tokens_to_ids(fam.doc_start)] if fam.doc_start else []) + ids
        ids = ids + [tok.convert_tokens_to_ids(fam.doc_end)]
        return Encoded(tuple(ids), tuple(ids))
    prompt = tok.apply_chat_template(list(example.messages), tokenize=False, add_generation_prompt=True)
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    a_ids = tok(example.answer, add_special_tokens=False)["input_ids"]
    a_ids = a_ids + [tok.convert_tokens_to_ids(fam.end_of_turn)]
    return Encoded(tuple(p_ids + a_ids), tuple([-100] * len(p_ids) + a_ids))


def batches(
    encoded: list[Encoded], batch_size: int, pad_id: int, rng: random.Random, bucket: int = 50
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Length-bucketed, right-padded batches in a deterministic shuffled order.

    Returns:
        list of ``(input_ids, attention_mask, labels)``, each ``(B, T)`` long tensors.
    """
    order = list(range(len(encoded)))
    rng.shuffle(order)
    chunk = batch_size * bucket
    groups: list[list[int]] = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start : start + chunk], key=lambda i: len(encoded[i].ids))
        groups += [part[j : j + batch_size] for j in range(0, len(part), batch_size)]
    rng.shuffle(groups)
    out = []
    for group in groups:
        width = max(len(encoded[i].ids) for i in group)
        ids = torch.full((len(group), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        labels = torch.full((len(group), width), -100, dtype=torch.long)
        for row, i in enumerate(group):
            n = len(encoded[i].ids)
            ids[row, :n] = torch.tensor(encoded[i].ids)
            mask[row, :n] = 1
            labels[row, :n] = torch.tensor(encoded[i].labels)
        out.append((ids, mask, labels))
    return out
