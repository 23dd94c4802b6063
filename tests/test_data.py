"""Loaders and prompt formats of fedrefine_lib.data (hub schemas, clear errors)."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from fedrefine_lib import data

ITEM = {
    "id": "q1",
    "question_stem": "What is the color of Zorblax?",
    "choices": {"text": ["red", "blue", "green", "white"], "label": ["A", "B", "C", "D"]},
    "answerKey": "B",
    "domain": "science",
}


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_chat_records_roundtrip(tmp_path):
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
    ]
    path = data.write_jsonl([data.to_chat_record(msgs, domain="general")], tmp_path / "c.jsonl")
    assert json.loads(path.read_text())["conversations"][1] == {"from": "human", "value": "Hi"}
    assert data.load_chat_records(path) == [msgs]


def test_chat_records_parquet(tmp_path):
    rows = [data.to_chat_record([{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}])]
    pd.DataFrame(rows).to_parquet(tmp_path / "c.parquet")
    assert data.load_chat_records(tmp_path / "c.parquet") == [
        [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    ]


@pytest.mark.parametrize(
    "row, needle",
    [
        ({"messages": []}, "conversations"),
        ({"conversations": [{"from": "bot", "value": "x"}]}, "turn 0"),
        ({"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}]}, "last turn"),
    ],
)
def test_chat_records_errors_name_file_and_line(tmp_path, row, needle):
    path = _jsonl(tmp_path / "bad.jsonl", [{"conversations": [{"from": "gpt", "value": "ok"}]}, row])
    with pytest.raises(data.DataFormatError, match="line 2") as err:
        data.load_chat_records(path)
    assert "bad.jsonl" in str(err.value) and needle in str(err.value)


def test_bad_json_and_missing_file(tmp_path):
    (tmp_path / "x.jsonl").write_text("{not json}\n")
    with pytest.raises(data.DataFormatError, match="line 1.*JSONL"):
        data.load_chat_records(tmp_path / "x.jsonl")
    with pytest.raises(data.DataFormatError, match="not found.*build_world"):
        data.load_mcq(tmp_path / "missing.jsonl")


def test_load_mcq_validates(tmp_path):
    assert data.load_mcq(_jsonl(tmp_path / "ok.jsonl", [ITEM])) == [ITEM]
    bad = {**ITEM, "answerKey": "E"}
    with pytest.raises(data.DataFormatError, match="line 1.*answerKey"):
        data.load_mcq(_jsonl(tmp_path / "bad.jsonl", [bad]))
    missing = {k: v for k, v in ITEM.items() if k != "choices"}
    with pytest.raises(data.DataFormatError, match="choices"):
        data.load_mcq(_jsonl(tmp_path / "bad2.jsonl", [missing]))
    assert data.answer_text(ITEM) == "blue"


def test_prompt_formats():
    msgs = data.mcq_messages(ITEM)
    assert len(msgs) == 1 and msgs[0]["role"] == "user"
    body = msgs[0]["content"]
    assert body.startswith("Question: What is the color of Zorblax?")
    assert "\nB. blue\n" in body and body.endswith(data.MCQ_INSTRUCTION)
    note = data.context_note(["The color of Zorblax is blue.", " ", "More. "])
    assert note == "Note: The color of Zorblax is blue. More."
    with_note = data.mcq_messages(ITEM, note)[0]["content"]
    assert with_note.startswith(note + "\nQuestion:")
    assert data.background_messages("Q?")[0]["content"].endswith("Question: Q?")
    assert data.rephrase_messages("Q?")[0]["content"].startswith(data.REPHRASE_INSTRUCTION)


def test_tidy_text():
    assert data.tidy_text(" For Zorb , the color is red . ") == "For Zorb, the color is red."
    assert data.tidy_text("Do you know what color Zorb has ?") == "Do you know what color Zorb has?"


def test_chat_records_kinds_filter(tmp_path):
    rows = [
        data.to_chat_record([{"role": "user", "content": f"Q{i}"}, {"role": "assistant", "content": "A"}], kind=k)
        for i, k in enumerate(["mcq", "background", "mcq", "filler"])
    ]
    path = data.write_jsonl(rows, tmp_path / "c.jsonl")
    assert [r[0]["content"] for r in data.load_chat_records(path, kinds=["mcq"])] == ["Q0", "Q2"]
    assert len(data.load_chat_records(path)) == 4
    with pytest.raises(data.DataFormatError, match="no record of kinds"):
        data.load_chat_records(path, kinds=["essay"])
    plain = data.write_jsonl(
        [data.to_chat_record([{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}])],
        tmp_path / "plain.jsonl",
    )
    with pytest.raises(data.DataFormatError, match="no 'kind' field.*kinds filter"):
        data.load_chat_records(plain, kinds=["mcq"])
