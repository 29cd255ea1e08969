"""Precision recipes (fp8 recipes, NVFP4), Megatron-FSDP and the Blackwell Ultra presets, as a user meets them:
spec errors, rule verdicts, rendered flags, and what the plan prices."""

from __future__ import annotations

import shlex

import pytest

from megacpp.planner.cost.coefficients import DEFAULT_EFFICIENCY
from megacpp.planner.cost.memory import stage_memory
from megacpp.planner.cost.step import matmul_seconds
from megacpp.planner.errors import SpecError
from megacpp.planner.megatron.args import environment
from megacpp.planner.megatron.render import RenderOptions, render_launch
from megacpp.planner.plan import build_plan, make_context
from megacpp.planner.search.layout import Layout
from megacpp.planner.search.rules import check_layout
from megacpp.planner.search.stages import assign_stages
from megacpp.planner.spec.clusters import PRESETS, resolve_cluster
from megacpp.planner.spec.models import ClusterSpec
from tests.conftest import TINY_DENSE, TINY_MOE, make_spec

# FP8 and FP4 run through Transformer Engine
DENSE = {**TINY_DENSE, "backend": {"transformer_engine": True, "megatron": "core_v0.16"}}
MOE = {**TINY_MOE, "backend": {"transformer_engine": True, "megatron": "core_v0.16"}}


