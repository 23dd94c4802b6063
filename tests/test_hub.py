"""Fuser hub: round trip, reuse while the recipe is unchanged, clear error for a missing pair,
no corruption by concurrent, interrupted or hostile writers."""

import json
from pathlib import Path

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


def test_names_that_leave_the_root_are_refused(tmp_path):
    hub = FuserHub(tmp_path / "hub")
    for sender, receiver, variant in (("../../x", "r", "default"), ("/abs", "r", "default"), ("s", "r", "../v")):
        with pytest.raises(ValueError, match="not a valid name.*outside the hub's root"):
            hub.pair_dir(sender, receiver, variant)
    assert hub.pair_dir("mini-qwen2.5-0.5b", "smollm2-135m-instruct", "concat_top").is_relative_to(hub.root)
    assert not any((tmp_path).glob("x"))


def test_changed_model_weights_or_template_retrain_the_fuser(tmp_path, pair):
    """The recipe fingerprints both models: other weights or another chat template under the
    same name make a new recipe, so the stored fuser is not reused."""
    import copy

    receiver, sender = pair
    hub = FuserHub(tmp_path / "hub")
    cfg = TrainConfig(lr=1e-2, max_steps=1, batch_size=3, progress=False)
    hub.get_or_train(receiver, sender, RECORDS, train_config=cfg, hidden=8)
    same = LoadedModel(sender.name, sender.model, sender.tokenizer)
    assert same.fingerprint == sender.fingerprint
    assert hub.has(sender.name, receiver.name, recipe=hub.recipe_for(receiver, same, RECORDS, cfg, hidden=8))
    changed = LoadedModel(sender.name, copy.deepcopy(sender.model), sender.tokenizer)
    with torch.no_grad():
        next(changed.model.parameters()).add_(1e-3)
    template = copy.deepcopy(receiver.tokenizer)
    template.chat_template = (template.chat_template or "") + "{# changed #}"
    retemplated = LoadedModel(receiver.name, receiver.model, template)
    assert len({sender.fingerprint, changed.fingerprint}) == 2 and retemplated.fingerprint != receiver.fingerprint
    for r, s in ((receiver, changed), (retemplated, sender)):
        assert not hub.has(s.name, r.name, recipe=hub.recipe_for(r, s, RECORDS, cfg, hidden=8))


