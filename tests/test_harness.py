"""The lm-evaluation-harness adapter (``--model moecpt``, ``moecpt eval --harness``), offline: local task YAMLs over
text decoded from the bundled demo data, scored by lm-eval's own ``simple_evaluate`` on a checkpoint trained here,
and checked against moecpt's own loss on the same text."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

# the harness's hub datasets cannot be fetched here: every test reads local files only
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"

lm_eval = pytest.importorskip("lm_eval")

import torch  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from tiny_recipes import raw_recipe  # noqa: E402

from moecpt.analysis.harness import MoecptLM, register  # noqa: E402
from moecpt.analysis.harness_run import check_results_path  # noqa: E402
from moecpt.config import recipe_from_dict  # noqa: E402
from moecpt.data.prepared import PreparedData  # noqa: E402
from moecpt.errors import MoecptError  # noqa: E402
from moecpt.train.trainer import Trainer  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

PPL_YAML = """task: moecpt_demo_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {docs}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""

MC_YAML = """task: moecpt_demo_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {mc}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
"""


GEN_YAML = """task: moecpt_demo_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {mc}
test_split: test
unsafe_code: true
output_type: generate_until
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{choices[0]}}}}"
generation_kwargs:
  until: [" "]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
"""


def _demo_docs(n: int, source: str = "english") -> list[str]:
    """The first ``n`` held-out documents of a bundled demo source, as text."""
    data = PreparedData.open("demo")
    toks, off = data.val_tokens(source), data.doc_offsets(source, "val")
    return [data.decode(toks[off[i]:off[i + 1]]) for i in range(n)]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """A checkpoint trained for a few steps (smoke-switch: dropless MoE, max_seq_len 64) and a folder of two local
    tasks: a perplexity task over 6 demo documents (300-400 characters: longer than the window) and a 2-way choice task."""
    root = tmp_path_factory.mktemp("harness")
    run = root / "run"
    Trainer(recipe_from_dict(raw_recipe("smoke-switch", steps=2, checkpoint_every=2)), run, show_progress=False).run()
    docs = [d[:400] for d in _demo_docs(100) if len(d) >= 300][:6]
    assert len(docs) == 6
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    mc = [{"context": d[:40], "choices": [d[40:80], docs[(i + 1) % len(docs)][40:80]], "label": 0}
          for i, d in enumerate(docs)]
    (root / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mc))
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "ppl.yaml").write_text(PPL_YAML.format(docs=root / "docs.jsonl"))
    (tasks / "mc.yaml").write_text(MC_YAML.format(mc=root / "mc.jsonl"))
    (tasks / "gen.yaml").write_text(GEN_YAML.format(mc=root / "mc.jsonl"))
    return {"run": run, "docs": docs, "tasks": tasks, "root": root}


@pytest.fixture(scope="module")
def lm(bench):
    return MoecptLM(checkpoint=str(bench["run"]), device="cpu", batch_size=1)


def _own_nll(lm: MoecptLM, text: str) -> float:
    """moecpt's own loss: summed next-token NLL (nats) of ``text`` after the eod token, in one forward pass."""
    ids = [lm.eot_token_id] + lm.tok_encode(text)
    assert len(ids) - 1 <= lm.model.cfg.max_seq_len
    x = torch.tensor([ids])
    with torch.no_grad():
        logits = lm.model(x[:, :-1]).float()
    return float(torch.nn.functional.cross_entropy(logits[0], x[0, 1:], reduction="sum"))


def _req(kind: str, *args) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def test_rolling_loglikelihood_equals_moecpts_own_loss(lm, bench):
    short = [d for d in (x[:150] for x in bench["docs"]) if len(lm.tok_encode(d)) <= lm.max_length]
    assert len(short) >= 3
    got = lm.loglikelihood_rolling([_req("loglikelihood_rolling", d) for d in short])
    for text, ll in zip(short, got, strict=True):
        assert -ll == pytest.approx(_own_nll(lm, text), rel=1e-4)


