"""The C2C fuser: identity at init, closed gates, heterogeneous shapes, strict save/load."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from fedrefine_lib import federation
from fedrefine_lib.decode import generate
from fedrefine_lib.engine import Standalone, continue_prefill
from fedrefine_lib.fuser import (
    FuserConfig,
    FuserLoadError,
    MissingFuserFileError,
    PairMismatchError,
    ResidualFuser,
    load_fuser,
)
from fedrefine_lib.models import LoadedModel
from fedrefine_lib.safe_io import config_digest, sha256

PROMPTS = [
    [{"role": "user", "content": "What colour does zorblat glow?"}],
    [{"role": "user", "content": "The fox jumps."}],
]


def random_fuser(receiver, sender, seed=0, **kw) -> ResidualFuser:
    """A fuser whose every weight (the zero-initialised projection too) is random."""
    torch.manual_seed(seed)
    fuser = ResidualFuser(FuserConfig.for_pair(receiver, sender, hidden=16, **kw))
    with torch.no_grad():
        for p in fuser.parameters():
            p.normal_(0, 0.3)
    return fuser.eval()


def last_logits(engine):
    pre = engine.prefill(PROMPTS)
    return continue_prefill(engine.receiver.model, pre)[:, -1]


@pytest.mark.parametrize("sender", ["qwen2", "llama", "gemma3"])
def test_fuser_at_init_is_the_receiver_alone(loaded_models, sender):
    fuser = ResidualFuser(FuserConfig.for_pair(loaded_models["qwen3"], loaded_models[sender], hidden=16)).eval()
    fuser.set_gates(True)  # open: the zero-initialised projection alone makes it exact
    with torch.no_grad():
        c2c = federation.C2C(loaded_models["qwen3"], loaded_models[sender], fuser).prefill(PROMPTS)
        alone = Standalone(loaded_models["qwen3"]).prefill(PROMPTS)
    for a, b in zip(c2c.cache.keys + c2c.cache.values, alone.cache.keys + alone.cache.values):
        assert torch.equal(a, b)


@pytest.mark.parametrize("sender", ["qwen2", "llama", "gemma3"])
def test_closed_gates_give_the_receiver_alone(loaded_models, sender):
    receiver = loaded_models["qwen3"]
    fuser = random_fuser(receiver, loaded_models[sender])
    c2c = federation.C2C(receiver, loaded_models[sender], fuser)
    with torch.no_grad():
        alone = last_logits(Standalone(receiver))
        fuser.set_gates(True)
        assert not torch.allclose(last_logits(c2c), alone)  # the fuser does act when open
        fuser.set_gates(False)
        assert torch.equal(last_logits(c2c), alone)
        fuser.set_gates(None)
        fuser.gate_logits.fill_(-1.0)  # hard inference gate 1[l > 0]: closed
        assert torch.equal(last_logits(c2c), alone)
    texts_c2c, _ = generate(c2c, PROMPTS, 6)
    texts_alone, _ = generate(Standalone(receiver), PROMPTS, 6)
    assert texts_c2c == texts_alone


def test_gates_train_and_inference(loaded_models):
    fuser = ResidualFuser(FuserConfig.for_pair(loaded_models["qwen3"], loaded_models["llama"], hidden=8))
    assert fuser.gate_logits.shape == (3, 2) and (fuser.gate_logits == 0).all()
    fuser.train()
    g = fuser.gates()
    assert ((g > 0) & (g < 1)).all() or fuser.temperature < 1  # Gumbel-sigmoid samples
    fuser.eval()
    assert (fuser.gates() == 0).all()  # 1[0 > 0]
    fuser.gate_threshold = -0.5
    assert (fuser.gates() == 1).all()
    fuser.set_gates([True, False, True])
    assert fuser.gates()[:, 0].tolist() == [1, 0, 1] and fuser.gates()[:, 1].tolist() == [1, 0, 1]
    fuser.set_gates([[1, 0], [0, 1], [0, 0]])
    assert fuser.gates().tolist() == [[1, 0], [0, 1], [0, 0]]


@pytest.mark.parametrize(
    "receiver,sender", [("qwen3", "llama"), ("llama", "qwen2"), ("qwen2", "gemma3"), ("gemma3", "qwen3")]
)
def test_heterogeneous_shapes(loaded_models, receiver, sender):
    r, s = loaded_models[receiver], loaded_models[sender]
    fuser = random_fuser(r, s, layer_map="depth")
    fuser.set_gates(True)
    with torch.no_grad():
        pre = federation.C2C(r, s, fuser).prefill(PROMPTS)
    layers, heads, dim = fuser.config.receiver_layers, fuser.config.receiver_kv_heads, fuser.config.receiver_head_dim
    assert pre.cache.num_layers == layers
    assert all(k.shape == (2, heads, pre.input_ids.shape[1] - 1, dim) for k in pre.cache.keys)


def test_wrong_caches_and_pairs_are_named(loaded_models):
    fuser = random_fuser(loaded_models["qwen3"], loaded_models["llama"])
    cache = Standalone(loaded_models["qwen3"]).prefill(PROMPTS).cache
    with pytest.raises(ValueError, match="sender KV .* is not \\[B, 5, N, 8\\].*align.align_cache"):
        fuser(cache, cache, torch.ones(2, cache.keys[0].shape[2], dtype=torch.bool))
    with pytest.raises(PairMismatchError, match="sender_layers: fuser has 4, models have 2"):
        federation.C2C(loaded_models["qwen3"], loaded_models["qwen2"], fuser)


# ------------------------------------------------------------------- save / load


@pytest.fixture
def saved(tmp_path, loaded_models):
    fuser = random_fuser(loaded_models["qwen3"], loaded_models["llama"], seed=3)
    fuser.save_pretrained(tmp_path / "f")
    return fuser, tmp_path / "f"


def resign(path, edit=lambda meta: None) -> None:
    """Apply ``edit`` to a saved fuser's config and record fresh checksums (an attacker's edit)."""
    meta = json.loads((path / "fuser_config.json").read_text())
    edit(meta)
    meta["sha256"] = sha256(path / "fuser.safetensors")
    meta["config_sha256"] = config_digest(meta)
    (path / "fuser_config.json").write_text(json.dumps(meta))


def test_round_trip_identical_outputs(saved, loaded_models):
    fuser, path = saved
    meta = json.loads((path / "fuser_config.json").read_text())
    assert meta["config"]["receiver_name"] == "qwen3" and meta["config"]["sender_name"] == "llama"
    assert meta["config"]["layer_map"] == [1, 2, 3] and meta["config"]["aligner"] == "span"
    back = load_fuser(path, receiver=loaded_models["qwen3"], sender=loaded_models["llama"])
    for g in (True, None):
        fuser.set_gates(g)
        back.set_gates(g)
        with torch.no_grad():
            a = last_logits(federation.C2C(loaded_models["qwen3"], loaded_models["llama"], fuser))
            b = last_logits(federation.C2C(loaded_models["qwen3"], loaded_models["llama"], back))
        assert torch.equal(a, b)


def test_wrong_pair_names_the_difference(saved, loaded_models):
    _, path = saved
    with pytest.raises(PairMismatchError, match=r"sender_name: fuser has 'llama', models have 'qwen2'") as e:
        load_fuser(path, receiver=loaded_models["qwen3"], sender=loaded_models["qwen2"])
    assert "sender_layers" in str(e.value) and "sender_vocab" in str(e.value)
    renamed = LoadedModel("llama-other", loaded_models["llama"].model, loaded_models["llama"].tokenizer)
    with pytest.raises(PairMismatchError, match="sender_name"):
        load_fuser(path, receiver=loaded_models["qwen3"], sender=renamed)


def test_corrupt_weights(saved):
    _, path = saved
    blob = bytearray((path / "fuser.safetensors").read_bytes())
    blob[-5] ^= 0xFF
    (path / "fuser.safetensors").write_bytes(bytes(blob))
    with pytest.raises(FuserLoadError, match="Corrupt .*fuser.safetensors: sha256"):
        load_fuser(path)


def test_truncated_weights_with_matching_checksum(saved):
    _, path = saved
    (path / "fuser.safetensors").write_bytes((path / "fuser.safetensors").read_bytes()[:100])
    resign(path)
    with pytest.raises(FuserLoadError, match="Corrupt"):
        load_fuser(path)


def test_corrupt_config(saved):
    _, path = saved
    text = (path / "fuser_config.json").read_text()
    (path / "fuser_config.json").write_text(text[: len(text) // 2])  # cut short
    with pytest.raises(
        FuserLoadError, match="Corrupt .*fuser_config.json: not valid JSON .*interrupted write.*Re-save"
    ):
        load_fuser(path)


def test_missing_and_extra_tensors(saved):
    _, path = saved
    state = load_file(str(path / "fuser.safetensors"))
    del state["value_projectors.2.proj_out.weight"]
    state["stray"] = torch.zeros(1)
    save_file(state, str(path / "fuser.safetensors"))
    resign(path)
    with pytest.raises(
        FuserLoadError,
        match=r"missing tensors \['value_projectors.2.proj_out.weight'\].*unexpected tensors \['stray'\]",
    ):
        load_fuser(path)


def test_an_edited_config_is_refused(saved):
    """The checksum covers the config: an edited layer map is refused, and one the attacker
    re-signed still has to match the weights' header, checked before anything is allocated."""
    _, path = saved
    meta = json.loads((path / "fuser_config.json").read_text())
    meta["config"]["layer_map"] = [0, 0, 0]
    (path / "fuser_config.json").write_text(json.dumps(meta))
    with pytest.raises(FuserLoadError, match="config_sha256 does not match its contents"):
        load_fuser(path)
    resign(path, lambda m: m["config"].update(hidden=1_000_000))  # would allocate GBs if built
    with pytest.raises(FuserLoadError, match="does not match its config: .*wrong shapes"):
        load_fuser(path)


