"""Imports run one way (docs/design.md, rule A2): every import of every module under ``moecpt/`` (module level and
inside functions, absolute and relative) is mapped to its area, and an area may import only areas of lower layers.

Reading the source (``ast``) rather than ``sys.modules`` catches the lazy imports inside functions too, which are
back-edges all the same: they only postpone the cycle to the call.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "moecpt"

#: the layers, lowest first; an area imports only areas of strictly lower layers. Areas sharing a layer stand beside
#: each other and import neither way. An area is a subpackage (``moecpt/train/``) or a top-level module
#: (``moecpt/config.py``); ``moecpt`` is the package's own ``__init__`` (the ``load_model`` facade).
LAYERS: list[set[str]] = [
    {"errors", "_version", "argtypes"},  # no moecpt imports at all
    {"storage"},  # atomic writes, locks, output folders, preflight
    {"config"},  # typed recipes
    {"data"},  # readers, tokenizer, shards, mixtures: no model needed
    {"model"},  # transformer, MoE, routing (`moecpt inspect` reads a data folder's vocabulary)
    {"train"},  # trainer, checkpoints, schedules, the runtime interface (train/parallel.py)
    {"lopt"},  # learned outer optimizers: meta-training uses train's pre-emption; no distributed import
    {"distributed"},  # strategies, the Distributed runtime, `pretrain` / `cpt`; uses lopt's outer optimizers
    {"interop", "analysis"},  # Hugging Face import/export; pure metrics (routing, forgetting, evaluation)
    {"study"},  # the CPT study: plan, runner, typed results, findings, report (uses analysis's metrics)
    {"cli"},  # the `moecpt` dispatcher (it finds the areas' cli modules by name, at run time)
    {"__main__", "moecpt"},  # `python -m moecpt`; the facade (`moecpt.load_model`)
]

#: known departures, each ``(importing area, imported area): reason``; empty: there are none.
EXCEPTIONS: dict[tuple[str, str], str] = {}


def _area(parts: list[str]) -> str | None:
    """``["moecpt", "train", "trainer"]`` -> ``"train"``; ``["moecpt"]`` or a name of the package's ``__init__``
    (``["moecpt", "load_model"]``) -> ``"moecpt"``; not moecpt -> None."""
    if not parts or parts[0] != "moecpt":
        return None
    return parts[1] if len(parts) > 1 and parts[1] in areas() else "moecpt"


def module_imports(path: Path) -> list[tuple[int, list[str]]]:
    """``(line, dotted name as parts)`` of every moecpt module or name ``path`` imports, at any depth."""
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    package = parts[:-1]  # for relative imports (an __init__'s package is its folder, which this also gives)
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name.split(".")) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            mod = base + (node.module.split(".") if node.module else [])
            # `from moecpt import x` / `from . import x`: x may be a subpackage, so each name counts
            found += [(node.lineno, mod + [a.name]) for a in node.names] if len(mod) == 1 or not node.module \
                else [(node.lineno, mod)]
    return found


def edges() -> list[tuple[str, str, str]]:
    """``(importing area, imported area, "file:line name")`` for every import across areas."""
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        src = _area(list(path.relative_to(PACKAGE.parent).with_suffix("").parts))
        for line, name in module_imports(path):
            dst = _area(name)
            if dst is not None and dst != src:
                out.append((src, dst, f"{path.relative_to(PACKAGE.parent)}:{line} imports {'.'.join(name)}"))
    return out


def layer_of() -> dict[str, int]:
    return {area: i for i, layer in enumerate(LAYERS) for area in layer}


def areas() -> set[str]:
    found = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    found |= {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    return found | {"moecpt"}


def test_every_area_has_a_layer():
    missing = areas() - set(layer_of())
    assert not missing, f"give these areas a layer in LAYERS: {sorted(missing)}"
    assert not set(layer_of()) - areas(), "LAYERS names an area that no longer exists"


def test_imports_only_go_down():
    rank = layer_of()
    bad = [f"{src} (layer {rank[src]}) -> {dst} (layer {rank[dst]}): {where}"
           for src, dst, where in edges()
           if rank.get(src, -1) <= rank.get(dst, -1) and (src, dst) not in EXCEPTIONS]
    assert not bad, "imports against docs/design.md rule A2 (lower or same layer imports higher):\n" + "\n".join(bad)


def test_no_cycle_between_areas():
    graph: dict[str, set[str]] = {}
    for src, dst, _ in edges():
        graph.setdefault(src, set()).add(dst)
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path + [node, nxt]
            if nxt not in state and (cycle := visit(nxt, path + [node])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start, [])
            assert cycle is None, "import cycle between areas: " + " -> ".join(cycle[cycle.index(cycle[-1]):])


def test_exceptions_are_still_needed():
    """A listed exception that no import needs any more must be removed, so the list never hides a new edge."""
    used = {(src, dst) for src, dst, _ in edges()}
    stale = [k for k in EXCEPTIONS if k not in used]
    assert not stale, f"remove these from EXCEPTIONS (no import needs them): {stale}"


@pytest.mark.parametrize("code, edge", [
    ("import moecpt.distributed.launch\n", ("train", "distributed")),
    ("def f():\n    from moecpt.cli import main\n", ("train", "cli")),
    ("def f():\n    from ..distributed import runtime\n", ("train", "distributed")),
    ("from moecpt import cli\n", ("train", "cli")),
])
def test_the_checker_sees_every_kind_of_import(tmp_path, monkeypatch, code, edge):
    """Module-level, function-level, relative and ``from moecpt import area`` imports are all found."""
    fake = tmp_path / "moecpt"
    (fake / "train").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "train" / "__init__.py").write_text("")
    (fake / "train" / "bad.py").write_text(code)
    (fake / "distributed").mkdir()
    (fake / "distributed" / "__init__.py").write_text("")
    (fake / "distributed" / "runtime.py").write_text("")
    (fake / "cli.py").write_text("")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    found = {(src, dst) for src, dst, _ in edges()}
    assert edge in found
    rank = layer_of()
    assert rank[edge[0]] < rank[edge[1]]  # a back-edge, which test_imports_only_go_down would refuse


#: what a function may import (docs/design.md, rule A2): heavy libraries that are optional extras or that one
#: command alone needs, and platform-specific modules; every other dependency is imported at the module's top, so
#: the top of a file lists what it depends on
LAZY_MODULES = ("transformers", "tensorboard", "torch.utils.tensorboard", "wandb", "lm_eval", "datasets", "pyarrow",
                "huggingface_hub", "matplotlib", "sklearn", "torch._dynamo", "torch._inductor", "torch.utils._triton",
                "resource",
                "moecpt.analysis.harness")  # the lm-eval adapter: importing it imports lm-eval (moecpt[eval])

#: modules whose functions import more, each with why
LAZY_EXCEPTIONS: dict[str, str] = {
    "moecpt/__init__.py": "the load_model facade: `import moecpt` must not import torch",
    "moecpt/study/cli.py": "`moecpt study` imports its runner (and so matplotlib, ~1.7 s) only when it runs",
}


def function_level_imports(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` of every import inside a function of ``path``."""
    out = []
    for fn in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, ast.Import):
                    out += [(node.lineno, a.name) for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    out.append((node.lineno, "." * node.level + (node.module or "")))
    return out


def _lazy_ok(module: str) -> bool:
    return any(module == m or module.startswith(m + ".") for m in LAZY_MODULES)


def test_function_level_imports_only_for_heavy_optional_libraries():
    bad = [f"{path.relative_to(PACKAGE.parent)}:{line} imports {mod}"
           for path in sorted(PACKAGE.rglob("*.py"))
           if str(path.relative_to(PACKAGE.parent)) not in LAZY_EXCEPTIONS
           for line, mod in function_level_imports(path) if not _lazy_ok(mod)]
    assert not bad, ("move these imports to the top of their module (or, for a heavy optional library, add it to "
                     "LAZY_MODULES):\n" + "\n".join(bad))


def test_lazy_exceptions_are_still_needed():
    stale = [f for f in LAZY_EXCEPTIONS
             if not any(not _lazy_ok(m) for _, m in function_level_imports(PACKAGE.parent / f))]
    assert not stale, f"remove these from LAZY_EXCEPTIONS (their functions import nothing else now): {stale}"


def test_lazy_import_checker_sees_nested_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import os\ndef f():\n    if True:\n        from moecpt.config import Recipe\n    import wandb\n")
    assert sorted(function_level_imports(f)) == [(4, "moecpt.config"), (5, "wandb")]
    assert not _lazy_ok("moecpt.config") and _lazy_ok("wandb") and _lazy_ok("matplotlib.pyplot")


#: inside ``moecpt/interop/families/``: each module's allowed imports from the package (the machinery below the
#: families, a family only from the machinery and the shared DeepSeek-style router base it subclasses)
FAMILY_MACHINERY = {"pieces", "helpers", "base"}
FAMILY_ALLOWED = {"pieces": set(), "helpers": {"pieces"}, "base": {"pieces", "helpers"},
                  "deepseek_routed": FAMILY_MACHINERY}


def test_family_modules_import_only_the_machinery_below_them():
    folder = PACKAGE / "interop" / "families"
    names = {p.stem for p in folder.glob("*.py")} - {"__init__"}
    bad = []
    for path in sorted(folder.glob("*.py")):
        if path.stem == "__init__":
            continue
        allowed = FAMILY_ALLOWED.get(path.stem, FAMILY_MACHINERY | {"deepseek_routed"})
        for line, parts in module_imports(path):
            if parts[:3] == ["moecpt", "interop", "families"]:
                target = parts[3] if len(parts) > 3 and parts[3] in names else "__init__"
                if target not in allowed:
                    bad.append(f"{path.name}:{line} imports families.{target}")
    assert not bad, "\n".join(bad)
