"""The cost model's memory terms, the imbalance band, and agreement with the committed GPU runs."""

from __future__ import annotations

import json
import statistics
from dataclasses import replace

import pytest

from benchmarks.gpu.compare import compare, host_label, in_flight_load, markdown, routing_pairs
from megacpp.planner.calibrate.reports import run_spec
from megacpp.planner.cost.activations import expert_backward_bytes
from megacpp.planner.cost.blocks import unfused_scores
from megacpp.planner.cost.coefficients import (
    DEFAULT_EFFICIENCY,
    EXPERT,
    HOST_BOUND_ERROR,
    REFERENCE_HOST_LAUNCH_US,
)
from megacpp.planner.cost.communication import _collective_seconds
from megacpp.planner.cost.flops import micro_batch_tokens
from megacpp.planner.cost.memory import (
    GIB,
    OPTIMIZER_STEP_BYTES,
    SCORE_BUFFER_BYTES,
    TE_GROUPED_GEMM_WORKSPACE_BYTES,
)
from megacpp.planner.cost.step import estimate, grad_accumulation_seconds, optimizer_seconds
from megacpp.planner.plan import (
    MEASURED_LAYER_ROUTED_LOAD,
    MEASURED_ROUTED_LOAD,
    build_plan,
    estimate_run,
    make_context,
    with_backend,
)
from megacpp.planner.search.layout import Layout
from megacpp.planner.search.stages import assign_stages
from megacpp.planner.spec.clusters import PRESETS
from megacpp.planner.spec.loading import load_spec
from tests.conftest import (
    HOST_PROBES,
    ROOT,
    TINY_DENSE,
    TINY_MOE,
    committed_gpu_runs,
    evidence_file,
    evidence_spec,
    make_spec,
)


def _spec(name: str, *overrides: str):
    return load_spec(evidence_spec(name), list(overrides))


def _stage(spec, layout=None):
    layout = layout or build_plan(spec, top=1).candidates[0].layout
    return estimate_run(spec, layout).memory[0], layout


def test_unfused_attention_keeps_a_score_buffer_and_te_does_not():
    local, lay = _stage(_spec("moe-ep8"))
    fused, _ = _stage(_spec("moe-ep8", "backend.transformer_engine=true"), lay)
    # 32 heads x 4096^2 scores of one micro-batch, bf16: megatron-core's global buffer, 1 GiB
    assert local.buffers_gib == pytest.approx(SCORE_BUFFER_BYTES * 32 * 4096**2 / GIB)
    # no score buffer under TE; what it keeps is the experts' grouped-GEMM cuBLAS workspaces
    assert fused.buffers_gib == pytest.approx(TE_GROUPED_GEMM_WORKSPACE_BYTES / GIB) and fused.activations_gib < local.activations_gib / 5
    assert local.total_gib > fused.total_gib + 20  # the s^2 terms dominate this layout without TE


def test_peak_is_the_larger_of_forward_backward_and_optimizer_step():
    mem, _ = _stage(_spec("dense-tp8", "training.recompute=full"))
    assert mem.total_gib == pytest.approx(mem.resident_gib + max(mem.activations_gib + mem.transient_gib, mem.optimizer_step_gib))
    # tp8 x dp1: the optimizer holds an fp32 copy of the whole local shard while it steps
    assert mem.optimizer_step_gib == pytest.approx(OPTIMIZER_STEP_BYTES * mem.params / GIB)


@pytest.mark.evidence
def test_te_optimizer_step_holds_no_copy_as_measured():
    """The optimizer step's fp32 copy is megatron-core's torch fallback for the multi-tensor
    kernels; with TE they are TE's and the step holds nothing: every committed TE run's optimizer
    peak is its resident memory, and the plan adds no step term there."""
    te_runs = [run for _, run in committed_gpu_runs() if run.get("backend", {}).get("transformer_engine_used")
               and run.get("per_rank_memory_phases")]
    assert len(te_runs) >= 10
    for run in te_runs:
        for phases in run["per_rank_memory_phases"]:
            assert phases["optimizer_peak_gib"] == pytest.approx(phases["resident_gib"], abs=0.01), run["name"]
        assert all(m.optimizer_step_gib == 0 for m in estimate_run(run_spec(run), run["layout"]).memory)
    local, _ = _stage(_spec("dense-tp8"))
    assert local.optimizer_step_gib > 1


def test_scores_scale_with_heads_per_rank_and_sequence():
    spec = _spec("dense-tp8")
    base = build_plan(spec, top=1)
    ctx = make_context(with_backend(spec, transformer_engine=False))
    lay = base.candidates[0].layout
    assert unfused_scores(ctx, lay) == 1 * 32 / 8 * 4096 * 4096


