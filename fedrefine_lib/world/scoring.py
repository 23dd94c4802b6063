"""Small scoring helpers used while building the world (early stopping, measurement).

``option_loglik_accuracy`` scores MCQ items by the summed log-likelihood of each
option's text after the chat-template prompt (lm-evaluation-harness style); it is the
world's private stand-in for ``fedrefine_lib.evaluate.score_mcq`` so the build does
not depend on it. ``generate_answers`` greedily decodes chat answers in batches.
"""

from __future__ import annotations

import torch

from ..data import mcq_messages, tidy_text


def _prompt_ids(tok, messages: list[dict]) -> list[int]:
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tok(prompt, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def continuation_logliks(
    model, pad_id: int, pairs: list[tuple[list[int], list[int]]], batch_size: int = 64
) -> list[float]:
    """Summed log-probability of each continuation after its prefix (right-padded batches)."""
    scores: list[float] = []
    model.eval()
    for start in range(0, len(pairs), batch_size):
        chunk = [(p + c, len(c)) for p, c in pairs[start : start + batch_size]]
        width = max(len(s) for s, _ in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, (s, _) in enumerate(chunk):
            ids[r, : len(s)] = torch.tensor(s)
            mask[r, : len(s)] = 1
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
        for r, (s, n) in enumerate(chunk):
            pos = torch.arange(len(s) - n, len(s))
            scores.append(float(logp[r, pos - 1, torch.tensor(s[-n:])].sum()))
    return scores


def option_logliks(
    model, tok, items: list[dict], contexts: list[str | None] | None = None, batch_size: int = 64
) -> list[list[float]]:
    """Summed log-probability of every option of every item; ``(n_items, n_options)``."""
    contexts = contexts or [None] * len(items)
    pairs = []
    for item, ctx in zip(items, contexts):
        p_ids = _prompt_ids(tok, mcq_messages(item, ctx))
        pairs += [(p_ids, tok(t, add_special_tokens=False)["input_ids"]) for t in item["choices"]["text"]]
    scores = continuation_logliks(model, tok.pad_token_id, pairs, batch_size)
    out, k = [], 0
    for item in items:
        n = len(item["choices"]["text"])
        out.append(scores[k : k + n])
        k += n
    return out


def option_loglik_accuracy(model, tok, items: list[dict], contexts=None, batch_size: int = 64) -> float:
    """Share of items whose correct option has the highest log-likelihood."""
    if not items:
        return float("nan")
    lls = option_logliks(model, tok, items, contexts, batch_size)
    hits = [
        it["choices"]["label"][max(range(len(ll)), key=ll.__getitem__)] == it["answerKey"] for it, ll in zip(items, lls)
    ]
    return sum(hits) / len(hits)


@torch.no_grad()
def generate_answers(
    model, tok, conversations: list[list[dict]], max_new_tokens: int = 24, batch_size: int = 64
) -> list[str]:
    """Greedy assistant answers (decoded, :func:`~fedrefine_lib.data.tidy_text`) for
    single-turn conversations."""
    eot = tok.convert_tokens_to_ids(tok.eos_token)
    model.eval()
    out: list[str] = []
    for start in range(0, len(conversations), batch_size):
        prompts = [_prompt_ids(tok, c) for c in conversations[start : start + batch_size]]
        width = max(map(len, prompts))
        ids = torch.full((len(prompts), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, p in enumerate(prompts):  # left padding
            ids[r, width - len(p) :] = torch.tensor(p)
            mask[r, width - len(p) :] = 1
        gen = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eot,
            pad_token_id=tok.pad_token_id,
        )
        for row in gen[:, width:].tolist():
            if eot in row:
                row = row[: row.index(eot)]
            out.append(tidy_text(tok.decode(row, skip_special_tokens=True)))
    return out
