"""Link model, transmission stage, bytes on the wire, the paper's 88 KB, and the QoS policy."""

from __future__ import annotations

import pytest
import torch

from fedrefine_lib import kv as kvlib
from fedrefine_lib import network as net
from fedrefine_lib import transport
from fedrefine_lib.t2t import TOKEN_ID_BYTES
from fedrefine_lib.trace import Trace
from fedrefine_lib.transport import Encoding

LINK = net.Link("test", bandwidth_mbps=8.0, rtt_ms=100.0)  # 1 MB/s, 50 ms one way


def test_link_transfer_seconds():
    assert LINK.one_way_seconds == pytest.approx(0.05)
    assert LINK.transfer_seconds(1_000_000) == pytest.approx(0.05 + 1.0)
    assert LINK.transfer_seconds(1_000_000, messages=3) == pytest.approx(0.15 + 1.0)
    assert LINK.transfer_seconds(0) == 0.0
    assert net.EDGE_UPLINK.transfer_seconds(2_500_000) == pytest.approx(0.02 + 1.0)  # 20 Mbit/s, 40 ms
    with pytest.raises(ValueError, match="bandwidth"):
        net.Link("bad", 0, 10)
    with pytest.raises(ValueError, match="RTT"):
        net.Link("bad", 1, -1)
    with pytest.raises(ValueError, match=">= 0"):
        LINK.transfer_seconds(-1)


def test_with_transmission_parallel_and_serial():
    trace = Trace(seconds={"sender_prefill": 1.0}, bytes={"s1->r": 1_000_000, "s2->r": 500_000})
    par = net.with_transmission(trace, LINK)
    assert par.seconds["transmission"] == pytest.approx(1.05)  # slowest link
    assert par.total_seconds == pytest.approx(2.05)  # stages still sum to the total
    assert "transmission" not in trace.seconds  # input untouched
    assert par.bytes == trace.bytes
    assert net.with_transmission(trace, LINK, parallel=False).seconds["transmission"] == pytest.approx(1.05 + 0.55)
    assert net.with_transmission(trace, LINK, queries=2).seconds["transmission"] == pytest.approx(0.1 + 1.0)
    # replacing, not adding, when applied twice
    assert net.with_transmission(par, LINK).seconds["transmission"] == pytest.approx(1.05)
    fast = net.Link("fast", 80.0, 0.0)
    mixed = net.with_transmission(trace, {"s1->r": fast, "s2->r": LINK})
    assert mixed.seconds["transmission"] == pytest.approx(max(0.1, 0.55))
    with pytest.raises(KeyError, match="s2->r"):
        net.with_transmission(trace, {"s1->r": fast})
    assert net.with_transmission(Trace(), LINK).seconds["transmission"] == 0.0


def test_with_transmission_senders_parallel_in_compute_and_on_the_wire():
    """Per-sender stages: in parallel the slowest sender's compute + transfer is the sender
    phase; one after another, everything adds up."""
    trace = Trace(seconds={"receiver_prefill": 0.5})
    trace.add_sender_seconds("sender_prefill", {"s1": 0.2, "s2": 1.0})
    trace.add_sender_seconds("sender_decode", {"s1": 0.1})
    trace.bytes = {"s1->r": 1_000_000, "s2->r": 100_000}  # 1.05 s and 0.15 s on LINK
    assert trace.seconds["sender_prefill"] == pytest.approx(1.2)  # summed: one machine
    par = net.with_transmission(trace, LINK)
    # s1: 0.2 + 0.1 + 1.05 = 1.35 > s2: 1.0 + 0.15 = 1.15, so s1's stages and link count
    assert par.seconds["sender_prefill"] == pytest.approx(0.2) and par.seconds["sender_decode"] == pytest.approx(0.1)
    assert par.seconds["transmission"] == pytest.approx(1.05)
    assert par.total_seconds == pytest.approx(0.5 + 1.35)
    seq = net.with_transmission(trace, LINK, parallel=False)
    assert seq.total_seconds == pytest.approx(0.5 + 1.2 + 0.1 + 1.05 + 0.15)
    merged = Trace().add(trace).add(trace)
    assert merged.per_sender["sender_prefill"] == {"s1": pytest.approx(0.4), "s2": pytest.approx(2.0)}
    assert merged.seconds["sender_prefill"] == pytest.approx(2.4)


def test_wire_bytes_table_exact():
    cfg = net.config_from_shape({"layers": 2, "kv_heads": 1, "head_dim": 4})
    table = net.wire_bytes_table({"a": cfg, "b": cfg}, kv_tokens={"a": 10, "b": 20}, text_tokens=5)
    a = table[table.sender == "a"].set_index("payload")
    assert a.loc["kv bfloat16", "bytes_per_token"] == 2 * 2 * 1 * 4 * 2 == 32
    assert a.loc["kv float32", "bytes_per_query"] == 64 * 10
    assert a.loc["token ids", "bytes_per_token"] == TOKEN_ID_BYTES == 4
    assert a.loc["token ids", "bytes_per_query"] == 20
    total = table[table.sender == "all senders"].set_index("payload")
    assert total.loc["kv bfloat16", "bytes_per_query"] == 32 * 10 + 32 * 20
    assert total.loc["token ids", "bytes_per_token"] == 8
    with pytest.raises(KeyError, match="'b'"):
        net.wire_bytes_table({"b": cfg}, kv_tokens={"a": 1}, text_tokens=1)
    with pytest.raises(ValueError, match="head_dim"):
        net.config_from_shape({"layers": 2, "kv_heads": 1})


