"""Offline training tasks for meta-training and benchmarking the learned outer optimizers.

Every task is *batched*: parameters are lists of tensors ``[M, *S]`` holding ``M`` independent models (PES
particles x workers, or benchmark settings x seeds x workers), and one call evaluates all of them with batched
matmuls, so a whole population trains at the cost of a few large kernels rather than many small ones.

Tasks (``TASKS``):

* ``digits-mlp32``: scikit-learn's bundled 8x8 digits (1,797 images, 10 classes; 80/20 fixed split), an MLP
  64-32-10 (ReLU). The paper's early small task; the first of the meta-training set (its periodic evaluation
  runs on it).
* ``digits4x4-mlp32``: the same images average-pooled to 4x4, MLP 16-32-10.
* ``digits-mlp128``: 8x8 digits with a 4x wider MLP 64-128-10 (held out from meta-training; benchmark).
* ``digits-mlp64x2``: 8x8 digits, a deeper MLP 64-64-64-10.
* ``cancer-mlp32``: scikit-learn's bundled breast-cancer data (569 x 30 features, standardised with the train
  statistics, 2 classes), MLP 30-32-2 (benchmark).
* ``wine-mlp32``: scikit-learn's bundled wine data (178 x 13, standardised, 3 classes), MLP 13-32-3.
* ``digits-mlp16``, ``digits-mlp64``, ``digits4x4-mlp64``: other widths of the digits MLPs (64-16-10, 64-64-10,
  16-64-10).
* ``iris-mlp16``: scikit-learn's bundled iris data (150 x 4, standardised, 3 classes), MLP 4-16-3, b = 32.
* ``english-lm``, ``german-lm``, ``code-lm``: a tiny decoder-only transformer (1 layer, d = 16, 2 heads, RMSNorm,
  learned positions, untied output, context 32) on a bundled demo corpus (``PreparedData.open("demo")``). To keep
  CPU cost tiny the 4096-token vocabulary is cut to the 255 most frequent train tokens of that source plus one
  ``<unk>`` id (V = 256); the loss is the next-token cross-entropy over those 256 ids. ``code-lm`` is a benchmark
  task.

Workers run plain SGD (no momentum, constant LR) on i.i.d. mini-batches drawn with replacement from the train
split. Losses are in nats (mean cross-entropy).

Validation split (hyperparameter tuning, ``moecpt lopt bench``): :meth:`Task.tuning_task` is the same task with
:data:`VAL_FRACTION` of its train split set aside (a fixed random subset of the examples; the last tenth of the
train tokens for the LMs): it trains on the rest and its ``"val"`` split is what it set aside. The held-out
split is never used for tuning.
"""

from __future__ import annotations

import copy
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from functools import cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from moecpt.data.prepared import PreparedData
from moecpt.errors import MoecptError

Batch = tuple[Tensor, ...]
VAL_FRACTION = 0.2  # of the train examples (MLPs); the LMs set aside the last tenth of their train tokens


class Task(ABC):
    """A batched training problem.

    Attributes:
        name: registry name.
        num_classes: output classes (vocabulary size for LMs); the meta-loss clips at ``1.5 · ln(num_classes)``.
        local_lr: the workers' SGD learning rate used with the learned optimizers (0.5 for the MLPs, as in the
            paper).
        batch_size: examples (sequences for LMs) per worker per local step.
    """

    name: str
    num_classes: int
    local_lr: float
    batch_size: int

    @abstractmethod
    def param_shapes(self) -> list[tuple[int, ...]]:
        """Shapes of one model's parameter tensors."""

    @abstractmethod
    def init_params(self, n: int, gen: torch.Generator) -> list[Tensor]:
        """``n`` freshly initialised models: tensors ``[n, *S]``."""

    @abstractmethod
    def sample(self, n: int, gen: torch.Generator, size: int | None = None) -> Batch:
        """``n`` training mini-batches of ``size`` (default :attr:`batch_size`) examples: tensors ``[n, size, ...]``."""

    @abstractmethod
    def losses(self, params: list[Tensor], batch: Batch) -> Tensor:
        """Mean loss of model ``i`` on mini-batch ``i``: ``[M]`` (differentiable in ``params``)."""

    @abstractmethod
    def eval_batch(self, split: str) -> Batch:
        """A fixed evaluation set of the ``"train"`` or ``"heldout"`` split, or ``"val"`` of a :meth:`tuning_task`
        (no leading model dim)."""

    @abstractmethod
    def tuning_task(self) -> Task:
        """This task with a validation split set aside from its train split (see the module doc); the copy trains
        on the rest of the train split, and ``eval_batch("val")`` is the set-aside part."""

    def loss_and_grads(self, params: list[Tensor], batch: Batch) -> tuple[Tensor, list[Tensor]]:
        """Per-model losses ``[M]`` and gradients (``[M, *S]`` each) of ``M`` independent models.

        One backward pass: the gradient of the summed losses is each model's own gradient since the models share
        nothing. Tasks may override this with a hand-written backward pass (the MLPs do, 2x faster on a CPU).
        """
        ps = [p.detach().requires_grad_(True) for p in params]
        with torch.enable_grad():
            loss = self.losses(ps, batch)
            grads = torch.autograd.grad(loss.sum(), ps)
        return loss.detach(), list(grads)

    def eval_loss(self, params: list[Tensor], split: str = "heldout") -> Tensor:
        """Loss of each of the ``B`` models ``[B, *S]`` on the fixed evaluation set of ``split``: ``[B]``."""
        B = params[0].shape[0]
        batch = tuple(t[None].expand(B, *t.shape) for t in self.eval_batch(split))
        with torch.no_grad():
            return self.losses([p.float() for p in params], batch)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


