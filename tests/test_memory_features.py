"""Memory features of the spec: recompute modules and partial full recompute, FP8 casts,
fine-grained activation offloading, the precision-aware optimizer and bf16 gradient buffers."""

from __future__ import annotations

import pytest

from megacpp.planner import build_plan
from megacpp.planner.cost.activations import block_activation_bytes, norm_stats_bytes
from megacpp.planner.cost.blocks import BF16
from megacpp.planner.cost.coefficients import DEFAULT_EFFICIENCY
from megacpp.planner.cost.flops import micro_batch_tokens
from megacpp.planner.cost.memory import GIB, stage_memory
from megacpp.planner.cost.ranks import recomputed_blocks
from megacpp.planner.errors import LaunchError, SpecError
from megacpp.planner.megatron.args import TrainOptions, environment, known_flags, megatron_args
from megacpp.planner.megatron.render import RenderOptions, render_launch
from megacpp.planner.plan import make_context
from megacpp.planner.search.layout import Layout
from megacpp.planner.search.rules import check_layout
from megacpp.planner.search.stages import assign_stages
from tests.conftest import TINY_DENSE, TINY_MOE, make_spec

TE = {"backend.transformer_engine": True}
ONE = Layout(tp=1, pp=1, dp=8, ep=1, micro_batch_size=1, num_microbatches=2)
HYBRID = {**TINY_MOE, "model": {**TINY_MOE["model"], "pattern": "(AEME)*2",
                                "mamba": {"num_heads": 8, "head_dim": 16, "state_dim": 16, "num_groups": 2}}}


def _bytes(spec, letter: str, lay: Layout = ONE) -> float:
    return block_activation_bytes(make_context(spec), letter, lay)


def _memory(spec, lay: Layout = ONE):
    ctx = make_context(spec)
    return stage_memory(ctx, lay, assign_stages(ctx, lay.pp, lay.vpp)[1], DEFAULT_EFFICIENCY)


def _selective(*modules: str, base=TINY_MOE, **more):
    return make_spec(base, **TE, **{"training.recompute": "selective", "training.recompute_modules": list(modules)}, **more)


# --- recompute modules


def test_default_modules_are_megatrons_core_attn():
    plain = make_spec(TINY_MOE, **TE, **{"training.recompute": "selective"})
    listed = _selective("core_attn")
    for letter in "AE":
        assert _bytes(plain, letter) == _bytes(listed, letter)


def test_moe_act_recompute_keeps_only_fc1s_output_per_routed_token():
    moe = TINY_MOE["model"]["moe"]
    # the fused weighted SwiGLU keeps fc1's output (2f) and its product (f, fc2's input); the
    # recomputed activation keeps fc1's output alone
    drop = _bytes(_selective("core_attn"), "E") - _bytes(_selective("core_attn", "moe_act"), "E")
    assert drop == pytest.approx(moe["top_k"] * BF16 * moe["ffn_hidden_size"])


def test_layernorm_recompute_drops_the_norm_output_where_the_norm_is_a_module():
    spec, h = make_spec(TINY_MOE, **TE), TINY_MOE["model"]["hidden_size"]
    ctx = make_context(spec)
    # E's pre-MLP norm is a module of its own (TENorm): its output and statistics go
    assert _bytes(_selective("core_attn"), "E") - _bytes(_selective("core_attn", "layernorm"), "E") \
        == pytest.approx(BF16 * h + norm_stats_bytes(ctx))
    # TE fuses A's norm into linear_qkv (input_layernorm is an IdentityOp): nothing to drop
    assert _bytes(_selective("core_attn", "layernorm"), "A") == _bytes(_selective("core_attn"), "A")


