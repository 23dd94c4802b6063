"""Fuser training (DESIGN §2): both LLMs frozen, only the fuser learns.

Loss: the receiver's causal-LM loss on the final assistant turn of each chat record,
continuing from the fused prompt cache exactly as at inference (prefill fusion; the last
prompt token and the answer tokens use the receiver's own KV). The Gumbel-gate temperature
is annealed exponentially per step. Runs through Accelerate, so the same code trains on
CPU, one GPU or several (records are sharded across processes).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fedrefine_lib.align import Messages, right_pad
from fedrefine_lib.federation import C2C, Prefill, PromptCaches, continue_prefill, stop_token_ids

Record = list[dict[str, str]]
"""A chat record: messages ending with the assistant turn to learn."""


@dataclass
class TrainConfig:
    """Fuser training settings (defaults: the reference C2C recipe).

    Attributes:
        lr, weight_decay: AdamW (reference 1e-4, 0.01; tiny fusers train well at ~1e-3).
        warmup_ratio: linear warm-up fraction of the steps, then linear decay to 0.
        grad_clip: max global gradient norm.
        epochs, batch_size, max_steps: schedule (``max_steps`` caps the total).
        seed: seeds record order, Gumbel noise and dropout.
        tau_start, tau_end: Gumbel-gate temperature, annealed exponentially per step.
        cache_prompts: compute each batch's sender/receiver prompt caches once and reuse
            them across epochs (the LLMs are frozen; costs memory).
        cpu: force CPU even when a GPU is present.
        mixed_precision: Accelerate's setting for the fuser ("no", "bf16", "fp16");
            the fuser's master weights stay fp32 either way.
        loss_curve_path: where to write the loss curve JSON (None: do not write).
        progress: show a tqdm bar.
    """

    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    grad_clip: float = 1.0
    epochs: int = 1
    batch_size: int = 8
    max_steps: int | None = None
    seed: int = 42
    tau_start: float = 1.0
    tau_end: float = 0.001
    cache_prompts: bool = False
    cpu: bool = False
    mixed_precision: str = "no"
    loss_curve_path: str | None = None
    progress: bool = True

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, settings: dict[str, Any], **overrides: Any) -> "TrainConfig":
        """A config from a profile's ``train:`` block (unknown keys are an error)."""
        values = {**settings, **overrides}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Unknown TrainConfig settings {unknown}; valid names: {sorted(known)}.")
        return cls(**values)