def _bshape(x: Tensor | float, ndim: int) -> Tensor | float:
    return x.reshape(-1, *([1] * (ndim - 1))) if isinstance(x, Tensor) else x


def local_round(
    task: Task,
    params: list[Tensor],
    workers: int,
    steps: int,
    lr: Tensor | float,
    gen: torch.Generator,
    groups: Tensor | None = None,
) -> tuple[list[Tensor], Tensor]:
    """One communication round of local SGD for ``B`` independent runs.

    Every worker of run ``b`` starts from ``params[i][b]`` and takes ``steps`` (H) plain-SGD steps with LR ``lr``
    (float or ``[B]``) on its own mini-batches.

    Args:
        params: global parameters ``[B, *S]``.
        workers: K.
        groups: optional ``[B]`` ints: runs with the same group see the same mini-batches (antithetic PES pairs).

    Returns:
        ``(deltas, loss)``: ``Δ_k = θ_k − θ`` as ``[B, K, *S]`` per tensor, and the workers' mean mini-batch loss
        over the round ``[B]``.
    """
    B, K = params[0].shape[0], workers
    if groups is None:
        groups = torch.arange(B)
    n_groups = int(groups.max()) + 1
    rows = (groups[:, None] * K + torch.arange(K)[None, :]).reshape(-1)
    w = [p[:, None].expand(B, K, *p.shape[1:]).reshape(B * K, *p.shape[1:]).float() for p in params]
    lr_bk = lr.repeat_interleave(K) if isinstance(lr, Tensor) else lr
    total = torch.zeros(B * K)
    for _ in range(steps):
        batch = task.sample(n_groups * K, gen)
        if n_groups * K != B * K or not torch.equal(rows, torch.arange(B * K)):
            batch = tuple(t[rows] for t in batch)
        loss, grads = task.loss_and_grads(w, batch)
        total += loss
        w = [wi - _bshape(lr_bk, wi.dim()) * gi for wi, gi in zip(w, grads)]
    deltas = [wi.reshape(B, K, *wi.shape[1:]) - p[:, None].float() for wi, p in zip(w, params)]
    return deltas, (total / steps).reshape(B, K).mean(dim=1)


# ------------------------------------------------------------------------------------------------------ MLP
def _sklearn(name: str):
    try:
        from sklearn import datasets
    except ImportError:  # pragma: no cover - depends on the environment
        raise MoecptError("the MLP tasks use scikit-learn's bundled data sets: `pip install scikit-learn`") from None
    return getattr(datasets, f"load_{name}")()


