"""LR schedules against hand-computed values (peak 3e-4, min 3e-5 unless stated)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from moecpt.config import OptimConfig, ScheduleConfig
from moecpt.errors import MoecptError
from moecpt.train.schedules import (
    anneal_start_step,
    lr_at,
    run_end_step,
    schedule_phases,
    schedule_table,
)

PEAK, MIN = 3e-4, 3e-5
OPT = OptimConfig(lr=PEAK, min_lr=MIN)
C = 0.55 * PEAK  # 1.65e-4, the paper's constant LR


def approx(x):
    return pytest.approx(x, rel=1e-9, abs=1e-15)


def sched(**kw) -> ScheduleConfig:
    return ScheduleConfig(**kw)


# ------------------------------------------------------------------------------------------------------ warm-up
def test_constant_warmup_from_start_lr():
    s = sched(kind="constant", warmup_fraction=0.1, warmup_start_lr=3e-5)  # W = 10 of 100
    assert lr_at(0, s, OPT, 100) == approx(3e-5)  # step 0 uses the start LR exactly
    assert lr_at(5, s, OPT, 100) == approx(3e-5 + (3e-4 - 3e-5) * 5 / 10)  # 1.65e-4
    assert lr_at(5, s, OPT, 100) == approx(1.65e-4)
    assert lr_at(9, s, OPT, 100) == approx(3e-5 + 2.7e-4 * 0.9)  # 2.73e-4
    assert lr_at(10, s, OPT, 100) == approx(PEAK)
    assert lr_at(99, s, OPT, 100) == approx(PEAK)
    table = schedule_table(s, OPT, 100)
    assert np.all(np.diff(table[:11]) > 0)


def test_warmup_default_start_zero_and_no_warmup():
    s = sched(kind="constant", warmup_fraction=0.01)  # W = round(10) = 10 of 1000
    assert lr_at(0, s, OPT, 1000) == 0.0
    assert lr_at(1, s, OPT, 1000) == approx(3e-5)  # 3e-4 * 1 / 10
    assert lr_at(10, s, OPT, 1000) == approx(PEAK)
    s0 = sched(kind="constant", warmup_fraction=0.0, warmup_start_lr=1e-5)
    assert lr_at(0, s0, OPT, 1000) == approx(PEAK)  # no warm-up: start LR unused


# ------------------------------------------------------------------------------------------------------- cosine
def test_cosine_hand_values():
    # T = 1001, no warm-up: p = s / 1000; lr = 3e-5 + 2.7e-4 * 0.5 * (1 + cos(pi p))
    s = sched(kind="cosine", warmup_fraction=0.0)
    assert lr_at(0, s, OPT, 1001) == approx(3e-4)
    assert lr_at(250, s, OPT, 1001) == approx(3e-5 + 1.35e-4 * (1 + math.sqrt(0.5)))  # 2.60459415e-4
    assert lr_at(250, s, OPT, 1001) == pytest.approx(2.60459415e-4, rel=1e-8)
    assert lr_at(500, s, OPT, 1001) == approx(1.65e-4)  # 3e-5 + 1.35e-4
    assert lr_at(1000, s, OPT, 1001) == approx(MIN)  # min on the last step
    assert lr_at(5000, s, OPT, 1001) == approx(MIN)  # beyond the end: hold the last value


def test_cosine_with_warmup():
    # T = 1011, W = round(10.11) = 10, decay over s - 10 in [0, 1000]
    s = sched(kind="cosine", warmup_fraction=0.01)
    assert lr_at(5, s, OPT, 1011) == approx(1.5e-4)
    assert lr_at(10, s, OPT, 1011) == approx(PEAK)
    assert lr_at(510, s, OPT, 1011) == approx(1.65e-4)
    assert lr_at(1010, s, OPT, 1011) == approx(MIN)
    t = schedule_table(s, OPT, 1011)
    assert np.all(np.diff(t[10:]) <= 0)


# ---------------------------------------------------------------------------------------------------------- wsd
def test_wsd_hand_values():
    # T = 1005: W = round(10.05) = 10; D = round(201) = 201 -> decay starts at 804, linear over 200 intervals
    s = sched(kind="wsd", warmup_fraction=0.01, decay_fraction=0.2)
    assert lr_at(10, s, OPT, 1005) == approx(PEAK)
    assert lr_at(803, s, OPT, 1005) == approx(PEAK)
    assert lr_at(804, s, OPT, 1005) == approx(PEAK)
    assert lr_at(854, s, OPT, 1005) == approx(3e-4 - 2.7e-4 * 50 / 200)  # 2.325e-4
    assert lr_at(904, s, OPT, 1005) == approx(1.65e-4)
    assert lr_at(1004, s, OPT, 1005) == approx(MIN)
    assert [(p.name, p.start, p.end) for p in schedule_phases(s, 1005)] == [
        ("warmup", 0, 10), ("stable", 10, 804), ("decay", 804, 1005)
    ]


# ------------------------------------------------------------------------------------------------- cosine-inf
def test_cosine_inf_paper_defaults():
    # T = 1000, fractions 0.01 / 0.69 / 0.1: W = 10, cool-down to C = 700, constant to A = 800, anneal 800..999
    s = sched(kind="cosine-inf")
    assert lr_at(10, s, OPT, 1000) == approx(PEAK)
    assert lr_at(355, s, OPT, 1000) == approx(C + (PEAK - C) * 0.5)  # mid cool-down: 2.325e-4
    assert lr_at(355, s, OPT, 1000) == approx(2.325e-4)
    assert lr_at(700, s, OPT, 1000) == approx(1.65e-4)
    assert lr_at(799, s, OPT, 1000) == approx(1.65e-4)
    assert lr_at(800, s, OPT, 1000) == approx(1.65e-4)  # anneal exponent 0
    assert lr_at(999, s, OPT, 1000) == approx(MIN)
    assert lr_at(900, s, OPT, 1000) == approx(1.65e-4 * (3e-5 / 1.65e-4) ** (100 / 199))
    assert anneal_start_step(s, 1000) == 800
    assert [(p.name, p.start, p.end) for p in schedule_phases(s, 1000)] == [
        ("warmup", 0, 10), ("cooldown", 10, 700), ("constant", 700, 800), ("anneal", 800, 1000)
    ]


def test_inf_anneal_midpoint_is_geometric_mean():
    # W = 0, C = 700, A = round(799) = 799, N_a = 200: at s = 899 lr = c * (min/c)^0.5 = sqrt(c * min)
    s = sched(kind="cosine-inf", warmup_fraction=0.0, cooldown_fraction=0.7, constant_fraction=0.099)
    assert lr_at(0, s, OPT, 1000) == approx(PEAK)
    assert lr_at(899, s, OPT, 1000) == approx(math.sqrt(1.65e-4 * 3e-5))  # 7.0356236e-5
    assert lr_at(899, s, OPT, 1000) == pytest.approx(7.0356236e-5, rel=1e-7)


def test_invsqrt_inf_hand_values():
    # a = 10, h(1) = 1/sqrt(11) - 1 = -0.69848866; mid cool-down x = 0.5: h = 1/sqrt(6) - 1 = -0.59175171;
    # ratio 0.59175171 / 0.69848866 = 0.84718872
    s = sched(kind="invsqrt-inf", warmup_fraction=0.01, cooldown_fraction=0.69, constant_fraction=0.1)
    h1 = 1 / math.sqrt(11) - 1
    h_half = 1 / math.sqrt(6) - 1
    assert lr_at(355, s, OPT, 1000) == approx(3e-4 + (1.65e-4 - 3e-4) * h_half / h1)
    assert lr_at(355, s, OPT, 1000) == pytest.approx(1.8562952e-4, rel=1e-7)  # 3e-4 - 1.35e-4 * 0.84718872
    assert lr_at(10, s, OPT, 1000) == approx(PEAK)
    assert lr_at(700, s, OPT, 1000) == approx(C)
    assert lr_at(999, s, OPT, 1000) == approx(MIN)
    # inverse-sqrt drops faster than cosine early in the cool-down
    cos = sched(kind="cosine-inf")
    assert lr_at(100, s, OPT, 1000) < lr_at(100, cos, OPT, 1000)


def test_explicit_const_lr():
    s = sched(kind="cosine-inf", const_lr=1e-4)
    assert lr_at(750, s, OPT, 1000) == approx(1e-4)


def test_constant_then_anneal_for_cpt_from_pre_anneal_checkpoint():
    # no warm-up, no cool-down: constant c for 80% of 1000 steps, then anneal to min
    s = sched(kind="cosine-inf", warmup_fraction=0.0, cooldown_fraction=0.0, constant_fraction=0.8)
    t = schedule_table(s, OPT, 1000)
    assert t[0] == approx(C) and t[799] == approx(C) and t[800] == approx(C)
    assert t[999] == approx(MIN)
    assert [p.name for p in schedule_phases(s, 1000)] == ["constant", "anneal"]
    assert np.all(np.diff(t) <= 0)


# ---------------------------------------------------------------------------------------------- shape properties
@pytest.mark.parametrize("kind", ["constant", "cosine", "wsd", "cosine-inf", "invsqrt-inf"])
def test_monotone_and_continuous(kind):
    s = sched(kind=kind, warmup_fraction=0.05)
    t = schedule_table(s, OPT, 1000)
    W = 50
    assert np.all(np.diff(t[: W + 1]) > 0)  # warm-up rises
    assert np.all(np.diff(t[W:]) <= 1e-18)  # never rises after it
    # continuity: after the warm-up no jump exceeds 1% of the peak (phase boundaries included)
    assert np.max(np.abs(np.diff(t[W:]))) < 0.01 * PEAK
    assert t.max() == approx(PEAK)
    assert np.all(t[W:] >= MIN - 1e-15)


def test_table_matches_lr_at():
    for kind in ["constant", "cosine", "wsd", "cosine-inf", "invsqrt-inf"]:
        s = sched(kind=kind, warmup_fraction=0.02, warmup_start_lr=1e-5)
        t = schedule_table(s, OPT, 321)
        assert t.shape == (321,) and t.dtype == np.float64
        for step in (0, 3, 6, 7, 100, 250, 300, 320):
            assert t[step] == lr_at(step, s, OPT, 321)


def test_stop_before_anneal():
    s = sched(kind="cosine-inf", stop_before_anneal=True)
    assert run_end_step(s, 1000) == 800
    assert run_end_step(sched(kind="cosine-inf"), 1000) == 1000
    assert run_end_step(sched(kind="cosine", stop_before_anneal=True), 1000) == 1000
    assert anneal_start_step(sched(kind="cosine"), 1000) is None
    # the schedule is still laid out over the full horizon: the last step run is still at the constant LR
    assert lr_at(799, s, OPT, 1000) == approx(C)


def test_errors_and_edges():
    with pytest.raises(MoecptError, match="min_lr"):
        lr_at(0, sched(kind="cosine-inf"), OptimConfig(lr=3e-4, min_lr=0.0), 1000)
    with pytest.raises(ValueError):
        lr_at(-1, sched(), OPT, 10)
    with pytest.raises(MoecptError):
        lr_at(0, sched(), OPT, 0)
    assert lr_at(0, sched(kind="cosine"), OPT, 1) == approx(PEAK)  # one step: no room to decay
    # fractions summing to exactly 1: no anneal, LR stays at c
    s = sched(kind="cosine-inf", warmup_fraction=0.0, cooldown_fraction=0.5, constant_fraction=0.5)
    assert anneal_start_step(s, 100) == 100
    assert lr_at(99, s, OPT, 100) == approx(C)


def test_schedule_cli_writes_png(tmp_path, capsys):
    from moecpt.cli import main

    recipe = tmp_path / "r.toml"
    recipe.write_text('name = "t"\n[schedule]\nkind = "cosine-inf"\n[train]\nsteps = 200\n')
    out = tmp_path / "plot" / "lr.png"
    rc = main(["schedule", "--recipe", str(recipe), "--set", "schedule.stop_before_anneal=true", "--out", str(out)])
    assert rc == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "anneal starts at step 160" in capsys.readouterr().out
    assert main(["schedule", "--recipe", str(tmp_path / "missing.toml"), "--out", str(out)]) == 2