@pytest.mark.parametrize("name", ["qwen2", "llama", "gemma3"])
def test_kv_wire_bytes_match_encoded_payload(loaded_models, name):
    """The size formula equals the bytes transport.encode actually puts on the wire (sliding
    layers of Gemma-3 capped), per dtype."""
    model = loaded_models[name].model
    n = 7
    ids = torch.randint(5, 50, (1, n))
    _, cache = kvlib.forward(model, ids, torch.ones_like(ids))  # the model's own cache (sliding layers capped)
    cache = kvlib.KVCache.from_cache(cache)
    for dtype in ("float32", "bfloat16"):
        assert net.kv_wire_bytes(model.config, n, dtype) == transport.encode(cache, Encoding(dtype), "m").payload_bytes


def test_paper_bytes_per_token():
    table = net.paper_bytes_per_token().set_index("sender")
    own = table["kv_own_bytes"]
    assert own["qwen2.5-0.5b-instruct"] == 2 * 24 * 2 * 64 * 2 == 12_288
    assert own["qwen2.5-coder-0.5b-instruct"] == 12_288
    assert own["qwen2.5-1.5b-instruct"] == 2 * 28 * 2 * 128 * 2 == 28_672
    assert own["llama-3.2-1b-instruct"] == 2 * 16 * 8 * 64 * 2 == 32_768
    assert own["all senders"] == 86_016  # 84 KiB
    assert table.loc["qwen2.5-0.5b-instruct", "kv_projected_bytes"] == 2 * 28 * 8 * 128 * 2 == 114_688
    assert table.loc["all senders", "kv_projected_bytes"] == 4 * 114_688
    assert table.loc["all senders", "token_id_bytes"] == 16  # the paper's 16 B
    cmp = net.paper_comparison(net.paper_bytes_per_token()).set_index("quantity")
    assert cmp.loc["KV, senders' own caches", "ratio_to_88KiB"] == pytest.approx(84 / 88)
    assert cmp.loc["KV, senders' own caches", "ratio_to_88kB"] == pytest.approx(86.016 / 88)
    assert cmp.loc["token ids", "ratio_to_paper_16B"] == 1.0


def test_c2c_trace_bytes_are_encoded_payloads_and_stages_add_up(loaded_models):
    """A real C2C trace: its link bytes equal the bf16 payloads of the sender's cache over
    each sample's real tokens, and with the transmission stage added the stages still sum
    to the total."""
    from fedrefine_lib.federation import C2C
    from fedrefine_lib.fuser import FuserConfig, ResidualFuser

    receiver, sender = loaded_models["qwen3"], loaded_models["qwen2"]
    fuser = ResidualFuser(FuserConfig.for_pair(receiver, sender, hidden=8, layer_map="bottom_up")).eval()
    engine = C2C(receiver, sender, fuser)
    batch = [
        [{"role": "user", "content": "Zorblat glows blue."}],
        [{"role": "user", "content": "The quick brown fox jumps over the lazy dog."}],
    ]
    caches = engine.prompt_caches(batch)
    encoded = 0
    for b, n in enumerate(caches.alignments[0].sender_mask.sum(1).tolist()):
        one = caches.sender_caches[0].select([b]).map(lambda t: t[:, :, -n:])  # left padded: real tokens last
        encoded += transport.encode(kvlib.KVCache(one.keys, one.values, n), Encoding("bfloat16"), "m").payload_bytes
    trace = engine.fuse(caches).trace
    assert trace.bytes == {engine.links[0]: encoded}
    sent = net.with_transmission(trace, LINK, queries=2)
    assert sent.seconds["transmission"] == pytest.approx(LINK.transfer_seconds(encoded, messages=2))
    assert sent.total_seconds == pytest.approx(sum(sent.seconds.values()))
    assert sent.total_seconds == pytest.approx(trace.total_seconds + sent.seconds["transmission"])


def test_trace_times_sender_stages_per_sender():
    trace = Trace()
    with trace.time_sender("sender_prefill", "s1"):
        pass
    with trace.time_sender("sender_prefill", "s2"):
        sum(range(10000))
    with trace.time("projection"):
        pass
    stage = trace.per_sender["sender_prefill"]
    assert set(stage) == {"s1", "s2"} and all(v >= 0 for v in stage.values())
    assert trace.seconds["sender_prefill"] == pytest.approx(sum(stage.values()))
    assert "projection" in trace.seconds and "projection" not in trace.per_sender
