"""The study's results loader (moecpt.study.results): one-line errors naming the file and the field, the documented
defaults of older results, non-finite numbers read as missing, and study.json read back as the same records."""

from __future__ import annotations

import copy
import json
import math

import pytest
from test_report import make_results

from moecpt.errors import MoecptError
from moecpt.study.config import CPTSchedule
from moecpt.study.readers import final_loss, study_seeds
from moecpt.study.report import write_report
from moecpt.study.results import (
    OptimizerCarry, RunKind, RunRecord, StudyResults, load_results, parse_results,
)

KEY = "s1/cpt/granular-pb/code/inf-r0.3"


def _write(tmp_path, results: dict):
    path = tmp_path / "study.json"
    path.write_text(json.dumps(results))
    return path


def _error(tmp_path, results: dict) -> str:
    with pytest.raises(MoecptError) as exc:
        load_results(_write(tmp_path, results))
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith(str(tmp_path / "study.json") + ": ")
    return msg


def test_parses_into_typed_records():
    res = parse_results(make_results())
    run = res.runs[KEY]
    assert isinstance(res, StudyResults) and isinstance(run, RunRecord)
    assert (run.kind, run.seed, run.schedule, run.optimizer_state) == (RunKind.CPT, 1, CPTSchedule.INF,
                                                                       OptimizerCarry.CARRIED)
    assert run.control == "s1/control/granular-pb/inf" and run.replay == 0.3 and run.parent_step == 80
    assert run.final["english"].mri_layers == (0.21, 0.21, 0.21) and run.start["code"].loss is not None
    assert run.val["code"][-1].step == 50 and run.val["code"][-1].tokens == 50_000
    assert res.models["granular-sb"].router == "sinkhorn" and res.models["dense"].moe is False
    assert res.comparisons[KEY].crs_layers == pytest.approx([0.59, 0.89, 0.89])
    assert res.forgetting[KEY].mean_forgetting == pytest.approx(0.2)
    assert res.seeds == (0, 1, 2) and res.old_sources == ("english",)


def test_a_missing_required_field_names_the_file_and_the_field(tmp_path):
    r = make_results()
    del r["runs"][KEY]["kind"]
    msg = _error(tmp_path, r)
    assert f"runs['{KEY}'].kind missing" in msg and "re-run `moecpt study`" in msg
    r = make_results()
    del r["runs"][KEY]["final"]["english"]["loss"]
    assert f"runs['{KEY}'].final['english'].loss missing" in _error(tmp_path, r)


@pytest.mark.parametrize("where, value, expect", [
    (("runs", KEY, "seed"), "one", f"runs['{KEY}'].seed must be a whole number, got \"one\""),
    (("runs", KEY, "seed"), True, f"runs['{KEY}'].seed must be a whole number, got true"),
    (("runs", KEY, "kind"), "finetune", f"runs['{KEY}'].kind must be one of pretrain, cpt, control, retrain"),
    (("runs", KEY, "replay"), "0.3", f"runs['{KEY}'].replay must be a number"),
    (("runs", KEY, "val"), [1, 2], f"runs['{KEY}'].val must be an object"),
    (("models", "dense", "is_moe"), "no", "models['dense'].is_moe must be true or false"),
    (("seeds",), [0, "1"], "seeds[1] must be a whole number"),
    (("comparisons", KEY, "crs_layers"), [0.5, "x"], f"comparisons['{KEY}'].crs_layers[1] must be a number"),
])
def test_a_wrong_type_names_the_field(tmp_path, where, value, expect):
    r = make_results()
    target = r
    for k in where[:-1]:
        target = target[k]
    target[where[-1]] = value
    assert expect in _error(tmp_path, r)


def test_a_bad_log_entry_names_its_index(tmp_path):
    r = make_results()
    r["runs"][KEY]["train_mri"][4] = [4]
    assert f"runs['{KEY}'].train_mri[4] must be a list of at least 2 items" in _error(tmp_path, r)
    r = make_results()
    r["runs"][KEY]["val"]["code"][2] = [20, 20000, "low"]
    assert f"runs['{KEY}'].val['code'][2][2] must be a number" in _error(tmp_path, r)


def test_older_results_get_the_documented_defaults(tmp_path):
    """The one-seed schema: no seeds, no sN/ prefixes, no controls, no optimizer fields."""
    res = load_results(_write(tmp_path, make_results(None)))
    run = res.runs["cpt/granular-pb/code/inf-r0.3"]
    assert res.seeds == () and study_seeds(res) == [0]
    assert (run.seed, run.control) == (0, None)
    r = make_results()
    for f in ("seed", "optimizer_state", "warmup_steps", "control", "start", "train_mri", "val", "run_dir"):
        r["runs"][KEY].pop(f, None)
    run = load_results(_write(tmp_path, r)).runs[KEY]
    assert run.seed == 1  # the key's s1/ prefix
    assert (run.optimizer_state, run.warmup_steps, run.control) == (None, None, None)
    assert (run.start, run.train_mri, dict(run.val), run.run_dir) == (None, (), {}, None)
    empty = parse_results({})
    assert (empty.name, empty.runs, empty.models, empty.seeds) == (None, {}, {}, ())


def test_non_finite_numbers_read_as_missing():
    r = make_results()
    r["runs"][KEY]["final"]["code"]["loss"] = math.nan
    r["runs"][KEY]["train_flops"] = math.inf
    res = parse_results(r)
    run = res.runs[KEY]
    assert run.final["code"].loss is None and run.train_flops is None
    assert final_loss(run, "code") is None  # a diverged eval stays missing: never the last logged val loss


def test_study_json_reads_back_as_the_same_records(tmp_path, monkeypatch):
    from moecpt.study import plots

    for name in plots.__all__:  # figures are not the point here, and slow
        if name.startswith("plot_"):
            monkeypatch.setattr(plots, name, lambda results, path: None)
    results = make_results()
    expected = parse_results(copy.deepcopy(results), "results")
    write_report(results, tmp_path)
    back = load_results(tmp_path)  # the folder: its study.json; findings, tables, ... are ignored
    assert back.runs == expected.runs and back.models == expected.models
    assert back.comparisons == expected.comparisons and back.forgetting == expected.forgetting


def test_write_report_refuses_malformed_results_before_writing(tmp_path):
    r = make_results()
    r["runs"][KEY]["model"] = None
    with pytest.raises(MoecptError, match=rf"^results: runs\['{KEY}'\]\.model must be a string, got null"):
        write_report(r, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unreadable_files_are_one_line(tmp_path):
    with pytest.raises(MoecptError, match="does not exist"):
        load_results(tmp_path / "nowhere")
    (tmp_path / "study.json").write_text("{not json")
    with pytest.raises(MoecptError, match=r"is not JSON \(.*line 1\)"):
        load_results(tmp_path)
    (tmp_path / "study.json").write_text("[1, 2]")
    with pytest.raises(MoecptError, match="the top level must be an object"):
        load_results(tmp_path)
