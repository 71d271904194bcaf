"""Sharded (DCP) checkpoints: atomic per-rank shards, manifest checks, resharding on resume, consolidation.

* one process: the DCP layout holds bit for bit the state the single-file layout holds; consolidation gives a
  checkpoint eval reads with the same numbers; consolidate refuses bad input in one line; a DCP parent gives the
  same CPT run as a single-file one; a hostile ``.metadata`` pickle is refused; a truncated shard is named, moved
  aside and the previous checkpoint resumed, to the uninterrupted run's weights;
* FSDP2 on 4 gloo processes writes DCP (4 shards, each hashed); one launch of two world-2 jobs resumes (a) the DCP
  checkpoint itself, resharded 4 -> 2, after the newest one lost a shard's tail, and (b) its consolidated
  single-file form: both continue identically, bit for bit, and as the world-4 run did; a single process resumes
  the consolidated form after the newest checkpoint lost a shard file.

The recipe uses micro-batches of 2 rows, so world 4, 2 and 1 compute the same per-micro-batch losses (the aux loss
is per micro-batch) and differ only in reduction order.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from test_distributed import finish, launch
from test_trainer import write_toml
from tiny_recipes import raw_recipe

from moecpt.analysis.evaluate import evaluate_checkpoint
from moecpt.cli import main as cli_main
from moecpt.config import recipe_from_dict
from moecpt.distributed.runtime import Distributed
from moecpt.errors import MoecptError
from moecpt.train.checkpoint import load_checkpoint
from moecpt.train.dcp_io import fill_tensors, has_refs, lookup_in, read_full, ref_dtype, split_tensors
from moecpt.train.trainer import Trainer

STEPS = 4
RAW = raw_recipe("smoke-switch", steps=STEPS, checkpoint_every=2, train={"micro_batch_size": 2})
FSDP = ["distributed.sync=fsdp"]


def step_dir(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step_{step:08d}"


def assert_same_state(a: Path, b: Path) -> None:
    """Model and optimizer state of two checkpoints (either layout) are bit for bit equal."""
    ca, cb = load_checkpoint(a), load_checkpoint(b)
    ma, mb = ca.model_state(), cb.model_state()
    assert ma.keys() == mb.keys()
    assert all(torch.equal(ma[k], mb[k]) for k in ma), [k for k in ma if not torch.equal(ma[k], mb[k])][:3]
    oa, ob = ca.optimizer_state(), cb.optimizer_state()
    # torch's full-state optimizer load turns betas into a list; same hyper-parameters
    groups = lambda o: [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in o["param_groups"]]  # noqa: E731
    assert groups(oa) == groups(ob) and oa["state"].keys() == ob["state"].keys()
    for i, entry in oa["state"].items():
        assert entry.keys() == ob["state"][i].keys()
        assert all(torch.equal(entry[k], ob["state"][i][k]) for k in entry)


def max_diff(a: Path, b: Path) -> float:
    ma, mb = load_checkpoint(a).model_state(), load_checkpoint(b).model_state()
    return max(float((ma[k] - mb[k]).abs().max()) for k in ma)


def consolidate_into(run: Path, step: int, tmp: Path) -> None:
    """Replace ``run``'s step folder by its consolidated single-file form (what a user does by hand)."""
    out = tmp / f"cons-{run.name}-{step}"
    assert cli_main(["checkpoint", "consolidate", str(step_dir(run, step)), "--out", str(out)]) == 0
    shutil.rmtree(step_dir(run, step))
    shutil.move(out, step_dir(run, step))


def run_ok(results) -> None:
    for rank, (rc, _, err) in enumerate(results):
        assert rc == 0, f"rank {rank} failed:\n{err[-3000:]}"


