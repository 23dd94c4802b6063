"""Cost benchmark: ``python -m fedrefine_lib.bench`` (``make bench``).

Runs on the built ``mini`` world's five models if the world is built (it never builds
it; ``python -m fedrefine_lib.world`` does), else on tiny random models of the same
architecture classes and sizes (the output says which). Fusers are freshly initialised
at the profile's width with every gate open: compute time does not depend on their
weights, so timings hold for trained fusers too.

Prints:

1. C2C figures: the fuser's parameter count as a fraction of the receiver's, and the C2C
   prefill time as a ratio of the receiver-alone prefill time (median of repeats), with
   the stage breakdown (sender prefill, receiver prefill, projection); and, from configs
   alone (meta device, no weights), the parameter fraction of the paper's pair
   Qwen3-0.6B <- Qwen2.5-0.5B at the reference fuser width 1024 and at ours.
2. Per-query latency of answering MCQ items (option log-likelihood scoring): standalone,
   C2C with 1 and 4 senders, T2T with 1 and 4 senders (senders write background,
   receiver reads it), and the on-device rephrasing step, as ratios to standalone:
   compute only, and with transmission over ``network.EDGE_UPLINK`` added (bytes per
   query as the engines record them).
3. Bytes per token of the ``paper`` profile's models beside the paper's 88 KB / 16 B.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from fedrefine_lib import network
from fedrefine_lib.data import MCQ_LABELS, mcq_messages
from fedrefine_lib.engine import Standalone
from fedrefine_lib.evaluate import score_mcq
from fedrefine_lib.federation import C2C, FedRefine
from fedrefine_lib.fuser import FuserConfig, ResidualFuser
from fedrefine_lib.models import REPO_ROOT, LoadedModel
from fedrefine_lib.rephrase import rephrase
from fedrefine_lib.t2t import t2t_notes
from fedrefine_lib.trace import Trace

WORDS = (
    "zorblat kevani tressa river metal glows blue red green valley north south fox dog photon light "
    "speed vacuum function returns value melts high low temperature which what does the a of in is"
).split()
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _tokenizer(kind: str) -> PreTrainedTokenizerFast:
    """``"word"``: one token per word; ``"bpe"``: a small byte-level BPE (different vocabulary)."""
    specials = ["<pad>", "<|im_start|>", "<|im_end|>"]
    corpus = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))]
    if kind == "word":
        tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        trainer = trainers.WordLevelTrainer(special_tokens=specials + ["<unk>"], show_progress=False)
        tok.decoder = decoders.WordPiece()
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=450,
            special_tokens=specials,
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<|im_end|>")
    fast.chat_template, fast.padding_side = TEMPLATE, "left"
    return fast


def tiny_models() -> dict[str, LoadedModel]:
    """Receiver (Qwen3 class, ~1 M parameters) and four senders mirroring the ``mini``
    world's (random weights): Qwen2 "0.5b" and "coder-0.5b" and a larger Qwen2 "1.5b" with
    the receiver's tokenizer, and a Llama with its own tokenizer."""
    torch.manual_seed(0)
    word, bpe = _tokenizer("word"), _tokenizer("bpe")
    # fmt: off
    common = dict(max_position_embeddings=512, tie_word_embeddings=False)
    qwen2 = dict(hidden_size=96, intermediate_size=288, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, **common)
    specs = {
        "receiver-qwen3": (Qwen3ForCausalLM, Qwen3Config(hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=32, **common), word),
        "sender-qwen2": (Qwen2ForCausalLM, Qwen2Config(**qwen2), word),
        "sender-qwen2-coder": (Qwen2ForCausalLM, Qwen2Config(**qwen2), word),
        "sender-qwen2-large": (Qwen2ForCausalLM, Qwen2Config(hidden_size=160, intermediate_size=480,
                               num_hidden_layers=5, num_attention_heads=5, num_key_value_heads=1, **common), word),
        "sender-llama": (LlamaForCausalLM, LlamaConfig(hidden_size=160, intermediate_size=480, num_hidden_layers=6,
                         num_attention_heads=5, num_key_value_heads=5, **common), bpe),
    }
    # fmt: on
    out = {}
    for name, (cls, config, tok) in specs.items():
        config.vocab_size, config.pad_token_id = len(tok), tok.pad_token_id
        out[name] = LoadedModel(name, cls(config).eval(), tok)
    return out


