"""Evaluate checkpoints on held-out data: validation loss per source, routing tables and routing metrics.

``collect(model, batches)`` runs a model in eval mode over held-out batches and keeps, per MoE layer, the top-k
routing table ``[N, K]`` of every token (N = tokens evaluated) with the token ids ``[N]``; the metrics of
:mod:`moecpt.analysis.routing_metrics` are then computed on these tables (Thérien et al. 2025, Sec. 4).
Comparing two checkpoints (CRS, CVS) evaluates both on the *same* tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moecpt.analysis import routing_metrics as rm
from moecpt.data.mixture import val_batches
from moecpt.data.prepared import PreparedData
from moecpt.errors import MoecptError
from moecpt.train.checkpoint import load_checkpoint, load_model
from moecpt.train.trainer import lm_loss


@dataclass
class RoutingTrace:
    """What one checkpoint did on one source's held-out tokens.

    Attributes:
        loss: mean next-token cross-entropy (nats), aux losses excluded.
        token_ids_N: ``[N]`` int64 input token ids, in evaluation order.
        topk_layers: one ``[N, K]`` int64 routing table per MoE layer (empty for a dense model).
        num_experts: routed experts per MoE layer.
        layer_indices: the transformer layer index of each MoE layer.
    """

    loss: float
    token_ids_N: torch.Tensor
    topk_layers: list[torch.Tensor]
    num_experts: int
    layer_indices: list[int]


@torch.no_grad()
def collect(model, batches: list[torch.Tensor], device: torch.device | str = "cpu") -> RoutingTrace:
    """Evaluate ``model`` on ``batches`` (each ``[B, T+1]``) and keep the routing tables.

    Routing is plain top-k of the logits in eval mode (the Sinkhorn router's training-time balancing is off, as
    at inference). Loss is cross-entropy only.
    """
    model.eval()
    total, count = 0.0, 0
    ids, tables = [], None
    for b in batches:
        b = b.to(device)
        logits, routing = model(b[:, :-1], return_routing=True)
        total += lm_loss(logits, b[:, 1:]).item() * b[:, 1:].numel()
        count += b[:, 1:].numel()
        ids.append(b[:, :-1].reshape(-1).cpu())
        if tables is None:
            tables = [[] for _ in routing]
        for i, r in enumerate(routing):
            tables[i].append(r.topk_idx_TK.cpu())
    routers = model.routers()
    return RoutingTrace(
        loss=total / max(count, 1),
        token_ids_N=torch.cat(ids) if ids else torch.zeros(0, dtype=torch.long),
        topk_layers=[torch.cat(t) for t in (tables or [])],
        num_experts=routers[0].num_experts if routers else 0,
        layer_indices=model.moe_layer_indices(),
    )


def routing_summary(trace: RoutingTrace, batch_tokens: int) -> dict[str, Any]:
    """MRI per layer (and its distribution over batches of ``batch_tokens``), tokens-per-expert fractions,
    and co-activation matrices (k > 1) of one trace. Empty dict for a dense model."""
    if not trace.topk_layers:
        return {}
    E = trace.num_experts
    mri = [rm.max_routing_imbalance(t, E) for t in trace.topk_layers]
    per_batch = [rm.mri_per_batch(t, E, batch_tokens) for t in trace.topk_layers]
    out: dict[str, Any] = {
        "mri_layers": mri,
        "mri_mean": sum(mri) / len(mri),
        "mri_batch_quantiles_layers": [
            {q: float(torch.quantile(x.float(), float(q))) for q in ("0.1", "0.5", "0.9")} for x in per_batch
        ],
        "expert_fractions_layers": [rm.expert_fractions(t, E).tolist() for t in trace.topk_layers],
        "top_k": trace.topk_layers[0].shape[1],
        "num_experts": E,
        "layer_indices": trace.layer_indices,
    }
    if out["top_k"] > 1:
        out["coactivation_layers"] = [rm.coactivation(t, E).tolist() for t in trace.topk_layers]
    return out


def compare_traces(before: RoutingTrace, after: RoutingTrace) -> dict[str, Any]:
    """Continual Router Saturation and Continual Vocabulary Specialization per MoE layer between two checkpoints
    evaluated on the same tokens (Thérien et al. 2025, Sec. 4).

    Raises:
        MoecptError: the traces come from models of different routing shapes or from different tokens.
    """
    if len(before.topk_layers) != len(after.topk_layers) or before.num_experts != after.num_experts:
        raise MoecptError(
            f"cannot compare routing of models with {len(before.topk_layers)} MoE layers x {before.num_experts} "
            f"experts and {len(after.topk_layers)} x {after.num_experts}; compare checkpoints of one architecture")
    if not before.topk_layers:
        raise MoecptError("both checkpoints are dense models; routing comparison needs MoE checkpoints")
    if not torch.equal(before.token_ids_N, after.token_ids_N):
        raise MoecptError("the two traces were evaluated on different tokens; evaluate both on the same data")
    if before.topk_layers[0].shape[1] != after.topk_layers[0].shape[1]:
        raise MoecptError("the two checkpoints route to different top-k; compare checkpoints of one architecture")
    E = before.num_experts
    crs = [rm.router_saturation(a, b, E) for a, b in zip(before.topk_layers, after.topk_layers)]
    cvs = [rm.vocab_specialization(before.token_ids_N, a, b, E) for a, b in zip(before.topk_layers,
                                                                               after.topk_layers)]
    return {
        "crs_layers": crs,
        "crs_mean": sum(crs) / len(crs),
        "cvs_layers": [c["cvs"] for c in cvs],
        "cvs_self_layers": [c["cvs_self"] for c in cvs],
        "cvs_mean": sum(c["cvs"] for c in cvs) / len(cvs),
        "chance_overlap": before.topk_layers[0].shape[1] / E,
        "layer_indices": before.layer_indices,
    }


def eval_batches_for(data, sources: list[str], seq_len: int, batch_size: int, max_batches: int
                     ) -> dict[str, list[torch.Tensor]]:
    """Held-out batches per source (deterministic) from a :class:`moecpt.data.prepared.PreparedData`."""
    unknown = [s for s in sources if s not in data.source_names]
    if unknown:
        raise MoecptError(f"source(s) {unknown} not in {data.path}; available: {', '.join(data.source_names)}")
    return {s: val_batches(data, s, seq_len, batch_size, max_batches) for s in sources}


def evaluate_checkpoint(checkpoint: str | Path, data_path: str, sources: list[str] | None = None,
                        seq_len: int | None = None, batch_size: int = 16, max_batches: int = 8,
                        device: str = "cpu") -> tuple[dict[str, Any], dict[str, RoutingTrace]]:
    """Validation loss and routing diagnostics of one checkpoint on each source's held-out split.

    Returns:
        ``(report, traces)``: ``report = {checkpoint, step, sources: {name: {loss, mri_mean, ...}}}``, and the raw
        traces per source (for comparisons).

    Raises:
        MoecptError: an unreadable checkpoint or data folder, a data tokenizer larger than the model's vocabulary,
            ``seq_len`` below 1 or above the model's ``max_seq_len`` (both numbers named), ``batch_size`` or
            ``max_batches`` below 1, or an unknown source.
    """
    for name, value in (("--seq-len", seq_len), ("--batch-size", batch_size), ("--batches", max_batches)):
        if value is not None and value < 1:
            raise MoecptError(f"{name} {value} must be a whole number >= 1")
    ck = load_checkpoint(checkpoint)
    data = PreparedData.open(data_path)
    model = load_model(ck.path, device=device)
    ck_tok = ck.meta.get("tokenizer_sha256")
    if ck_tok is not None and ck_tok != data.tokenizer_sha256:  # its losses would mean nothing
        raise MoecptError(f"{data.path} was prepared with another tokenizer (sha256 {data.tokenizer_sha256[:12]}) "
                          f"than {ck.path} was trained with ({ck_tok[:12]}); evaluate on data prepared with the run's "
                          "tokenizer (data prepare --tokenizer RUN/tokenizer.json)")
    if data.vocab_size > model.cfg.vocab_size:
        raise MoecptError(f"the data's tokenizer ({data.vocab_size} tokens) does not match the model "
                          f"({model.cfg.vocab_size}); evaluate on data prepared with the run's tokenizer")
    if seq_len is not None and seq_len > model.cfg.max_seq_len:
        raise MoecptError(f"--seq-len {seq_len} exceeds the model's max_seq_len={model.cfg.max_seq_len} "
                          f"({ck.path}); give --seq-len {model.cfg.max_seq_len} or less")
    seq_len = seq_len or min(model.cfg.max_seq_len, ck.meta.get("recipe", {}).get("data", {}).get("seq_len", 128))
    batches = eval_batches_for(data, sources or data.source_names, seq_len, batch_size, max_batches)
    report: dict[str, Any] = {"checkpoint": str(ck.path), "step": ck.step, "seq_len": seq_len, "sources": {}}
    traces = {}
    for source, bs in batches.items():
        trace = collect(model, bs, device)
        traces[source] = trace
        report["sources"][source] = {"loss": trace.loss, "tokens": int(trace.token_ids_N.numel()),
                                     **routing_summary(trace, batch_size * seq_len)}
    return report, traces