def test_imbalance_turns_memory_and_time_into_a_band():
    point = build_plan(_spec("moe-ep8"), top=1).candidates[0]
    band = build_plan(_spec("moe-ep8", "model.moe.imbalance=1.5"), top=1).candidates[0]
    assert point.memory.peak_gib_high is None and point.time.step_seconds_high is None
    assert band.memory.peak_gib == pytest.approx(point.memory.peak_gib)
    assert band.memory.peak_gib_high > band.memory.peak_gib
    assert band.time.step_seconds_high > band.time.step_seconds
    assert all(s.total_gib_high >= s.total_gib for s in band.memory.per_stage)
    capped = build_plan(_spec("moe-ep8", "model.moe.imbalance=1.5", "model.moe.capacity_factor=1.1"), top=1).candidates[0]
    assert capped.memory.routed_load == 1.1 and capped.memory.peak_gib_high < band.memory.peak_gib_high
    one_rank = build_plan(_spec("moe-1gpu", "model.moe.imbalance=1.5"), top=1).candidates[0]
    assert one_rank.memory.peak_gib_high is None  # one EP rank holds every expert: no busiest rank


@pytest.mark.evidence
def test_predictions_stay_close_to_every_committed_gpu_run():
    """Regression guard on the measured evidence (benchmarks/gpu/compare.py prints the table): every
    runtime stage without expert parallelism within 2% (no routing in its peak), every stage within
    8%, and the median step-time error within 10%. Megatron-LM's own runs of the rendered launch
    (gpu_runs_h200x2_megatronlm*.json) are held to the same bounds: they run Megatron's fused
    bias-SwiGLU, whose smaller activations the plan counts (backend.fusions), and at least one
    of them runs with expert parallelism."""
    rows, expert_parallel, megatron_lm = [], [], []
    for _, run in committed_gpu_runs():
        for row in compare(run):
            rows.append(row)
            expert_parallel.append(run["layout"]["ep"] > 1)
            megatron_lm.append(run.get("engine") == "megatron-lm")
    assert len(rows) >= 40
    # local modules on a host with TE installed: megatron-core's optimizer takes TE's multi-tensor
    # kernels there and holds no fp32 copy, which the plan (not knowing the host) counts: +2.1%
    # over, and its forward-backward peak, which set the measured one, is within 0.4%
    copy_not_held = {"eg-local-none-gated"}
    steady = [r for r, ep in zip(rows, expert_parallel, strict=True) if not (ep or r["run"] in copy_not_held)]
    assert len(steady) >= 25
    stock = [(r, ep) for r, ep, mlm in zip(rows, expert_parallel, megatron_lm, strict=True) if mlm]
    assert len(stock) >= 4 and any(ep for _, ep in stock) and any(r in steady for r, _ in stock)
    for _, run in committed_gpu_runs():
        if run["name"] in copy_not_held:
            mem = estimate_run(run_spec(run), run["layout"]).memory[0]
            assert mem.optimizer_step_gib > mem.activations_gib + mem.transient_gib  # the copy sets the plan's peak
            fb = run["per_rank_memory_phases"][0]["forward_backward_peak_gib"]
            assert mem.resident_gib + mem.activations_gib + mem.transient_gib == pytest.approx(fb, rel=0.005)
    worst = max(steady, key=lambda r: abs(r["memory_error"]))
    assert abs(worst["memory_error"]) <= 0.02, worst
    worst = max(rows, key=lambda r: abs(r["memory_error"]))
    assert abs(worst["memory_error"]) <= 0.08, worst
    assert statistics.median(abs(r["step_error"]) for r in rows) <= 0.10


def test_step_breakdown_adds_up_to_the_step():
    """step_breakdown (plan JSON, `explain layout`) splits the step into its terms."""
    for name, run in committed_gpu_runs():
        est = estimate_run(run_spec(run), run["layout"])
        terms = dict(est.breakdown)
        assert sum(terms.values()) == pytest.approx(est.step_seconds, rel=1e-9), (name, run["name"])
        assert all(v >= 0 for v in terms.values())
        lay = run["layout"]
        assert (terms["bubble"] > 0) == (lay["pp"] > 1)
        assert (terms["softmax"] > 0) == ("A" in run["spec"]["model"]["pattern"] and not run["backend"]["transformer_engine_used"])
    plan = build_plan(load_spec(ROOT / "recipes" / "llama-8b-dense.yaml"), top=1).candidates[0]
    assert sum(plan.step_breakdown.values()) == pytest.approx(plan.time.step_seconds, abs=1e-5)


