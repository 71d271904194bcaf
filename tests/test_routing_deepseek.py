"""DeepSeek-V3-style routing (DeepSeek-AI 2024, arXiv 2412.19437, Sec. 2.1.2): sigmoid scores, selection bias,
group-limited top-k, renormalised and scaled gates, the sequence-wise balance loss. Checked against a
first-principles loop and against transformers' own routers (``Glm4MoeTopkRouter``, ``DeepseekV3TopkRouter``)."""

from __future__ import annotations

import pytest
import torch

from moecpt.config import ModelConfig, MoEConfig, RouterConfig, build_section
from moecpt.errors import MoecptError
from moecpt.model.routing import Router, group_limited_topk, mri_from_counts, sequence_balance_loss


def _loop_group_topk(choice_TE: torch.Tensor, K: int, n_group: int, topk_group: int) -> list[set[int]]:
    """The rule written out token by token, with Python sorting only."""
    T, E = choice_TE.shape
    size = E // n_group
    out = []
    for t in range(T):
        row = choice_TE[t].tolist()
        group_score = [sum(sorted(row[g * size:(g + 1) * size], reverse=True)[:2]) for g in range(n_group)]
        groups = sorted(range(n_group), key=lambda g: -group_score[g])[:topk_group]
        allowed = [e for g in groups for e in range(g * size, (g + 1) * size)]
        out.append(set(sorted(allowed, key=lambda e: -row[e])[:K]))
    return out


@pytest.mark.parametrize("E, K, n_group, topk_group", [(8, 2, 4, 2), (16, 4, 4, 1), (12, 3, 3, 2), (8, 2, 2, 2),
                                                        (32, 8, 8, 4)])
def test_group_limited_topk_matches_a_loop(E, K, n_group, topk_group):
    choice = torch.rand(64, E, generator=torch.Generator().manual_seed(E + K))
    idx = group_limited_topk(choice, K, n_group, topk_group)
    assert idx.shape == (64, K)
    assert [set(r) for r in idx.tolist()] == _loop_group_topk(choice, K, n_group, topk_group)
    if topk_group < n_group:  # the limit binds: some tokens lose an expert plain top-k would take
        plain = [set(r) for r in torch.topk(choice, K, dim=-1).indices.tolist()]
        assert plain != [set(r) for r in idx.tolist()]


def _router(E: int, K: int, D: int, seed: int, **cfg) -> Router:
    r = Router(D, E, K, RouterConfig(kind="bias", score_fn="sigmoid", **cfg))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        r.weight.copy_(torch.randn(E, D, generator=g) * 0.3)
        r.expert_bias.copy_(torch.randn(E, generator=g) * 0.1)
    return r.eval()


@pytest.mark.parametrize("family", ["glm4_moe", "deepseek_v3"])
@pytest.mark.parametrize("E, K, n_group, topk_group, norm, scale", [
    (8, 2, 1, 1, True, 1.0), (8, 2, 4, 2, True, 2.5), (16, 4, 4, 2, False, 1.0), (16, 3, 8, 3, True, 1.8)])
