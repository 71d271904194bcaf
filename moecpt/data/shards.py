"""``moecpt data prepare``: tokenize sources into memory-mapped token shards with a document index.

Layout of a prepared folder (``manifest.json`` is written last; a folder without it is not prepared)::

    manifest.json            vocab_size, tokenizer_sha256, eod_id, dtype, per-source counts and files
    tokenizer.json           the tokenizer every shard was made with (sha256 of these bytes = tokenizer_sha256)
    <source>/train.npy       1-D uint16 (vocab <= 65536) or uint32 tokens; every document followed by eod_id
    <source>/train_idx.npy   int64 [documents + 1] token offsets of the documents in train.npy
    <source>/val.npy, val_idx.npy   the held-out documents, same format
    <source>/source.json     counts + the fingerprint of the inputs; written last inside the source folder
    tokenizer.meta.json      the tokenizer spec, its sha256 and, for a trained one, what it was trained on
    .moecpt-output.json      the marker of a folder made by ``moecpt data prepare`` (:mod:`moecpt.storage.outputs`)
    .moecpt.lock             held (``flock``) by the one prepare writing the folder

Each source is built in a temporary folder and renamed into place, and every file is written to a temporary name
and renamed (atomic on POSIX), so an interrupted prepare leaves nothing that looks complete; re-running skips
sources whose fingerprint (input files, sizes, mtimes, options, tokenizer hash) is unchanged.

What a prepare may replace: ``--out`` is claimed first (:func:`moecpt.storage.outputs.claim_folder`: never an
input, never inside or around one, never a non-empty folder moecpt did not make), and inside it only a source folder
holding moecpt's ``source.json`` is ever replaced; anything else under a source's name is refused.
"""

from __future__ import annotations

import errno
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

import numpy as np
from tokenizers import Tokenizer
from tqdm import tqdm

from moecpt.data.readers import HF_PREFIX, ReadStats, iter_documents, resolve_files
from moecpt.data.tokenizer import (
    check_vocab_size,
    ensure_eod,
    load_tokenizer,
    sample_texts,
    sha256_bytes,
    tokenizer_bytes,
    train_bpe,
)
from moecpt.errors import MoecptError
from moecpt.storage.atomic import pid_alive, write_bytes_atomic, write_json_atomic
from moecpt.storage.lock import FolderLock
from moecpt.storage.outputs import claim_folder, os_error_line, owns

MANIFEST = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_META = "tokenizer.meta.json"
SOURCE_FILE = "source.json"
COMMAND = "data prepare"
#: names of moecpt's own files in a prepared folder: no source may be called so
_RESERVED = frozenset({MANIFEST, TOKENIZER_FILE, TOKENIZER_META})
FORMAT = "moecpt-prepared"
FORMAT_VERSION = 1
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_ENCODE_CHARS = 4_000_000  # characters per encode_batch call: big enough to keep every core busy
_ENCODE_DOCS = 20_000
_SPLIT_CHUNK = 1 << 26  # tokens gathered per numpy step when splitting train/val (bounded memory)
#: every file :func:`_build_source` leaves in a source folder; a source folder holding anything else is not replaced
_SOURCE_FILES = frozenset({"train.npy", "train_idx.npy", "val.npy", "val_idx.npy", SOURCE_FILE})


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


def _read_json(path: Path) -> Any:
    """The JSON in ``path``, or ``None`` when it is missing, unreadable or not JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def is_prepared_folder(path: str | Path) -> bool:
    """Whether ``path`` holds a ``manifest.json`` written by ``moecpt data prepare`` (format ``moecpt-prepared``):
    the proof that a folder made before output markers existed is moecpt's."""
    raw = _read_json(Path(path) / MANIFEST)
    return isinstance(raw, dict) and raw.get("format") == FORMAT


def _is_source_folder(path: Path) -> bool:
    """Whether ``path`` is a source folder moecpt built: a real folder (not a link) whose ``source.json`` has the
    counts and the fingerprint :func:`prepare` writes. Only such a folder is ever replaced."""
    if path.is_symlink() or not path.is_dir():
        return False
    raw = _read_json(path / SOURCE_FILE)
    return (isinstance(raw, dict) and isinstance(raw.get("fingerprint"), dict)
            and "format_version" in raw["fingerprint"] and "tokenizer_sha256" in raw["fingerprint"]
            and isinstance(raw.get("train_tokens"), int))


