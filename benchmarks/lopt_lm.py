"""The LM case on the real runtime: learned outer optimizers against tuned DiLoCo under ``torchrun``.

Every run is a real ``torchrun --nproc-per-node K -m moecpt pretrain`` job (gloo on the CPU, every rank a worker)
of the tiny Switch MoE recipe ``benchmarks/lopt_lm.toml`` (constant AdamW inner LR). For each H, at the same
number of inner steps per worker (rounds = steps / H), three outer optimizers:

* **tuned DiLoCo**: Nesterov outer SGD, momentum 0.9, outer LR over a grid (default 0.3, 0.5, 0.7, 1.0) widened
  by one rung beyond an edge while the best point sits on it (``moecpt.lopt.tuning.search``; cap 3, ``--quick``
  1), chosen on the final validation loss;
* **LOpt-A**: ``distributed.outer_optimizer`` = a learned-optimizer name or ``.safetensors`` file (one
  all-reduce of the mean delta per round, as DiLoCo);
* **LAgg-A**: the same for LAgg-A (one all-gather of every worker's delta per round: ``(K-1) x`` the model's fp32
  bytes sent per worker against DiLoCo's ``2 (K-1)/K x``, so K/2 times as many); skipped when K is not the K its
  weights were meta-trained for.

Reported per H and method: final validation loss (``metrics.jsonl`` val records, the global model after the last
round), final train loss (the mean of the train records' loss over the last round: the workers' own mini-batch
cross-entropy, averaged over workers), bytes sent per worker (the accountant's ``comm_bytes`` / 2: a ring
collective receives as much as it sends), the validation curve per round, and the validation loss at equal bytes
(linear interpolation along each curve at the smallest final byte count of the compared methods). The validation
split both chooses DiLoCo's outer LR and scores every method (no second split at this size): that favours DiLoCo.

Resumable: every run has its own folder under ``--out`` named by H, method and (learned optimizers) the first 8
hex digits of the weight file's SHA-256, so new weights never reuse old runs. A folder whose ``metrics.jsonl``
ends with the run's ``comm_summary`` at the last step is read, not recomputed; an unfinished one is relaunched with
the same command (moecpt resumes its newest checkpoint); a folder holding another run is refused. Nothing under
``--out`` that this script did not create is written to or deleted.

Usage::

    PYTHONPATH=. .venv/bin/python benchmarks/lopt_lm.py --quick --out /tmp/lopt_lm_quick --plot docs/lopt_lm.png
    PYTHONPATH=. .venv/bin/python benchmarks/lopt_lm.py --out /tmp/lopt_lm [--lopt-a F.safetensors] [--lagg-a F]

Prints one JSON object (also written to ``OUT/lopt_lm.json``, and its tables to ``OUT/lopt_lm.md``); one progress
line per run goes to stderr.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from anywhere: the moecpt next to it
    sys.path.insert(0, str(REPO))

from moecpt.config import Recipe, identity_json, load_recipe  # noqa: E402
from moecpt.errors import MoecptError  # noqa: E402
from moecpt.lopt.pretrained import PRETRAINED, load_weights, pretrained_path  # noqa: E402
from moecpt.lopt.schedule_check import fixed_step_schedule_warning  # noqa: E402
from moecpt.lopt.tuning import Axis, search  # noqa: E402
from moecpt.storage.atomic import write_bytes_atomic, write_json_atomic  # noqa: E402

RECIPE = Path(__file__).resolve().parent / "lopt_lm.toml"
DILOCO_MOMENTUM = 0.9
FULL = {"H": (8, 16, 32), "steps": 512, "grid": (0.3, 0.5, 0.7, 1.0), "cap": 3}
QUICK = {"H": (8,), "steps": 64, "grid": (0.5, 0.7, 1.0), "cap": 1}
RUN_FILE, METRICS_FILE = "run.json", "metrics.jsonl"


# ------------------------------------------------------------------------------------------------ pure logic
def interp_at(xs: list[float], ys: list[float], x: float) -> float | None:
    """``y`` at ``x`` by linear interpolation along the curve ``(xs, ys)`` (``xs`` non-decreasing).

    Returns None when ``x`` lies outside ``[xs[0], xs[-1]]`` (no extrapolation). Where ``xs`` repeats a value the
    last point with it is taken (a curve that stays put in x keeps its newest y).
    """
    if not xs or len(xs) != len(ys) or x < xs[0] or x > xs[-1]:
        return None
    for i in range(len(xs) - 1, -1, -1):  # the newest point at exactly x, else the segment around it
        if xs[i] == x:
            return float(ys[i])
        if xs[i] < x:
            x0, x1, y0, y1 = xs[i], xs[i + 1], ys[i], ys[i + 1]
            return float(y0 + (y1 - y0) * (x - x0) / (x1 - x0))
    return None


def equal_bytes(curves: dict[str, dict[str, list[float]]]) -> dict[str, Any]:
    """Every method's validation loss at the same bytes sent per worker: the smallest final byte count among them.

    Args:
        curves: method -> ``{"bytes": [...], "val_loss": [...]}`` (one point per evaluation, bytes cumulative).

    Returns:
        ``{"budget_bytes": B, "limited_by": method with the fewest bytes, "val_loss": {method: loss at B}}``.
    """
    finals = {m: c["bytes"][-1] for m, c in curves.items() if c["bytes"]}
    if not finals:
        return {"budget_bytes": None, "limited_by": None, "val_loss": {}}
    limited = min(finals, key=lambda m: finals[m])
    budget = finals[limited]
    return {"budget_bytes": budget, "limited_by": limited,
            "val_loss": {m: interp_at(c["bytes"], c["val_loss"], budget) for m, c in curves.items()}}


def finite_or_inf(v: float | None) -> float:
    """A score for choosing: a diverged or missing loss is worse than any finite one."""
    return v if v is not None and math.isfinite(v) else math.inf


def tune_outer_lr(grid: tuple[float, ...], cap: int, val_loss: Callable[[float], float | None]) -> dict[str, Any]:
    """Choose DiLoCo's outer LR on the validation loss, widening the grid past an edge the best point sits on.

    Args:
        grid: starting outer LRs (a geometric ladder: one rung more is the ratio of the two values at that end).
        cap: widening rounds allowed.
        val_loss: outer LR -> final validation loss of that run (None or non-finite: diverged).

    Returns:
        :func:`moecpt.lopt.tuning.search`'s record, JSON-ready: ``best`` ({"outer_lr": v}), ``grid`` (the LRs after
        widening), ``val_loss`` (None if every point diverged), ``points``, ``widened``, ``widening_rounds``,
        ``cap_hit``, ``open_edges``.
    """
    res = search({"outer_lr": Axis(tuple(grid))},
                 lambda pts, _rnd: [finite_or_inf(val_loss(p["outer_lr"])) for p in pts], cap)
    best = res["val_loss"] if math.isfinite(res["val_loss"]) else None  # every point diverged: JSON has no inf
    return {**res, "grid": list(res["grid"]["outer_lr"].values), "val_loss": best}


# ------------------------------------------------------------------------------------------------ run folders
@dataclass(frozen=True)
class RunSpec:
    """One ``moecpt pretrain`` job: its folder and its ``--set`` overrides of :data:`RECIPE`."""

    name: str
    dir: Path
    sets: tuple[str, ...]

    def recipe(self) -> Recipe:
        return load_recipe(RECIPE, list(self.sets))


def run_sets(h: int, steps: int, outer: dict[str, Any]) -> tuple[str, ...]:
    """``--set`` overrides for one run: H, steps, evaluation every round, checkpoints every 4 rounds, the outer."""
    sets = [f"train.steps={steps}", f"distributed.local_steps={h}", f"train.eval_every={h}",
            f"train.checkpoint_every={h * max(1, min(4, steps // h))}"]
    for key, value in outer.items():
        sets.append(f"distributed.{key}={json.dumps(value) if isinstance(value, str) else value}")
    return tuple(sets)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The records of ``run_dir/metrics.jsonl`` (a torn last line, from a killed run, is skipped)."""
    path = run_dir / METRICS_FILE
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def folder_state(spec: RunSpec, steps: int) -> str:
    """``"new"`` (absent or empty), ``"finished"``, ``"unfinished"`` (same run, not at the last step).

    Raises:
        MoecptError: the folder holds something else (another run's ``run.json``, or files but no run), which
            this script must neither reuse nor overwrite.
    """
    d = spec.dir
    if not d.exists() or (d.is_dir() and not any(d.iterdir())):
        return "new"
    run_file = d / RUN_FILE
    if not run_file.is_file():
        raise MoecptError(f"{d} exists and holds no moecpt run; move it away or give another --out")
    try:
        identity = json.loads(run_file.read_text(encoding="utf-8"))["identity"]["recipe"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise MoecptError(f"{run_file} is not a moecpt run.json; move {d} away or give another --out") from None
    if identity != identity_json(spec.recipe()):
        raise MoecptError(f"{d} holds another run (its recipe differs from this benchmark's); move it away or "
                          "give another --out")
    done = any(r.get("event") == "comm_summary" and r.get("step") == steps for r in read_metrics(d))
    return "finished" if done else "unfinished"


def summarise(records: list[dict[str, Any]], h: int, steps: int) -> dict[str, Any]:
    """A finished run's figures from its ``metrics.jsonl`` records (see the module doc for each)."""
    vals = sorted((r for r in records if r.get("split") == "val" and r.get("source", "english") == "english"),
                  key=lambda r: r["step"])
    seen: dict[int, dict[str, Any]] = {}
    for r in vals:  # a resumed run re-evaluates at its checkpoint's step: keep the last record per step
        seen[r["step"]] = r
    vals = list(seen.values())
    train = {r["step"]: r for r in records if "split" not in r and "event" not in r and "loss" in r}
    last_round = [train[s]["loss"] for s in range(steps - h + 1, steps + 1) if s in train]
    summary = next((r for r in records if r.get("event") == "comm_summary" and r.get("step") == steps), {})
    final = vals[-1] if vals else {}
    return {
        "final_val_loss": final.get("loss"),
        "final_train_loss": sum(last_round) / len(last_round) if last_round else None,
        "rounds": summary.get("rounds"),
        "bytes_sent_per_worker": summary.get("bytes_sent"),
        "bytes_sent_per_round": (summary["bytes_sent"] / summary["rounds"]) if summary.get("rounds") else None,
        "final_val_mri": final.get("mri_mean"),
        "curve": {"round": [r["step"] / h for r in vals], "bytes": [r.get("comm_bytes", 0) / 2 for r in vals],
                  "val_loss": [r["loss"] for r in vals]},
    }


Launcher = Callable[[RunSpec, int, Path], None]


def torchrun_launcher(timeout_s: float) -> Launcher:
    """A launcher running ``python -m torch.distributed.run --standalone --nproc-per-node K -m moecpt pretrain``,
    its output in ``OUT/logs/NAME.log``.

    Raises:
        MoecptError: the job failed or ran past ``timeout_s`` (the log's path and last line are in the message).
    """
    def launch(spec: RunSpec, workers: int, logs: Path) -> None:
        logs.mkdir(parents=True, exist_ok=True)
        log = logs / f"{spec.name}.log"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={workers}",
               "-m", "moecpt", "pretrain", "--recipe", str(RECIPE), "--out", str(spec.dir),
               "--set", "train.threads=1", *[a for s in spec.sets for a in ("--set", s)]]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(
            os.pathsep), "OMP_NUM_THREADS": "1"}
        with log.open("a", encoding="utf-8") as f:
            f.write(f"$ {' '.join(cmd)}\n")
            f.flush()
            # its own process group: on a timeout or Ctrl-C the workers go with torchrun (killing only the agent
            # would leave 8 orphaned workers running)
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                _stop_group(proc)
                raise MoecptError(f"run {spec.name} ran past --run-timeout {timeout_s:.0f} s; see {log} (re-run "
                                  "the same command to resume it, or raise --run-timeout)") from None
            except BaseException:
                _stop_group(proc)
                raise
        if rc != 0:
            tail = [ln for ln in log.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
            raise MoecptError(f"run {spec.name} failed (exit {rc}): {tail[-1] if tail else ''!s:.300}; see {log}")
    return launch


class Bench:
    """Runs (or reuses) the benchmark's jobs under ``out`` and collects their figures."""

    def __init__(self, out: Path, workers: int, steps: int, launch: Launcher,
                 log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)):
        self.out, self.workers, self.steps, self.launch, self.log = out, workers, steps, launch, log
        self.launched: list[str] = []
        self.reused: list[str] = []
        self.costs: dict[str, dict[str, float] | None] = {}

    def run(self, spec: RunSpec, h: int) -> dict[str, Any]:
        """The figures of one job, launching it unless its folder already holds it finished. ``cost``: the CPU
        seconds (all its processes), wall seconds and 1-minute load averages of the launch that finished it, kept
        in ``OUT/logs/NAME.cost.json`` so that a pass reusing the run still reports them (None if unknown)."""
        state = folder_state(spec, self.steps)
        cost_file = self.out / "logs" / f"{spec.name}.cost.json"
        if state == "finished":
            self.reused.append(spec.name)
            self.log(f"{spec.name}: reused (finished)")
        else:
            before, t0, load0 = _children_cpu_s(), time.time(), os.getloadavg()[0]
            self.launch(spec, self.workers, self.out / "logs")
            cost = {"cpu_s": round(_children_cpu_s() - before, 1), "wall_s": round(time.time() - t0, 1),
                    "loadavg_1min_start": round(load0, 2), "loadavg_1min_end": round(os.getloadavg()[0], 2)}
            self.launched.append(spec.name)
            if folder_state(spec, self.steps) != "finished":
                raise MoecptError(f"run {spec.name} exited without its final record in {spec.dir / METRICS_FILE}")
            write_json_atomic(cost_file, cost)
            self.log(f"{spec.name}: {cost['wall_s']:.0f} s wall, {cost['cpu_s']:.0f} CPU-s")
        res = summarise(read_metrics(spec.dir), h, self.steps)
        res["run_dir"] = str(spec.dir)
        res["cost"] = json.loads(cost_file.read_text(encoding="utf-8")) if cost_file.is_file() else None
        self.costs[spec.name] = res["cost"]
        return res


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the job's process group (torchrun forwards it; moecpt checkpoints on it), SIGKILL after 30 s."""
    for sig, wait_s in ((signal.SIGTERM, 30.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def _children_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def weights_tag(name: str) -> tuple[str, Path, Any]:
    """``(folder tag, path, spec)`` of a learned optimizer given as a shipped name or a ``.safetensors`` path.

    Raises:
        MoecptError: unknown name, missing or damaged file (``moecpt.lopt.pretrained``'s messages).
    """
    path = pretrained_path(name) if name in PRETRAINED else Path(name)
    if name not in PRETRAINED and not name.endswith(".safetensors"):
        raise MoecptError(f"learned optimizer {name!r}: give {' or '.join(sorted(PRETRAINED))} or a .safetensors "
                          "weight file")
    spec, _, _ = load_weights(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:8]
    return f"{spec.kind.value}-{digest}", path, spec


def outer_value(name: str) -> str:
    """``distributed.outer_optimizer`` for a learned optimizer: a shipped name as it is (so a run folder's
    identity does not depend on where the checkout lives), a file as its absolute path."""
    return name if name in PRETRAINED else str(Path(name).resolve())


def select_learned(names: list[str], workers: int) -> tuple[list[tuple[str, str, Path, Any]], dict[str, str]]:
    """The learned optimizers that can run with ``workers`` -> ``([(tag, outer value, path, spec)], {kind: why
    skipped})``: a LAgg-A meta-trained for another K is skipped (it reads exactly K deltas), not an error.

    Raises:
        MoecptError: a name that is neither shipped nor a readable weight file.
    """
    learned, skipped = [], {}
    for name in names:
        tag, path, spec = weights_tag(name)
        if spec.workers is not None and spec.workers != workers:
            skipped[spec.kind.value] = f"{path.name} is meta-trained for K = {spec.workers}, this run has K = {workers}"
            continue
        learned.append((tag, outer_value(name), path, spec))
    return learned, skipped


def bench_h(bench: Bench, h: int, grid: tuple[float, ...], cap: int,
            learned: list[tuple[str, str, Path, Any]]) -> dict[str, Any]:
    """All methods at one H -> ``{"rounds", "methods": {...}, "diloco_grid": [...], "equal_bytes": {...}}``."""
    hdir = bench.out / f"H{h}"
    points: dict[float, dict[str, Any]] = {}

    def diloco(lr: float) -> float | None:
        spec = RunSpec(f"H{h}-diloco-lr{lr:g}", hdir / f"diloco-lr{lr:g}",
                       run_sets(h, bench.steps, {"outer_optimizer": "nesterov", "outer_lr": lr,
                                                 "outer_momentum": DILOCO_MOMENTUM}))
        points[lr] = bench.run(spec, h)
        return points[lr]["final_val_loss"]

    tuning = tune_outer_lr(grid, cap, diloco)
    best = tuning["best"]["outer_lr"]
    methods: dict[str, dict[str, Any]] = {
        "diloco": {**points[best], "outer_lr": best, "outer_momentum": DILOCO_MOMENTUM}}
    for tag, outer, path, spec in learned:
        kind = spec.kind.value
        run = RunSpec(f"H{h}-{tag}", hdir / tag, run_sets(h, bench.steps, {"outer_optimizer": outer}))
        methods[kind] = {**bench.run(run, h), "weights": str(path), "step_scale": spec.step_scale.value}
    return {
        "rounds": bench.steps // h,
        "methods": methods,
        "diloco_tuning": {**tuning, "momentum": DILOCO_MOMENTUM,
                          "points": [{"outer_lr": lr, "final_val_loss": p["final_val_loss"],
                                      "final_train_loss": p["final_train_loss"]} for lr, p in sorted(points.items())]},
        "diloco_curves": {f"{lr:g}": p["curve"] for lr, p in sorted(points.items())},
        "equal_bytes": equal_bytes({m: r["curve"] for m, r in methods.items()}),
    }


# ------------------------------------------------------------------------------------------------ tables
def _f(v: float | None, digits: int = 4) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def markdown(result: dict[str, Any]) -> str:
    """The docs' tables (``OUT/lopt_lm.md``): per H and method the loss at equal rounds, bytes, loss at equal bytes;
    then DiLoCo's searched grid. Bold: the lowest validation loss of an H, at equal rounds and at equal bytes."""
    rows = ["| H | rounds | method | outer settings | final val loss (equal rounds) | final train loss | "
            "MB sent per worker | MB per round | val loss at equal bytes (MB) | val MRI |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for h, res in result["H"].items():
        ms = res["methods"]
        best_r = min((r["final_val_loss"] for r in ms.values() if r["final_val_loss"] is not None), default=None)
        eq = res["equal_bytes"]
        eq_vals = [v for v in eq["val_loss"].values() if v is not None]
        best_b = min(eq_vals, default=None)
        for m, r in ms.items():
            setting = (f"Nesterov, LR {r['outer_lr']:g}, μ {r['outer_momentum']:g}" if m == "diloco"
                       else f"{Path(r['weights']).name} ({r['step_scale']} step)")
            v, b = r["final_val_loss"], eq["val_loss"].get(m)
            vs = f"**{_f(v)}**" if v is not None and v == best_r else _f(v)
            bs = f"**{_f(b)}**" if b is not None and b == best_b else _f(b)
            mb = r["bytes_sent_per_worker"]
            per = r["bytes_sent_per_round"]
            rows.append(f"| {h} | {r['rounds']} | {m} | {setting} | {vs} | {_f(r['final_train_loss'])} | "
                        f"{_f(mb / 1e6 if mb is not None else None, 1)} | {_f(per / 1e6 if per else None, 2)} | "
                        f"{bs} ({eq['budget_bytes'] / 1e6:.1f}) | {_f(r['final_val_mri'], 2)} |")
    rows += ["", "| H | DiLoCo outer LR searched (μ 0.9) | final val loss per LR | chosen | widened | cap hit |",
             "|---|---|---|---|---|---|"]
    for h, res in result["H"].items():
        t = res["diloco_tuning"]
        per_lr = ", ".join(f"{p['outer_lr']:g}: {_f(p['final_val_loss'])}" for p in t["points"])
        rows.append(f"| {h} | {', '.join(f'{v:g}' for v in t['grid'])} | {per_lr} | {t['best']['outer_lr']:g} | "
                    f"{', '.join(t['widened']) or 'no'} | {', '.join(t['open_edges']) if t['cap_hit'] else 'no'} |")
    return "\n".join(rows) + "\n"


# ------------------------------------------------------------------------------------------------ figure
def plot(result: dict[str, Any], path: Path) -> None:
    """Validation loss vs rounds (top) and vs MB sent per worker (bottom), one column per H."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hs = list(result["H"])
    fig, axes = plt.subplots(2, len(hs), figsize=(max(6.4, 4.6 * len(hs)), 7.4), squeeze=False)
    colours = {"diloco": "C0", "lopt-a": "C1", "lagg-a": "C2"}
    for j, h in enumerate(hs):
        res = result["H"][h]
        for lr, c in res["diloco_curves"].items():  # the whole DiLoCo grid, faint
            for i, x in enumerate(("round", "bytes")):
                xs = [b / 1e6 for b in c[x]] if x == "bytes" else c[x]
                axes[i][j].plot(xs, c["val_loss"], color="0.8", lw=0.8, zorder=1)
        for m, r in res["methods"].items():
            label = f"DiLoCo (outer LR {r['outer_lr']:g}, μ 0.9)" if m == "diloco" else m.upper()
            for i, x in enumerate(("round", "bytes")):
                xs = [b / 1e6 for b in r["curve"][x]] if x == "bytes" else r["curve"][x]
                axes[i][j].plot(xs, r["curve"]["val_loss"], color=colours.get(m), marker=".", label=label, zorder=2)
        axes[0][j].set_title(f"H = {h}: validation loss vs rounds", fontsize=9)
        axes[1][j].set_title(f"H = {h}: validation loss vs MB sent per worker", fontsize=9)
        axes[0][j].set_xlabel("communication round")
        axes[1][j].set_xlabel("MB sent per worker")
        for i in (0, 1):
            axes[i][j].set_ylabel("validation loss (nats)")
            axes[i][j].grid(alpha=0.3)
        axes[0][j].legend(fontsize=7)
    fig.suptitle(f"torchrun, K = {result['config']['workers']} workers, {result['config']['steps']} inner steps per "
                 "worker\n(grey: every DiLoCo outer LR searched)", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    write_bytes_atomic(path, buf.getvalue())


# ------------------------------------------------------------------------------------------------ main
def _parse_floats(text: str, what: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise MoecptError(f"{what}={text!r}: give comma-separated numbers, e.g. 0.3,0.5,0.7,1.0") from None
    if not vals or any(not (v > 0 and math.isfinite(v)) for v in vals):
        raise MoecptError(f"{what}={text!r}: give positive numbers")
    return vals


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=f"H {QUICK['H']}, {QUICK['steps']} steps, grid "
                    f"{QUICK['grid']}, 1 widening round (default: H {FULL['H']}, {FULL['steps']} steps)")
    ap.add_argument("--out", required=True, help="folder of the run folders (reused: finished runs are read)")
    ap.add_argument("--plot", default=None, help="PNG path of the curves (docs/lopt_lm.png for the docs figure)")
    ap.add_argument("--workers", type=int, default=8, help="K, torchrun processes (LAgg-A only at its own K)")
    ap.add_argument("--H", default=None, help="comma-separated H values (default: the mode's)")
    ap.add_argument("--steps", type=int, default=None, help="inner steps per worker, every H (a multiple of each H)")
    ap.add_argument("--grid", default=None, help="DiLoCo outer LRs to start from (comma-separated)")
    ap.add_argument("--cap", type=int, default=None, help="widening rounds of the DiLoCo grid")
    ap.add_argument("--lopt-a", default="lopt-a", help="LOpt-A weights: a shipped name or a .safetensors file")
    ap.add_argument("--lagg-a", default="lagg-a", help="LAgg-A weights: a shipped name or a .safetensors file")
    ap.add_argument("--run-timeout", type=float, default=3600.0, help="seconds one torchrun job may take")
    args = ap.parse_args(argv)
    mode = QUICK if args.quick else FULL
    try:
        hs = tuple(int(v) for v in args.H.split(",")) if args.H else mode["H"]
    except ValueError:
        raise MoecptError(f"--H={args.H!r}: give comma-separated integers, e.g. 8,16,32") from None
    steps = args.steps or mode["steps"]
    grid = _parse_floats(args.grid, "--grid") if args.grid else mode["grid"]
    cap = mode["cap"] if args.cap is None else args.cap
    if args.workers < 2:
        raise MoecptError(f"--workers={args.workers}: local SGD needs at least 2 workers")
    if cap < 0:
        raise MoecptError(f"--cap={cap}: give 0 or more widening rounds")
    bad = [h for h in hs if h < 1 or steps % h]
    if bad:
        raise MoecptError(f"--steps={steps} is not a multiple of H={bad}; choose steps divisible by every H")
    if 32 % args.workers:
        raise MoecptError(f"--workers={args.workers} does not divide the recipe's global batch of 32 sequences; "
                          "give 2, 4, 8, 16 or 32")
    learned, skipped = select_learned([args.lopt_a, args.lagg_a], args.workers)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0, cpu0 = time.time(), _children_cpu_s()
    load0 = os.getloadavg()
    bench = Bench(out, args.workers, steps, torchrun_launcher(args.run_timeout))
    warnings = {}
    for _tag, outer, _path, spec in learned:  # the runtime prints it; recorded so a reader sees it stayed silent
        warnings[spec.kind.value] = fixed_step_schedule_warning(
            load_recipe(RECIPE, list(run_sets(hs[0], steps, {"outer_optimizer": outer}))))
    result: dict[str, Any] = {
        "config": {"recipe": str(RECIPE.relative_to(REPO)), "workers": args.workers, "steps": steps, "H": list(hs),
                   "grid": list(grid), "cap": cap, "quick": args.quick, "inner_lr": "constant 3e-3 (AdamW)",
                   "learned": {spec.kind.value: {"weights": str(path), "tag": tag, "step_scale": spec.step_scale.value}
                               for tag, _o, path, spec in learned},
                   "skipped": skipped, "fixed_step_warning": warnings},
        "H": {},
    }
    for h in hs:
        result["H"][h] = bench_h(bench, h, grid, cap, learned)
    known = [c["cpu_s"] for c in bench.costs.values() if c]
    result["cost"] = {"runs": bench.costs, "runs_cpu_s": round(sum(known), 1),
                      "runs_cost_unknown": [n for n, c in bench.costs.items() if not c],
                      "this_pass": {"wall_s": round(time.time() - t0, 1),
                                    "cpu_s_children": round(_children_cpu_s() - cpu0, 1),
                                    "launched": bench.launched, "reused": bench.reused,
                                    "loadavg_start": [round(v, 2) for v in load0],
                                    "loadavg_end": [round(v, 2) for v in os.getloadavg()]}}
    write_json_atomic(out / "lopt_lm.json", result)
    write_bytes_atomic(out / "lopt_lm.md", markdown(result).encode())
    if args.plot:
        plot(result, Path(args.plot))
    return result


if __name__ == "__main__":
    try:
        print(json.dumps(main(), indent=1))
    except MoecptError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