@cache
def _classification_data(dataset: str) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
    """``(x_train, y_train, x_heldout, y_heldout, classes)``: fixed 80/20 split (seed 0), float32 features."""
    source = {"digits": "digits", "digits4x4": "digits", "cancer": "breast_cancer", "wine": "wine",
              "iris": "iris"}[dataset]
    d = _sklearn(source)
    x = np.asarray(d.data, dtype=np.float32)
    y = np.asarray(d.target, dtype=np.int64)
    if dataset.startswith("digits"):
        x = x / 16.0
        if dataset == "digits4x4":
            x = x.reshape(-1, 4, 2, 4, 2).mean(axis=(2, 4)).reshape(-1, 16)
    perm = np.random.default_rng(0).permutation(len(x))
    n_train = int(round(0.8 * len(x)))
    tr, ho = perm[:n_train], perm[n_train:]
    if not dataset.startswith("digits"):
        mu, sd = x[tr].mean(0), x[tr].std(0) + 1e-6
        x = (x - mu) / sd
    classes = int(y.max()) + 1
    return torch.from_numpy(x[tr]), torch.from_numpy(y[tr]), torch.from_numpy(x[ho]), torch.from_numpy(y[ho]), classes


class MLPTask(Task):
    """Classification with a ReLU MLP (weights ``[in, out]`` ~ U(±1/sqrt(in)), biases 0) and cross-entropy."""

    def __init__(self, name: str, dataset: str, hidden: tuple[int, ...], local_lr: float = 0.5, batch_size: int = 128):
        self.name, self.dataset, self.hidden = name, dataset, hidden
        self.local_lr, self.batch_size = local_lr, batch_size
        self.x, self.y, self.x_ho, self.y_ho, self.num_classes = _classification_data(dataset)
        dims = (self.x.shape[1], *hidden, self.num_classes)
        self.layers = list(zip(dims[:-1], dims[1:]))

    def param_shapes(self) -> list[tuple[int, ...]]:
        out: list[tuple[int, ...]] = []
        for i, o in self.layers:
            out += [(i, o), (o,)]
        return out

    def init_params(self, n: int, gen: torch.Generator) -> list[Tensor]:
        out = []
        for i, o in self.layers:
            bound = 1.0 / math.sqrt(i)
            out += [(torch.rand(n, i, o, generator=gen) * 2 - 1) * bound, torch.zeros(n, o)]
        return out

    def sample(self, n: int, gen: torch.Generator, size: int | None = None) -> Batch:
        idx = torch.randint(len(self.y), (n, size or self.batch_size), generator=gen)
        return self.x[idx], self.y[idx]

    def losses(self, params: list[Tensor], batch: Batch) -> Tensor:
        x, y = batch
        h = x
        n_layers = len(self.layers)
        for li in range(n_layers):
            h = torch.baddbmm(params[2 * li + 1][:, None, :], h, params[2 * li])
            if li < n_layers - 1:
                h = torch.relu(h)
        M, b, C = h.shape
        return F.cross_entropy(h.reshape(M * b, C), y.reshape(M * b), reduction="none").reshape(M, b).mean(1)

    def eval_batch(self, split: str) -> Batch:
        if split == "val":
            if not hasattr(self, "x_val"):
                raise ValueError(f"{self.name} has no validation split; use tuning_task()")
            return self.x_val, self.y_val
        return (self.x, self.y) if split == "train" else (self.x_ho, self.y_ho)

    def tuning_task(self) -> MLPTask:
        out = copy.copy(self)
        perm = torch.randperm(len(self.y), generator=torch.Generator().manual_seed(1))
        n_val = max(1, int(round(VAL_FRACTION * len(self.y))))
        val, fit = perm[:n_val], perm[n_val:]
        out.x, out.y, out.x_val, out.y_val = self.x[fit], self.y[fit], self.x[val], self.y[val]
        return out

    def loss_and_grads(self, params: list[Tensor], batch: Batch) -> tuple[Tensor, list[Tensor]]:
        """Hand-written forward and backward pass (same values as autograd; tested)."""
        x, y = batch
        n_layers = len(self.layers)
        acts, pre = [x], []
        h = x
        for li in range(n_layers):
            a = torch.baddbmm(params[2 * li + 1][:, None, :], h, params[2 * li])
            if li < n_layers - 1:
                pre.append(a)
                h = a.clamp_min(0.0)
                acts.append(h)
        logits = a
        M, b, C = logits.shape
        z = logits - logits.amax(-1, keepdim=True)
        e = z.exp()
        s = e.sum(-1, keepdim=True)
        onehot = torch.zeros_like(logits).scatter_(-1, y[..., None], 1.0)
        loss = (s.log()[..., 0] - (z * onehot).sum(-1)).mean(1)
        dz = (e / s - onehot) / b
        grads: list[Tensor] = [None] * (2 * n_layers)  # type: ignore[list-item]
        for li in reversed(range(n_layers)):
            grads[2 * li] = torch.bmm(acts[li].transpose(1, 2), dz)
            grads[2 * li + 1] = dz.sum(1)
            if li > 0:
                dz = torch.bmm(dz, params[2 * li].transpose(1, 2)) * (pre[li - 1] > 0)
        return loss, grads


