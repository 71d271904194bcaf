"""Sync strategies without processes: the outer step of local SGD / SlowMo / DiLoCo against their formulas, gather
mode, learned and arbitrary torch outer optimizers, outer state round trips, buffers averaged at a round, byte
accounting and the emulated link, configuration rules, and simulated DDP against one process."""

from __future__ import annotations

import copy
import warnings
import time

import pytest
import torch
from torch import nn

from moecpt.config import recipe_from_dict
from moecpt.distributed.accounting import CommAccountant, LinkEmulator, allgather_bytes, allreduce_bytes
from moecpt.distributed.launch import DistInfo
from moecpt.distributed.local_sgd import LocalSGDSync, TorchOuter
from moecpt.distributed.runtime import Distributed, build_sync
from moecpt.distributed.strategy import SYNC_KEY
from moecpt.errors import MoecptError
from moecpt.lopt.baselines import DiLoCo
from moecpt.lopt.optimizers import OuterOptimizer
from moecpt.train.checkpoint import load_checkpoint
from moecpt.train.trainer import Trainer

from test_trainer import raw_recipe

K = 2


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.register_buffer("expert_bias", torch.zeros(2))  # persistent: averaged at a round
        self.register_buffer("step_load", torch.zeros(2), persistent=False)  # a counter: left alone


def toy_sync(sync: str = "diloco", workers: int = K, state: dict | None = None, outer=None, weights=None,
             **dist_keys):
    """A local-SGD-family strategy over ``workers`` simulated Toy workers (``weights``/``state``: as on resume)."""
    r = recipe_from_dict(raw_recipe(), [f"distributed.sync={sync}",
                                        *(f"distributed.{k}={v}" for k, v in dist_keys.items())])
    s = LocalSGDSync(r, DistInfo(), workers, workers, torch.device("cpu"), outer=outer)
    torch.manual_seed(0)
    model = Toy()
    if weights is not None:
        model.load_state_dict(weights)
    make = lambda m: torch.optim.SGD(m.parameters(), lr=0.1)  # noqa: E731
    return s, s.setup(model, make(model), make, state)