def test_a_corrupt_pair_is_moved_aside_and_retrained(tmp_path, pair):
    receiver, sender = pair
    hub = FuserHub(tmp_path / "hub")
    cfg = TrainConfig(lr=1e-2, max_steps=1, batch_size=3, progress=False)
    fuser, _ = hub.get_or_train(receiver, sender, RECORDS, train_config=cfg, hidden=8)
    weights = hub.pair_dir(sender.name, receiver.name) / "fuser.safetensors"
    weights.write_bytes(weights.read_bytes()[: len(weights.read_bytes()) // 2])  # a writer killed mid-file
    with pytest.warns(UserWarning, match="could not be used.*moved aside"):
        again, _ = hub.get_or_train(receiver, sender, RECORDS, train_config=cfg, hidden=8)
    assert all(torch.equal(a, b) for a, b in zip(fuser.state_dict().values(), again.state_dict().values()))
    assert len(list(weights.parent.parent.glob(".default.corrupt-*"))) == 1  # kept, not deleted


def test_a_staging_directory_left_by_a_killed_writer_is_never_read(tmp_path, pair):
    receiver, sender = pair
    hub = FuserHub(tmp_path / "hub")
    cfg = TrainConfig(lr=1e-2, max_steps=1, batch_size=3, progress=False)
    hub.get_or_train(receiver, sender, RECORDS, train_config=cfg, hidden=8)
    from fedrefine_lib.store import staging_dir

    partial = staging_dir(hub.pair_dir(sender.name, receiver.name))
    (partial / "fuser.safetensors").write_bytes(b"\0" * 10)
    assert hub.get(sender, receiver).config.hidden == 8


def _train_same_pair(root: str, specs: dict, hidden: int, out: str) -> None:
    """A process that trains (or reuses) F_{tiny-llama -> tiny-qwen3} and writes its weights' digest."""
    import hashlib

    from fedrefine_lib.hub import FuserHub
    from fedrefine_lib.models import load_model
    from fedrefine_lib.train import TrainConfig

    torch.set_num_threads(1)
    r, s = load_model(specs["tiny-qwen3"]), load_model(specs["tiny-llama"])
    cfg = TrainConfig(lr=1e-2, max_steps=3, batch_size=3, progress=False)
    fuser, record = FuserHub(root).get_or_train(r, s, RECORDS, train_config=cfg, hidden=hidden)
    digest = hashlib.sha256(b"".join(t.numpy().tobytes() for t in fuser.state_dict().values())).hexdigest()
    Path(out).write_text(json.dumps({"digest": digest, "recipe": record["recipe"]}))


def _read_while_published(root: str, specs: dict, seconds: float, out: str) -> None:
    """A process that loads the pair again and again while trainers publish; counts failures."""
    import time

    from fedrefine_lib.hub import FuserHub
    from fedrefine_lib.models import load_model

    torch.set_num_threads(1)
    r, s = load_model(specs["tiny-qwen3"]), load_model(specs["tiny-llama"])
    hub, reads, failures, end = FuserHub(root), 0, [], time.time() + seconds
    while time.time() < end:
        if hub.has("tiny-llama", "tiny-qwen3"):
            try:
                hub.get(s, r)
                reads += 1
            except Exception as err:  # any failure is a hub a reader saw half-written
                failures.append(repr(err))
    Path(out).write_text(json.dumps({"reads": reads, "failures": failures}))


@pytest.mark.slow
def test_concurrent_trainers_of_one_pair_leave_a_consistent_hub(tmp_path, pair):
    """Processes training the same pair at once (two recipes, racing) never corrupt the hub: a
    reader loading the pair throughout never fails, and afterwards the stored fuser loads
    strictly, its index entry names the recipe in its own train.json, and no staging or old
    directory is left."""
    import multiprocessing as mp

    specs = {}
    for m in pair:
        m.model.save_pretrained(tmp_path / m.name)
        m.tokenizer.save_pretrained(tmp_path / m.name)
        specs[m.name] = ModelSpec(m.name, str(tmp_path / m.name))
    ctx = mp.get_context("spawn")
    for round_ in range(2):
        root, outs = tmp_path / f"hub{round_}", []
        procs = []
        for i, hidden in enumerate((8, 8, 16)):
            outs.append(tmp_path / f"out{round_}-{i}.json")
            procs.append(ctx.Process(target=_train_same_pair, args=(str(root), specs, hidden, str(outs[-1]))))
        reader = tmp_path / f"reader{round_}.json"
        procs.append(ctx.Process(target=_read_while_published, args=(str(root), specs, 25.0, str(reader))))
        for p in procs:
            p.start()
        for p in procs:
            p.join(120)
            assert p.exitcode == 0
        results = [json.loads(o.read_text()) for o in outs]
        read = json.loads(reader.read_text())
        assert read["failures"] == [] and read["reads"] > 0, read
        assert results[0]["digest"] == results[1]["digest"]  # the same recipe gives the same fuser
        hub = FuserHub(root)
        r, s = load_model(specs["tiny-qwen3"]), load_model(specs["tiny-llama"])
        stored = hub.training("tiny-llama", "tiny-qwen3")
        assert hub.index()["tiny-llama->tiny-qwen3/default"]["recipe"] == stored["recipe"]
        hidden = stored["recipe"]["fuser"]["hidden"]
        assert hub.get(s, r).config.hidden == hidden
        assert not list(root.rglob(".*staging-*")) and not list(root.rglob(".*old-*"))
