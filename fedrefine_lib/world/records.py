"""The ``mini`` world's data files, in the hub data sets' schemas (plus ``domain``).

* ``facts.jsonl`` — every fact with its split (the world's ground truth);
* ``chat_train.jsonl`` — OpenHermes-2.5-style chat records for fuser/gate training:
  MCQ and background questions about *train* facts of all five domains, plus filler;
* ``mcq_val.jsonl`` / ``mcq_test.jsonl`` — OpenBookQA-style items about val / eval facts:
  every val fact in every question template (selection decisions and the gate learn from
  them), one item per eval fact (question template and answer position drawn from the seed).
"""

from __future__ import annotations

import random

from ..data import mcq_messages, to_chat_record
from .knowledge import Fact, Knowledge
from .tasks import background_example, filler_example, mcq_item
from .templates import QUESTIONS


def mcq_items(facts: list[Fact], seed: int, split: str, every_template: bool = False) -> list[dict]:
    """One OpenBookQA-style item per fact, or with ``every_template`` one per fact and
    question template (deterministic from ``seed`` and ``split``)."""
    rng = random.Random(f"mcq-{split}-{seed}")
    if not every_template:
        return [mcq_item(f, rng, f"{split}-{i:04d}") for i, f in enumerate(facts)]
    return [
        mcq_item(f, rng, f"{split}-{i:04d}-{t}", template=t) for i, f in enumerate(facts) for t in range(len(QUESTIONS))
    ]


def chat_records(knowledge: Knowledge, seed: int, variants: int, filler: int) -> list[dict]:
    """Fuser-training chat records: ``variants`` MCQ and background records per train
    fact of every domain, plus ``filler`` general records, in a seeded order."""
    rng = random.Random(f"chat-{seed}")
    rows = []
    for fact in knowledge.select(splits=("train",)):
        for v in range(variants):
            item = mcq_item(fact, rng, f"{fact.fact_id}#{v}")
            meta = dict(domain=fact.domain, kind="mcq", fact_id=fact.fact_id)
            rows.append(to_chat_record(mcq_messages(item) + [{"role": "assistant", "content": fact.value}], **meta))
            ex = background_example(fact, rng)
            rows.append(
                to_chat_record(
                    list(ex.messages) + [{"role": "assistant", "content": ex.answer}],
                    domain=fact.domain,
                    kind="background",
                    fact_id=fact.fact_id,
                )
            )
    for _ in range(filler):
        ex = filler_example(rng)
        rows.append(
            to_chat_record(
                list(ex.messages) + [{"role": "assistant", "content": ex.answer}],
                domain="general",
                kind="filler",
                fact_id=None,
            )
        )
    rng.shuffle(rows)
    return rows
