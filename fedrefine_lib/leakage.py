"""What a transmitted text gives away, and whether a rephrasing still asks the same question.

Measures of the transmitted text against the original (:func:`leakage`):

- ``token_jaccard``: Jaccard overlap of the two sets of lower-cased word tokens (``\\w+``);
- ``lcs_chars`` / ``lcs_fraction``: the longest common substring (case-insensitive by
  default), in characters and as a fraction of the original's length;
- ``private_survival``: of the caller's private terms (e.g. the world's invented entity
  names) that occur in the original, the share that also occur in the transmitted text
  (whole-word, case-insensitive); ``nan`` when the original holds none.

Fidelity (does the rephrased question still ask the same thing) is measured by the
caller as answer accuracy on ``rephrase.rephrased_items`` with ``evaluate.score_mcq``; for
worlds that can parse their questions, :func:`same_parse` builds a cheap structural
check and :func:`structural_fidelity` applies it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

# ------------------------------------------------------------------------ leakage

_WORD = re.compile(r"\w+")


def word_tokens(text: str) -> set[str]:
    """The set of lower-cased word tokens (``\\w+``) of ``text``."""
    return set(_WORD.findall(text.lower()))


def token_jaccard(original: str, transmitted: str) -> float:
    """|A ∩ B| / |A ∪ B| of the two texts' word-token sets (0.0 when both are empty)."""
    a, b = word_tokens(original), word_tokens(transmitted)
    union = a | b
    return len(a & b) / len(union) if union else 0.0


def longest_common_substring(a: str, b: str, *, lower: bool = True) -> str:
    """The longest contiguous run of characters shared by ``a`` and ``b`` (the first one
    found in ``a`` on ties), taken from ``a``; compared case-insensitively by default."""
    x, y = (a.lower(), b.lower()) if lower else (a, b)
    best_len, best_end = 0, 0
    prev = [0] * (len(y) + 1)
    for i in range(1, len(x) + 1):
        cur = [0] * (len(y) + 1)
        xi = x[i - 1]
        for j in range(1, len(y) + 1):
            if xi == y[j - 1]:
                cur[j] = prev[j - 1] + 1
                if cur[j] > best_len:
                    best_len, best_end = cur[j], i
        prev = cur
    return a[best_end - best_len : best_end]


def _term_pattern(term: str) -> re.Pattern:
    return re.compile(r"(?<!\w)" + re.escape(term) + r"(?!\w)", re.IGNORECASE)


def private_terms_in(text: str, terms: Sequence[str]) -> list[str]:
    """The distinct ``terms`` occurring in ``text`` as whole words (case-insensitive), in
    the order given."""
    low = text.lower()
    return [t for t in dict.fromkeys(terms) if t and t.lower() in low and _term_pattern(t).search(text)]


@dataclass(frozen=True)
class Leakage:
    """What a transmitted text reveals about the original (see the module docstring)."""

    token_jaccard: float
    lcs_chars: int
    lcs_fraction: float
    private_present: int
    private_survived: int

    @property
    def private_survival(self) -> float:
        """Share of the original's private terms still in the transmitted text (nan if none)."""
        return self.private_survived / self.private_present if self.private_present else float("nan")


def leakage(original: str, transmitted: str, private_terms: Sequence[str] = ()) -> Leakage:
    """Leakage measures of ``transmitted`` against ``original``.

    Args:
        private_terms: strings the user wants kept private (e.g. entity names); only those
            present in ``original`` count.
    """
    lcs = len(longest_common_substring(original, transmitted))
    present = private_terms_in(original, private_terms)
    survived = private_terms_in(transmitted, present)
    return Leakage(
        token_jaccard=token_jaccard(original, transmitted),
        lcs_chars=lcs,
        lcs_fraction=lcs / len(original) if original else 0.0,
        private_present=len(present),
        private_survived=len(survived),
    )


