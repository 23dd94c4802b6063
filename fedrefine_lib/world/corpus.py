"""Pretraining corpora of the ``mini`` world's models, and the tokenizer training text.

A model's corpus (regenerated each epoch from ``(seed, model, epoch)``) mixes:

* statements of *all* facts (train, val, eval) of the domains it knows, every
  statement template once per epoch, three statements per document;
* MCQ answering and background writing for the *train* facts of those domains only
  (val/eval facts are seen only as statements, so held-out accuracy measures recall
  of knowledge, not memorised question forms);
* answering from a context note: the target fact from the note-only ``pool`` (any
  domain) or a known domain's train facts, among up to two other sentences;
* for the receiver, rephrasing questions about non-eval entities of every domain;
* general filler chat.
"""

from __future__ import annotations

import random

from .config import WorldConfig
from .knowledge import Knowledge
from .tasks import (
    Example,
    background_example,
    filler_example,
    mcq_example,
    note_example,
    rephrase_example,
    statement_doc,
)
from .templates import QUESTIONS, STATEMENTS, question, statement

STATEMENTS_PER_DOC = 3


def pretraining_examples(knowledge: Knowledge, domains: list[str], *, rephrase: bool,
                         config: WorldConfig, seed: int, model: str, epoch: int) -> list[Example]:
    """One epoch of a model's pretraining examples, shuffled deterministically."""
    rng = random.Random(f"corpus-{seed}-{model}-{epoch}")
    known = knowledge.select(domains=domains, splits=("train", "val", "eval"))
    pairs = [(f, t) for f in known for t in range(len(STATEMENTS))]
    rng.shuffle(pairs)
    examples = [statement_doc(pairs[i:i + STATEMENTS_PER_DOC])
                for i in range(0, len(pairs), STATEMENTS_PER_DOC)]
    qa = knowledge.select(domains=domains, splits=("train",))
    examples += [mcq_example(f, rng) for f in qa]
    examples += [background_example(f, rng) for f in qa]
    note_facts = knowledge.select(splits=("pool",)) + qa
    for _ in range(config.note_examples):
        target = rng.choice(note_facts)
        others = [f for f in rng.sample(note_facts, 3) if f.entity != target.entity]
        examples.append(note_example(target, others[:rng.randrange(3)], rng))
    if rephrase:
        rephrasable = knowledge.select(splits=("train", "val", "pool"))
        examples += [rephrase_example(rng.choice(rephrasable), rng)
                     for _ in range(config.rephrase_examples)]
    examples += [filler_example(rng) for _ in range(config.filler_examples)]
    rng.shuffle(examples)
    return examples


def tokenizer_texts(knowledge: Knowledge, config: WorldConfig, seed: int) -> tuple[list[str], list[str]]:
    """(texts, prompts) the tokenizers are trained on: every statement of every fact,
    and one epoch of examples of a model knowing every domain (answers as texts,
    user turns as prompts)."""
    texts = [statement(f, t) for f in knowledge.facts for t in range(len(STATEMENTS))]
    prompts = [question(f.entity, f.relation, t) for f in knowledge.facts for t in range(len(QUESTIONS))]
    domains = sorted({f.domain for f in knowledge.facts})
    for ex in pretraining_examples(knowledge, domains, rephrase=True, config=config, seed=seed,
                                   model="tokenizer", epoch=0):
        if ex.text is not None:
            texts.append(ex.text)
        else:
            prompts += [m["content"] for m in ex.messages]
            texts.append(ex.answer)
    return texts, prompts
