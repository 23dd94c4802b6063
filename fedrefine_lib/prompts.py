"""Prompts: chats, rendering them with a model's chat template, padding token rows, and
splitting a chat record into its prompt and the answer tokens to learn.

Shapes: a batch of ``B`` prompts gives ``[B, T]`` ids and masks, left padded (prompts) or
right padded (continuations and answers).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Messages = list[dict[str, str]]
"""One chat: ``[{"role": ..., "content": ...}, ...]``."""
Record = list[dict[str, str]]
"""A chat record: messages ending with the assistant turn to learn."""


@dataclass
class Rendered:
    """One prompt rendered with one tokenizer's chat template.

    Attributes:
        text: the rendered prompt string.
        segments: per message (and the assistant prefix, if any), the ``(start, end)``
            character span of its stripped content inside ``text``. Everything outside
            the segments is template.
        ids: token ids of ``text`` (no extra special tokens: the template carries its own).
        offsets: per token, its ``(start, end)`` character span in ``text``.
    """

    text: str
    segments: list[tuple[int, int]]
    ids: list[int]
    offsets: list[tuple[int, int]]


def render(
    tokenizer, messages: Messages, assistant_prefix: str | None = None, add_generation_prompt: bool = True
) -> Rendered:
    """Apply ``tokenizer``'s chat template to ``messages`` and tokenize the result.

    Args:
        assistant_prefix: text appended after the generation prompt (e.g. ``"The correct
            answer is"``); part of the prompt, treated as content.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"Tokenizer {type(tokenizer).__name__} has no chat template; set "
            "`tokenizer.chat_template` (models.load_model does this for base models)."
        )
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    contents = [m["content"] for m in messages]
    if assistant_prefix:
        text += assistant_prefix
        contents.append(assistant_prefix)
    segments, cursor = [], 0
    for i, content in enumerate(contents):
        needle = content.strip()
        start = text.find(needle, cursor)
        if start < 0:
            raise ValueError(
                f"Message {i} ({needle[:40]!r}...) does not appear verbatim in the text the chat "
                "template rendered; the template rewrites content, which token alignment cannot follow."
            )
        segments.append((start, start + len(needle)))
        cursor = start + len(needle)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return Rendered(text, segments, list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]])


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token rows. Returns ids and mask, both ``[B, max_len]`` (long)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        if r:
            ids[b, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[b, width - len(r) :] = 1
    return ids, mask


def right_pad(rows: list[list[int]], device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token rows (continuations, answers). Returns ids and mask ``[B, max_len]``."""
    width = max(len(r) for r in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[b, : len(r)] = 1
    return ids.to(device), mask.to(device)


def pad_id(tokenizer) -> int:
    pid = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pid is None:
        raise ValueError("Tokenizer has neither a pad nor an eos token; set `tokenizer.pad_token`.")
    return pid


def encode_prompts(
    tokenizer, messages_batch: list[Messages], assistant_prefix: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Render and tokenize a batch of prompts with one model's template.

    Returns:
        ``input_ids`` and ``attention_mask``, ``[B, T]``, left padded.
    """
    rows = [render(tokenizer, m, assistant_prefix).ids for m in messages_batch]
    return left_pad(rows, pad_id(tokenizer))


# ------------------------------------------------------------------------ records


def split_record(tokenizer, record: Record, stop_ids: set[int] | None = None) -> tuple[Messages, list[int]]:
    """Prompt messages (all but the final assistant turn) and the answer's token ids.

    The answer is what the receiver's template renders after the generation prompt (the
    content plus its end-of-turn token), tokenized on its own like an MCQ option. Anything
    the template puts *after* the end-of-turn token (e.g. Qwen's trailing newline) is cut:
    a model never predicts past its stop token, and that one unpredictable token would
    otherwise dominate the loss.

    Args:
        stop_ids: end-of-turn ids (default: the tokenizer's eos); see
            ``decode.stop_token_ids``.
    """
    if not record or record[-1].get("role") != "assistant":
        raise ValueError(
            f"A training record must end with an assistant turn; got roles {[m.get('role') for m in record]}."
        )
    prompt = record[:-1]
    full = tokenizer.apply_chat_template(record, tokenize=False)
    head = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    answer = full[len(head) :] if full.startswith(head) else record[-1]["content"] + (tokenizer.eos_token or "")
    ids = list(tokenizer(answer, add_special_tokens=False)["input_ids"])
    if stop_ids is None:
        stop_ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    ends = [i for i, t in enumerate(ids) if t in stop_ids]
    if ends:
        ids = ids[: ends[0] + 1]
    if not ids or ids[0] in stop_ids:
        raise ValueError("The final assistant turn is empty; nothing to learn from it.")
    return prompt, ids
