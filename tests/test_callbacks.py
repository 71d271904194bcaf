"""The loop's plug-in points: callbacks see every step, record, checkpoint and the run's end; the metric sinks
(TensorBoard, W&B) get the records of ``metrics.jsonl``; plain progress lines without a terminal; train.threads."""

from __future__ import annotations

import glob
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moecpt.config import recipe_from_dict
from moecpt.train.callbacks import CallbackBase, LogLines, ProgressKind, RunInfo, StepResult
from moecpt.train.metrics import flat_scalars
from moecpt.train.trainer import Trainer

from test_cli_train import assert_user_error, moecpt_run
from test_trainer import raw_recipe, records, write_toml


class Recorder(CallbackBase):
    def __init__(self):
        self.events: list[tuple] = []
        self.threads: list[int] = []

    def on_run_start(self, info: RunInfo) -> None:
        self.events.append(("start", info.start_step, info.end_step))

    def on_record(self, record):
        self.events.append(("record", record.get("split", record.get("event", "train")), record["step"]))

    def on_step_end(self, result: StepResult) -> None:
        self.events.append(("step", result.step))
        self.threads.append(torch.get_num_threads())

    def on_eval(self, step, losses):
        self.events.append(("eval", step, sorted(losses)))

    def on_checkpoint(self, step: int, path: Path) -> None:
        self.events.append(("checkpoint", step, path.name))

    def on_run_end(self, summary):
        self.events.append(("end", summary["steps"]))

    def close(self):
        self.events.append(("close",))


def test_callbacks_see_the_whole_run_in_order(tmp_path):
    rec = Recorder()
    n = torch.get_num_threads()
    raw = raw_recipe("smoke-switch", steps=4, checkpoint_every=2)
    raw["train"]["threads"] = 1
    Trainer(recipe_from_dict(raw), tmp_path / "run", show_progress=False, callbacks=[rec]).run()
    ev = rec.events
    assert ev[0] == ("start", 0, 4) and ev[-2:] == [("end", 4), ("close",)]
    assert [e[1] for e in ev if e[0] == "step"] == [1, 2, 3, 4]
    assert [e[1:] for e in ev if e[0] == "checkpoint"] == [(2, "step_00000002"), (4, "step_00000004")]
    assert [e[1:] for e in ev if e[0] == "eval"] == [(0, ["english"]), (4, ["english"])]
    # every record the sinks get is a metrics.jsonl line, in the same order
    got = [e[1:] for e in ev if e[0] == "record"]
    want = [(r.get("split", r.get("event", "train")), r["step"]) for r in records(tmp_path / "run")]
    assert got == want
    assert rec.threads == [1, 1, 1, 1] and torch.get_num_threads() == n  # train.threads, restored afterwards


def test_a_failing_run_still_closes_its_callbacks(tmp_path):
    rec = Recorder()
    raw = raw_recipe("smoke-switch", steps=4, checkpoint_every=2)
    raw["optim"] = {"lr": 1e6, "min_lr": 0.0}
    raw["schedule"] = {"kind": "constant", "warmup_fraction": 0}
    with pytest.raises(Exception, match="non-finite"):
        Trainer(recipe_from_dict(raw), tmp_path / "run", show_progress=False, callbacks=[rec]).run()
    assert rec.events[-1] == ("close",) and ("end", 4) not in rec.events


def test_flat_scalars_groups_layers_sources_and_comm():
    tags = flat_scalars({"step": 3, "loss": 2.5, "mri_layers": [0.5, 0.25], "mri_mean": 0.375,
                         "tokens_per_expert_layers": [[0.5, 0.5]], "comm_bytes": 10, "note": "x", "flag": True})
    assert tags == {"train/loss": 2.5, "train_layers/mri/layer_00": 0.5, "train_layers/mri/layer_01": 0.25,
                    "train/mri_mean": 0.375, "comm/bytes": 10.0}
    assert flat_scalars({"step": 1, "split": "val", "source": "code", "loss": 3.0}) == {"val/code/loss": 3.0}