@pytest.mark.evidence
def test_optimizer_step_time_follows_the_optimizer_state_measured_on_every_run():
    """The optimizer step's time (cost.optimizer_seconds) against the runtime's measured one, on
    every committed run whose stages do not wait on each other there (no PP) and whose optimizer
    step holds nothing else (the runtime before its parameter all-gather overlapped the forward
    gathered inside it, under DP or CP with the distributed optimizer): with TE's FusedAdam within
    6.5% on the median (6.1% over 78 runs on H200 and H100 hosts), and 27% at worst (the Mamba MoE hybrid, -26%, and 64
    local experts at f 1024, 535 tensors, -22%); torch's Adam (local modules, no TE installed)
    within 8% on the median and 35% at worst (TP4 and TP8 shards). eg-local-none-gated ran local
    modules on a host with TE installed, where megatron-core steps with TE's FusedAdam: left out.
    Under TE a rank's many small expert weights cost host time per tensor: 128 local experts at
    f 512 (525 tensors) stepped in 39.6 ms, 37.8 ms planned, where the state's bytes alone say
    19.5 ms. The host probes, whose state is tiny, take the per-tensor time alone, and the three
    hosts they ran on differ by up to 2.4x in it (four E blocks of 32 experts: 28.0, 13.5 and
    11.7 ms): within 32% under and 76% over."""
    errors: dict[bool, list[float]] = {True: [], False: []}
    probes: list[float] = []
    for name, run in committed_gpu_runs():
        lay = run["layout"]
        gathered_in_step = ((lay["dp"] * lay["cp"] > 1 and run["spec"]["training"].get("distributed_optimizer", True)
                             and "dp_overlap" not in name) or run["name"].endswith("+previous-runtime"))
        if run.get("engine") == "megatron-lm" or lay["pp"] > 1 or gathered_in_step or run["name"] == "eg-local-none-gated":
            continue
        spec = run_spec(run)
        ctx = make_context(spec)
        planned = optimizer_seconds(ctx, estimate_run(spec, lay).memory[0], DEFAULT_EFFICIENCY)
        error = planned / statistics.median(run["per_rank_optimizer_seconds"]) - 1
        (probes if name in HOST_PROBES else errors[ctx.te]).append(error)
    fused, local = ([abs(e) for e in errors[te]] for te in (True, False))
    assert len(fused) >= 45 and len(local) >= 30 and len(probes) == 15
    assert statistics.median(fused) <= 0.065 and max(fused) <= 0.27
    assert statistics.median(local) <= 0.08 and max(local) <= 0.35
    assert -0.32 <= min(probes) < 0 < max(probes) <= 0.77
    without_tensors = replace(DEFAULT_EFFICIENCY, optimizer_tensor_s=0.0)
    run = next(r for _, r in committed_gpu_runs() if r["name"] == "x100-te-moe-h2048-e128-f512-top8")
    spec = run_spec(run)
    stage = estimate_run(spec, run["layout"]).memory[0]
    assert stage.param_tensors == 525
    measured = statistics.median(run["per_rank_optimizer_seconds"])
    assert abs(optimizer_seconds(make_context(spec), stage, DEFAULT_EFFICIENCY) / measured - 1) < 0.05
    assert optimizer_seconds(make_context(spec), stage, without_tensors) / measured - 1 < -0.45


@pytest.mark.evidence
def test_gradient_accumulation_is_priced_as_the_profiled_adds_into_the_fp32_buffer():
    """Without gradient-accumulation fusion each weight gradient is added into the fp32 main_grad
    buffer once per micro-batch: the profiled step's fp32 add kernels (one per weight tensor per
    micro-batch) against cost.grad_accumulation_seconds, on every committed profile that lists its
    most launched kernels, the runtime's and Megatron-LM's: within 7% on the median, and 16% at
    worst (Megatron-LM's MoE on EP2 on one host, whose adds ran at 2.12 TB/s), and 19% for the 128
    small experts on one H100, whose 4208 adds of 0.5 MiB took 9.7 us each. The H200 rate is the
    median of the first 19; blind set 5, profiled after it was set, came within 2-11%. The H100 rate
    is the median of the eight MoE runs on one H100."""
    errors = []
    for _, run in committed_gpu_runs(host_probes=False):
        profile = (run.get("per_rank_profile") or [None])[0]
        # the adds into main_grad are torch's unrolled elementwise add in every committed profile;
        # blind set 7's (ARAE)*2 also lists a vectorised fp32 add (208 launches) that no other run has
        adds = [(n, sec) for name, n, sec in (profile or {}).get("most_launched", [])
                if "unrolled_elementwise_kernel<at::native::CUDAFunctor_add<float>" in name]
        if not adds:
            continue
        spec, lay = run_spec(run), run["layout"]
        stage = estimate_run(spec, lay).memory[0]  # the profile's rank 0 is on the first stage
        (launches, measured), = adds
        assert launches % lay["num_microbatches"] == 0  # the same adds after every micro-batch
        planned = lay["num_microbatches"] * grad_accumulation_seconds(make_context(spec), stage, DEFAULT_EFFICIENCY)
        errors.append(abs(planned / measured - 1))
    assert len(errors) >= 32 and sorted(errors)[-2] <= 0.16 and max(errors) <= 0.19 and statistics.median(errors) <= 0.07


