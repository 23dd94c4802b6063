"""Federated refinement across processes: each sender in its own process serves the encoded
caches of its prompts (``transport``), the receiver fuses what arrives over ``wire`` (gloo,
loopback) and answers.

:func:`run` starts the receiver (rank 0) and one process per sender with ``wire.launch``:
each sender loads only its own model; the receiver loads its model, its fusers and each
sender's *config and tokenizer* (public: what a fuser's pair check needs), never a sender's
weights. The receiver's engine, :class:`RemoteFedRefine`, is an ordinary engine (``prefill``),
so ``evaluate.score_mcq`` scores it like any other. A sender that is dead, times out, or sends
a payload that does not decode (corrupt, truncated, another model's) is a *recorded fallback*:
its weight becomes 0 for that batch (the receiver answers without it), never a wrong cache.

A reply holds one ``transport.EncodedKV`` per query (:func:`pack`) and the sender's measured
stage seconds; bytes are counted three ways: the encoder's payloads (tensor data and scales,
what 05's curves count), those payloads with their headers, and the bytes ``wire`` moved.
"""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from types import SimpleNamespace
from typing import Any

import torch

from fedrefine_lib import transport, wire
from fedrefine_lib.align import Alignment
from fedrefine_lib.engine import Prefill, encode_receiver, prefill
from fedrefine_lib.evaluate import score_mcq
from fedrefine_lib.federation import Caches, FedRefine
from fedrefine_lib.fuser import load_fuser
from fedrefine_lib.models import ModelSpec, load_config_and_tokenizer, load_model
from fedrefine_lib.prompts import Messages, encode_prompts, holder_view
from fedrefine_lib.trace import Trace
from fedrefine_lib.transport import EncodedKV, Encoding


def pack(encoded: Sequence[EncodedKV | None], meta: dict[str, Any]) -> bytes:
    """One reply: a JSON head (``meta`` and each query's size; 0 = not sent), then the queries."""
    blobs = [b"" if e is None else e.to_bytes() for e in encoded]
    head = json.dumps({**meta, "sizes": [len(b) for b in blobs]}).encode()
    return struct.pack("<I", len(head)) + head + b"".join(blobs)


def unpack(data: bytes) -> tuple[list[EncodedKV | None], dict[str, Any]]:
    """Inverse of :func:`pack`; a reply whose sizes do not add up is a ``transport.PayloadError``."""
    try:
        (n,) = struct.unpack("<I", data[:4])
        meta = json.loads(data[4 : 4 + n])
        sizes = [int(s) for s in meta["sizes"]]
    except (struct.error, ValueError, KeyError, TypeError) as e:
        raise transport.PayloadError(f"Unreadable reply head ({e}): the reply is corrupted.") from e
    if 4 + n + sum(sizes) != len(data):
        raise transport.PayloadError(
            f"The reply has {len(data) - 4 - n} bytes of caches but its head says {sum(sizes)}."
        )
    out, offset = [], 4 + n
    for s in sizes:
        out.append(EncodedKV.from_bytes(data[offset : offset + s]) if s else None)
        offset += s
    return out, meta


@dataclass(frozen=True)
class SenderJob:
    """What a sender process serves: its model, the encoding, and the positions its fuser reads."""

    spec: ModelSpec
    encoding: Encoding
    positions: int | None = None
    cache_dir: str | None = None


def serve_sender(job: SenderJob, timeout_s: float = 60.0) -> int:
    """A sender process's loop (``wire.serve``): for each request, prefill every query it is
    open for, keep the last ``positions``, encode each query on its own and reply."""
    sender = load_model(job.spec, job.cache_dir)
    model_id = transport.model_id(sender.name, sender.model.config)

    def handle(request: dict) -> bytes:
        chats, rows = request["messages"], request["rows"][sender.name]
        t0 = time.perf_counter()
        ids, mask = encode_prompts(sender.tokenizer, [holder_view(m) for m in chats], request.get("assistant_prefix"))
        with torch.no_grad():
            kv = prefill(sender.model, ids, mask)
        if job.positions is not None:
            kv = kv.map(lambda t: t[:, :, -job.positions :])
            kv.seq_len, mask = kv.keys[0].shape[2], mask[:, -job.positions :]
        t1 = time.perf_counter()
        encoded = transport.encode_batch(
            kv, mask * torch.tensor(rows, dtype=mask.dtype)[:, None], job.encoding, model_id
        )
        seconds = {"sender_prefill": t1 - t0, "transport_encode": time.perf_counter() - t1}
        payload = sum(e.payload_bytes for e in encoded if e is not None)
        return pack(encoded, {"sender": sender.name, "seconds": seconds, "payload_bytes": payload})

    return wire.serve(handle, timeout_s)


