"""``moecpt data prepare``: tokenize sources into memory-mapped token shards with a document index.

Layout of a prepared folder (``manifest.json`` is written last; a folder without it is not prepared)::

    manifest.json            vocab_size, tokenizer_sha256, eod_id, dtype, per-source counts and files
    tokenizer.json           the tokenizer every shard was made with (sha256 of these bytes = tokenizer_sha256)
    <source>/train.npy       1-D uint16 (vocab <= 65536) or uint32 tokens; every document followed by eod_id
    <source>/train_idx.npy   int64 [documents + 1] token offsets of the documents in train.npy
    <source>/val.npy, val_idx.npy   the held-out documents, same format
    <source>/source.json     counts + the fingerprint of the inputs; written last inside the source folder

Each source is built in a temporary folder and renamed into place, and every file is written to a temporary name
and renamed (atomic on POSIX), so an interrupted prepare leaves nothing that looks complete; re-running skips
sources whose fingerprint (input files, sizes, mtimes, options, tokenizer hash) is unchanged.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import uuid
import warnings
import zlib
from collections.abc import Iterator
from itertools import chain, repeat
from pathlib import Path
from typing import Any

from moecpt.errors import MoecptError
from moecpt.train.atomic import pid_alive, write_bytes_atomic, write_json_atomic

MANIFEST = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
FORMAT = "moecpt-prepared"
FORMAT_VERSION = 1
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_ENCODE_CHARS = 4_000_000  # characters per encode_batch call: big enough to keep every core busy
_ENCODE_DOCS = 20_000
_SPLIT_CHUNK = 1 << 26  # tokens gathered per numpy step when splitting train/val (bounded memory)


# ----------------------------------------------------------------------------------------------- atomic helpers
def token_dtype(vocab_size: int) -> str:
    """``"uint16"`` when every id fits in 16 bits, else ``"uint32"``."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def _clean_stale_tmp(out: Path) -> None:
    # Temporary folders of a killed prepare: remove them unless their process still runs.
    for p in out.glob(".tmp-*"):
        m = re.match(r"\.tmp-.*-(\d+)-[0-9a-f]+$", p.name)
        if m and not pid_alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True)


# -------------------------------------------------------------------------------------------------- tokenizer
def _setup_tokenizer(
    out: Path, spec: str, sources: dict[str, list[tuple[str, str]]], text_field: str, skip_bad_lines: bool,
    sample_chars: int,
):
    """Return ``(tokenizer, eod_id, sha256)``, training or loading it, and save it to ``out/tokenizer.json``.

    Raises:
        MoecptError: ``out`` already holds a tokenizer that differs from the one asked for.
    """
    from moecpt.data.readers import ReadStats, iter_documents
    from moecpt.data.tokenizer import (
        ensure_eod, load_tokenizer, sample_texts, sha256_bytes, tokenizer_bytes, train_bpe,
    )
    from tokenizers import Tokenizer

    tok_path = out / TOKENIZER_FILE
    meta_path = out / "tokenizer.meta.json"
    existing = tok_path.read_bytes() if tok_path.is_file() else None
    existing_meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    other = (
        f"{out} was prepared with another tokenizer ({{why}}); use a new --out folder "
        "(shards of two tokenizers must never be mixed)"
    )

    if spec.startswith("train:"):
        try:
            vocab = int(spec.split(":", 1)[1])
        except ValueError:
            raise MoecptError(f"--tokenizer {spec!r}: expected train:VOCAB_SIZE (e.g. train:4096) or a path") from None
        if existing is not None:
            if existing_meta.get("spec") != spec:
                raise MoecptError(other.format(why=f"{existing_meta.get('spec', 'unknown')}, not {spec}"))
            tok = Tokenizer.from_str(existing.decode("utf-8"))
            return tok, ensure_eod(tok), sha256_bytes(existing)
        iters = [iter_documents(files, text_field, ReadStats(), skip_bad_lines) for files in sources.values()]
        print(f"moecpt: training a byte-level BPE tokenizer (vocab {vocab}) on up to "
              f"{sample_chars / 1e6:.0f} M characters", file=sys.stderr)
        tok = train_bpe(sample_texts(iters, sample_chars), vocab)
    else:
        tok, _ = load_tokenizer(spec)
    eod = ensure_eod(tok)
    data = tokenizer_bytes(tok)
    sha = sha256_bytes(data)
    if existing is not None and sha256_bytes(existing) != sha:
        raise MoecptError(other.format(why=f"sha256 {sha256_bytes(existing)[:12]}, not {sha[:12]}"))
    if existing is None:
        write_bytes_atomic(tok_path, data)
        write_json_atomic(meta_path, {"spec": spec, "sha256": sha})
    return tok, eod, sha


