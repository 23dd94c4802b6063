"""Privacy by rephrasing: the receiver rewrites the query on the user's device before
anything leaves it, and measures of what the rewrite still gives away.

The paper uses the receiver itself (Qwen3-0.6B) as the rephraser; here any
``models.LoadedModel`` serves, prompted with :func:`data.rephrase_messages`.

Modes (:func:`rephrase`):

- ``"shared"``: one greedy rephrasing per question, sent to every sender.
- ``"per_sender"``: a different rephrasing for each sender (for ``concat``-style fusion,
  so no single sender sees the same text as another): seeded temperature sampling, one
  seed per (seed, sender, attempt); a sample equal to an earlier sender's is redrawn up to
  ``retries`` times. Deterministic for a given seed and batch size.

:func:`rephrased_items` puts a rephrasing into MCQ items (same options) for scoring and
T2T; :func:`sender_views` gives engines (``C2C``/``FedRefine``) per-sender views in which
each sender reads its rephrasing while the receiver keeps the original question.

Measures of the transmitted text against the original (:func:`leakage`):

- ``token_jaccard``: Jaccard overlap of the two sets of lower-cased word tokens (``\\w+``);
- ``lcs_chars`` / ``lcs_fraction``: the longest common substring (case-insensitive by
  default), in characters and as a fraction of the original's length;
- ``private_survival``: of the caller's private terms (e.g. the world's invented entity
  names) that occur in the original, the share that also occur in the transmitted text
  (whole-word, case-insensitive); ``nan`` when the original holds none.

Fidelity (does the rephrased question still ask the same thing) is measured by the
caller as answer accuracy on :func:`rephrased_items` with ``evaluate.score_mcq``; for
worlds that can parse their questions, :func:`same_parse` builds a cheap structural
check and :func:`structural_fidelity` applies it.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from fedrefine_lib import data
from fedrefine_lib.align import encode_prompts
from fedrefine_lib.federation import Standalone, Trace, generate, stop_token_ids

MODES = ("shared", "per_sender")

# --------------------------------------------------------------------- rephrasing


@dataclass
class Rephrasings:
    """Rephrased questions.

    Attributes:
        originals: the questions as asked, one per item.
        texts: per item, one rephrasing per sender (``shared``: the same text repeated).
        mode: ``"shared"`` or ``"per_sender"``.
        fallbacks: outputs that were empty after cleaning and were replaced by the
            original question (so they leak fully; the measures show it).
    """

    originals: list[str]
    texts: list[list[str]]
    mode: str
    fallbacks: int = 0

    @property
    def n_senders(self) -> int:
        return len(self.texts[0]) if self.texts else 0

    def for_sender(self, sender: int) -> list[str]:
        """One rephrasing per item: what sender ``sender`` (0-based) is sent."""
        if not 0 <= sender < self.n_senders:
            raise IndexError(f"Sender {sender} out of range: these rephrasings are for {self.n_senders} sender(s).")
        return [row[sender] for row in self.texts]

    def by_sender(self, names: Sequence[str]) -> dict[str, list[str]]:
        """``{sender name: its rephrasings}`` in sender order (e.g. ``t2t_notes(stems=...)``)."""
        if len(names) != self.n_senders:
            raise ValueError(f"{len(names)} sender names for rephrasings made for {self.n_senders} sender(s).")
        return {name: self.for_sender(k) for k, name in enumerate(names)}

    @property
    def shared(self) -> list[str]:
        """The first sender's rephrasings (in ``shared`` mode, what every sender gets)."""
        return self.for_sender(0)

    def distinct_fraction(self) -> float:
        """Share of items whose rephrasings are pairwise different across senders."""
        if not self.texts:
            return float("nan")
        return sum(len(set(row)) == len(row) for row in self.texts) / len(self.texts)


_THINK = re.compile(r"<think>.*?(</think>|$)", re.DOTALL)
_PREFIX = re.compile(r"^\s*(rephrased question|rephrased|rewritten question|question)\s*:\s*", re.IGNORECASE)


def clean_rephrasing(text: str) -> str:
    """The rewritten question out of a raw generation: drops ``<think>`` blocks, keeps the
    first non-empty line, strips a leading "Question:"-style label and enclosing quotes."""
    text = _THINK.sub("", text)
    line = next((l.strip() for l in text.splitlines() if l.strip()), "")
    return _PREFIX.sub("", line).strip().strip("\"'“”").strip()


