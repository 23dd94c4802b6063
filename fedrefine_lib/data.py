"""Data loaders and prompt formats shared by every profile.

Files follow the hub data sets' schemas so one loader serves ``mini``, ``smol`` and
``paper``:

* chat records like teknium/OpenHermes-2.5:
  ``{"conversations": [{"from": "system"|"human"|"gpt", "value": str}, ...]}``
  (extra fields such as ``domain`` are kept out of the messages);
* multiple choice like allenai/openbookqa: ``id``, ``question_stem``,
  ``choices: {"text": [...], "label": ["A", "B", "C", "D"]}``, ``answerKey``
  (plus an optional ``domain``, and ``private_context``: a note only the senders' devices
  hold, asked as a ``prompts.CONTEXT_ROLE`` message; chat records may hold such messages
  too, as ``{"from": "context"}``).

Prompt formats: :func:`mcq_messages` (the question, optionally after a context note),
:func:`background_messages` (T2T sender), :func:`rephrase_messages` (privacy
rephrasing), :func:`context_note`. Every scorer applies the model's own chat template
to these messages; the option text is the continuation scored by log-likelihood.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .prompts import CONTEXT_ROLE
from .prompts import context_note as context_note

ROLE_OF = {
    "system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
    CONTEXT_ROLE: CONTEXT_ROLE,
}  # fmt: skip
FROM_OF = {"system": "system", "user": "human", "assistant": "gpt", CONTEXT_ROLE: CONTEXT_ROLE}
MCQ_LABELS = ("A", "B", "C", "D")
MCQ_INSTRUCTION = "Answer with the text of the correct option."
BACKGROUND_INSTRUCTION = "Write one background sentence for this question."
REPHRASE_INSTRUCTION = "Rephrase this question without changing what it asks."


class DataFormatError(ValueError):
    """A data file is missing or does not follow the expected schema."""


def _rows(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number, row dict) of a JSONL or Parquet file, with clear errors."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(
            f"{path}: file not found. Build the mini world with "
            "fedrefine_lib.world.build_world(), or point the profile at an existing "
            "JSONL/Parquet file."
        )
    if path.suffix == ".parquet":
        import pandas as pd

        for i, row in enumerate(pd.read_parquet(path).to_dict(orient="records"), start=1):
            yield i, _plain(row)
        return
    with path.open(encoding="utf-8") as fh:
        for i, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataFormatError(
                    f"{path}, line {i}: not valid JSON ({exc.msg}). Each line must be one JSON object (JSONL)."
                ) from exc
            if not isinstance(row, dict):
                raise DataFormatError(f"{path}, line {i}: expected a JSON object, got {type(row).__name__}.")
            yield i, row


def _plain(obj: Any) -> Any:
    """Parquet rows hold numpy arrays for lists; turn them into plain Python."""
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):
        obj = obj.tolist()
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def load_chat_records(path: str | Path, kinds: Sequence[str] | None = None) -> list[list[dict]]:
    """Chat records of an OpenHermes-2.5-style file as chat messages.

    Args:
        kinds: keep only rows whose ``kind`` field is one of these (the mini world tags
            its records ``mcq``, ``background`` or ``filler``); None keeps every row.

    Returns:
        one list per record of ``{"role": "system"|"user"|"assistant", "content": str}``.

    Raises:
        DataFormatError: naming the file, the line and the fix.
    """
    records = []
    for i, row in _rows(path):
        if kinds is not None:
            if "kind" not in row:
                raise DataFormatError(
                    f"{path}, line {i}: asked for records of kinds {list(kinds)} but the row has "
                    "no 'kind' field; drop the kinds filter (e.g. `chat_train_kinds` in the profile)."
                )
            if row["kind"] not in kinds:
                continue
        conv = row.get("conversations")
        if not isinstance(conv, list) or not conv:
            raise DataFormatError(
                f"{path}, line {i}: expected a non-empty 'conversations' list of "
                "{'from': 'system'|'human'|'gpt', 'value': str} (OpenHermes-2.5 schema); "
                f"got keys {sorted(row)}."
            )
        messages = []
        for j, turn in enumerate(conv):
            who = turn.get("from") if isinstance(turn, dict) else None
            value = turn.get("value") if isinstance(turn, dict) else None
            if who not in ROLE_OF or not isinstance(value, str):
                raise DataFormatError(
                    f"{path}, line {i}, turn {j}: expected {{'from': one of "
                    f"{sorted(ROLE_OF)}, 'value': str}}, got {turn!r}."
                )
            messages.append({"role": ROLE_OF[who], "content": value})
        if messages[-1]["role"] != "assistant":
            raise DataFormatError(
                f"{path}, line {i}: the last turn must be from 'gpt' (the assistant answer that training scores)."
            )
        records.append(messages)
    if kinds is not None and not records:
        raise DataFormatError(f"{path}: no record of kinds {list(kinds)}; check the kinds filter.")
    return records


def to_chat_record(messages: list[dict], **extra: Any) -> dict:
    """Chat messages as one OpenHermes-2.5-style row (``extra`` fields kept alongside)."""
    return {"conversations": [{"from": FROM_OF[m["role"]], "value": m["content"]} for m in messages], **extra}


def validate_mcq(item: dict, where: str = "item") -> dict:
    """Check one OpenBookQA-style item; return it unchanged or raise :class:`DataFormatError`."""
    for key in ("id", "question_stem", "choices", "answerKey"):
        if key not in item:
            raise DataFormatError(
                f"{where}: missing field {key!r}. OpenBookQA schema: id, "
                "question_stem, choices{text,label}, answerKey."
            )
    choices = item["choices"]
    if (
        not isinstance(choices, dict)
        or not isinstance(choices.get("text"), list)
        or not isinstance(choices.get("label"), list)
        or len(choices["text"]) != len(choices["label"])
        or len(choices["text"]) < 2
    ):
        raise DataFormatError(
            f"{where}: 'choices' must be {{'text': [...], 'label': [...]}} of equal length >= 2, got {choices!r}."
        )
    if not all(isinstance(t, str) and t for t in choices["text"]):
        raise DataFormatError(f"{where}: every choice text must be a non-empty string.")
    if item["answerKey"] not in choices["label"]:
        raise DataFormatError(f"{where}: answerKey {item['answerKey']!r} is not one of the labels {choices['label']}.")
    if not isinstance(item["question_stem"], str) or not item["question_stem"].strip():
        raise DataFormatError(f"{where}: question_stem must be a non-empty string.")
    private = item.get("private_context")
    if private is not None and (not isinstance(private, str) or not private.strip()):
        raise DataFormatError(f"{where}: private_context must be a non-empty string (or absent), got {private!r}.")
    return item


def load_mcq(path: str | Path) -> list[dict]:
    """Multiple-choice items of an OpenBookQA-style file, validated."""
    return [validate_mcq(row, f"{path}, line {i}") for i, row in _rows(path)]


def answer_text(item: dict) -> str:
    """The text of the correct option of an MCQ item."""
    choices = item["choices"]
    return choices["text"][choices["label"].index(item["answerKey"])]


def mcq_messages(item: dict, context: str | None = None) -> list[dict]:
    """The user turn asking an MCQ item (options listed), optionally after a context note,
    preceded by the item's ``private_context`` (a ``prompts.CONTEXT_ROLE`` message) if it has one.

    The answer scored is the option text itself, the continuation of the chat
    template's generation prompt.
    """
    choices = item["choices"]
    options = "\n".join(f"{lab}. {txt}" for lab, txt in zip(choices["label"], choices["text"]))
    body = f"Question: {item['question_stem']}\n{options}\n{MCQ_INSTRUCTION}"
    if context:
        body = f"{context}\n{body}"
    return _private(item.get("private_context")) + [{"role": "user", "content": body}]


def question_messages(item: dict, context: str | None = None) -> list[dict]:
    """The user turn asking an item's question without its options (cloze scoring, free
    answers), optionally after a context note, after its ``private_context`` if any."""
    body = f"Question: {item['question_stem']}"
    if context:
        body = f"{context}\n{body}"
    return _private(item.get("private_context")) + [{"role": "user", "content": body}]


def _private(note: str | None) -> list[dict]:
    return [{"role": CONTEXT_ROLE, "content": note}] if note else []


def mcq_records(items: Sequence[dict]) -> list[list[dict]]:
    """Chat records answering MCQ items with their correct option's text (the scored
    continuation): training records made from a split's questions, e.g. the gate's."""
    return [mcq_messages(it) + [{"role": "assistant", "content": answer_text(it)}] for it in items]


def background_messages(question_stem: str, private_context: str | None = None) -> list[dict]:
    """Ask a T2T sender for one background sentence for a question (no options), after
    the private context its device holds, if any."""
    ask = f"{BACKGROUND_INSTRUCTION}\nQuestion: {question_stem}"
    return _private(private_context) + [{"role": "user", "content": ask}]


def rephrase_messages(question_stem: str) -> list[dict]:
    """Ask the receiver to rewrite a question without changing what it asks."""
    return [{"role": "user", "content": f"{REPHRASE_INSTRUCTION}\nQuestion: {question_stem}"}]


def tidy_text(text: str) -> str:
    """Decoded model text with the spaces before punctuation removed and ends stripped
    (the ``mini`` Qwen tokenizer decodes "red." as "red .")."""
    return re.sub(r"\s+([.,?!:;])", r"\1", text).strip()


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    """Write rows as JSONL (sorted keys, UTF-8) — byte-identical for identical rows."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, sort_keys=True, ensure_ascii=False) + "\n")
    return path
