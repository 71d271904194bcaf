"""``moecpt plan`` (moecpt/distributed/plan.py, plan_cli.py): the memory and communication formulas against numbers
computed by hand, the CLI's text and JSON, its one-line refusals, and the bundled paper-size EP recipes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moecpt.cli import main
from moecpt.config import load_recipe, model_preset, recipe_from_dict
from moecpt.distributed.mesh import Mesh, build_mesh
from moecpt.distributed.plan import comm_per_rank, job_plan, memory_per_rank
from moecpt.model.flops import model_stats
from moecpt.train.checkpoint import save_checkpoint
from moecpt.train.plan import activation_bytes, memory_plan

ROOT = Path(__file__).resolve().parent.parent
# A model small enough to count by hand: 1000 parameters, 800 of them routed experts in 2 MoE layers; the largest
# block has 450 (400 expert), the root unit (embedding, norm, head) 100.
MOE = {"total_params": 1000, "expert_params": 800, "active_params": 300, "moe_layers": 2, "max_block_params": 450,
       "max_block_expert_params": 400, "non_block_params": 100}
DENSE = {**MOE, "expert_params": 0, "moe_layers": 0, "max_block_expert_params": 0}
CFG = model_preset("smoke-switch", vocab_size=100)  # d_model 64, 2 layers, 8 experts top-1


def _recipe(**distributed):
    return recipe_from_dict({"model": {"preset": "smoke-switch", "vocab_size": 100}, "data": {"seq_len": 32},
                             "train": {"batch_size": 8, "micro_batch_size": 2}, "distributed": distributed})


def _plan(stats, world, **distributed):
    recipe = _recipe(**distributed)
    mesh = build_mesh(recipe, world)
    return memory_per_rank(recipe, CFG, stats, mesh), comm_per_rank(recipe, CFG, stats, mesh)


# ------------------------------------------------------------------------------------------------ formulas
def test_activations_are_the_dry_runs_formula():
    # 34 s b h per layer at 16 bits (Korthikanti et al., eq. 1) + fp32 logits, log-softmax and logit gradient
    assert activation_bytes(CFG, 32, 2, True) == 2 * 34 * 32 * 2 * 64 + 3 * 4 * 2 * 32 * 100 == 355_328
    assert activation_bytes(CFG, 32, 2, False) == 2 * 2 * 34 * 32 * 2 * 64 + 76_800
    dry = memory_plan(_recipe(), CFG, 1000, 2, 1, 1, True)  # --dry-run: one process, the same formulas
    mem, _ = _plan(MOE, 1)
    assert {k: dry[k] for k in ("weights", "grads", "optimizer_state", "activations")} == \
        {k: mem[k] for k in ("weights", "grads", "optimizer_state", "activations")} == \
        {"weights": 4000, "grads": 4000, "optimizer_state": 8000, "activations": 355_328}


def test_activation_checkpointing_keeps_only_what_it_does_not_recompute():
    sbh, logits = 32 * 2 * 64, 3 * 4 * 2 * 32 * 100
    assert activation_bytes(CFG, 32, 2, True, "full") == 2 * 2 * sbh + 34 * sbh + logits  # block inputs + one block
    # both blocks are MoE: each drops its FFN's 19 sbh, and one MoE FFN is recomputed at a time
    assert activation_bytes(CFG, 32, 2, True, "moe-only") == 2 * 34 * sbh - 2 * 19 * sbh + 19 * sbh + logits
    dense = model_preset("smoke-dense", vocab_size=100)
    assert activation_bytes(dense, 32, 2, True, "moe-only") == activation_bytes(dense, 32, 2, True)


def test_dense_ddp_replicates_and_all_reduces_the_gradients():
    mem, comm = _plan(DENSE, 2)
    assert (mem["weights"], mem["grads"], mem["optimizer_state"], mem["outer_state"]) == (4000, 4000, 8000, 0)
    assert mem["total"] == 16_000 + mem["activations"]
    assert comm["per_step"] == {"island": 2 * 1 * 4000 // 2, "ep": 0, "cross_island": 0, "total": 4000}
    sgd, _ = _plan(DENSE, 2, inner_optimizer="sgd")
    assert sgd["optimizer_state"] == 0  # plain SGD keeps no moments


def test_fsdp_at_world_4_shards_everything_and_gathers_three_times():
    mem, comm = _plan(MOE, 4, sync="fsdp")
    assert mem["resident"] == {"expert": 200, "non_expert": 50, "total": 250}  # P / S
    assert (mem["weights"], mem["grads"], mem["optimizer_state"]) == (1000, 1000, 2000)
    assert mem["fsdp_gathered"] == 8 * 450  # the largest block, unsharded: fp32 weights + grads
    # two all-gathers and a reduce-scatter, (S-1)/S of the 4000 parameter bytes each
    assert comm["per_step"]["island"] == 3 * 3 * 4000 // 4 == 9000


def test_ep_2_splits_the_experts_and_all_to_alls_the_tokens():
    mem, comm = _plan(MOE, 4, expert_parallel=2)  # S = 4 = D 2 x E 2
    assert mem["resident"] == {"expert": 400, "non_expert": 200, "total": 600}
    assert mem["weights"] == 2400 and mem["optimizer_state"] == 4800
    # non-expert grads over the 4 ranks of the island, expert grads over the D = 2 holding the same shard
    assert comm["per_step"]["island"] == 2 * 3 * 800 // 4 + 2 * 1 * 1600 // 2 == 2800
    # 4 passes x 2 MoE layers x (8 / 4 rows x 32 tokens x top-1) x d_model 64 x 2 bytes (bf16) x (E-1)/E
    assert comm["per_step"]["ep"] == 4 * 2 * (2 * 32) * 64 * 2 // 2 == 32_768
    recipe = _recipe(expert_parallel=2)
    recipe.train.activation_checkpointing = "full"  # the backward repeats the forward's dispatch and combine
    assert comm_per_rank(recipe, CFG, MOE, build_mesh(recipe, 4))["per_step"]["ep"] == 6 * 2 * 64 * 64 * 2 // 2


def test_ep_4_alone_and_under_fsdp():
    mem, comm = _plan(MOE, 4, expert_parallel=4)  # D = 1: no expert-gradient traffic
    assert mem["resident"] == {"expert": 200, "non_expert": 200, "total": 400}
    assert comm["per_step"]["island"] == 2 * 3 * 800 // 4 == 1200
    assert comm["per_step"]["ep"] == 4 * 2 * 64 * 64 * 2 * 3 // 4 == 49_152
    mem, comm = _plan(MOE, 8, sync="fsdp", expert_parallel=4)  # S = 8 = D 2 x E 4 (moecpt.distributed.ep_fsdp)
    assert mem["resident"] == {"expert": 200, "non_expert": 25, "total": 225}  # the expert shard whole on its D
    assert mem["fsdp_gathered"] == 8 * 100  # the root; a block's expert shard is not gathered (50 non-expert)
    # FSDP2 over the 8 ranks for the non-expert part, the expert shards all-reduced over their D = 2 as under DDP
    assert comm["per_step"]["island"] == 3 * 7 * 100 + 2 * 1 * 800 // 2 == 2900
    assert comm["per_step"]["ep"] == 4 * 2 * (1 * 32) * 64 * 2 * 3 // 4


def test_islands_replicate_across_and_pay_the_outer_round_every_h_steps():
    mem, comm = _plan(MOE, 4, sync="diloco", local_steps=4, islands=2, expert_parallel=2)  # S = 2 = E
    assert mem["resident"]["total"] == 600
    # anchor + Nesterov momentum + the round's delta, fp32 each
    assert mem["outer_parts"] == {"anchor": 2400, "momentum": 2400, "delta": 2400} and mem["outer_state"] == 7200
    assert comm["per_round"] == 2 * 1 * 2400 // 2  # all-reduce over the M = 2 islands
    assert comm["per_step"] == {"island": 2 * 800 // 2, "ep": 4 * 2 * 64 * 64 * 2 // 2, "cross_island": 600,
                                "total": 800 + 32_768 + 600}
    fsdp, _ = _plan(MOE, 4, sync="diloco", local_steps=4, islands=2, island_sync="fsdp")
    assert fsdp["resident"]["total"] == 500 and fsdp["outer_parts"]["anchor"] == 2000  # sharded over the island


def test_local_sgd_without_islands_makes_every_rank_a_worker():
    mem, comm = _plan(MOE, 4, sync="local-sgd", local_steps=2)
    assert mem["outer_parts"] == {"anchor": 4000, "momentum": 0, "delta": 4000}  # parameter averaging: no momentum
    assert comm["per_step"]["island"] == 0 and comm["per_round"] == 2 * 3 * 4000 // 4 == 6000
    assert comm["per_step"]["cross_island"] == 3000
    mem, comm = _plan(MOE, 4, sync="local-sgd", local_steps=2, outer_optimizer="lagg-a")
    assert mem["outer_parts"] == {"anchor": 4000, "momentum": 16_000, "delta": 16_000}  # K deltas, 4 accumulators
    assert comm["per_round"] == 3 * 4000  # all-gather: (K-1) x 4 P


def test_model_stats_counts_what_the_plan_splits():
    s = model_stats(CFG)
    D, F, V = 64, 176, 100
    assert s["moe_layers"] == 2 and s["max_block_expert_params"] == 8 * 3 * D * F  # GLU: w_in 2F, w_out F
    assert s["non_block_params"] == 2 * V * D + D  # embedding, head, final norm
    assert s["expert_params"] == 2 * s["max_block_expert_params"]


# ------------------------------------------------------------------------------------------------ the CLI
def test_cli_text_and_json(tmp_path, capsys):
    recipe = ROOT / "recipes/smoke.toml"
    argv = ["plan", "--recipe", str(recipe), "--world", "4", "--set", "distributed.sync=fsdp"]
    assert main([*argv, "--gpu-memory-gib", "1"]) == 0
    text = capsys.readouterr().out
    assert "1 island(s) x 4 dp x 1 ep" in text and "every step: FSDP2 over 4 rank(s)" in text
    assert "peak (sum)" in text and "fits in 1.0 GiB" in text and "EP all-to-all, every step" in text
    assert main([*argv, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    r = load_recipe(recipe, ["distributed.sync=fsdp"])
    cfg = r.model.model_copy(update={"vocab_size": 4096})  # the demo tokenizer's
    assert plan == json.loads(json.dumps(job_plan(r, cfg, model_stats(cfg, r.data.seq_len), Mesh(4))))
    assert plan["fits"] is None and plan["mesh"]["island_size"] == 4


def test_cli_plans_a_cpt_run_from_its_parent(tmp_path, capsys):
    parent = model_preset("smoke-granular", vocab_size=4096)
    save_checkpoint(tmp_path / "p/checkpoints/step_00000001", model_state={"w": torch.ones(1)},
                    meta={"step": 1, "model_config": parent.model_dump(mode="json")})
    argv = ["plan", "--recipe", str(ROOT / "recipes/cpt-smoke.toml"), "--world", "2", "--json"]
    assert main([*argv, "--from", str(tmp_path / "p")]) == 0
    assert json.loads(capsys.readouterr().out)["params"]["total"] == model_stats(parent)["total_params"]
    assert main([*argv, "--from", str(tmp_path / "p"), "--set", "model.d_model=128"]) == 2
    assert "CPT keeps the parent's architecture" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--world", "3", "--set", "distributed.expert_parallel=3"], "does not divide the model's 8 routed experts"),
    (["--world", "4", "--set", "distributed.expert_parallel=8"], "does not divide the 4 ranks"),
    (["--world", "6", "--set", "distributed.sync=diloco", "--set", "distributed.local_steps=2", "--set",
      "distributed.islands=4"], "does not divide the 6 ranks"),
    (["--world", "3", "--set", "distributed.expert_parallel=1"],
     "train.batch_size=1024 does not split over 3 workers"),
    (["--world", "0"], "a world of 0 ranks"),
    (["--world", "-2"], "a world of -2 ranks"),
    (["--world", "8", "--set", "model.preset=paper-granular"], "does not divide the model's 31 routed experts"),
    (["--world", "8", "--gpu-memory-gib", "0"], "--gpu-memory-gib 0.0 must be a positive"),
])
def test_cli_refuses_in_one_line(args, message, capsys):
    assert main(["plan", "--recipe", str(ROOT / "recipes/paper-ep.toml"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err, err


def test_cli_refuses_a_missing_recipe(tmp_path, capsys):
    assert main(["plan", "--recipe", str(tmp_path / "nope.toml"), "--world", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "does not exist" in err and "\n" not in err


@pytest.mark.parametrize("name, fits_80", [("paper-ep", True), ("paper-ep-islands", True)])
def test_the_paper_ep_recipes_plan_on_8_gpus(name, fits_80, capsys):
    assert main(["plan", "--recipe", str(ROOT / f"recipes/{name}.toml"), "--world", "8", "--gpu-memory-gib", "80",
                 "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["fits"]["fits"] is fits_80 and plan["layout"]["bf16"]
    assert 2.0e9 < plan["params"]["total"] < 2.05e9 and 5.6e8 < plan["params"]["active"] < 5.8e8  # the paper's
    assert plan["comm_bytes"]["per_step"]["ep"] > 0