def _derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across runs and platforms)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _greedy(receiver, stems: list[str], max_new_tokens: int) -> tuple[list[str], dict[str, int]]:
    """Greedy rephrasings with the project's decoder (``federation.generate``)."""
    texts, trace = generate(Standalone(receiver), [data.rephrase_messages(s) for s in stems], max_new_tokens)
    return texts, {"prompt": trace.tokens.get("prompt", 0), "generated": trace.tokens.get("generated", 0)}


@torch.no_grad()
def _sampled(receiver, stems: list[str], max_new_tokens: int, temperature: float, seed: int) -> tuple[list[str], dict[str, int]]:
    """Temperature-sampled rephrasings (pure temperature sampling, no top-k/top-p), with
    the global RNG forked so callers' random state is untouched."""
    tok, model = receiver.tokenizer, receiver.model
    ids, mask = encode_prompts(tok, [data.rephrase_messages(s) for s in stems])
    dev = next(model.parameters()).device
    stops = sorted(stop_token_ids(receiver))
    pad = tok.pad_token_id if tok.pad_token_id is not None else stops[0]
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        out = model.generate(
            input_ids=ids.to(dev), attention_mask=mask.to(dev), do_sample=True, temperature=temperature,
            top_k=0, top_p=1.0, max_new_tokens=max_new_tokens, eos_token_id=stops, pad_token_id=pad,
        )
    texts, generated = [], 0
    for row in out[:, ids.shape[1]:].tolist():
        cut = next((i for i, t in enumerate(row) if t in stops), len(row))
        generated += cut
        texts.append(tok.decode(row[:cut], skip_special_tokens=True))
    return texts, {"prompt": int(mask.sum()), "generated": generated}


def rephrase(
    receiver,
    stems: Sequence[str],
    *,
    mode: str = "shared",
    n_senders: int = 1,
    max_new_tokens: int = 48,
    batch_size: int = 16,
    seed: int = 0,
    temperature: float = 0.8,
    retries: int = 2,
    progress: bool = False,
) -> tuple[Rephrasings, Trace]:
    """Rewrite each question with the receiver model (on the user's device).

    Args:
        receiver: a ``models.LoadedModel`` (the paper: the receiver, Qwen3-0.6B).
        stems: the original questions (e.g. MCQ ``question_stem``).
        mode: ``"shared"`` (one greedy rephrasing for all senders) or ``"per_sender"``
            (a seeded sample per sender; see the module docstring).
        n_senders: how many senders the rephrasings are for.
        max_new_tokens: generation budget per rephrasing.
        batch_size: questions per generation call.
        seed: seed of the per-sender samples (unused in ``shared`` mode, which is greedy).
        temperature: sampling temperature of ``per_sender`` mode (> 0).
        retries: redraws of a per-sender sample that repeats an earlier sender's text.
    Returns:
        the :class:`Rephrasings` and a trace with stage ``rephrase`` (all generation work)
        and token counts ``rephrase_prompt`` / ``rephrase_generated``. Nothing is sent,
        so the trace holds no bytes.
    """
    if mode not in MODES:
        raise ValueError(f"Unknown rephrase mode {mode!r}; use one of {MODES}.")
    if n_senders < 1:
        raise ValueError(f"n_senders must be >= 1, got {n_senders}.")
    if mode == "per_sender" and temperature <= 0:
        raise ValueError("per_sender mode samples: give temperature > 0 (or use mode='shared').")
    stems = list(stems)
    if any(not isinstance(s, str) or not s.strip() for s in stems):
        raise ValueError("Every question to rephrase must be a non-empty string.")
    trace = Trace()
    counts = {"prompt": 0, "generated": 0}

    def run(batch: list[str], sender: int, attempt: int) -> list[str]:
        if mode == "shared":
            texts, c = _greedy(receiver, batch, max_new_tokens)
        else:
            texts, c = _sampled(receiver, batch, max_new_tokens, temperature, _derive_seed(seed, sender, attempt))
        for k in counts:
            counts[k] += c[k]
        return [clean_rephrasing(t) for t in texts]

    senders_to_generate = 1 if mode == "shared" else n_senders
    rows: list[list[str]] = [[] for _ in stems]
    batches = [range(i, min(i + batch_size, len(stems))) for i in range(0, len(stems), batch_size)]
    with trace.time("rephrase"):
        for idx in tqdm(batches, desc=f"rephrase ({mode})", disable=not progress):
            for k in range(senders_to_generate):
                todo = list(idx)
                for attempt in range(1 + (retries if k > 0 else 0)):
                    for i, text in zip(todo, run([stems[i] for i in todo], k, attempt)):
                        rows[i][k:] = [text]
                    todo = [i for i in todo if rows[i][k] in rows[i][:k]]
                    if not todo:
                        break
    fallbacks = 0
    for stem, row in zip(stems, rows):
        for k, text in enumerate(row):
            if not text:
                row[k], fallbacks = stem, fallbacks + 1
        if mode == "shared":
            row.extend(row[:1] * (n_senders - 1))
    trace.tokens["rephrase_prompt"] = counts["prompt"]
    trace.tokens["rephrase_generated"] = counts["generated"]
    return Rephrasings(stems, rows, mode, fallbacks), trace


