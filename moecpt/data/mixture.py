"""Deterministic mixture sampling of packed sequences, and held-out evaluation batches.

Replay is a mixture weight with a fixed budget (compute-equivalent replay, Ibrahim et al. 2024,
arXiv 2403.08763, Sec. 5.1): with ``{"code": 0.7, "english": 0.3}`` 30% of each step's sequences are replayed
English *instead of* code, never on top of it.

* Packing: each source's train tokens (documents joined by eod) are cut into non-overlapping windows of
  ``seq_len + 1`` tokens (windows may span documents, as in standard packing); the tail is dropped.
* Order: each source's windows are visited in a permutation seeded by (seed, source name, epoch).
* Rows -> sources: the rows of the global stream are assigned by largest deficit over running counts
  (``argmax_s w_s * (n + 1) - c_s``; a smooth weighted round-robin), so after ``n`` rows every source has
  ``|c_s - w_s n| < 1`` rows: realised fractions match the weights deterministically, not just in expectation.
* Ranks: every rank computes the same global batch and takes its contiguous block of rows, so ranks never see the
  same window, and the state (rows consumed per source) is global, independent of the world size.
"""

from __future__ import annotations

import math
import warnings
import zlib
from typing import Any

import numpy as np
import torch

from moecpt.data.prepared import PreparedData
from moecpt.errors import MoecptError

_STATE_VERSION = 1


def _windows(tokens: np.ndarray, window: int, index: np.ndarray) -> np.ndarray:
    """Gather windows ``index`` of length ``window`` from ``tokens`` -> int64 ``[len(index), window]``."""
    pos = index.astype(np.int64)[:, None] * window + np.arange(window, dtype=np.int64)
    return np.asarray(tokens[pos], dtype=np.int64)


def _check_ids(batch: np.ndarray, data: PreparedData, source: str, split: str) -> np.ndarray:
    """``batch`` itself, after checking that every token id is below the data's vocab size (one ``max``).

    Raises:
        MoecptError: an out-of-range id (a damaged shard, or a hand-edited ``vocab_size``), naming source and split.
    """
    if batch.size:
        top = int(batch.max())
        if top >= data.vocab_size:
            raise MoecptError(
                f"the {split} shard of source {source!r} in {data.path} holds token id {top}, but the vocabulary has "
                f"{data.vocab_size} ids: the shards are damaged; prepare the data again into a new folder"
            )
    return batch


