"""The ``mini`` world's data files, in the hub data sets' schemas (plus ``domain``).

* ``facts.jsonl`` — every fact with its split (the world's ground truth);
* ``chat_train.jsonl`` — OpenHermes-2.5-style chat records for fuser/gate training:
  MCQ and background questions about *train* facts of all five domains (a share with a
  user's private prefix), two-fact questions about train facts of two senders' domains,
  plus filler;
* ``mcq_val.jsonl`` / ``mcq_test.jsonl`` — OpenBookQA-style items about val / test facts,
  one per fact (question template and answer position drawn from the seed), each opening
  with a user's private prefix (``private`` lists the name);
* ``mcq_pair_val.jsonl`` / ``mcq_pair_test.jsonl`` — two-fact items (one fact from each of
  two domains that no single sender knows together, :func:`pair_domains`), about val /
  test facts: only two devices' knowledge together answers them.
"""

from __future__ import annotations

import itertools
import random

from ..data import mcq_messages, to_chat_record
from .knowledge import Fact, Knowledge
from .tasks import background_example, filler_example, mcq_item, pair_item


def mcq_items(facts: list[Fact], seed: int, split: str, users: tuple[str, ...] = ()) -> list[dict]:
    """One OpenBookQA-style item per fact (deterministic from ``seed`` and ``split``), each
    with a private prefix naming one of ``users`` when any are given."""
    rng = random.Random(f"mcq-{split}-{seed}")
    return [
        mcq_item(f, rng, f"{split}-{i:04d}", user=rng.choice(users) if users else None) for i, f in enumerate(facts)
    ]


def pair_domains(knows: dict[str, tuple[str, ...]], receiver: str) -> list[tuple[str, str]]:
    """Domain pairs that need two senders: neither domain is the receiver's and no sender
    knows both (``knows``: model name -> domains)."""
    own = set(knows[receiver])
    senders = [set(d) for name, d in knows.items() if name != receiver]
    domains = sorted({d for ds in senders for d in ds} - own)
    return [(a, b) for a, b in itertools.combinations(domains, 2) if not any(a in ds and b in ds for ds in senders)]


def pair_items(
    knowledge: Knowledge, split: str, seed: int, domains: list[tuple[str, str]], per_pair: int
) -> list[dict]:
    """``per_pair`` two-fact items for each domain pair, about facts of ``split`` (two
    different entities; which domain comes first drawn per item)."""
    rng = random.Random(f"pairs-{split}-{seed}")
    items = []
    for a, b in domains:
        first, second = knowledge.select(domains=(a,), splits=(split,)), knowledge.select(domains=(b,), splits=(split,))
        for k in range(per_pair):
            pair = [rng.choice(first), rng.choice(second)]
            if rng.random() < 0.5:
                pair.reverse()
            items.append({**pair_item(*pair, rng, f"{split}-pair-{a}-{b}-{k:03d}"), "domain": f"{a}+{b}"})
    return items


def _record(messages: list[dict], answer: str, **meta) -> dict:
    return to_chat_record(list(messages) + [{"role": "assistant", "content": answer}], **meta)


def chat_records(
    knowledge: Knowledge,
    seed: int,
    variants: int,
    filler: int,
    private_share: float = 0.0,
    pairs: tuple[list[tuple[str, str]], int] = ([], 0),
) -> list[dict]:
    """Fuser-training chat records: ``variants`` MCQ and background records per train fact
    of every domain (a share ``private_share`` with a private prefix), ``pairs[1]``
    two-fact MCQ records per domain pair of ``pairs[0]``, and ``filler`` general records,
    in a seeded order."""
    rng = random.Random(f"chat-{seed}")

    def user() -> str | None:
        return rng.choice(knowledge.users) if knowledge.users and rng.random() < private_share else None

    rows = []
    for fact in knowledge.select(splits=("train",)):
        for v in range(variants):
            item = mcq_item(fact, rng, f"{fact.fact_id}#{v}", user=user())
            rows.append(_record(mcq_messages(item), fact.value, domain=fact.domain, kind="mcq", fact_id=fact.fact_id))
            ex = background_example(fact, rng, user())
            rows.append(_record(ex.messages, ex.answer, domain=fact.domain, kind="background", fact_id=fact.fact_id))
    domains, per_pair = pairs
    for item in pair_items(knowledge, "train", seed, domains, per_pair):
        answer = item["choices"]["text"][item["choices"]["label"].index(item["answerKey"])]
        rows.append(
            _record(mcq_messages(item), answer, domain=item["domain"], kind="pair", fact_id=item["fact_ids"][0])
        )
    for _ in range(filler):
        ex = filler_example(rng)
        rows.append(_record(ex.messages, ex.answer, domain="general", kind="filler", fact_id=None))
    rng.shuffle(rows)
    return rows
