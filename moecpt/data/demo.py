"""The bundled demo data: three prepared sources (``english``, ``code``, ``german``) shipped in ``moecpt/demo_data``.

The bundle holds a prepared folder whose token shards are xz-compressed (``<source>/<split>.npy.xz``) plus
``bundle.json`` listing the sha256 of every bundled file. On first use :func:`demo_path` unpacks it into
``$MOECPT_CACHE/demo-<hash>`` (default ``~/.cache/moecpt``), keyed by the hash of ``bundle.json``, so a new bundle
never reuses an old cache. Unpacking goes to a private temporary folder renamed into place: two processes racing
both succeed and neither sees a partial folder. Regenerate the bundle with ``scripts/build_demo_data.py``.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import shutil
import uuid
from pathlib import Path

from moecpt.errors import MoecptError

BUNDLE_INDEX = "bundle.json"


def bundle_dir() -> Path:
    """Folder of the bundled demo data inside the installed package."""
    return Path(__file__).resolve().parents[1] / "demo_data"


def cache_root() -> Path:
    """``$MOECPT_CACHE`` or ``~/.cache/moecpt``."""
    return Path(os.environ.get("MOECPT_CACHE") or Path.home() / ".cache" / "moecpt").expanduser()


def _bundle_index() -> tuple[dict, str]:
    index_path = bundle_dir() / BUNDLE_INDEX
    if not index_path.is_file():
        raise MoecptError(
            f"the bundled demo data is missing ({index_path}); reinstall moecpt or run scripts/build_demo_data.py"
        )
    raw = index_path.read_bytes()
    return json.loads(raw), hashlib.sha256(raw).hexdigest()[:16]


def demo_path() -> Path:
    """Path of the unpacked demo prepared folder, unpacking the bundle into the cache on first use.

    Raises:
        MoecptError: the bundle is missing or damaged, or the cache folder is not writable.
    """
    index, key = _bundle_index()
    final = cache_root() / f"demo-{key}"
    if (final / "manifest.json").is_file():
        return final
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".tmp-demo-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
    except OSError as exc:
        raise MoecptError(f"cannot write the demo data cache {final.parent} ({exc}); set MOECPT_CACHE") from None
    try:
        _unpack(index, tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process finished first (rename onto a non-empty folder fails): use its copy.
            if not (final / "manifest.json").is_file():
                raise MoecptError(f"the demo data cache {final} is damaged; delete that folder and retry") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _unpack(index: dict, dst: Path) -> None:
    src = bundle_dir()
    manifest = None
    for rel, sha in index["files"].items():
        data = (src / rel).read_bytes()
        if hashlib.sha256(data).hexdigest() != sha:
            raise MoecptError(f"bundled demo file {src / rel} is damaged (sha256 mismatch); reinstall moecpt")
        if rel.endswith(".xz"):
            data, rel = lzma.decompress(data), rel[: -len(".xz")]
        if rel == "manifest.json":
            manifest = data  # written last: its presence marks the folder complete
            continue
        out = dst / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(data)
    if manifest is None:
        raise MoecptError("the bundled demo data has no manifest.json; reinstall moecpt")
    (dst / "manifest.json").write_bytes(manifest)
