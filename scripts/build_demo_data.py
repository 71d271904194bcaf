"""Regenerate the bundled demo data (``moecpt/demo_data``) from ``../shared/corpora``, deterministically.

Sources (token counts with the bundled 4096-token byte-level BPE):

* ``english``: all of en-fortunes, then documents of en-python-docs (seeded shuffle) until ~1.2 M tokens;
* ``code``: documents of code-python-stdlib (seeded shuffle) until ~0.8 M tokens;
* ``german``: documents of de-fortunes (seeded shuffle) until ~0.8 M tokens.

Steps: a first tokenizer trained on a character-budgeted superset measures tokens per document; the selection is
cut at the token targets; the final tokenizer is trained on exactly the selection (all three sources); the
selection is prepared with ``moecpt.data.shards.prepare`` and its shards are xz-compressed into the bundle.

Usage: ``python scripts/build_demo_data.py [--corpora ../shared/corpora] [--out moecpt/demo_data]``
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import random
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from moecpt.data.shards import prepare  # noqa: E402
from moecpt.data.tokenizer import tokenizer_bytes, train_bpe  # noqa: E402

SEED = 0
VOCAB = 4096
TARGETS = {"english": 1_200_000, "code": 800_000, "german": 800_000}
# Character budgets of the first pass (generous: about 4 characters per token).
SUPERSET_CHARS = {"english": 5_500_000, "code": 4_000_000, "german": 4_000_000}
ORIGIN = {
    "en-fortunes.jsonl": ("English general prose: quotations, jokes, poems, definitions (one fortune per document)",
                          "Debian package fortunes", "BSD-style (see the package's copyright file)"),
    "en-python-docs.jsonl": ("English technical prose (reStructuredText sources of the Python 3.11 documentation)",
                             "Debian package python3.11-doc", "PSF License"),
    "code-python-stdlib.jsonl": ("Python source code: the CPython 3.11 standard library without its tests",
                                 "CPython 3.11.7", "PSF License"),
    "de-fortunes.jsonl": ("German general prose (one fortune per document)", "Debian package fortunes-de",
                          "GPL-2+"),
}


def read_jsonl(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line)["text"] for line in fh if line.strip()]


def shuffled(docs: list[str], tag: str) -> list[str]:
    order = list(range(len(docs)))
    random.Random(f"{SEED}-{tag}").shuffle(order)
    return [docs[i] for i in order]


def take_chars(docs: list[str], budget: int) -> list[str]:
    out, used = [], 0
    for d in docs:
        if used >= budget:
            break
        out.append(d)
        used += len(d)
    return out


def take_tokens(tok, docs: list[str], budget: int, start: int = 0) -> list[str]:
    lens = [len(e.ids) + 1 for e in tok.encode_batch(docs, add_special_tokens=False)]
    out, used = [], start
    for d, n in zip(docs, lens):
        if used >= budget:
            break
        out.append(d)
        used += n
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpora", type=Path, default=REPO.parent / "shared" / "corpora")
    ap.add_argument("--out", type=Path, default=REPO / "moecpt" / "demo_data")
    args = ap.parse_args()
    c = args.corpora
    en_fort = read_jsonl(c / "en-fortunes.jsonl")
    en_docs = shuffled(read_jsonl(c / "en-python-docs.jsonl"), "en-python-docs")
    code = shuffled(read_jsonl(c / "code-python-stdlib.jsonl"), "code")
    german = shuffled(read_jsonl(c / "de-fortunes.jsonl"), "german")

    # Pass 1: a tokenizer on a superset, to count tokens per document.
    fort_chars = sum(map(len, en_fort))
    superset = {
        "english": en_fort + take_chars(en_docs, SUPERSET_CHARS["english"] - fort_chars),
        "code": take_chars(code, SUPERSET_CHARS["code"]),
        "german": take_chars(german, SUPERSET_CHARS["german"]),
    }
    tok1 = train_bpe((d for docs in superset.values() for d in docs), VOCAB)
    fort_tokens = sum(len(e.ids) + 1 for e in tok1.encode_batch(en_fort, add_special_tokens=False))
    sel_docs = take_tokens(tok1, superset["english"][len(en_fort):], TARGETS["english"], fort_tokens)
    selection = {
        "english": en_fort + sel_docs,
        "code": take_tokens(tok1, superset["code"], TARGETS["code"]),
        "german": take_tokens(tok1, superset["german"], TARGETS["german"]),
    }
    described = {
        "english": [f"en-fortunes.jsonl (all {len(en_fort)} documents)",
                    f"en-python-docs.jsonl ({len(sel_docs)} of {len(en_docs)} documents, seeded shuffle)"],
        "code": [f"code-python-stdlib.jsonl ({len(selection['code'])} of {len(code)} documents, seeded shuffle)"],
        "german": [f"de-fortunes.jsonl ({len(selection['german'])} of {len(german)} documents, seeded shuffle)"],
    }
    # Pass 2: the shipped tokenizer, trained on exactly the shipped text of all three sources.
    tok = train_bpe((d for docs in selection.values() for d in docs), VOCAB)

    with tempfile.TemporaryDirectory() as tmpd:
        tmp = Path(tmpd)
        tok_path = tmp / "tokenizer.json"
        tok_path.write_bytes(tokenizer_bytes(tok))
        srcs = {}
        for name, docs in selection.items():
            p = tmp / f"{name}.jsonl"
            with open(p, "w", encoding="utf-8") as fh:
                for d in docs:
                    fh.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
            srcs[name] = str(p)
        prepared = tmp / "prepared"
        manifest = prepare(srcs, prepared, tokenizer=str(tok_path), val_fraction=0.05, seed=SEED, progress=False)
        for name, info in manifest["sources"].items():
            info["files"] = described[name]
        manifest["tokenizer_spec"] = f"train:{VOCAB} (scripts/build_demo_data.py)"

        out = args.out
        for old in list(out.glob("*")):
            if old.name != "README.md":
                shutil.rmtree(old) if old.is_dir() else old.unlink()
        out.mkdir(parents=True, exist_ok=True)
        files: dict[str, str] = {}

        def put(rel: str, data: bytes) -> None:
            dst = out / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(data)
            files[rel] = hashlib.sha256(data).hexdigest()

        put("tokenizer.json", (prepared / "tokenizer.json").read_bytes())
        for name in manifest["sources"]:
            for stem in ("train", "train_idx", "val", "val_idx"):
                raw = (prepared / name / f"{stem}.npy").read_bytes()
                put(f"{name}/{stem}.npy.xz", lzma.compress(raw, preset=9 | lzma.PRESET_EXTREME))
        put("manifest.json", (json.dumps(manifest, indent=2) + "\n").encode("utf-8"))
        (out / "bundle.json").write_text(json.dumps({"files": files}, indent=2) + "\n")
        (out / "README.md").write_text(readme(manifest), encoding="utf-8")
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(json.dumps({"bundle_bytes": total, "sources": {
        n: {k: s[k] for k in ("train_tokens", "val_tokens", "train_documents", "val_documents")}
        for n, s in manifest["sources"].items()}}, indent=2))
    return 0


def readme(manifest: dict) -> str:
    lines = [
        "# Bundled demo data",
        "",
        "Prepared by `scripts/build_demo_data.py` (deterministic; rerun it to regenerate this folder) from the",
        "real text corpora in `../shared/corpora`. Nobody on this project wrote this text. It is a prepared data",
        "folder (see `moecpt/data/shards.py`) with xz-compressed token shards; `PreparedData.open(\"demo\")`",
        "unpacks it into `$MOECPT_CACHE` (default `~/.cache/moecpt`) on first use.",
        "",
        f"Tokenizer: byte-level BPE, vocab {manifest['vocab_size']}, `<|endoftext|>` = id {manifest['eod_id']}"
        " (end of document), trained on the text of all three sources below.",
        "",
        "| source | tokens (train + val) | documents (train + val) | made from |",
        "|---|---|---|---|",
    ]
    for name, s in manifest["sources"].items():
        lines.append(f"| {name} | {s['train_tokens']:,} + {s['val_tokens']:,} | "
                     f"{s['train_documents']:,} + {s['val_documents']:,} | {'; '.join(s['files'])} |")
    lines += ["", "## Origin and licence of each part", "",
              "| corpus file | content | origin | licence |", "|---|---|---|---|"]
    for f, (what, origin, lic) in ORIGIN.items():
        lines.append(f"| {f} | {what} | {origin} | {lic} |")
    lines += ["", "The tokenizer and token shards are derived works of these texts and carry their licences.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