# ------------------------------------------------------------------------------------------------ tokenizing
def _batched(docs: Iterator[str]) -> Iterator[list[str]]:
    batch: list[str] = []
    chars = 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc)
        if chars >= _ENCODE_CHARS or len(batch) >= _ENCODE_DOCS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _tokenize_to_file(tok, eod: int, docs: Iterator[str], path: Path, dtype: str, name: str, progress: bool):
    """Append every document's ids + eod to ``path``; return the int64 array of document lengths (incl. eod)."""
    import numpy as np
    from tqdm import tqdm

    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # _fast skips offsets: same ids, quicker
    lengths: list[np.ndarray] = []
    bar = tqdm(desc=f"tokenizing {name}", unit=" docs", disable=not progress, file=sys.stderr, mininterval=0.5)
    ntok = 0
    with open(path, "wb") as fh:
        for batch in _batched(docs):
            encs = encode(batch, add_special_tokens=False)
            ids = [e.ids for e in encs]
            lens = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
            # ids0, eod, ids1, eod, ... flattened at C speed (no per-document numpy arrays).
            stream = chain.from_iterable(chain.from_iterable(zip(ids, repeat((eod,)))))
            flat = np.fromiter(stream, dtype=dtype, count=int(lens.sum()))
            fh.write(flat.tobytes())
            lengths.append(lens)
            ntok += len(flat)
            bar.update(len(batch))
            bar.set_postfix(tokens=f"{ntok:,}")
    bar.close()
    return np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)


def choose_val_documents(
    lengths, val_fraction: float, seed: int, name: str, min_val_documents: int = 1, min_val_tokens: int = 4096
):
    """Boolean mask [documents] of the held-out documents of one source.

    Documents are taken in a permutation seeded by (seed, source name) until the held-out tokens reach
    ``max(val_fraction * total, min_val_tokens)`` (capped at half the source) and at least ``min_val_documents``
    documents; at least one document always stays in train. Whole documents only, so no document is in both.
    """
    import numpy as np

    n = len(lengths)
    mask = np.zeros(n, dtype=bool)
    if val_fraction <= 0 or n < 2:
        return mask
    total = int(lengths.sum())
    target = min(max(math.ceil(val_fraction * total), min_val_tokens), total // 2)
    rng = np.random.default_rng([seed, zlib.crc32(name.encode("utf-8"))])
    perm = rng.permutation(n)
    csum = np.cumsum(lengths[perm])
    k = int(np.searchsorted(csum, target)) + 1
    k = min(max(k, min_val_documents), n - 1)
    mask[perm[:k]] = True
    return mask


def _write_split(all_tokens, offsets, lengths, sel, dst_dir: Path, split: str, dtype: str) -> tuple[int, int]:
    """Gather the documents ``sel`` (in original order) into ``<split>.npy`` + ``<split>_idx.npy``."""
    import numpy as np

    docs = np.flatnonzero(sel)
    sel_len = lengths[docs]
    idx = np.zeros(len(docs) + 1, dtype=np.int64)
    np.cumsum(sel_len, out=idx[1:])
    total = int(idx[-1])
    tmp = dst_dir / f"{split}.npy"
    arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(total,))
    # Process documents in chunks of about _SPLIT_CHUNK tokens; each chunk is one vectorised gather.
    start_doc = 0
    while start_doc < len(docs):
        end_doc = int(np.searchsorted(idx, idx[start_doc] + _SPLIT_CHUNK, side="right"))
        end_doc = max(end_doc - 1, start_doc + 1)
        d = docs[start_doc:end_doc]
        ln = lengths[d]
        shift = np.repeat(offsets[d] - idx[start_doc:end_doc], ln)
        pos = np.arange(idx[start_doc], idx[end_doc], dtype=np.int64)
        arr[idx[start_doc] : idx[end_doc]] = all_tokens[pos + shift]
        start_doc = end_doc
    arr.flush()
    del arr
    np.save(dst_dir / f"{split}_idx.npy", idx)
    return total, len(docs)


