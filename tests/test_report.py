"""Study report on crafted multi-seed results: sections, findings table, the n < 3 caveat, the Sinkhorn MRI note,
seed bands in the plots, old-schema compatibility, and every printed number traceable to study.json.

The findings are hand-made in the format of :mod:`moecpt.study.findings` (``evaluate_findings`` /
``answer_questions`` are monkeypatched), so these tests exercise the report alone; the findings rules have their
own tests.
"""

from __future__ import annotations

import copy
import html as html_mod
import json
import re
from pathlib import Path

import pytest

from moecpt.study import findings as fnd
from moecpt.study import plots
from moecpt.study.report import (
    _json_clean, build_blocks, build_overview, build_tables, fmt, render_html, render_markdown, write_report,
)

OLD, NEW = "english", "code"
PRE_STEPS, CPT_STEPS, TOK_PER_STEP = 100, 50, 1000
INF_BRANCH = 80  # inf CPT branches from the pre-anneal checkpoint (80% of pre-training)

BASE_OLD = {"dense": 3.0, "granular-pb": 2.6, "granular-sb": 2.7}
BASE_NEW = {"dense": 2.0, "granular-pb": 1.6, "granular-sb": 1.7}
FORGET = {0.0: 0.5, 0.3: 0.2}
NEW_PENALTY = {0.0: 0.0, 0.3: 0.05}
CRS = {0.0: [0.5, 0.8, 0.85], 0.3: [0.6, 0.9, 0.9]}
CRS_CONTROL = [0.9, 0.95, 0.95]
MODELS = {
    "dense": {"preset": "demo-dense", "arch": "dense", "router": None, "is_moe": False,
              "total_params": 1_000_000, "active_params": 1_000_000, "train_flops_per_token": 6.0e6},
    "granular-pb": {"preset": "demo-granular", "arch": "granular", "router": "penalty", "is_moe": True,
                    "total_params": 3_500_000, "active_params": 1_000_000, "train_flops_per_token": 6.2e6},
    "granular-sb": {"preset": "demo-granular", "arch": "granular", "router": "sinkhorn", "is_moe": True,
                    "total_params": 3_500_000, "active_params": 1_000_000, "train_flops_per_token": 6.2e6},
}
PRE_MRI = {"granular-pb": 0.20, "granular-sb": 0.15}  # training MRI of pre-training
EVAL_MRI = {"granular-pb": 0.22, "granular-sb": 0.4375}  # held-out evaluation MRI of the final pre-training checkpoint


def _cpt_mri(model: str, control: bool) -> list[float]:
    if control:
        return [PRE_MRI[model] + 0.01] * CPT_STEPS
    if model == "granular-pb":
        return [0.6] * 3 + [0.12] * (CPT_STEPS - 3)
    return [0.17] * 3 + [0.16] * (CPT_STEPS - 3)


def _val(losses_by_source: dict[str, tuple[float, float]], steps: int) -> dict:
    return {s: [[i, i * TOK_PER_STEP, a + (b - a) * i / steps] for i in range(0, steps + 1, 10)]
            for s, (a, b) in losses_by_source.items()}


def _eval(v: float, moe: bool, mri: float) -> dict:
    return {"loss": v, "mri_mean": mri, "mri_layers": [mri] * 3} if moe else {"loss": v}


