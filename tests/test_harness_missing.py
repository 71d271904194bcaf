"""Without lm-eval installed, the harness commands say in one line what to install (no traceback)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# `sys.modules["lm_eval"] = None` makes every `import lm_eval` fail as if the package were absent
HIDE = "import sys; sys.modules['lm_eval'] = None; "


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", HIDE + code], capture_output=True, text=True, cwd=REPO,
                          timeout=120, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})


def test_eval_harness_without_lm_eval_names_the_extra():
    res = _run("from moecpt.cli import main; sys.exit(main(['eval', '--checkpoint', 'x', '--harness', 'arc_easy']))")
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip().splitlines() == [
        "moecpt: error: lm-evaluation-harness is not installed: pip install 'moecpt[eval]' "
        "(or pip install 'lm-eval>=0.4.5')"]


def test_moecpt_lm_eval_without_lm_eval_names_the_extra():
    res = _run("from moecpt.analysis.harness_run import main; main(['--model', 'moecpt'])")
    assert res.returncode == 1 and "pip install 'moecpt[eval]'" in res.stderr and "Traceback" not in res.stderr


def test_every_other_command_works_without_lm_eval():
    """lm-eval is an optional extra: building the CLI (every command) must not import it."""
    res = _run("from moecpt.cli import main; "
               "sys.exit(main(['inspect', '--preset', 'smoke-dense', '--vocab-size', '64', '--json']))")
    assert res.returncode == 0, res.stderr
    assert '"total_params"' in res.stdout or "params" in res.stdout


def test_eval_out_without_harness_is_refused_not_ignored(tmp_path, capsys):
    from moecpt.cli import main

    assert main(["eval", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "s.json")]) == 2
    assert "--out writes lm-evaluation-harness scores" in capsys.readouterr().err
    assert not (tmp_path / "s.json").exists()
