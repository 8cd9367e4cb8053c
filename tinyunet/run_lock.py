"""One training per run folder: ``RUNDIR/.lock``, locked by the operating system while a training runs.

The lock belongs to the open file (``fcntl.flock`` on POSIX, ``msvcrt.locking`` on Windows), so it
ends with the process however the process ends: a training killed with ``kill -9`` leaves the file
behind but not the lock, and the next training takes it at once. The file says who holds it (process
id, host, start time, command line) for the message a second training shows; a training that ends
normally deletes it.
"""
from __future__ import annotations

import errno
import os
import socket
import sys
import time
from pathlib import Path
from typing import Optional

from tinyunet.errors import TinyUNetError

LOCK_NAME = ".lock"

try:
    import fcntl

    def _try_lock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
except ImportError:  # Windows
    import msvcrt

    def _try_lock(fd: int) -> None:
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)


class RunFolderLock:
    """Holds ``folder/.lock`` from construction to :meth:`release`; raises TinyUNetError naming the
    holder if another process holds it."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.path = Path(folder) / LOCK_NAME
        self._fd: Optional[int] = None
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                _try_lock(fd)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK, errno.EDEADLK):
                    raise TinyUNetError(f"run folder {self.path.parent} is in use by another training "
                                        f"({self._holder()}): wait for it to end or stop it, or choose "
                                        "another --out") from None
                raise
            # The holder before us deletes the file as it ends: if it did so after we opened it, we
            # hold a lock on a file nobody else will open. Lock the file that is there now instead.
            try:
                if os.path.samestat(os.fstat(fd), os.stat(self.path)):
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        self._fd = fd
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        program = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
        command = " ".join(["tinyunet" if program in ("tinyunet", "cli.py") else sys.argv[0], *sys.argv[1:]])
        holder = f"process {os.getpid()} on {socket.gethostname()}, started {started}: {command}"
        os.ftruncate(fd, 0)
        os.write(fd, holder.encode("utf-8", "replace"))

    def _holder(self) -> str:
        try:
            text = self.path.read_text(encoding="utf-8", errors="replace").strip()
        except OSError:
            text = ""
        return text or "process unknown: it has only just started"

    def release(self) -> None:
        """Delete the file and let go of the lock (the other way round would let a second training
        lock the file just before it disappears). Safe to call twice."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        except OSError:
            pass  # a read-only folder: the file stays, the lock still ends with the close
        os.close(self._fd)
        self._fd = None
