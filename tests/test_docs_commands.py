"""Every shell command of README.md and docs/*.md runs as written, shrunk to seconds (issue 17).

The commands are *extracted* from the fenced ``bash`` / ``sh`` / ``console`` blocks of the pages (a command is a
line starting with ``moecpt``, ``moecpt-lm-eval``, ``python -m moecpt[.module]``, ``./scripts/``, ``torchrun``,
``srun``, ``sbatch`` or ``lm_eval``, after any leading ``NAME=value`` words, which are kept in the command and set
in its environment; backslash continuations joined, comments dropped), so a command added to the docs later fails
:func:`test_every_documented_command_is_mapped` until :data:`COMMANDS` says how to run it. Each entry of
:data:`COMMANDS` is the command exactly as documented plus how it is shrunk:

* ``append``: arguments added at the end (fewer steps, smaller batches, tiny models); ``--set`` is applied in
  order, so an appended value wins over the documented one;
* ``env_append``: the same, for a command the docs start through a script (``./scripts/demo``): the stand-in
  ``.venv`` of the workspace has a ``moecpt`` that appends these;
* ``setup``: makes the inputs the page assumes the reader has (a corpus, a Hugging Face folder, ``my-cpt.toml``),
  or runs a page's own non-moecpt step: docs/eval.md's ``mkdir -p tasks && python make_tasks.py`` line (not a
  moecpt command, so not extracted) is :func:`local_tasks`, which runs the page's ``python`` block as
  ``make_tasks.py`` and writes the task YAMLs from its ``yaml`` block and prose;
* ``env``: what the page exports before the command (docs/eval.md's ``export HF_DATASETS_OFFLINE=1 ...``);
* ``check``: asserts on a command's output and workspace beyond its exit status (README's ``--dry-run``);
* ``same_as``: another page documents the identical command, which ran there: it is not run twice;
* ``cannot_run``: why it cannot run here (several nodes, SLURM, the Hugging Face Hub); it is then parsed by the
  real argument parsers (torchrun's and moecpt's, :func:`moecpt.cli.build_parser`) and its ``--set`` values are
  validated.

Each page's commands run in the order of :data:`COMMANDS` in one workspace of their own (a clone: ``recipes``,
``moecpt``, ``tests`` linked, ``scripts`` and ``pyproject.toml`` copied, a ``.venv`` that is this interpreter), so
a later command reads an earlier one's output and two commands of a page that write the same folder collide as they
would for a reader. ``moecpt`` commands run in this process (``moecpt.cli.main``, which is the ``moecpt`` entry
point); scripts, ``torchrun`` (2 gloo processes on the CPU) and ``moecpt-lm-eval`` (the installed console script)
run in a shell.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from unittest import mock


ROOT = Path(__file__).resolve().parent.parent
PAGES = ["README.md", *sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md"))]
BLOCK_LANGS = ("bash", "sh", "console")
APPEND_ENV = "MOECPT_DOCS_TEST_APPEND"  # read by the stand-in .venv/bin/moecpt (see _make_workspace)


# ------------------------------------------------------------------------------------------------ extraction
ENV_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")


def split_env(words: list[str]) -> tuple[dict[str, str], list[str]]:
    """A command's leading ``NAME=value`` words (the environment it runs with) and the rest."""
    n = 0
    while n < len(words) and ENV_WORD.match(words[n]):
        n += 1
    return dict(w.split("=", 1) for w in words[:n]), words[n:]


def _is_command(tokens: list[str]) -> bool:
    tokens = split_env(tokens)[1]
    if not tokens:
        return False
    head = tokens[0]
    return (head in ("moecpt", "moecpt-lm-eval", "torchrun", "srun", "sbatch", "lm_eval")
            or head.startswith("./scripts/")
            or (tokens[:2] == ["python", "-m"] and len(tokens) > 2 and tokens[2].split(".")[0] == "moecpt"))


def extract_commands(text: str) -> list[str]:
    """The commands of a page's ``bash`` / ``sh`` / ``console`` blocks, each normalised to ``shlex.join`` of its
    words (continuations joined, ``$ `` prompts and comments dropped, leading ``NAME=value`` words kept)."""
    found = []
    for block in re.findall(r"^```(\w+)\n(.*?)^```", text, flags=re.S | re.M):
        lang, body = block
        if lang not in BLOCK_LANGS:
            continue
        for line in re.sub(r"\\\n", " ", body).splitlines():
            line = line.strip().removeprefix("$ ")
            tokens = shlex.split(line, comments=True) if line and not line.startswith("#") else []
            if tokens and _is_command(tokens):
                found.append(shlex.join(tokens))
    return found


