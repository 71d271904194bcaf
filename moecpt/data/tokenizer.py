"""Byte-level BPE tokenizers: train one on a sample of the sources, or load any ``tokenizer.json``.

Byte-level BPE (GPT-2 style, Radford et al. 2019) encodes every UTF-8 string losslessly, so
``decode(encode(doc)) == doc`` for any text. The end-of-document token is ``<|endoftext|>``; a loaded tokenizer
without one keeps its own EOS if it has a common one, else ``<|endoftext|>`` is added as a special token.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from moecpt.errors import MoecptError

EOD_TOKEN = "<|endoftext|>"
# EOS spellings of common released tokenizers, tried in order when loading one.
_EOD_CANDIDATES = (EOD_TOKEN, "<|end_of_text|>", "</s>", "<eos>", "<|im_end|>", "[SEP]")
MIN_VOCAB = 256 + 1  # the 256 byte symbols + the end-of-document token
MAX_VOCAB = 1 << 21  # far above any real vocabulary; larger sizes make the trainer abort in Rust (allocation)


def check_vocab_size(vocab_size: int) -> None:
    """Refuse a vocabulary size a BPE cannot be trained with.

    Raises:
        MoecptError: ``vocab_size`` < MIN_VOCAB or > MAX_VOCAB.
    """
    if vocab_size < MIN_VOCAB:
        raise MoecptError(f"tokenizer vocab size {vocab_size} is too small; use at least {MIN_VOCAB}")
    if vocab_size > MAX_VOCAB:
        raise MoecptError(f"tokenizer vocab size {vocab_size} is too large; use at most {MAX_VOCAB} (2**21)")


def train_bpe(texts: Iterable[str], vocab_size: int):
    """Train a byte-level BPE with HF ``tokenizers`` on ``texts``.

    Deterministic for a given text order. ``<|endoftext|>`` is special token id 0 (the end-of-document id).

    Raises:
        MoecptError: ``vocab_size`` < 257 or > 2**21, or ``texts`` holds no non-empty text (a tokenizer trained on nothing
            has only the byte symbols and would be kept and reused as if it were real).
    """
    check_vocab_size(vocab_size)
    # ignore_merges: a pre-token that is itself in the vocab maps straight to its id (as in Llama 3): same
    # lossless byte-level encoding, ~1.5x faster encoding.
    tok = Tokenizer(models.BPE(ignore_merges=True))
    # add_prefix_space=False keeps the round trip exact (no leading space is invented).
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    seen = {"n": 0}

    def counted(it: Iterable[str]) -> Iterator[str]:
        for text in it:
            if text:
                seen["n"] += 1
            yield text

    tok.train_from_iterator(counted(texts), trainer=trainer)
    if seen["n"] == 0:
        raise MoecptError("no text to train the tokenizer on (every document is empty or was skipped); check the "
                          "sources and --text-field")
    return tok


def sample_texts(doc_iters: list[Iterator[str]], max_chars: int) -> Iterator[str]:
    """Yield documents from each iterator in turn, at most ``max_chars // len(doc_iters)`` characters per source.

    Sources are sampled equally so a small source is not drowned by a big one in the tokenizer's training text.
    """
    per_source = max(1, max_chars // max(1, len(doc_iters)))
    for it in doc_iters:
        used = 0
        for doc in it:
            yield doc
            used += len(doc)
            if used >= per_source:
                break


def load_tokenizer(path: str | Path):
    """Load ``tokenizer.json`` (a file, or a folder containing one) and make sure it has an end-of-document token.

    Returns:
        ``(tokenizer, eod_id)``.

    Raises:
        MoecptError: no such file, or not a valid tokenizer.json.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise MoecptError(f"no tokenizer at {str(path)!r}; give a tokenizer.json, a folder holding one, or train:N")
    try:
        tok = Tokenizer.from_file(str(p))
    except Exception as exc:  # tokenizers raises a plain Exception on a bad file
        raise MoecptError(f"{p} is not a valid tokenizer.json ({exc})") from None
    return tok, ensure_eod(tok, declared_eod_id(p.parent))


def declared_eod_id(folder: str | Path) -> int | None:
    """The end-of-document id a moecpt folder declares for the ``tokenizer.json`` it holds, or None: a checkpoint
    imported from Hugging Face (``meta.json`` -> ``imported_from.eod_id``: the model's own ``eos_token_id``, which
    may be a token outside moecpt's list, e.g. DeepSeek's ``<｜end▁of▁sentence｜>`` or GPT-OSS's ``<|return|>``),
    or prepared data (``manifest.json`` -> ``eod_id``). Unreadable files count as no declaration."""
    folder = Path(folder)
    for name, keys in (("meta.json", ("imported_from", "eod_id")), ("manifest.json", ("eod_id",))):
        try:
            value: Any = json.loads((folder / name).read_text())
            for k in keys:
                value = value[k]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return None


def ensure_eod(tok, declared: int | list[int] | None = None) -> int:
    """Id of the tokenizer's end-of-document token.

    ``declared``: the id(s) the model itself ends sequences with (:func:`declared_eod_id`, or an imported model's
    ``eos_token_id`` s). The first of moecpt's usual end tokens is used when it is one of them (or nothing is
    declared); else the first declared id the tokenizer has; else, with nothing usable, ``<|endoftext|>`` is added
    as a special token. So documents never end with a token the model's config does not know."""
    ids = [declared] if isinstance(declared, int) else list(declared or [])
    ids = [i for i in ids if tok.id_to_token(i) is not None]
    usual = next((t for t in (tok.token_to_id(c) for c in _EOD_CANDIDATES) if t is not None), None)
    if usual is not None and (not ids or usual in ids):
        return usual
    if ids:
        return ids[0]
    for cand in _EOD_CANDIDATES:
        tid = tok.token_to_id(cand)
        if tid is not None:
            return tid
    tok.add_special_tokens([EOD_TOKEN])
    return tok.token_to_id(EOD_TOKEN)


def eod_id_of(tok, declared: int | None = None) -> int:
    """The end-of-document id of a tokenizer prepared by moecpt (see :func:`ensure_eod`; ``declared`` is what its
    folder declares, which :func:`ensure_eod` chose)."""
    if declared is not None and tok.id_to_token(declared) is not None:
        return declared
    for cand in _EOD_CANDIDATES:
        tid = tok.token_to_id(cand)
        if tid is not None:
            return tid
    raise MoecptError("the tokenizer has no end-of-document token; prepare the data again")


def tokenizer_bytes(tok) -> bytes:
    """Canonical ``tokenizer.json`` bytes (what is saved and hashed)."""
    return tok.to_str(pretty=True).encode("utf-8")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
