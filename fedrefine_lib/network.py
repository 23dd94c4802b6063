"""The network between devices: a link model, transmission time of a trace, and bytes on the
wire for cache (KV) vs token communication (``qos`` chooses between them per request).

Link model (:class:`Link`): sending ``n`` bytes as ``m`` messages takes

    transfer_seconds(n, m) = m · RTT / 2  +  8 · n / bandwidth          (0 when n = 0)

i.e. one one-way propagation delay (half the round-trip time) per message plus the
serialization time of the bytes at the link's bandwidth. No TCP slow start, loss,
retransmission or protocol headers: a first-order model, enough to compare KV payloads
(tens to hundreds of KB per token-sequence) with token ids (bytes).

Default link :data:`EDGE_UPLINK`: 20 Mbit/s, 40 ms RTT. This is an *assumption*, not a
measurement: the order of magnitude of a mobile (4G/5G) or home-broadband uplink from an
edge device to a nearby server, which is the paper's setting (devices on a heterogeneous
network, fusers on an edge server). Change it per study; :data:`PRESETS` holds a fast LAN
and a congested link for sensitivity checks (also assumptions).

Several senders transmit over their *own* uplinks at the same time, so the
``transmission`` stage of a multi-sender trace is the slowest link's time
(``parallel=True``); with ``parallel=False`` the links share one medium and their times add.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import pandas as pd
from transformers import PretrainedConfig

from fedrefine_lib import kv as kvlib
from fedrefine_lib.t2t import TOKEN_ID_BYTES
from fedrefine_lib.trace import Trace

# --------------------------------------------------------------------------- links


@dataclass(frozen=True)
class Link:
    """A network link: bandwidth in Mbit/s (10^6 bit/s) and round-trip time in ms."""

    name: str
    bandwidth_mbps: float
    rtt_ms: float

    def __post_init__(self) -> None:
        if not self.bandwidth_mbps > 0:
            raise ValueError(f"Link {self.name!r}: bandwidth must be > 0 Mbit/s, got {self.bandwidth_mbps}.")
        if not self.rtt_ms >= 0:
            raise ValueError(f"Link {self.name!r}: RTT must be >= 0 ms, got {self.rtt_ms}.")

    @property
    def one_way_seconds(self) -> float:
        """Propagation delay of one message: RTT / 2."""
        return self.rtt_ms / 2000.0

    def serialization_seconds(self, nbytes: float) -> float:
        """Time to put ``nbytes`` on the wire: 8 · nbytes / bandwidth."""
        return 8.0 * nbytes / (self.bandwidth_mbps * 1e6)

    def transfer_seconds(self, nbytes: float, messages: int = 1) -> float:
        """``messages · RTT/2 + 8 · nbytes / bandwidth``; nothing sent costs nothing.

        Args:
            nbytes: payload bytes in total.
            messages: separate messages they travel in (e.g. one per query).
        """
        if nbytes < 0 or messages < 0:
            raise ValueError(f"Bytes and messages must be >= 0, got {nbytes} bytes in {messages} messages.")
        if nbytes == 0:
            return 0.0
        return max(messages, 1) * self.one_way_seconds + self.serialization_seconds(nbytes)


EDGE_UPLINK = Link("edge-uplink", bandwidth_mbps=20.0, rtt_ms=40.0)
"""Default link (assumption, see the module docstring): 20 Mbit/s, 40 ms RTT."""

PRESETS: dict[str, Link] = {
    "lan": Link("lan", bandwidth_mbps=100.0, rtt_ms=2.0),
    "edge": EDGE_UPLINK,
    "congested": Link("congested", bandwidth_mbps=2.0, rtt_ms=150.0),
}
"""Assumed link conditions for sensitivity checks (fast LAN, the default edge uplink, congested)."""


Links = Link | Mapping[str, Link]
"""One link model for every link of a trace, or one per link name (``"sender->receiver"``)."""


def _link_for(links: Links, name: str) -> Link:
    if isinstance(links, Link):
        return links
    if name not in links:
        raise KeyError(f"No link model for {name!r}; give one for each of the trace's links (have {sorted(links)}).")
    return links[name]


def link_seconds(link_bytes: Mapping[str, float], links: Links = EDGE_UPLINK, messages: int = 1) -> dict[str, float]:
    """Transfer seconds per link for the bytes each link carried."""
    return {name: _link_for(links, name).transfer_seconds(n, messages) for name, n in link_bytes.items()}


def transmission_seconds(
    link_bytes: Mapping[str, float], links: Links = EDGE_UPLINK, messages: int = 1, parallel: bool = True
) -> float:
    """Time to send every link's bytes: the slowest link (``parallel``) or the sum."""
    per_link = link_seconds(link_bytes, links, messages).values()
    if not per_link:
        return 0.0
    return max(per_link) if parallel else sum(per_link)


