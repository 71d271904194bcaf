"""``moecpt export-hf``: a moecpt checkpoint -> a Hugging Face folder that ``AutoModelForCausalLM`` loads.

The family is the one the model was imported from when it still fits, else the first of OLMoE, Qwen3-MoE, Mixtral,
Qwen2-MoE, GLM-4.5, dots.llm1, DeepSeek-V3, DeepSeek-V2 that represents the model *exactly*
(:func:`moecpt.interop.families.choose_family`; the mapping is in ``docs/interop.md``). A feature no family has
(Switch capacity dropping, a softmax bias-balanced router, Sinkhorn top-1's sigmoid gates, a dense model) is
refused with one line naming it.

Tensors are written in the per-expert layout every transformers version reads (``experts.{e}.gate_proj`` ...;
transformers >= 5 fuses them on load), streamed from the checkpoint's safetensors one tensor at a time into shards
of at most ``max_shard_size`` (so memory stays about one shard). ``config.json`` is written as plain JSON in the
family's established keys, so export needs no transformers install. The folder is assembled in a temp folder next
to ``--out`` and renamed at the end: a failed export leaves nothing under ``--out``. The temp folder gets moecpt's
output marker (``.moecpt-output.json``, :func:`moecpt.storage.outputs.write_marker`) before it is published.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer

from moecpt.config import ModelConfig, build_section
from moecpt.data.tokenizer import eod_id_of
from moecpt.errors import MoecptError
from moecpt.interop.families import choose_family, extract
from moecpt.interop.hf_import import (
    HF_SIDE_DIR,
    INDEX_FILE,
    SAFETENSORS_DTYPES,
    SIDE_FILES,
    TOKENIZER_FILE,
    resolve_dtype,
    write_error,
)
from moecpt.storage.atomic import apply_umask, dumps_json, fsync_file, publish_dir, temp_name
from moecpt.storage.outputs import check_new_output, check_outside_inputs, write_marker
from moecpt.train.checkpoint import load_checkpoint

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """``"5GB"`` -> 5e9 bytes, ``"100KiB"`` -> 102400 (decimal and binary units, as transformers)."""
    if isinstance(text, int):
        return text
    m = _SIZE_RE.match(str(text))
    if not m:
        raise MoecptError(f"--max-shard-size {text!r} is not a size; write e.g. 5GB, 500MB or 100KiB")
    size = int(float(m[1]) * _UNITS[(m[2] or "B").upper()])
    if size < 1:
        raise MoecptError(f"--max-shard-size {text!r} must be positive")
    return size


def _tokenizer_dir(ck_path: Path) -> Path | None:
    """The folder holding the checkpoint's ``tokenizer.json``: the checkpoint itself (an import) or its run."""
    for p in (ck_path, ck_path.parent.parent):
        if (p / TOKENIZER_FILE).is_file():
            return p
    return None


def _import_origin(ck) -> tuple[dict, Path | None]:
    """``(imported_from, hf side-file folder)`` of a checkpoint: its own, or that of the nearest ancestor in its CPT
    lineage that was imported (so a CPT of an imported model keeps the original token ids and tokenizer files)."""
    meta, path = ck.meta, ck.path
    for _ in range(32):
        if meta.get("imported_from"):
            if meta.get("tokenizer_sha256") != ck.meta.get("tokenizer_sha256"):  # another tokenizer since
                return {"family": meta["imported_from"].get("family")}, None
            side = path / HF_SIDE_DIR
            return meta["imported_from"], (side if side.is_dir() else None)
        parent = (meta.get("lineage") or {}).get("parent_checkpoint")
        if not parent or not (Path(parent) / "meta.json").is_file():
            break
        path = Path(parent)
        try:
            meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            break
    return {}, None