def _reference_rolling(lm: MoecptLM, text: str) -> float:
    """The harness's rolling windows scored one at a time, each with its own forward pass (the reference)."""
    total = 0.0
    windows = lm_eval.utils.get_rolling_token_windows(lm.tok_encode(text), lm.eot_token_id, lm.max_length, 1)
    for ctx, cont in map(lm_eval.utils.make_disjoint_window, windows):
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            logp = torch.log_softmax(lm.model(ids[:, :-1]).float(), -1)[0, -len(cont):]
        total += float(logp.gather(1, torch.tensor(cont)[:, None]).sum())
    return total


def test_long_documents_are_scored_in_rolling_windows_and_batching_changes_nothing(bench):
    one = MoecptLM(checkpoint=str(bench["run"]), device="cpu", batch_size=1, max_length=16)
    many = MoecptLM(checkpoint=str(bench["run"]), device="cpu", batch_size=5, max_length=16)
    reqs = [_req("loglikelihood_rolling", d) for d in bench["docs"]]
    assert all(len(one.tok_encode(d)) > 3 * 16 for d in bench["docs"])  # several windows each
    a, b = one.loglikelihood_rolling(reqs), many.loglikelihood_rolling(reqs)
    assert a == pytest.approx(b, rel=1e-5)
    assert a == pytest.approx([_reference_rolling(one, d) for d in bench["docs"]], rel=1e-5)
    ll_pairs = [_req("loglikelihood", d[:30], d[30:60]) for d in bench["docs"]]
    (lp_one, greedy_one), (lp_many, greedy_many) = (zip(*m.loglikelihood(ll_pairs)) for m in (one, many))
    assert lp_one == pytest.approx(lp_many, rel=1e-5) and greedy_one == greedy_many


def test_too_long_context_is_cut_on_the_left(bench):
    lm = MoecptLM(checkpoint=str(bench["run"]), device="cpu", max_length=16)
    text = bench["docs"][0]
    ctx_ids, cont = lm.tok_encode(text[:400]), " the"
    cont_ids = lm._encode_pair(text[:400], cont)[1]
    assert len(ctx_ids) > 16
    kept = (ctx_ids + cont_ids)[-17:]
    ids = torch.tensor([kept])
    with torch.no_grad():
        logp = torch.log_softmax(lm.model(ids[:, :-1]).float(), -1)[0, -len(cont_ids):]
    expect = float(logp.gather(1, torch.tensor(cont_ids)[:, None]).sum())
    (got, _), = lm.loglikelihood([_req("loglikelihood", text[:400], cont)])
    assert got == pytest.approx(expect, rel=1e-5)


def test_generate_until_stops_at_the_until_strings(lm, bench):
    prompt = bench["docs"][1][:50]
    (free,) = lm.generate_until([_req("generate_until", prompt, {"until": [], "max_gen_toks": 24})])
    assert len(free) >= 6, free
    stop = free[3:5]
    (cut,) = lm.generate_until([_req("generate_until", prompt, {"until": ["\x00never", stop],
                                                                "max_gen_toks": 24})])
    assert cut == free[: free.index(stop)]
    (same,) = lm.generate_until([_req("generate_until", prompt, {"until": [], "max_gen_toks": 24,
                                                                 "do_sample": False, "temperature": 0.7})])
    assert same == free  # without do_sample the temperature is not used: greedy
    with pytest.raises(MoecptError, match="top_k"):
        lm.generate_until([_req("generate_until", prompt, {"until": [], "top_k": 5})])


