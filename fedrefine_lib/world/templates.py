"""English templates of the ``mini`` world: fact statements, questions (optionally after a
private user prefix), two-fact questions, and their parsers.

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
#: What a query may carry about its user: private, and irrelevant to the answer.
PRIVATE_PREFIXES: tuple[str, ...] = (
    "My name is {user}.",
    "I am {user}.",
    "This is {user} asking.",
)
#: A question that needs two facts (two domains, two devices); answered "<v1> and <v2>".
PAIR_QUESTION = "What is the {rel1} of {ent1} and the {rel2} of {ent2}?"
_ALL_RELATIONS = {rel: domain for domain, rels in RELATIONS.items() for rel in rels}
_VALUE_RELATION = {v: rel for rels in RELATIONS.values() for rel, vs in rels.items() for v in vs}


def statement(fact: Fact, template: int = 0) -> str:
    """The fact as one English sentence, in statement template ``template``."""
    return STATEMENTS[template].format(rel=fact.relation, ent=fact.entity, val=fact.value)


def question(entity: str, relation: str, template: int = 0, user: str | None = None, prefix: int = 0) -> str:
    """A question asking for ``relation`` of ``entity`` in question template ``template``,
    after the private prefix ``PRIVATE_PREFIXES[prefix]`` naming ``user`` when one is given."""
    text = QUESTIONS[template].format(rel=relation, ent=entity)
    return text if user is None else f"{PRIVATE_PREFIXES[prefix].format(user=user)} {text}"


def pair_question(first: Fact, second: Fact) -> str:
    """The two-fact question about ``first`` and ``second`` (see :data:`PAIR_QUESTION`)."""
    return PAIR_QUESTION.format(rel1=first.relation, ent1=first.entity, rel2=second.relation, ent2=second.entity)


def pair_answer(first: str, second: str) -> str:
    """The answer text of a two-fact question: ``"<first> and <second>"``."""
    return f"{first} and {second}"


def _body(template: str, groups: dict[str, str]) -> str:
    """A regex body for ``template``: placeholders as ``groups``, any spacing before
    punctuation (decoded text of the word-level-ish Qwen tokenizer reads "red ." for "red.")."""

    def literal(text: str) -> str:
        return "".join(r"\s*" + re.escape(c) if c in ".,?:" else re.escape(c) for c in text)

    parts = re.split(r"(\{\w+\})", template)
    return "".join(groups[p[1:-1]] if p.startswith("{") else literal(p) for p in parts)


def _pattern(template: str, groups: dict[str, str]) -> re.Pattern:
    """A whole-text regex for ``template`` (see :func:`_body`)."""
    return re.compile(r"^\s*" + _body(template, groups) + r"\s*$")


_REL = "(?P<rel>" + "|".join(sorted(map(re.escape, _ALL_RELATIONS), key=len, reverse=True)) + ")"
_ENT = r"(?P<ent>[A-Z][a-z]+)"
_VAL = r"(?P<val>[a-z]+)"
_Q_PATTERNS = [_pattern(t, {"rel": _REL, "ent": _ENT}) for t in QUESTIONS]
_S_PATTERNS = [_pattern(t, {"rel": _REL, "ent": _ENT, "val": _VAL}) for t in STATEMENTS]


_PRIVATE = re.compile(
    r"^\s*(?:"
    + "|".join(_body(t, {"user": f"(?P<user{i}>[A-Z][a-z]+)"}) for i, t in enumerate(PRIVATE_PREFIXES))
    + r")\s*"
)


@dataclass(frozen=True)
class Parsed:
    """What a question or statement says: template index, entity, relation, value, and
    the user a question's private prefix names (``None`` without one)."""

    template: int
    entity: str
    relation: str
    value: str | None = None
    user: str | None = None


def split_private(text: str) -> tuple[str | None, str]:
    """``(user, rest)``: the user named by a leading private prefix (or ``None``) and the
    text after it."""
    m = _PRIVATE.match(text)
    if not m:
        return None, text
    user = next(v for k, v in m.groupdict().items() if v is not None)
    return user, text[m.end() :]


def parse_question(text: str) -> Parsed | None:
    """Parse a question written in any :data:`QUESTIONS` template, after an optional
    private prefix, or ``None``."""
    user, rest = split_private(text)
    for i, pat in enumerate(_Q_PATTERNS):
        m = pat.match(rest)
        if m:
            return Parsed(i, m["ent"], m["rel"], user=user)
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


def rephrase_check(original: str, rewrite: str) -> tuple[bool, bool, bool]:
    """``(faithful, private_dropped, reworded)`` of a rewrite of ``original``: it parses as a
    question with the same entity and relation; the user the original names does not occur
    in it (as a word); it parses in another template (or not at all)."""
    a, b = parse_question(original), parse_question(rewrite)
    faithful = a is not None and b is not None and (a.entity, a.relation) == (b.entity, b.relation)
    user = a.user if a is not None else None
    dropped = user is None or re.search(rf"\b{re.escape(user)}\b", rewrite) is None
    reworded = b is None or a is None or b.template != a.template
    return faithful, dropped, reworded


def template_swap(text: str, shift: int = 0) -> str:
    """The same question, private prefix included, in another question template
    (``(template + 1 + shift) mod`` the template count, never its own): a paraphraser that
    keeps entity, relation and user, the bound a rephraser's privacy is set against.
    Text that does not parse comes back unchanged."""
    p = parse_question(text)
    if p is None:
        return text
    t = (p.template + 1 + shift % (len(QUESTIONS) - 1)) % len(QUESTIONS)
    _, rest = split_private(text)
    prefix = text[: len(text) - len(rest)].strip()
    return " ".join(filter(None, (prefix, QUESTIONS[t].format(rel=p.relation, ent=p.entity))))
