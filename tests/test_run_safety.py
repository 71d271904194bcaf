"""Training runs never lose data or pass off damage: each test does the bad thing for real, through the CLI.

Damaged checkpoints (truncated, bit-flipped, the only one), two processes on one run folder, SIGTERM / SIGUSR1
mid-run (one process and a two-rank job), a read-only and a full file system, absurd model sizes, CPT recipes that
cannot apply to the parent. Each asserts the exit code, that no traceback appears, what the message names, and
that pre-existing files are byte-identical where nothing may change.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moecpt.storage.lock import LOCK_FILE, FolderLock
from moecpt.train.checkpoint import load_checkpoint

from test_cli_train import assert_user_error, moecpt_call, moecpt_run
from test_trainer import raw_recipe, write_toml

ROOT = Path(__file__).resolve().parent.parent


def _recipe(tmp: Path, name: str = "r.toml", **sections) -> Path:
    raw = raw_recipe("smoke-switch", **sections)
    raw["train"] = {**raw["train"], **sections.get("train", {})}
    return write_toml(tmp / name, raw)


def _hashes(folder: Path, skip: tuple[str, ...] = (LOCK_FILE,)) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in skip}


def _no_traceback(res: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in res.stderr, res.stderr[-3000:]


def _steps(run: Path) -> list[int]:
    return [int(p.name.split("_")[1]) for p in sorted((run / "checkpoints").glob("step_*")) if "." not in p.name]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 6-step run with checkpoints at 2, 4, 6 (keep_last 3) and its recipe."""
    tmp = tmp_path_factory.mktemp("safety")
    recipe = _recipe(tmp, train={"steps": 6, "checkpoint_every": 2, "keep_last": 3})
    run = tmp / "run"
    res = moecpt_run("pretrain", "--recipe", recipe, "--out", run, "--no-progress")
    assert res.returncode == 0, res.stderr
    return tmp, recipe, run


def _copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


# ------------------------------------------------------------------------------------- damaged checkpoints
@pytest.mark.parametrize("damage", ["truncated", "bit-flip"])
def test_damaged_final_checkpoint_is_moved_aside_and_the_run_repaired(finished, tmp_path, damage):
    _, recipe, src = finished
    run = _copy_run(src, tmp_path / "run")
    final = run / "checkpoints" / "step_00000006" / "model.safetensors"
    data = bytearray(final.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 3] ^= 0x10
    final.write_bytes(bytes(data))
    damaged_bytes = bytes(data)

    # every reader refuses instead of quietly using step 4
    for cmd in (["eval", "--checkpoint", run, "--batches", "1", "--batch-size", "2"],
                ["generate", "--checkpoint", run, "--prompt", "a", "--max-tokens", "2"],
                ["export-hf", run, "--out", tmp_path / "hf"],
                ["cpt", "--recipe", recipe, "--from", run, "--out", tmp_path / "cpt", "--no-progress"]):
        res = moecpt_call(*cmd)  # in this process: the refusal is the point, not the entry point
        assert_user_error(res, "step_00000006")
        assert not (tmp_path / "hf").exists() and not (tmp_path / "cpt").exists()

    res = moecpt_run("pretrain", "--recipe", recipe, "--out", run, "--no-progress")
    assert res.returncode == 0, res.stderr
    _no_traceback(res)
    assert "step_00000006" in res.stderr and "moved it aside" in res.stderr
    assert "resuming from step_00000004" in res.stderr
    aside = [p for p in (run / "checkpoints").iterdir() if ".damaged-" in p.name]
    assert len(aside) == 1 and (aside[0] / "model.safetensors").read_bytes() == damaged_bytes  # kept, not deleted
    assert load_checkpoint(run).step == 6  # repaired: a verified final checkpoint again
    assert json.loads(res.stdout.splitlines()[-1])["resumed"] is True


