"""Fuser hub: round trip, reuse while the recipe is unchanged, clear error for a missing pair,
no corruption by concurrent, interrupted or hostile writers."""

import json
from pathlib import Path

import pytest
import torch

from fedrefine_lib.fuser import FuserLoadError, MissingFuserFileError
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


def _rank_trains(root: str, specs: dict, cfg: TrainConfig) -> None:
    """One rank of an ``accelerate launch``-like run: get or train the pair's fuser twice."""
    import os

    from fedrefine_lib.ranks import launch_state

    rank = int(os.environ["RANK"])
    os.environ.update(LOCAL_RANK=str(rank), ACCELERATE_USE_CPU="true")  # what `accelerate launch --cpu` sets
    assert launch_state().num_processes == 2
    receiver, sender = load_model(specs["tiny-qwen3"]), load_model(specs["tiny-llama"])
    hub = FuserHub(Path(root) / "hub")
    runs = [
        hub.get_or_train(receiver, sender, RECORDS, train_config=cfg, variant="concat", kind="concat", hidden=8)
        for _ in range(2)
    ]
    out = [{"weights": [float(p.sum()) for p in f.parameters()], "seconds": r["seconds"]} for f, r in runs]
    (Path(root) / f"rank{rank}.json").write_text(json.dumps(out))


@pytest.mark.slow
def test_every_rank_of_a_launch_trains_a_missing_fuser_once_and_nothing_hangs(tmp_path, pair):
    """Under several ranks (``accelerate launch``) the first holds the pair's training lock and
    every rank trains beside it (had each waited for the lock, the first would wait for them in
    its first all-reduce: the run hung); all end with the one stored fuser, then reuse it."""
    from functools import partial

    from fedrefine_lib import wire

    specs = {}
    for m in pair:
        m.model.save_pretrained(tmp_path / m.name)
        m.tokenizer.save_pretrained(tmp_path / m.name)
        specs[m.name] = ModelSpec(m.name, str(tmp_path / m.name))
    cfg = TrainConfig(lr=1e-2, max_steps=2, batch_size=1, progress=False)
    wire.launch([partial(_rank_trains, str(tmp_path), specs, cfg)] * 2, timeout_s=120)  # the old lock hung here
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]  # the same fuser and training record on every rank, both times
    assert ranks[0][0] == ranks[0][1]  # the second call reused the stored fuser
    hub = FuserHub(tmp_path / "hub")
    assert list(hub.index()) == ["tiny-llama->tiny-qwen3/concat"]
    assert hub.training("tiny-llama", "tiny-qwen3", "concat")["steps"] == 2


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


