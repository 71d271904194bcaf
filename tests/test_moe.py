"""MoE layer: dense equivalence, grouped vs loop dispatch (outputs and gradients), capacity dropping, shared
experts, the grouped-run planner, bf16 autocast."""

from __future__ import annotations

import pytest
import torch

from moecpt.config import ModelConfig
from moecpt.model import moe as moe_mod
from moecpt.model.moe import GLUFeedForward, MoELayer, capacity, plan_expert_groups


def moe_cfg(E=8, K=2, D=32, F=48, kind="geglu", **moe) -> ModelConfig:
    return ModelConfig(vocab_size=16, d_model=D, n_heads=4, ffn_width=F, ffn_kind=kind,
                       moe=dict(num_experts=E, top_k=K, **moe))


def init_layer(layer: MoELayer, seed: int = 0, router_std: float = 0.5) -> MoELayer:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        layer.router.weight.mul_(router_std / 0.2)  # spread logits: uneven loads
    return layer


def run(layer: MoELayer, x: torch.Tensor, g: torch.Tensor):
    x = x.detach().clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    y, r = layer(x)
    ((y * g).sum() + r.weighted_aux_loss()).backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    return y.detach(), x.grad, grads, r


@pytest.mark.parametrize("dispatch", ["grouped", "loop"])
@pytest.mark.parametrize("kind", ["geglu", "swiglu"])
def test_one_expert_top1_equals_dense_ffn(dispatch, kind):
    D, F = 32, 40
    layer = MoELayer(moe_cfg(E=1, K=1, D=D, F=F, kind=kind, dispatch=dispatch))
    dense = GLUFeedForward(D, F, kind)
    init_layer(layer)
    with torch.no_grad():
        dense.w_in.weight.copy_(layer.experts.w_in[0].T)  # nn.Linear stores [out, in]; experts store [in, out]
        dense.w_out.weight.copy_(layer.experts.w_out[0].T)
    x = torch.randn(20, D)
    y, r = layer(x)
    assert torch.equal(r.topk_weight_TK, torch.ones(20, 1))  # softmax over one expert
    torch.testing.assert_close(y, dense(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("K", [1, 2])
@pytest.mark.parametrize("cf", [None, 0.5])
# torch._grouped_mm; padded bmm runs: per-expert runs, planned runs, one padded bmm
@pytest.mark.parametrize("layout", ["grouped_mm", 0, 128, 10**9])
def test_grouped_and_loop_dispatch_agree(K, cf, layout):
    cfg = moe_cfg(E=8, K=K, capacity_factor=cf)
    grouped = init_layer(MoELayer(cfg), seed=1)
    if layout == "grouped_mm":
        assert grouped.use_grouped_mm is None and hasattr(torch, "_grouped_mm")  # auto: it runs on this CPU
    else:
        grouped.use_grouped_mm, grouped.group_overhead_rows = False, layout
    loop = MoELayer(cfg.model_copy(update={"moe": cfg.moe.model_copy(update={"dispatch": "loop"})}))
    loop.load_state_dict(grouped.state_dict())
    gen = torch.Generator().manual_seed(0)  # fixed data: the uneven-load precondition below must always hold
    x, g = torch.randn(50, 32, generator=gen), torch.randn(50, 32, generator=gen)
    yg, xg, pg, rg = run(grouped, x, g)
    yl, xl, pl, rl = run(loop, x, g)
    assert rg.tokens_per_expert_E.max() > rg.tokens_per_expert_E.min() + 3  # uneven load: the runs get padding
    torch.testing.assert_close(yg, yl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xg, xl, rtol=1e-5, atol=1e-6)
    for name in pg:
        torch.testing.assert_close(pg[name], pl[name], rtol=1e-4, atol=1e-5)  # fp32 summation order differs
    torch.testing.assert_close(rg.topk_weight_TK, rl.topk_weight_TK)
    if cf is None:
        assert rg.dropped_fraction is None and rl.dropped_fraction is None
    else:
        assert rg.dropped_fraction.item() == pytest.approx(rl.dropped_fraction.item())
        if cf == 0.5:
            assert rg.dropped_fraction.item() > 0.3


def forced_router(layer: MoELayer, expert_of_token: list[int]) -> torch.Tensor:
    """Input that sends token t to ``expert_of_token[t]`` (router = identity on the first E dims)."""
    E, D = layer.num_experts, layer.router.weight.shape[1]
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[:, :E] = torch.eye(E) * 10
    x = torch.randn(len(expert_of_token), D) * 0.1
    x[:, :E] = 0
    x[torch.arange(len(expert_of_token)), torch.tensor(expert_of_token)] = 1.0
    return x


@pytest.mark.parametrize("dispatch", ["grouped", "loop"])
def test_capacity_drops_by_token_order(dispatch):
    layer = init_layer(MoELayer(moe_cfg(E=2, K=1, capacity_factor=1.0, dispatch=dispatch)))
    experts = [0, 0, 1, 0, 0, 0, 1, 0]  # 6 tokens on expert 0, 2 on expert 1
    x = forced_router(layer, experts)
    assert capacity(8, 1, 2, 1.0) == 4
    y, r = layer(x)
    assert r.topk_idx_TK[:, 0].tolist() == experts
    # expert 0 keeps its first 4 tokens in token order (0, 1, 3, 4) and drops tokens 5 and 7: 2 of 8 slots
    assert r.dropped_fraction.item() == pytest.approx(2 / 8)
    dropped = [5, 7]
    assert (r.topk_weight_TK[dropped] == 0).all()
    kept = [t for t in range(8) if t not in dropped]
    assert (r.topk_weight_TK[kept] > 0.99).all()
    assert (y[dropped] == 0).all()
    assert (y[kept].abs().sum(-1) > 0).all()


def test_grouped_mm_layout_issues_one_call_per_projection(monkeypatch):
    """With torch._grouped_mm: three calls forward (gate, up, out) and four backward, whatever the expert count."""
    calls = []
    real = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **k: calls.append(1) or real(*a, **k))
    layer = init_layer(MoELayer(moe_cfg(E=16, K=2)))
    x = torch.randn(256, 32, requires_grad=True)
    y, r = layer(x)
    assert len(calls) == 3
    y.sum().backward()
    assert len(calls) == 3 + 4  # w_out: weight grad + input grad; w_in: weight grad + input grad


def test_grouped_dispatch_issues_few_matmuls(monkeypatch):
    """The padded layout runs a few bmm calls, not one matmul per expert (what the benchmark measures)."""
    calls = []
    real = torch.bmm
    monkeypatch.setattr(moe_mod.torch, "bmm", lambda *a, **k: calls.append(1) or real(*a, **k))
    layer = init_layer(MoELayer(moe_cfg(E=16, K=2)), router_std=0.02)
    layer.use_grouped_mm = False
    y, r = layer(torch.randn(512, 32))
    groups = plan_expert_groups(r.tokens_per_expert_E.tolist(), layer.group_overhead_rows,
                                batch_quantum=torch.get_num_threads())
    # per run: the gate and up halves of w_in, then w_out
    assert len(calls) == 3 * len(groups) <= 3 * 6


def test_plan_expert_groups_layout():
    counts = [5, 0, 7, 7, 1, 0, 0, 9]
    for overhead in (0, 3, 10**6):
        groups = plan_expert_groups(counts, overhead)
        covered = [e for e0, e1, _, _ in groups for e in range(e0, e1)]
        assert set(covered) >= {e for e, c in enumerate(counts) if c}
        r = 0
        for e0, e1, C, r0 in groups:
            assert r0 == r and C == max(counts[e0:e1]) > 0
            r += (e1 - e0) * C
    assert sum((e1 - e0) * C for e0, e1, C, _ in plan_expert_groups(counts, 0)) == sum(counts)  # no padding
    assert plan_expert_groups(counts, 10**6) == [(0, 8, 9, 0)]  # one bmm padded to the max
    assert plan_expert_groups([0, 0, 0], 5) == []


def test_shared_expert_is_added():
    cfg = moe_cfg(E=8, K=2, num_shared_experts=1)
    layer = init_layer(MoELayer(cfg))
    assert layer.shared is not None and layer.shared.w_out.in_features == cfg.resolved_expert_width
    x = torch.randn(12, 32)
    y, _ = layer(x)
    shared, layer.shared = layer.shared, None
    y_routed, _ = layer(x)
    torch.testing.assert_close(y, y_routed + shared(x))
    # with the Qwen2-MoE sigmoid gate
    gated = init_layer(MoELayer(moe_cfg(E=8, K=2, num_shared_experts=1, shared_expert_gate=True)))
    y, _ = gated(x)
    sh, gated.shared = gated.shared, None
    torch.testing.assert_close(y, gated(x)[0] + torch.sigmoid(gated.shared_gate(x)) * sh(x))


@pytest.mark.parametrize("dispatch", ["grouped", "loop"])
def test_bf16_autocast_cpu(dispatch):
    layer = init_layer(MoELayer(moe_cfg(E=8, K=2, num_shared_experts=1, dispatch=dispatch)))
    x = torch.randn(24, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, r = layer(x)
    assert r.logits_TE.dtype == torch.float32 and r.scores_TE.dtype == torch.float32
    assert r.aux_losses["load_balancing"].dtype == torch.float32
    assert torch.isfinite(y).all()
    y_ref, _ = layer(x)
    assert ((y.float() - y_ref).norm() / y_ref.norm()).item() < 0.03  # bf16 rounding only
    (y.float().square().sum() + r.weighted_aux_loss()).backward()
    assert layer.experts.w_in.grad.dtype == torch.float32 and torch.isfinite(layer.experts.w_in.grad).all()
    assert layer.router.weight.grad.abs().sum() > 0


def test_plan_expert_groups_prices_thread_split_of_bmm():
    """With 2 threads a bmm over 3 experts costs as much as over 4 (its batch is split across threads)."""
    counts = [10, 10, 10]
    assert plan_expert_groups(counts, overhead_rows=5) == [(0, 3, 10, 0)]  # one run: 30 rows + 5
    split = plan_expert_groups(counts, overhead_rows=5, batch_quantum=2)  # 3 experts priced as 4: 40 + 5 > 30 + 10
    assert [(e0, e1) for e0, e1, _, _ in split] in ([(0, 2), (2, 3)], [(0, 1), (1, 3)])
    assert plan_expert_groups([10, 10], overhead_rows=5, batch_quantum=2) == [(0, 2, 10, 0)]


@pytest.mark.parametrize("kind", ["geglu", "swiglu"])
def test_glu_halves_match_autograd(kind):
    from moecpt.model.glu import glu_activation, glu_backward, glu_forward

    h = torch.randn(37, 2 * 24, dtype=torch.float64, requires_grad=True)
    g = torch.randn(37, 24, dtype=torch.float64)
    glu_activation(h, kind).backward(g)
    gate, up = (t.contiguous() for t in h.detach().chunk(2, dim=-1))
    act, a = glu_forward(gate, up, kind)
    torch.testing.assert_close(a, glu_activation(h.detach(), kind))
    torch.testing.assert_close(glu_backward(gate, up, act, g, kind), h.grad)


@pytest.mark.parametrize("use_grouped_mm", [None, False])
def test_grouped_dispatch_repeats_bit_for_bit_with_threads(use_grouped_mm):
    """The grouped path only gathers (no scatter-add): two runs give identical outputs and gradients."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        layer = init_layer(MoELayer(moe_cfg(E=8, K=2, num_shared_experts=1)), seed=3)
        layer.use_grouped_mm = use_grouped_mm
        x, g = torch.randn(300, 32), torch.randn(300, 32)
        first, second = run(layer, x, g), run(layer, x, g)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    for name in first[2]:
        assert torch.equal(first[2][name], second[2][name]), name


def test_grouped_experts_all_slots_dropped_keeps_graph():
    """No row at all (an empty batch: capacity keeps at least one slot per expert otherwise): zeros, backward runs."""
    from moecpt.model.expert_dispatch import DispatchPlan, grouped_experts

    x = torch.randn(4, 8, requires_grad=True)
    gate = torch.rand(4, 2, requires_grad=True)
    w_in, w_out = torch.randn(3, 8, 12, requires_grad=True), torch.randn(3, 6, 8, requires_grad=True)
    plan = DispatchPlan(num_rows=0, token_P=torch.zeros(0, dtype=torch.long), slot_P=torch.zeros(0, dtype=torch.long),
                        row_S=torch.zeros(8, dtype=torch.long), dropped=True)
    y = grouped_experts(x, gate, w_in, w_out, plan, "swiglu")
    assert torch.equal(y, torch.zeros(4, 8))
    y.sum().backward()
    assert torch.equal(gate.grad, torch.zeros(4, 2))


def test_grouped_mm_usable_needs_16_byte_rows():
    from moecpt.model.expert_dispatch import grouped_mm_usable

    cpu = torch.device("cpu")
    assert grouped_mm_usable(32, 48, torch.float32, cpu) == hasattr(torch, "_grouped_mm")
    assert not grouped_mm_usable(30, 48, torch.float32, cpu)  # 120-byte rows
    assert not grouped_mm_usable(32, 44, torch.bfloat16, cpu)  # 88-byte rows
    assert not grouped_mm_usable(32, 48, torch.float64, cpu)
    layer = init_layer(MoELayer(moe_cfg(E=4, K=2, D=32, F=42)))  # 168-byte rows: padded runs, same as the loop
    assert not grouped_mm_usable(32, layer.experts.width, torch.float32, cpu)
    loop = MoELayer(moe_cfg(E=4, K=2, D=32, F=42, dispatch="loop"))
    loop.load_state_dict(layer.state_dict())
    x = torch.randn(20, 32)
    torch.testing.assert_close(layer(x)[0], loop(x)[0], rtol=1e-5, atol=1e-6)


def test_moe_layer_refuses_batched_input_with_one_line():
    layer = init_layer(MoELayer(moe_cfg()))
    with pytest.raises(ValueError, match=r"expects tokens as \[T, D\]"):
        layer(torch.randn(2, 5, 32))
