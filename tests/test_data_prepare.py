"""moecpt data prepare: round trip, exact shards, disjoint splits, re-runs, tokenizer mixing, atomicity."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from moecpt.data.prepared import PreparedData
from moecpt.data.shards import prepare
from moecpt.errors import MoecptError

CORPORA = Path(__file__).resolve().parents[2] / "shared" / "corpora"


def cut_corpus(dst: Path, name: str, n: int) -> Path:
    """First ``n`` documents of a corpus (../shared/corpora, else decoded from the bundled demo) as JSON Lines."""
    out = dst / f"{name}.jsonl"
    src = CORPORA / f"{name}.jsonl"
    if src.is_file():
        with open(src, encoding="utf-8") as fh:
            lines = [next(fh) for _ in range(n)]
    else:
        demo = PreparedData.open("demo")
        part = {"en-fortunes": "english", "de-fortunes": "german", "code-python-stdlib": "code"}[name]
        tok, off = demo.train_tokens(part), demo.doc_offsets(part)
        lines = [json.dumps({"text": demo.decode(tok[off[i] : off[i + 1]])}) + "\n" for i in range(n)]
    out.write_text("".join(lines), encoding="utf-8")
    return out


def docs_of(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    return {"en": cut_corpus(d, "en-fortunes", 600), "de": cut_corpus(d, "de-fortunes", 600),
            "code": cut_corpus(d, "code-python-stdlib", 6)}


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("prep") / "data"
    prepare({k: str(v) for k, v in corpus.items()}, out, "train:512", val_fraction=0.1, seed=3, progress=False)
    return PreparedData.open(out)


def _split_docs(data: PreparedData, name: str, split: str) -> list[np.ndarray]:
    tokens = data.train_tokens(name) if split == "train" else data.val_tokens(name)
    off = data.doc_offsets(name, split)
    return [np.asarray(tokens[off[i] : off[i + 1]]) for i in range(len(off) - 1)]


def test_roundtrip_encode_decode(prepared, corpus):
    docs = docs_of(corpus["de"])[:50] + docs_of(corpus["code"])[:2] + ["émoji 🦜 \t\n  spaces  ", "\x00ctl"]
    for doc in docs:
        assert prepared.decode(prepared.encode(doc)) == doc


def test_shards_hold_exactly_the_documents(prepared, corpus):
    assert prepared.dtype == "uint16" and prepared.train_tokens("en").dtype == np.uint16
    for name, path in corpus.items():
        want = {tuple(prepared.encode(d)) + (prepared.eod_id,) for d in docs_of(path)}
        got = _split_docs(prepared, name, "train") + _split_docs(prepared, name, "val")
        assert len(got) == len(docs_of(path))
        assert {tuple(g.tolist()) for g in got} == want
        for g in got:  # eod only at the end of each document
            assert g[-1] == prepared.eod_id and prepared.eod_id not in g[:-1]
        s = prepared.summary()["sources"][name]
        assert s["train_tokens"] == len(prepared.train_tokens(name))
        assert s["val_tokens"] == len(prepared.val_tokens(name))
        assert s["train_documents"] + s["val_documents"] == len(got)


def test_no_val_document_in_train(prepared, corpus):
    from collections import Counter

    for name in prepared.source_names:
        original = Counter(tuple(prepared.encode(d)) + (prepared.eod_id,) for d in docs_of(corpus[name]))
        train = Counter(tuple(d.tolist()) for d in _split_docs(prepared, name, "train"))
        val = Counter(tuple(d.tolist()) for d in _split_docs(prepared, name, "val"))
        assert val, name
        assert train + val == original  # every document exactly once, in one split
        unique = {d for d, c in original.items() if c == 1}  # (corpora hold a few duplicate texts)
        assert not (set(train) & set(val) & unique)
    en = prepared.summary()["sources"]["en"]
    assert 0.08 <= en["val_tokens"] / (en["train_tokens"] + en["val_tokens"]) <= 0.2


def test_manifest_fields(prepared):
    m = json.loads((prepared.path / "manifest.json").read_text())
    for key in ("vocab_size", "tokenizer_sha256", "eod_id", "dtype"):
        assert key in m
    import hashlib

    assert m["tokenizer_sha256"] == hashlib.sha256((prepared.path / "tokenizer.json").read_bytes()).hexdigest()
    for s in m["sources"].values():
        assert {"train_tokens", "val_tokens", "train_documents", "val_documents", "files"} <= set(s)


def test_deterministic_and_rerun_skips(corpus, tmp_path, prepared):
    srcs = {k: str(v) for k, v in corpus.items()}
    a, b = tmp_path / "a", tmp_path / "b"
    prepare(srcs, a, str(prepared.path / "tokenizer.json"), val_fraction=0.1, seed=3, progress=False)
    prepare(srcs, b, str(prepared.path), val_fraction=0.1, seed=3, progress=False)
    for name in srcs:
        for f in ("train.npy", "val.npy", "train_idx.npy", "val_idx.npy"):
            assert (a / name / f).read_bytes() == (b / name / f).read_bytes() == (prepared.path / name / f).read_bytes()
    mtime = (a / "en" / "train.npy").stat().st_mtime_ns
    prepare(srcs, a, str(prepared.path / "tokenizer.json"), val_fraction=0.1, seed=3, progress=False)
    assert (a / "en" / "train.npy").stat().st_mtime_ns == mtime  # skipped, not rewritten


def test_other_tokenizer_is_refused(corpus, tmp_path, prepared):
    out = tmp_path / "p"
    prepare({"en": str(corpus["en"])}, out, str(prepared.path), val_fraction=0.1, progress=False)
    before = (out / "manifest.json").read_bytes()
    with pytest.raises(MoecptError, match="another tokenizer.*new --out"):
        prepare({"de": str(corpus["de"])}, out, "train:300", progress=False)
    with pytest.raises(MoecptError, match="another tokenizer.*new --out"):
        prepare({"de": str(corpus["de"])}, out, str(_demo_tokenizer(tmp_path)), progress=False)
    assert (out / "manifest.json").read_bytes() == before


def _demo_tokenizer(tmp_path: Path) -> Path:
    from moecpt.data.tokenizer import tokenizer_bytes, train_bpe

    p = tmp_path / "other.json"
    p.write_bytes(tokenizer_bytes(train_bpe(["some other text for another tokenizer"] * 20, 280)))
    return p


def test_interrupted_prepare_leaves_no_complete_folder(corpus, tmp_path, monkeypatch, prepared):
    import moecpt.data.shards as shards

    out = tmp_path / "p"
    calls = {"n": 0}
    real = shards._write_split

    def boom(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # second source, mid-way
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(shards, "_write_split", boom)
    with pytest.raises(KeyboardInterrupt):
        prepare({"en": str(corpus["en"]), "de": str(corpus["de"])}, out, str(prepared.path), progress=False)
    assert not (out / "manifest.json").exists()
    assert not (out / "de").exists() and not list(out.glob(".tmp-*"))
    with pytest.raises(MoecptError, match="no manifest.json"):  # moecpt's own, unfinished folder
        PreparedData.open(out)
    monkeypatch.setattr(shards, "_write_split", real)
    prepare({"en": str(corpus["en"]), "de": str(corpus["de"])}, out, str(prepared.path), progress=False)
    assert PreparedData.open(out).source_names == ["en", "de"]


def test_open_missing(tmp_path):
    with pytest.raises(MoecptError, match="does not exist"):
        PreparedData.open(tmp_path / "nope")
    with pytest.raises(MoecptError, match="unknown data source 'xx'"):
        PreparedData.open("demo").train_tokens("xx")
