"""Source weighting for multi-sender FedRefine: how much of each source (the receiver's own
cache and each sender's projected cache) a receiver uses, per query.

Weights are a tensor ``[B, 1 + S]``: column 0 the receiver's own cache, column ``1 + j``
the engine's ``j``-th sender. ``federation.FedRefine`` uses them as:

- ``residual``: ``C = C_r + sum_j w_j * Delta_j`` (``Delta_j``: sender ``j``'s projected
  residual, ``federation.project``); ``w_0`` is not used (the own cache is the base);
- ``concat``: ``w_j`` multiplies the attention mass the receiver gives sender ``j``'s block
  (``log w_j`` on those attention logits) and ``w_0`` that of its own prompt cache (the own
  cache is never masked).

A sender weight of exactly 0 *closes* that sender: it has no effect at all (its residual
is not added / its block is masked), and a sender closed for a whole batch is not even run
and sends nothing. Policies (all callables ``policy(query) -> [B, 1 + S]``):

- :class:`EqualWeights`: every source 1 (the reference C2C's unweighted sum of residuals);
- :class:`SubsetSelection`: 1 for a fixed sender subset, or per domain (the paper's
  prior-knowledge selection; :func:`prior_subsets` picks each domain's best subset on
  the validation split; :func:`domain_lookup` finds a query's domain);
- :class:`LearnedGate`: a trained :class:`Gate` (one per receiver) reading the receiver's
  own view of the query (:func:`pooled_features`): either source weights trained through
  the fused cache by the answer loss (:func:`train_gate`), or a router that opens the one
  sender it predicts serves the query best (:func:`train_gate_selection` on
  :func:`source_success` or :func:`selection_targets` of validation questions).

:func:`oracle_correct` gives the per-question oracle selection (an upper bound).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence

import torch
from torch import nn

from fedrefine_lib.align import Messages
from fedrefine_lib.kv import KVCache, kv_shape
from fedrefine_lib.safe_io import save_module, sha256

OWN = "own"
"""Name of the receiver's own cache as a source (column 0 of the weights)."""
WEIGHTS_FILE = "gate.safetensors"
CONFIG_FILE = "gate_config.json"
FORMAT_VERSION = 3  # 3: max-pooled features


class GateLoadError(ValueError):
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


class Policy(Protocol):
    name: str

    def __call__(self, query: GateQuery) -> torch.Tensor: ...


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


def _ones(query: GateQuery) -> torch.Tensor:
    return torch.ones(query.mask.shape[0], 1 + len(query.senders), device=query.mask.device)


# ----------------------------------------------------------------------- policies


class EqualWeights:
    """Every sender with weight 1: the reference C2C's unweighted sum of residuals."""

    name = "equal"

    def __call__(self, query: GateQuery) -> torch.Tensor:
        return _ones(query)


class SubsetSelection:
    """Hard selection: weight 1 for the chosen senders, 0 (closed) for the others.

    Args:
        subsets: one sender subset for every query, or ``{domain: subset}`` (the paper's
            prior-knowledge selection, e.g. from :func:`prior_subsets`).
        domain_of: chat -> domain, needed with a per-domain dict (:func:`domain_lookup`).
    """

    def __init__(self, subsets: Sequence[str] | Mapping[str, Sequence[str]],
                 domain_of: Callable[[Messages], str] | None = None, name: str | None = None):
        self.per_domain = isinstance(subsets, Mapping)
        if self.per_domain and domain_of is None:
            raise ValueError("Per-domain subsets need domain_of (e.g. gating.domain_lookup(items)).")
        self.subsets = {k: tuple(v) for k, v in subsets.items()} if self.per_domain else tuple(subsets)
        self.domain_of = domain_of
        self.name = name or ("prior" if self.per_domain else "subset")

    def chosen(self, messages: Messages) -> tuple[str, ...]:
        if not self.per_domain:
            return self.subsets
        domain = self.domain_of(messages)
        if domain not in self.subsets:
            raise KeyError(f"No sender subset for domain {domain!r}; the selection knows {sorted(self.subsets)}.")
        return self.subsets[domain]

    def __call__(self, query: GateQuery) -> torch.Tensor:
        weights = torch.zeros(len(query.messages_batch), 1 + len(query.senders), device=query.mask.device)
        weights[:, 0] = 1.0
        for b, messages in enumerate(query.messages_batch):
            for name in self.chosen(messages):
                if name not in query.senders:
                    raise ValueError(
                        f"The selection chose sender {name!r}, which this engine does not have (it has "
                        f"{query.senders}); build the engine with every sender the selection may choose."
                    )
                weights[b, 1 + query.senders.index(name)] = 1.0
        return weights


