"""Training (DESIGN §2): the LLMs frozen, only a fuser or a gate learns, in one loop (and,
as a control, the receiver itself fine-tuned on the same records).

:func:`fit` is the loop: AdamW, linear warm-up then decay, gradient clipping, seeded batch
order reshuffled every epoch, through Accelerate, so the same code trains on CPU, one GPU or
several (batches are sharded across processes). It serves:

- :func:`train_fuser`: the receiver's causal-LM loss on the final assistant turn of each chat
  record, continuing from the fused prompt cache exactly as at inference (prefill fusion;
  the last prompt token and the answer tokens use the receiver's own KV); the Gumbel-gate
  temperature is annealed exponentially per step;
- ``gate_training``: a gate's source weights by the same answer loss, or a router gate on
  which source serves each validation question best.

Shapes: ``B`` records per batch, answers ``[B, L]`` right padded, ``J`` senders.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from fedrefine_lib.decode import stop_token_ids
from fedrefine_lib.engine import Prefill, continue_prefill
from fedrefine_lib.federation import C2C, Caches
from fedrefine_lib.fuser import Fuser
from fedrefine_lib.prompts import Record, encode_prompts, right_pad, shared_view, split_record


@dataclass
class TrainConfig:
    """Training settings for fusers and gates (defaults: the reference C2C recipe).

    Attributes:
        lr, weight_decay: AdamW (reference 1e-4, 0.01; tiny fusers train well at ~1e-3).
        warmup_ratio: linear warm-up fraction of the steps, then linear decay to 0.
        grad_clip: max global gradient norm.
        epochs, batch_size, max_steps: schedule (``max_steps`` caps the total).
        max_record_tokens: leave out records whose chat rendering is longer than this many
            tokens in any of the models' tokenizers (padded batches of long records are what
            exhaust GPU memory); how many were left out is warned and kept in the result.
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
    max_record_tokens: int | None = None
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
    def from_dict(cls, settings: dict[str, Any], **overrides: Any) -> TrainConfig:
        """A config from a profile's ``train:`` block (unknown keys are an error)."""
        values = {**settings, **overrides}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Unknown TrainConfig settings {unknown}; valid names: {sorted(known)}.")
        return cls(**values)


@dataclass
class TrainResult:
    """Loss per optimizer step, the config used, steps, seconds, and (fusers) the final gate
    logits ``[layers, 2]``."""

    losses: list[float]
    config: dict[str, Any]
    steps: int
    seconds: float
    gate_logits: list[list[float]] = field(default_factory=list)
    records_dropped: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path


def within_length(records: Sequence[Record], tokenizers: Sequence, config: TrainConfig) -> tuple[list[Record], int]:
    """The records no longer than ``config.max_record_tokens`` in every tokenizer (all when it
    is None), and how many were left out (warned: nothing is dropped silently).

    Raises:
        ValueError: every record is too long (the cap, not the data, is then wrong).
    """
    cap = config.max_record_tokens
    if cap is None:
        return list(records), 0

    def length(tok, record: Record) -> int:
        text = tok.apply_chat_template(shared_view(record), tokenize=False)
        return len(tok(text, add_special_tokens=False)["input_ids"])

    kept = [r for r in records if all(length(tok, r) <= cap for tok in tokenizers)]
    dropped = len(records) - len(kept)
    if not kept:
        raise ValueError(
            f"All {len(records)} training records are longer than max_record_tokens={cap}; raise the cap "
            "(train.max_record_tokens in the profile) or use shorter records."
        )
    if dropped:
        warnings.warn(
            f"{dropped} of {len(records)} training records are longer than max_record_tokens={cap} and are "
            "left out of training (TrainResult.records_dropped).",
            stacklevel=2,
        )
    return kept, dropped


# ---------------------------------------------------------------------------- losses


def answer_loss(
    model: torch.nn.Module,
    prefill: Prefill,
    answer_ids: torch.Tensor,
    answer_mask: torch.Tensor,
    reduction: str = "mean",
) -> torch.Tensor:
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


