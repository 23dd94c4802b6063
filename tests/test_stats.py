"""Cluster-bootstrap intervals and paired tests (crafted outcomes, known answers)."""

from __future__ import annotations

import json
import math

import pytest

from fedrefine_lib.evaluate import McqResult, accuracy
from fedrefine_lib.stats import cluster_accuracy, gap_closed, item_clusters, mcnemar_p, paired_difference


def _clustered(n_clusters: int = 20, per: int = 4) -> tuple[list[bool], list[str]]:
    """Half the clusters all right, half all wrong: outcomes perfectly correlated within one."""
    correct = [c % 2 == 0 for c in range(n_clusters) for _ in range(per)]
    clusters = [f"e{c}" for c in range(n_clusters) for _ in range(per)]
    return correct, clusters


def test_cluster_interval_is_wider_than_wilson_when_items_share_clusters():
    correct, clusters = _clustered()
    est, wilson = cluster_accuracy(correct, clusters), accuracy(correct)
    assert est.value == wilson.value == 0.5 and est.n == 80 and est.clusters == 20
    assert est.ci_high - est.ci_low > 1.5 * (wilson.ci_high - wilson.ci_low)
    singletons = cluster_accuracy(correct, [str(i) for i in range(len(correct))])
    assert singletons.ci_high - singletons.ci_low == pytest.approx(wilson.ci_high - wilson.ci_low, abs=0.04)


def test_cluster_interval_degenerate_cases_and_determinism():
    ones = cluster_accuracy([True] * 6, list("aabbcc"))  # Wilson on 3 clusters, not a zero-width interval
    assert (ones.value, ones.ci_high) == (1.0, 1.0) and ones.ci_low == pytest.approx(accuracy([True] * 3).ci_low)
    zeros = cluster_accuracy([False] * 6, list("aabbcc"))
    assert zeros.ci_low == 0.0 and zeros.ci_high == pytest.approx(accuracy([False] * 3).ci_high)
    assert math.isnan(cluster_accuracy([], []).value)
    correct, clusters = _clustered()
    assert cluster_accuracy(correct, clusters, seed=3) == cluster_accuracy(correct, clusters, seed=3)
    with pytest.raises(ValueError, match="one cluster"):
        cluster_accuracy([True, False], ["a"])


def test_mcnemar_exact_values():
    assert mcnemar_p(0, 0) == 1.0
    assert mcnemar_p(10, 0) == pytest.approx(2 / 1024)
    assert mcnemar_p(3, 3) == 1.0
    assert mcnemar_p(1, 4) == mcnemar_p(4, 1) == pytest.approx(2 * 6 / 32)


def test_paired_difference_finds_a_real_gain_and_no_gain():
    clusters = [f"e{c}" for c in range(30) for _ in range(4)]
    b = [i % 3 == 0 for i in range(120)]
    same = paired_difference(b, b, clusters)
    assert (same.diff, same.ci_low, same.ci_high, same.p_value, same.mcnemar_p) == (0.0, 0.0, 0.0, 1.0, 1.0)
    assert not same.significant
    a = [x or (i % 3 == 1) for i, x in enumerate(b)]  # a right wherever b is, and on a third more
    gain = paired_difference(a, b, clusters)
    assert gain.diff == pytest.approx(40 / 120) and gain.a_only == 40 and gain.b_only == 0
    assert gain.significant and gain.ci_low > 0.2 and gain.p_value < 0.01 and gain.mcnemar_p < 1e-6
    worse = paired_difference(b, a, clusters)
    assert worse.diff == -gain.diff and worse.ci_high < 0
    # a swap of which items each gets right, with equal totals: no difference
    flip = paired_difference([i % 2 == 0 for i in range(120)], [i % 2 == 1 for i in range(120)], clusters)
    assert flip.diff == 0.0 and not flip.significant and flip.mcnemar_p == 1.0


def test_gap_closed():
    clusters = [f"e{c}" for c in range(10) for _ in range(2)]
    base, upper = [False] * 20, [True] * 20
    half = [i < 10 for i in range(20)]
    assert gap_closed(base, upper, upper, clusters).value == 1.0
    assert gap_closed(base, base, upper, clusters).value == 0.0
    g = gap_closed(base, half, upper, clusters)
    assert g.value == 0.5 and g.ci_low < 0.5 < g.ci_high
    assert math.isnan(gap_closed(base, half, base, clusters).value)


def test_item_clusters():
    items = [
        {"id": "1", "entity": "Zorb"},
        {"id": "2", "fact_ids": ["biology/Pomeam/diet", "code/Brus/language"]},
        {"id": "3"},
    ]
    assert item_clusters(items) == ["Zorb", "Pomeam+Brus", "3"]


