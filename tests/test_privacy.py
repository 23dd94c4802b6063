"""Cache inversion with the sender's weights recovers a known query from a tiny model's cache
(exact in float32, most tokens through int8, little through heavy noise); the measures on
crafted cases."""

import pytest
import torch

from fedrefine_lib import privacy, transport
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
