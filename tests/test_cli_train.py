"""``moecpt pretrain / cpt / generate`` as a user runs them: bad input gives exit code 2 and one ``moecpt: error:``
line (no traceback) and leaves existing runs untouched; generate prints text; ``moecpt.load_model`` works."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moecpt
from moecpt.config import recipe_from_dict
from moecpt.train.checkpoint import load_checkpoint
from moecpt.train.trainer import Trainer

RECIPE = """\
name = "cli"

[model]
preset = "smoke-switch"

[data]
path = "demo"
mixture = { english = 1.0 }
seq_len = 32
eval_sources = ["english"]

[schedule]
kind = "cosine"
warmup_fraction = 0.25

[train]
steps = 2
batch_size = 8
eval_batches = 1
checkpoint_every = 2
device = "cpu"
"""


def moecpt_run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moecpt", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def moecpt_call(*args: str) -> subprocess.CompletedProcess:
    """``moecpt ARGS`` in this process (the ``moecpt`` entry point is :func:`moecpt.cli.main`), as
    :func:`moecpt_run` reports it: exit code, stdout, stderr; an escaping exception is printed as its traceback,
    which is what the user would see. No torch import to pay: for commands whose process is not the point."""
    import contextlib
    import io
    import traceback

    from moecpt.cli import main

    out, err, threads = io.StringIO(), io.StringIO(), torch.get_num_threads()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in args])
        except SystemExit as exc:  # argparse
            rc = exc.code if isinstance(exc.code, int) else 2
        except Exception:
            traceback.print_exc()
            rc = 1
        finally:
            torch.set_num_threads(threads)  # train.threads must not leak into the rest of the suite
    return subprocess.CompletedProcess(list(args), rc, out.getvalue(), err.getvalue())


def assert_user_error(res: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit code 2, exactly one stderr line starting ``moecpt: error:``, no traceback; returns the message."""
    assert res.returncode == 2, (res.returncode, res.stderr)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("moecpt: error: "), res.stderr
    assert "Traceback" not in res.stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


def snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A recipe file and a finished 2-step run made from it (in this process)."""
    import tomllib

    root = tmp_path_factory.mktemp("cli")
    recipe = root / "r.toml"
    recipe.write_text(RECIPE)
    run = root / "run"
    Trainer(recipe_from_dict(tomllib.loads(RECIPE)), run, show_progress=False).run()
    return root, recipe, run


# ----------------------------------------------------------------------------------------------- the commands
BAD_OVERRIDES = {
    "steps-abc": ("train.steps=abc", "train.steps"),
    "lr-negative": ("optim.lr=-1", "optim.lr"),
    "kind-unknown": ("schedule.kind=cosinus", "schedule.kind"),
    "key-unknown": ("train.nope=1", "train.nope"),
    "source-unknown": ("data.mixture={klingon=1.0}", "klingon"),  # caught before the run folder is created
}
DAMAGES = ("truncated", "corrupted")


def _damaged_copy(run: Path, dst: Path, damage: str) -> Path:
    src = load_checkpoint(run).path
    ck = dst / src.name
    shutil.copytree(src, ck)
    f = ck / "model.safetensors"
    if damage == "truncated":
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif damage == "corrupted":
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0xFF  # one flipped byte, same size
        f.write_bytes(bytes(data))
    return ck


def _tiny_data(root: Path) -> Path:
    """A prepared folder with its own 300-token tokenizer (not the demo's 4096)."""
    from moecpt.data.shards import prepare

    rng = random.Random(0)
    words = "the cat sat on a mat while dogs ran far away into old green hills near rivers".split()
    src = root / "tiny.jsonl"
    src.write_text("".join(json.dumps({"text": " ".join(rng.choice(words) for _ in range(200))}) + "\n"
                           for _ in range(30)))
    prepare({"english": str(src)}, root / "tiny", tokenizer="train:300", progress=False, min_val_tokens=256)
    return root / "tiny"


@pytest.fixture(scope="module")
def cli(env):
    """Every command of this file: the first as a ``python -m moecpt ...`` subprocess (the real entry point), the
    others in this process (:func:`moecpt_call`; a subprocess each would mostly pay for importing torch). Returns
    (name -> CompletedProcess, paths, snapshot of the finished run before)."""
    root, recipe, run = env
    work = root / "work"
    work.mkdir()
    bad = work / "bad.toml"
    bad.write_text(RECIPE.replace("steps = 2", "stepz = 2"))
    (work / "other").mkdir()
    (work / "other" / "notes.txt").write_text("mine")
    tiny = _tiny_data(work)
    damaged = {d: _damaged_copy(run, work / f"ck-{d}", d) for d in DAMAGES}
    out = lambda name: work / f"out-{name}"
    cmds: dict[str, list] = {
        "unknown-key": ["pretrain", "--recipe", bad, "--out", out("unknown-key")],
        "from-nowhere": ["cpt", "--recipe", recipe, "--out", out("from-nowhere"), "--from", work / "missing"],
        "tokenizer": ["cpt", "--recipe", recipe, "--out", out("tokenizer"), "--from", run,
                      "--set", f"data.path={json.dumps(str(tiny))}"],
        "another-run": ["pretrain", "--recipe", recipe, "--out", run, "--set", "train.seed=1", "--no-progress"],
        "not-a-run": ["pretrain", "--recipe", recipe, "--out", work / "other"],
        "generate": ["generate", "--checkpoint", run, "--prompt", "def ", "--max-tokens", "12", "--seed", "0"],
    }
    for name, (override, _) in BAD_OVERRIDES.items():
        cmds[f"set-{name}"] = ["pretrain", "--recipe", recipe, "--out", out(f"set-{name}"), "--set", override]
    for d, ck in damaged.items():
        cmds[f"damaged-{d}"] = ["cpt", "--recipe", recipe, "--out", out(f"damaged-{d}"), "--from", ck]
    before = snapshot(run)
    results = {name: (moecpt_run if name == "unknown-key" else moecpt_call)(*args) for name, args in cmds.items()}
    return results, {"work": work, "run": run, "damaged": damaged, "out": out}, before


# ------------------------------------------------------------------------------------------------- bad input
def test_unknown_recipe_key(cli):
    res, p, _ = cli
    assert_user_error(res["unknown-key"], "train.stepz")
    assert not p["out"]("unknown-key").exists()


@pytest.mark.parametrize("name", list(BAD_OVERRIDES))
def test_bad_set_override(cli, name):
    res, p, _ = cli
    assert_user_error(res[f"set-{name}"], BAD_OVERRIDES[name][1])
    assert not p["out"](f"set-{name}").exists()  # nothing written for a recipe that cannot run


def test_cpt_from_nowhere(cli):
    res, p, _ = cli
    assert_user_error(res["from-nowhere"], "--from", "does not exist")
    assert not p["out"]("from-nowhere").exists()


@pytest.mark.parametrize("damage", DAMAGES)
def test_cpt_from_damaged_checkpoint(cli, damage):
    res, p, _ = cli
    assert_user_error(res[f"damaged-{damage}"], str(p["damaged"][damage]), damage)
    assert not p["out"](f"damaged-{damage}").exists()


def test_cpt_with_another_tokenizer(cli):
    """CPT data prepared with another tokenizer (vocab 300, not the parent's 4096) is refused up front."""
    res, p, _ = cli
    assert_user_error(res["tokenizer"], "tokenizer", "300")
    assert not p["out"]("tokenizer").exists()


def test_out_holding_another_run_is_left_alone(cli):
    res, p, before = cli
    assert_user_error(res["another-run"], "holds another run", "seed")
    assert snapshot(p["run"]) == before  # not a byte, not an mtime changed


def test_out_holding_something_else(cli):
    res, p, _ = cli
    assert_user_error(res["not-a-run"], "not empty")
    assert [x.name for x in (p["work"] / "other").iterdir()] == ["notes.txt"]


# ------------------------------------------------------------------------------------------------ happy path
def test_generate_prints_text(cli):
    res, _, _ = cli
    g = res["generate"]
    assert g.returncode == 0, g.stderr
    assert g.stdout.startswith("def ") and len(g.stdout.strip()) > len("def")


def test_load_model_gives_logits(env):
    _, _, run = env
    model = moecpt.load_model(run)
    assert not model.training
    ids = torch.randint(0, model.cfg.vocab_size, (2, 5))
    with torch.no_grad():
        logits = model(ids)
    assert logits.shape == (2, 5, 4096) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    assert (run / "tokenizer.json").is_file() and json.loads((run / "run.json").read_text())["identity"]["mode"] \
        == "pretrain"
