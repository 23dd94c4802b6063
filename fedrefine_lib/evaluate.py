"""Multiple-choice scoring with any engine (receiver alone or fused caches), and accuracy
with a 95 % interval: a cluster bootstrap over the items' entities for a scored result
(:mod:`.stats`), a Wilson interval for a bare list of outcomes.

Items follow the OpenBookQA schema: ``id``, ``question_stem``, ``choices{text, label}``,
``answerKey`` (plus optional ``domain``). Methods:

- ``"loglik"`` (the ``mini`` world's default, lm-evaluation-harness style): the sum of the
  log-probabilities of each option's text (tokenized on its own) after the question's
  prompt (``data.mcq_messages``); the prompt cache is built once per question and reused
  for its options.
- ``"loglik_norm"`` (the harness's ``acc_norm``): the same sum divided by the option text's
  length in characters, so long options are not penalised for their length (real small
  models, whose option priors differ by length).
- ``"cloze"`` (for small real models, which do not follow listed options): the question
  without options (:func:`cloze_messages`), each option scored as the end of an answer
  sentence, ``"<cloze_prefix> <option>"`` (the item's ``cloze_prefix`` field, e.g. "Talvi
  Orsek lives in", else :data:`CLOZE_PREFIX`); the prefix is the same for every option of an
  item, so it leaves the choice to the option's tokens.
- ``"letter"``: logits of the option letters after a reference-style prompt (the same
  turn asking for the letter) whose assistant turn starts "The correct answer is".
- ``"generate"``: greedy generation after that prompt, then answer extraction.

Every item is counted: an unparseable answer is recorded (``prediction=None``) and wrong.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from fedrefine_lib import data
from fedrefine_lib.decode import generate
from fedrefine_lib.engine import Prefill, Standalone, continue_prefill
from fedrefine_lib.prompts import right_pad
from fedrefine_lib.stats import (
    Difference,
    Estimate,
    cluster_accuracy,
    item_clusters,
    paired_difference,
    wilson_accuracy,
)
from fedrefine_lib.trace import Trace

METHODS = ("loglik", "loglik_norm", "cloze", "letter", "generate")
CLOZE_PREFIX = "The answer is"
LETTER_PREFIX = "The correct answer is"
LETTER_INSTRUCTION = "Answer with the letter of the correct option."


# ------------------------------------------------------------------------ accuracy


Accuracy = Estimate
"""An accuracy with its 95 % interval (:class:`.stats.Estimate`)."""
accuracy = wilson_accuracy
"""Accuracy of a bare list of outcomes, Wilson's interval (:func:`.stats.wilson_accuracy`)."""


