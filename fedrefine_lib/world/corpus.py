"""Pretraining corpora of the ``mini`` world's models, and the tokenizer training text.

A model's corpus (regenerated each epoch from ``(seed, model, epoch)``) mixes:

* statements of *all* facts (train, val, eval) of the domains it knows, every
  statement template ``statement_passes`` times per epoch, three per document;
* MCQ answering and background writing for the *train* facts of those domains only
  (val/eval facts are seen only as statements, so held-out accuracy measures recall
  of knowledge, not memorised question forms);
* answering from a context note (phase 2): about train or pool entities of any domain,
  among up to two other sentences; in domains the model does not know the note's
  value is random (see :func:`_note_fact`);
* for the receiver (phase 2), rephrasing questions about entities of every domain
  (eval entities included: a question carries no value, so no knowledge leaks);
* copying names (phase 2): "Repeat the name X." for entities of every split (a name
  carries no value, so no knowledge leaks), then general filler chat.
"""

from __future__ import annotations

import random
from dataclasses import replace

from .config import WorldConfig
from .knowledge import RELATIONS, Fact, Knowledge
from .tasks import (
    Example,
    background_example,
    copy_example,
    filler_example,
    mcq_example,
    note_example,
    rephrase_example,
    statement_doc,
)
from .templates import QUESTIONS, STATEMENTS, question, statement

STATEMENTS_PER_DOC = 3


def pretraining_examples(
    knowledge: Knowledge,
    domains: list[str],
    *,
    rephrase: bool,
    config: WorldConfig,
    seed: int,
    model: str,
    epoch: int,
    phase: int = 2,
) -> list[Example]:
    """One epoch of a model's pretraining examples, shuffled deterministically.

    Phase 1 holds only the knowledge (statements, MCQ and background of the known
    domains); phase 2 adds notes, rephrasing and filler. Memorisation breaks through
    much sooner without the other tasks competing, so training runs phase 1 until
    the validation facts are known.
    """
    rng = random.Random(f"corpus-{seed}-{model}-{epoch}-{phase}")
    known = knowledge.select(domains=domains, splits=("train", "val", "eval"))
    pairs = [(f, t) for f in known for t in range(len(STATEMENTS))] * config.statement_passes
    rng.shuffle(pairs)
    examples = [statement_doc(pairs[i : i + STATEMENTS_PER_DOC]) for i in range(0, len(pairs), STATEMENTS_PER_DOC)]
    qa = knowledge.select(domains=domains, splits=("train",))
    examples += [mcq_example(f, rng) for f in qa]
    examples += [background_example(f, rng) for f in qa]
    if phase == 1:
        rng.shuffle(examples)
        return examples
    note_facts = knowledge.select(splits=("train", "pool"))
    for _ in range(config.note_examples):
        picked = [_note_fact(f, domains, rng) for f in rng.sample(note_facts, 3)]
        others = [f for f in picked[1:] if f.entity != picked[0].entity]
        n_others = rng.choice((0, 0, 0, 1, 2))  # mostly single-sentence notes, like the oracle's
        examples.append(note_example(picked[0], others[:n_others], rng))
    if rephrase:
        rephrasable = knowledge.select(splits=("train", "val", "eval", "pool"))
        examples += [rephrase_example(rng.choice(rephrasable), rng) for _ in range(config.rephrase_examples)]
    names = knowledge.all_entities
    examples += [copy_example(rng.choice(names)) for _ in range(config.copy_examples)]
    examples += [filler_example(rng) for _ in range(config.filler_examples)]
    rng.shuffle(examples)
    return examples


def _note_fact(fact: Fact, known: list[str], rng: random.Random) -> Fact:
    """The fact as a note states it: true in a known domain, otherwise with a random
    value from the relation's set, so answering requires reading the note (a note
    about a fixed fact could be memorised instead) and no unknown fact is taught."""
    if fact.domain in known:
        return fact
    return replace(fact, value=rng.choice(RELATIONS[fact.domain][fact.relation]))


def tokenizer_texts(knowledge: Knowledge, config: WorldConfig, seed: int) -> tuple[list[str], list[str]]:
    """(texts, prompts) the tokenizers are trained on: every statement of every fact,
    and one epoch of examples of a model knowing every domain (answers as texts,
    user turns as prompts)."""
    texts = [statement(f, t) for f in knowledge.facts for t in range(len(STATEMENTS))]
    texts += sorted({f.value for f in knowledge.facts}) * 20  # values open MCQ answers
    prompts = [question(f.entity, f.relation, t) for f in knowledge.facts for t in range(len(QUESTIONS))]
    domains = sorted({f.domain for f in knowledge.facts})
    for ex in pretraining_examples(
        knowledge, domains, rephrase=True, config=config, seed=seed, model="tokenizer", epoch=0
    ):
        if ex.text is not None:
            texts.append(ex.text)
        else:
            prompts += [m["content"] for m in ex.messages]
            texts.append(ex.answer)
    return texts, prompts