def _fingerprint(files: list[tuple[str, str]], **opts: Any) -> dict[str, Any]:
    entries = []
    for kind, loc in files:
        p = Path(loc)
        if kind != "hf-hub" and p.exists():
            st = p.stat()
            entries.append([kind, str(p.resolve()), st.st_size, st.st_mtime_ns])
        else:
            entries.append([kind, loc, None, None])
    return {"files": entries, **opts}


def _build_source(
    out: Path, name: str, files: list[tuple[str, str]], tok, eod: int, dtype: str, fingerprint: dict[str, Any],
    text_field: str, val_fraction: float, seed: int, min_val_documents: int, min_val_tokens: int,
    skip_bad_lines: bool, progress: bool,
) -> dict[str, Any]:
    import numpy as np

    from moecpt.data.readers import ReadStats, iter_documents

    tmp = out / f".tmp-{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        stats = ReadStats()
        docs = iter_documents(files, text_field, stats, skip_bad_lines)
        raw = tmp / "all.bin"
        lengths = _tokenize_to_file(tok, eod, docs, raw, dtype, name, progress)
        if len(lengths) == 0:
            raise MoecptError(
                f"source {name!r} has no documents (empty files or empty text fields); check its path and --text-field"
            )
        all_tokens = np.memmap(raw, dtype=dtype, mode="r")
        offsets = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1], out=offsets[1:])
        val_mask = choose_val_documents(lengths, val_fraction, seed, name, min_val_documents, min_val_tokens)
        train_tokens, train_docs = _write_split(all_tokens, offsets, lengths, ~val_mask, tmp, "train", dtype)
        val_tokens, val_docs = _write_split(all_tokens, offsets, lengths, val_mask, tmp, "val", dtype)
        del all_tokens
        raw.unlink()
        if stats.replaced_bytes:
            warnings.warn(
                f"source {name!r}: {stats.replaced_bytes} invalid UTF-8 byte sequences were replaced by U+FFFD",
                stacklevel=2,
            )
        if stats.bad_lines:
            warnings.warn(
                f"source {name!r}: skipped {stats.bad_lines} bad JSON Lines lines (first: "
                f"{', '.join(stats.first_bad)})",
                stacklevel=2,
            )
        if val_docs == 0 and val_fraction > 0:
            warnings.warn(f"source {name!r} has a single document: no held-out split", stacklevel=2)
        info = {
            "train_tokens": train_tokens,
            "val_tokens": val_tokens,
            "train_documents": train_docs,
            "val_documents": val_docs,
            "files": [loc for _, loc in files],
            "replaced_utf8_sequences": stats.replaced_bytes,
            "skipped_bad_lines": stats.bad_lines,
            "skipped_empty_documents": stats.empty_documents,
        }
        write_json_atomic(tmp / "source.json", {**info, "fingerprint": fingerprint})
        final = out / name
        if final.exists():  # an outdated build of this source: swap it out, then delete
            trash = out / f".tmp-old-{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            os.rename(final, trash)
            os.rename(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, final)
        return info
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def prepare(
    sources: dict[str, str],
    out: str | Path,
    tokenizer: str = "train:4096",
    text_field: str = "text",
    val_fraction: float = 0.05,
    seed: int = 0,
    workers: int | None = None,
    skip_bad_lines: bool = False,
    min_val_documents: int = 1,
    min_val_tokens: int = 4096,
    tokenizer_sample_chars: int = 200_000_000,
    progress: bool = True,
) -> dict[str, Any]:
    """Tokenize ``sources`` (name -> path/glob/``hf:`` spec) into a prepared folder ``out``; return its manifest.

    Args:
        tokenizer: ``"train:VOCAB_SIZE"`` (byte-level BPE trained on an equal-per-source sample of up to
            ``tokenizer_sample_chars`` characters) or a path to a ``tokenizer.json`` / tokenizer folder.
        val_fraction: held-out share of each source's tokens, by whole documents (see
            :func:`choose_val_documents`); 0 = no validation split.
        workers: threads for batch encoding (sets ``RAYON_NUM_THREADS`` before the tokenizer's thread pool starts);
            None = all cores.

    Deterministic: the same inputs and options give byte-identical shards.

    Raises:
        MoecptError: a missing path, an empty source, a bad JSON line (without ``skip_bad_lines``), a bad source
            name, or ``out`` prepared with another tokenizer.
    """
    from moecpt.data.readers import resolve_files

    if workers is not None:
        if workers < 1:
            raise MoecptError(f"--workers {workers} must be >= 1")
        os.environ.setdefault("RAYON_NUM_THREADS", str(workers))
        if workers == 1:
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if not sources:
        raise MoecptError("no --source given; add --source NAME=PATH")
    if not 0 <= val_fraction < 1:
        raise MoecptError(f"--val-fraction {val_fraction} must be in [0, 1)")
    for name in sources:
        if not _NAME_RE.match(name):
            raise MoecptError(f"source name {name!r} is not allowed; use letters, digits, '_', '-', '.'")
    # Resolve every path before writing anything: a typo must not leave a half folder behind.
    resolved = {name: resolve_files(spec) for name, spec in sources.items()}

    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise MoecptError(f"--out {out} is a file; give a folder")
    out.mkdir(parents=True, exist_ok=True)
    _clean_stale_tmp(out)
    tok, eod, sha = _setup_tokenizer(
        out, tokenizer, resolved, text_field, skip_bad_lines, tokenizer_sample_chars
    )
    vocab = tok.get_vocab_size(with_added_tokens=True)
    dtype = token_dtype(vocab)

    old_manifest: dict[str, Any] = {}
    if (out / MANIFEST).is_file():
        old_manifest = json.loads((out / MANIFEST).read_text())
        if old_manifest.get("tokenizer_sha256") != sha:  # tokenizer.json replaced by hand
            raise MoecptError(f"{out} holds shards of another tokenizer; use a new --out folder")

    infos: dict[str, Any] = {}
    for name, files in resolved.items():
        fp = _fingerprint(
            files, text_field=text_field, val_fraction=val_fraction, seed=seed, tokenizer_sha256=sha,
            skip_bad_lines=skip_bad_lines, min_val_documents=min_val_documents, min_val_tokens=min_val_tokens,
            format_version=FORMAT_VERSION,
        )
        done = out / name / "source.json"
        if done.is_file():
            prev = json.loads(done.read_text())
            if prev.get("fingerprint") == fp:
                if progress:
                    print(f"moecpt: source {name!r} is already prepared; skipped", file=sys.stderr)
                infos[name] = {k: v for k, v in prev.items() if k != "fingerprint"}
                continue
            if prev.get("fingerprint", {}).get("tokenizer_sha256") not in (None, sha):
                raise MoecptError(f"{out / name} was made with another tokenizer; use a new --out folder")
        infos[name] = _build_source(
            out, name, files, tok, eod, dtype, fp, text_field, val_fraction, seed, min_val_documents,
            min_val_tokens, skip_bad_lines, progress,
        )

    # Sources prepared by earlier runs into this folder stay listed (same tokenizer, checked above).
    all_sources = {
        k: v
        for k, v in old_manifest.get("sources", {}).items()
        if k not in infos and (out / k / "source.json").is_file()
    }
    all_sources.update(infos)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "vocab_size": vocab,
        "tokenizer_sha256": sha,
        "eod_id": eod,
        "dtype": dtype,
        "tokenizer": TOKENIZER_FILE,
        "tokenizer_spec": tokenizer,
        "seed": seed,
        "val_fraction": val_fraction,
        "sources": all_sources,
    }
    write_json_atomic(out / MANIFEST, manifest)
    return manifest
