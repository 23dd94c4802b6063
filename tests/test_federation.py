"""Engines and decoding: batched with left padding == per sample, prefill-only fusion, traces."""

import pytest
import torch

from fedrefine_lib import federation, kv
from fedrefine_lib.decode import generate, generate_ids
from fedrefine_lib.engine import Standalone, continue_prefill
from fedrefine_lib.fuser import FuserConfig, ResidualFuser
from fedrefine_lib.t2t import TOKEN_ID_BYTES, t2t_notes
from fedrefine_lib.trace import Trace

PROMPTS = [
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What colour does zorblat glow, and why?"},
    ],
    [{"role": "user", "content": "Fox?"}],
    [{"role": "user", "content": "Kevani river flows through the northern valley of Tressa."}],
]
# (receiver, sender): sender with fewer layers, more layers; same and different tokenizers;
# a sliding-window sender and a sliding-window receiver.
PAIRS = [("qwen3", "qwen2"), ("qwen3", "llama"), ("qwen3", "gemma3"), ("llama", "qwen3"), ("gemma3", "llama")]


def c2c_engine(loaded_models, receiver, sender):
    torch.manual_seed(0)
    fuser = ResidualFuser(FuserConfig.for_pair(loaded_models[receiver], loaded_models[sender], hidden=16))
    with torch.no_grad():
        for p in fuser.parameters():
            p.normal_(0, 0.3)
    fuser.eval().set_gates(True)
    return federation.C2C(loaded_models[receiver], loaded_models[sender], fuser)


@pytest.mark.parametrize("receiver,sender", [(r, None) for r in ("qwen3", "llama", "gemma3")] + PAIRS)
def test_batched_equals_per_sample(loaded_models, receiver, sender):
    engine = Standalone(loaded_models[receiver]) if sender is None else c2c_engine(loaded_models, receiver, sender)
    with torch.no_grad():
        pre = engine.prefill(PROMPTS)
        batch_logits = continue_prefill(engine.receiver.model, pre)[:, -1]
    texts, _ = generate(engine, PROMPTS, max_new_tokens=8)
    for b, prompt in enumerate(PROMPTS):
        with torch.no_grad():
            one = engine.prefill([prompt])
            logits = continue_prefill(engine.receiver.model, one)[:, -1]
        torch.testing.assert_close(batch_logits[b : b + 1], logits, atol=1e-5, rtol=1e-4)
        real = pre.attention_mask[b].bool()
        assert pre.input_ids[b][real].tolist() == one.input_ids[0].tolist()
        # The fused cache of the real tokens is the same, whatever the padding.
        n = one.cache.seq_len
        torch.testing.assert_close(pre.cache.values[-1][b : b + 1, :, -n:], one.cache.values[-1], atol=1e-5, rtol=1e-4)
        assert generate(engine, [prompt], max_new_tokens=8)[0] == [texts[b]]


def test_fusion_only_at_prefill(loaded_models, monkeypatch):
    engine = c2c_engine(loaded_models, "qwen3", "llama")
    calls = []
    sender_model = loaded_models["llama"].model
    original = sender_model.forward
    monkeypatch.setattr(sender_model, "forward", lambda *a, **k: calls.append(1) or original(*a, **k))
    with torch.no_grad():
        pre = engine.prefill(PROMPTS[:2])
    assert pre.cache.seq_len == pre.input_ids.shape[1] - 1  # all prompt tokens but the last
    calls.clear()
    texts, trace = generate(engine, PROMPTS[:2], max_new_tokens=5)
    assert len(calls) == 1  # one sender prefill, no decoding work
    assert set(trace.seconds) == {
        "tokenize",
        "alignment",
        "sender_prefill",
        "receiver_prefill",
        "gating",
        "projection",
        "combine",
        "decode",
    }
    assert trace.total_seconds == pytest.approx(sum(trace.seconds.values()))
    lengths = engine.aligners[0](
        PROMPTS[:2], loaded_models["qwen3"].tokenizer, loaded_models["llama"].tokenizer
    ).sender_mask.sum(1)
    expected = sum(kv.kv_bytes(sender_model.config, int(n), "bfloat16") for n in lengths)
    assert trace.bytes == {"llama->qwen3": expected}
    assert trace.tokens["sender_prompt"] == int(lengths.sum())


