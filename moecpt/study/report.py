"""The report of ``moecpt study``: findings, tables and figures of a CPT study, as ``study.json``, ``report.md`` and a
self-contained ``report.html``.

The study reproduces Thérien et al., "Continual Pre-training of MoEs: How robust is your router?" (arXiv 2503.05029,
TMLR 2025) at small scale, every stage once per seed, with a no-shift control per CPT schedule; the decision rules
are in ``docs/study-rules.md``. :func:`write_report` takes the study runner's ``results`` dict and parses it once
into the records of :mod:`moecpt.study.results` (the schema: a malformed field is refused in one line, an optional
one takes its documented default, so older and partial studies still get a report); the readers the report, the
findings and the plots share are in :mod:`moecpt.study.readers`, :func:`fmt` in :mod:`moecpt.study.numbers`. Runs
are grouped across seeds by their key without the ``sN/`` prefix (:func:`base_key`): a study *cell*.

The findings (:func:`moecpt.study.findings.evaluate_findings`) come per finding as ``{"id", "title", "verdict",
"reproduced", "rule", "evidence", "n_seeds", "parts": [{"name", "title", "kind", "verdict", "n_seeds", "mean",
"lo", "hi", "min", "max", "per_seed", "seeds_agreeing", "margin", "untested"}], "figures"}``; the headline effect of
a finding is its first tested part (or the part named by an optional ``"headline"``). Findings of the older format
(``reproduced`` and ``figures`` only) still render.

The outputs:

- ``study.json``: ``results`` plus ``findings``, ``questions`` (:func:`moecpt.study.findings.answer_questions`),
  ``overview``, ``tables`` (the raw numbers of every report table, and every number the report derives) and
  ``plots``; written atomically;
- ``plots/*.png`` (:mod:`moecpt.study.plots`): seed means as lines, the seeds' min-max as shaded bands;
- ``report.md`` and ``report.html`` (blocks: :mod:`moecpt.study.blocks`; tables: :mod:`moecpt.study.tables`;
  renderers: :mod:`moecpt.study.render`): both rendered from ONE list of blocks (heading / paragraph / list / table /
  image), and every number in them goes through :func:`fmt` (4 significant digits) from a value stored in
  ``study.json``, so the two documents cannot diverge and every printed number can be traced to the JSON.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt

from moecpt.storage.atomic import write_bytes_atomic, write_json_atomic
from moecpt.storage.outputs import FileLedger
from moecpt.study import findings as fnd
from moecpt.study import plots as plots_mod
from moecpt.study.blocks import PLOTS, build_blocks, headline_part, study_name
from moecpt.study.numbers import fmt
from moecpt.study.readers import seed_groups, study_seeds
from moecpt.study.render import render_html, render_markdown
from moecpt.study.results import base_key, parse_results
from moecpt.study.tables import build_overview, build_tables

__all__ = ["write_report", "build_tables", "build_overview", "build_blocks", "render_markdown", "render_html", "fmt",
           "PLOTS", "report_files", "base_key", "study_seeds", "seed_groups", "headline_part"]


def _json_clean(x: Any) -> Any:
    """JSON-ready copy: tuples to lists, non-finite floats to None, mapping keys to str."""
    if isinstance(x, Mapping):
        return {str(k): _json_clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_clean(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, Path):
        return str(x)
    if hasattr(x, "tolist") and not isinstance(x, (str, bytes)):  # numpy / torch scalars and arrays
        return _json_clean(x.tolist())
    return x


def report_files(out_dir: str | Path) -> list[Path]:
    """Every file :func:`write_report` may write or replace in ``out_dir``."""
    out_dir = Path(out_dir)
    return [out_dir / "study.json", out_dir / "report.md", out_dir / "report.html",
            *(out_dir / "plots" / f"{stem}.png" for stem, _, _ in PLOTS)]


def write_report(results: dict, out_dir: str | Path) -> dict:
    """Write the study report into ``out_dir``: ``study.json``, ``plots/*.png``, ``report.md``, ``report.html``.

    Adds ``findings``, ``questions``, ``overview``, ``tables`` and ``plots`` to ``results`` (in place) and writes
    the whole dict to ``study.json`` atomically (temp file + rename). A plot without data is skipped.

    Returns:
        ``{"study_json": Path, "report_md": Path, "report_html": Path, "plots": {stem: Path | None},
        "findings": [...]}``.

    Raises:
        MoecptError: a field of ``results`` is missing or malformed (:func:`moecpt.study.results.parse_results`;
            nothing is written then), or a file of the report exists and is not the one moecpt wrote.
    """
    res = parse_results(results)
    out_dir = Path(out_dir)
    plot_dir = out_dir / "plots"
    study_path, md_path, html_path = out_dir / "study.json", out_dir / "report.md", out_dir / "report.html"
    ledger = FileLedger(out_dir)
    # every file of the report is checked before any is written: a user's report.md is refused, not replaced
    ledger.check_replaceable(*report_files(out_dir))
    plot_dir.mkdir(parents=True, exist_ok=True)

    results["findings"] = fnd.evaluate_findings(res)
    results["questions"] = fnd.answer_questions(res, results["findings"])
    results["overview"] = build_overview(res)
    results["tables"] = build_tables(res)

    plot_paths: dict[str, Path | None] = {}
    for stem, fn, _caption in PLOTS:
        target = plot_dir / f"{stem}.png"
        try:
            plot_paths[stem] = getattr(plots_mod, fn)(res, target)
        finally:
            plt.close("all")
        if plot_paths[stem] is None:
            ledger.remove(target)  # a stale figure of an earlier run must not be shown
        else:
            ledger.record(target)
    results["plots"] = {s: (f"plots/{p.name}" if p else None) for s, p in plot_paths.items()}

    study = _json_clean(results)
    write_json_atomic(study_path, study)
    ledger.record(study_path)

    blocks = build_blocks(study, study["plots"], out_dir)
    write_bytes_atomic(md_path, render_markdown(blocks).encode("utf-8"))
    title = f"moecpt study: {study_name(res)}"
    write_bytes_atomic(html_path, render_html(blocks, title).encode("utf-8"))
    ledger.record(md_path, html_path)
    return {"study_json": study_path, "report_md": md_path, "report_html": html_path, "plots": plot_paths,
            "findings": results["findings"]}
