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

What a rewrite still gives away, and whether it keeps the question, is measured by
``leakage``.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from fedrefine_lib import data
from fedrefine_lib.decode import generate, stop_token_ids
from fedrefine_lib.engine import Standalone
from fedrefine_lib.prompts import encode_prompts
from fedrefine_lib.trace import Trace

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
    """Greedy rephrasings with the project's decoder (``decode.generate``)."""
    texts, trace = generate(Standalone(receiver), [data.rephrase_messages(s) for s in stems], max_new_tokens)
    return texts, {"prompt": trace.tokens.get("prompt", 0), "generated": trace.tokens.get("generated", 0)}


@torch.no_grad()
def _sampled(
    receiver, stems: list[str], max_new_tokens: int, temperature: float, seed: int
) -> tuple[list[str], dict[str, int]]:
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
            input_ids=ids.to(dev),
            attention_mask=mask.to(dev),
            do_sample=True,
            temperature=temperature,
            top_k=0,
            top_p=1.0,
            max_new_tokens=max_new_tokens,
            eos_token_id=stops,
            pad_token_id=pad,
        )
    texts, generated = [], 0
    for row in out[:, ids.shape[1] :].tolist():
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


def rewrite_with(
    rewrite: Callable[[str, int], str], stems: Sequence[str], n_senders: int = 1, mode: str = "rule"
) -> Rephrasings:
    """Rephrasings made by a rule instead of a model: ``rewrite(stem, sender)`` is what
    sender ``sender`` is sent (e.g. the mini world's ``templates.template_swap``, a bound
    that keeps everything but the wording)."""
    if n_senders < 1:
        raise ValueError(f"n_senders must be >= 1, got {n_senders}.")
    stems = list(stems)
    return Rephrasings(stems, [[rewrite(s, k) for k in range(n_senders)] for s in stems], mode)


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
            raise ValueError(
                f"Item {item.get('id')!r} asks {item['question_stem']!r}, but its rephrasing "
                f"was made for {original!r}: keep items and rephrasings in the same order."
            )
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
                    raise ValueError(
                        f"No rephrased question occurs in the chat {chat!r}: rephrase the items this "
                        "engine is asked about (same question_stem text)."
                    )
                out.append([{**m, "content": m["content"].replace(hit, table[hit])} for m in chat])
            return out

        view.__name__ = f"rephrased(sender {sender})"
        return view

    if len(names) != rephrasings.n_senders:
        raise ValueError(f"{len(names)} sender names for rephrasings made for {rephrasings.n_senders} sender(s).")
    return {name: view_for(k) for k, name in enumerate(names)}
