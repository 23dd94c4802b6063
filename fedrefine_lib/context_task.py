"""The private-context task: the sender's device holds records the receiver never sees.

A knowledge gap that real pretrained models have by construction. Each question asks about
an invented person ("Which city does Talvi Orsek live in?"); the answer is in the records
of the sender's device (its user's notes: a few facts about several people, the asked one
among them), held as the item's ``private_context`` and read only by the sender
(``prompts.holder_view``). Neither model can know an invented person from pretraining, so
the receiver alone is at chance, the sender with its records is not, and the oracle (the
receiver given the records itself) bounds what any transfer can reach. A C2C sender sends
the cache it built over its records and the question; the raw records never leave its
device, and no single cache position holds them (unlike the ``mini`` world's answers), so
the task exercises whole-prompt cache transfer.

    paths = write_task(root, seed=0, config=ContextTaskConfig())
    # paths["chat_train"], paths["mcq_val"], paths["mcq_test"]: the profile's data sources

Splits share no person; items are OpenBookQA-schema MCQs with ``domain`` (the relation),
``entity`` (the person: one cluster for the bootstrap) and ``private_context``; training
records are chat records (the records, the question with options, the answer text).
Everything is drawn from ``seed``, so a rebuild is byte-identical.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from . import data

KIND = "private_context"
VERSION = 2
"""Bumped whenever the items or records a config gives change (part of the task's directory
name, so no build of an older version is ever read as this one's). 2: ``cloze_prefix`` and
answer-sentence records."""


@dataclass(frozen=True)
class Relation:
    """One kind of fact: how it is stated, how it is asked, the values it takes."""

    statement: str
    question: str
    values: tuple[str, ...]


RELATIONS: dict[str, Relation] = {
    "city": Relation(
        "{e} lives in {v}.",
        "Which city does {e} live in?",
        ("Lisbon", "Oslo", "Nairobi", "Lima", "Hanoi", "Dublin", "Quito", "Perth", "Seville", "Krakow"),
    ),
    "pet": Relation(
        "{e} has a pet {v}.",
        "What pet does {e} have?",
        ("dog", "cat", "parrot", "rabbit", "turtle", "hamster", "goldfish", "ferret"),
    ),
    "job": Relation(
        "{e} works as a {v}.",
        "What is the job of {e}?",
        ("nurse", "teacher", "pilot", "chef", "lawyer", "farmer", "dentist", "plumber", "baker", "banker"),
    ),
    "instrument": Relation(
        "{e} plays the {v}.",
        "Which instrument does {e} play?",
        ("violin", "piano", "cello", "flute", "trumpet", "guitar", "harp", "drums"),
    ),
    "colour": Relation(
        "The favourite colour of {e} is {v}.",
        "What is the favourite colour of {e}?",
        ("red", "blue", "green", "yellow", "purple", "orange", "black", "white"),
    ),
    "day": Relation(
        "{e} has a meeting on {v}.",
        "On which day does {e} have a meeting?",
        ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"),
    ),
}
ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "st", "th", "tr")
VOWELS = ("a", "e", "i", "o", "u", "ai", "ou", "ea")
CODAS = ("", "", "n", "r", "l", "s", "k", "th", "m")


@dataclass(frozen=True)
class ContextTaskConfig:
    """Sizes of the private-context task.

    Attributes:
        kind: always ``"private_context"`` (a profile's ``task:`` block names it).
        train / val / test: questions per split (one invented person each).
        distractors: facts about other people of the split in each record set, beside the
            asked one (so the sender must find the right person, not copy the only fact).
        options: answer options per question (the correct value and others of its relation).
    """

    kind: str = KIND
    train: int = 1200
    val: int = 144
    test: int = 288
    distractors: int = 3
    options: int = 4

    def __post_init__(self) -> None:
        if self.kind != KIND:
            raise ValueError(f"ContextTaskConfig.kind={self.kind!r}: this module builds {KIND!r} tasks.")
        for name in ("train", "val", "test"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"ContextTaskConfig.{name}={getattr(self, name)!r}: give a positive number of items.")
        smallest = min(len(r.values) for r in RELATIONS.values())
        if not 2 <= self.options <= min(smallest, len(data.MCQ_LABELS)):
            raise ValueError(f"ContextTaskConfig.options={self.options}: use 2 to {min(smallest, 4)}.")
        if not 0 <= self.distractors < min(self.train, self.val, self.test):
            raise ValueError(f"ContextTaskConfig.distractors={self.distractors}: use 0 to the smallest split size - 1.")

    def hash(self) -> str:
        """Short hash of the config and :data:`VERSION` (the build's directory name)."""
        payload = json.dumps({**asdict(self), "version": VERSION}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


def person_names(rng: random.Random, n: int) -> list[str]:
    """``n`` distinct invented two-part names ("Talvi Orsek")."""

    def part(syllables: int) -> str:
        word = "".join(rng.choice(ONSETS) + rng.choice(VOWELS) for _ in range(syllables)) + rng.choice(CODAS)
        return word.capitalize()

    names: list[str] = []
    seen: set[str] = set()
    while len(names) < n:
        name = f"{part(rng.randint(1, 2))} {part(2)}"
        if name not in seen:
            seen.add(name)
            names.append(name)
    return names


def _profiles(rng: random.Random, names: list[str]) -> list[dict[str, str]]:
    return [{rel: rng.choice(r.values) for rel, r in RELATIONS.items()} for _ in names]


def build_split(rng: random.Random, split: str, names: list[str], config: ContextTaskConfig) -> list[dict]:
    """The items of one split: person ``i`` asked one relation, records of the split's people."""
    profiles = _profiles(rng, names)
    relations = list(RELATIONS)
    items = []
    for i, (person, facts) in enumerate(zip(names, profiles)):
        rel = relations[i % len(relations)]
        others = rng.sample([j for j in range(len(names)) if j != i], config.distractors)
        lines = [(person, rel, facts[rel])] + [
            (names[j], (rel_j := rng.choice(relations)), profiles[j][rel_j]) for j in others
        ]
        rng.shuffle(lines)
        relation = RELATIONS[rel]
        wrong = rng.sample([v for v in relation.values if v != facts[rel]], config.options - 1)
        texts = [facts[rel], *wrong]
        rng.shuffle(texts)
        labels = list(data.MCQ_LABELS[: config.options])
        items.append(
            {
                "id": f"{split}-{i:04d}",
                "question_stem": relation.question.format(e=person),
                "choices": {"text": texts, "label": labels},
                "answerKey": labels[texts.index(facts[rel])],
                "domain": rel,
                "entity": person,
                "private_context": " ".join(RELATIONS[r].statement.format(e=p, v=v) for p, r, v in lines),
                "cloze_prefix": relation.statement.split("{v}")[0].format(e=person).strip(),
            }
        )
    return items


def build_task(seed: int, config: ContextTaskConfig | None = None) -> dict[str, list[dict]]:
    """``{"train", "val", "test"}`` items of the task for ``seed`` (splits share no person)."""
    config = config or ContextTaskConfig()
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed={seed!r}: give an int.")
    rng = random.Random(f"{KIND}-{seed}")
    sizes = {"train": config.train, "val": config.val, "test": config.test}
    names = person_names(rng, sum(sizes.values()))
    out, start = {}, 0
    for split, n in sizes.items():
        out[split] = build_split(rng, split, names[start : start + n], config)
        start += n
    return out


def chat_records(items: list[dict]) -> list[dict]:
    """Training records (OpenHermes schema): the records, the question without options, and
    the answer as the whole sentence (``"Talvi Orsek lives in Lisbon."``), what cloze scoring
    (``evaluate``'s ``"cloze"``) reads."""
    rows = []
    for it in items:
        answer = {"role": "assistant", "content": f"{it['cloze_prefix']} {data.answer_text(it)}."}
        rows.append(data.to_chat_record(data.question_messages(it) + [answer], kind="question", domain=it["domain"]))
    return rows


def write_task(root: str | Path, seed: int, config: ContextTaskConfig | None = None) -> dict[str, Path]:
    """Build the task into ``root/<kind>-<config hash>/`` once (later calls load it) and
    return the profile's data sources: ``chat_train``, ``mcq_val``, ``mcq_test``.

    Files are written under temporary names and renamed, so an interrupted build leaves
    no half file; an existing file is never rewritten.
    """
    config = config or ContextTaskConfig()
    out = Path(root) / f"{KIND}-{config.hash()}"
    paths = {"chat_train": out / "train.jsonl", "mcq_val": out / "mcq_val.jsonl", "mcq_test": out / "mcq_test.jsonl"}
    manifest = out / "task.json"
    if manifest.is_file() and all(p.is_file() for p in paths.values()):
        return paths
    splits = build_task(seed, config)
    rows = {"chat_train": chat_records(splits["train"]), "mcq_val": splits["val"], "mcq_test": splits["test"]}
    for key, path in paths.items():
        tmp = data.write_jsonl(rows[key], path.with_suffix(f".tmp{os.getpid()}"))
        os.replace(tmp, path)
    info = {"kind": KIND, "version": VERSION, "seed": seed, "config": asdict(config),
            "sizes": {k: len(v) for k, v in splits.items()}}  # fmt: skip
    tmp = manifest.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(info, indent=1, sort_keys=True))
    os.replace(tmp, manifest)
    return paths