def make_results(seeds: tuple[int, ...] | None = (0, 1, 2)) -> dict:
    """A study of three models; ``seeds=None`` gives the older one-seed schema (no seeds, no prefixes, no
    controls, no optimizer fields)."""
    new_schema = seeds is not None
    runs, comparisons, forgetting = {}, {}, {}
    for seed in seeds if new_schema else (0,):
        tag = f"s{seed}/" if new_schema else ""
        noise = 0.01 * seed

        def add(key: str, run: dict) -> None:
            if new_schema:
                run["seed"] = seed
                run.setdefault("optimizer_state", None)
                run.setdefault("warmup_steps", 10 if run["kind"] in ("pretrain", "retrain") else 0)
                run.setdefault("control", None)
            runs[key] = run

        for m in MODELS:
            moe = MODELS[m]["is_moe"]
            pre = {OLD: BASE_OLD[m] + noise, NEW: BASE_NEW[m] + 1.0 + noise}
            add(f"{tag}pretrain/{m}", {
                "kind": "pretrain", "model": m, "shift": None, "replay": None, "schedule": None, "parent": None,
                "parent_step": None, "start_tokens": 0, "steps": PRE_STEPS, "tokens": PRE_STEPS * TOK_PER_STEP,
                "train_flops": 6e6 * PRE_STEPS * TOK_PER_STEP,
                "val": _val({s: (v + 3.0, v) for s, v in pre.items()}, PRE_STEPS),
                "train_mri": [[i, PRE_MRI[m] + noise, [PRE_MRI[m] + noise] * 3] for i in range(PRE_STEPS)] if moe
                else [],
                "final": {s: _eval(v, moe, EVAL_MRI.get(m, 0.0) + noise) for s, v in pre.items()}, "start": None,
            })
            for sched in ("inf", "rewarm"):
                branch = INF_BRANCH if sched == "inf" else PRE_STEPS
                opt = "carried" if sched == "inf" else "fresh"
                common = {"model": m, "schedule": sched, "parent": f"{tag}pretrain/{m}", "parent_step": branch,
                          "start_tokens": branch * TOK_PER_STEP, "steps": CPT_STEPS,
                          "tokens": CPT_STEPS * TOK_PER_STEP, "train_flops": 6e6 * CPT_STEPS * TOK_PER_STEP,
                          "optimizer_state": opt, "warmup_steps": 0 if sched == "inf" else 5}
                variants = [(f"{tag}cpt/{m}/{NEW}/{sched}-r{rp:g}", rp) for rp in (0.0, 0.3)]
                ctrl_key = f"{tag}control/{m}/{sched}" if new_schema else None
                if ctrl_key:
                    variants.append((ctrl_key, None))
                for key, rp in variants:
                    control = rp is None
                    if control:
                        after = {OLD: pre[OLD] - 0.05, NEW: pre[NEW] + 0.02}
                    else:
                        after = {OLD: BASE_OLD[m] + FORGET[rp] + noise, NEW: BASE_NEW[m] + NEW_PENALTY[rp] + noise}
                    add(key, dict(common,
                                  kind="control" if control else "cpt", shift=None if control else NEW, replay=rp,
                                  control=None if control else ctrl_key,
                                  val=_val({s: (pre[s], after[s]) for s in pre}, CPT_STEPS),
                                  train_mri=[[i, v + noise, [v + noise] * 3] for i, v in
                                             enumerate(_cpt_mri(m, control))] if moe else [],
                                  final={s: _eval(v, moe, 0.21) for s, v in after.items()},
                                  start={s: _eval(v, moe, 0.2) for s, v in pre.items()}))
                    forgetting[key] = {"forgetting": {OLD: after[OLD] - pre[OLD]},
                                       "adaptation": {} if control else {NEW: pre[NEW] - after[NEW]},
                                       "mean_forgetting": after[OLD] - pre[OLD],
                                       "mean_adaptation": None if control else pre[NEW] - after[NEW],
                                       "loss_before": pre, "loss_after": after}
                    if moe:
                        crs = [c - noise for c in (CRS_CONTROL if control else CRS[rp])]
                        comparisons[key] = {"source": OLD, "crs_layers": crs, "crs_mean": sum(crs) / 3,
                                            "cvs_layers": [c - 0.05 for c in crs], "cvs_mean": sum(crs) / 3 - 0.05,
                                            "chance_overlap": 3 / 31,
                                            "coactivation_before_layers": [[[1.0, 0.5, 0.0, 0.5]] * 4] * 3,
                                            "coactivation_after_layers": [[[1.0, 0.0, 0.5, 0.5]] * 4] * 3}
        add(f"{tag}retrain/granular-pb/code", {
            "kind": "retrain", "model": "granular-pb", "shift": NEW, "replay": None, "schedule": None, "parent": None,
            "parent_step": None, "start_tokens": 0, "steps": 150, "tokens": 150 * TOK_PER_STEP,
            "train_flops": 3 * 6e6 * CPT_STEPS * TOK_PER_STEP,
            "val": _val({OLD: (5.6, 2.75 + noise), NEW: (4.6, 1.62 + noise)}, 150),
            "train_mri": [[i, 0.2, [0.2] * 3] for i in range(150)],
            "final": {OLD: {"loss": 2.75 + noise, "mri_mean": 0.2}, NEW: {"loss": 1.62 + noise, "mri_mean": 0.2}},
            "start": None,
        })
    out = {"name": "synthetic", "wall_time_s": 12.5, "old_sources": [OLD], "shifts": [NEW],
           "models": copy.deepcopy(MODELS), "runs": runs, "comparisons": comparisons, "forgetting": forgetting}
    if new_schema:
        out["seeds"] = list(seeds)
    return out


