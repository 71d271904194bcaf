"""Sharded (DCP) checkpoints: every rank writes its own shard; atomic publish; resharding load; consolidation.

Layout (``docs/distributed.md``, "Checkpoints")::

    RUN/checkpoints/step_00000123/
        dcp/.metadata          global shapes / dtypes and where each shard lies (torch.distributed.checkpoint)
        dcp/__<rank>_0.distcp  rank <rank>'s shards of the parameters, buffers and optimizer tensors
        optimizer_rest.pt      param groups (FQN lists, hyper-parameters), non-tensor optimizer state, the sync marker
        rng.pt                 every rank's RNG state (as the single-file layout)
        meta.json              step, tokens, sampler, config... and the manifest: layout "dcp", every file's size
                               and sha256 (each shard hashed by the rank that wrote it)

Atomicity follows :mod:`moecpt.train.checkpoint` (rule C5): rank 0 creates ``step_X.tmp-<pid>-<rand>``, every rank
writes its shard into it (DCP writes ``.metadata`` only once all shards are written), each rank hashes its own
shard, rank 0 writes the remaining files and the manifest and renames the folder to its final name. A job killed
midway leaves a temp folder only; a shard damaged later fails its manifest check, so the trainer moves the
checkpoint aside and resumes from the previous one, exactly as for the single-file layout. ``--out`` must be on a
file system every rank sees (as for any multi-node checkpoint).

Under FSDP2 ``get_state_dict`` already returns DTensors (each rank's shards of global tensors). A strategy whose
ranks hold plain tensors that are slices of global ones (expert parallelism: ``E / N`` experts per rank) passes a
``global_view`` that wraps those slices as DTensors sharing their storage, so DCP writes each slice once, records the
global shape, and on load reads into each rank's slice whatever layout wrote it.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from moecpt.errors import MoecptError
from moecpt.storage.atomic import dumps_json, fsync_dir, publish_dir, temp_name
from moecpt.storage.outputs import check_new_output, os_error_line, read_marker, write_marker
from moecpt.train.checkpoint import (
    CHECKPOINTS_DIR,
    LAYOUT_DCP,
    MANIFEST_KEY,
    OPTIMIZER_REST_FILE,
    Checkpoint,
    _check_weights_only_safe,
    _file_entry,
    _prepare_tensors,
    _publish,
    _save_failure,
    _step_of,
    _write_model_file,
    _write_state_files,
    load_checkpoint,
    run_tokenizer_path,
)
from moecpt.train.dcp_io import DCP_DIR, METADATA_FILE, load_sharded, save_sharded, split_optimizer_state

__all__ = ["CONSOLIDATE_COMMAND", "consolidate_checkpoint", "load_sharded_checkpoint", "save_sharded_checkpoint"]

CONSOLIDATE_COMMAND = "checkpoint consolidate"

#: ``(model_state, optimizer_tensors) -> (model_state, optimizer_tensors)``: this rank's tensors as DCP must see them
#: (DTensors over the global shapes where a rank holds a slice), sharing storage with the inputs so that a load fills
#: the inputs in place (``moecpt.train.parallel.SingleSync.dcp_global_view``)
GlobalView = Callable[[dict, dict], tuple[dict, dict]]


def _as_is(model_state: dict, optim_tensors: dict) -> tuple[dict, dict]:
    return model_state, optim_tensors


def _group() -> tuple[int, int]:
    """``(rank, world size)`` of the default process group (``(0, 1)`` when none)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _from_rank0(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (``obj`` itself without a process group)."""
    if _group()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _to_rank0(obj: Any) -> list[Any] | None:
    """Every rank's ``obj``, on rank 0 (None elsewhere)."""
    rank, world = _group()
    if world == 1:
        return [obj]
    out: list[Any] | None = [None] * world if rank == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


# ----------------------------------------------------------------------------------------------------- saving
def save_sharded_checkpoint(
    path: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    meta: Mapping[str, Any] | None,
    rng_state: dict | None,
    optimizer_extra: dict | None = None,
    global_view: GlobalView = _as_is,
) -> Path:
    """Write the DCP checkpoint folder ``path`` atomically (module doc). A collective: every rank of the default
    process group calls it (a single process may too: it writes one shard).

    Args:
        path: ``RUN/checkpoints/step_X``.
        model / optimizer: this rank's (FSDP2-sharded, or plain) model and optimizer.
        meta: rank 0's meta (as :func:`moecpt.train.checkpoint.save_checkpoint`); ignored on other ranks.
        rng_state: rank 0's RNG record (every rank's states under ``"ranks"``); ignored on other ranks.
        optimizer_extra: extra top-level keys of the optimizer state (the sync strategy's marker), rank 0's.
        global_view: how this rank's tensors lie in the global ones (:data:`GlobalView`; as they are by default).

    Raises:
        MoecptError (on every rank): ``path`` exists, a shard is not visible to rank 0 (``--out`` not on a shared
            file system), the disk is full or the folder unwritable; nothing is published then.
        TypeError / ValueError: a meta / RNG value that cannot be saved (on rank 0, before anything is written;
            the other ranks raise MoecptError quoting it).
    """
    path = Path(path)
    rank, _ = _group()
    plan: tuple[str, str] = ("ok", "")
    failure: BaseException | None = None
    if rank == 0:
        try:
            meta = _checked_meta(path, meta, rng_state, optimizer_extra)
            if path.exists():
                raise MoecptError(f"checkpoint {path} already exists; refusing to overwrite it (remove it, or write "
                                  "the run to a new folder)")
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.parent / temp_name(path.name)
            tmp.mkdir()
            plan = ("ok", str(tmp))
        except OSError as exc:
            failure = MoecptError(f"saving checkpoint {path}: {os_error_line(exc, path.parent)}")
        except Exception as exc:  # told to every rank first, so that none waits for a save that never starts
            failure = exc
        if failure is not None:
            plan = ("error", f"rank 0 could not start checkpoint {path}: {failure}")
    plan = _from_rank0(plan)
    if failure is not None:
        raise failure
    if plan[0] == "error":
        raise MoecptError(plan[1])
    tmp = Path(plan[1])
    try:
        model_state, optim_state = get_state_dict(model, optimizer)
        tensors, rest = split_optimizer_state(optim_state)
        model_state, tensors = global_view(model_state, tensors)
        save_sharded(str(tmp / DCP_DIR), model_state, tensors)  # a collective; raises on every rank on failure
        del model_state, optim_state, tensors
        mine = {f"{DCP_DIR}/{f.name}": _file_entry(f) for f in sorted((tmp / DCP_DIR).glob(f"__{rank}_*"))}
    except BaseException as exc:
        if rank == 0:
            error = _save_failure(exc, path, tmp)
            if error is not None:
                raise error from None
        raise
    hashed = _to_rank0(mine)
    outcome = None
    if rank == 0:
        try:
            outcome = _finish(path, tmp, hashed, meta, rest, optimizer_extra, rng_state)
        except BaseException as exc:
            error = _save_failure(exc, path, tmp)
            outcome = str(error) if error is not None else f"saving checkpoint {path}: {exc}"
            if _group()[1] == 1:
                raise error if error is not None else exc
    outcome = _from_rank0(outcome)
    if outcome is not None:
        raise MoecptError(outcome)
    return path


def _checked_meta(path: Path, meta: Mapping[str, Any] | None, rng_state: dict | None,
                  optimizer_extra: dict | None) -> dict:
    """Rank 0's meta with its step, after the checks :func:`~moecpt.train.checkpoint.save_checkpoint` makes before
    writing anything (reserved key, JSON-able, ``weights_only``-loadable RNG / optimizer extras)."""
    meta = dict(meta or {})
    if MANIFEST_KEY in meta:
        raise ValueError(f"meta key {MANIFEST_KEY!r} is reserved for the checkpoint manifest")
    meta["step"] = _step_of(path, meta)
    dumps_json(meta)
    for name, obj in (("rng_state", rng_state), ("optimizer_extra", optimizer_extra)):
        if obj is not None:
            _check_weights_only_safe(obj, name)
    return meta


def _finish(path: Path, tmp: Path, hashed: list[dict], meta: dict, rest: dict, optimizer_extra: dict | None,
            rng_state: dict | None) -> None:
    """Rank 0: check every rank's shard is here, write the small files and the manifest, publish."""
    files: dict[str, dict] = {}
    for r, entries in enumerate(hashed):
        for name, entry in entries.items():
            f = tmp / name
            if not f.is_file() or f.stat().st_size != entry["bytes"]:
                raise MoecptError(f"rank {r}'s shard {name} is not visible to rank 0 in {tmp}; the run folder must be "
                                  "on a file system every rank shares")
            files[name] = entry
    files[f"{DCP_DIR}/{METADATA_FILE}"] = _file_entry(tmp / DCP_DIR / METADATA_FILE)
    from_disk = {f"{DCP_DIR}/{f.name}" for f in (tmp / DCP_DIR).iterdir()}
    if from_disk - files.keys():
        files |= {n: _file_entry(tmp / n) for n in sorted(from_disk - files.keys())}
    opt_rest = {**rest, **(optimizer_extra or {})}
    _check_weights_only_safe(opt_rest, "optimizer_state")  # fail at save time, not at resume time
    fsync_dir(tmp / DCP_DIR)  # the shard files are fsynced by DCP; their folder's entries here
    _write_state_files(tmp, meta, {}, opt_rest, rng_state, hashed=files, optimizer_file=OPTIMIZER_REST_FILE,
                       layout=LAYOUT_DCP)
    _publish(tmp, path)


# ---------------------------------------------------------------------------------------------------- loading
def load_sharded_checkpoint(ck: Checkpoint, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                            global_view: GlobalView = _as_is) -> None:
    """Load a DCP checkpoint into this rank's (already FSDP2-wrapped, expert-sharded, or plain) ``model`` and
    ``optimizer``, at any world size and layout: each rank reads the part of every tensor its shard covers
    (``global_view`` says where its plain slices lie, as for :func:`save_sharded_checkpoint`). A collective like
    :func:`save_sharded_checkpoint`. ``optimizer=None`` (or a checkpoint without optimizer state): weights only.

    Raises:
        MoecptError: ``ck`` is not a DCP checkpoint, or its tensors do not fit the model / optimizer.
    """
    if not ck.sharded:
        raise MoecptError(f"{ck.path} is a single-file checkpoint; load it with Checkpoint.model_state()")
    rest = ck.optimizer_rest() if optimizer is not None else None
    folder = str(ck.path / DCP_DIR)
    if rest is None:
        model_state = get_model_state_dict(model)
        load_sharded(folder, *global_view(model_state, {"state": {}}))  # fills model_state in place
        set_model_state_dict(model, model_state)
        return
    model_state, optim_state = get_state_dict(model, optimizer)  # a fresh optimizer's state is materialised (zeros)
    tensors, _ = split_optimizer_state(optim_state)
    load_sharded(folder, *global_view(model_state, tensors))  # fills model_state and tensors in place
    loaded = {"state": {f: {**rest["state"].get(f, {}), **t} for f, t in tensors["state"].items()},
              "param_groups": rest["param_groups"]}
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=loaded)


