"""MixtureSampler and val_batches on the bundled demo data."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from moecpt.data.mixture import MixtureSampler, val_batches
from moecpt.data.prepared import PreparedData
from moecpt.errors import MoecptError


@pytest.fixture(scope="module")
def demo():
    return PreparedData.open("demo")


def _window_ids(data, name, rows: torch.Tensor, seq_len: int) -> set[int]:
    """Map each row back to its window index in the source (rows are exact copies of windows)."""
    tokens = np.asarray(data.train_tokens(name), dtype=np.int64)
    w = seq_len + 1
    wins = tokens[: len(tokens) // w * w].reshape(-1, w)
    lookup = {row.tobytes(): i for i, row in enumerate(wins)}
    return {lookup[r.numpy().tobytes()] for r in rows}


def _source_of_rows(sampler: MixtureSampler, steps: int) -> np.ndarray:
    counts = []
    for _ in range(steps):
        before = dict(sampler.tokens_consumed())
        sampler.next_batch()
        after = sampler.tokens_consumed()
        counts.append([(after[n] - before[n]) // sampler.seq_len for n in after])
    return np.array(counts)


def test_batch_shape_dtype_and_content(demo):
    s = MixtureSampler(demo, {"english": 1.0}, seq_len=128, batch_size=16, seed=0)
    b = s.next_batch()
    assert b.shape == (16, 129) and b.dtype == torch.int64
    assert int(b.max()) < demo.vocab_size
    assert len(_window_ids(demo, "english", b, 128)) == 16  # every row is a real, distinct window


@pytest.mark.parametrize("mixture", [{"code": 0.7, "english": 0.3}, {"english": 0.5, "code": 0.3, "german": 0.2},
                                     {"german": 0.95, "english": 0.05, "code": 0.0}])
def test_fractions_match_weights(demo, mixture):
    s = MixtureSampler(demo, mixture, seq_len=128, batch_size=16, seed=1)
    per_step = _source_of_rows(s, 50)
    total = per_step.sum(0)
    assert total.sum() == 50 * 16
    norm = sum(mixture.values())
    for i, name in enumerate(s.tokens_consumed()):
        assert abs(total[i] / total.sum() - mixture[name] / norm) < 0.01, (name, total)
    assert s.tokens_consumed()["english"] == total[list(mixture).index("english")] * 128


def test_save_restore_mid_epoch_is_identical(demo):
    mix = {"english": 0.6, "german": 0.4}
    a = MixtureSampler(demo, mix, seq_len=128, batch_size=16, seed=7)
    for _ in range(23):
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))  # must survive JSON
    ref = [a.next_batch() for _ in range(10)]
    b = MixtureSampler(demo, mix, seq_len=128, batch_size=16, seed=7)
    b.load_state_dict(state)
    for r in ref:
        assert torch.equal(b.next_batch(), r)
    assert b.tokens_consumed() == a.tokens_consumed() and b.epochs() == a.epochs()


def test_restore_across_epoch_boundary(demo):
    # seq_len 4095: english has ~2600 windows -> epoch 2 after ~81 steps of 32; stop 2 steps before the end.
    mix = {"english": 1.0}
    steps = len(demo.train_tokens("english")) // 4096 // 32 - 2
    a = MixtureSampler(demo, mix, seq_len=4095, batch_size=32, seed=0, allow_repeat=True)
    for _ in range(steps):
        a.next_batch()
    state = a.state_dict()
    assert a.epochs()["english"] < 1.0
    ref = [a.next_batch() for _ in range(5)]
    assert a.epochs()["english"] > 1.0
    b = MixtureSampler(demo, mix, seq_len=4095, batch_size=32, seed=0, allow_repeat=True)
    b.load_state_dict(state)
    assert all(torch.equal(b.next_batch(), r) for r in ref)


def test_ranks_disjoint_and_union_is_global_batch(demo):
    mix = {"english": 0.5, "code": 0.5}
    glob = MixtureSampler(demo, mix, seq_len=64, batch_size=16, seed=3)
    ranks = [MixtureSampler(demo, mix, seq_len=64, batch_size=16, seed=3, rank=r, world_size=4) for r in range(4)]
    seen: list[bytes] = []
    for _ in range(20):
        g = glob.next_batch()
        parts = [r.next_batch() for r in ranks]
        assert all(p.shape == (4, 65) for p in parts)
        assert torch.equal(torch.cat(parts), g)
        seen += [row.numpy().tobytes() for p in parts for row in p]
    assert len(seen) == len(set(seen))  # no sample twice, across ranks and steps
    assert ranks[2].tokens_consumed() == glob.tokens_consumed()  # global counts
    with pytest.raises(MoecptError, match="not divisible"):
        MixtureSampler(demo, mix, seq_len=64, batch_size=10, seed=0, world_size=4)


def test_epoch_permutation_covers_all_windows(demo):
    s = MixtureSampler(demo, {"code": 1.0}, seq_len=4095, batch_size=5, seed=0)
    nwin = len(demo.train_tokens("code")) // 4096
    rows = torch.cat([s.next_batch() for _ in range(nwin // 5)])
    assert len(_window_ids(demo, "code", rows, 4095)) == len(rows)


def test_unknown_source_and_budget(demo):
    with pytest.raises(MoecptError, match="unknown source 'klingon'.*english"):
        MixtureSampler(demo, {"klingon": 1.0}, seq_len=128, batch_size=16, seed=0)
    n = len(demo.train_tokens("german"))
    steps = n // (129 * 8) + 10  # german half of 16 rows -> more than one epoch
    with pytest.raises(MoecptError, match="needs .* tokens of source 'german' but it has .*data.allow_repeat = true"):
        MixtureSampler(demo, {"german": 0.5, "english": 0.5}, 128, 16, 0, total_steps=steps)
    with pytest.warns(UserWarning, match=r"'german' will be repeated: 1\.\d+ epochs"):
        MixtureSampler(demo, {"german": 0.5, "english": 0.5}, 128, 16, 0, total_steps=steps, allow_repeat=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MixtureSampler(demo, {"german": 0.5, "english": 0.5}, 128, 16, 0, total_steps=steps // 2)


def test_val_batches(demo):
    vb = val_batches(demo, "code", seq_len=128, batch_size=16, max_batches=4)
    assert len(vb) == 4 and all(b.shape == (16, 129) and b.dtype == torch.int64 for b in vb)
    again = val_batches(demo, "code", 128, 16, 4)
    assert all(torch.equal(x, y) for x, y in zip(vb, again))
    rows = torch.cat(vb)
    assert len({r.numpy().tobytes() for r in rows}) == len(rows)
    val = torch.from_numpy(np.asarray(demo.val_tokens("code"), dtype=np.int64))
    assert torch.equal(rows.flatten(), val[: rows.numel()])  # consecutive, non-overlapping windows
    big = val_batches(demo, "code", 128, 16, 10_000)
    assert len(big) == len(demo.val_tokens("code")) // 129 // 16  # fewer when the split is short
    with pytest.raises(MoecptError, match="fewer than one sequence"):
        val_batches(demo, "code", 10**6, 1, 1)
