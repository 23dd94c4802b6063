"""The private-context task: items, files, and private context reaching only the sender."""

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from fedrefine_lib import data, evaluate, federation, prompts
from fedrefine_lib.context_task import RELATIONS, ContextTaskConfig, build_task, write_task
from fedrefine_lib.engine import Standalone
from fedrefine_lib.fuser import BlockFuser, FuserConfig, ResidualFuser
from fedrefine_lib.models import PLAIN_CHAT_TEMPLATE, prepare_tokenizer
from fedrefine_lib.t2t import t2t_notes

SMALL = ContextTaskConfig(train=30, val=12, test=18, distractors=2)


def test_task_is_seeded_and_splits_share_no_person():
    a, b = build_task(3, SMALL), build_task(3, SMALL)
    assert a == b and build_task(4, SMALL) != a
    people = {split: {it["entity"] for it in items} for split, items in a.items()}
    assert not people["train"] & people["val"] and not people["train"] & people["test"]
    assert not people["val"] & people["test"]
    assert [len(a[s]) for s in ("train", "val", "test")] == [30, 12, 18]
    for it in a["test"]:
        data.validate_mcq(it)
        answer = data.answer_text(it)
        fact = RELATIONS[it["domain"]].statement.format(e=it["entity"], v=answer)
        assert fact in it["private_context"]  # the sender's records hold the answer
        assert it["private_context"].count(". ") == SMALL.distractors  # and the distractor facts
        assert it["entity"] in it["question_stem"] and answer not in it["question_stem"]
    assert {it["domain"] for it in a["test"]} == set(RELATIONS)


def test_write_task_once_and_loads(tmp_path):
    paths = write_task(tmp_path, 0, SMALL)
    stamps = {k: p.stat().st_mtime_ns for k, p in paths.items()}
    assert write_task(tmp_path, 0, SMALL) == paths
    assert {k: p.stat().st_mtime_ns for k, p in paths.items()} == stamps  # never rewritten
    assert data.load_mcq(paths["mcq_test"]) == build_task(0, SMALL)["test"]
    records = data.load_chat_records(paths["chat_train"])
    assert len(records) == 30 and records[0][0]["role"] == prompts.CONTEXT_ROLE
    assert records[0][-1]["role"] == "assistant"
    assert not list(tmp_path.rglob("*.tmp*"))


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="options"):
        ContextTaskConfig(options=9)
    with pytest.raises(ValueError, match="kind"):
        ContextTaskConfig(kind="other")
    with pytest.raises(TypeError, match="seed"):
        build_task("0", SMALL)
    with pytest.raises(data.DataFormatError, match="private_context"):
        data.validate_mcq({**build_task(0, SMALL)["val"][0], "private_context": ""})


def test_views_and_render_refuses_raw_context(qwen_tokenizer):
    item = build_task(0, SMALL)["val"][0]
    chat = data.mcq_messages(item)
    assert prompts.has_context(chat) and not prompts.has_context(prompts.shared_view(chat))
    # the holder reads exactly the oracle's prompt: its records as a note before the question
    oracle = data.mcq_messages({**item, "private_context": None}, prompts.context_note([item["private_context"]]))
    assert prompts.holder_view(chat) == oracle
    assert prompts.shared_view(chat) == data.mcq_messages({**item, "private_context": None})
    with pytest.raises(ValueError, match="holder_view"):
        prompts.render(qwen_tokenizer, chat)
    with pytest.raises(ValueError, match="followed by a user turn"):
        prompts.holder_view([{"role": prompts.CONTEXT_ROLE, "content": "x"}])


def _ids(engine, chats):
    with torch.no_grad():
        return engine.prefill(chats).input_ids


def test_private_context_reaches_the_sender_only(loaded_models):
    receiver, sender = loaded_models["qwen3"], loaded_models["llama"]
    item = build_task(0, SMALL)["val"][1]
    plain = {**item, "private_context": None}
    note = prompts.context_note([item["private_context"]])
    chats = [data.mcq_messages(item)]
    assert torch.equal(_ids(Standalone(receiver), chats), _ids(Standalone(receiver), [data.mcq_messages(plain)]))
    held = _ids(Standalone(sender, holds_context=True), chats)
    assert torch.equal(held, _ids(Standalone(sender), [data.mcq_messages(plain, note)]))
    torch.manual_seed(0)
    fuser = BlockFuser(FuserConfig.for_pair(receiver, sender, kind="concat", hidden=8)).eval()
    engine = federation.C2C(receiver, sender, fuser)
    caches = engine.prompt_caches(chats)
    assert torch.equal(caches.receiver_ids, _ids(Standalone(receiver), chats))  # the receiver's own prompt: no records
    assert caches.alignments[0].sender_ids.shape[1] == held.shape[1]  # the sender's: its records + question
    residual = ResidualFuser(FuserConfig.for_pair(receiver, sender, hidden=8)).eval()
    with pytest.raises(ValueError, match="block fuser"):
        federation.C2C(receiver, sender, residual).prefill(chats)


def test_scores_and_t2t_read_the_records_on_the_sender_side(loaded_models):
    sender = loaded_models["qwen2"]
    items = build_task(0, SMALL)["val"][:4]
    plain = [{**it, "private_context": None} for it in items]
    notes = [prompts.context_note([it["private_context"]]) for it in items]
    held = evaluate.score_mcq(Standalone(sender, holds_context=True), items, progress=False)
    oracle = evaluate.score_mcq(sender, plain, contexts=notes, progress=False)
    assert held.scores == oracle.scores
    alone = evaluate.score_mcq(sender, items, progress=False)
    assert alone.scores == evaluate.score_mcq(sender, plain, progress=False).scores
    _, with_records, _ = t2t_notes([sender], items, protocol="background", max_new_tokens=3, progress=False)
    _, without, _ = t2t_notes([sender], plain, protocol="background", max_new_tokens=3, progress=False)
    assert len(with_records) == len(without) == 4  # both run; the sender's prompt differs (above)