def test_moe_and_mlp_recompute_keep_only_their_inputs():
    h = TINY_MOE["model"]["hidden_size"]
    assert _bytes(_selective("moe", "layernorm"), "E") == BF16 * h  # the layer's input, nothing of the MoE
    dense = _selective("mlp", base=TINY_DENSE)
    assert _bytes(dense, "D") == BF16 * h  # TE: the MLP's input is the layer's hidden states
    assert _bytes(dense, "D") < _bytes(_selective("core_attn", base=TINY_DENSE), "D")


def test_shared_experts_recompute_drops_the_shared_experts_tensors():
    shared = {"model.moe.shared_expert_ffn_hidden_size": 128}
    keep = _bytes(_selective("core_attn", **shared), "E")
    assert _bytes(_selective("core_attn", "shared_experts", **shared), "E") == pytest.approx(keep - 3 * BF16 * 128)


def test_a_recomputed_module_comes_back_for_its_blocks_backward():
    kept = _memory(_selective("core_attn", "moe_act"))[0]
    plain = _memory(_selective("core_attn"))[0]
    assert kept.activations_gib < plain.activations_gib
    assert kept.transient_gib >= plain.transient_gib


# --- partial full recompute


def _full(method: str | None, layers: int | None, base=HYBRID):
    changes = {"training.recompute": "full", "training.recompute_method": method, "training.recompute_num_layers": layers}
    return make_spec(base, **TE, **{k: v for k, v in changes.items() if v is not None})


def test_uniform_checkpoints_of_n_layers_keep_one_input_each():
    h, tokens = HYBRID["model"]["hidden_size"], HYBRID["training"]["seq_length"]
    one, two = _memory(_full(None, None))[0], _memory(_full("uniform", 2))[0]
    embedding = BF16 * h * tokens / GIB
    assert one.activations_gib - embedding == pytest.approx(8 * BF16 * h * tokens / GIB)  # 8 layers, 8 inputs
    assert two.activations_gib - embedding == pytest.approx(4 * BF16 * h * tokens / GIB)  # 4 checkpoints of 2
    assert "2 recomputed layers" in two.transient_from


def test_block_method_runs_again_only_the_layers_it_recomputes():
    """The step prices the forward again only for the first recompute_num_layers layers of each
    chunk: its GPU work lies between no recompute and full recompute."""
    from megacpp.planner.plan import estimate_run

    def gpu(spec) -> float:
        est = estimate_run(spec, ONE)
        return sum(seconds for term, seconds in est.breakdown if term in ("matmul", "small_kernels"))

    none, full = gpu(make_spec(HYBRID, **TE)), gpu(_full(None, None))
    three = gpu(_full("block", 3))  # 3 of the 8 layers (AEMEAEME, one letter a layer)
    assert none < three < full
    ctx = make_context(_full("block", 3))
    again = recomputed_blocks(ctx, assign_stages(ctx, 1, 1)[1])
    assert again == "AEM"
    assert gpu(_full("block", 8)) == pytest.approx(full)


def test_block_method_recomputes_the_first_layers_and_keeps_the_rest():
    spec = _full("block", 3)
    ctx = make_context(spec)
    tokens = micro_batch_tokens(ctx, ONE)
    h = HYBRID["model"]["hidden_size"]
    rest = sum(block_activation_bytes(ctx, x, ONE, recompute="none") for x in "EAEME")  # layers 4..8 of AEMEAEME
    expected = (3 * BF16 * h + rest + BF16 * h) * tokens / GIB  # three inputs, five whole layers, the embedding
    assert _memory(spec)[0].activations_gib == pytest.approx(expected)
    assert _memory(_full("block", 8))[0].activations_gib < _memory(spec)[0].activations_gib


# --- FP8


