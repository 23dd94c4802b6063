"""The processes of one ``accelerate launch`` (ranks) sharing a file lock and a decision.

A pair's fuser is trained by every rank at once (Accelerate shards the batches), so the
pair's training lock must be held by the first rank alone: had each rank waited for the
lock, the first would wait in its first gradient all-reduce for ranks blocked on the lock,
forever. With one process both helpers reduce to a plain lock and the flag itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env

from .store import locked


def launch_state(cpu: bool = False) -> PartialState:
    """This process's place among the launch's ranks, read as ``Accelerator(cpu=cpu)`` would
    (``accelerate launch --cpu`` sets ``ACCELERATE_USE_CPU``; several CPU ranks need it)."""
    return PartialState(cpu=cpu or parse_flag_from_env("ACCELERATE_USE_CPU"))


@contextmanager
def first_rank_locked(path: Path, ranks: PartialState) -> Iterator[None]:
    """The file lock ``path`` held by the first rank; every rank enters once it is held."""
    with locked(path) if ranks.is_main_process else nullcontext():
        ranks.wait_for_everyone()
        yield


def from_first_rank(flag: bool, ranks: PartialState) -> bool:
    """The first rank's ``flag``, on every rank (so all ranks take the same branch)."""
    if ranks.num_processes == 1:
        return flag
    box = [flag]
    torch.distributed.broadcast_object_list(box, src=0)
    return bool(box[0])