def documented() -> dict[tuple[str, str], None]:
    """``(page, command)`` of every documented command, in page order (duplicates within a page once)."""
    return {(page, cmd): None for page in PAGES for cmd in extract_commands((ROOT / page).read_text("utf-8"))}


# ------------------------------------------------------------------------------------------------- shrinking
#: a 2-step smoke run: the shrink of every `moecpt pretrain` / `cpt` on the bundled smoke recipes
RUN = ("--set", "train.steps=2", "--set", "train.batch_size=4", "--set", "data.seq_len=32",
       "--set", "train.eval_batches=1", "--set", "train.checkpoint_every=2", "--progress", "none")
EVAL = ("--batches", "1", "--batch-size", "4", "--seq-len", "32")


def study(recipe: str | None) -> Callable[[Path], tuple[str, ...]]:
    """The shrink of ``moecpt study RECIPE``: one seed, the recipe's models at the matching ``smoke-*`` size
    (names, routers and so every cell kept), 4 + 2 steps of 4 windows of 32 tokens, two validation points per
    run, one evaluation batch."""

    def shrink(ws: Path) -> tuple[str, ...]:
        from moecpt.config import read_toml

        raw = read_toml(ws / (recipe or "recipes/study/demo.toml"))
        models = []
        for m in raw["models"]:
            size = next(s for s in ("dense", "switch", "granular") if s in m["preset"])
            router = f', router="{m["router"]}"' if "router" in m else ""
            models.append(f'{{name="{m["name"]}", preset="smoke-{size}"{router}}}')
        sets = ["seeds=[0]", f"models=[{', '.join(models)}]", "pretrain.steps=4", "cpt.steps=2",
                "train.checkpoint_every=2", "train.batch_size=4", "train.eval_batches=1", "data.seq_len=32",
                "eval_points=2", "eval.batches=1", "eval.batch_size=4"]
        return tuple(a for s in sets for a in ("--set", s))

    return shrink


def _words(seed: int, n_docs: int, alphabet: str) -> list[str]:
    from moecpt.interop.testing import synthetic_texts

    return synthetic_texts(seed, n_docs, words=120, alphabet=alphabet)


def own_corpus(ws: Path) -> None:
    """README 'Your own data': English JSON Lines, a code Parquet file and German text, ~25k words each."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    (ws / "corpus/en").mkdir(parents=True)
    (ws / "corpus/de").mkdir(parents=True)
    for i in range(2):
        (ws / f"corpus/en/part{i}.jsonl").write_text(
            "".join(json.dumps({"text": t}) + "\n" for t in _words(i, 200, "aeioubdgklmnprst")), "utf-8")
    pq.write_table(pa.table({"text": _words(7, 400, "aeiofhjvwxyz")}), ws / "corpus/code.parquet")
    for i, text in enumerate(_words(9, 400, "aeioubdfgklmnrstz")):  # a plain-text file is one document
        (ws / f"corpus/de/{i:03d}.txt").write_text(text, "utf-8")


def my_study(ws: Path) -> None:
    """README's 'A study recipe, field by field' block, saved as my-study.toml."""
    text = (ROOT / "README.md").read_text("utf-8")
    (ws / "my-study.toml").write_text(re.search(r'```toml\n(name = "my-study".*?)```', text, re.S)[1], "utf-8")


def hf_folder(where: str, family: str = "olmoe") -> Callable[[Path], None]:
    """A tiny random model of ``family`` saved by transformers (config.json, safetensors, tokenizer.json) at
    ``where``."""

    def setup(ws: Path) -> None:
        from moecpt.interop.testing import save_tiny_hf

        save_tiny_hf(family, ws / where)

    return setup


def code_corpus(where: str, ext: str) -> Callable[[Path], None]:
    """Code for the imported model's CPT: JSON Lines files under ``where`` (``ext`` = the glob's suffix)."""

    def setup(ws: Path) -> None:
        import json

        (ws / where).mkdir(parents=True, exist_ok=True)
        for i in range(2):
            (ws / where / f"part{i}{ext}").write_text(
                "".join(json.dumps({"text": t}) + "\n" for t in _words(20 + i, 200, "aeiofhjvwxyz")), "utf-8")

    return setup


def cpt_recipe(name: str, data: str, mixture: str) -> Callable[[Path], None]:
    """The reader's own CPT recipe ``name``: no [model] (the parent's), ``data`` with ``mixture``."""

    def setup(ws: Path) -> None:
        (ws / name).write_text(f'name = "my-cpt"\n[data]\npath = "{data}"\nmixture = {mixture}\nseq_len = 32\n'
                               "[train]\nsteps = 2\nbatch_size = 4\neval_batches = 1\n", "utf-8")

    return setup


