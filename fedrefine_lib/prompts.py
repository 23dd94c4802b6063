"""Prompts: chats, rendering them with a model's chat template, padding token rows, and
splitting a chat record into its prompt and the answer tokens to learn.

A chat may carry **private context**: messages of role :data:`CONTEXT_ROLE` (notes, a
document, its user's records) that only the device holding them reads. The model on that
device renders :func:`holder_view` (the context as a note before the next user turn); every
other model renders :func:`shared_view` (the context dropped). :func:`render` refuses a chat
that still holds context messages, so no path can send or drop them silently.

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
CONTEXT_ROLE = "context"
"""Role of a message only its device holds (see the module docstring)."""


def context_note(texts: list[str]) -> str:
    """One context note from several texts (private context, T2T senders' texts or the oracle's fact)."""
    body = " ".join(t.strip() for t in texts if t and t.strip())
    return f"Note: {body}"


def has_context(messages: Messages) -> bool:
    """Whether a chat holds private context messages."""
    return any(m.get("role") == CONTEXT_ROLE for m in messages)


def shared_view(messages: Messages) -> Messages:
    """The chat as a device that does not hold its private context sees it: context dropped."""
    return [m for m in messages if m.get("role") != CONTEXT_ROLE]


def holder_view(messages: Messages) -> Messages:
    """The chat as the device holding its private context reads it: each run of context
    messages becomes one :func:`context_note` at the start of the next user turn."""
    out: Messages = []
    pending: list[str] = []
    for m in messages:
        if m.get("role") == CONTEXT_ROLE:
            pending.append(m["content"])
            continue
        if pending and m.get("role") == "user":
            m = {**m, "content": f"{context_note(pending)}\n{m['content']}"}
            pending = []
        elif pending:
            raise ValueError(f"A {CONTEXT_ROLE!r} message must be followed by a user turn; got {m.get('role')!r}.")
        out.append(m)
    if pending:
        raise ValueError(f"A {CONTEXT_ROLE!r} message must be followed by a user turn; the chat ends after it.")
    return out


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
    if has_context(messages):
        raise ValueError(
            f"The chat holds {CONTEXT_ROLE!r} messages (private context): render prompts.holder_view(chat) on the "
            "device that holds them, prompts.shared_view(chat) on any other."
        )
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"Tokenizer {type(tokenizer).__name__} has no chat template; set "
            "`tokenizer.chat_template` (models.load_model does this for base models)."
        )
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    segments = _marked_segments(tokenizer, messages, text, add_generation_prompt)
    if segments is None:  # the template does not insert content verbatim: search for it in order
        segments = _found_segments(text, [m["content"] for m in messages])
    if assistant_prefix:
        lead = len(assistant_prefix) - len(assistant_prefix.lstrip())
        start = len(text) + lead
        segments.append((start, start + len(assistant_prefix.strip())))
        text += assistant_prefix
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return Rendered(text, segments, list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]])


_MARK = "\ue000fedrefine-content-{}\ue001"  # private-use characters: never in a template or a message


def _marked_segments(
    tokenizer, messages: Messages, text: str, add_generation_prompt: bool
) -> list[tuple[int, int]] | None:
    """Each message's stripped content span in ``text``, located by rendering the chat again
    with a unique marker in place of each content: the template text around the contents is
    then known, so a short message that also occurs in the template (``"user"``, ``"a"``) is
    found where the template put it, not at its first occurrence. None when the template does
    not insert each content once and verbatim (raw or stripped)."""
    marks = [_MARK.format(i) for i in range(len(messages))]
    try:
        marked = tokenizer.apply_chat_template(
            [{**m, "content": k} for m, k in zip(messages, marks)],
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )
    except Exception:  # a template that inspects its content; fall back to searching
        return None
    if not isinstance(marked, str) or any(marked.count(k) != 1 for k in marks):
        return None
    pieces, rest = [], marked  # template text before each content, then after the last
    for k in marks:
        head, _, rest = rest.partition(k)
        pieces.append(head)
    pieces.append(rest)
    if not text.startswith(pieces[0]):
        return None
    segments, pos = [], len(pieces[0])
    for i, m in enumerate(messages):
        content, after = m["content"], pieces[i + 1]
        for shown in dict.fromkeys((content, content.strip())):  # as given, or stripped by the template
            end = pos + len(shown)
            last = i == len(messages) - 1
            if (
                text.startswith(shown, pos)
                and text.startswith(after, end)
                and (not last or end + len(after) == len(text))
            ):
                start = pos + len(shown) - len(shown.lstrip())
                segments.append((start, start + len(content.strip())))
                pos = end + len(after)
                break
        else:
            return None
    return segments if pos == len(text) else None  # (no messages: the whole text is template)


def _found_segments(text: str, contents: list[str]) -> list[tuple[int, int]]:
    """Each stripped content's span in ``text``, searched for in order (templates that
    rewrite around their content; a content must still appear verbatim)."""
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
    return segments


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
    """Prompt messages (all but the final assistant turn, private context kept) and the
    answer's token ids.

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
    full = tokenizer.apply_chat_template(shared_view(record), tokenize=False)
    head = tokenizer.apply_chat_template(shared_view(prompt), tokenize=False, add_generation_prompt=True)
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
