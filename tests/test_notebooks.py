"""Every notebook is committed clean, is parameterised, and runs end to end with smoke
parameters, writing its metrics file with the documented keys and sane values."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9]*.ipynb"))

# notebook stem -> (metrics file name, dotted keys that must hold an accuracy record)
EXPECTED = {
    "00_world": ("world.json", ["oracle", "pair_oracle.all", "rephrase_fidelity.faithful_and_private"]),
    "01_c2c": (
        "c2c.json",
        [
            "accuracy.receiver_alone",
            "accuracy.sender_alone",
            "accuracy.c2c",
            "accuracy.t2t",
            "accuracy.t2t_answer",
            "accuracy.finetuned_receiver",
            "accuracy.oracle",
        ],
    ),
    "02_co_c2c": ("co_c2c.json", []),
    "03_fedrefine": (
        "fedrefine.json",
        [
            "oracle",
            "policies.equal",
            "policies.prior",
            "policies.learned_gate",
            "policies.oracle_selection_knowing",
            "two_device.oracle",
            "two_device.policies.route to one (validation)",
            "two_device.policies.best two (validation)",
        ],
    ),
    "04_case_study": (
        "case_study.json",
        [
            "oracle",
            "panel_a_selected",
            "four_senders.KV-Rephrased",
            "four_senders.Token-TemplateSwap",
            "four_senders.Answer-Original",
            "routed.accuracy.KV, routed",
            "routed.accuracy.delegation",
        ],
    ),
    "05_transport_qos": ("transport_qos.json", []),
    "06_privacy": ("privacy.json", []),
}


# Extra small sizes per notebook for the smoke run (names from each parameters cell).
SMOKE = {
    "01_c2c": {"train_steps": 4},
    "02_co_c2c": {"train_steps": 4},
    "03_fedrefine": {"train_steps": 4, "eval_limit": 24},
    "04_case_study": {"train_steps": 4, "eval_limit": 24},
    "05_transport_qos": {"train_steps": 4, "eval_limit": 24, "trace_requests": 40, "real_queries": 4},
    "06_privacy": {
        "train_steps": 4,
        "eval_limit": 24,
        "attack_queries": 2,
        "decoder_chats": 16,
        "decoder_steps": 5,
        "noise_levels": [1.0],
    },
}


def _cells(path: Path):
    return nbformat.read(path, as_version=4).cells


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_clean_and_parameterised(path):
    cells = _cells(path)
    assert not [c for c in cells if c.cell_type == "code" and (c.outputs or c.execution_count)], (
        f"{path.name} has outputs; clear them (executed copies belong in results/)"
    )
    tagged = [c for c in cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{path.name} needs exactly one cell tagged 'parameters'"
    for name in ("profile", "seed", "smoke", "results_dir"):
        assert f"{name} =" in tagged[0].source, f"{path.name}: parameters cell lacks {name!r}"
    assert path.stem in EXPECTED, f"add {path.stem} to EXPECTED in {__file__}"


def _accuracy_ok(record) -> bool:
    lo, hi = record["ci95"]
    return record["n"] > 0 and 0.0 <= lo <= record["value"] <= hi <= 1.0


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_with_smoke_parameters(path, tmp_path_factory):
    import papermill

    # One data dir for the whole session: later notebooks reuse the smoke world and fusers.
    data_dir = tmp_path_factory.getbasetemp() / "smoke-data"
    results = tmp_path_factory.mktemp("results")
    papermill.execute_notebook(
        str(path),
        str(results / path.name),
        cwd=str(path.parent),
        kernel_name="python3",
        parameters={
            "profile": "mini",
            "seed": 0,
            "smoke": True,
            "results_dir": str(results),
            "data_dir": str(data_dir),
            **SMOKE.get(path.stem, {}),
        },
        progress_bar=False,
    )
    metrics_name, keys = EXPECTED[path.stem]
    metrics = json.loads((results / metrics_name).read_text())
    assert metrics["notebook"] == path.stem and metrics["profile"] == "mini" and metrics["seed"] == 0
    assert metrics["parameters"]["smoke"] is True
    assert metrics["timings"]["total"] > 0
    assert {"cpu", "torch_cpu_capability", "torch", "transformers"} <= set(metrics["machine"])
    for key in keys:
        node = metrics
        for part in key.split("."):
            node = node[part]
        assert _accuracy_ok(node), f"{metrics_name}: {key} = {node}"
    assert list((results / "figures").glob("*.png")), "the notebook should save its figures"
    from fedrefine_lib.seeds import HEADLINES, lookup

    for label, (name, key) in HEADLINES.items():  # `make seeds` finds every headline it reads
        if name == metrics_name:
            value = lookup(metrics, key)
            assert value is None or isinstance(value, (int, float)), (label, value)
    paired = {k: v for k, v in metrics.items() if "paired" in k}  # every "A beats B": a paired difference
    for group in paired.values():
        for d in group.values():
            assert d["ci_low"] <= d["diff"] <= d["ci_high"] and 0 < d["p_value"] <= 1 and d["n"] > 0, d
    if path.stem == "03_fedrefine":  # the gated sweep covers every sender count; checks are booleans
        assert metrics["by_senders_gate"]["k"] == [0, 1, 2, 3, 4]
        assert metrics["checks"] and all(isinstance(v, bool) for v in metrics["checks"].values())
        assert set(metrics["gate_weights_by_domain"]) == {"science", "code", "biology", "geography", "physics"}
        # the router's rows are shares of questions: a sender, or the receiver alone ("own")
        assert all(abs(sum(row.values()) - 1) < 1e-6 for row in metrics["gate_weights_by_domain"].values())
        assert metrics["parameters"]["gate_objective"] == "selection"
        assert all(0 <= v <= 1 for row in metrics["gate_targets_by_domain"].values() for v in row.values())
    if path.stem == "04_case_study":  # the paper's privacy model: what reaches the senders
        leaks = metrics["rephrase"]["leakage"]
        assert leaks["original"]["private_survival"] == leaks["template swap"]["private_survival"] == 1.0
        assert 0.0 <= leaks["rephrased"]["private_survival"] <= 1.0 and leaks["rephrased"]["n"] == 4 * 24
        assert {r["sent"] for r in metrics["privacy_vs_accuracy"]} == {"original", "rephrased", "template swap"}
    if path.stem == "05_transport_qos":
        _check_transport_metrics(metrics)
    if path.stem == "06_privacy":
        _check_privacy_metrics(metrics)
    if path.stem == "01_c2c":  # the cache probe: one accuracy per layer, sender and receiver
        probes = metrics["cache_probe_last_token"]
        assert len(probes) == 2 and all(0 <= a <= 1 for accs in probes.values() for a in accs)
        # the positions ablation ran, and a mini sender sends one position's cache per query
        labels = set(metrics["ablation_sender_domains"])
        assert {"concat: top, last position", "concat: top, all positions"} <= labels, labels
        assert all(_accuracy_ok(v) for v in metrics["ablation_sender_domains"].values())
        assert metrics["c2c_bytes_per_query"] == metrics["bytes_per_token"]["kv"]["bfloat16"]


def _check_transport_metrics(metrics: dict) -> None:
    """05: every option measured on both splits, bytes that shrink with the encoding, the
    policy's checks as booleans, a compressed encoding chosen on validation."""
    for split in ("options_val", "options_test"):
        rows = {r["option"]: r for r in metrics[split]}
        assert {"standalone", "text: answer relay", "text: background", "kv main · bfloat16"} <= set(rows)
        assert rows["standalone"]["bytes_per_query"] == 0 and rows["text: answer relay"]["bytes_per_query"] > 0
        encodings = {r["encoding"]: r for r in rows.values() if r["fuser"] == "main"}
        f32 = [e for e in encodings if e.startswith("float32")]
        assert f32, sorted(encodings)
        for e in f32:  # same layers: twice the bytes of bfloat16; the better int4 key grouping under half
            # (per-channel key scales cost more than the data when one position is sent: the smoke shapes)
            assert encodings[e]["bytes_per_query"] == pytest.approx(
                2 * encodings[e.replace("float32", "bfloat16")]["bytes_per_query"]
            )
            int4 = [encodings[e.replace("float32", g)]["bytes_per_query"] for g in ("int4", "int4/keys-token")]
            assert min(int4) < encodings[e]["bytes_per_query"] / 2, (e, int4)
        assert all(0 <= r["accuracy"] <= 1 and r["compute_s_per_query"] > 0 for r in rows.values())
    assert [r["option"] for r in metrics["options_val"]] == [r["option"] for r in metrics["options_test"]]
    assert metrics["compressed_choice"]["reference"] == "kv main · bfloat16"
    assert set(metrics["qos"]["checks"]) == set(metrics["qos"]["sweep"]) == {"paper's options", "with the answer relay"}
    for name, checks in metrics["qos"]["checks"].items():
        assert isinstance(checks["never_worse_than_best_fixed"], bool) and checks["cells"] > 0
        assert {r["policy"] for r in metrics["qos"]["sweep"][name]} == {"qos policy", "always KV", "always text"}