def test_router_matches_transformers(family, E, K, n_group, topk_group, norm, scale):
    transformers = pytest.importorskip("transformers")
    D = 32
    if family == "glm4_moe":
        from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeTopkRouter as HFRouter

        hf_cfg = transformers.Glm4MoeConfig(hidden_size=D, n_routed_experts=E, num_experts_per_tok=K,
                                            n_group=n_group, topk_group=topk_group, norm_topk_prob=norm,
                                            routed_scaling_factor=scale)
    else:
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter as HFRouter

        hf_cfg = transformers.DeepseekV3Config(hidden_size=D, n_routed_experts=E, num_experts_per_tok=K,
                                               n_group=n_group, topk_group=topk_group, norm_topk_prob=norm,
                                               routed_scaling_factor=scale)
    ours = _router(E, K, D, seed=E * K + n_group, n_group=n_group, topk_group=topk_group, renormalize=norm,
                   routed_scale=scale)
    hf = HFRouter(hf_cfg)
    with torch.no_grad():
        hf.weight.copy_(ours.weight)
        hf.e_score_correction_bias.copy_(ours.expert_bias)
    x = torch.randn(256, D, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits, w_hf, idx_hf = hf(x)
        out = ours(x)
    torch.testing.assert_close(out.logits_TE, logits, rtol=0, atol=0)
    order_hf, order = idx_hf.argsort(-1), out.topk_idx_TK.argsort(-1)
    assert torch.equal(idx_hf.gather(1, order_hf), out.topk_idx_TK.gather(1, order))  # same experts
    assert (w_hf.gather(1, order_hf) - out.topk_weight_TK.gather(1, order)).abs().max().item() <= 1e-6


def test_bias_selects_gates_stay_unbiased_and_sigmoid_gradient_flows():
    E, K, D = 8, 2, 16
    r = _router(E, K, D, seed=0, n_group=4, topk_group=2, renormalize=False, routed_scale=2.0).train()
    x = torch.randn(40, D, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        r.expert_bias.zero_()
        r.expert_bias[5] = 10.0  # expert 5 wins every selection, its gate stays its own sigmoid score
    out = r(x)
    assert (out.topk_idx_TK == 5).any(-1).all()
    s = torch.sigmoid(x @ r.weight.T)
    torch.testing.assert_close(out.topk_weight_TK, 2.0 * s.gather(1, out.topk_idx_TK))
    out.topk_weight_TK.sum().backward()
    assert r.weight.grad is not None and r.weight.grad.abs().sum() > 0
    assert out.aux_weights == {"load_balancing": 0.0, "z_loss": 0.0}  # bias kind: losses reported only


def test_bias_update_balances_a_sigmoid_router_from_scratch():
    E, K, D, T = 8, 2, 8, 256
    r = Router(D, E, K, RouterConfig(kind="bias", score_fn="sigmoid", n_group=4, topk_group=2,
                                     bias_update_rate=0.01)).train()
    with torch.no_grad():
        r.weight.copy_(torch.eye(E))
    x = torch.randn(T, E, generator=torch.Generator().manual_seed(0)) * 0.3
    x[:, 0] += 2.0  # expert 0 is every token's favourite
    mri = []
    for _ in range(80):
        mri.append(mri_from_counts(r(x).tokens_per_expert_E, T))
        r.update_bias()
    assert mri[0] > 0.95 and max(mri[-10:]) < 0.5
    assert r.expert_bias[0] == r.expert_bias.min() < 0


def test_sequence_balance_loss():
    T, E, K = 12, 4, 2
    uniform = torch.full((2 * T, E), 1.0 / E)
    balanced = torch.tensor([[e % E, (e + 1) % E] for e in range(2 * T)])
    assert sequence_balance_loss(uniform, balanced, T).item() == pytest.approx(1.0)
    probs = torch.softmax(torch.randn(2 * T, E, generator=torch.Generator().manual_seed(0)), -1)
    idx = torch.topk(probs, K, -1).indices
    want = 0.0
    for b in range(2):  # eqs. 17-20 per sequence, then the mean
        p, i = probs[b * T:(b + 1) * T], idx[b * T:(b + 1) * T]
        f = torch.bincount(i.reshape(-1), minlength=E).float() * E / (K * T)
        want += float((f * p.mean(0)).sum()) / 2
    assert sequence_balance_loss(probs, idx, T).item() == pytest.approx(want, rel=1e-6)
    with pytest.raises(ValueError, match="whole sequences"):
        sequence_balance_loss(probs, idx, 5)


@pytest.mark.parametrize("score_fn", ["sigmoid", "softmax"])
def test_sequence_balance_loss_is_weighted_and_reaches_the_router(score_fn):
    r = Router(16, 8, 2, RouterConfig(kind="bias", score_fn=score_fn, seq_aux_loss_weight=1e-4)).train()
    out = r(torch.randn(24, 16, generator=torch.Generator().manual_seed(2)), seq_len=12)
    assert out.aux_weights["seq_balance"] == 1e-4 and out.aux_losses["seq_balance"].item() > 0.5
    out.aux_losses["seq_balance"].backward()
    assert r.weight.grad.abs().sum() > 0
    off = Router(16, 8, 2, RouterConfig(kind="bias", score_fn=score_fn))(torch.randn(24, 16))
    assert "seq_balance" not in off.aux_losses  # weight 0: not computed


def test_model_forward_passes_sequences_to_the_loss():
    from moecpt.model.transformer import build_model

    cfg = ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=2, ffn_width=64,
                      moe={"num_experts": 8, "top_k": 2, "router": {"kind": "bias", "score_fn": "sigmoid",
                                                                    "n_group": 4, "topk_group": 2,
                                                                    "seq_aux_loss_weight": 1e-4}})
    model = build_model(cfg)
    ids = torch.randint(0, 50, (3, 10), generator=torch.Generator().manual_seed(0))
    _, routing = model(ids, return_routing=True)
    r0 = routing[0]
    probs = r0.scores_TE / r0.scores_TE.sum(-1, keepdim=True)
    want = sequence_balance_loss(probs, r0.topk_idx_TK, 10)
    assert r0.aux_losses["seq_balance"].item() == pytest.approx(want.item(), rel=1e-6)
    # one 30-token sequence is a different loss: the sequences really are delimited
    assert want.item() != pytest.approx(sequence_balance_loss(probs, r0.topk_idx_TK, 30).item())


@pytest.mark.parametrize("router, moe, words", [
    ({"n_group": 3}, {"num_experts": 8}, "equal groups"),
    ({"n_group": 8}, {"num_experts": 8}, "at least 2"),
    ({"n_group": 4, "topk_group": 1}, {"num_experts": 8, "top_k": 3}, "fewer than moe.top_k"),
    ({"n_group": 2, "topk_group": 3}, {"num_experts": 8}, "topk_group=3 exceeds"),
    ({"kind": "sinkhorn", "score_fn": "sigmoid"}, {"num_experts": 8}, "sinkhorn"),
    ({"score_fn": "tanh"}, {"num_experts": 8}, "allowed: 'softmax' or 'sigmoid'"),
])
def test_bad_router_configs_are_one_line_errors(router, moe, words):
    with pytest.raises(MoecptError) as exc:
        build_section(MoEConfig, {**moe, "router": router}, "model.moe")
    assert words in str(exc.value) and "\n" not in str(exc.value)


def test_renormalised_sigmoid_gates_keep_summing_to_one_for_tiny_scores():
    """docs/design.md, rule R5: the normaliser's epsilon (1e-20, as transformers) must not let a router shrink its
    gates by driving every score towards 0: at sigmoid scores ~1e-13 the gates still sum to 1."""
    r = Router(4, 4, 2, RouterConfig(kind="bias", score_fn="sigmoid", renormalize=True)).eval()
    with torch.no_grad():
        r.weight.copy_(torch.eye(4))
    out = r(torch.full((3, 4), -30.0) + torch.arange(4.0) * 0.1)
    assert out.topk_weight_TK.max() < 1.0 and (out.topk_weight_TK.sum(-1) - 1).abs().max().item() < 1e-6
