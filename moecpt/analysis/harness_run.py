"""Run lm-evaluation-harness tasks on a moecpt checkpoint: ``moecpt eval --harness`` and ``moecpt-lm-eval``.

lm-eval 0.4.13 (the newest release) resolves ``--model NAME`` only against its own registry and loads no plugins
(no entry-point group, no module import flag; ``--include_path`` reads task YAMLs only), so the plain ``lm_eval``
command cannot know ``moecpt``. Two honest routes, both the harness's own code with ``moecpt`` registered:

* ``moecpt-lm-eval ARGS`` (or ``python -m moecpt.analysis.harness_run ARGS``): lm-eval's own command line,
  every flag included, e.g. ``moecpt-lm-eval --model moecpt --model_args checkpoint=RUN --tasks ...``;
* in Python, ``moecpt.analysis.harness.register()`` then ``lm_eval.simple_evaluate(model="moecpt", ...)``.

See docs/eval.md.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from moecpt.errors import MoecptError
from moecpt.storage.atomic import json_default, write_bytes_atomic
from moecpt.storage.outputs import check_file_output

#: written first into every results file, so that a later run may replace that file and no other one
#: (:func:`moecpt.storage.outputs.check_file_output`)
SIGNATURE_KEY, SIGNATURE_VALUE = "written_by", "moecpt eval --harness"


def require_lm_eval() -> None:
    """Raises MoecptError (one line) when lm-eval is missing."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise MoecptError("lm-evaluation-harness is not installed: pip install 'moecpt[eval]' "
                          "(or pip install 'lm-eval>=0.4.5')") from None


def _task_manager(tasks: list[str], include_path: list[str] | None):
    """lm-eval's TaskManager over its tasks plus ``include_path``; every name in ``tasks`` must be known.

    When every name is a task (not a group or tag) of ``include_path``, only those YAMLs are indexed: lm-eval's
    own index reads its ~14,000 built-in YAMLs (most of a local run's time on a small CPU) and would resolve the
    names to the same tasks, since an include path takes precedence over the built-ins."""
    from lm_eval.tasks import TaskManager

    for p in include_path or []:
        if not Path(p).is_dir() and not Path(p).is_file():
            raise MoecptError(f"--include-path {p!r} does not exist; give a folder (or file) of task YAMLs")
    if include_path:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(t in local.all_subtasks for t in tasks):
            return local
    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if not manager.match_tasks([t])]
    if unknown:
        raise MoecptError(f"unknown harness task(s) {', '.join(unknown)}; `lm_eval ls tasks` lists the built-in "
                          "ones, and --include-path adds a folder of your own task YAMLs")
    return manager


def run_harness(checkpoint: str, tasks: list[str], *, include_path: list[str] | None = None,
                limit: float | None = None, batch_size: int = 1, device: str = "auto",
                num_fewshot: int | None = None, seed: int = 0, confirm_run_unsafe_code: bool = False
                ) -> dict[str, Any]:
    """Score ``checkpoint`` on lm-eval ``tasks`` with :class:`moecpt.analysis.harness.MoecptLM`.

    Args:
        checkpoint: checkpoint folder or run folder.
        tasks: task or group names (built-in, or defined by a YAML under ``include_path``).
        limit: examples per task (an int count, or a fraction < 1), as lm-eval's ``--limit``.
        seed: the harness's random, numpy, torch and few-shot seeds.
        confirm_run_unsafe_code: allow tasks marked ``unsafe_code`` (HumanEval executes the generated code;
            its metric also needs ``HF_ALLOW_CODE_EVAL=1``).

    Returns:
        ``{"written_by", "checkpoint", "tasks", "results": {task: {metric: value}}, "n_samples", "config",
        "lm_eval_version"}``: the harness's results, stderr included (``"acc_stderr,none"``).

    Raises:
        MoecptError: lm-eval missing, an unknown task, a missing include path, or bad model settings.
    """
    require_lm_eval()
    import lm_eval

    from moecpt.analysis.harness import MoecptLM  # needs lm-eval (the optional extra moecpt[eval])

    manager = _task_manager(tasks, include_path)
    lm = MoecptLM(checkpoint=checkpoint, batch_size=batch_size, device=device)
    try:
        res = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit,
                                      num_fewshot=num_fewshot, random_seed=seed, numpy_random_seed=seed,
                                      torch_random_seed=seed, fewshot_random_seed=seed, log_samples=False,
                                      confirm_run_unsafe_code=confirm_run_unsafe_code)
    except ValueError as exc:
        if "marked as unsafe" not in str(exc):
            raise
        raise MoecptError(f"{str(exc).split(' which')[0].replace('Attempted to run task: ', 'task ')} runs the "
                          "code the model writes: add --confirm-run-unsafe-code (and set HF_ALLOW_CODE_EVAL=1) "
                          "to allow it") from None
    return {SIGNATURE_KEY: SIGNATURE_VALUE, "checkpoint": str(checkpoint), "tasks": tasks,
            "results": res["results"], "n_samples": res.get("n-samples", {}),
            "config": {"limit": limit, "batch_size": batch_size, "device": str(lm.device),
                       "num_fewshot": num_fewshot, "seed": seed, "confirm_run_unsafe_code": confirm_run_unsafe_code},
            "lm_eval_version": lm_eval.__version__}


def check_results_path(out: str | Path, inputs: list[str]) -> Path:
    """``--out`` may be a new file, or a results file this command wrote before; never anything else.

    Raises:
        MoecptError: ``out`` is a folder, an input, a file moecpt did not write, or in an unwritable folder.
    """
    return check_file_output(out, json.dumps({SIGNATURE_KEY: SIGNATURE_VALUE})[1:-1].encode(), inputs)


def write_results(out: Path, report: dict[str, Any]) -> None:
    """Write ``report`` (its signature key first) as indented JSON, atomically."""
    write_bytes_atomic(out, (json.dumps(report, indent=2, default=json_default) + "\n").encode())


def main(argv: list[str] | None = None) -> None:
    """``moecpt-lm-eval``: lm-eval's own command line (``lm_eval run ...``) with ``--model moecpt`` registered."""
    try:
        require_lm_eval()
    except MoecptError as exc:
        sys.exit(f"moecpt-lm-eval: error: {exc}")
    from lm_eval.__main__ import cli_evaluate

    from moecpt.analysis.harness import register  # needs lm-eval (the optional extra moecpt[eval])

    register()
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    try:
        cli_evaluate()
    except MoecptError as exc:  # bad model args, checkpoint or settings: one line, as `moecpt` prints it
        sys.exit(f"moecpt-lm-eval: error: {exc}")


if __name__ == "__main__":
    main()