def _check_privacy_metrics(metrics: dict) -> None:
    """06: every attack on every defence of both arms, measures that are shares, the undefended
    payload of every position inverted (greedy, float32), the original query text leaking all."""
    attacks = metrics["attacks"]
    assert {r["arm"] for r in attacks} == {"original", "rephrased", "prefix dropped"}
    assert {"greedy inversion", "learned decoder: tokens", "learned decoder: bag"} == {r["attack"] for r in attacks}
    for r in attacks:
        assert r["queries"] == 2 and 0 <= r["token_recovery"] <= 1 and 0 <= r["exact_query"] <= 1, r
        assert r["private_recovery"] is None or 0 <= r["private_recovery"] <= 1, r
    assert {r["positions"] for r in attacks} == {1, "all"}  # the main fuser and its positions ablation
    assert any(r["defence"].endswith("noise 1") for r in attacks)
    checks = metrics["checks"]
    assert checks["greedy_float32_every_position_original_token_recovery"] == 1.0  # exact on a float cache
    assert checks["original: query text: private_recovery"] == 1.0
    defences = {(r["arm"], r["defence"]) for r in metrics["accuracy"]}
    assert ("original", "T2T answer relay") in defences and ("rephrased", "main: int4") in defences
    assert all(0 <= r["accuracy"] <= 1 for r in metrics["accuracy"])
    assert set(metrics["rephrasing"]) == {"one rephrasing", "distinct, per sender", "distinct, colluding senders",
                                          "same_question"}  # fmt: skip
    assert metrics["rephrasing"]["same_question"]["prefix dropped"] == 1.0  # the bound keeps every question
    dropped = [r for r in metrics["texts"] if r["arm"] == "prefix dropped" and r["link"] == "receiver -> sender"]
    assert dropped[0]["private_recovery"] == 0.0 and dropped[0]["entity_recovery"] == 1.0