def test_standalone_matches_plain_forward(loaded_models):
    """The prefill + last-token step equals one forward pass over the whole prompt."""
    r = loaded_models["qwen3"]
    with torch.no_grad():
        pre = Standalone(r).prefill(PROMPTS)
        logits = continue_prefill(r.model, pre)[:, -1]
        full, _ = kv.forward(r.model, pre.input_ids, pre.attention_mask)
    torch.testing.assert_close(logits, full[:, -1], atol=1e-5, rtol=1e-4)


def test_trace_add():
    a = Trace({"decode": 1.0}, {"x->y": 10}, {"prompt": 3})
    a.add(Trace({"decode": 0.5, "sender_prefill": 2.0}, {"x->y": 5}))
    assert a.seconds == {"decode": 1.5, "sender_prefill": 2.0} and a.total_seconds == 3.5 and a.total_bytes == 15


# ------------------------------------------------------------------ wrong-cache control


def test_sender_view_control_runs_and_differs(loaded_models):
    """The sender reads another question: the fused cache differs from plain C2C; an
    identity view gives plain C2C back exactly."""
    normal = c2c_engine(loaded_models, "qwen3", "llama")
    control = federation.C2C(normal.receiver, normal.senders[0], normal.fusers[0], sender_view=federation.rotate(1))
    same = federation.C2C(normal.receiver, normal.senders[0], normal.fusers[0], sender_view=lambda batch: batch)
    with torch.no_grad():
        a, b, c = (e.prefill(PROMPTS) for e in (normal, control, same))
    assert torch.equal(a.input_ids, b.input_ids)  # the receiver reads its own question
    assert not torch.allclose(a.cache.values[-1], b.cache.values[-1])
    assert all(torch.equal(x, y) for x, y in zip(a.cache.values, c.cache.values))
    # What the control sends is the other questions' caches.
    lengths = normal.aligners[0](
        PROMPTS[1:] + PROMPTS[:1], normal.receiver.tokenizer, normal.senders[0].tokenizer
    ).sender_mask.sum(1)
    assert b.trace.bytes["llama->qwen3"] == sum(kv.kv_bytes(normal.senders[0].model.config, int(n)) for n in lengths)
    texts, _ = generate(control, PROMPTS, max_new_tokens=3)
    assert len(texts) == len(PROMPTS)
    with pytest.raises(ValueError, match="rotate"):
        control.prefill(PROMPTS[:1])


def test_sender_view_same_tokenizer(loaded_models):
    normal = c2c_engine(loaded_models, "qwen3", "qwen2")
    control = federation.C2C(normal.receiver, normal.senders[0], normal.fusers[0], sender_view=federation.rotate(2))
    with torch.no_grad():
        a, b = normal.prefill(PROMPTS), control.prefill(PROMPTS)
    assert torch.equal(a.input_ids, b.input_ids) and not torch.allclose(a.cache.keys[0], b.cache.keys[0])


# ---------------------------------------------------------------------------- T2T

ITEMS = [
    {
        "id": f"q{i}",
        "question_stem": stem,
        "answerKey": "A",
        "choices": {"label": ["A", "B", "C", "D"], "text": ["blue", "red", "green", "the fox"]},
    }
    for i, stem in enumerate(["What colour does zorblat glow?", "Which river flows through Tressa?", "What jumps?"])
]


def test_t2t_notes_trace_adds_up(loaded_models):
    from fedrefine_lib import data, evaluate

    senders = [loaded_models["qwen2"], loaded_models["llama"]]
    notes, texts, trace = t2t_notes(
        senders, ITEMS, receiver=loaded_models["qwen3"], max_new_tokens=4, batch_size=2, progress=False
    )
    assert len(notes) == len(texts) == len(ITEMS) and all(len(t) == 2 for t in texts)
    assert notes == [data.context_note(t) for t in texts]
    assert set(trace.seconds) == {"sender_prefill", "sender_decode"}
    assert trace.total_seconds == pytest.approx(trace.seconds["sender_prefill"] + trace.seconds["sender_decode"])
    # Bytes = the token ids each sender actually generated x 4.
    total = 0
    for k, s in enumerate(senders):
        rows = []
        for i in range(0, len(ITEMS), 2):
            r, _ = generate_ids(
                Standalone(s), [data.background_messages(it["question_stem"]) for it in ITEMS[i : i + 2]], 4
            )
            rows += r
        assert [data.tidy_text(s.tokenizer.decode(r, skip_special_tokens=True)) for r in rows] == [t[k] for t in texts]
        n = sum(len(r) for r in rows)
        assert trace.bytes[f"{s.name}->qwen3"] == n * TOKEN_ID_BYTES
        total += n
    assert trace.tokens["sender_generated"] == total
    # The receiver answers with the notes in its context.
    with_notes = evaluate.score_mcq(loaded_models["qwen3"], ITEMS, contexts=notes, progress=False)
    one = evaluate.score_mcq(loaded_models["qwen3"], ITEMS[1:2], contexts=notes[1:2], progress=False)
    assert one.scores[0] == pytest.approx(with_notes.scores[1], abs=1e-4)
    plain = evaluate.score_mcq(loaded_models["qwen3"], ITEMS, progress=False)
    assert with_notes.scores != plain.scores
    # Per-sender stems (e.g. each its own rephrasing).
    _, texts2, _ = t2t_notes(senders[:1], ITEMS, stems={"qwen2": ["Q?"] * 3}, max_new_tokens=2, progress=False)
    assert len(texts2) == 3
    with pytest.raises(KeyError, match="llama"):
        t2t_notes(senders, ITEMS, stems={"qwen2": ["Q?"] * 3}, progress=False)


