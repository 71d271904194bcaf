"""Per-step MoE diagnostics and metric sinks.

Every MoE run logs, per MoE layer and as the mean over layers (docs/design.md, rule D1): the unweighted and weighted
load-balancing loss, z-loss, MRI (Thérien et al. 2025), max/mean load, dead experts, routing entropy, dropped-token
fraction and, with bias balancing, bias statistics. Aux losses are always reported apart from cross-entropy.
Cross-rank reduction of each metric (rule D2): counts are summed before MRI/load are computed; losses are averaged.

The sinks (``metrics.jsonl``, TensorBoard, Weights & Biases) are training-loop callbacks fed the same records.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from moecpt.config import WandbMode
from moecpt.errors import MoecptError
from moecpt.model.routing import RouterOutput, entropy_nats
from moecpt.train.callbacks import CallbackBase, RunInfo
from moecpt.train.reduce import Metric, ReduceType


class RoutingAccumulator:
    """Sums routing statistics of one optimizer step over micro-batches, per MoE layer.

    ``add(routing)`` after each micro-batch forward; ``summary()`` gives the step's diagnostics. The sums stay on
    the routing tensors' device (float64, int64 counts; float32 on MPS, which has no float64) until
    :meth:`as_metrics` or :meth:`summary` reads them, so a step costs one device-to-host copy per statistic, not
    one per layer and micro-batch.
    """

    def __init__(self) -> None:
        self.counts: list[torch.Tensor] = []  # per layer [E] routed slots
        self.tokens = 0
        self.k: list[int] = []
        self.sums: dict[str, list[torch.Tensor | float]] = {}  # key -> per layer sum over micro-batches
        self.n = 0

    def add(self, routing: list[RouterOutput]) -> None:
        if not routing:
            return
        T = routing[0].topk_idx_TK.shape[0]
        self.tokens += T
        self.n += 1
        for i, r in enumerate(routing):
            c = r.tokens_per_expert_E.detach().long()
            if len(self.counts) <= i:
                self.counts.append(c.clone())
                self.k.append(r.topk_idx_TK.shape[1])
            else:
                self.counts[i] += c
            f = torch.float32 if c.device.type == "mps" else torch.float64
            lb, z = r.aux_losses["load_balancing"].detach().to(f), r.aux_losses["z_loss"].detach().to(f)
            vals = {
                "lb_loss": lb,
                "lb_loss_weighted": lb * r.aux_weights.get("load_balancing", 0.0),
                "z_loss": z,
                "z_loss_weighted": z * r.aux_weights.get("z_loss", 0.0),
                # a non-finite step gives NaN here (logged, then skipped or stopped by the trainer), not an error
                "routing_entropy": entropy_nats(_renormalised(r.scores_TE.detach().to(f))),
                "dropped_fraction": (r.dropped_fraction.detach().to(f) if isinstance(r.dropped_fraction, torch.Tensor)
                                     else lb.new_tensor(float(r.dropped_fraction or 0.0))),
            }
            if "seq_balance" in r.aux_losses:  # DeepSeek-V3's sequence-wise loss, when its weight is on
                sb = r.aux_losses["seq_balance"].detach().to(f)
                vals.update(seq_balance=sb, seq_balance_weighted=sb * r.aux_weights.get("seq_balance", 0.0))
            for key, v in vals.items():
                lst = self.sums.setdefault(key, [])
                if len(lst) <= i:
                    lst.append(v)
                else:
                    lst[i] = lst[i] + v

    def _host_sums(self) -> dict[str, list[float]]:
        return {k: torch.stack([torch.as_tensor(v) for v in vals]).to("cpu", torch.float64).tolist()
                if vals and isinstance(vals[0], torch.Tensor) else list(vals) for k, vals in self.sums.items()}

    def as_metrics(self) -> dict[str, Metric]:
        """The step's routing totals as :class:`~moecpt.train.reduce.Metric` s, all summed across workers (counts
        before ratios, docs/design.md, rule D2): token and micro-batch totals, per-layer counts, per-layer loss
        sums. Rebuilt with :meth:`from_reduced`."""
        out = {"routing/tokens": Metric(self.tokens, ReduceType.SUM), "routing/n": Metric(self.n, ReduceType.SUM)}
        out |= {f"routing/counts/{i}": Metric(c, ReduceType.SUM) for i, c in enumerate(self.counts)}
        out |= {f"routing/sums/{k}": Metric(torch.tensor(v, dtype=torch.float64), ReduceType.SUM)
                for k, v in sorted(self._host_sums().items())}
        return out

    @classmethod
    def from_reduced(cls, reduced: dict[str, torch.Tensor], like: "RoutingAccumulator") -> "RoutingAccumulator":
        """The accumulator of the global batch from :func:`~moecpt.train.reduce.reduce_metrics` of
        :meth:`as_metrics`; ``like`` (a local accumulator) gives the layer count and top-k."""
        out = cls()
        out.tokens, out.n, out.k = int(reduced["routing/tokens"][0]), int(reduced["routing/n"][0]), list(like.k)
        out.counts = [reduced[f"routing/counts/{i}"].clone() for i in range(len(like.counts))]
        out.sums = {k: reduced[f"routing/sums/{k}"].tolist() for k in sorted(like.sums)}
        return out

    def summary(self) -> dict[str, Any]:
        """Per-layer lists (``*_layers``) and layer means; empty dict for a dense model."""
        if not self.counts:
            return {}
        out: dict[str, Any] = {}
        counts = [c.to("cpu", torch.float64) for c in self.counts]
        per_layer: dict[str, list[float]] = {k: [v / self.n for v in vals] for k, vals in self._host_sums().items()}
        per_layer["mri"] = [float(c.max() / self.tokens) for c in counts]
        per_layer["load_max_over_mean"] = [float(c.max() / c.mean()) if c.sum() > 0 else math.nan for c in counts]
        per_layer["dead_experts"] = [int((c == 0).sum()) for c in counts]
        for key, vals in per_layer.items():
            out[f"{key}_mean"] = sum(vals) / len(vals)
            out[f"{key}_layers"] = vals
        out["tokens_per_expert_layers"] = [(c / self.tokens).tolist() for c in counts]
        return out


def _renormalised(scores_TE: torch.Tensor) -> torch.Tensor:
    """Scores as per-token distributions (sigmoid routers' scores do not sum to 1)."""
    return scores_TE / scores_TE.sum(dim=1, keepdim=True).clamp_min(1e-30)


def flat_scalars(record: dict[str, Any]) -> dict[str, float]:
    """Dashboard tags for one ``metrics.jsonl`` record, grouped so that a dashboard stays usable:

    * train records: ``train/loss``, ``train/lr``, ... ; per-layer lists become ``train_layers/mri/layer_00``, ...;
      number-valued dicts one tag per key (``train/tokens_per_source/<source>``);
      ``tokens_per_expert_layers`` (one vector per layer) is left to ``metrics.jsonl``;
    * validation records: ``val/<source>/loss``, ``val/<source>/mri_mean``, ...;
    * events: ``events/<event>/<key>``; communication counters (``comm_*``): ``comm/<key>``.

    NaN is passed on (both dashboards draw it as a gap); strings, booleans and ``None`` are left out.
    """
    if record.get("split") == "val":
        prefix = f"val/{record.get('source')}/"
    elif "event" in record:
        prefix = f"events/{record['event']}/"
    else:
        prefix = "train/"
    out: dict[str, float] = {}
    for key, v in record.items():
        if key in ("step", "split", "source", "event", "tokens_per_expert_layers"):
            continue
        if key.startswith("comm_"):
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[f"comm/{key[5:]}"] = float(v)
            continue
        if isinstance(v, bool) or v is None:
            continue
        if isinstance(v, (int, float)):
            out[prefix + key] = float(v)
        elif isinstance(v, dict) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v.values()):
            out.update({f"{prefix}{key}/{k}": float(x) for k, x in v.items()})  # e.g. train/tokens_per_source/code
        elif isinstance(v, list) and key.endswith("_layers") and all(isinstance(x, (int, float)) for x in v):
            group = prefix.rstrip("/") + "_layers/" + key[: -len("_layers")]
            out.update({f"{group}/layer_{i:02d}": float(x) for i, x in enumerate(v)})
    return out


