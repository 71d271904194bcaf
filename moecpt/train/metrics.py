"""Per-step MoE diagnostics and metric sinks.

Every MoE run logs, per MoE layer and as the mean over layers (GUIDE.md, "Diagnostics"): the unweighted and weighted
load-balancing loss, z-loss, MRI (Thérien et al. 2025), max/mean load, dead experts, routing entropy, dropped-token
fraction and, with bias balancing, bias statistics. Aux losses are always reported apart from cross-entropy.
Cross-rank reduction of each metric: counts are summed before MRI/load are computed; losses are averaged.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from moecpt.model.routing import RouterOutput, routing_entropy


class RoutingAccumulator:
    """Sums routing statistics of one optimizer step over micro-batches, per MoE layer.

    ``add(routing)`` after each micro-batch forward; ``summary()`` gives the step's diagnostics.
    """

    def __init__(self) -> None:
        self.counts: list[torch.Tensor] = []  # per layer [E] routed slots
        self.tokens = 0
        self.k: list[int] = []
        self.sums: dict[str, list[float]] = {}
        self.n = 0

    def add(self, routing: list[RouterOutput]) -> None:
        if not routing:
            return
        T = routing[0].topk_idx_TK.shape[0]
        self.tokens += T
        self.n += 1
        for i, r in enumerate(routing):
            c = r.tokens_per_expert_E.detach().to("cpu", torch.float64)
            lb, z = float(r.aux_losses["load_balancing"].detach()), float(r.aux_losses["z_loss"].detach())
            if len(self.counts) <= i:
                self.counts.append(c)
                self.k.append(r.topk_idx_TK.shape[1])
            else:
                self.counts[i] += c
            vals = {
                "lb_loss": lb,
                "lb_loss_weighted": lb * r.aux_weights.get("load_balancing", 0.0),
                "z_loss": z,
                "z_loss_weighted": z * r.aux_weights.get("z_loss", 0.0),
                "routing_entropy": routing_entropy(r.scores_TE.detach()),
                "dropped_fraction": float(r.dropped_fraction) if r.dropped_fraction is not None else 0.0,
            }
            for key, v in vals.items():
                lst = self.sums.setdefault(key, [])
                if len(lst) <= i:
                    lst.append(0.0)
                lst[i] += v

    def summary(self) -> dict[str, Any]:
        """Per-layer lists (``*_layers``) and layer means; empty dict for a dense model."""
        if not self.counts:
            return {}
        out: dict[str, Any] = {}
        per_layer: dict[str, list[float]] = {k: [v / self.n for v in vals] for k, vals in self.sums.items()}
        per_layer["mri"] = [float(c.max() / self.tokens) for c in self.counts]
        per_layer["load_max_over_mean"] = [float(c.max() / c.mean()) if c.sum() > 0 else math.nan for c in self.counts]
        per_layer["dead_experts"] = [int((c == 0).sum()) for c in self.counts]
        for key, vals in per_layer.items():
            out[f"{key}_mean"] = sum(vals) / len(vals)
            out[f"{key}_layers"] = vals
        out["tokens_per_expert_layers"] = [(c / self.tokens).tolist() for c in self.counts]
        return out


class JsonlSink:
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
            self._fh = open(self.path, "a", encoding="utf-8")
        self._fh.write(json.dumps(record, allow_nan=True) + "\n")
        self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


class TensorBoardSink:
    """Optional TensorBoard scalars (``train.tensorboard = true``); local files only."""

    def __init__(self, log_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:  # tensorboard not installed
            from moecpt.errors import MoecptError

            raise MoecptError("train.tensorboard = true needs the tensorboard package: pip install tensorboard") from exc
        self.writer = SummaryWriter(str(log_dir))

    def write(self, record: dict[str, Any]) -> None:
        prefix = f"val/{record['source']}/" if record.get("split") == "val" else "train/"
        for k, v in record.items():
            if isinstance(v, (int, float)) and k != "step":
                self.writer.add_scalar(prefix + k, v, record["step"])

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """Optional Weights & Biases logging (``train.wandb = true``); the only sink that may use the network."""

    def __init__(self, project: str, name: str, config: dict):
        try:
            import wandb
        except ImportError as exc:
            from moecpt.errors import MoecptError

            raise MoecptError("train.wandb = true needs the wandb package: pip install wandb") from exc
        self.run = wandb.init(project=project, name=name, config=config)

    def write(self, record: dict[str, Any]) -> None:
        prefix = f"val/{record['source']}/" if record.get("split") == "val" else "train/"
        self.run.log({prefix + k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record["step"])

    def close(self) -> None:
        self.run.finish()