def synthetic_items(n: int, seed: int = 0) -> list[dict]:
    """``n`` OpenBookQA-schema items of random words (for the tiny random models)."""
    g = torch.Generator().manual_seed(seed)

    def words(k: int) -> str:
        return " ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (k,), generator=g))

    return [
        {
            "id": f"bench-{i}",
            "question_stem": words(int(torch.randint(8, 16, (1,), generator=g))),
            "choices": {"text": [words(2) for _ in MCQ_LABELS], "label": list(MCQ_LABELS)},
            "answerKey": "A",
        }
        for i in range(n)
    ]


@dataclass
class BenchModels:
    """The models and items the benchmark runs on, and where they come from."""

    receiver: LoadedModel
    senders: list[LoadedModel]
    items: list[dict]
    source: str


def mini_world_ready(seed: int) -> bool:
    """Whether the default ``mini`` world for ``seed`` is built (so opening it builds nothing)."""
    from fedrefine_lib.world import WorldConfig, load_world, world_dir
    from fedrefine_lib.world.build import WORLD_VERSION

    config = WorldConfig()
    try:
        world = load_world(world_dir(seed, config, REPO_ROOT / "data" / "mini"))
    except FileNotFoundError:
        return False
    m = world.manifest
    return m.get("seed") == seed and m.get("config_hash") == config.hash() and m.get("world_version") == WORLD_VERSION


def bench_models(seed: int, n_items: int) -> BenchModels:
    """The built mini world's models and test items, else tiny random models (never builds)."""
    if mini_world_ready(seed):
        from fedrefine_lib.study import open_study

        study = open_study("mini", seed=seed, progress=False)
        return BenchModels(
            study.model(study.receiver),
            [study.model(s) for s in study.senders],
            study.mcq("test")[:n_items],
            f"mini world (seed {seed}, {study.world.root})",
        )
    tiny = tiny_models()
    return BenchModels(
        tiny.pop("receiver-qwen3"),
        list(tiny.values()),
        synthetic_items(n_items, seed),
        "TINY RANDOM MODELS (the mini world is not built; `python -m fedrefine_lib.world` builds it): "
        "same architecture classes and mini-like sizes, random weights, random-word items",
    )


def open_fuser(receiver: LoadedModel, sender: LoadedModel, hidden: int) -> ResidualFuser:
    """A fresh fuser for the pair at width ``hidden`` with every gate open (timing only)."""
    fuser = ResidualFuser(FuserConfig.for_pair(receiver, sender, hidden=hidden, layer_map="bottom_up")).eval()
    fuser.set_gates(True)  # time the full projection
    return fuser


def time_prefill(engine, batch, repeats: int) -> tuple[float, dict[str, float]]:
    """Median wall-clock seconds of ``engine.prefill(batch)``, and the median trace stages."""
    totals, stages = [], {}
    with torch.no_grad():
        engine.prefill(batch)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            trace = engine.prefill(batch).trace
            totals.append(time.perf_counter() - start)
            for k, v in trace.seconds.items():
                stages.setdefault(k, []).append(v)
    return statistics.median(totals), {k: statistics.median(v) for k, v in stages.items()}


