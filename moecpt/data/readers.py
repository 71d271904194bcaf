"""Document readers: plain text, JSON Lines, Parquet and Hugging Face ``datasets``.

Every reader yields whole documents (``str``); the tokenizer stage puts one end-of-document token after each, so
documents stay documents. A *source spec* (the ``PATH`` of ``--source NAME=PATH``) is resolved by
:func:`resolve_files`:

* a file: its kind comes from its extension (``.jsonl``/``.json``/``.ndjson`` [+ ``.gz``] = JSON Lines,
  ``.parquet`` = Parquet, anything else = plain text, one document per file);
* a folder: every regular file under it, recursively, sorted (a folder holding ``state.json`` or
  ``dataset_dict.json`` is a ``datasets.save_to_disk`` folder and read with ``load_from_disk``);
* a glob (``corpus/*.txt``): the sorted matches;
* ``hf:NAME[:CONFIG][#SPLIT]``: a dataset on the Hugging Face hub, streamed (needs network and ``datasets``).

Bad bytes never stop a run: invalid UTF-8 is replaced by U+FFFD and counted in :class:`ReadStats`.
"""

from __future__ import annotations

import codecs
import glob
import gzip
import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from moecpt.errors import MoecptError

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson", ".jsonl.gz", ".json.gz", ".ndjson.gz")
PARQUET_SUFFIXES = (".parquet", ".pq")
HF_PREFIX = "hf:"


@dataclass
class ReadStats:
    """Counters of one source's read: what was replaced or skipped, so prepare can report it."""

    documents: int = 0
    empty_documents: int = 0  # documents whose text is empty: skipped (they would only add an eod token)
    bad_lines: int = 0  # JSON Lines lines skipped with --skip-bad-lines
    replaced_bytes: int = 0  # invalid UTF-8 sequences replaced by U+FFFD
    first_bad: list[str] = field(default_factory=list)  # a few "file:line" of skipped lines, for the warning


# A codec error handler that counts what it replaces: errors="replace" alone would hide how much was damaged.
_COUNTER = {"n": 0}


def _count_replace(exc: UnicodeError) -> tuple[str, int]:
    if not isinstance(exc, UnicodeDecodeError):
        raise exc
    _COUNTER["n"] += 1
    return "\ufffd", exc.end


codecs.register_error("moecpt_count_replace", _count_replace)


def decode_utf8(data: bytes, stats: ReadStats) -> str:
    """UTF-8 decode; invalid sequences become U+FFFD and are added to ``stats.replaced_bytes``."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        before = _COUNTER["n"]
        text = data.decode("utf-8", errors="moecpt_count_replace")
        stats.replaced_bytes += _COUNTER["n"] - before
        return text


def _kind_of(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return "text"


def _is_hf_disk_folder(path: Path) -> bool:
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


def resolve_files(spec: str) -> list[tuple[str, str]]:
    """Expand a source spec into ``[(kind, location), ...]`` with kind in text/jsonl/parquet/hf-disk/hf-hub.

    Raises:
        MoecptError: the path does not exist, the glob matches nothing, or the folder has no files.
    """
    if spec.startswith(HF_PREFIX):
        return [("hf-hub", spec[len(HF_PREFIX) :])]
    path = Path(spec).expanduser()
    if any(ch in spec for ch in "*?["):
        matches = sorted(Path(m) for m in glob.glob(str(path), recursive=True))
        files = [m for m in matches if m.is_file()]
        if not files:
            raise MoecptError(f"the glob {spec!r} matches no file; check the pattern")
        return [(_kind_of(f), str(f)) for f in files]
    if not path.exists():
        raise MoecptError(f"source path {spec!r} does not exist; give an existing file, folder or glob")
    if _is_hf_disk_folder(path):
        return [("hf-disk", str(path))]
    if path.is_file():
        return [(_kind_of(path), str(path))]
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise MoecptError(f"source folder {spec!r} holds no files; point --source at the data")
    return [(_kind_of(f), str(f)) for f in files]


def read_text_file(path: str, stats: ReadStats) -> Iterator[str]:
    """One plain-text file = one document.

    Raises:
        MoecptError: the file cannot be read (names it and the cause).
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise MoecptError(_unreadable(path, exc, False, 0)) from None
    yield decode_utf8(data, stats)


def read_jsonl(path: str, text_field: str, stats: ReadStats, skip_bad_lines: bool = False) -> Iterator[str]:
    """Yield ``obj[text_field]`` of each line; blank lines are ignored.

    Raises:
        MoecptError: a line is not JSON or has no string ``text_field`` (names file and 1-based line number),
            unless ``skip_bad_lines`` (then it is counted in ``stats.bad_lines``); the file cannot be read, or a
            ``.gz`` file is truncated or corrupt (names the file and the cause).
    """
    compressed = path.lower().endswith(".gz")
    opener = gzip.open if compressed else open
    lineno = 0
    try:
        with opener(path, "rb") as fh:
            for lineno, raw in enumerate(fh, start=1):
                if not raw.strip():
                    continue
                doc = _jsonl_document(path, lineno, raw, text_field, stats, skip_bad_lines)
                if doc is not None:
                    yield doc
    except (EOFError, zlib.error, OSError) as exc:  # gzip.BadGzipFile is an OSError
        raise MoecptError(_unreadable(path, exc, compressed, lineno)) from None