def _preallocate(path: Path) -> None:
    """Reserve the disk blocks of a just-created (sparse) memory-mapped file, so that a full disk is an
    ``ENOSPC`` error here rather than a ``SIGBUS`` crash while writing through the mapping."""
    if not hasattr(os, "posix_fallocate"):
        return
    fd = os.open(path, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        if size:
            os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise
        # EOPNOTSUPP / EINVAL: a file system without fallocate; the writes proceed as before
    finally:
        os.close(fd)


def _os_error(exc: OSError, out: Path) -> str:
    """One line for an OSError of a prepare: a failed write under ``out``, else a failed read of an input."""
    where = Path(exc.filename) if exc.filename else out
    try:
        inside = where.resolve(strict=False).is_relative_to(out.resolve(strict=False))
    except (OSError, ValueError):
        inside = True
    return os_error_line(exc, where, "write" if inside else "read")


# -------------------------------------------------------------------------------------------------- tokenizer
def _trained_on(
    sources: dict[str, list[tuple[str, str]]], text_field: str, skip_bad_lines: bool, sample_chars: int,
) -> dict[str, Any]:
    """What a trained tokenizer is a function of: the inputs (in order, with sizes and mtimes) and the options
    that shape its sample. Recorded in ``tokenizer.meta.json``; a trained tokenizer is reused only when it matches."""
    record = {
        "sources": [[name, _fingerprint(files)["files"]] for name, files in sources.items()],
        "text_field": text_field, "skip_bad_lines": skip_bad_lines, "sample_chars": sample_chars,
    }
    return json.loads(json.dumps(record))  # the form it has when read back


def _sources_without_text(sources: dict[str, list[tuple[str, str]]], text_field: str, skip_bad_lines: bool):
    """Names of the sources that yield no document at all (reads up to the first document of each)."""
    empty = []
    for name, files in sources.items():
        docs = iter_documents(files, text_field, ReadStats(), skip_bad_lines)
        try:
            if next(docs, None) is None:
                empty.append(name)
        finally:
            docs.close()
    return empty


def _setup_tokenizer(
    out: Path, spec: str, sources: dict[str, list[tuple[str, str]]], text_field: str, skip_bad_lines: bool,
    sample_chars: int, has_shards: bool = False,
):
    """Return ``(tokenizer, eod_id, sha256)``, training or loading it, and save it to ``out/tokenizer.json``.

    A tokenizer already in ``out`` is reused when it is the one asked for (a trained one: same spec and trained on
    the same inputs and options; a loaded one: same bytes). Otherwise it is replaced when no shards were made with
    it yet (``has_shards`` False: the leftover of a failed prepare), and refused when they were.

    Raises:
        MoecptError: ``out`` holds shards of a tokenizer other than the one asked for; a source gives no text to
            train a tokenizer on (every document empty or skipped: a wrong ``--text-field``?); a bad spec.
    """
    tok_path = out / TOKENIZER_FILE
    meta_path = out / TOKENIZER_META
    existing = tok_path.read_bytes() if tok_path.is_file() else None
    existing_meta = _read_json(meta_path) if meta_path.is_file() else None
    if not isinstance(existing_meta, dict):
        existing_meta = {}
    other = (
        f"{out} was prepared with another tokenizer ({{why}}); use a new --out folder "
        "(shards of two tokenizers must never be mixed)"
    )

    if spec.startswith("train:"):
        vocab = _parse_train_vocab(spec)
        trained_on = _trained_on(sources, text_field, skip_bad_lines, sample_chars)
        if existing is not None:
            tok = _reusable_trained_tokenizer(out, spec, trained_on, existing, existing_meta, has_shards, other)
            if tok is not None:
                return tok, ensure_eod(tok), sha256_bytes(existing)
        tok = _train_tokenizer(sources, text_field, skip_bad_lines, sample_chars, vocab)
        meta: dict[str, Any] = {"spec": spec, "trained_on": trained_on}
        eod = ensure_eod(tok)
    else:
        tok, eod = load_tokenizer(spec)  # the eod its folder declares (an imported model's own EOS), or the usual
        meta = {"spec": spec}
    data = tokenizer_bytes(tok)
    sha = sha256_bytes(data)
    if existing is not None and sha256_bytes(existing) == sha:
        if "trained_on" in meta and existing_meta.get("trained_on") != meta["trained_on"]:
            write_json_atomic(meta_path, {**meta, "sha256": sha})  # the same tokenizer, now on record
        return tok, eod, sha
    if existing is not None and has_shards:
        raise MoecptError(other.format(why=f"sha256 {sha256_bytes(existing)[:12]}, not {sha[:12]}"))
    # A new folder, or the leftover of a failed prepare (no shards made with it): moecpt made it, replace it.
    # The meta goes first: a crash in between leaves a tokenizer whose meta does not match it, so never reused.
    write_json_atomic(meta_path, {**meta, "sha256": sha})
    write_bytes_atomic(tok_path, data)
    return tok, eod, sha


def _reusable_trained_tokenizer(out: Path, spec: str, trained_on: Any, existing: bytes, existing_meta: dict,
                                has_shards: bool, other: str):
    """The trained tokenizer already in ``out`` (bytes ``existing``, meta ``existing_meta``) when it may be reused
    for ``spec`` trained on ``trained_on``; else ``None`` when it is only the leftover of an unfinished prepare (no
    shards made with it) and may be replaced.

    Raises:
        MoecptError: it differs (spec, inputs, or bytes changed by hand) and shards were made with it; ``other`` is
            the message template for a different spec.
    """
    tok_path = out / TOKENIZER_FILE
    meta_path = out / TOKENIZER_META
    same_spec = existing_meta.get("spec") == spec
    recorded = existing_meta.get("trained_on")
    # a folder prepared before the record existed: its shards were made with this tokenizer, keep it
    same_inputs = recorded == trained_on or (recorded is None and has_shards)
    intact = existing_meta.get("sha256") == sha256_bytes(existing)  # the meta describes these bytes
    if same_spec and same_inputs and intact:
        return Tokenizer.from_str(existing.decode("utf-8"))
    if has_shards:
        if not same_spec:
            raise MoecptError(other.format(why=f"{existing_meta.get('spec', 'unknown')}, not {spec}"))
        if not intact:
            raise MoecptError(f"{tok_path} is not the tokenizer {meta_path.name} records (changed by "
                              "hand?) and shards were made with it; use a new --out folder")
        raise MoecptError(
            f"{out} holds shards of a tokenizer trained on other inputs or options than these (sources, "
            f"files, --text-field); use a new --out folder, or pass --tokenizer {tok_path} to add sources "
            "with that same tokenizer"
        )
    print(f"moecpt: {tok_path} was left by an unfinished prepare of other inputs or options; "
          "training a new one", file=sys.stderr)
    return None


def _train_tokenizer(sources: dict[str, list[tuple[str, str]]], text_field: str, skip_bad_lines: bool,
                     sample_chars: int, vocab: int):
    """Train a byte-level BPE tokenizer of ``vocab`` tokens on up to ``sample_chars`` characters of ``sources``.

    Raises:
        MoecptError: a source gives no text at all (every document empty or skipped).
    """
    empty = _sources_without_text(sources, text_field, skip_bad_lines)
    if empty:
        names = ", ".join(repr(n) for n in empty)
        raise MoecptError(
            f"no text to train the tokenizer on from source(s) {names}: every document is empty or was skipped; "
            f"check the path and --text-field (now {text_field!r}); no tokenizer was written"
        )
    iters = [iter_documents(files, text_field, ReadStats(), skip_bad_lines) for files in sources.values()]
    print(f"moecpt: training a byte-level BPE tokenizer (vocab {vocab}) on up to "
          f"{sample_chars / 1e6:.0f} M characters", file=sys.stderr)
    return train_bpe(sample_texts(iters, sample_chars), vocab)


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
    docs = np.flatnonzero(sel)
    sel_len = lengths[docs]
    idx = np.zeros(len(docs) + 1, dtype=np.int64)
    np.cumsum(sel_len, out=idx[1:])
    total = int(idx[-1])
    tmp = dst_dir / f"{split}.npy"
    arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(total,))
    _preallocate(tmp)
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


