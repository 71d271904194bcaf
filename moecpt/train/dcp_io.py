"""``torch.distributed.checkpoint`` (DCP) reads and writes for sharded checkpoints, tensors only.

A DCP folder holds ``.metadata`` (the global shapes, dtypes and where each shard's bytes lie) and one
``__<rank>_0.distcp`` file per rank. Under FSDP2 each rank writes only its own shards of the parameters and AdamW
moments (``get_state_dict`` returns them as DTensors), so no rank ever holds the full model; replicated tensors
(AdamW's ``step``, buffers such as expert biases) are written once. Loading reads whatever part of each global
tensor the loading rank's shard covers, so a checkpoint saved at one world size resumes at another (resharding),
and a process without a process group can read full tensors (:func:`read_full`).

Two safety rules on top of DCP's defaults, because DCP unpickles freely. Nothing in moecpt calls ``torch.load``
without ``weights_only=True``, and no file a user gives is unpickled unrestricted:

* only tensors go into a DCP folder. DCP itself stores any other value (optimizer hyper-parameters, ``None``
  state entries) as a pickled "bytes" entry that its reader would unpickle without restriction; moecpt never
  writes one (those values travel in ``optimizer_rest.pt``, loaded with ``weights_only=True``:
  :func:`split_optimizer_state`), and :class:`SafeReader` refuses a checkpoint whose metadata lists one, before any
  of its data is read;
* ``.metadata`` (a pickle) is read by :class:`SafeReader`, whose unpickler admits only DCP's own metadata classes,
  ``torch.Size``, dtypes and paths, so an untrusted checkpoint cannot run code (as ``weights_only`` loading
  guarantees for the single-file format).
"""

from __future__ import annotations

import contextlib
import pickle
import warnings
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, StorageMeta

from moecpt.errors import MoecptError

#: the sub-folder of a checkpoint holding the DCP files
DCP_DIR = "dcp"
METADATA_FILE = ".metadata"
MODEL_PREFIX = "model"
OPTIM_PREFIX = "optim"