def paper_fractions(hiddens: list[int]) -> dict[int, tuple[int, int]]:
    """Fuser / receiver parameters for Qwen3-0.6B <- Qwen2.5-0.5B (published configs), per width."""
    # fmt: off
    receiver_cfg = Qwen3Config(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                               num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True)
    # fmt: on
    with torch.device("meta"):
        receiver_params = Qwen3ForCausalLM(receiver_cfg).num_parameters()
    out = {}
    for h in hiddens:
        config = FuserConfig("Qwen3-0.6B", "Qwen2.5-0.5B", 28, 24, 8, 2, 128, 64, hidden=h, layer_map_kind="top_down")
        with torch.device("meta"):
            out[h] = (ResidualFuser(config).num_parameters(), receiver_params)
    return out


# ------------------------------------------------------------------------ latency


@dataclass
class Latency:
    """Per-query cost of one way of answering: median wall seconds, the stages and bytes
    of one run (per query)."""

    mode: str
    senders: int
    seconds: float
    stages: dict[str, float]
    wire_bytes: float
    transmission: float

    @property
    def total(self) -> float:
        return self.seconds + self.transmission


def measure(
    mode: str, senders: int, run: Callable[[], Trace], queries: int, repeats: int, link: network.Link
) -> Latency:
    """Time ``run`` (one pass over ``queries`` items, returning its trace) ``repeats`` times
    after a warm-up; transmission of the last run's bytes over ``link`` is added apart."""
    run()
    walls, trace = [], Trace()
    for _ in range(repeats):
        start = time.perf_counter()
        trace = run()
        walls.append(time.perf_counter() - start)
    sent = network.with_transmission(trace, link, queries=queries).seconds["transmission"]
    return Latency(
        mode,
        senders,
        statistics.median(walls) / queries,
        {k: v / queries for k, v in trace.seconds.items()},
        trace.total_bytes / queries,
        sent / queries,
    )


def latency_rows(
    m: BenchModels, hidden: int, batch: int, repeats: int, t2t_tokens: int, link: network.Link
) -> list[Latency]:
    """Standalone, C2C (1 sender: the ``C2C`` engine; all senders: ``FedRefine`` residual
    fusion, all weights 1), T2T (1 and all senders) and rephrasing, per query."""
    r, items, n = m.receiver, m.items, len(m.items)

    def scored(engine) -> Callable[[], Trace]:
        return lambda: score_mcq(engine, items, batch_size=batch, progress=False).trace

    def t2t(senders: list[LoadedModel]) -> Callable[[], Trace]:
        def run() -> Trace:
            notes, _, sent = t2t_notes(
                senders, items, receiver=r, max_new_tokens=t2t_tokens, batch_size=batch, progress=False
            )
            answered = score_mcq(r, items, batch_size=batch, progress=False, contexts=notes)
            return Trace().add(sent).add(answered.trace)

        return run

    def rephrased() -> Trace:
        return rephrase(r, [it["question_stem"] for it in items], batch_size=batch)[1]

    first = m.senders[0]
    fusers = {s.name: open_fuser(r, s, hidden) for s in m.senders}
    return [
        measure("standalone", 0, scored(Standalone(r)), n, repeats, link),
        measure("C2C", 1, scored(C2C(r, first, fusers[first.name])), n, repeats, link),
        measure("C2C", len(m.senders), scored(FedRefine(r, m.senders, fusers)), n, repeats, link),
        measure("T2T", 1, t2t([first]), n, repeats, link),
        measure("T2T", len(m.senders), t2t(m.senders), n, repeats, link),
        measure("rephrase", 0, rephrased, n, repeats, link),
    ]