def _drop_models(results: dict, keep: set[str]) -> dict:
    r = copy.deepcopy(results)
    r["models"] = {m: v for m, v in r["models"].items() if m in keep}
    r["runs"] = {k: v for k, v in r["runs"].items() if v["model"] in keep}
    r["comparisons"] = {k: v for k, v in r["comparisons"].items() if k in r["runs"]}
    r["forgetting"] = {k: v for k, v in r["forgetting"].items() if k in r["runs"]}
    return r


# ------------------------------------------------------------------------------------------ hand-made findings
def _part(name: str, title: str, seeds: list[int], base: float, kind: str = "directional", margin=None,
          untested: str | None = None) -> dict:
    if untested:
        return {"name": name, "title": title, "kind": kind, "verdict": "untested", "n_seeds": 0, "mean": None,
                "lo": None, "hi": None, "min": None, "max": None, "per_seed": {}, "seeds_agreeing": None,
                "margin": margin, "untested": untested}
    per = {str(s): base + 0.0125 * (s + 1) for s in seeds}
    vals = list(per.values())
    mean = sum(vals) / len(vals)
    n = len(seeds)
    lo, hi = (mean - 0.03125, mean + 0.03125) if n >= 2 else (None, None)
    verdict = "inconclusive" if n < 3 else ("reproduced" if lo > 0 else "inconclusive")
    return {"name": name, "title": title, "kind": kind, "verdict": verdict, "n_seeds": n, "mean": mean, "lo": lo,
            "hi": hi, "min": min(vals), "max": max(vals), "per_seed": per,
            "seeds_agreeing": sum(v > 0 for v in vals), "margin": margin, "untested": None}


def fake_findings(results: dict) -> list[dict]:
    from moecpt.study.report import study_seeds

    seeds = study_seeds(results)
    specs = {
        "F1": [("a", "dense minus MoE final loss", 0.3)],
        "F2": [("a", "penalty spike above control", 0.35), ("b", "penalty spike above noise", 0.3),
               ("c", "Sinkhorn barely moves", 0.005, "equivalence", 0.0625), ("d", "penalty recovers", 0.15),
               ("e", "penalty ends below Sinkhorn", 0.04)],
        "F3": [("a", "smallest replay forgets most", 0.3), ("b", "replay slows adaptation", 0.05)],
        "F4": [("a", "matches re-training", 0.0025, "equivalence", 0.01), ("b", "compute", 0.3125, "check")],
        "F5": [("a", "early layers", 0.1), ("b", "0% replay", 0.1)],
        "F6": [("a", "Granular beats Switch", 0.0, "directional", None, "no Switch model"),
               ("b", "penalty beats Sinkhorn", 0.1)],
    }
    out = []
    for fid, spec in specs.items():
        parts = [_part(s[0], s[1], seeds, s[2], *s[3:]) if seeds else
                 _part(s[0], s[1], seeds, s[2], untested="no runs") for s in spec]
        tested = [p for p in parts if not p["untested"]]
        verdict = ("untested" if not tested else "reproduced" if all(p["verdict"] == "reproduced" for p in tested)
                   else "inconclusive")
        h = tested[0] if tested else None
        evidence = (f"The effect is {fmt(h['mean'])} on average over {fmt(h['n_seeds'])} seeds." if h
                    else "No runs test this finding.")
        out.append({"id": fid, "title": f"claim {fid}", "verdict": verdict,
                    "reproduced": {"reproduced": True, "not reproduced": False}.get(verdict),
                    "rule": f"Rule of {fid}: e > 0 is the paper's direction, decided on the 95% interval.",
                    "evidence": evidence, "n_seeds": len(seeds), "parts": parts,
                    "figures": {"n_runs": 7, "details": [{"group": "x", "value": 1.5}]}})
    return out


