"""One live process per output folder: an OS lock (``flock``) on ``FOLDER/.moecpt.lock``.

The kernel releases a ``flock`` when its holder dies however it dies (SIGKILL, OOM, power loss of the client), so
a lock left by a dead process never blocks the next run: there is no stale lock to clean, only a stale note of who
held it last, which is ignored. The file records pid, host, command and start time so that a refused second
process can name the owner. Where the file system has no ``flock`` (some network file systems), the note itself
is the lock: a live pid on this host, or any note from another host younger than a day, refuses the folder.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from moecpt.errors import MoecptError
from moecpt.storage.atomic import pid_alive
from moecpt.storage.outputs import os_error_line

LOCK_FILE = ".moecpt.lock"
_FOREIGN_NOTE_TTL_S = 24 * 3600

try:  # POSIX; on Windows only the pid note applies
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]


class FolderLock:
    """Exclusive ownership of a folder by this process while the ``with`` block (or until :meth:`release`).

    Args:
        folder: an existing folder (the lock file is created inside it).
        command: what holds it, e.g. ``"pretrain"`` (shown to a refused second process).

    Raises (from :meth:`acquire`):
        MoecptError: another live process holds the folder (its pid, host, command and start time are named), or
            the lock file cannot be written.
    """

    def __init__(self, folder: str | Path, command: str):
        self.path = Path(folder) / LOCK_FILE
        self.command = command
        self._fd: int | None = None

    def _note(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "since_unix": time.time()}

    def _read_note(self) -> dict[str, Any]:
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8") or "{}")
        except (OSError, ValueError):
            return {}
        return raw if isinstance(raw, dict) else {}

    def _refuse(self, note: dict[str, Any]) -> MoecptError:
        who = f"pid {note.get('pid', '?')} on {note.get('host', '?')}"
        what = f" (moecpt {note['command']}, since {note.get('since', '?')})" if note.get("command") else ""
        return MoecptError(f"{self.path.parent} is in use by {who}{what}; wait for it to finish or stop it, "
                           "or choose another --out")

    def acquire(self) -> "FolderLock":
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise MoecptError(os_error_line(exc, self.path, "lock")) from None
        try:
            if fcntl is None:
                raise OSError(errno.ENOLCK, "no flock")
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise self._refuse(self._read_note()) from None
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                os.close(fd)
                raise
            self._check_note_lock()  # no flock here: the note is the lock
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(self._note()) + "\n").encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def _check_note_lock(self) -> None:
        note = self._read_note()
        if not note or note.get("pid") == os.getpid():
            return
        if note.get("host") == socket.gethostname():
            if pid_alive(int(note.get("pid", 0) or 0)):
                raise self._refuse(note)
        elif time.time() - float(note.get("since_unix", 0)) < _FOREIGN_NOTE_TTL_S:
            raise self._refuse(note)

    def release(self) -> None:
        """Give the folder up (the note stays; without the OS lock it means nothing)."""
        if self._fd is None:
            return
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(self._fd, fcntl.LOCK_UN)
                except OSError:
                    pass
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
