"""Bad user input, done for real through the CLI: exit code 2, one ``moecpt: error:`` line naming the problem, no
traceback, nothing written. Non-finite numbers in recipes and flags, empty recipes, out-of-range CLI numbers,
damaged data files, ``--seq-len`` beyond the model, and ``train.compile`` failures."""

from __future__ import annotations

import gzip
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moecpt.cli import main
from moecpt.config import recipe_from_dict
from moecpt.errors import MoecptError

from tiny_recipes import raw_recipe

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "recipes" / "smoke.toml"


def user_error(capsys, argv: list[str], *fragments: str) -> str:
    """Run ``moecpt argv`` in-process; assert exit 2 and one ``moecpt: error:`` line holding ``fragments``."""
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    return _check(rc, err, fragments)


def _check(rc: int, err: str, fragments) -> str:
    """Exit 2, no traceback, and stderr ends with the only ``moecpt: error:`` line, which is one line; the lines
    before it may only be ``moecpt:`` progress notes (``data prepare`` announces its stages)."""
    assert rc == 2, (rc, err)
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("moecpt: error: "), err
    assert all(line.startswith("moecpt: ") and "error" not in line for line in lines[:-1]), err
    for f in fragments:
        assert f in lines[-1], (f, lines[-1])
    return lines[-1]