def fake_questions(results: dict, findings: list[dict] | None = None) -> list[dict]:
    return [{"question": "Do MoE routers make forgetting worse?", "verdict": "no",
             "answer": "No: the MoE forgets 0.0625 less than the dense model.", "figures": {"e": -0.0625}},
            {"question": "Do routers keep a balanced load?", "verdict": "inconclusive",
             "answer": "The evaluation MRI rises by 0.015625.", "figures": {"e": 0.015625}},
            {"question": "Are the dense strategies enough?", "verdict": "yes",
             "answer": "F3 and F4 are reproduced.", "figures": {}}]


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setattr(fnd, "evaluate_findings", fake_findings)
    monkeypatch.setattr(fnd, "answer_questions", fake_questions)


def _study(results: dict) -> dict:
    """The study dict write_report builds, without the plots (fast)."""
    r = copy.deepcopy(results)
    r["findings"] = fake_findings(r)
    r["questions"] = fake_questions(r, r["findings"])
    r["overview"] = build_overview(r)
    r["tables"] = build_tables(r)
    r["plots"] = {}
    return _json_clean(r)


def _render(results: dict) -> tuple[dict, str, str]:
    study = _study(results)
    blocks = build_blocks(study, {}, Path("."))
    return study, render_markdown(blocks), render_html(blocks)


# -------------------------------------------------------------------------------------------- traceability
_TOKEN = re.compile(r"(?<![\w.\-])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:e[+-]\d+)?(?!\w)(?!\.\d)")
# numbers of the report's fixed text: the papers' arXiv ids and years, the 95% interval
_STATIC = {"2503.05029", "2403.08763", "2025", "2024", "95"}


def _numbers_in(obj) -> set[str]:
    out: set[str] = set()
    if isinstance(obj, dict):
        for v in obj.values():
            out |= _numbers_in(v)
    elif isinstance(obj, list):
        for v in obj:
            out |= _numbers_in(v)
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        out.add(fmt(obj))
    return out


def _allowed(study: dict) -> set[str]:
    """fmt of every number of study.json, the numbers inside the findings' and answers' own sentences, and the
    fixed ones of the report's text."""
    texts = []
    for f in study.get("findings") or []:
        texts += [f.get("title") or "", f.get("rule") or "", f.get("evidence") or ""]
        texts += [(p.get("title") or "") + " " + (p.get("untested") or "") for p in f.get("parts") or []]
    for q in study.get("questions") or []:
        texts += [q.get("question") or "", q.get("answer") or ""]
    return _numbers_in(study) | set(_TOKEN.findall(" ".join(texts))) | _STATIC


def _untraced(text: str, study: dict) -> list[str]:
    allowed = _allowed(study)
    return [t for t in _TOKEN.findall(text) if t not in allowed]


def _html_text(page: str) -> str:
    page = re.sub(r"<style>.*?</style>", " ", page, flags=re.S)
    return html_mod.unescape(re.sub(r"<[^>]+>", " ", page))


def _sections(md: str) -> dict[str, str]:
    out: dict[str, str] = {}
    cur = ""
    for line in md.splitlines():
        if line.startswith("## "):
            cur = line[3:]
        out[cur] = out.get(cur, "") + line + "\n"
    return out


def _valid_png(path: Path) -> None:
    import matplotlib.image as mpimg

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