def _jsonl_document(path: str, lineno: int, raw: bytes, text_field: str, stats: ReadStats,
                    skip_bad_lines: bool) -> str | None:
    """The text of one non-blank JSON Lines line, or None for a bad line skipped with ``skip_bad_lines``."""
    line = decode_utf8(raw, stats)
    problem = None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        problem = f"is not valid JSON ({exc.msg})"
    else:
        if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
            problem = f"has no string field {text_field!r} (set --text-field)"
    if problem is None:
        return obj[text_field]
    if not skip_bad_lines:
        raise MoecptError(f"{path}:{lineno} {problem}; fix the line or pass --skip-bad-lines to skip such lines")
    stats.bad_lines += 1
    if len(stats.first_bad) < 3:
        stats.first_bad.append(f"{path}:{lineno}")
    return None


def _unreadable(path: str, exc: BaseException, compressed: bool, lineno: int) -> str:
    """One line: ``path`` could not be read (after ``lineno`` lines), with the cause and what to do."""
    cause = " ".join(str(exc).split()) or type(exc).__name__
    where = f" after line {lineno}" if lineno else ""
    if compressed and isinstance(exc, (EOFError, zlib.error, gzip.BadGzipFile)):
        what = "is truncated" if isinstance(exc, EOFError) else "is corrupt (not valid gzip data)"
        kind = "zlib.error" if isinstance(exc, zlib.error) else type(exc).__name__
        return (f"{path} {what}{where} ({kind}: {cause}); re-download or re-compress it "
                "(`gzip -t FILE` checks it)")
    return f"cannot read {path}{where} ({type(exc).__name__}: {cause}); check the file and its permissions"


def _is_text_type(t) -> bool:
    """Whether an Arrow type holds text: (large / view) string or binary, or a dictionary of those."""
    import pyarrow as pa

    if pa.types.is_dictionary(t):
        return _is_text_type(t.value_type)
    checks = ("is_string", "is_large_string", "is_string_view", "is_binary", "is_large_binary", "is_binary_view")
    return any(getattr(pa.types, name, lambda _t: False)(t) for name in checks)


def read_parquet(path: str, text_field: str, stats: ReadStats) -> Iterator[str]:
    """Yield the ``text_field`` column of a Parquet file, batch by batch (nulls are skipped).

    Raises:
        MoecptError: the file is not Parquet or is damaged, it has no column ``text_field``, or that column is not
            a string / binary type (e.g. integers: they would silently become digit strings).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a non-Parquet file
        raise MoecptError(f"{path} is not a readable Parquet file ({' '.join(str(exc).split())}); "
                          "check the file") from None
    if text_field not in pf.schema_arrow.names:
        raise MoecptError(
            f"{path} has no column {text_field!r}; columns: {', '.join(pf.schema_arrow.names)}; set --text-field"
        )
    col_type = pf.schema_arrow.field(text_field).type
    if not _is_text_type(col_type):
        text_cols = [f.name for f in pf.schema_arrow if _is_text_type(f.type)]
        hint = f"text columns: {', '.join(text_cols)}" if text_cols else "the file has no text column"
        raise MoecptError(f"{path}: column {text_field!r} has type {col_type}, not text (string); set --text-field "
                          f"to a string column ({hint})")
    try:
        for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
            for value in batch.column(0).to_pylist():
                if value is None:
                    continue
                yield decode_utf8(value, stats) if isinstance(value, bytes) else value
    except (pa.ArrowException, OSError) as exc:  # a damaged page or column chunk
        raise MoecptError(f"{path} is damaged: reading column {text_field!r} failed "
                          f"({type(exc).__name__}: {' '.join(str(exc).split())}); re-download or re-write it") from None


def _import_datasets():
    try:
        import datasets  # noqa: F401 - optional dependency
    except ImportError:
        raise MoecptError("reading Hugging Face datasets needs the datasets package: pip install datasets") from None
    return datasets


def read_hf(kind: str, location: str, text_field: str, stats: ReadStats) -> Iterator[str]:
    """Yield ``text_field`` of a ``datasets`` folder (``load_from_disk``) or a hub dataset (streamed).

    Hub specs are ``NAME[:CONFIG][#SPLIT]`` (split defaults to ``train``).
    """
    datasets = _import_datasets()
    if kind == "hf-disk":
        ds = datasets.load_from_disk(location)
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise MoecptError(f"{location} has splits {list(ds)} but no 'train'; save the split you want")
            ds = ds["train"]
        if text_field not in ds.column_names:
            raise MoecptError(f"{location} has no column {text_field!r}; columns: {ds.column_names}")
        for batch in ds.select_columns([text_field]).iter(batch_size=1024):
            for value in batch[text_field]:
                if value is not None:
                    yield str(value)
        return
    name, _, split = location.partition("#")
    name, _, config = name.partition(":")
    try:
        ds = datasets.load_dataset(name, config or None, split=split or "train", streaming=True)
    except Exception as exc:  # offline, unknown name, ...: one line
        raise MoecptError(f"cannot load hub dataset {name!r} ({type(exc).__name__}: {exc}); check name/network")
    for row in ds:
        value = row.get(text_field)
        if value is None:
            raise MoecptError(f"hub dataset {name!r} has no field {text_field!r}; set --text-field")
        yield str(value)


def iter_documents(
    files: list[tuple[str, str]], text_field: str = "text", stats: ReadStats | None = None,
    skip_bad_lines: bool = False,
) -> Iterator[str]:
    """Yield the non-empty documents of ``files`` (from :func:`resolve_files`) in order; counts into ``stats``."""
    stats = stats if stats is not None else ReadStats()
    for kind, loc in files:
        if kind == "text":
            it = read_text_file(loc, stats)
        elif kind == "jsonl":
            it = read_jsonl(loc, text_field, stats, skip_bad_lines)
        elif kind == "parquet":
            it = read_parquet(loc, text_field, stats)
        else:
            it = read_hf(kind, loc, text_field, stats)
        for doc in it:
            if not doc:
                stats.empty_documents += 1
                continue
            stats.documents += 1
            yield doc