def drift(workers, seed: int = 1) -> list[list[torch.Tensor]]:
    """Move every worker somewhere else (as H local steps would); returns each worker's parameters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for w in workers:
            for p in w.model.parameters():
                p.add_(torch.randn(p.shape, generator=g))
            w.model.expert_bias.add_(torch.randn(2, generator=g))
            w.model.step_load.fill_(w.index + 5)
    return [[p.detach().clone() for p in w.model.parameters()] for w in workers]


def test_local_sgd_round_averages_parameters_and_buffers():
    s, workers = toy_sync("local-sgd")
    before = drift(workers)
    biases = torch.stack([w.model.expert_bias.clone() for w in workers])
    s.sync_round(workers)
    for w in workers:
        for p, *ps in zip(w.model.parameters(), *before):
            torch.testing.assert_close(p, torch.stack(ps).mean(0))
        torch.testing.assert_close(w.model.expert_bias, biases.mean(0))
        assert float(w.model.step_load[0]) == w.index + 5  # non-persistent buffers are not synchronised
    n = sum(p.numel() for p in workers[0].model.parameters()) + 2  # + the expert-bias buffer
    assert s.acct.kinds["sync"]["bytes_sent"] == allreduce_bytes(4 * n, K) == 4 * n  # 2 (K-1)/K = 1 for K = 2
    assert s.acct.rounds == 1


def test_diloco_outer_step_is_nesterov_sgd_on_the_pseudo_gradient():
    s, workers = toy_sync("diloco")  # defaults: lr 0.7, momentum 0.9
    theta = [p.detach().clone() for p in workers[0].model.parameters()]
    ref = DiLoCo(lr=0.7, momentum=0.9)  # moecpt.lopt's independent implementation of the formula
    for rnd in range(3):
        before = drift(workers, seed=rnd)
        ref.step(theta, [torch.stack(ps).mean(0) - t for t, *ps in zip(theta, *before)])
        s.sync_round(workers)
        for p, t in zip(workers[1].model.parameters(), theta):
            torch.testing.assert_close(p, t, rtol=1e-5, atol=1e-6)


def test_slowmo_is_heavy_ball_on_the_pseudo_gradient():
    s, workers = toy_sync("slowmo", outer_lr=0.5, outer_momentum=0.8)
    theta = [p.detach().clone() for p in workers[0].model.parameters()]
    v = [torch.zeros_like(t) for t in theta]
    for rnd in range(3):
        before = drift(workers, seed=rnd)
        for i, (t, *ps) in enumerate(zip(theta, *before)):
            g = t - torch.stack(ps).mean(0)
            v[i] = 0.8 * v[i] + g
            theta[i] = t - 0.5 * v[i]
        s.sync_round(workers)
        for p, t in zip(workers[0].model.parameters(), theta):
            torch.testing.assert_close(p, t, rtol=1e-5, atol=1e-6)


class Recorder(OuterOptimizer):
    """A gather-mode outer optimizer that records what it gets and applies the mean (= local SGD)."""

    needs_worker_deltas = True

    def __init__(self):
        self.seen: list[list[torch.Tensor]] = []

    def step(self, params, deltas):
        self._check(params, deltas)
        self.seen.append([d.clone() for d in deltas])
        for p, d in zip(params, deltas):
            p.add_(d.mean(0))

    def state_dict(self):
        return {"n": torch.tensor(len(self.seen))}

    def load_state_dict(self, state):
        pass


def test_gather_mode_hands_every_workers_delta_to_the_outer_step():
    rec = Recorder()
    s, workers = toy_sync("local-sgd", outer=rec)
    theta = [p.detach().clone() for p in workers[0].model.parameters()]
    before = drift(workers)
    s.sync_round(workers)
    (deltas,) = rec.seen
    for d, t, *ps in zip(deltas, theta, *before):
        assert d.shape == (K, *t.shape)
        for k in range(K):
            torch.testing.assert_close(d[k], ps[k] - t)
    n = sum(t.numel() for t in theta) + 2
    assert s.acct.kinds["sync"]["bytes_sent"] == allgather_bytes(4 * n, K) == (K - 1) * 4 * n


def test_any_torch_optimizer_and_the_learned_ones_plug_in():
    s, workers = toy_sync("local-sgd", outer=lambda ps: torch.optim.Adam(ps, lr=0.01))
    assert isinstance(s.outer, TorchOuter)
    drift(workers)
    s.sync_round(workers)
    assert s.outer.state_dict()["state"]  # Adam moments of the outer step

    s, workers = toy_sync("diloco", outer_optimizer="lopt-a")  # LOpt-A: any K, mean delta
    theta = [p.detach().clone() for p in workers[0].model.parameters()]
    drift(workers)
    s.sync_round(workers)
    assert not s.outer.needs_worker_deltas and s.outer.round == 1
    assert any(not torch.equal(p, t) for p, t in zip(workers[0].model.parameters(), theta))

    s, _ = toy_sync("diloco", workers=8, outer_optimizer="lagg-a")  # LAgg-A: its own K, gather mode
    assert s.outer.needs_worker_deltas and s.outer.num_workers == 8
    with pytest.raises(MoecptError, match="K=8"):
        toy_sync("diloco", workers=2, outer_optimizer="lagg-a")
    with pytest.raises(MoecptError, match="outer_optimizer='adam' is unknown"):
        toy_sync("diloco", outer_optimizer="adam")


def test_outer_state_survives_a_checkpoint():
    s, workers = toy_sync("diloco")
    drift(workers, seed=0)
    s.sync_round(workers)
    model_state, opt_state, _ = s.checkpoint_state(workers)
    state = opt_state[SYNC_KEY]
    assert state["kind"] == "diloco" and state["workers"] == K and set(state["inner"]) == {"1"}
    assert state["outer"]["state"]  # Nesterov momentum buffers
    state, model_state = copy.deepcopy(state), copy.deepcopy(model_state)  # as if read back from disk
    s2, workers2 = toy_sync("diloco", state=state, weights=model_state)  # what a resumed run does
    drift(workers, seed=1)
    drift(workers2, seed=1)
    s.sync_round(workers)
    s2.sync_round(workers2)
    for p, p2 in zip(workers[0].model.parameters(), workers2[0].model.parameters()):
        torch.testing.assert_close(p, p2)
    with pytest.raises(MoecptError, match="resume with the same number of workers"):
        toy_sync("diloco", workers=4, state=state)


def test_accounting_and_the_emulated_link():
    assert allreduce_bytes(1000, 1) == 0 and allreduce_bytes(1000, 4) == 1500 and allgather_bytes(1000, 4) == 3000
    link = LinkEmulator(bandwidth_gbit=1.0, latency_ms=10.0)
    assert link.seconds(125_000_000) == pytest.approx(1.01)  # 1 Gbit takes 1 s, plus 10 ms
    t0 = time.perf_counter()
    LinkEmulator(bandwidth_gbit=8e-6, latency_ms=20.0).delay(10)  # 80 bits at 8 kbit/s = 10 ms, + 20 ms
    assert time.perf_counter() - t0 >= 0.029
    acct = CommAccountant(workers=4)
    acct.record("sync", 300, 300, 0.5)
    acct.rounds = 1
    acct.add_step(2.0, 0.5)
    summ = acct.summary(tokens=400)  # 100 tokens per worker
    assert summ["bytes_per_token"] == 6.0 and summ["bytes_per_round"] == 600 and summ["compute_time_s"] == 1.5
    again = CommAccountant(workers=4)
    again.load_state_dict(acct.state_dict())
    assert again.summary(tokens=400) == summ


def test_configuration_rules():
    r = recipe_from_dict(raw_recipe(), ["distributed.sync=diloco"])
    assert r.distributed.outer() == ("nesterov", 0.7, 0.9)
    assert recipe_from_dict(raw_recipe(), ["distributed.sync=local-sgd"]).distributed.outer() == ("sgd", 1.0, 0.0)
    with pytest.raises(MoecptError, match="outer_lr applies to sync = local-sgd, slowmo or diloco"):
        recipe_from_dict(raw_recipe(), ["distributed.outer_lr=0.5"])
    with pytest.raises(MoecptError, match="local_steps=4 needs sync"):
        recipe_from_dict(raw_recipe(), ["distributed.local_steps=4"])
    with pytest.raises(MoecptError, match="cannot be simulated"):
        build_sync(recipe_from_dict(raw_recipe(), ["distributed.sync=fsdp"]), DistInfo(), torch.device("cpu"), 2)
    with pytest.raises(MoecptError, match="does not split over 3 workers"):
        build_sync(r, DistInfo(), torch.device("cpu"), 3)


def test_simulated_ddp_equals_one_process(tmp_path):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        raw = raw_recipe("smoke-switch", train={"steps": 3, "checkpoint_every": 3})
        raw["model"]["moe"] = {"router": {"kind": "bias", "bias_update_rate": 0.01}}  # loads summed over workers
        Trainer(recipe_from_dict(raw), tmp_path / "sim", show_progress=False, simulate_workers=2,
                parallel=Distributed()).run()
        raw["train"]["micro_batch_size"] = 4
        Trainer(recipe_from_dict(raw), tmp_path / "one", show_progress=False).run()
    finally:
        torch.set_num_threads(n)
    a, b = load_checkpoint(tmp_path / "sim"), load_checkpoint(tmp_path / "one")
    for k, v in a.model_state().items():
        torch.testing.assert_close(v, b.model_state()[k], rtol=0, atol=1e-6)
    assert any(float(v.abs().sum()) > 0 for k, v in a.model_state().items() if k.endswith("expert_bias"))
    assert a.meta["workers"] == 2 and "workers" not in b.meta  # a single process's checkpoints are unchanged


@pytest.mark.parametrize("schedule, warns", [("cosine", True), ("constant", False)])
def test_a_fixed_step_learned_outer_optimizer_under_a_decaying_schedule_warns(schedule, warns):
    """The shipped LOpt-A takes the paper's fixed-size step: with the inner LR decaying it keeps kicking the model
    at the end of training (docs/lopt.md), so the runtime says so once, at set-up."""
    raw = raw_recipe()
    raw["schedule"] = {"kind": schedule}
    raw["distributed"] = {"sync": "diloco", "local_steps": 2, "outer_optimizer": "lopt-a"}
    recipe = recipe_from_dict(raw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        LocalSGDSync(recipe, DistInfo(), 2, 2, torch.device("cpu"))
    lines = [str(w.message) for w in caught if "lopt-a" in str(w.message) or "fixed" in str(w.message)]
    assert bool(lines) == warns, [str(w.message) for w in caught]
    assert all("\n" not in line for line in lines)