def test_notebook_params_reads_the_parameters_cell():
    from fedrefine_lib.results import notebook_params, parameter_names

    names = parameter_names(ROOT / "notebooks" / "01_c2c.ipynb")
    assert names[:3] == ("profile", "seed", "smoke") and "ablations" in names
    defaults = _parameter_defaults("01_c2c")
    assert notebook_params("01_c2c", defaults | {"unrelated": 1}) == defaults
    with pytest.raises(NameError, match="'seed'"):
        notebook_params("01_c2c", {n: v for n, v in defaults.items() if n != "seed"})


def _parameter_defaults(notebook: str) -> dict:
    cell = next(
        c for c in _cells(ROOT / "notebooks" / f"{notebook}.ipynb") if "parameters" in c.metadata.get("tags", [])
    )
    namespace: dict = {}
    exec(cell.source, namespace)
    return {k: v for k, v in namespace.items() if not k.startswith("__")}


@pytest.mark.parametrize(
    "notebook, name, value, message",
    [
        ("01_c2c", "fuser_hidden", 0, "fuser_hidden=0 is not allowed; use None .* or an int >= 1"),
        ("01_c2c", "eval_limit", -1, "eval_limit=-1"),
        ("01_c2c", "eval_limit", 0, "eval_limit=0"),
        ("01_c2c", "train_steps", 0, "train_steps=0"),
        ("01_c2c", "seed", "0", "seed='0' is not allowed; use an int >= 0"),
        ("01_c2c", "smoke", "yes", "smoke='yes'"),
        ("03_fedrefine", "gate_hidden", 2.5, "gate_hidden=2.5"),
        ("04_case_study", "bandwidth_mbps", 0, "bandwidth_mbps=0"),
        ("04_case_study", "rtt_ms", float("nan"), "rtt_ms=nan"),
        ("01_c2c", "sender_name", "mini-qwen3-0.6b", "receiver_name and sender_name are both"),
        ("02_co_c2c", "model_b", "x", "model_a and model_b are both"),
        ("01_c2c", "train_epochs", 0, "train_epochs=0"),
        ("01_c2c", "profile", "minii", r"profile='minii' is not allowed: No profile config .*Known profiles: .*'mini'"),
        ("01_c2c", "receiver_name", "mini-qwen3-06b", r"receiver_name='mini-qwen3-06b' names .*not a model of profile"),
        ("01_c2c", "receiver_name", "Qwen/Qwen3-0.6B", r"receiver_name=.* not a model of profile 'mini'"),
        ("02_co_c2c", "model_a", "mini-llama", r"model_a='mini-llama' names \['mini-llama'\].*mini-llama3.2-1b"),
        ("04_case_study", "homogeneous_pair", ["mini-qwen2.5-0.5b"] * 2, "homogeneous_pair=.*two different"),
        ("04_case_study", "homogeneous_pair", ["mini-qwen2.5-coder-0.5b", "qwen"], r"names \['qwen'\]"),
    ],
)
def test_bad_notebook_parameters_are_refused_before_any_work(notebook, name, value, message):
    from fedrefine_lib.results import notebook_params

    params = _parameter_defaults(notebook) | {name: value}
    if name == "sender_name":
        params["receiver_name"] = value
    if name == "model_b":
        params["model_a"] = value
    with pytest.raises(ValueError, match=message):
        notebook_params(notebook, params)


