"""The lean cross-entropy equals F.cross_entropy in value and gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moecpt.train.loss import cross_entropy


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cross_entropy_matches_torch(dtype):
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(64, 50, generator=gen, dtype=dtype) * 3).requires_grad_(True)
    targets = torch.randint(0, 50, (64,), generator=gen)
    ours = cross_entropy(logits, targets)
    (g_ours,) = torch.autograd.grad(ours * 1.7, logits)  # a non-unit upstream gradient
    ref = F.cross_entropy(logits, targets)
    (g_ref,) = torch.autograd.grad(ref * 1.7, logits)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(g_ours, g_ref)


def test_cross_entropy_gradcheck_and_bad_shapes():
    logits = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0, 6, 3, 3, 1])
    assert torch.autograd.gradcheck(lambda lg: cross_entropy(lg, targets), (logits,))
    with pytest.raises(ValueError, match="expects logits"):
        cross_entropy(logits, targets[:4])
