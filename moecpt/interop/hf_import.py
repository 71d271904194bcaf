"""``moecpt import-hf``: a local Hugging Face MoE folder -> a moecpt checkpoint, or a model in memory.

A Hugging Face folder holds ``config.json``, the weights as one ``model.safetensors`` or as shards listed in
``model.safetensors.index.json``, and tokenizer files. The family (see :mod:`moecpt.interop.families`) maps the
config onto a :class:`moecpt.config.ModelConfig` and every tensor onto its place in the moecpt state dict.

Everything that can be checked without reading tensor data is checked first, before anything is written: the
family, shards listed in the index but absent, every tensor the config implies present with the shape it implies,
no tensor the config does not describe, the tokenizer. Then the destination tensors are allocated once (the
model's size) and the shards are streamed one at a time through ``safetensors.safe_open``: each tensor is read,
placed (expert matrices transposed into moecpt's stacked ``[E, D, 2F]`` / ``[E, F, D]`` layout) and dropped, and
the shard is closed before the next is opened. Peak memory is therefore about the model plus one shard.

The checkpoint folder written is a regular moecpt checkpoint (:func:`moecpt.train.checkpoint.save_checkpoint`,
step 0) plus ``tokenizer.json`` (the model's tokenizer in the canonical form ``moecpt data prepare`` writes, so
CPT data prepared with ``--tokenizer CKPT/tokenizer.json`` has the very ``tokenizer_sha256`` the checkpoint
records) and ``hf/`` (the model's ``tokenizer_config.json`` / ``special_tokens_map.json`` /
``generation_config.json``, used again by ``export-hf``). It is assembled in a temp folder next to ``--out`` and
renamed at the end: a failed import leaves nothing under ``--out``. The temp folder gets moecpt's output marker
(:func:`moecpt.storage.outputs.write_marker`, ``.moecpt-output.json``; checkpoint loading reads only the files its
manifest lists, so the marker changes nothing there) before it is published, so the folder is provably moecpt's.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tokenizers import Tokenizer

from moecpt.data.tokenizer import ensure_eod, sha256_bytes, tokenizer_bytes
from moecpt.errors import MoecptError
from moecpt.interop.config_types import ReadLog, check_config_types
from moecpt.interop.families import Family, Piece, PieceOp, family_of, place
from moecpt.model.transformer import build_model, rope_tables
from moecpt.storage.atomic import fsync_dir, publish_dir, temp_name, write_bytes_atomic
from moecpt.storage.outputs import check_new_output, os_error_line, write_marker
from moecpt.train.checkpoint import save_checkpoint

INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.json"
HF_SIDE_DIR = "hf"
SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
#: tensors some checkpoints carry that are not weights (recomputed RoPE tables)
_IGNORED = re.compile(r"rotary_emb\.inv_freq$")
_SHARD_RE = re.compile(r"^(?P<stem>.+)-(?P<i>\d+)-of-(?P<n>\d+)\.safetensors$")


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:200]


_OS_ERROR_RE = re.compile(r"\(os error (\d+)\)")


def write_error(exc: BaseException, out: str | Path) -> MoecptError | None:
    """The one-line :class:`MoecptError` for an environment error of a command writing ``out`` (or its temp
    folder ``out.tmp-*``): an ``OSError``, or a ``SafetensorError`` wrapping one (safetensors reports a full disk as
    ``I/O error: ... (os error 28)``). An ``OSError`` naming a path elsewhere is a failed read of an input.
    Returns ``None`` when ``exc`` is something else (a bug: it keeps its traceback)."""
    if isinstance(exc, OSError):
        where = exc.filename
        mine = str(Path(out).expanduser().resolve(strict=False))  # ``out`` and ``out.tmp-*`` beside it
        doing = "read" if where and not str(Path(os.fsdecode(where)).resolve(strict=False)).startswith(mine) \
            else "write"
        return MoecptError(os_error_line(exc, out, doing))
    if type(exc).__name__ == "SafetensorError":
        m = _OS_ERROR_RE.search(str(exc))
        if m:
            code = int(m.group(1))
            return MoecptError(os_error_line(OSError(code, os.strerror(code)), out))
    return None


def resolve_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """``auto``/None -> None (keep the stored dtype); ``fp32``/``bf16``/``fp16`` (or a torch dtype) -> that dtype."""
    if name is None or name == "auto":
        return None
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise MoecptError(f"--dtype {name!r} is not allowed; allowed: auto, fp32, bf16, fp16")
    return DTYPES[name]


# ------------------------------------------------------------------------------------------------ the folder
@dataclass
class HFFolder:
    """A Hugging Face model folder whose tensor headers have been read (no tensor data yet).

    Attributes:
        path: the folder.
        config: ``config.json`` as a dict.
        family: its :class:`~moecpt.interop.families.Family`.
        shards: the safetensors files, in reading order.
        weight_map: tensor name -> shard file.
        headers: tensor name -> (safetensors dtype string, shape).
    """

    path: Path
    config: dict
    family: Family
    shards: list[Path]
    weight_map: dict[str, Path]
    headers: dict[str, tuple[str, tuple[int, ...]]]

    @property
    def max_shard_bytes(self) -> int:
        return max(f.stat().st_size for f in self.shards)


def is_hf_folder(path: str | Path) -> bool:
    """A folder with ``config.json`` and safetensors weights but no moecpt ``meta.json``."""
    p = Path(path)
    return (p.is_dir() and (p / "config.json").is_file() and not (p / "meta.json").exists()
            and any(p.glob("*.safetensors")))


def open_hf_folder(path: str | Path) -> HFFolder:
    """Read ``config.json`` and every shard's header, checking that the shards are all there.

    Raises:
        MoecptError: not a folder, no / bad config.json, an unsupported family, no safetensors weights, missing
            or unreadable shards, a tensor listed in the index but absent from its shard.
    """
    p = Path(path).expanduser()
    if not p.is_dir():
        raise MoecptError(f"no Hugging Face model folder at {str(path)!r}; give a local folder with config.json "
                          "and *.safetensors")
    cfg_file = p / "config.json"
    if not cfg_file.is_file():
        raise MoecptError(f"{p} has no config.json; it is not a Hugging Face model folder")
    try:
        config = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MoecptError(f"{cfg_file} is not valid JSON ({_one_line(exc)})") from None
    if not isinstance(config, dict):
        raise MoecptError(f"{cfg_file} does not hold a JSON object")
    check_config_types(config, cfg_file)
    family = family_of(config)

    index = p / INDEX_FILE
    listed: dict[str, Path] | None = None
    if index.is_file():
        try:
            wm = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise MoecptError(f"{index} is corrupted ({_one_line(exc)}); download it again") from None
        listed = {name: p / shard for name, shard in wm.items()}
        shards = sorted(set(listed.values()))
        missing = [s.name for s in shards if not s.is_file()]
        if missing:
            raise MoecptError(f"{len(missing)} of {len(shards)} shards listed in {INDEX_FILE} are missing from {p} "
                              f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); download them")
    else:
        shards = [p / "model.safetensors"] if (p / "model.safetensors").is_file() else sorted(p.glob("*.safetensors"))
        if not shards:
            raise MoecptError(f"{p} has no *.safetensors weights (moecpt reads safetensors only; re-save the model "
                              "with transformers' save_pretrained)")
        for s in shards:  # model-0000i-of-0000N.safetensors without an index: all N must be there
            m = _SHARD_RE.match(s.name)
            if m:
                width, n = len(m["i"]), int(m["n"])
                want = [f"{m['stem']}-{j:0{width}d}-of-{m['n']}.safetensors" for j in range(1, n + 1)]
                missing = [w for w in want if not (p / w).is_file()]
                if missing:
                    raise MoecptError(f"shard(s) {', '.join(missing[:3])} of {p} are missing; download them")

    headers: dict[str, tuple[str, tuple[int, ...]]] = {}
    weight_map: dict[str, Path] = {}
    for shard in shards:
        try:
            with safe_open(str(shard), framework="pt", device="cpu") as f:
                for name in f.keys():  # noqa: SIM118 (a safe_open handle is not a dict)
                    sl = f.get_slice(name)
                    if name in headers:
                        raise MoecptError(f"tensor {name} is stored twice ({weight_map[name].name} and {shard.name})")
                    headers[name] = (sl.get_dtype(), tuple(int(x) for x in sl.get_shape()))
                    weight_map[name] = shard
        except MoecptError:
            raise
        except Exception as exc:  # noqa: BLE001 (safetensors raises its own errors for damaged files)
            raise MoecptError(f"shard {shard.name} of {p} is unreadable ({_one_line(exc)}); "
                              "download it again") from None
    if listed is not None:
        for name, shard in listed.items():
            if weight_map.get(name) != shard:
                raise MoecptError(f"{INDEX_FILE} puts {name} in {shard.name}, which does not hold it; "
                                  "the shards do not match the index")
    return HFFolder(p, config, family, shards, weight_map, headers)


def plan_import(folder: HFFolder):
    """``(ModelConfig, notes, pieces)`` for ``folder``, after checking its tensors against its config.

    Raises:
        MoecptError: an unsupported feature, a tensor the config implies that is missing, one it does not
            describe, a shape that does not match the config, a non-float dtype.
    """
    fam = folder.family
    read = ReadLog(folder.config)
    try:
        cfg, notes = fam.to_model_config(read)
    except (KeyError, TypeError, ValueError) as exc:  # a key missing from config.json, or of the wrong type
        key = f"while reading {read.last!r}: " if read.last is not None and not isinstance(exc, KeyError) else ""
        raise MoecptError(f"{folder.path / 'config.json'}: missing or invalid {fam.name} setting "
                          f"({key}{_one_line(exc)}); fix config.json") from None
    fused = lambda i: f"model.layers.{i}.{fam.moe_block}.experts.gate_up_proj" in folder.headers
    pieces = fam.checkpoint_pieces(folder.config, fam.plan(cfg, fused))
    need = {pc.hf: pc for pc in pieces}
    scales = {_scales_name(pc): pc for pc in pieces if pc.op == PieceOp.MXFP4}
    missing = [n for n in need if n not in folder.headers]
    if missing:
        raise MoecptError(f"{len(missing)} tensor(s) that config.json implies are missing from {folder.path} "
                          f"(first: {missing[0]}); the weights do not match the config or a shard is incomplete")
    missing = [n for n in scales if n not in folder.headers]
    if missing:
        raise MoecptError(f"{len(missing)} MXFP4 scale tensor(s) are missing from {folder.path} (first: "
                          f"{missing[0]}); the weights do not match the config or a shard is incomplete")
    need.update(scales)
    dropped = {n for n in folder.headers if n not in need and fam.ignored(folder.config, n)}
    if dropped:
        notes.append(fam.ignored_note(folder.config))
    extra = [n for n in folder.headers if n not in need and not _IGNORED.search(n) and n not in dropped
             and not (cfg.tie_embeddings and n == "lm_head.weight")]
    if extra:
        raise MoecptError(f"{len(extra)} tensor(s) in {folder.path} are not described by config.json "
                          f"(first: {extra[0]}); the weights do not match the config")
    for pc in pieces:
        dt, shape = folder.headers[pc.hf]
        if pc.op == PieceOp.MXFP4:
            _check_mxfp4(folder, pc)
            continue
        if shape != pc.hf_shape:
            raise MoecptError(f"tensor {pc.hf} has shape {list(shape)} but config.json implies "
                              f"{list(pc.hf_shape)}; the weights do not match the config")
        if dt not in SAFETENSORS_DTYPES:
            raise MoecptError(f"tensor {pc.hf} is stored as {dt}; only float weights (F32/BF16/F16) are supported "
                              "(quantised checkpoints are not)")
    return cfg, notes, pieces


def _scales_name(pc: Piece) -> str:
    return pc.hf.removesuffix("_blocks") + "_scales"


def _check_mxfp4(folder: HFFolder, pc: Piece) -> None:
    """An MXFP4 tensor: uint8 blocks and scales of the shapes the config implies, in one shard."""
    want_scales = pc.hf_shape[:-1]
    for name, want in ((pc.hf, pc.hf_shape), (_scales_name(pc), want_scales)):
        dt, shape = folder.headers[name]
        if dt != "U8" or shape != want:
            raise MoecptError(f"MXFP4 tensor {name} is {dt} {list(shape)}; config.json implies U8 {list(want)}")
    if folder.weight_map[pc.hf] != folder.weight_map[_scales_name(pc)]:
        raise MoecptError(f"MXFP4 tensor {pc.hf} and its scales lie in different shards; moecpt reads them from "
                          "one (re-save the model with transformers)")


def stored_dtype(folder: HFFolder, pieces: list[Piece]) -> torch.dtype:
    """The dtype all weights share, or fp32 when they differ (MXFP4 tensors do not count: they dequantise to
    any dtype exactly)."""
    kinds = {folder.headers[pc.hf][0] for pc in pieces if pc.op != PieceOp.MXFP4}
    return SAFETENSORS_DTYPES[kinds.pop()] if len(kinds) == 1 else torch.float32


def read_state(folder: HFFolder, cfg, pieces: list[Piece], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The moecpt state dict of ``folder``, streamed shard by shard (peak about the model plus one shard).

    Tied embeddings: ``lm_head.weight`` is the same tensor as ``tok_emb.weight``.
    """
    shapes = {k: tuple(v.shape) for k, v in build_model(cfg, "meta").state_dict().items()}
    state = {name: torch.empty(shapes[name], dtype=dtype) for name in dict.fromkeys(pc.dst for pc in pieces)}
    by_shard: dict[Path, list[Piece]] = {}
    for pc in pieces:
        by_shard.setdefault(folder.weight_map[pc.hf], []).append(pc)
    for shard in folder.shards:
        todo = by_shard.get(shard)
        if not todo:
            continue
        try:
            with safe_open(str(shard), framework="pt", device="cpu") as f:
                for pc in todo:
                    t = f.get_tensor(pc.hf)
                    if pc.op == PieceOp.MXFP4:
                        t = (t, f.get_tensor(_scales_name(pc)))
                    with torch.no_grad():
                        place(state[pc.dst], t, pc)
                    del t
        except Exception as exc:  # noqa: BLE001 (as above: keep the one-line contract)
            raise MoecptError(f"reading shard {shard.name} of {folder.path} failed ({_one_line(exc)}); "
                              "it is corrupted: download it again") from None
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["tok_emb.weight"]
    missing = set(shapes) - set(state)
    if missing:  # cannot happen for the supported families: every moecpt tensor has an HF source
        raise MoecptError(f"no Hugging Face tensor maps to {min(missing)}")
    return state


