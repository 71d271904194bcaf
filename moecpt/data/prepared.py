"""Reading a prepared data folder (written by ``moecpt data prepare`` / :func:`moecpt.data.shards.prepare`)."""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from moecpt.data.demo import demo_path
from moecpt.errors import MoecptError
from moecpt.storage.outputs import owns

_COUNTS = ("train_tokens", "val_tokens", "train_documents", "val_documents")


class PreparedData:
    """A prepared folder: tokenizer, per-source train/val token shards (memory-mapped) and their document index.

    Attributes:
        path: the folder.
        vocab_size: tokenizer vocabulary size including special tokens.
        eod_id: end-of-document token id (separates documents inside the shards).
        tokenizer_sha256: sha256 of the folder's ``tokenizer.json`` bytes.
        source_names: sources in manifest order.
        dtype: numpy dtype name of the shards (``uint16`` or ``uint32``).
    """

    def __init__(self, path: Path, manifest: dict[str, Any]):
        self.path = path
        self.manifest = manifest
        try:
            if not isinstance(manifest, dict):
                raise TypeError("not a JSON object")
            self.vocab_size: int = int(manifest["vocab_size"])
            self.eod_id: int = int(manifest["eod_id"])
            self.tokenizer_sha256: str = str(manifest["tokenizer_sha256"])
            self.dtype: str = str(manifest["dtype"])
            sources = manifest["sources"]
            if not isinstance(sources, dict):
                raise TypeError("'sources' is not a JSON object")
            for name, info in sources.items():
                if not isinstance(info, dict):
                    raise TypeError(f"source {name!r} is not a JSON object")
                for k in _COUNTS:
                    if isinstance(info.get(k), bool) or not isinstance(info.get(k), int) or info[k] < 0:
                        raise TypeError(f"source {name!r} has no valid {k!r}")
            if self.dtype not in ("uint16", "uint32"):
                raise ValueError(f"dtype {self.dtype!r}")
            if not 0 < self.vocab_size <= (1 << 16 if self.dtype == "uint16" else 1 << 32):
                raise ValueError(f"vocab_size {self.vocab_size}")
        except KeyError as exc:
            raise MoecptError(f"{path / 'manifest.json'} is damaged (no key {exc}); prepare the data again into a "
                              "new folder") from None
        except (TypeError, ValueError) as exc:
            raise MoecptError(f"{path / 'manifest.json'} is damaged ({exc}); prepare the data again into a new "
                              "folder") from None
        self.source_names: list[str] = list(sources)
        self._arrays: dict[tuple[str, str], Any] = {}

    @classmethod
    def open(cls, path: str | Path) -> "PreparedData":
        """Open a prepared folder; ``"demo"`` opens the bundled demo data (unpacked to the cache on first use).

        Raises:
            MoecptError: the folder does not exist or has no ``manifest.json`` (not prepared or interrupted).
        """
        if str(path) == "demo":
            path = demo_path()
        p = Path(path).expanduser()
        if not p.is_dir():
            raise MoecptError(
                f"prepared data folder {str(path)!r} does not exist; run `moecpt data prepare --out {path} ...` "
                "or use data.path = 'demo'"
            )
        mf = p / "manifest.json"
        if not mf.is_file():
            if owns(p, "data prepare"):  # moecpt's own folder: an interrupted prepare, safe to finish in place
                raise MoecptError(
                    f"{p} is an unfinished prepare (no manifest.json yet); run the same `moecpt data prepare "
                    f"... --out {path}` command again to finish it"
                )
            raise MoecptError(
                f"{p} is not a prepared data folder (no manifest.json); if it holds raw text, prepare it into a "
                f"new folder: `moecpt data prepare --source NAME={path} --tokenizer train:4096 --out NEW_FOLDER`"
            )
        try:
            manifest = json.loads(mf.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise MoecptError(f"{mf} is corrupt ({exc}); prepare the data again into a new folder") from None
        except OSError as exc:
            raise MoecptError(f"{mf} cannot be read ({exc.strerror or exc})") from None
        return cls(p, manifest)

    # --------------------------------------------------------------------------------------------- tokenizer
    @cached_property
    def tokenizer(self):
        """The ``tokenizers.Tokenizer`` the shards were made with (loaded on first use)."""
        return Tokenizer.from_file(str(self.path / self.manifest.get("tokenizer", "tokenizer.json")))

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no end-of-document token added)."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        """Text of ``ids`` (list, numpy array or tensor); special tokens such as eod are dropped."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    # ----------------------------------------------------------------------------------------------- tokens
    def _check_source(self, name: str) -> None:
        if name not in self.manifest["sources"]:
            raise MoecptError(
                f"unknown data source {name!r}; {self.path} has: {', '.join(self.source_names)}"
            )

    def _array(self, name: str, split: str, kind: str = ""):
        self._check_source(name)
        key = (name, split + kind)
        if key not in self._arrays:
            f = self.path / name / f"{split}{kind}.npy"
            if not f.is_file():
                raise MoecptError(f"{f} is missing; the prepared folder is damaged: prepare it again")
            damaged = f"{f} is damaged ({{why}}); prepare the data again into a new folder"
            try:
                try:
                    arr = np.load(f, mmap_mode="r", allow_pickle=False)
                except ValueError:  # an empty split cannot be memory-mapped
                    arr = np.load(f, allow_pickle=False)
            except (ValueError, OSError, EOFError) as exc:  # truncated, not .npy, unreadable
                raise MoecptError(damaged.format(why=str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
                                  ) from None
            info = self.manifest["sources"][name]
            if kind:
                want, dtype = info[f"{split}_documents"] + 1, "int64"
            else:
                want, dtype = info[f"{split}_tokens"], self.dtype
            if arr.ndim != 1 or arr.dtype != np.dtype(dtype):
                raise MoecptError(damaged.format(why=f"{arr.dtype} array of shape {arr.shape}, not 1-D {dtype}"))
            if len(arr) != want:
                raise MoecptError(damaged.format(why=f"{len(arr)} entries, manifest.json says {want}"))
            self._arrays[key] = arr
        return self._arrays[key]

    def train_tokens(self, name: str):
        """1-D read-only memmap (uint16/uint32) of the train split of ``name``: documents each followed by eod.

        Raises:
            MoecptError: unknown source (the message lists the available ones).
        """
        return self._array(name, "train")

    def val_tokens(self, name: str):
        """1-D read-only memmap of the held-out split of ``name`` (same format as :meth:`train_tokens`)."""
        return self._array(name, "val")

    def doc_offsets(self, name: str, split: str = "train"):
        """int64 [documents + 1]: document ``i`` is ``tokens[off[i]:off[i+1]]`` (its last token is eod)."""
        return self._array(name, split, "_idx")

    # ----------------------------------------------------------------------------------------------- summary
    def summary(self) -> dict[str, Any]:
        """The JSON of ``moecpt data inspect``: vocab, tokenizer hash, eod, dtype, per-source counts."""
        keys = _COUNTS
        return {
            "path": str(self.path),
            "vocab_size": self.vocab_size,
            "tokenizer_sha256": self.tokenizer_sha256,
            "eod_id": self.eod_id,
            "dtype": self.dtype,
            "sources": {n: {k: int(s[k]) for k in keys} for n, s in self.manifest["sources"].items()},
        }

    def __repr__(self) -> str:
        return f"PreparedData({str(self.path)!r}, sources={self.source_names}, vocab_size={self.vocab_size})"