def test_loglik_norm_divides_by_option_length(loaded_models):
    model = loaded_models["qwen3"]
    items = build_task(0, SMALL)["val"][:3]
    raw = evaluate.score_mcq(model, items, method="loglik", progress=False)
    norm = evaluate.score_mcq(model, items, method="loglik_norm", progress=False)
    for it, r, n in zip(items, raw.scores, norm.scores):
        assert n == pytest.approx([v / len(t) for v, t in zip(r, it["choices"]["text"])])


def test_base_model_gets_the_plain_template(qwen_tokenizer):
    tok = PreTrainedTokenizerFast(tokenizer_object=qwen_tokenizer.backend_tokenizer, eos_token="<|im_end|>")
    assert not tok.chat_template
    tok = prepare_tokenizer(tok)
    assert tok.chat_template == PLAIN_CHAT_TEMPLATE and tok.pad_token == "<|im_end|>"
    record = [{"role": "user", "content": "Fox?"}, {"role": "assistant", "content": "quick"}]
    prompt, answer = prompts.split_record(tok, record)
    assert prompt == record[:1] and answer[-1] == tok.eos_token_id
    assert prompts.render(tok, prompt).text == "User: Fox?\nAssistant:\n"


def test_cloze_scores_the_answer_sentence_without_options(loaded_models):
    item = build_task(0, SMALL)["val"][2]
    chat = evaluate.cloze_messages({**item, "private_context": None})
    assert all(t not in chat[-1]["content"] for t in item["choices"]["text"])
    assert evaluate.cloze_continuations(item) == [f"{item['cloze_prefix']} {t}" for t in item["choices"]["text"]]
    assert evaluate.cloze_continuations({"choices": {"text": ["x"]}}) == [f"{evaluate.CLOZE_PREFIX} x"]
    result = evaluate.score_mcq(loaded_models["qwen3"], [item], method="cloze", progress=False)
    assert len(result.scores[0]) == len(item["choices"]["text"])


def test_headroom_on_a_profile_of_real_model_classes(real_class_profile, tmp_path):
    from fedrefine_lib.headroom import MIN_GAIN, measure_headroom
    from fedrefine_lib.study import open_study

    study = open_study(str(real_class_profile), 0, smoke=True, data_dir=tmp_path, results_dir=tmp_path / "r")
    assert study.world is None and study.knows("tiny-gemma3") == study.knows("tiny-llama") == list(RELATIONS)
    assert study.model("tiny-gemma3").tokenizer.chat_template == PLAIN_CHAT_TEMPLATE
    report = measure_headroom(study, "val")
    assert set(report["accuracy"]) == {"receiver alone", "oracle", "tiny-gemma3 with its context"}
    assert report["items"] == 12 and report["chance"] == 0.25 and report["scoring"] == "cloze"
    assert report["acceptance"]["min_gain"] == MIN_GAIN
    assert report["acceptance"]["all"] == all(report["acceptance"]["holds"].values())
    assert report["models"]["tiny-gemma3"]["chat_template"] == "plain (base model)"
    notes = study.fact_notes(study.mcq("val"))
    assert all(n.startswith("Note: ") and len(n) > 10 for n in notes)


def test_a_new_task_version_is_built_apart(tmp_path, monkeypatch):
    from fedrefine_lib import context_task

    old = write_task(tmp_path, 0, SMALL)
    monkeypatch.setattr(context_task, "VERSION", context_task.VERSION + 1)
    new = write_task(tmp_path, 0, SMALL)
    assert new["mcq_val"].parent != old["mcq_val"].parent and old["mcq_val"].is_file()


def test_fuser_trial_trains_its_own_variant_and_scores_validation(real_class_profile, tmp_path):
    from fedrefine_lib.fuser_trial import main, run_trial, trial_variant
    from fedrefine_lib.jobs import default_variant
    from fedrefine_lib.study import open_study

    study = open_study(str(real_class_profile), 0, smoke=True, data_dir=tmp_path, results_dir=tmp_path / "r")
    settings = {"max_steps": 2, "lr": 0.01, "hidden": 4}
    assert trial_variant(settings) == "trial-hidden4-lr0.01-max_steps2"
    report = run_trial(study, settings, limit=4)
    assert report["steps"] == 2 and report["train_config"]["lr"] == 0.01 and report["fuser_options"]["hidden"] == 4
    assert report["split"] == "val" and report["items"] == 4
    assert set(report["accuracy"]) == {"receiver alone", "c2c"}
    hub = study.hub()
    assert hub.get("tiny-gemma3", "tiny-llama", report["variant"]).config.hidden == 4
    with pytest.raises(Exception, match="tiny-gemma3"):  # the main fuser is untouched (never trained here)
        hub.get("tiny-gemma3", "tiny-llama", default_variant("concat"))
    again = run_trial(study, settings, limit=4)  # stored: reused, same scores
    assert again["accuracy"] == report["accuracy"]
    with pytest.raises(SystemExit):
        main(["--profile", str(real_class_profile), "--set", "lr"])
