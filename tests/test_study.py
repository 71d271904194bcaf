"""End-to-end: the smoke study trains, evaluates, reports; it resumes after an interruption without redoing
finished stages; bad study inputs give one-line errors."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest

from moecpt.study.plan import plan_stages
from moecpt.study.runner import DONE_FILE, run_study
from moecpt.study.config import load_study_recipe
from moecpt.config import find_bundled_recipe
from moecpt.errors import MoecptError

SMOKE = find_bundled_recipe("study/smoke")


def test_smoke_study_writes_report_matching_study_json(smoke_study):
    out, study, results = smoke_study
    for name in ("report.md", "report.html", "study.json"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "study.json").read_text())
    assert [f["id"] for f in saved["findings"]] == ["F1", "F2", "F3", "F4", "F5", "F6"]
    assert all(f["reproduced"] in (True, False, None) for f in saved["findings"])
    # every stage of the plan has a run with a final evaluation on each source
    stages = plan_stages(study)
    assert set(saved["runs"]) == {s.key for s in stages}
    for key, run in saved["runs"].items():
        for source in ("english", "code"):
            assert run["final"][source]["loss"] > 0, (key, source)
    # the final losses in the report are the numbers of study.json
    md = (out / "report.md").read_text()
    from moecpt.study.report import fmt

    for key, run in saved["runs"].items():
        row = next(line for line in md.splitlines() if line.startswith(f"| {key} |") and "loss" not in line
                   and fmt(run["final"]["english"]["loss"]) in line)
        assert fmt(run["final"]["code"]["loss"]) in row
    # CPT with 0% replay forgets the old source (its loss rises) and learns the new one
    f = saved["forgetting"]["s0/cpt/granular-pb/code/inf-r0"]
    assert f["mean_adaptation"] > 0
    # two seeds, each with its no-shift controls; a control is compared with its parent like a CPT run
    assert saved["seeds"] == [0, 1]
    ctrl = saved["runs"]["s1/control/granular-pb/inf"]
    assert ctrl["kind"] == "control" and ctrl["seed"] == 1 and ctrl["optimizer_state"] == "carried"
    assert saved["runs"]["s1/cpt/granular-pb/code/inf-r0"]["control"] == "s1/control/granular-pb/inf"
    assert "s1/control/granular-pb/inf" in saved["comparisons"]
    assert saved["forgetting"]["s1/control/granular-pb/inf"]["mean_adaptation"] is None
    assert saved["runs"]["s0/cpt/granular-pb/code/rewarm-r0"]["optimizer_state"] == "fresh"
    # the seeds differ (initialisation and data order), so their losses do
    assert (saved["runs"]["s0/pretrain/dense"]["final"]["english"]["loss"]
            != saved["runs"]["s1/pretrain/dense"]["final"]["english"]["loss"])
    for png in re.findall(r"\(plots/([a-z_]+\.png)\)", md):
        assert (out / "plots" / png).stat().st_size > 1000


def test_study_resumes_without_redoing_finished_stages(smoke_study, tmp_path):
    out, study, _ = smoke_study
    copy = tmp_path / "resumed"
    shutil.copytree(out, copy)
    stages = plan_stages(study)
    victim = next(s for s in stages if s.kind == "cpt")
    run_dir = victim.run_dir(copy)
    # simulate a kill mid-stage: no DONE marker, the final checkpoint and its log lines never written
    (run_dir / DONE_FILE).unlink()
    ckpts = sorted((run_dir / "checkpoints").iterdir())
    final = ckpts[-1]
    shutil.rmtree(final)
    for name in ("report.md", "study.json"):
        (copy / name).unlink()
    others = {s.key: (s.run_dir(copy) / "metrics.jsonl").stat().st_mtime_ns for s in stages if s is not victim}
    # the same --jobs as the uninterrupted study: its threads per job decide the CPU kernels' summation order
    run_study(study, copy, jobs=2, log=lambda *_: None)
    for s in stages:
        if s is not victim:
            assert (s.run_dir(copy) / "metrics.jsonl").stat().st_mtime_ns == others[s.key], s.key
    assert (run_dir / DONE_FILE).exists() and final.exists()
    assert (copy / "report.md").exists()
    # the resumed stage reproduces the uninterrupted one exactly
    def losses(d):
        return [json.loads(line)["loss"] for line in (d / "metrics.jsonl").read_text().splitlines()
                if "split" not in json.loads(line)]

    assert losses(run_dir) == losses(victim.run_dir(out))


def test_a_finished_studys_evaluation_starts_no_worker_and_redoes_only_what_is_missing(smoke_study, tmp_path,
                                                                                         monkeypatch):
    """Re-running a finished study spawns no evaluation process (the cache holds every result); a lost cache file
    is recomputed, identically, by the pool it is given (the study's own, whose workers trained the stages)."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from moecpt.study import evaluation

    out, study, _ = smoke_study
    copy = tmp_path / "again"
    shutil.copytree(out, copy)
    stages = plan_stages(study)

    def no_pool(*a, **k):
        raise AssertionError("a cached evaluation started worker processes")

    monkeypatch.setattr(evaluation, "ProcessPoolExecutor", no_pool)
    assert evaluation.evaluate_stages(copy, study, stages, jobs=2) == 0
    lost = sorted((copy / "evals").iterdir())[0]
    saved = json.loads(lost.read_text())
    lost.unlink()
    threads = torch.get_num_threads()
    try:
        with ThreadPoolExecutor(1) as pool:
            assert evaluation.evaluate_stages(copy, study, stages, jobs=2, pool=pool) == 1
    finally:
        torch.set_num_threads(threads)
    assert json.loads(lost.read_text()) == saved


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "moecpt", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_study_refuses_a_folder_of_another_study(smoke_study, tmp_path):
    out, _, _ = smoke_study
    before = sorted(p.name for p in out.iterdir())
    res = _cli("study", str(SMOKE), "--out", str(out), "--set", 'name="other"')
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and "holds a different study" in res.stderr
    assert sorted(p.name for p in out.iterdir()) == before


def test_study_bad_inputs_are_one_line_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(SMOKE.read_text().replace('shifts = ["code"]', 'shifts = ["klingon"]'))
    res = _cli("study", str(bad), "--out", str(tmp_path / "o1"))
    assert res.returncode == 2 and res.stderr.count("\n") == 1
    assert "klingon" in res.stderr and "available" in res.stderr
    assert not (tmp_path / "o1").exists()

    res = _cli("study", str(SMOKE), "--out", str(tmp_path / "o2"), "--set", "cpt.replay=[1.5]")
    assert res.returncode == 2 and "cpt.replay" in res.stderr and res.stderr.count("\n") == 1

    res = _cli("study", str(SMOKE), "--out", str(tmp_path / "o3"), "--set", "bogus.key=1")
    assert res.returncode == 2 and "bogus" in res.stderr


def test_compare_refuses_models_of_different_shapes(smoke_study):
    out, study, _ = smoke_study
    stages = {s.key: s for s in plan_stages(study)}
    dense = stages["s0/pretrain/dense"].run_dir(out)
    moe = stages["s0/pretrain/granular-pb"].run_dir(out)
    res = _cli("compare", str(dense), str(moe), "--batches", "1", "--batch-size", "2")
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "compare" in res.stderr


def test_study_recipe_validation():
    study = load_study_recipe(SMOKE)
    with pytest.raises(MoecptError, match="retrain.models"):
        load_study_recipe(SMOKE, ['retrain.models=["nope"]'])
    with pytest.raises(MoecptError, match="seeds"):
        load_study_recipe(SMOKE, ["seeds=[1, 1]"])
    with pytest.raises(MoecptError, match="seeds"):
        load_study_recipe(SMOKE, ["seeds=[]"])
    with pytest.raises(MoecptError, match="controls.models"):
        load_study_recipe(SMOKE, ['controls.models=["nope"]'])
    with pytest.raises(MoecptError, match="retrain.shifts"):
        load_study_recipe(SMOKE, ['retrain.shifts=["german"]'])
    with pytest.raises(MoecptError, match="schedules"):
        load_study_recipe(SMOKE, ['cpt.schedules=["forever"]'])
    # per seed: 3 pre-training, 1 re-training, 3 controls, 4 + 2 CPT cells
    assert len(plan_stages(study)) == 2 * (3 + 1 + 3 + 6)


@pytest.mark.parametrize("override, match", [
    ("seeds=[true]", "seeds"),  # a bool is not a seed (pydantic's lax mode took it for 1)
    ("seeds=[1.5]", "seeds"),
    ("data.shifts=[]", "data.shifts"),  # no shift: a study with no CPT at all
    ("data.old=[]", "data.old"),
    ("cpt.replay=[]", "cpt.replay"),
    ("cpt.schedules=[]", "cpt.schedules"),
    ("cpt.models=[]", "cpt.models"),
    ("cpt.cells=[]", "cpt.cells"),
    ('cpt.cells=[{models=[]}]', "cpt.cells"),
    ('controls.schedules=["rewarm"]', "controls.schedules"),  # with only inf CPT runs (below)
])
def test_study_recipe_refuses_a_study_that_would_silently_do_less(override, match):
    extra = ['cpt.schedules=["inf"]'] if "controls.schedules" in override else []
    with pytest.raises(MoecptError, match=match.replace(".", r"\.")):
        load_study_recipe(SMOKE, [*extra, override])


def test_controls_must_name_a_model_with_cpt_runs():
    only_pb = ['cpt.cells=[{models=["granular-pb"]}]']  # dense and granular-sb are pre-trained, never continued
    with pytest.raises(MoecptError, match="controls.models names 'dense', which has no CPT runs"):
        load_study_recipe(SMOKE, [*only_pb, 'controls.models=["dense"]'])
    assert load_study_recipe(SMOKE, [*only_pb, 'controls.models=["granular-pb"]']).control_cells() == [
        ("granular-pb", "inf")]
    assert load_study_recipe(SMOKE, ["controls.models=[]"]).control_cells() == []  # [] = no controls, as documented


def test_plan_runs_every_stage_per_seed_with_its_controls():
    study = load_study_recipe(SMOKE, ["seeds=[3, 7]"])
    stages = {s.key: s for s in plan_stages(study)}
    for seed in (3, 7):
        keys = {k.split("/", 1)[1] for k, s in stages.items() if s.seed == seed}
        assert keys == {k.split("/", 1)[1] for k, s in stages.items() if s.seed == 3}
        assert all(s.recipe.train.seed == seed for s in stages.values() if s.seed == seed)
        for k, st in stages.items():
            if st.seed != seed or st.parent is None:
                continue
            assert st.parent.seed == seed and st.parent.kind == "pretrain" and st.deps == [st.parent.key]
            if st.kind == "cpt" and st.schedule == "inf":
                ctrl = stages[st.control]
                # the control differs from the CPT run only by its data: old sources only
                assert ctrl.kind == "control" and ctrl.seed == seed and ctrl.parent is st.parent
                assert ctrl.recipe.data.mixture == {"english": 1.0}
                for part in ("schedule", "optim", "cpt", "train"):
                    assert getattr(ctrl.recipe, part) == getattr(st.recipe, part), (k, part)
                assert ctrl.parent_point == st.parent_point
            if st.kind == "cpt" and st.schedule == "rewarm":
                assert st.control is None  # the smoke recipe controls the inf runs only
    # a different seed is a different run (different folder), the same seed the same one
    assert stages["s3/pretrain/dense"].fingerprint != stages["s7/pretrain/dense"].fingerprint
    again = {s.key: s for s in plan_stages(load_study_recipe(SMOKE, ["seeds=[3]"]))}
    assert again["s3/pretrain/dense"].fingerprint == stages["s3/pretrain/dense"].fingerprint


def test_cpt_optimizer_state_per_schedule():
    """inf CPT carries the parent's AdamW state at the constant LR without a warm-up; rewarm starts fresh from the
    minimum LR; a fresh inf state gets a warm-up to the constant LR, never a jump to the peak."""
    from moecpt.train.schedules import lr_at

    def cpt(study, schedule):
        return next(s for s in plan_stages(study) if s.kind == "cpt" and s.schedule == schedule and s.seed == 0)

    study = load_study_recipe(SMOKE)
    const = study.const_lr_fraction * study.optim.lr
    inf, rewarm = cpt(study, "inf"), cpt(study, "rewarm")
    assert inf.recipe.cpt.load_optimizer and inf.optimizer_state == "carried" and inf.warmup_steps == 0
    assert inf.parent_point == "pre_anneal"
    assert lr_at(0, inf.recipe.schedule, inf.recipe.optim, inf.recipe.train.steps) == pytest.approx(const)
    assert not rewarm.recipe.cpt.load_optimizer and rewarm.optimizer_state == "fresh" and rewarm.warmup_steps >= 1
    assert rewarm.parent_point == "final"
    assert lr_at(0, rewarm.recipe.schedule, rewarm.recipe.optim, rewarm.recipe.train.steps) == pytest.approx(
        study.optim.min_lr)

    fresh = load_study_recipe(SMOKE, ['cpt.inf_optimizer="fresh"', "cpt.fresh_warmup_fraction=0.25"])
    inf_f = cpt(fresh, "inf")
    r = inf_f.recipe
    assert not r.cpt.load_optimizer and inf_f.optimizer_state == "fresh" and inf_f.warmup_steps == 5
    lrs = [lr_at(s, r.schedule, r.optim, r.train.steps) for s in range(r.train.steps)]
    assert lrs[0] < const / 4 and max(lrs) == pytest.approx(const)  # warmed up to the constant, not the peak
    assert lrs[5] == pytest.approx(const) and lrs[10] == pytest.approx(const)
    # the recorded warm-up is the schedule's own (2.5 steps round up to 3, as the schedule rounds)
    odd = cpt(load_study_recipe(SMOKE, ["cpt.steps=50", "cpt.rewarm_warmup_fraction=0.05"]), "rewarm")
    r = odd.recipe
    lrs = [lr_at(s, r.schedule, r.optim, r.train.steps) for s in range(r.train.steps)]
    assert odd.warmup_steps == lrs.index(max(lrs)) == 3  # the first step at the peak ends the warm-up
    carried = load_study_recipe(SMOKE, ['cpt.rewarm_optimizer="carry"'])
    assert cpt(carried, "rewarm").recipe.cpt.load_optimizer


@pytest.mark.parametrize("name", ["study/demo", "study/paper-small", "study/paper", "study/cpu"])
def test_bundled_study_recipes_validate_and_plan(name):
    study = load_study_recipe(find_bundled_recipe(name))
    stages = plan_stages(study)  # builds and validates every stage's recipe
    n_retrain = len(study.retrain.models) * len(study.retrain.shifts or study.data.shifts)
    per_seed = len(study.models) + len(study.cpt_cells()) + len(study.control_cells()) + n_retrain
    assert len(stages) == len(study.seeds) * per_seed
    # every MoE CPT run of the infinite schedule has its no-shift control
    moe = {m.name for m in study.models if m.arch != "dense"}
    assert all(s.control for s in stages if s.kind == "cpt" and s.model in moe and s.schedule == "inf")


@pytest.mark.parametrize("override, needle", [
    ("pretrain.steps=true", "pretrain.steps=true is not an integer"),
    ("eval_points=2.0", "eval_points=2.0 is not an integer"),
    ("cpt.replay=[0, true]", "cpt.replay[1]=true is not a number"),
    ("data.allow_repeat=1", "data.allow_repeat=1 is not true or false"),
])
def test_study_set_values_are_strictly_typed(override, needle):
    """A study's --set is as strict as a recipe's: pydantic's lax mode took `true` as 1 and `1` as true."""
    with pytest.raises(MoecptError, match=re.escape(needle)) as e:
        load_study_recipe(SMOKE, [override])
    assert "\n" not in str(e.value)
    assert load_study_recipe(SMOKE, ["cpt.replay=[0, 0.5]"]).cpt.replay == [0.0, 0.5]  # a TOML int fills a float


def test_eval_on_a_study_folder_names_its_runs(smoke_study, tmp_path, capsys):
    """`moecpt eval --checkpoint STUDY` says it is a study folder and names run folders inside that load; an
    empty folder is told what to give (fresh-user pass: both only said what was wrong)."""
    from moecpt.cli import main
    from moecpt.train.checkpoint import load_checkpoint

    out = smoke_study[0]
    assert main(["eval", "--checkpoint", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "it is a study folder; give one of its runs, e.g. " in err and "\n" not in err, err
    first = err.split("e.g. ")[1].split(", ")[0]
    assert load_checkpoint(first).step > 0  # the named run is one that loads
    (tmp_path / "empty").mkdir()
    assert main(["eval", "--checkpoint", str(tmp_path / "empty")]) == 2
    assert "give a run folder (the --out of pretrain / cpt)" in capsys.readouterr().err
