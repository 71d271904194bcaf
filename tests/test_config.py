"""Config validation: every bad input raises MoecptError with one line naming the field; the inspect CLI."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moecpt.config import SyncKind, load_recipe, model_preset, recipe_from_dict
from moecpt.errors import MoecptError

ROOT = Path(__file__).resolve().parents[1]


def one_line_error(fn, *names: str) -> str:
    with pytest.raises(MoecptError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg and msg.strip() == msg and msg
    for name in names:
        assert name in msg, (name, msg)
    return msg


def test_top_k_exceeds_num_experts():
    one_line_error(lambda: model_preset("smoke-switch", moe={"top_k": 9}), "top_k", "num_experts")


def test_granularity_must_divide_ffn_width():
    one_line_error(lambda: model_preset("smoke-granular", moe={"granularity": 3}), "granularity", "ffn_width")
    # an explicit expert width lifts the constraint
    assert model_preset("smoke-granular", moe={"granularity": 3, "expert_width": 50}).resolved_expert_width == 50


def test_unknown_router_kind():
    msg = one_line_error(lambda: model_preset("smoke-switch", moe={"router": {"kind": "sinkorn"}}),
                         "model.moe.router.kind", "sinkorn")
    assert "sinkhorn" in msg  # lists what is allowed


def test_unknown_preset():
    one_line_error(lambda: model_preset("paper-huge"), "model.preset", "paper-huge", "paper-granular")


def test_preset_fields_are_overridable():
    cfg = model_preset("paper-granular", n_layers=2)
    assert cfg.n_layers == 2 and cfg.d_model == 1024 and cfg.moe.num_experts == 31


def test_unknown_toml_key(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('name = "x"\n[model]\npreset = "smoke-switch"\n[model.moe]\ntopk = 2\n', encoding="utf-8")
    one_line_error(lambda: load_recipe(path), "model.moe.topk", "unknown key")
    path.write_text('[train]\nsteps = 10\nlr = 0.1\n', encoding="utf-8")
    one_line_error(lambda: load_recipe(path), "train.lr")
    path.write_text('[model\npreset = 1\n', encoding="utf-8")
    one_line_error(lambda: load_recipe(path), str(path), "TOML")
    one_line_error(lambda: load_recipe(tmp_path / "missing.toml"), "missing.toml")


def test_good_toml_with_overrides(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('[model]\npreset = "smoke-granular"\n[model.moe.router]\nkind = "sinkhorn"\n', encoding="utf-8")
    recipe = load_recipe(path, ["model.moe.top_k=2", "train.steps=7", "model.moe.router.aux_loss_weight=0.0"])
    assert recipe.model.moe.top_k == 2 and recipe.train.steps == 7
    assert recipe.model.moe.router.kind == "sinkhorn" and recipe.model.moe.router.aux_loss_weight == 0.0
    assert recipe.model.moe.num_experts == 31  # from the preset


@pytest.mark.parametrize(
    "override, names",
    [
        ("model.d_model", ["model.d_model", "section.key=value"]),
        ("=3", ["names no key"]),
        ("model.d_model=abc", ["model.d_model"]),
        ("model.d_model=4", ["model.d_model"]),
        ("train.stpes=3", ["train.stpes", "unknown key"]),
        ("model.moe.router.kind=bogus", ["model.moe.router.kind", "bogus"]),
        ("model.n_heads.x=1", ["n_heads"]),
    ],
)
def test_bad_set(override, names):
    one_line_error(lambda: recipe_from_dict({"model": {"preset": "smoke-switch"}}, [override]), *names)


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "moecpt", *args], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=timeout)


def test_cli_unknown_preset_exits_2_with_one_line():
    p = run_cli("inspect", "--preset", "nope")
    assert p.returncode == 2
    assert "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moecpt: error:") and "nope" in lines[0]
    assert p.stdout == ""


def test_cli_inspect_paper_granular_json_on_meta_device():
    t0 = time.monotonic()
    p = run_cli("inspect", "--preset", "paper-granular", "--json", "--vocab-size", "128256")
    elapsed = time.monotonic() - t0
    assert p.returncode == 0, p.stderr
    stats = json.loads(p.stdout)
    assert stats["preset"] == "paper-granular"
    assert stats["total_params"] == 2_025_088_000 and stats["active_params"] == 570_999_808 + 24 * 31 * 1024
    assert elapsed < 60
    # 2.0B fp32 parameters would be 8 GB; on the meta device the process stays far below that
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    assert peak_kb < 2_000_000, f"child peak RSS {peak_kb} kB: the model was allocated"


@pytest.mark.parametrize("override, line", [
    ("train.batch_size=abc", "train.batch_size='abc' is not an integer; give an integer"),
    ("train.batch_size=2.5", "train.batch_size=2.5 is not an integer; give a whole number without a decimal point"),
    ("train.batch_size=4.0", "train.batch_size=4.0 is not an integer; give a whole number without a decimal point"),
    # pydantic's lax mode took these as 1, 1.0, True, True and 3 (a fresh-user pass, issue 14)
    ("train.steps=true", "train.steps=true is not an integer; give an integer"),
    ("optim.lr=true", "optim.lr=true is not a number; give a number"),
    ("train.compile=2", "train.compile=2 is not true or false; give true or false"),
    ("train.compile=yes", "train.compile='yes' is not true or false; give true or false"),
    ("train.steps='3'", "train.steps='3' is not an integer; give an integer"),
    ("model.moe.top_k=false", "model.moe.top_k=false is not an integer; give an integer"),
    ("data.mixture={english=true}", "data.mixture.english=true is not a number; give a number"),
    ("train.extra_checkpoints=[true]", "train.extra_checkpoints[0]=true is not an integer; give an integer"),
    ("distributed.outer_lr=false", "distributed.outer_lr=false is not a number; give a number"),
    # island_sync's own two choices, not sync's five
    ("distributed.island_sync=zero", "distributed.island_sync='zero' is not allowed: inside an island ranks "
     "synchronise every step; choose 'ddp' or 'fsdp'"),
    ("model.moe.top_k=0", "model.moe.top_k=0 is out of range; give a value >= 1"),
    ("optim.lr=-1", "optim.lr=-1 is out of range; give a value > 0"),
    ("train.device=gpu", "train.device='gpu' is not allowed; allowed: auto, cpu, cuda, cuda:N, mps"),
])
def test_validation_errors_say_what_to_give(override, line):
    with pytest.raises(MoecptError) as e:
        recipe_from_dict({"model": {"moe": {}}}, [override])
    assert str(e.value).startswith(line) and "\n" not in str(e.value)


def test_toml_integers_still_fill_float_fields_and_booleans_bool_fields(tmp_path):
    toml = tmp_path / "r.toml"
    toml.write_text("[optim]\nlr = 1\nweight_decay = 0\n[train]\ncompile = false\nsteps = 7\n"
                    "[data]\nmixture = { english = 1 }\n", encoding="utf-8")
    r = load_recipe(toml, ["schedule.warmup_fraction=0", "train.tensorboard=true"])
    assert (r.optim.lr, r.optim.weight_decay, r.schedule.warmup_fraction) == (1.0, 0.0, 0.0)
    assert isinstance(r.optim.lr, float) and r.data.mixture == {"english": 1.0} and r.train.steps == 7
    assert r.train.compile is False and r.train.tensorboard is True
    assert load_recipe(ROOT / "recipes/smoke.toml", ["distributed.sync=diloco", "distributed.local_steps=2",
                                                     "distributed.islands=2", "distributed.island_sync=fsdp"]
                       ).distributed.island_sync == SyncKind.FSDP



@pytest.mark.parametrize("argv, needle", [
    (["plan", "--recipe", "{study}", "--world", "2"], "is a study recipe"),
    (["pretrain", "--recipe", "{study}", "--out", "{out}"], "run it with `moecpt study"),
    (["study", "{train}", "--out", "{out}"], "is a training recipe"),
])
def test_a_recipe_of_the_other_kind_names_the_command_that_runs_it(argv, needle, tmp_path, capsys):
    """A study recipe given to pretrain / plan (and a training recipe to study) says which command runs it; it
    used to say "unknown key 'data.old'; remove it", which sends the reader the wrong way (fresh-user pass)."""
    from moecpt.cli import main
    from moecpt.config import find_bundled_recipe

    subs = {"{study}": str(find_bundled_recipe("study/demo")), "{train}": str(find_bundled_recipe("smoke")),
            "{out}": str(tmp_path / "out")}
    assert main([subs.get(a, a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err and "unknown key" not in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("override, suggestion", [
    ("train.stpes=3", "did you mean 'train.steps'?"),
    ("model.moe.topkk=2", "did you mean 'model.moe.top_k'?"),  # through an optional section
    ("distributed.islnds=2", "did you mean 'distributed.islands'?"),
    ("train.bogus_thing=1", None),  # nothing close: no guess
])
def test_an_unknown_key_names_the_field_it_is_a_typo_of(override, suggestion):
    with pytest.raises(MoecptError) as e:
        recipe_from_dict({"model": {"preset": "smoke-switch"}}, [override])
    msg = str(e.value)
    assert "unknown key" in msg and "\n" not in msg
    assert (suggestion in msg) if suggestion else ("did you mean" not in msg), msg