# ------------------------------------------------------------------------------ loop


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


def batches(n: int, config: TrainConfig) -> list[list[int]]:
    """``n`` examples in fixed batches of ``config.batch_size`` (a seeded random order)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed)).tolist()
    return [order[i : i + config.batch_size] for i in range(0, n, config.batch_size)]


def fit(
    module: torch.nn.Module,
    n_batches: int,
    make_loss: Callable[[torch.nn.Module], Callable[[int], torch.Tensor]],
    config: TrainConfig,
    *,
    desc: str,
    accelerator: Accelerator | None = None,
    on_step: Callable[[int, int], dict[str, str]] | None = None,
) -> TrainResult:
    """The training loop (``module`` trained in place, left in eval mode).

    Args:
        n_batches: batches per epoch; every epoch visits them in a new seeded order, shared
            among Accelerate's processes.
        make_loss: the module as Accelerate prepared it -> ``loss(batch index)``.
        accelerator: the caller's (it placed the models on its device); None: a new one.
        on_step: ``(step, total) -> extra progress-bar fields``, called before each step
            (e.g. to set the Gumbel temperature).
    """
    accelerator = accelerator or Accelerator(cpu=config.cpu, mixed_precision=config.mixed_precision)
    set_seed(config.seed)
    n_proc, rank = accelerator.num_processes, accelerator.process_index
    per_proc = n_batches // n_proc if n_proc > 1 else n_batches
    if per_proc == 0:
        raise ValueError(f"{n_batches} batches cannot be shared among {n_proc} processes; lower batch_size.")
    total = per_proc * config.epochs
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    optimizer = torch.optim.AdamW(module.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(config.warmup_ratio * total), total)
    wrapped, optimizer = accelerator.prepare(module, optimizer)
    loss_of = make_loss(wrapped)
    losses: list[float] = []
    step, start = 0, time.perf_counter()
    bar = tqdm(total=total, desc=desc, disable=not (config.progress and accelerator.is_main_process))
    epoch_gen = torch.Generator().manual_seed(config.seed + 1)
    while step < total:
        order = torch.randperm(n_batches, generator=epoch_gen).tolist()
        for b in [order[i] for i in range(rank, per_proc * n_proc, n_proc)]:
            if step >= total:
                break
            extra = on_step(step, total) if on_step is not None else {}
            with accelerator.autocast():
                loss = loss_of(b)
            accelerator.backward(loss)
            if config.grad_clip:
                accelerator.clip_grad_norm_(wrapped.parameters(), config.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(accelerator.gather(loss.detach()[None]).mean().item())
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}", **extra, refresh=False)  # redraws follow mininterval
    bar.close()
    module.eval()
    result = TrainResult(losses, config.to_dict(), step, time.perf_counter() - start)
    if config.loss_curve_path and accelerator.is_main_process:
        result.save(config.loss_curve_path)
    return result


# ---------------------------------------------------------------------------- fusers


def train_fuser(
    receiver,
    sender,
    fuser: Fuser,
    records: Sequence[Record],
    config: TrainConfig | None = None,
    aligner: str | None = None,
) -> TrainResult:
    """Train ``fuser`` (any kind, in place) so ``receiver`` answers better with ``sender``'s cache.

    Args:
        receiver, sender: ``models.LoadedModel``; frozen here (eval, no gradients).
        fuser: a fuser for this pair; trained in fp32, left in eval mode.
        records: chat records ending with the assistant turn to learn.
        aligner: residual fusers: the token aligner (default: the one in the fuser's config).
    Returns:
        the loss per step, the config used and the final gate logits (also written to
        ``config.loss_curve_path``).
    """
    config = config or TrainConfig()
    if not records:
        raise ValueError("No training records.")
    accelerator = Accelerator(cpu=config.cpu, mixed_precision=config.mixed_precision)
    for m in (receiver, sender):
        freeze(m.model).to(accelerator.device)
    fuser.float().to(accelerator.device).train()
    records, dropped = within_length(records, [receiver.tokenizer, sender.tokenizer], config)
    fixed = batches(len(records), config)
    tok, stops = receiver.tokenizer, stop_token_ids(receiver)
    cached: dict[int, tuple[Caches, torch.Tensor, torch.Tensor]] = {}

    def make_loss(wrapped: torch.nn.Module) -> Callable[[int], torch.Tensor]:
        engine = C2C(receiver, sender, wrapped, aligner=aligner)

        def loss_of(b: int) -> torch.Tensor:
            if b in cached:
                caches, ans_ids, ans_mask = cached[b]
            else:
                prompts, answers = zip(*(split_record(tok, records[i], stops) for i in fixed[b]))
                caches = engine.prompt_caches(list(prompts))
                ans_ids, ans_mask = right_pad(list(answers), accelerator.device)
                if config.cache_prompts:
                    cached[b] = (caches, ans_ids, ans_mask)
            return answer_loss(receiver.model, engine.fuse(caches), ans_ids, ans_mask)

        return loss_of

    def anneal(step: int, total: int) -> dict[str, str]:
        fuser.temperature = temperature(step, total, config.tau_start, config.tau_end)
        return {"tau": f"{fuser.temperature:.3g}"}

    result = fit(fuser, len(fixed), make_loss, dataclasses.replace(config, loss_curve_path=None),
                 desc="fuser training", accelerator=accelerator, on_step=anneal)  # fmt: skip
    result.config = config.to_dict()
    result.gate_logits = fuser.gate_logits.detach().cpu().tolist()
    result.records_dropped = dropped
    if config.loss_curve_path and accelerator.is_main_process:
        result.save(config.loss_curve_path)
    return result


# ------------------------------------------------------------ the no-sender control


def finetune_receiver(receiver, records: Sequence[Record], config: TrainConfig | None = None, name: str | None = None):
    """The control C2C's readers ask for: a copy of ``receiver`` with every weight trained on
    the fuser-training ``records`` (the same answer loss, no sender). If it matches a fuser,
    the fuser's gain came from the records, not from the sender's cache.

    Returns:
        ``(tuned, result)``: a new ``LoadedModel`` (``receiver`` is untouched; fp32, eval
        mode, frozen after training) and the :class:`TrainResult`.
    """
    config = config or TrainConfig()
    if not records:
        raise ValueError("No training records.")
    accelerator = Accelerator(cpu=config.cpu, mixed_precision=config.mixed_precision)
    tuned = dataclasses.replace(
        receiver, name=name or f"{receiver.name}+finetuned", model=copy.deepcopy(receiver.model)
    )
    model = tuned.model.float().to(accelerator.device)
    model.requires_grad_(True)
    model.train()
    records, dropped = within_length(records, [receiver.tokenizer], config)
    fixed = batches(len(records), config)
    tok, stops = receiver.tokenizer, stop_token_ids(receiver)

    def make_loss(wrapped: torch.nn.Module) -> Callable[[int], torch.Tensor]:
        def loss_of(b: int) -> torch.Tensor:
            prompts, answers = zip(*(split_record(tok, records[i], stops) for i in fixed[b]))
            ids, mask = encode_prompts(tok, [shared_view(m) for m in prompts])  # [B, T], left padded; no sender context
            ans_ids, ans_mask = right_pad(list(answers), ids.device)  # [B, L]
            full, full_mask = torch.cat([ids, ans_ids], 1), torch.cat([mask, ans_mask.to(mask)], 1)
            positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
            logits = wrapped(input_ids=full, attention_mask=full_mask, position_ids=positions).logits
            logits = logits[:, ids.shape[1] - 1 : -1]  # [B, L, V]: predicts each answer token
            nll = F.cross_entropy(logits.float().flatten(0, 1), ans_ids.flatten(), reduction="none")
            return (nll * ans_mask.flatten().to(nll)).sum() / ans_mask.sum()

        return loss_of

    result = fit(model, len(fixed), make_loss, config, desc="receiver fine-tuning", accelerator=accelerator)
    result.records_dropped = dropped
    freeze(model)
    return tuned, result