def domain_lookup(items: Sequence[dict]) -> Callable[[Messages], str]:
    """Chat -> domain of the MCQ item whose ``question_stem`` it asks (the longest stem
    found in the last message wins). Raises naming the chat when none matches."""
    stems = sorted(((it["question_stem"], it.get("domain")) for it in items), key=lambda s: -len(s[0]))
    if any(d is None for _, d in stems):
        raise ValueError("Every item needs a 'domain' field for domain_lookup.")

    def domain_of(messages: Messages) -> str:
        text = messages[-1]["content"]
        for stem, domain in stems:
            if stem in text:
                return domain
        raise KeyError(f"No item's question_stem appears in the chat {text[:80]!r}; pass the items it asks about.")

    return domain_of


def prior_subsets(results: Mapping[Sequence[str], Any], metric: Callable[[Sequence[bool]], float] | None = None
                  ) -> dict[str, tuple[str, ...]]:
    """The paper's prior-knowledge selection: per domain, the sender subset with the best
    accuracy on the *validation* split.

    Args:
        results: sender subset (tuple of names; ``()`` = receiver alone) -> its
            ``evaluate.McqResult`` on validation items (with ``domain``).
    Returns:
        ``{domain: subset}``; ties go to the smaller subset, then name order.
    """
    metric = metric or (lambda c: sum(c) / len(c))
    per_domain: dict[str, list[tuple[float, int, tuple[str, ...]]]] = {}
    for subset, result in results.items():
        groups: dict[str, list[bool]] = {}
        for d, c in zip(result.domains, result.correct):
            groups.setdefault(str(d), []).append(bool(c))
        for d, correct in groups.items():
            per_domain.setdefault(d, []).append((-metric(correct), len(subset), tuple(sorted(subset))))
    return {d: min(cands)[2] for d, cands in sorted(per_domain.items())}


