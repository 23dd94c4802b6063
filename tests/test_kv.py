"""KV-cache layer: extract -> rebuild -> continue equals a full recompute, for every class."""

import pytest
import torch

from fedrefine_lib import kv, transport

ARCHS = ["qwen3", "qwen2", "llama", "gemma3"]
TEXTS = ["Zorblat is a metal that glows blue in the dark.", "The fox jumps."]


def _batch(tok, texts):
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return enc.input_ids, enc.attention_mask


@pytest.mark.parametrize("arch", ARCHS)
def test_rebuilt_cache_continues_like_full_recompute(tiny_models, arch):
    model, tok = tiny_models[arch]
    ids, mask = _batch(tok, TEXTS)
    assert ids.shape[1] > 6  # longer than the Gemma-3 sliding window of the fixture
    full_logits, _ = kv.forward(model, ids, mask)

    split = ids.shape[1] - 3
    _, cache = kv.forward(model, ids[:, :split], mask[:, :split])
    cache = kv.KVCache.from_cache(cache)
    # Round trip through plain tensors and back into a fresh transformers cache.
    rebuilt = kv.KVCache(
        [k.clone() for k in cache.keys], [v.clone() for v in cache.values], cache.seq_len, cache.sliding
    ).to_cache(model.config)
    for t in range(split, ids.shape[1]):  # decode the rest one token at a time
        logits, rebuilt = kv.forward(model, ids[:, t : t + 1], mask[:, : t + 1], rebuilt)
        torch.testing.assert_close(logits[:, -1], full_logits[:, t], atol=1e-4, rtol=0)


def test_gemma_sliding_layers_restore_true_length(tiny_models):
    model, tok = tiny_models["gemma3"]
    ids, mask = _batch(tok, TEXTS[:1])
    _, cache = kv.forward(model, ids, mask)
    cache = kv.KVCache.from_cache(cache)
    assert cache.sliding == [True, True, False, True]
    assert cache.keys[0].shape[2] == model.config.sliding_window - 1 < ids.shape[1]
    assert cache.keys[2].shape[2] == ids.shape[1]
    rebuilt = cache.to_cache(model.config)
    assert rebuilt.get_seq_length() == ids.shape[1]
    assert [layer.get_seq_length() for layer in rebuilt.layers] == [ids.shape[1]] * 4


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_bytes_from_config_equal_encoded_payload(tiny_models, arch, dtype):
    model, tok = tiny_models[arch]
    ids, mask = _batch(tok, TEXTS[:1])
    _, cache = kv.forward(model, ids, mask)
    cache = kv.KVCache.from_cache(cache)
    enc = transport.encode(cache, transport.Encoding(dtype), "m")
    n = ids.shape[1]
    assert enc.payload_bytes == kv.kv_bytes(model.config, n, dtype) == cache.nbytes(dtype)
    if not any(cache.sliding):
        assert enc.payload_bytes / n == kv.kv_bytes_per_token(model.config, dtype)
        assert cache.bytes_per_token(dtype) == kv.kv_bytes_per_token(model.config, dtype)
    back = transport.decode(transport.EncodedKV.from_bytes(enc.to_bytes()), "m")
    assert back.seq_len == cache.seq_len and back.sliding == cache.sliding
    for a, b in zip(back.keys + back.values, cache.keys + cache.values):
        torch.testing.assert_close(a, b.to(kv.DTYPES[dtype]).float(), atol=0, rtol=0)


def test_kv_bytes_per_token_paper_receiver():
    from transformers import Qwen3Config

    cfg = Qwen3Config(num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128)
    # 2 * 28 * 8 * 128 * 2 bytes = 114,688 bytes in bf16
    assert kv.kv_bytes_per_token(cfg, "bfloat16") == 114_688


def test_bad_inputs_raise_clear_errors(tiny_models):
    model, tok = tiny_models["qwen2"]
    ids, mask = _batch(tok, TEXTS[:1])
    _, cache = kv.forward(model, ids, mask)
    cache = kv.KVCache.from_cache(cache)
    with pytest.raises(ValueError, match="Unsupported transport dtype"):
        transport.encode(cache, transport.Encoding("int3"), "m")
    enc = transport.encode(cache, transport.Encoding("float16"), "m")
    with pytest.raises(transport.PayloadError, match="truncated"):
        transport.decode(transport.EncodedKV(enc.header, enc.payload[:-2]))
    other, _ = tiny_models["llama"]
    with pytest.raises(ValueError, match="another model"):
        cache.to_cache(other.config)


def test_a_prompt_past_the_models_context_is_refused(tiny_models):
    model, _ = tiny_models["qwen3"]
    limit = model.config.max_position_embeddings
    logits, _ = kv.forward(model, torch.ones(1, limit, dtype=torch.long))  # exactly fits
    assert logits.shape[1] == limit
    with pytest.raises(ValueError, match=f"Position {limit} is past .*max_position_embeddings={limit}"):
        kv.forward(model, torch.ones(1, limit + 1, dtype=torch.long))
