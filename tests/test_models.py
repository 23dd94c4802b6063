"""Model specs, profiles and loading."""

import pytest
import torch

from fedrefine_lib import models
from fedrefine_lib.models import ModelNotAvailableError, ModelSpec


def test_hub_id_offline_raises_documented_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = ModelSpec("nobody", "fedrefine-nonexistent/never-downloaded-model")
    assert spec.kind == "hub"
    with pytest.raises(ModelNotAvailableError, match="not cached locally.*local directory"):
        models.load_model(spec)


def test_missing_local_dir_and_gguf_raise(tmp_path):
    with pytest.raises(ModelNotAvailableError, match="no config.json"):
        models.load_model(ModelSpec("x", str(tmp_path)))
    with pytest.raises(ModelNotAvailableError, match="does not exist"):
        models.load_model(ModelSpec("x", str(tmp_path / "missing.gguf")))


def test_bad_dtype_is_rejected():
    with pytest.raises(ValueError, match="dtype"):
        ModelSpec("x", "a/b", dtype="int4")


@pytest.mark.parametrize("name", ["mini", "smol", "paper"])
def test_profiles_parse_into_specs(name):
    profile = models.load_profile(name, world="/tmp/world", smol_dir="/tmp/s", gemma_dir="/tmp/g")
    assert profile.name == name
    assert len(profile.senders) >= 1
    for model in [profile.receiver, *profile.senders]:
        spec = profile.spec(model)
        assert isinstance(spec, ModelSpec) and spec.name == model
    if name == "paper":
        assert profile.spec("qwen3-0.6b").kind == "hub"
        assert profile.spec("qwen3-0.6b").shape["kv_heads"] == 8
    if name == "mini":
        assert profile.spec("mini-qwen3-0.6b").source == "/tmp/world/models/mini-qwen3-0.6b"


def test_profile_missing_placeholder_and_unknown_profile():
    with pytest.raises(ValueError, match="placeholder"):
        models.load_profile("mini")
    with pytest.raises(FileNotFoundError, match="Known profiles"):
        models.load_profile("nonexistent")


def test_local_round_trip(tmp_path, tiny_models):
    model, tok = tiny_models["qwen2"]
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    loaded = models.load_model(ModelSpec("tiny", str(tmp_path / "m")))
    assert loaded.tokenizer.pad_token is not None and loaded.tokenizer.padding_side == "left"
    assert not loaded.model.training
    for a, b in zip(loaded.model.state_dict().values(), model.state_dict().values()):
        assert (a == b).all()


@pytest.mark.parametrize("name", ["mini", "smol", "paper"])
def test_profile_fusion_mode(name, tmp_path):
    from fedrefine_lib.study import Study

    profile = models.load_profile(name, world="/tmp/world", smol_dir="/tmp/s", gemma_dir="/tmp/g")
    study = Study(profile, 0, tmp_path, tmp_path)
    assert study.fusion in ("residual", "concat")
    assert study.fuser_variant == ("default" if study.fusion == "residual" else "concat")
    profile.settings["fusion"] = "sum"
    with pytest.raises(ValueError, match="fusion: 'sum'.*residual"):
        study.fusion


def test_a_model_directory_without_tokenizer_files_is_refused(tmp_path, tiny_models):
    model, _ = tiny_models["qwen2"]
    model.save_pretrained(tmp_path / "m")  # weights and config, no tokenizer
    with pytest.raises(ModelNotAvailableError, match="encodes text to nothing.*no tokenizer files"):
        models.load_model(ModelSpec("tiny", str(tmp_path / "m")))


def test_unclear_loading_errors_name_the_file_the_cause_and_the_fix(tmp_path, tiny_models, monkeypatch):
    """A path taken for a hub id, an empty GGUF, truncated weights, a missing tokenizer
    directory and a CUDA device on a CPU machine each get an error that says which."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotAvailableError, match="not a local directory .* and not a hub id"):
        models.load_model(ModelSpec("x", "some/local/dir"))
    with pytest.raises(ModelNotAvailableError, match="meant as a local directory: none exists"):
        models.load_model(ModelSpec("x", "mymodels/llama"))
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(ModelNotAvailableError, match="empty.gguf is empty"):
        models.load_model(ModelSpec("x", str(tmp_path / "empty.gguf")))
    model, tok = tiny_models["qwen2"]
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    with pytest.raises(ModelNotAvailableError, match="tokenizer directory .*nowhere does not exist .*weights are fine"):
        models.load_model(ModelSpec("x", str(tmp_path / "m"), tokenizer=str(tmp_path / "nowhere")))
    if not torch.cuda.is_available():
        with pytest.raises(ModelNotAvailableError, match="device 'cuda'.*no CUDA device"):
            models.load_model(ModelSpec("x", str(tmp_path / "m"), device="cuda"))
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelNotAvailableError, match="truncated or corrupt"):
        models.load_model(ModelSpec("x", str(tmp_path / "m")))