def with_transmission(trace: Trace, links: Links = EDGE_UPLINK, *, queries: int = 1, parallel: bool = True) -> Trace:
    """A copy of ``trace`` with a ``transmission`` stage, senders either all in parallel or all
    one after another, in compute and on the wire alike.

    Args:
        trace: a trace whose ``bytes`` are per link ``"<sender>-><receiver>"`` (as engines
            record them) and whose sender stages are recorded per sender (``per_sender``).
        links: the link model(s).
        queries: how many queries the trace covers; each query's payload is its own
            message, paying one one-way delay (so ``total_seconds / queries`` is a
            per-query latency).
        parallel: ``True``: every sender on its own device with its own link, so the sender
            phase lasts as long as its slowest sender, compute plus transfer (that sender's
            stages and link time are kept); ``False``: one machine and one shared medium,
            sender stages and link times add up.
    Returns:
        a new trace; an existing ``transmission`` stage is replaced, not added to.
    """
    if queries < 1:
        raise ValueError(f"queries must be >= 1, got {queries}.")
    out = Trace().add(trace)
    per_link = link_seconds(trace.bytes, links, queries)
    if not parallel or not trace.per_sender:
        out.seconds["transmission"] = transmission_seconds(trace.bytes, links, queries, parallel)
        return out
    senders = sorted({s for stage in trace.per_sender.values() for s in stage})

    def link_of(sender: str) -> float:
        return sum(t for name, t in per_link.items() if name.split("->")[0] == sender)

    def path(sender: str) -> float:
        return sum(stage.get(sender, 0.0) for stage in trace.per_sender.values()) + link_of(sender)

    slowest = max(senders, key=path)
    for stage, seconds in trace.per_sender.items():
        out.seconds[stage] = seconds.get(slowest, 0.0)
    unattributed = [t for name, t in per_link.items() if name.split("->")[0] not in senders]
    out.seconds["transmission"] = max([link_of(slowest), *unattributed])
    return out


# ------------------------------------------------------------------ bytes on wire


def kv_wire_bytes(config: PretrainedConfig, n_tokens: float, dtype: str = "bfloat16") -> float:
    """Bytes of one query's KV cache of ``n_tokens`` prompt tokens (sliding layers capped)."""
    return float(kvlib.kv_bytes(config, n_tokens, dtype))


def token_wire_bytes(n_tokens: float) -> float:
    """Bytes of ``n_tokens`` token ids (``t2t.TOKEN_ID_BYTES`` each)."""
    return float(n_tokens * TOKEN_ID_BYTES)


def wire_bytes_table(
    configs: Mapping[str, PretrainedConfig],
    kv_tokens: float | Mapping[str, float],
    text_tokens: float | Mapping[str, float],
    dtypes: tuple[str, ...] = ("float32", "bfloat16"),
) -> pd.DataFrame:
    """Bytes on the wire per token and per query, KV payload (per dtype) vs token ids.

    Args:
        configs: sender name -> model config.
        kv_tokens: prompt tokens whose cache a sender sends per query (C2C), overall or per sender.
        text_tokens: tokens a sender writes per query (T2T), overall or per sender.
    Returns:
        one row per (sender, payload) with ``payload`` (``"kv <dtype>"`` or ``"token ids"``),
        ``bytes_per_token`` (the full-attention formula ``2·L·H_kv·D·bytes``, or 4),
        ``tokens_per_query`` and ``bytes_per_query``; plus an ``all senders`` row per payload.
    """

    def per(value: float | Mapping[str, float], name: str) -> float:
        if isinstance(value, Mapping):
            if name not in value:
                raise KeyError(f"No token count for sender {name!r} (have {sorted(value)}).")
            return float(value[name])
        return float(value)

    rows = []
    for name, config in configs.items():
        n_kv, n_text = per(kv_tokens, name), per(text_tokens, name)
        for dt in dtypes:
            rows.append(
                {
                    "sender": name,
                    "payload": f"kv {dt}",
                    "bytes_per_token": kvlib.kv_bytes_per_token(config, dt),
                    "tokens_per_query": n_kv,
                    "bytes_per_query": kv_wire_bytes(config, n_kv, dt),
                }
            )
        rows.append(
            {
                "sender": name,
                "payload": "token ids",
                "bytes_per_token": TOKEN_ID_BYTES,
                "tokens_per_query": n_text,
                "bytes_per_query": token_wire_bytes(n_text),
            }
        )
    frame = pd.DataFrame(rows, columns=["sender", "payload", "bytes_per_token", "tokens_per_query", "bytes_per_query"])
    total = (
        frame.groupby("payload", sort=False)[["bytes_per_token", "tokens_per_query", "bytes_per_query"]]
        .sum()
        .reset_index()
        .assign(sender="all senders")
    )
    total["tokens_per_query"] = float("nan")  # a sum of token counts across senders means nothing here
    return pd.concat([frame, total[frame.columns]], ignore_index=True)


# ------------------------------------------------------------- the paper's 88 KB