class MixtureSampler:
    """Yield packed training batches drawn from a weighted mixture of a prepared folder's sources.

    Args:
        data: the prepared data.
        mixture: source name -> weight (>= 0, normalised here); zero-weight sources are ignored.
        seq_len: tokens per training sequence; each row holds ``seq_len + 1`` tokens (inputs + shifted targets).
        batch_size: GLOBAL sequences per step (all ranks); each rank gets ``batch_size // world_size`` rows.
        seed: seeds the per-epoch window permutations.
        rank, world_size: data-parallel position; rank ``r`` takes rows ``[r*b, (r+1)*b)`` of each global batch.
        allow_repeat: permit more than one epoch over a source (warns with the number of epochs).
        total_steps: if given, check the budget ``total_steps * batch_size`` sequences against every source.

    Raises:
        MoecptError: unknown source (lists the available ones), batch_size not divisible by world_size, a source
            shorter than one window, or (with ``total_steps``, without ``allow_repeat``) a source too small for
            its share of the budget.
    """

    def __init__(
        self,
        data: PreparedData,
        mixture: dict[str, float],
        seq_len: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        allow_repeat: bool = False,
        total_steps: int | None = None,
    ):
        if world_size < 1 or not 0 <= rank < world_size:
            raise MoecptError(f"rank {rank} is not in [0, world_size={world_size})")
        if batch_size % world_size:
            raise MoecptError(
                f"train.batch_size={batch_size} is not divisible by the world size {world_size}; "
                "choose a multiple of the number of ranks"
            )
        if seq_len < 1 or batch_size < 1:
            raise MoecptError(f"seq_len={seq_len} and batch_size={batch_size} must be >= 1")
        for name, weight in mixture.items():
            if name not in data.source_names:
                raise MoecptError(
                    f"data.mixture names unknown source {name!r}; {data.path} has: {', '.join(data.source_names)}"
                )
            if not weight >= 0:
                raise MoecptError(f"data.mixture.{name}={weight} must be >= 0")
        self.names = [n for n, w in mixture.items() if w > 0]
        if not self.names:
            raise MoecptError("data.mixture has no source with a positive weight")
        total_w = sum(mixture[n] for n in self.names)
        self.weights = [mixture[n] / total_w for n in self.names]
        self.all_names = list(mixture)
        self.data = data
        self.seq_len = seq_len
        self.window = seq_len + 1
        self.batch_size = batch_size
        self.local_batch = batch_size // world_size
        self.seed = int(seed)
        self.rank = rank
        self.world_size = world_size
        self.allow_repeat = allow_repeat
        self._tokens = [data.train_tokens(n) for n in self.names]
        self._nwin = [len(t) // self.window for t in self._tokens]
        for n, nw, t in zip(self.names, self._nwin, self._tokens):
            if nw == 0:
                raise MoecptError(
                    f"source {n!r} has {len(t)} train tokens, fewer than one sequence of {self.window}; "
                    "lower data.seq_len or give it zero weight"
                )
        self._rows = [0] * len(self.names)  # global rows (windows) consumed per source: the whole sampler state
        self._step = 0
        self._perm: dict[tuple[int, int], np.ndarray] = {}
        self._warned_repeat = False
        if total_steps is not None:
            self._check_budget(total_steps)

    # ------------------------------------------------------------------------------------------------ budget
    def _check_budget(self, total_steps: int) -> None:
        rows = total_steps * self.batch_size
        for i, name in enumerate(self.names):
            need = math.ceil(self.weights[i] * rows)  # deficit assignment keeps |count - w*rows| < 1
            if need <= self._nwin[i]:
                continue
            need_tok, have_tok = need * self.window, len(self._tokens[i])
            if not self.allow_repeat:
                raise MoecptError(
                    f"the mixture ({total_steps} steps x {self.batch_size} sequences x {self.window} tokens x "
                    f"weight {self.weights[i]:.3g}) needs {need_tok:,} tokens of source {name!r} but it has "
                    f"{have_tok:,}; lower train.steps or set data.allow_repeat = true"
                )
            warnings.warn(
                f"source {name!r} will be repeated: {need / self._nwin[i]:.2f} epochs over its {have_tok:,} "
                "train tokens (data.allow_repeat = true)",
                stacklevel=3,
            )

    # ------------------------------------------------------------------------------------------------ batches
    def _permutation(self, i: int, epoch: int) -> np.ndarray:
        key = (i, epoch)
        perm = self._perm.get(key)
        if perm is None:
            name_key = zlib.crc32(self.names[i].encode("utf-8"))
            perm = np.random.default_rng([self.seed, name_key, epoch]).permutation(self._nwin[i])
            # Only the current and the next epoch of each source are ever needed.
            for k in [k for k in self._perm if k[0] == i and k[1] < epoch]:
                del self._perm[k]
            self._perm[key] = perm
        return perm

    def _assign(self) -> tuple[list[int], list[int]]:
        """Sources and within-source stream positions of the next global batch's rows (updates the counts)."""
        w, c = self.weights, self._rows
        n = sum(c)
        src, pos = [], []
        for _ in range(self.batch_size):
            n += 1
            best = max(range(len(w)), key=lambda s: w[s] * n - c[s])  # first max wins ties: deterministic
            src.append(best)
            pos.append(c[best])
            c[best] += 1
        return src, pos

    def next_batch(self) -> torch.LongTensor:
        """The next batch of this rank: int64 ``[batch_size // world_size, seq_len + 1]``.

        Use ``inputs = b[:, :-1]``, ``targets = b[:, 1:]``.
        """
        src, pos = self._assign()
        self._step += 1
        lo = self.rank * self.local_batch
        src_arr = np.asarray(src[lo : lo + self.local_batch])
        pos_arr = np.asarray(pos[lo : lo + self.local_batch], dtype=np.int64)
        out = np.empty((self.local_batch, self.window), dtype=np.int64)
        for i in np.unique(src_arr):
            rows = np.flatnonzero(src_arr == i)
            p = pos_arr[rows]
            nw = self._nwin[i]
            epochs = p // nw
            if epochs.max() > 0 and not self.allow_repeat and not self._warned_repeat:
                self._warned_repeat = True
                warnings.warn(f"source {self.names[i]!r} is exhausted; starting its epoch 2", stacklevel=2)
            win = np.empty(len(p), dtype=np.int64)
            for e in np.unique(epochs):
                m = epochs == e
                win[m] = self._permutation(int(i), int(e))[p[m] % nw]
            out[rows] = _check_ids(_windows(self._tokens[i], self.window, win), self.data, self.names[i], "train")
        return torch.from_numpy(out)

    # -------------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state: rows consumed per source (global) plus the settings that must match."""
        return {
            "version": _STATE_VERSION,
            "step": self._step,
            "rows": dict(zip(self.names, self._rows)),
            "seed": self.seed,
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "weights": dict(zip(self.names, self.weights)),
            "tokenizer_sha256": self.data.tokenizer_sha256,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; afterwards :meth:`next_batch` continues exactly as without interruption.

        The state is global, so it may be loaded with another world size. A different mixture continues each
        source from where it stopped (with a warning).

        Raises:
            MoecptError: the state comes from other data (tokenizer), another seq_len or seed.
        """
        if state.get("version") != _STATE_VERSION:
            raise MoecptError(f"sampler state version {state.get('version')} is not supported")
        for key, mine in (("tokenizer_sha256", self.data.tokenizer_sha256), ("seq_len", self.seq_len),
                          ("seed", self.seed)):
            if state.get(key) != mine:
                raise MoecptError(
                    f"the saved data sampler has {key}={state.get(key)!r} but this run has {mine!r}; "
                    "resume with the same data and settings"
                )
        if state.get("weights") != dict(zip(self.names, self.weights)) or state.get("batch_size") != self.batch_size:
            warnings.warn("resuming the data sampler with another mixture or batch size", stacklevel=2)
        rows = state.get("rows", {})
        self._rows = [int(rows.get(n, 0)) for n in self.names]
        self._step = int(state.get("step", 0))
        self._perm.clear()

    # -------------------------------------------------------------------------------------------------- stats
    def tokens_consumed(self) -> dict[str, int]:
        """Training tokens drawn so far per source, all ranks together (rows x seq_len; 0 for weight-0 sources)."""
        got = dict(zip(self.names, self._rows))
        return {n: got.get(n, 0) * self.seq_len for n in self.all_names}

    def epochs(self) -> dict[str, float]:
        """Epochs over each source's train windows so far (1.0 = every window seen once)."""
        got = {n: r / nw for n, r, nw in zip(self.names, self._rows, self._nwin)}
        return {n: got.get(n, 0.0) for n in self.all_names}

    @property
    def step(self) -> int:
        """Batches drawn so far."""
        return self._step


def val_batches(
    data: PreparedData, source: str, seq_len: int, batch_size: int, max_batches: int
) -> list[torch.LongTensor]:
    """Held-out batches of one source: int64 ``[batch_size, seq_len + 1]`` each, at most ``max_batches``.

    The val split is cut into consecutive non-overlapping windows of ``seq_len + 1`` tokens, in order
    (deterministic; the same windows every evaluation). If the split has fewer than ``batch_size`` windows, one
    smaller batch of all of them is returned.

    Raises:
        MoecptError: unknown source, the val split is shorter than one window, or it holds an id >= vocab_size.
    """
    tokens = data.val_tokens(source)
    window = seq_len + 1
    nwin = len(tokens) // window
    if nwin == 0:
        raise MoecptError(
            f"the held-out split of source {source!r} has {len(tokens)} tokens, fewer than one sequence of "
            f"{window}; prepare with a larger --val-fraction or lower data.seq_len"
        )
    nb = min(max_batches, nwin // batch_size)
    if nb == 0:
        return [torch.from_numpy(_check_ids(_windows(tokens, window, np.arange(nwin)), data, source, "val"))]
    return [
        torch.from_numpy(_check_ids(_windows(tokens, window, np.arange(b * batch_size, (b + 1) * batch_size)),
                                    data, source, "val"))
        for b in range(nb)
    ]
