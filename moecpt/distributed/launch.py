"""Process-group start-up and teardown, rank information, start-up checks and failure diagnosis.

Launch with torchrun (one process per device; ``gloo`` on CPU, ``nccl`` on CUDA)::

    torchrun --nproc-per-node 2 -m moecpt pretrain --recipe R.toml --out runs/x --set distributed.sync=diloco \
        --set distributed.local_steps=16

torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` / ``MASTER_PORT`` (and, for multi-node
``--rdzv-backend c10d``, its agent's store); :func:`session` initialises the default process group from them
(``env://``). ``MOECPT_INIT_METHOD`` may name another torch init method instead, e.g. ``file:///shared/x`` (a
FileStore, used by the tests: no port to choose). Without ``WORLD_SIZE > 1`` nothing is initialised and a run is an
ordinary single process.

A session also runs a heartbeat thread: every rank bumps a counter in the rendezvous store twice a second. When a
collective fails (gloo: "Connection closed by peer"; any backend: the ``distributed.timeout_s`` timeout),
:func:`diagnose` watches the counters for a few seconds and names the ranks that stopped, or quotes the error a rank
published with :func:`publish_error` before it exited. The store lives in torchrun's agent (or on rank 0 for a bare
``env://`` launch), so it outlives a killed worker.

The session is the one piece of module state here (``_SESSION``), mirroring torch's own default process group.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import threading
import time
from typing import Any, Iterator

import torch
import torch.distributed as dist

from moecpt.errors import MoecptError
from moecpt.train.parallel import DistInfo  # noqa: F401  (defined with the trainer's runtime interface)

ENV_INIT = "MOECPT_INIT_METHOD"
HEARTBEAT_S = 0.5
#: substrings of the RuntimeErrors gloo / NCCL / c10d raise when a peer is gone or a collective times out
_DIST_ERROR_HINTS = ("gloo", "nccl", "connection closed", "connection reset", "broken pipe", "timed out",
                     "timeout", "processgroup", "c10d", "socket", "peer")


def rank_info() -> DistInfo:
    """The default process group's rank / size (``DistInfo()`` when none is initialised)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(),
                    local_rank=int(os.environ.get("LOCAL_RANK", dist.get_rank())), backend=dist.get_backend())


def wants_distributed(env: dict[str, str] | None = None) -> bool:
    """True when launched as one of several ranks (torchrun, or ``WORLD_SIZE`` / ``RANK`` set by hand)."""
    env = os.environ if env is None else env
    try:
        return int(env.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        raise MoecptError(f"WORLD_SIZE={env.get('WORLD_SIZE')!r} is not an integer") from None


def resolve_backend(backend: str, device: str) -> str:
    """``auto``: NCCL when the run trains on CUDA, gloo otherwise."""
    if backend != "auto":
        if backend == "nccl" and not torch.cuda.is_available():
            raise MoecptError("distributed.backend='nccl' needs CUDA; use 'gloo' (or 'auto') on CPU")
        return backend
    on_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    return "nccl" if on_cuda else "gloo"


class _Session:
    def __init__(self, store: dist.Store, rank: int, world_size: int):
        self.store = dist.PrefixStore("moecpt/", store)
        self.rank, self.world_size = rank, world_size
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="moecpt-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.is_set():
            try:
                self.store.add(f"hb/{self.rank}", 1)
            except Exception:  # the store is gone (its host stopped): nothing left to report to
                return
            self._stop.wait(HEARTBEAT_S)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2 * HEARTBEAT_S + 1)


_SESSION: _Session | None = None


