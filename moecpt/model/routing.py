"""Routers and balancing strategies for MoE layers.

One router = a bias-free linear map ``d_model -> E`` plus a balancing strategy (docs/design.md, rule R1):

* ``penalty``  PBTk (Thérien et al. 2025, arXiv 2503.05029, Sec. 3.2): softmax scores, top-k by score,
  loss += 0.01 * Switch load-balancing loss (Fedus et al. 2022, eq. 4) + 0.001 * router z-loss (Zoph et al. 2022,
  ST-MoE eq. 5).
* ``sinkhorn`` SBTk (Clark et al. 2022; Megatron-LM / GPT-NeoX reference): during training only, top-k of the
  Sinkhorn-Knopp balanced matrix (no gradient); gates from the raw logits (softmax for k > 1, sigmoid for k = 1);
  plain top-k of the logits in evaluation.
* ``bias``     DeepSeek-V3 auxiliary-loss-free balancing (Wang et al. 2024, arXiv 2408.15664; DeepSeek-AI 2024,
  arXiv 2412.19437 Sec. 2.1.2): a per-expert bias added to the scores for *selection only*, updated once per
  optimizer step by ``gamma * sign(mean_load - load_i)``; a persistent buffer, so CPT carries it. With
  ``score_fn = "sigmoid"``, ``n_group`` / ``topk_group`` and ``routed_scale`` this is DeepSeek-V3 routing as a whole
  (eqs. 12-16; transformers' ``DeepseekV3TopkRouter`` / ``Glm4MoeTopkRouter``), optionally with the
  sequence-wise balance loss (eqs. 17-20, ``seq_aux_loss_weight``).
* ``none``     plain softmax top-k.

``score_fn = "sigmoid"`` and group-limited selection (:func:`group_limited_topk`) apply to ``penalty`` and ``none``
too; with the defaults (softmax, one group, scale 1, no sequence loss) every router computes what it did before.

All routing math runs in fp32 (autocast disabled), whatever the model's compute dtype.
Every router returns one :class:`RouterOutput`; aux losses are named scalars on it, never stored in a global.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from moecpt.config import GroupScore, RouterConfig, RouterKind, ScoreFn
from moecpt.errors import MoecptError


# ------------------------------------------------------------------------------------------------ pure functions
@torch.no_grad()
def sinkhorn(logits_TE: torch.Tensor, tol: float = 0.01, max_iter: int = 100) -> torch.Tensor:
    """Sinkhorn-Knopp balancing of ``exp(logits)`` (Clark et al. 2022, "Unified Scaling Laws for Routed LMs", App. A).

    Alternately rescales rows and columns of ``C = exp(logits)`` so that rows sum to ``1/T`` and columns to ``1/E``
    (a doubly-stochastic plan between tokens and experts with uniform expert marginals). Iterates until the mean
    absolute change of the column scaling ``d1`` is below ``tol`` or ``max_iter`` is reached. Initialisation as in
    the Megatron-LM reference: ``d0 = 1/(T * row sums)`` then ``d1 = 1/(E * column sums)``.

    The tolerance depends on the gauge of ``d1``. Here (as in Megatron-Core, which starts from ``d0 = d1 = 1`` and
    reaches this state after one sweep) ``d1`` is of order 1, so the paper's 0.01 (Thérien et al. 2025, arXiv
    2503.05029) is about a 1% mean relative change per sweep. In GPT-NeoX's gauge (``d1 = 1/(E * colsum(exp
    logits))`` without the row scaling first) ``d1`` is far smaller and 0.01 is met after one sweep.

    Args:
        logits_TE: ``[T, E]`` router logits (any float dtype; computed in fp32).
        tol: convergence tolerance on ``mean |d1 - d1_prev|`` (paper: 0.01).
        max_iter: maximum number of row+column sweeps.

    Returns:
        ``[T, E]`` fp32 balanced matrix ``diag(d0) C diag(d1)``; its column sums are equal (``1/E``) within ``tol``.
        No gradient flows through it (selection only).
    """
    if logits_TE.dim() != 2:
        raise ValueError(f"sinkhorn expects [T, E] logits, got shape {tuple(logits_TE.shape)}")
    T, E = logits_TE.shape
    # Subtracting each row's max is a row rescaling of C, which Sinkhorn's d0 absorbs: it avoids exp overflow.
    logits = logits_TE.float()
    cost_TE = torch.exp(logits - logits.max(dim=1, keepdim=True).values)
    eps = 1e-12
    d0_T = 1.0 / (T * (cost_TE.sum(dim=1) + eps))
    d1_E = 1.0 / (E * ((d0_T[:, None] * cost_TE).sum(dim=0) + eps))
    for _ in range(max_iter):
        d0_T = 1.0 / (T * ((cost_TE * d1_E[None, :]).sum(dim=1) + eps))
        d1_new_E = 1.0 / (E * ((d0_T[:, None] * cost_TE).sum(dim=0) + eps))
        err = (d1_new_E - d1_E).abs().mean()
        d1_E = d1_new_E
        if err < tol:
            break
    return d0_T[:, None] * cost_TE * d1_E[None, :]


def load_balancing_loss(probs_TE: torch.Tensor, topk_idx_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Switch Transformer auxiliary load-balancing loss, normalised so that 1.0 means perfectly balanced.

    ``L = E * sum_i f_i * P_i`` (Fedus et al. 2022, eq. 4) with ``f_i`` the share of the ``T*K`` routed slots
    assigned to expert ``i`` (a count, no gradient) and ``P_i`` the mean router probability of ``i`` over tokens
    (carries the gradient to the router). Because ``sum_i f_i = 1`` for any ``k``, uniform routing gives exactly 1.0
    and total collapse onto one expert with probability 1 gives ``E``.

    Args:
        probs_TE: ``[T, E]`` router probabilities (softmax of the logits; must not be softmaxed again).
        topk_idx_TK: ``[T, K]`` chosen experts.
        num_experts: ``E``.

    Returns:
        fp32 scalar.
    """
    T, K = topk_idx_TK.shape
    counts_E = torch.bincount(topk_idx_TK.reshape(-1), minlength=num_experts).to(torch.float32)
    f_E = counts_E / max(T * K, 1)
    P_E = probs_TE.float().mean(dim=0)
    return num_experts * torch.sum(f_E * P_E)


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """Router z-loss (Zoph et al. 2022, ST-MoE, eq. 5): mean over tokens of ``logsumexp(logits)^2``.

    Args:
        logits_TE: ``[T, E]`` raw router logits.

    Returns:
        fp32 scalar.
    """
    return torch.logsumexp(logits_TE.float(), dim=-1).square().mean()


