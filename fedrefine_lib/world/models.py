"""The five models of the ``mini`` world: names, architecture classes, shapes, knowledge.

Shapes are scaled-down echoes of the ``paper`` profile's models (DESIGN §4):
genuinely different depth, width, head count, KV heads and head dim, with parameter counts
in the paper's ratios (receiver 0.6 : senders 0.5, 0.5, 1.5, 1.0; world version 8, seed 0:
0.84 M : 0.68 M, 0.68 M, 2.19 M, 1.44 M), so the "1.5b" has over 2.5x the receiver's
parameters. Qwen-family models share the ``qwen`` tokenizer; the Llama model has its own.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

RECEIVER = "mini-qwen3-0.6b"
SENDERS = ("mini-qwen2.5-0.5b", "mini-qwen2.5-coder-0.5b", "mini-qwen2.5-1.5b", "mini-llama3.2-1b")
ARCHES = {
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "llama": (LlamaConfig, LlamaForCausalLM),
}


@dataclass(frozen=True)
class MiniModel:
    """One model of the world: architecture, shape, tokenizer family, domains it knows.

    ``head_dim`` is set explicitly only where the architecture allows it to differ from
    ``hidden / heads`` (Qwen3, Llama); Qwen2 derives it.
    """

    name: str
    arch: str
    tokenizer: str
    domains: tuple[str, ...]
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    rephrase: bool = False
    paper_id: str = ""

    def __post_init__(self) -> None:
        if self.arch == "qwen2" and self.hidden != self.heads * self.head_dim:
            raise ValueError(
                f"{self.name}: Qwen2 needs hidden == heads * head_dim ({self.hidden} != {self.heads}*{self.head_dim})."
            )

    def hf_config(
        self, vocab_size: int, pad_id: int, eos_id: int, bos_id: int | None, tie: bool = True
    ) -> PretrainedConfig:
        """The transformers config for this model (fp32; ``tie`` ties the embeddings)."""
        config_cls, _ = ARCHES[self.arch]
        kwargs = dict(
            vocab_size=vocab_size,
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            max_position_embeddings=512,
            tie_word_embeddings=tie,
            pad_token_id=pad_id,
            eos_token_id=eos_id,
            bos_token_id=bos_id,
            initializer_range=0.02,
        )
        if self.arch != "qwen2":
            kwargs["head_dim"] = self.head_dim
        config = config_cls(**kwargs)
        config.architectures = [ARCHES[self.arch][1].__name__]
        return config

    def build(self, vocab_size: int, pad_id: int, eos_id: int, bos_id: int | None, tie: bool = True) -> PreTrainedModel:
        """A freshly initialised model (seed torch before calling for determinism)."""
        _, model_cls = ARCHES[self.arch]
        return model_cls(self.hf_config(vocab_size, pad_id, eos_id, bos_id, tie))


def mini_models(scale: str = "full") -> dict[str, MiniModel]:
    """The five models by name. ``scale="smoke"`` shrinks widths/depths for tests."""
    # fmt: off
    specs = [
        MiniModel(RECEIVER, "qwen3", "qwen", ("science",), layers=4, hidden=96, heads=4, kv_heads=2,
                  head_dim=24, intermediate=288, rephrase=True, paper_id="Qwen/Qwen3-0.6B"),
        MiniModel("mini-qwen2.5-0.5b", "qwen2", "qwen", ("science",), layers=3,
                  hidden=96, heads=6, kv_heads=1, head_dim=16, intermediate=256,
                  paper_id="Qwen/Qwen2.5-0.5B-Instruct"),
        MiniModel("mini-qwen2.5-coder-0.5b", "qwen2", "qwen", ("code",), layers=3, hidden=96,
                  heads=6, kv_heads=1, head_dim=16, intermediate=256,
                  paper_id="Qwen/Qwen2.5-Coder-0.5B-Instruct"),
        MiniModel("mini-qwen2.5-1.5b", "qwen2", "qwen", ("biology", "physics"), layers=5,
                  hidden=160, heads=5, kv_heads=1, head_dim=32, intermediate=512,
                  paper_id="Qwen/Qwen2.5-1.5B-Instruct"),
        MiniModel("mini-llama3.2-1b", "llama", "llama", ("geography",), layers=6,
                  hidden=128, heads=4, kv_heads=2, head_dim=32, intermediate=384,
                  paper_id="meta-llama/Llama-3.2-1B-Instruct"),
    ]
    # fmt: on
    if scale == "smoke":
        specs = [
            MiniModel(
                s.name,
                s.arch,
                s.tokenizer,
                s.domains,
                layers=max(1, s.layers - 2),
                hidden=s.heads * 4 if s.arch == "qwen2" else 24,
                heads=s.heads,
                kv_heads=s.kv_heads,
                head_dim=4 if s.arch == "qwen2" else 8,
                intermediate=32,
                rephrase=s.rephrase,
                paper_id=s.paper_id,
            )
            for s in specs
        ]
    elif scale != "full":
        raise ValueError(f"model_scale must be 'full' or 'smoke', got {scale!r}.")
    return {s.name: s for s in specs}
