"""The two tokenizer families of the ``mini`` world, trained with ``tokenizers``.

Both are byte-level BPE with a prefix space (so a word encodes the same way whether
it opens a separately encoded segment, e.g. an answer, or follows a space), wrapped as
``PreTrainedTokenizerFast`` (offset mappings supported) with a chat template:

* ``qwen`` — Qwen-style ``<|im_start|>role\\n...<|im_end|>``; shared by the receiver
  and three senders; a larger vocabulary (nearly every word one token);
* ``llama`` — Llama-3-style ``<|start_header_id|>role<|end_header_id|>\\n\\n...<|eot_id|>``;
  a smaller vocabulary, so invented names split into different pieces (different
  merges), which makes token alignment a real problem as with real models.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Tokenizer
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA_TEMPLATE = (
    "<|begin_of_text|>{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


@dataclass(frozen=True)
class Family:
    """Special tokens and chat template of one tokenizer family.

    ``doc_start``/``doc_end`` wrap a plain pretraining document; ``end_of_turn``
    closes an assistant answer (the generation stop token).
    """

    name: str
    specials: tuple[str, ...]
    pad: str
    end_of_turn: str
    doc_start: str | None
    doc_end: str
    bos: str | None
    template: str
    user_prefix: str
    assistant_piece: str


FAMILIES: dict[str, Family] = {
    "qwen": Family(
        "qwen",
        ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        pad="<|endoftext|>",
        end_of_turn="<|im_end|>",
        doc_start=None,
        doc_end="<|endoftext|>",
        bos=None,
        template=QWEN_TEMPLATE,
        user_prefix="user\n",
        assistant_piece="assistant\n",
    ),
    "llama": Family(
        "llama",
        (
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
            "<|finetune_right_pad_id|>",
        ),
        pad="<|finetune_right_pad_id|>",
        end_of_turn="<|eot_id|>",
        doc_start="<|begin_of_text|>",
        doc_end="<|end_of_text|>",
        bos="<|begin_of_text|>",
        template=LLAMA_TEMPLATE,
        user_prefix="\n\n",
        assistant_piece="assistant",
    ),
}


def train_tokenizer(family: str, texts: list[str], prompts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE of ``vocab_size``; wrap it with the family's special
    tokens and chat template. Deterministic for the same inputs.

    Args:
        texts: plain text as it is encoded (documents, answers).
        prompts: user-turn contents; trained as they appear inside the family's chat
            template (after the role header), with the assistant header beside them.
    """
    fam = FAMILIES[family]
    texts = list(texts) + [fam.user_prefix + p for p in prompts] + [fam.assistant_piece] * len(prompts)
    tok = Tokenizer(models.BPE())
    if family == "qwen":
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=False),
            ]
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(fam.specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        min_frequency=2,
    )
    tok.train_from_iterator(texts, trainer)
    if family == "qwen":
        vocab = tok.get_vocab()
        merges = [tuple(m) for m in json.loads(tok.to_str())["model"]["merges"]]
        fast = Qwen2Tokenizer(
            vocab=vocab,
            merges=merges,
            eos_token=fam.end_of_turn,
            pad_token=fam.pad,
            unk_token=None,
            model_max_length=512,
            add_prefix_space=True,
            clean_up_tokenization_spaces=True,
            extra_special_tokens=[t for t in fam.specials if t not in (fam.end_of_turn, fam.pad)],
        )
    else:
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok, pad_token=fam.pad, eos_token=fam.end_of_turn, bos_token=fam.bos, model_max_length=512
        )
    fast.chat_template = fam.template
    return fast
