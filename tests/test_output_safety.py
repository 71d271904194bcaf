"""moecpt writes only where it may: never into or over an input, never into a non-empty folder it did not make,
never over a file or folder it cannot prove it made, one process per output folder, and a read-only or full disk
is one line (``moecpt: error: ...``), not a traceback.

Every test does the bad thing for real through the command line (``moecpt.cli.main`` in this process, or
``python -m moecpt`` where a second process or a crash matters), checks the exit status, the one-line message and
what it names, and that every file the user had is byte-identical afterwards.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from moecpt.cli import main
from moecpt.config import find_bundled_recipe
from moecpt.storage.lock import LOCK_FILE, FolderLock
from moecpt.storage.outputs import MARKER_FILE, read_marker

REPO = Path(__file__).resolve().parents[1]
SMOKE_STUDY = find_bundled_recipe("study/smoke")
TOK = "train:300"


# ------------------------------------------------------------------------------------------------------ helpers
def snapshot(*roots: Path) -> dict[str, str]:
    """sha256 of every file (and a mark for every folder) below ``roots``: what the user had. The note of who
    last held a moecpt folder's lock (rewritten by every run that takes it) is left out."""
    out: dict[str, str] = {}
    for root in roots:
        if root.is_file():
            out[str(root)] = hashlib.sha256(root.read_bytes()).hexdigest()
            continue
        for p in sorted(root.rglob("*")):
            if not (p.name == LOCK_FILE and (p.parent / MARKER_FILE).is_file()):
                out[str(p)] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def run(capsys, *argv: str) -> tuple[int, str]:
    """``moecpt ARGV`` in this process: (exit status, stderr). Anything but a MoecptError would raise here."""
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def cli(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``python -m moecpt ARGV`` in a fresh process."""
    return subprocess.run([sys.executable, "-m", "moecpt", *map(str, argv)], capture_output=True, text=True,
                          cwd=cwd or REPO, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})


def refused(rc: int, err: str, *words: str) -> None:
    """Exit status 2, exactly one ``moecpt: error:`` line, no traceback, naming each of ``words``."""
    assert rc == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("moecpt: error: ")]
    assert len(lines) == 1, err
    for w in words:
        assert str(w) in lines[0], (w, lines[0])


def write_corpus(folder: Path, n: int = 40, tag: str = "cat") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / f"doc{i:02d}.txt").write_text(f"document {i} about the {tag} and the dog, words {i} and more {i}\n")
    return folder


def write_jsonl(path: Path, field: str, n: int = 40, tag: str = "") -> Path:
    path.write_text("".join(json.dumps({field: f"{tag}record {i} lorem ipsum dolor {i} sit amet"}) + "\n"
                            for i in range(n)))
    return path


def prepare_args(out: Path, *sources: str, tok: str = TOK) -> list[str]:
    args = ["data", "prepare", "--out", str(out), "--tokenizer", tok, "--quiet", "--min-val-tokens", "64"]
    for s in sources:
        args += ["--source", s]
    return args


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    """A tiny Hugging Face OLMoE folder and its import (as tests/test_interop.py makes them)."""
    pytest.importorskip("transformers")
    from moecpt.interop.hf_import import import_hf
    from moecpt.interop.testing import save_tiny_hf

    root = tmp_path_factory.mktemp("hf")
    save_tiny_hf("olmoe", root / "hf", seed=0)
    import_hf(root / "hf", root / "ckpt")
    return root / "hf", root / "ckpt"


# ------------------------------------------------------------------------------------- data prepare: inputs
@pytest.mark.parametrize("where, how", [(".", "contains the input"), ("english", "is the input"),
                                        ("english/prepared", "lies inside the input")])
def test_prepare_never_writes_into_or_around_its_corpus(tmp_path, capsys, where, how):
    # the reported bug: `--source english=corpus/english --out corpus` deleted the 40 documents it had just read
    corpus = tmp_path / "corpus"
    write_corpus(corpus / "english")
    before = snapshot(corpus)
    out = (corpus / where).resolve()
    rc, err = run(capsys, *prepare_args(out, f"english={corpus / 'english'}"))
    refused(rc, err, how, str(corpus / "english"))
    assert snapshot(corpus) == before  # not one file changed, added (no marker, no lock) or removed


def test_prepare_refuses_a_non_empty_user_folder(tmp_path, capsys):
    # `--out userdir` with a source named `en` removed userdir/en/mine.txt
    corpus = write_corpus(tmp_path / "corpus")
    user = tmp_path / "userdir"
    (user / "en").mkdir(parents=True)
    (user / "en" / "mine.txt").write_text("my own notes\n")
    (user / "notes.md").write_text("# mine\n")
    before = snapshot(user, corpus)
    rc, err = run(capsys, *prepare_args(user, f"en={corpus}"))
    refused(rc, err, str(user), "not empty", "not made by moecpt")
    assert snapshot(user, corpus) == before


def test_prepare_never_replaces_a_user_folder_named_like_a_source(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus")
    out = tmp_path / "prepared"
    assert run(capsys, *prepare_args(out, f"english={corpus}"))[0] == 0
    # the user puts a folder of their own into moecpt's folder, under the name of the next source
    (out / "en").mkdir()
    (out / "en" / "mine.txt").write_text("not moecpt's\n")
    before = snapshot(out, corpus)
    rc, err = run(capsys, *prepare_args(out, f"en={corpus}", tok=str(out / "tokenizer.json")))
    refused(rc, err, str(out / "en"), "not made by moecpt")
    assert snapshot(out, corpus) == before
    # a file moecpt writes itself cannot be a source name either
    rc, err = run(capsys, *prepare_args(out, f"manifest.json={corpus}", tok=str(out / "tokenizer.json")))
    refused(rc, err, "'manifest.json'")
    assert snapshot(out, corpus) == before
    # while its own outdated source folder is rebuilt (proof: its source.json)
    (corpus / "doc00.txt").write_text("an edited document\n")
    before_en = snapshot(out / "en")
    assert run(capsys, *prepare_args(out, f"english={corpus}"))[0] == 2  # the tokenizer's inputs changed: refused
    old_source = (out / "english" / "source.json").read_bytes()
    rc, err = run(capsys, *prepare_args(out, f"english={corpus}", tok=str(out / "tokenizer.json")))
    assert rc == 0, err
    assert (out / "english" / "source.json").read_bytes() != old_source
    assert snapshot(out / "en") == before_en
    assert json.loads((out / "manifest.json").read_text())["sources"]["english"]["train_documents"] > 0


# --------------------------------------------------------------------------------- data prepare: tokenizer
def test_failed_prepare_leaves_no_tokenizer_that_the_next_prepare_reuses(tmp_path, capsys, monkeypatch):
    a = write_jsonl(tmp_path / "a.jsonl", "body")  # the text is under "body", not "text"
    b = write_jsonl(tmp_path / "b.jsonl", "text", tag="bee ")
    inputs = snapshot(a, b)
    out = tmp_path / "out"
    # every line of a is skipped: refuse up front, rather than train (and keep) a tokenizer on b alone and then fail
    rc, err = run(capsys, *prepare_args(out, f"a={a}", f"b={b}"), "--skip-bad-lines")
    refused(rc, err, "'a'", "--text-field")
    assert "'b'" not in err.splitlines()[-1]
    assert not (out / "tokenizer.json").exists() and not (out / "manifest.json").exists()

    # fixed input: the tokenizer is trained on both sources, exactly as in a fresh folder
    write_jsonl(a, "text")
    inputs = snapshot(a, b)
    assert run(capsys, *prepare_args(out, f"a={a}", f"b={b}"))[0] == 0
    fresh = tmp_path / "fresh"
    assert run(capsys, *prepare_args(fresh, f"a={a}", f"b={b}"))[0] == 0
    assert (out / "tokenizer.json").read_bytes() == (fresh / "tokenizer.json").read_bytes()
    meta = json.loads((out / "tokenizer.meta.json").read_text())
    assert [name for name, _ in meta["trained_on"]["sources"]] == ["a", "b"]
    assert meta["trained_on"]["text_field"] == "text"
    assert snapshot(a, b) == inputs

    # a source that fails after the tokenizer was trained: its tokenizer is left, but is not reused once the
    # input changes (no shards were made with it), and is reused when nothing changed
    import moecpt.data.shards as shards

    real = shards._build_source
    part = tmp_path / "part"

    def failing(out_, name, *rest, **kw):
        if name == "b":
            raise shards.MoecptError("simulated failure of source 'b'")
        return real(out_, name, *rest, **kw)

    monkeypatch.setattr(shards, "_build_source", failing)
    rc, err = run(capsys, *prepare_args(part, f"a={a}", f"b={b}"))
    refused(rc, err, "simulated")
    left = (part / "tokenizer.json").read_bytes()
    monkeypatch.setattr(shards, "_build_source", real)
    write_jsonl(b, "text", n=60, tag="the fixed b ")
    rc, err = run(capsys, *prepare_args(part, f"a={a}", f"b={b}"))
    assert rc == 0, err
    assert (part / "tokenizer.json").read_bytes() != left
    fresh2 = tmp_path / "fresh2"
    assert run(capsys, *prepare_args(fresh2, f"a={a}", f"b={b}"))[0] == 0
    assert (part / "tokenizer.json").read_bytes() == (fresh2 / "tokenizer.json").read_bytes()
    for src in ("a", "b"):  # the shard of a made with the left-over tokenizer was rebuilt too
        for f in ("train.npy", "val.npy"):
            assert (part / src / f).read_bytes() == (fresh2 / src / f).read_bytes()

    # shards exist now: a tokenizer trained on other inputs is refused, not mixed in
    c = write_jsonl(tmp_path / "c.jsonl", "text", tag="sea ")
    before = snapshot(part)
    rc, err = run(capsys, *prepare_args(part, f"c={c}"))
    refused(rc, err, "new --out", str(part / "tokenizer.json"))
    assert snapshot(part) == before


# ---------------------------------------------------------------------------------------- one live process
def test_second_prepare_on_a_folder_in_use_is_refused_naming_the_owner(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus")
    out = tmp_path / "out"
    assert run(capsys, *prepare_args(out, f"english={corpus}"))[0] == 0
    more = write_corpus(tmp_path / "more", tag="horse")
    before = snapshot(out, corpus, more)
    with FolderLock(out, "data prepare"):  # this test process is the first prepare, still running
        res = cli(*prepare_args(out, f"more={more}", tok=str(out / "tokenizer.json")))
    refused(res.returncode, res.stderr, f"pid {os.getpid()}", str(out), "data prepare")
    assert snapshot(out, corpus, more) == before
    # once it is gone, the same command works
    res = cli(*prepare_args(out, f"more={more}", tok=str(out / "tokenizer.json")))
    assert res.returncode == 0, res.stderr
    assert set(json.loads((out / "manifest.json").read_text())["sources"]) == {"english", "more"}


# -------------------------------------------------------------------------------------- read-only / full disk
@pytest.mark.parametrize("command", ["data prepare", "import-hf", "export-hf", "schedule", "study"])
def test_read_only_out_is_one_line(command, readonly_dir, tmp_path, capsys, request):
    hf, ckpt = request.getfixturevalue("hf_model") if command in ("import-hf", "export-hf") else (tmp_path, tmp_path)
    corpus = write_corpus(tmp_path / "corpus")
    recipe = tmp_path / "r.toml"
    recipe.write_text('name = "t"\n[train]\nsteps = 50\n')
    out = readonly_dir / "out"
    argv = {
        "data prepare": prepare_args(out, f"english={corpus}"),
        "import-hf": ["import-hf", hf, "--out", out],
        "export-hf": ["export-hf", ckpt, "--out", out],
        "schedule": ["schedule", "--recipe", recipe, "--out", readonly_dir / "lr.png"],
        "study": ["study", SMOKE_STUDY, "--out", out],
    }[command]
    user = [corpus, recipe] + ([hf, ckpt] if command in ("import-hf", "export-hf") else [])
    before = snapshot(*user)
    rc, err = run(capsys, *argv)
    refused(rc, err, "cannot be written", str(readonly_dir))
    assert snapshot(*user) == before
    assert not any(readonly_dir.iterdir())


def test_prepare_into_a_folder_that_became_read_only_is_one_line(tmp_path, capsys, small_fs):
    corpus = write_corpus(tmp_path / "corpus")
    more = write_corpus(tmp_path / "more", tag="owl")
    root = os.geteuid() == 0  # root ignores permissions: a tmpfs remounted read-only instead
    out = small_fs("1m") if root else tmp_path / "out"
    assert run(capsys, *prepare_args(out, f"english={corpus}"))[0] == 0
    before = snapshot(out, corpus, more)
    if root:
        subprocess.run(["mount", "-o", "remount,ro", str(out)], check=True)
    else:
        out.chmod(0o555)
    try:
        rc, err = run(capsys, *prepare_args(out, f"more={more}", tok=str(out / "tokenizer.json")))
        refused(rc, err, str(out))
        assert snapshot(out, corpus, more) == before
    finally:
        if not root:
            out.chmod(0o755)


def test_full_disk_is_one_line_not_a_crash(tmp_path, small_fs):
    # 150 KB of tokens: the raw token file fits, the memory-mapped train split does not (a sparse memmap on a
    # full disk dies of SIGBUS unless its blocks are reserved first)
    disk = small_fs("200k")
    import random

    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "kilo", "mesu", "bada", "lorem", "ipsum", "dolor", "amet"]
    src = tmp_path / "big.jsonl"
    src.write_text("".join(json.dumps({"text": " ".join(rng.choice(words) + str(rng.randint(0, 99))
                                                        for _ in range(60))}) + "\n" for _ in range(400)))
    before = snapshot(src)
    res = cli(*prepare_args(disk / "out", f"big={src}"))
    refused(res.returncode, res.stderr, "No space left on device", str(disk / "out"))
    assert snapshot(src) == before
    assert not list((disk / "out").glob(".tmp-*"))  # the half-built source is gone


def test_full_disk_import_and_export_are_one_line(hf_model, small_fs, capsys):
    hf, ckpt = hf_model
    disk = small_fs("300k")  # the tiny model's weights are about 650 KB
    before = snapshot(hf, ckpt)
    refused(*run(capsys, "import-hf", hf, "--out", disk / "ck"), "No space left on device")
    refused(*run(capsys, "export-hf", ckpt, "--out", disk / "ex"), "No space left on device", str(disk / "ex"))
    assert not any(disk.iterdir())  # no half folder, no temp folder
    assert snapshot(hf, ckpt) == before


# ------------------------------------------------------------------------------------------- import / export
def test_import_and_export_never_write_into_their_input(hf_model, tmp_path, capsys):
    hf, ckpt = hf_model
    before = snapshot(hf, ckpt)
    refused(*run(capsys, "import-hf", hf, "--out", hf), "is the input", str(hf))
    refused(*run(capsys, "import-hf", hf, "--out", hf / "moecpt"), "lies inside the input", str(hf))
    refused(*run(capsys, "export-hf", ckpt, "--out", ckpt / "hf-export"), "lies inside the input", str(ckpt))
    refused(*run(capsys, "export-hf", ckpt / "meta.json", "--out", ckpt / "x"), "lies inside the input")
    user = tmp_path / "mine"
    user.mkdir()
    (user / "a.txt").write_text("mine\n")
    mine = snapshot(user)
    refused(*run(capsys, "import-hf", hf, "--out", user), "already exists", str(user))
    refused(*run(capsys, "export-hf", ckpt, "--out", user), "already exists", str(user))
    assert snapshot(hf, ckpt) == before and snapshot(user) == mine
    assert not list(tmp_path.glob("*.tmp-*")) and not list(hf.parent.glob("*.tmp-*"))


def test_imported_checkpoint_is_marked_and_still_loads(hf_model, tmp_path, capsys):
    from moecpt.train.checkpoint import load_checkpoint, load_model

    hf, _ = hf_model
    ck = tmp_path / "ck"
    rc, err = run(capsys, "import-hf", hf, "--out", ck)
    assert rc == 0, err
    marker = read_marker(ck)
    assert marker["command"] == "import-hf" and marker["inputs"] == [str(hf.resolve())]
    assert load_checkpoint(ck).step == 0  # the marker is no checkpoint file: loading and verifying ignore it
    load_model(ck)
    ex = tmp_path / "ex"
    rc, err = run(capsys, "export-hf", ck, "--out", ex)
    assert rc == 0, err
    assert read_marker(ex)["command"] == "export-hf"
    again = tmp_path / "again"  # an exported folder (with its marker) imports again
    assert run(capsys, "import-hf", ex, "--out", again)[0] == 0
    assert not (again / "hf" / MARKER_FILE).exists()


# ---------------------------------------------------------------------------------------------------- schedule
def test_schedule_never_overwrites_a_users_file(tmp_path, capsys):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recipe = tmp_path / "r.toml"
    recipe.write_text('name = "t"\n[train]\nsteps = 50\n')
    mine = tmp_path / "holiday.png"  # a real PNG, by matplotlib, not by moecpt
    fig = plt.figure(figsize=(1, 1))
    fig.savefig(mine)
    plt.close(fig)
    notes = tmp_path / "notes.svg"
    notes.write_text("<svg><!-- how I run moecpt schedule: moecpt schedule --out notes.svg --></svg>")
    before = snapshot(mine, notes, recipe)
    refused(*run(capsys, "schedule", "--recipe", recipe, "--out", mine), "not written by moecpt", str(mine))
    refused(*run(capsys, "schedule", "--recipe", recipe, "--out", notes), "not written by moecpt", str(notes))
    png_recipe = tmp_path / "recipe.png"  # --out equal to the recipe
    shutil.copy(recipe, png_recipe)
    before[str(png_recipe)] = hashlib.sha256(png_recipe.read_bytes()).hexdigest()
    refused(*run(capsys, "schedule", "--recipe", png_recipe, "--out", png_recipe), "is the input")
    assert snapshot(mine, notes, recipe, png_recipe) == before
    # its own figures (each format) are replaced, atomically, and carry the signature
    for ext in ("png", "pdf", "svg"):
        fig_path = tmp_path / f"lr.{ext}"
        for _ in range(2):
            rc, err = run(capsys, "schedule", "--recipe", recipe, "--out", fig_path)
            assert rc == 0, err
        assert b"moecpt-schedule-figure" in fig_path.read_bytes()[: 1 << 16]
    assert not list(tmp_path.glob("*.tmp-*"))


# ------------------------------------------------------------------------------------------------------- study
def test_study_out_checks(tmp_path, capsys):
    user = tmp_path / "user"
    user.mkdir()
    (user / "thesis.tex").write_text("\\documentclass{article}\n")
    before = snapshot(user)
    refused(*run(capsys, "study", SMOKE_STUDY, "--out", user), "not empty", str(user))
    assert snapshot(user) == before
    # the prepared data it reads is an input
    corpus = write_corpus(tmp_path / "corpus")
    code = write_corpus(tmp_path / "code", tag="def f(): return")
    data = tmp_path / "data"
    assert run(capsys, *prepare_args(data, f"english={corpus}", f"code={code}"))[0] == 0
    data_before = snapshot(data)
    refused(*run(capsys, "study", SMOKE_STUDY, "--out", data / "study", "--set", f'data.path="{data}"'),
            "lies inside the input", str(data))
    assert snapshot(data) == data_before
    # a folder of another command is not a study folder
    refused(*run(capsys, "study", SMOKE_STUDY, "--out", data), "moecpt data prepare")
    assert snapshot(data) == data_before


# ------------------------------------------------------------------------------------------------ file modes
def test_outputs_are_written_with_the_users_umask(hf_model, tmp_path, capsys):
    hf, _ = hf_model
    corpus = write_corpus(tmp_path / "corpus")
    old = os.umask(0o022)
    try:
        assert run(capsys, *prepare_args(tmp_path / "data", f"english={corpus}"))[0] == 0
        assert run(capsys, "import-hf", hf, "--out", tmp_path / "ck")[0] == 0
        assert run(capsys, "export-hf", tmp_path / "ck", "--out", tmp_path / "ex")[0] == 0
        recipe = tmp_path / "r.toml"
        recipe.write_text('name = "t"\n[train]\nsteps = 50\n')
        assert run(capsys, "schedule", "--recipe", recipe, "--out", tmp_path / "lr.png")[0] == 0
    finally:
        os.umask(old)
    files = [p for d in ("data", "ck", "ex") for p in (tmp_path / d).rglob("*") if p.is_file()]
    files.append(tmp_path / "lr.png")
    assert any(p.name == "model.safetensors" for p in files) and any(p.suffix == ".npy" for p in files)
    modes = {str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
    assert set(modes.values()) == {"0o644"}, modes


# ------------------------------------------------------------------------------- data prepare: rebuilds, damage
def test_prepare_rebuild_never_deletes_a_users_file_inside_a_source_folder(tmp_path, capsys):
    corpus = tmp_path / "c"
    corpus.mkdir()
    write_jsonl(corpus / "a.jsonl", "text")
    out = tmp_path / "d"
    assert run(capsys, *prepare_args(out, f"en={corpus}"))[0] == 0
    (out / "en" / "notes.txt").write_text("notes\n")
    before = snapshot(out, corpus)
    rc, err = run(capsys, *prepare_args(out, f"en={corpus}"), "--seed", "1")  # a rebuild of en
    refused(rc, err, str(out / "en" / "notes.txt"), "move it out")
    assert snapshot(out, corpus) == before
    (out / "en" / "notes.txt").unlink()  # moved out: the same command rebuilds it
    rc, err = run(capsys, *prepare_args(out, f"en={corpus}"), "--seed", "1")
    assert rc == 0, err
    assert json.loads((out / "manifest.json").read_text())["seed"] == 1


@pytest.mark.parametrize("extra, words", [
    (["--seed", "-1"], ["--seed -1", ">= 0"]),
    (["--tokenizer", "train:99999999999"], ["99999999999", "too large"]),
    (["--tokenizer", "train:12"], ["12", "too small"]),
    (["--source", "manifest.json=SRC"], ["'manifest.json'"]),
])
def test_bad_prepare_options_are_refused_before_the_folder_is_made(tmp_path, capsys, extra, words):
    corpus = write_corpus(tmp_path / "corpus")
    extra = [e.replace("SRC", str(corpus)) for e in extra]
    before = snapshot(corpus)
    rc, err = run(capsys, *prepare_args(tmp_path / "d", f"en={corpus}"), *extra)
    refused(rc, err, *words)
    assert not (tmp_path / "d").exists()  # argparse's last --tokenizer wins; nothing claimed
    assert snapshot(corpus) == before


@pytest.fixture()
def prepared(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus", n=80)
    data = tmp_path / "D"
    assert run(capsys, *prepare_args(data, f"english={corpus}"))[0] == 0
    return data


def pretrain_args(data: Path, out: Path) -> list:
    return ["pretrain", "--recipe", REPO / "recipes" / "smoke.toml", "--out", out, "--no-progress",
            "--set", f'data.path="{data}"', "--set", "data.seq_len=16", "--set", "train.steps=2",
            "--set", "train.batch_size=2", "--set", "data.allow_repeat=true", "--set", "train.eval_every=1000"]


def test_damaged_manifest_is_one_line(prepared, capsys):
    mf = prepared / "manifest.json"
    mf.write_text('{"format":"moecpt-prepared","sources":5}')
    before = snapshot(prepared)
    rc, err = run(capsys, "data", "inspect", prepared)
    refused(rc, err, str(mf), "is damaged", "prepare the data again")
    assert snapshot(prepared) == before


@pytest.mark.parametrize("how", ["truncate", "shorter", "out of range", "vocab edited"])
def test_damaged_shards_are_one_line_not_a_crash(prepared, tmp_path, capsys, how):
    import numpy as np

    train = prepared / "english" / "train.npy"
    if how == "truncate":
        os.truncate(train, 1000)
        words = [str(train), "is damaged"]
    elif how == "shorter":  # a valid .npy of another length than the manifest says
        np.save(train, np.load(train)[:-5])
        words = [str(train), "manifest.json says"]
    elif how == "out of range":  # bit-flipped ids
        a = np.load(train, mmap_mode="r+")
        a[:] = 65535
        a.flush()
        del a
        words = ["'english'", "train", "65535", "damaged", "prepare the data again"]
    else:
        mf = prepared / "manifest.json"
        m = json.loads(mf.read_text())
        m["vocab_size"] = 100
        mf.write_text(json.dumps(m))
        words = ["shard of source 'english'", "vocabulary has 100", "damaged", "prepare the data again"]
    before = snapshot(prepared)
    rc, err = run(capsys, *pretrain_args(prepared, tmp_path / "X"))
    refused(rc, err, *words)
    assert snapshot(prepared) == before
