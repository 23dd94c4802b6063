"""Hub data sets of the `paper` profile: fetched once through datasets.load_dataset, local
files in the hub schemas instead (tests/fixtures/paper), a validation split carved from train."""

from __future__ import annotations

import json

import pytest

from fedrefine_lib import data, hub_data
from fedrefine_lib.models import REPO_ROOT, LoadedModel, load_profile
from fedrefine_lib.study import Study

FIXTURES = REPO_ROOT / "tests" / "fixtures" / "paper"
MAIN_FIELDS = {"id", "question_stem", "choices", "answerKey"}  # allenai/openbookqa, configuration `main`
ADDITIONAL_FIELDS = MAIN_FIELDS | {"fact1", "humanScore", "clarity", "turkIdAnonymized"}  # `additional`


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _paper(tmp_path, **data_settings) -> Study:
    profile = load_profile("paper")
    profile.settings["data"].update(data_settings)
    return Study(profile, 0, tmp_path, tmp_path)


def test_the_fixtures_follow_the_hub_schemas(tmp_path):
    chats = _rows(FIXTURES / "chat_train.jsonl")
    assert 20 <= len(chats) <= 60
    for row in chats:  # teknium/OpenHermes-2.5: conversations of {from, value, weight}
        assert {t["from"] for t in row["conversations"]} <= {"system", "human", "gpt"}
        assert all(set(t) == {"from", "value", "weight"} for t in row["conversations"])
    assert len(data.load_chat_records(FIXTURES / "chat_train.jsonl")) == len(chats)
    for name in ("mcq_train.jsonl", "mcq_test.jsonl"):
        items = _rows(FIXTURES / name)
        assert all(set(it) == ADDITIONAL_FIELDS and it["choices"]["label"] == list("ABCD") for it in items)
        assert data.load_mcq(FIXTURES / name) == items
        main = [{k: it[k] for k in MAIN_FIELDS} for it in items]  # the `main` configuration loads too
        assert data.load_mcq(data.write_jsonl(main, tmp_path / name)) == main
    train, test = (_rows(FIXTURES / n) for n in ("mcq_train.jsonl", "mcq_test.jsonl"))
    assert not {it["id"] for it in train} & {it["id"] for it in test}
    assert sum(p.stat().st_size for p in FIXTURES.iterdir()) < 40_000


def test_the_paper_profile_reads_hub_sets_and_carves_validation_from_train():
    sources = load_profile("paper").settings["data"]
    assert sources["chat_train"] == "teknium/OpenHermes-2.5" and sources["mcq_test"] == "allenai/openbookqa"
    assert hub_data.is_hub_id(sources["chat_train"]) and not any(map(hub_data.is_hub_id, ("./a/b", "a/b.jsonl")))
    assert [hub_data.hub_split(k) for k in ("chat_train", "mcq_train", "mcq_test")] == ["train", "train", "test"]
    assert hub_data.carve_spec(sources, "mcq_val")["carve"] == "mcq_train"
    with pytest.raises(ValueError, match="from a training split only"):
        hub_data.carve_spec({"mcq_val": {"carve": "mcq_test", "size": 5}}, "mcq_val")


class FakeHub:
    """``datasets.load_dataset`` stand-in: records its calls, serves rows in the hub schemas."""

    def __init__(self):
        self.calls = []

    def __call__(self, path, name=None, split=None, streaming=False):
        self.calls.append((path, name, split, streaming))
        if path == "teknium/OpenHermes-2.5":
            rows = _rows(FIXTURES / "chat_train.jsonl")
            rows.insert(1, {"conversations": [{"from": "human", "value": "no answer", "weight": None}]})
            return iter(rows) if streaming else rows
        return _rows(FIXTURES / f"mcq_{split}.jsonl")


def test_hub_sets_are_fetched_once_in_their_schema(tmp_path, monkeypatch):
    import datasets

    fake = FakeHub()
    monkeypatch.setattr(datasets, "load_dataset", fake)
    study = _paper(tmp_path, chat_train_limit=10)
    records = study.chat_records()
    assert len(records) == 9  # the first 10 streamed, the one without an answer dropped
    assert records[0] == data.load_chat_records(FIXTURES / "chat_train.jsonl")[0]
    test = study.mcq("test")
    assert [it["id"] for it in test] == [it["id"] for it in _rows(FIXTURES / "mcq_test.jsonl")]
    assert {it["domain"] for it in test} == {"science"}  # the profile's mcq_domain
    study.chat_records(), study.mcq("test")  # second time: from the exports
    assert fake.calls == [
        ("teknium/OpenHermes-2.5", None, "train", True),
        ("allenai/openbookqa", "additional", "test", False),
    ]
    hub_dir = tmp_path / "paper" / "hub"
    assert sorted(p.name for p in hub_dir.iterdir()) == [
        "allenai--openbookqa.additional.test.jsonl",
        "teknium--OpenHermes-2.5.train.first10.jsonl",
    ]
    assert _rows(hub_dir / "allenai--openbookqa.additional.test.jsonl")[0] == _rows(FIXTURES / "mcq_test.jsonl")[0]


