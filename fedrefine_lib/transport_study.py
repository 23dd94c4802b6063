"""Notebook 05's measurements: accuracy against bytes per query for every transport encoding and
layer budget of a pair's fusers, beside the receiver alone and the text answer relay, and the
QoS options those measurements give (``qos.Option``).

One call of :func:`measure` scores every option on one split; 05 calls it on the validation
split (the policy's options, the choice of a compressed encoding) and on the test split (what
is reported), with the same encodings.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pandas as pd

from fedrefine_lib import federation, remote, t2t, transport
from fedrefine_lib.network import Link
from fedrefine_lib.qos import Option
from fedrefine_lib.results import summarize
from fedrefine_lib.trace import Trace
from fedrefine_lib.transport import Encoding

DTYPES = ("float32", "bfloat16", "float16", "int8", "int4")
STANDALONE, RELAY, BACKGROUND = "standalone", "text: answer relay", "text: background"
"""Option names of the receiver alone, the text answer relay (``t2t`` ``answer`` protocol: the
sender reads the KV sender's prompt and sends its answer) and the paper's Token protocol
(``background``: a sentence about the question, from its stem alone)."""


def encodings_for(
    fuser, dtypes: Sequence[str] = DTYPES, key_groups: bool = True, budgets: bool = True
) -> list[Encoding]:
    """The encodings 05 sweeps for one fuser: bfloat16 with every layer (what 01 counts), then
    each dtype sending only the layers the fuser reads (lossless: layers it does not read change
    nothing, so their accuracy is that of every layer), int keys also per token, and (when the
    fuser reads more than one layer) smaller layer budgets ranked by its gates at bfloat16 and int4."""
    read = transport.read_layers(fuser)
    subset = read if len(read) < fuser.config.sender_layers else None  # None: it reads every layer
    out = [Encoding("bfloat16")]
    for dtype in dtypes:
        out.append(Encoding(dtype, layers=subset))
        if key_groups and dtype in transport.QUANTISED:
            out.append(Encoding(dtype, keys="token", layers=subset))
    if budgets and len(read) > 1:
        for k in sorted({max(1, len(read) // 4), max(1, len(read) // 2)} - {len(read)}):
            out += [Encoding(d, layers=transport.layers_by_gate(fuser, k)) for d in ("bfloat16", "int4")]
    return list(dict.fromkeys(out))


@dataclass
class Measured:
    """One split's measurements: a row per option and each option's per-question correctness on
    the ``focus`` domains (the sender's; every question when there are none)."""

    table: pd.DataFrame
    correct: dict[str, list[bool]]
    results: dict

    def options(self) -> list[Option]:
        """QoS options, one per row (accuracy on the focus questions)."""
        return [
            Option(r.option, r.accuracy, r.compute_s_per_query, {"link": r.bytes_per_query})
            for r in self.table.itertuples()
        ]


def measure(
    study,
    receiver,
    sender,
    fusers: Mapping[str, object],
    encodings: Mapping[str, Sequence[Encoding]],
    items: Sequence[dict],
    focus: Sequence[str] | None,
    progress: bool = False,
) -> Measured:
    """Score the receiver alone, both text protocols and every (fuser, encoding) on ``items``.

    Args:
        fusers: label -> a fuser of ``sender -> receiver`` (e.g. the main one and its ablations).
        encodings: label -> the encodings to send that fuser's cache in.
        focus: the domains the accuracies and correctness are taken on (``results.summarize``).
    Returns:
        ``table`` rows: ``option``, ``fuser``, ``encoding``, ``dtype``, ``layers_sent``,
        ``bytes_per_query`` (payload bytes, measured), ``accuracy`` and ``ci_low``/``ci_high``
        on the focus questions, ``accuracy_all``, ``compute_s_per_query`` (every stage but the
        link, senders and receiver one after another).
    """
    n = len(items)
    results, traces, rows = {}, {}, []
    results[STANDALONE] = study.score(receiver, items, progress=progress)
    traces[STANDALONE] = results[STANDALONE].trace
    relay, _, relay_trace = t2t.t2t_notes([sender], items, protocol="answer", scoring=study.scoring, progress=progress)
    results[RELAY] = study.score(receiver, items, contexts=relay, progress=progress)
    traces[RELAY] = Trace().add(relay_trace).add(results[RELAY].trace)
    notes, _, notes_trace = t2t.t2t_notes([sender], items, progress=progress)
    results[BACKGROUND] = study.score(receiver, items, contexts=notes, progress=progress)
    traces[BACKGROUND] = Trace().add(notes_trace).add(results[BACKGROUND].trace)
    meta = {STANDALONE: {}, RELAY: {"encoding": "token ids"}, BACKGROUND: {"encoding": "token ids"}}
    for label, fuser in fusers.items():
        for enc in encodings[label]:
            name = f"kv {label} · {enc.label}"
            engine = federation.C2C(receiver, sender, fuser, transport=enc)
            results[name] = study.score(engine, items, progress=progress)
            traces[name] = results[name].trace
            layers = len(enc.sent(fuser.config.sender_layers))
            meta[name] = {"fuser": label, "encoding": enc.label, "dtype": enc.dtype, "layers_sent": layers}
    correct = {}
    for name, result in results.items():
        s = summarize(result, list(focus or []))
        correct[name] = list(result.where(list(focus or [])).correct)
        rows.append(
            {
                "option": name, "fuser": None, "encoding": None, "dtype": None, "layers_sent": 0, **meta[name],
                "bytes_per_query": traces[name].total_bytes / n, "accuracy": s["focus"].value,
                "ci_low": s["focus"].ci_low, "ci_high": s["focus"].ci_high, "accuracy_all": s["all"].value,
                "compute_s_per_query": sum(v for k, v in traces[name].seconds.items() if k != "transmission") / n,
            }
        )  # fmt: skip
    return Measured(pd.DataFrame(rows), correct, results)


def compressed_choice(val: pd.DataFrame, reference: str, max_fraction: float = 0.25, max_loss: float = 0.01) -> dict:
    """On the validation table: the most accurate KV option of ``reference``'s fuser at most
    ``max_fraction`` of its bytes, and whether it loses at most ``max_loss`` against it."""
    ref = val.set_index("option").loc[reference]
    small = val[(val["fuser"] == ref["fuser"]) & (val["bytes_per_query"] <= max_fraction * ref["bytes_per_query"])]
    if small.empty:
        return {"reference": reference, "chosen": None, "reason": f"no encoding at <= {max_fraction:g} of its bytes"}
    best = small.sort_values(["accuracy", "bytes_per_query"], ascending=[False, True]).iloc[0]
    loss = float(ref["accuracy"] - best["accuracy"])
    fraction = float(best["bytes_per_query"] / ref["bytes_per_query"])
    return {
        "reference": reference, "chosen": best["option"], "bytes_fraction": fraction, "val_loss": loss,
        "within_max_loss": loss <= max_loss,
    }  # fmt: skip


def score_choice(choice: dict, test: Measured, focus: Sequence[str] | None) -> dict:
    """``choice`` (:func:`compressed_choice`, made on validation) scored once on the test split:
    its accuracy loss and bytes fraction against the reference, and their paired difference."""
    if choice["chosen"] is None:
        return dict(choice)
    rows = test.table.set_index("option")
    ref, chosen = rows.loc[choice["reference"]], rows.loc[choice["chosen"]]
    on = list(focus or [])
    paired = test.results[choice["chosen"]].where(on).compare(test.results[choice["reference"]].where(on))
    return {
        **choice, "test_loss": float(ref["accuracy"] - chosen["accuracy"]),
        "test_bytes_fraction": float(chosen["bytes_per_query"] / ref["bytes_per_query"]), "paired_test": paired,
    }  # fmt: skip


def encoding_chosen(choice: dict, encodings: Sequence[Encoding], fuser: str = "main") -> Encoding:
    """The :class:`Encoding` behind ``choice["chosen"]`` (an option of ``fuser``); bfloat16 with
    every layer when nothing was chosen."""
    named = {f"kv {fuser} · {e.label}": e for e in encodings}
    if choice.get("chosen") is None:
        return Encoding("bfloat16")
    if choice["chosen"] not in named:
        chosen = choice["chosen"]
        raise KeyError(f"The chosen option {chosen!r} is none of fuser {fuser!r}'s encodings: {sorted(named)}.")
    return named[choice["chosen"]]


def with_groups(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` with a ``group`` column for plots: ``kv <fuser>`` for KV rows, else the option."""
    kv = table["fuser"].notna()
    return table.assign(group=("kv " + table["fuser"].astype(str)).where(kv, table["option"]))


def pareto(table: pd.DataFrame) -> pd.DataFrame:
    """The options no other option beats on both accuracy and bytes (sorted by bytes)."""
    t = table.sort_values(["bytes_per_query", "accuracy"], ascending=[True, False])
    keep, best = [], -1.0
    for r in t.itertuples():
        if r.accuracy > best:
            keep.append(r.Index)
            best = r.accuracy
    return t.loc[keep]


def real_transport(
    study, receiver, sender, fuser, fuser_dir, encoding: Encoding, items: Sequence[dict], link: Link,
    batch_sizes: Sequence[int] = (1, 8), timeout_s: float = 600.0,
) -> pd.DataFrame:  # fmt: skip
    """The receiver and the sender as separate processes (``remote.run``: gloo on loopback) on
    ``items``, beside the same engine in this process and the link model.

    Returns:
        one row per batch size: whether the answers equal the in-process ones, payload bytes per
        query (and whether they equal the encoder's), with headers, on the wire; measured latency
        per query and by stage (ms); the measured round trip minus the sender's compute (loopback
        transfer, framing and waiting) beside the modelled transfer of the same payload on ``link``.
    """
    cache_dir = str(study.data_dir / "converted")
    r_spec, s_spec = study.profile.spec(receiver.name), study.profile.spec(sender.name)
    job = remote.ReceiverJob(
        r_spec, (s_spec,), (str(fuser_dir),), tuple(items), study.scoring, tuple(batch_sizes), cache_dir
    )
    sender_job = remote.SenderJob(s_spec, encoding, fuser.config.sender_positions, cache_dir)
    out = remote.run(job, [sender_job], timeout_s)
    local = study.score(federation.C2C(receiver, sender, fuser, transport=encoding), items, progress=False)
    n, rows = len(items), []
    for b in batch_sizes:
        got, sec = out[str(b)], out[str(b)]["seconds"]
        sender_s = sec.get("sender_prefill", 0.0) + sec.get("transport_encode", 0.0)
        payload = got["payload_bytes"] / n
        rows.append(
            {
                "batch": b, "same_answers_as_in_process": got["correct"] == local.correct,
                "fallbacks": len(got["fallbacks"]), "payload_bytes_per_query": payload,
                "equals_encoder_payload": got["payload_bytes"] == local.trace.total_bytes,
                "with_headers_per_query": got["packed_bytes"] / n, "on_wire_per_query": got["wire_bytes"] / n,
                "latency_ms_per_query": 1000 * got["wall_s"] / n,
                **{f"{k}_ms": 1000 * v / n for k, v in sec.items()},
                "round_trip_minus_sender_ms": 1000 * (sec.get("remote_round_trip", 0.0) - sender_s) / n,
                "modelled_link_ms": 1000 * link.transfer_seconds(payload),
            }
        )  # fmt: skip
    return pd.DataFrame(rows)