def test_simple_evaluate_scores_local_tasks_and_matches_own_loss(lm, bench):
    from lm_eval.tasks import TaskManager

    register()
    assert "hf" in lm_eval.api.registry.model_registry  # the built-in models stay known beside ours
    manager = TaskManager(include_path=str(bench["tasks"]))
    res = lm_eval.simple_evaluate(model="moecpt", model_args={"checkpoint": str(bench["run"]), "max_length": 64},
                                  tasks=["moecpt_demo_ppl", "moecpt_demo_mc"], task_manager=manager,
                                  device="cpu", batch_size=4)
    ppl, mc = res["results"]["moecpt_demo_ppl"], res["results"]["moecpt_demo_mc"]
    assert 0 <= mc["acc,none"] <= 1
    # bits per byte from moecpt's own loss on the same documents (rolling windows of the full 64 tokens)
    ll = sum(_reference_rolling(lm, d) for d in bench["docs"])
    n_bytes = sum(len(d.encode()) for d in bench["docs"])
    assert ppl["bits_per_byte,none"] == pytest.approx(-ll / n_bytes / math.log(2), rel=1e-4)


def test_local_tasks_index_only_the_include_path(bench):
    """Names that are all tasks of --include-path skip lm-eval's index of its ~14,000 built-in YAMLs."""
    from moecpt.analysis.harness_run import _task_manager

    manager = _task_manager(["moecpt_demo_ppl", "moecpt_demo_mc"], [str(bench["tasks"])])
    assert {"moecpt_demo_ppl", "moecpt_demo_mc"} <= set(manager.all_subtasks)
    assert "hellaswag" not in manager.all_tasks


def test_bad_model_args_are_one_line_errors(bench):
    with pytest.raises(MoecptError, match="known keys"):
        MoecptLM(checkpoint=str(bench["run"]), pretrained="gpt2")
    with pytest.raises(MoecptError, match="max_seq_len=64"):
        MoecptLM(checkpoint=str(bench["run"]), max_length=65)
    with pytest.raises(MoecptError, match="batch_size auto"):
        MoecptLM(checkpoint=str(bench["run"]), batch_size="auto")


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


def test_moecpt_eval_harness_cli_writes_results_and_keeps_foreign_files(bench, tmp_path, monkeypatch):
    """``moecpt eval --harness`` run through the CLI (in this process, which has lm-eval imported already; the
    installed lm-eval command line runs as a fresh process in tests/test_docs_commands.py, docs/eval.md)."""
    from test_cli_train import moecpt_call

    for k, v in _env().items():
        monkeypatch.setenv(k, v)
    out = tmp_path / "scores.json"
    cmd = ["eval", "--checkpoint", str(bench["run"]), "--harness", "moecpt_demo_mc", "--include-path",
           str(bench["tasks"]), "--limit", "4", "--device", "cpu", "--out", str(out)]
    res = moecpt_call(*cmd)
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["written_by"] == "moecpt eval --harness" and report["n_samples"]["moecpt_demo_mc"]["effective"] == 4
    assert "acc,none" in report["results"]["moecpt_demo_mc"]
    assert check_results_path(out, [str(bench["run"])]) == out  # its own file may be replaced by a re-run
    foreign = tmp_path / "mine.json"
    foreign.write_text("{}")
    bad = moecpt_call(*cmd[:-1], str(foreign))
    assert bad.returncode == 2 and "not written by moecpt" in bad.stderr and foreign.read_text() == "{}"
    unknown = moecpt_call(*cmd[:4], "no_such_task", *cmd[5:-2])
    assert unknown.returncode == 2 and "unknown harness task(s) no_such_task" in unknown.stderr
    assert "Traceback" not in bad.stderr + unknown.stderr


def test_unsafe_tasks_need_the_confirmation_flag(bench):
    from moecpt.analysis.harness_run import run_harness

    with pytest.raises(MoecptError, match="task moecpt_demo_gen runs the code the model writes: add "
                                          "--confirm-run-unsafe-code"):
        run_harness(str(bench["run"]), ["moecpt_demo_gen"], include_path=[str(bench["tasks"])], limit=2,
                    device="cpu")
    report = run_harness(str(bench["run"]), ["moecpt_demo_gen"], include_path=[str(bench["tasks"])], limit=2,
                         device="cpu", confirm_run_unsafe_code=True)
    assert 0 <= report["results"]["moecpt_demo_gen"]["exact_match,none"] <= 1
