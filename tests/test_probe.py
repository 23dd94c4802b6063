"""The cache probe: it reads an answer the cache holds, and only that."""

import random

import pytest

from fedrefine_lib import probe
from fedrefine_lib.prompts import encode_prompts

WORDS = list("abcdefgh")  # single tokens of the tiny test tokenizers


def question(word: str) -> list[dict]:
    return [{"role": "user", "content": word}]


def word_position(tokenizer) -> int:
    """Position (from the end) of the user's word: the same for every single-token word."""
    suffix = {len(encode_prompts(tokenizer, [question(w)])[0][0]) for w in WORDS}
    assert len(suffix) == 1, "every probe word must be one token"
    ids = encode_prompts(tokenizer, [question(WORDS[0])])[0][0].tolist()
    return ids.index(tokenizer(WORDS[0], add_special_tokens=False)["input_ids"][0]) - len(ids)


def test_probe_reads_a_word_the_cache_holds(loaded_models):
    model = loaded_models["qwen3"]
    pos = word_position(model.tokenizer)
    pairs = [(question(w), w.upper()) for w in WORDS]
    accuracy = probe.answer_probe(model, pairs * 3, pairs, position=pos)
    assert set(accuracy) == set(range(model.model.config.num_hidden_layers))
    assert accuracy[0] == 1.0  # layer 0 K/V at the word's position are a function of the word


def test_probe_cannot_read_an_answer_the_cache_lacks(loaded_models):
    model = loaded_models["qwen3"]
    pos = word_position(model.tokenizer)
    rng = random.Random(0)
    labels = ["a", "b", "c", "d"]
    train = [(question(w), rng.choice(labels)) for w in WORDS for _ in range(4)]
    test = [(question(w), rng.choice(labels)) for w in WORDS for _ in range(8)]
    accuracy = probe.answer_probe(model, train, test, position=pos)
    assert max(accuracy.values()) < 0.6  # random answers: about chance (0.25), never read off the cache


def test_probe_errors(loaded_models):
    with pytest.raises(ValueError, match="from the end"):
        probe.cache_features(loaded_models["qwen3"], [question("fox")], position=0)
    with pytest.raises(ValueError, match="training and test"):
        probe.answer_probe(loaded_models["qwen3"], [], [(question("fox"), "x")])