def test_damaged_only_checkpoint_restarts_with_a_word(tmp_path):
    recipe = _recipe(tmp_path, train={"steps": 4, "checkpoint_every": 4})
    run = tmp_path / "run"
    assert moecpt_run("pretrain", "--recipe", recipe, "--out", run, "--no-progress").returncode == 0
    meta = run / "checkpoints" / "step_00000004" / "optimizer.pt"
    meta.write_bytes(meta.read_bytes()[:100])
    res = moecpt_run("pretrain", "--recipe", recipe, "--out", run, "--no-progress")
    assert res.returncode == 0, res.stderr
    _no_traceback(res)
    assert "optimizer.pt is truncated" in res.stderr
    assert "no intact checkpoint is left; the run starts again from step 0" in res.stderr
    assert load_checkpoint(run).step == 4


# -------------------------------------------------------------------------------------------- the run lock
def test_second_process_on_a_run_folder_is_refused_naming_the_owner(finished, tmp_path):
    _, recipe, src = finished
    run = _copy_run(src, tmp_path / "run")
    before = _hashes(run)
    with FolderLock(run, "pretrain"):  # this test process is the live owner
        res = moecpt_run("pretrain", "--recipe", recipe, "--out", run, "--no-progress")
        msg = assert_user_error(res, "in use by", f"pid {os.getpid()}")
    assert "wait for it to finish" in msg
    assert _hashes(run) == before


def test_two_concurrent_trainings_one_wins(tmp_path):
    """Two real processes started together on one new folder: exactly one trains, the other gets one line."""
    recipe = _recipe(tmp_path, train={"steps": 30, "checkpoint_every": 10})
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "moecpt", "pretrain", "--recipe", str(recipe), "--out", str(run), "--no-progress"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=300) + (p.returncode,) for p in procs]
    codes = sorted(rc for _, _, rc in results)
    assert codes == [0, 2], [r[1][-2000:] for r in results]
    loser = next(r for r in results if r[2] == 2)
    assert "in use by pid" in loser[1] and "Traceback" not in loser[1]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if "split" not in line and "event" not in line]
    assert steps == list(range(1, 31))  # one writer: no interleaved metrics


def test_a_dead_owner_does_not_block(finished, tmp_path):
    """SIGKILL leaves a lock note but no OS lock: the next run proceeds."""
    _, recipe, src = finished
    run = _copy_run(src, tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, %r); from moecpt.storage.lock import FolderLock; "
        "FolderLock(%r, 'pretrain').acquire(); print('held', flush=True); time.sleep(600)") % (str(ROOT), str(run))],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    holder.kill()
    holder.wait()
    res = moecpt_run("pretrain", "--recipe", recipe, "--out", run, "--no-progress")
    assert res.returncode == 0, res.stderr


# ---------------------------------------------------------------------------------------------- pre-emption
def _wait_for_steps(run: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        f = run / "metrics.jsonl"
        if f.is_file() and sum('"grad_norm"' in line for line in f.read_text().splitlines()) >= n:
            return
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    raise AssertionError("training did not start in time")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_preemption_signal_saves_and_the_same_command_resumes(tmp_path, sig):
    recipe = _recipe(tmp_path, train={"steps": 150, "checkpoint_every": 1000, "eval_every": 1000})
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "moecpt", "pretrain", "--recipe", str(recipe), "--out", str(run), "--no-progress"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_steps(run, 2, p)
    p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 128 + sig, err
    assert "Traceback" not in err
    line = [x for x in err.splitlines() if x.strip()][-1]
    assert line.startswith(f"moecpt: error: pre-empted by {signal.Signals(sig).name} after step ")
    step = int(line.split("after step ")[1].split(":")[0])
    assert 2 <= step < 150 and _steps(run) == [step]
    assert str(run / "checkpoints" / f"step_{step:08d}") in line and "run the same command again" in line
    ck = load_checkpoint(run)  # verified
    assert ck.step == step
    # the same command resumes from it (a shorter run of the same recipe would be another run: same steps)
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout.splitlines()[-1])["resumed"] is True
    assert load_checkpoint(run).step == 150


