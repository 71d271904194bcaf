"""Readers and bad input: text/JSONL/Parquet/globs, missing path, empty source, bad JSON, non-UTF-8, datasets."""

from __future__ import annotations

import builtins
import json
from pathlib import Path

import pytest

from moecpt.data.prepared import PreparedData
from moecpt.data.readers import ReadStats, iter_documents, resolve_files
from moecpt.data.shards import prepare
from moecpt.errors import MoecptError


@pytest.fixture(scope="module")
def tok_dir():
    # The bundled tokenizer: no training in these tests (fast).
    return str(PreparedData.open("demo").path)


def _docs(spec: str, **kw) -> list[str]:
    return list(iter_documents(resolve_files(spec), **kw))


def test_plain_text_folder_glob_jsonl_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "b.txt").write_text("second doc\n")
    (tmp_path / "txt" / "a.txt").write_text("first doc\n\nstill first\n")
    assert _docs(str(tmp_path / "txt")) == ["first doc\n\nstill first\n", "second doc\n"]
    assert _docs(str(tmp_path / "txt" / "*.txt")) == _docs(str(tmp_path / "txt"))
    (tmp_path / "d.jsonl").write_text(json.dumps({"body": "x y"}) + "\n\n" + json.dumps({"body": "z"}) + "\n")
    assert _docs(str(tmp_path / "d.jsonl"), text_field="body") == ["x y", "z"]
    pq.write_table(pa.table({"content": ["p1", None, "p2"]}), tmp_path / "d.parquet")
    assert _docs(str(tmp_path / "d.parquet"), text_field="content") == ["p1", "p2"]
    with pytest.raises(MoecptError, match="no column 'text'.*--text-field"):
        _docs(str(tmp_path / "d.parquet"))


def test_missing_path_and_empty_glob(tmp_path, tok_dir):
    with pytest.raises(MoecptError, match="does not exist"):
        prepare({"a": str(tmp_path / "missing.jsonl")}, tmp_path / "out", tok_dir, progress=False)
    assert not (tmp_path / "out").exists()  # nothing written for a typo
    with pytest.raises(MoecptError, match="matches no file"):
        resolve_files(str(tmp_path / "*.nothing"))


def test_empty_source(tmp_path, tok_dir):
    (tmp_path / "e.jsonl").write_text(json.dumps({"text": ""}) + "\n\n")
    with pytest.raises(MoecptError, match="source 'e' has no documents"):
        prepare({"e": str(tmp_path / "e.jsonl")}, tmp_path / "out", tok_dir, progress=False)
    assert not (tmp_path / "out" / "manifest.json").exists() and not (tmp_path / "out" / "e").exists()


def test_bad_json_line(tmp_path, tok_dir):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps({"text": "good one"}) + "\n{not json\n" + json.dumps({"text": "good two"}) + "\n"
                 + json.dumps({"other": 1}) + "\n")
    with pytest.raises(MoecptError, match=r"bad\.jsonl:2 is not valid JSON.*--skip-bad-lines") as exc:
        prepare({"b": str(f)}, tmp_path / "out", tok_dir, progress=False)
    assert "\n" not in str(exc.value)
    with pytest.warns(UserWarning, match="skipped 2 bad JSON Lines lines"):
        m = prepare({"b": str(f)}, tmp_path / "out", tok_dir, skip_bad_lines=True, progress=False)
    s = m["sources"]["b"]
    assert s["skipped_bad_lines"] == 2 and s["train_documents"] + s["val_documents"] == 2


def test_non_utf8_is_replaced_and_counted(tmp_path, tok_dir):
    f = tmp_path / "latin1.jsonl"
    f.write_bytes(b'{"text": "caf\xe9 au lait"}\n{"text": "ok \xff\xfe twice"}\n{"text": "fine"}\n')
    stats = ReadStats()
    docs = list(iter_documents(resolve_files(str(f)), stats=stats))
    assert docs[0] == "caf\ufffd au lait" and stats.replaced_bytes == 3
    with pytest.warns(UserWarning, match="3 invalid UTF-8 byte sequences"):
        m = prepare({"l": str(f)}, tmp_path / "out", tok_dir, progress=False)
    assert m["sources"]["l"]["replaced_utf8_sequences"] == 3


def test_datasets_missing_gives_install_hint(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *a, **k):
        if name == "datasets" or name.startswith("datasets."):
            raise ImportError("no datasets")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    d = tmp_path / "hfds"
    d.mkdir()
    (d / "state.json").write_text("{}")
    with pytest.raises(MoecptError, match="pip install datasets"):
        _docs(str(d))
    with pytest.raises(MoecptError, match="pip install datasets"):
        _docs("hf:wikitext:wikitext-2-raw-v1")


def test_bad_source_name(tmp_path, tok_dir):
    with pytest.raises(MoecptError, match="source name"):
        prepare({"../x": str(Path(__file__))}, tmp_path / "out", tok_dir, progress=False)