def oracle_correct(results: Mapping[Sequence[str], Any]) -> list[bool]:
    """Per-question oracle selection (upper bound): item ``i`` is right if any subset's
    result gets it right. All results must cover the same items in the same order."""
    results = list(results.values())
    if not results:
        raise ValueError("oracle_correct needs at least one result.")
    ids = results[0].ids
    for r in results[1:]:
        if r.ids != ids:
            raise ValueError("The results cover different items (ids differ); score every subset on the same items.")
    return [any(r.correct[i] for r in results) for i in range(len(ids))]


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
            :func:`train_gate`); ``"route"``: a router that sends each query to the one
            source it scores highest (trained by :func:`train_gate_selection`): weight 1
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
            raise ValueError(f"GateConfig.open_margin={self.open_margin}: use a chance difference in [0, 1) "
                             "(0 opens any sender the router scores above the receiver alone).")

    @property
    def features(self) -> int:
        return self.receiver_layers * self.receiver_kv_heads * self.receiver_head_dim

    @property
    def sources(self) -> list[str]:
        return [OWN, *self.senders]

    @classmethod
    def for_receiver(cls, receiver, senders: Sequence, **options: Any) -> "GateConfig":
        """Config for ``receiver`` (a ``LoadedModel``) over ``senders`` (models or names)."""
        layers, heads, head_dim = kv_shape(receiver.model.config)
        return cls(receiver.name, [getattr(s, "name", s) for s in senders], layers, heads, head_dim, **options)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Gate(nn.Module):
    """The per-receiver gating network: ``features [B, F] -> weights [B, 1 + S]``::

        x = (features - feature_mean) / feature_scale
        s = Linear(GELU(Linear(RMSNorm(x))))        # [B, 1 + S] scores
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
        """``[B, F]`` -> pre-sigmoid scores ``[B, 1 + S]``."""
        if features.shape[-1] != self.config.features:
            raise ValueError(
                f"Gate for {self.config.receiver_name} reads {self.config.features} features, got "
                f"{features.shape[-1]}: feed it gating.pooled_features of that receiver's own cache."
            )
        x = (features.to(self.out.weight.dtype) - self.feature_mean) / self.feature_scale
        return self.out(self.act(self.inp(self.norm(x))))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``[B, F]`` -> weights ``[B, 1 + S]`` over :attr:`GateConfig.sources`."""
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
            raise ValueError(f"Gate for {self.config.receiver_name} got another receiver's cache "
                             f"({query.receiver_cache.num_layers} layers, expected {self.config.receiver_layers}).")
        unknown = [s for s in query.senders if s not in self.config.senders]
        if unknown:
            raise ValueError(
                f"The gate for {self.config.receiver_name} was trained over senders {self.config.senders}; it has no "
                f"weight for {unknown}. Train a gate over these senders (gating.train_gate)."
            )
        dev = next(self.parameters()).device
        scores = self.logits(pooled_features(query.receiver_cache, query.mask).to(dev))  # [B, 1 + S_gate]
        cols = [0] + [1 + self.config.senders.index(s) for s in query.senders]
        return self._output(scores[:, cols])  # a router picks among the engine's sources only

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------ saving

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``gate.safetensors`` and ``gate_config.json``."""
        return save_module(self, directory, WEIGHTS_FILE, CONFIG_FILE,
                           {"format_version": FORMAT_VERSION, "config": self.config.to_dict()})

    @classmethod
    def from_pretrained(cls, directory: str | Path, receiver=None, senders: Sequence | None = None) -> "Gate":
        """Load strictly; with ``receiver``/``senders`` also check the gate belongs to them.

        Raises:
            GateLoadError: missing/corrupt files, checksum mismatch, another receiver or
                other senders, missing/extra/reshaped tensors (each named).
        """
        from safetensors.torch import load_file

        directory = Path(directory)
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            if not (directory / name).is_file():
                raise GateLoadError(f"No {name} in {directory}: not a saved gate (save one with Gate.save_pretrained).")
        try:
            meta = json.loads((directory / CONFIG_FILE).read_text())
            config = GateConfig(**meta["config"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise GateLoadError(f"Corrupt {directory / CONFIG_FILE}: {e}. Re-save or retrain the gate.") from e
        if meta.get("format_version") != FORMAT_VERSION:
            raise GateLoadError(f"{directory / CONFIG_FILE} has format_version {meta.get('format_version')}, "
                                f"this library reads {FORMAT_VERSION}.")
        if receiver is not None:
            actual = GateConfig.for_receiver(receiver, senders if senders is not None else config.senders)
            diffs = [f"{k}: gate has {getattr(config, k)!r}, models have {getattr(actual, k)!r}"
                     for k in ("receiver_name", "senders", "receiver_layers", "receiver_kv_heads", "receiver_head_dim")
                     if getattr(config, k) != getattr(actual, k)]
            if diffs:
                raise GateLoadError(f"Gate in {directory} does not fit: " + "; ".join(diffs)
                                    + ". Load the gate trained for this receiver and senders (or train one).")
        digest = sha256(directory / WEIGHTS_FILE)
        if meta.get("sha256") != digest:
            raise GateLoadError(f"Corrupt {directory / WEIGHTS_FILE}: sha256 differs from the one recorded at save "
                                "time. Re-save or retrain the gate.")
        state = load_file(str(directory / WEIGHTS_FILE))
        gate = cls(config)
        expected = {k: tuple(v.shape) for k, v in gate.state_dict().items()}
        problems = [f"missing {k}" for k in sorted(set(expected) - set(state))]
        problems += [f"unexpected {k}" for k in sorted(set(state) - set(expected))]
        problems += [f"{k}: saved {tuple(state[k].shape)}, expected {expected[k]}"
                     for k in sorted(set(expected) & set(state)) if tuple(state[k].shape) != expected[k]]
        if problems:
            raise GateLoadError(f"{directory / WEIGHTS_FILE} does not match its config: " + "; ".join(problems) + ".")
        gate.load_state_dict(state, strict=True)
        return gate.eval()


class LearnedGate:
    """A trained :class:`Gate` as a selection policy.

    Args:
        threshold: weights at or below it are closed (exactly 0; their senders are not
            run). 0 keeps every sender the gate's sigmoid leaves open.
    """

    name = "gate"

    def __init__(self, gate: Gate, threshold: float = 0.0):
        self.gate, self.threshold = gate, threshold

    @torch.no_grad()
    def __call__(self, query: GateQuery) -> torch.Tensor:
        w = self.gate.weights(query)
        return torch.where(w > self.threshold, w, torch.zeros_like(w))


# ---------------------------------------------------------------------- training


@dataclass
class GateTrainResult:
    """Loss per step, steps, seconds, and the config used."""

    losses: list[float]
    steps: int
    seconds: float
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _prepare(gate: Gate, engine, config) -> torch.device:
    """Freeze the engine's models and fusers, seed, and put ``gate`` in training mode."""
    from fedrefine_lib.train import freeze

    if gate.config.receiver_name != engine.receiver.name:
        raise ValueError(f"The gate belongs to receiver {gate.config.receiver_name!r}, the engine's receiver is "
                         f"{engine.receiver.name!r}.")
    torch.manual_seed(config.seed)
    for m in (engine.receiver, *engine.senders):
        freeze(m.model)
    for f in engine.fusers:
        f.eval().requires_grad_(False)
    dev = next(engine.receiver.model.parameters()).device
    gate.float().to(dev).train()
    return dev


