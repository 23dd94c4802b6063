"""Layer maps and token aligners (crafted strings, two different byte-level BPE tokenizers)."""

import pytest
import torch

from fedrefine_lib import align
from fedrefine_lib.kv import KVCache
from fedrefine_lib.prompts import render

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Kevani flows, café!"}]


def test_layer_maps():
    assert align.layer_map(4, 2, "bottom_up") == [0, 1, 1, 1]
    assert align.layer_map(2, 4, "bottom_up") == [0, 1]
    assert align.layer_map(4, 2, "top_down") == [0, 0, 0, 1]
    assert align.layer_map(2, 4, "top_down") == [2, 3]
    assert align.layer_map(3, 5, "depth") == [0, 2, 4]
    assert align.layer_map(5, 3, "depth") == [0, 1, 1, 2, 2]  # halves round up
    assert align.layer_map(1, 4, "depth") == [3]
    assert align.layer_map(3, 5, "top") == [4, 4, 4]
    with pytest.raises(ValueError, match="Unknown layer map"):
        align.layer_map(2, 2, "sideways")


def test_span_aligner_maps_last_character(qwen_tokenizer, llama_tokenizer):
    a = align.SpanAligner()([MESSAGES], qwen_tokenizer, llama_tokenizer)
    r_tokens = qwen_tokenizer.convert_ids_to_tokens(a.receiver_ids[0].tolist())
    s_tokens = llama_tokenizer.convert_ids_to_tokens(a.sender_ids[0].tolist())
    pairs = [(r, s_tokens[i] if i >= 0 else None) for r, i in zip(r_tokens, a.sender_index[0].tolist())]
    # The sender reads its own natural tokenization of its own template.
    assert s_tokens[27:42] == ["Ke", "va", "n", "i", "Ġf", "low", "s", ",", "Ġ", "c", "a", "f", "Ã", "©", "!"]
    fused = [(r, s) for r, s in pairs if s is not None]
    assert fused == [
        ("B", "B"),
        ("e", "e"),
        ("Ġb", "Ġb"),
        ("r", "r"),
        ("i", "i"),
        ("e", "e"),
        ("f", "f"),
        (".", "."),
        ("Ke", "Ke"),
        ("vani", "i"),
        ("Ġflow", "low"),
        ("s", "s"),
        (",", ","),
        ("Ġ", "Ġ"),
        ("c", "c"),
        ("a", "a"),
        ("f", "f"),
        ("Ã", "©"),
        ("©", "©"),
        ("!", "!"),
    ]
    # Both bytes of "é" pair with the sender token that completes the character.
    idx = a.sender_index[0].tolist()
    assert idx[r_tokens.index("Ã")] == idx[r_tokens.index("©")] == 40
    # Template tokens are never fused.
    unfused = [r for r, s in pairs if s is None]
    assert unfused.count("<|im_start|>") == 3 and unfused.count("<|im_end|>") == 2


def test_reencode_aligner_one_sender_token_per_receiver_token(qwen_tokenizer, llama_tokenizer):
    a = align.ReencodeAligner()([MESSAGES], qwen_tokenizer, llama_tokenizer)
    r_tokens = qwen_tokenizer.convert_ids_to_tokens(a.receiver_ids[0].tolist())
    s_tokens = llama_tokenizer.convert_ids_to_tokens(a.sender_ids[0].tolist())
    idx = a.sender_index[0].tolist()
    fused = [(r, s_tokens[i]) for r, i in zip(r_tokens, idx) if i >= 0]
    assert fused[8:] == [
        ("Ke", "Ke"),
        ("vani", "va"),
        ("Ġflow", "Ġf"),
        ("s", "s"),
        (",", ","),
        ("Ġ", "Ġ"),
        ("c", "c"),
        ("a", "a"),
        ("f", "f"),
        ("Ã", "Ã"),
        ("©", "Ã"),
        ("!", "!"),
    ]
    # The sender reads exactly one re-encoded token per receiver content token, in order.
    content = [i for i in idx if i >= 0]
    assert content == sorted(content) and len(set(content)) == len(content)
    assert s_tokens[27:39] == ["Ke", "va", "Ġf", "s", ",", "Ġ", "c", "a", "f", "Ã", "Ã", "!"]
    assert s_tokens[:2] == ["<|begin_of_text|>", "<|start_header_id|>"]  # sender's own template


