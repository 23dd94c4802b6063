"""What one call cost: wall-clock seconds per stage, bytes per link, token counts."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch


@dataclass
class Trace:
    """What one call cost.

    Attributes:
        seconds: per stage (``tokenize``, ``alignment``, ``sender_prefill``,
            ``receiver_prefill``, ``projection``, ``combine``, ``decode``, ...), wall-clock seconds.
        bytes: per link (``"sender->receiver"``), bytes the transmitted payloads take on the wire.
        tokens: counts (``prompt``, ``sender_prompt``, ``generated``), real tokens only.
        per_sender: for the stages senders run (``sender_prefill``, ``sender_decode``), the
            seconds of each sender (``{stage: {sender: seconds}}``); ``seconds`` holds their sum
            (one machine, one after another), ``network.with_transmission`` the parallel view.
    """

    seconds: dict[str, float] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    per_sender: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def total_seconds(self) -> float:
        return sum(self.seconds.values())

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())

    def add(self, other: Trace) -> Trace:
        """Accumulate ``other`` into this trace (in place); returns self."""
        for mine, theirs in ((self.seconds, other.seconds), (self.bytes, other.bytes), (self.tokens, other.tokens)):
            for k, v in theirs.items():
                mine[k] = mine.get(k, 0) + v
        for stage, senders in other.per_sender.items():  # their sum is in ``seconds`` already
            mine = self.per_sender.setdefault(stage, {})
            for sender, s in senders.items():
                mine[sender] = mine.get(sender, 0.0) + s
        return self

    def add_sender_seconds(self, stage: str, seconds: dict[str, float]) -> None:
        """Add per-sender ``seconds`` of ``stage`` (and their sum to ``self.seconds``)."""
        mine = self.per_sender.setdefault(stage, {})
        for sender, s in seconds.items():
            mine[sender] = mine.get(sender, 0.0) + s
            self.seconds[stage] = self.seconds.get(stage, 0.0) + s

    def count(self, what: str, key: str, n: int) -> None:
        """Add ``n`` to ``bytes`` (``what="bytes"``) or ``tokens`` (``what="tokens"``) under ``key``."""
        table = {"bytes": self.bytes, "tokens": self.tokens}[what]
        table[key] = table.get(key, 0) + n

    @contextmanager
    def time(self, stage: str) -> Iterator[None]:
        """Add the wall-clock time of the ``with`` body to ``stage`` (synchronising CUDA)."""
        with _clock() as elapsed:
            yield
        self.seconds[stage] = self.seconds.get(stage, 0.0) + elapsed[0]

    @contextmanager
    def time_sender(self, stage: str, sender: str) -> Iterator[None]:
        """As :meth:`time`, for a stage one sender runs (recorded per sender too)."""
        with _clock() as elapsed:
            yield
        self.add_sender_seconds(stage, {sender: elapsed[0]})

    def to_dict(self) -> dict:
        return {
            "seconds": dict(self.seconds),
            "per_sender": {k: dict(v) for k, v in self.per_sender.items()},
            "total_seconds": self.total_seconds,
            "bytes": dict(self.bytes),
            "total_bytes": self.total_bytes,
            "tokens": dict(self.tokens),
        }


@contextmanager
def _clock() -> Iterator[list[float]]:
    """Wall-clock seconds of the ``with`` body (CUDA synchronised), in ``[seconds]`` on exit."""
    elapsed = [0.0]
    _sync()
    start = time.perf_counter()
    try:
        yield elapsed
    finally:
        _sync()
        elapsed[0] = time.perf_counter() - start


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
