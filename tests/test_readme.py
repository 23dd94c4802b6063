"""The README's "Adding a model pair" example runs as written, on tiny local models."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def adding_a_model_pair_code() -> str:
    section = ROOT.joinpath("README.md").read_text().split("## Adding a model pair", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_model_pair_example_runs(tmp_path, monkeypatch, tiny_models):
    code = adding_a_model_pair_code()
    for name, key in (("my-receiver", "qwen3"), ("my-sender", "llama")):
        model, tokenizer = tiny_models[key]
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
        code = code.replace(f'ModelSpec("{name}", "path/or/hub-id")', f'ModelSpec("{name}", "{tmp_path / name}")', 1)
    assert "path/or/hub-id" not in code, "the example's model sources changed; update this test"
    code = code.replace("hidden=256", "hidden=8")  # a tiny fuser for a tiny pair
    monkeypatch.chdir(tmp_path)  # the example's hub lands in tmp_path/data/my-hub
    chat_records = [
        [{"role": "user", "content": f"Fox {i}?"}, {"role": "assistant", "content": "blue"}] for i in range(4)
    ]
    namespace = {"chat_records": chat_records, "messages": [{"role": "user", "content": "What colour is the fox?"}]}
    exec(compile(code, "README.md", "exec"), namespace)
    texts, trace = namespace["texts"], namespace["trace"]
    assert len(texts) == 1 and isinstance(texts[0], str)
    assert trace.bytes["my-sender->my-receiver"] > 0 and (tmp_path / "data" / "my-hub" / "index.json").is_file()
