"""Directories that concurrent or interrupted writers cannot corrupt.

A stored item (a hub fuser, say) is a directory published whole: its writer fills a private
staging directory next to it and swaps it in by renames under an exclusive lock, and a reader
holds the shared lock while it reads, so it sees the old item or the new one, never a mix.
A writer killed mid-write leaves only a staging directory, which no reader ever opens.
Names that would leave the store's root (``..``, ``/``, absolute paths) are refused.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import uuid
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


def check_name(name: str, what: str) -> str:
    """``name`` if it is one safe path component (letters, digits, ``._+-``, no leading dot),
    else ValueError naming ``what``: such a name could write outside the store's root."""
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise ValueError(
            f"{what} {name!r} is not a valid name: use letters, digits and '._+-' (not starting with '.', "
            "no '..' or '/'), so that nothing is written outside the hub's root."
        )
    return name


@contextmanager
def locked(path: Path, shared: bool = False) -> Iterator[None]:
    """Hold an advisory lock on ``path`` (created if needed): shared for readers, exclusive
    for writers."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def lock_path(target: Path, purpose: str = "read") -> Path:
    """The lock file of ``target`` for ``purpose`` (``read``: publishing and reading;
    ``train``: one trainer of the item at a time)."""
    return target.parent / f".{target.name}.{purpose}.lock"


def staging_dir(target: Path) -> Path:
    """A fresh private directory next to ``target`` to write a new version of it into."""
    path = target.parent / f".{target.name}.staging-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    return path


def publish(staging: Path, target: Path, then: Callable[[], None] | None = None) -> None:
    """Replace ``target`` with the complete directory ``staging`` (both on one file system),
    under ``target``'s exclusive read lock, so no reader sees it half-way; ``then`` (e.g. an
    index update) runs under the same lock, so no other writer comes between."""
    with locked(lock_path(target)):
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(target, old)
        os.rename(staging, target)
        if then is not None:
            then()
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def quarantine(target: Path, why: str) -> Path | None:
    """Move a corrupt or incomplete ``target`` aside (``.<name>.corrupt-<id>``, nothing is
    deleted), with a warning that names the cause; returns where it went."""
    with locked(lock_path(target)):
        if not target.exists():
            return None
        aside = target.parent / f".{target.name}.corrupt-{uuid.uuid4().hex[:8]}"
        os.rename(target, aside)
    warnings.warn(f"{target} could not be used ({why}); moved aside to {aside} and made again.", stacklevel=3)
    return aside