def _optimise(gate: Gate, batches: list, loss_of: Callable[[Any], torch.Tensor], config, desc: str) -> GateTrainResult:
    """AdamW with linear warm-up/decay over ``config.epochs`` passes of ``batches`` (in a
    seeded random order each pass); ``loss_of(batch)`` gives the loss."""
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup

    total = len(batches) * config.epochs
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    optimizer = torch.optim.AdamW(gate.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(config.warmup_ratio * total), total)
    losses: list[float] = []
    step, start = 0, time.perf_counter()
    epoch_gen = torch.Generator().manual_seed(config.seed + 1)
    bar = tqdm(total=total, desc=desc, disable=not config.progress)
    while step < total:
        for b in torch.randperm(len(batches), generator=epoch_gen).tolist():
            if step >= total:
                break
            loss = loss_of(batches[b])
            loss.backward()
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(gate.parameters(), config.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)  # redraws follow mininterval
    bar.close()
    gate.eval()
    return GateTrainResult(losses, step, time.perf_counter() - start, config.to_dict())


def _batches(n: int, config) -> list[list[int]]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed)).tolist()
    return [order[i : i + config.batch_size] for i in range(0, n, config.batch_size)]


def train_gate(engine, gate: Gate, records: Sequence[Messages], config=None) -> GateTrainResult:
    """Train ``gate`` (in place) by the answer loss, the receiver, senders and fusers frozen.

    Loss: the receiver's answer loss (``train.answer_loss``, final assistant turn) with the
    gated multi-sender cache of ``engine`` (a ``federation.FedRefine``; its policy is
    ignored here). The LLM caches and the frozen fusers' projections of every batch are
    computed once, before training (they also fit the gate's feature standardisation);
    only the gate's weights change.

    Args:
        records: chat records ending with the assistant turn (e.g. ``data.mcq_records`` of
            validation questions, in which different senders help on different domains).
        config: a ``train.TrainConfig`` (``lr``, ``weight_decay``, ``warmup_ratio``,
            ``grad_clip``, ``epochs``, ``batch_size``, ``max_steps``, ``seed``, ``progress``).
    """
    from fedrefine_lib.align import right_pad
    from fedrefine_lib.federation import stop_token_ids
    from fedrefine_lib.train import TrainConfig, answer_loss, split_record

    config = config or TrainConfig()
    if not records:
        raise ValueError("No training records.")
    if gate.config.output != "weights":
        raise ValueError("train_gate trains weights through the fused cache; a router (output='route') is not "
                         "differentiable: train it with train_gate_selection.")
    dev = _prepare(gate, engine, config)
    tok, stops = engine.receiver.tokenizer, stop_token_ids(engine.receiver)
    batches = []
    for idx in _batches(len(records), config):
        prompts, answers = zip(*(split_record(tok, records[i], stops) for i in idx))
        with torch.no_grad():
            caches = engine.prompt_caches(list(prompts))
            projections = engine.project(caches)
        query = GateQuery(caches.messages_batch, caches.receiver_cache, caches.receiver_mask[:, :-1], engine.sender_names)
        batches.append((query, caches, projections, *right_pad(list(answers), dev)))
    gate.fit_features(torch.cat([pooled_features(q.receiver_cache, q.mask) for q, *_ in batches]).to(dev))

    def loss_of(batch) -> torch.Tensor:
        query, caches, projections, ans_ids, ans_mask = batch
        return answer_loss(engine.receiver.model, engine.combine(caches, projections, gate.weights(query)), ans_ids, ans_mask)

    return _optimise(gate, batches, loss_of, config, f"gate {gate.config.receiver_name}")


