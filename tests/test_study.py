"""End-to-end: the smoke study trains, evaluates, reports; it resumes after an interruption without redoing
finished stages; bad study inputs give one-line errors."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest

from moecpt.analysis.study import DONE_FILE, plan_stages, run_study
from moecpt.analysis.study_config import load_study_recipe
from moecpt.config import find_bundled_recipe
from moecpt.errors import MoecptError

SMOKE = find_bundled_recipe("study/smoke")


@pytest.fixture(scope="module")
def smoke_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "smoke"
    study = load_study_recipe(SMOKE)
    results = run_study(study, out, jobs=2, log=lambda *_: None)
    return out, study, results


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
    from moecpt.analysis.report import fmt

    for key, run in saved["runs"].items():
        row = next(line for line in md.splitlines() if line.startswith(f"| {key} |") and "loss" not in line
                   and fmt(run["final"]["english"]["loss"]) in line)
        assert fmt(run["final"]["code"]["loss"]) in row
    # CPT with 0% replay forgets the old source (its loss rises) and learns the new one
    f = saved["forgetting"]["cpt/dense/code/inf-r0"]
    assert f["mean_adaptation"] > 0
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
    run_study(study, copy, jobs=1, log=lambda *_: None)
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
    dense = stages["pretrain/dense"].run_dir(out)
    moe = stages["pretrain/granular-pb"].run_dir(out)
    res = _cli("compare", str(dense), str(moe), "--batches", "1", "--batch-size", "2")
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "compare" in res.stderr


def test_study_recipe_validation():
    study = load_study_recipe(SMOKE)
    with pytest.raises(MoecptError, match="retrain.models"):
        load_study_recipe(SMOKE, ['retrain.models=["nope"]'])
    assert len(plan_stages(study)) == 3 + 1 + 3 * 2 * 2


@pytest.mark.parametrize("name", ["study/demo", "study/paper-small", "study/paper"])
def test_bundled_study_recipes_validate_and_plan(name):
    study = load_study_recipe(find_bundled_recipe(name))
    stages = plan_stages(study)  # builds and validates every stage's recipe
    n_models, n_shifts = len(study.models), len(study.data.shifts)
    n_cpt = n_models * n_shifts * len(study.cpt.schedules) * len(study.cpt.replay)
    assert len(stages) == n_models + n_cpt + len(study.retrain.models) * n_shifts
