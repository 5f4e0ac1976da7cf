"""One run at a time (docs/design.md 6, "One run at a time"): an exclusive `flock` on OUT/.pear/lock.

The writer holds it from its start until `close()` (or the end of the process: the kernel releases it after a
kill -9 too). Another process that opens the same OUT gets OutputLockedError, naming the holder's process id.
Writers in one process share the lock (the Python API may reopen an output it is writing). Platforms without
`fcntl` get no lock.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from ..errors import OutputLockedError
from .layout import LOCK_FILE, STATE_DIR

try:
    import fcntl
except ImportError:  # not POSIX: no lock (docs/design.md section 6)
    fcntl = None


class LockHandle:
    def __init__(self, key: str, fd: int) -> None:
        self.key, self.fd, self.users = key, fd, 1


LOCKS: dict[str, LockHandle] = {}  # lock file (real path) -> this process's handle


def acquire_lock(out_dir: Path, state_dir: Path) -> LockHandle | None:
    """flock OUT/.pear/lock (shared by the writers of this process). OutputLockedError if another process holds it."""
    if fcntl is None:
        return None
    path = state_dir / LOCK_FILE
    key = os.path.realpath(path)
    held = LOCKS.get(key)
    if held is not None:
        try:
            if os.path.samestat(os.fstat(held.fd), os.stat(path)):
                held.users += 1
                return held
        except OSError:
            pass
        del LOCKS[key]  # OUT was deleted and made again: that old lock protects nothing here
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        raise OutputLockedError(
            f"another pear-data run (process {holder(path)}) is writing {out_dir}; wait for it to end, or choose "
            f"another --out. The lock ({path}) goes away with that process, kill -9 included."
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    handle = LockHandle(key, fd)
    LOCKS[key] = handle
    return handle


def holder(lock: Path) -> str:
    """The process id the lock file names (the last run that took it), or "unknown"."""
    try:
        return lock.read_text(encoding="utf-8").strip() or "unknown"
    except OSError:
        return "unknown"


def lock_holder(out_dir: str | Path) -> str | None:
    """The process id of another process that holds OUT/.pear/lock now (a run writing OUT), else None.

    Probes the lock without waiting: a shared flock, released at once. The lock of a writer of this process
    does not count (the Python API may read an output it is writing).
    """
    path = Path(out_dir) / STATE_DIR / LOCK_FILE
    if fcntl is None or os.path.realpath(path) in LOCKS:
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None  # no lock file: no run ever wrote here, or the file is gone
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    except OSError as exc:
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        return holder(path)
    finally:
        os.close(fd)


def release_lock(handle: LockHandle | None) -> None:
    if handle is None or handle.users <= 0:
        return
    handle.users -= 1
    if handle.users == 0:
        if LOCKS.get(handle.key) is handle:
            del LOCKS[handle.key]
        os.close(handle.fd)