def _run_on_real_classes(notebook: str, profile, root: Path, **extra) -> dict:
    """Run ``notebook`` on the tiny real-class profile (one data dir for the session's runs)."""
    import papermill

    path = ROOT / "notebooks" / f"{notebook}.ipynb"
    papermill.execute_notebook(
        str(path),
        str(root / path.name),
        cwd=str(path.parent),
        kernel_name="python3",
        parameters={"profile": str(profile), "seed": 0, "smoke": True, "results_dir": str(root / "results"),
                    "data_dir": str(root / "data"), **extra},
        progress_bar=False,
    )  # fmt: skip
    metrics_name, _ = EXPECTED[notebook]
    return json.loads((root / "results" / metrics_name).read_text())


@pytest.fixture(scope="module")
def real_class_root(tmp_path_factory):
    return tmp_path_factory.mktemp("real-class-runs")


@pytest.mark.slow
def test_world_notebook_measures_a_profile_of_real_model_classes(real_class_profile, real_class_root):
    """00 on a non-mini profile (tiny random Llama + Gemma3, the private-context task):
    it measures the profile's own models, with no mini pretraining."""
    tmp_path = real_class_root
    metrics = _run_on_real_classes("00_world", real_class_profile, tmp_path)
    assert set(metrics["models"]) == {"tiny-llama", "tiny-gemma3"}
    assert metrics["models"]["tiny-gemma3"]["architecture"] == "Gemma3ForCausalLM"
    for name in ("receiver alone", "oracle", "tiny-gemma3 with its context"):
        assert _accuracy_ok(metrics["accuracy"][name]["all"])
    assert isinstance(metrics["acceptance"]["all"], bool) and metrics["split"] == "test"
    assert not (tmp_path / "data" / "mini").exists()  # no mini world was built
    assert (tmp_path / "results" / "figures" / "headroom.png").is_file()