def _check_report(out: Path, results_returned: dict, min_numbers: int = 100) -> dict:
    study = json.loads((out / "study.json").read_text())
    assert study == json.loads(json.dumps(_json_clean(results_returned)))  # round trip
    md = (out / "report.md").read_text()
    page = (out / "report.html").read_text()
    assert len(_TOKEN.findall(md)) > min_numbers
    assert _untraced(md, study) == []
    assert _untraced(_html_text(page), study) == []
    srcs = re.findall(r'src="([^"]*)"', page)
    assert all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "http://" not in page and "https://" not in page and "<link" not in page
    assert len(srcs) == sum(1 for p in study["plots"].values() if p)
    return study


# -------------------------------------------------------------------------------------------------- tests
def test_traceability_check_catches_a_number_not_in_study_json():
    study, md, _ = _render(make_results())
    assert _untraced(md, study) == []
    assert _untraced(md + "\nThe effect is 98.76 nats, and 2.5 at the end.\n", study) == ["98.76"]  # 2.5 is a loss
    assert _untraced("spread 0.125 to 7.77.", {"x": 0.125}) == ["7.77"]  # sentence-final numbers are read too


def test_write_report_three_seeds(tmp_path, fake):
    results = make_results()
    out = write_report(results, tmp_path / "study")
    assert set(out["plots"]) == {"val_loss", "mri_shift", "crs_layers", "forgetting_vs_replay", "moe_vs_dense",
                                 "coactivation", "compute"}
    for stem, p in out["plots"].items():
        assert p is not None, stem
        _valid_png(p)
    study = _check_report(tmp_path / "study", results)
    assert study["overview"]["n_seeds"] == 3 and study["overview"]["control"] == 3 * 3 * 2
    md = out["report_md"].read_text()
    secs = _sections(md)
    for title in ("The paper's three questions", "Findings", "How each verdict is decided", "Runs",
                  "Why the Sinkhorn model's evaluation MRI differs from its training MRI", "Figures",
                  "Appendix: per-run tables"):
        assert title in secs, title
    order = [line[3:] for line in md.splitlines() if line.startswith("## ")]
    assert order.index("The paper's three questions") < order.index("Findings") < order.index(
        "How each verdict is decided") < order.index("Runs")
    # overview: seeds, models, counts
    intro = md.split("## ")[0]
    assert "3 seed(s) (0, 1, 2)" in intro and "granular-sb" in intro and "12.5 s" in intro
    # the questions: the verdict word in bold, then the sentence
    qs = secs["The paper's three questions"]
    assert "worse? **No.** The MoE forgets 0.0625 less" in qs and "No:" not in qs  # the verdict once, in bold
    assert "**Inconclusive.** The evaluation MRI rises by 0.015625." in qs
    # findings table: one row per finding; headline "mean [lo, hi]", seeds agreeing k/n, one line per part
    rows = [line for line in secs["Findings"].splitlines() if line.startswith("| F")]
    assert len(rows) == 6
    f1 = study["findings"][0]["parts"][0]
    assert (f"| a: {fmt(f1['mean'])} [{fmt(f1['lo'])}, {fmt(f1['hi'])}] | 3/3 |" in rows[0])
    assert not re.search(r"spread -?\d", secs["Findings"])  # three seeds: the interval alone
    assert rows[1].count("<br>") == 4  # F2: five parts
    assert "a: untested (no Switch model)" in rows[5]
    assert "seed(s), fewer than three" not in md
    # how each verdict is decided: rule and evidence of each finding, per-seed effects
    how = secs["How each verdict is decided"]
    for f in study["findings"]:
        assert f["rule"] in how and f["evidence"] in how
    assert "margin 0.0625" in how and "seed 2 " in how
    # runs table: seed, kind, optimizer state and warm-up per run
    runs_tab = secs["Runs"]
    assert "| run | seed | kind | model | shift | schedule | replay | optimizer state | warm-up steps |" in runs_tab
    assert "| s2/control/granular-pb/inf | 2 | control | granular-pb | - | inf | n/a | carried | 0 |" in runs_tab
    assert "| s1/cpt/dense/code/rewarm-r0.3 | 1 | cpt | dense | code | rewarm | 0.3 | fresh | 5 |" in runs_tab
    # the Sinkhorn note, with the measured numbers (mean over the seeds)
    note = secs["Why the Sinkhorn model's evaluation MRI differs from its training MRI"]
    assert f"training MRI {fmt(0.15 + 0.01)} over the last logged window" in note
    assert f"held-out evaluation MRI {fmt(0.4375 + 0.01)} on english" in note
    assert "top-k of the raw router logits" in note
    # html: verdict words in bold, same sections
    page = out["report_html"].read_text()
    assert "<strong>No.</strong>" in page and "Why the Sinkhorn model" in page and "<br>" in page