# --------------------------------------------------------------------- MCQ items


def rephrased_item(item: dict, stem: str) -> dict:
    """A copy of an OpenBookQA-style item asking ``stem`` instead (same options and
    answer); the first original stem is kept under ``original_question_stem``."""
    if not isinstance(stem, str) or not stem.strip():
        raise ValueError(f"Item {item.get('id')!r}: the rephrased question is empty.")
    original = item.get("original_question_stem", item["question_stem"])
    return {**item, "question_stem": stem, "original_question_stem": original}


def rephrased_items(items: Sequence[dict], rephrasings: Rephrasings, sender: int = 0) -> list[dict]:
    """The items as sender ``sender`` receives them (see :meth:`Rephrasings.for_sender`)."""
    if len(items) != len(rephrasings.texts):
        raise ValueError(f"{len(items)} items but {len(rephrasings.texts)} rephrasings: rephrase the same items.")
    for item, original in zip(items, rephrasings.originals):
        if item["question_stem"] != original:
            raise ValueError(f"Item {item.get('id')!r} asks {item['question_stem']!r}, but its rephrasing "
                             f"was made for {original!r}: keep items and rephrasings in the same order.")
    return [rephrased_item(it, s) for it, s in zip(items, rephrasings.for_sender(sender))]


def sender_views(rephrasings: Rephrasings, names: Sequence[str]) -> dict[str, Callable[[list], list]]:
    """Per sender, a ``federation`` sender view (``{name: view}`` for ``FedRefine(sender_views=...)``
    or ``C2C(sender_view=...)``) that rewrites each chat the receiver asks, replacing the
    original question text with that sender's rephrasing; the receiver keeps the original.

    Raises (when the view is applied) if a chat contains none of the rephrased originals.
    """
    def view_for(sender: int) -> Callable[[list], list]:
        table = dict(zip(rephrasings.originals, rephrasings.for_sender(sender)))
        ordered = sorted(table, key=len, reverse=True)  # longest first: a stem inside another stem

        def view(messages_batch: list) -> list:
            out = []
            for chat in messages_batch:
                hit = next((o for o in ordered if any(o in m["content"] for m in chat)), None)
                if hit is None:
                    raise ValueError(f"No rephrased question occurs in the chat {chat!r}: rephrase the items this "
                                     "engine is asked about (same question_stem text).")
                out.append([{**m, "content": m["content"].replace(hit, table[hit])} for m in chat])
            return out

        view.__name__ = f"rephrased(sender {sender})"
        return view

    if len(names) != rephrasings.n_senders:
        raise ValueError(f"{len(names)} sender names for rephrasings made for {rephrasings.n_senders} sender(s).")
    return {name: view_for(k) for k, name in enumerate(names)}


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
        rows.append({"original": o, "transmitted": t, "token_jaccard": m.token_jaccard, "lcs_chars": m.lcs_chars,
                     "lcs_fraction": m.lcs_fraction, "private_present": m.private_present,
                     "private_survived": m.private_survived, "private_survival": m.private_survival})
    return pd.DataFrame(rows, columns=["original", "transmitted", "token_jaccard", "lcs_chars", "lcs_fraction",
                                       "private_present", "private_survived", "private_survival"])


def summarize_leakage(frame: pd.DataFrame) -> dict[str, float]:
    """Means over items of a :func:`leakage_frame`; ``private_survival`` pooled over all
    private-term occurrences (survived / present; nan when no original held any) and
    ``verbatim`` the share of items sent unchanged (case-insensitive)."""
    present = int(frame["private_present"].sum())
    verbatim = (frame["original"].str.lower().str.strip() == frame["transmitted"].str.lower().str.strip())
    return {
        "n": int(len(frame)),
        "token_jaccard": float(frame["token_jaccard"].mean()),
        "lcs_chars": float(frame["lcs_chars"].mean()),
        "lcs_fraction": float(frame["lcs_fraction"].mean()),
        "private_survival": float(frame["private_survived"].sum()) / present if present else math.nan,
        "verbatim": float(verbatim.mean()) if len(frame) else math.nan,
    }


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