@torch.no_grad()
def group_limited_topk(choice_TE: torch.Tensor, top_k: int, n_group: int, topk_group: int,
                       group_score: GroupScore = GroupScore.TOP2_SUM) -> torch.Tensor:
    """Group-limited top-k (DeepSeek-V2, arXiv 2405.04434, Sec. 2.1.2; DeepSeek-V3, arXiv 2412.19437, Sec. 2.1.2).

    The ``E`` experts form ``n_group`` consecutive groups of ``E / n_group``; a group scores the sum of its two
    highest choice scores (DeepSeek-V3's ``noaux_tc``) or, with ``group_score = "max"``, its highest one
    (DeepSeek-V2's ``group_limited_greedy``); each token keeps its ``topk_group`` best groups and takes the
    top-``top_k`` experts inside them. Same ops, hence same ties, as transformers' ``Glm4MoeTopkRouter`` /
    ``DeepseekV2TopkRouter`` (which masks with 0 instead of -inf: the same choice for positive softmax scores).

    Args:
        choice_TE: ``[T, E]`` selection scores (DeepSeek-V3: ``sigmoid(logits) + expert_bias``), fp32.
        top_k: ``K``; n_group: groups (divides ``E``, groups of >= 2); topk_group: groups kept per token.

    Returns:
        ``[T, K]`` int64 chosen experts (unsorted, as transformers returns them).
    """
    T, E = choice_TE.shape
    grouped_TGE = choice_TE.view(T, n_group, E // n_group)
    if group_score == GroupScore.MAX:
        group_TG = grouped_TGE.max(dim=-1).values
    else:
        group_TG = grouped_TGE.topk(2, dim=-1)[0].sum(dim=-1)
    keep_TG = torch.zeros_like(group_TG).scatter_(1, torch.topk(group_TG, k=topk_group, dim=-1, sorted=False)[1], 1)
    keep_TE = keep_TG.unsqueeze(-1).expand(T, n_group, E // n_group).reshape(T, E).bool()
    return torch.topk(choice_TE.masked_fill(~keep_TE, float("-inf")), k=top_k, dim=-1, sorted=False)[1]


def sequence_balance_loss(probs_TE: torch.Tensor, topk_idx_TK: torch.Tensor, seq_len: int) -> torch.Tensor:
    """DeepSeek-V3's complementary sequence-wise balance loss (arXiv 2412.19437, eqs. 17-20), without its alpha.

    Per sequence of ``seq_len`` tokens: ``sum_i f_i P_i`` with ``f_i = E / (K T) * #{t: i in top-k(t)}`` and
    ``P_i`` the mean over the sequence of the token-normalised scores ``s'_{i,t} = s_{i,t} / sum_j s_{j,t}``;
    averaged over the sequences. As :func:`load_balancing_loss` it reads 1.0 at balance for any ``K``
    (docs/design.md, rule R3); the gradient flows through ``P`` only.

    Args:
        probs_TE: ``[T, E]`` token-normalised scores (rows sum to one), differentiable; ``T = B * seq_len``.
        topk_idx_TK: ``[T, K]`` chosen experts.
        seq_len: tokens per sequence (rows ``b * seq_len ... (b + 1) * seq_len - 1`` are sequence ``b``).

    Raises:
        ValueError: ``T`` is not a multiple of ``seq_len``.
    """
    T, E = probs_TE.shape
    K = topk_idx_TK.shape[1]
    if seq_len < 1 or T % seq_len:
        raise ValueError(f"sequence_balance_loss: {T} tokens are not whole sequences of {seq_len}")
    B = T // seq_len
    counts_BE = torch.zeros(B, E, device=probs_TE.device).scatter_add_(
        1, topk_idx_TK.reshape(B, seq_len * K), torch.ones(B, seq_len * K, device=probs_TE.device))
    f_BE = counts_BE * (E / (K * seq_len))
    P_BE = probs_TE.float().view(B, seq_len, E).mean(dim=1)
    return (f_BE * P_BE).sum(dim=-1).mean()


class _SoftmaxRouting(torch.autograd.Function):
    """Softmax scores, top-k gates, Switch load-balancing loss and router z-loss in one autograd node.

    Same values as ``softmax`` -> ``gather`` (-> renormalise) -> :func:`load_balancing_loss` /
    :func:`router_z_loss`, with the backward written out: through autograd these ~20 small ``[T, E]`` ops cost more
    than the router's matmul on CPU. ``logsumexp`` comes from the softmax itself:
    ``lse = logits[t, i] - log(softmax[t, i])`` at the row's largest score (at least ``1/E``, so the log is safe).

    Backward, with ``G = dL/dscores`` (the scattered gate gradients plus ``g_lb * E * f_E / T``):
    ``dL/dlogits = s * (G - <G, s>) + (2 * g_z / T) * lse * s`` (softmax and logsumexp derivatives).
    """

    @staticmethod
    def forward(ctx, logits_TE, topk_idx_TK, top_k: int, renormalize: bool):
        T, E = logits_TE.shape
        K = top_k
        scores_TE = torch.softmax(logits_TE, dim=-1)
        if topk_idx_TK is None:  # plain top-k of the scores (ties broken as transformers does)
            topk_idx_TK = torch.topk(scores_TE, K, dim=-1).indices
        counts_E = torch.bincount(topk_idx_TK.reshape(-1), minlength=E)
        s_max_T, i_max_T = scores_TE.max(dim=-1)
        lse_T = logits_TE.gather(1, i_max_T[:, None]).squeeze(1) - s_max_T.log()
        w_TK = scores_TE.gather(1, topk_idx_TK)
        denom_T1 = None
        if renormalize:
            denom_T1 = w_TK.sum(dim=-1, keepdim=True).clamp_min(1e-20)
            w_TK = w_TK / denom_T1
        f_E = counts_E.to(scores_TE.dtype) / max(T * K, 1)
        lb = torch.dot(scores_TE.sum(dim=0), f_E) * (E / max(T, 1))
        z = torch.dot(lse_T, lse_T) / max(T, 1)
        ctx.save_for_backward(scores_TE, topk_idx_TK, w_TK, f_E, lse_T, denom_T1)
        ctx.mark_non_differentiable(scores_TE, topk_idx_TK, counts_E)
        ctx.set_materialize_grads(False)  # unweighted aux losses (bias / Sinkhorn / none) get no backward work
        return scores_TE, topk_idx_TK, counts_E, w_TK, lb, z

    @staticmethod
    def backward(ctx, _g_scores, _g_idx, _g_counts, g_gates_TK, g_lb, g_z):
        scores_TE, topk_idx_TK, w_TK, f_E, lse_T, denom_T1 = ctx.saved_tensors
        T, E = scores_TE.shape
        n = max(T, 1)
        if g_gates_TK is None and g_lb is None and g_z is None:
            return None, None, None, None
        G_TE = (g_lb * (E / n)) * f_E.expand(T, E) if g_lb is not None else scores_TE.new_zeros(T, E)
        if g_gates_TK is not None:
            g_w_TK = g_gates_TK
            if denom_T1 is not None:  # gates = w / sum(w): d/dw_j = (g_j - <g, gates>) / sum(w)
                g_w_TK = (g_gates_TK - (g_gates_TK * w_TK).sum(dim=-1, keepdim=True)) / denom_T1
            G_TE = G_TE.scatter_add(1, topk_idx_TK, g_w_TK)  # distinct experts per row: plain adds
        g_logits_TE = scores_TE * (G_TE - (G_TE * scores_TE).sum(dim=-1, keepdim=True))
        if g_z is not None:
            g_logits_TE = g_logits_TE + scores_TE * (lse_T * (2.0 * g_z / n))[:, None]
        return g_logits_TE, None, None, None


# ------------------------------------------------------------------------------------------------------- record
@dataclass
class RouterOutput:
    """What a router returns for one MoE layer and one forward pass.

    Attributes:
        logits_TE: ``[T, E]`` fp32 raw logits (never probabilities).
        scores_TE: ``[T, E]`` fp32 scores the gates come from (softmax or sigmoid of the logits); a diagnostic, not
            differentiable for softmax routers (gradients flow through ``topk_weight_TK`` and ``aux_losses``).
        topk_idx_TK: ``[T, K]`` int64 selected experts (before capacity dropping).
        topk_weight_TK: ``[T, K]`` fp32 gate values (zero where a slot was dropped for capacity).
        tokens_per_expert_E: ``[E]`` int64 routed slots per expert (before dropping).
        aux_losses: unweighted named scalars (``load_balancing``, ``z_loss``), always reported.
        aux_weights: the weight of each aux loss in the training objective (0 = reported only).
        dropped_fraction: share of the ``T*K`` slots dropped by the capacity factor (0 when dropless).
    """

    logits_TE: torch.Tensor
    scores_TE: torch.Tensor
    topk_idx_TK: torch.Tensor
    topk_weight_TK: torch.Tensor
    tokens_per_expert_E: torch.Tensor
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    aux_weights: dict[str, float] = field(default_factory=dict)
    dropped_fraction: torch.Tensor | None = None

    def weighted_aux_loss(self) -> torch.Tensor:
        """``sum_name weight * aux_losses[name]`` (fp32 scalar; 0 if none)."""
        total = self.logits_TE.new_zeros(())
        for name, value in self.aux_losses.items():
            w = self.aux_weights.get(name, 0.0)
            if w:
                total = total + w * value
        return total


# ------------------------------------------------------------------------------------------------------- router
class Router(nn.Module):
    """Top-k router with a pluggable balancing strategy (see module docstring).

    Args:
        d_model: input width ``D``.
        num_experts: routed experts ``E``.
        top_k: experts per token ``K``.
        cfg: :class:`moecpt.config.RouterConfig`.

    Forward: ``x_TD [T, D] -> RouterOutput``.
    """

    def __init__(self, d_model: int, num_experts: int, top_k: int, cfg: RouterConfig):
        super().__init__()
        if top_k > num_experts:
            raise ValueError(f"top_k={top_k} exceeds num_experts={num_experts}")
        self.num_experts = num_experts
        self.top_k = top_k
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))  # [E, D], bias-free (paper Sec. 3)
        # GPT-OSS's learned logit bias (cfg.logit_bias; not the selection-only expert_bias below)
        self.logit_bias = nn.Parameter(torch.zeros(num_experts)) if cfg.logit_bias else None
        if self.is_bias_balanced:
            # persistent: CPT must carry the learned bias (docs/design.md, rule R6)
            self.register_buffer("expert_bias", torch.zeros(num_experts), persistent=True)
            # per-step load, summed over micro-batches; not part of the model state
            self.register_buffer("step_load", torch.zeros(num_experts), persistent=False)
        # set while activation checkpointing recomputes this router's forward in the backward, which must not
        # count the step's load a second time (moecpt.model.transformer.recompute_marker)
        self.recomputing = False
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        nn.init.normal_(self.weight, std=std)
        if self.logit_bias is not None:
            nn.init.zeros_(self.logit_bias)

    # -- balancing strategies --------------------------------------------------------------------------------
    @property
    def is_bias_balanced(self) -> bool:
        """Whether this router balances by a learned selection bias (``kind = "bias"``, auxiliary-loss-free).

        Only such a router holds ``expert_bias`` (persistent, ``[E]``) and ``step_load`` (``[E]`` routed-slot
        counts of the current optimizer step, summed over its training forwards; not in the state dict), and only
        its :meth:`update_bias` changes anything. Callers ask this instead of probing for the buffers: the
        trainer (bias update, skipped steps) and the DDP strategies (which all-reduce ``step_load``).
        """
        return self.cfg.kind == RouterKind.BIAS

    @torch.no_grad()
    def reset_step_load(self) -> None:
        """Forget the loads counted in this step (a skipped, non-finite step); nothing for other routers."""
        if self.is_bias_balanced:
            self.step_load.zero_()

    @property
    def _sigmoid_gates(self) -> bool:
        return self.cfg.kind == RouterKind.SINKHORN and self.top_k == 1  # Megatron / GPT-NeoX reference for k = 1

    @property
    def _sigmoid_scores(self) -> bool:
        return self.cfg.score_fn == ScoreFn.SIGMOID

    @property
    def _grouped(self) -> bool:
        return self.cfg.n_group > 1 and self.cfg.resolved_topk_group < self.cfg.n_group

    def _gates(self, logits_TE: torch.Tensor) -> torch.Tensor:
        if self._sigmoid_gates or self._sigmoid_scores:
            return torch.sigmoid(logits_TE)
        return torch.softmax(logits_TE, dim=-1)

    def _topk(self, choice_TE: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        if self._grouped:
            return group_limited_topk(choice_TE, self.top_k, cfg.n_group, cfg.resolved_topk_group, cfg.group_score)
        return torch.topk(choice_TE, self.top_k, dim=-1).indices

    @torch.no_grad()
    def _select(self, logits_TE: torch.Tensor) -> torch.Tensor | None:
        """``[T, K]`` chosen experts (no gradient): Sinkhorn-balanced in training, biased scores, sigmoid scores or
        group-limited; ``None`` for plain top-k of softmax scores, which the softmax node takes itself."""
        cfg = self.cfg
        if cfg.kind == RouterKind.SINKHORN and self.training:
            return torch.topk(sinkhorn(logits_TE, cfg.sinkhorn_tol, cfg.sinkhorn_max_iter), self.top_k, dim=-1).indices
        if cfg.kind == RouterKind.BIAS:
            # bias enters selection only; gates come from the unbiased scores
            return self._topk(self._gates(logits_TE) + self.expert_bias)
        if self._sigmoid_gates or self._sigmoid_scores or self._grouped:
            return self._topk(self._gates(logits_TE))
        return None

    def _sigmoid_route(self, logits_TE: torch.Tensor, topk_idx_TK: torch.Tensor):
        """Gates and aux losses of sigmoid scores (plain autograd): ``(scores, counts, gates, probs, lb, z)``.

        Gates are the unbiased sigmoid scores of the chosen experts, renormalised as transformers' DeepSeek-V3 /
        GLM-4.5 routers do (``/ (sum + 1e-20)``: a tiny epsilon, docs/design.md, rule R5). The balancing
        diagnostics use the token-normalised scores ``s / sum(s)`` (DeepSeek-V3 eq. 19) as probabilities.
        """
        scores_TE = torch.sigmoid(logits_TE)
        counts_E = torch.bincount(topk_idx_TK.reshape(-1), minlength=self.num_experts)
        w_TK = scores_TE.gather(1, topk_idx_TK)
        if self.cfg.renormalize and self.top_k > 1:
            w_TK = w_TK / (w_TK.sum(dim=-1, keepdim=True) + 1e-20)
        probs_TE = scores_TE / scores_TE.sum(dim=-1, keepdim=True)
        lb = load_balancing_loss(probs_TE, topk_idx_TK, self.num_experts)
        return scores_TE.detach(), counts_E, w_TK, probs_TE, lb, router_z_loss(logits_TE)

    def forward(self, x_TD: torch.Tensor, seq_len: int | None = None) -> RouterOutput:
        """Route ``x_TD [T, D]``; ``seq_len`` (tokens per sequence; None = all ``T`` one sequence) delimits the
        sequences of the sequence-wise balance loss, computed only when ``seq_aux_loss_weight > 0``."""
        cfg = self.cfg
        probs_TE = None
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            logits_TE = F.linear(x_TD.float(), self.weight.float(),
                                 None if self.logit_bias is None else self.logit_bias.float())
            topk_idx_TK = self._select(logits_TE)
            if self._sigmoid_scores:
                scores_TE, tokens_per_expert_E, topk_weight_TK, probs_TE, lb, z = self._sigmoid_route(
                    logits_TE, topk_idx_TK)
            elif self._sigmoid_gates:
                tokens_per_expert_E = torch.bincount(topk_idx_TK.reshape(-1), minlength=self.num_experts)
                scores_TE = torch.sigmoid(logits_TE)
                topk_weight_TK = scores_TE.gather(1, topk_idx_TK)
                # the balancing diagnostic needs probabilities: the sigmoid gates of Sinkhorn k=1 are not
                probs_TE = torch.softmax(logits_TE, dim=-1)
                lb = load_balancing_loss(probs_TE, topk_idx_TK, self.num_experts)
                z = router_z_loss(logits_TE)
            else:
                scores_TE, topk_idx_TK, tokens_per_expert_E, topk_weight_TK, lb, z = _SoftmaxRouting.apply(
                    logits_TE, topk_idx_TK, self.top_k, cfg.renormalize and self.top_k > 1)
            if cfg.routed_scale != 1.0:
                topk_weight_TK = topk_weight_TK * cfg.routed_scale
            aux = {"load_balancing": lb, "z_loss": z}
            weights = {
                "load_balancing": cfg.aux_loss_weight if cfg.kind == RouterKind.PENALTY else 0.0,
                "z_loss": cfg.z_loss_weight if cfg.kind == RouterKind.PENALTY else 0.0,
            }
            if cfg.seq_aux_loss_weight > 0:
                if probs_TE is None:  # the softmax node's scores carry no gradient: the loss needs its own
                    probs_TE = torch.softmax(logits_TE, dim=-1)
                aux["seq_balance"] = sequence_balance_loss(probs_TE, topk_idx_TK, seq_len or logits_TE.shape[0])
                weights["seq_balance"] = cfg.seq_aux_loss_weight
        if cfg.kind == RouterKind.BIAS and self.training and torch.is_grad_enabled() and not self.recomputing:
            # count once per training forward: not in evaluation, not in no-grad or activation-checkpointing
            # recomputation (docs/design.md, rule R6)
            self.step_load += tokens_per_expert_E.to(self.step_load.dtype)
        return RouterOutput(
            logits_TE=logits_TE,
            scores_TE=scores_TE,
            topk_idx_TK=topk_idx_TK,
            topk_weight_TK=topk_weight_TK,
            tokens_per_expert_E=tokens_per_expert_E,
            aux_losses=aux,
            aux_weights=weights,
        )

    @torch.no_grad()
    def update_bias(self, load_E: torch.Tensor | None = None) -> dict[str, float]:
        """DeepSeek-V3 bias update, once per optimizer step: ``b_i += gamma * sign(mean(load) - load_i)``.

        Args:
            load_E: ``[E]`` routed-slot counts for the step, summed over micro-batches *and ranks* (the caller
                all-reduces :attr:`step_load`); default: this router's own ``step_load``.

        Returns:
            bias statistics (``bias_mean``, ``bias_absmax``, ``bias_std``) for logging. Resets ``step_load``.
        """
        if self.cfg.kind != RouterKind.BIAS:
            return {}
        load_E = self.step_load if load_E is None else load_E
        if load_E.sum() > 0:
            err_E = load_E.float().mean() - load_E.float()
            self.expert_bias += self.cfg.bias_update_rate * torch.sign(err_E)
        self.step_load.zero_()
        b = self.expert_bias
        return {"bias_mean": b.mean().item(), "bias_absmax": b.abs().max().item(), "bias_std": b.std().item()}


def mri_from_counts(tokens_per_expert_E: torch.Tensor, num_tokens: int) -> float:
    """Maximum Routing Imbalance (Thérien et al. 2025, Sec. 4): max_i share of tokens whose top-k contains ``i``.

    ``tokens_per_expert_E`` counts routed slots; since a token picks distinct experts, slot count = token count.
    Perfect balance gives ``K/E``, collapse onto one expert 1.
    """
    return float(tokens_per_expert_E.max().item() / max(num_tokens, 1))


def routing_entropy(probs_TE: torch.Tensor, atol: float = 1e-3, normalize: bool = False) -> float:
    """Mean per-token entropy of the router distribution, in nats: the one definition, used by the training
    metrics and by :mod:`moecpt.analysis.routing_metrics`.

    ``H = (1/T) * sum_x -sum_i p_i(x) ln p_i(x)`` with ``0 ln 0 = 0``, computed in float64. In ``[0, ln E]``:
    0 for one-hot routing, ``ln E`` for a uniform router. Low values mean confident (specialised) routing.

    Args:
        probs_TE: ``[T, E]`` router probabilities (softmax of the logits), *not* logits.
        atol: tolerance on each row summing to 1.
        normalize: rows are scores to renormalise first (sigmoid routers' scores, which do not sum to 1).

    Raises:
        MoecptError: not 2-D, empty, negative or non-finite entries, or (without ``normalize``) rows not summing
            to 1 (logits passed?).
    """
    if not isinstance(probs_TE, torch.Tensor) or probs_TE.dim() != 2:
        shape = tuple(probs_TE.shape) if isinstance(probs_TE, torch.Tensor) else type(probs_TE).__name__
        raise MoecptError(f"probs_TE must be a 2-D tensor [T, E] of router probabilities, got {shape}")
    if probs_TE.shape[0] == 0 or probs_TE.shape[1] == 0:
        raise MoecptError(f"probs_TE is empty (shape {tuple(probs_TE.shape)}); need T >= 1 tokens and E >= 1 experts")
    p = probs_TE.detach().double()
    if not bool(torch.isfinite(p).all()) or bool((p < 0).any()):
        raise MoecptError("probs_TE has negative or non-finite entries; pass softmax probabilities, not logits")
    if normalize:
        p = p / p.sum(dim=1, keepdim=True).clamp_min(1e-300)
    elif not bool(torch.allclose(p.sum(dim=1), torch.ones_like(p[:, 0]), atol=atol, rtol=0.0)):
        raise MoecptError("probs_TE rows do not sum to 1; pass softmax probabilities (not logits or top-k gates)")
    return float(entropy_nats(p))


def entropy_nats(p_TE: torch.Tensor) -> torch.Tensor:
    """``(1/T) sum_x -sum_i p_i(x) ln p_i(x)`` as a 0-d tensor on ``p_TE``'s device, without :func:`routing_entropy`'s
    host-side checks (no device sync: the per-step training metrics; non-finite input gives NaN)."""
    return (-torch.special.xlogy(p_TE, p_TE).sum(dim=1)).mean()


__all__ = [
    "Router",
    "RouterOutput",
    "group_limited_topk",
    "load_balancing_loss",
    "mri_from_counts",
    "router_z_loss",
    "entropy_nats",
    "routing_entropy",
    "sequence_balance_loss",
    "sinkhorn",
]
