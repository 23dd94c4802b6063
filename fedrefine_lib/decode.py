"""Greedy decoding from any engine's prompt cache, batched with left padding, and the
stop tokens that end a turn."""

from __future__ import annotations

import torch

from fedrefine_lib import kv as kvlib
from fedrefine_lib.engine import Engine
from fedrefine_lib.prompts import Messages
from fedrefine_lib.trace import Trace

END_OF_TURN_TOKENS = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>", "<|end|>")
"""End-of-turn tokens of common chat templates (Gemma, Qwen/ChatML, Llama 3, Phi): a stop
wherever the tokenizer has them as special tokens, even when its eos is another token."""


def stop_token_ids(receiver) -> set[int]:
    """End-of-turn ids: the tokenizer's eos, the generation config's eos ids and any of
    :data:`END_OF_TURN_TOKENS` among the tokenizer's special tokens."""
    tok = receiver.tokenizer
    special = set(getattr(tok, "all_special_tokens", []) or []) | {
        str(t) for t in (getattr(tok, "added_tokens_decoder", None) or {}).values() if getattr(t, "special", False)
    }
    ids = {tok.convert_tokens_to_ids(t) for t in END_OF_TURN_TOKENS if t in special}
    for value in (
        receiver.tokenizer.eos_token_id,
        getattr(getattr(receiver.model, "generation_config", None), "eos_token_id", None),
    ):
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(value)
    return ids


@torch.no_grad()
def generate(
    engine: Engine, messages_batch: list[Messages], max_new_tokens: int = 32, assistant_prefix: str | None = None
) -> tuple[list[str], Trace]:
    """Greedy decoding from the engine's prompt cache; batched with left padding.

    Returns:
        the generated texts (up to the first end-of-turn token, special tokens dropped)
        and the trace (the engine's prefill stages plus ``decode``).
    """
    rows, trace = generate_ids(engine, messages_batch, max_new_tokens, assistant_prefix)
    tok = engine.receiver.tokenizer
    return [tok.decode(row, skip_special_tokens=True) for row in rows], trace


@torch.no_grad()
def generate_ids(
    engine: Engine, messages_batch: list[Messages], max_new_tokens: int = 32, assistant_prefix: str | None = None
) -> tuple[list[list[int]], Trace]:
    """Greedy decoding like :func:`generate`, returning token ids.

    Returns:
        per prompt, the generated ids up to (not including) the first end-of-turn token,
        and the trace; ``trace.tokens["generated"]`` is the total of those ids.
    """
    receiver = engine.receiver
    model, tok = receiver.model, receiver.tokenizer
    pre = engine.prefill(messages_batch, assistant_prefix)
    trace = Trace().add(pre.trace)
    stops = torch.tensor(sorted(stop_token_ids(receiver)), dtype=torch.long, device=pre.input_ids.device)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    B = pre.input_ids.shape[0]
    done = torch.zeros(B, dtype=torch.bool, device=pre.input_ids.device)
    generated: list[torch.Tensor] = []
    with trace.time("decode"):
        cache = pre.cache.to_cache(model.config)
        step_ids, mask = pre.input_ids[:, -1:], pre.full_mask
        for _ in range(max_new_tokens):
            logits, cache = kvlib.forward(model, step_ids, mask, cache, pre.prefix_mask, pre.cache_bias)
            nxt = logits[:, -1].argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            generated.append(nxt)
            done |= torch.isin(nxt, stops)
            if bool(done.all()):
                break
            step_ids = nxt[:, None]
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    rows = torch.stack(generated, 1).tolist() if generated else [[] for _ in range(B)]
    stop_set = set(stops.tolist())
    out = [row[: next((i for i, t in enumerate(row) if t in stop_set), len(row))] for row in rows]
    trace.tokens["generated"] = sum(len(r) for r in out)
    return out, trace