def _check_replaceable(path: Path) -> None:
    """Refuse a path under a source's name that is not a source folder moecpt built (see :func:`_is_source_folder`).

    Raises:
        MoecptError: naming the path; it is left alone.
    """
    if not _is_source_folder(path):
        raise MoecptError(
            f"{path} exists and was not made by moecpt data prepare (no moecpt {SOURCE_FILE} in it), so moecpt "
            f"will not replace it; give the source another name (--source OTHER=...) or choose another --out"
        )


def _check_only_ours(path: Path) -> None:
    """Refuse to replace a source folder that holds anything :func:`_build_source` does not write (a user's file
    put into it would be deleted with the outdated build).

    Raises:
        MoecptError: naming the first foreign path; the folder is left alone.
    """
    try:
        foreign = sorted(p.name for p in path.iterdir() if p.name not in _SOURCE_FILES)
    except OSError as exc:
        raise MoecptError(os_error_line(exc, path, "read")) from None
    if foreign:
        raise MoecptError(
            f"{path / foreign[0]} was not written by moecpt data prepare, and rebuilding source {path.name!r} "
            f"would delete it with the old {path.name}/ folder; move it out of {path} and run the command again"
        )


def _parse_train_vocab(spec: str) -> int | None:
    """The vocabulary size of a ``train:N`` tokenizer spec (None for a path).

    Raises:
        MoecptError: not an integer, or outside [MIN_VOCAB, MAX_VOCAB].
    """
    if not spec.startswith("train:"):
        return None
    try:
        vocab = int(spec.split(":", 1)[1])
    except ValueError:
        raise MoecptError(f"--tokenizer {spec!r}: expected train:VOCAB_SIZE (e.g. train:4096) or a path") from None
    check_vocab_size(vocab)
    return vocab


