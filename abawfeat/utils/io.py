"""The one atomic write of the project: a file appears whole or not at all, and a full disk is one line.

Every artefact (config.json, checkpoint.pt, metrics.json, history.csv, val_outputs.npz, submission files,
plots, reports, cache parts, published checkpoints, training states) is written through ``atomic_write``:

- the content goes to a temporary file in the target's folder, created with ``O_EXCL`` and mode 0666 minus
  the umask, so the finished file has the permissions any other file the user creates there has (``mkstemp``
  would leave 0600);
- ``durable=True`` fsyncs the file before the rename and the folder after it, so the rename survives a
  power cut too (the cache, checkpoints, training states); without it the rename is still atomic against
  ``kill -9``;
- the rename replaces the target in one step; until then the previous file, if any, is untouched;
- on any failure the temporary file is removed; "no space left on device" (ENOSPC, EDQUOT) becomes a
  ``DiskFullError`` naming the file, never a traceback. So does a failure that leaves the device with less
  than 1 MiB free while the temporary file exists: some writers lose the errno on the way (torch.save
  reports "unexpected pos" from its zip writer on a full device).
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from abawfeat.errors import AbawfeatError, DiskFullError

_FULL = (errno.ENOSPC, errno.EDQUOT)


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or an error it wraps, as torch and h5py do) says the device is full."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _FULL:
            return True
        text = str(current).lower()
        if "no space left on device" in text or "disk quota exceeded" in text:
            return True
        current = current.__cause__ or current.__context__
    return False


_NEARLY_FULL = 1 << 20  # bytes: less than this left beside a failed write means the write filled the device


def _device_full(tmp: Path) -> bool:
    try:
        return shutil.disk_usage(tmp.parent).free < _NEARLY_FULL
    except OSError:
        return False


def temporary_path(path: Path) -> Path:
    """A fresh, exclusively created, empty file beside ``path`` (hidden name, umask permissions)."""
    for _ in range(100):
        tmp = path.with_name(sibling_name(path, f".{os.getpid()}.{secrets.token_hex(4)}.tmp"))
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"{path}: could not create a temporary file beside it")


def fsync_path(path: Path) -> None:
    """fsync a file or a folder by path (a folder's fsync makes a rename inside it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[Path], None], *, durable: bool = False) -> Path:
    """Fill ``path`` through ``write(tmp)`` and a rename; returns ``path``.

    ``write`` receives the temporary file's path and may open it itself (``torch.save``, ``h5py.File(tmp,
    "w")``, ``fig.savefig``). The folder is created if needed. Raises ``DiskFullError`` when the device is
    full; the previous content of ``path`` is then intact and no temporary file is left behind.
    """
    path = Path(path)
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_path(path)
        write(tmp)
        if durable:
            fsync_path(tmp)
        os.replace(tmp, path)
        tmp = None
        if durable:
            fsync_path(path.parent)
    except BaseException as exc:
        # Some writers lose the ENOSPC on the way (torch.save: "unexpected pos ..." from its zip writer);
        # a device left with (almost) no free space while the temporary file exists tells the same story.
        full = is_disk_full(exc) or (tmp is not None and not isinstance(exc, KeyboardInterrupt)
                                     and _device_full(tmp))
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        if full:
            kept = "its previous content is kept" if path.exists() else "nothing was written there"
            message = f"{path}: no space left on the device while writing it; {kept}"
            raise DiskFullError(message, path) from None
        raise
    return path


def file_in_the_way(path: str | Path) -> Path | None:
    """The file (not a folder) at ``path`` or at one of its parents that would stop ``path`` from being
    created as a folder (a run directory under ``runs/va/metrics.json``); None when there is none. Commands
    check it before any work, so that it is one line naming the file, not an error from deep inside."""
    for where in (Path(path), *Path(path).parents):
        if where.exists() or where.is_symlink():
            return None if where.is_dir() else where
    return None


def what_is(path: str | Path) -> str:
    """What stands at ``path``, in words for a message: "a file", "a folder", "a symbolic link to X, which
    does not exist" (a dangling link is not a file), "a symbolic link to a file", or "nothing"."""
    path = Path(path)
    if path.is_symlink():
        try:
            target = os.readlink(path)
        except OSError:
            target = "?"
        if not path.exists():
            return f"a symbolic link to {target}, which does not exist"
        return f"a symbolic link to {'a folder' if path.is_dir() else 'a file'} ({target})"
    if path.is_dir():
        return "a folder"
    if path.exists():
        return "a file"
    return "nothing"


def process_alive(pid: int) -> bool:
    """Whether a process with this id runs (one of another user's counts): a staging folder named after a
    live process is still being written; one named after a dead process is left over from a kill."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def acquire_lock(lock_file: str | Path, busy: Callable[[Path], AbawfeatError]) -> int:
    """The one single-writer lock of the project (a cache, a run, a grid, an ensemble): an exclusive
    ``flock`` on ``lock_file``, taken without waiting; returns its descriptor for ``release_lock``. A lock
    another process holds raises ``busy(lock_file)`` (one line). The kernel drops a flock on any exit, even
    ``kill -9``, so a lock is never left stale; the file itself stays (unlinking it would let two later
    writers lock two different inodes)."""
    import fcntl

    lock_file = Path(lock_file)
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
            raise busy(lock_file) from None
        raise
    try:
        # The pid is only a hint for humans; the flock is the lock.
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    except BaseException:
        release_lock(fd)
        raise
    return fd


def release_lock(fd: int) -> None:
    import fcntl

    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def lock_holder(lock_file: Path) -> str:
    """`` (pid N)`` from a held lock's pid hint, or "" when it cannot be read."""
    try:
        pid = lock_file.read_text().strip()
    except OSError:
        return ""
    return f" by pid {pid}" if pid.isdigit() else ""


# A file name may hold this many bytes on every file system abawfeat is used on (ext4, xfs, NFS, tmpfs).
NAME_MAX = 255
_SUFFIX_ROOM = 32  # bytes kept for a sibling's suffix (".replaced-PID", ".lock")


def sibling_name(target: Path, suffix: str) -> str:
    """``.NAME<suffix>``, the hidden name of something kept beside ``target`` (a staging folder, a lock);
    a NAME too long to take the prefix and suffix within NAME_MAX bytes is shortened and given a digest of
    itself, so a long but valid ``--out`` never fails with ENAMETOOLONG on the name of its helper."""
    name = target.name
    # The same shortened NAME whatever the suffix (``.new-PID`` and ``.new-`` must share their prefix).
    room = NAME_MAX - _SUFFIX_ROOM - 1
    assert len(suffix.encode()) <= _SUFFIX_ROOM, suffix
    if len(name.encode()) <= room:
        return f".{name}{suffix}"
    import hashlib

    digest = hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    short = name.encode("utf-8", "surrogateescape")[: room - 17].decode("utf-8", "ignore")
    return f".{short}~{digest}{suffix}"


def staging_path(target: Path) -> Path:
    """Where a replacement of the folder ``target`` is built before ``swap_in``: ``.NAME.new-PID`` beside it
    (the same file system, so the swap is two renames). Replacements left by killed processes go first:
    nothing would ever swap them in."""
    prefix = sibling_name(target, ".new-")
    for stale in target.parent.glob(f"{glob_escape(prefix)}*") if target.parent.is_dir() else []:
        pid = stale.name.rsplit("-", 1)[-1]
        if not (pid.isdigit() and process_alive(int(pid))):
            shutil.rmtree(stale, ignore_errors=True)
    staging = target.with_name(sibling_name(target, f".new-{os.getpid()}"))
    shutil.rmtree(staging, ignore_errors=True)
    return staging


def swap_in(staging: Path, target: Path) -> None:
    """Make the complete folder ``staging`` the one at ``target``: the old one is renamed aside
    (``.NAME.replaced-PID``), the new one renamed in, then the old one removed. A process killed between
    the renames leaves ``target`` missing and the old folder aside (``interrupted_replacement``)."""
    old = target.with_name(sibling_name(target, f".replaced-{os.getpid()}"))
    os.rename(target, old)
    os.rename(staging, target)
    shutil.rmtree(old, ignore_errors=True)


def interrupted_replacement(target: Path) -> Path | None:
    """The previous folder of a missing ``target`` whose ``swap_in`` was killed between its renames."""
    if target.exists() or not target.parent.is_dir():
        return None
    prefix = sibling_name(target, ".replaced-")
    return next(iter(sorted(target.parent.glob(f"{glob_escape(prefix)}*"))), None)


def glob_escape(name: str) -> str:
    """``name`` with glob's special characters taken literally (a run folder ``va[2]``)."""
    import glob

    return glob.escape(name)


def atomic_write_bytes(path: str | Path, data: bytes, *, durable: bool = False) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data), durable=durable)


def atomic_write_text(path: str | Path, text: str, *, durable: bool = False) -> Path:
    """UTF-8 text with ``\\n`` line endings on every platform."""

    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)

    return atomic_write(path, write, durable=durable)


def write_json(path: str | Path, data: Any, *, durable: bool = False) -> Path:
    """JSON (indented, a final newline) through ``atomic_write``."""
    return atomic_write_text(path, json.dumps(data, indent=2) + "\n", durable=durable)


def torch_save(path: str | Path, payload: Any, *, durable: bool = True) -> Path:
    """``torch.save`` through ``atomic_write``: checkpoints and training states are durable by default."""
    import torch

    return atomic_write(path, lambda tmp: torch.save(payload, tmp), durable=durable)


__all__ = ["acquire_lock", "atomic_write", "atomic_write_bytes", "atomic_write_text", "file_in_the_way",
           "fsync_path", "glob_escape", "interrupted_replacement", "is_disk_full", "lock_holder",
           "process_alive", "release_lock", "sibling_name", "staging_path", "swap_in", "temporary_path",
           "torch_save", "what_is", "write_json"]
