"""The QoS policy: the most accurate option within the budget, the fastest otherwise; streams
over a bandwidth trace; never worse than a fixed protocol at serving within the budget."""

import pytest

from fedrefine_lib import qos
from fedrefine_lib.network import Link
from fedrefine_lib.qos import Option
from fedrefine_lib.trace import Trace

LINK = Link("edge", 8.0, 100.0)  # 1 MB = 1 s; one message = 50 ms
KV = Option("kv", 0.9, 0.1, {"s->r": 1_000_000})  # 0.1 + 0.05 + 1.0 = 1.15 s
TEXT = Option("text", 0.8, 0.5, {"s->r": 40})  # 0.5 + 0.05 + 0.00004 s
ALONE = Option("standalone", 0.3, 0.05)


def test_choose_the_most_accurate_option_within_the_budget():
    d = qos.choose([KV, TEXT, ALONE], LINK, 2.0)
    assert (d.option, d.within_budget) == ("kv", True) and d.latency_s == pytest.approx(1.15)
    assert qos.choose([KV, TEXT, ALONE], LINK, 1.0).option == "text"
    assert qos.choose([KV, TEXT, ALONE], LINK, 0.3).option == "standalone"
    late = qos.choose([KV, TEXT], LINK, 0.3)
    assert (late.option, late.within_budget) == ("text", False)
    assert qos.choose([KV, TEXT], Link("fat", 8000.0, 100.0), 1.0).option == "kv"
    with pytest.raises(ValueError, match="budget"):
        qos.choose([KV], LINK, 0)
    with pytest.raises(ValueError, match="at least one"):
        qos.choose([], LINK, 1.0)


def test_option_from_trace_excludes_transmission():
    trace = Trace(seconds={"sender_prefill": 0.4, "projection": 0.2, "transmission": 9.0}, bytes={"s->r": 800})
    o = Option.from_trace("kv", 0.5, trace, queries=2)
    assert o.compute_s == pytest.approx(0.3) and o.link_bytes == {"s->r": 400} and o.bytes_per_query == 400


def test_bandwidth_trace_is_seeded_and_bounded():
    a, b = qos.bandwidth_trace(200, 0.5, 50.0, seed=3), qos.bandwidth_trace(200, 0.5, 50.0, seed=3)
    assert [x.bandwidth_mbps for x in a] == [x.bandwidth_mbps for x in b]
    assert all(0.5 <= x.bandwidth_mbps <= 50.0 for x in a)
    assert max(x.bandwidth_mbps for x in a) / min(x.bandwidth_mbps for x in a) > 5  # it moves
    with pytest.raises(ValueError):
        qos.bandwidth_trace(10, 5.0, 1.0)


def test_the_policy_serves_at_least_as_well_as_either_fixed_protocol():
    options = [KV, TEXT, ALONE]
    correct = {"kv": [True] * 9 + [False], "text": [True] * 8 + [False] * 2, "standalone": [True] * 3 + [False] * 7}
    policies = {"qos": qos.choose, "always kv": qos.fixed("kv"), "always text": qos.fixed("text")}
    table = qos.sweep(policies, options, [0.1, 2.0, 80.0], 0.5, correct).pivot(
        index="bandwidth_mbps", columns="policy", values="served"
    )
    assert (table["qos"] >= table[["always kv", "always text"]].max(axis=1)).all()
    assert (table["qos"] > table[["always kv", "always text"]].max(axis=1)).any()
    grid = qos.sweep(policies, options, [0.1, 80.0], [0.5, 2.0], correct)
    margin = qos.against_fixed(grid, "qos", ["always kv", "always text"])
    assert len(margin) == 4 and (margin["margin"] >= 0).all()
    at = margin.set_index(["budget_s", "bandwidth_mbps"])["margin"]
    assert at[(0.5, 0.1)] == pytest.approx(0.3) and at[(2.0, 80.0)] == 0  # standalone beats missing; kv meets
    c = qos.checks(grid, margin, "qos")
    assert c["never_worse_than_best_fixed"] and c["cells"] == 4 and c["cells_worse"] == 0
    assert c["cells_better"] == int((margin["margin"] > 0).sum()) >= 1
    assert c["kv_chosen_cells"] == int((grid[grid["policy"] == "qos"]["option"] == "kv").sum())
    assert not qos.checks(grid, margin.assign(margin=margin["margin"] - 1), "qos")["never_worse_than_best_fixed"]
    stream = qos.serve(qos.choose, options, qos.bandwidth_trace(30, 0.1, 80.0), 0.5, correct)
    summary = qos.stream_summary({"qos": stream})["qos"]
    assert summary["served"] == stream["served"].mean() and sum(summary["options"].values()) == 30
    assert set(stream["option"]) <= {"kv", "text", "standalone"} and stream["within_budget"].all()
    with pytest.raises(KeyError, match="no test correctness"):
        qos.serve(qos.choose, options, [LINK], 1.0, {"kv": [True]})
