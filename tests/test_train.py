"""Fuser training on a toy task only the sender's cache can solve; frozen LLMs; seeding."""

import copy
import json
import random
from types import SimpleNamespace

import pytest
import torch

from fedrefine_lib import evaluate, federation, train
from fedrefine_lib.engine import Standalone
from fedrefine_lib.fuser import FuserConfig, ResidualFuser
from fedrefine_lib.models import LoadedModel

KEYS = ["fox", "dog", "blue", "metal"]
FILLER = "the quick brown lazy river valley speed light function high".split()


def records(n: int, seed: int) -> list[list[dict]]:
    """ "<filler with one key word>" -> the key word."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        key, words = rng.choice(KEYS), rng.sample(FILLER, 3)
        words.insert(rng.randrange(4), key)
        out.append([{"role": "user", "content": " ".join(words)}, {"role": "assistant", "content": key}])
    return out


@pytest.fixture(scope="module")
def blind_receiver(tiny_models) -> LoadedModel:
    """A Qwen3 receiver that cannot tell the key words apart: their input embeddings are
    identical, so its own cache (and every prediction) is the same for every key. Its
    output head is scaled up so a confident answer is expressible at all."""
    model, tok = copy.deepcopy(tiny_models["qwen3"][0]), tiny_models["qwen3"][1]
    ids = [tok(" " + k, add_special_tokens=False)["input_ids"] for k in KEYS]
    assert all(len(i) == 1 for i in ids)
    ids = [i[0] for i in ids]
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb[ids] = emb[ids].mean(0)
        model.lm_head.weight.mul_(30)
    return LoadedModel("qwen3-blind", model, tok)


def key_accuracy(engine, recs) -> float:
    scores, _ = evaluate.continuation_logliks(engine, [r[:-1] for r in recs], [KEYS] * len(recs))
    return sum(KEYS[max(range(len(KEYS)), key=s.__getitem__)] == r[-1]["content"] for s, r in zip(scores, recs)) / len(
        recs
    )


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def toy_config(**kw) -> train.TrainConfig:
    return train.TrainConfig(
        **{"lr": 3e-3, "epochs": 20, "batch_size": 16, "cache_prompts": True, "progress": False, **kw}
    )


@pytest.mark.parametrize("sender_name", ["qwen2", pytest.param("llama", marks=pytest.mark.slow)])
def test_fuser_learns_what_only_the_sender_knows(tiny_models, blind_receiver, sender_name, tmp_path):
    sender = LoadedModel(sender_name, *tiny_models[sender_name])
    train_set, held_out = records(256, 0), records(64, 1)
    alone = Standalone(blind_receiver)
    alone_loss, alone_acc = train.lm_loss(alone, held_out), key_accuracy(alone, held_out)
    assert alone_acc <= 0.35  # blind: the same prediction for every key

    fuser = ResidualFuser(FuserConfig.for_pair(blind_receiver, sender, hidden=32, gate_init=3.0))
    before = {"receiver": snapshot(blind_receiver.model), "sender": snapshot(sender.model), "fuser": snapshot(fuser)}
    result = train.train_fuser(
        blind_receiver, sender, fuser, train_set, toy_config(loss_curve_path=str(tmp_path / "curve.json"))
    )

    c2c = federation.C2C(blind_receiver, sender, fuser)
    c2c_loss, c2c_acc = train.lm_loss(c2c, held_out), key_accuracy(c2c, held_out)
    assert c2c_loss < 0.25 * alone_loss, (c2c_loss, alone_loss)
    assert c2c_acc >= 0.9, c2c_acc  # impossible without information from the sender's cache
    assert not fuser.training and result.steps == len(result.losses) == 20 * 16

    # Only the fuser changed; both LLMs are bit-identical and frozen.
    for side, model in (("receiver", blind_receiver.model), ("sender", sender.model)):
        after = model.state_dict()
        assert all(torch.equal(before[side][k], after[k]) for k in after), side
        assert not any(p.requires_grad for p in model.parameters())
    assert any(not torch.equal(before["fuser"][k], v) for k, v in fuser.state_dict().items())

    saved = json.loads((tmp_path / "curve.json").read_text())
    assert saved["losses"] == result.losses and saved["config"]["lr"] == 3e-3 and saved["config"]["seed"] == 42


def test_seeded_and_prompt_cache_reuse_is_exact(tiny_models, blind_receiver):
    sender = LoadedModel("qwen2", *tiny_models["qwen2"])
    recs = records(32, 2)
    runs = []
    for cache_prompts in (True, False, True):
        torch.manual_seed(123)  # same init; the config's seed fixes order, Gumbel noise and dropout
        fuser = ResidualFuser(FuserConfig.for_pair(blind_receiver, sender, hidden=8, dropout=0.1))
        runs.append(
            train.train_fuser(
                blind_receiver, sender, fuser, recs, toy_config(epochs=2, batch_size=8, cache_prompts=cache_prompts)
            ).losses
        )
    assert runs[0] == runs[1] == runs[2] and len(runs[0]) == 8


def test_defaults_are_the_reference_recipe():
    c = train.TrainConfig()
    assert (c.lr, c.weight_decay, c.warmup_ratio, c.grad_clip, c.epochs, c.seed) == (1e-4, 0.01, 0.1, 1.0, 1, 42)
    assert train.TrainConfig.from_dict({"lr": 1e-3}, epochs=2).to_dict() == {**c.to_dict(), "lr": 1e-3, "epochs": 2}
    with pytest.raises(ValueError, match="warmup_ratio"):
        train.TrainConfig.from_dict({"warmup": 0.1})
    assert train.temperature(0, 100, 1.0, 0.001) == 1.0
    assert train.temperature(99, 100, 1.0, 0.001) == pytest.approx(0.001)
    assert train.temperature(50, 101, 1.0, 0.001) == pytest.approx(10**-1.5)


def test_split_record(qwen_tokenizer):
    prompt, answer = train.split_record(qwen_tokenizer, records(1, 0)[0])
    assert [m["role"] for m in prompt] == ["user"]
    assert (
        qwen_tokenizer.decode(answer) == records(1, 0)[0][-1]["content"] + "<|im_end|>"
    )  # nothing past the stop token
    _, uncut = train.split_record(qwen_tokenizer, records(1, 0)[0], stop_ids=set())
    assert qwen_tokenizer.decode(uncut) == records(1, 0)[0][-1]["content"] + "<|im_end|>\n"  # the template's tail
    with pytest.raises(ValueError, match="assistant"):
        train.split_record(qwen_tokenizer, [{"role": "user", "content": "hi"}])


def test_finetune_receiver_learns_the_records_on_a_copy(tiny_models):
    """The no-sender control trains every receiver weight on the records, on a copy."""
    model, tok = tiny_models["qwen3"]
    receiver = LoadedModel("qwen3", model, tok)
    before = snapshot(model)
    train_recs, held_out = records(160, 0), records(40, 1)
    alone = key_accuracy(Standalone(receiver), held_out)
    tuned, result = train.finetune_receiver(receiver, train_recs, toy_config(cache_prompts=False))
    assert tuned.name == "qwen3+finetuned" and tuned.model is not model
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the receiver is untouched
    assert result.losses[-1] < result.losses[0]
    assert key_accuracy(Standalone(tuned), held_out) >= max(0.9, alone + 0.3)
    assert not any(p.requires_grad for p in tuned.model.parameters())
    with pytest.raises(ValueError, match="No training records"):
        train.finetune_receiver(receiver, [])


def test_records_over_the_length_cap_are_left_out_counted_and_warned(qwen_tokenizer):
    from fedrefine_lib.jobs import recipe

    short = records(3, 0)
    long = [[{"role": "user", "content": " ".join(FILLER * 10)}, {"role": "assistant", "content": "fox"}]]
    kept, dropped = train.within_length(short + long, [qwen_tokenizer], train.TrainConfig())
    assert dropped == 0 and kept == short + long  # no cap: every record
    longest = max(len(qwen_tokenizer.apply_chat_template(r, tokenize=False)) for r in short)  # chars >= tokens
    with pytest.warns(UserWarning, match="1 of 4 training records"):
        kept, dropped = train.within_length(
            short + long, [qwen_tokenizer], train.TrainConfig(max_record_tokens=longest)
        )
    assert kept == short and dropped == 1
    with pytest.raises(ValueError, match="max_record_tokens"):
        train.within_length(long, [qwen_tokenizer], train.TrainConfig(max_record_tokens=5))
    # a fuser stored before the cap existed keeps its recipe; a capped one is another recipe
    config = SimpleNamespace(to_dict=lambda: {"kind": "concat"})  # the fuser part does not matter here
    plain = recipe(config, train.TrainConfig(), "h")
    assert "max_record_tokens" not in plain["train"]
    assert recipe(config, train.TrainConfig(max_record_tokens=512), "h")["train"]["max_record_tokens"] == 512