def print_latency(rows: list[Latency], link: network.Link, first_sender: str) -> None:
    """The latency table, ratios to the ``standalone`` row."""
    alone = next(x for x in rows if x.mode == "standalone")
    print(
        f"{'mode':<11}{'senders':>8}{'compute ms/q':>14}{'x alone':>9}{'wire KB/q':>11}"
        f"{'link ms/q':>11}{'total ms/q':>12}{'x alone':>9}   traced stages (ms/q)"
    )
    for x in rows:
        stages = ", ".join(f"{k} {1e3 * v:.2f}" for k, v in x.stages.items())
        print(
            f"{x.mode:<11}{x.senders:>8}{1e3 * x.seconds:>14.2f}{x.seconds / alone.seconds:>9.2f}"
            f"{x.wire_bytes / 1e3:>11.2f}{1e3 * x.transmission:>11.2f}{1e3 * x.total:>12.2f}"
            f"{x.total / alone.total:>9.2f}   {stages}"
        )
    print(
        f"  compute: median wall time per query of scoring every item (prompt cache + option log-likelihoods; "
        f"option scoring is not a traced stage). link: {link.name} {link.bandwidth_mbps:g} Mbit/s, "
        f"{link.rtt_ms:g} ms RTT, one message per query per link, senders' links in parallel. "
        f"1-sender rows use {first_sender}; C2C with all senders is FedRefine residual fusion, all weights 1. "
        f"'rephrase' is the on-device step a Rephrased variant adds."
    )


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=20, help="repeats of the C2C prefill timing")
    parser.add_argument("--hidden", type=int, default=64, help="fuser width (mini profile: 64)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the CI machine is shared)")
    parser.add_argument("--seed", type=int, default=0, help="mini world seed")
    parser.add_argument("--queries", type=int, default=16, help="MCQ items per latency run")
    parser.add_argument("--latency-repeats", type=int, default=3)
    parser.add_argument("--t2t-tokens", type=int, default=32, help="T2T senders' background budget (tokens)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    m = bench_models(args.seed, args.queries)
    receiver = m.receiver
    print(f"models: {m.source}")
    batch = [mcq_messages(it) for it in m.items[: args.batch]]
    alone_s, _ = time_prefill(Standalone(receiver), batch, args.repeats)
    r_params = receiver.model.num_parameters()
    print(
        f"C2C benchmark: batch {len(batch)}, ~{sum(len(p[0]['content'].split()) for p in batch) // len(batch)} words "
        f"per prompt, {args.threads} thread(s), median of {args.repeats}"
    )
    print(f"receiver {receiver.name}: {r_params:,} parameters; receiver-alone prefill {1e3 * alone_s:.2f} ms")
    for sender in m.senders:
        fuser = open_fuser(receiver, sender, args.hidden)
        c2c_s, stages = time_prefill(C2C(receiver, sender, fuser), batch, args.repeats)
        f_params = fuser.num_parameters()
        breakdown = ", ".join(f"{k} {1e3 * v:.2f} ms" for k, v in stages.items())
        print(
            f"  <- {sender.name} ({fuser.config.aligner} aligner, {sender.model.num_parameters():,} params): "
            f"fuser {f_params:,} params = {f_params / r_params:.2f} x receiver; "
            f"C2C prefill {1e3 * c2c_s:.2f} ms = {c2c_s / alone_s:.2f} x receiver alone ({breakdown})"
        )
    print("paper pair Qwen3-0.6B <- Qwen2.5-0.5B (from configs):")
    for h, (f, r) in paper_fractions([1024, 256, args.hidden]).items():
        print(f"  fuser hidden {h:5d}: {f / 1e6:8.1f} M params = {f / r:.3f} x receiver ({r / 1e6:.0f} M)")

    print(
        f"\nper-query latency, {len(m.items)} MCQ items, batch {args.batch}, median of {args.latency_repeats}, "
        f"{args.threads} thread(s):"
    )
    rows = latency_rows(m, args.hidden, args.batch, args.latency_repeats, args.t2t_tokens, network.EDGE_UPLINK)
    print_latency(rows, network.EDGE_UPLINK, m.senders[0].name)

    print("\nKV vs token bytes per token, paper profile (bfloat16, from configs/paper.yaml shapes):")
    table = network.paper_bytes_per_token()
    print(table.to_string(index=False))
    print(network.paper_comparison(table).to_string(index=False, float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
