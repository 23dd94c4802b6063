"""MCQ scoring: every item counted, cached-prefix log-likelihood == full recompute, Wilson CI."""

import pytest
import torch

from fedrefine_lib import data, evaluate, federation, kv
from fedrefine_lib.engine import Standalone, continue_prefill
from fedrefine_lib.fuser import FuserConfig, ResidualFuser
from fedrefine_lib.models import LoadedModel
from fedrefine_lib.prompts import encode_prompts

ITEMS = [
    {
        "id": f"q{i}",
        "question_stem": stem,
        "domain": dom,
        "answerKey": key,
        "choices": {"label": ["A", "B", "C", "D"], "text": ["blue", "red light", "a green metal", "zorblat"]},
    }
    for i, (stem, dom, key) in enumerate(
        [
            ("What colour does zorblat glow?", "science", "A"),
            ("Which river flows through Tressa?", "geography", "D"),
            ("What does the fox jump over?", "science", "C"),
        ]
    )
]


@pytest.fixture(scope="module")
def qwen3(tiny_models):
    return LoadedModel("qwen3", *tiny_models["qwen3"])


def test_wilson_interval():
    acc = evaluate.accuracy([True] * 8 + [False] * 2)
    assert acc.value == 0.8 and acc.n == 10
    assert acc.ci_low == pytest.approx(0.4902, abs=1e-4) and acc.ci_high == pytest.approx(0.9433, abs=1e-4)
    assert evaluate.accuracy([True]).ci_high == 1.0 and evaluate.accuracy([False]).ci_low == 0.0
    assert evaluate.accuracy([]).n == 0


def test_loglik_reuses_prefix_and_equals_full_recompute(qwen3):
    result = evaluate.score_mcq(qwen3, ITEMS, method="loglik", batch_size=2, progress=False)
    model, tok = qwen3.model, qwen3.tokenizer
    item = ITEMS[1]
    ids, mask = encode_prompts(tok, [data.mcq_messages(item)])
    for k, text in enumerate(item["choices"]["text"]):
        opt = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            logits, _ = kv.forward(
                model, torch.cat([ids, opt], 1), torch.ones(1, ids.shape[1] + opt.shape[1], dtype=torch.long)
            )
        logp = torch.log_softmax(logits[0, ids.shape[1] - 1 : -1], -1).gather(-1, opt[0, :, None]).sum().item()
        assert result.scores[1][k] == pytest.approx(logp, abs=1e-4)
    one = evaluate.score_mcq(qwen3, ITEMS[1:2], method="loglik", progress=False)
    assert one.scores[0] == pytest.approx(result.scores[1], abs=1e-4)
    assert result.predictions[1] == "ABCD"[max(range(4), key=lambda i: result.scores[1][i])]


@pytest.mark.parametrize("method", evaluate.METHODS)
def test_every_item_is_counted(qwen3, method):
    result = evaluate.score_mcq(qwen3, ITEMS, method=method, batch_size=2, max_new_tokens=4, progress=False)
    assert len(result.correct) == len(result.predictions) == len(ITEMS) == result.accuracy().n
    assert result.ids == ["q0", "q1", "q2"] and result.answers == ["A", "D", "C"]
    for p, c, a in zip(result.predictions, result.correct, result.answers):
        assert c == (p == a)
    if method == "generate":  # a random model writes gibberish: recorded, wrong, still counted
        assert result.unparseable == sum(p is None for p in result.predictions) > 0
        assert all(o is not None for o in result.outputs)
        assert not any(c for p, c in zip(result.predictions, result.correct) if p is None)
    assert set(result.accuracy_by()) == {"science", "geography"}
    assert len(result.records()) == len(ITEMS)


def test_letter_scores_are_letter_logits(qwen3):
    result = evaluate.score_mcq(qwen3, ITEMS[:1], method="letter", progress=False)
    tok = qwen3.tokenizer
    pre = Standalone(qwen3).prefill([evaluate.letter_messages(ITEMS[0])], evaluate.LETTER_PREFIX)
    assert tok.decode(pre.input_ids[0]).endswith("assistant\nThe correct answer is")
    with torch.no_grad():
        last = continue_prefill(qwen3.model, pre)[0, -1]
    first = tok(" B", add_special_tokens=False)["input_ids"][0]
    assert result.scores[0][1] >= last[first].item() - 1e-5


def test_extract_answer():
    labels, options = ["A", "B", "C", "D"], ["blue", "red", "green metal", "zorblat"]
    assert evaluate.extract_answer(" B. red", labels, options) == "B"
    assert evaluate.extract_answer("The correct answer is (C)", labels, options) == "C"
    assert evaluate.extract_answer(" it glows green metal", labels, options) == "C"
    assert evaluate.extract_answer(" blue or red", labels, options) is None
    assert evaluate.extract_answer("???", labels, options) is None


def test_scoring_with_a_closed_c2c_engine_equals_standalone(tiny_models, qwen3):
    sender = LoadedModel("llama", *tiny_models["llama"])
    fuser = ResidualFuser(FuserConfig.for_pair(qwen3, sender, hidden=8))
    with torch.no_grad():
        for p in fuser.parameters():
            p.normal_(0, 0.3)
    fuser.eval().set_gates(False)
    c2c = evaluate.score_mcq(federation.C2C(qwen3, sender, fuser), ITEMS, progress=False)
    alone = evaluate.score_mcq(qwen3, ITEMS, progress=False)
    assert c2c.scores == alone.scores
    assert "llama->qwen3" in c2c.trace.bytes and not alone.trace.bytes
    with pytest.raises(TypeError, match="engine"):
        evaluate.score_mcq(object(), ITEMS)


@pytest.mark.parametrize("method", ["loglik", "letter"])
def test_contexts_are_put_before_the_question(qwen3, method):
    notes = ["Note: zorblat glows blue.", None, "Note: the fox jumps."]
    result = evaluate.score_mcq(qwen3, ITEMS, method=method, contexts=notes, batch_size=2, progress=False)
    for i, (item, note) in enumerate(zip(ITEMS, notes)):
        assert evaluate.question_messages(item, note) == data.mcq_messages(item, note)
        one = evaluate.score_mcq(qwen3, [item], method=method, contexts=[note], progress=False)
        assert one.scores[0] == pytest.approx(result.scores[i], abs=1e-4)
    plain = evaluate.score_mcq(qwen3, ITEMS, method=method, batch_size=2, progress=False)
    assert plain.scores[1] == pytest.approx(result.scores[1], abs=1e-4) and plain.scores[0] != result.scores[0]
    with pytest.raises(ValueError, match="one context"):
        evaluate.score_mcq(qwen3, ITEMS, contexts=notes[:2])


def test_non_finite_option_scores_are_refused_not_counted_wrong(tiny_models):
    import copy

    model, tok = tiny_models["qwen3"]
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.lm_head.weight.fill_(float("nan"))
    item = {
        "id": "q1",
        "question_stem": "Which colour is the sky?",
        "choices": {"text": ["blue", "red"], "label": ["A", "B"]},
        "answerKey": "A",
    }
    with pytest.raises(ValueError, match=r"NaN or infinite for items \[\('q1'.*no question is scored as wrong"):
        evaluate.score_mcq(LoadedModel("broken", broken, tok), [item], progress=False)
