"""Routing-analysis metrics for continual pre-training of MoE LMs.

Pure, vectorised torch functions on *routing tables*; no model is needed. The metrics follow
Thérien et al., "Continual Pre-training of MoEs: How robust is your router?" (arXiv 2503.05029, TMLR 2025; see
``docs/references.md``).

Notation (names carry shapes, torchtitan style):

- ``T`` tokens, ``E`` routed experts (shared / always-on experts are *not* part of a routing table),
  ``K`` = top-k.
- ``topk_idx_TK``: integer tensor ``[T, K]`` of the routed expert ids chosen for each token, each row holding
  ``K`` distinct ids in ``[0, E)``. The order inside a row does not matter to any metric here.
- ``probs_TE``: router probabilities ``[T, E]`` (after softmax/sigmoid normalisation, *not* logits).

One routing table is one MoE layer; compute per layer and average over layers where a model-level number is
wanted. All counting is exact integer arithmetic (unweighted ``bincount``, so also deterministic on CUDA); the
returned ratios are computed in float64 and handed back as Python floats (scalars) or float64 tensors, on the
input's device.

Every check of user input raises :class:`moecpt.errors.MoecptError` with a one-line message: wrong rank,
mismatched ``T`` / ``K`` between tables, ids outside ``[0, E)``, repeated ids in a row, empty tables.
"""

from __future__ import annotations

import math

import torch

from moecpt.errors import MoecptError
from moecpt.model.routing import routing_entropy  # the one definition (the training metrics use it too)

__all__ = [
    "tokens_per_expert",
    "expert_fractions",
    "max_routing_imbalance",
    "mri_per_batch",
    "router_saturation",
    "router_saturation_per_token",
    "vocab_specialization",
    "coactivation_counts",
    "coactivation",
    "routing_entropy",
    "load_entropy",
]


# ----------------------------------------------------------------------------------------------------------
# validation helpers
# ----------------------------------------------------------------------------------------------------------
def _check_num_experts(num_experts: int) -> int:
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise MoecptError(f"num_experts must be a positive int, got {num_experts!r}")
    return num_experts


def _check_topk(topk_idx_TK: torch.Tensor, num_experts: int | None, name: str = "topk_idx_TK") -> torch.Tensor:
    """Validate a routing table and return it as int64 ``[T, K]``."""
    if not isinstance(topk_idx_TK, torch.Tensor):
        raise MoecptError(f"{name} must be a torch.Tensor of expert ids, got {type(topk_idx_TK).__name__}")
    if topk_idx_TK.dim() != 2:
        raise MoecptError(f"{name} must be 2-D [T, K], got shape {tuple(topk_idx_TK.shape)}")
    if topk_idx_TK.dtype.is_floating_point or topk_idx_TK.dtype.is_complex or topk_idx_TK.dtype == torch.bool:
        raise MoecptError(f"{name} must hold integer expert ids, got dtype {topk_idx_TK.dtype}")
    T, K = topk_idx_TK.shape
    if T == 0:
        raise MoecptError(f"{name} is empty (T = 0 tokens); route at least one token")
    if K == 0:
        raise MoecptError(f"{name} has K = 0 columns; top-k must be at least 1")
    idx = topk_idx_TK.long()
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0:
        raise MoecptError(f"{name} has expert id {lo} < 0; ids must lie in [0, num_experts)")
    if num_experts is not None:
        if K > num_experts:
            raise MoecptError(f"{name} has K = {K} > num_experts = {num_experts}; top-k cannot exceed E")
        if hi >= num_experts:
            raise MoecptError(f"{name} has expert id {hi} >= num_experts = {num_experts}; wrong num_experts?")
    if K > 1:
        s = idx.sort(dim=1).values
        if bool((s[:, 1:] == s[:, :-1]).any()):
            raise MoecptError(f"{name} repeats an expert id within a token's top-k row; rows must be distinct")
    return idx