# ------------------------------------------------------------------------------------------------- tokenizer
def model_eos_ids(folder: Path) -> list[int]:
    """The ids the model ends sequences with: ``eos_token_id`` of ``config.json``, then of
    ``generation_config.json`` (each an id or a list), in that order, each once."""
    out: list[int] = []
    for name in ("config.json", "generation_config.json"):
        try:
            value = json.loads((folder / name).read_text()).get("eos_token_id")
        except (OSError, ValueError, AttributeError):
            continue
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, int) and not isinstance(v, bool) and v >= 0 and v not in out:
                out.append(v)
    return out


def canonical_tokenizer(folder: Path, vocab_size: int, allow_missing: bool = False):
    """``(tokenizer.json bytes or None, eod_id or None, notes)``: the folder's tokenizer in the canonical form
    ``moecpt data prepare`` writes (an end-of-document token added if it has none).

    Raises:
        MoecptError: no tokenizer.json (unless ``allow_missing``), an unreadable one, or one with more tokens
            than the model's vocabulary.
    """
    f = folder / TOKENIZER_FILE
    if not f.is_file():
        if allow_missing:
            return None, None, ["no tokenizer.json: the checkpoint has no tokenizer (tokenizer_sha256 is null)"]
        hint = ""
        if (folder / "tokenizer.model").is_file():
            hint = ("; it has only tokenizer.model: convert it with transformers "
                    "(AutoTokenizer.from_pretrained(PATH).save_pretrained(PATH))")
        raise MoecptError(f"{folder} has no {TOKENIZER_FILE}{hint}; add the model's tokenizer, or pass "
                          "--allow-missing-tokenizer")

    try:
        tok = Tokenizer.from_file(str(f))
    except Exception as exc:  # noqa: BLE001 (tokenizers raises a plain Exception on a bad file)
        raise MoecptError(f"{f} is not a valid tokenizer.json ({_one_line(exc)})") from None
    before = tok.get_vocab_size(with_added_tokens=True)
    eod = ensure_eod(tok, model_eos_ids(folder))  # the model's own EOS, so CPT ends documents as it was trained to
    n = tok.get_vocab_size(with_added_tokens=True)
    notes = [f"tokenizer had no end-of-document token: '<|endoftext|>' added as id {eod}"] if n != before else []
    if n > vocab_size or eod >= vocab_size:
        raise MoecptError(f"the tokenizer in {folder} has {n} tokens but the model's vocabulary is {vocab_size}; "
                          "they do not belong together")
    return tokenizer_bytes(tok), eod, notes


