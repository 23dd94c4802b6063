"""Task examples of the ``mini`` world: MCQ items (one fact, or two facts from two domains),
notes, background, rephrasing (which drops the user's private prefix), filler.

An :class:`Example` is either plain text (a pretraining document, loss on every
token) or a single-turn chat (``messages`` then ``answer``, loss on the answer).
Every builder takes a ``random.Random`` so callers control determinism.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from ..data import MCQ_LABELS, background_messages, context_note, mcq_messages, rephrase_messages
from .knowledge import RELATIONS, Fact
from .templates import PRIVATE_PREFIXES, QUESTIONS, STATEMENTS, pair_answer, pair_question, question, statement

_RELATION_DOMAIN = {rel: domain for domain, rels in RELATIONS.items() for rel in rels}


@dataclass(frozen=True)
class Example:
    """One training example: ``text`` (plain document) or ``messages`` + ``answer`` (chat)."""

    kind: str
    text: str | None = None
    messages: tuple[dict, ...] = field(default_factory=tuple)
    answer: str | None = None
    domain: str | None = None
    fact_id: str | None = None


def mcq_item(
    fact: Fact, rng: random.Random, item_id: str, template: int | None = None, user: str | None = None
) -> dict:
    """An OpenBookQA-style item asking for ``fact``'s value; distractors from the same
    relation's value set, the answer position drawn from ``rng``. With ``user`` the
    question opens with a private prefix naming them (listed under ``private``)."""
    values = RELATIONS[fact.domain][fact.relation]
    distractors = rng.sample([v for v in values if v != fact.value], len(MCQ_LABELS) - 1)
    pos = rng.randrange(len(MCQ_LABELS))
    texts = distractors[:pos] + [fact.value] + distractors[pos:]
    t = rng.randrange(len(QUESTIONS)) if template is None else template
    prefix = rng.randrange(len(PRIVATE_PREFIXES)) if user is not None else 0
    return {
        "id": item_id,
        "question_stem": question(fact.entity, fact.relation, t, user, prefix),
        "choices": {"text": texts, "label": list(MCQ_LABELS)},
        "answerKey": MCQ_LABELS[pos],
        "domain": fact.domain,
        "fact_id": fact.fact_id,
        "entity": fact.entity,
        "relation": fact.relation,
        "private": [] if user is None else [user],
    }


def pair_item(first: Fact, second: Fact, rng: random.Random, item_id: str) -> dict:
    """A two-fact item: "What is the <r1> of <e1> and the <r2> of <e2>?" with the four
    options of a 2x2 grid (right or wrong first value x right or wrong second value), so
    knowing one fact narrows the choice to two and only both facts answer it."""
    wrong = [rng.choice([v for v in RELATIONS[f.domain][f.relation] if v != f.value]) for f in (first, second)]
    grid = [(a, b) for a in (first.value, wrong[0]) for b in (second.value, wrong[1])]
    rng.shuffle(grid)
    pos = grid.index((first.value, second.value))
    return {
        "id": item_id,
        "question_stem": pair_question(first, second),
        "choices": {"text": [pair_answer(a, b) for a, b in grid], "label": list(MCQ_LABELS)},
        "answerKey": MCQ_LABELS[pos],
        "domain": f"{first.domain}+{second.domain}",
        "domains": [first.domain, second.domain],
        "fact_ids": [first.fact_id, second.fact_id],
        "fact1": f"{statement(first)} {statement(second)}",
        "private": [],
    }


def statement_doc(pairs: list[tuple[Fact, int]]) -> Example:
    """A plain document of several fact statements, given as (fact, template index)."""
    text = " ".join(statement(f, t) for f, t in pairs)
    return Example("statement", text=text, domain=pairs[0][0].domain)


def mcq_example(
    fact: Fact, rng: random.Random, note: str | None = None, kind: str = "mcq", user: str | None = None
) -> Example:
    """The MCQ question for ``fact`` (optionally after a context note, optionally with a
    private prefix naming ``user``), answered by its value."""
    item = mcq_item(fact, rng, fact.fact_id, user=user)
    return Example(
        kind, messages=tuple(mcq_messages(item, note)), answer=fact.value, domain=fact.domain, fact_id=fact.fact_id
    )


def note_example(fact: Fact, others: list[Fact], rng: random.Random) -> Example:
    """Answer ``fact``'s MCQ from a note stating it among ``others`` (other entities)."""
    sentences = [statement(f, rng.randrange(len(STATEMENTS))) for f in [fact, *others]]
    rng.shuffle(sentences)
    return mcq_example(fact, rng, context_note(sentences), kind="note")