@pytest.mark.parametrize("key", ["aligner", "hidden"])
def test_a_missing_config_key_is_named(saved, key):
    """A config without a key (re-signed, so the checksum passes) names the key and the file,
    instead of silently taking the default (``identity`` aligner, 128 wide)."""
    _, path = saved
    resign(path, lambda m: m["config"].pop(key))
    with pytest.raises(FuserLoadError, match=rf"Corrupt .*fuser_config.json: config lacks \['{key}'\].*retrain"):
        load_fuser(path)
    resign(path, lambda m: m["config"].update({key: 16 if key == "hidden" else "span", "width": 3}))
    with pytest.raises(FuserLoadError, match=r"config has unknown keys \['width'\]"):
        load_fuser(path)


def test_a_concat_fuser_opened_with_the_residual_loader_is_named(loaded_models, tmp_path):
    """``load_fuser(kind="residual")`` on a concat fuser says which kind the file holds and how
    to run it, before any weight is read; so does the hub asked for residual fusers."""
    from fedrefine_lib.fuser import BlockFuser
    from fedrefine_lib.hub import FuserHub
    from fedrefine_lib.train import TrainResult

    receiver, sender = loaded_models["qwen3"], loaded_models["llama"]
    concat = BlockFuser(FuserConfig.for_pair(receiver, sender, kind="concat", hidden=16)).eval()
    concat.save_pretrained(tmp_path / "c")
    with pytest.raises(FuserLoadError, match=r"holds a 'concat' fuser, not a 'residual' one.*kind='concat'"):
        load_fuser(tmp_path / "c", receiver, sender, kind="residual")
    assert load_fuser(tmp_path / "c", receiver, sender, kind="concat").kind == "concat"
    hub = FuserHub(tmp_path / "hub")
    hub.put(concat, TrainResult([1.0], {}, 1, 0.0), {"test": 1}, variant="default")
    with pytest.raises(ValueError, match=r"variant 'default' holds fusers of kinds \{'llama': 'concat'\}.*'residual'"):
        hub.fusers(receiver, [sender], "residual")


def test_non_finite_weights_are_refused_at_save_and_load(saved, tmp_path):
    fuser, path = saved
    state = load_file(str(path / "fuser.safetensors"))
    name = sorted(state)[0]
    state[name][..., 0] = float("nan")
    save_file(state, str(path / "fuser.safetensors"))
    resign(path)
    with pytest.raises(FuserLoadError, match=f"tensors \\['{name}'\\] hold NaN or inf"):
        load_fuser(path)
    with torch.no_grad():
        next(fuser.parameters()).fill_(float("inf"))
    with pytest.raises(ValueError, match="Not saving .*hold NaN or inf"):
        fuser.save_pretrained(tmp_path / "inf")
    assert not (tmp_path / "inf").exists()


def test_missing_file(saved):
    _, path = saved
    (path / "fuser.safetensors").unlink()
    with pytest.raises(MissingFuserFileError, match="No fuser.safetensors"):
        load_fuser(path)
    with pytest.raises(FileNotFoundError):
        load_fuser(path / "nowhere")