def _build_source(
    out: Path, name: str, files: list[tuple[str, str]], tok, eod: int, dtype: str, fingerprint: dict[str, Any],
    text_field: str, val_fraction: float, seed: int, min_val_documents: int, min_val_tokens: int,
    skip_bad_lines: bool, progress: bool,
) -> dict[str, Any]:
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
        write_json_atomic(tmp / SOURCE_FILE, {**info, "fingerprint": fingerprint})
        final = out / name
        if final.exists() or final.is_symlink():  # an outdated build of this source: swap it out, then delete
            _check_replaceable(final)  # proof that moecpt built it (checked up front too; cheap, so again here)
            _check_only_ours(final)  # nothing of the user's inside it (likewise)
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

    ``out`` is claimed before anything is written (:func:`moecpt.storage.outputs.claim_folder`) and locked for the
    whole prepare (:class:`moecpt.storage.lock.FolderLock`); inside it only source folders moecpt built (proof:
    their ``source.json``) and its own tokenizer, before any shard was made with it, are ever replaced.

    Raises:
        MoecptError: a missing path, an empty source, a bad JSON line (without ``skip_bad_lines``), a bad source
            name, or ``out`` prepared with another tokenizer; ``out`` is an input, lies inside one or holds one;
            ``out`` is a non-empty folder moecpt did not make (or another command's); something not built by
            moecpt sits under a source's name in ``out``; another process is preparing into ``out``; a source gives
            no text to train the tokenizer on; ``out`` cannot be written or an input read (read-only, permission
            denied, disk full: one line naming the path).
    """
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
    if seed < 0:
        raise MoecptError(f"--seed {seed} must be >= 0")
    _parse_train_vocab(tokenizer)
    for name in sources:
        if not _NAME_RE.match(name):
            raise MoecptError(f"source name {name!r} is not allowed; use letters, digits, '_', '-', '.'")
        if name in _RESERVED:
            raise MoecptError(f"source name {name!r} is the name of a file moecpt writes into --out; choose another")
    # Resolve every path before writing anything: a typo must not leave a half folder behind.
    resolved = {name: resolve_files(spec) for name, spec in sources.items()}

    out = Path(out).expanduser()
    claim_folder(out, COMMAND, _input_paths(sources, resolved, tokenizer, out), legacy=is_prepared_folder)
    try:
        with FolderLock(out, COMMAND):
            return _prepare_claimed(
                resolved, out, tokenizer, text_field, val_fraction, seed, skip_bad_lines, min_val_documents,
                min_val_tokens, tokenizer_sample_chars, progress,
            )
    except OSError as exc:  # disk full, permissions, read-only: one line, not a traceback
        raise MoecptError(_os_error(exc, out)) from None


def _input_paths(sources: dict[str, str], resolved: dict[str, list[tuple[str, str]]], tokenizer: str,
                 out: Path) -> list[Path]:
    """Every local path a prepare reads: each source's file or folder (a glob's matched files), and a tokenizer
    given by path -- unless that is ``out``'s own ``tokenizer.json`` (re-using it to add sources to ``out``)."""
    paths: list[Path] = []
    for name, spec in sources.items():
        if spec.startswith(HF_PREFIX):
            continue
        if any(ch in spec for ch in "*?["):
            paths += [Path(loc) for kind, loc in resolved[name] if kind != "hf-hub"]
        else:
            paths.append(Path(spec).expanduser())
    if not tokenizer.startswith("train:"):
        tok = Path(tokenizer).expanduser().resolve(strict=False)
        own = out.resolve(strict=False)
        if not (tok in (own, own / TOKENIZER_FILE) and (owns(out, COMMAND) or is_prepared_folder(out))):
            paths.append(Path(tokenizer).expanduser())
    return paths