@pytest.mark.evidence
def test_a_weight_gradient_waits_for_main_grad_beside_the_activations():
    """Without gradient-accumulation fusion a weight's bf16 gradient is a tensor of the weight's
    size until it is added into main_grad: on the wide stacks of blind set 5 (fc1 of 0.875 GiB, all
    eight experts' fc1 at once under TE) it sets the forward+backward peak, and with it every
    stage is within 1% of what it measured (-1.6% to -3.4% without it)."""
    runs = [run for name, run in committed_gpu_runs() if name == "gpu_runs_h200x2_te_blind5.json"]
    assert len(runs) == 5
    for run in runs:
        lay = run["layout"]
        est = estimate_run(run_spec(run), lay)
        per_stage = run["world_size"] // lay["pp"]
        for p, stage in enumerate(est.memory):
            measured = max(run["per_rank_peak_gib"][p * per_stage:(p + 1) * per_stage])
            assert stage.total_gib == pytest.approx(measured, rel=0.01)
            if lay["tp"] == 1 and not (stage.pp_rank == lay["pp"] - 1 and lay["pp"] > 1):
                letter = "MoE FFN" if "moe" in run["name"] else "dense MLP"
                assert stage.transient_from == f"the bf16 gradient of the last {letter} block's largest weight"


def test_data_parallel_collectives_hide_a_share_until_they_outlast_the_micro_batch():
    """The gradient reduction hides behind the last micro-batch's backward and the parameter
    gather behind the first one's forward: on NVLink the measured share of each shows; over a
    NIC, where the collectives outlast that compute, everything beyond it shows."""
    spec = _spec("dp-h8192-distopt-m2")
    lay = {"tp": 1, "pp": 1, "vpp": 1, "cp": 1, "dp": 2, "ep": 1, "etp": 1, "edp": 2, "sp": False,
           "micro_batch_size": 1, "num_microbatches": 2}
    eff = DEFAULT_EFFICIENCY
    nvlink = {c.collective: c for c in estimate_run(spec, lay).communication}
    assert nvlink["reduce-scatter"].exposed_seconds == pytest.approx(eff.grad_reduce_exposed * nvlink["reduce-scatter"].seconds)
    assert nvlink["all-gather"].exposed_seconds == pytest.approx(eff.param_gather_exposed * nvlink["all-gather"].seconds)
    nic = _spec("dp-h8192-distopt-m2", "cluster.nodes=2", "cluster.gpus_per_node=1", "cluster.nvlink_domain=1")
    est = estimate_run(nic, lay)
    over = {c.collective: c for c in est.communication}
    gpu = dict(est.breakdown)
    m = lay["num_microbatches"]
    micro_batch = (gpu["matmul"] + gpu["softmax"] + gpu["small_kernels"]) / m
    backward = micro_batch * 2 / 3 + gpu["grad_accumulation"] / m  # the gradients accumulate in the backward
    for collective, window in (("reduce-scatter", backward), ("all-gather", micro_batch / 3)):
        c = over[collective]
        assert c.link != nvlink[collective].link and c.seconds > window
        assert c.exposed_seconds == pytest.approx(c.seconds - window)


@pytest.mark.evidence
def test_gpu_bound_steps_are_the_accurate_ones():
    """What `explain layout` tells a user about a host-bound step holds on the runtime's evidence:
    where the host's excess over the GPU's work is not the largest term of the step (Estimate.host_bound)
    the median run is within 5% and 95% within 20% (the worst the Mamba stack on TP2 with SP under
    local modules, -34%, and MoE ranks near balance on blind set 6's host, 24-33%), and every
    run within HOST_BOUND_ERROR (the worst a blind MoE run of 8 plain experts, top-1, +66%, and a
    128-expert host probe on the fastest of three H100 hosts, +63%). (Megatron-LM's
    own runs are left out: their host time is Megatron-LM's, which on one host ran TE layouts
    13-47% slower than the runtime and on another up to 19% faster; the README compares them.)"""
    bound, free = [], []
    for name, run in committed_gpu_runs():
        if "megatronlm" in name:
            continue
        est = estimate_run(run_spec(run), run["layout"])
        error = abs(est.step_seconds / run["measured_step_seconds"] - 1)
        (bound if est.host_bound else free).append(error)
        assert est.host_seconds >= dict(est.breakdown)["block_overhead"] - 1e-12  # the breakdown holds what shows
    assert len(free) >= 100 and len(bound) >= 100
    assert statistics.median(free) <= 0.05 and sum(e <= 0.20 for e in free) >= 0.95 * len(free) and max(free) <= 0.35
    assert max(bound) <= HOST_BOUND_ERROR