# ------------------------------------------------------------------------------------------------ consolidate
def consolidate_checkpoint(source: str | Path, out: str | Path) -> Path:
    """Convert a DCP checkpoint to the single-file layout in the new folder ``out`` (a checkpoint folder that
    ``eval``, ``compare``, ``generate``, ``export-hf`` and :func:`moecpt.load_model` read; the run's
    ``tokenizer.json`` is copied in). Reads the model, writes it and frees it before reading the optimizer state,
    so it holds one of the two in memory at a time; published in one rename, marked as this command's output.

    Args:
        source: a DCP checkpoint folder, or a run folder (its newest complete checkpoint).
        out: the folder to create.

    Returns:
        ``out``. When ``out`` already is this command's consolidation of the very same checkpoint, it is returned
        as it is.

    Raises:
        MoecptError: ``source`` is not a checkpoint, is damaged, or is already single-file; ``out`` exists (and is
            not the same consolidation), lies inside an input or cannot be written.
    """
    ck = load_checkpoint(source)
    if not ck.sharded:
        raise MoecptError(f"{ck.path} is already a single-file checkpoint (model.safetensors); eval, generate and "
                          "export-hf read it as it is: nothing to consolidate")
    out = Path(out).expanduser()
    if out.is_dir() and _same_consolidation(out, ck):
        return out
    # the run the checkpoint belongs to is an input too: a folder inside it would be written into a user's run
    run = ck.path.parent.parent if ck.path.parent.name == CHECKPOINTS_DIR else ck.path
    check_new_output(out, inputs=[Path(source).expanduser(), ck.path, run], flag="--out")
    _refuse_inside_a_run(out)
    staging = out.parent / temp_name(out.name)
    try:
        staging.mkdir()
        tensors, aliases = _prepare_tensors(ck.model_state())
        _write_model_file(staging, tensors)
        del tensors
        opt = ck.optimizer_state()
        if opt is not None:
            _check_weights_only_safe(opt, "optimizer_state")
        meta = {**ck.meta, "consolidated_from": {"path": str(ck.path.resolve()), "content_sha256": ck.content_sha256}}
        _write_state_files(staging, meta, aliases, opt, ck.rng_state())
        del opt
        try:
            shutil.copyfile(run_tokenizer_path(ck), staging / "tokenizer.json")
        except MoecptError:
            pass  # a checkpoint without a tokenizer consolidates too; generate then says where to put one
        write_marker(staging, CONSOLIDATE_COMMAND, [ck.path])
        publish_dir(staging, out, "consolidation")
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise MoecptError(f"consolidating {ck.path}: {os_error_line(exc, staging)}") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _refuse_inside_a_run(out: Path) -> None:
    """Refuse an ``out`` inside any run's checkpoints folder: that run would resume from the consolidation as if it
    were its own newest checkpoint (another sync, world or model), with nothing to say it is not."""
    for folder in out.resolve().parents:
        if folder.name == CHECKPOINTS_DIR and (folder.parent / "run.json").is_file():
            raise MoecptError(f"--out {str(out)!r} is inside the checkpoints folder of the run {str(folder.parent)!r}, "
                              "which would resume from it as its own checkpoint; put the consolidation outside any "
                              "run's checkpoints/ folder")


def _same_consolidation(out: Path, ck: Checkpoint) -> bool:
    """Whether ``out`` is this command's complete consolidation of ``ck`` (same shard hashes)."""
    marker = read_marker(out)
    if marker is None or marker.get("command") != CONSOLIDATE_COMMAND:
        return False
    try:
        done = load_checkpoint(out, verify=False)
    except MoecptError:
        return False
    return (done.meta.get("consolidated_from") or {}).get("content_sha256") == ck.content_sha256