def _eval_page() -> str:
    return (ROOT / "docs/eval.md").read_text("utf-8")


#: the environment docs/eval.md's offline example exports (``export HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1``)
OFFLINE = dict(w.split("=", 1) for w in re.search(r"^export (.*?)\s*$", _eval_page(), re.M)[1].split())


def local_tasks(ws: Path) -> None:
    """docs/eval.md's ``mkdir -p tasks && python make_tasks.py`` (the page's ``python`` block, run as written)
    and its two task YAMLs: ``tasks/demo_ppl.yaml`` as printed, ``tasks/demo_mc.yaml`` as the prose derives it."""
    import runpy

    import yaml

    page = _eval_page()
    (ws / "tasks").mkdir()
    (ws / "make_tasks.py").write_text(re.search(r"```python\n(.*?)```", page, re.S)[1], "utf-8")
    with contextlib.chdir(ws):
        runpy.run_path("make_tasks.py", run_name="__main__")
    ppl = yaml.safe_load(re.search(r"```yaml\n(task: demo_ppl\n.*?)```", page, re.S)[1])
    mc = {**ppl, "task": "demo_mc", "dataset_kwargs": {"data_files": {"test": "tasks/demo_mc.jsonl"}},
          "output_type": "multiple_choice", "doc_to_text": "{{context}}", "doc_to_choice": "{{choices}}",
          "doc_to_target": "{{label}}", "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]}
    for name, task in (("demo_ppl", ppl), ("demo_mc", mc)):
        (ws / f"tasks/{name}.yaml").write_text(yaml.safe_dump(task, sort_keys=False), "utf-8")


def prints_plan(output: str, ws: Path) -> None:
    """README's ``--dry-run``: "the plan, as JSON; writes nothing"."""
    import json

    assert isinstance(json.loads(output), dict), output
    assert not (ws / "runs/smoke").exists()


def quoted_plan(name: str) -> Callable[[str, Path], None]:
    """docs/distributed.md quotes ``moecpt plan``'s output for recipe ``name``: the command prints exactly that."""

    def check(output: str, ws: Path) -> None:
        page = (ROOT / "docs/distributed.md").read_text("utf-8")
        quoted = re.search(rf"```\n(plan of '{name}' .*?)```", page, re.S)[1]
        assert output.strip() == quoted.strip(), f"docs/distributed.md quotes another plan than:\n{output}"

    return check


def prints(*lines: str) -> Callable[[str, Path], None]:
    """The output holds each of ``lines`` (figures the page's prose quotes)."""

    def check(output: str, ws: Path) -> None:
        missing = [line for line in lines if line not in output]
        assert not missing, f"the page quotes {missing}, the command printed:\n{output}"

    return check


def lm_eval_scored(output: str, ws: Path) -> None:
    """docs/eval.md's ``moecpt-lm-eval``: lm-eval's own table (bits per byte of the local task) and its results
    file under ``--output_path``."""
    assert "bits_per_byte" in output and "demo_ppl" in output, output
    (written,) = (ws / "lmeval_out").rglob("results_*.json")
    assert "demo_ppl" in json.loads(written.read_text())["results"]


def plans_fsdp(output: str, ws: Path) -> None:
    """docs/distributed.md's ``--json`` plan of the smoke recipe under FSDP2: JSON, sharded over the 4 ranks."""
    plan = json.loads(output)
    assert plan["layout"]["step"] == "fsdp" and plan["params"]["per_rank"]["total"] < plan["params"]["total"], output


@dataclass(frozen=True)
class C:
    """A documented command and how the test runs it (see the module docstring)."""

    page: str
    command: str
    append: tuple[str, ...] | Callable[[Path], tuple[str, ...]] = ()
    env_append: tuple[str, ...] | Callable[[Path], tuple[str, ...]] = ()
    setup: Callable[[Path], None] | None = None
    same_as: str = ""  # a page whose identical command ran
    cannot_run: str = ""
    shell: bool = False  # run through bash (scripts, torchrun) instead of in this process
    env: dict[str, str] = field(default_factory=dict)  # what the page exports before it (a command's own
    # leading NAME=value words are applied too)
    check: Callable[[str, Path], None] | None = None  # asserts on the output (stdout and stderr) and workspace

    def args(self, ws: Path, which: str) -> tuple[str, ...]:
        value = getattr(self, which)
        return value(ws) if callable(value) else value


R, D, E, H, S = "README.md", "docs/distributed.md", "docs/eval.md", "docs/interop.md", "docs/study.md"
HUB = "datasets from the Hugging Face Hub (network)"
PAPER_EVAL = "moecpt eval --checkpoint runs/olmoe-code --device cuda --batch-size 32 --out scores-"
PLAN_EP = "moecpt plan --recipe recipes/paper-ep.toml --world 8 --gpu-memory-gib 80"
SMOKE_DILOCO = ("moecpt pretrain --recipe recipes/smoke.toml --out runs/sim --simulate-workers 4 --set "
                "distributed.sync=diloco --set distributed.local_steps=10")

#: every documented command, in the order each page's commands run
COMMANDS: list[C] = [
    # README: set-up scripts (a stand-in .venv: nothing is installed)
    C(R, "./scripts/demo", env_append=study(None), shell=True),
    # one fast file stands for the suite: what is checked is that the script finds the venv and passes pytest's
    # arguments through (the whole suite is this very run)
    C(R, "./scripts/test", append=("tests/test_mesh.py", "-q", "-p", "no:cacheprovider"), shell=True),
    # README: studies (the demo's folder is the one ./scripts/demo made: every stage is reused)
    C(R, "moecpt study --out runs/study-demo", append=study(None)),
    C(R, "moecpt study recipes/study/cpu.toml --out runs/cpu", append=study("recipes/study/cpu.toml")),
    C(R, "moecpt study recipes/study/smoke.toml --out runs/study-smoke", append=study("recipes/study/smoke.toml")),
    # README: your own data, then the field-by-field recipe on it
    C(R, "moecpt data prepare --source 'english=corpus/en/*.jsonl' --source code=corpus/code.parquet --source "
         "'german=corpus/de/*.txt' --tokenizer train:32000 --out data/prepared", setup=own_corpus),
    C(R, "moecpt data inspect data/prepared --json"),
    C(R, "moecpt study my-study.toml --out runs/mine --jobs 4", setup=my_study,
      append=lambda ws: (*study("my-study.toml")(ws), "--jobs", "2")),
    # README: training by hand
    C(R, "moecpt pretrain --recipe recipes/smoke.toml --out runs/smoke --dry-run", append=RUN, check=prints_plan),
    C(R, "moecpt pretrain --recipe recipes/smoke.toml --out runs/smoke", append=RUN),
    C(R, "moecpt cpt --recipe recipes/cpt-smoke.toml --from runs/smoke --out runs/smoke-cpt", append=RUN),
    C(R, "moecpt eval --checkpoint runs/smoke-cpt --json", append=EVAL),
    C(R, "moecpt eval --checkpoint runs/smoke-cpt --harness hellaswag arc_easy", cannot_run=HUB),
    C(R, "moecpt compare runs/smoke runs/smoke-cpt --json", append=EVAL),
    C(R, "moecpt generate --checkpoint runs/smoke-cpt --prompt 'def '", append=("--max-tokens", "4")),
    C(R, "moecpt schedule --recipe recipes/smoke.toml --out schedule.png"),
    C(R, "moecpt inspect --preset paper-granular --vocab-size 128256 --json"),
    # README: an open MoE (a tiny random OLMoE stands in for the 7B one)
    C(R, "moecpt import-hf path/to/OLMoE-1B-7B-0924 --out ckpt/olmoe", setup=hf_folder("path/to/OLMoE-1B-7B-0924")),
    C(R, "moecpt data prepare --source 'code=my-code/*.jsonl' --tokenizer ckpt/olmoe/tokenizer.json --out "
         "data/code", setup=code_corpus("my-code", ".jsonl")),
    C(R, "moecpt cpt --recipe my-cpt.toml --from ckpt/olmoe --out runs/olmoe-code",
      setup=cpt_recipe("my-cpt.toml", "data/code", "{ code = 1.0 }"), append=("--progress", "none")),
    C(R, "moecpt export-hf runs/olmoe-code --out hf/olmoe-code"),
    # README: DeepSeek-V3 (a tiny random deepseek_v3 stands in for the 671B one)
    C(R, "moecpt import-hf path/to/DeepSeek-V3-bf16 --out ckpt/dsv3",
      setup=hf_folder("path/to/DeepSeek-V3-bf16", "deepseek_v3")),
    C(R, "moecpt data prepare --source 'code=my-code/*.jsonl' --tokenizer ckpt/dsv3/tokenizer.json --out "
         "data/code-ds"),
    C(R, "moecpt cpt --recipe my-ds-cpt.toml --from ckpt/dsv3 --out runs/dsv3-code",
      setup=cpt_recipe("my-ds-cpt.toml", "data/code-ds", "{ code = 1.0 }"), append=("--progress", "none")),
    C(R, "moecpt export-hf runs/dsv3-code --out hf/dsv3-code"),
    # README: GPT-OSS (a tiny random GPT-OSS with a window of 4 stands in for gpt-oss-20b)
    C(R, "moecpt import-hf path/to/gpt-oss-20b --out ckpt/gpt-oss",
      setup=hf_folder("path/to/gpt-oss-20b", "gpt_oss")),
    C(R, "moecpt data prepare --source 'code=my-code/*.jsonl' --tokenizer ckpt/gpt-oss/tokenizer.json --out "
         "data/code-gptoss"),
    C(R, "moecpt cpt --recipe my-gptoss-cpt.toml --from ckpt/gpt-oss --out runs/gpt-oss-code",
      setup=cpt_recipe("my-gptoss-cpt.toml", "data/code-gptoss", "{ code = 1.0 }"), append=("--progress", "none")),
    C(R, "moecpt export-hf runs/gpt-oss-code --out hf/gpt-oss-code --dtype bf16"),
    # README: many machines (torchrun: 2 gloo processes on the CPU)
    C(R, "torchrun --nproc-per-node 2 -m moecpt pretrain --recipe recipes/smoke.toml --out runs/ddp",
      append=RUN, shell=True),
    C(R, "torchrun --nproc-per-node 2 -m moecpt pretrain --recipe recipes/smoke.toml --out runs/diloco --set "
         "distributed.sync=diloco --set distributed.local_steps=10", append=RUN, shell=True),
    C(R, SMOKE_DILOCO, append=RUN),
    C(R, PLAN_EP, check=quoted_plan("paper-ep")),
    # docs/distributed.md
    C(D, "torchrun --nproc-per-node 2 -m moecpt pretrain --recipe moecpt/recipes/smoke.toml --out runs/smoke-ddp",
      append=RUN, shell=True),
    C(D, "torchrun --nproc-per-node 2 -m moecpt cpt --recipe my-cpt.toml --from runs/smoke-ddp --out runs/cpt "
         "--set distributed.sync=diloco --set distributed.local_steps=10",
      setup=cpt_recipe("my-cpt.toml", "demo", "{ code = 0.7, english = 0.3 }"), append=RUN, shell=True),
    C(D, SMOKE_DILOCO.replace("recipes/", "moecpt/recipes/"), append=RUN),
    C(D, "torchrun --nproc-per-node 2 -m moecpt pretrain --recipe moecpt/recipes/smoke.toml --out runs/smoke-ep "
         "--set model.preset=smoke-switch --set distributed.expert_parallel=2", append=RUN, shell=True),
    C(D, "torchrun --nproc-per-node 4 -m moecpt pretrain --recipe moecpt/recipes/smoke.toml --out runs/smoke-ep-fsdp "
         "--set model.preset=smoke-switch --set distributed.expert_parallel=2 --set distributed.sync=fsdp",
      append=RUN, shell=True),
    C(D, "torchrun --nproc-per-node 4 -m moecpt pretrain --recipe moecpt/recipes/smoke.toml --out runs/islands "
         "--set distributed.sync=diloco --set distributed.local_steps=10 --set distributed.islands=2",
      append=RUN, shell=True),
    C(D, "torchrun --nproc-per-node 4 -m moecpt pretrain --recipe moecpt/recipes/smoke.toml --out runs/islands-fsdp "
         "--set distributed.sync=diloco --set distributed.local_steps=10 --set distributed.islands=2 "
         "--set distributed.island_sync=fsdp", append=RUN, shell=True),
    C(D, "torchrun --nproc-per-node 4 -m moecpt pretrain --recipe moecpt/recipes/smoke.toml --out runs/islands-ep "
         "--set model.preset=smoke-switch --set distributed.sync=diloco --set distributed.local_steps=10 "
         "--set distributed.islands=2 --set distributed.expert_parallel=2", append=RUN, shell=True),
    C(D, "srun torchrun --nnodes '$SLURM_NNODES' --nproc-per-node 8 --rdzv-id '$SLURM_JOB_ID' --rdzv-backend "
         "c10d --rdzv-endpoint '$head:29500' --max-restarts 3 -m moecpt pretrain --recipe recipes/paper-diloco.toml "
         "--out /shared/runs/paper-diloco",
      cannot_run="a SLURM job of 4 nodes x 8 GPUs (srun, NCCL, a shared /shared file system)"),
    C(D, PLAN_EP, same_as=R),
    C(D, "moecpt plan --recipe recipes/paper-ep-islands.toml --world 8 --gpu-memory-gib 80",
      check=quoted_plan("paper-ep-islands")),
    C(D, "moecpt plan --recipe recipes/paper-diloco.toml --world 32 --gpu-memory-gib 80",
      check=prints("peak (sum)                    70.9 GiB", "outer round, every round      14.6 GiB")),
    C(D, "moecpt plan --recipe moecpt/recipes/smoke.toml --world 4 --set distributed.sync=fsdp --json",
      check=plans_fsdp),
    # docs/eval.md: the local tasks, offline, on the page's smoke checkpoint; the paper's tasks need the Hub
    C(E, "moecpt pretrain --recipe recipes/smoke.toml --out runs/smoke", append=RUN),
    C(E, "moecpt eval --checkpoint runs/smoke --harness demo_ppl demo_mc --include-path tasks --out scores.json",
      setup=local_tasks, env=OFFLINE, append=("--limit", "4", "--batch-size", "4")),
    C(E, "moecpt-lm-eval --model moecpt --model_args checkpoint=runs/smoke --tasks demo_ppl --include_path tasks "
         "--device cpu --batch_size 16 --output_path lmeval_out", env=OFFLINE,
      append=("--limit", "4", "--batch_size", "4"), shell=True, check=lm_eval_scored),
    C(E, f"{PAPER_EVAL}en.json --harness hellaswag arc_easy arc_challenge piqa lambada_openai", cannot_run=HUB),
    C(E, f"{PAPER_EVAL}de.json --harness hellaswag_de arc_de m_mmlu_de lambada_openai_mt_de", cannot_run=HUB),
    C(E, "HF_ALLOW_CODE_EVAL=1 moecpt eval --checkpoint runs/olmoe-code --device cuda --out scores-code.json "
         "--harness humaneval --confirm-run-unsafe-code", cannot_run=HUB),
    # docs/interop.md (the same flow as the README's, with the reader's folders)
    C(H, "moecpt import-hf '~/models/OLMoE-1B-7B-0924' --out ckpt/olmoe",
      setup=hf_folder("home/models/OLMoE-1B-7B-0924")),  # HOME is the workspace's home/
    C(H, "moecpt data prepare --source code=corpus/code --tokenizer ckpt/olmoe/tokenizer.json --out data/code",
      setup=code_corpus("corpus/code", ".jsonl")),
    C(H, "moecpt cpt --recipe recipe.toml --from ckpt/olmoe --out runs/olmoe-code",
      setup=cpt_recipe("recipe.toml", "data/code", "{ code = 1.0 }"), append=("--progress", "none")),
    C(H, "moecpt eval --checkpoint runs/olmoe-code --data data/code", append=EVAL),
    C(H, "moecpt compare ckpt/olmoe runs/olmoe-code --data data/code", append=EVAL),
    C(H, "moecpt export-hf runs/olmoe-code --out hf/olmoe-code"),
    # docs/study.md
    C(S, "moecpt study recipes/study/cpu.toml --out runs/cpu", same_as=R),
    *(C(S, f"moecpt pretrain --recipe recipes/pilot-scale.toml --out runs/{out} --set model.preset=demo-{m}{steps} "
           "--set train.threads=1", append=(*RUN, "--set", f"model.preset=smoke-{m}"))
      for out, m, steps in (("pilot-dense", "dense", ""), ("pilot-granular", "granular", ""),
                            ("pilot500-dense", "dense", " --set train.steps=500"),
                            ("pilot500-granular", "granular", " --set train.steps=500"))),
]


# --------------------------------------------------------------------------------------------------- running
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _make_workspace(ws: Path) -> None:
    """A clone as the docs assume one: the package, recipes and tests linked, the scripts and pyproject copied,
    and a ``.venv`` that already counts as installed (its python is this interpreter)."""
    ws.mkdir(parents=True)
    for name in ("moecpt", "recipes", "tests", "benchmarks"):
        (ws / name).symlink_to(ROOT / name)
    shutil.copytree(ROOT / "scripts", ws / "scripts")
    shutil.copy2(ROOT / "pyproject.toml", ws / "pyproject.toml")
    bin_ = ws / ".venv/bin"
    bin_.mkdir(parents=True)
    (bin_ / "python").write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
    (bin_ / "moecpt").write_text(  # the entry point, plus the shrink arguments of the command that runs it
        f"#!{sys.executable}\nimport os, shlex, sys\nfrom moecpt.cli import main\n"
        "if __name__ == '__main__':  # a study's spawned workers re-import this file\n"
        f"    sys.exit(main(sys.argv[1:] + shlex.split(os.environ.get({APPEND_ENV!r}, ''))))\n")
    (bin_ / "activate").write_text(f'export PATH={shlex.quote(str(bin_))}:"$PATH"\n')
    for f in bin_.iterdir():
        f.chmod(0o755)
    later = (ws / "pyproject.toml").stat().st_mtime + 60
    for kind in ("run", "dev"):  # scripts/_env.sh installs unless its stamp is newer than pyproject.toml
        stamp = ws / f".venv/.moecpt-installed-{kind}"
        stamp.touch()
        os.utime(stamp, (later, later))
    (ws / "home").mkdir()


def _env(ws: Path, c: C) -> dict[str, str]:
    return {**os.environ, **c.env, **split_env(shlex.split(c.command))[0], "PYTHONPATH": str(ROOT),
            "HOME": str(ws / "home"), "PET_MASTER_PORT": str(_free_port()),
            APPEND_ENV: shlex.join(c.args(ws, "env_append")),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def _run_shell(c: C, ws: Path) -> tuple[int, str]:
    cmd = f"{c.command} {shlex.join(c.args(ws, 'append'))}"
    p = subprocess.run(["bash", "-c", cmd], cwd=ws, env=_env(ws, c), capture_output=True, text=True, timeout=600)
    return p.returncode, p.stdout + p.stderr


def _run_in_process(c: C, ws: Path) -> tuple[int, str]:
    from test_cli_train import moecpt_call

    env, words = split_env(shlex.split(c.command))
    words = [os.path.join(str(ws / "home"), w[2:]) if w.startswith("~/") else w for w in words]
    argv = words[3:] if words[0] == "python" else words[1:]
    # the page's `export` and the command's NAME=value words, for this command only
    with contextlib.chdir(ws), mock.patch.dict(os.environ, {**c.env, **env}):
        res = moecpt_call(*argv, *c.args(ws, "append"))
    return res.returncode, res.stdout + res.stderr


def _parse_only(c: C, ws: Path) -> None:
    """Parse with the real parsers: torchrun's (when present), then moecpt's; validate the ``--set`` values on
    the recipe the command names where the clone has it (``recipes/paper-diloco.toml``), else on the bundled smoke
    recipe (the reader's own recipe is not here)."""
    from moecpt.cli import build_parser
    from moecpt.config import load_recipe

    words = split_env(shlex.split(c.command))[1]
    if "torchrun" in words:
        from torch.distributed.run import get_args_parser

        targs = get_args_parser().parse_args(words[words.index("torchrun") + 1:])
        assert targs.module and targs.training_script == "moecpt", c.command
        words = ["moecpt", *targs.training_script_args]
    assert words[0] == "moecpt", f"no parser known for {words[0]!r}: teach _parse_only in {__file__} to parse it"
    args = build_parser().parse_args(words[1:])
    named = ws / getattr(args, "recipe", None) if getattr(args, "recipe", None) else None
    load_recipe(named if named is not None and named.is_file() else ws / "recipes/smoke.toml", getattr(args, "set", []))


def run_page(page: str, root: Path, ran: set[tuple[str, str]]) -> list[str]:
    """Run ``page``'s commands in order in ``root/<page>``, adding each that succeeded to ``ran``; returns one
    failure report per failed command."""
    ws = root / page.replace("/", "_")
    _make_workspace(ws)
    failures = []
    for c in (c for c in COMMANDS if c.page == page):
        if c.same_as:
            if (c.same_as, c.command) not in ran:
                failures.append(f"{page}: `{c.command}` is same_as={c.same_as!r}, but that page's run of it failed "
                                "or it does not document it")
            continue
        if c.setup:
            c.setup(ws)
        if c.cannot_run:
            _parse_only(c, ws)
            continue
        t0 = time.perf_counter()
        rc, output = (_run_shell if c.shell else _run_in_process)(c, ws)
        print(f"{time.perf_counter() - t0:6.1f} s  {page}: {c.command}")  # shown by pytest -s, or on failure
        if rc == 0 and c.check:
            try:
                c.check(output, ws)
            except (AssertionError, ValueError) as exc:  # ValueError: output that is not the JSON it should be
                rc, output = "0 but its check failed", f"{output}\n{exc!r}"
        if rc == 0:
            ran.add((page, c.command))
        else:
            tail = "\n    ".join(output.strip().splitlines()[-15:])
            failures.append(f"{page}: `{c.command}` (+ {shlex.join(c.args(ws, 'append'))}) exited {rc}:\n    {tail}")
    return failures


# ----------------------------------------------------------------------------------------------------- tests
def test_every_documented_command_is_mapped():
    """The docs and :data:`COMMANDS` list the same commands: a new or edited doc command needs an entry."""
    docs = documented()
    table = {(c.page, c.command): None for c in COMMANDS}
    missing = [k for k in docs if k not in table]
    stale = [k for k in table if k not in docs]
    assert not missing, ("documented commands the test does not run; add to COMMANDS in tests/test_docs_commands.py "
                         "(with a shrink, or cannot_run='why'):\n"
                         + "\n".join(f"    C({p!r}, {c!r})," for p, c in missing))
    assert not stale, "COMMANDS entries no page documents (edited or removed? update them):\n" + "\n".join(
        f"    {p}: {c}" for p, c in stale)


def test_documented_commands_run(tmp_path, monkeypatch):
    """Every documented command runs (shrunk) in its page's workspace and exits 0; unrunnable ones parse."""
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # study stages and torchrun ranks import this tree
    ran: set[tuple[str, str]] = set()
    failures = [f for page in PAGES for f in run_page(page, tmp_path, ran)]
    assert not failures, "\n".join(failures)


def _moecpt_argv(command: str) -> list[str]:
    """The moecpt arguments of a documented command (after ``torchrun ... -m moecpt`` / ``python -m moecpt``)."""
    words = shlex.split(command)
    if "-m" in words and words[words.index("-m") + 1] == "moecpt":
        return words[words.index("-m") + 2:]
    return words[1:]


def test_documented_local_sgd_runs_have_whole_rounds():
    """A documented local-SGD-family run *as written* (not shrunk) names its H and keeps every round H steps
    long: the CLI's DiLoCo check passes and :class:`LocalSGDSync` prints no interval warning (a raw Python warning
    on the reader's terminal, issue 17). Runs on the reader's own recipe (not in the repository) are skipped."""
    import warnings

    import torch

    from moecpt.cli import build_parser
    from moecpt.config import load_recipe
    from moecpt.distributed.cli import check_diloco_rounds
    from moecpt.distributed.launch import DistInfo
    from moecpt.distributed.local_sgd import LocalSGDSync
    from moecpt.distributed.strategy import LOCAL_SYNCS

    checked = 0
    for _, command in documented():
        argv = _moecpt_argv(command)
        if argv[:1] not in (["pretrain"], ["cpt"]) or not (ROOT / argv[argv.index("--recipe") + 1]).is_file():
            continue
        args = build_parser().parse_args(argv)
        recipe = load_recipe(ROOT / args.recipe, args.set)
        check_diloco_rounds(recipe)
        if recipe.distributed.sync in LOCAL_SYNCS:
            k = args.simulate_workers or 2
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                LocalSGDSync(recipe, DistInfo(), k, k, torch.device("cpu"))
            checked += 1
    assert checked >= 3  # the README's and distributed.md's DiLoCo examples


def test_diloco_without_local_steps_is_refused_in_one_line(tmp_path, capsys):
    from moecpt.cli import main

    out = tmp_path / "run"
    assert main(["pretrain", "--recipe", str(ROOT / "recipes/smoke.toml"), "--out", str(out),
                 "--set", "distributed.sync=diloco"]) == 2
    err = capsys.readouterr().err.strip()
    assert "needs distributed.local_steps" in err and "--set distributed.local_steps=" in err and "\n" not in err
    assert not out.exists()  # refused before anything is written
    # the hint is one a reader can follow: its H divides the recipe's intervals (a fresh user was told 16 for
    # smoke.toml's 20 / 10, which then printed the interval warning)
    from moecpt.config import load_recipe

    h = int(err.split("--set distributed.local_steps=")[1].split(",")[0])
    t = load_recipe(ROOT / "recipes/smoke.toml").train
    assert h > 1 and t.eval_every % h == 0 and t.checkpoint_every % h == 0, (h, t.eval_every, t.checkpoint_every)


def test_suggested_local_steps_is_the_largest_common_divisor_up_to_64():
    from moecpt.distributed.cli import suggested_local_steps

    assert suggested_local_steps(20, 10) == 10
    assert suggested_local_steps(500, 1000) == 50  # 500's divisors up to 64: the largest is 50
    assert suggested_local_steps(50, 50) == 50
    assert suggested_local_steps(7, 5) == 1
    assert suggested_local_steps(128, 256) == 64
