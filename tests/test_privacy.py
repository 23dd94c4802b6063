"""Cache inversion with the sender's weights recovers a known query from a tiny model's cache
(exact in float32, most tokens through int8, little through heavy noise); the measures on
crafted cases."""

import pytest
import torch

from fedrefine_lib import privacy, privacy_decoder, transport
from fedrefine_lib.kv import KVCache
from fedrefine_lib.transport import Encoding

QUERY = [{"role": "user", "content": "Where does Ada Varga keep the zorblat crystal?"}]


def _sent(model, tok) -> tuple[list[int], KVCache]:
    ids, kv = privacy.sent_cache(model, tok, QUERY)
    assert tok.decode(ids).count("Ada Varga") == 1 and kv.seq_len == len(ids)
    return ids, kv


@pytest.mark.parametrize("name", ["llama", "qwen3", "gemma3"])
def test_inversion_recovers_the_query_from_its_float_cache(tiny_models, name):
    model, tok = tiny_models[name]
    ids, kv = _sent(model, tok)
    for layer in (0, kv.num_layers - 1):  # a shallow layer and the deepest
        recovered = privacy.invert_cache(model, kv, layer=layer)
        assert privacy.token_recovery(ids, recovered) == 1.0, (name, layer)
    assert "Ada Varga" in tok.decode(recovered)


def test_lossy_encodings_and_noise_lower_recovery(tiny_models):
    model, tok = tiny_models["llama"]
    ids, kv = _sent(model, tok)
    int8 = transport.decode(transport.encode(kv, Encoding("int8", keys="token"), "m"))
    assert privacy.token_recovery(ids, privacy.invert_cache(model, int8)) >= 0.9
    g = torch.Generator().manual_seed(0)
    noisy = kv.map(lambda t: t + 10 * t.std() * torch.randn(t.shape, generator=g))
    assert privacy.token_recovery(ids, privacy.invert_cache(model, noisy)) < 0.5
    with pytest.raises(ValueError, match="not transmitted"):
        privacy.invert_cache(model, transport.decode(transport.encode(kv, Encoding(layers=(1,)), "m")), layer=0)


def test_measures_on_crafted_cases():
    assert privacy.token_recovery([1, 2, 3, 4], [1, 2, 0, 4]) == 0.75
    assert privacy.string_recovery(["Ada Varga", "B-1234"], "user: where does ada varga keep") == 0.5
    with pytest.raises(ValueError, match="equal"):
        privacy.token_recovery([1, 2], [1])
    with pytest.raises(ValueError, match="No private strings"):
        privacy.string_recovery([], "x")


def test_the_attack_table_has_a_row_per_encoding(tiny_models):
    model, tok = tiny_models["llama"]
    other = [{"role": "context", "content": "Locker B-1234 is Ada's."}, {"role": "user", "content": "Whose locker?"}]
    encodings = [Encoding("float32"), Encoding("int4")]
    table = privacy.attack_table(model, tok, [QUERY, other], encodings, private=[["Ada Varga"], ["B-1234"]])
    assert table["encoding"].tolist() == ["float32", "int4"] and (table["queries"] == 2).all()
    f32 = table.iloc[0]
    assert f32["token_recovery"] == f32["exact_query"] == f32["private_recovery"] == 1.0
    assert table.iloc[1]["token_recovery"] <= 1.0


def test_a_last_positions_payload_is_inverted_from_its_first_sent_position(tiny_models):
    model, tok = tiny_models["llama"]
    ids, kv = _sent(model, tok)
    sent = privacy.transmit(ids, kv, Encoding("float32"), positions=3)
    assert sent.start == len(ids) - 3 and sent.kv.seq_len == 3 and sent.first_layer == 0
    row = privacy.attack_greedy(model, tok, sent, {"private": ["Ada Varga"]})  # layer 0: a token and its position alone
    assert row["layer"] == 0 and row["token_recovery"] == pytest.approx(3 / len(ids))
    assert row["exact_query"] is False and row["private_recovery"] == 0.0  # the name is not in the last 3
    whole = privacy.attack_greedy(
        model, tok, privacy.transmit(ids, kv, Encoding("float32")), {"private": ["Ada Varga"]}
    )
    assert whole["token_recovery"] == 1.0 and whole["exact_query"] and whole["private_recovery"] == 1.0