def test_t2t_answer_relay_reads_the_question_with_options(loaded_models):
    """The answer protocol: each sender answers the MCQ prompt (options included) and the
    receiver reads "The answer is <text>."; bytes are the answer's token ids only."""
    from fedrefine_lib import data
    from fedrefine_lib.t2t import RELAY_TEMPLATE

    sender = loaded_models["qwen2"]
    _, texts, trace = t2t_notes([sender], ITEMS, protocol="answer", max_new_tokens=3, batch_size=2, progress=False)
    rows = []
    for i in range(0, len(ITEMS), 2):
        r, _ = generate_ids(Standalone(sender), [data.mcq_messages(it) for it in ITEMS[i : i + 2]], 3)
        rows += r
    expected = [
        RELAY_TEMPLATE.format(answer=data.tidy_text(sender.tokenizer.decode(r, skip_special_tokens=True))) for r in rows
    ]
    assert [t[0] for t in texts] == expected
    assert trace.bytes[f"{sender.name}->receiver"] == sum(len(r) for r in rows) * TOKEN_ID_BYTES
    with pytest.raises(ValueError, match="protocol"):
        t2t_notes([sender], ITEMS, protocol="telepathy", progress=False)


def test_t2t_answer_relay_under_cloze_writes_the_answer_sentence(loaded_models):
    """Under cloze scoring the relay asks what a cloze KV sender reads (the question, no
    options) and the sender continues the item's answer sentence, one line; the receiver reads
    "<cloze_prefix> <text>", and only the sender's own ids are on the wire."""
    from fedrefine_lib import data
    from fedrefine_lib.evaluate import CLOZE_PREFIX

    sender = loaded_models["llama"]
    items = [{**ITEMS[0], "cloze_prefix": "Zorblat glows"}, ITEMS[1], {**ITEMS[2], "cloze_prefix": "Zorblat glows"}]
    _, texts, trace = t2t_notes(
        [sender], items, protocol="answer", scoring="cloze", max_new_tokens=4, batch_size=8, progress=False
    )
    n_ids = 0
    for it, got in zip(items, texts):
        prefix = it.get("cloze_prefix") or CLOZE_PREFIX
        rows, _ = generate_ids(Standalone(sender), [data.question_messages(it)], 4, prefix)
        row = next((rows[0][:j] for j, t in enumerate(rows[0]) if "\n" in sender.tokenizer.decode([t])), rows[0])
        n_ids += len(row)
        assert got == [
            data.tidy_text(f"{prefix} {data.tidy_text(sender.tokenizer.decode(row, skip_special_tokens=True))}")
        ]
    assert trace.bytes[f"{sender.name}->receiver"] == n_ids * TOKEN_ID_BYTES
    with pytest.raises(ValueError, match="scoring"):
        t2t_notes([sender], items, protocol="answer", scoring="vibes", progress=False)


def test_t2t_answer_is_one_line(loaded_models):
    """A relayed answer stops at its first line break (a base model goes on to the next question)."""
    from fedrefine_lib.t2t import _first_line

    tok = loaded_models["qwen2"].tokenizer
    ids = tok("red\nQuestion: what", add_special_tokens=False)["input_ids"]
    assert tok.decode(_first_line(tok, ids)) == "red"
    assert _first_line(tok, ids[:1]) == ids[:1]