class JsonlSink(CallbackBase):
    """Append-only ``metrics.jsonl``: one JSON object per line, flushed every write.

    On resume :meth:`truncate_after` drops entries logged after the checkpoint being resumed from, so the file
    equals an uninterrupted run's. The trainer writes every record of step ``N`` (train, val) *before* it saves
    checkpoint ``N``, so records with ``step <= N`` belong to the resumed history and are kept.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fh = None

    def truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        keep = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a kill
            if rec.get("step", -1) <= step:
                keep.append(line)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(k + "\n" for k in keep), encoding="utf-8")
        tmp.replace(self.path)

    def write(self, record: dict[str, Any]) -> None:
        if self._fh is None:
            self._fh = open(self.path, "ab", buffering=0)
        # One unbuffered write per record: a text buffer splits a long record (per-layer vectors) into 8 KiB
        # writes, and a reader polling the file (a dashboard, a test) could see half a line.
        line = memoryview((json.dumps(record, allow_nan=True) + "\n").encode("utf-8"))
        while line:
            line = line[self._fh.write(line):]  # a raw write may be short (a full disk, a signal)

    on_record = write

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


class TensorBoardSink(CallbackBase):
    """TensorBoard event files in ``RUN/tensorboard`` (``train.tensorboard = true``), the same records as
    ``metrics.jsonl`` with :func:`flat_scalars` tags; ``x`` = optimizer step. A resumed run purges the events
    after its checkpoint's step, as ``metrics.jsonl`` is truncated.

    Raises:
        MoecptError: the ``tensorboard`` package is missing (``pip install 'moecpt[tensorboard]'``).
    """

    def __init__(self, log_dir: Path, purge_after: int | None = None):
        SummaryWriter = _tensorboard_writer()
        self.writer = SummaryWriter(str(log_dir), purge_step=None if purge_after is None else purge_after + 1)

    def on_run_start(self, info: RunInfo) -> None:
        self.writer.add_text("config", "```\n" + json.dumps(info.config, indent=2) + "\n```", info.start_step)

    def on_record(self, record: dict[str, Any]) -> None:
        for tag, v in flat_scalars(record).items():
            self.writer.add_scalar(tag, v, record["step"])

    def close(self) -> None:
        self.writer.close()


def _tensorboard_writer():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise MoecptError("train.tensorboard = true needs the tensorboard package: pip install 'moecpt[tensorboard]' "
                          "(or pip install tensorboard), or set train.tensorboard = false") from None
    return SummaryWriter


class WandbSink(CallbackBase):
    """Weights & Biases logging (``train.wandb = true``), offline unless ``train.wandb_mode = "online"``.

    The run id is derived from the run folder's identity, so a resumed run continues the same W&B run
    (``resume="allow"``); records are the same as ``metrics.jsonl`` with :func:`flat_scalars` keys.

    Raises:
        MoecptError: the ``wandb`` package is missing (``pip install 'moecpt[wandb]'``).
    """

    def __init__(self, run_dir: Path, project: str, name: str, run_id: str, mode: WandbMode, config: dict):
        wandb = _wandb_module()
        (Path(run_dir) / "wandb").mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=project, name=name, id=run_id, resume="allow", dir=str(run_dir),
                              mode=WandbMode(mode).value, config=config, settings=wandb.Settings(quiet=True))

    def on_record(self, record: dict[str, Any]) -> None:
        self.run.log(flat_scalars(record), step=int(record["step"]))

    def close(self) -> None:
        self.run.finish()


def _wandb_module():
    try:
        import wandb
    except ImportError:
        raise MoecptError("train.wandb = true needs the wandb package: pip install 'moecpt[wandb]' "
                          "(or pip install wandb), or set train.wandb = false") from None
    return wandb


def check_sink_packages(tensorboard: bool, wandb: bool) -> None:
    """Fail before a run starts when a requested sink's package is missing (one line naming the extra)."""
    if tensorboard:
        _tensorboard_writer()
    if wandb:
        _wandb_module()