def test_offline_without_local_files_names_the_cause_and_the_fix(tmp_path, monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'allenai/openbookqa' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(hub_data.HubDataUnavailableError) as err:
        _paper(tmp_path).mcq("test")
    message = str(err.value)
    for needle in ("'mcq_test'", "allenai/openbookqa", "OfflineModeIsEnabled", "HF_HUB_OFFLINE", "hub_data --profile",
                   "local: {mcq_test: PATH}", "tests/fixtures/paper"):  # fmt: skip
        assert needle in message, (needle, message)
    assert not (tmp_path / "paper" / "hub").exists() or not list((tmp_path / "paper" / "hub").iterdir())


def test_local_files_replace_the_hub(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", None)  # never called
    study = _paper(tmp_path, local="tests/fixtures/paper", mcq_val={"carve": "mcq_train", "size": 12, "seed": 0})
    assert len(study.chat_records()) == len(_rows(FIXTURES / "chat_train.jsonl"))
    train, val, test = study.mcq("train"), study.mcq("val"), study.mcq("test")
    every = _rows(FIXTURES / "mcq_train.jsonl")
    assert len(val) == 12 and len(train) == len(every) - 12
    assert {it["id"] for it in train} | {it["id"] for it in val} == {it["id"] for it in every}
    assert not {it["id"] for it in val} & ({it["id"] for it in train} | {it["id"] for it in test})
    assert study.mcq("val") == val  # deterministic
    other = _paper(tmp_path, local=str(FIXTURES), mcq_val={"carve": "mcq_train", "size": 12, "seed": 1})
    assert [it["id"] for it in other.mcq("val")] != [it["id"] for it in val]
    mapped = _paper(tmp_path, local={"mcq_test": str(FIXTURES / "mcq_test.jsonl")})
    assert mapped.mcq("test") == test
    with pytest.raises(FileNotFoundError, match=r"data.local.mcq_test names .*missing.jsonl.*hub data set's schema"):
        _paper(tmp_path, local={"mcq_test": "missing.jsonl"}).mcq("test")
    with pytest.raises(FileNotFoundError, match="data.local names the directory .*nowhere"):
        _paper(tmp_path, local="nowhere").mcq("test")
    with pytest.raises(ValueError, match="A validation split of 500 items needs more than 500"):
        _paper(tmp_path, local=str(FIXTURES)).mcq("val")  # the paper's 500 from a 32-item fixture


def test_homogeneous_pair_from_the_profile_or_the_senders(tmp_path, loaded_models):
    assert _paper(tmp_path).homogeneous_pair() == ("qwen2.5-coder-0.5b-instruct", "qwen2.5-0.5b-instruct")
    pair = ["qwen2.5-1.5b-instruct", "llama-3.2-1b-instruct"]
    assert _paper(tmp_path).homogeneous_pair(pair) == tuple(pair)
    with pytest.raises(ValueError, match=r"must be \[sender, receiver\].*unknown: \['a'\]"):
        _paper(tmp_path).homogeneous_pair(["a", "qwen3-0.6b"])
    study = _paper(tmp_path)
    del study.settings["homogeneous_pair"]
    qwen2 = loaded_models["qwen2"]
    study._models = {
        "qwen2.5-0.5b-instruct": loaded_models["gemma3"],  # the Qwen tokenizer, another architecture
        "qwen2.5-coder-0.5b-instruct": loaded_models["llama"],
        "qwen2.5-1.5b-instruct": qwen2,
        "llama-3.2-1b-instruct": LoadedModel("copy", qwen2.model, qwen2.tokenizer),
    }
    assert study.homogeneous_pair() == ("qwen2.5-1.5b-instruct", "llama-3.2-1b-instruct")
    study._models["llama-3.2-1b-instruct"] = loaded_models["qwen3"]
    with pytest.raises(ValueError, match="no two senders share an architecture and a tokenizer"):
        study.homogeneous_pair()