def test_preemption_of_a_two_rank_job_every_rank_stops_at_one_step(tmp_path):
    """SIGTERM reaches only rank 1 (the worst case): the flag is agreed on, both ranks save one checkpoint of the
    same step and stop; the same job resumes from it."""
    from test_distributed import finish, launch

    raw = raw_recipe("smoke-switch", steps=300, checkpoint_every=1000)
    raw["train"]["eval_every"] = 1000
    recipe = write_toml(tmp_path / "r.toml", raw)
    run = tmp_path / "run"
    procs = launch(tmp_path, recipe, run, [])
    _wait_for_steps(run, 2, procs[0])
    procs[1].send_signal(signal.SIGTERM)
    results = finish(procs, timeout=180)
    steps = set()
    for rc, _, err in results:
        assert rc == 128 + signal.SIGTERM, err[-3000:]
        assert "Traceback" not in err
        line = [x for x in err.splitlines() if x.strip()][-1]
        assert "pre-empted by SIGTERM after step" in line, err[-2000:]
        steps.add(int(line.split("after step ")[1].split(":")[0]))
    assert len(steps) == 1 and _steps(run) == [steps.pop()]
    results = finish(launch(tmp_path, recipe, run, []), timeout=600)
    for rc, out, err in results:
        assert rc == 0, err[-3000:]
    assert load_checkpoint(run).step == 300


# ------------------------------------------------------------------------------------------- environment
def test_read_only_out_is_one_line_and_nothing_written(tmp_path, readonly_dir):
    recipe = _recipe(tmp_path)
    res = moecpt_run("pretrain", "--recipe", recipe, "--out", readonly_dir / "run", "--no-progress")
    assert_user_error(res, "cannot be written", str(readonly_dir / "run"))
    assert list(readonly_dir.iterdir()) == []


def test_full_disk_mid_run_is_one_line_and_earlier_checkpoints_stay(tmp_path, small_fs):
    """A checkpoint of the smoke Switch model is about 13 MB: a 30 MB disk takes two, not the third."""
    fs = small_fs("30m")
    recipe = _recipe(tmp_path, train={"steps": 6, "checkpoint_every": 1, "keep_last": 5})
    res = moecpt_run("pretrain", "--recipe", recipe, "--out", fs / "run", "--no-progress")
    msg = assert_user_error(res)
    assert "disk" in msg and "checkpoint" in msg, msg
    kept = _steps(fs / "run")
    assert kept and all(load_checkpoint(fs / "run" / "checkpoints" / f"step_{s:08d}").step == s for s in kept)
    assert not [p for p in (fs / "run" / "checkpoints").iterdir() if ".tmp-" in p.name]


def test_absurd_model_is_refused_before_anything_is_written(tmp_path):
    recipe = _recipe(tmp_path)
    res = moecpt_run("pretrain", "--recipe", recipe, "--out", tmp_path / "run", "--no-progress",
                     "--set", "model.d_model=65536", "--set", "model.n_heads=64", "--set", "model.ffn_width=262144")
    assert_user_error(res, "needs at least", "this machine has")
    assert not (tmp_path / "run").exists()


def test_weights_are_readable_by_the_team(finished):
    _, _, run = finished
    for f in (run / "checkpoints" / "step_00000006").iterdir():
        assert f.stat().st_mode & 0o044 == 0o044, (f, oct(f.stat().st_mode))


# ------------------------------------------------------------------------------------ CPT that cannot apply
def test_cpt_recipe_changing_the_architecture_is_refused(finished, tmp_path):
    _, recipe, run = finished
    for sets, frag in ((["model.d_model=96"], "model.d_model = 96, the parent has"),
                       (["model.moe.num_experts=4"], "model.moe.num_experts = 4"),
                       (["data.seq_len=4096"], "exceeds the parent's max_seq_len")):
        before = _hashes(run)
        res = moecpt_run("cpt", "--recipe", recipe, "--from", run, "--out", tmp_path / "cpt", "--no-progress",
                         *[a for s in sets for a in ("--set", s)])
        assert_user_error(res, frag)
        assert not (tmp_path / "cpt").exists() and _hashes(run) == before


def test_cpt_of_a_dense_parent_with_an_moe_recipe_is_refused(tmp_path):
    dense = write_toml(tmp_path / "d.toml", raw_recipe("smoke-dense", steps=2, checkpoint_every=2))
    moe = write_toml(tmp_path / "m.toml", raw_recipe("smoke-switch", steps=2, checkpoint_every=2))
    assert moecpt_run("pretrain", "--recipe", dense, "--out", tmp_path / "d", "--no-progress").returncode == 0
    res = moecpt_run("cpt", "--recipe", moe, "--from", tmp_path / "d", "--out", tmp_path / "c", "--no-progress")
    assert_user_error(res, "model.moe = an MoE layer, the parent has none (dense)")


