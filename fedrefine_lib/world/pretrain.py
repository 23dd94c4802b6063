"""Pretraining one ``mini`` model from scratch, with early stopping.

Run in a worker process (one torch thread) by :func:`pretrain_model`; everything is
rebuilt from ``(seed, config)`` so the result is bit-for-bit reproducible and the
worker needs only picklable arguments.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from transformers import AutoTokenizer

from ..data import context_note, rephrase_messages
from .config import WorldConfig
from .corpus import pretraining_examples
from .encoding import batches, encode
from .knowledge import make_knowledge
from .models import mini_models
from .records import mcq_items
from .scoring import continuation_logliks, generate_answers, option_loglik_accuracy
from .templates import rephrase_check, split_private, statement
from .tokenization import FAMILIES


def model_seed(seed: int, name: str) -> int:
    """A per-model torch seed derived from the world seed (stable across runs)."""
    return random.Random(f"init-{seed}-{name}").randrange(2**31)


def cloze_accuracy(model, tok, family: str, items: list[dict]) -> float:
    """Share of items whose correct option is the likeliest completion of the plain
    statement "The <relation> of <entity> is" (memorisation, independent of chat format)."""
    fam = FAMILIES[family]
    start = [tok.convert_tokens_to_ids(fam.doc_start)] if fam.doc_start else []
    pairs = []
    for it in items:
        prefix = start + tok(f"The {it['relation']} of {it['entity']} is", add_special_tokens=False)["input_ids"]
        pairs += [(prefix, tok(t, add_special_tokens=False)["input_ids"]) for t in it["choices"]["text"]]
    scores = continuation_logliks(model, tok.pad_token_id, pairs)
    hits = 0
    for i, it in enumerate(items):
        ll = scores[4 * i : 4 * i + 4]
        hits += it["choices"]["label"][ll.index(max(ll))] == it["answerKey"]
    return hits / max(1, len(items))


def rephrase_fidelity(model, tok, stems: list[str]) -> float:
    """Share of greedy rephrasings that keep entity and relation and drop the private prefix."""
    rewrites = generate_answers(model, tok, [rephrase_messages(s) for s in stems], max_new_tokens=20)
    checks = [rephrase_check(s, r) for s, r in zip(stems, rewrites)]
    return sum(f and d for f, d, _ in checks) / max(1, len(checks))


def _decay_groups(model: torch.nn.Module, name: str, cfg: WorldConfig) -> list[dict]:
    """AdamW parameter groups of model ``name``: every parameter decays at ``cfg.weight_decay``,
    or, for a model in ``cfg.spare_vectors``, only those of two or more dimensions."""
    params = [p for p in model.parameters() if p.requires_grad]
    if name not in cfg.spare_vectors:
        return [{"params": params, "weight_decay": cfg.weight_decay}]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def _as_loaded_from(out_dir: str, model, family_tok):
    """Save config and tokenizer to ``out_dir`` and return the tokenizer exactly as
    ``AutoTokenizer.from_pretrained(out_dir)`` gives it (transformers picks the class
    from the model type, e.g. ``Qwen2Tokenizer`` for ``qwen2``), after checking that it
    encodes like the family tokenizer — so training and every later user agree."""
    out = Path(out_dir)
    model.config.save_pretrained(out)
    family_tok.save_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    probe = (
        family_tok.apply_chat_template(
            [{"role": "user", "content": "Question: What is it?"}], tokenize=False, add_generation_prompt=True
        )
        + "red. The x."
    )
    if tok(probe, add_special_tokens=False)["input_ids"] != family_tok(probe, add_special_tokens=False)["input_ids"]:
        raise RuntimeError(
            f"AutoTokenizer loads {type(tok).__name__} from {out}, which encodes differently "
            f"from the trained {type(family_tok).__name__}; fix tokenization.train_tokenizer."
        )
    return tok


def pretrain_model(
    name: str,
    seed: int,
    config: dict,
    tokenizer_dir: str,
    out_dir: str,
    position: int = 0,
    progress: bool = True,
    threads: int = 1,
) -> dict:
    """Pretrain model ``name`` and save it (safetensors) with its tokenizer to ``out_dir``.

    The weights checked and saved are the moving average of the trained ones
    (``config.ema_decay``); the learning rate is scaled by ``config.phase2_lr_scale`` from
    the step phase 2 begins. Training ends early once the stop criteria hold; a model
    that runs out of steps, or of patience (``config.patience`` checks without a better
    one; ``config.target_patience`` for a model with a note or rephrasing target), instead
    keeps the weights of its best phase-2 check (``restored_step``).

    Returns:
        a log dict: steps, wall seconds, early-stop accuracies, history.
    """
    from tqdm.auto import tqdm

    torch.set_num_threads(threads)
    cfg = WorldConfig.from_dict(config)
    spec = mini_models(cfg.model_scale)[name]
    fam = FAMILIES[spec.tokenizer]
    family_tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    knowledge = make_knowledge(seed, cfg.entities, cfg.users)
    torch.manual_seed(model_seed(seed, name))
    model = spec.build(
        len(family_tok),
        family_tok.pad_token_id,
        family_tok.convert_tokens_to_ids(fam.end_of_turn),
        family_tok.convert_tokens_to_ids(fam.bos) if fam.bos else None,
        name in cfg.tied,
    )
    tok = _as_loaded_from(out_dir, model, family_tok)
    opt = torch.optim.AdamW(
        _decay_groups(model, name, cfg), lr=cfg.lr_overrides.get(name, cfg.lr), betas=(0.9, cfg.beta2)
    )
    phase1_step: int | None = None if cfg.phase0_cloze > 0 else 0
    phase2_step: int | None = None

    def lr_factor(s: int) -> float:  # linear warm-up, then phase 2 at phase2_lr_scale
        return min(1.0, (s + 1) / cfg.warmup_steps) * (1.0 if phase2_step is None else cfg.phase2_lr_scale)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    averaged = (
        AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
        if cfg.ema_decay
        else None
    )
    scored = model if averaged is None else averaged.module  # the weights checked and saved
    val_facts = knowledge.select(splits=("val",))
    val_items = mcq_items(val_facts, seed, "val", knowledge.users)  # the val file's items
    own = [it for it in val_items if it["domain"] in spec.domains]
    own_plain = [{**it, "question_stem": split_private(it["question_stem"])[1]} for it in own]  # phase 1
    note_every = max(1, len(val_facts) // 120)  # the note check: every few val facts (about 120)
    note_items = val_items[::note_every]
    notes = [context_note([statement(f)]) for f in val_facts[::note_every]]
    train_items = mcq_items(knowledge.select(domains=spec.domains, splits=("train",)), seed, "probe")[:48]
    rephrase_stems = [it["question_stem"] for it in val_items]  # all: a failing name fails all its questions

    max_steps = cfg.max_steps[name]
    note_target = cfg.note_accuracy.get(name)
    rephrase_target = cfg.rephrase_fidelity if spec.rephrase else None
    history: list[dict] = []
    start, step, epoch, losses = time.time(), 0, 0, []
    bar = tqdm(total=max_steps, desc=name, position=position, leave=True, disable=not progress, dynamic_ncols=True)
    stopped, impatient, phase = False, False, (0 if cfg.phase0_cloze > 0 else 1)
    best: tuple | None = None  # (targets met, own + note + rephrase, step, weights): best phase-2 check
    while step < max_steps and not (stopped or impatient):
        examples = pretraining_examples(
            knowledge,
            list(spec.domains),
            rephrase=spec.rephrase,
            config=cfg,
            seed=seed,
            model=name,
            epoch=epoch,
            phase=phase,
        )
        encoded = [encode(ex, tok, spec.tokenizer) for ex in examples]
        for ids, mask, labels in batches(
            encoded, cfg.batch_size, tok.pad_token_id, random.Random(f"batches-{seed}-{name}-{epoch}")
        ):
            model.train()
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            if averaged is not None:
                averaged.update_parameters(model)
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            step += 1
            bar.update(1)
            if step % cfg.eval_every == 0 or step == max_steps:
                cloze = cloze_accuracy(scored, tok, spec.tokenizer, own)
                if phase == 0:  # statements only: on to the questions once the known facts are memorised
                    history.append(
                        dict(step=step, epoch=epoch, phase=0, loss=sum(losses) / len(losses), val_cloze=cloze)
                    )
                    history[-1]["seconds"] = round(time.time() - start, 1)
                    losses = []
                    bar.set_postfix(loss=f"{history[-1]['loss']:.3f}", cloze=f"{cloze:.2f}")
                    if cloze >= cfg.phase0_cloze:
                        phase, phase1_step = 1, step
                        break  # regenerate the epoch with the questions
                else:
                    checked = own_plain if phase < cfg.private_from_phase else own  # once prefixes are taught
                    by_domain = {
                        d: option_loglik_accuracy(scored, tok, [it for it in checked if it["domain"] == d])
                        for d in spec.domains
                    }
                    acc = min(by_domain.values())  # every known domain must be learnt
                    note_acc = option_loglik_accuracy(scored, tok, note_items, notes) if note_target else None
                    fidelity = (
                        rephrase_fidelity(scored, tok, rephrase_stems) if rephrase_target and phase == 2 else None
                    )
                    history.append(
                        dict(
                            step=step,
                            epoch=epoch,
                            phase=phase,
                            loss=sum(losses) / len(losses),
                            val_accuracy=acc,
                            val_by_domain=by_domain,
                            val_note_accuracy=note_acc,
                            val_rephrase_fidelity=fidelity,
                            val_cloze=cloze,
                            train_accuracy=option_loglik_accuracy(scored, tok, train_items),
                            seconds=round(time.time() - start, 1),
                        )
                    )
                    losses = []
                    bar.set_postfix(
                        loss=f"{history[-1]['loss']:.3f}",
                        val=f"{acc:.2f}",
                        note="-" if note_acc is None else f"{note_acc:.2f}",
                        reph="-" if fidelity is None else f"{fidelity:.2f}",
                        cloze=f"{history[-1]['val_cloze']:.2f}",
                        tr=f"{history[-1]['train_accuracy']:.2f}",
                    )
                    if phase == 1 and acc >= cfg.phase1_accuracy:
                        phase, phase2_step = 2, step
                        for group, base in zip(opt.param_groups, sched.base_lrs):  # from the next step on
                            group["lr"] = base * lr_factor(step)
                        break  # regenerate the epoch with every task
                    targets_ok = note_target is None or note_acc >= note_target
                    targets_ok = targets_ok and (rephrase_target is None or (fidelity or 0.0) >= rephrase_target)
                    total = acc + (note_acc or 0.0) + (fidelity or 0.0)
                    if phase == 2 and (best is None or (targets_ok, total) > best[:2]):
                        best = (
                            targets_ok,
                            total,
                            step,
                            {k: v.detach().clone() for k, v in scored.state_dict().items()},
                        )
                    stopped = phase == 2 and step >= cfg.min_steps and acc >= cfg.stop_accuracy and targets_ok
                    patience = cfg.target_patience if (note_target or rephrase_target) else cfg.patience
                    impatient = phase == 2 and step - best[2] >= patience * cfg.eval_every
            if stopped or impatient or step >= max_steps:
                break
        epoch += 1
    bar.close()
    restored_step = None
    if not stopped and best is not None and best[2] != step:  # out of steps or patience: keep the best check
        scored.load_state_dict(best[3])
        restored_step = best[2]
    seconds = time.time() - start
    out = Path(out_dir)
    scored.eval()
    scored.generation_config.eos_token_id = tok.convert_tokens_to_ids(fam.end_of_turn)
    scored.generation_config.pad_token_id = tok.pad_token_id
    scored.save_pretrained(out)
    tok.save_pretrained(out)
    log = dict(
        model=name,
        steps=step,
        epochs=epoch,
        early_stopped=stopped,
        phase1_step=phase1_step,
        phase2_step=phase2_step,
        restored_step=restored_step,
        seconds=round(seconds, 1),
        final=next((h for h in history if h["step"] == restored_step), history[-1] if history else {}),
        history=history,
        parameters=sum(p.numel() for p in scored.parameters()),
    )
    (out / "pretrain_log.json").write_text(json.dumps(log, indent=1))
    return log
