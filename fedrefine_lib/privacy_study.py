"""Notebook 06's measurements: what each transmitted artefact gives away to an attacker, and
what each defence costs in accuracy.

The privacy model is the paper's: the receiver answers its own query; a sender receives the
query as text (original, or the receiver's rephrasing), builds its cache over it (with its own
private context, where the task has one) and sends the cache back (C2C) or a text reply (T2T).
So there are two links to watch:

- receiver -> sender: the query text, in every protocol (what rephrasing is for);
- sender -> receiver: the cache, in each :class:`Defence` (the positions the fuser takes, an
  encoding: layers, dtype, noise), attacked by greedy inversion with the sender's weights
  (``privacy.attack_greedy``) and by a learned decoder (``privacy_decoder``); or T2T's reply text.

Private strings are the item's ``private`` field (mini: the user's name the query opens with;
the private-context task: the sender's records); the question's ``entity`` is reported beside
them (a faithful rephrasing must keep it, so no rephrasing can hide it).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import pandas as pd

from fedrefine_lib import federation, leakage, privacy, t2t, transport
from fedrefine_lib.evaluate import scoring_prompt
from fedrefine_lib.privacy_decoder import InversionDecoder, attack_decoder, train_decoder
from fedrefine_lib.results import summarize
from fedrefine_lib.transport import Encoding

View = Callable[[list], list]


@dataclass(frozen=True)
class Defence:
    """One way a sender's cache leaves its device: the fuser it is sent for (whose
    ``sender_positions`` say which positions go) and the transport encoding."""

    name: str
    fuser: str
    encoding: Encoding


def defences(
    fusers: Mapping[str, object], noise: Sequence[float] = (0.1, 0.3, 1.0), deeper: bool = True
) -> list[Defence]:
    """Per fuser: float32 with the layers it reads (no defence), bfloat16 (what 01 sends), int4,
    the deeper half of its layers (``deeper``, when it reads more than one), and float32 with
    each ``noise`` level (a relative standard deviation, ``transport.Encoding.noise``)."""
    out = []
    for label, fuser in fusers.items():
        read = transport.read_layers(fuser)
        out += [
            Defence(f"{label}: none (float32)", label, Encoding("float32", layers=read)),
            Defence(f"{label}: bfloat16", label, Encoding("bfloat16", layers=read)),
            Defence(f"{label}: int4", label, Encoding("int4", layers=read)),
        ]
        if deeper and len(read) > 1:
            deep = read[len(read) // 2 :]
            out.append(Defence(f"{label}: deeper {len(deep)} layers", label, Encoding("float32", layers=deep)))
        out += [Defence(f"{label}: noise {s:g}", label, Encoding("float32", layers=read, noise=s)) for s in noise]
    return out


def queries(items: Sequence[dict], scoring: str, view: View | None = None) -> list[tuple[list, str | None]]:
    """Each item's prompt as the sender reads it (``view``: a rephrasing) and its assistant prefix."""
    out = []
    for item in items:
        messages, prefix = scoring_prompt(item, scoring)
        out.append(((view([messages])[0] if view else messages), prefix))
    return out


def strings(items: Sequence[dict]) -> list[dict[str, list[str]]]:
    """Per item its sensitive strings: ``private`` (the item's ``private`` field, mini: the
    user's name; in the private-context task the asked fact, which only the sender's records
    hold) and ``entity`` (what the question is about)."""
    out = []
    for it in items:
        private = list(it.get("private") or [])
        if not private and it.get("private_context"):
            private = [it["choices"]["text"][it["choices"]["label"].index(it["answerKey"])]]
        out.append({"private": private, "entity": [it["entity"]] if it.get("entity") else []})
    return out


def decoders(sender, layers: Sequence[int], chats: Sequence, steps: int, seed: int) -> dict[int, InversionDecoder]:
    """One learned decoder per attacked layer, trained on ``chats`` (public, non-evaluation)."""
    return {
        layer: train_decoder(sender.model, sender.tokenizer, chats, layer, steps=steps, seed=seed)
        for layer in sorted(set(layers))
    }


