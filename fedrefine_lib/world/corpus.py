"""Pretraining corpora of the ``mini`` world's models, and the tokenizer training text.

A model's corpus (regenerated each epoch from ``(seed, model, epoch)``) mixes:

* statements of *all* facts (train, val, test) of the domains it knows, every
  statement template ``statement_passes`` times per epoch, three per document (alone in
  phase 0, until the model completes them: see ``WorldConfig.phase0_cloze``);
* MCQ answering and background writing for the *train* facts of those domains only
  (val/test facts are seen only as statements, so held-out accuracy measures recall
  of knowledge, not memorised question forms); in phase 2 a share ``private_share`` of
  the questions opens with a user's private prefix ("My name is Vakor."), which changes
  nothing about the answer (in phase 1 the prefix slowed the step from memorised
  statements to answered questions: seed 0, step 1300, the 1.5b's statement cloze 0.92
  against 0.47 on prefixed validation questions);
* answering from a context note (phase 2): about train or pool entities of any domain,
  among up to two other sentences; in domains the model does not know the note's
  value is random (see :func:`_note_fact`);
* two-fact questions (phase 2) about train facts of two domains, one of them known,
  answered "<v1> and <v2>" (an unknown domain's value random, as in notes), and from a
  note stating both facts;
* for the receiver (phase 2), rephrasing questions that pair any name with any relation
  except the pairs val and test questions ask (those stay unseen, so fidelity is measured
  on held-out questions; see :func:`rephrase_pairs`): the rewrite keeps entity and
  relation, changes the template and drops the private prefix;
* copying names (phase 2): "Repeat the name X." for entities of every split (a name
  carries no value, so no knowledge leaks), then general filler chat.
"""

from __future__ import annotations

import random
from dataclasses import replace

from ..data import context_note
from .config import WorldConfig
from .knowledge import RELATIONS, Fact, Knowledge
from .tasks import (
    Example,
    background_example,
    copy_example,
    filler_example,
    mcq_example,
    note_example,
    pair_example,
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

    Phase 0 holds the statements alone; phase 1 only the knowledge (statements, MCQ and
    background of the known domains); phase 2 adds notes, rephrasing and filler. Memorisation breaks through
    much sooner without the other tasks competing, so training runs phase 1 until
    the validation facts are known.
    """
    rng = random.Random(f"corpus-{seed}-{model}-{epoch}-{phase}")

    def user() -> str | None:  # from the model's private phase: a private prefix on a share of the questions
        if phase < config.private_from_phase or not knowledge.users:
            return None
        return rng.choice(knowledge.users) if rng.random() < config.private_share else None

    known = knowledge.select(domains=domains, splits=("train", "val", "test"))
    pairs = [(f, t) for f in known for t in range(len(STATEMENTS))] * config.statement_passes
    rng.shuffle(pairs)
    examples = [statement_doc(pairs[i : i + STATEMENTS_PER_DOC]) for i in range(0, len(pairs), STATEMENTS_PER_DOC)]
    if phase == 0:
        return examples
    qa = knowledge.select(domains=domains, splits=("train",))
    examples += [mcq_example(f, rng, user=user()) for f in qa]
    examples += [background_example(f, rng, user=user()) for f in qa]
    if phase == 1:
        rng.shuffle(examples)
        return examples
    note_facts = knowledge.select(splits=("train", "pool"))
    for _ in range(config.note_examples):
        picked = [_note_fact(f, domains, rng) for f in rng.sample(note_facts, 3)]
        others = [f for f in picked[1:] if f.entity != picked[0].entity]
        n_others = rng.choice((0, 0, 0, 1, 2))  # mostly single-sentence notes, like the oracle's
        examples.append(note_example(picked[0], others[:n_others], rng))
    train = knowledge.select(splits=("train",))
    for _ in range(config.pair_examples):
        first, second = _two_domains(rng.choice(qa), train, rng)
        examples.append(pair_example(_note_fact(first, domains, rng), _note_fact(second, domains, rng), rng))
    for _ in range(config.pair_note_examples):
        first, second = (_note_fact(f, domains, rng) for f in _two_domains(rng.choice(note_facts), note_facts, rng))
        note = context_note([statement(f, rng.randrange(len(STATEMENTS))) for f in (first, second)])
        examples.append(pair_example(first, second, rng, note))
    if rephrase:
        rephrasable = rephrase_pairs(knowledge)
        examples += [rephrase_example(*rng.choice(rephrasable), rng, user()) for _ in range(config.rephrase_examples)]
    names = knowledge.all_entities
    examples += [copy_example(rng.choice(names)) for _ in range(config.copy_examples)]
    examples += [filler_example(rng) for _ in range(config.filler_examples)]
    rng.shuffle(examples)
    return examples


def rephrase_pairs(knowledge: Knowledge) -> list[tuple[str, str]]:
    """Every (entity, relation) a rephrasing example may ask about: any name of the world
    with any relation of any domain, except the pairs a val or test question asks.

    A rephrasing states no value, so pairing a held-out entity with another domain's
    relation ("What is the export of <a science test entity>?") teaches no fact; it trains
    the copy of every name inside a rewrite. Receivers rephrasing only train and pool
    entities rewrote those faithfully and put a memorised train name in place of every
    held-out one (version 8, seed 0: fidelity 1.0 on train and pool questions, 0.0 on val;
    the plain copy task "Repeat the name X." gave 0.95 on val names)."""
    asked = {(f.entity, f.relation) for f in knowledge.select(splits=("val", "test"))}
    relations = [rel for rels in RELATIONS.values() for rel in rels]
    return [(e, r) for e in knowledge.all_entities for r in relations if (e, r) not in asked]


def _two_domains(fact: Fact, others: list[Fact], rng: random.Random) -> tuple[Fact, Fact]:
    """``fact`` and a fact of another domain from ``others``, in a random order."""
    other = rng.choice([f for f in others if f.domain != fact.domain])
    return (fact, other) if rng.random() < 0.5 else (other, fact)


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
    prompts += [question(f.entity, f.relation, 0, u) for f, u in zip(knowledge.facts, knowledge.users * 100)]
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