def _single_source_results(results: Mapping[Sequence[str], Any], items: Sequence[dict], senders: Sequence[str],
                           per_option: bool = False) -> list:
    """``[results[()], results[(s,)] for s in senders]``, checked to score ``items`` in order."""
    needed = [(), *[(s,) for s in senders]]
    missing = [k for k in needed if tuple(k) not in results]
    if missing:
        raise KeyError(f"Gate targets need results for the receiver alone and each single sender; missing {missing}.")
    ids = [str(it["id"]) for it in items]
    for k in needed:
        r = results[k]
        if [str(i) for i in r.ids] != ids or (per_option and not all(r.scores)):
            raise ValueError("The results must score exactly these items, in order"
                             + (", with per-option scores (method 'loglik' or 'letter')." if per_option else "."))
    return [results[k] for k in needed]


def source_success(results: Mapping[Sequence[str], Any], items: Sequence[dict], senders: Sequence[str],
                   by: str | None = "domain") -> torch.Tensor:
    """How well each source serves each question: ``[N, 1 + S]`` over ``[own, *senders]``
    (column 0: the receiver alone; column ``1 + j``: with sender ``j`` alone).

    Args:
        results: subset -> ``evaluate.McqResult`` on ``items`` (at least ``()`` and every
            single sender ``(j,)``; e.g. ``sweep.kv_sweep`` on the validation split).
        by: ``"domain"``: each source's accuracy over the questions of the question's
            domain (``item["domain"]``); ``None``: whether it answered this question right
            (0/1, a far noisier signal: on the mini world a router learns little from it).
    """
    runs = _single_source_results(results, items, senders)
    correct = torch.tensor([r.correct for r in runs], dtype=torch.float32).T  # [N, 1 + S]
    if by is None:
        return correct
    if by != "domain":
        raise ValueError(f"source_success(by={by!r}): use 'domain' or None.")
    unlabelled = [str(it.get("id")) for it in items if "domain" not in it]
    if unlabelled:
        raise ValueError(f"source_success(by='domain') needs each item's 'domain'; items {unlabelled[:5]} have none. "
                         "Pass by=None for per-question targets.")
    groups = [str(it["domain"]) for it in items]
    means = {g: correct[[i for i, x in enumerate(groups) if x == g]].mean(0) for g in set(groups)}
    return torch.stack([means[g] for g in groups])