def test_out_inside_the_parent_run_is_refused(finished):
    _, recipe, run = finished
    before = _hashes(run)
    res = moecpt_run("cpt", "--recipe", recipe, "--from", run, "--out", run / "cpt", "--no-progress")
    assert_user_error(res, "lies inside the input")
    assert _hashes(run) == before


def test_pretrain_recipe_without_a_model_is_refused(tmp_path):
    raw = raw_recipe("smoke-switch")
    del raw["model"]
    res = moecpt_run("pretrain", "--recipe", write_toml(tmp_path / "r.toml", raw), "--out", tmp_path / "run",
                     "--no-progress")
    assert_user_error(res, "no [model] table")
    assert not (tmp_path / "run").exists()


def test_preempted_study_saves_its_running_stages(tmp_path):
    """SIGTERM to `moecpt study`: it passes the signal to its stage workers, each saves, the study stops in one
    line with 143; the stage checkpoint is intact and the same command picks the stage up again."""
    out = tmp_path / "study"
    cmd = [sys.executable, "-m", "moecpt", "study", str(ROOT / "recipes" / "study" / "smoke.toml"), "--out", str(out),
           "--jobs", "1", "--set", "pretrain.steps=4000"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not [f for f in out.glob("runs/**/metrics.jsonl") if f.stat().st_size > 0]:
        assert p.poll() is None and time.time() - t0 < 180, p.communicate()[1][-3000:]
        time.sleep(0.1)
    time.sleep(1.0)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=180)
    assert p.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "Traceback" not in err
    errors = [x[x.index("moecpt: error:"):] for x in err.splitlines() if "moecpt: error:" in x]
    assert len(errors) == 1 and errors[0].startswith("moecpt: error: study pre-empted by SIGTERM"), err[-2000:]
    runs = [c.parent for c in (out / "runs").glob("**/checkpoints")]
    assert runs and all(load_checkpoint(r).step >= 1 for r in runs)
    assert all(str(r.relative_to(out / "runs").parent) in err for r in runs)


def test_study_never_replaces_a_users_report(smoke_study, tmp_path):
    """A report.md that moecpt did not write (or that was edited since) is refused, not overwritten; moecpt's own
    unedited report is replaced as usual. (A study from scratch through the CLI is README's command, run by
    test_docs_commands.)"""
    import shutil

    out = tmp_path / "study"
    shutil.copytree(smoke_study[0], out)
    recipe = ROOT / "recipes" / "study" / "smoke.toml"
    again = moecpt_run("study", recipe, "--out", out, timeout=900)  # moecpt's own report: replaced fine
    assert again.returncode == 0, again.stderr[-3000:]
    assert (out / "report.md").is_file()
    (out / "report.md").write_text("my own notes\n")
    res = moecpt_run("study", recipe, "--out", out, timeout=900)
    msg = assert_user_error(res, "report.md exists and is not the file moecpt wrote")
    assert "move it away" in msg
    assert (out / "report.md").read_text() == "my own notes\n"


def test_preempted_meta_training_saves_and_resumes(tmp_path):
    out = tmp_path / "mt"
    cmd = [sys.executable, "-m", "moecpt", "lopt", "meta-train", "--task", "digits-mlp32", "--out", str(out),
           "--iterations", "100000", "--pairs", "2", "--truncation", "2", "--min-length", "4", "--max-length", "8",
           "--no-progress"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    # the signal as early as the folder exists: the watcher is on before the first write (under load a SIGTERM
    # while config.json was written used to kill the process with the default handler)
    while not out.is_dir():
        assert p.poll() is None and time.time() - t0 < 120, p.communicate()[1][-2000:]
        time.sleep(0.01)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGTERM and "Traceback" not in err, err[-2000:]
    line = [x for x in err.splitlines() if x.strip()][-1]
    assert line.startswith("moecpt: error: pre-empted by SIGTERM after meta-iteration ")
    done = int(line.split("meta-iteration ")[1].split(":")[0])
    res = subprocess.run(cmd + ["--max-minutes", "0.02"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout.splitlines()[-1])["iterations_done"] > done
