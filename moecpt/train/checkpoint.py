"""Checkpoints: atomic save, verified load, retention, RNG capture.

Layout of a run folder (the single-file layout, ``train.checkpoint_format = "single"``)::

    RUN/checkpoints/step_00000123/
        model.safetensors   model state dict (buffers such as expert biases included); tied tensors stored once
        optimizer.pt        optimizer state dict (torch.save; loaded only with weights_only=True)
        rng.pt              python / numpy / torch CPU (+ current CUDA device) RNG states, tensors and plain values
        meta.json           the caller's meta (step, config, data-sampler state, lineage, metrics, ...) plus a
                            "_checkpoint" manifest: format, version, byte size and sha256 of every other file,
                            aliases of tied tensors

The sharded layout (``"dcp"``, written by :mod:`moecpt.train.checkpoint_dcp`, manifest ``layout = "dcp"``,
version 2) replaces the first two files by ``dcp/`` (``torch.distributed.checkpoint``: ``.metadata`` and one
``__<rank>_0.distcp`` per rank, model parameters and optimizer tensors) and ``optimizer_rest.pt`` (param groups and
non-tensor optimizer state); ``rng.pt`` and ``meta.json`` are as above, and the manifest lists and hashes every
shard. :class:`Checkpoint` reads both layouts (a DCP one as full tensors), so every command that takes a checkpoint
reads either.

What a checkpoint holds follows docs/design.md, rule C1. Saving is atomic (rule C5): everything is written into
``step_X.tmp-<pid>-<rand>`` next to the final folder, every file and the temp folder are fsynced, the folder is
renamed to its final name and the parent is fsynced. A killed writer leaves only a ``*.tmp-*`` folder, which
readers ignore and :class:`CheckpointManager` removes once its writer process is gone. A final-named folder is
therefore complete unless it was damaged later; the manifest lets :func:`load_checkpoint` detect that (truncation,
flipped bytes) and say so.

Nothing is unpickled beyond what ``torch.load(weights_only=True)`` allows, so loading a checkpoint from an untrusted
source cannot execute code. :func:`save_checkpoint` checks up front that the optimizer and RNG states consist only
of such values, so a bad state fails at save time rather than at resume time.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import random
import re
import shutil
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from moecpt.config import ModelConfig, build_section
from moecpt.errors import MoecptError
from moecpt.model.transformer import Transformer
from moecpt.storage.atomic import (
    apply_umask,
    dumps_json,
    fsync_dir,
    fsync_file,
    pid_alive,
    temp_name,
    write_bytes_atomic,
    write_json_atomic,
)
from moecpt.storage.outputs import os_error_line
from moecpt.train.dcp_io import (
    DCP_DIR,
    MODEL_PREFIX,
    OPTIM_PREFIX,
    fill_tensors,
    index_keyed,
    join_optimizer_state,
    lookup_in,
    read_full,
)

__all__ = [
    "Checkpoint",
    "CheckpointManager",
    "capture_rng_state",
    "checkpoint_dir_name",
    "load_checkpoint",
    "load_model",
    "restore_rng_state",
    "save_checkpoint",
    "write_bytes_atomic",
    "write_json_atomic",
]

FORMAT = "moecpt-checkpoint"
#: the newest manifest version this moecpt reads: 1 = single-file layout, 2 = the sharded (DCP) layout
FORMAT_VERSION = 2
SINGLE_VERSION = 1
MANIFEST_KEY = "_checkpoint"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng.pt"
META_FILE = "meta.json"
OPTIMIZER_REST_FILE = "optimizer_rest.pt"
LAYOUT_SINGLE = "single"
LAYOUT_DCP = "dcp"
CHECKPOINTS_DIR = "checkpoints"

_STEP_RE = re.compile(r"^step_(\d+)$")
_TMP_RE = re.compile(r"\.tmp-(\d+)-[0-9a-zA-Z]+$")


def checkpoint_dir_name(step: int) -> str:
    """``step_00000123``: zero-padded so that names sort by step."""
    return f"step_{int(step):08d}"


# ------------------------------------------------------------------------------------------------- the loaded view
@dataclass
class Checkpoint:
    """A verified checkpoint folder. Tensors are read lazily by the accessors.

    Attributes:
        path: the checkpoint folder.
        step: optimizer steps taken when it was saved (``meta["step"]``).
        meta: the caller's meta dict as saved (the manifest stripped).
        manifest: format, version, file sizes / sha256 and tied-tensor aliases.
    """

    path: Path
    step: int
    meta: dict
    manifest: dict = field(default_factory=dict, repr=False)

    @property
    def layout(self) -> str:
        """:data:`LAYOUT_SINGLE` (``model.safetensors``) or :data:`LAYOUT_DCP` (``dcp/`` shards)."""
        return str(self.manifest.get("layout", LAYOUT_SINGLE))

    @property
    def sharded(self) -> bool:
        return self.layout == LAYOUT_DCP

    @property
    def content_sha256(self) -> str | None:
        """A digest of the weights' bytes as saved: ``model.safetensors``'s sha256, or for a DCP checkpoint the
        sha256 of its shard files' hashes (in name order)."""
        files = self.manifest.get("files", {})
        if not self.sharded:
            return files.get(MODEL_FILE, {}).get("sha256")
        shards = sorted((n, f["sha256"]) for n, f in files.items() if n.startswith(f"{DCP_DIR}/"))
        return hashlib.sha256(json.dumps(shards).encode()).hexdigest()

    def model_state(self, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """The model state dict on ``device`` (full tensors; a DCP checkpoint's shards are assembled in this
        process, needing no process group); tied names map to the same tensor object.

        Raises:
            MoecptError: ``model.safetensors`` (or a shard) is missing or unreadable.
        """
        if self.sharded:
            return {k: v.to(device) for k, v in read_full(str(self.path / DCP_DIR), MODEL_PREFIX).items()}
        f = self.path / MODEL_FILE
        if not f.is_file():
            raise MoecptError(f"checkpoint {self.path} has no {MODEL_FILE}; it is incomplete, use another checkpoint")

        try:
            state = load_file(str(f), device=str(device))
        except MoecptError:
            raise
        except Exception as exc:  # safetensors raises its own SafetensorError; keep the one-line contract
            raise MoecptError(
                f"checkpoint {self.path}: {MODEL_FILE} is unreadable ({_one_line(exc)}); it is corrupted, "
                "use another checkpoint"
            ) from None
        for alias, canonical in self.manifest.get("aliases", {}).items():
            state[alias] = state[canonical]
        return state

    def load_into(self, model: torch.nn.Module) -> None:
        """Copy the weights into ``model`` (strict: the same names and shapes), one tensor at a time, so the peak
        is the model plus its largest tensor rather than twice the model (a DCP checkpoint is assembled whole, as
        :meth:`model_state` does). The file is opened anew for each tensor: ``safe_open`` memory-maps it, and
        pages it has touched stay in the process's resident set until the map is closed.

        Raises:
            MoecptError: the file is missing or unreadable; names or shapes that do not fit ``model``.
        """
        if self.sharded:
            _load_strict(model, self.model_state(), self.path)
            return
        f = self.path / MODEL_FILE
        if not f.is_file():
            raise MoecptError(f"checkpoint {self.path} has no {MODEL_FILE}; it is incomplete, use another checkpoint")
        aliases = self.manifest.get("aliases", {})
        targets = model.state_dict(keep_vars=True)
        try:
            with safe_open(str(f), framework="pt", device="cpu") as src:
                stored = set(src.keys())
            names = stored | {a for a, c in aliases.items() if c in stored}
            missing, unexpected = sorted(set(targets) - names), sorted(names - set(targets))
            if missing or unexpected:
                raise MoecptError(f"checkpoint {self.path} does not fit the model built from its model_config: "
                                  f"missing {missing[:5]}, unexpected {unexpected[:5]}")
            with torch.no_grad():
                for name, dst in targets.items():
                    with safe_open(str(f), framework="pt", device="cpu") as src:
                        t = src.get_tensor(aliases.get(name, name))
                    if tuple(t.shape) != tuple(dst.shape):
                        raise MoecptError(f"checkpoint {self.path}: {name} has shape {list(t.shape)}, the model "
                                          f"built from its model_config has {list(dst.shape)}")
                    dst.copy_(t)
                    del t
        except MoecptError:
            raise
        except Exception as exc:  # safetensors raises its own SafetensorError; keep the one-line contract
            raise MoecptError(f"checkpoint {self.path}: {MODEL_FILE} is unreadable ({_one_line(exc)}); it is "
                              "corrupted, use another checkpoint") from None

    def optimizer_state(self) -> dict | None:
        """The optimizer state dict (tensors on CPU; ``Optimizer.load_state_dict`` moves them), or ``None`` if the
        checkpoint holds none. Its param-group LRs are stale by design: the trainer sets the LR from the schedule.

        A DCP checkpoint's state is assembled from its shards and ``optimizer_rest.pt`` into the same index-keyed
        form ``optimizer.pt`` holds.

        Raises:
            MoecptError: unreadable file, or one holding objects ``weights_only`` loading refuses.
        """
        if not self.sharded:
            return self._torch_file(OPTIMIZER_FILE)
        rest = self.optimizer_rest()
        if rest is None:
            return None
        tensors = read_full(str(self.path / DCP_DIR), OPTIM_PREFIX)
        state = index_keyed(join_optimizer_state(tensors, rest))
        # the sync strategy's tensors (islands' outer and inner states) lie in the DCP folder, referred to by its
        # marker: put back, this is the very state the single-file layout holds
        extra = fill_tensors({k: v for k, v in rest.items() if k not in ("state", "param_groups")},
                             lookup_in(tensors))
        return {**state, **extra}

    def optimizer_rest(self) -> dict | None:
        """A DCP checkpoint's non-tensor optimizer state (FQN-keyed param groups, non-tensor entries, the sync
        strategy's marker); ``None`` for a single-file checkpoint or one without optimizer state."""
        return self._torch_file(OPTIMIZER_REST_FILE) if self.sharded else None

    def optimizer_entry(self, key: str) -> Any:
        """One top-level entry of the optimizer state (e.g. the sync strategy's own state), or ``None``, read
        without loading the state's tensors: ``optimizer.pt`` is memory-mapped, and of a DCP checkpoint only
        ``optimizer_rest.pt`` is read. Cheap enough to check a resume before the run folder is touched.

        Raises:
            MoecptError: unreadable file, or one holding objects ``weights_only`` loading refuses.
        """
        state = self.optimizer_rest() if self.sharded else self._torch_file(OPTIMIZER_FILE, mmap=True)
        return state.get(key) if isinstance(state, dict) else None

    def rng_state(self) -> dict | None:
        """The RNG state as captured by :func:`capture_rng_state`, or ``None`` if the checkpoint holds none."""
        return self._torch_file(RNG_FILE)

    def _torch_file(self, name: str, mmap: bool = False) -> Any:
        f = self.path / name
        if not f.is_file():
            return None
        try:
            return torch.load(f, map_location="cpu", weights_only=True, mmap=mmap)
        except Exception as exc:
            raise MoecptError(
                f"checkpoint {self.path}: {name} cannot be loaded safely ({_one_line(exc)}); it is corrupted or "
                "holds arbitrary Python objects"
            ) from None


# --------------------------------------------------------------------------------------------------------- saving
def save_checkpoint(
    path: str | Path,
    *,
    model_state: Mapping[str, torch.Tensor],
    meta: Mapping[str, Any],
    optimizer_state: dict | None = None,
    rng_state: dict | None = None,
) -> Path:
    """Write a checkpoint folder atomically (see the module doc) and return its path.

    Args:
        path: the checkpoint folder to create, e.g. ``RUN/checkpoints/step_00000123``.
        model_state: name -> tensor (any device / dtype; non-contiguous and tied tensors are handled).
        meta: JSON-able dict (paths, enums, numpy scalars and pydantic models are converted). ``meta["step"]`` is
            the step; if absent it is taken from a ``step_<n>`` folder name.
        optimizer_state: ``optimizer.state_dict()``; tensors and plain Python values only.
        rng_state: usually :func:`capture_rng_state`.

    Raises:
        MoecptError: ``path`` exists and is not an identical checkpoint (never overwritten; saving the very same
            tensors again returns the existing path), or another writer created it concurrently.
        TypeError / ValueError: a non-tensor in ``model_state``, a non-JSON meta value, a state that
            ``weights_only`` loading would refuse, or no step.
    """
    path = Path(path)
    meta = dict(meta)
    if MANIFEST_KEY in meta:
        raise ValueError(f"meta key {MANIFEST_KEY!r} is reserved for the checkpoint manifest")
    meta["step"] = _step_of(path, meta)
    dumps_json(meta)  # fail on a non-JSON value before writing gigabytes
    for name, obj in (("optimizer_state", optimizer_state), ("rng_state", rng_state)):
        if obj is not None:
            _check_weights_only_safe(obj, name)
    tensors, aliases = _prepare_tensors(model_state)

    parent = path.parent
    parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not path.is_dir():
        raise MoecptError(f"{path} exists and is a file; refusing to overwrite it with a checkpoint")
    tmp = parent / temp_name(path.name)
    tmp.mkdir()
    try:
        _write_model_file(tmp, tensors)
        del tensors
        files = _write_state_files(tmp, meta, aliases, optimizer_state, rng_state)
        if path.exists():
            _accept_existing(path, files)
            shutil.rmtree(tmp, ignore_errors=True)
            return path
        _publish(tmp, path)
    except BaseException as exc:
        error = _save_failure(exc, path, tmp)
        if error is None:
            raise
        raise error from None
    return path


def _write_model_file(tmp: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write ``model.safetensors`` into the temp folder ``tmp`` and fsync it."""
    # One metadata key only: safetensors writes metadata in hash-map order, and a byte-identical file for
    # identical tensors is what lets a repeated save of the same step be recognised (aliases live in meta.json).
    save_file(tensors, str(tmp / MODEL_FILE), metadata={"format": "pt"})
    apply_umask(tmp / MODEL_FILE)
    fsync_file(tmp / MODEL_FILE)


def _write_state_files(
    tmp: Path,
    meta: Mapping[str, Any],
    aliases: dict,
    optimizer_state: dict | None,
    rng_state: dict | None,
    *,
    hashed: Mapping[str, dict] | None = None,
    optimizer_file: str = OPTIMIZER_FILE,
    layout: str = LAYOUT_SINGLE,
) -> dict[str, dict]:
    """Write the optimizer / RNG files (those given) and ``meta.json`` with its manifest into ``tmp``, fsync every
    file and the folder, and return the manifest's ``files`` entry (name -> bytes and sha256).

    ``hashed``: files already in ``tmp`` with their entries (a DCP save: each rank hashed its own shard); by default
    the model file, which must already be in ``tmp``, hashed here. ``layout``: recorded in the manifest (the
    sharded layout is manifest version 2, so an older moecpt says to upgrade instead of missing the model file)."""
    files = dict(hashed) if hashed is not None else {MODEL_FILE: _file_entry(tmp / MODEL_FILE)}
    for name, obj in ((optimizer_file, optimizer_state), (RNG_FILE, rng_state)):
        if obj is not None:
            with open(tmp / name, "wb") as f:
                torch.save(obj, f)
                f.flush()
                os.fsync(f.fileno())
            files[name] = _file_entry(tmp / name)
    manifest = {
        "format": FORMAT,
        "version": SINGLE_VERSION if layout == LAYOUT_SINGLE else FORMAT_VERSION,
        **({} if layout == LAYOUT_SINGLE else {"layout": layout}),
        "files": files,
        "aliases": aliases,
        "saved_unix": time.time(),
        "torch": torch.__version__,
    }
    with open(tmp / META_FILE, "wb") as f:
        f.write(dumps_json({**meta, MANIFEST_KEY: manifest}))
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(tmp)
    return files


def _file_entry(path: Path) -> dict:
    """The manifest entry of one written file: byte size and sha256."""
    return {"bytes": path.stat().st_size, "sha256": _sha256(path)}


def _publish(tmp: Path, path: Path) -> None:
    """Rename the complete temp folder ``tmp`` to its final name ``path`` and fsync the parent.

    Raises:
        MoecptError: another writer created ``path`` after the caller's check.
    """
    try:
        os.rename(tmp, path)
    except OSError as exc:  # another writer created `path` after our check
        raise MoecptError(
            f"checkpoint {path} was created by another writer while saving ({exc.strerror}); "
            "only one process may write a run's checkpoints"
        ) from None
    fsync_dir(path.parent)


def _save_failure(exc: BaseException, path: Path, tmp: Path) -> MoecptError | None:
    """Clean up after a failed save of ``path`` (removes the temp folder ``tmp``) and return the one-line error to
    raise instead of ``exc``, or ``None`` when ``exc`` itself should propagate."""
    full = _disk_nearly_full(path.parent)
    shutil.rmtree(tmp, ignore_errors=True)
    if isinstance(exc, OSError):
        return MoecptError(f"saving checkpoint {path}: {os_error_line(exc, tmp)}")
    if full and (isinstance(exc, (RuntimeError, ValueError)) or "SafetensorError" in type(exc).__name__):
        # torch.save / safetensors report a full disk as "unexpected pos ..." or an I/O error of their own
        return MoecptError(f"cannot write checkpoint {path}: the disk is full ({_one_line(exc)}); free some "
                           "space and run the same command again (nothing of this save is left; earlier checkpoints "
                           "are intact)")
    return None


def _disk_nearly_full(path: Path) -> bool:
    try:
        return shutil.disk_usage(path).free < (64 << 20)
    except OSError:
        return False


def _step_of(path: Path, meta: Mapping[str, Any]) -> int:
    if "step" in meta:
        step = meta["step"]
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"meta['step']={step!r} must be a non-negative int")
        return int(step)
    m = _STEP_RE.match(path.name)
    if m is None:
        raise ValueError(f"meta has no 'step' and the folder name {path.name!r} is not step_<n>")
    return int(m.group(1))


def _prepare_tensors(
    model_state: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """CPU, contiguous tensors that each own their storage (what safetensors requires), plus ``alias -> canonical``
    for names that are the very same view (tied embeddings); other storage sharing is broken by cloning."""
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, t in model_state.items():
        if not isinstance(name, str):
            raise TypeError(f"model_state key {name!r} is not a str")
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"model_state[{name!r}] is a {type(t).__name__}, not a tensor; only tensors are saved")
        t = t.detach()
        if t.numel() > 0:
            view = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
            if view in seen:
                aliases[name] = seen[view]
                continue
            seen[view] = name
        unique[name] = t
    cpu_storages = collections.Counter(
        t.untyped_storage().data_ptr() for t in unique.values() if t.device.type == "cpu" and t.numel() > 0
    )
    out: dict[str, torch.Tensor] = {}
    for name, t in unique.items():
        if t.device.type != "cpu":
            out[name] = t.to("cpu").contiguous()  # a fresh storage of its own
            continue
        owns = (
            t.is_contiguous()
            and t.storage_offset() == 0
            and t.untyped_storage().nbytes() == t.numel() * t.element_size()
            and cpu_storages[t.untyped_storage().data_ptr()] <= 1
        )
        out[name] = t if owns else t.clone(memory_format=torch.contiguous_format)
    return out, aliases


_SAFE_LEAVES = (str, int, float, bool, complex, bytes, type(None), torch.dtype, torch.device, torch.Size)


def _check_weights_only_safe(obj: Any, where: str) -> None:
    """Raise TypeError naming the first value ``torch.load(weights_only=True)`` would refuse.

    Exact types on purpose: ``np.float64`` is a ``float`` subclass that pickles through numpy and fails to load.
    """
    kind = type(obj)
    if kind in _SAFE_LEAVES or kind in (torch.Tensor, torch.nn.Parameter):
        return
    if kind in (dict, collections.OrderedDict):
        for k, v in obj.items():
            _check_weights_only_safe(k, f"{where} key")
            _check_weights_only_safe(v, f"{where}[{k!r}]")
        return
    if kind in (list, tuple):
        for i, v in enumerate(obj):
            _check_weights_only_safe(v, f"{where}[{i}]")
        return
    raise TypeError(
        f"{where} is a {kind.__module__}.{kind.__qualname__}; checkpoints hold only tensors, dicts, lists, tuples "
        "and plain Python scalars so that they load with weights_only=True (convert it, e.g. .item() / .tolist())"
    )


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _accept_existing(path: Path, files: dict) -> None:
    try:
        manifest = _read_meta(path)[1]
    except MoecptError as exc:
        raise MoecptError(
            f"{path} already exists and is not a valid checkpoint ({exc}); refusing to overwrite it: remove it"
        ) from None
    old = {k: v.get("sha256") for k, v in manifest.get("files", {}).items()}
    new = {k: v["sha256"] for k, v in files.items()}
    if old != new:
        raise MoecptError(
            f"checkpoint {path} already exists with different contents; refusing to overwrite it "
            "(remove it, or write the run to a new folder)"
        )


# -------------------------------------------------------------------------------------------------------- loading
def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


def _read_meta(ckpt_dir: Path) -> tuple[dict, dict]:
    """``(user meta, manifest)`` of a checkpoint folder; MoecptError if it is not a readable moecpt checkpoint."""
    f = ckpt_dir / META_FILE
    if not f.is_file():
        raise MoecptError(f"{ckpt_dir} has no {META_FILE}; it is not a (complete) moecpt checkpoint")
    try:
        raw = json.loads(f.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MoecptError(f"checkpoint {ckpt_dir}: {META_FILE} is corrupted ({_one_line(exc)})") from None
    manifest = raw.get(MANIFEST_KEY) if isinstance(raw, dict) else None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise MoecptError(f"{ckpt_dir} is not a moecpt checkpoint ({META_FILE} has no {MANIFEST_KEY!r} manifest)")
    if int(manifest.get("version", 0)) > FORMAT_VERSION:
        raise MoecptError(
            f"checkpoint {ckpt_dir} has format version {manifest['version']}, newer than this moecpt reads "
            f"({FORMAT_VERSION}); upgrade moecpt"
        )
    meta = {k: v for k, v in raw.items() if k != MANIFEST_KEY}
    return meta, manifest


def _check_files(ckpt_dir: Path, manifest: dict, *, hashes: bool) -> None:
    for name, info in manifest.get("files", {}).items():
        f = ckpt_dir / name
        if not f.is_file():
            raise MoecptError(f"checkpoint {ckpt_dir}: {name} is missing; the checkpoint is incomplete")
        size, want = f.stat().st_size, int(info["bytes"])
        if size != want:
            what = "truncated" if size < want else "longer than saved"
            raise MoecptError(
                f"checkpoint {ckpt_dir}: {name} is {what} ({size} of {want} bytes); it was damaged after saving, "
                "use another checkpoint"
            )
        if hashes and _sha256(f) != info["sha256"]:
            raise MoecptError(
                f"checkpoint {ckpt_dir}: {name} is corrupted (sha256 differs from the manifest); "
                "use another checkpoint"
            )


def _is_complete(ckpt_dir: Path) -> bool:
    """Cheap completeness test (final name, manifest, file sizes); hashes are checked when loading."""
    try:
        _, manifest = _read_meta(ckpt_dir)
        _check_files(ckpt_dir, manifest, hashes=False)
    except (MoecptError, OSError, KeyError, ValueError, TypeError):
        return False
    return True


def _step_dirs(ckpt_root: Path) -> list[tuple[int, Path]]:
    if not ckpt_root.is_dir():
        return []
    out = []
    for p in ckpt_root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p))
    return sorted(out)


def _where_the_runs_are(folder: Path) -> str:
    """How to go on from a folder that holds no checkpoint: a study folder's first run folders (only a folder with
    a ``study.json`` is searched, so a stray path such as ``~`` is never walked), else what to give."""
    if folder.is_dir() and (folder / "study.json").is_file():
        runs = sorted(d.parent for d in (folder / "runs").rglob(CHECKPOINTS_DIR) if d.is_dir())[:3]
        if runs:
            more = ", ..." if len(runs) == 3 else ""
            return f"it is a study folder; give one of its runs, e.g. {', '.join(map(str, runs))}{more}"
    return "give a run folder (the --out of pretrain / cpt) or one of its checkpoints/step_N folders"


def load_checkpoint(path: str | Path, *, verify: bool = True, hint: bool = True) -> Checkpoint:
    """Open a checkpoint folder, or a run folder (its latest complete checkpoint), and verify it.

    Args:
        path: ``RUN/checkpoints/step_X``, ``RUN/checkpoints`` or ``RUN``.
        verify: also check every file's sha256 (reads each file once); sizes are always checked.
        hint: a damaged checkpoint folder's error says how to go on: restore the file, or the other complete
            checkpoints beside it (False: the trainer, which moves it aside itself).

    Raises:
        MoecptError: nothing there; an interrupted save's temp folder; not a moecpt checkpoint; a file missing,
            truncated or corrupted (e.g. a deleted DCP shard); a run folder without a complete checkpoint.
    """
    p = Path(path)
    if not p.exists():
        raise MoecptError(f"no checkpoint at {p}: the path does not exist")
    if p.is_file():
        if p.name in (META_FILE, MODEL_FILE, OPTIMIZER_FILE, RNG_FILE, OPTIMIZER_REST_FILE):
            p = p.parent
        else:
            raise MoecptError(f"{p} is a file; give a checkpoint folder (…/checkpoints/step_N) or a run folder")
    if _TMP_RE.search(p.name):
        raise MoecptError(f"{p} is the temp folder of an interrupted save, not a checkpoint; load the run folder")
    if p.name == DCP_DIR and (p.parent / META_FILE).is_file():  # the shard folder of a DCP checkpoint
        p = p.parent
    if not (p / META_FILE).exists():
        root = p / CHECKPOINTS_DIR if (p / CHECKPOINTS_DIR).is_dir() else p
        candidates = _step_dirs(root)
        complete = [d for _, d in candidates if _is_complete(d)]
        if candidates and (not complete or complete[-1] != candidates[-1][1]):
            # a damaged newest checkpoint must never be replaced by an older one behind the user's back
            newest = candidates[-1][1]
            older = f"give {complete[-1]} explicitly to use the newest intact one" if complete else \
                "no intact checkpoint is left"
            raise MoecptError(
                f"the newest checkpoint of {root}, {newest.name}, is incomplete or damaged; re-run the training "
                f"command to repair the run (it moves the damaged one aside and resumes), or {older}"
            )
        if complete:
            p = complete[-1]
        elif _STEP_RE.match(p.name):
            raise MoecptError(f"checkpoint {p} has no {META_FILE}; it is incomplete")
        else:
            raise MoecptError(f"{p} is not a moecpt checkpoint or run folder (no {META_FILE}, no "
                              f"{CHECKPOINTS_DIR}/step_N inside); {_where_the_runs_are(p)}")
    meta, manifest = _read_meta(p)
    try:
        _check_files(p, manifest, hashes=verify)
    except MoecptError as exc:
        if not _STEP_RE.match(p.name):
            raise
        if p == Path(path) or p == Path(path).parent:  # the folder itself (or its dcp/ shard folder) was given
            if not hint:
                raise
            raise MoecptError(f"{exc}{_how_to_go_on(p)}") from None
        raise MoecptError(f"{exc}; re-run the training command to repair the run (it moves the damaged "
                          "checkpoint aside and resumes), or give an older checkpoint folder explicitly") from None
    step = meta.get("step")
    if not isinstance(step, int):
        raise MoecptError(f"checkpoint {p}: {META_FILE} has no integer 'step'; it is not a moecpt checkpoint")
    return Checkpoint(path=p, step=step, meta=meta, manifest=manifest)


def _how_to_go_on(ckpt_dir: Path) -> str:
    """The end of a damaged checkpoint's error: restore the file, or load one of the (newest three) complete
    checkpoints beside it (sizes checked, not hashes)."""
    others = [d for _, d in _step_dirs(ckpt_dir.parent) if d != ckpt_dir and _is_complete(d)]
    if not others:
        return "; restore the file from a copy (no other complete checkpoint is beside it)"
    return f"; restore the file from a copy, or point at another checkpoint: {', '.join(map(str, others[-3:][::-1]))}"


def load_model(path: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Build the model a checkpoint (or a run folder's latest) was saved from, load its weights strictly and
    return it on ``device`` in eval mode. Needs ``meta["model_config"]`` (a ``ModelConfig`` dump).

    Raises:
        MoecptError: no readable checkpoint, no / invalid model_config, or weights that do not fit the model.
    """
    ckpt = load_checkpoint(path)
    raw = ckpt.meta.get("model_config")
    if not isinstance(raw, dict):
        raise MoecptError(f"checkpoint {ckpt.path} has no 'model_config' in {META_FILE}; it holds no moecpt model")
    model = Transformer(build_section(ModelConfig, raw, "model_config"))
    ckpt.load_into(model)  # streamed: the model once, not twice
    return model.to(device).eval()


def _load_strict(model: torch.nn.Module, state: Mapping[str, torch.Tensor], where: Path) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise MoecptError(
            f"checkpoint {where} does not fit the model built from its model_config: {_one_line(exc)}"
        ) from None


def run_tokenizer_path(ckpt: Checkpoint) -> Path:
    """The ``tokenizer.json`` of a checkpoint: the one beside it (``import-hf`` writes it there), else its run
    folder's (``RUN/checkpoints/step_N`` -> ``RUN/tokenizer.json``, which the trainer writes).

    Raises:
        MoecptError: neither exists.
    """
    for folder in (ckpt.path, ckpt.path.parent.parent):
        if (folder / "tokenizer.json").is_file():
            return folder / "tokenizer.json"
    raise MoecptError(f"no tokenizer.json next to {ckpt.path} or in its run folder; copy the run's tokenizer there")


# ------------------------------------------------------------------------------------------------------------ RNG
def capture_rng_state() -> dict:
    """Python, numpy (legacy global), torch CPU and, if CUDA is in use, the current CUDA device's RNG states.

    Only tensors and plain values, so it round-trips through ``torch.load(weights_only=True)``. Each rank of a
    distributed run has its own state; save one per rank if exact per-rank resumption matters.
    """
    version, internal, gauss_next = random.getstate()
    bit_gen, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {"version": int(version), "state": [int(x) for x in internal], "gauss_next": gauss_next},
        "numpy": {
            "bit_generator": str(bit_gen),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    # Only when CUDA is already initialised: asking earlier would create a context (and no RNG was drawn anyway).
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        dev = torch.cuda.current_device()
        state["cuda"] = {int(dev): torch.cuda.get_rng_state(dev)}
    return state


def restore_rng_state(state: dict) -> None:
    """Restore what :func:`capture_rng_state` captured; parts missing from ``state`` are left alone, and CUDA
    states are skipped on a machine without that device."""
    if "python" in state:
        py = state["python"]
        random.setstate((py["version"], tuple(int(x) for x in py["state"]), py["gauss_next"]))
    if "numpy" in state:
        n = state["numpy"]
        keys = np.asarray(n["keys"].cpu().numpy() if isinstance(n["keys"], torch.Tensor) else n["keys"], np.uint32)
        np.random.set_state((n["bit_generator"], keys, int(n["pos"]), int(n["has_gauss"]), float(n["cached_gaussian"])))
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        for dev, s in state["cuda"].items():
            if int(dev) < torch.cuda.device_count():
                torch.cuda.set_rng_state(s.cpu(), int(dev))


# -------------------------------------------------------------------------------------------------------- manager
class CheckpointManager:
    """Saves ``RUN/checkpoints/step_X`` folders and keeps the ``keep_last`` newest plus every step in
    ``keep_steps`` (milestones, e.g. the pre-anneal checkpoint of an infinite schedule).

    One process per run folder writes checkpoints (rank 0). Temp folders of dead writers on this host are
    removed by :meth:`latest` / :meth:`clean_stale_temp`; ones whose pid is alive are left alone.
    """

    def __init__(self, run_dir: str | Path, keep_last: int = 2, keep_steps: Iterable[int] = ()):
        if keep_last < 1:
            raise ValueError(f"keep_last={keep_last}; keep at least the newest checkpoint")
        self.run_dir = Path(run_dir)
        self.dir = self.run_dir / CHECKPOINTS_DIR
        self.keep_last = int(keep_last)
        self.keep_steps = frozenset(int(s) for s in keep_steps)

    def path_for(self, step: int) -> Path:
        return self.dir / checkpoint_dir_name(step)

    def save(self, step: int, **kwargs: Any) -> Path:
        """:func:`save_checkpoint` into ``path_for(step)`` (``meta["step"]`` set to ``step``), then :meth:`prune`.

        Raises:
            ValueError: ``meta["step"]`` disagrees with ``step``.
            MoecptError: as :func:`save_checkpoint`.
        """
        meta = dict(kwargs.pop("meta", None) or {})
        if meta.setdefault("step", int(step)) != int(step):
            raise ValueError(f"meta['step']={meta['step']} but save(step={step})")
        path = save_checkpoint(self.path_for(step), meta=meta, **kwargs)
        self.prune(protect=int(step))
        return path

    def step_folders(self) -> list[Path]:
        """Every final-named ``step_N`` folder, oldest first, complete or not (a final name means a save finished;
        an incomplete one was damaged afterwards)."""
        return [p for _, p in _step_dirs(self.dir)]

    def move_aside(self, path: Path) -> Path:
        """Rename a damaged checkpoint to ``step_N.damaged-<UTC time>`` (kept for inspection, never deleted, and
        no longer seen as a checkpoint); returns the new path."""
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        aside = path.with_name(f"{path.name}.damaged-{stamp}")
        n = 1
        while aside.exists():
            aside = path.with_name(f"{path.name}.damaged-{stamp}-{n}")
            n += 1
        os.rename(path, aside)
        fsync_dir(path.parent)
        return aside

    def all(self) -> list[Path]:
        """Complete checkpoints, oldest first (temp folders and incomplete ones excluded)."""
        return [p for _, p in _step_dirs(self.dir) if _is_complete(p)]

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or ``None``; removes stale temp folders first."""
        self.clean_stale_temp()
        found = self.all()
        return found[-1] if found else None

    def prune(self, protect: int | None = None) -> list[Path]:
        """Delete complete checkpoints other than the ``keep_last`` newest, ``keep_steps`` and ``protect``.
        Each is first renamed to a temp name, so a crash mid-deletion never leaves a half checkpoint under a
        final name. Returns the removed paths."""
        found = [(s, p) for s, p in _step_dirs(self.dir) if _is_complete(p)]
        keep = {s for s, _ in found[-self.keep_last:]} | self.keep_steps
        if protect is not None:
            keep.add(protect)
        removed = []
        for s, p in found:
            if s in keep:
                continue
            doomed = p.with_name(temp_name(p.name))
            os.rename(p, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
            removed.append(p)
        if removed:
            fsync_dir(self.dir)
        return removed

    def clean_stale_temp(self) -> list[Path]:
        """Remove ``*.tmp-<pid>-*`` folders whose writer process no longer runs on this host."""
        if not self.dir.is_dir():
            return []
        removed = []
        for p in self.dir.iterdir():
            m = _TMP_RE.search(p.name)
            if m and p.is_dir() and not pid_alive(int(m.group(1))):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
        return removed