def pair_example(first: Fact, second: Fact, rng: random.Random, note: str | None = None) -> Example:
    """The two-fact MCQ (optionally after a context note), answered "<v1> and <v2>"."""
    item = pair_item(first, second, rng, f"{first.fact_id}&{second.fact_id}")
    return Example(
        "pair",
        messages=tuple(mcq_messages(item, note)),
        answer=pair_answer(first.value, second.value),
        domain=first.domain,
        fact_id=first.fact_id,
    )


def background_example(fact: Fact, rng: random.Random, user: str | None = None) -> Example:
    """Question (no options, optionally with a private prefix) -> one background sentence
    stating the fact."""
    prefix = rng.randrange(len(PRIVATE_PREFIXES))
    stem = question(fact.entity, fact.relation, rng.randrange(len(QUESTIONS)), user, prefix)
    return Example(
        "background",
        messages=tuple(background_messages(stem)),
        answer=statement(fact, rng.randrange(len(STATEMENTS))),
        domain=fact.domain,
        fact_id=fact.fact_id,
    )


def rephrase_example(entity: str, relation: str, rng: random.Random, user: str | None = None) -> Example:
    """Question about ``relation`` of ``entity`` in one template (after a private prefix
    naming ``user``, if given) -> the same question in another template, without the prefix.
    It states no value, so any name and relation may be paired (see :func:`.corpus.rephrase_pairs`)."""
    src, dst = rng.sample(range(len(QUESTIONS)), 2)
    prefix = rng.randrange(len(PRIVATE_PREFIXES))
    return Example(
        "rephrase",
        messages=tuple(rephrase_messages(question(entity, relation, src, user, prefix))),
        answer=question(entity, relation, dst),
        domain=_RELATION_DOMAIN[relation],
    )


def copy_example(entity: str) -> Example:
    """Repeat a name: trains the input-to-output identity of every entity token, which
    untied embeddings do not have for free (background and rephrasing copy names)."""
    return Example("copy", messages=({"role": "user", "content": f"Repeat the name {entity}."},), answer=entity)


_WORDS = (
    "apple",
    "river",
    "window",
    "garden",
    "yellow",
    "music",
    "paper",
    "cloud",
    "stone",
    "bridge",
    "candle",
    "market",
    "letter",
    "silver",
    "forest",
    "pencil",
)
_OPPOSITES = (
    ("hot", "cold"),
    ("up", "down"),
    ("big", "small"),
    ("fast", "slow"),
    ("early", "late"),
    ("open", "closed"),
    ("light", "dark"),
    ("old", "new"),
)


def filler_example(rng: random.Random) -> Example:
    """A general chat exchange with no world knowledge (greetings, copying, counting, sums)."""
    task = rng.randrange(5)
    if task == 0:
        q, a = "Say hello.", "Hello! How can I help you today?"
    elif task == 1:
        w = rng.choice(_WORDS)
        q, a = f"Repeat the word {w}.", w
    elif task == 2:
        start = rng.randrange(1, 10)
        stop = start + rng.randrange(2, 6)
        q, a = f"Count from {start} to {stop}.", " ".join(str(i) for i in range(start, stop + 1))
    elif task == 3:
        x, y = rng.randrange(10), rng.randrange(10)
        q, a = f"What is {x} plus {y}?", str(x + y)
    else:
        x, y = rng.choice(_OPPOSITES)
        if rng.random() < 0.5:
            x, y = y, x
        q, a = f"What is the opposite of {x}?", y
    return Example("filler", messages=({"role": "user", "content": q},), answer=a)