def _prepare_claimed(
    resolved: dict[str, list[tuple[str, str]]], out: Path, tokenizer: str, text_field: str, val_fraction: float,
    seed: int, skip_bad_lines: bool, min_val_documents: int, min_val_tokens: int, tokenizer_sample_chars: int,
    progress: bool,
) -> dict[str, Any]:
    """The body of :func:`prepare`, in a folder already claimed and locked by this process."""
    # Before writing anything: a source name must not collide with something that is not a source folder moecpt
    # built (the user's own folder, a file, a link); names of moecpt's own files were refused before the claim.
    for name in resolved:
        if (out / name).exists() or (out / name).is_symlink():
            _check_replaceable(out / name)
    _clean_stale_tmp(out)

    old_manifest: dict[str, Any] = {}
    if (out / MANIFEST).is_file():
        raw = _read_json(out / MANIFEST)
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise MoecptError(f"{out / MANIFEST} is unreadable or not moecpt's; use a new --out folder")
        old_manifest = raw
    tok, eod, sha = _setup_tokenizer(
        out, tokenizer, resolved, text_field, skip_bad_lines, tokenizer_sample_chars, has_shards=bool(old_manifest)
    )
    vocab = tok.get_vocab_size(with_added_tokens=True)
    dtype = token_dtype(vocab)
    if old_manifest and old_manifest.get("tokenizer_sha256") != sha:  # tokenizer.json replaced by hand
        raise MoecptError(f"{out} holds shards of another tokenizer; use a new --out folder")
    listed = old_manifest.get("sources", {})

    infos: dict[str, Any] = {}
    for name, files in resolved.items():
        fp = _fingerprint(
            files, text_field=text_field, val_fraction=val_fraction, seed=seed, tokenizer_sha256=sha,
            skip_bad_lines=skip_bad_lines, min_val_documents=min_val_documents, min_val_tokens=min_val_tokens,
            format_version=FORMAT_VERSION,
        )
        done = out / name / SOURCE_FILE
        if done.is_file():
            prev = _read_json(done) or {}
            if prev.get("fingerprint") == fp:
                if progress:
                    print(f"moecpt: source {name!r} is already prepared; skipped", file=sys.stderr)
                infos[name] = {k: v for k, v in prev.items() if k != "fingerprint"}
                continue
            # A listed source of another tokenizer means a hand-edited folder; an unlisted one is the leftover of
            # an unfinished prepare and is simply rebuilt.
            if name in listed and prev.get("fingerprint", {}).get("tokenizer_sha256") not in (None, sha):
                raise MoecptError(f"{out / name} was made with another tokenizer; use a new --out folder")
        if (out / name).exists() or (out / name).is_symlink():  # it will be replaced: before tokenizing anything
            _check_only_ours(out / name)
        infos[name] = _build_source(
            out, name, files, tok, eod, dtype, fp, text_field, val_fraction, seed, min_val_documents,
            min_val_tokens, skip_bad_lines, progress,
        )

    # Sources prepared by earlier runs into this folder stay listed (same tokenizer, checked above).
    all_sources = {
        k: v
        for k, v in listed.items()
        if k not in infos and (out / k / SOURCE_FILE).is_file()
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