@dataclass
class McqResult:
    """Per-item outcome of :func:`score_mcq` (parallel lists, one entry per item).

    Attributes:
        predictions: predicted label, or None when the answer could not be parsed.
        scores: per option (item's label order): summed log-prob (loglik) or letter logit;
            empty for ``generate``.
        outputs: generated text (``generate``), else None.
        clusters: the item's cluster for intervals and paired tests (its entity, see
            :func:`.stats.item_clusters`).
    """

    method: str
    ids: list[str] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)
    predictions: list[str | None] = field(default_factory=list)
    correct: list[bool] = field(default_factory=list)
    scores: list[list[float]] = field(default_factory=list)
    outputs: list[str | None] = field(default_factory=list)
    domains: list[str | None] = field(default_factory=list)
    clusters: list[str] = field(default_factory=list)
    trace: Trace = field(default_factory=Trace)

    def accuracy(self) -> Estimate:
        """Accuracy with a cluster-bootstrap interval over the items' entities."""
        return cluster_accuracy(self.correct, self.cluster_labels())

    def accuracy_by(self, key: str = "domain") -> dict[str, Estimate]:
        """Accuracy per value of ``domains`` (the only grouping recorded)."""
        if key != "domain":
            raise ValueError("Only 'domain' grouping is recorded.")
        groups: dict[str, list[int]] = {}
        for i, d in enumerate(self.domains):
            groups.setdefault(str(d), []).append(i)
        clusters = self.cluster_labels()
        return {
            d: cluster_accuracy([self.correct[i] for i in idx], [clusters[i] for i in idx])
            for d, idx in sorted(groups.items())
        }

    def where(self, domains: Sequence[str] | None) -> McqResult:
        """The items of the given ``domains`` only (same order; trace not carried); every item
        when ``domains`` is empty or None (nothing says where, as in ``results.summarize``)."""
        wanted = set(domains or ())
        keep = [i for i, d in enumerate(self.domains) if d in wanted or not wanted]
        clusters = self.cluster_labels()

        def pick(xs: list) -> list:
            return [xs[i] for i in keep] if len(xs) == len(self.ids) else []

        return McqResult(
            self.method,
            ids=pick(self.ids),
            answers=pick(self.answers),
            predictions=pick(self.predictions),
            correct=pick(self.correct),
            scores=pick(self.scores),
            outputs=pick(self.outputs),
            domains=pick(self.domains),
            clusters=[clusters[i] for i in keep],
        )

    def compare(self, other: McqResult) -> Difference:
        """This result's accuracy minus ``other``'s on the same items, with a paired
        cluster-bootstrap interval and p-value (and McNemar's)."""
        if self.ids != other.ids:
            raise ValueError(
                "compare needs two results on the same items in the same order "
                f"({len(self.ids)} vs {len(other.ids)} items); score both on one item list."
            )
        return paired_difference(self.correct, other.correct, self.cluster_labels())

    def cluster_labels(self) -> list[str]:
        """Per-item clusters; each item its own when none were recorded."""
        return self.clusters if len(self.clusters) == len(self.correct) else list(self.ids)

    @property
    def unparseable(self) -> int:
        """Items whose answer could not be parsed (counted as wrong)."""
        return sum(p is None for p in self.predictions)

    def records(self) -> list[dict[str, Any]]:
        """One JSON-ready dict per item."""
        return [
            {"id": i, "answer": a, "prediction": p, "correct": c, "scores": s, "output": o, "domain": d}
            for i, a, p, c, s, o, d in zip(
                self.ids,
                self.answers,
                self.predictions,
                self.correct,
                self.scores or [[]] * len(self.ids),
                self.outputs,
                self.domains,
            )
        ]


# ------------------------------------------------------------------------- prompts


def question_messages(item: dict, context: str | None = None) -> list[dict[str, str]]:
    """The log-likelihood prompt: the question with its options (``data.mcq_messages``)."""
    return data.mcq_messages(item, context)


def cloze_messages(item: dict, context: str | None = None) -> list[dict[str, str]]:
    """The cloze prompt: the question without its options (``data.question_messages``)."""
    return data.question_messages(item, context)


def cloze_continuations(item: dict) -> list[str]:
    """Each option as the end of the item's answer sentence (see ``"cloze"`` above)."""
    prefix = item.get("cloze_prefix") or CLOZE_PREFIX
    return [f"{prefix} {text}" for text in item["choices"]["text"]]


def letter_messages(item: dict, context: str | None = None) -> list[dict[str, str]]:
    """The reference-style prompt: the same turn, asking for the option's letter."""
    messages = data.mcq_messages(item, context)
    content = messages[-1]["content"]
    if data.MCQ_INSTRUCTION not in content:
        raise ValueError("data.mcq_messages no longer ends with data.MCQ_INSTRUCTION; update letter_messages.")
    messages[-1] = {**messages[-1], "content": content.replace(data.MCQ_INSTRUCTION, LETTER_INSTRUCTION)}
    return messages


