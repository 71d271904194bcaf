"""benchmarks/lopt_lm.py's logic without torchrun: interpolation at equal bytes, choosing DiLoCo's outer LR on
validation with a grid that widens past its edge, the run-folder states (a finished folder is read, never
relaunched; an unfinished one is relaunched; a foreign one is refused and left as it is), LAgg-A skipped at
another K, and the recipe's constant LR keeping the fixed-step warning silent."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

from moecpt.config import identity_json
from moecpt.errors import MoecptError

ROOT = Path(__file__).resolve().parent.parent


def _load():
    spec = importlib.util.spec_from_file_location("lopt_lm_bench", ROOT / "benchmarks" / "lopt_lm.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve their module by name
    spec.loader.exec_module(mod)
    return mod


lm = _load()


# ------------------------------------------------------------------------------------------------ interpolation
def test_interp_at_inside_on_points_and_outside():
    xs, ys = [0.0, 10.0, 20.0], [8.0, 6.0, 5.0]
    assert lm.interp_at(xs, ys, 5.0) == pytest.approx(7.0)
    assert lm.interp_at(xs, ys, 15.0) == pytest.approx(5.5)
    assert lm.interp_at(xs, ys, 10.0) == 6.0 and lm.interp_at(xs, ys, 20.0) == 5.0 and lm.interp_at(xs, ys, 0) == 8
    assert lm.interp_at(xs, ys, 20.5) is None and lm.interp_at(xs, ys, -1.0) is None  # never extrapolated
    assert lm.interp_at([0.0, 4.0, 4.0, 8.0], [9.0, 7.0, 6.5, 6.0], 4.0) == 6.5  # newest y at a repeated x
    assert lm.interp_at([], [], 0.0) is None


def test_equal_bytes_compares_at_the_smallest_final_budget():
    # DiLoCo and LOpt-A all-reduce (B per round); LAgg-A all-gathers (4 B per round at K = 8): it runs out first
    r = [0, 1, 2, 3, 4]
    curves = {"diloco": {"bytes": [i * 1.0 for i in r], "val_loss": [8.0, 7.0, 6.0, 5.5, 5.0]},
              "lopt-a": {"bytes": [i * 1.0 for i in r], "val_loss": [8.0, 6.8, 6.2, 5.8, 5.6]},
              "lagg-a": {"bytes": [i * 0.5 for i in r], "val_loss": [8.0, 6.0, 5.0, 4.8, 4.7]}}
    eq = lm.equal_bytes(curves)
    assert eq["budget_bytes"] == 2.0 and eq["limited_by"] == "lagg-a"
    assert eq["val_loss"] == {"diloco": 6.0, "lopt-a": 6.2, "lagg-a": 4.7}
    curves["lagg-a"]["bytes"] = [i * 0.625 for i in r]  # budget 2.5: between points of the others' curves
    eq = lm.equal_bytes(curves)
    assert eq["budget_bytes"] == 2.5 and eq["val_loss"]["lagg-a"] == 4.7
    assert eq["val_loss"]["diloco"] == pytest.approx(5.75) and eq["val_loss"]["lopt-a"] == pytest.approx(6.0)


# ------------------------------------------------------------------------------------------------ tuning
def _bowl(best: float, calls: list[float]):
    def val_loss(lr: float) -> float:
        calls.append(lr)
        return 5.0 + (math.log(lr) - math.log(best)) ** 2
    return val_loss


def test_tuning_widens_past_the_edge_until_the_best_is_inside():
    calls: list[float] = []
    res = lm.tune_outer_lr((0.3, 0.5, 0.7, 1.0), 3, _bowl(2.0, calls))
    # 1.0 / 0.7 = 1.43 per rung: 1.43, 2.04 (the minimum), then 2.92 shows 2.04 is inside
    assert res["best"]["outer_lr"] == pytest.approx(2.04082, rel=1e-4)
    assert res["grid"][-1] > res["best"]["outer_lr"] and res["widening_rounds"] == 3 and not res["cap_hit"]
    assert len(calls) == len(set(calls)) == res["points"] == 7  # every point run once
    low: list[float] = []
    res = lm.tune_outer_lr((0.3, 0.5, 0.7, 1.0), 3, _bowl(0.2, low))
    assert res["best"]["outer_lr"] == pytest.approx(0.18) and res["grid"][0] == pytest.approx(0.108)


def test_tuning_reports_a_capped_edge_and_treats_divergence_as_worst():
    res = lm.tune_outer_lr((0.5, 0.7, 1.0), 1, _bowl(10.0, []))
    assert res["cap_hit"] and res["open_edges"] == ["outer_lr:high"] and res["widening_rounds"] == 1
    inside = lm.tune_outer_lr((0.5, 0.7, 1.0), 1, _bowl(0.7, []))
    assert inside["best"]["outer_lr"] == 0.7 and inside["points"] == 3 and not inside["cap_hit"]
    diverged = lm.tune_outer_lr((0.5, 0.7, 1.0), 0, lambda lr: {0.5: 6.0, 0.7: float("nan"), 1.0: None}[lr])
    assert diverged["best"]["outer_lr"] == 0.5 and diverged["cap_hit"]  # chosen, but on the low edge
    assert lm.tune_outer_lr((0.5, 0.7), 0, lambda lr: float("inf"))["val_loss"] is None


# ------------------------------------------------------------------------------------------------ run folders
H, STEPS = 4, 8


def _spec(tmp_path: Path, lr: float = 0.7) -> object:
    sets = lm.run_sets(H, STEPS, {"outer_optimizer": "nesterov", "outer_lr": lr, "outer_momentum": 0.9})
    return lm.RunSpec(f"H{H}-diloco-lr{lr:g}", tmp_path / "out" / f"H{H}" / f"diloco-lr{lr:g}", sets)


def _write_run(spec, finished: bool, recipe_identity: dict | None = None) -> None:
    """A run folder as moecpt writes it: run.json, then train / val records per step, the summary at the end."""
    spec.dir.mkdir(parents=True)
    ident = recipe_identity if recipe_identity is not None else identity_json(spec.recipe())
    (spec.dir / "run.json").write_text(json.dumps({"identity": {"mode": "pretrain", "recipe": ident}}))
    _write_metrics(spec, finished)


def _write_metrics(spec, finished: bool) -> None:
    recs = [{"step": 0, "split": "val", "source": "english", "loss": 8.0, "comm_bytes": 0, "mri_mean": 0.2}]
    last = STEPS if finished else H
    for s in range(1, last + 1):
        recs.append({"step": s, "tokens": 64 * s, "loss": 9.0 - 0.1 * s, "comm_bytes": 200 * (s // H)})
        if s % H == 0:
            recs.append({"step": s, "split": "val", "source": "english", "loss": 8.0 - s / 4,
                         "comm_bytes": 200 * (s // H), "mri_mean": 0.5})
    if finished:  # a resumed run evaluates again at its checkpoint's step: the later record wins
        recs.insert(-1, {"step": H, "split": "val", "source": "english", "loss": 7.0, "comm_bytes": 200})
        recs.append({"step": STEPS, "event": "comm_summary", "rounds": STEPS // H, "bytes_sent": 200,
                     "comm_bytes": 400})
    # a torn last line, as a killed run leaves it
    (spec.dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"step": 9, "tor')


def _no_launch(spec, workers, logs):
    raise AssertionError(f"{spec.name} was launched although its folder is finished")


def test_a_finished_folder_is_read_not_relaunched(tmp_path):
    spec = _spec(tmp_path)
    _write_run(spec, finished=True)
    before = {p: p.read_bytes() for p in spec.dir.iterdir()}
    bench = lm.Bench(tmp_path / "out", 8, STEPS, _no_launch, log=lambda s: None)
    res = bench.run(spec, H)
    assert bench.reused == [spec.name] and bench.launched == []
    assert {p: p.read_bytes() for p in spec.dir.iterdir()} == before  # nothing written into it
    assert res["final_val_loss"] == 6.0 and res["rounds"] == 2 and res["bytes_sent_per_worker"] == 200
    assert res["final_train_loss"] == pytest.approx((8.5 + 8.4 + 8.3 + 8.2) / 4)  # the last round's steps 5..8
    assert res["curve"] == {"round": [0.0, 1.0, 2.0], "bytes": [0.0, 100.0, 200.0], "val_loss": [8.0, 7.0, 6.0]}


def test_an_unfinished_folder_is_relaunched_with_the_same_command(tmp_path):
    spec = _spec(tmp_path)
    _write_run(spec, finished=False)
    seen = []

    def resume(s, workers, logs):  # stands in for torchrun resuming the newest checkpoint to the end
        seen.append((s.name, s.sets, workers))
        _write_metrics(s, finished=True)

    bench = lm.Bench(tmp_path / "out", 8, STEPS, resume, log=lambda s: None)
    assert lm.folder_state(spec, STEPS) == "unfinished"
    res = bench.run(spec, H)
    assert seen == [(spec.name, spec.sets, 8)] and bench.launched == [spec.name]
    assert res["final_val_loss"] == 6.0


def test_a_launch_that_ends_without_its_summary_is_an_error(tmp_path):
    spec = _spec(tmp_path)
    bench = lm.Bench(tmp_path / "out", 8, STEPS, lambda s, w, logs: _write_run(s, finished=False), log=lambda s: None)
    with pytest.raises(MoecptError, match="without its final record"):
        bench.run(spec, H)


def test_foreign_folders_are_refused_and_left_alone(tmp_path):
    other = _spec(tmp_path)
    _write_run(other, finished=True, recipe_identity={"name": "someone-else"})
    bench = lm.Bench(tmp_path / "out", 8, STEPS, _no_launch, log=lambda s: None)
    with pytest.raises(MoecptError, match="holds another run"):
        bench.run(other, H)
    assert json.loads((other.dir / "run.json").read_text())["identity"]["recipe"] == {"name": "someone-else"}
    stray = _spec(tmp_path, lr=0.5)
    stray.dir.mkdir(parents=True)
    (stray.dir / "notes.txt").write_text("mine")
    with pytest.raises(MoecptError, match="holds no moecpt run"):
        bench.run(stray, H)
    assert (stray.dir / "notes.txt").read_text() == "mine"
    # the same spec with another outer LR is another run: its own folder, and it would be refused in this one
    moved = lm.RunSpec(other.name, other.dir, lm.run_sets(H, STEPS, {"outer_optimizer": "nesterov", "outer_lr": 0.5,
                                                                     "outer_momentum": 0.9}))
    good = _spec(tmp_path, lr=0.3)
    _write_run(good, finished=True)
    with pytest.raises(MoecptError, match="holds another run"):
        lm.folder_state(lm.RunSpec(good.name, good.dir, moved.sets), STEPS)


# ------------------------------------------------------------------------------------------------ set-up
def test_lagg_a_is_skipped_at_another_k_and_weights_are_tagged_by_content():
    learned, skipped = lm.select_learned(["lopt-a", "lagg-a"], 4)
    assert [s.kind.value for *_, s in learned] == ["lopt-a"] and "K = 8" in skipped["lagg-a"]
    learned8, skipped8 = lm.select_learned(["lopt-a", "lagg-a"], 8)
    assert [s.kind.value for *_, s in learned8] == ["lopt-a", "lagg-a"] and not skipped8
    tag, outer, path, _ = learned8[1]
    assert outer == "lagg-a" and tag.startswith("lagg-a-") and len(tag) == len("lagg-a-") + 8
    with pytest.raises(MoecptError, match="safetensors"):
        lm.select_learned(["adam"], 8)


def test_the_recipe_keeps_the_fixed_step_warning_silent(tmp_path):
    from moecpt.config import load_recipe
    from moecpt.lopt.schedule_check import fixed_step_schedule_warning

    sets = list(lm.run_sets(8, 64, {"outer_optimizer": "lopt-a"}))
    r = load_recipe(lm.RECIPE, sets)
    assert r.distributed.local_steps == 8 and r.train.eval_every == 8 and r.train.checkpoint_every == 32
    assert fixed_step_schedule_warning(r) is None
    decaying = load_recipe(lm.RECIPE, [*sets, "schedule.kind=cosine", "optim.min_lr=3e-5"])
    assert "fixed-size" in fixed_step_schedule_warning(decaying)


def test_bad_arguments_are_one_line_errors_before_any_run(tmp_path):
    with pytest.raises(MoecptError, match="not a multiple of H"):
        lm.main(["--out", str(tmp_path / "o"), "--H", "8,16", "--steps", "24"])
    with pytest.raises(MoecptError, match="positive numbers"):
        lm.main(["--out", str(tmp_path / "o"), "--grid", "0.5,-1"])
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------------ one H, end to end
def _fake_torchrun(calls: list[str]):
    """Writes what ``moecpt pretrain`` would: DiLoCo's final loss is a bowl in log outer LR with its minimum at
    0.45, LOpt-A ends at 5.3, LAgg-A at 5.0 but all-gathers 4x the bytes per round."""
    def launch(spec, workers, logs):
        calls.append(spec.name)
        sets = dict(s.split("=", 1) for s in spec.sets)
        outer = json.loads(sets["distributed.outer_optimizer"])
        h, steps = int(sets["distributed.local_steps"]), int(sets["train.steps"])
        if outer == "nesterov":
            final, per_round = 5.0 + math.log(float(sets["distributed.outer_lr"]) / 0.45) ** 2, 100
        else:
            final, per_round = (5.3, 100) if outer == "lopt-a" else (5.0, 400)
        spec.dir.mkdir(parents=True)
        (spec.dir / "run.json").write_text(json.dumps({"identity": {"recipe": identity_json(spec.recipe())}}))
        rounds = steps // h
        recs = []
        for r in range(rounds + 1):  # val loss falls linearly from 8 to `final`
            recs.append({"step": r * h, "split": "val", "loss": 8.0 - (8.0 - final) * r / rounds,
                         "comm_bytes": 2 * per_round * r, "mri_mean": 0.5})
            recs += [{"step": r * h + i, "loss": final + 0.5} for i in range(1, h + 1) if r < rounds]
        recs.append({"step": steps, "event": "comm_summary", "rounds": rounds, "bytes_sent": per_round * rounds})
        (spec.dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in recs))
    return launch


def test_one_h_tunes_compares_and_a_second_pass_reuses_every_run(tmp_path):
    learned, _ = lm.select_learned(["lopt-a", "lagg-a"], 8)
    calls: list[str] = []
    bench = lm.Bench(tmp_path, 8, 32, _fake_torchrun(calls), log=lambda s: None)
    res = lm.bench_h(bench, 8, (0.5, 0.7, 1.0), 1, learned)
    t = res["diloco_tuning"]
    # 0.5 is best on (0.5, 0.7, 1.0): the low edge; one rung lower (0.357) shows it is inside
    assert t["widened"] == ["outer_lr:low"] and t["best"]["outer_lr"] == 0.5
    assert not t["cap_hit"] and [p["outer_lr"] for p in t["points"]] == [0.357143, 0.5, 0.7, 1.0]
    assert res["rounds"] == 4 and set(res["methods"]) == {"diloco", "lopt-a", "lagg-a"}
    assert res["methods"]["lagg-a"]["bytes_sent_per_round"] == 4 * res["methods"]["diloco"]["bytes_sent_per_round"]
    eq = res["equal_bytes"]  # LAgg-A has spent DiLoCo's whole budget after one round of four
    assert eq["budget_bytes"] == 400 and eq["limited_by"] in ("diloco", "lopt-a")
    assert eq["val_loss"]["lagg-a"] == pytest.approx(8.0 - 3.0 / 4) and eq["val_loss"]["lopt-a"] == pytest.approx(5.3)
    md = lm.markdown({"H": {8: res}})
    assert "| 8 | 4 | lagg-a |" in md and "**5.0000**" in md and "0.357143" in md and "LR 0.5," in md
    assert len(calls) == 6
    again = lm.Bench(tmp_path, 8, 32, _no_launch, log=lambda s: None)
    assert lm.bench_h(again, 8, (0.5, 0.7, 1.0), 1, learned) == res and len(again.reused) == 6
    assert all(c is not None and c["cpu_s"] >= 0 for c in again.costs.values())  # measured once, reported again
    lm.plot({"H": {8: res}, "config": {"workers": 8, "steps": 32}}, tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


def test_stopping_a_job_takes_its_workers_with_it(tmp_path):
    """A timed-out torchrun must not leave its workers running: the whole process group is stopped."""
    import os
    import subprocess
    import time

    pids = tmp_path / "pids"
    proc = subprocess.Popen(["sh", "-c", f"sleep 60 & echo $! > {pids}; wait"], start_new_session=True)
    for _ in range(100):
        if pids.exists() and pids.read_text().strip():
            break
        time.sleep(0.05)
    child = int(pids.read_text())
    lm._stop_group(proc)
    assert proc.poll() is not None
    for _ in range(100):  # the orphan is reaped by init a moment later
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"worker {child} survived its job")