def verdicts(spec, **layout):
    lay = Layout(**{"dp": 8 // (layout.get("tp", 1) * layout.get("pp", 1) * layout.get("cp", 1)), **layout})
    return {v.rule: (v.severity, v.message) for v in check_layout(make_context(spec), lay)}


def words(spec) -> list[str]:
    plan = build_plan(spec, top=1)
    return shlex.split(render_launch(plan, RenderOptions(engine="megatron-lm"))["launch.sh"].replace("\\\n", " "))


def flag_value(argv: list[str], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv else None


# ---- presets ----


@pytest.mark.parametrize("name,capability,nvlink,per_node,fp4", [
    ("b300-sxm-8", 103, 8, 8, 13125.0), ("gb300-nvl72", 103, 72, 4, 15000.0),
    ("b200-sxm-8", 100, 8, 8, 9000.0), ("h100-sxm-8", 90, 8, 8, None),
])
def test_presets_state_their_architecture_domain_and_fp4_rate(name, capability, nvlink, per_node, fp4):
    c = resolve_cluster(ClusterSpec(preset=name))
    assert (c.compute_capability, c.nvlink_domain, c.gpus_per_node, c.fp4_tflops) == (capability, nvlink, per_node, fp4)
    assert c.mamf_bf16_tflops < c.bf16_tflops and c.mamf_fp8_tflops < c.fp8_tflops
    assert c.gpu_memory_gib < c.gpu_memory_total_gib


def test_blackwell_ultra_presets_outrun_blackwell_on_fp4_and_memory():
    b200, b300, gb200, gb300 = (PRESETS[n] for n in ("b200-sxm-8", "b300-sxm-8", "gb200-nvl72", "gb300-nvl72"))
    assert b300["fp4_tflops"] > b200["fp4_tflops"] and gb300["fp4_tflops"] > gb200["fp4_tflops"]
    assert b300["gpu_memory_gib"] > b200["gpu_memory_gib"] and gb300["gpu_memory_gib"] > gb200["gpu_memory_gib"]
    assert b300["bf16_tflops"] == b200["bf16_tflops"] and gb300["bf16_tflops"] == gb200["bf16_tflops"]
    assert b300["nic_busbw_gbps"] == 2 * 47.0  # 800G ConnectX-8 against 400G ConnectX-7


# ---- spec errors ----


def test_fp8_recipe_without_fp8_is_one_line_naming_key_and_fix():
    with pytest.raises(SpecError, match=r"training\.fp8_recipe=mxfp8 applies to precision: fp8, not bf16; set precision: fp8"):
        make_spec(DENSE, **{"training.fp8_recipe": "mxfp8"})


def test_unknown_fp8_recipe_lists_the_choices():
    with pytest.raises(SpecError, match="training.fp8_recipe"):
        make_spec(DENSE, **{"training.precision": "fp8", "training.fp8_recipe": "mx"})


def test_fsdp_needs_the_distributed_optimizer():
    with pytest.raises(SpecError, match="data_parallel_sharding: fsdp .* set distributed_optimizer: true"):
        make_spec(DENSE, **{"training.data_parallel_sharding": "fsdp", "training.distributed_optimizer": False})


# ---- rules ----


@pytest.mark.parametrize("preset,legal", [("h100-sxm-8", False), ("gb10-spark", False), ("b200-sxm-8", True),
                                          ("gb300-nvl72", True)])
def test_mxfp8_runs_on_data_center_blackwell_only(preset, legal):
    spec = make_spec(DENSE, **{"training.precision": "fp8", "training.fp8_recipe": "mxfp8", "cluster.preset": preset})
    got = verdicts(spec).get("mxfp8-needs-blackwell")
    assert (got is None) == legal
    if not legal:
        assert "use fp8_recipe: tensorwise or blockwise" in got[1]


@pytest.mark.parametrize("preset,legal", [("h200-sxm-8", False), ("b300-sxm-8", True), ("gb200-nvl72", True)])
def test_nvfp4_needs_blackwell(preset, legal):
    spec = make_spec(DENSE, **{"training.precision": "fp4", "cluster.preset": preset})
    assert ("nvfp4-needs-blackwell" not in verdicts(spec)) == legal


def test_fp4_needs_transformer_engine():
    spec = make_spec(DENSE, **{"training.precision": "fp4", "cluster.preset": "b200-sxm-8",
                                    "backend.transformer_engine": False})
    assert "training.precision=fp4 needs Transformer Engine" in verdicts(spec)["fp8-needs-te"][1]


def test_blockwise_runs_on_hopper():
    spec = make_spec(DENSE, **{"training.precision": "fp8", "training.fp8_recipe": "blockwise"})
    assert "fp8-blockwise-needs-hopper" not in verdicts(spec)


@pytest.mark.parametrize("recipe,refused", [("delayed", True), ("tensorwise", False), ("mxfp8", False),
                                            ("blockwise", False)])
def test_moe_act_and_layernorm_recompute_refused_only_under_delayed_scaling(recipe, refused):
    spec = make_spec(MOE, **{"training.precision": "fp8", "training.fp8_recipe": recipe,
                                  "training.recompute": "selective",
                                  "training.recompute_modules": ["moe_act", "layernorm"],
                                  "cluster.preset": "b200-sxm-8"})
    got = verdicts(spec).get("fp8-delayed-recompute-modules")
    assert (got is not None) == refused
    if refused:
        assert "set training.fp8_recipe: tensorwise" in got[1]


def test_fsdp_with_tp_before_blackwell_warns_but_stays_legal():
    spec = make_spec(DENSE, **{"training.data_parallel_sharding": "fsdp"})
    assert verdicts(spec, tp=2)["fsdp-tp-cp-before-blackwell"][0] == "warning"
    assert "fsdp-tp-cp-before-blackwell" not in verdicts(spec, tp=1)
    blackwell = make_spec(DENSE, **{"training.data_parallel_sharding": "fsdp", "cluster.preset": "b200-sxm-8"})
    assert "fsdp-tp-cp-before-blackwell" not in verdicts(blackwell, tp=2)


# ---- rendering ----


@pytest.mark.parametrize("dialect", ["core_v0.16", "main"])
@pytest.mark.parametrize("recipe", ["tensorwise", "mxfp8", "blockwise"])
def test_fp8_recipes_render_in_both_dialects(recipe, dialect):
    argv = words(make_spec(DENSE, **{"training.precision": "fp8", "training.fp8_recipe": recipe,
                                          "cluster.preset": "b200-sxm-8", "backend.megatron": dialect}))
    assert flag_value(argv, "--fp8-format") == "hybrid" and flag_value(argv, "--fp8-recipe") == recipe


def test_delayed_scaling_renders_as_before_without_a_recipe_flag():
    argv = words(make_spec(DENSE, **{"training.precision": "fp8"}))
    assert flag_value(argv, "--fp8-format") == "hybrid" and "--fp8-recipe" not in argv


def test_nvfp4_renders_fp4_flags_and_no_fp8():
    argv = words(make_spec(DENSE, **{"training.precision": "fp4", "cluster.preset": "b200-sxm-8"}))
    assert (flag_value(argv, "--fp4-format"), flag_value(argv, "--fp4-recipe")) == ("e2m1", "nvfp4")
    assert "--fp8-format" not in argv  # Megatron refuses both at once (transformer_config.py:1034-1035)


@pytest.mark.parametrize("dialect", ["core_v0.16", "main"])
def test_fsdp_renders_megatron_fsdp_with_its_checkpoint_format(dialect):
    argv = words(make_spec(DENSE, **{"training.data_parallel_sharding": "fsdp", "backend.megatron": dialect}))
    assert "--use-megatron-fsdp" in argv and "--use-distributed-optimizer" in argv
    assert flag_value(argv, "--data-parallel-sharding-strategy") == "optim_grads_params"
    assert flag_value(argv, "--ckpt-format") == "fsdp_dtensor"


def test_fsdp_launch_leaves_cuda_device_max_connections_unset():
    for sharding, expected in (("optimizer", "1"), ("fsdp", None)):
        spec = make_spec(DENSE, **{"training.data_parallel_sharding": sharding, "parallel.tp": 2})
        plan = build_plan(spec, top=1)
        env = environment(make_context(spec), plan.candidates[0])
        assert env.get("CUDA_DEVICE_MAX_CONNECTIONS") == expected


# ---- cost ----


LLAMA_8B = {
    "name": "llama3-8b",
    "model": {"pattern": "(AD)*32", "hidden_size": 4096, "vocab_size": 128256,
              "attention": {"num_heads": 32, "num_query_groups": 8, "head_dim": 128},
              "mlp": {"ffn_hidden_size": 14336}},
    "training": {"seq_length": 8192, "global_batch_size": 128, "micro_batch_size": 1},
    "cluster": {"preset": "h100-sxm-8", "nodes": 1},
    "parallel": {"tp": 1, "pp": 1, "cp": 1},
}


def _best(spec):
    return build_plan(spec, top=1).candidates[0]


def test_nvfp4_prices_matmuls_at_the_fp4_rate_on_blackwell():
    base = {"cluster.preset": "b200-sxm-8", "backend.transformer_engine": True}
    fp8 = make_context(make_spec(LLAMA_8B, **base, **{"training.precision": "fp8"}))
    fp4 = make_context(make_spec(LLAMA_8B, **base, **{"training.precision": "fp4"}))
    bf16 = make_context(make_spec(LLAMA_8B, **base))
    lay = Layout(dp=8, num_microbatches=16)
    seconds = {name: matmul_seconds(ctx, lay, "D", DEFAULT_EFFICIENCY)
               for name, ctx in (("bf16", bf16), ("fp8", fp8), ("fp4", fp4))}
    c = fp4.cluster
    assert seconds["fp4"] == pytest.approx(seconds["bf16"] * c.mamf_bf16_tflops / c.mamf_fp4_tflops)
    assert seconds["fp4"] < seconds["fp8"] < seconds["bf16"]
    assert _best(make_spec(LLAMA_8B, **base, **{"training.precision": "fp4"})).time.mfu > 0


def test_every_fp8_recipe_keeps_the_fp8_rate():
    base = {"cluster.preset": "b200-sxm-8", "backend.transformer_engine": True, "training.precision": "fp8"}
    times = {r: _best(make_spec(LLAMA_8B, **base, **{"training.fp8_recipe": r})).time.compute_seconds
             for r in ("delayed", "tensorwise", "mxfp8", "blockwise")}
    assert len(set(times.values())) == 1


def test_fsdp_shards_weights_and_gradients_over_data_parallel_ranks():
    ddp = make_spec(LLAMA_8B)
    fsdp = make_spec(LLAMA_8B, **{"training.data_parallel_sharding": "fsdp"})
    lay = Layout(dp=8, num_microbatches=16)
    mem = {}
    for name, spec in (("ddp", ddp), ("fsdp", fsdp)):
        ctx = make_context(spec)
        mem[name] = stage_memory(ctx, lay, assign_stages(ctx, 1, 1)[1], DEFAULT_EFFICIENCY)[0]
    d, f = mem["ddp"], mem["fsdp"]
    assert f.params == d.params and f.optimizer_gib == d.optimizer_gib
    # an eighth of the weights plus two unsharded layers (about 0.22 B parameters each)
    layer = 218_112_000
    assert f.weights_gib == pytest.approx((d.weights_gib / 8) + 2 * 2 * layer / 2**30, rel=0.02)
    assert f.gradients_gib < d.gradients_gib / 3
    assert d.total_gib > 75 > f.total_gib  # Llama-3-8B fits 8 x H100 at sequence 8192 only sharded


def test_fsdp_gathers_weights_twice_and_reduce_scatters_every_micro_batch():
    ddp = _best(make_spec(LLAMA_8B))
    fsdp = _best(make_spec(LLAMA_8B, **{"training.data_parallel_sharding": "fsdp"}))
    m = fsdp.layout.num_microbatches
    moved = {c.collective: c.bytes_per_step for c in ddp.communication if c.axis == "dp"}
    moved_fsdp = {c.collective: c.bytes_per_step for c in fsdp.communication if c.axis == "dp"}
    assert moved_fsdp["all-gather"] == pytest.approx(2 * m * moved["all-gather"], rel=1e-6)
    assert moved_fsdp["reduce-scatter"] == pytest.approx(m * moved["reduce-scatter"], rel=1e-6)
    assert all(c.exposed_seconds < c.seconds for c in fsdp.communication if c.axis == "dp")
