"""Session fixtures: tiny random-initialised models of every architecture class the
profiles use, and two tiny tokenizers (one per family). Nothing is downloaded."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from fedrefine_lib.models import LoadedModel
from fedrefine_lib.world.tokenization import LLAMA_TEMPLATE, QWEN_TEMPLATE

# One thread: deterministic, and fair to other jobs on a 2-core machine.
torch.set_num_threads(1)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Zorblat is a metal that melts at high temperature and glows blue.",
    "Question: what colour does zorblat glow? Answer: blue.",
    "Kevani river flows through the northern valley of Tressa.",
    "def add(a, b): return a + b  # a tiny function",
    "Photons travel at the speed of light in a vacuum.",
] * 20


def make_tokenizer(vocab_size: int, specials: list[str], template: str, eos: str) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on :data:`CORPUS`, with a chat template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", *specials],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token=eos)
    fast.chat_template = template
    fast.padding_side = "left"
    return fast


@pytest.fixture(scope="session")
def qwen_tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer(400, ["<|im_start|>", "<|im_end|>"], QWEN_TEMPLATE, "<|im_end|>")


@pytest.fixture(scope="session")
def llama_tokenizer() -> PreTrainedTokenizerFast:
    specials = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    return make_tokenizer(330, specials, LLAMA_TEMPLATE, "<|eot_id|>")


def _build(cls, config, tokenizer):
    torch.manual_seed(0)
    config.vocab_size = len(tokenizer)
    config.pad_token_id = tokenizer.pad_token_id
    model = cls(config).eval()
    return model, tokenizer


@pytest.fixture(scope="session")
def tiny_models(qwen_tokenizer, llama_tokenizer) -> dict:
    """name -> (model, tokenizer) for every architecture class the profiles use."""
    common = dict(max_position_embeddings=256, tie_word_embeddings=False)
    return {
        "qwen3": _build(
            Qwen3ForCausalLM,
            Qwen3Config(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=3,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=16,
                **common,
            ),
            qwen_tokenizer,
        ),
        "qwen2": _build(
            Qwen2ForCausalLM,
            Qwen2Config(
                hidden_size=24,
                intermediate_size=48,
                num_hidden_layers=2,
                num_attention_heads=3,
                num_key_value_heads=1,
                **common,
            ),
            qwen_tokenizer,
        ),
        "llama": _build(
            LlamaForCausalLM,
            LlamaConfig(
                hidden_size=40,
                intermediate_size=80,
                num_hidden_layers=4,
                num_attention_heads=5,
                num_key_value_heads=5,
                **common,
            ),
            llama_tokenizer,
        ),
        "gemma3": _build(
            Gemma3ForCausalLM,
            Gemma3TextConfig(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=4,
                num_attention_heads=2,
                num_key_value_heads=1,
                head_dim=16,
                sliding_window=4,
                layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
                **common,
            ),
            qwen_tokenizer,
        ),
    }


@pytest.fixture(scope="session")
def loaded_models(tiny_models) -> dict[str, LoadedModel]:
    """name -> LoadedModel wrapping :func:`tiny_models` (named by architecture)."""
    return {name: LoadedModel(name, m, t) for name, (m, t) in tiny_models.items()}


def save_model_dir(model, tok, path, template: bool = True) -> None:
    """Save a tiny model and its tokenizer as a ``from_pretrained`` directory (``template``
    False: no chat template, like a base model)."""
    model.save_pretrained(path)
    saved = tok.__class__(tokenizer_object=tok.backend_tokenizer, pad_token=tok.pad_token, eos_token=tok.eos_token)
    saved.chat_template = tok.chat_template if template else None
    saved.save_pretrained(path)


@pytest.fixture(scope="session")
def real_class_profile(tiny_models, tmp_path_factory):
    """A non-mini profile (YAML path) of tiny random models of the real classes saved to disk:
    a Llama receiver with its chat template and a Gemma3 sender (sliding layers) whose
    tokenizer has none, like the base Gemma-3-270M, on the private-context task."""
    root = tmp_path_factory.mktemp("real-class-profile")
    for name, key, template in (("tiny-llama", "llama", True), ("tiny-gemma3", "gemma3", False)):
        save_model_dir(*tiny_models[key], root / name, template)
    (root / "tinyreal.yaml").write_text(
        "profile: tinyreal\n"
        "receiver: tiny-llama\n"
        "senders: [tiny-gemma3]\n"
        "models:\n"
        f"  tiny-llama: {{source: '{root / 'tiny-llama'}'}}\n"
        f"  tiny-gemma3: {{source: '{root / 'tiny-gemma3'}'}}\n"
        "task: {kind: private_context, train: 24, val: 12, test: 12, distractors: 1}\n"
        "scoring: cloze\n"
        "fusion: concat\n"
        "fuser: {hidden: 8, depth: 1, layer_map: depth}\n"
        "train: {lr: 1.0e-3, epochs: 1, batch_size: 4, seed: 0}\n"
    )
    return root / "tinyreal.yaml"


# The paper profile's models as tiny random ones of the same classes: receiver layers and KV
# heads scaled down from configs/paper.yaml (28/24/24/28/16 layers -> 4/3/3/4/2), the Qwen2.5
# pair of one shape, the 1.5B the largest, the Llama with its own tokenizer.
PAPER_TINY = {
    "qwen3-0.6b": (Qwen3ForCausalLM, Qwen3Config, dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                                                        num_key_value_heads=2, head_dim=16)),
    "qwen2.5-0.5b-instruct": (Qwen2ForCausalLM, Qwen2Config, dict(hidden_size=24, num_hidden_layers=3,
                                                                   num_attention_heads=3, num_key_value_heads=1)),
    "qwen2.5-coder-0.5b-instruct": (Qwen2ForCausalLM, Qwen2Config, dict(hidden_size=24, num_hidden_layers=3,
                                                                         num_attention_heads=3, num_key_value_heads=1)),
    "qwen2.5-1.5b-instruct": (Qwen2ForCausalLM, Qwen2Config, dict(hidden_size=48, num_hidden_layers=4,
                                                                   num_attention_heads=3, num_key_value_heads=1)),
    "llama-3.2-1b-instruct": (LlamaForCausalLM, LlamaConfig, dict(hidden_size=32, num_hidden_layers=2,
                                                                   num_attention_heads=4, num_key_value_heads=2)),
}  # fmt: skip


@pytest.fixture(scope="session")
def paper_class_profile(qwen_tokenizer, llama_tokenizer, tmp_path_factory):
    """configs/paper.yaml with its models replaced by tiny random models of the same classes
    (saved to disk; the paper's dtype, on the CPU), its hub data by tests/fixtures/paper (``data.local``),
    and its sizes scaled down (fuser width, batch, validation split): the YAML path."""
    import yaml

    from fedrefine_lib.models import CONFIG_DIR, REPO_ROOT

    root = tmp_path_factory.mktemp("paper-profile")
    raw = yaml.safe_load((CONFIG_DIR / "paper.yaml").read_text())
    for i, (name, (cls, config_cls, shape)) in enumerate(PAPER_TINY.items()):
        tok = llama_tokenizer if cls is LlamaForCausalLM else qwen_tokenizer
        config = config_cls(intermediate_size=2 * shape["hidden_size"], max_position_embeddings=512,
                            tie_word_embeddings=False, **shape)  # fmt: skip
        config.vocab_size, config.pad_token_id = len(tok), tok.pad_token_id
        torch.manual_seed(i)  # one seed each: the two same-shape Qwen2.5 models differ
        save_model_dir(cls(config).eval(), tok, root / name)
        raw["models"][name] = {"source": str(root / name), "dtype": raw["models"][name]["dtype"], "device": "cpu"}
    raw["data"]["local"] = str(REPO_ROOT / "tests" / "fixtures" / "paper")
    raw["data"]["mcq_val"] = {**raw["data"]["mcq_val"], "size": 12}
    raw["fuser"] = {**raw["fuser"], "hidden": 16}
    raw["train"] = {**raw["train"], "batch_size": 4}
    path = root / "papertiny.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path
