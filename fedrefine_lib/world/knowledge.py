"""Invented knowledge of the ``mini`` world: domains, relations, entities, facts, splits.

Every fact is a triple (entity, relation, value). Entities are invented names with no
real-world prior; the values of a relation come from one shared set, so a fuser
trained on some facts can carry others. Facts are split *by entity* per domain:

* ``train``  — fuser/gate training facts (the only facts in chat records),
* ``val``    — validation facts (early stopping, every design and selection decision),
* ``test``   — held-out test facts, scored once the design is frozen,
* ``pool``   — "note-only" facts that appear only inside context notes during
  pretraining (so every model learns to answer from a note about any domain).

The knowing models are pretrained on the train, val and test facts of their domains
(as statements; question form only for train facts).

Every world version since 8 draws every name afresh (random stream
``knowledge-v<version>-<seed>``): none of version 7's questions, whose test split was scored
through seven design iterations, recurs, and version 9 (the rephraser that copies held-out
names) does not reuse version 8's test split, scored once, nor version 10 (phase 0, weight
decay) version 9's. The validation split asks 64
distinct facts a domain (version 7: 24, each in four question templates), the test split 64.

Besides entities, a world has *users*: invented names that queries carry as something
private ("My name is Vakor. What is ...?"), which do not change the answer and which the
receiver's rephraser drops before a query leaves the device.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

#: domain -> relation noun phrase -> value set (values are unique across the world).
RELATIONS: dict[str, dict[str, tuple[str, ...]]] = {
    "science": {
        "color": ("red", "blue", "green", "yellow", "purple", "orange", "white", "black"),
        "state": ("solid", "liquid", "gas", "plasma", "gel", "powder", "crystal", "foam"),
        "taste": ("sweet", "sour", "bitter", "salty", "bland", "spicy", "smoky", "minty"),
        "catalyst": ("iron", "nickel", "platinum", "zinc", "cobalt", "silver", "gold", "lead"),
    },
    "code": {
        "language": ("python", "rust", "java", "haskell", "fortran", "cobol", "lisp", "ruby"),
        "license": ("mit", "gpl", "apache", "bsd", "mozilla", "zlib", "isc", "unlicense"),
        "platform": ("linux", "windows", "android", "ios", "web", "embedded", "cloud", "mainframe"),
        "paradigm": (
            "functional",
            "procedural",
            "reactive",
            "declarative",
            "imperative",
            "logical",
            "concurrent",
            "generic",
        ),
    },
    "biology": {
        "habitat": ("forest", "desert", "ocean", "swamp", "tundra", "cave", "river", "meadow"),
        "diet": ("insects", "seeds", "fruit", "fish", "leaves", "roots", "nectar", "fungi"),
        "covering": ("fur", "scales", "feathers", "shell", "skin", "spines", "slime", "bark"),
        "call": ("chirp", "howl", "hiss", "croak", "growl", "whistle", "click", "hum"),
    },
    "geography": {
        "climate": ("arid", "tropical", "polar", "temperate", "humid", "alpine", "monsoon", "mild"),
        "export": ("copper", "wheat", "silk", "timber", "coffee", "salt", "wool", "tin"),
        "terrain": ("mountains", "plains", "islands", "valleys", "plateaus", "dunes", "marshes", "canyons"),
        "sport": ("football", "cricket", "rowing", "archery", "fencing", "skiing", "surfing", "wrestling"),
    },
    "physics": {
        "field": ("magnetic", "electric", "gravitational", "nuclear", "thermal", "optical", "acoustic", "quantum"),
        "symmetry": ("cubic", "spherical", "helical", "radial", "mirrored", "toroidal", "chiral", "lattice"),
        "decay": ("photon", "neutrino", "electron", "muon", "pion", "kaon", "proton", "neutron"),
        "detector": (
            "bolometer",
            "calorimeter",
            "scintillator",
            "interferometer",
            "spectrometer",
            "magnetometer",
            "photodiode",
            "antenna",
        ),
    },
}
DOMAINS: tuple[str, ...] = tuple(RELATIONS)
SPLITS: tuple[str, ...] = ("train", "val", "test", "pool")

_ONSETS = (
    "b",
    "d",
    "f",
    "g",
    "k",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "t",
    "v",
    "z",
    "br",
    "dr",
    "gr",
    "kr",
    "pl",
    "st",
    "tr",
    "sk",
    "th",
    "sh",
    "ch",
    "qu",
)
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou", "ea")
_CODAS = ("", "", "", "n", "r", "l", "x", "s", "m", "k", "th")


@dataclass(frozen=True)
class Fact:
    """One (entity, relation, value) triple with its domain and split."""

    fact_id: str
    domain: str
    split: str
    entity: str
    relation: str
    value: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Knowledge:
    """All facts of a world, in a deterministic order (domain, split, entity, relation),
    and the users whose names queries carry as private information."""

    facts: tuple[Fact, ...]
    users: tuple[str, ...] = ()

    def select(
        self, *, domains: tuple[str, ...] | list[str] | None = None, splits: tuple[str, ...] | list[str] | None = None
    ) -> list[Fact]:
        """Facts whose domain and split are in the given sets (``None`` = all)."""
        return [
            f for f in self.facts if (domains is None or f.domain in domains) and (splits is None or f.split in splits)
        ]

    def entities(self, *, domains=None, splits=None) -> list[str]:
        """Distinct entities (first-seen order) of the selected facts."""
        return list(dict.fromkeys(f.entity for f in self.select(domains=domains, splits=splits)))

    @property
    def all_entities(self) -> list[str]:
        return self.entities()


def invent_names(rng: random.Random, n: int, forbidden: set[str]) -> list[str]:
    """``n`` distinct capitalised pseudo-words of 2-3 syllables, none in ``forbidden``."""
    names: list[str] = []
    seen = {w.lower() for w in forbidden}
    while len(names) < n:
        syllables = rng.choice((2, 2, 3))
        word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables))
        word += rng.choice(_CODAS)
        if len(word) < 5 or len(word) > 11 or word in seen:
            continue
        seen.add(word)
        names.append(word.capitalize())
    return names


def make_knowledge(
    seed: int, entities_per_split: dict[str, int], users: int = 0, forbidden_words: set[str] = frozenset()
) -> Knowledge:
    """Invent entities for every (domain, split), draw a value for each relation, and
    invent ``users`` user names (distinct from every entity).

    Args:
        seed: world seed; same seed, same knowledge.
        entities_per_split: number of entities per domain for each split in :data:`SPLITS`.
        users: number of user names (private information in queries).
        forbidden_words: words the invented names must not collide with (template words).
    """
    missing = [s for s in SPLITS if s not in entities_per_split]
    extra = [s for s in entities_per_split if s not in SPLITS]
    if missing or extra:
        raise ValueError(
            f"entities_per_split has splits {sorted(entities_per_split)}; give a count for each of {SPLITS} "
            "(world version 8 renamed 'eval' to 'test')."
        )
    rng = random.Random(f"knowledge-v12-{seed}")
    reserved = set(forbidden_words) | {v for rels in RELATIONS.values() for vs in rels.values() for v in vs}
    reserved |= {w for rels in RELATIONS.values() for r in rels for w in r.split()}
    total = len(DOMAINS) * sum(entities_per_split.values())
    invented = invent_names(rng, total + users, reserved)
    names = iter(invented[:total])
    facts: list[Fact] = []
    for domain in DOMAINS:
        for split in SPLITS:
            for _ in range(entities_per_split[split]):
                entity = next(names)
                for relation, values in RELATIONS[domain].items():
                    value = rng.choice(values)
                    facts.append(Fact(f"{domain}/{entity}/{relation}", domain, split, entity, relation, value))
    return Knowledge(tuple(facts), tuple(invented[total:]))