def test_fp8_keeps_one_byte_casts_of_linear_inputs():
    h, f = TINY_DENSE["model"]["hidden_size"], TINY_DENSE["model"]["mlp"]["ffn_hidden_size"]
    bf16, fp8 = make_spec(TINY_DENSE, **TE), make_spec(TINY_DENSE, **TE, **{"training.precision": "fp8"})
    # D: fc1's input (the fused norm's output) and fc2's input, one byte instead of two
    assert _bytes(bf16, "D") - _bytes(fp8, "D") == pytest.approx(h + f)
    # A: the norm's output shrinks, linear_proj keeps its cast beside the bf16 output the fused attention keeps
    heads, d = TINY_DENSE["model"]["attention"]["num_heads"], TINY_DENSE["model"]["attention"]["head_dim"]
    assert _bytes(fp8, "A") - _bytes(bf16, "A") == pytest.approx(heads * d - h)


# --- activation offloading


def test_offloading_expert_fc1_moves_every_layers_routed_inputs_but_the_last():
    h, top_k, layers = TINY_MOE["model"]["hidden_size"], TINY_MOE["model"]["moe"]["top_k"], 4
    tokens = TINY_MOE["training"]["seq_length"]
    base = _memory(_selective("moe_act"))[0]
    off = _memory(_selective("moe_act", **{"training.offload_modules": ["expert_fc1"]}))[0]
    assert base.activations_gib - off.activations_gib == pytest.approx((layers - 1) * top_k * BF16 * h * tokens / GIB)
    half = _memory(_selective("moe_act", **{"training.offload_modules": ["expert_fc1"], "training.activation_offload_fraction": 0.5,
                                            "backend.megatron": "main"}))[0]
    assert half.activations_gib == pytest.approx((base.activations_gib + off.activations_gib) / 2)


def test_offloading_a_norm_te_fuses_moves_nothing():
    spec = make_spec(TINY_DENSE, **TE, **{"training.offload_modules": ["mlp_norm"]})
    assert _memory(spec)[0].activations_gib == _memory(make_spec(TINY_DENSE, **TE))[0].activations_gib


def test_offloading_whole_layers_moves_all_but_the_last_of_them():
    """TINY_DENSE has 4 layers (AD pairs): offloading 3 moves the first two's activations; the
    third's reload runs ahead of its backward, the fourth never leaves."""
    base = _memory(make_spec(TINY_DENSE, **TE))[0]
    per_layer = (_bytes(make_spec(TINY_DENSE, **TE), "A") + _bytes(make_spec(TINY_DENSE, **TE), "D")) \
        * micro_batch_tokens(make_context(make_spec(TINY_DENSE, **TE)), ONE)
    off = _memory(make_spec(TINY_DENSE, **TE, **{"training.offload_layers": 3}))[0]
    assert base.activations_gib - off.activations_gib == pytest.approx(2 * per_layer / GIB)
    one = _memory(make_spec(TINY_DENSE, **TE, **{"training.offload_layers": 1}))[0]
    assert one.activations_gib == pytest.approx(base.activations_gib)


def test_offloading_costs_the_host_link_time_the_compute_does_not_hide():
    """Each micro-batch sends the offloaded activations out during its forward and back during
    its backward; on a link slow enough that neither hides, the step carries the difference."""
    from megacpp.planner.cost.memory import offload_traffic
    from megacpp.planner.spec.clusters import resolve_cluster

    spec = make_spec(TINY_DENSE, **TE, **{"training.offload_layers": 3})
    quick = build_plan(spec, top=1).candidates[0]
    assert quick.step_breakdown["offload"] == 0.0  # the H200's PCIe link hides a tiny model's copies
    assert "offload" not in build_plan(make_spec(TINY_DENSE, **TE), top=1).candidates[0].step_breakdown
    rate = 1e-3  # GB/s
    slow = build_plan(spec, top=1, cluster=resolve_cluster(spec.cluster).model_copy(update={"host_link_gbps": rate}))
    cand, ctx = slow.candidates[0], slow.context
    lay = cand.layout
    moved = offload_traffic(ctx, lay, assign_stages(ctx, lay.pp, lay.vpp)[1]) / (rate * 1e9)
    gpu = sum(cand.step_breakdown[k] for k in ("matmul", "softmax", "small_kernels", "grad_accumulation"))
    # forward and backward of every micro-batch, less the compute they overlap
    assert cand.step_breakdown["offload"] == pytest.approx(2 * lay.num_microbatches * moved - gpu, rel=1e-6)
    assert cand.time.step_seconds > quick.time.step_seconds