def first_layers(fusers: Mapping[str, object], plan: Sequence[Defence]) -> list[int]:
    """The shallowest layer each defence sends: where the attacks strike."""
    return sorted({d.encoding.sent(fusers[d.fuser].config.sender_layers)[0] for d in plan})


def attack_rows(
    sender,
    fusers: Mapping[str, object],
    plan: Sequence[Defence],
    arms: Mapping[str, Sequence[tuple[list, str | None]]],
    targets: Sequence[privacy.Strings],
    attackers: Mapping[int, InversionDecoder],
    shortlist: int | None = None,
) -> pd.DataFrame:
    """Every attack on every defence's payload for every arm's prompts (``queries``): one row
    per (arm, defence, attack) with the measures averaged over queries (``privacy.mean_recovery``;
    ``shortlist``: ``privacy.invert_cache``'s)."""
    if not targets or any(len(prompts) != len(targets) for prompts in arms.values()):
        raise ValueError(f"Give one prompt per attacked query in every arm and at least one query "
                         f"({len(targets)} targets; raise attack_queries if it is 0).")  # fmt: skip
    model, tok = sender.model, sender.tokenizer
    rows = []
    for arm, prompts in arms.items():
        caches = [privacy.sent_cache(model, tok, messages, prefix) for messages, prefix in prompts]
        for d in plan:
            positions = fusers[d.fuser].config.sender_positions
            found: dict[str, list[dict]] = {}
            for (ids, kv), target in zip(caches, targets):
                sent = privacy.transmit(ids, kv, d.encoding, positions)
                got = [privacy.attack_greedy(model, tok, sent, target, shortlist=shortlist)]
                if sent.first_layer in attackers:
                    got += attack_decoder(attackers[sent.first_layer], tok, sent, target)
                for r in got:
                    found.setdefault(r["attack"], []).append(r)
            rows += [
                {"link": "sender -> receiver", "arm": arm, "defence": d.name, "fuser": d.fuser,
                 "encoding": d.encoding.label, "positions": positions or "all", "attack": attack,
                 "layer": got[0]["layer"], "queries": len(got), **privacy.mean_recovery(got)}
                for attack, got in found.items()
            ]  # fmt: skip
    return pd.DataFrame(rows)


def text_rows(arm: str, link: str, what: str, texts: Sequence[str], targets: Sequence[privacy.Strings]) -> dict:
    """One text artefact (per query the text on ``link``): the share of each set of strings in it."""
    got = [
        {f"{k}_recovery": privacy.string_recovery(v, t) if v else None for k, v in target.items()}
        for t, target in zip(texts, targets)
    ]
    return {"link": link, "arm": arm, "defence": what, "attack": "reads the text", "queries": len(texts),
            **privacy.mean_recovery(got)}  # fmt: skip


def accuracy_rows(
    study, receiver, sender, fusers: Mapping[str, object], plan: Sequence[Defence],
    arms: Mapping[str, tuple[View | None, Sequence[str] | None]], items: Sequence[dict], focus: Sequence[str],
) -> tuple[pd.DataFrame, dict[str, list[str]]]:  # fmt: skip
    """Accuracy on ``items`` (the ``focus`` domains) of the receiver alone, and per arm (its
    sender view and the stems its T2T sender reads) of every defence and of the answer relay;
    with, per arm, the relay's reply texts (what T2T sends back)."""
    focus = list(focus)
    alone = summarize(study.score(receiver, items, progress=False), focus)["focus"]
    rows = [{"arm": "-", "defence": "receiver alone", "accuracy": alone.value, "ci_low": alone.ci_low,
             "ci_high": alone.ci_high}]  # fmt: skip
    replies = {}
    for arm, (view, stems) in arms.items():
        notes, texts, _ = t2t.t2t_notes(
            [sender], items, protocol="answer", scoring=study.scoring, stems=stems, progress=False
        )
        replies[arm] = [row[0] for row in texts]
        scored = {"T2T answer relay": study.score(receiver, items, contexts=notes, progress=False)}
        for d in plan:
            engine = federation.C2C(receiver, sender, fusers[d.fuser], transport=d.encoding, sender_view=view)
            scored[d.name] = study.score(engine, items, progress=False)
        for name, result in scored.items():
            s = summarize(result, focus)["focus"]
            rows.append({"arm": arm, "defence": name, "accuracy": s.value, "ci_low": s.ci_low, "ci_high": s.ci_high})
    return pd.DataFrame(rows), replies