def test_identity_aligner(qwen_tokenizer, llama_tokenizer):
    a = align.IdentityAligner()([MESSAGES], qwen_tokenizer, qwen_tokenizer)
    assert torch.equal(a.receiver_ids, a.sender_ids)
    assert a.sender_index[0].tolist() == list(range(a.receiver_ids.shape[1]))
    with pytest.raises(ValueError, match="span"):
        align.IdentityAligner()([MESSAGES], qwen_tokenizer, llama_tokenizer)
    assert align.get_aligner(None, qwen_tokenizer, qwen_tokenizer).name == "identity"
    assert align.get_aligner(None, qwen_tokenizer, llama_tokenizer).name == "span"


@pytest.mark.parametrize("name", ["identity", "span", "reencode"])
def test_batch_alignment_equals_per_sample(name, qwen_tokenizer, llama_tokenizer):
    sender_tok = qwen_tokenizer if name == "identity" else llama_tokenizer
    short = [{"role": "user", "content": "Hi."}]
    aligner = align.get_aligner(name)
    batch = aligner([MESSAGES, short], qwen_tokenizer, sender_tok)
    for b, msgs in enumerate([MESSAGES, short]):
        one = aligner([msgs], qwen_tokenizer, sender_tok)
        r_real = batch.receiver_mask[b].bool()
        s_real = batch.sender_mask[b].bool()
        assert batch.receiver_ids[b][r_real].tolist() == one.receiver_ids[0].tolist()
        assert batch.sender_ids[b][s_real].tolist() == one.sender_ids[0].tolist()
        idx = batch.sender_index[b][r_real]
        shift = int((~s_real).sum())
        assert torch.equal(torch.where(idx >= 0, idx - shift, idx), one.sender_index[0])
        assert (batch.sender_index[b][~r_real] == -1).all()


def test_align_cache_gathers_and_masks():
    keys = [torch.arange(2 * 1 * 4 * 2, dtype=torch.float).view(2, 1, 4, 2) + 100 * l for l in range(2)]
    sender = KVCache(keys, [k + 0.5 for k in keys], seq_len=4)
    index = torch.tensor([[3, -1, 0], [1, 2, -1]])
    aligned, mask = align.align_cache(sender, index, [1, 1, 0])
    assert aligned.num_layers == 3 and aligned.keys[0].shape == (2, 1, 3, 2)
    assert torch.equal(aligned.keys[0][0, 0, 0], keys[1][0, 0, 3])
    assert torch.equal(aligned.values[2][1, 0, 1], keys[0][1, 0, 2] + 0.5)
    assert (aligned.keys[0][0, 0, 1] == 0).all() and mask.tolist() == [[True, False, True], [True, True, False]]
    with pytest.raises(ValueError, match="every position"):
        short = KVCache([k[:, :, 1:] for k in keys], [k[:, :, 1:] for k in keys], seq_len=4)
        align.align_cache(short, index, [0, 1, 1])


OTHER = [
    {"role": "system", "content": "Be."},
    {"role": "user", "content": "Zorblat glows blue in the northern valley."},
]


def test_span_aligner_with_another_sender_text(qwen_tokenizer, llama_tokenizer):
    """The sender reads another text: receiver content tokens pair by their offset in the
    segment, clamped to the sender's segment; the sender reads its own natural tokens."""
    a = align.SpanAligner()([MESSAGES], qwen_tokenizer, llama_tokenizer, sender_messages_batch=[OTHER])
    own = render(llama_tokenizer, OTHER)
    assert a.sender_ids[0].tolist() == own.ids
    r = render(qwen_tokenizer, MESSAGES)
    for t, i in enumerate(a.sender_index[0].tolist()):
        pos = align._content_position(r, t)
        if pos is None:
            assert i == -1
            continue
        seg_a, seg_b = own.segments[pos[0]]
        char = seg_a + min(pos[1], seg_b - seg_a - 1)
        s_a, s_b = own.offsets[i]
        assert s_a <= char < s_b  # the sender token covering the paired character
    # "Be brief." (9 chars) against "Be." (3 chars): the tail pairs with the last sender character.
    sys_idx = [
        i for t, i in enumerate(a.sender_index[0].tolist()) if (p := align._content_position(r, t)) and p[0] == 0
    ]
    assert sys_idx[-1] == own.offsets.index(next(o for o in own.offsets if o[0] <= own.segments[0][1] - 1 < o[1]))
    same = align.SpanAligner()([MESSAGES], qwen_tokenizer, llama_tokenizer, sender_messages_batch=[MESSAGES])
    plain = align.SpanAligner()([MESSAGES], qwen_tokenizer, llama_tokenizer)
    assert torch.equal(same.sender_index, plain.sender_index)
    # Fewer sender turns: segments pair from the last one back; the receiver's extra turn is not fused.
    fewer = align.SpanAligner()([MESSAGES], qwen_tokenizer, llama_tokenizer, sender_messages_batch=[OTHER[1:]])
    segs = [p[0] if (p := align._content_position(r, t)) else None for t in range(len(r.ids))]
    idx = fewer.sender_index[0].tolist()
    assert all(i == -1 for i, k in zip(idx, segs) if k == 0) and all(i >= 0 for i, k in zip(idx, segs) if k == 1)
    with pytest.raises(ValueError, match="one chat per receiver chat"):
        align.SpanAligner()([MESSAGES], qwen_tokenizer, llama_tokenizer, sender_messages_batch=[OTHER, OTHER])
    with pytest.raises(ValueError, match="span"):
        align.ReencodeAligner()([MESSAGES], qwen_tokenizer, llama_tokenizer, sender_messages_batch=[OTHER])