def test_readme_table_has_a_row_per_stage_and_the_step_once_per_run():
    assert host_label("gpu_runs_h200x4_peaks.json") == "4 x H200 (peaks)" and host_label("gpu_runs_h200x8.json") == "8 x H200"
    rows = [{"file": name, **row} for name, run in committed_gpu_runs() for row in compare(run)]
    lines = markdown(rows).splitlines()
    assert len(lines) == 2 + len(rows)
    pp2 = [line for line in lines if "| 2 x H200 (large) | large-dense-pp2 |" in line]
    assert [line.split("|")[3].strip() for line in pp2] == ["pp2", "pp2"]
    assert pp2[0].count("%") == 2 and pp2[1].count("%") == 1  # memory per stage, step time once


def test_in_flight_load_is_the_heaviest_window_of_micro_batches():
    assert in_flight_load([0.5, 1.5, 1.0, 0.7], 1) == 1.5  # PP1 (or the last stage): one at a time
    assert in_flight_load([0.5, 1.5, 1.0, 0.7], 2) == 1.25
    assert in_flight_load([0.5, 1.5], 4) == 1.0  # fewer micro-batches than the window


@pytest.mark.evidence
def test_expert_parallel_peaks_follow_the_recorded_routing():
    """Runs that recorded routing per micro-batch: each step's peak on each rank, predicted at the
    load that rank received in that step, is within 4% (median within 2%) and closer than the
    balanced estimate; the peak grows with the load at the model's rate (least-squares slope
    within 30%, where one unit of load moves it by 0.3 GiB or more); and the recorded loads swing
    well past 1 on most runs, which is what moe.imbalance is for. Under full recompute the peak is
    one recomputed expert layer's backward, so it follows that layer's load, while the record
    averages the stage's MoE layers: runs that recorded only the average are within 5%, and their
    peaks rise faster than the average load, so the slope is checked on the other runs. Reports
    now record each stage's most unbalanced layer (heaviest_layer_steps); priced at it, the four
    full-recompute EP2 runs that have it are within 1.1% (gpu_runs_h200x2_te_layers.json)."""
    runs = [run for _, run in committed_gpu_runs() if run.get("routed_load") and run["layout"]["ep"] > 1]
    assert len(runs) >= 5
    heaviest = []
    for run in runs:
        pairs = routing_pairs(run)
        errors = [p["predicted_gib"] / p["measured_gib"] - 1 for p in pairs]
        balanced = [abs(row["memory_error"]) for row in compare(run)]
        full = run["spec"]["training"]["recompute"] == "full"
        by_layer = all("heaviest_layer_steps" in stage for stage in run["routed_load"])
        worst = (0.015 if by_layer else 0.05) if full else 0.04
        assert max(map(abs, errors)) <= worst and statistics.median(map(abs, errors)) <= 0.02, run["name"]
        # closer than balanced, unless balanced routing already explains the peak
        assert max(map(abs, errors)) < max(balanced) or max(balanced) <= 0.005, run["name"]
        x, y = [p["load"] for p in pairs], [p["measured_gib"] for p in pairs]
        measured_slope = statistics.linear_regression(x, y).slope
        spec, lay = run_spec(run), run["layout"]
        low, high = round(min(x), 2), round(max(x), 2)  # the model's slope over the loads the run saw
        model_slope = (estimate_run(spec, lay, load=high).memory[0].total_gib
                       - estimate_run(spec, lay, load=low).memory[0].total_gib) / (high - low)
        if model_slope >= 0.3 and not full:  # below that (large-hybrid-ader-tp2-ep2-sp: 0.22 GiB) allocator noise hides the slope
            # within 20% on the five 2-GPU runs; EP4 (large-moe-ep4) measured 0.94 GiB per unit of load, model 1.31
            assert measured_slope == pytest.approx(model_slope, rel=0.30), run["name"]
        loads = [x for stage in run["routed_load"] for step in stage["steps"] for mb in step for x in mb]
        assert sum(loads) / len(loads) == pytest.approx(1.0, abs=1e-3)
        heaviest.append(max(loads))
    assert max(heaviest) > 1.3 and sum(x > 1.3 for x in heaviest) >= 5


@pytest.mark.evidence
def test_balanced_routing_is_pointed_out_where_expert_parallel_layouts_are_shown():
    def notes(name: str, *overrides: str) -> list[str]:
        return [n.rule for n in build_plan(_spec(name, *overrides), top=3).notes]

    assert "moe-balanced-routing" in notes("moe-ep8")
    assert "moe-balanced-routing" not in notes("moe-ep8", "model.moe.imbalance=1.8")
    assert "moe-balanced-routing" not in notes("moe-1gpu")  # one rank holds every expert
    assert "moe-balanced-routing" not in notes("dense-tp8")
    # the load the note quotes is the heaviest one the committed runs recorded
    loads = [x for _, run in committed_gpu_runs() for stage in run.get("routed_load") or []
             for step in stage["steps"] for mb in step for x in mb]
    assert round(max(loads), 1) == MEASURED_ROUTED_LOAD
    # under full recompute the note quotes the heaviest single layer the runs recorded
    layer = [x for _, run in committed_gpu_runs() for stage in run.get("routed_load") or []
             for step in stage.get("heaviest_layer_steps", []) for mb in step for x in mb]
    assert round(max(layer), 1) == MEASURED_LAYER_ROUTED_LOAD
    note = next(n.message for n in build_plan(_spec("trace2-te-meae-ep2-full"), top=3).notes if n.rule == "moe-balanced-routing")
    assert f"{MEASURED_LAYER_ROUTED_LOAD:g}x the mean in one layer of one micro-batch" in note