def test_log_lines_cadence_and_eta():
    import io

    buf = io.StringIO()
    cb = LogLines(every=2, stream=buf)
    cb.on_run_start(RunInfo(mode="pretrain", name="x", out_dir=Path("r"), start_step=0, end_step=5,
                            tokens_per_step=100))
    for s in range(1, 6):
        cb.on_step_end(StepResult(step=s, end_step=5, tokens=100 * s, loss=1.0, lr=1e-3, step_time_s=0.1))
    lines = buf.getvalue().splitlines()
    assert lines[0].startswith("moecpt: pretrain 'x': steps 0->5, 500 tokens -> r")
    assert [ln.split()[1] for ln in lines[1:]] == ["2/5", "4/5", "5/5"]
    assert "eta 0:00:00" in lines[-1]


def test_without_a_terminal_auto_progress_prints_plain_lines(tmp_path):
    assert ProgressKind.AUTO.resolve(open(tmp_path / "f", "w")) is ProgressKind.LINES
    recipe = write_toml(tmp_path / "r.toml", raw_recipe("smoke-switch", steps=4, checkpoint_every=4))
    res = moecpt_run("pretrain", "--recipe", recipe, "--out", tmp_path / "run")  # stderr is a pipe, not a TTY
    assert res.returncode == 0, res.stderr
    assert "step 4/4 (100%)" in res.stderr and "resolved recipe:" in res.stderr and "\r" not in res.stderr
    quiet = moecpt_run("pretrain", "--recipe", recipe, "--out", tmp_path / "run2", "--no-progress")
    assert quiet.returncode == 0 and quiet.stderr.strip() == ""


def test_tensorboard_events_match_metrics_jsonl(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    raw = raw_recipe("smoke-switch", steps=4, checkpoint_every=4)
    raw["train"]["tensorboard"] = True
    raw["train"]["eval_every"] = 2
    Trainer(recipe_from_dict(raw), tmp_path / "run", show_progress=False).run()
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    train = [r for r in records(tmp_path / "run") if "split" not in r and "event" not in r]
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [
        (r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in train]
    assert {"train_layers/mri/layer_00", "val/english/loss", "train/lr"} <= set(tags)
    val = [r for r in records(tmp_path / "run") if r.get("split") == "val"]
    assert [e.step for e in acc.Scalars("val/english/loss")] == [r["step"] for r in val] == [0, 2, 4]


def test_wandb_offline_run_holds_the_records(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    raw = raw_recipe("smoke-switch", steps=3, checkpoint_every=3)
    raw["train"]["wandb"] = True
    res = moecpt_run("pretrain", "--recipe", write_toml(tmp_path / "r.toml", raw), "--out", tmp_path / "run",
                     "--no-progress")
    assert res.returncode == 0, res.stderr
    files = glob.glob(str(tmp_path / "run" / "wandb" / "offline-run-*" / "*.wandb"))
    assert len(files) == 1
    data = Path(files[0]).read_bytes()
    last = [r for r in records(tmp_path / "run") if "split" not in r and "event" not in r][-1]
    assert b"train/loss" in data and b"train_layers/mri" in data
    assert json.dumps(last["loss"]).encode() in data  # the logged value itself, as W&B stores it (JSON)


@pytest.mark.parametrize("sink", ["tensorboard", "wandb"])
def test_missing_sink_package_is_one_line_before_anything_is_written(tmp_path, sink):
    raw = raw_recipe("smoke-switch", steps=2, checkpoint_every=2)
    raw["train"][sink] = True
    recipe = write_toml(tmp_path / "r.toml", raw)
    block = "torch.utils.tensorboard" if sink == "tensorboard" else "wandb"
    code = (f"import sys; sys.modules[{block!r}] = None; from moecpt.cli import main; "
            f"sys.exit(main(['pretrain', '--recipe', {str(recipe)!r}, '--out', {str(tmp_path / 'run')!r}, "
            "'--no-progress']))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert_user_error(res, f"train.{sink} = true needs the", f"moecpt[{sink}]")
    assert not (tmp_path / "run").exists()