# --- optimizer state and gradients


def test_bf16_moments_with_bf16_weights_hold_the_master_as_remainders():
    fp32 = _memory(make_spec(TINY_MOE, **TE))[0]
    bf16 = _memory(make_spec(TINY_MOE, **TE, **{"training.optimizer": {"exp_avg_dtype": "bf16", "exp_avg_sq_dtype": "bf16"}}))[0]
    # 4 + 4 + 4 bytes per sharded parameter become 2 (the fp32 master's low half) + 2 + 2
    assert bf16.optimizer_gib == pytest.approx(fp32.optimizer_gib / 2)
    fp16 = _memory(make_spec(TINY_MOE, **TE, **{"training.optimizer.main_params_dtype": "fp16"}))[0]
    assert fp16.optimizer_gib == pytest.approx(fp32.optimizer_gib * (2 + 4 + 4) / 12)


def test_bf16_gradients_halve_the_buffer_and_the_step_copies_them_to_fp32():
    fp32 = _memory(make_spec(TINY_MOE, **TE))[0]
    bf16 = _memory(make_spec(TINY_MOE, **TE, **{"training.grad_reduce_dtype": "bf16"}))[0]
    assert bf16.gradients_gib == pytest.approx(fp32.gradients_gib / 2)
    assert fp32.optimizer_step_gib == 0.0
    assert bf16.optimizer_step_gib == pytest.approx(fp32.optimizer_gib / 3)  # an fp32 copy of every gradient shard
    aware = _memory(make_spec(TINY_MOE, **TE, **{"training.grad_reduce_dtype": "bf16", "training.optimizer.exp_avg_dtype": "bf16"}))[0]
    assert aware.optimizer_step_gib == 0.0  # TE's FusedAdam reads the bf16 gradients as they are


# --- spec errors, rules and rendering


@pytest.mark.parametrize("changes, key", [
    ({"training.recompute_modules": ["moe_act"]}, "training.recompute_modules"),
    ({"training.recompute": "selective", "training.recompute_num_layers": 2}, "training.recompute_num_layers"),
    ({"training.activation_offload_fraction": 0.5}, "training.activation_offload_fraction"),
    ({"training.optimizer.exp_avg_dtype": "bf16", "training.distributed_optimizer": False}, "training.optimizer"),
    ({"training.offload_modules": ["expert_fc1", "expert_fc1"]}, "training.offload_modules"),
    ({"training.offload_layers": 2, "training.offload_modules": ["expert_fc1"]}, "training.offload_layers"),
    ({"training.offload_layers": 2, "training.recompute": "selective"}, "training.offload_layers"),
])
def test_misplaced_keys_are_one_line_errors_naming_them(changes, key):
    with pytest.raises(SpecError, match=key.replace(".", r"\.")) as err:
        make_spec(TINY_MOE, **changes)
    assert "\n" not in str(err.value)


def _errors(spec) -> dict[str, str]:
    return {v.rule: v.message for v in check_layout(make_context(spec), ONE)}