def test_write_report_rerun_removes_stale_plots(tmp_path, fake):
    write_report(make_results(), tmp_path / "study")
    dense = _drop_models(make_results(), {"dense"})
    out = write_report(dense, tmp_path / "study")
    assert out["plots"]["mri_shift"] is None and out["plots"]["crs_layers"] is None
    assert out["plots"]["moe_vs_dense"] is None
    assert not (tmp_path / "study" / "plots" / "mri_shift.png").exists()
    _valid_png(out["plots"]["compute"])
    _check_report(tmp_path / "study", dense)
    assert "Why the Sinkhorn model" not in out["report_md"].read_text()


@pytest.mark.parametrize("seeds,caveat", [((0,), True), ((0, 1), True), ((0, 1, 2), False), ((3, 4, 5, 6), False)])
def test_caveat_only_below_three_seeds(seeds, caveat):
    study, md, page = _render(make_results(seeds))
    assert study["overview"]["n_seeds"] == len(seeds)
    assert ("With one seed there is no interval: every finding is inconclusive by rule (docs/study-rules.md)"
            in md) is (len(seeds) == 1)
    assert ("With two seeds the 95% interval is very wide" in md) is (len(seeds) == 2)
    assert ("seed(s), fewer than three" in page) is caveat
    # the spread min to max stands beside the interval exactly when there are fewer than three seeds
    assert bool(re.search(r"spread -?\d[^ ]* to -?\d", _sections(md)["Findings"])) is caveat
    assert _untraced(md, study) == []


def test_sinkhorn_note_only_with_a_sinkhorn_model():
    title = "## Why the Sinkhorn model's evaluation MRI differs from its training MRI"
    _, md, _ = _render(make_results())
    assert title in md
    study, md, _ = _render(_drop_models(make_results(), {"dense", "granular-sb"}))
    assert title in md
    row = study["tables"]["sinkhorn_mri"]["rows"][0]
    assert row[:4] == ["granular-sb", "sinkhorn", 3, OLD]
    assert row[4] == pytest.approx(0.16) and row[5] == pytest.approx(0.4475)  # train vs eval MRI, seed means
    for keep in ({"dense"}, {"dense", "granular-pb"}):
        _, md, _ = _render(_drop_models(make_results(), keep))
        assert "Why the Sinkhorn model" not in md


def _spy_figures(monkeypatch) -> list:
    figs = []
    orig = plots._save

    def spy(fig, path):
        figs.append(fig)
        return orig(fig, path)

    monkeypatch.setattr(plots, "_save", spy)
    return figs


BAND_PLOTS = ["plot_val_loss", "plot_mri_shift", "plot_crs_layers", "plot_forgetting_vs_replay", "plot_moe_vs_dense"]


@pytest.mark.parametrize("fn", BAND_PLOTS)
def test_plots_draw_seed_bands_with_two_or_more_seeds(tmp_path, monkeypatch, fn):
    from matplotlib.collections import PolyCollection

    figs = _spy_figures(monkeypatch)

    def bands(fig) -> int:
        return sum(isinstance(c, PolyCollection) for ax in fig.axes for c in ax.collections)

    for seeds, want in (((0, 1, 2), True), ((0, 1), True), ((0,), False), (None, False)):
        path = getattr(plots, fn)(make_results(seeds), tmp_path / f"{fn}-{seeds}.png")
        assert path == tmp_path / f"{fn}-{seeds}.png" and path.stat().st_size > 1000
        assert (bands(figs[-1]) > 0) is want, (fn, seeds)


