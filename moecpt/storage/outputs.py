"""Output folders moecpt can prove it made, and the rule that it never writes into or over an input.

Every command that writes a folder (``data prepare``, ``pretrain``, ``cpt``, ``study``, ``import-hf``,
``export-hf``, ``lopt meta-train``, ``lopt bench``) claims it first with :func:`claim_folder` or, for a folder that
must not exist yet and is published in one rename, :func:`check_new_output` + :func:`write_marker`. A claimed
folder holds ``.moecpt-output.json`` naming the command and its inputs. The rules:

* an ``--out`` that is an input, lies inside one or holds one is refused (``data prepare --source en=corpus/en
  --out corpus`` would otherwise write beside, and later replace, the user's raw text);
* an existing non-empty folder without a marker is the user's, not moecpt's: refused, nothing written;
* a folder marked by another command is refused (a prepared data folder is not a run folder);
* deleting or replacing anything is allowed only below a folder this module marked (see :func:`owns`), and each
  command additionally checks its own proof for the sub-path it replaces (e.g. a source's ``source.json``).

Single-file outputs (``moecpt schedule --out x.png``) carry a signature inside the file instead of a marker beside
it: :func:`check_file_output` replaces an existing file only when it carries that signature.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import socket
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from moecpt._version import __version__
from moecpt.errors import MoecptError
from moecpt.storage.atomic import write_json_atomic

MARKER_FILE = ".moecpt-output.json"
MARKER_FORMAT = "moecpt-output"


def _resolve(path: str | Path) -> Path:
    return Path(path).expanduser().resolve(strict=False)


def os_error_line(exc: OSError, path: str | Path | None = None, doing: str = "write") -> str:
    """One line for an environment error: what failed, on which path, why, and what to do.

    ``exc.filename`` (when set) is the path named; ``path`` otherwise. Disk full, read-only file system and
    permission errors get their own advice.
    """
    where = exc.filename or path
    cause = exc.strerror or type(exc).__name__
    if doing == "read":
        return f"cannot read {str(where)!r}: {cause}; check that the path exists and is readable, then try again"
    advice = {
        errno.ENOSPC: "free some disk space or choose an --out on a larger disk, then run the same command again",
        errno.EDQUOT: "your disk quota is used up; free some space, then run the same command again",
        errno.EROFS: "the file system is read-only; choose a writable --out",
        errno.EACCES: "you may not write there; choose a writable --out or fix the permissions",
        errno.EPERM: "you may not write there; choose a writable --out or fix the permissions",
    }.get(exc.errno, "check the path and the disk, then run the same command again")
    return f"cannot {doing} {str(where)!r}: {cause}; {advice}"


def check_outside_inputs(out: str | Path, inputs: Iterable[str | Path], flag: str = "--out") -> None:
    """Refuse an output path that is an input, lies inside an input folder, or contains an input.

    Args:
        out: the output file or folder (need not exist).
        inputs: every path the command reads (files or folders; missing ones are skipped).
        flag: the option that named ``out``, for the message.

    Raises:
        MoecptError: naming the input and the way the two overlap.
    """
    o = _resolve(out)
    for inp in inputs:
        if not str(inp):
            continue
        i = _resolve(inp)
        if o == i:
            how = "is"
        elif o.is_relative_to(i):
            how = "lies inside"
        elif i.is_relative_to(o):
            how = "contains"
        else:
            continue
        raise MoecptError(
            f"{flag} {str(out)!r} {how} the input {str(inp)!r}; moecpt never writes into or over what it reads: "
            f"choose an {flag} outside every input"
        )


def read_marker(folder: str | Path) -> dict[str, Any] | None:
    """The marker of a folder moecpt claimed, or ``None`` when there is none (or it is not moecpt's)."""
    f = Path(folder) / MARKER_FILE
    try:
        raw = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return raw if isinstance(raw, dict) and raw.get("format") == MARKER_FORMAT else None


def owns(folder: str | Path, command: str | None = None) -> bool:
    """Whether ``folder`` carries moecpt's marker (of ``command``, when given): proof that moecpt made it."""
    m = read_marker(folder)
    return m is not None and (command is None or m.get("command") == command)


def write_marker(folder: str | Path, command: str, inputs: Iterable[str | Path] = ()) -> None:
    """Write ``.moecpt-output.json`` (command, resolved inputs, pid, host, time, version) into ``folder``."""
    write_json_atomic(Path(folder) / MARKER_FILE, {
        "format": MARKER_FORMAT, "command": command, "inputs": [str(_resolve(i)) for i in inputs if str(i)],
        "moecpt_version": __version__, "host": socket.gethostname(), "pid": os.getpid(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })


def check_writable_parent(path: str | Path, flag: str = "--out") -> None:
    """Fail early when ``path`` could not be created: its nearest existing ancestor must be a writable folder.

    Raises:
        MoecptError: the ancestor is a file, or not writable (read-only file system, permissions).
    """
    p = _resolve(path)
    anc = p if p.exists() else p.parent
    while not anc.exists():
        anc = anc.parent
    if not anc.is_dir():
        raise MoecptError(f"{flag} {str(path)!r}: {str(anc)!r} is a file, so no folder can be made below it")
    if not os.access(anc, os.W_OK | os.X_OK):
        ro = _read_only_fs(anc)
        why = "the file system is read-only" if ro else "you may not write there"
        raise MoecptError(f"{flag} {str(path)!r} cannot be written: {why} ({anc}); choose a writable {flag}")


def _read_only_fs(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def claim_folder(
    out: str | Path,
    command: str,
    inputs: Iterable[str | Path] = (),
    *,
    legacy: Callable[[Path], bool] | None = None,
    flag: str = "--out",
) -> Path:
    """Make ``out`` a folder of ``command``: create it, adopt it when empty, reuse it when already its own.

    Args:
        out: the output folder.
        command: e.g. ``"data prepare"``; a folder marked by another command is refused.
        inputs: paths the command reads (see :func:`check_outside_inputs`).
        legacy: proof for folders written before markers existed (e.g. "holds a moecpt run.json"); such a folder
            is adopted (marked) instead of refused.
        flag: the option that named ``out``, for messages.

    Returns:
        ``out`` as a :class:`Path`.

    Raises:
        MoecptError: ``out`` overlaps an input, is a file, is a non-empty folder moecpt cannot prove it made, is
            another command's folder, or cannot be written (named, with the cause).
    """
    inputs = list(inputs)
    out = Path(out).expanduser()
    if check_claimable(out, command, inputs, legacy=legacy, flag=flag):
        return out
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_marker(out, command, inputs)
    except OSError as exc:
        raise MoecptError(os_error_line(exc, out)) from None
    return out


def check_claimable(
    out: str | Path,
    command: str,
    inputs: Iterable[str | Path] = (),
    *,
    legacy: Callable[[Path], bool] | None = None,
    flag: str = "--out",
) -> bool:
    """The checks of :func:`claim_folder`, writing nothing (``--dry-run``): True when ``out`` is already
    ``command``'s folder, False when it would be created or adopted.

    Raises:
        MoecptError: as :func:`claim_folder`.
    """
    inputs = list(inputs)
    out = Path(out).expanduser()
    check_outside_inputs(out, inputs, flag)
    if out.exists() and not out.is_dir():
        raise MoecptError(f"{flag} {str(out)!r} is a file; give a folder path")
    if out.is_dir():
        marker = read_marker(out)
        if marker is not None:
            if marker.get("command") != command:
                raise MoecptError(
                    f"{flag} {str(out)!r} holds the output of `moecpt {marker.get('command')}`, not of "
                    f"`moecpt {command}`; choose a new {flag}"
                )
            return True
        if not (legacy is not None and legacy(out)):
            try:  # moecpt's own marker / lock of a process starting at this very moment do not count
                non_empty = any(not p.name.startswith(".moecpt") for p in out.iterdir())
            except OSError as exc:
                raise MoecptError(os_error_line(exc, out, "read")) from None
            if non_empty:
                raise MoecptError(
                    f"{flag} {str(out)!r} is not empty and was not made by moecpt, so moecpt will not write "
                    f"into it; choose a new or empty {flag}"
                )
    check_writable_parent(out, flag)
    return False


def check_new_output(out: str | Path, inputs: Iterable[str | Path] = (), flag: str = "--out") -> Path:
    """For outputs published in one rename (import-hf, export-hf): ``out`` must not exist, must not overlap an
    input and its parent must be writable. Returns ``out`` as a :class:`Path`.

    Raises:
        MoecptError: ``out`` exists, overlaps an input, or cannot be created.
    """
    out = Path(out).expanduser()
    check_outside_inputs(out, inputs, flag)
    if out.exists() or out.is_symlink():
        raise MoecptError(f"{flag} {str(out)!r} already exists; moecpt never overwrites it: choose a new {flag}")
    check_writable_parent(out, flag)
    return out


def check_file_output(out: str | Path, signature: bytes, inputs: Iterable[str | Path] = (),
                      flag: str = "--out") -> Path:
    """For single-file outputs: refuse to overwrite a file that does not carry ``signature`` (in its first or last
    64 KiB, e.g. a PNG ``Software`` text chunk, a PDF ``Creator``), an input, or a path whose folder cannot be
    written.

    Raises:
        MoecptError: as above, naming the file.
    """
    out = Path(out).expanduser()
    check_outside_inputs(out, inputs, flag)
    if out.is_dir():
        raise MoecptError(f"{flag} {str(out)!r} is a folder; give a file name")
    if out.exists():
        if signature not in _head_and_tail(out):
            raise MoecptError(
                f"{flag} {str(out)!r} exists and was not written by moecpt; it is left alone: choose another name"
            )
    check_writable_parent(out.parent if out.exists() else out, flag)
    return out


def _head_and_tail(path: Path, n: int = 1 << 16) -> bytes:
    """The first and last ``n`` bytes of a file (PDF keeps its ``Creator`` at the end)."""
    try:
        with open(path, "rb") as f:
            head = f.read(n)
            f.seek(max(0, os.fstat(f.fileno()).st_size - n))
            return head + f.read(n)
    except OSError as exc:
        raise MoecptError(os_error_line(exc, path, "read")) from None


LEDGER_FILE = ".moecpt-files.json"


class FileLedger:
    """The files with fixed names moecpt writes into a claimed folder (a study's ``report.md``, ``study.json``,
    ``plots/*.png``), each with the sha256 of what was written: proof, file by file, that replacing it loses
    nothing of the user's. A file that exists under such a name but is not in the ledger, or was edited since, is
    refused (:meth:`check_replaceable`).

    Args:
        folder: a folder already claimed with :func:`claim_folder`.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.path = self.folder / LEDGER_FILE
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raw = {}
        self.files: dict[str, str] = raw.get("files", {}) if isinstance(raw, dict) else {}

    def _rel(self, path: Path) -> str:
        return str(Path(path).resolve(strict=False).relative_to(self.folder.resolve(strict=False)))

    @staticmethod
    def _sha(path: Path) -> str:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()

    def owns(self, path: str | Path) -> bool:
        """Whether ``path`` is missing or holds exactly what moecpt last wrote there."""
        p = Path(path)
        if not p.exists():
            return True
        return p.is_file() and self.files.get(self._rel(p)) == self._sha(p)

    def check_replaceable(self, *paths: str | Path) -> None:
        """Raise :class:`MoecptError` naming the first path that exists and is not moecpt's own unedited file."""
        for p in paths:
            if not self.owns(p):
                raise MoecptError(
                    f"{p} exists and is not the file moecpt wrote there (yours, or edited since); moecpt will not "
                    "replace it: move it away, then run the same command again"
                )

    def record(self, *paths: str | Path) -> None:
        """Remember the current content of ``paths`` as moecpt's (call right after writing them)."""
        for p in paths:
            self.files[self._rel(Path(p))] = self._sha(Path(p))
        write_json_atomic(self.path, {"format": "moecpt-files", "files": self.files})

    def remove(self, path: str | Path) -> None:
        """Delete ``path`` if it is moecpt's own unedited file (else leave it, unrecorded)."""
        p = Path(path)
        if p.exists() and self.owns(p):
            p.unlink()
            self.files.pop(self._rel(p), None)
            write_json_atomic(self.path, {"format": "moecpt-files", "files": self.files})
