"""One set of launch checks (moecpt/distributed/runtime.py::check_launch): ``moecpt plan --world W`` refuses every
layout that ``moecpt pretrain`` refuses on W ranks, with the same one-line message, and a refused resume leaves the
run folder byte for byte as it was."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from test_trainer import write_toml
from tiny_recipes import raw_recipe

from moecpt.cli import main
from moecpt.config import load_recipe, recipe_from_dict
from moecpt.distributed.runtime import Distributed
from moecpt.errors import MoecptError
from moecpt.train.parallel import DistInfo
from moecpt.train.trainer import Trainer

WORLD = 4
DILOCO = ["distributed.sync=diloco", "distributed.local_steps=2"]
ISLANDS_FSDP = [*DILOCO, "distributed.islands=2", "distributed.island_sync=fsdp"]

# every layout a run refuses at its start that `plan` used to accept (a fresh-user pass, issue 14)
REFUSED = {
    "ep-with-local-sgd": (["distributed.expert_parallel=2", "distributed.sync=local-sgd"],
                          "expert_parallel=2 runs with sync = 'ddp' or 'fsdp'"),
    "ep-inside-fsdp-islands": ([*ISLANDS_FSDP, "distributed.expert_parallel=2"],
                               "inside islands runs with island_sync = 'ddp'"),
    "lagg-a-inside-fsdp-islands": ([*ISLANDS_FSDP, "distributed.outer_optimizer=lagg-a"],
                                   "meta-trained for K=8 workers, not K=2"),
    "lagg-a-at-4-workers": ([*DILOCO, "distributed.outer_optimizer=lagg-a"], "meta-trained for K=8 workers, not K=4"),
    "lagg-a-at-2-islands": ([*DILOCO, "distributed.islands=2", "distributed.outer_optimizer=lagg-a"],
                            "meta-trained for K=8 workers, not K=2"),
    "dcp-with-diloco": ([*DILOCO, "train.checkpoint_format=dcp"],
                        "train.checkpoint_format = 'dcp' does not apply to distributed.sync = 'diloco'"),
    "dcp-with-local-sgd": (["distributed.sync=local-sgd", "train.checkpoint_format=dcp"],
                           "does not apply to distributed.sync = 'local-sgd'"),
    "dcp-with-ddp-islands": ([*DILOCO, "distributed.islands=2", "train.checkpoint_format=dcp"],
                             "it applies across islands whose ranks hold slices"),
}


class RankZeroOf(Distributed):
    """The runtime of rank 0 of a ``world``-rank job, as the trainer sees it, without starting one (the refusals
    come before any collective)."""

    def __init__(self, world: int):
        self.world = world

    def info(self) -> DistInfo:
        return DistInfo(rank=0, world_size=self.world)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return write_toml(tmp_path_factory.mktemp("launch") / "r.toml", raw_recipe("smoke-switch"))


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_plan_refuses_what_pretrain_refuses_with_the_same_line(name, base, tmp_path, capsys):
    sets, fragment = REFUSED[name]
    argv = ["plan", "--recipe", str(base), "--world", str(WORLD)]
    for s in sets:
        argv += ["--set", s]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("moecpt: error: ") and fragment in err, err
    # the trainer's start on rank 0 of the same world (what `moecpt pretrain` runs under torchrun)
    recipe = recipe_from_dict(raw_recipe("smoke-switch"), sets)
    out = tmp_path / "run"
    with pytest.raises(MoecptError) as exc:
        Trainer(recipe, out, show_progress=False, parallel=RankZeroOf(WORLD))
    assert f"moecpt: error: {exc.value}" == err
    assert not out.exists()  # refused before the run folder was made


def test_plan_accepts_the_neighbouring_layouts(base, capsys):
    for sets in (["distributed.expert_parallel=2"], ["distributed.expert_parallel=2", "distributed.sync=fsdp"],
                 [*ISLANDS_FSDP], [*ISLANDS_FSDP, "distributed.outer_optimizer=lopt-a"],
                 [*DILOCO, "distributed.islands=2", "distributed.expert_parallel=2",
                  "distributed.outer_optimizer=lopt-a"],
                 [*DILOCO, "distributed.islands=2", "distributed.outer_optimizer=lopt-a"],
                 [*DILOCO, "train.checkpoint_format=single"], ["distributed.sync=fsdp", "train.checkpoint_format=dcp"],
                 [*ISLANDS_FSDP, "train.checkpoint_format=dcp"]):
        argv = ["plan", "--recipe", str(base), "--world", str(WORLD), "--json"]
        for s in sets:
            argv += ["--set", s]
        assert main(argv) == 0, (sets, capsys.readouterr().err)
        capsys.readouterr()


# ------------------------------------------------------------------------------------------- refused resumes
def _state(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file under ``folder`` (the lock note included): its sha256 and its mtime in ns; and every folder's
    mtime (a file made and removed again shows there)."""
    out = {}
    for p in sorted([folder, *folder.rglob("*")]):
        st = p.stat()
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        out[str(p.relative_to(folder))] = (digest, st.st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """A 2-worker simulated DiLoCo run that stopped after step 2's records but before its checkpoint (the one at
    step 1 is left): a resume truncates its metrics.jsonl and re-runs step 2."""
    tmp = tmp_path_factory.mktemp("resume")
    recipe = write_toml(tmp / "r.toml", raw_recipe("smoke-switch", steps=2, checkpoint_every=1,
                                                   distributed={"sync": "diloco", "local_steps": 1}))
    run = tmp / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many small kernels: one thread is fastest on a shared CPU
    try:
        Trainer(load_recipe(recipe), run, show_progress=False, simulate_workers=2, parallel=Distributed()).run()
    finally:
        torch.set_num_threads(threads)
    shutil.rmtree(run / "checkpoints" / "step_00000002")  # the kill: its records are in metrics.jsonl, its save not
    return recipe, run


@pytest.mark.parametrize("workers", [4, None])
def test_a_refused_resume_changes_nothing_in_the_run_folder(interrupted, tmp_path, workers):
    recipe, src = interrupted
    run = shutil.copytree(src, tmp_path / "run", copy_function=shutil.copy2)
    before = _state(run)
    assert any(json.loads(line).get("step") == 2 for line in (run / "metrics.jsonl").read_text().splitlines())
    with pytest.raises(MoecptError) as exc:  # what `moecpt pretrain [--simulate-workers 4]` does first
        Trainer(load_recipe(recipe), run, show_progress=False, simulate_workers=workers, parallel=Distributed())
    msg = str(exc.value)
    assert "\n" not in msg and f"written by 2 workers of sync='diloco', but this run has {workers or 1}" in msg, msg
    assert "resume with the same number of workers" in msg
    assert _state(run) == before  # every byte and every mtime, the folder's own included


def test_the_same_layout_resumes_that_run(interrupted, tmp_path):
    """The control: with its own 2 workers the run resumes from step 1 (its log truncated there) and finishes."""
    recipe, src = interrupted
    run = shutil.copytree(src, tmp_path / "run")
    summary = Trainer(load_recipe(recipe), run, show_progress=False, simulate_workers=2,
                      parallel=Distributed()).run()
    assert summary["resumed"] and summary["steps"] == 2
    steps = [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
             if "lr" in r]
    assert steps == [1, 2]  # step 2's first record was dropped with the lost checkpoint, then logged again


def test_another_run_names_every_changed_key_up_to_three():
    """A changed layout moves several identity keys at once (islands with island_sync): the refusal names them all,
    not only the first, and counts the rest."""
    from moecpt.train.trainer import _describe_differences

    there = {"recipe": {"distributed": {"islands": 2, "island_sync": "fsdp"}, "train": {"steps": 4}}}
    now = {"recipe": {"distributed": {"islands": 1, "island_sync": "ddp"}, "train": {"steps": 4}}}
    assert _describe_differences(there, now) == ("recipe.distributed.island_sync differs: 'fsdp' there, 'ddp' now; "
                                                 "recipe.distributed.islands differs: 2 there, 1 now")
    many = {"recipe": {k: i for i, k in enumerate("abcde")}}
    line = _describe_differences(many, {"recipe": {}})
    assert line.count("differs") == 3 and line.endswith("; and 2 more")
