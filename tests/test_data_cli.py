"""`moecpt data prepare` / `moecpt data inspect` through the CLI, and the bundled demo data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from moecpt.cli import main
from moecpt.data.prepared import PreparedData

REPO = Path(__file__).resolve().parents[1]


def _inspect_json(path, capsys) -> dict:
    assert main(["data", "inspect", str(path), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _check_schema(summary: dict) -> None:
    assert isinstance(summary["vocab_size"], int)
    assert isinstance(summary["tokenizer_sha256"], str) and len(summary["tokenizer_sha256"]) == 64
    assert summary["sources"]
    for s in summary["sources"].values():
        assert set(s) == {"train_tokens", "val_tokens", "train_documents", "val_documents"}
        assert all(isinstance(v, int) and v >= 0 for v in s.values())


def test_inspect_demo_json(capsys):
    summary = _inspect_json("demo", capsys)
    _check_schema(summary)
    assert summary["vocab_size"] == 4096 and summary["dtype"] == "uint16"
    src = summary["sources"]
    assert set(src) == {"english", "code", "german"}
    tot = {n: s["train_tokens"] + s["val_tokens"] for n, s in src.items()}
    assert 10.0e6 < tot["english"] < 11.5e6 and 3.0e6 < tot["code"] < 3.5e6 and 3.0e6 < tot["german"] < 3.5e6
    train = {n: s["train_tokens"] for n, s in src.items()}  # a CPU study must never repeat data
    assert train["english"] >= 10_000_000 and train["code"] >= 3_000_000 and train["german"] >= 3_000_000
    assert main(["data", "inspect", "demo"]) == 0
    assert "english" in capsys.readouterr().out


def test_prepare_cli_and_errors(tmp_path, capsys):
    f = tmp_path / "a.jsonl"
    f.write_text("".join(json.dumps({"t": f"document number {i} " * (i % 7 + 1)}) + "\n" for i in range(200)))
    out = tmp_path / "out"
    demo_tok = str(PreparedData.open("demo").path / "tokenizer.json")
    rc = main(["data", "prepare", "--source", f"docs={f}", "--text-field", "t", "--tokenizer", demo_tok,
               "--out", str(out), "--val-fraction", "0.1", "--seed", "1", "--workers", "1", "--quiet"])
    assert rc == 0
    capsys.readouterr()
    summary = _inspect_json(out, capsys)
    _check_schema(summary)
    assert summary["sources"]["docs"]["train_documents"] + summary["sources"]["docs"]["val_documents"] == 200
    # Errors: one line on stderr, exit status 2, nothing damaged.
    before = (out / "manifest.json").read_bytes()
    assert main(["data", "prepare", "--source", f"x={tmp_path / 'missing'}", "--tokenizer", demo_tok,
                 "--out", str(out)]) == 2
    assert main(["data", "prepare", "--source", f"docs={f}", "--text-field", "t", "--tokenizer", "train:300",
                 "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(e.startswith("moecpt: error: ") for e in err)
    assert "does not exist" in err[0] and "new --out" in err[1]
    assert (out / "manifest.json").read_bytes() == before
    assert main(["data", "inspect", str(tmp_path / "nothing")]) == 2


def test_demo_cache_race_and_reuse(tmp_path):
    # Two fresh processes unpack the demo into an empty cache at the same time: both succeed, one folder.
    env = {**os.environ, "MOECPT_CACHE": str(tmp_path / "cache")}
    code = ("from moecpt.data.prepared import PreparedData as P; d = P.open('demo'); "
            "print(d.path, len(d.train_tokens('code')))")
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, cwd=REPO, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert outs[0] == outs[1]
    entries = list((tmp_path / "cache").iterdir())
    assert len(entries) == 1 and entries[0].name.startswith("demo-")