def _cut(path: Path) -> None:
    text = path.read_text()
    path.write_text(text[: len(text) // 2])


def test_truncated_hub_files_name_the_file_the_cause_and_the_fix(tmp_path, pair):
    """A truncated index.json, fuser_config.json or train.json read through the hub gives an
    error naming the file, why it cannot be read and what to do (no raw JSONDecodeError); the
    corrupt pair is then moved aside and retrained by get_or_train, the index listed again."""
    receiver, sender = pair
    hub = FuserHub(tmp_path / "hub")
    cfg = TrainConfig(lr=1e-2, max_steps=1, batch_size=3, progress=False)
    fuser, _ = hub.get_or_train(receiver, sender, RECORDS, train_config=cfg, hidden=8)
    directory = hub.pair_dir(sender.name, receiver.name)
    index = hub.root / "index.json"
    _cut(index)
    for call in (
        lambda: hub.get(sender, receiver),
        lambda: hub.has(sender.name, receiver.name),
        lambda: hub.get_or_train(receiver, sender, RECORDS, train_config=cfg, hidden=8),
    ):
        with pytest.raises(ValueError, match=r"hub index .*index.json is not valid JSON .*Move it aside"):
            call()
    index.rename(tmp_path / "index.json.bad")  # the fix the error names: nothing is retrained
    again, _ = hub.get_or_train(receiver, sender, RECORDS, train_config=cfg, hidden=8)
    assert hub.get(sender, receiver).config.hidden == 8 and not list(directory.parent.glob(".default.*-*"))
    for name in ("fuser_config.json", "train.json"):
        _cut(directory / name)
        with pytest.raises(
            FuserLoadError, match=rf"Corrupt .*{name}: not valid JSON .*interrupted write.*get_or_train"
        ):
            hub.get(sender, receiver)
        with pytest.warns(UserWarning, match=rf"could not be used .*{name}.*moved aside"):
            again, _ = hub.get_or_train(receiver, sender, RECORDS, train_config=cfg, hidden=8)
        assert all(torch.equal(a, b) for a, b in zip(fuser.state_dict().values(), again.state_dict().values()))
    (directory / "train.json").unlink()
    with pytest.raises(MissingFuserFileError, match=r"train.json is missing.*index lists this pair.*get_or_train"):
        hub.get(sender, receiver)
    assert not hub.has(sender.name, receiver.name)


def test_the_recipe_fingerprints_the_world_config(tmp_path, pair):
    """Fusers of one world config are not reused for another sharing the hub folder; the fuser
    of the other recipe is kept aside, not deleted. A study's hub carries its world's fingerprint."""
    from types import SimpleNamespace

    from fedrefine_lib.study import Study

    receiver, sender = pair
    cfg = TrainConfig(lr=1e-2, max_steps=1, batch_size=3, progress=False)
    one, other = FuserHub(tmp_path / "hub", world="v12-seed0-aaaa"), FuserHub(tmp_path / "hub", world="v12-seed0-bbbb")
    one.get_or_train(receiver, sender, RECORDS, train_config=cfg, hidden=8)
    assert one.training(sender.name, receiver.name)["recipe"]["world"] == "v12-seed0-aaaa"
    assert one.has(sender.name, receiver.name, recipe=one.recipe_for(receiver, sender, RECORDS, cfg, hidden=8))
    assert not other.has(sender.name, receiver.name, recipe=other.recipe_for(receiver, sender, RECORDS, cfg, hidden=8))
    with pytest.warns(UserWarning, match="was replaced; the previous version is kept at .*replaced-"):
        other.get_or_train(receiver, sender, RECORDS, train_config=cfg, hidden=8)
    kept = list(one.pair_dir(sender.name, receiver.name).parent.glob(".default.replaced-*"))
    assert len(kept) == 1 and json.loads((kept[0] / "train.json").read_text())["recipe"]["world"] == "v12-seed0-aaaa"
    world = SimpleNamespace(manifest={"world_version": 12, "seed": 0, "config_hash": "abc123"})
    study = Study(SimpleNamespace(name="mini", settings={}), 0, tmp_path / "data", tmp_path / "results", world)
    assert study.world_fingerprint == "v12-seed0-abc123" and study.hub().world == "v12-seed0-abc123"
    tasks = [SimpleNamespace(name="smol", settings={"task": {"kind": "context", "people": n}}) for n in (8, 9)]
    prints = [Study(t, 1, tmp_path / "data", tmp_path / "results").world_fingerprint for t in tasks]
    assert prints[0].startswith("task-seed1-") and prints[0] != prints[1]
    assert Study(SimpleNamespace(name="paper", settings={}), 0, tmp_path, tmp_path).hub().world is None


def test_weights_under_another_recipe_are_refused_and_retrained(tmp_path, pair):
    """A pair whose weights are one run's and whose train.json is another's is never served."""
    receiver, sender = pair
    hub = FuserHub(tmp_path / "hub")
    cfg = TrainConfig(lr=1e-2, max_steps=1, batch_size=3, progress=False)
    hub.get_or_train(receiver, sender, RECORDS, train_config=cfg, hidden=8)
    path = hub.pair_dir(sender.name, receiver.name) / "train.json"
    record = json.loads(path.read_text())
    record["recipe"] = hub.recipe_for(receiver, sender, RECORDS, cfg, hidden=16)
    path.write_text(json.dumps(record))
    with pytest.raises(FuserLoadError, match="config differs from the recipe in its train.json"):
        hub.get(sender, receiver)
    with pytest.warns(UserWarning, match="could not be used.*moved aside"):
        fuser, _ = hub.get_or_train(receiver, sender, RECORDS, train_config=cfg, hidden=16)
    assert fuser.config.hidden == 16 == hub.get(sender, receiver).config.hidden


def test_leftovers_of_killed_writers_are_swept_or_put_back(tmp_path, monkeypatch):
    """The next publisher removes a dead writer's staging directory and puts back the version a
    writer killed between its two renames had moved away (then replaces it as asked); another
    item's leftovers and live writers' directories are left alone."""
    import subprocess
    import sys

    from fedrefine_lib import store

    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True).stdout)
    target = tmp_path / "default"
    moved_away = tmp_path / f".default.old-{dead}-0123abcd"
    half = tmp_path / f".default.staging-{dead}-89abcdef"
    other_item = tmp_path / f".default.v2.old-{dead}-00000000"
    for path, text in ((moved_away, "1"), (half, "half"), (other_item, "x")):
        path.mkdir()
        (path / "v").write_text(text)
    store.recover(target)  # what a reader does when it finds the item missing
    assert (target / "v").read_text() == "1" and not moved_away.exists() and not half.exists() and other_item.exists()
    for exchange in (True, False):  # one atomic exchange, or two renames where the system has none
        if not exchange:
            monkeypatch.setattr(store, "_exchange", lambda a, b: False)
        new = store.staging_dir(target)
        (new / "v").write_text(str(exchange))
        seen = []
        with pytest.warns(UserWarning, match="previous version is kept"):
            store.publish(new, target, then=lambda: seen.append((target / "v").read_text()), keep=lambda old: True)
        assert seen == [str(exchange)] and (target / "v").read_text() == str(exchange)
    kept = sorted((p / "v").read_text() for p in tmp_path.glob(".default.replaced-*"))
    assert kept == ["1", "True"] and not list(tmp_path.glob(".default.staging-*")) + list(
        tmp_path.glob(".default.old-*")
    )