@pytest.fixture(scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def local_runs(tmp_path_factory, one_thread):
    """The same single-process run written in either layout."""
    tmp = tmp_path_factory.mktemp("dcp1")
    for fmt in ("single", "dcp"):
        Trainer(recipe_from_dict(RAW, [f"train.checkpoint_format={fmt}"]), tmp / fmt, show_progress=False).run()
    return tmp


# ------------------------------------------------------------------------------------------------- one process
def test_dcp_layout_holds_the_single_file_state_and_consolidates(local_runs, capsys):
    tmp = local_runs
    ck = load_checkpoint(tmp / "dcp")
    assert ck.sharded and ck.manifest["version"] == 2
    assert {"dcp/.metadata", "dcp/__0_0.distcp", "optimizer_rest.pt", "rng.pt"} == set(ck.manifest["files"])
    assert_same_state(tmp / "dcp", tmp / "single")  # Checkpoint reads DCP as full tensors, index-keyed moments
    assert ck.rng_state() is not None and ck.meta["sampler"] == load_checkpoint(tmp / "single").meta["sampler"]

    out = tmp / "consolidated"
    assert cli_main(["checkpoint", "consolidate", str(tmp / "dcp"), "--out", str(out)]) == 0
    assert_same_state(out, tmp / "single")
    assert (out / "tokenizer.json").is_file() and not load_checkpoint(out).sharded
    # eval of the consolidated checkpoint = eval of the single-file one = eval of the DCP one read directly
    evals = [evaluate_checkpoint(p, "demo", None, 32, 4, 1)[0]["sources"] for p in (out, tmp / "single", tmp / "dcp")]
    assert evals[0] == evals[1] == evals[2]
    capsys.readouterr()

    # refusals, one line each
    (tmp / "mine").mkdir()
    (tmp / "mine" / "notes.txt").write_text("user data")
    for argv, words in (
        ([str(tmp / "mine"), "--out", str(tmp / "o1")], "is not a moecpt checkpoint or run folder"),
        ([str(tmp / "dcp"), "--out", str(tmp / "mine")], "already exists; moecpt never overwrites it"),
        ([str(tmp / "single"), "--out", str(tmp / "o2")], "is already a single-file checkpoint"),
        ([str(tmp / "dcp"), "--out", str(tmp / "dcp" / "sub")], "inside the input"),  # never into the user's run
        ([str(step_dir(tmp / "dcp", 4)), "--out", str(tmp / "dcp" / "checkpoints" / "x")], "inside the input"),
        # another run's checkpoints/ folder: that run would resume from the consolidation as its own
        ([str(tmp / "dcp"), "--out", str(tmp / "single" / "checkpoints" / "step_00000099")],
         "inside the checkpoints folder of the run"),
    ):
        assert cli_main(["checkpoint", "consolidate", *argv]) == 2
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1, err
    assert (tmp / "mine" / "notes.txt").read_text() == "user data" and not (tmp / "o1").exists()
    assert not (tmp / "dcp" / "sub").exists() and not (tmp / "dcp" / "checkpoints" / "x").exists()
    assert not (tmp / "single" / "checkpoints" / "step_00000099").exists()
    # the same consolidation again is left as it is; another checkpoint into it is refused
    assert cli_main(["checkpoint", "consolidate", str(tmp / "dcp" / "checkpoints" / "step_00000004" / "dcp"),
                     "--out", str(out)]) == 0
    assert "left as it is" in capsys.readouterr().out
    assert cli_main(["checkpoint", "consolidate", str(step_dir(tmp / "dcp", 2)), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    with pytest.raises(MoecptError, match="'dcp' does not apply to distributed.sync = 'diloco'"):
        Trainer(recipe_from_dict(RAW, ["distributed.sync=diloco", "train.checkpoint_format=dcp"]), tmp / "dil",
                show_progress=False, parallel=Distributed())
    assert not (tmp / "dil").exists()
    assert cli_main(["export-hf", str(tmp / "dcp"), "--out", str(tmp / "hf")]) == 2
    assert "run `moecpt checkpoint consolidate" in capsys.readouterr().err and not (tmp / "hf").exists()


def test_cpt_from_a_dcp_parent_equals_cpt_from_the_single_file_parent(local_runs, tmp_path):
    cpt = raw_recipe("smoke-switch", steps=2, checkpoint_every=2, train={"micro_batch_size": 2},
                     cpt={"load_optimizer": True})
    for fmt in ("single", "dcp"):
        Trainer(recipe_from_dict(cpt), tmp_path / fmt, parent=local_runs / fmt, show_progress=False).run()
    assert_same_state(tmp_path / "dcp", tmp_path / "single")


def _reduce_pickle(module: str, name: str, arg: str) -> bytes:
    """A protocol-4 pickle calling ``module.name(arg)`` (``name`` may be dotted, as pickle allows)."""
    text = lambda x: b"\x8c" + bytes([len(x.encode())]) + x.encode()  # noqa: E731  SHORT_BINUNICODE
    return b"\x80\x04" + text(module) + text(name) + b"\x93" + text(arg) + b"\x85R."


def test_dcp_metadata_is_unpickled_with_an_allow_list(local_runs, tmp_path):
    """DCP's .metadata is a pickle: one naming anything but DCP's metadata types is refused, never run, also when
    it reaches a callable through an allowed module's imports (a dotted name)."""
    victim = tmp_path / "victim"
    bad = tmp_path / "ck"
    shutil.copytree(step_dir(local_runs / "dcp", STEPS), bad)
    for module, name in (("shutil", "rmtree"), ("torch.distributed.checkpoint.filesystem", "os.rmdir")):
        victim.mkdir()
        (bad / "dcp" / ".metadata").write_bytes(_reduce_pickle(module, name, str(victim)))
        with pytest.raises(MoecptError, match="not a DCP metadata file moecpt reads safely"):
            read_full(str(bad / "dcp"), "model")
        assert victim.is_dir(), f"{module}.{name} ran"
        victim.rmdir()


def test_truncated_shard_is_moved_aside_and_the_previous_checkpoint_resumed(local_runs, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(local_runs / "dcp", run)
    shard = step_dir(run, STEPS) / "dcp" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(MoecptError, match="dcp/__0_0.distcp is truncated"):
        load_checkpoint(step_dir(run, STEPS))
    Trainer(recipe_from_dict(RAW, ["train.checkpoint_format=dcp"]), run, show_progress=False).run()
    err = capsys.readouterr().err
    assert "dcp/__0_0.distcp is truncated" in err and "resuming from step_00000002" in err, err
    assert len(list((run / "checkpoints").glob(f"step_{STEPS:08d}.damaged-*"))) == 1
    assert_same_state(run, local_runs / "dcp")  # resumed from the DCP checkpoint to the same bits


# ------------------------------------------------------------------------------------------------- FSDP, gloo
@pytest.fixture(scope="module")
def world4(tmp_path_factory, one_thread):
    tmp = tmp_path_factory.mktemp("dcp4")
    recipe = write_toml(tmp / "r.toml", RAW)
    run_ok(finish(launch(tmp, recipe, tmp / "w4", FSDP, world=4), timeout=240))
    return tmp, recipe


def test_fsdp_writes_dcp_and_resumes_at_world_2_and_1(world4, capsys):
    tmp, recipe = world4
    w4 = tmp / "w4"
    ck = load_checkpoint(w4)
    shards = sorted(n for n in ck.manifest["files"] if n.endswith(".distcp"))
    assert ck.sharded and shards == [f"dcp/__{r}_0.distcp" for r in range(4)]
    assert ck.meta["sync"] == "fsdp" and ck.meta["workers"] == 4 and len(ck.rng_state()["ranks"]) == 4
    assert sorted(p.name for p in (w4 / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]

    # (a) the newest checkpoint lost the tail of rank 3's shard: moved aside, step 2 resharded 4 -> 2;
    # (b) step 2 consolidated to the single-file layout (the newest one removed). Both at world 2, one launch.
    a, b, c = tmp / "w2-dcp", tmp / "w2-single", tmp / "w1-single"
    for run in (a, b, c):
        shutil.copytree(w4, run)
    shard = step_dir(a, STEPS) / "dcp" / "__3_0.distcp"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    shutil.rmtree(step_dir(b, STEPS))
    consolidate_into(b, 2, tmp)
    (step_dir(c, STEPS) / "dcp" / "__1_0.distcp").unlink()
    consolidate_into(c, 2, tmp)
    jobs = [launch(tmp, recipe, a, FSDP, world=2), launch(tmp, recipe, b, FSDP, world=2)]
    results = [finish(j, timeout=240) for j in jobs]
    for r in results:
        run_ok(r)
    err_a = results[0][0][2]
    assert "dcp/__3_0.distcp is truncated" in err_a and "moved it aside" in err_a, err_a[-2000:]
    assert load_checkpoint(a).step == load_checkpoint(b).step == STEPS
    assert_same_state(a, b)  # the resharded DCP resume and the single-file resume continue identically
    assert load_checkpoint(a).manifest["files"].keys() >= {"dcp/__0_0.distcp", "dcp/__1_0.distcp"}
    assert max_diff(a, w4) < 1e-5  # and as the world-4 run did (reduction order only)

    # (c) one process resumes the consolidated form after the newest checkpoint lost a shard file
    capsys.readouterr()
    Trainer(recipe_from_dict(RAW, FSDP), c, show_progress=False).run()
    err_c = capsys.readouterr().err
    assert "dcp/__1_0.distcp is missing" in err_c and "resuming from step_00000002" in err_c, err_c
    assert not load_checkpoint(c).sharded  # auto: one process writes the single-file layout
    assert max_diff(c, w4) < 1e-5


def test_a_dcp_folder_with_pickled_entries_is_refused_before_they_are_read(tmp_path):
    """DCP stores a non-tensor value as a pickled bytes entry, which its own reader unpickles without restriction;
    moecpt never writes one, and refuses a folder that has one instead of loading it."""
    folder = tmp_path / "dcp"
    dcp.save({"model": {"w": torch.ones(3)}, "extra": {"note": {"any": "object"}}}, checkpoint_id=str(folder),
             no_dist=True)
    with pytest.raises(MoecptError, match="holds pickled values") as e:
        read_full(str(folder), "model")
    assert "\n" not in str(e.value)


def test_tensors_beside_the_optimizer_state_round_trip_through_a_skeleton():
    """split_tensors / fill_tensors: the skeleton keeps int keys, lists and non-tensor values and refers to each
    tensor by its DCP path; a reference the DCP part does not hold is a one-line error naming it."""
    state = {"state": {0: {"momentum_buffer": torch.arange(6.0).reshape(2, 3), "none": None}},
             "param_groups": [{"lr": 0.7, "params": [0]}], "t": torch.tensor(3)}
    skeleton, tensors = split_tensors(state, ("moecpt_sync", "outer"))
    assert has_refs(skeleton) and not has_refs({"state": {}, "param_groups": [{"lr": 0.7}]})
    ref = skeleton["state"][0]["momentum_buffer"]
    assert ref == {"dcp_ref": ["moecpt_sync", "outer", "state", "0", "momentum_buffer"], "shape": [2, 3],
                   "dtype": "float32"}
    assert skeleton["param_groups"] == state["param_groups"] and skeleton["state"][0]["none"] is None
    assert set(tensors) == {"state", "t"} and tensors["state"]["0"]["momentum_buffer"] is state["state"][0][
        "momentum_buffer"]
    back = fill_tensors(skeleton, lookup_in({"moecpt_sync": {"outer": tensors}}))
    assert back["state"][0]["momentum_buffer"] is state["state"][0]["momentum_buffer"] and back["t"] is state["t"]
    assert back["param_groups"] == state["param_groups"]
    with pytest.raises(MoecptError, match=r"holds no tensor optim\.moecpt_sync\.outer\.t that its optimizer_rest") as e:
        fill_tensors(skeleton, lookup_in({"moecpt_sync": {"outer": {"state": tensors["state"]}}}))
    assert "\n" not in str(e.value)
    with pytest.raises(MoecptError, match="names no torch dtype"):
        ref_dtype({**ref, "dtype": "os.system"})