@pytest.mark.parametrize("changes, rule", [
    ({"training.recompute": "selective", "training.recompute_modules": ["moe_act"]}, "moe-act-recompute-needs-grouped-gemm"),
    ({"training.recompute": "selective", "training.recompute_modules": ["mla_up_proj"], **TE}, "mla-up-proj-recompute-needs-mla"),
    ({"training.recompute": "selective", "training.recompute_modules": ["layernorm"], "training.precision": "fp8", **TE},
     "fp8-delayed-recompute-modules"),
    ({"training.offload_modules": ["expert_fc1"]}, "activation-offload-needs-te"),
    ({"training.offload_modules": ["attn_proj"], **TE}, "offload-attn-proj-needs-core-attn"),
    ({"training.recompute": "selective", "training.recompute_modules": ["moe"], "training.offload_modules": ["expert_fc1"], **TE},
     "offload-inside-recomputed-moe"),
    ({"training.offload_modules": ["expert_fc1"], "training.activation_offload_fraction": 0.5, **TE}, "offload-fraction-needs-main"),
    ({"training.optimizer.exp_avg_dtype": "bf16"}, "precision-aware-optimizer-needs-te"),
    ({"training.offload_layers": 2}, "offload-layers-needs-te"),
    ({"training.offload_layers": 4, **TE}, "offload-layers-below-num-layers"),
    ({"training.offload_layers": 2, "training.cuda_graphs": ["attn"], **TE}, "offload-layers-cuda-graphs"),
])
def test_what_megatron_refuses_is_rejected(changes, rule):
    assert rule in _errors(make_spec(TINY_MOE, **changes))


def test_whole_layer_offloading_takes_pp1_a_transformer_stack_and_main_for_a_graph():
    spec = make_spec(TINY_DENSE, **TE, **{"training.offload_layers": 2})
    assert set(_errors(spec)) == {"memory-features-need-megatron-lm"}  # megacpp's runtime does not offload
    assert "offload-layers-needs-pp1" in {v.rule for v in check_layout(make_context(spec), Layout(pp=2, dp=4, num_microbatches=4))}
    assert "offload-layers-transformer-stack" in _errors(make_spec(HYBRID, **TE, **{"training.offload_layers": 2}))
    graphed = {"training.offload_layers": 2, "training.cuda_graphs": "full_iteration", **TE}
    assert "offload-layers-cuda-graphs" in _errors(make_spec(TINY_DENSE, **graphed))
    assert "offload-layers-cuda-graphs" not in _errors(make_spec(TINY_DENSE, **graphed, **{"backend.megatron": "main"}))
    plan = build_plan(spec, top=1)
    assert plan.candidates[0].layout.pp == 1
    args = megatron_args(plan.context, plan.candidates[0], TrainOptions())
    assert " ".join(args).count("--cpu-offloading-num-layers 2") == 1 and "--fine-grained-activation-offloading" not in args


def test_hybrid_full_recompute_on_core_v016_warns_that_megatron_lm_ignores_it():
    warned = _errors(_full(None, None))
    assert "full-recompute-ignored-by-mamba-stack" in warned
    assert "full-recompute-ignored-by-mamba-stack" not in _errors(_full(None, None, base={**HYBRID, "backend": {"megatron": "main"}}))


FEATURES = {**TE, "training.recompute": "selective", "training.recompute_modules": ["moe_act", "layernorm"],
            "training.offload_modules": ["expert_fc1"],
            "training.optimizer": {"exp_avg_dtype": "bf16", "exp_avg_sq_dtype": "bf16"}, "parallel.tp": 1}


@pytest.mark.parametrize("dialect", ["core_v0.16", "main"])
def test_the_flags_render_in_both_dialects(dialect):
    plan = build_plan(make_spec(TINY_MOE, **FEATURES, **{"backend.megatron": dialect}), top=1)
    args = megatron_args(plan.context, plan.candidates[0], TrainOptions())
    line = " ".join(args)
    assert "--recompute-granularity selective --recompute-modules moe_act layernorm" in line
    assert "--fine-grained-activation-offloading --offload-modules expert_fc1" in line
    assert "--use-precision-aware-optimizer --exp-avg-dtype bf16 --exp-avg-sq-dtype bf16" in line
    assert {a for a in args if a.startswith("--")} <= known_flags(dialect)
    assert environment(plan.context, plan.candidates[0])["NVTE_CPU_OFFLOAD_V1"] == "1"