def test_recovery_measures_on_crafted_cases(tiny_models):
    _, tok = tiny_models["llama"]
    ids = tok("Ada Varga keeps it", add_special_tokens=False)["input_ids"]
    sent = privacy.Transmitted(ids, KVCache([torch.zeros(1, 1, 2, 1)], [torch.zeros(1, 1, 2, 1)], 2), len(ids) - 2)
    strings = {"private": ["Ada Varga", "zorblat"], "entity": ["it"], "none": []}
    row = privacy.recovery(sent, ids[-2:], tok, strings)
    assert row["token_recovery"] == pytest.approx(2 / len(ids)) and row["private_recovery"] == 0.0
    assert row["entity_recovery"] == 1.0 and row["none_recovery"] is None
    name = {i for v in ("Ada Varga", " Ada Varga") for i in tok(v, add_special_tokens=False)["input_ids"]}
    assert privacy.recovery(sent, ids[-2:], tok, strings, bag=name)["private_recovery"] == 0.5
    assert privacy.mean_recovery([row, {**row, "private_recovery": None, "exact_query": True}]) == {
        "token_recovery": row["token_recovery"], "exact_query": 0.5, "private_recovery": 0.0,
        "entity_recovery": 1.0, "none_recovery": None,
    }  # fmt: skip


def test_the_learned_decoder_reads_tokens_and_the_bag_of_a_query_it_never_saw(tiny_models):
    model, tok = tiny_models["llama"]
    words = "Ada Varga Bo Lin keeps hides finds the zorblat crystal lamp key in at where does".split()
    g = torch.Generator().manual_seed(0)
    chats = [
        [{"role": "user", "content": " ".join(words[int(i)] for i in torch.randint(len(words), (8,), generator=g))}]
        for _ in range(120)
    ]  # public text with the same words, never the query itself
    assert all(c[0]["content"] != QUERY[0]["content"] for c in chats)
    decoder = privacy_decoder.train_decoder(model, tok, chats, layer=0, steps=300, seed=0)
    ids, kv = _sent(model, tok)
    rows = privacy_decoder.attack_decoder(
        decoder, tok, privacy.transmit(ids, kv, Encoding("float32")), {"private": ["Ada Varga"]}
    )
    tokens, bag = rows
    assert tokens["attack"] == "learned decoder: tokens" and tokens["token_recovery"] >= 0.9
    assert tokens["private_recovery"] == 1.0
    assert bag["bag_size"] > 0 and bag["bag_precision"] > 0.5
    noisy = privacy.transmit(ids, kv, Encoding("float32", noise=3.0))
    assert privacy_decoder.attack_decoder(decoder, tok, noisy)[0]["token_recovery"] < tokens["token_recovery"]
    with pytest.raises(ValueError, match="does not hold"):
        decoder.read(privacy.transmit(ids, kv, Encoding("float32", layers=(1,))))
    with pytest.raises(ValueError, match="No chats"):
        privacy_decoder.train_decoder(model, tok, [], layer=0)


def test_a_value_shortlist_at_the_first_layer_finds_the_same_tokens(tiny_models):
    model, tok = tiny_models["qwen3"]
    ids, kv = _sent(model, tok)
    vocab = torch.arange(model.config.vocab_size)
    table = privacy.position_free_values(model, vocab)
    assert table is not None and table.shape == (len(vocab), kv.values[0].shape[1] * kv.values[0].shape[3])
    assert privacy.invert_cache(model, kv, layer=0, shortlist=4) == ids
    deep = kv.num_layers - 1  # no shortcut deeper in the model: the exhaustive search runs
    assert privacy.invert_cache(model, kv, layer=deep, shortlist=4) == ids