def export_hf(ckpt: str | Path, out: str | Path, *, family: str = "auto", dtype: str | None = "auto",
              max_shard_size: str | int = "5GB") -> dict[str, Any]:
    """Write checkpoint ``ckpt`` (a checkpoint or run folder) as a Hugging Face folder ``out``.

    Args:
        family: ``auto`` or a name of :data:`~moecpt.interop.families.FAMILIES` (``olmoe``, ``mixtral``,
            ``qwen2_moe``, ``qwen3_moe``, ``glm4_moe``, ``dots1``, ``deepseek_v3``, ``deepseek_v2``).
        dtype: ``auto`` (as stored), ``fp32``, ``bf16`` or ``fp16``.
        max_shard_size: largest shard, e.g. ``"5GB"``; one shard gives ``model.safetensors``, more give
            ``model-0000i-of-0000N.safetensors`` and ``model.safetensors.index.json``.

    Returns:
        a summary: ``out``, ``family``, ``shards``, ``dtype``, ``notes``.

    Raises:
        MoecptError: no readable checkpoint, ``out`` exists, is or lies inside the checkpoint / run folder (or
            holds it), or cannot be created; a model no family represents, a checkpoint tensor the family has no
            place for; writing fails (read-only file system, permission denied, disk full: one line naming the
            path). Nothing is left under ``out`` on failure.
    """
    out = check_new_output(out, [ckpt])
    limit = parse_size(max_shard_size)
    ck = load_checkpoint(ckpt)
    check_outside_inputs(out, [ck.path])  # ``ckpt`` may have named a file inside the checkpoint folder
    if ck.sharded:  # the export streams tensors out of model.safetensors, which a DCP checkpoint does not have
        raise MoecptError(f"{ck.path} is a sharded (DCP) checkpoint; run `moecpt checkpoint consolidate {ck.path} "
                          "--out FOLDER` first and export FOLDER")
    raw = ck.meta.get("model_config")
    if not isinstance(raw, dict):
        raise MoecptError(f"checkpoint {ck.path} has no model_config in its meta.json; it holds no moecpt model")
    cfg = build_section(ModelConfig, raw, "model_config")
    imported, side_dir = _import_origin(ck)
    fam = choose_family(cfg, family, imported.get("family"))
    cfg_out, synth, notes = fam.adapt(cfg)
    pieces = fam.plan(cfg_out)

    src_file = ck.path / "model.safetensors"
    aliases: dict[str, str] = ck.manifest.get("aliases", {})
    target = _target_dtype(src_file, aliases, pieces, fam.name, dtype)
    dtype_name = str(target).removeprefix("torch.")

    hf_cfg = fam.hf_config(cfg_out)
    hf_cfg["torch_dtype"] = dtype_name
    orig = imported.get("hf_config") or {}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if key in orig:
            hf_cfg[key] = orig[key]
    if orig.get("quantization_config"):
        notes.append(f"the source's {orig['quantization_config'].get('quant_method', 'quantised')} weights are "
                     f"written unquantised ({dtype_name}), without a quantization_config")
    tok_dir = _tokenizer_dir(ck.path)
    eod_token = _eod_from_tokenizer(tok_dir, hf_cfg)
    if tok_dir is None:
        notes.append("the checkpoint has no tokenizer.json: the folder has weights and config only")

    staging = out.with_name(temp_name(out.name))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging.mkdir()
    except OSError as exc:
        raise write_error(exc, out) from None
    try:
        names = _write_shards(staging, pieces, synth, src_file, aliases, target, limit)
        (staging / "config.json").write_bytes(dumps_json(hf_cfg))
        if tok_dir is not None:
            _copy_tokenizer_files(staging, tok_dir, side_dir, cfg.max_seq_len, eod_token)
        write_marker(staging, "export-hf", [ck.path])  # before publishing: the folder is provably ours
        publish_dir(staging, out, "export")
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        err = write_error(exc, out) if isinstance(exc, Exception) else None
        if err is None:
            raise
        raise err from None
    return {"out": str(out), "family": fam.name, "architecture": fam.architecture, "shards": names,
            "dtype": dtype_name, "notes": notes}


def _target_dtype(src_file: Path, aliases: dict[str, str], pieces: list, fam_name: str,
                  dtype: str | None) -> torch.dtype:
    """The dtype to export in: ``dtype`` resolved, or for ``auto`` the one dtype of the source tensors the pieces
    use (fp32 if they mix dtypes).

    Raises:
        MoecptError: a checkpoint tensor no piece of family ``fam_name`` uses (it would be dropped).
    """
    with safe_open(str(src_file), framework="pt", device="cpu") as f:
        stored = {name: f.get_slice(name).get_dtype() for name in f.keys()}  # noqa: SIM118
    used = {aliases.get(pc.dst, pc.dst) for pc in pieces}
    unused = sorted(set(stored) - used)
    if unused:
        raise MoecptError(f"checkpoint tensor {unused[0]} has no place in {fam_name}; refusing to drop it")
    kinds = {stored[n] for n in used if n in stored}
    return resolve_dtype(dtype) or (SAFETENSORS_DTYPES.get(kinds.pop(), torch.float32) if len(kinds) == 1
                                    else torch.float32)


