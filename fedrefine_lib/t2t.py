"""The text-to-text (T2T) baselines, sender side: each sender writes text for each question,
and the receiver reads every sender's text as one context note (DESIGN §2).

Two protocols (:data:`PROTOCOLS`):

* ``"background"`` (the paper's T2T): the sender reads the question stem only and writes a
  background sentence about it;
* ``"answer"`` (answer relay): the sender reads the same prompt a KV sender reads under the
  study's scoring and sends its greedy answer, its first line, a few tokens. Scored by option
  log-likelihood (``mini``) the prompt is the question with its options and the receiver reads
  "The answer is <text>."; scored by cloze (small real models, which do not follow listed
  options) it is the question alone, the sender writes the end of the item's answer sentence
  after its ``cloze_prefix`` ("Talvi Orsek lives in" -> " Lisbon.") and the receiver reads that
  sentence. A KV sender's cache holds its answer at the last prompt position, so this is the
  text protocol with the same input as cache communication.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from fedrefine_lib import data
from fedrefine_lib.decode import generate_ids
from fedrefine_lib.engine import Standalone
from fedrefine_lib.evaluate import CLOZE_PREFIX, METHODS
from fedrefine_lib.prompts import Messages
from fedrefine_lib.trace import Trace

TOKEN_ID_BYTES = 4
"""Bytes of one token id on the wire (an int32), the text payload of T2T."""
PROTOCOLS = ("background", "answer")
RELAY_TEMPLATE = "The answer is {answer}."
"""How the receiver reads one relayed answer (added on the receiver's side, not sent)."""


@torch.no_grad()
def t2t_notes(
    senders: Sequence,
    items: Sequence[dict],
    *,
    receiver: str | object = "receiver",
    max_new_tokens: int = 32,
    batch_size: int = 8,
    stems: Sequence[str] | dict[str, Sequence[str]] | None = None,
    protocol: str = "background",
    scoring: str = "loglik",
    progress: bool = True,
) -> tuple[list[str], list[list[str]], Trace]:
    """The T2T sender side (DESIGN §2): each sender writes text for each question (greedy,
    its own template): a background sentence for the stem (``protocol="background"``,
    ``data.background_messages``) or its answer (``"answer"``: to the question with options,
    ``data.mcq_messages``, or under ``scoring="cloze"`` the end of the answer sentence), and
    the receiver later reads all senders' texts as one context note::

        notes, texts, trace = t2t_notes(senders, items, receiver=receiver)
        result = evaluate.score_mcq(receiver, items, contexts=notes)  # receiver side
        total = Trace().add(trace).add(result.trace)

    Args:
        senders: ``LoadedModel``s (in the order their texts appear in the note).
        items: MCQ items (``question_stem`` is read).
        receiver: the receiver (or its name), for the link names ``"<sender>-><receiver>"``.
        stems: what the senders read instead of ``question_stem``: one list for every
            sender (e.g. the receiver's rephrasing) or a dict sender name -> list.
        protocol: one of :data:`PROTOCOLS`.
        scoring: how the receiver scores the items (``evaluate.METHODS``; ``Study.scoring``):
            the answer relay asks in the same form.
    Returns:
        per item the context note (``data.context_note``), per item the senders' texts,
        and the trace: stages ``sender_prefill`` (tokenize + prefill) and ``sender_decode``;
        bytes per link = generated token ids x :data:`TOKEN_ID_BYTES`; tokens
        ``sender_generated``.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol={protocol!r}: use one of {PROTOCOLS}.")
    if scoring not in METHODS:
        raise ValueError(f"scoring={scoring!r}: use one of {METHODS}.")
    r_name = getattr(receiver, "name", receiver)
    trace = Trace()
    texts: list[list[str]] = [[] for _ in items]
    stages = {"tokenize": "sender_prefill", "receiver_prefill": "sender_prefill", "decode": "sender_decode"}
    for sender in senders:
        prompts = _prompts(protocol, scoring, items, _sender_stems(stems, sender.name, items))
        engine = Standalone(sender, holds_context=True)  # a sender reads its device's private context
        n_ids = 0
        for batch in tqdm(_batches(prompts, batch_size), desc=f"T2T {sender.name}", disable=not progress):
            rows, t = generate_ids(engine, [prompts[i][0] for i in batch], max_new_tokens, prompts[batch[0]][1])
            for stage, seconds in t.seconds.items():
                key = stages.get(stage)
                if key is None:
                    raise RuntimeError(
                        f"Unexpected stage {stage!r} in a sender's generation trace; map it in t2t_notes."
                    )
                trace.add_sender_seconds(key, {sender.name: seconds})
            for i, row in zip(batch, rows):
                if protocol == "answer":
                    row = _first_line(sender.tokenizer, row)
                text = data.tidy_text(sender.tokenizer.decode(row, skip_special_tokens=True))
                texts[i].append(_received(protocol, prompts[i][1], text))
                n_ids += len(row)
        link = f"{sender.name}->{r_name}"
        trace.bytes[link] = trace.bytes.get(link, 0) + n_ids * TOKEN_ID_BYTES
        trace.tokens["sender_generated"] = trace.tokens.get("sender_generated", 0) + n_ids
    return [data.context_note(t) for t in texts], texts, trace


def _prompts(protocol: str, scoring: str, items: Sequence[dict], stems: list[str]) -> list[tuple[Messages, str | None]]:
    """Per item, what a sender reads and the assistant prefix it continues (None: none)."""
    asked = [{**it, "question_stem": s} for it, s in zip(items, stems)]
    if protocol == "background":
        return [(data.background_messages(it["question_stem"], it.get("private_context")), None) for it in asked]
    if scoring == "cloze":
        return [(data.question_messages(it), it.get("cloze_prefix") or CLOZE_PREFIX) for it in asked]
    return [(data.mcq_messages(it), None) for it in asked]


def _batches(prompts: list[tuple[Messages, str | None]], batch_size: int) -> list[list[int]]:
    """Consecutive item indices, at most ``batch_size``, that share one assistant prefix."""
    out: list[list[int]] = []
    for i, (_, prefix) in enumerate(prompts):
        if out and len(out[-1]) < batch_size and prompts[out[-1][0]][1] == prefix:
            out[-1].append(i)
        else:
            out.append([i])
    return out


def _first_line(tokenizer, row: list[int]) -> list[int]:
    """The ids of ``row`` before the first one whose text holds a line break: an answer is one
    line (a base model continues with the next question)."""
    for j, token in enumerate(row):
        if "\n" in tokenizer.decode([token]):
            return row[:j]
    return row


def _received(protocol: str, prefix: str | None, text: str) -> str:
    """How the receiver reads a sender's text (added on the receiver's side, not sent)."""
    if protocol == "background":
        return text
    if prefix is not None:
        return data.tidy_text(f"{prefix} {text}")
    return RELAY_TEMPLATE.format(answer=text)


def _sender_stems(stems, sender: str, items: Sequence[dict]) -> list[str]:
    if stems is None:
        return [it["question_stem"] for it in items]
    if isinstance(stems, dict):
        if sender not in stems:
            raise KeyError(
                f"stems has no entry for sender {sender!r} (it has {sorted(stems)}); give one list per sender."
            )
        stems = stems[sender]
    if len(stems) != len(items):
        raise ValueError(f"Got {len(stems)} stems for {len(items)} items; give one stem per item.")
    return list(stems)