# ---------------------------------------------------------------------------------------------------- import
def import_hf(path: str | Path, out: str | Path, *, dtype: str | torch.dtype | None = "auto",
              allow_missing_tokenizer: bool = False) -> dict[str, Any]:
    """Convert a Hugging Face MoE folder into a moecpt checkpoint folder ``out``.

    Args:
        path: local Hugging Face folder of a supported family (:data:`~moecpt.interop.families.FAMILIES`).
        out: the checkpoint folder to create (must not exist).
        dtype: ``auto`` keeps the stored dtype; ``fp32`` / ``bf16`` / ``fp16`` convert.
        allow_missing_tokenizer: import a folder without ``tokenizer.json`` (the checkpoint then has none).

    Returns:
        a summary: ``out``, ``family``, ``params``, ``dtype``, ``tokenizer_sha256``, ``notes``.

    Raises:
        MoecptError: any bad input (see :func:`open_hf_folder`, :func:`plan_import`,
            :func:`canonical_tokenizer`); ``out`` exists, is or lies inside ``path`` (or holds it), or cannot be
            created; writing fails (read-only file system, permission denied, disk full: one line naming the
            path). Nothing is left under ``out`` on failure.
    """
    out = check_new_output(out, [path])
    folder = open_hf_folder(path)
    cfg, notes, pieces = plan_import(folder)
    tok_bytes, eod, tok_notes = canonical_tokenizer(folder.path, cfg.vocab_size, allow_missing_tokenizer)
    notes += tok_notes
    target = resolve_dtype(dtype) or stored_dtype(folder, pieces)
    sha = sha256_bytes(tok_bytes) if tok_bytes is not None else None
    fam = folder.family
    meta = {
        "step": 0,
        "tokens": 0,
        "run_name": f"import-{fam.name}",
        "mode": "import",
        "model_config": cfg.model_dump(mode="json"),
        "tokenizer_sha256": sha,
        "imported_from": {
            "family": fam.name,
            "path": str(folder.path.resolve()),
            "architecture": fam.architecture,
            "reference": fam.reference,
            "dtype": str(target).removeprefix("torch."),
            "eod_id": eod,
            "notes": notes,
            "hf_config": folder.config,
        },
        "lineage": None,
    }
    state = read_state(folder, cfg, pieces, target)
    n_params = sum(t.numel() for name, t in state.items() if not (cfg.tie_embeddings and name == "lm_head.weight"))
    staging = out.with_name(temp_name(out.name))
    try:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            save_checkpoint(staging, model_state=state, meta=meta)
            del state
            if tok_bytes is not None:
                write_bytes_atomic(staging / TOKENIZER_FILE, tok_bytes)
            side = [folder.path / n for n in SIDE_FILES if (folder.path / n).is_file()]
            if side:
                (staging / HF_SIDE_DIR).mkdir()
                for f in side:
                    shutil.copyfile(f, staging / HF_SIDE_DIR / f.name)
                fsync_dir(staging / HF_SIDE_DIR)
            write_marker(staging, "import-hf", [folder.path])  # before publishing: the folder is provably ours
            publish_dir(staging, out, "import")
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    except Exception as exc:  # a full disk, a read-only file system, ...: one line; anything else is a bug
        err = write_error(exc, out)
        if err is None:
            raise
        raise err from None
    return {"out": str(out), "family": fam.name, "params": n_params, "dtype": meta["imported_from"]["dtype"],
            "tokenizer_sha256": sha, "notes": notes}


def load_hf_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """Import a Hugging Face MoE folder in memory: the moecpt :class:`~moecpt.model.transformer.Transformer` in
    eval mode (weights in ``dtype``, fp32 by default, as :func:`moecpt.train.checkpoint.load_model` gives).

    The model is built on the meta device and the streamed tensors are assigned to it (no second copy), so peak
    memory is about the model plus one shard. ``model.imported_from`` records the family and path.

    Raises:
        MoecptError: as :func:`import_hf` (the tokenizer is not needed).
    """
    folder = open_hf_folder(path)
    cfg, notes, pieces = plan_import(folder)
    state = read_state(folder, cfg, pieces, dtype)
    model = build_model(cfg, "meta")
    model.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    model.rope_cos, model.rope_sin = rope_tables(cfg)
    for router in model.routers():  # the other non-persistent buffer, still on the meta device
        if router.is_bias_balanced:
            router.step_load = torch.zeros(router.num_experts)
    model.imported_from = {"family": folder.family.name, "path": str(folder.path.resolve()), "notes": notes}
    return model.to(device).eval()
