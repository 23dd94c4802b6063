"""Fuser hub: round trip, reuse while the recipe is unchanged, clear error for a missing pair."""

import pytest
import torch

from fedrefine_lib.hub import FuserHub, FuserJob, MissingFuserError
from fedrefine_lib.models import LoadedModel, ModelSpec, load_model
from fedrefine_lib.train import TrainConfig

RECORDS = [
    [{"role": "user", "content": f"What colour does zorblat {i} glow?"}, {"role": "assistant", "content": "blue"}]
    for i in range(6)
]


@pytest.fixture()
def pair(tiny_models):
    (r, rt), (s, st) = tiny_models["qwen3"], tiny_models["llama"]
    return LoadedModel("tiny-qwen3", r, rt), LoadedModel("tiny-llama", s, st)


def test_hub_round_trip_and_reuse(tmp_path, pair):
    receiver, sender = pair
    hub = FuserHub(tmp_path / "hub")
    cfg = TrainConfig(lr=1e-2, max_steps=2, batch_size=3, progress=False)
    fuser, record = hub.get_or_train(receiver, sender, RECORDS, train_config=cfg, hidden=16)
    assert record["steps"] == 2 and len(record["losses"]) == 2
    loaded = hub.get(sender, receiver)  # strict load, checked against the models
    for (k, a), b in zip(fuser.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    row = hub.summary().iloc[0]
    assert (row.sender, row.receiver, row.aligner) == ("tiny-llama", "tiny-qwen3", "span")
    assert row.parameters == fuser.num_parameters()

    # Same recipe: nothing retrained. Changed recipe: retrained (and reported by train_missing).
    load = {"tiny-qwen3": receiver, "tiny-llama": sender}.get
    job = FuserJob("tiny-llama", "tiny-qwen3", options={"hidden": 16})
    assert hub.train_missing(load, [job], RECORDS, train_config=cfg) == []
    trained = hub.train_missing(
        load, [FuserJob("tiny-llama", "tiny-qwen3", options={"hidden": 8})], RECORDS, train_config=cfg
    )
    assert trained == ["tiny-llama->tiny-qwen3/default"]
    assert hub.get(sender, receiver).config.hidden == 8
    with pytest.raises(ValueError, match="unknown kind 'concatenate'"):
        FuserJob("tiny-llama", "tiny-qwen3", "concat", "concatenate")


def test_train_missing_in_worker_processes_matches_one_by_one(tmp_path, pair):
    """Two fusers trained in two worker processes are bit-identical to the same fusers
    trained in this process, and both land in the index."""
    receiver, sender = pair
    specs = {}
    for m in pair:  # workers load models from disk
        m.model.save_pretrained(tmp_path / m.name)
        m.tokenizer.save_pretrained(tmp_path / m.name)
        specs[m.name] = ModelSpec(m.name, str(tmp_path / m.name))
    local = {n: load_model(s) for n, s in specs.items()}
    cfg = TrainConfig(lr=1e-2, max_steps=2, batch_size=3, progress=False)
    jobs = [
        FuserJob("tiny-llama", "tiny-qwen3", options={"hidden": 8}),
        FuserJob("tiny-llama", "tiny-qwen3", "concat", "concat", {"hidden": 8}),
    ]
    parallel, serial = FuserHub(tmp_path / "parallel"), FuserHub(tmp_path / "serial")
    trained = parallel.train_missing(local.get, jobs, RECORDS, train_config=cfg, workers=2, spec=specs.get)
    assert sorted(trained) == ["tiny-llama->tiny-qwen3/concat", "tiny-llama->tiny-qwen3/default"]
    assert serial.train_missing(local.get, jobs, RECORDS, train_config=cfg) == trained
    assert sorted(parallel.index()) == sorted(serial.index())
    for job in jobs:
        a = parallel.get(local["tiny-llama"], local["tiny-qwen3"], job.variant).state_dict()
        b = serial.get(local["tiny-llama"], local["tiny-qwen3"], job.variant).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), job.variant
    with pytest.raises(ValueError, match="needs spec"):
        FuserHub(tmp_path / "other").train_missing(local.get, jobs, RECORDS, train_config=cfg, workers=2)


def test_missing_pair_error_names_it(tmp_path, pair):
    receiver, sender = pair
    hub = FuserHub(tmp_path / "hub")
    with pytest.raises(MissingFuserError, match="tiny-qwen3->tiny-llama.*train_missing"):
        hub.get(receiver, sender)


def test_hub_stores_concat_fusers_by_kind(tmp_path, pair):
    receiver, sender = pair
    hub = FuserHub(tmp_path / "hub")
    cfg = TrainConfig(lr=1e-2, max_steps=1, batch_size=3, progress=False)
    fuser, _ = hub.get_or_train(receiver, sender, RECORDS, variant="concat", kind="concat", train_config=cfg, hidden=8)
    assert fuser.kind == "concat" and hub.get(sender, receiver, "concat").kind == "concat"
    assert hub.get_or_train(receiver, sender, RECORDS, train_config=cfg, hidden=8)[0].kind == "residual"


def test_ablation_jobs_change_one_thing_each():
    from fedrefine_lib.hub import ablation_jobs, check_ablations

    options = {"hidden": 8, "layer_map": "top", "sender_positions": 1}
    jobs = ablation_jobs("s", "r", "concat", options, ["fusion", "positions", "reencode", "layer_map"])
    assert {k: (j.variant, j.kind) for k, j in jobs.items()} == {
        "fusion": ("default", "residual"),
        "positions": ("concat_all_positions", "concat"),
        "reencode": ("reencode", "residual"),
        "layer_map top_down": ("concat_top_down", "concat"),
        "layer_map bottom_up": ("concat_bottom_up", "concat"),
    }
    assert jobs["positions"].options == {"hidden": 8, "layer_map": "top", "sender_positions": None}
    assert jobs["fusion"].options == {"hidden": 8, "layer_map": "top"}  # residual jobs drop sender_positions
    assert "prefix" in ablation_jobs("s", "r", "concat", options, ["prefix"])
    assert "positions" not in ablation_jobs("s", "r", "residual", {}, ["positions"])  # residual sends every position
    with pytest.raises(ValueError, match="ablations=.*'fusoin'.*give a list"):
        check_ablations(["fusoin"])
    with pytest.raises(ValueError, match="give a list"):
        ablation_jobs("s", "r", "concat", options, "fusion")