def leakage_frame(
    originals: Sequence[str],
    transmitted: Sequence[str],
    private_terms: Sequence[str] = (),
    per_item_terms: Sequence[Sequence[str]] | None = None,
) -> pd.DataFrame:
    """One row of :class:`Leakage` measures per (original, transmitted) pair.

    Args:
        private_terms: terms private for every item (e.g. all invented entity names).
        per_item_terms: optional extra terms per item (e.g. each item's ``entity``).
    Returns:
        columns ``original``, ``transmitted``, ``token_jaccard``, ``lcs_chars``,
        ``lcs_fraction``, ``private_present``, ``private_survived``, ``private_survival``.
    """
    if len(originals) != len(transmitted):
        raise ValueError(f"{len(originals)} originals but {len(transmitted)} transmitted texts.")
    if per_item_terms is not None and len(per_item_terms) != len(originals):
        raise ValueError(f"per_item_terms has {len(per_item_terms)} entries for {len(originals)} items.")
    rows = []
    for i, (o, t) in enumerate(zip(originals, transmitted)):
        terms = list(private_terms) + (list(per_item_terms[i]) if per_item_terms is not None else [])
        m = leakage(o, t, terms)
        rows.append(
            {
                "original": o,
                "transmitted": t,
                "token_jaccard": m.token_jaccard,
                "lcs_chars": m.lcs_chars,
                "lcs_fraction": m.lcs_fraction,
                "private_present": m.private_present,
                "private_survived": m.private_survived,
                "private_survival": m.private_survival,
            }
        )
    return pd.DataFrame(
        rows,
        columns=[
            "original",
            "transmitted",
            "token_jaccard",
            "lcs_chars",
            "lcs_fraction",
            "private_present",
            "private_survived",
            "private_survival",
        ],
    )


def summarize_leakage(frame: pd.DataFrame) -> dict[str, float]:
    """Means over items of a :func:`leakage_frame`; ``private_survival`` pooled over all
    private-term occurrences (survived / present; nan when no original held any) and
    ``verbatim`` the share of items sent unchanged (case-insensitive)."""
    present = int(frame["private_present"].sum())
    verbatim = frame["original"].str.lower().str.strip() == frame["transmitted"].str.lower().str.strip()
    return {
        "n": int(len(frame)),
        "token_jaccard": float(frame["token_jaccard"].mean()),
        "lcs_chars": float(frame["lcs_chars"].mean()),
        "lcs_fraction": float(frame["lcs_fraction"].mean()),
        "private_survival": float(frame["private_survived"].sum()) / present if present else math.nan,
        "verbatim": float(verbatim.mean()) if len(frame) else math.nan,
    }


def sent_leakage(
    originals: Sequence[str], sent: Sequence[Sequence[str]], per_item_terms: Sequence[Sequence[str]]
) -> dict[str, float]:
    """:func:`summarize_leakage` over everything sent: ``sent[i][k]`` is what sender ``k``
    received for item ``i`` (e.g. ``rephrase.Rephrasings.texts``), every (item, sender) pair
    one row, ``per_item_terms[i]`` item ``i``'s private strings (e.g. the user's name)."""
    if not (len(originals) == len(sent) == len(per_item_terms)):
        raise ValueError(f"{len(originals)} originals, {len(sent)} rows sent, {len(per_item_terms)} term lists.")
    rows = [(o, t, terms) for o, row, terms in zip(originals, sent, per_item_terms) for t in row]
    frame = leakage_frame([r[0] for r in rows], [r[1] for r in rows], per_item_terms=[r[2] for r in rows])
    return summarize_leakage(frame)


# ----------------------------------------------------------------------- fidelity

SameQuestion = Callable[[str, str], "bool | None"]
"""``check(original, rephrased)``: True if both ask the same thing, False if not, None
when the original cannot be judged (e.g. it does not parse)."""


def same_parse(parse: Callable[[str], Any], fields: Sequence[str]) -> SameQuestion:
    """A structural check from a question parser: same ``fields`` of both parses.

    Example (the mini world): ``same_parse(world.templates.parse_question, ("entity",
    "relation"))`` — any template is fine as long as entity and relation are kept.
    """
    if not fields:
        raise ValueError("Give the parsed fields that must match (e.g. ('entity', 'relation')).")

    def check(original: str, rephrased: str) -> bool | None:
        p = parse(original)
        if p is None:
            return None
        q = parse(rephrased)
        return q is not None and all(getattr(p, f) == getattr(q, f) for f in fields)

    return check


@dataclass(frozen=True)
class StructuralFidelity:
    """Per item: True/False from the check, None where the original could not be judged."""

    results: tuple[bool | None, ...]

    @property
    def checked(self) -> int:
        return sum(r is not None for r in self.results)

    @property
    def fraction(self) -> float:
        """Share of judged items whose rephrasing asks the same thing (nan if none judged)."""
        return sum(r is True for r in self.results) / self.checked if self.checked else float("nan")


def structural_fidelity(originals: Sequence[str], rephrased: Sequence[str], check: SameQuestion) -> StructuralFidelity:
    """Apply ``check`` to every (original, rephrased) pair."""
    if len(originals) != len(rephrased):
        raise ValueError(f"{len(originals)} originals but {len(rephrased)} rephrasings.")
    return StructuralFidelity(tuple(check(o, r) for o, r in zip(originals, rephrased)))