def test_identity_aligner_with_another_sender_text(qwen_tokenizer):
    short = [{"role": "user", "content": "Hi."}]
    a = align.IdentityAligner()(
        [MESSAGES, short], qwen_tokenizer, qwen_tokenizer, sender_messages_batch=[short, MESSAGES]
    )
    r_len, s_len = int(a.receiver_mask[0].sum()), int(a.sender_mask[0].sum())
    assert s_len < r_len
    shift = a.sender_ids.shape[1] - s_len
    assert (a.sender_index[0][-r_len:] - shift).tolist() == [min(t, s_len - 1) for t in range(r_len)]


def test_span_template_fuses_template_tokens_gap_by_gap(qwen_tokenizer, llama_tokenizer):
    messages = [[{"role": "user", "content": "Zorblat glows blue."}]]
    span = align.get_aligner("span")(messages, qwen_tokenizer, llama_tokenizer)
    both = align.get_aligner("span_template")(messages, qwen_tokenizer, llama_tokenizer)
    content = span.sender_index[0] >= 0
    assert torch.equal(both.sender_index[0][content], span.sender_index[0][content])  # content unchanged
    assert (both.sender_index[0] >= 0).all()  # every receiver token now reads a sender token
    # The generation prompt: receiver's last token reads the sender's last token, and so on back.
    assert both.sender_index[0, -1] == both.sender_ids.shape[1] - 1
    assert both.sender_index[0, -2] == both.sender_ids.shape[1] - 2
    assert both.sender_index[0, 0] == both.sender_index[0, :3].min()  # the first gap maps from its end too


@pytest.mark.parametrize(
    "messages, prefix",
    [
        ([{"role": "user", "content": "user"}], None),  # the role name the template writes just before it
        ([{"role": "system", "content": "a"}, {"role": "user", "content": "start"}], None),  # inside <|im_start|>
        ([{"role": "user", "content": "Hi."}], "assistant"),  # a prefix the generation prompt also holds
    ],
)
def test_span_aligner_finds_short_messages_that_also_occur_in_the_template(
    messages, prefix, qwen_tokenizer, llama_tokenizer
):
    """Contents are located where the template puts them (not at their first occurrence in the
    rendered text), so only content tokens are fused, each with a token of the sender's content."""
    contents = [m["content"] for m in messages] + ([prefix] if prefix else [])
    rendered = {t: render(t, messages, prefix) for t in (qwen_tokenizer, llama_tokenizer)}
    for tok, r in rendered.items():
        assert [r.text[a:b] for a, b in r.segments] == contents
        marked = render(tok, [{**m, "content": f"@{i}@"} for i, m in enumerate(messages)]).text
        for (a, _), i in zip(r.segments, range(len(messages))):  # same template text before each content
            assert a == marked.index(f"@{i}@") + sum(len(c) - 3 for c in contents[:i])
        if prefix:
            assert r.segments[-1][0] == len(r.text) - len(prefix)
    a = align.SpanAligner()([messages], qwen_tokenizer, llama_tokenizer, assistant_prefix=prefix)
    r, s = rendered[qwen_tokenizer], rendered[llama_tokenizer]
    for t, i in enumerate(a.sender_index[0].tolist()):
        pos = align._content_position(r, t)
        assert (i >= 0) == (pos is not None), r.offsets[t]
        if i >= 0:
            k, offset = pos
            s_a, s_b = s.offsets[i]
            assert s.segments[k][0] <= s_a < s.segments[k][1] and s_a <= s.segments[k][0] + offset < s_b
    fused = [r.text[slice(*r.offsets[t])] for t, i in enumerate(a.sender_index[0].tolist()) if i >= 0]
    assert "".join(fused) == "".join(contents)
