"""Clusters as a user states them: inline clusters by world shape and GPU kind, the headroom kept
below a card, and overridden numbers that drive the step time, not only the MFU."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from megacpp.planner.errors import SpecError
from megacpp.planner.plan import build_plan
from megacpp.planner.spec.clusters import PRESETS, UNKNOWN_GPU_HEADROOM, resolve_cluster
from megacpp.planner.spec.loading import spec_from_dict
from megacpp.planner.spec.models import ClusterSpec
from megacpp.planner.validation import validate_spec

# wide enough that the matmuls, not the host, decide its step on one H100 node
WIDE = {
    "name": "wide",
    "model": {"pattern": "(AD)*4", "hidden_size": 8192, "vocab_size": 32000,
              "attention": {"num_heads": 64, "num_query_groups": 8}, "mlp": {"ffn_hidden_size": 28672}},
    "training": {"seq_length": 4096, "global_batch_size": 32},
    "parallel": {"tp": 8, "pp": 1},
}


def _spec(cluster: dict, **parallel):
    return spec_from_dict({**WIDE, "cluster": cluster, "parallel": {**WIDE["parallel"], **parallel}})


def _best(cluster: dict):
    return build_plan(_spec(cluster), top=1)


def test_validate_needs_only_the_world_shape():
    result = validate_spec(_spec({"gpus_per_node": 8, "nodes": 2}))
    assert result["valid"] and result["legal_count"] > 0
    assert "memory not checked" in result["summary"] and "not ranked" in result["summary"]


def test_plan_names_what_an_inline_cluster_lacks():
    with pytest.raises(SpecError, match=r"cluster\.bf16_tflops, cluster\.intra_node_busbw_gbps, cluster\.inter_node_busbw_gbps.*cluster\.gpu"):
        build_plan(_spec({"gpus_per_node": 8, "nodes": 2, "gpu_memory_gib": 80}), top=1)
    # one GPU per node on one node uses no link: compute and memory are enough
    build_plan(_spec({"gpus_per_node": 1, "gpu_memory_gib": 80, "bf16_tflops": 500}, tp=1), top=1)


def test_an_inline_cluster_without_gpu_prices_links_as_stated_and_says_what_it_borrows():
    spec = ClusterSpec(gpus_per_node=8, nodes=2, gpu_memory_gib=80, bf16_tflops=500,
                       intra_node_busbw_gbps=123, inter_node_busbw_gbps=12)
    c = resolve_cluster(spec)
    assert c.nvlink_allreduce_gbps == c.nvlink_alltoall_gbps == 123 and c.nic_busbw_gbps == 12
    assert c.kernel_table is None and c.nvlink_pair_gbps == {} and c.gpu is None
    assert any("h100-sxm-8" in n and "cluster.gpu" in n for n in c.notes)


@pytest.mark.parametrize(("kind", "preset"), [("h100", "h100-sxm-8"), ("h200", "h200-sxm-8"), ("b200", "b200-sxm-8")])
def test_an_inline_cluster_of_a_gpu_kind_plans_as_its_preset(kind, preset):
    inline = _best({"gpu": kind, "gpus_per_node": 8})
    named = _best({"preset": preset})
    assert inline.cluster.gpu_memory_gib == named.cluster.gpu_memory_gib
    assert inline.candidates[0].time == named.candidates[0].time
    assert not [n for n in inline.notes if n.rule == "cluster-numbers"]


def test_inline_memory_keeps_the_presets_headroom():
    h200 = resolve_cluster(ClusterSpec(gpu="h200", gpus_per_node=8, gpu_memory_gib=140.4))
    assert h200.gpu_memory_gib == PRESETS["h200-sxm-8"]["gpu_memory_gib"] and h200.gpu_memory_total_gib == 140.4
    unknown = resolve_cluster(ClusterSpec(gpus_per_node=1, gpu_memory_gib=100, bf16_tflops=500))
    assert unknown.gpu_memory_gib == pytest.approx(100 * (1 - UNKNOWN_GPU_HEADROOM), abs=0.01)
    # a preset's card, restated, is planned as the preset plans it
    assert resolve_cluster(ClusterSpec(preset="h100-sxm-8", gpu_memory_gib=79.65)).gpu_memory_gib == 75.0
    with pytest.raises(SpecError, match="cluster.gpu_memory_gib: 4 GiB is the card's memory"):
        resolve_cluster(ClusterSpec(gpu="h100", gpus_per_node=8, gpu_memory_gib=4))


def test_the_plan_header_says_the_headroom(monkeypatch):
    from megacpp.runtime.cli import console

    buffer = io.StringIO()
    monkeypatch.setattr(console, "out", Console(file=buffer, width=200, highlight=False))
    console.plan_table(_best({"gpu": "h100", "gpus_per_node": 8, "gpu_memory_gib": 80}), top=1)
    assert "75.35 of 80 GiB planned per GPU, 4.65 GiB headroom" in buffer.getvalue()


def test_a_gpu_kind_contradicting_the_preset_is_refused():
    with pytest.raises(SpecError, match="cluster.gpu: 'h100' contradicts cluster.preset 'h200-sxm-8'"):
        resolve_cluster(ClusterSpec(preset="h200-sxm-8", gpu="h100"))


@pytest.mark.parametrize("preset", ["h100-sxm-8", "b200-sxm-8"])  # with and without a measured kernel table
def test_an_overridden_compute_peak_drives_the_step(preset):
    peak = PRESETS[preset]["bf16_tflops"]
    base = _best({"preset": preset}).candidates[0]
    same = _best({"preset": preset, "bf16_tflops": peak})
    assert same.candidates[0].time == base.time and not [n for n in same.notes if n.rule == "cluster-numbers"]
    half = _best({"preset": preset, "bf16_tflops": peak / 2})
    slow = half.candidates[0]
    assert slow.step_breakdown["matmul"] == pytest.approx(2 * base.step_breakdown["matmul"], rel=1e-4)
    assert slow.time.step_seconds > base.time.step_seconds
    assert slow.time.mfu == pytest.approx(2 * base.time.mfu * base.time.step_seconds / slow.time.step_seconds, rel=1e-3)
    note = next(n.message for n in half.notes if n.rule == "cluster-numbers")
    assert f"replaces {preset}'s {peak:g}" in note and "scaled by 0.5" in note


def test_an_overridden_link_rate_replaces_the_measured_pair_rates():
    c = resolve_cluster(ClusterSpec(preset="h200-sxm-8", intra_node_busbw_gbps=100))
    assert c.nvlink(("all-reduce"), 2)[0] == 100 and c.nvlink("all-to-all", 8)[0] == 100
    assert any("pair rates" in n for n in c.notes)


def test_a_hostile_gpu_kind_is_refused_before_anything_renders():
    with pytest.raises(SpecError, match=r"cluster.gpu: unknown GPU kind '\$\(touch PWNED\)'; choose one of h100"):
        resolve_cluster(ClusterSpec(gpu="$(touch PWNED)", gpus_per_node=8))