@dataclass
class RemoteFedRefine:
    """An engine whose senders are processes (ranks ``ranks[name]``): ``engine`` holds the
    receiver, the fusers and the policy; its senders are stand-ins with config and tokenizer."""

    engine: FedRefine
    remote: wire.RemoteSenders
    ranks: dict[str, int]
    model_ids: dict[str, str]
    fallbacks: list[dict[str, Any]] = field(default_factory=list)
    wire_bytes: int = 0
    packed_bytes: int = 0

    @property
    def receiver(self):
        return self.engine.receiver

    def prefill(self, messages_batch: list[Messages], assistant_prefix: str | None = None) -> Prefill:
        eng, trace = self.engine, Trace()
        ids, mask, cache = encode_receiver(eng.receiver, messages_batch, assistant_prefix, trace)
        w = eng.weights(messages_batch, cache, mask[:, :-1], trace).clone()
        rows = {n: (w[:, 1 + j] > 0).tolist() for j, n in enumerate(eng.sender_names)}
        request = {"op": "run", "messages": list(messages_batch), "assistant_prefix": assistant_prefix, "rows": rows}
        with trace.time("remote_round_trip"):
            replies = self.remote.request(request)
        alignments, caches = [], []
        for j, (name, link) in enumerate(zip(eng.sender_names, eng.links)):
            reply = replies[self.ranks[name]]
            got = self._decode(name, reply, trace) if any(rows[name]) else None
            if got is None:
                w[:, 1 + j] = 0
                alignments.append(None)
                caches.append(None)
                continue
            kv, s_mask, meta = got
            trace.count("bytes", link, int(meta["payload_bytes"]))
            trace.add_sender_seconds("sender_prefill", {name: meta["seconds"]["sender_prefill"]})
            trace.add_sender_seconds("transport_encode", {name: meta["seconds"]["transport_encode"]})
            alignments.append(Alignment(ids, mask, s_mask, s_mask, torch.full_like(ids, -1)))
            caches.append(kv.to(device=ids.device))
        state = Caches(list(messages_batch), ids, mask, cache, alignments, caches, trace)
        return eng.combine(state, eng.project(state, trace), w, trace)

    def _decode(self, name: str, reply: wire.Reply, trace: Trace):
        """The sender's batch ``(cache [B, H, S, D], mask [B, S], meta)``, or None (a recorded fallback)."""
        if not reply.ok:
            self.fallbacks.append({"sender": name, "reason": reply.error})
            return None
        self.wire_bytes += reply.wire_bytes
        self.packed_bytes += reply.payload_bytes
        try:
            with trace.time("transport_decode"):
                encoded, meta = unpack(reply.data)
                kv, s_mask = transport.decode_batch(encoded, self.model_ids[name])
        except (transport.PayloadError, ValueError) as e:
            self.fallbacks.append({"sender": name, "reason": f"payload refused: {e}"})
            return None
        if meta.get("sender") != name:
            self.fallbacks.append({"sender": name, "reason": f"the reply came from {meta.get('sender')!r}"})
            return None
        return kv, s_mask, meta


@dataclass(frozen=True)
class ReceiverJob:
    """What the receiver process runs: its model, one fuser directory per sender (in sender
    order), the senders' specs (for their config and tokenizer), the questions and batch sizes."""

    receiver: ModelSpec
    senders: tuple[ModelSpec, ...]
    fuser_dirs: tuple[str, ...]
    items: tuple[dict, ...]
    scoring: str = "loglik"
    batch_sizes: tuple[int, ...] = (1, 8)
    cache_dir: str | None = None
    timeout_s: float = 60.0


def _stand_in(spec: ModelSpec, cache_dir: str | None):
    """A sender as the receiver knows it: name, config and tokenizer, no weights."""
    config, tokenizer = load_config_and_tokenizer(spec, cache_dir)
    return SimpleNamespace(name=spec.name, model=SimpleNamespace(config=config), tokenizer=tokenizer)


def serve_receiver(job: ReceiverJob) -> dict[str, Any]:
    """The receiver process: score ``items`` at every batch size through the senders' processes;
    returns plain data (per batch size: correctness, wall seconds, stage seconds, bytes, fallbacks)."""
    receiver = load_model(job.receiver, job.cache_dir)
    senders = [_stand_in(s, job.cache_dir) for s in job.senders]
    fusers = {s.name: load_fuser(d, receiver, s) for s, d in zip(senders, job.fuser_dirs)}
    remote = wire.RemoteSenders(list(range(1, 1 + len(senders))), job.timeout_s)
    ids = {s.name: transport.model_id(s.name, s.model.config) for s in senders}
    out: dict[str, Any] = {}
    try:
        for b in job.batch_sizes:
            engine = RemoteFedRefine(
                FedRefine(receiver, senders, fusers), remote, {s.name: 1 + i for i, s in enumerate(senders)}, ids
            )
            t0 = time.perf_counter()
            result = score_mcq(engine, list(job.items), method=job.scoring, batch_size=b, progress=False)
            out[str(b)] = {
                "wall_s": time.perf_counter() - t0, "correct": result.correct, "seconds": result.trace.seconds,
                "per_sender": result.trace.per_sender, "payload_bytes": result.trace.total_bytes,
                "packed_bytes": engine.packed_bytes, "wire_bytes": engine.wire_bytes, "fallbacks": engine.fallbacks,
            }  # fmt: skip
    finally:
        remote.stop()
    return out


def run(job: ReceiverJob, senders: Sequence[SenderJob], timeout_s: float = 600.0) -> dict[str, Any]:
    """Start the receiver and one process per sender on loopback, score, stop; rank 0's results."""
    if [s.spec.name for s in senders] != [s.name for s in job.senders]:
        raise ValueError("The sender jobs must be the receiver job's senders, in the same order.")
    fns = [partial(serve_receiver, job), *(partial(serve_sender, s, job.timeout_s) for s in senders)]
    return wire.launch(fns, timeout_s)