@dataclass
class TrainResult:
    """Loss per optimizer step, the config used, and the final gate logits ``[layers, 2]``."""

    losses: list[float]
    config: dict[str, Any]
    steps: int
    seconds: float
    gate_logits: list[list[float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path


# --------------------------------------------------------------------------- targets


def split_record(tokenizer, record: Record, stop_ids: set[int] | None = None) -> tuple[Messages, list[int]]:
    """Prompt messages (all but the final assistant turn) and the answer's token ids.

    The answer is what the receiver's template renders after the generation prompt (the
    content plus its end-of-turn token), tokenized on its own like an MCQ option. Anything
    the template puts *after* the end-of-turn token (e.g. Qwen's trailing newline) is cut:
    a model never predicts past its stop token, and that one unpredictable token would
    otherwise dominate the loss.

    Args:
        stop_ids: end-of-turn ids (default: the tokenizer's eos); see
            ``federation.stop_token_ids``.
    """
    if not record or record[-1].get("role") != "assistant":
        raise ValueError(f"A training record must end with an assistant turn; got roles {[m.get('role') for m in record]}.")
    prompt = record[:-1]
    full = tokenizer.apply_chat_template(record, tokenize=False)
    head = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    answer = full[len(head):] if full.startswith(head) else record[-1]["content"] + (tokenizer.eos_token or "")
    ids = list(tokenizer(answer, add_special_tokens=False)["input_ids"])
    if stop_ids is None:
        stop_ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    ends = [i for i, t in enumerate(ids) if t in stop_ids]
    if ends:
        ids = ids[: ends[0] + 1]
    if not ids or ids[0] in stop_ids:
        raise ValueError("The final assistant turn is empty; nothing to learn from it.")
    return prompt, ids


def answer_loss(model: torch.nn.Module, prefill: Prefill, answer_ids: torch.Tensor, answer_mask: torch.Tensor,
                reduction: str = "mean") -> torch.Tensor:
    """Causal-LM loss of the answer tokens continuing ``prefill``.

    Args:
        answer_ids, answer_mask: ``[B, L]``, right padded.
        reduction: ``"mean"`` over real answer tokens, or ``"sum"``.
    """
    logits = continue_prefill(model, prefill, answer_ids, answer_mask)[:, :-1]  # [B, L, V]
    nll = F.cross_entropy(logits.float().flatten(0, 1), answer_ids.flatten(), reduction="none")
    total = (nll * answer_mask.flatten().to(nll)).sum()
    return total / answer_mask.sum() if reduction == "mean" else total


@torch.no_grad()
def lm_loss(engine, records: Sequence[Record], batch_size: int = 8) -> float:
    """Mean per-token loss of the final assistant turns with ``engine``'s prompt caches
    (e.g. held-out loss of ``Standalone`` vs ``C2C``)."""
    tok, model = engine.receiver.tokenizer, engine.receiver.model
    stops = stop_token_ids(engine.receiver)
    total, count = 0.0, 0
    for i in range(0, len(records), batch_size):
        prompts, answers = zip(*(split_record(tok, r, stops) for r in records[i : i + batch_size]))
        pre = engine.prefill(list(prompts))
        ids, mask = right_pad(list(answers), pre.input_ids.device)
        total += answer_loss(model, pre, ids, mask, reduction="sum").item()
        count += int(mask.sum())
    return total / count


# -------------------------------------------------------------------------- training


def temperature(step: int, total: int, start: float, end: float) -> float:
    """Exponential annealing: ``start`` at step 0, ``end`` at the last step."""
    if total <= 1:
        return start
    return start * (end / start) ** (step / (total - 1))


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Eval mode and ``requires_grad=False`` on every parameter."""
    model.eval()
    model.requires_grad_(False)
    return model


def train_fuser(receiver, sender, fuser: torch.nn.Module, records: Sequence[Record],
                config: TrainConfig | None = None, aligner: str | None = None) -> TrainResult:
    """Train ``fuser`` (in place) so ``receiver`` answers better with ``sender``'s cache.

    Args:
        receiver, sender: ``models.LoadedModel``; frozen here (eval, no gradients).
        fuser: a ``C2CFuser`` for this pair; trained in fp32, left in eval mode.
        records: chat records ending with the assistant turn to learn.
        aligner: token aligner (default: the one in the fuser's config).
    Returns:
        the loss per step and the config used (also written to ``config.loss_curve_path``).
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import get_linear_schedule_with_warmup

    config = config or TrainConfig()
    if not records:
        raise ValueError("No training records.")
    accelerator = Accelerator(cpu=config.cpu, mixed_precision=config.mixed_precision)
    set_seed(config.seed)
    for m in (receiver, sender):
        freeze(m.model).to(accelerator.device)
    fuser.float().to(accelerator.device).train()

    # Fixed batches (seeded), reshuffled in order every epoch, sharded across processes.
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(config.seed)).tolist()
    batches = [order[i : i + config.batch_size] for i in range(0, len(order), config.batch_size)]
    n_proc, rank = accelerator.num_processes, accelerator.process_index
    per_proc = len(batches) // n_proc if n_proc > 1 else len(batches)
    if per_proc == 0:
        raise ValueError(f"{len(batches)} batches cannot be shared among {n_proc} processes; lower batch_size.")
    total = per_proc * config.epochs
    if config.max_steps is not None:
        total = min(total, config.max_steps)

    optimizer = torch.optim.AdamW(fuser.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(config.warmup_ratio * total), total)
    wrapped, optimizer = accelerator.prepare(fuser, optimizer)
    # A fuser may bring its own engine (e.g. concat fusers); plain C2C otherwise.
    make_engine = getattr(getattr(wrapped, "module", wrapped), "make_engine", None)
    engine = make_engine(receiver, sender, wrapped, aligner) if make_engine else C2C(receiver, sender, wrapped, aligner=aligner)
    tok, stops = receiver.tokenizer, stop_token_ids(receiver)

    cached: dict[int, tuple[PromptCaches, torch.Tensor, torch.Tensor]] = {}
    losses: list[float] = []
    step, start = 0, time.perf_counter()
    bar = tqdm(total=total, desc="fuser training", disable=not (config.progress and accelerator.is_main_process))
    epoch_gen = torch.Generator().manual_seed(config.seed + 1)
    while step < total:
        epoch_batches = torch.randperm(len(batches), generator=epoch_gen).tolist()
        mine = [epoch_batches[i] for i in range(rank, per_proc * n_proc, n_proc)]
        for b in mine:
            if step >= total:
                break
            if b in cached:
                caches, ans_ids, ans_mask = cached[b]
            else:
                prompts, answers = zip(*(split_record(tok, records[i], stops) for i in batches[b]))
                caches = engine.prompt_caches(list(prompts))
                ans_ids, ans_mask = right_pad(list(answers), accelerator.device)
                if config.cache_prompts:
                    cached[b] = (caches, ans_ids, ans_mask)
            fuser.temperature = temperature(step, total, config.tau_start, config.tau_end)
            with accelerator.autocast():
                loss = answer_loss(receiver.model, engine.fuse(caches), ans_ids, ans_mask)
            accelerator.backward(loss)
            if config.grad_clip:
                accelerator.clip_grad_norm_(wrapped.parameters(), config.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            value = accelerator.gather(loss.detach()[None]).mean().item()
            losses.append(value)
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{value:.3f}", tau=f"{fuser.temperature:.3g}", refresh=False)  # redraws follow mininterval
    bar.close()
    fuser.eval()
    result = TrainResult(losses, config.to_dict(), step, time.perf_counter() - start,
                         fuser.gate_logits.detach().cpu().tolist())
    if config.loss_curve_path and accelerator.is_main_process:
        result.save(config.loss_curve_path)
    return result
