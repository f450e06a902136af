"""One writer per results file: a run holds a lock file beside its results while it trains.

Two identical runs started at once would both train and write the same results file and checkpoint; the
second now stops at once with a one-line error. The lock holds its owner's host and process id, so a lock
left by a killed process on this host is recognised as stale and taken over. A lock from another host (a
shared folder) cannot be checked from here: the error says which file to delete once that run is gone.
"""

import contextlib
import os
import socket
import time
from pathlib import Path
from typing import Iterator

from dpfl_bench.errors import UserError


def lock_path(results: Path) -> Path:
    return results.with_name(f".{results.name}.lock")  # a dotfile: not a result, not committed


@contextlib.contextmanager
def writer_lock(results: Path) -> Iterator[None]:
    """Hold the lock of `results` while inside; a live holder is a one-line UserError."""
    lock = lock_path(results)
    owner = f"{socket.gethostname()} {os.getpid()}"
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            holder = _holder(lock)
            if holder is None:  # released (or stale and removed) meanwhile: try again
                continue
            host, pid = holder
            if host == socket.gethostname() and not _alive(pid):
                lock.unlink(missing_ok=True)
                continue
            raise UserError(
                f"{results.name} is being written by another run (process {pid} on {host}); wait for it to finish, "
                f"or delete {lock} if that run is gone"
            ) from None
        with os.fdopen(fd, "w") as f:
            f.write(owner)
        break
    try:
        yield
    finally:
        if _holder(lock) == (socket.gethostname(), os.getpid()):
            lock.unlink(missing_ok=True)


def _holder(lock: Path) -> tuple[str, int] | None:
    """(host, process id) of the lock's owner; None when there is no lock. Process id 0: a lock created this
    instant and not yet written; -1: one whose owner was killed before writing it."""
    try:
        text = lock.read_text()
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return None
    host, _, pid = text.rpartition(" ")
    if not pid.isdigit():
        return socket.gethostname(), (0 if age < 10 else -1)
    return host, int(pid)


def _alive(pid: int) -> bool:
    if pid == 0:  # a lock being written this instant
        return True
    if pid < 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def check_unlocked(results: Path) -> None:
    """Refuse now, in one line, what `writer_lock` would refuse once the run starts (before any output)."""
    with writer_lock(results):
        pass