def _site_gib(peak: dict, site: str) -> float:
    """GiB held at a rank's peak by one allocation site (the path after site-packages/)."""
    return next(v for k, v in peak["sites_gib"].items() if k.endswith(site))


@pytest.mark.evidence
def test_peak_breakdown_attributes_expert_parallel_misses_to_routed_tensors():
    """launch --memory-peak on the same shape at EP1 and EP4: the attention tensors at the peak are
    the same; the routed experts' tensors vary by rank with EP4 (routing in each rank's peak
    micro-batch: 0.7-1.5x EP1's) and order the ranks' peaks, which is what moe.imbalance bands."""
    runs = {run["name"]: run for name, run in committed_gpu_runs() if name == "gpu_runs_h200x4_peaks.json"}
    ep1, ep4 = runs["moe-ep1-h4096"], runs["moe-ep4-h4096"]

    def routed(peak):  # x_linear + glu_linear_offset, one per routed token
        return _site_gib(peak, "megatron/core/transformer/mlp.py:224 glu")

    def softmax(peak):  # the fp32 softmax outputs of the unfused attention
        return _site_gib(peak, "torch/nn/functional.py:2159 softmax")

    base = routed(ep1["per_rank_memory_peak"][0])
    ranks = ep4["per_rank_memory_peak"]
    assert max(routed(p) for p in ranks) > 1.2 * base
    assert sorted(ranks, key=routed) == sorted(ranks, key=lambda p: p["peak_gib"])
    assert {softmax(p) for p in ep1["per_rank_memory_peak"] + ep4["per_rank_memory_peak"]} == {8.0}


@pytest.mark.evidence
def test_an_expert_backward_holds_the_gradients_the_plan_counts():
    """launch --memory-peak on one GPU with TE's grouped experts: at the peak the backward holds
    7f bf16 per routed token (blocks.expert_backward_bytes; three blocks of 2f and one of f),
    gated or not, with and without full recompute, and with it the plan's peak is within 1.2%.
    Without the term those runs came out 0.4-6.5% under (the loss's logits set the plan's peak).
    The planned-blind runs (gpu_runs_h200x1_expert_grads.json) give the gradients the peak; the
    local modules' experts run one at a time, so there the score gradients still set it."""
    runs = {run["name"]: run for name, run in committed_gpu_runs()
            if name in ("gpu_runs_h200x2_te_trace2.json", "gpu_runs_h200x1_expert_grads.json")}
    for name in ("trace2-te-ae-1gpu-full", "trace2-te-meae-1gpu-full", "eg-te-none-gated", "eg-te-none-plain", "eg-te-full-plain"):
        run = runs[name]
        ctx, lay = make_context(run_spec(run)), Layout.from_dict(run["layout"])
        held = expert_backward_bytes(ctx, lay) * micro_batch_tokens(ctx, lay) / 2**20  # MiB
        peak = run["per_rank_memory_peak"][0]
        site = next(k for k in peak["largest_blocks_mib"] if k.endswith("random.py:566 backward") or k == "(unknown)")
        assert sum(b for b in peak["largest_blocks_mib"][site] if b >= held / 7 * 0.99) == pytest.approx(held, rel=0.01), name
        est = estimate_run(run_spec(run), run["layout"])
        assert est.memory[0].total_gib == pytest.approx(run["measured_peak_gib"], rel=0.012), name
    local = runs["eg-local-none-gated"]
    est = estimate_run(run_spec(local), local["layout"])
    assert est.memory[0].total_gib == pytest.approx(local["measured_peak_gib"], rel=0.025)


@pytest.mark.evidence
def test_te_moe_resident_memory_holds_the_grouped_gemm_workspaces():
    """Under TE the experts' grouped GEMMs keep four 32 MiB cuBLAS workspaces for good: with them
    the plan's resident memory (weights, gradients, optimizer state, buffers, overhead) matches
    what every TE MoE run held between steps to 0.03 GiB; without them each was 0.12 GiB short."""
    checked = 0
    for name, run in committed_gpu_runs():
        spec = run["spec"]
        if ("megatronlm" in name or not run["backend"]["transformer_engine_used"] or "E" not in run["pattern"]
                or spec["training"].get("recompute") == "full"):
            continue
        est = estimate_run(run_spec(run), run["layout"])
        per_stage = run["world_size"] // run["layout"]["pp"]
        measured = max(p["resident_gib"] for p in run["per_rank_memory_phases"][:per_stage])
        assert est.memory[0].resident_gib == pytest.approx(measured, abs=0.03), run["name"]
        assert est.memory[0].buffers_gib == pytest.approx(TE_GROUPED_GEMM_WORKSPACE_BYTES / GIB)
        checked += 1
    assert checked >= 12


