"""Directories that concurrent or interrupted writers cannot corrupt.

A stored item (a hub fuser, say) is a directory published whole: its writer fills a private
staging directory next to it and swaps it in under an exclusive lock (one atomic exchange of
the two directories where Linux offers it, else two renames), and a reader holds the shared
lock while it reads, so it sees the old item or the new one, never a mix. A writer killed
mid-write leaves only its staging directory, which no reader opens and the next publisher of
the item removes; one killed between the two renames is rolled back by the next publisher
(the previous version is put back). A replaced version can be kept aside instead of deleted.
Names that would leave the store's root (``..``, ``/``, absolute paths) are refused.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import os
import re
import shutil
import time
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


@contextmanager
def reading(target: Path) -> Iterator[None]:
    """Hold ``target``'s shared read lock (no publisher changes it meanwhile); where it is
    missing, first put back a version a writer killed mid-publication had moved away."""
    with locked(lock_path(target), shared=True):
        present = target.exists()
        if present:
            yield
    if not present:
        recover(target)
        with locked(lock_path(target), shared=True):
            yield


def lock_path(target: Path, purpose: str = "read") -> Path:
    """The lock file of ``target`` for ``purpose`` (``read``: publishing and reading;
    ``train``: one trainer of the item at a time)."""
    return target.parent / f".{target.name}.{purpose}.lock"


def staging_dir(target: Path) -> Path:
    """A fresh private directory next to ``target`` to write a new version of it into (named
    with this process's id, so a later publisher can tell a dead writer's leftovers)."""
    path = target.parent / f".{target.name}.staging-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    return path


def publish(
    staging: Path,
    target: Path,
    then: Callable[[], None] | None = None,
    keep: Callable[[Path], bool] | None = None,
) -> None:
    """Replace ``target`` with the complete directory ``staging`` (both on one file system),
    under ``target``'s exclusive read lock, so no reader sees it half-way; ``then`` (e.g. an
    index update) runs under the same lock, so no other writer comes between.

    Args:
        keep: given the replaced version's directory, whether to keep it aside
            (``.<name>.replaced-<time>-<id>``, with a warning) rather than delete it.
    """
    with locked(lock_path(target)):
        _sweep(target)
        if target.exists() and _exchange(staging, target):
            old: Path | None = staging  # now holds the replaced version
        else:
            old = None
            if target.exists():
                old = target.parent / f".{target.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
                os.rename(target, old)
            os.rename(staging, target)
        if then is not None:
            then()
        if old is not None and keep is not None and keep(old):
            aside = target.parent / f".{target.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
            os.rename(old, aside)
            warnings.warn(f"{target} was replaced; the previous version is kept at {aside}.", stacklevel=3)
            old = None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def recover(target: Path) -> None:
    """Undo what writers of ``target`` that died left behind (see :func:`_sweep`), under its
    exclusive lock: a reader that finds ``target`` missing puts its last version back."""
    with locked(lock_path(target)):
        _sweep(target)


def _sweep(target: Path) -> None:
    """Under ``target``'s exclusive lock: remove the staging directories of writers that died
    (this machine's process ids), and put back a version a writer killed between its two
    renames had moved away (else remove it: it was replaced)."""
    leftover = re.compile(rf"\.{re.escape(target.name)}\.(staging|old)-(\d+)-[0-9a-f]+")
    for path in sorted(target.parent.glob(f".{target.name}.*")):
        match = leftover.fullmatch(path.name)
        if not match or _alive(int(match.group(2))):
            continue
        if match.group(1) == "old" and not target.exists():
            os.rename(path, target)
        else:
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (this one counts as alive)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@functools.cache
def _renameat2() -> Callable[..., int] | None:
    """libc's ``renameat2`` (glibc 2.28+), or None."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    system or the file system cannot (the caller then renames twice)."""
    fn = _renameat2()
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


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
