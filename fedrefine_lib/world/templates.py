"""English templates of the ``mini`` world: fact statements and questions, and their parsers.

No template starts with the entity: answers are encoded on their own and the
tokenizers add no prefix space, so an entity opening a segment would be a different
token from the same entity after a space.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .knowledge import RELATIONS, Fact

STATEMENTS: tuple[str, ...] = (
    "The {rel} of {ent} is {val}.",
    "In fact, {ent} has the {rel} {val}.",
    "For {ent}, the {rel} is {val}.",
    "It is known that the {rel} of {ent} is {val}.",
)
QUESTIONS: tuple[str, ...] = (
    "What is the {rel} of {ent}?",
    "Which {rel} does {ent} have?",
    "Do you know what {rel} {ent} has?",
    "Tell me the {rel} of {ent}.",
)
_ALL_RELATIONS = {rel: domain for domain, rels in RELATIONS.items() for rel in rels}
_VALUE_RELATION = {v: rel for rels in RELATIONS.values() for rel, vs in rels.items() for v in vs}


def statement(fact: Fact, template: int = 0) -> str:
    """The fact as one English sentence, in statement template ``template``."""
    return STATEMENTS[template].format(rel=fact.relation, ent=fact.entity, val=fact.value)


def question(entity: str, relation: str, template: int = 0) -> str:
    """A question asking for ``relation`` of ``entity`` in question template ``template``."""
    return QUESTIONS[template].format(rel=relation, ent=entity)


def _pattern(template: str, groups: dict[str, str]) -> re.Pattern:
    """A regex for ``template``: placeholders as ``groups``, any spacing before punctuation
    (decoded text of the word-level-ish Qwen tokenizer reads "red ." for "red.")."""

    def literal(text: str) -> str:
        return "".join(r"\s*" + re.escape(c) if c in ".,?:" else re.escape(c) for c in text)

    parts = re.split(r"(\{\w+\})", template)
    out = "".join(groups[p[1:-1]] if p.startswith("{") else literal(p) for p in parts)
    return re.compile(r"^\s*" + out + r"\s*$")


_REL = "(?P<rel>" + "|".join(sorted(map(re.escape, _ALL_RELATIONS), key=len, reverse=True)) + ")"
_ENT = r"(?P<ent>[A-Z][a-z]+)"
_VAL = r"(?P<val>[a-z]+)"
_Q_PATTERNS = [_pattern(t, {"rel": _REL, "ent": _ENT}) for t in QUESTIONS]
_S_PATTERNS = [_pattern(t, {"rel": _REL, "ent": _ENT, "val": _VAL}) for t in STATEMENTS]


@dataclass(frozen=True)
class Parsed:
    """What a question or statement says: template index, entity, relation, value."""

    template: int
    entity: str
    relation: str
    value: str | None = None


def parse_question(text: str) -> Parsed | None:
    """Parse a question written in any :data:`QUESTIONS` template, or ``None``."""
    for i, pat in enumerate(_Q_PATTERNS):
        m = pat.match(text)
        if m:
            return Parsed(i, m["ent"], m["rel"])
    return None


def parse_statement(text: str) -> Parsed | None:
    """Parse a statement written in any :data:`STATEMENTS` template, or ``None``.

    Only statements whose value belongs to the stated relation's value set parse.
    """
    for i, pat in enumerate(_S_PATTERNS):
        m = pat.match(text)
        if m and _VALUE_RELATION.get(m["val"]) == m["rel"]:
            return Parsed(i, m["ent"], m["rel"], m["val"])
    return None