def collusion(stems: Sequence[str], shared: Sequence[str], per_sender: Sequence[Sequence[str]],
              private: Sequence[Sequence[str]]) -> dict[str, float]:  # fmt: skip
    """What rephrasing leaves of the private strings: one rephrasing for every sender, a
    distinct one per sender (pooled over senders, and when the senders pool what they got:
    a string counts as leaked if any sender's text keeps it)."""
    one = leakage.sent_leakage(stems, [[t] for t in shared], private)["private_survival"]
    pooled = leakage.sent_leakage(stems, per_sender, private)["private_survival"]
    union = [privacy.string_recovery(p, " \n ".join(row)) for row, p in zip(per_sender, private) if p]
    return {"one rephrasing": one, "distinct, per sender": pooled,
            "distinct, colluding senders": sum(union) / len(union) if union else float("nan")}  # fmt: skip


def privacy_vs_accuracy(attacks: pd.DataFrame, accuracy: pd.DataFrame, key: str = "private_recovery") -> pd.DataFrame:
    """Per (arm, defence): the strongest attack's ``key`` beside the defence's accuracy."""
    worst = attacks.groupby(["arm", "defence"], sort=False)[key].max().reset_index()
    return worst.merge(accuracy, on=["arm", "defence"], how="left")


def checks(attacks: pd.DataFrame, texts: pd.DataFrame, accuracy: pd.DataFrame) -> dict[str, float | bool | None]:
    """The headline numbers: attack (a) on float32 payloads of every position of original
    queries (the issue's bar: >= 90 % of tokens), the strongest attack's private recovery per
    arm on the undefended payloads beside the T2T relay's reply, and the accuracy of each."""

    def one(frame: pd.DataFrame, col: str, **where) -> float | None:
        for key, value in where.items():
            frame = frame[frame[key] == value]
        return None if frame.empty else float(frame[col].max())

    out: dict[str, float | bool | None] = {}
    full = attacks[(attacks["positions"] == "all") & attacks["defence"].str.endswith("none (float32)")]
    got = one(full, "token_recovery", arm="original", attack="greedy inversion")
    out["greedy_float32_every_position_original_token_recovery"] = got
    out["greedy_recovers_90_percent"] = None if got is None else got >= 0.9
    for arm in ("original", "rephrased"):
        for d in attacks.loc[attacks["defence"].str.endswith("none (float32)"), "defence"].unique():
            out[f"{arm}: {d}: private_recovery"] = one(attacks, "private_recovery", arm=arm, defence=d)
            out[f"{arm}: {d}: accuracy"] = one(accuracy, "accuracy", arm=arm, defence=d)
        out[f"{arm}: T2T answer relay: private_recovery"] = one(texts, "private_recovery", arm=arm,
                                                                defence="T2T answer relay")  # fmt: skip
        out[f"{arm}: T2T answer relay: accuracy"] = one(accuracy, "accuracy", arm=arm, defence="T2T answer relay")
        out[f"{arm}: query text: private_recovery"] = one(texts, "private_recovery", arm=arm,
                                                          link="receiver -> sender")  # fmt: skip
    out["receiver alone: accuracy"] = one(accuracy, "accuracy", defence="receiver alone")
    return out