PAPER_KV_ALL_SENDERS = "88 KB"
"""The paper: "transmitting the KV cache for a single token requires 88 KB" (four senders)."""
PAPER_TOKENS_ALL_SENDERS_BYTES = 16
"""The paper: "whereas T2T requires only 16 bytes" (four senders x a 4-byte token id)."""


def config_from_shape(shape: Mapping[str, int]) -> PretrainedConfig:
    """A bare config carrying a published shape (``layers``, ``kv_heads``, ``head_dim``,
    optional ``attention_heads``), enough for ``kv`` size formulas."""
    missing = [k for k in ("layers", "kv_heads", "head_dim") if k not in shape]
    if missing:
        raise ValueError(f"Shape {dict(shape)} lacks {missing}; write them under `shape:` in configs/<profile>.yaml.")
    return PretrainedConfig(
        num_hidden_layers=shape["layers"],
        num_key_value_heads=shape["kv_heads"],
        num_attention_heads=shape.get("attention_heads", shape["kv_heads"]),
        head_dim=shape["head_dim"],
    )


def paper_bytes_per_token(profile: str = "paper", dtype: str = "bfloat16") -> pd.DataFrame:
    """KV bytes per token of each sender of ``profile``, from the published shapes.

    Two readings of "the KV cache for a single token":

    - ``kv_own``: the sender's own cache, ``2 · L_s · H_kv,s · D_s · bytes`` (what a sender
      device sends if fusers run on the server or receiver; our engines count this);
    - ``kv_projected``: the cache after projection into the receiver's space, which has the
      receiver's shape ``2 · L_r · H_kv,r · D_r · bytes`` per sender (what the receiver gets
      if projection happens before the last hop).

    Returns:
        one row per sender plus ``all senders``: ``layers``, ``kv_heads``, ``head_dim``,
        ``kv_own_bytes``, ``kv_projected_bytes``, ``token_id_bytes`` (4) per token.

    For the ``paper`` profile in bfloat16 the senders' own caches sum to 86,016 B
    (84 KiB, 86.0 kB) — within 2–5 % of the paper's "88 KB" whichever unit it meant —
    while the projected caches sum to 458,752 B (448 KiB), five times more. So the
    paper's 88 KB matches the senders' *own* caches best (the small gap is unexplained;
    see :func:`paper_comparison`); its 16 B is 4 senders x 4-byte token ids exactly.
    """
    from fedrefine_lib.models import load_profile

    prof = load_profile(profile)
    receiver = config_from_shape(prof.spec(prof.receiver).shape)
    projected = kvlib.kv_bytes_per_token(receiver, dtype)
    rows = []
    for name in prof.senders:
        shape = prof.spec(name).shape
        cfg = config_from_shape(shape)
        rows.append(
            {
                "sender": name,
                "layers": shape["layers"],
                "kv_heads": shape["kv_heads"],
                "head_dim": shape["head_dim"],
                "kv_own_bytes": kvlib.kv_bytes_per_token(cfg, dtype),
                "kv_projected_bytes": projected,
                "token_id_bytes": TOKEN_ID_BYTES,
            }
        )
    frame = pd.DataFrame(rows)
    total = {
        "sender": "all senders",
        **{c: frame[c].sum() for c in ("kv_own_bytes", "kv_projected_bytes", "token_id_bytes")},
    }
    frame = pd.concat([frame, pd.DataFrame([total])], ignore_index=True)
    frame[["layers", "kv_heads", "head_dim"]] = frame[["layers", "kv_heads", "head_dim"]].astype("Int64")
    frame.attrs.update(profile=profile, dtype=dtype, receiver=prof.receiver)
    return frame


def paper_comparison(table: pd.DataFrame) -> pd.DataFrame:
    """The ``all senders`` totals of :func:`paper_bytes_per_token` beside the paper's
    88 KB and 16 B, with the ratio to 88 KB read as 88,000 B (kB) and as 90,112 B (KiB)."""
    total = table.set_index("sender").loc["all senders"]
    rows = [
        ("KV, senders' own caches", total["kv_own_bytes"], PAPER_KV_ALL_SENDERS),
        ("KV, projected into the receiver", total["kv_projected_bytes"], PAPER_KV_ALL_SENDERS),
        ("token ids", total["token_id_bytes"], f"{PAPER_TOKENS_ALL_SENDERS_BYTES} B"),
    ]
    out = pd.DataFrame(
        [
            {"quantity": q, "ours_bytes": int(b), "ours_KiB": b / 1024, "ours_kB": b / 1000, "paper": p}
            for q, b, p in rows
        ]
    )
    is_kv = out["paper"] == PAPER_KV_ALL_SENDERS
    out["ratio_to_88kB"] = (out["ours_bytes"] / 88_000).where(is_kv)
    out["ratio_to_88KiB"] = (out["ours_bytes"] / (88 * 1024)).where(is_kv)
    out["ratio_to_paper_16B"] = (out["ours_bytes"] / PAPER_TOKENS_ALL_SENDERS_BYTES).where(~is_kv)
    return out
