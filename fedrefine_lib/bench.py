"""C2C cost benchmark: ``python -m fedrefine_lib.bench`` (``make bench``).

Prints, for tiny random pairs at ``mini``-profile sizes on this machine:

- the fuser's parameter count as a fraction of the receiver's;
- the C2C prefill time as a ratio of the receiver-alone prefill time (median of repeats),
  with the stage breakdown (sender prefill, receiver prefill, projection);

and, from configs alone (meta device, no weights), the parameter fraction of the paper's
pair Qwen3-0.6B <- Qwen2.5-0.5B at the reference fuser width 1024 and at ours.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM,
)

from fedrefine_lib.federation import C2C, Standalone
from fedrefine_lib.fuser import C2CFuser, FuserConfig
from fedrefine_lib.models import LoadedModel

WORDS = ("zorblat kevani tressa river metal glows blue red green valley north south fox dog photon light "
         "speed vacuum function returns value melts high low temperature which what does the a of in is").split()
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
        trainer = trainers.BpeTrainer(vocab_size=450, special_tokens=specials, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<|im_end|>")
    fast.chat_template, fast.padding_side = TEMPLATE, "left"
    return fast


def tiny_pair() -> dict[str, LoadedModel]:
    """Receiver (Qwen3 class, ~1 M parameters) and two senders: a Qwen2 with the same
    tokenizer and a Llama with its own, at sizes like the ``mini`` world's."""
    torch.manual_seed(0)
    word, bpe = _tokenizer("word"), _tokenizer("bpe")
    common = dict(max_position_embeddings=512, tie_word_embeddings=False)
    specs = {
        "receiver-qwen3": (Qwen3ForCausalLM, Qwen3Config(hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=32, **common), word),
        "sender-qwen2": (Qwen2ForCausalLM, Qwen2Config(hidden_size=96, intermediate_size=288, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, **common), word),
        "sender-llama": (LlamaForCausalLM, LlamaConfig(hidden_size=160, intermediate_size=480, num_hidden_layers=6,
                         num_attention_heads=5, num_key_value_heads=5, **common), bpe),
    }
    out = {}
    for name, (cls, config, tok) in specs.items():
        config.vocab_size, config.pad_token_id = len(tok), tok.pad_token_id
        out[name] = LoadedModel(name, cls(config).eval(), tok)
    return out


def prompts(n: int, seed: int = 0) -> list[list[dict[str, str]]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(30, 60, (1,), generator=g))
        words = [WORDS[int(i)] for i in torch.randint(len(WORDS), (length,), generator=g)]
        out.append([{"role": "user", "content": " ".join(words)}])
    return out


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
    receiver_cfg = Qwen3Config(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                               num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True)
    with torch.device("meta"):
        receiver_params = Qwen3ForCausalLM(receiver_cfg).num_parameters()
    out = {}
    for h in hiddens:
        config = FuserConfig("Qwen3-0.6B", "Qwen2.5-0.5B", 28, 24, 8, 2, 128, 64, hidden=h, layer_map_kind="top_down")
        with torch.device("meta"):
            out[h] = (C2CFuser(config).num_parameters(), receiver_params)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--hidden", type=int, default=64, help="fuser width (mini profile: 64)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the CI machine is shared)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    pair = tiny_pair()
    receiver = pair["receiver-qwen3"]
    batch = prompts(args.batch)
    alone_s, _ = time_prefill(Standalone(receiver), batch, args.repeats)
    r_params = receiver.model.num_parameters()
    print(f"C2C benchmark: batch {args.batch}, ~{sum(len(p[0]['content'].split()) for p in batch) // args.batch} words "
          f"per prompt, {args.threads} thread(s), median of {args.repeats}")
    print(f"receiver {receiver.name}: {r_params:,} parameters; receiver-alone prefill {1e3 * alone_s:.2f} ms")
    for name in ("sender-qwen2", "sender-llama"):
        sender = pair[name]
        fuser = C2CFuser(FuserConfig.for_pair(receiver, sender, hidden=args.hidden, layer_map="bottom_up")).eval()
        fuser.set_gates(True)  # time the full projection
        c2c_s, stages = time_prefill(C2C(receiver, sender, fuser), batch, args.repeats)
        f_params = fuser.num_parameters()
        breakdown = ", ".join(f"{k} {1e3 * v:.2f} ms" for k, v in stages.items())
        print(f"  <- {name} ({fuser.config.aligner} aligner, {sender.model.num_parameters():,} params): "
              f"fuser {f_params:,} params = {f_params / r_params:.2f} x receiver; "
              f"C2C prefill {1e3 * c2c_s:.2f} ms = {c2c_s / alone_s:.2f} x receiver alone ({breakdown})")
    print("paper pair Qwen3-0.6B <- Qwen2.5-0.5B (from configs):")
    for h, (f, r) in paper_fractions([1024, 256, args.hidden]).items():
        print(f"  fuser hidden {h:5d}: {f / 1e6:8.1f} M params = {f / r:.3f} x receiver ({r / 1e6:.0f} M)")


if __name__ == "__main__":
    main()