def test_band_is_the_mean_and_the_min_max_of_the_seeds():
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    line = plots.band(ax, [([0, 1, 2], [1.0, 2.0, 3.0]), ([0, 2], [3.0, 5.0])], color="red")
    assert list(line.get_ydata()) == pytest.approx([2.0, 3.0, 4.0])  # the second seed interpolated at x = 1
    (poly,) = ax.collections
    ys = poly.get_paths()[0].vertices[:, 1]
    assert min(ys) == pytest.approx(1.0) and max(ys) == pytest.approx(5.0)
    plt.close(fig)


def test_mri_shift_shows_cpt_and_control_for_penalty_and_sinkhorn(tmp_path, monkeypatch):
    figs = _spy_figures(monkeypatch)
    assert plots.plot_mri_shift(make_results(), tmp_path / "mri.png") is not None
    fig = figs[-1]
    titles = [ax.get_title() for ax in fig.axes]
    assert any("(penalty)" in t for t in titles) and any("(sinkhorn)" in t for t in titles)
    labels = {t.get_text() for lg in fig.legends for t in lg.get_texts()}
    assert {"CPT (shift)", "no-shift control", "pre-training (end)"} <= labels
    # the CPT line of the penalty model spikes to the synthetic 0.6 (+ the seeds' mean noise 0.01) after the shift
    ax = next(ax for ax in fig.axes if "(penalty)" in ax.get_title())
    cpt = next(ln for ln in ax.get_lines() if ln.get_label() == "CPT (shift)")
    assert max(cpt.get_ydata()) == pytest.approx(0.61)


def test_old_schema_renders(tmp_path, monkeypatch):
    """Results without seeds, seed prefixes or controls, and findings of the older format (reproduced + figures)."""
    old_findings = [{"id": f"F{i}", "title": f"claim {i}", "reproduced": True if i < 4 else None,
                     "rule": "a rule", "figures": {"margin": 0.375, "untested": ["no Switch model"]}}
                    for i in range(1, 7)]
    monkeypatch.setattr(fnd, "evaluate_findings", lambda r: copy.deepcopy(old_findings))
    monkeypatch.setattr(fnd, "answer_questions",
                        lambda r, f=None: [{"question": "Q?", "answer": "Yes: because.", "figures": {}}])
    results = make_results(None)
    out = write_report(results, tmp_path)
    study = _check_report(tmp_path, results)
    assert study["overview"]["seeds"] == [0] and study["overview"]["control"] == 0
    md = out["report_md"].read_text()
    assert "| F1: claim 1 | reproduced | n/a | n/a | margin=0.375; untested: no Switch model |" in md
    assert "| F4: claim 4 | untested |" in md
    assert "| cpt/granular-pb/code/inf-r0 | 0 | cpt |" in md  # seed 0 for an unprefixed key
    assert "seed(s), fewer than three" in md
    assert all(p is not None for p in out["plots"].values())


def test_write_report_on_empty_results(tmp_path, fake):
    out = write_report({"name": "empty"}, tmp_path)
    assert all(p is None for p in out["plots"].values())
    md = out["report_md"].read_text()
    assert "untested" in md and "seed(s), fewer than three" in md
    _check_report(tmp_path, json.loads((tmp_path / "study.json").read_text()), min_numbers=5)


def test_partial_results_render_without_plots():
    r = make_results()
    del r["comparisons"], r["forgetting"]
    for i, run in enumerate(r["runs"].values()):
        if i % 2:
            run.pop("final")
            run.pop("train_mri")
            run["start"] = None
    study, md, page = _render(r)
    assert "| F5: claim F5 | " in md and "<table>" in page
    assert study["tables"]["routing"]["rows"] == []
    assert _untraced(md, study) == []