def test_mcq_result_where_and_compare():
    def result(correct):
        return McqResult(
            "loglik",
            ids=[str(i) for i in range(6)],
            answers=["A"] * 6,
            predictions=["A" if c else "B" for c in correct],
            correct=correct,
            outputs=[None] * 6,
            domains=["x", "x", "y", "y", "y", "x"],
            clusters=["e1", "e1", "e2", "e2", "e3", "e3"],
        )

    a, b = result([True] * 6), result([True, False, True, False, True, False])
    sub = b.where(["y"])
    assert sub.ids == ["2", "3", "4"] and sub.clusters == ["e2", "e2", "e3"] and sub.accuracy().value == 2 / 3
    d = a.compare(b)
    assert d.diff == pytest.approx(0.5) and d.a_only == 3 and d.n == 6
    with pytest.raises(ValueError, match="same items"):
        a.compare(sub)


def test_results_helpers_pair_mcq_results():
    from fedrefine_lib.results import closed_gap, differences

    def result(correct):
        n = len(correct)
        return McqResult(
            "loglik", ids=[str(i) for i in range(n)], correct=correct, domains=["x"] * n, clusters=["e"] * n
        )

    base, mid, top = result([False] * 4), result([True, True, False, False]), result([True] * 4)
    assert closed_gap(base, mid, top).value == 0.5
    d = differences({"mid": mid, "base": base}, [("mid", "base")])
    assert list(d) == ["mid - base"] and d["mid - base"].diff == 0.5
    with pytest.raises(ValueError, match="same items"):
        closed_gap(base, result([True]), top)


def test_seeds_summary(tmp_path):
    from fedrefine_lib import seeds

    heads = {"acc": ("a.json", "x.value"), "diff": ("b.json", "p.k - j.diff")}
    for s, (acc, diff) in {0: (0.5, 0.1), 1: (0.7, -0.1), 2: (0.6, None)}.items():
        (tmp_path / str(s)).mkdir()
        (tmp_path / str(s) / "a.json").write_text(json.dumps({"x": {"value": acc}}))
        (tmp_path / str(s) / "b.json").write_text(json.dumps({"p": {"k - j": {"diff": diff}}}))
    (tmp_path / "notes").mkdir()  # not a seed folder: ignored
    out = seeds.summarize_seeds(tmp_path, heads)
    assert out["seeds"] == [0, 1, 2]
    acc = out["headlines"]["acc"]
    assert acc["mean"] == pytest.approx(0.6) and acc["sd"] == pytest.approx(0.1) and acc["n"] == 3
    assert (acc["min"], acc["max"]) == (0.5, 0.7) and acc["per_seed"]["1"] == 0.7
    diff = out["headlines"]["diff"]  # a NaN (None) seed is shown but not averaged
    assert diff["n"] == 2 and diff["mean"] == pytest.approx(0.0) and math.isnan(diff["per_seed"]["2"])
    assert "0.600" in seeds.table(out)[0]["over seeds"]
    (tmp_path / "1" / "b.json").unlink()
    with pytest.raises(FileNotFoundError, match="seed 1"):
        seeds.summarize_seeds(tmp_path, heads)
    assert seeds.summarize_seeds(tmp_path, heads, allow_missing=True)["headlines"]["diff"]["missing"] == [1]
    with pytest.raises(FileNotFoundError, match="make seeds"):
        seeds.summarize_seeds(tmp_path / "none", heads)


def test_seeds_cli_keeps_the_headlines_of_the_files_named(tmp_path):
    from fedrefine_lib import seeds

    c2c = {label: path for label, (name, path) in seeds.HEADLINES.items() if name == "c2c.json"}
    for s, value in {42: 0.5, 43: 0.7}.items():
        metrics: dict = {}
        for path in c2c.values():  # build each dotted path (keys may hold spaces and dashes)
            node = metrics
            *head, last = path.split(".")
            for part in head:
                node = node.setdefault(part, {})
            node[last] = value
        (tmp_path / str(s)).mkdir()
        (tmp_path / str(s) / "c2c.json").write_text(json.dumps(metrics))
    out = seeds.main([str(tmp_path), "--out", str(tmp_path / "fs.json"), "--files", "c2c.json"])
    assert set(out["headlines"]) == set(c2c) and out["seeds"] == [42, 43]
    assert all(h["mean"] == pytest.approx(0.6) for h in out["headlines"].values())
    assert (tmp_path / "fs.png").is_file()
    with pytest.raises(SystemExit):
        seeds.main([str(tmp_path), "--out", str(tmp_path / "x.json"), "--files", "nothing.json"])