def moecpt_run(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moecpt", *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env=env)


# ------------------------------------------------------------------------------ 1. non-finite numbers in recipes
@pytest.mark.parametrize("override, key", [
    ("optim.lr=inf", "optim.lr=inf"),
    ("optim.lr=nan", "optim.lr=nan"),
    ("optim.grad_clip=-inf", "optim.grad_clip=-inf"),
    ("data.mixture.english=nan", "data.mixture.english=nan"),
    ("model.moe.router.aux_loss_weight=inf", "model.moe.router.aux_loss_weight=inf"),
    ("model.rope_theta=nan", "model.rope_theta=nan"),
    ("schedule.warmup_fraction=nan", "schedule.warmup_fraction=nan"),
    ("distributed.timeout_s=inf", "distributed.timeout_s=inf"),
])
def test_non_finite_override_is_refused(capsys, tmp_path, override, key):
    out = tmp_path / "run"
    user_error(capsys, ["pretrain", "--recipe", SMOKE, "--out", out, "--set", override, "--no-progress"],
               key, "not a finite number")
    assert not out.exists()


def test_a_string_for_a_float_is_refused_as_no_number(capsys, tmp_path):
    # lax pydantic parsed the string "inf" as a float (then refused it as infinite); strict floats take no strings
    out = tmp_path / "run"
    user_error(capsys, ["pretrain", "--recipe", SMOKE, "--out", out, "--set", 'optim.lr="inf"', "--no-progress"],
               "optim.lr='inf' is not a number; give a number")
    assert not out.exists()


def test_nan_in_recipe_file_is_refused(capsys, tmp_path):
    recipe = tmp_path / "nan.toml"
    recipe.write_text(SMOKE.read_text().replace("lr = 3e-3", "lr = nan"))
    assert "lr = nan" in recipe.read_text()
    user_error(capsys, ["pretrain", "--recipe", recipe, "--out", tmp_path / "run", "--no-progress"],
               "optim.lr=nan", "not a finite number")


@pytest.mark.parametrize("override, key", [
    ("cpt.replay=[0.1, nan]", "cpt.replay[1]=nan"),
    ("const_lr_fraction=inf", "const_lr_fraction=inf"),
    ("pretrain.warmup_fraction=nan", "pretrain.warmup_fraction=nan"),
    ("optim.lr=inf", "optim.lr=inf"),
])
def test_non_finite_study_key_is_refused(capsys, tmp_path, override, key):
    out = tmp_path / "study"
    user_error(capsys, ["study", "--out", out, "--set", override], key, "not a finite number")
    assert not out.exists()


# ------------------------------------------------------------------------------------------- 2. empty recipes
@pytest.mark.parametrize("text", ["", "# only a comment\n\n   \n# and another\n"])
def test_empty_recipe_is_refused(capsys, tmp_path, text):
    recipe = tmp_path / "empty.toml"
    recipe.write_text(text)
    out = tmp_path / "run"
    user_error(capsys, ["pretrain", "--recipe", recipe, "--out", out, "--no-progress"], str(recipe), "is empty")
    assert not out.exists()
    user_error(capsys, ["study", recipe, "--out", out], "is empty")
    assert not out.exists()


def test_empty_recipe_is_refused_subprocess(tmp_path):
    recipe = tmp_path / "empty.toml"
    recipe.write_bytes(b"")
    res = moecpt_run("pretrain", "--recipe", recipe, "--out", tmp_path / "run", "--no-progress")
    _check(res.returncode, res.stderr, ["empty.toml", "is empty"])


# ------------------------------------------------------------------------------- 3. lopt meta-train and bench
@pytest.mark.parametrize("args, words", [
    (["--sigma", "nan"], ["--sigma nan", "finite"]),
    (["--sigma", "inf"], ["--sigma inf", "finite"]),
    (["--sigma", "0"], ["--sigma", "> 0"]),
    (["--lr", "nan"], ["--lr nan", "finite"]),
    (["--lr=-1e-3"], ["--lr", "> 0"]),
    (["--final-lr", "inf"], ["--final-lr inf", "finite"]),
    (["--final-lr", "-1"], ["--final-lr", ">= 0"]),
    (["--workers", "0"], ["--workers 0", ">= 1"]),
    (["--local-steps", "0"], ["--local-steps 0", ">= 1"]),
    (["--iterations", "0"], ["--iterations 0", ">= 1"]),
    (["--pairs", "-2"], ["--pairs -2", ">= 1"]),
    (["--truncation", "0"], ["--truncation 0", ">= 1"]),
    (["--min-length", "0"], ["--min-length 0", ">= 1"]),
    (["--min-length", "50", "--max-length", "10"], ["--max-length 10", "--min-length 50"]),
    (["--eval-every", "0"], ["--eval-every 0", ">= 1"]),
    (["--threads", "0"], ["--threads 0", ">= 1"]),
    (["--max-minutes", "0"], ["--max-minutes 0.0", "> 0"]),
    (["--max-minutes", "nan"], ["--max-minutes nan", "finite"]),
    (["--seed", str(2**70)], ["--seed", "out of range"]),
])
def test_meta_train_bad_numbers(capsys, tmp_path, args, words):
    out = tmp_path / "meta"
    user_error(capsys, ["lopt", "meta-train", "--task", "wine-mlp32", "--out", out, "--no-progress", *args], *words)
    assert not out.exists()


def test_meta_train_empty_task_list(capsys, tmp_path):
    user_error(capsys, ["lopt", "meta-train", "--task", ",", "--out", tmp_path / "m"], "--task", "no task")


def test_meta_train_nan_sigma_subprocess(tmp_path):
    """The original report: NaN weights were saved and the printed summary was not valid JSON."""
    out = tmp_path / "meta"
    res = moecpt_run("lopt", "meta-train", "--task", "wine-mlp32", "--out", out, "--sigma", "nan", "--no-progress")
    _check(res.returncode, res.stderr, ["--sigma nan", "finite"])
    assert res.stdout == "" and not out.exists()


@pytest.mark.parametrize("args, words", [
    (["--rounds", "0"], ["--rounds 0", ">= 1"]),  # 0 must not silently mean "the default"
    (["--seeds", "0"], ["--seeds 0", ">= 1"]),
    (["--rounds", "-3"], ["--rounds -3", ">= 1"]),
    (["--local-steps", "0"], ["--local-steps '0'", ">= 1"]),
    (["--local-steps", ","], ["--local-steps ','"]),
    (["--local-steps", "4,x"], ["--local-steps", "4,x"]),
    (["--tasks", ","], ["--tasks ','", "no task"]),
    (["--methods", ","], ["--methods ','", "no method"]),
    (["--threads", "-1"], ["--threads -1", ">= 1"]),
])
def test_bench_bad_numbers(capsys, tmp_path, args, words):
    out = tmp_path / "bench"
    user_error(capsys, ["lopt", "bench", "--quick", "--json", "--out", out, "--no-progress", *args], *words)
    assert not out.exists()


def test_meta_train_config_validates_without_the_cli():
    from moecpt.lopt.meta_train import MetaTrainConfig

    for bad in (dict(sigma=float("nan")), dict(weight_decay=float("inf")), dict(warmup_fraction=2.0),
                dict(eval_rounds=0), dict(save_every=0), dict(sgd_scale=0.0)):
        with pytest.raises(MoecptError) as e:
            MetaTrainConfig(**bad).validate()
        assert next(iter(bad)) in str(e.value) and "\n" not in str(e.value)
    MetaTrainConfig().validate()


# ---------------------------------------------------------------------------------------------- 4. inspect
@pytest.mark.parametrize("args, words", [
    (["--preset", "demo-dense", "--vocab-size", "-5"], ["--vocab-size -5", ">= 2"]),
    (["--preset", "demo-dense", "--vocab-size", "1"], ["--vocab-size 1", ">= 2"]),
    (["--recipe", SMOKE, "--vocab-size", "0"], ["--vocab-size 0", ">= 2"]),
    (["--preset", "paper-dense", "--vocab-size", "1000"], ["--vocab-size 1000", "vocab_size=128256",
                                                           "--set model.vocab_size=1000"]),
])
def test_inspect_bad_vocab_size(capsys, args, words):
    user_error(capsys, ["inspect", *args, "--json"], *words)


def test_inspect_vocab_size_still_fills_an_unset_one(capsys):
    assert main(["inspect", "--preset", "demo-dense", "--vocab-size", "300", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["preset"] == "demo-dense"


# ------------------------------------------------------------------------------------ 5. eval --seq-len too long
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from moecpt.train.trainer import Trainer

    run = tmp_path_factory.mktemp("bad_input") / "run"
    recipe = recipe_from_dict(raw_recipe("smoke-switch", steps=1, checkpoint_every=1))
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        Trainer(recipe, run, show_progress=False).run()
    finally:
        torch.set_num_threads(n)
    return run, recipe.model.max_seq_len


def test_eval_seq_len_beyond_the_model(capsys, tiny_run):
    run, max_len = tiny_run
    user_error(capsys, ["eval", "--checkpoint", run, "--seq-len", max_len + 1, "--batches", "1"],
               f"--seq-len {max_len + 1}", f"max_seq_len={max_len}")
    user_error(capsys, ["compare", run, run, "--seq-len", 100_000, "--batches", "1"],
               "--seq-len 100000", f"max_seq_len={max_len}")


def test_a_deleted_dcp_shard_says_how_to_go_on(capsys, tmp_path):
    """eval, export-hf and consolidate of a DCP checkpoint whose shard is gone: what is wrong, and the fix (restore
    it, or the other complete checkpoints of the run, newest first)."""
    from moecpt.train.trainer import Trainer

    run = tmp_path / "run"
    Trainer(recipe_from_dict(raw_recipe("smoke-switch", steps=2, checkpoint_every=1,
                                        train={"checkpoint_format": "dcp", "keep_last": 2})),
            run, show_progress=False).run()
    ck = run / "checkpoints" / "step_00000002"
    (ck / "dcp" / "__0_0.distcp").unlink()
    fix = f"restore the file from a copy, or point at another checkpoint: {run / 'checkpoints' / 'step_00000001'}"
    for argv in (["eval", "--checkpoint", ck, "--batches", "1"], ["eval", "--checkpoint", ck / "dcp"],
                 ["export-hf", ck, "--out", tmp_path / "hf"],
                 ["checkpoint", "consolidate", ck, "--out", tmp_path / "single"]):
        user_error(capsys, argv, "dcp/__0_0.distcp is missing", fix)
    assert not (tmp_path / "hf").exists() and not (tmp_path / "single").exists()
    (run / "checkpoints" / "step_00000001" / "meta.json").unlink()  # no other complete one is left
    user_error(capsys, ["eval", "--checkpoint", ck], "restore the file from a copy (no other complete checkpoint")


# ------------------------------------------------------------------------------------------- 6. data readers
def _docs(n: int = 60) -> bytes:
    return b"".join(json.dumps({"text": f"document {i} has a few words in it " * 4}).encode() + b"\n"
                    for i in range(n))


def _prepare(capsys, tmp_path, path: Path, *words: str) -> str:
    return user_error(capsys, ["data", "prepare", "--source", f"x={path}", "--tokenizer", "train:300",
                               "--out", tmp_path / "prepared"], *words)


def test_truncated_gzip(capsys, tmp_path):
    full = gzip.compress(_docs(400), mtime=0)
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(full[: len(full) // 2])
    _prepare(capsys, tmp_path, path, str(path), "truncated", "EOFError")


def test_corrupt_gzip_member(capsys, tmp_path):
    # a good member followed by one whose deflate block has the reserved type 3: zlib.error mid-file
    path = tmp_path / "bad.jsonl.gz"
    path.write_bytes(gzip.compress(_docs(), mtime=0) + b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff\x07\x00")
    _prepare(capsys, tmp_path, path, str(path), "corrupt", "zlib.error", "after line 60")


@pytest.mark.parametrize("damage", ["not-gzip", "crc"])
def test_bad_gzip_file(capsys, tmp_path, damage):
    path = tmp_path / "bad.jsonl.gz"
    if damage == "not-gzip":
        path.write_bytes(_docs())
    else:
        data = bytearray(gzip.compress(_docs(), mtime=0))
        data[-6] ^= 0xFF  # inside the CRC-32 trailer
        path.write_bytes(bytes(data))
    _prepare(capsys, tmp_path, path, str(path), "corrupt", "BadGzipFile")


@pytest.mark.parametrize("values, type_name", [
    (list(range(50)), "int64"),
    ([[f"doc {i}"] for i in range(50)], "list<"),
])
def test_parquet_text_column_of_another_type(capsys, tmp_path, values, type_name):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": pa.array(values), "body": pa.array([f"doc {i}" for i in range(50)])}), path)
    _prepare(capsys, tmp_path, path, str(path), "'text'", type_name, "not text", "body")


def test_parquet_string_like_columns_still_read(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    from moecpt.data.readers import ReadStats, read_parquet

    for arr in (pa.array(["a b", "c"]), pa.array(["a b", "c"], pa.large_string()),
                pa.array([b"a b", b"c"], pa.binary()), pa.array(["a b", "c"]).dictionary_encode()):
        path = tmp_path / "ok.parquet"
        pq.write_table(pa.table({"text": arr}), path)
        assert list(read_parquet(str(path), "text", ReadStats())) == ["a b", "c"]


# ----------------------------------------------------------------------------------------------- 7. compile
def test_compile_failure_is_one_line(capfd):
    from moecpt.train.compile import compile_module

    def broken_backend(gm, example_inputs):
        raise RuntimeError("backend exploded\nwith a second line")

    fwd = compile_module(torch.nn.Linear(4, 4), "cpu", backend=broken_backend)
    capfd.readouterr()
    with pytest.raises(MoecptError) as e:
        fwd(torch.randn(2, 4))
    msg = str(e.value)
    assert "\n" not in msg and "train.compile" in msg and "backend exploded" in msg, msg
    assert "Traceback" not in capfd.readouterr().err


def test_compile_works_and_is_transparent():
    from moecpt.train.compile import compile_module

    lin = torch.nn.Linear(4, 3)
    x = torch.randn(2, 4)
    assert torch.allclose(compile_module(lin, "cpu", backend="eager")(x), lin(x))


def test_compile_without_cpp_compiler_is_refused():
    from torch._inductor import config as inductor_config

    from moecpt.train.compile import compile_module

    with inductor_config.patch({"cpp.cxx": ("no-such-cxx-compiler",)}):
        with pytest.raises(MoecptError, match="needs a C\\+\\+ compiler.*no-such-cxx-compiler.*train.compile = false"):
            compile_module(torch.nn.Linear(4, 4), "cpu")


def test_compile_of_grouped_experts_never_gives_a_traceback(capfd):
    """The real failure on this CPU: torch._grouped_mm runs fp32 eagerly, but its fake kernel wants bf16."""
    from moecpt.model.expert_dispatch import _grouped_mm_runs_on_cpu
    from moecpt.train.compile import compile_module

    if not hasattr(torch, "_grouped_mm") or not _grouped_mm_runs_on_cpu(torch.float32):
        pytest.skip("no CPU fp32 torch._grouped_mm in this torch")

    class Grouped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(2, 8, 8))

        def forward(self, x):
            return torch._grouped_mm(x, self.w, offs=torch.tensor([2, 4], dtype=torch.int32))

    mod, x = Grouped(), torch.ones(4, 8)
    fwd = compile_module(mod, "cpu")
    capfd.readouterr()
    try:
        y = fwd(x)
    except MoecptError as e:
        assert "\n" not in str(e) and "train.compile = false" in str(e) and 'dispatch = "loop"' in str(e)
    else:  # a torch whose fake kernel handles fp32: then it must compute the same thing
        assert torch.allclose(y, mod(x))
    assert "Traceback" not in capfd.readouterr().err


def _trainer_uses_compile_module() -> bool:
    from moecpt.train import trainer

    return "compile_module" in inspect.getsource(trainer)


@pytest.mark.skipif(not _trainer_uses_compile_module(), reason="the trainer does not call compile_module yet")
def test_pretrain_compile_without_cpp_compiler(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(SMOKE.read_text().replace('preset = "smoke-granular"', 'preset = "smoke-dense"'))
    res = moecpt_run("pretrain", "--recipe", recipe, "--out", tmp_path / "run", "--set", "train.compile=true",
                     "--set", "train.steps=1", "--set", "train.batch_size=4", "--set", "train.eval_batches=1",
                     "--set", "train.device=cpu", "--no-progress", env={**os.environ, "CXX": "no-such-cxx-compiler"})
    _check(res.returncode, res.stderr, ["train.compile", "C++ compiler", "no-such-cxx-compiler"])


@pytest.mark.parametrize("argv, words", [
    (["pretrain", "--recipe"], "argument --recipe: expected one argument"),
    (["zzz"], "invalid choice: 'zzz' (choose from 'inspect', "),
    (["pretian"], "; did you mean 'pretrain'?; see `moecpt --help`"),
    (["checkpoint", "consolidat"], "did you mean 'consolidate'?"),
    (["data", "prepare"], "the following arguments are required"),
    (["lopt", "meta-train", "--kind", "adam"], "invalid choice: 'adam'"),
])
def test_argument_errors_are_one_line_that_names_the_help(capsys, argv, words):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and words in err, err
    assert err.rstrip().endswith("--help`") and "usage:" not in err
    assert ("did you mean" in err) == ("did you mean" in words)  # only for a near miss