CONCURRENT_CFG = TrainConfig(lr=1e-2, max_steps=2, batch_size=3, progress=False)


def _digest(fuser) -> str:
    import hashlib

    return hashlib.sha256(b"".join(t.numpy().tobytes() for t in fuser.state_dict().values())).hexdigest()


def _train_or_die(root: str, pair, hidden: int, die_at: str | None, out: str) -> None:
    """A process (forked) that trains or reuses F_{tiny-llama -> tiny-qwen3} with ``hidden`` and
    records what it got; with ``die_at`` it is killed (SIGKILL) mid-publication instead: with
    half its weights written, between its two renames, or before its index update."""
    import os
    import signal

    from fedrefine_lib import hub as hublib
    from fedrefine_lib import safe_io, store

    def die(*_args, **_kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    if die_at == "weights":
        real_save = safe_io.save_file

        def half_then_die(state, path, metadata=None):
            real_save(state, path, metadata=metadata)
            Path(path).write_bytes(Path(path).read_bytes()[: Path(path).stat().st_size // 2])
            die()

        safe_io.save_file = half_then_die
    elif die_at == "renames":
        store._exchange = lambda a, b: False  # two renames: die after the first
        real_rename = os.rename

        def rename_then_die(a, b):
            real_rename(a, b)
            die()

        store.os.rename = rename_then_die
    elif die_at == "index":
        hublib.os.replace = die
    receiver, sender = pair
    fuser, record = FuserHub(root).get_or_train(receiver, sender, RECORDS, train_config=CONCURRENT_CFG, hidden=hidden)
    Path(out).write_text(json.dumps({"digest": _digest(fuser), "hidden": hidden, "seconds": record["seconds"]}))


def _read_until(root: str, pair, stop, expected: dict, out: str) -> None:
    """A process (forked) that loads the pair again and again until ``stop`` is set, checking
    each fuser served against the weights its recipe makes; counts failures."""
    receiver, sender = pair
    hub, reads, failures = FuserHub(root), 0, []
    while not stop.is_set() or reads == 0:
        try:
            if hub.has(sender.name, receiver.name):
                fuser = hub.get(sender, receiver)
                reads += 1
                if _digest(fuser) != expected[fuser.config.hidden]:
                    failures.append(f"hidden {fuser.config.hidden}: weights of another recipe")
        except Exception as err:  # any failure is a hub a reader saw half-written
            failures.append(repr(err))
    Path(out).write_text(json.dumps({"reads": reads, "failures": failures}))


def test_concurrent_and_killed_writers_never_corrupt_the_hub(tmp_path, pair):
    """Rounds of processes training the same pair at once (one recipe: the second trainer waits
    and reuses the first one's fuser; two recipes racing) while another writer is killed
    mid-publication (half-written weights, between renames, before its index update) and a
    reader loads the pair throughout: the reader never fails and every fuser it gets has the
    weights its recipe makes; after each round the pair loads strictly, its index entry names
    the recipe in its own train.json (redone by the next get_or_train where a writer died before
    writing it), and dead writers' leftovers are gone after the next publication."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")  # the tiny models are already loaded: rounds start at once
    expected = {}
    for hidden in (8, 12, 16):
        fuser, _ = FuserHub(tmp_path / f"reference{hidden}").get_or_train(
            *pair, RECORDS, train_config=CONCURRENT_CFG, hidden=hidden
        )
        expected[hidden] = _digest(fuser)
    root = tmp_path / "hub"
    rounds = [(None, (8, 8))] + [(die_at, (8, 16)) for die_at in ("weights", "index", "renames")] * 2
    for round_, (die_at, racers) in enumerate(rounds):
        stop, outs = ctx.Event(), [tmp_path / f"out{round_}-{i}.json" for i in range(4)]
        reader = ctx.Process(target=_read_until, args=(str(root), pair, stop, expected, str(outs[3])))
        reader.start()
        writers = [
            ctx.Process(target=_train_or_die, args=(str(root), pair, hidden, where, str(out)))
            for hidden, where, out in zip((*racers, 12), (None, None, die_at), outs)
            if where or hidden != 12
        ]
        for w in writers:
            w.start()
        for w in writers:
            w.join(120)
        stop.set()
        reader.join(120)
        assert [w.exitcode for w in writers] == [0, 0] + ([-9] if die_at else []) and reader.exitcode == 0
        read = json.loads(outs[3].read_text())
        assert read["failures"] == [] and read["reads"] > 0, read
        got = [json.loads(out.read_text()) for out in outs[:2]]
        assert all(g["digest"] == expected[g["hidden"]] for g in got)
        if die_at is None:  # one recipe: trained once, the second trainer reused it
            assert got[0]["seconds"] == got[1]["seconds"] and not list(root.rglob(".default.replaced-*"))
        hub = FuserHub(root)
        served = hub.get(*reversed(pair))
        stored = hub.training("tiny-llama", "tiny-qwen3")
        assert _digest(served) == expected[served.config.hidden] == expected[stored["recipe"]["fuser"]["hidden"]]
        if hub.index()["tiny-llama->tiny-qwen3/default"]["recipe"] != stored["recipe"]:  # the killed writer's
            hub.get_or_train(*pair, RECORDS, train_config=CONCURRENT_CFG, hidden=served.config.hidden)  # is redone
        assert hub.index()["tiny-llama->tiny-qwen3/default"]["recipe"] == stored["recipe"]
    with pytest.warns(UserWarning, match="previous version is kept"):  # one more publication sweeps
        hub.get_or_train(*pair, RECORDS, train_config=CONCURRENT_CFG, hidden=24)
    assert not list(root.rglob(".*staging-*")) and not list(root.rglob(".*old-*"))