def _eod_from_tokenizer(tok_dir: Path | None, hf_cfg: dict[str, Any]) -> str | None:
    """When ``hf_cfg`` has no ``eos_token_id`` and ``tok_dir`` holds a tokenizer with an end-of-document token, set
    ``hf_cfg["eos_token_id"]`` to its id and return the token's text; else ``None`` (``hf_cfg`` untouched)."""
    eod_token = None
    if tok_dir is not None and "eos_token_id" not in hf_cfg:
        tok = Tokenizer.from_file(str(tok_dir / TOKENIZER_FILE))
        try:
            eod = eod_id_of(tok)
            hf_cfg["eos_token_id"] = eod
            eod_token = tok.id_to_token(eod)
        except MoecptError:
            pass
    return eod_token


def _write_shards(staging: Path, pieces: list, synth: dict, src_file: Path, aliases: dict[str, str],
                  target: torch.dtype, limit: int) -> list[str]:
    """Stream the family's ``pieces`` from ``src_file`` into ``staging`` as safetensors shards of at most ``limit``
    bytes in dtype ``target`` (one shard: ``model.safetensors``; more: numbered shards plus the index file), and
    return the shard file names in order."""
    parts: list[tuple[Path, list[str]]] = []
    total = 0
    cache: dict[str, torch.Tensor] = {}

    def get(name: str) -> torch.Tensor:
        name = aliases.get(name, name)
        if name not in cache:  # pieces come in state-dict order: keep one source tensor at a time
            cache.clear()
            # a fresh mapping per tensor: pages read stay resident only while the file is open
            with safe_open(str(src_file), framework="pt", device="cpu") as f:
                cache[name] = f.get_tensor(name)
        return cache[name]

    shard: dict[str, torch.Tensor] = {}
    size = 0

    def flush() -> None:
        nonlocal shard, size
        if not shard:
            return
        p = staging / f"part-{len(parts):05d}.safetensors"
        save_file(shard, str(p), metadata={"format": "pt"})
        apply_umask(p)  # safetensors creates its files 0600 whatever the umask
        fsync_file(p)
        parts.append((p, list(shard)))
        shard, size = {}, 0

    for pc in pieces:
        src = synth[pc.dst](get) if pc.dst in synth else get(pc.dst)
        t = extract(src, pc).to(dtype=target, copy=True)
        nbytes = t.numel() * t.element_size()
        if shard and size + nbytes > limit:
            flush()
        shard[pc.hf] = t
        size += nbytes
        total += nbytes
    flush()
    weight_map: dict[str, str] = {}
    names: list[str] = []
    for k, (p, keys) in enumerate(parts):
        name = "model.safetensors" if len(parts) == 1 else f"model-{k + 1:05d}-of-{len(parts):05d}.safetensors"
        os.rename(p, staging / name)
        names.append(name)
        weight_map.update({key: name for key in keys})
    if len(parts) > 1:
        (staging / INDEX_FILE).write_bytes(dumps_json({"metadata": {"total_size": total},
                                                       "weight_map": weight_map}))
    return names


def _copy_tokenizer_files(staging: Path, tok_dir: Path, side_dir: Path | None, max_seq_len: int,
                          eod_token: str | None) -> None:
    """Copy ``tokenizer.json`` from ``tok_dir`` and the HF side files found in ``side_dir`` into ``staging``; write
    a minimal ``tokenizer_config.json`` (``model_max_length`` = ``max_seq_len``, ``eos_token`` = ``eod_token`` if
    known) when the side files brought none."""
    shutil.copyfile(tok_dir / TOKENIZER_FILE, staging / TOKENIZER_FILE)
    for n in SIDE_FILES:
        if side_dir is not None and (side_dir / n).is_file():
            shutil.copyfile(side_dir / n, staging / n)
    if not (staging / "tokenizer_config.json").is_file():
        tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_seq_len,
                   "clean_up_tokenization_spaces": False}
        if eod_token is not None:
            tok_cfg["eos_token"] = eod_token
        (staging / "tokenizer_config.json").write_bytes(dumps_json(tok_cfg))
