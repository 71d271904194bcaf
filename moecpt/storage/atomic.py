"""Crash-safe file writes: write a temp file in the same folder, fsync it, rename over the target, fsync the folder.

A reader sees either the old content or the new one, never a partial file, whatever kills the writer (a rename
within one file system is atomic on POSIX). The folder fsync makes the rename itself survive a power loss.
"""

from __future__ import annotations

import json
import os
import secrets
from enum import Enum
from pathlib import Path
from typing import Any

from moecpt.errors import MoecptError


def temp_name(name: str) -> str:
    """``<name>.tmp-<pid>-<rand>``: unique per writer; the pid lets a later process tell a dead writer's leftovers."""
    return f"{name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` still runs on this host (a leftover temp file of a live writer must be left alone)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def current_umask() -> int:
    """This process's umask (read from ``/proc`` where possible, so that no thread ever sees it changed)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: str | Path) -> None:
    """Give a file the mode a plain ``open()`` would (``0o666 & ~umask``, 0644 by default): some writers
    (safetensors) create files 0600, which a team on shared storage cannot read."""
    os.chmod(path, 0o666 & ~current_umask())


def fsync_file(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """fsync a folder so that renames / creations inside it are durable (no-op where folders cannot be opened)."""
    if os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically (temp file + fsync + ``os.replace`` + fsync of the folder).

    The parent folder is created if missing. On any error the temp file is removed and the old ``path`` is intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(temp_name(path.name))
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def json_default(obj: Any) -> Any:
    """``json.dumps`` fallback for what run metadata commonly holds: paths, enums, numpy / torch scalars and
    arrays, pydantic models, sets."""
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, Enum):
        return obj.value
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if hasattr(obj, "model_dump"):  # pydantic
        return obj.model_dump(mode="json")
    if hasattr(obj, "tolist"):  # numpy / torch scalars and arrays
        return obj.tolist()
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serialisable")


def dumps_json(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, default=json_default) + "\n").encode("utf-8")


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON (see :func:`json_default` for accepted non-JSON types) atomically.

    Raises:
        TypeError: ``obj`` holds something that has no JSON form.
    """
    write_bytes_atomic(path, dumps_json(obj))


def publish_dir(staging: str | Path, out: str | Path, what: str) -> None:
    """Make a fully written ``staging`` folder appear as ``out`` in one rename (after fsyncing its files).

    Args:
        staging: a folder beside ``out`` (same file system) holding the complete result.
        out: the final path; must not exist.
        what: the operation, for the error message (e.g. ``"import"``).

    Raises:
        MoecptError: ``out`` appeared meanwhile (nothing is overwritten; ``staging`` is left for the caller).
    """
    staging, out = Path(staging), Path(out)
    for p in staging.iterdir():
        if p.is_file():
            fsync_file(p)
    fsync_dir(staging)
    if out.exists():
        raise MoecptError(f"--out {str(out)!r} was created by someone else during the {what}; nothing written")
    os.rename(staging, out)
    fsync_dir(out.parent)
