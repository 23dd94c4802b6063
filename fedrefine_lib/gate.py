"""The gating network (one per receiver): reads the receiver's own view of a query and
gives a weight to each source, its own cache (column 0) and each sender (columns ``1..J``).

``gating`` turns a trained :class:`Gate` into a policy (``gating.LearnedGate``); ``train``
trains it (``train.train_gate``, ``train.train_gate_selection``). Saved as
``gate.safetensors`` + ``gate_config.json``, loaded strictly.

Shapes: ``B`` queries, ``N`` receiver prompt tokens, ``F`` features, ``J`` senders.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedrefine_lib.kv import KVCache, kv_shape
from fedrefine_lib.prompts import Messages
from fedrefine_lib.safe_io import LoadError, load_module, save_module, strict_config

OWN = "own"
"""Name of the receiver's own cache as a source (column 0 of the weights)."""
WEIGHTS_FILE = "gate.safetensors"
CONFIG_FILE = "gate_config.json"
FORMAT_VERSION = 3  # 3: max-pooled features


class GateLoadError(LoadError):
    """A saved gate cannot be loaded as asked (the message says what differs)."""


# ----------------------------------------------------------------------- queries


@dataclass
class GateQuery:
    """What a policy sees of a batch: the receiver's own view only (no sender was run).

    Attributes:
        messages_batch: the receiver's ``B`` chats.
        receiver_cache: the receiver's own prompt cache, per layer ``[B, H, N, D]``.
        mask: ``[B, N]``, 1 for the real tokens of ``receiver_cache``.
        senders: the engine's sender names, in weight-column order (columns ``1..S``).
    """

    messages_batch: list[Messages]
    receiver_cache: KVCache
    mask: torch.Tensor
    senders: list[str]


def pooled_features(cache: KVCache, mask: torch.Tensor) -> torch.Tensor:
    """The receiver's view of a query: the maximum over real tokens of every layer's values
    (a linear read-out of that layer's hidden states, already computed by the prefill).

    A maximum keeps what a few tokens say (the words that tell one topic from another);
    a mean drowns them in the chat template shared by every query (mini world, validation
    questions: 70 % of domains told apart from mean-pooled values, 91 % from max-pooled).

    Args:
        cache: per layer ``[B, H, N, D]``; mask: ``[B, N]`` (each row at least one real token).
    Returns:
        ``[B, layers * H * D]`` (fp32).
    """
    real = mask.bool()[:, None, :, None]  # [B, 1, N, 1]
    pooled = [v.float().masked_fill(~real.to(v.device), float("-inf")).amax(2) for v in cache.values]  # [B, H, D] each
    return torch.cat([p.flatten(1) for p in pooled], dim=1)


# -------------------------------------------------------------------------- gate