# what a DCP ``.metadata`` pickle may name (torch 2.6 - 2.13), by exact name: pickle resolves dotted names
# (``module`` + ``"os.system"`` reaches whatever the module imported), so allowing a whole module would allow anything
_META_CLASSES = {
    "torch.distributed.checkpoint.metadata": frozenset({
        "Metadata", "MetadataIndex", "ChunkStorageMetadata", "TensorStorageMetadata", "BytesStorageMetadata",
        "TensorProperties", "StorageMeta", "_MEM_FORMAT_ENCODING"}),
    "torch.distributed.checkpoint.filesystem": frozenset({"_StorageInfo"}),
    "torch.serialization": frozenset({"_get_layout"}),
    "torch": frozenset({"Size", "device", "layout", "memory_format"}),
    "pathlib": frozenset({"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "Path"}),
    "collections": frozenset({"OrderedDict"}),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        dtype = module == "torch" and "." not in name and isinstance(getattr(torch, name, None), torch.dtype)
        if not (dtype or name in _META_CLASSES.get(module, ())):
            raise pickle.UnpicklingError(f"refusing {module}.{name}")
        return super().find_class(module, name)


class SafeReader(FileSystemReader):
    """:class:`FileSystemReader` whose ``.metadata`` unpickler admits DCP's metadata types only (module doc).

    Raises:
        MoecptError: ``.metadata`` names anything else, is not a DCP metadata record, or lists a non-tensor entry.
    """

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self.fs.concat_path(self.path, METADATA_FILE)
        try:
            with self.fs.create_stream(path, "rb") as f:
                md = _MetadataUnpickler(f).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError) as exc:
            raise MoecptError(f"{path} is not a DCP metadata file moecpt reads safely ({exc})") from None
        if not isinstance(md, Metadata):
            raise MoecptError(f"{path} is not a DCP metadata file (it holds a {type(md).__name__})")
        bytes_keys = [k for k, v in md.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)]
        if bytes_keys:  # moecpt writes tensors only; DCP would unpickle such an entry without restriction
            raise MoecptError(f"{path} holds pickled values ({bytes_keys[0]!r}, ...); moecpt does not load them")
        if getattr(md, "storage_meta", None) is None:
            md.storage_meta = StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md


def _no_dist() -> bool:
    return not (dist.is_available() and dist.is_initialized())


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """DCP warns on every call without a process group that it assumes one process: that is the intent here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


# ----------------------------------------------------------------------------------- optimizer state, split
def split_optimizer_state(state: dict) -> tuple[dict, dict]:
    """An FQN-keyed optimizer state dict (``get_state_dict``'s) -> ``(tensors, rest)``.

    ``tensors`` = ``{"state": {fqn: {name: tensor}}}`` (DTensor shards under FSDP2) goes into DCP; ``rest`` =
    ``{"param_groups": [...], "state": {fqn: {name: value}}}`` (hyper-parameters with each group's FQN list, and
    non-tensor state such as SGD's ``momentum_buffer = None``) goes into a ``weights_only`` torch file.
    """
    tensors: dict[str, dict] = {}
    rest: dict[str, dict] = {}
    for fqn, entry in state.get("state", {}).items():
        tensors[fqn] = {k: v for k, v in entry.items() if isinstance(v, torch.Tensor)}
        rest[fqn] = {k: v for k, v in entry.items() if not isinstance(v, torch.Tensor)}
    return {"state": tensors}, {"param_groups": [dict(g) for g in state.get("param_groups", [])], "state": rest}


def join_optimizer_state(tensors: dict, rest: dict) -> dict:
    """Inverse of :func:`split_optimizer_state`: the FQN-keyed optimizer state dict."""
    state = {fqn: dict(entry) for fqn, entry in rest.get("state", {}).items()}
    for fqn, entry in tensors.get("state", {}).items():
        state.setdefault(fqn, {}).update(entry)
    return {"state": state, "param_groups": [dict(g) for g in rest.get("param_groups", [])]}


def index_keyed(state: dict) -> dict:
    """FQN-keyed optimizer state -> the index-keyed form ``Optimizer.state_dict()`` writes (parameters numbered in
    param-group order, as torch numbers them), so a DCP checkpoint consolidates to an ordinary ``optimizer.pt``."""
    order = [fqn for g in state["param_groups"] for fqn in g["params"]]
    index = {fqn: i for i, fqn in enumerate(order)}
    return {"state": {index[f]: s for f, s in state["state"].items()},
            "param_groups": [{**g, "params": [index[f] for f in g["params"]]} for g in state["param_groups"]]}


# --------------------------------------------------------------------- tensors stored beside the optimizer state
#: the key of a reference to a DCP tensor in a non-tensor skeleton (:func:`split_tensors`)
DCP_REF = "dcp_ref"


def split_tensors(obj: Any, at: tuple[str, ...]) -> tuple[Any, Any]:
    """Nested dicts / lists holding tensors -> ``(skeleton, tensors)``, for state a sync strategy keeps in the DCP
    ``optim`` part beside the optimizer's own (the outer state and other islands' inner states of hierarchical
    DiLoCo, :mod:`moecpt.distributed.islands_fsdp`).

    ``tensors`` holds the tensors alone, nested under the same keys (made ``str``, as DCP's paths are); it goes
    into the DCP folder at path ``at`` of the ``optim`` part. ``skeleton`` is ``obj`` with each tensor replaced by
    ``{"dcp_ref": [*at, *path], "shape": [...], "dtype": "float32"}`` (its global shape for a DTensor); it goes into
    ``optimizer_rest.pt`` (``weights_only``-loadable), and :func:`fill_tensors` puts the tensors back.
    """
    if isinstance(obj, torch.Tensor):
        return {DCP_REF: list(at), "shape": list(obj.shape), "dtype": str(obj.dtype).removeprefix("torch.")}, obj
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else None
    if items is None:
        return obj, None
    skeleton: dict | list = {} if isinstance(obj, dict) else []
    tensors: dict = {}
    for key, value in items:
        skel, found = split_tensors(value, (*at, str(key)))
        if isinstance(skeleton, dict):
            skeleton[key] = skel
        else:
            skeleton.append(skel)
        if found is not None:
            tensors[str(key)] = found
    return (type(obj)(skeleton) if isinstance(obj, tuple) else skeleton), (tensors or None)


def is_ref(obj: Any) -> bool:
    """Whether ``obj`` is a tensor reference of a :func:`split_tensors` skeleton."""
    return isinstance(obj, dict) and DCP_REF in obj


def fill_tensors(skeleton: Any, lookup: Callable[[dict], torch.Tensor]) -> Any:
    """Inverse of :func:`split_tensors`: ``skeleton`` with each reference ``ref`` replaced by ``lookup(ref)``."""
    if is_ref(skeleton):
        return lookup(skeleton)
    if isinstance(skeleton, dict):
        return {k: fill_tensors(v, lookup) for k, v in skeleton.items()}
    if isinstance(skeleton, (list, tuple)):
        return type(skeleton)(fill_tensors(v, lookup) for v in skeleton)
    return skeleton


def has_refs(obj: Any) -> bool:
    """Whether ``obj`` holds any :func:`split_tensors` reference (a DCP checkpoint's sync marker that keeps tensors
    in the DCP folder)."""
    if is_ref(obj):
        return True
    if isinstance(obj, dict):
        return any(has_refs(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(has_refs(v) for v in obj)
    return False


def ref_dtype(ref: dict) -> torch.dtype:
    """The dtype a reference records (a name of ``torch``'s dtypes only: nothing else is looked up)."""
    dtype = getattr(torch, str(ref.get("dtype")), None)
    if not isinstance(dtype, torch.dtype):
        raise MoecptError(f"checkpoint tensor reference {ref.get(DCP_REF)} names no torch dtype ({ref.get('dtype')!r})")
    return dtype


def lookup_in(tree: dict, prefix: str = OPTIM_PREFIX) -> Callable[[dict], torch.Tensor]:
    """A :func:`fill_tensors` lookup into ``tree`` (what :func:`read_full` returned for ``prefix``).

    Raises:
        MoecptError: a reference the tree does not hold (a damaged or hand-edited checkpoint)."""
    def lookup(ref: dict) -> torch.Tensor:
        node: Any = tree
        for part in ref[DCP_REF]:
            if not isinstance(node, dict) or part not in node:
                raise MoecptError(f"the sharded checkpoint holds no tensor {prefix}.{'.'.join(ref[DCP_REF])} that its "
                                  "optimizer_rest.pt refers to; it is damaged, use another checkpoint")
            node = node[part]
        return node
    return lookup


# -------------------------------------------------------------------------------------------- save / load
def save_sharded(folder: str, model_state: dict, optim_tensors: dict) -> None:
    """Write ``{"model": model_state, "optim": optim_tensors}`` as DCP into ``folder`` (created). A collective over
    the default process group when one is initialised (every rank writes ``__<rank>_0.distcp``, rank 0 writes
    ``.metadata`` once every rank's shard is written); files are fsynced."""
    writer = FileSystemWriter(folder, single_file_per_rank=True, sync_files=True, overwrite=False)
    with _quiet():
        dcp.save({MODEL_PREFIX: model_state, OPTIM_PREFIX: optim_tensors}, storage_writer=writer, no_dist=_no_dist())


def load_sharded(folder: str, model_state: dict, optim_tensors: dict) -> None:
    """Fill ``model_state`` / ``optim_tensors`` (this rank's DTensor shards or full tensors, shaped as
    :func:`save_sharded` wrote them at any world size) in place from the DCP ``folder``. A collective like
    :func:`save_sharded`.

    Raises:
        MoecptError: a tensor is missing from the checkpoint or has another shape (another model).
    """
    try:
        with _quiet():
            dcp.load({MODEL_PREFIX: model_state, OPTIM_PREFIX: optim_tensors}, storage_reader=SafeReader(folder),
                     no_dist=_no_dist())
    except MoecptError:
        raise
    except Exception as exc:  # DCP raises CheckpointException / RuntimeError carrying each rank's traceback
        raise MoecptError(f"the sharded checkpoint {folder} does not fit this model and optimizer "
                          f"({_first_line(exc)})") from None


def read_full(folder: str, prefix: str) -> dict:
    """Full (unsharded) CPU tensors of one part (``"model"`` or ``"optim"``) of a DCP folder, nested as saved, read
    in this process alone (no collective; no process group needed), one part at a time so a consolidation holds
    the model *or* the optimizer state, never both.

    Raises:
        MoecptError: unreadable metadata or shard files.
    """
    reader = SafeReader(folder)
    md = reader.read_metadata()
    paths = md.planner_data or {}
    flat = {k: torch.empty(v.size, dtype=v.properties.dtype) for k, v in md.state_dict_metadata.items()
            if tuple(paths.get(k, (k,)))[0] == prefix}
    if flat:
        try:
            with _quiet():
                dcp.load(flat, storage_reader=reader, no_dist=True)
        except Exception as exc:
            raise MoecptError(f"the sharded checkpoint {folder} is unreadable ({_first_line(exc)}); it is corrupted, "
                              "use another checkpoint") from None
    out: dict = {}
    for key, t in flat.items():
        path = tuple(paths.get(key, (prefix, key)))[1:]
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = t
    return out


def _first_line(exc: BaseException) -> str:
    lines = [x for x in str(exc).strip().splitlines() if x.strip()]
    return (lines[0] if lines else type(exc).__name__)[:200]