@contextlib.contextmanager
def session(cfg: Any, device: str = "auto") -> Iterator[DistInfo]:
    """Initialise the default process group when launched as a rank of a job, and tear it down afterwards.

    Args:
        cfg: :class:`moecpt.config.DistributedConfig` (``backend``, ``timeout_s``).
        device: the recipe's ``train.device`` (chooses the backend for ``auto``; CUDA ranks use ``LOCAL_RANK``).

    Yields:
        :class:`DistInfo` (world size 1 when not launched distributed, or when a process group already exists,
        in which case it is left to its owner).

    Raises:
        MoecptError: the rendezvous failed or timed out (naming the address), or a bad backend; a lost peer or a
            collective timeout inside the block (naming the ranks that stopped). This rank's own errors are left
            in the store for the other ranks to quote.
    """
    global _SESSION
    if not wants_distributed() or (dist.is_available() and dist.is_initialized()):
        yield rank_info()
        return
    if not dist.is_available():
        raise MoecptError("this torch build has no torch.distributed; install a build with distributed support")
    backend = resolve_backend(cfg.backend, device)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    timeout = datetime.timedelta(seconds=cfg.timeout_s)
    init = os.environ.get(ENV_INIT, "env://")
    try:
        store, rank, world = next(dist.rendezvous(init, rank=rank, world_size=world, timeout=timeout))
        store.set_timeout(timeout)
        # torchrun --max-restarts keeps its agent's store across restarts: without a per-attempt prefix the
        # restarted ranks would read the dead ranks' addresses and fail to connect
        store = dist.PrefixStore(f"attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
        dist.init_process_group(backend, store=dist.PrefixStore("default_pg", store), rank=rank,
                                world_size=world, timeout=timeout)
    except (RuntimeError, ValueError) as exc:
        where = init if init != "env://" else f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
        raise MoecptError(f"rank {rank} of {world} could not join the job at {where} ({_one_line(exc)}); start "
                          "every rank with the same rendezvous settings (torchrun does), and raise "
                          f"distributed.timeout_s (now {cfg.timeout_s:g} s) if ranks start far apart") from None
    _SESSION = _Session(store, rank, world)
    try:
        yield rank_info()
    except MoecptError as exc:
        publish_error(str(exc))  # the other ranks quote it when they notice this rank is gone
        raise
    except Exception as exc:
        if not is_distributed_error(exc):
            publish_error(f"{type(exc).__name__}: {_one_line(exc)}")
            raise
        raise MoecptError(f"rank {rank} of {world} stops: {diagnose()} (collective error: {_one_line(exc)})") from None
    finally:
        sess, _SESSION = _SESSION, None
        sess.close()
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------ start-up checks
def fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_same_config(identity: dict[str, Any]) -> None:
    """All-gather a hash of the run identity (recipe after ``--set``, parent, tokenizer); refuse to start when the
    ranks disagree, naming the first differing key.

    Raises:
        MoecptError: on every rank, with the same message.
    """
    info = rank_info()
    if not info.distributed:
        return
    mine = (fingerprint(identity), identity)
    gathered: list[Any] = [None] * info.world_size
    dist.all_gather_object(gathered, mine)
    ref_fp, ref = gathered[0]
    bad = [r for r, (fp, _) in enumerate(gathered) if fp != ref_fp]
    if bad:
        key, a, b = _first_difference(ref, gathered[bad[0]][1])
        raise MoecptError(
            f"the configuration differs across ranks: {key} is {a!r} on rank 0 but {b!r} on rank {bad[0]} "
            f"(ranks differing from rank 0: {', '.join(map(str, bad))}); start every rank with the same recipe, "
            "--set overrides, --from parent and data")


def _first_difference(a: Any, b: Any, path: str = "") -> tuple[str, Any, Any]:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                return _first_difference(a.get(key), b.get(key), f"{path}.{key}" if path else key)
    return path or "identity", a, b


def run_on_main(fn) -> Any:
    """Run ``fn()`` on rank 0 only and hand its result (or its MoecptError, re-raised) to every rank."""
    info = rank_info()
    if not info.distributed:
        return fn()
    box: list[Any] = [None]
    if info.is_main:
        try:
            box = [("ok", fn())]
        except MoecptError as exc:
            box = [("error", str(exc))]
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise MoecptError(value)
    return value


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (identity when not distributed)."""
    if not rank_info().distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_to_main(obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` as a list on rank 0 (``None`` on the others; ``[obj]`` when not distributed)."""
    info = rank_info()
    if not info.distributed:
        return [obj]
    out: list[Any] | None = [None] * info.world_size if info.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


# ------------------------------------------------------------------------------------------------------ failures
def is_distributed_error(exc: BaseException) -> bool:
    """Whether ``exc`` looks like a lost peer / collective timeout (not a bug of this rank)."""
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    return isinstance(exc, RuntimeError) and any(h in str(exc).lower() for h in _DIST_ERROR_HINTS)


def publish_error(message: str) -> None:
    """Leave this rank's fatal error in the store so that the ranks it leaves behind can quote it."""
    if _SESSION is None:
        return
    with contextlib.suppress(Exception):
        _SESSION.store.set(f"error/{_SESSION.rank}", message[:2000])


def diagnose(window_s: float = 3.0) -> str:
    """Name the ranks that stopped: those that published an error, and those whose heartbeat stands still for
    ``window_s`` seconds. Returns a sentence (never raises)."""
    sess = _SESSION
    if sess is None:
        return "a peer rank stopped or a collective timed out (no moecpt session to tell which)"
    others = [r for r in range(sess.world_size) if r != sess.rank]
    try:
        before = {r: sess.store.add(f"hb/{r}", 0) for r in others}
        time.sleep(window_s)
        after = {r: sess.store.add(f"hb/{r}", 0) for r in others}
        errors = {r: sess.store.get(f"error/{r}").decode("utf-8", "replace") for r in others
                  if sess.store.check([f"error/{r}"])}
    except Exception as exc:  # the store itself is gone
        return (f"lost contact with the other ranks and with the rendezvous store ({_one_line(exc)}): the store's "
                "host (torchrun's agent, or rank 0) stopped")
    parts = [f"rank {r} failed: {msg}" for r, msg in sorted(errors.items())]
    parts += [f"rank {r} stopped responding (killed, crashed or hung)"
              for r in others if r not in errors and after[r] == before[r]]
    if not parts:
        return "a collective failed but every rank is still alive (a network problem or distributed.timeout_s too low)"
    return "; ".join(parts)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]