@dataclass
class GateConfig:
    """Shape of a gate and the receiver/sources it belongs to.

    Attributes:
        receiver_name: the receiver whose own cache the gate reads.
        senders: the sender names, in output order (column 0 is the own cache).
        receiver_layers, receiver_kv_heads, receiver_head_dim: the receiver cache shape.
        mode: the fusion mode it was trained for (``residual`` or ``concat``).
        hidden: width of the hidden layer.
        max_weight: the output range is ``(0, max_weight)``; the zero-initialised output
            layer makes a fresh gate give ``max_weight / 2`` for every source (the default
            2 gives 1: a fresh gate equals ``EqualWeights``).
        output: ``"weights"``: a weight per source, ``max_weight * sigmoid`` (trained by
            ``train.train_gate``); ``"route"``: a router that sends each query to the one
            source it scores highest (trained by ``train.train_gate_selection``): weight 1
            for the own cache and for that source if it is a sender, 0 (closed) for the
            other senders.
        open_margin: router only: the best sender is opened only when its predicted chance
            of a right answer (``sigmoid`` of its score) beats the receiver alone's by more
            than this; otherwise the receiver answers alone and nothing is sent. 0 opens
            any sender scored above the own cache. A margin is the price of a link: where
            the receiver already knows a domain, every source is predicted within a few
            points of it and opening a sender would spend bytes on noise.
        seed: seeds the initial weights (independent of the global RNG state, so a gate
            built after other work in the same session starts the same).
    """

    receiver_name: str
    senders: list[str]
    receiver_layers: int
    receiver_kv_heads: int
    receiver_head_dim: int
    mode: str = "residual"
    hidden: int = 64
    max_weight: float = 2.0
    output: str = "weights"
    open_margin: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.output not in ("weights", "route"):
            raise ValueError(f"GateConfig.output={self.output!r}: use 'weights' or 'route'.")
        if not 0.0 <= self.open_margin < 1.0:
            raise ValueError(
                f"GateConfig.open_margin={self.open_margin}: use a chance difference in [0, 1) "
                "(0 opens any sender the router scores above the receiver alone)."
            )

    @property
    def features(self) -> int:
        return self.receiver_layers * self.receiver_kv_heads * self.receiver_head_dim

    @property
    def sources(self) -> list[str]:
        return [OWN, *self.senders]

    @classmethod
    def for_receiver(cls, receiver, senders: Sequence, **options: Any) -> GateConfig:
        """Config for ``receiver`` (a ``LoadedModel``) over ``senders`` (models or names)."""
        layers, heads, head_dim = kv_shape(receiver.model.config)
        return cls(receiver.name, [getattr(s, "name", s) for s in senders], layers, heads, head_dim, **options)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Gate(nn.Module):
    """The per-receiver gating network: ``features [B, F] -> weights [B, 1 + J]``::

        x = (features - feature_mean) / feature_scale
        s = Linear(GELU(Linear(RMSNorm(x))))        # [B, 1 + J] scores
        w = max_weight * sigmoid(s)                 # output="weights"
        w = [1, onehot(j*)]  if σ(s_j*) > σ(s_0) + open_margin, else [1, 0...]
                                                    # output="route", j* = argmax_j>0 s_j

    Independent sigmoids (not a softmax), so it can open one, several or no senders; the
    output layer starts at zero, so a fresh gate equals :class:`EqualWeights`. The
    standardisation buffers ``[F]`` (identity until :meth:`fit_features`) remove what
    every query shares (the chat template dominates a mean over tokens), leaving what
    tells queries apart.
    """

    def __init__(self, config: GateConfig):
        super().__init__()
        self.config = config
        with torch.random.fork_rng(devices=[]):  # initial weights from config.seed alone
            torch.manual_seed(config.seed)
            self.norm = nn.RMSNorm(config.features, eps=1e-6)
            self.inp = nn.Linear(config.features, config.hidden)
            self.act = nn.GELU()
            self.out = nn.Linear(config.hidden, 1 + len(config.senders))
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.register_buffer("feature_mean", torch.zeros(config.features))
        self.register_buffer("feature_scale", torch.ones(config.features))

    @torch.no_grad()
    def fit_features(self, features: torch.Tensor) -> None:
        """Set the standardisation from training features ``[N, F]`` (per-feature mean and
        standard deviation; near-constant features keep scale 1)."""
        features = features.float()
        std = features.std(0, unbiased=False) if features.shape[0] > 1 else torch.zeros_like(features[0])
        self.feature_mean.copy_(features.mean(0))
        self.feature_scale.copy_(torch.where(std > 1e-6, std, torch.ones_like(std)))

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """``[B, F]`` -> pre-sigmoid scores ``[B, 1 + J]``."""
        if features.shape[-1] != self.config.features:
            raise ValueError(
                f"Gate for {self.config.receiver_name} reads {self.config.features} features, got "
                f"{features.shape[-1]}: feed it gate.pooled_features of that receiver's own cache."
            )
        x = (features.to(self.out.weight.dtype) - self.feature_mean) / self.feature_scale
        return self.out(self.act(self.inp(self.norm(x))))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``[B, F]`` -> weights ``[B, 1 + J]`` over :attr:`GateConfig.sources`."""
        return self._output(self.logits(features))

    def _output(self, scores: torch.Tensor) -> torch.Tensor:
        if self.config.output == "weights":
            return self.config.max_weight * torch.sigmoid(scores)
        routed = torch.zeros_like(scores)
        routed[:, 0] = 1.0  # the own cache is always read
        if scores.shape[-1] == 1:
            return routed
        best = scores[:, 1:].argmax(-1, keepdim=True)  # [B, 1]: the best sender (first on ties)
        best_score, own = scores[:, 1:].gather(1, best)[:, 0], scores[:, 0]
        margin = self.config.open_margin
        opened = (torch.sigmoid(best_score) - torch.sigmoid(own) > margin) if margin > 0 else best_score > own
        routed[opened.nonzero()[:, 0], 1 + best[opened, 0]] = 1.0
        return routed

    def weights(self, query: GateQuery) -> torch.Tensor:
        """Weights for an engine's senders (a subset of the gate's; the others are closed)."""
        if query.receiver_cache.num_layers != self.config.receiver_layers:
            raise ValueError(
                f"Gate for {self.config.receiver_name} got another receiver's cache "
                f"({query.receiver_cache.num_layers} layers, expected {self.config.receiver_layers})."
            )
        unknown = [s for s in query.senders if s not in self.config.senders]
        if unknown:
            raise ValueError(
                f"The gate for {self.config.receiver_name} was trained over senders {self.config.senders}; it has no "
                f"weight for {unknown}. Train a gate over these senders (train.train_gate)."
            )
        dev = next(self.parameters()).device
        scores = self.logits(pooled_features(query.receiver_cache, query.mask).to(dev))  # [B, 1 + J_gate]
        cols = [0] + [1 + self.config.senders.index(s) for s in query.senders]
        return self._output(scores[:, cols])  # a router picks among the engine's sources only

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------ saving

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``gate.safetensors`` and ``gate_config.json``."""
        return save_module(
            self,
            directory,
            WEIGHTS_FILE,
            CONFIG_FILE,
            {"format_version": FORMAT_VERSION, "config": self.config.to_dict()},
        )

    @classmethod
    def from_pretrained(cls, directory: str | Path, receiver=None, senders: Sequence | None = None) -> Gate:
        """Load strictly; with ``receiver``/``senders`` also check the gate belongs to them.

        Raises:
            GateLoadError: missing/corrupt files, checksum mismatch, another receiver or
                other senders, missing/extra/reshaped tensors (each named).
        """

        def check(config: GateConfig) -> None:
            if receiver is None:
                return
            actual = GateConfig.for_receiver(receiver, senders if senders is not None else config.senders)
            fields = ("receiver_name", "senders", "receiver_layers", "receiver_kv_heads", "receiver_head_dim")
            diffs = [
                f"{k}: gate has {getattr(config, k)!r}, models have {getattr(actual, k)!r}"
                for k in fields
                if getattr(config, k) != getattr(actual, k)
            ]
            if diffs:
                raise GateLoadError(
                    f"Gate in {directory} does not fit: "
                    + "; ".join(diffs)
                    + ". Load the gate trained for this receiver and senders (or train one)."
                )

        return load_module(
            directory, WEIGHTS_FILE, CONFIG_FILE, format_version=FORMAT_VERSION,
            parse=lambda meta: strict_config(GateConfig, meta), build=cls, check=check, what="gate",
            error=GateLoadError, missing=GateLoadError,
        )  # fmt: skip