# ------------------------------------------------------------------------------------------------------- LM
@cache
def _lm_data(source: str, vocab: int) -> tuple[Tensor, Tensor]:
    """Train / val token ids of a demo source remapped to ``vocab`` ids (top ``vocab − 1`` train tokens + unk)."""
    data = PreparedData.open("demo")
    train = np.asarray(data.train_tokens(source), dtype=np.int64)
    val = np.asarray(data.val_tokens(source), dtype=np.int64)
    counts = np.bincount(train, minlength=data.vocab_size)
    top = np.argsort(-counts, kind="stable")[: vocab - 1]
    table = np.full(max(data.vocab_size, int(val.max()) + 1), vocab - 1, dtype=np.int64)
    table[top] = np.arange(vocab - 1)
    return torch.from_numpy(table[train]), torch.from_numpy(table[val])


class TinyLMTask(Task):
    """Next-token prediction with a tiny functional transformer, batched over models.

    Parameters per model: ``emb [V, d]``, ``pos [T, d]``, per layer ``norm1 [d]``, ``qkv [d, 3d]``, ``proj [d, d]``,
    ``norm2 [d]``, ``fc1 [d, 4d]``, ``fc2 [4d, d]``; then ``norm_f [d]``, ``head [d, V]``. Pre-norm (RMSNorm with
    gain), causal multi-head attention, GELU MLP.
    """

    def __init__(self, name: str, source: str, *, vocab: int = 256, d_model: int = 16, layers: int = 1,
                 heads: int = 2, seq_len: int = 32, batch_size: int = 4, local_lr: float = 1.0):
        self.name, self.source = name, source
        self.num_classes = vocab
        self.d, self.n_layers, self.heads, self.seq_len = d_model, layers, heads, seq_len
        self.batch_size, self.local_lr = batch_size, local_lr
        self.train_ids, self.val_ids = _lm_data(source, vocab)
        g = torch.Generator().manual_seed(1234)
        self._eval = {
            "train": self._windows(self.train_ids, 64, g),
            "heldout": self._windows(self.val_ids, 64, g),
        }

    def _windows(self, ids: Tensor, n: int, gen: torch.Generator) -> Tensor:
        start = torch.randint(len(ids) - self.seq_len - 1, (n,), generator=gen)
        return ids[start[:, None] + torch.arange(self.seq_len + 1)]

    def param_shapes(self) -> list[tuple[int, ...]]:
        d, V, T = self.d, self.num_classes, self.seq_len
        out = [(V, d), (T, d)]
        for _ in range(self.n_layers):
            out += [(d,), (d, 3 * d), (d, d), (d,), (d, 4 * d), (4 * d, d)]
        return out + [(d,), (d, V)]

    def init_params(self, n: int, gen: torch.Generator) -> list[Tensor]:
        """Norm gains 1; embeddings ~ N(0, 1/d); other matrices ~ N(0, 1/fan_in)."""
        out = []
        for j, shape in enumerate(self.param_shapes()):
            if len(shape) == 1:
                out.append(torch.ones(n, *shape))
            else:
                fan_in = self.d if j < 2 else shape[0]
                out.append(torch.randn(n, *shape, generator=gen) / math.sqrt(fan_in))
        return out

    def sample(self, n: int, gen: torch.Generator, size: int | None = None) -> Batch:
        b = size or self.batch_size
        start = torch.randint(len(self.train_ids) - self.seq_len - 1, (n * b,), generator=gen)
        tok = self.train_ids[start[:, None] + torch.arange(self.seq_len + 1)]
        return (tok.reshape(n, b, self.seq_len + 1),)

    @staticmethod
    def _rms(x: Tensor, g: Tensor) -> Tensor:
        return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-6) * g[:, None, None, :]

    def losses(self, params: list[Tensor], batch: Batch) -> Tensor:
        (tok,) = batch
        M, b, _ = tok.shape
        T, d, V, nh = self.seq_len, self.d, self.num_classes, self.heads
        inp, tgt = tok[..., :-1], tok[..., 1:]
        emb, pos = params[0], params[1]
        flat = (inp + torch.arange(M)[:, None, None] * V).reshape(-1)
        x = emb.reshape(M * V, d)[flat].reshape(M, b, T, d) + pos[:, None]
        mask = torch.ones(T, T, dtype=torch.bool).triu(1)
        i = 2
        for _ in range(self.n_layers):
            n1, wqkv, wo, n2, w1, w2 = params[i : i + 6]
            i += 6
            h = self._rms(x, n1).reshape(M, b * T, d)
            q, k, v = torch.bmm(h, wqkv).reshape(M, b, T, 3, nh, d // nh).permute(3, 0, 1, 4, 2, 5)
            att = (q @ k.transpose(-1, -2)) / math.sqrt(d // nh)
            att = att.masked_fill(mask, float("-inf")).softmax(-1)
            o = (att @ v).permute(0, 1, 3, 2, 4).reshape(M, b * T, d)
            x = x + torch.bmm(o, wo).reshape(M, b, T, d)
            h = self._rms(x, n2).reshape(M, b * T, d)
            x = x + torch.bmm(F.gelu(torch.bmm(h, w1)), w2).reshape(M, b, T, d)
        h = self._rms(x, params[i]).reshape(M, b * T, d)
        logits = torch.bmm(h, params[i + 1])
        ce = F.cross_entropy(logits.reshape(-1, V), tgt.reshape(-1), reduction="none")
        return ce.reshape(M, b * T).mean(1)

    def eval_batch(self, split: str) -> Batch:
        if split not in self._eval:
            raise ValueError(f"{self.name} has no {split!r} split; use tuning_task() for 'val'")
        return (self._eval[split],)

    def tuning_task(self) -> TinyLMTask:
        out = copy.copy(self)
        cut = int(len(self.train_ids) * (1 - VAL_FRACTION / 2))
        out.train_ids = self.train_ids[:cut]
        g = torch.Generator().manual_seed(4321)
        out._eval = {"train": out._windows(out.train_ids, 64, g), "val": out._windows(self.train_ids[cut:], 64, g),
                     "heldout": self._eval["heldout"]}
        return out


# ------------------------------------------------------------------------------------------------- registry
TASKS: dict[str, Callable[[], Task]] = {
    "digits-mlp32": lambda: MLPTask("digits-mlp32", "digits", (32,)),
    "digits4x4-mlp32": lambda: MLPTask("digits4x4-mlp32", "digits4x4", (32,)),
    "digits-mlp128": lambda: MLPTask("digits-mlp128", "digits", (128,)),
    "digits-mlp64x2": lambda: MLPTask("digits-mlp64x2", "digits", (64, 64)),
    "digits-mlp16": lambda: MLPTask("digits-mlp16", "digits", (16,)),
    "digits-mlp64": lambda: MLPTask("digits-mlp64", "digits", (64,)),
    "digits4x4-mlp64": lambda: MLPTask("digits4x4-mlp64", "digits4x4", (64,)),
    "cancer-mlp32": lambda: MLPTask("cancer-mlp32", "cancer", (32,)),
    "wine-mlp32": lambda: MLPTask("wine-mlp32", "wine", (32,), batch_size=32),
    "iris-mlp16": lambda: MLPTask("iris-mlp16", "iris", (16,), batch_size=32),
    "english-lm": lambda: TinyLMTask("english-lm", "english"),
    "german-lm": lambda: TinyLMTask("german-lm", "german"),
    "code-lm": lambda: TinyLMTask("code-lm", "code"),
}
BENCH_TASKS = ("digits-mlp128", "cancer-mlp32", "code-lm")
#: the default meta-training distribution: MLPs of widths 16-64 and depths 1-2 on four data sets, and a transformer
#: LM; none of the benchmark's held-out tasks (tests/test_lopt_meta_train.py checks this); the first task is where
#: meta-training's periodic evaluation runs
META_TRAIN_TASKS = ("digits-mlp32", "digits-mlp16", "digits-mlp64", "digits4x4-mlp64", "digits-mlp64x2",
                    "wine-mlp32", "iris-mlp16", "english-lm")


def get_task(name: str) -> Task:
    """The task called ``name``.

    Raises:
        MoecptError: unknown name (the message lists the available tasks).
    """
    if name not in TASKS:
        raise MoecptError(f"unknown lopt task {name!r}; use one of: {', '.join(TASKS)}")
    return TASKS[name]()
