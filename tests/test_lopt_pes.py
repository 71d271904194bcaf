"""PES: the antithetic persistent estimator is unbiased on a quadratic unrolled over several truncations."""

from __future__ import annotations

import pytest
import torch

from moecpt.lopt.pes import AntitheticPES


pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest.py


def test_pes_matches_true_gradient_of_unrolled_quadratic():
    # inner state x_t = x_{t-1} + phi (x_0 = 0), loss L_t = 0.5 * ||x_t - c||^2 for t = 1..3T, unrolled as three
    # truncations of T rounds. The mean loss is quadratic in phi, so the Gaussian-smoothed gradient is exact:
    # d/dphi mean_t L_t = mean_t t * (t * phi - c).
    T, n_trunc, P, sigma = 5, 3, 4000, 0.01
    phi = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64)
    c = torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    est = AntitheticPES(torch.zeros(P, 3, dtype=torch.float64), sigma)
    x = torch.zeros(2 * P, 3, dtype=torch.float64)
    total = torch.zeros(3, dtype=torch.float64)
    for _ in range(n_trunc):
        thetas = est.begin(phi, gen)
        for _ in range(T):
            x = x + thetas
            est.observe(0.5 * (x - c).square().sum(-1))
        total += est.end()
    t = torch.arange(1, T * n_trunc + 1, dtype=torch.float64)[:, None]
    true = (t * (t * phi - c)).mean(0)
    assert torch.allclose(total / n_trunc, true, rtol=0.05, atol=0.05), (total / n_trunc, true)


def test_pes_restart_resets_accumulated_noise():
    est = AntitheticPES(torch.ones(2, 3), 0.1)
    est.begin(torch.zeros(3), torch.Generator().manual_seed(0))
    eps = est.eps.clone()
    est.restart(torch.tensor([True, False]))
    assert torch.equal(est.xi[0], eps[0])
    assert torch.allclose(est.xi[1], 1 + eps[1])
