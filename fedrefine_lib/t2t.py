"""The text-to-text (T2T) baselines, sender side: each sender writes text for each question,
and the receiver reads every sender's text as one context note (DESIGN §2).

Two protocols (:data:`PROTOCOLS`):

* ``"background"`` (the paper's T2T): the sender reads the question stem only and writes a
  background sentence about it;
* ``"answer"`` (answer relay): the sender reads the same prompt a KV sender reads, the
  question with its options, and sends its greedy answer, a few tokens; the receiver reads
  "The answer is <text>." per sender. A KV sender's cache holds its answer at the last
  prompt position, so this is the text protocol with the same input as cache communication.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from fedrefine_lib import data
from fedrefine_lib.decode import generate_ids
from fedrefine_lib.engine import Standalone
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
    progress: bool = True,
) -> tuple[list[str], list[list[str]], Trace]:
    """The T2T sender side (DESIGN §2): each sender writes text for each question (greedy,
    its own template): a background sentence for the stem (``protocol="background"``,
    ``data.background_messages``) or its answer to the question with options
    (``"answer"``, ``data.mcq_messages``), and the receiver later reads all senders' texts
    as one context note::

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
    Returns:
        per item the context note (``data.context_note``), per item the senders' texts,
        and the trace: stages ``sender_prefill`` (tokenize + prefill) and ``sender_decode``;
        bytes per link = generated token ids x :data:`TOKEN_ID_BYTES`; tokens
        ``sender_generated``.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol={protocol!r}: use one of {PROTOCOLS}.")
    r_name = getattr(receiver, "name", receiver)
    trace = Trace()
    texts: list[list[str]] = [[] for _ in items]
    stages = {"tokenize": "sender_prefill", "receiver_prefill": "sender_prefill", "decode": "sender_decode"}
    for sender in senders:
        own = _sender_stems(stems, sender.name, items)
        engine = Standalone(sender, holds_context=True)  # a sender reads its device's private context
        n_ids = 0
        for i in tqdm(range(0, len(items), batch_size), desc=f"T2T {sender.name}", disable=not progress):
            if protocol == "background":
                batch = [
                    data.background_messages(s, it.get("private_context"))
                    for it, s in zip(items[i:], own[i : i + batch_size])
                ]
            else:
                batch = [
                    data.mcq_messages({**it, "question_stem": s}) for it, s in zip(items[i:], own[i : i + batch_size])
                ]
            rows, t = generate_ids(engine, batch, max_new_tokens)
            for stage, seconds in t.seconds.items():
                key = stages.get(stage)
                if key is None:
                    raise RuntimeError(
                        f"Unexpected stage {stage!r} in a sender's generation trace; map it in t2t_notes."
                    )
                trace.add_sender_seconds(key, {sender.name: seconds})
            for j, row in enumerate(rows):
                text = data.tidy_text(sender.tokenizer.decode(row, skip_special_tokens=True))
                texts[i + j].append(text if protocol == "background" else RELAY_TEMPLATE.format(answer=text))
            n_ids += sum(len(r) for r in rows)
        link = f"{sender.name}->{r_name}"
        trace.bytes[link] = trace.bytes.get(link, 0) + n_ids * TOKEN_ID_BYTES
        trace.tokens["sender_generated"] = trace.tokens.get("sender_generated", 0) + n_ids
    return [data.context_note(t) for t in texts], texts, trace


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
