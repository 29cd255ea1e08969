"""Host time at scale: the cluster's host class, what CUDA graphs capture, and "host-bound" only
where the host's time beyond the GPU's work decides the step."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from benchmarks.scale.truth import read_cuda_graphs
from megacpp.planner import build_plan
from megacpp.planner.calibrate.reports import run_spec
from megacpp.planner.cost.coefficients import (
    DEFAULT_EFFICIENCY,
    DGX_HOST_LAUNCH_US,
    EXPERT,
    MOE_ROUTER_HOST_SHARE,
    REFERENCE_HOST_LAUNCH_US,
)
from megacpp.planner.cost.step import HOST_TERM, deciding_term, host_bound
from megacpp.planner.errors import SpecError
from megacpp.planner.explain import explain_layout
from megacpp.planner.megatron.args import TrainOptions, environment, known_flags, megatron_args
from megacpp.planner.plan import estimate_run, make_context
from megacpp.planner.spec.clusters import resolve_cluster
from megacpp.planner.spec.loading import spec_from_dict
from megacpp.planner.spec.models import ClusterSpec, Spec
from tests.conftest import TINY_DENSE

# a TE MoE stack small enough that the host decides its step on the reference hosts
MOE: dict[str, Any] = {
    "name": "host-moe",
    "model": {
        "pattern": "(AE)*4",
        "hidden_size": 512,
        "vocab_size": 32000,
        "attention": {"num_heads": 4, "num_query_groups": 2, "head_dim": 128},
        "moe": {"num_experts": 32, "top_k": 2, "ffn_hidden_size": 512, "gated": True},
    },
    "training": {"seq_length": 512, "global_batch_size": 8, "micro_batch_size": 1},
    "cluster": {"preset": "h100-sxm-8", "nodes": 1, "gpus_per_node": 1, "nvlink_domain": 1},
    "backend": {"transformer_engine": True},
}
ONE_GPU = {"tp": 1, "pp": 1, "vpp": 1, "cp": 1, "dp": 1, "ep": 1, "etp": 1, "edp": 1, "sp": False,
           "micro_batch_size": 1, "num_microbatches": 8}


def spec(base: dict[str, Any] = MOE, **changes: Any) -> Spec:
    data = copy.deepcopy(base)
    for dotted, value in changes.items():
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return spec_from_dict(data)


def test_presets_carry_a_host_class_and_a_spec_may_state_its_own():
    assert DGX_HOST_LAUNCH_US < REFERENCE_HOST_LAUNCH_US  # a DGX host issues work faster than the cloud VMs
    for preset in ("h100-sxm-8", "h200-sxm-8", "b200-sxm-8"):
        assert resolve_cluster(ClusterSpec(preset=preset)).host_launch_us == DGX_HOST_LAUNCH_US
    assert resolve_cluster(ClusterSpec(preset="gb10-spark")).host_launch_us == REFERENCE_HOST_LAUNCH_US
    assert resolve_cluster(ClusterSpec(preset="h100-sxm-8", host_launch_us=11.0)).host_launch_us == 11.0
    with pytest.raises(SpecError, match="cluster.host_launch_us"):
        spec(**{"cluster.host_launch_us": 0})


def test_te_host_time_follows_the_host_class_and_the_local_modules_do_not():
    slow = estimate_run(spec(**{"cluster.host_launch_us": 2 * REFERENCE_HOST_LAUNCH_US}), ONE_GPU)
    reference = estimate_run(spec(**{"cluster.host_launch_us": REFERENCE_HOST_LAUNCH_US}), ONE_GPU)
    dgx = estimate_run(spec(), ONE_GPU)
    assert slow.host_seconds == pytest.approx(2 * reference.host_seconds)
    assert dgx.host_seconds == pytest.approx(reference.host_seconds * DGX_HOST_LAUNCH_US / REFERENCE_HOST_LAUNCH_US)
    assert dgx.step_seconds < reference.step_seconds < slow.step_seconds
    local = {"backend.transformer_engine": False}
    assert estimate_run(spec(**local, **{"cluster.host_launch_us": 2 * REFERENCE_HOST_LAUNCH_US}), ONE_GPU).host_seconds \
        == pytest.approx(estimate_run(spec(**local), ONE_GPU).host_seconds)  # their overheads hold GPU time too


def test_the_runtimes_reports_are_priced_on_the_reference_hosts():
    run = {"name": "r", "spec": copy.deepcopy(MOE), "backend": {"transformer_engine_used": True, "fusions_used": True}}
    assert run_spec(run).cluster.host_launch_us == REFERENCE_HOST_LAUNCH_US
    run["spec"]["cluster"]["host_launch_us"] = 5.0
    assert run_spec(run).cluster.host_launch_us == 5.0


def test_cuda_graphs_remove_the_host_time_of_what_they_capture():
    ref = {"cluster.host_launch_us": REFERENCE_HOST_LAUNCH_US}
    eff = DEFAULT_EFFICIENCY
    m = ONE_GPU["num_microbatches"]
    none = estimate_run(spec(**ref), ONE_GPU)
    attn = estimate_run(spec(**ref, **{"training.cuda_graphs": ["attn"]}), ONE_GPU)
    router = estimate_run(spec(**ref, **{"training.cuda_graphs": ["moe_router", "moe_preprocess"]}), ONE_GPU)
    whole = estimate_run(spec(**ref, **{"training.cuda_graphs": "full_iteration"}), ONE_GPU)
    assert none.host_seconds - attn.host_seconds == pytest.approx(m * 4 * eff.overhead("A", True))
    assert none.host_seconds - router.host_seconds == pytest.approx(m * 4 * MOE_ROUTER_HOST_SHARE * eff.overhead("E", True))
    assert router.expert_host_seconds == pytest.approx(none.expert_host_seconds)  # the experts run outside the router's graph
    assert none.expert_host_seconds == pytest.approx(m * 4 * 32 * eff.overhead(EXPERT, True))
    assert whole.host_seconds == 0 and dict(whole.breakdown)[HOST_TERM] == 0
    assert whole.step_seconds < router.step_seconds < none.step_seconds


def test_the_routed_token_wait_goes_with_a_captured_moe_layer():
    """A dropless MoE layer copies its routed-token counts to the host in every forward, so the
    host cannot run ahead there (Efficiency.te_sync_exposed); a captured (drop-and-pad) layer has
    static shapes and waits for nothing: its step is then the longer of host and GPU time."""
    ref = {"cluster.host_launch_us": REFERENCE_HOST_LAUNCH_US, "model.moe.capacity_factor": 1.0}
    graphed = estimate_run(spec(**ref, **{"training.cuda_graphs": ["attn", "moe"]}), ONE_GPU)
    assert graphed.host_seconds == 0
    partly = estimate_run(spec(**ref, **{"training.cuda_graphs": ["moe_router", "moe_preprocess"]}), ONE_GPU)
    terms = dict(partly.breakdown)
    gpu = terms["matmul"] + terms["softmax"] + terms["small_kernels"] + terms["grad_accumulation"]
    shorter = min(partly.host_seconds, gpu)
    assert terms[HOST_TERM] == pytest.approx(max(partly.host_seconds - gpu, 0) + DEFAULT_EFFICIENCY.te_sync_exposed * shorter)


def test_host_bound_only_where_the_hosts_excess_is_the_largest_term():
    assert deciding_term({"matmul": 2.0, HOST_TERM: 1.0, "bubble": 0.5}) == "matmul"
    assert not host_bound({"matmul": 2.0, HOST_TERM: 1.0})
    assert host_bound({"matmul": 1.0, HOST_TERM: 1.5, "communication": 1.2})
    assert deciding_term({"matmul": 0.0}) is None
    small = estimate_run(spec(**{"cluster.host_launch_us": REFERENCE_HOST_LAUNCH_US}), ONE_GPU)
    assert small.host_bound and small.decided_by == HOST_TERM
    # a wide dense stack: much host time, all hidden behind the GPU's work
    wide = estimate_run(spec(TINY_DENSE, **{"model.hidden_size": 4096, "model.mlp.ffn_hidden_size": 14336,
                                            "model.attention.head_dim": 128, "training.seq_length": 8192,
                                            "backend.transformer_engine": True, "cluster.preset": "h100-sxm-8"}),
                        {**ONE_GPU, "num_microbatches": 16})
    terms = dict(wide.breakdown)
    assert wide.host_seconds > 0.05 * wide.step_seconds and terms[HOST_TERM] == 0
    assert not wide.host_bound and wide.decided_by == "matmul"


def test_explain_names_the_term_that_decides_every_candidate():
    plan = build_plan(spec(**{"cluster.gpus_per_node": 8, "cluster.nvlink_domain": 8}), top=3)
    doc = explain_layout(plan)
    assert doc["decided_by"] == deciding_term(plan.candidates[0].step_breakdown)
    assert doc["host_bound"] == (doc["decided_by"] == HOST_TERM)
    assert all(r["decided_by"] == deciding_term(plan.candidates[r["candidate"]].step_breakdown) for r in doc["runners_up"])
    assert all("decided_by" in w for w in doc["why_not"] if w["verdict"] != "rejected")


@pytest.mark.parametrize("dialect", ["core_v0.16", "main"])
def test_cuda_graphs_render_as_the_dialect_spells_them(dialect: str):
    def render(graphs: Any, **changes: Any) -> list[str]:
        s = spec(**{"training.cuda_graphs": graphs, "backend.megatron": dialect, "cluster.gpus_per_node": 8,
                    "cluster.nvlink_domain": 8, "parallel.ep": 2, **changes})
        args = megatron_args(make_context(s), build_plan(s, top=1).candidates[0], TrainOptions())
        assert {a for a in args if a.startswith("--")} <= known_flags(dialect)
        return args

    core = dialect == "core_v0.16"
    modules = render(["attn", "moe_router", "moe_preprocess"])
    i = modules.index("--cuda-graph-impl")
    assert modules[i:i + 6] == ["--cuda-graph-impl", "transformer_engine", "--cuda-graph-scope" if core else "--cuda-graph-modules",
                                "attn", "moe_router", "moe_preprocess"]
    whole = render("full_iteration")
    assert "--no-check-for-nan-in-loss-and-grad" in whole
    # core_v0.16.1 asserts the pad flag for its "local" capture under expert parallelism (arguments.py:1158-1160)
    assert ("--moe-pad-experts-for-cuda-graph-inference" in whole) == core
    assert (["--cuda-graph-impl", "local", "--cuda-graph-scope", "full_iteration"] if core else ["--cuda-graph-impl", "full_iteration"]) \
        == whole[whole.index("--cuda-graph-impl"):][:4 if core else 2]
    layers = render("layers", **{"model.moe.capacity_factor": 1.0})
    assert layers[layers.index("--cuda-graph-impl") + 1] == "local"
    assert ("--moe-pad-experts-for-cuda-graph-inference" in layers) == core
    assert "--cuda-graph-impl" not in render("none")


@pytest.mark.parametrize("graphs", [["attn"], ["attn", "moe_router", "moe_preprocess"], "full_iteration", "none"])
def test_a_transformer_engine_capture_launches_with_the_environment_megatron_lm_asserts(graphs: Any):
    """Megatron-LM stops at start-up when Transformer Engine captures modules beside expandable
    segments unless NCCL_GRAPH_REGISTER=0 (arguments.py:1247-1254 in core_v0.16.1, alike on main)."""
    s = spec(**{"training.cuda_graphs": graphs, "cluster.gpus_per_node": 8, "cluster.nvlink_domain": 8, "parallel.ep": 2})
    cand = build_plan(s, top=1).candidates[0]
    ctx = make_context(s)
    args, env = megatron_args(ctx, cand, TrainOptions()), environment(ctx, cand)
    te_capture = "transformer_engine" in args[args.index("--cuda-graph-impl") + 1:][:1] if "--cuda-graph-impl" in args else False
    assert te_capture == isinstance(graphs, list)
    if te_capture:
        assert "expandable_segments:True" not in env.get("PYTORCH_CUDA_ALLOC_CONF", "") or env.get("NCCL_GRAPH_REGISTER") == "0"
    else:
        assert "NCCL_GRAPH_REGISTER" not in env


@pytest.mark.parametrize(("changes", "message"), [
    ({"training.cuda_graphs": ["moe_preprocess"]}, "moe_preprocess must be listed with moe_router"),
    ({"training.cuda_graphs": ["moe", "moe_router"]}, "moe captures the whole MoE layer"),
    ({"training.cuda_graphs": ["mamba"]}, r"training.cuda_graphs=\['mamba'\]: the pattern has no M blocks"),
    ({"training.cuda_graphs": ["attn"], "backend.transformer_engine": False}, "captured by Transformer Engine"),
    ({"training.cuda_graphs": "layers"}, "set model.moe.capacity_factor"),
    ({"training.cuda_graphs": ["attn"], "training.recompute": "full"}, "full recompute is only supported with full_iteration"),
    ({"training.cuda_graphs": "everything"}, "training.cuda_graphs"),
])
def test_bad_cuda_graphs_are_one_line_errors_naming_the_key(changes: dict[str, Any], message: str):
    with pytest.raises(SpecError, match=message) as err:
        spec(**changes)
    assert "\n" not in str(err.value) and "cuda_graphs" in str(err.value)


def test_published_settings_map_onto_cuda_graphs():
    assert read_cuda_graphs("dispatcher=flex/deepep; cuda_graph=transformer_engine['attn', 'moe_router', 'moe_preprocess']; x") \
        == ("attn", "moe_router", "moe_preprocess")
    assert read_cuda_graphs("cuda_graph=transformer_engine[moe_router,moe_preprocess]; recompute=none") == ("moe_router", "moe_preprocess")
    assert read_cuda_graphs("dispatcher=alltoall; cuda_graph=localfull_iteration; family: ...") == "full_iteration"
    assert read_cuda_graphs("cuda_graphs=True; run_script: apply_moe_token_drop") == "layers"
    assert read_cuda_graphs("cuda_graph=off(default)") == read_cuda_graphs("cuda_graphs=False") == read_cuda_graphs("") == "none"