def _check_pair(a: torch.Tensor, b: torch.Tensor, num_experts: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dim() == 2 and b.dim() == 2:
        if a.shape[0] != b.shape[0]:
            raise MoecptError(
                f"checkpoints routed different token counts (T = {a.shape[0]} vs {b.shape[0]}); use the same tokens"
            )
        if a.shape[1] != b.shape[1]:
            raise MoecptError(f"checkpoints use different top-k (K = {a.shape[1]} vs {b.shape[1]}); K must match")
    a = _check_topk(a, num_experts, "topk_a_TK")
    b = _check_topk(b, num_experts, "topk_b_TK")
    if a.device != b.device:
        raise MoecptError(f"routing tables are on different devices ({a.device} vs {b.device}); move them together")
    return a, b


# ----------------------------------------------------------------------------------------------------------
# load: tokens per expert, fractions, MRI
# ----------------------------------------------------------------------------------------------------------
def tokens_per_expert(topk_idx_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Number of tokens whose top-k set contains each expert.

    Args:
        topk_idx_TK: int ``[T, K]`` expert ids, distinct per row.
        num_experts: ``E``, the number of routed experts.

    Returns:
        int64 ``[E]`` counts; they sum to ``T * K``.

    Raises:
        MoecptError: bad rank/dtype, ids outside ``[0, E)``, repeated ids in a row, ``T = 0``.
    """
    E = _check_num_experts(num_experts)
    idx = _check_topk(topk_idx_TK, E)
    return torch.bincount(idx.reshape(-1), minlength=E)


def expert_fractions(topk_idx_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Fraction of tokens whose top-k set contains expert ``i`` (Thérien et al. 2025, the quantity inside MRI).

    Returns:
        float64 ``[E]`` in ``[0, 1]``; sums to ``K`` (each token contributes to ``K`` experts). Uniform load gives
        ``K / E`` everywhere.

    Raises:
        MoecptError: as :func:`tokens_per_expert`.
    """
    counts = tokens_per_expert(topk_idx_TK, num_experts)
    return counts.double() / topk_idx_TK.shape[0]


def max_routing_imbalance(topk_idx_TK: torch.Tensor, num_experts: int) -> float:
    """Maximum Routing Imbalance (MRI) of one batch, Thérien et al. 2025 (arXiv 2503.05029).

    ``MRI = max_i (1/T) * #{x : i in topk(x)}``: the largest fraction of the batch's tokens whose top-k set
    contains a single expert. Dimensionless, in ``[K/E, 1]``: perfect balance gives ``K/E``, all tokens sharing
    one expert gives ``1``. Compute it per MoE layer and training step on the batch that step routed; for the
    distribution over many batches use :func:`mri_per_batch`.

    Args:
        topk_idx_TK: int ``[T, K]`` expert ids of the batch's ``T`` tokens.
        num_experts: ``E``.

    Raises:
        MoecptError: as :func:`tokens_per_expert`.
    """
    return float(expert_fractions(topk_idx_TK, num_experts).max())


def mri_per_batch(topk_idx_TK: torch.Tensor, num_experts: int, batch_tokens: int) -> torch.Tensor:
    """MRI of each run of ``batch_tokens`` consecutive tokens (the distribution of MRI over batches).

    Token ``t`` belongs to batch ``t // batch_tokens``. When ``T`` is not a multiple of ``batch_tokens`` the
    trailing partial batch is kept and normalised by its own size (so its MRI is still in ``[K/E, 1]``, but noisier);
    trim the table first if only full batches should count.

    Args:
        topk_idx_TK: int ``[T, K]`` expert ids, tokens in batch order.
        num_experts: ``E``.
        batch_tokens: tokens per batch (``B * S`` for a batch of ``B`` sequences of length ``S``), ``>= 1``.

    Returns:
        float64 ``[ceil(T / batch_tokens)]``, one MRI per batch.

    Raises:
        MoecptError: as :func:`tokens_per_expert`, or ``batch_tokens < 1``.
    """
    E = _check_num_experts(num_experts)
    if isinstance(batch_tokens, bool) or not isinstance(batch_tokens, int) or batch_tokens < 1:
        raise MoecptError(f"batch_tokens must be a positive int, got {batch_tokens!r}")
    idx = _check_topk(topk_idx_TK, E)
    T, K = idx.shape
    num_batches = -(-T // batch_tokens)
    batch_T = torch.arange(T, device=idx.device) // batch_tokens
    flat = (batch_T[:, None] * E + idx).reshape(-1)
    counts_NE = torch.bincount(flat, minlength=num_batches * E).reshape(num_batches, E)
    sizes_N = torch.bincount(batch_T, minlength=num_batches)
    return counts_NE.max(dim=1).values.double() / sizes_N.double()


# ----------------------------------------------------------------------------------------------------------
# change between checkpoints: CRS, CVS
# ----------------------------------------------------------------------------------------------------------
def _overlap_T(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``|a(x) ∩ b(x)|`` per token, int64 ``[T]``, by broadcasting ``[T, K, K]`` (rows distinct: no double count)."""
    return (a[:, :, None] == b[:, None, :]).sum(dim=(1, 2))


def router_saturation_per_token(
    topk_a_TK: torch.Tensor, topk_b_TK: torch.Tensor, num_experts: int | None = None
) -> torch.Tensor:
    """Per-token overlap ``|topk_a(x) ∩ topk_b(x)| / K`` as float64 ``[T]``; see :func:`router_saturation`."""
    a, b = _check_pair(topk_a_TK, topk_b_TK, None if num_experts is None else _check_num_experts(num_experts))
    return _overlap_T(a, b).double() / a.shape[1]


def router_saturation(topk_a_TK: torch.Tensor, topk_b_TK: torch.Tensor, num_experts: int | None = None) -> float:
    """Continual Router Saturation (CRS), Thérien et al. 2025 (arXiv 2503.05029).

    ``CRS(a, b) = (1/T) * sum_x |topk_a(x) ∩ topk_b(x)| / K`` for the same ``T`` tokens routed by an earlier
    checkpoint ``a`` and a later checkpoint ``b`` (same layer). Dimensionless in ``[0, 1]``: 1 when every token
    keeps its expert set, 0 when no token keeps any expert. Two independent uniform routers give ``K/E`` in
    expectation. Symmetric in ``a`` and ``b``.

    Args:
        topk_a_TK: int ``[T, K]`` ids under the earlier checkpoint.
        topk_b_TK: int ``[T, K]`` ids under the later checkpoint, same tokens in the same order.
        num_experts: optional ``E``; when given, ids are also checked against ``[0, E)``.

    Raises:
        MoecptError: ``T`` or ``K`` mismatch, bad rank/dtype, repeated ids in a row, ids out of range.
    """
    return float(router_saturation_per_token(topk_a_TK, topk_b_TK, num_experts).mean())


def _preferred_expert(inv_T: torch.Tensor, idx_TK: torch.Tensor, num_items: int, E: int) -> torch.Tensor:
    """Most frequent expert per item (count over occurrences and K slots; ties -> lowest expert id), int64 [U]."""
    flat = (inv_T[:, None] * E + idx_TK).reshape(-1)
    counts_UE = torch.bincount(flat, minlength=num_items * E).reshape(num_items, E)
    # Unique maximum with the tie-break built in: score = count * E + (E - 1 - i); larger count wins, then lower id.
    score_UE = counts_UE * E + (E - 1 - torch.arange(E, device=idx_TK.device))
    return score_UE.argmax(dim=1)


def _check_token_ids(token_ids_T: torch.Tensor, T: int, device: torch.device, vocab_size: int | None) -> torch.Tensor:
    """``token_ids_T`` checked (1-D integer ``[T]``, ids >= 0 and, with ``vocab_size``, < ``vocab_size``) and
    returned as int64 on ``device``.

    Raises:
        MoecptError: any of those checks fails, or ``vocab_size`` is not a positive int.
    """
    if not isinstance(token_ids_T, torch.Tensor) or token_ids_T.dim() != 1:
        shape = tuple(token_ids_T.shape) if isinstance(token_ids_T, torch.Tensor) else type(token_ids_T).__name__
        raise MoecptError(f"token_ids_T must be a 1-D tensor [T], got {shape}")
    if token_ids_T.dtype.is_floating_point or token_ids_T.dtype.is_complex or token_ids_T.dtype == torch.bool:
        raise MoecptError(f"token_ids_T must hold integer vocabulary ids, got dtype {token_ids_T.dtype}")
    if token_ids_T.shape[0] != T:
        raise MoecptError(f"token_ids_T has {token_ids_T.shape[0]} tokens but the routing tables have T = {T}")
    tok = token_ids_T.long().to(device)
    if int(tok.min()) < 0:
        raise MoecptError(f"token_ids_T has negative id {int(tok.min())}; vocabulary ids must be >= 0")
    if vocab_size is not None:
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
            raise MoecptError(f"vocab_size must be a positive int, got {vocab_size!r}")
        if int(tok.max()) >= vocab_size:
            raise MoecptError(f"token_ids_T has id {int(tok.max())} >= vocab_size = {vocab_size}; wrong vocab_size?")
    return tok


def vocab_specialization(
    token_ids_T: torch.Tensor,
    topk_a_TK: torch.Tensor,
    topk_b_TK: torch.Tensor,
    num_experts: int,
    vocab_size: int | None = None,
) -> dict:
    """Continual Vocabulary Specialization (CVS), after Thérien et al. 2025 (arXiv 2503.05029).

    The paper defines CVS only in words ("map each vocabulary item to its most frequent expert under the earlier
    checkpoint; measure how often the later checkpoint still routes the item there") and released no code, so the
    exact definition used here is our choice:

    1. For each vocabulary item ``v`` seen in ``token_ids_T``, count over all its occurrences and all ``K`` slots
       how often checkpoint ``a`` chose each expert; ``e_a(v)`` is the argmax, ties broken to the lowest expert id.
    2. ``CVS = (1/T) * sum_t [ e_a(token_t) in topk_b(t) ]``: the fraction of token *positions* (occurrences, so
       frequent items weigh more) whose later top-k set still contains the item's earlier most-frequent expert.
    3. The same quantity with ``topk_a`` in place of ``topk_b`` (``"cvs_self"``) is the ceiling set by how
       specialised ``a`` itself is: it is 1 only if every occurrence of every item routes to ``e_a(v)``. The ratio
       ``cvs / cvs_self`` separates forgetting of the specialisation from its initial sharpness. A routing that
       ignores the item gives about ``K/E`` (``"chance"``).

    An item-averaged variant (each distinct item weighs the same) is reported as ``"cvs_item_mean"``.

    Args:
        token_ids_T: int ``[T]`` vocabulary ids of the routed tokens (input ids at this layer's positions).
        topk_a_TK: int ``[T, K]`` ids under the earlier checkpoint.
        topk_b_TK: int ``[T, K]`` ids under the later checkpoint, same tokens.
        num_experts: ``E``.
        vocab_size: optional ``V``; when given, token ids are checked against ``[0, V)`` and
            ``"preferred_expert_V"`` is added.

    Returns:
        dict with
            ``"cvs"`` (float): fraction of occurrences still routed to ``e_a`` under ``b``;
            ``"cvs_self"`` (float): the same fraction under ``a``;
            ``"cvs_item_mean"`` (float): per-item hit rate under ``b``, averaged over distinct items;
            ``"chance"`` (float): ``K / E``;
            ``"num_items"`` (int): distinct vocabulary items seen;
            ``"items"`` (int64 ``[U]``): those items, sorted;
            ``"preferred_expert"`` (int64 ``[U]``): ``e_a`` for each of them;
            ``"preferred_expert_V"`` (int64 ``[V]``, only with ``vocab_size``): ``e_a`` per vocabulary id,
            ``-1`` for items not seen.

    Raises:
        MoecptError: token ids not 1-D / not integer / length differing from ``T`` / outside ``[0, V)``; and the
            routing-table errors of :func:`router_saturation`.
    """
    E = _check_num_experts(num_experts)
    a, b = _check_pair(topk_a_TK, topk_b_TK, E)
    T, K = a.shape
    tok = _check_token_ids(token_ids_T, T, a.device, vocab_size)

    items_U, inv_T = torch.unique(tok, sorted=True, return_inverse=True)
    U = items_U.shape[0]
    pref_U = _preferred_expert(inv_T, a, U, E)
    pref_T = pref_U[inv_T]
    hit_b_T = (b == pref_T[:, None]).any(dim=1)
    hit_a_T = (a == pref_T[:, None]).any(dim=1)
    occ_U = torch.bincount(inv_T, minlength=U).double()
    # integer bincount (no weights): exact, and allowed under torch.use_deterministic_algorithms on CUDA
    item_rate_U = torch.bincount(inv_T[hit_b_T], minlength=U).double() / occ_U

    out: dict = {
        "cvs": float(hit_b_T.double().mean()),
        "cvs_self": float(hit_a_T.double().mean()),
        "cvs_item_mean": float(item_rate_U.mean()),
        "chance": K / E,
        "num_items": int(U),
        "items": items_U,
        "preferred_expert": pref_U,
    }
    if vocab_size is not None:
        pref_V = torch.full((vocab_size,), -1, dtype=torch.long, device=a.device)
        pref_V[items_U] = pref_U
        out["preferred_expert_V"] = pref_V
    return out


# ----------------------------------------------------------------------------------------------------------
# co-activation
# ----------------------------------------------------------------------------------------------------------
def coactivation_counts(topk_idx_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``N(i and j both chosen)`` for every pair, int64 ``[E, E]``; the diagonal is ``N(i chosen)``.

    Computed exactly by a ``bincount`` over the ``K * K`` (i, j) pairs of each row (memory ``O(T K^2)``).
    Defined for any ``K >= 1``.
    """
    E = _check_num_experts(num_experts)
    idx = _check_topk(topk_idx_TK, E)
    pairs = (idx[:, :, None] * E + idx[:, None, :]).reshape(-1)
    return torch.bincount(pairs, minlength=E * E).reshape(E, E)


def coactivation(topk_idx_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Expert co-activation matrix, Thérien et al. 2025 (arXiv 2503.05029), for top-k routing with ``K > 1``.

    ``CA(i, j) = N(i and j both chosen) / N(i chosen)``: of the tokens routed to ``i``, the fraction also routed to
    ``j``. Row ``i`` is normalised by ``i``'s count, so the matrix is not symmetric. The diagonal is 1 for every
    expert chosen at least once; rows of experts never chosen are all 0. Each row of a used expert sums to ``K``.

    Args:
        topk_idx_TK: int ``[T, K]`` expert ids, ``K > 1``.
        num_experts: ``E``.

    Returns:
        float64 ``[E, E]``.

    Raises:
        MoecptError: ``K = 1`` (co-activation is trivial for top-1: the identity on used experts; use
            :func:`coactivation_counts` if that is really wanted), and the errors of :func:`tokens_per_expert`.
    """
    if isinstance(topk_idx_TK, torch.Tensor) and topk_idx_TK.dim() == 2 and topk_idx_TK.shape[1] == 1:
        raise MoecptError("co-activation needs top-k with K > 1; a top-1 (Switch) router never co-activates experts")
    C_EE = coactivation_counts(topk_idx_TK, num_experts)
    n_E = C_EE.diagonal().double()
    return C_EE.double() / n_E.clamp_min(1.0)[:, None]


# ----------------------------------------------------------------------------------------------------------
# entropies
# ----------------------------------------------------------------------------------------------------------
def load_entropy(fractions_E: torch.Tensor, normalized: bool = False) -> float:
    """Entropy of the expert load distribution, in nats.

    The load is normalised to a distribution first, ``q_i = f_i / sum_j f_j``, so raw counts
    (:func:`tokens_per_expert`) and fractions summing to ``K`` (:func:`expert_fractions`) give the same value.
    ``H = -sum_i q_i ln q_i`` lies in ``[0, ln E]``: ``ln E`` for perfectly balanced load, 0 when one expert takes
    everything. With ``normalized=True`` the value is divided by ``ln E`` (in ``[0, 1]``; 1.0 for ``E = 1``).

    Raises:
        MoecptError: not 1-D, empty, negative or non-finite entries, or all zero.
    """
    if not isinstance(fractions_E, torch.Tensor) or fractions_E.dim() != 1 or fractions_E.shape[0] == 0:
        shape = tuple(fractions_E.shape) if isinstance(fractions_E, torch.Tensor) else type(fractions_E).__name__
        raise MoecptError(f"fractions_E must be a non-empty 1-D tensor [E] of loads, got {shape}")
    f = fractions_E.detach().double()
    if not bool(torch.isfinite(f).all()) or bool((f < 0).any()):
        raise MoecptError("fractions_E has negative or non-finite entries; pass token counts or fractions")
    total = f.sum()
    if float(total) == 0.0:
        raise MoecptError("fractions_E is all zero; no token was routed")
    q = f / total
    h = float(-torch.special.xlogy(q, q).sum())
    if normalized:
        E = f.shape[0]
        return 1.0 if E == 1 else h / math.log(E)
    return h
