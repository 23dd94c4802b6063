"""Rephrasing (tiny random receiver) and the leakage / fidelity measures (crafted strings,
exact expected values)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest

from fedrefine_lib import leakage as lk
from fedrefine_lib import rephrase as rp
from fedrefine_lib.evaluate import score_mcq

# ------------------------------------------------------------------ measures


def test_word_tokens_and_jaccard():
    assert lk.word_tokens("The fox, the DOG.") == {"the", "fox", "dog"}
    # {the, fox, dog} vs {a, fox, and, cat}: 1 shared of 6 distinct
    assert lk.token_jaccard("The fox, the dog.", "A fox and a cat") == pytest.approx(1 / 6)
    assert lk.token_jaccard("Same words here", "here same WORDS") == 1.0
    assert lk.token_jaccard("", "") == 0.0
    assert lk.token_jaccard("abc", "") == 0.0


def test_longest_common_substring():
    original = "What is the colour of Zorblat?"
    assert len(original) == 30
    # " zorblat" (8 chars, case-insensitive) beats " colour" (7)
    assert lk.longest_common_substring(original, "Tell me zorblat's colour") == " Zorblat"
    assert lk.longest_common_substring(original, "Tell me zorblat's colour", lower=False) == " colour"
    assert lk.longest_common_substring("abc", "xyz") == ""
    assert lk.longest_common_substring("", "abc") == ""
    assert lk.longest_common_substring("abcd", "abcd") == "abcd"


def test_private_terms_whole_word_case_insensitive():
    terms = ["Kevani", "Tressa", "Zorblat"]
    assert lk.private_terms_in("Is Kevani north of Tressa?", terms) == ["Kevani", "Tressa"]
    assert lk.private_terms_in("The kevani river", terms) == ["Kevani"]
    assert lk.private_terms_in("Kevanish lands of Tressas", terms) == []
    assert lk.private_terms_in("Kevani Kevani", ["Kevani", "Kevani"]) == ["Kevani"]


def test_leakage_values():
    m = lk.leakage("What is the colour of Zorblat?", "Tell me zorblat's colour", ["Zorblat", "Kevani"])
    # {what, is, the, colour, of, zorblat} vs {tell, me, zorblat, s, colour}: 2 of 9
    assert m.token_jaccard == pytest.approx(2 / 9)
    assert m.lcs_chars == 8
    assert m.lcs_fraction == pytest.approx(8 / 30)
    assert (m.private_present, m.private_survived, m.private_survival) == (1, 1, 1.0)

    m = lk.leakage("Is Kevani north of Tressa?", "Is that river north of the town?", ["Kevani", "Tressa"])
    assert (m.private_present, m.private_survived, m.private_survival) == (2, 0, 0.0)
    m = lk.leakage("Is Kevani north of Tressa?", "Is kevani north of that town?", ["Kevani", "Tressa"])
    assert m.private_survival == 0.5
    assert math.isnan(lk.leakage("no names here", "none", ["Kevani"]).private_survival)
    same = lk.leakage("Tell me.", "Tell me.")
    assert (same.token_jaccard, same.lcs_chars, same.lcs_fraction) == (1.0, 8, 1.0)


def test_leakage_frame_and_summary():
    frame = lk.leakage_frame(
        ["Is Kevani north?", "What glows blue?"],
        ["Is kevani north?", "Which thing is blue?"],
        private_terms=["Kevani"],
        per_item_terms=[[], ["blue"]],
    )
    assert list(frame["private_present"]) == [1, 1]
    assert list(frame["private_survived"]) == [1, 1]
    summary = lk.summarize_leakage(frame)
    assert summary["n"] == 2
    assert summary["private_survival"] == 1.0
    assert summary["verbatim"] == 0.5  # the first is the same text up to case
    assert summary["token_jaccard"] == pytest.approx(
        (1.0 + 1 / 6) / 2
    )  # {what,glows,blue} vs {which,thing,is,blue}: 1 of 6
    with pytest.raises(ValueError, match="originals"):
        lk.leakage_frame(["a"], ["a", "b"])


@dataclass(frozen=True)
class _Q:
    entity: str
    relation: str


def _toy_parse(text: str) -> _Q | None:
    """'What is the R of E?' or 'E has what R?'."""
    words = text.rstrip("?").split()
    if text.startswith("What is the ") and " of " in text:
        return _Q(words[-1], " ".join(words[3 : words.index("of")]))
    if " has what " in text:
        return _Q(words[0], " ".join(words[3:]))
    return None


def test_sent_leakage_pools_every_item_and_sender():
    originals = ["My name is Vakor. What is the color of Zorb?", "I am Blix. Tell me the taste of Quen."]
    sent = [
        ["What is the color of Zorb?", "My name is Vakor. Which color does Zorb have?"],  # one of two leaks
        ["Tell me the taste of Quen.", "Which taste does Quen have?"],  # none leaks
    ]
    out = lk.sent_leakage(originals, sent, [["Vakor"], ["Blix"]])
    assert out["n"] == 4 and out["private_survival"] == pytest.approx(1 / 4) and out["verbatim"] == 0.0
    everything = lk.sent_leakage(originals, [[o, o] for o in originals], [["Vakor"], ["Blix"]])
    assert everything["private_survival"] == 1.0 and everything["verbatim"] == 1.0
    with pytest.raises(ValueError, match="2 originals, 1 rows sent"):
        lk.sent_leakage(originals, sent[:1], [["Vakor"], ["Blix"]])


def test_rewrite_with_a_rule_and_the_template_swap_bound():
    from fedrefine_lib.world.templates import parse_question, template_swap

    stems = ["My name is Vakor. What is the color of Zorb?", "Tell me the taste of Quen."]
    swap = rp.rewrite_with(template_swap, stems, n_senders=3, mode="template swap")
    assert swap.n_senders == 3 and swap.mode == "template swap" and swap.distinct_fraction() == 1.0
    for stem, row in zip(stems, swap.texts):
        p = parse_question(stem)
        for text in row:
            q = parse_question(text)
            assert (q.entity, q.relation, q.user) == (p.entity, p.relation, p.user) and q.template != p.template
    assert lk.sent_leakage(stems, swap.texts, [["Vakor"], []])["private_survival"] == 1.0
    views = rp.sender_views(swap, ["a", "b", "c"])
    chat = [[{"role": "user", "content": f"Question: {stems[0]}\nA. red"}]]
    assert views["b"](chat)[0][0]["content"] == f"Question: {swap.texts[0][1]}\nA. red"
    with pytest.raises(ValueError, match="n_senders"):
        rp.rewrite_with(template_swap, stems, n_senders=0)


def test_structural_fidelity_hook():
    check = lk.same_parse(_toy_parse, ("entity", "relation"))
    assert check("What is the melting point of Zorblat?", "Zorblat has what melting point?") is True
    assert check("What is the melting point of Zorblat?", "Kevani has what melting point?") is False
    assert check("What is the melting point of Zorblat?", "gibberish") is False
    assert check("gibberish", "What is the colour of Zorblat?") is None
    fid = lk.structural_fidelity(
        ["What is the colour of Zorblat?", "What is the colour of Kevani?", "unparseable"],
        ["Zorblat has what colour?", "Zorblat has what colour?", "anything"],
        check,
    )
    assert fid.results == (True, False, None)
    assert (fid.checked, fid.fraction) == (2, 0.5)
    with pytest.raises(ValueError, match="fields"):
        lk.same_parse(_toy_parse, ())


def test_clean_rephrasing():
    assert rp.clean_rephrasing("  Question: What is it?\nmore") == "What is it?"
    assert rp.clean_rephrasing('<think>hmm</think>\n\nRephrased question: "Why?"') == "Why?"
    assert rp.clean_rephrasing("<think>never closed") == ""
    assert rp.clean_rephrasing("\n\n") == ""


# ------------------------------------------------------------------ items

ITEM = {
    "id": "q1",
    "question_stem": "What is the colour of Zorblat?",
    "choices": {"text": ["blue", "red", "green", "black"], "label": ["A", "B", "C", "D"]},
    "answerKey": "A",
    "domain": "science",
}


def test_rephrased_items_keep_options():
    reph = rp.Rephrasings(
        [ITEM["question_stem"]], [["Zorblat has what colour?", "Which colour is Zorblat?"]], "per_sender"
    )
    second = rp.rephrased_items([ITEM], reph, sender=1)[0]
    assert second["question_stem"] == "Which colour is Zorblat?"
    assert second["original_question_stem"] == ITEM["question_stem"]
    assert second["choices"] == ITEM["choices"] and second["answerKey"] == "A"
    again = rp.rephrased_item(second, "Tell me the colour of Zorblat.")
    assert again["original_question_stem"] == ITEM["question_stem"]  # the very first original
    assert ITEM["question_stem"] == "What is the colour of Zorblat?"  # input untouched
    assert reph.by_sender(["s1", "s2"]) == {"s1": ["Zorblat has what colour?"], "s2": ["Which colour is Zorblat?"]}
    with pytest.raises(IndexError):
        reph.for_sender(2)
    with pytest.raises(ValueError, match="same order"):
        rp.rephrased_items([{**ITEM, "question_stem": "other"}], reph)
    with pytest.raises(ValueError, match="empty"):
        rp.rephrased_item(ITEM, " ")


def test_sender_views_rewrite_the_question_only():
    from fedrefine_lib.data import mcq_messages

    reph = rp.Rephrasings(
        [ITEM["question_stem"]], [["Zorblat has what colour?", "Which colour is Zorblat?"]], "per_sender"
    )
    views = rp.sender_views(reph, ["s1", "s2"])
    chat = mcq_messages(ITEM)
    seen = views["s2"]([chat])[0][0]["content"]
    assert seen == chat[0]["content"].replace(ITEM["question_stem"], "Which colour is Zorblat?")
    assert "A. blue" in seen and ITEM["question_stem"] not in seen
    assert chat[0]["content"].count(ITEM["question_stem"]) == 1  # the receiver's chat is untouched
    with pytest.raises(ValueError, match="No rephrased question"):
        views["s1"]([[{"role": "user", "content": "something else"}]])
    with pytest.raises(ValueError, match="sender names"):
        rp.sender_views(reph, ["s1"])


# ------------------------------------------------------------------ rephraser

STEMS = [
    "What colour does zorblat glow?",
    "Which valley does the Kevani river cross?",
    "What does the function return?",
]


def test_rephrase_shared(loaded_models):
    receiver = loaded_models["qwen3"]
    reph, trace = rp.rephrase(receiver, STEMS, n_senders=3, max_new_tokens=5, batch_size=2)
    assert reph.mode == "shared" and reph.n_senders == 3 and reph.originals == STEMS
    assert all(len(set(row)) == 1 and row[0] for row in reph.texts)  # same text for every sender, never empty
    assert list(trace.seconds) == ["rephrase"] and trace.seconds["rephrase"] > 0
    assert trace.bytes == {}  # nothing leaves the device
    assert trace.tokens["rephrase_prompt"] > 0 and 0 <= trace.tokens["rephrase_generated"] <= 5 * len(STEMS)
    again, _ = rp.rephrase(receiver, STEMS, n_senders=3, max_new_tokens=5, batch_size=2)
    assert again.texts == reph.texts


def test_rephrase_per_sender_distinct_and_seeded(loaded_models):
    receiver = loaded_models["qwen3"]
    kwargs = dict(mode="per_sender", n_senders=3, max_new_tokens=6, batch_size=3)
    a, trace = rp.rephrase(receiver, STEMS, seed=1, **kwargs)
    b, _ = rp.rephrase(receiver, STEMS, seed=1, **kwargs)
    c, _ = rp.rephrase(receiver, STEMS, seed=2, **kwargs)
    assert a.texts == b.texts
    assert a.texts != c.texts
    assert [len(row) for row in a.texts] == [3, 3, 3]
    assert a.distinct_fraction() == 1.0  # a random receiver samples distinct texts
    assert trace.tokens["rephrase_generated"] > 0
    with pytest.raises(ValueError, match="temperature"):
        rp.rephrase(receiver, STEMS, mode="per_sender", temperature=0)
    with pytest.raises(ValueError, match="mode"):
        rp.rephrase(receiver, STEMS, mode="nope")


def test_rephrased_items_score(loaded_models):
    """Rephrased items are valid MCQ items any engine can score (fidelity is the caller's
    accuracy on them)."""
    receiver = loaded_models["qwen3"]
    items = [{**ITEM, "id": f"q{i}", "question_stem": s} for i, s in enumerate(STEMS)]
    reph, _ = rp.rephrase(receiver, STEMS, max_new_tokens=4)
    result = score_mcq(receiver, rp.rephrased_items(items, reph), progress=False)
    assert len(result.correct) == len(items)