@pytest.mark.slow
def test_c2c_notebooks_run_on_a_profile_of_real_model_classes(real_class_profile, real_class_root):
    """01 and 02 on the tiny real-class profile: the sender reads its records, the receiver never."""
    c2c = _run_on_real_classes("01_c2c", real_class_profile, real_class_root, train_steps=4)
    for name in ("receiver_alone", "sender_alone", "c2c", "t2t", "t2t_answer", "finetuned_receiver", "oracle"):
        assert _accuracy_ok(c2c["accuracy"][name])
    assert c2c["parameters"]["ablations"] is None and c2c["fuser"]["aligner"]  # the profile names no ablation
    co = _run_on_real_classes("02_co_c2c", real_class_profile, real_class_root, train_steps=4)
    assert set(co["directions"]) == {"tiny-gemma3->tiny-llama", "tiny-llama->tiny-gemma3"}
    assert all(_accuracy_ok(d["refined"]) for d in co["directions"].values())
    qos = _run_on_real_classes(
        "05_transport_qos", real_class_profile, real_class_root, train_steps=4, trace_requests=20, real_queries=2
    )
    _check_transport_metrics(qos)  # encodings of a Gemma3 cache (sliding layers) decode and fuse


VARIANTS = ("default", "concat", "prefix")  # 03's fusion modes as hub variants
# Keys every notebook writes on the paper profile (no mini world: no two-fact questions, no
# template-swap bound), each an accuracy record.
PAPER_EXPECTED = {
    "00_world": ["accuracy.receiver alone.all", "accuracy.oracle.all"],
    "01_c2c": [f"accuracy.{k}" for k in ("receiver_alone", "sender_alone", "c2c", "t2t", "t2t_answer", "oracle")],
    "02_co_c2c": [],
    "03_fedrefine": ["oracle", "policies.equal", "policies.prior", "policies.learned_gate"],
    "04_case_study": ["oracle", "panel_a_selected", "four_senders.KV-Rephrased", "four_senders.Answer-Original",
                      "routed.accuracy.KV, routed", "routed.accuracy.delegation", "appendix_a.homogeneous.cache"],
}  # fmt: skip


@pytest.mark.slow
def test_the_paper_pipeline_runs_on_tiny_models_of_the_paper_classes(paper_class_profile, tmp_path):
    """The `paper` profile's dry run: configs/paper.yaml with tiny random Qwen3 / Qwen2 / Llama
    models and tests/fixtures/paper in the hub schemas (data -> fusers -> gate -> case study),
    the paper's settings scaled down: every notebook writes its metrics file."""
    from fedrefine_lib.models import load_profile

    paper = load_profile("paper")
    written = {}
    for notebook, keys in PAPER_EXPECTED.items():
        extra = {"train_steps": 3} if notebook != "00_world" else {}
        metrics = written[notebook] = _run_on_real_classes(notebook, paper_class_profile, tmp_path, **extra)
        assert metrics["notebook"] == notebook and metrics["timings"]["total"] > 0
        for key in keys:
            node = metrics
            for part in key.split("."):
                node = node[part]
            assert _accuracy_ok(node), f"{notebook}: {key} = {node}"
    models = written["00_world"]["models"]
    assert [models[n]["architecture"] for n in [paper.receiver, *paper.senders]] == [
        "Qwen3ForCausalLM", *["Qwen2ForCausalLM"] * 3, "LlamaForCausalLM"
    ]  # fmt: skip
    assert written["00_world"]["scoring"] == "letter" and written["00_world"]["items"] == 16
    c2c = written["01_c2c"]
    assert c2c["fuser"]["layer_map"] == [0, 1, 1, 1]  # bottom-up: 4 receiver layers read the Llama's 2
    assert c2c["training"]["config"]["lr"] == paper.settings["train"]["lr"]
    hub = written["03_fedrefine"]["hub"]  # the four fusers F_j->receiver, per fusion mode (residual: "default")
    assert {(h["sender"], h["variant"]) for h in hub} == {(s, v) for s in paper.senders for v in VARIANTS}
    assert written["03_fedrefine"]["policy_mode"] == "residual"
    assert set(written["03_fedrefine"]["gate_weights_by_domain"]) == {"science"}
    case = written["04_case_study"]
    assert case["appendix_a"]["homogeneous"]["pair"] == "qwen2.5-coder-0.5b-instruct -> qwen2.5-0.5b-instruct"
    assert sorted(p.name for p in (tmp_path / "results").glob("*.json")) == [
        "c2c.json", "case_study.json", "co_c2c.json", "fedrefine.json", "world.json"
    ]  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "data" / "paper" / "0" / "fusers").iterdir())  # fusers stored
