"""Routers and balancing strategies: Sinkhorn, load-balancing loss, z-loss, gradients, gates, bias balancing.

Most tests drive a :class:`Router` whose weight is the identity (``d_model = E``), so the input *is* the logits and
every case can be constructed by hand.
"""

from __future__ import annotations

import math

import pytest
import torch

from moecpt.config import RouterConfig, RouterKind
from moecpt.model.routing import (
    Router,
    load_balancing_loss,
    mri_from_counts,
    router_z_loss,
    sinkhorn,
)


def identity_router(E: int, K: int, kind: str, **cfg) -> Router:
    router = Router(E, E, K, RouterConfig(kind=kind, **cfg))
    with torch.no_grad():
        router.weight.copy_(torch.eye(E))
    return router


def skewed_logits(T: int, E: int, favourite: int = 0, margin: float = 2.0, seed: int = 0) -> torch.Tensor:
    """Token-specific noise plus a large bonus for one expert: every token's top-1 is ``favourite``."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g) * 0.5
    logits[:, favourite] += margin + 1.5
    return logits


# ------------------------------------------------------------------------------------------------------- sinkhorn
@pytest.mark.parametrize("case", ["random", "skewed", "huge"])
def test_sinkhorn_balances_columns_and_rows(case):
    T, E = 96, 8
    logits = {
        "random": torch.randn(T, E, generator=torch.Generator().manual_seed(1)),
        "skewed": skewed_logits(T, E),
        # |logits| up to ~150: exp() alone would overflow fp32 (> 88.7)
        "huge": torch.randn(T, E, generator=torch.Generator().manual_seed(2)) * 50.0,
    }[case]
    if case == "huge":
        assert logits.abs().max() > 100
    P = sinkhorn(logits, tol=1e-6, max_iter=2000)
    assert P.dtype == torch.float32 and torch.isfinite(P).all()
    # the last sweep normalises columns: exact up to fp32 rounding
    torch.testing.assert_close(P.sum(0), torch.full((E,), 1.0 / E), rtol=1e-4, atol=0)
    # rows follow once converged
    torch.testing.assert_close(P.sum(1), torch.full((T,), 1.0 / T), rtol=1e-2, atol=0)


def test_sinkhorn_extreme_logits_stay_finite():
    # spreads of ~1000 underflow exp() to exact zeros in fp32, so full balance is out of reach; the result must
    # still be a finite, non-negative plan usable for top-k selection
    P = sinkhorn(torch.randn(96, 8, generator=torch.Generator().manual_seed(2)) * 1000.0, tol=1e-6, max_iter=200)
    assert torch.isfinite(P).all() and (P >= 0).all()
    assert (P.sum(0) <= 1.0 / 8 + 1e-6).all()


def test_sinkhorn_paper_tolerance_and_no_grad():
    logits = skewed_logits(64, 4).requires_grad_(True)
    P = sinkhorn(logits, tol=0.01, max_iter=100)
    assert not P.requires_grad
    torch.testing.assert_close(P.sum(0), torch.full((4,), 0.25), rtol=1e-4, atol=0)
    # the balanced matrix spreads the argmax over experts that the raw logits never pick
    raw_counts = torch.bincount(logits.argmax(1), minlength=4)
    bal_counts = torch.bincount(P.argmax(1), minlength=4)
    assert raw_counts.tolist() == [64, 0, 0, 0]
    assert bal_counts.max() < 40 and (bal_counts > 0).all()


def test_sinkhorn_rejects_bad_shape():
    with pytest.raises(ValueError, match=r"\[T, E\]"):
        sinkhorn(torch.zeros(2, 3, 4))


# ----------------------------------------------------------------------------------------- load balancing / z
@pytest.mark.parametrize("K", [1, 2, 3])
def test_load_balancing_loss_is_one_when_uniform(K):
    T, E = 24, 6
    probs = torch.full((T, E), 1.0 / E)
    idx = (torch.arange(T)[:, None] + torch.arange(K)[None, :]) % E  # every expert gets T*K/E slots, distinct per row
    assert torch.bincount(idx.reshape(-1), minlength=E).unique().numel() == 1
    assert load_balancing_loss(probs, idx, E).item() == pytest.approx(1.0, abs=1e-6)


def test_load_balancing_loss_grows_with_collapse():
    T, E = 16, 4
    collapsed = load_balancing_loss(torch.eye(E)[[0] * T], torch.zeros(T, 1, dtype=torch.long), E)
    assert collapsed.item() == pytest.approx(E)  # total collapse with probability 1 gives E
    # half the tokens collapse (prob 1 on expert 0), the rest uniform: f0 = 5/8, P0 = 5/8, others 1/8 each
    probs = torch.cat([torch.eye(E)[[0] * (T // 2)], torch.full((T // 2, E), 1.0 / E)])
    idx = torch.cat([torch.zeros(T // 2, dtype=torch.long), torch.arange(T // 2) % E])[:, None]
    half = load_balancing_loss(probs, idx, E).item()
    assert half == pytest.approx(E * ((5 / 8) ** 2 + 3 * (1 / 8) ** 2))
    assert 1.0 < half < E


def test_z_loss_matches_hand_computation():
    logits = torch.randn(7, 5, generator=torch.Generator().manual_seed(3)) * 4
    by_hand = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits.double().tolist()) / 7
    assert router_z_loss(logits).item() == pytest.approx(by_hand, rel=1e-5)
    assert router_z_loss(logits.bfloat16()).dtype == torch.float32


# ---------------------------------------------------------------------------------------- gradients, softmax
def test_router_weight_receives_aux_loss_gradient():
    torch.manual_seed(0)
    router = Router(16, 8, 2, RouterConfig(kind="penalty"))
    out = router(torch.randn(32, 16))
    assert out.aux_weights == {"load_balancing": 0.01, "z_loss": 0.001}
    out.weighted_aux_loss().backward()
    g = router.weight.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
    # the load-balancing part alone also reaches the router
    router.weight.grad = None
    router(torch.randn(32, 16)).aux_losses["load_balancing"].backward()
    assert router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["sinkhorn", "bias", "none"])
def test_unpenalised_routers_report_but_do_not_weight_aux(kind):
    out = Router(8, 4, 1, RouterConfig(kind=kind))(torch.randn(10, 8))
    assert set(out.aux_losses) == {"load_balancing", "z_loss"}
    assert out.weighted_aux_loss().item() == 0.0


def test_probabilities_are_not_softmaxed_twice():
    E, K = 4, 1
    router = identity_router(E, K, "penalty")
    logits = skewed_logits(40, E, margin=4.0)
    out = router(logits)
    assert torch.equal(out.logits_TE, logits)
    assert torch.equal(out.scores_TE, torch.softmax(logits, dim=-1))
    f = torch.bincount(out.topk_idx_TK.reshape(-1), minlength=E).float() / 40
    right = E * (f * torch.softmax(logits, -1).mean(0)).sum()
    wrong = E * (f * torch.softmax(torch.softmax(logits, -1), -1).mean(0)).sum()
    assert abs(right - wrong) > 0.5  # the case separates the two
    assert out.aux_losses["load_balancing"].item() == pytest.approx(right.item(), rel=1e-6)


# ------------------------------------------------------------------------------------------------- sinkhorn router
@pytest.mark.parametrize("K", [1, 2])
def test_sinkhorn_router_selection_and_gates(K):
    E = 4
    router = identity_router(E, K, "sinkhorn", sinkhorn_tol=0.01, sinkhorn_max_iter=100)
    logits = skewed_logits(64, E)
    router.eval()
    ev = router(logits)
    assert torch.equal(ev.topk_idx_TK, torch.topk(logits, K, dim=-1).indices)
    router.train()
    tr = router(logits)
    balanced = sinkhorn(logits, 0.01, 100)
    assert torch.equal(tr.topk_idx_TK, torch.topk(balanced, K, dim=-1).indices)
    assert not torch.equal(tr.topk_idx_TK, ev.topk_idx_TK)
    assert tr.tokens_per_expert_E.max() < ev.tokens_per_expert_E.max()
    gates = torch.sigmoid(logits) if K == 1 else torch.softmax(logits, dim=-1)
    for out in (ev, tr):  # gates come from the raw logits in both modes
        torch.testing.assert_close(out.topk_weight_TK, gates.gather(1, out.topk_idx_TK), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------------ bias router
def test_bias_balancing_moves_load_toward_uniform():
    E, K, T = 4, 1, 128
    router = identity_router(E, K, "bias", bias_update_rate=0.02)
    logits = skewed_logits(T, E, margin=0.5)
    router.train()
    mri = []
    for _ in range(60):  # one forward (train mode, grad on) per optimizer step, then the step's bias update
        out = router(logits)
        mri.append(mri_from_counts(out.tokens_per_expert_E, T))
        assert router.step_load.sum().item() == T * K
        router.update_bias()
        assert router.step_load.sum().item() == 0
    assert mri[0] > 0.95
    assert mri[-1] < 0.5 and min(mri[-10:]) < mri[0]
    b = router.expert_bias
    assert b[0] == b.min() and b[0] < 0  # the overloaded expert is pushed down


def test_bias_counts_only_training_forwards_with_grad():
    router = identity_router(4, 2, "bias")
    x = torch.randn(10, 4)
    router.eval()
    router(x)
    assert router.step_load.sum() == 0
    router.train()
    with torch.no_grad():  # e.g. activation recomputation
        router(x)
    assert router.step_load.sum() == 0
    router(x)
    assert router.step_load.sum() == 20
    router(x)  # micro-batches add up until the optimizer step
    assert router.step_load.sum() == 40


def test_bias_selects_but_gates_stay_unbiased():
    E = 4
    router = identity_router(E, 2, "bias")
    with torch.no_grad():
        router.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 5.0]))
    logits = skewed_logits(20, E)
    out = router(logits)
    assert (out.topk_idx_TK == 3).any(dim=1).all()  # the bias forces expert 3 into every top-2
    probs = torch.softmax(logits, dim=-1)
    torch.testing.assert_close(out.topk_weight_TK, probs.gather(1, out.topk_idx_TK), rtol=0, atol=0)
    assert torch.equal(out.scores_TE, probs)


def test_bias_is_persistent_and_step_load_is_not():
    router = identity_router(4, 1, "bias")
    sd = router.state_dict()
    assert "expert_bias" in sd and "step_load" not in sd
    with torch.no_grad():
        router.expert_bias.fill_(0.25)
    fresh = identity_router(4, 1, "bias")
    fresh.load_state_dict(router.state_dict())
    assert torch.equal(fresh.expert_bias, torch.full((4,), 0.25))
    assert "expert_bias" not in Router(4, 4, 1, RouterConfig(kind=RouterKind.PENALTY)).state_dict()


def test_update_bias_uses_given_load_and_is_noop_for_other_kinds():
    router = identity_router(4, 1, "bias", bias_update_rate=0.1)
    stats = router.update_bias(torch.tensor([10.0, 2.0, 2.0, 2.0]))  # e.g. the all-reduced load of all ranks
    torch.testing.assert_close(router.expert_bias, torch.tensor([-0.1, 0.1, 0.1, 0.1]))
    assert stats["bias_absmax"] == pytest.approx(0.1)
    assert identity_router(4, 1, "penalty").update_bias() == {}


def test_renormalize_and_fp32_routing():
    router = Router(8, 6, 3, RouterConfig(kind="penalty", renormalize=True))
    out = router(torch.randn(5, 8, dtype=torch.bfloat16))
    assert out.logits_TE.dtype == torch.float32 and out.topk_weight_TK.dtype == torch.float32
    torch.testing.assert_close(out.topk_weight_TK.sum(-1), torch.ones(5))
    with pytest.raises(ValueError, match="top_k"):
        Router(8, 2, 3, RouterConfig())


# Sigmoid-score gaming (docs/design.md, rule R5) needs a sigmoid score *normaliser* with an epsilon; moecpt's only
# sigmoid gates (Sinkhorn, k = 1) are plain sigmoid(logit) with no normaliser, so there is nothing to game.


@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("given_idx", [False, True])
def test_fused_softmax_routing_matches_autograd_reference(renormalize, given_idx):
    """The one-node softmax router (scores, gates, LB loss, z-loss) = the plain autograd composition of the public
    functions, in values and in the gradient of a mixed objective w.r.t. the logits."""
    from moecpt.model.routing import _SoftmaxRouting

    gen = torch.Generator().manual_seed(0)
    T, E, K = 40, 6, 2
    logits = (torch.randn(T, E, generator=gen, dtype=torch.float64) * 2).requires_grad_(True)
    idx = torch.randint(0, E, (T, 1), generator=gen)
    idx = torch.cat([idx, (idx + 1 + torch.randint(0, E - 1, (T, 1), generator=gen)) % E], 1) if given_idx else None
    c_w, c_lb, c_z = torch.randn(T, K, generator=gen, dtype=torch.float64), 0.7, 0.3

    scores, idx_out, counts, gates, lb, z = _SoftmaxRouting.apply(logits, idx, K, renormalize)
    (g_fused,) = torch.autograd.grad((gates * c_w).sum() + c_lb * lb + c_z * z, logits)

    ref_scores = torch.softmax(logits, dim=-1)
    ref_idx = torch.topk(ref_scores, K, dim=-1).indices if idx is None else idx
    ref_gates = ref_scores.gather(1, ref_idx)
    if renormalize:
        ref_gates = ref_gates / ref_gates.sum(-1, keepdim=True)
    ref_lb = load_balancing_loss(ref_scores, ref_idx, E)
    ref_z = router_z_loss(logits).double()
    (g_ref,) = torch.autograd.grad((ref_gates * c_w).sum() + c_lb * ref_lb + c_z * ref_z, logits)

    assert torch.equal(idx_out, ref_idx)
    assert torch.equal(counts, torch.bincount(ref_idx.reshape(-1), minlength=E))
    torch.testing.assert_close(scores, ref_scores)
    torch.testing.assert_close(gates, ref_gates)
    torch.testing.assert_close(lb.double(), ref_lb.double())
    torch.testing.assert_close(z.double(), ref_z, rtol=1e-6, atol=1e-6)  # fp32 z-loss reference
    torch.testing.assert_close(g_fused, g_ref, rtol=1e-6, atol=1e-7)


def test_fused_softmax_routing_gradcheck():
    from moecpt.model.routing import _SoftmaxRouting

    logits = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)

    def f(lg):
        _, _, _, gates, lb, z = _SoftmaxRouting.apply(lg, None, 2, True)
        return gates, lb, z

    assert torch.autograd.gradcheck(f, (logits,))