def scoring_prompt(item: dict, method: str, context: str | None = None) -> tuple[list[dict[str, str]], str | None]:
    """The prompt :func:`score_mcq` gives the engine (receiver and senders) for ``item`` under
    ``method``, and the assistant prefix it is rendered with."""
    if method not in METHODS:
        raise ValueError(f"Unknown MCQ method {method!r}; use one of {METHODS}.")
    if method in ("letter", "generate"):
        return letter_messages(item, context), LETTER_PREFIX
    return (cloze_messages if method == "cloze" else question_messages)(item, context), None


def extract_answer(text: str, labels: Sequence[str], options: Sequence[str]) -> str | None:
    """The label a generated answer names, or None.

    Tries, in order: "answer is X" / a leading "X" / "(X)" / a lone label; then exactly one
    option text appearing in the answer.
    """
    alt = "|".join(re.escape(l) for l in labels)
    for pattern in (rf"answer is:?\s*\(?({alt})\b", rf"^\s*\(?({alt})\b[\).:]?", rf"\(({alt})\)", rf"\b({alt})\b"):
        m = re.search(pattern, text)
        if m:
            return m.group(1)
    hits = [l for l, o in zip(labels, options) if o and o.lower() in text.lower()]
    return hits[0] if len(hits) == 1 else None


# ------------------------------------------------------------------------- scoring


def _engine(engine_or_model):
    if hasattr(engine_or_model, "prefill"):
        return engine_or_model
    if hasattr(engine_or_model, "model") and hasattr(engine_or_model, "tokenizer"):
        return Standalone(engine_or_model)
    raise TypeError(
        f"score_mcq needs an engine (engine.Standalone, federation.C2C, federation.FedRefine, ...) or a LoadedModel, "
        f"got {type(engine_or_model).__name__}."
    )


def continuation_logliks(
    engine,
    messages_batch: list[list[dict[str, str]]],
    continuations: list[list[str]],
    assistant_prefix: str | None = None,
) -> tuple[list[list[float]], Trace]:
    """Summed log-probability of each continuation text after each prompt.

    The prompt cache is built once per prompt and repeated for its continuations
    (``Prefill.select``); each continuation is tokenized on its own.

    Args:
        messages_batch: ``B`` prompts.
        continuations: per prompt, its candidate texts.
    Returns:
        per prompt, per continuation, the summed log-prob; and the prefill trace.
    """
    model, tok = engine.receiver.model, engine.receiver.tokenizer
    pre: Prefill = engine.prefill(messages_batch, assistant_prefix)
    rows = [b for b, conts in enumerate(continuations) for _ in conts]
    token_rows = [tok(text, add_special_tokens=False)["input_ids"] for conts in continuations for text in conts]
    if any(len(t) == 0 for t in token_rows):
        raise ValueError("An option text tokenizes to nothing; give every option some text.")
    cont, cmask = right_pad(token_rows, pre.input_ids.device)
    logits = continue_prefill(model, pre.select(rows), cont, cmask)[:, :-1]  # [R, L, V]
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, cont[..., None]).squeeze(-1)
    totals = (logp * cmask).sum(-1).tolist()
    out, i = [], 0
    for conts in continuations:
        out.append(totals[i : i + len(conts)])
        i += len(conts)
    return out, pre.trace


def _letter_token_ids(tok, label: str) -> list[int]:
    """First token of " X" and of "X"."""
    ids = []
    for text in (" " + label, label):
        enc = tok(text, add_special_tokens=False)["input_ids"]
        if enc:
            ids.append(enc[0])
    return ids