def test_full_recompute_repeats_gpu_work_and_only_the_local_modules_host_time():
    """Full recompute runs every forward again on the GPU; under TE it adds no host time (the first
    forward runs without autograd; cost.host_repeats), while the local modules' overheads, which
    hold GPU time too, grow by a third."""
    for te in ("true", "false"):
        spec = _spec("trace2-te-meae-1gpu-full", f"backend.transformer_engine={te}", "training.recompute=none")
        full = _spec("trace2-te-meae-1gpu-full", f"backend.transformer_engine={te}")
        layout = build_plan(spec, top=1).candidates[0].layout
        without, again = estimate_run(spec, layout), estimate_run(full, layout)
        assert dict(again.breakdown)["matmul"] > 1.2 * dict(without.breakdown)["matmul"]
        assert again.host_seconds == pytest.approx(without.host_seconds * (1 if te == "true" else 4 / 3))


def test_the_plan_says_what_sets_each_stage_transient():
    """memory.per_stage[].transient_from names the short-lived allocation on top of the activations."""
    moe, _ = _stage(_spec("eg-te-none-gated"))  # a large expert ffn and a small vocabulary
    assert moe.transient_from == "the gradients of the last MoE FFN block's backward"
    assert moe.transient_gib > 0.8
    small_experts, _ = _stage(_spec("eg-te-none-gated", "model.moe.ffn_hidden_size=512", "model.vocab_size=64000"))
    assert small_experts.transient_from == "the loss's logits"
    full, _ = _stage(_spec("trace2-te-meae-1gpu-full", "backend.fusions=false"))  # as it ran
    assert full.transient_from == "the backward of a recomputed MoE FFN block"
    local, _ = _stage(_spec("moe-ep8"))  # unfused attention at sequence 4096
    assert local.transient_from == "the gradients of the last self-attention block's backward"
    assert local.to_dict()["transient_from"] == local.transient_from


@pytest.mark.evidence
def test_two_gpu_groups_use_the_pair_rates_measured_on_two_h200s():
    """The h200-sxm-8 preset's pair rates are the 1 GiB rows and the median 8 KiB latency of
    nccl_h200x2.json (benchmarks/evidence/nccl-busbw); tensor parallelism on two GPUs is priced at them (all-gather
    plus reduce-scatter under SP), larger groups at the 8-GPU rates, and a stated busbw replaces both."""
    doc = json.loads(evidence_file("nccl_h200x2.json").read_text())
    assert doc["world_size"] == 2
    rows = {r["collective"]: r for r in doc["rows"] if r["bytes"] == 1 << 30}
    preset = PRESETS["h200-sxm-8"]
    assert preset["nvlink_pair_gbps"] == pytest.approx({k: r["busbw_gbps"] for k, r in rows.items()}, abs=0.05)
    latency = statistics.median(r["seconds"] * 1e6 for r in doc["rows"] if r["bytes"] == 8 << 10 and r["collective"] != "send-recv")
    assert preset["nvlink_pair_alpha_us"] == pytest.approx(latency, abs=0.1)

    spec = _spec("te-dense-tp2-sp")
    ctx = make_context(spec)
    size = 64 << 20
    pair = _collective_seconds(ctx, "all-gather", "nvlink", 2, size)
    assert pair == pytest.approx(23.5e-6 + size / 2 / 265.4e9)
    assert _collective_seconds(ctx, "all-gather", "nvlink", 4, size) == pytest.approx(59e-6 + size * 3 / 4 / 361.4e9)
    layout = {"tp": 2, "pp": 1, "vpp": 1, "cp": 1, "dp": 1, "ep": 1, "etp": 1, "edp": 2, "sp": True,
              "micro_batch_size": 1, "num_microbatches": 16}
    tp = next(c for c in estimate_run(spec, layout).communication if c.axis == "tp")
    act = 2 * 4096 * spec.model.hidden_size  # one bf16 activation of a micro-batch
    calls = 8 * 16 * 2  # blocks x micro-batches x (forward, backward)
    gather = _collective_seconds(ctx, "all-gather", "nvlink", 2, act)
    each = gather + _collective_seconds(ctx, "reduce-scatter", "nvlink", 2, act)
    # and the backward's second all-gather of each block's input, for its weight gradient
    assert tp.seconds == pytest.approx(calls * each + 8 * 16 * gather)
    stated = make_context(_spec("te-dense-tp2-sp", "cluster.intra_node_busbw_gbps=100"))
    assert _collective_seconds(stated, "all-gather", "nvlink", 2, size) == pytest.approx(59e-6 + size / 2 / 100e9)



