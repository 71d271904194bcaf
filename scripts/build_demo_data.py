"""Regenerate the bundled demo data (``moecpt/demo_data``) from ``../shared/corpora``, deterministically.

Sources (token counts with the bundled 4096-token byte-level BPE; each target is train tokens, the selection
is cut at target + about ``MIN_VAL_TOKENS`` so that train alone exceeds it):

* ``english`` (>= 10 M train tokens, general plus technical prose): all of en-fortunes (file order), then
  documents of en-python-docs, en-manpages and en-linux-docs pooled and seeded-shuffled together until
  ~10.6 M train tokens;
* ``code`` (>= 3 M train tokens): documents of code-python-stdlib (seeded shuffle) until ~3.2 M train tokens;
* ``german`` (>= 3 M train tokens): all of de-fortunes (seeded shuffle), then documents of de-manpages and
  de-debian-reference pooled and seeded-shuffled together until ~3.2 M train tokens.

Validation: ``prepare``'s whole-document split with ``val_fraction=VAL_FRACTION`` and
``min_val_tokens=MIN_VAL_TOKENS`` (about 80-90 k held-out tokens per source).

Steps: a first tokenizer trained on a character-budgeted superset measures tokens per document; the selection is
cut at the token targets; the final tokenizer is trained on exactly the selection (all three sources, about
55 M characters, no sampling); the selection is prepared with ``moecpt.data.shards.prepare`` and its shards are
xz-compressed (preset 9 | extreme) into the bundle.

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
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from moecpt.data.shards import prepare  # noqa: E402
from moecpt.data.tokenizer import tokenizer_bytes, train_bpe  # noqa: E402

SEED = 0
VOCAB = 4096
# Train-token targets (about 6% above the 10 M / 3 M / 3 M a CPU study needs without repeating data).
MINIMUM = {"english": 10_000_000, "code": 3_000_000, "german": 3_000_000}
TARGETS = {"english": 10_600_000, "code": 3_180_000, "german": 3_180_000}
# Validation split (prepare's mechanism): the larger of VAL_FRACTION of a source and MIN_VAL_TOKENS.
VAL_FRACTION = 0.008
MIN_VAL_TOKENS = 80_000
# Character budgets of the first pass (generous: the corpora average 2.4-3.2 characters per token).
SUPERSET_CHARS = {"english": 42_000_000, "code": 11_000_000, "german": 13_000_000}
ORIGIN = {
    "en-fortunes.jsonl": ("English general prose: quotations, jokes, poems, definitions (one fortune per document)",
                          "Debian package fortunes", "BSD-style (see the package's copyright file)"),
    "en-python-docs.jsonl": ("English technical prose (reStructuredText sources of the Python 3.11 documentation)",
                             "Debian package python3.11-doc", "PSF License"),
    "en-manpages.jsonl": ("English technical prose: manual pages rendered to plain text (one page per document)",
                          "Debian packages manpages 6.03-2, manpages-dev 6.03-2, perl-doc 5.36.0-7+deb12u4, "
                          "git-man 1:2.39.5-0+deb12u3",
                          "manpages, manpages-dev: GPL-2+ / various free licences; perl-doc: GPL-1+ or Artistic; "
                          "git-man: GPL-2 (see each package's copyright file)"),
    "en-linux-docs.jsonl": ("English technical prose (reStructuredText sources of the Linux 6.1 kernel "
                            "documentation, without its translations)", "Debian package linux-doc-6.1 6.1.192-3",
                            "GPL-2 (some files carry their own SPDX tags, e.g. GFDL-1.1-no-invariants-or-later "
                            "for the media API docs)"),
    "code-python-stdlib.jsonl": ("Python source code: the CPython 3.11 standard library without its tests",
                                 "CPython 3.11.7", "PSF License"),
    "de-fortunes.jsonl": ("German general prose (one fortune per document)", "Debian package fortunes-de",
                          "GPL-2+"),
    "de-manpages.jsonl": ("German technical prose: translated manual pages rendered to plain text (one page per "
                          "document)", "Debian packages manpages-de 4.18.1-1, manpages-de-dev 4.18.1-1", "GPL-3+"),
    "de-debian-reference.jsonl": ("German technical prose: the Debian Reference, HTML converted to plain text "
                                  "(one section per document)", "Debian package debian-reference-de 2.100",
                                  "GPL-2+"),
}
ENGLISH_TECH = ("en-python-docs.jsonl", "en-manpages.jsonl", "en-linux-docs.jsonl")
GERMAN_TECH = ("de-manpages.jsonl", "de-debian-reference.jsonl")


def read_jsonl(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line)["text"] for line in fh if line.strip()]


def shuffled(docs: list, tag: str) -> list:
    order = list(range(len(docs)))
    random.Random(f"{SEED}-{tag}").shuffle(order)
    return [docs[i] for i in order]


def take_chars(docs: list[tuple[str, str]], budget: int) -> list[tuple[str, str]]:
    out, used = [], 0
    for d in docs:
        if used >= budget:
            break
        out.append(d)
        used += len(d[1])
    return out


def count_tokens(tok, docs: list[tuple[str, str]]) -> list[int]:
    """Tokens of each document, its end-of-document token included."""
    return [len(e.ids) + 1 for e in tok.encode_batch([t for _, t in docs], add_special_tokens=False)]


def take_tokens(tok, docs: list[tuple[str, str]], budget: int, start: int = 0) -> tuple[list[tuple[str, str]], int]:
    out, used = [], start
    for d, n in zip(docs, count_tokens(tok, docs)):
        if used >= budget:
            break
        out.append(d)
        used += n
    return out, used


def describe(selected: list[tuple[str, str]], available: dict[str, int], how: dict[str, str]) -> list[str]:
    counts = {f: 0 for f in available}
    for f, _ in selected:
        counts[f] += 1
    return [f"{f} (all {n} documents{how[f]})" if counts[f] == n else f"{f} ({counts[f]} of {n} documents{how[f]})"
            for f, n in sorted(available.items(), key=lambda kv: list(ORIGIN).index(kv[0])) if counts[f]]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpora", type=Path, default=REPO.parent / "shared" / "corpora")
    ap.add_argument("--out", type=Path, default=REPO / "moecpt" / "demo_data")
    args = ap.parse_args()
    c = args.corpora
    t0 = time.time()

    def load(f: str) -> list[tuple[str, str]]:
        return [(f, t) for t in read_jsonl(c / f)]

    # Each source: a head taken whole (general prose) and a seeded-shuffled pool cut at the token target.
    heads = {"english": load("en-fortunes.jsonl"), "code": [],
             "german": shuffled(load("de-fortunes.jsonl"), "german")}
    pools = {"english": shuffled([d for f in ENGLISH_TECH for d in load(f)], "english-technical"),
             "code": shuffled(load("code-python-stdlib.jsonl"), "code"),
             "german": shuffled([d for f in GERMAN_TECH for d in load(f)], "german-technical")}
    available = {n: {} for n in heads}
    for n in heads:
        for f, _ in heads[n] + pools[n]:
            available[n][f] = available[n].get(f, 0) + 1
    how = {"en-fortunes.jsonl": "", "de-fortunes.jsonl": ", seeded shuffle",
           "code-python-stdlib.jsonl": ", seeded shuffle",
           **{f: ", seeded shuffle of the pooled technical files" for f in ENGLISH_TECH + GERMAN_TECH}}

    # Pass 1: a tokenizer on a superset, to count tokens per document.
    superset = {n: heads[n] + take_chars(pools[n], SUPERSET_CHARS[n] - sum(len(t) for _, t in heads[n]))
                for n in heads}
    tok1 = train_bpe((t for docs in superset.values() for _, t in docs), VOCAB)
    selection, described = {}, {}
    for n in heads:
        head_tokens = sum(count_tokens(tok1, heads[n]))
        # The selection holds train + val: cut at the train target plus the held-out share.
        budget = TARGETS[n] + max(MIN_VAL_TOKENS, round(VAL_FRACTION * TARGETS[n]))
        taken, used = take_tokens(tok1, superset[n][len(heads[n]):], budget, head_tokens)
        if used < budget:
            raise SystemExit(f"{n}: the first-pass superset holds only {used:,} tokens, under {budget:,}; "
                             "raise SUPERSET_CHARS (or the corpus is too small)")
        selection[n] = heads[n] + taken
        described[n] = describe(selection[n], available[n], how)
    chars = sum(len(t) for docs in selection.values() for _, t in docs)
    print(f"pass 1 done in {time.time() - t0:.0f} s; the selection holds {chars:,} characters", file=sys.stderr)
    # Pass 2: the shipped tokenizer, trained on exactly the shipped text of all three sources.
    tok = train_bpe((t for docs in selection.values() for _, t in docs), VOCAB)

    with tempfile.TemporaryDirectory() as tmpd:
        tmp = Path(tmpd)
        tok_path = tmp / "tokenizer.json"
        tok_path.write_bytes(tokenizer_bytes(tok))
        srcs = {}
        for name, docs in selection.items():
            p = tmp / f"{name}.jsonl"
            with open(p, "w", encoding="utf-8") as fh:
                for _, d in docs:
                    fh.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
            srcs[name] = str(p)
        prepared = tmp / "prepared"
        manifest = prepare(srcs, prepared, tokenizer=str(tok_path), val_fraction=VAL_FRACTION, seed=SEED,
                           min_val_tokens=MIN_VAL_TOKENS, progress=False)
        for name, info in manifest["sources"].items():
            info["files"] = described[name]
            if info["train_tokens"] < MINIMUM[name]:  # the shipped tokenizer counts differently from the first
                raise SystemExit(f"{name}: {info['train_tokens']:,} train tokens, under {MINIMUM[name]:,}; "
                                 "raise TARGETS")
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
    print(json.dumps({"bundle_bytes": total, "build_seconds": round(time.time() - t0), "sources": {
        n: {k: s[k] for k in ("train_tokens", "val_tokens", "train_documents", "val_documents")}
        for n, s in manifest["sources"].items()}}, indent=2))
    return 0


def readme(manifest: dict) -> str:
    lines = [
        "# Bundled demo data",
        "",
        "Prepared by `scripts/build_demo_data.py` (deterministic: a rerun on the same corpus files gives identical",
        "bytes) from real public text corpora, listed with their origin and licence below. Nobody on this project",
        "wrote this text. It is a prepared data folder (see `moecpt/data/shards.py`) with xz-compressed token",
        "shards and `bundle.json` (the sha256 of every file); `PreparedData.open(\"demo\")` unpacks it into",
        "`$MOECPT_CACHE/demo-<hash of bundle.json>` (default `~/.cache/moecpt`) on first use, so a new bundle is",
        "unpacked afresh and never mixed with an old one.",
        "",
        f"Tokenizer: byte-level BPE, vocab {manifest['vocab_size']}, `<|endoftext|>` = id {manifest['eod_id']}"
        " (end of document), trained on exactly the text of all three sources below (train and val, no sampling).",
        "",
        f"Sizes: at least {MINIMUM['english']:,} English, {MINIMUM['code']:,} code and {MINIMUM['german']:,} German",
        "train tokens, so that a CPU study can run without repeating data. Each source is a head taken whole (the",
        "general-prose fortunes) plus documents of a seeded shuffle of its other files (pooled together) until the",
        "token target. Validation: whole documents, seeded, held out until the larger of"
        f" {manifest['val_fraction']} of the",
        f"source and {MIN_VAL_TOKENS:,} tokens.",
        "",
        "| source | tokens (train + val) | documents (train + val) | made from |",
        "|---|---|---|---|",
    ]
    for name, s in manifest["sources"].items():
        lines.append(f"| {name} | {s['train_tokens']:,} + {s['val_tokens']:,} | "
                     f"{s['train_documents']:,} + {s['val_documents']:,} | {'; '.join(s['files'])} |")
    lines += ["", "## Origin and licence of each part", "",
              "Each corpus file is JSON Lines, one document per line. The manual pages were rendered with",
              "`man --nh --nj -l -Tutf8 | col -bx` (no hyphenation or justification); pages under 200 characters,",
              "kernel .rst files under 500 characters and identical documents were dropped.",
              "",
              "| corpus file | content | origin | licence |", "|---|---|---|---|"]
    for f, (what, origin, lic) in ORIGIN.items():
        lines.append(f"| {f} | {what} | {origin} | {lic} |")
    lines += ["", "In en-manpages.jsonl, man1/perl*.1 and man3/*.3perl are from perl-doc; man*/git*, man3/Git.3pm and",
              "man1/scalar.1 from git-man; the rest from manpages and manpages-dev.",
              "",
              "The tokenizer and token shards are derived works of these texts and carry their licences.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