@torch.no_grad()
def score_mcq(
    engine_or_loadedmodel,
    items: Sequence[dict],
    *,
    method: str = "loglik",
    batch_size: int = 8,
    max_new_tokens: int = 16,
    progress: bool = True,
    contexts: Sequence[str | None] | None = None,
) -> McqResult:
    """Score multiple-choice ``items`` with an engine (or a ``LoadedModel`` = receiver alone).

    Args:
        method: one of :data:`METHODS` (see the module docstring).
        batch_size: questions per forward pass (``loglik`` runs ``batch_size x options`` rows).
        max_new_tokens: generation budget for ``"generate"``.
        contexts: one context note per item (or None for none), put before the question
            (``data.mcq_messages(item, contexts[i])``): the T2T baseline
            (``t2t.t2t_notes``) or an oracle note.
    Returns:
        a :class:`McqResult` with every item, in order.
    """
    if method not in METHODS:
        raise ValueError(f"Unknown MCQ method {method!r}; use one of {METHODS}.")
    if contexts is not None and len(contexts) != len(items):
        raise ValueError(f"Got {len(contexts)} contexts for {len(items)} items; give one context (or None) per item.")
    engine = _engine(engine_or_loadedmodel)
    tok = engine.receiver.tokenizer
    result = McqResult(method)
    starts = range(0, len(items), batch_size)
    batches = [
        (
            items[i : i + batch_size],
            [None] * len(items[i : i + batch_size]) if contexts is None else list(contexts[i : i + batch_size]),
        )
        for i in starts
    ]
    result.clusters = item_clusters(items)
    for batch, notes in tqdm(batches, desc=f"MCQ ({method})", disable=not progress):
        labels = [list(it["choices"]["label"]) for it in batch]
        texts = [list(it["choices"]["text"]) for it in batch]
        outputs: list[str | None] = [None] * len(batch)
        if method in ("loglik", "loglik_norm"):
            scores, trace = continuation_logliks(
                engine, [question_messages(it, c) for it, c in zip(batch, notes)], texts
            )
            if method == "loglik_norm":
                scores = [[v / len(t) for v, t in zip(row, ts)] for row, ts in zip(scores, texts)]
            preds = [_argmax_label(l, s) for l, s in zip(labels, scores)]
        elif method == "cloze":
            scores, trace = continuation_logliks(
                engine,
                [cloze_messages(it, c) for it, c in zip(batch, notes)],
                [cloze_continuations(it) for it in batch],
            )
            preds = [_argmax_label(l, s) for l, s in zip(labels, scores)]
        elif method == "letter":
            pre = engine.prefill([letter_messages(it, c) for it, c in zip(batch, notes)], LETTER_PREFIX)
            trace = pre.trace
            last = continue_prefill(engine.receiver.model, pre)[:, -1].float()  # [B, V]
            scores = [
                [max(last[b, i].item() for i in _letter_token_ids(tok, l)) for l in ls] for b, ls in enumerate(labels)
            ]
            preds = [_argmax_label(l, s) for l, s in zip(labels, scores)]
        else:
            outputs, trace = generate(
                engine, [letter_messages(it, c) for it, c in zip(batch, notes)], max_new_tokens, LETTER_PREFIX
            )
            scores = [[] for _ in batch]
            preds = [extract_answer(o, l, t) for o, l, t in zip(outputs, labels, texts)]
        unscored = [(it.get("id"), sc) for it, p, sc in zip(batch, preds, scores) if sc and p is None]
        if unscored:
            raise ValueError(
                f"Option scores that are NaN or infinite for items {unscored[:3]}: the receiver's logits "
                "overflowed or the fusion produced NaN. Load the models in float32 (ModelSpec dtype) and check "
                "the fuser's weights; no question is scored as wrong for it."
            )
        result.trace.add(trace)
        for it, p, s, o in zip(batch, preds, scores, outputs):
            result.ids.append(str(it.get("id", len(result.ids))))
            result.answers.append(it["answerKey"])
            result.predictions.append(p)
            result.correct.append(p is not None and p == it["answerKey"])
            result.scores.append(s)
            result.outputs.append(o)
            result.domains.append(it.get("domain"))
    return result


def _argmax_label(labels: list[str], scores: list[float]) -> str | None:
    """Label of the highest score (first on ties); None if any score is not finite."""
    if not scores or not all(math.isfinite(s) for s in scores):
        return None
    return labels[max(range(len(scores)), key=lambda i: scores[i])]
