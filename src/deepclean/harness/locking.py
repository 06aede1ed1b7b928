"""Inter-process locks on an output folder and on model-cache entries (POSIX ``flock``).

Two ``deepclean run`` processes must not write into one ``--out`` folder (their results would
mix configurations) and must not both train the same cached model. :func:`exclusive_lock` takes an
advisory ``fcntl.flock`` on a lock file:

- on an output folder, ``wait=False``: a second run is refused at once with a message naming the
  process that holds the folder (:class:`~deepclean.errors.BusyError`);
- on a cache entry, ``wait=True``: a second run waits until the first has written the model,
  then reuses it.

The lock is released when the holder exits, even if it crashes (the kernel drops ``flock`` locks
with the file descriptor), so a stale lock file never blocks a later run. On platforms without
``fcntl`` (Windows) the lock is a no-op.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from deepclean.errors import BusyError

try:  # POSIX only
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_NAME", "exclusive_lock", "lock_holder"]

#: Name of the lock file inside a locked folder.
LOCK_NAME = ".deepclean.lock"


def lock_holder(lock_path: str | Path) -> dict[str, object]:
    """What the lock file says about its holder: ``{"pid", "started", "purpose"}`` (may be
    empty when the file is missing or was written by an older version)."""
    try:
        return json.loads(Path(lock_path).read_text() or "{}")
    except (OSError, ValueError):
        return {}


@contextmanager
def exclusive_lock(path: str | Path, *, purpose: str, wait: bool = False,
                   timeout_s: float | None = None) -> Iterator[Path]:
    """Hold an exclusive lock on ``path`` (a folder: its ``.deepclean.lock``; a file: the file
    ``<path>.lock`` next to it) for the body of the ``with``.

    Args:
        path: the folder or file to protect; its parent folder is created if needed.
        purpose: what the holder does, e.g. ``"deepclean run"``; shown to a refused process.
        wait: block until the lock is free (``True``) or refuse at once (``False``).
        timeout_s: with ``wait``, give up after this many seconds (``None``: wait for ever).

    Yields:
        The lock file's path.

    Raises:
        BusyError: another process holds the lock (``wait=False``, or ``timeout_s`` ran out);
            the message names its process id, start time and purpose, and the fix.
    """
    path = Path(path)
    lock_path = path / LOCK_NAME if path.is_dir() or not path.suffix else \
        path.with_name(path.name + ".lock")
    # A refused or failed run leaves no empty folder behind: a folder this call creates is
    # removed again if it holds nothing but the lock file at the end (``wait=False`` only: a
    # waiting process may hold the lock file open, so shared cache locks are never removed).
    created = not wait and not lock_path.parent.exists()
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    if fcntl is None:  # pragma: no cover
        yield lock_path
        return
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                expired = deadline is not None and time.monotonic() >= deadline
                if not wait or expired:
                    holder = lock_holder(lock_path)
                    who = (f"process {holder.get('pid', '?')} ({holder.get('purpose', '?')}, "
                           f"since {holder.get('started', '?')})")
                    raise BusyError(
                        f"{path} is in use by {who}; wait for it to finish, or use another "
                        "folder (--out / --cache-dir)"
                    ) from None
                time.sleep(0.2)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "purpose": purpose,
                                 "started": time.strftime("%Y-%m-%dT%H:%M:%S")}).encode())
        try:
            yield lock_path
        finally:
            os.ftruncate(fd, 0)
            if created:
                _remove_if_only_lock(lock_path)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _remove_if_only_lock(lock_path: Path) -> None:
    """Remove the lock file and its folder if the folder holds nothing else (called with the
    lock still held, so no other process can be writing into the folder)."""
    try:
        if [p.name for p in lock_path.parent.iterdir()] == [lock_path.name]:
            lock_path.unlink()
            lock_path.parent.rmdir()
    except OSError:  # a file appeared or the folder is not ours to remove: keep it
        pass