def test_under_te_each_local_expert_adds_host_time_that_expert_parallelism_divides():
    """With Transformer Engine an E block's host time grows with its local experts (EXPERT): the
    plan says how much of the host time that is, and EP8 leaves an eighth of the experts, and of
    that time per micro-batch, on each GPU. Local modules price experts by the E overhead alone."""
    spec = make_spec(TINY_MOE, **{"model.moe.num_experts": 64, "backend.transformer_engine": True,
                                  "cluster.host_launch_us": REFERENCE_HOST_LAUNCH_US})  # the hosts it was measured on
    base = {"tp": 1, "pp": 1, "vpp": 1, "cp": 1, "etp": 1, "sp": False, "micro_batch_size": 1, "num_microbatches": 2}
    one, eight = (estimate_run(spec, {**base, "dp": 8, "ep": ep, "edp": 8 // ep}) for ep in (1, 8))
    per_expert = DEFAULT_EFFICIENCY.overhead(EXPERT, te=True)
    assert one.expert_host_seconds == pytest.approx(2 * 4 * 64 * per_expert)  # micro-batches x E blocks x experts
    assert eight.expert_host_seconds == pytest.approx(one.expert_host_seconds / 8)
    assert one.host_seconds - eight.host_seconds == pytest.approx(one.expert_host_seconds - eight.expert_host_seconds)
    local = estimate_run(with_backend(spec, transformer_engine=False), {**base, "dp": 8, "ep": 1, "edp": 8})
    assert local.expert_host_seconds == 0.0 and DEFAULT_EFFICIENCY.overhead(EXPERT) == 0.0
    plan = build_plan(make_spec(TINY_MOE, **{"model.moe.num_experts": 64, "backend.transformer_engine": True,
                                             "cluster.nodes": 1}), top=50)
    assert all(c.time.expert_host_seconds <= c.time.host_seconds for c in plan.candidates)


def test_under_te_moe_ranks_show_a_share_of_the_shorter_of_host_and_gpu_time():
    """The MoE dispatcher makes the host wait for the GPU in every E block's forward, so on a rank
    with E blocks Efficiency.te_sync_exposed of the shorter of its host and GPU time shows on top
    of the longer; a dense rank takes the longer alone, and the local modules add host time whole."""
    base = {"tp": 1, "pp": 1, "vpp": 1, "cp": 1, "etp": 1, "sp": False, "micro_batch_size": 1, "num_microbatches": 2,
            "dp": 8, "ep": 1, "edp": 8}
    unsynced = replace(DEFAULT_EFFICIENCY, te_sync_exposed=0.0)
    for overrides, synced in ((TINY_MOE, True), (TINY_DENSE, False)):
        spec = make_spec(overrides, **{"backend.transformer_engine": True})
        ctx, lay = make_context(spec), Layout.from_dict(base)
        stages = assign_stages(ctx, 1, 1)[1]
        shipped, without = estimate(ctx, lay, stages), estimate(ctx, lay, stages, unsynced)
        gpu = sum(dict(without.breakdown)[k] for k in ("matmul", "softmax", "small_kernels", "grad_accumulation"))
        share = DEFAULT_EFFICIENCY.te_sync_exposed * min(shipped.host_seconds, gpu) if synced else 0.0
        assert shipped.step_seconds - without.step_seconds == pytest.approx(share, rel=1e-9, abs=1e-12)
        assert (shipped.step_seconds > without.step_seconds) == synced
        local = with_backend(spec, transformer_engine=False)
        assert estimate_run(local, base).step_seconds == estimate(make_context(local), lay, stages, unsynced).step_seconds


@pytest.mark.evidence
def test_the_synchronisation_share_moves_the_overlap_sweep_toward_its_measurements():
    """The overlap sweep on one H100 (planned before it ran): the same host work on an MoE rank with
    the experts' GPU work swept by their width, and its dense twin. The dense twin, which does not
    synchronise, is within 5% at the longer of host and GPU time; on the MoE runs the share of the
    shorter moves every prediction toward the measured step (from 30-44% under to 12-26% under),
    and they stay under it: those steps are more serialised than the share says."""
    runs = [run for name, run in committed_gpu_runs() if name == "gpu_runs_h100x1_te_sync.json"]
    unsynced = replace(DEFAULT_EFFICIENCY, te_sync_exposed=0.0)
    assert len(runs) == 5
    for run in runs:
        spec, measured = run_spec(run), run["measured_step_seconds"]
        shipped, without = (estimate_run(spec, run["layout"], eff).step_seconds / measured - 1 for eff in (DEFAULT_EFFICIENCY, unsynced))
        if spec.model.moe is None:
            assert abs(shipped) < 0.05 and shipped == without
        else:
            assert without < shipped < 0 and shipped > -0.27