def test_partial_full_recompute_renders_its_method_and_layers():
    plan = build_plan(_full("block", 3, base={**HYBRID, "backend": {"megatron": "main"}}), top=1)
    line = " ".join(megatron_args(plan.context, plan.candidates[0], TrainOptions()))
    assert "--recompute-granularity full --recompute-method block --recompute-num-layers 3" in line


def test_the_megacpp_engine_refuses_what_its_runtime_does_not_run():
    plan = build_plan(make_spec(TINY_MOE, **FEATURES), top=1)
    assert "memory-features-need-megatron-lm" in {n.rule for n in plan.notes}
    with pytest.raises(LaunchError, match="--engine megacpp does not run training.recompute_modules"):
        render_launch(plan, RenderOptions(engine="megacpp"))
    script = render_launch(plan, RenderOptions(engine="megatron-lm"))["launch.sh"]
    assert "--offload-modules expert_fc1" in script
    # the runtime's own recompute stays launchable
    plain = build_plan(make_spec(TINY_MOE, **TE, **{"training.recompute": "selective", "training.recompute_modules": ["core_attn"]}), top=1)
    assert "megacpp.runtime.worker" in render_launch(plain, RenderOptions(engine="megacpp"))["launch.sh"]
    # the runtime captures no CUDA graph: a spec that asks for them is Megatron-LM's to run
    graphed = build_plan(make_spec(TINY_MOE, **TE, **{"training.cuda_graphs": ["attn"]}), top=1)
    assert "memory-features-need-megatron-lm" in {n.rule for n in graphed.notes}
    with pytest.raises(LaunchError, match="--engine megacpp does not run training.cuda_graphs"):
        render_launch(graphed, RenderOptions(engine="megacpp"))



# --- the published runs' settings


def _converted(row_id: int):
    from benchmarks.scale import truth

    row = next(r for r in truth.load_runs() if r["row_id"] == row_id)
    return truth.convert(row)


def test_published_memory_settings_become_spec_keys():
    lightning = _converted(0)  # selective [moe_act, layernorm], expert_fc1 offloaded, BF16 Adam moments
    training = lightning.spec["training"]
    assert training["recompute_modules"] == ["moe_act", "layernorm"]
    assert training["offload_modules"] == ["expert_fc1"]
    assert training["optimizer"] == {"exp_avg_dtype": "bf16", "exp_avg_sq_dtype": "bf16"}
    assert lightning.status == "exact" and lightning.approximations == ()
    llama = _converted(106).spec["training"]  # full recompute, block x5
    assert (llama["recompute_method"], llama["recompute_num_layers"]) == ("block", 5)


def test_fp8_runs_keep_the_modules_their_recipe_allows():
    nano = _converted(35)  # fp8-cs (current scaling), [moe, layernorm, core_attn, moe_act]
    assert nano.spec["training"]["recompute_modules"] == ["moe", "layernorm", "core_attn", "moe_act"]
    assert nano.spec["training"]["fp8_recipe"] == "tensorwise"
    assert "recompute-modules" not in nano.approximations
    assert build_plan(make_spec(nano.spec), top=1).candidates
    delayed = {**nano.spec, "training": {**nano.spec["training"], "fp8_recipe": "delayed"}}
    assert not build_plan(make_spec(delayed), top=1).candidates  # fp8-delayed-recompute-modules


def test_a_recompute_module_list_is_pointed_out_where_the_step_does_not_follow_it():
    def notes(modules: list[str] | None) -> set[str]:
        training = {**TINY_MOE["training"], "recompute": "selective"}
        if modules is not None:
            training["recompute_modules"] = modules
        return {n.rule for n in build_plan(make_spec({**TINY_MOE, "training": training}), top=1).notes}

    assert "recompute-modules-step" in notes(["mlp"])
    assert "recompute-modules-step" in notes(["moe", "core_attn"])
    assert "recompute-modules-step" not in notes(["core_attn"])  # what the step prices
    assert "recompute-modules-step" not in notes(None)  # Megatron's default list is core_attn