def selection_targets(results: Mapping[Sequence[str], Any], items: Sequence[dict], senders: Sequence[str]) -> torch.Tensor:
    """The best source for each question: ``[N]`` indices over ``[own, *senders]``, the one
    whose run gives the right option the highest probability (softmax over the options'
    scores): ``0`` when the receiver alone beats every single sender (ties go to the lower
    index, so to the receiver alone)."""
    runs = _single_source_results(results, items, senders, per_option=True)

    def right_prob(result) -> torch.Tensor:
        return torch.stack([torch.softmax(torch.tensor(sc, dtype=torch.float64), 0)[it["choices"]["label"].index(it["answerKey"])]
                            for sc, it in zip(result.scores, items)])

    return torch.stack([right_prob(r) for r in runs], dim=1).argmax(1)  # first maximum: the receiver alone wins ties


@torch.no_grad()
def query_features(engine, messages_batch: list[Messages]) -> torch.Tensor:
    """:func:`pooled_features` of the receiver's own prefill of each chat, ``[B, F]``."""
    cache, mask = engine.receiver_view(messages_batch)
    return pooled_features(cache, mask)


def train_gate_selection(engine, gate: Gate, items: Sequence[dict], targets: torch.Tensor, config=None,
                         batch_size: int = 64) -> GateTrainResult:
    """Train a router gate (``output="route"``, in place) on validation questions, from the
    receiver's own view of each question; at inference it opens the source it scores
    highest (none when that is the own cache). Two kinds of ``targets``:

    - ``[N, 1 + S]`` per-source success in [0, 1] (:func:`source_success`): one binary
      cross-entropy per source, so each score estimates the chance that source answers the
      question right and the router opens the source with the best expected accuracy;
    - ``[N]`` best-source indices (:func:`selection_targets`): cross-entropy of the softmax
      over the sources, a classifier of the single best source of each question.

    Args:
        items: MCQ items asked with ``data.mcq_messages``; targets in the gate's source
            order ``[own, *senders]``.
    """
    from fedrefine_lib.data import mcq_messages
    from fedrefine_lib.train import TrainConfig

    config = config or TrainConfig()
    if gate.config.output != "route":
        raise ValueError("train_gate_selection trains a router; build the gate with GateConfig(output='route').")
    sources = 1 + len(gate.config.senders)
    if tuple(targets.shape) == (len(items), sources) and targets.is_floating_point():
        if bool((targets < 0).any() | (targets > 1).any()):
            raise ValueError("Per-source success targets must be probabilities in [0, 1] (gating.source_success).")
        objective = nn.functional.binary_cross_entropy_with_logits
    elif tuple(targets.shape) == (len(items),) and not targets.is_floating_point():
        if bool((targets < 0).any() | (targets >= sources).any()):
            raise ValueError(f"Best-source targets must be indices in 0..{sources - 1} (own cache, then "
                             f"{gate.config.senders}).")
        objective = nn.functional.cross_entropy
    else:
        raise ValueError(f"targets must be [{len(items)}, {sources}] per-source success probabilities "
                         f"(gating.source_success) or [{len(items)}] best-source indices (gating.selection_targets); "
                         f"got {tuple(targets.shape)} {targets.dtype}.")
    dev = _prepare(gate, engine, config)
    features = torch.cat([query_features(engine, [mcq_messages(it) for it in items[i : i + batch_size]])
                          for i in range(0, len(items), batch_size)]).to(dev)
    gate.fit_features(features)
    targets = targets.to(dev)

    def loss_of(idx: list[int]) -> torch.Tensor:
        return objective(gate.logits(features[idx]), targets[idx])

    return _optimise(gate, _batches(len(items), config), loss_of, config, f"gate {gate.config.receiver_name} (router)")
