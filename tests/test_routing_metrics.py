"""Routing-analysis and forgetting metrics against hand-computed values and naive loops."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from moecpt.analysis.forgetting import (
    adaptation,
    forgetting,
    relative_adaptation,
    relative_forgetting,
    summarize_losses,
)
from moecpt.analysis.routing_metrics import (
    coactivation,
    coactivation_counts,
    expert_fractions,
    load_entropy,
    max_routing_imbalance,
    mri_per_batch,
    router_saturation,
    router_saturation_per_token,
    routing_entropy,
    tokens_per_expert,
    vocab_specialization,
)
from moecpt.errors import MoecptError

# T = 6 tokens, E = 4 experts, K = 2.
# Earlier checkpoint a:
A = torch.tensor([[0, 1], [0, 2], [1, 0], [3, 2], [0, 3], [2, 1]])
# Later checkpoint b on the same tokens; overlaps with A per token: 2, 1, 0, 2, 0, 1
B = torch.tensor([[1, 0], [0, 3], [2, 3], [2, 3], [1, 2], [2, 0]])
# Complement of A row by row: disjoint from A everywhere.
C = torch.tensor([[2, 3], [1, 3], [2, 3], [0, 1], [1, 2], [0, 3]])
E = 4


# ------------------------------------------------------------------ load and MRI
def test_tokens_per_expert_and_fractions_by_hand():
    # e0: t0 t1 t2 t4 = 4; e1: t0 t2 t5 = 3; e2: t1 t3 t5 = 3; e3: t3 t4 = 2; total 12 = T*K
    assert tokens_per_expert(A, E).tolist() == [4, 3, 3, 2]
    f = expert_fractions(A, E)
    assert torch.allclose(f, torch.tensor([4 / 6, 3 / 6, 3 / 6, 2 / 6], dtype=torch.float64))
    assert f.sum().item() == pytest.approx(2.0)  # sums to K
    # an expert never chosen still gets its (zero) slot
    assert tokens_per_expert(A, 6).tolist() == [4, 3, 3, 2, 0, 0]
    assert tokens_per_expert(A.int(), E).dtype == torch.int64


def test_mri_by_hand_balance_and_collapse():
    assert max_routing_imbalance(A, E) == pytest.approx(4 / 6)
    # perfect balance: each of 4 experts in 2 of 4 tokens -> K/E = 2/4
    balanced = torch.tensor([[0, 1], [2, 3], [1, 0], [3, 2]])
    assert max_routing_imbalance(balanced, E) == pytest.approx(2 / 4)
    # top-1 balance: K/E = 1/8
    assert max_routing_imbalance(torch.arange(16).remainder(8)[:, None], 8) == pytest.approx(1 / 8)
    # total collapse: every token chooses expert 2 -> 1
    assert max_routing_imbalance(torch.full((5, 1), 2), E) == 1.0
    assert max_routing_imbalance(torch.tensor([[0, 1]] * 7), E) == 1.0


def test_mri_per_batch_by_hand():
    # batch 0 = t0..t2: e0 in all 3 -> 1.0 ; batch 1 = t3..t5: e2 in t3,t5 and e3 in t3,t4 -> 2/3
    out = mri_per_batch(A, E, batch_tokens=3)
    assert out.tolist() == pytest.approx([1.0, 2 / 3])
    # batch 0 = t0..t3: e0 3 of 4 -> 3/4 ; partial batch 1 = t4,t5: each expert once of 2 -> 1/2
    assert mri_per_batch(A, E, batch_tokens=4).tolist() == pytest.approx([3 / 4, 1 / 2])
    # one batch holding everything equals the plain MRI
    assert mri_per_batch(A, E, batch_tokens=6).tolist() == pytest.approx([max_routing_imbalance(A, E)])
    with pytest.raises(MoecptError):
        mri_per_batch(A, E, batch_tokens=0)


# ------------------------------------------------------------------ CRS
def test_router_saturation_by_hand():
    assert router_saturation(A, A) == 1.0
    # row order inside a top-k set does not matter
    assert router_saturation(A, A.flip(1)) == 1.0
    assert router_saturation(A, C) == 0.0
    # overlaps 2,1,0,2,0,1 -> (1 + 1/2 + 0 + 1 + 0 + 1/2) / 6 = 3/6
    assert router_saturation(A, B) == pytest.approx(0.5)
    assert router_saturation(B, A, num_experts=E) == pytest.approx(0.5)
    assert router_saturation_per_token(A, B).tolist() == [1.0, 0.5, 0.0, 1.0, 0.0, 0.5]


# ------------------------------------------------------------------ CVS
def test_vocab_specialization_by_hand():
    tokens = torch.tensor([7, 9, 7, 9, 7, 5])
    # under A: item 7 at t0 {0,1}, t2 {1,0}, t4 {0,3} -> e0:3 e1:2 e3:1 -> preferred 0
    #          item 9 at t1 {0,2}, t3 {3,2}           -> e0:1 e2:2 e3:1 -> preferred 2
    #          item 5 at t5 {2,1}                     -> e1:1 e2:1 tie  -> lowest id 1
    # under B: t0 {1,0}∋0 hit, t1 {0,3}∌2, t2 {2,3}∌0, t3 {2,3}∋2 hit, t4 {1,2}∌0, t5 {2,0}∌1 -> 2/6
    # under A itself every position contains its item's preferred expert -> 6/6
    # per item under B: 5 -> 0/1, 7 -> 1/3, 9 -> 1/2 ; mean = (0 + 1/3 + 1/2) / 3 = 5/18
    out = vocab_specialization(tokens, A, B, E, vocab_size=10)
    assert out["cvs"] == pytest.approx(1 / 3)
    assert out["cvs_self"] == pytest.approx(1.0)
    assert out["cvs_item_mean"] == pytest.approx(5 / 18)
    assert out["chance"] == pytest.approx(0.5)
    assert out["num_items"] == 3
    assert out["items"].tolist() == [5, 7, 9]
    assert out["preferred_expert"].tolist() == [1, 0, 2]
    assert out["preferred_expert_V"].tolist() == [-1, -1, -1, -1, -1, 1, -1, 0, -1, 2]
    assert "preferred_expert_V" not in vocab_specialization(tokens, A, B, E)


def test_vocab_specialization_ties_by_hand():
    tokens = torch.tensor([7, 9, 7, 9, 9, 5])
    # under A: item 7 at t0 {0,1}, t2 {1,0}        -> e0:2 e1:2       tie -> 0
    #          item 9 at t1 {0,2}, t3 {3,2}, t4 {0,3} -> e0:2 e2:2 e3:2 tie -> 0
    #          item 5 at t5 {2,1}                  -> e1:1 e2:1       tie -> 1
    # self (A): t0 ∋0, t1 ∋0, t2 ∋0, t3 {3,2}∌0, t4 ∋0, t5 ∋1 -> 5/6
    # later (B): t0 {1,0}∋0, t1 {0,3}∋0, t2 {2,3}∌0, t3 {2,3}∌0, t4 {1,2}∌0, t5 {2,0}∌1 -> 2/6
    # per item under B: 5 -> 0/1, 7 -> 1/2, 9 -> 1/3 ; mean = 5/18
    out = vocab_specialization(tokens, A, B, E)
    assert out["preferred_expert"].tolist() == [1, 0, 0]
    assert out["cvs_self"] == pytest.approx(5 / 6)
    assert out["cvs"] == pytest.approx(2 / 6)
    assert out["cvs_item_mean"] == pytest.approx(5 / 18)
    # identical checkpoints: CVS equals its self baseline
    same = vocab_specialization(tokens, A, A, E)
    assert same["cvs"] == same["cvs_self"] == pytest.approx(5 / 6)


# ------------------------------------------------------------------ co-activation
def test_coactivation_by_hand():
    # sets: {0,1} {0,2} {0,1} {2,3} {0,3} {1,2} ; N = 4,3,3,2
    # joint: (0,1)=2 (0,2)=1 (0,3)=1 (1,2)=1 (1,3)=0 (2,3)=1
    counts = coactivation_counts(A, E)
    assert counts.tolist() == [[4, 2, 1, 1], [2, 3, 1, 0], [1, 1, 3, 1], [1, 0, 1, 2]]
    expected = torch.tensor(
        [
            [1, 2 / 4, 1 / 4, 1 / 4],
            [2 / 3, 1, 1 / 3, 0],
            [1 / 3, 1 / 3, 1, 1 / 3],
            [1 / 2, 0, 1 / 2, 1],
        ],
        dtype=torch.float64,
    )
    ca = coactivation(A, E)
    assert torch.allclose(ca, expected)
    assert torch.allclose(ca.sum(1), torch.full((E,), 2.0, dtype=torch.float64))  # rows sum to K
    # an expert never chosen has an all-zero row and column
    ca5 = coactivation(A, 5)
    assert torch.allclose(ca5[:4, :4], expected)
    assert ca5[4].abs().sum() == 0 and ca5[:, 4].abs().sum() == 0
    # K = 1 is refused (the counts are still available)
    with pytest.raises(MoecptError, match="K > 1"):
        coactivation(A[:, :1], E)
    assert coactivation_counts(A[:, :1], E).tolist() == torch.diag(torch.tensor([3, 1, 1, 1])).tolist()


# ------------------------------------------------------------------ entropies
def test_entropies_by_hand():
    probs = torch.tensor([[1.0, 0, 0, 0], [0.25, 0.25, 0.25, 0.25], [0.5, 0.5, 0, 0]])
    # (0 + ln 4 + ln 2) / 3
    assert routing_entropy(probs) == pytest.approx((math.log(4) + math.log(2)) / 3)
    with pytest.raises(MoecptError, match="sum to 1"):
        routing_entropy(torch.tensor([[2.0, -1.0, 0.5, 0.1]]).abs())  # logits-like rows
    with pytest.raises(MoecptError):
        routing_entropy(torch.tensor([[1.5, -0.5]]))
    with pytest.raises(MoecptError):
        routing_entropy(torch.ones(4))
    # counts 4,3,3,2 -> q = 1/3, 1/4, 1/4, 1/6
    h = -(1 / 3 * math.log(1 / 3) + 2 * 0.25 * math.log(0.25) + 1 / 6 * math.log(1 / 6))
    assert load_entropy(tokens_per_expert(A, E)) == pytest.approx(h)
    assert load_entropy(expert_fractions(A, E)) == pytest.approx(h)  # scale-free
    assert load_entropy(torch.ones(8)) == pytest.approx(math.log(8))
    assert load_entropy(torch.ones(8), normalized=True) == pytest.approx(1.0)
    assert load_entropy(torch.tensor([0.0, 5.0, 0.0])) == 0.0
    with pytest.raises(MoecptError):
        load_entropy(torch.zeros(3))


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: router_saturation(A, B[:, :1]), "K = 2 vs 1"),  # K mismatch
        (lambda: router_saturation(A, B[:5]), "T = 6 vs 5"),  # T mismatch
        (lambda: vocab_specialization(torch.arange(5), A, B, E), "T = 6"),  # token count mismatch
        (lambda: tokens_per_expert(A, 3), "id 3 >= num_experts = 3"),  # E mismatch / id out of range
        (lambda: router_saturation(A, B, num_experts=3), "num_experts = 3"),
        (lambda: tokens_per_expert(torch.tensor([[0, -1]]), E), "< 0"),
        (lambda: tokens_per_expert(torch.tensor([[0, 1, 2]]), 2), "K = 3 > num_experts"),
        (lambda: tokens_per_expert(torch.tensor([[1, 1]]), E), "repeats"),
        (lambda: tokens_per_expert(torch.tensor([0, 1]), E), "2-D"),
        (lambda: tokens_per_expert(A.float(), E), "integer"),
        (lambda: tokens_per_expert(torch.zeros(0, 2, dtype=torch.long), E), "empty"),
        (lambda: tokens_per_expert(A, 0), "positive"),
        (lambda: vocab_specialization(torch.full((6,), 12), A, B, E, vocab_size=10), "vocab_size"),
        (lambda: vocab_specialization(torch.zeros(6, 1, dtype=torch.long), A, B, E), "1-D"),
    ],
)
def test_bad_input_raises_one_line_error(call, match):
    with pytest.raises(MoecptError, match=match) as info:
        call()
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------ vectorised vs naive loops
def _random_table(T: int, E: int, K: int, gen: torch.Generator, skew: float = 2.0) -> torch.Tensor:
    # Gumbel top-k on skewed logits: distinct ids per row, uneven load (so preferences are not all ties)
    logits = skew * torch.linspace(0, 1, E)[None, :] - torch.log(-torch.log(torch.rand(T, E, generator=gen)))
    return logits.topk(K, dim=1).indices


def _perturb(a: torch.Tensor, E: int, gen: torch.Generator, p: float = 0.4) -> torch.Tensor:
    fresh = _random_table(a.shape[0], E, a.shape[1], gen)
    keep = torch.rand(a.shape[0], generator=gen) > p
    return torch.where(keep[:, None], a, fresh)


@pytest.mark.parametrize("E, K", [(8, 2), (16, 3), (5, 1)])
def test_vectorised_matches_naive_loops(E, K):
    gen = torch.Generator().manual_seed(1234 + E + K)
    T = 500
    a = _random_table(T, E, K, gen)
    b = _perturb(a, E, gen)
    tokens = torch.randint(0, 40, (T,), generator=gen)
    a_l, b_l, tok_l = a.tolist(), b.tolist(), tokens.tolist()

    # CRS
    naive_crs = sum(len(set(x) & set(y)) / K for x, y in zip(a_l, b_l)) / T
    assert router_saturation(a, b) == pytest.approx(naive_crs, abs=1e-12)

    # CVS
    per_item: dict[int, Counter] = {}
    for v, row in zip(tok_l, a_l):
        per_item.setdefault(v, Counter()).update(row)
    pref = {v: max(range(E), key=lambda e: (c[e], -e)) for v, c in per_item.items()}
    hits_b = [pref[v] in row for v, row in zip(tok_l, b_l)]
    hits_a = [pref[v] in row for v, row in zip(tok_l, a_l)]
    item_rates = []
    for v in sorted(pref):
        pos = [i for i, t in enumerate(tok_l) if t == v]
        item_rates.append(sum(hits_b[i] for i in pos) / len(pos))
    out = vocab_specialization(tokens, a, b, E, vocab_size=40)
    assert out["num_items"] == len(pref)
    assert out["preferred_expert"].tolist() == [pref[v] for v in sorted(pref)]
    assert out["cvs"] == pytest.approx(sum(hits_b) / T, abs=1e-12)
    assert out["cvs_self"] == pytest.approx(sum(hits_a) / T, abs=1e-12)
    assert out["cvs_item_mean"] == pytest.approx(sum(item_rates) / len(item_rates), abs=1e-12)

    # co-activation and MRI
    n = [0] * E
    joint = [[0] * E for _ in range(E)]
    for row in a_l:
        for i in row:
            n[i] += 1
            for j in row:
                joint[i][j] += 1
    assert coactivation_counts(a, E).tolist() == joint
    assert max_routing_imbalance(a, E) == pytest.approx(max(n) / T)
    if K > 1:
        naive_ca = [[joint[i][j] / n[i] if n[i] else 0.0 for j in range(E)] for i in range(E)]
        assert torch.allclose(coactivation(a, E), torch.tensor(naive_ca, dtype=torch.float64))
    naive_mri = []
    for s in range(0, T, 64):
        chunk = a_l[s : s + 64]
        c = Counter(e for row in chunk for e in row)
        naive_mri.append(max(c.values()) / len(chunk))
    assert mri_per_batch(a, E, 64).tolist() == pytest.approx(naive_mri)


# ------------------------------------------------------------------ forgetting
def test_forgetting_and_adaptation_by_hand():
    assert forgetting(2.0, 2.3) == pytest.approx(0.3)
    assert relative_forgetting(2.0, 2.3) == pytest.approx(0.15)
    assert forgetting(2.0, 1.9) == pytest.approx(-0.1)  # backward transfer
    assert adaptation(3.0, 2.4) == pytest.approx(0.6)
    assert relative_adaptation(3.0, 2.4) == pytest.approx(0.2)
    assert forgetting(torch.tensor(2.0), torch.tensor(2.5)) == pytest.approx(0.5)
    with pytest.raises(MoecptError, match="diverged"):
        forgetting(2.0, float("nan"))
    with pytest.raises(MoecptError):
        forgetting(2.0, -1.0)
    with pytest.raises(MoecptError):
        relative_forgetting(0.0, 1.0)


def test_summarize_losses_by_hand():
    before = {"fineweb": 2.0, "stack": 3.0, "german": 4.0}
    after = {"fineweb": 2.3, "stack": 2.4, "german": 4.0}
    s = summarize_losses(before, after, old_sources=["fineweb"], new_sources=["stack", "german"])
    assert s["forgetting"] == pytest.approx({"fineweb": 0.3})
    assert s["forgetting_rel"] == pytest.approx({"fineweb": 0.15})
    assert s["adaptation"] == pytest.approx({"stack": 0.6, "german": 0.0})
    assert s["adaptation_rel"] == pytest.approx({"stack": 0.2, "german": 0.0})
    assert s["mean_forgetting"] == pytest.approx(0.3)
    assert s["mean_adaptation"] == pytest.approx(0.3)
    assert s["mean_adaptation_rel"] == pytest.approx(0.1)
    assert s["loss_after"]["stack"] == 2.4
    only_old = summarize_losses(before, after, ["fineweb"], [])
    assert only_old["adaptation"] == {} and only_old["mean_adaptation"] is None
    with pytest.raises(MoecptError, match="stack"):
        summarize_losses(before, {"fineweb": 2.3}, ["fineweb"], ["stack"])
    with pytest.raises(MoecptError, match="both old and new"):
        summarize_losses(before, after, ["fineweb"], ["fineweb"])
    with pytest.raises(MoecptError):
        summarize_losses(before, after, [], [])
    with pytest.raises(MoecptError):
        summarize_losses(before, after, "fineweb", [])
