"""The runtime worker on CPU: what it builds on every rank, a forward/backward through its blocks,
the R block's scan, and each adapter.

The construction runs launch `python -m torch.distributed.run -m megacpp.runtime.worker
--construct-only` (gloo) on small pinned plans and check every rank's parameter counts against the
plan and its coordinates against the planner's rank map. One 2-rank run goes further: a forward
and backward of an A E D R stack with TP2 + SP and EP2, and the R block under TP2 + SP against a
single-process reference built from the gathered weights. All runs start together, in one fixture.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("megatron.core", reason="megatron-core is installed by `make test`")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from megatron.core import parallel_state as ps  # noqa: E402

from megacpp.planner.cost.blocks import block_params  # noqa: E402
from megacpp.planner.errors import LaunchError  # noqa: E402
from megacpp.planner.plan import Plan, build_plan  # noqa: E402
from megacpp.planner.search.layout import Layout  # noqa: E402
from megacpp.planner.search.ranks import rank_coordinates  # noqa: E402
from megacpp.planner.spec.loading import spec_from_dict  # noqa: E402
from megacpp.runtime.worker import adapters  # noqa: E402
from megacpp.runtime.worker.blocks import letter_specs  # noqa: E402
from megacpp.runtime.worker.data import SyntheticChain, microbatches  # noqa: E402
from megacpp.runtime.worker.distributed import init_process, shutdown  # noqa: E402
from megacpp.runtime.worker.job import Job, load_job  # noqa: E402
from megacpp.runtime.worker.megatron_config import select_backend, transformer_config  # noqa: E402
from megacpp.runtime.worker.recurrent import (  # noqa: E402
    RecurrentBlock,
    chunked_gated_linear_recurrence,
    sequential_gated_linear_recurrence,
)
from megacpp.runtime.worker.report import ExpertTokenCounter, _merge_expert_counts, routed_load  # noqa: E402
from megacpp.runtime.worker.run import build_rank, summary  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RUN_TIMEOUT = 240

ATTENTION = {"num_heads": 4, "num_query_groups": 2, "head_dim": 16}
MLP = {"ffn_hidden_size": 128, "gated": True}
MOE = {"num_experts": 4, "top_k": 2, "ffn_hidden_size": 32, "gated": True, "dispatcher": "alltoall"}
RECURRENT = {"num_heads": 4, "head_dim": 8}


def spec_dict(pattern: str, world: int, parallel: dict[str, Any], te: bool = False, **model: Any) -> dict[str, Any]:
    """A tiny spec on `world` GPUs with every axis pinned, so the plan has exactly one candidate."""
    pins = {"tp": 1, "pp": 1, "vpp": 1, "cp": 1, "ep": 1, "etp": 1, **parallel}
    return {
        "name": "worker-test",
        "model": {"pattern": pattern, "hidden_size": 64, "vocab_size": 250, "attention": ATTENTION, **model},
        "training": {"seq_length": 64, "global_batch_size": 8, "micro_batch_size": 1},
        "cluster": {"preset": "h200-sxm-8", "nodes": 1, "gpus_per_node": world},
        "backend": {"transformer_engine": te, "megatron": "core_v0.16"},
        "parallel": pins,
    }


CASES: dict[str, tuple[int, dict[str, Any]]] = {
    # TP2 with learned positions, LayerNorm and tied embeddings on one stage (no output weight of its own)
    "dense-tp2": (2, spec_dict("(AD)*2", 2, {"tp": 2}, mlp=MLP, position_embedding="learned", normalization="layernorm",
                               tie_embeddings=True)),
    # PP2 x VPP2 with an uneven split (5 layers in 4 chunks) and the tied embedding duplicated on the last stage
    "dense-pp2-vpp2-uneven": (2, spec_dict("(AD)*5", 2, {"pp": 2, "vpp": 2}, mlp=MLP, tie_embeddings=True)),
    # MoE over DP4 = EP4, ETP1, alltoall dispatcher (builds a CUDA side stream: the cpu_shims adapter)
    "moe-ep4": (4, spec_dict("(AE)*2", 4, {"ep": 4}, moe=MOE)),
    # hybrid with R and a shared expert; TP2 + SP needs TE norms in the spec, the worker uses the SP-norm adapter
    "hybrid-tp2-sp-ep2-pp2": (4, spec_dict("(AEDR)*2", 4, {"tp": 2, "pp": 2, "ep": 2, "sp": True}, te=True, mlp=MLP,
                                           moe={**MOE, "shared_expert_ffn_hidden_size": 48}, recurrent=RECURRENT)),
    # QK layernorm, a sliding window with every second layer full, attention sinks and linear biases under TP2
    "dense-features-tp2": (2, spec_dict("(AD)*2", 2, {"tp": 2}, mlp=MLP, linear_bias=True,
                                        attention={**ATTENTION, "qk_layernorm": True, "window_size": 16,
                                                   "window_full_every": 2, "sinks": True})),
    # biases on the router and every expert under EP2
    # with node-limited routing: each token's two experts from one of two groups
    "moe-bias-ep2": (2, spec_dict("(AE)*2", 2, {"ep": 2}, linear_bias=True,
                                  moe={**MOE, "router_num_groups": 2, "router_group_topk": 1})),
    # no A blocks under TP2: megatron still checks its (unused) head count against TP
    "recurrent-tp2-no-attention": (2, spec_dict("(RD)*2", 2, {"tp": 2}, attention=None, mlp=MLP, recurrent=RECURRENT)),
}
# forward/backward on 2 CPU ranks: the allgather dispatcher (alltoall needs CUDA copies in forward)
FORWARD = spec_dict("AEDR", 2, {"tp": 2, "ep": 2, "sp": True}, te=True, mlp=MLP,
                    moe={**MOE, "dispatcher": "allgather", "shared_expert_ffn_hidden_size": 48}, recurrent=RECURRENT)


def write_plan(path: Path, spec: dict[str, Any]) -> Path:
    plan = build_plan(spec_from_dict(spec))
    assert len(plan.candidates) == 1, [c.layout for c in plan.candidates]
    path.write_text(json.dumps(plan.to_json_dict()))
    return path


def _torchrun(world: int, *module_and_args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world), "-m", *module_and_args]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict[str, Any]]:
    """Start every construction run and the forward check at once; wait for all of them."""
    tmp = tmp_path_factory.mktemp("worker")
    procs = {}
    for name, (world, spec) in CASES.items():
        plan, report = write_plan(tmp / f"{name}.json", spec), tmp / f"{name}.run.json"
        procs[name] = (plan, report, _torchrun(world, "megacpp.runtime.worker", "--plan", str(plan), "--construct-only", "--report", str(report)))
    plan, result = write_plan(tmp / "forward.json", FORWARD), tmp / "forward.out.json"
    procs["forward"] = (plan, result, _torchrun(2, "tests.test_worker", str(plan), str(result)))
    logs = {}
    for name, (_, _, proc) in procs.items():
        try:
            logs[name] = proc.communicate(timeout=RUN_TIMEOUT)[0]
        except subprocess.TimeoutExpired:
            proc.kill()
            logs[name] = proc.communicate()[0] + f"\n(killed after {RUN_TIMEOUT} s)"
    failed = {name: logs[name][-4000:] for name, (_, _, proc) in procs.items() if proc.returncode != 0}
    assert not failed, "\n".join(f"--- {name} failed:\n{log}" for name, log in failed.items())
    return {name: {"plan": json.loads(plan.read_text()), "result": json.loads(result.read_text()), "log": logs[name]}
            for name, (plan, result, _) in procs.items()}


# --------------------------------------------------------------------------- construction


def assert_planned_params(report: dict[str, Any], cand: dict[str, Any]) -> None:
    """Every rank's instantiated (params, expert params) equal its stage's in the plan."""
    planned = {m["pp_rank"]: (m["params"], m["params_expert"]) for m in cand["memory"]["per_stage"]}
    for rank in report["ranks"]:
        assert (rank["params"], rank["params_expert"]) == planned[rank["pp"]], f"rank {rank['rank']}"


@pytest.mark.parametrize("name", CASES)
def test_every_rank_holds_the_planned_parameters(runs, name):
    report, cand = runs[name]["result"], runs[name]["plan"]["candidates"][0]
    assert len(report["ranks"]) == CASES[name][0]
    assert_planned_params(report, cand)
    assert report["params_match_plan"]
    assert "params match the plan on every rank" in runs[name]["log"]


@pytest.mark.parametrize("name", CASES)
def test_layers_are_numbered_as_the_plan_splits_them(runs, name):
    report, cand = runs[name]["result"], runs[name]["plan"]["candidates"][0]
    per_layer = 2 if name.startswith(("dense", "moe")) else 1  # GPT path: one Megatron layer per AD/AE pair
    for rank in report["ranks"]:
        stages = sorted((s for s in cand["stages"] if s["pp_rank"] == rank["pp"]), key=lambda s: s["vp_stage"])
        expected = [s["layers"][0] + i // per_layer + 1 for s in stages for i in range(len(s["blocks"]))]
        assert rank["layer_numbers"] == expected, f"rank {rank['rank']}"


@pytest.mark.parametrize("name", CASES)
def test_rank_coordinates_are_the_planners_rank_map(runs, name):
    report, cand = runs[name]["result"], runs[name]["plan"]["candidates"][0]
    lay = Layout.from_dict(cand["layout"])
    expected = rank_coordinates(lay, gpus_per_node=CASES[name][0])
    keys = ("tp", "cp", "dp", "pp", "ep", "etp", "edp")
    assert [{k: r[k] for k in keys} for r in report["ranks"]] == [{k: r[k] for k in keys} for r in expected]


MAMBA = {"num_heads": 8, "head_dim": 16, "state_dim": 16, "num_groups": 2}
MAMBA_CASES = {
    "mamba-tp1": (1, spec_dict("(AMDM)*1", 1, {}, mlp=MLP, mamba=MAMBA)),  # local modules, no TE
    "mamba-tp2-pp2-sp": (4, spec_dict("(AMEM)*2", 4, {"tp": 2, "pp": 2, "sp": True}, te=True, mlp=MLP, moe=MOE, mamba=MAMBA)),
}


@pytest.mark.parametrize("name", MAMBA_CASES)
def test_mamba_ranks_hold_the_planned_parameters(tmp_path, name):
    """megatron-core's MambaMixer needs mamba-ssm (with triton) to be built at all; where it imports,
    every rank's M-block parameters equal the plan's."""
    pytest.importorskip("mamba_ssm.ops.triton.ssd_combined", reason="M blocks need mamba-ssm and triton")
    world, spec = MAMBA_CASES[name]
    plan, report = write_plan(tmp_path / "plan.json", spec), tmp_path / "run.json"
    proc = _torchrun(world, "megacpp.runtime.worker", "--plan", str(plan), "--construct-only", "--report", str(report))
    log = proc.communicate(timeout=RUN_TIMEOUT)[0]
    assert proc.returncode == 0, log[-4000:]
    assert_planned_params(json.loads(report.read_text()), json.loads(plan.read_text())["candidates"][0])


def test_construction_report_names_the_adapters_it_used(runs):
    hybrid, dense = runs["hybrid-tp2-sp-ep2-pp2"]["result"], runs["dense-tp2"]["result"]
    assert set(hybrid["adapters"]) == {"cpu_shims", "sequence_parallel_norm", "te_general_gemm"}
    assert hybrid["backend"] == {"transformer_engine_requested": True, "transformer_engine_used": False, "fusions_used": True}
    assert dense["adapters"] == ["cpu_shims"]
    assert hybrid["schema"] == "megacpp.run/1" and hybrid["construct_only"] and hybrid["device"] == "cpu"
    assert hybrid["predicted"]["peak_gib"] and hybrid["measured_step_seconds"] is None and hybrid["losses"] == []


# --------------------------------------------------------------------------- forward on CPU


def _gathered(t: torch.Tensor, dim: int) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim=dim)


def _recurrent_reference(block: RecurrentBlock, x: torch.Tensor, tp: int) -> torch.Tensor:
    """The R block over all heads in one process, from weights gathered off the TP ranks."""
    dl, hl = block.local_dim, block.heads
    w_in = _gathered(block.in_proj.weight.detach(), 0).split([4 * dl + hl] * tp)  # rank r: [q k v g a] of its heads
    q, k, v, g, a = (torch.cat(parts) for parts in zip(*(w.split([dl] * 4 + [hl]) for w in w_in), strict=True))
    w_out = _gathered(block.out_proj.weight.detach(), 1)
    gate_weight = _gathered(block.gate_norm_weight.detach(), 0)
    s, b, _ = x.shape
    n = block.norm(x)
    heads = hl * tp

    def split_heads(w: torch.Tensor) -> torch.Tensor:
        return (n @ w.t()).reshape(s, b, heads, block.head_dim).permute(1, 2, 0, 3)

    log_decay = F.logsigmoid(n @ a.t()).permute(1, 2, 0)
    o = sequential_gated_linear_recurrence(split_heads(q) * block.head_dim**-0.5, split_heads(k), split_heads(v), log_decay)
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + 1e-6)
    o = o.permute(2, 0, 1, 3).reshape(s, b, heads * block.head_dim) * gate_weight * F.silu(n @ g.t())
    return x + o @ w_out.t()


def forward_check(plan: str, out: str) -> None:
    """One rank of the 2-rank forward check; `runs` starts it under torchrun (see the end of this file)."""
    job = load_job(plan)
    built = build_rank(job, seed=7, cuda=False)
    process, (chunk,) = built.process, built.chunks
    counter = ExpertTokenCounter([chunk], full_recompute=False)
    seq = job.spec.training.seq_length
    source = SyntheticChain(job.spec.model.vocab_size, 7, torch.device("cpu"))
    batch = next(microbatches(source, seed=7, dp_rank=ps.get_data_parallel_rank(), step=0, count=1, micro_batch_size=1, seq_length=seq))
    loss = chunk(batch["tokens"], batch["position_ids"], batch["labels"])
    loss.mean().backward()
    counter.end_step()

    block = next(m for m in chunk.modules() if isinstance(m, RecurrentBlock))
    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    x = torch.randn(seq, 2, job.spec.model.hidden_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        y = _gathered(block(x.chunk(tp)[tp_rank]), 0)  # SP: each TP rank holds a sequence shard
        reference = _recurrent_reference(block, x, tp)
    result = {
        "rank": process.rank,
        "loss_shape": list(loss.shape),
        "loss": loss.mean().item(),
        "missing_grads": [n for n, p in chunk.named_parameters() if p.grad is None],
        "expert_tokens": counter.as_lists(),
        "expert_tokens_by_microbatch": counter.by_microbatch(),
        "r_params": sum(p.numel() for p in block.parameters()),
        "r_max_error": (y - reference).abs().max().item(),
        "r_scale": reference.abs().max().item(),
    }
    results: list[Any] = [None] * process.world_size
    torch.distributed.all_gather_object(results, result)
    if process.rank == 0:
        Path(out).write_text(json.dumps(results))
    shutdown()


def test_cpu_forward_backward_through_every_block(runs):
    results = runs["forward"]["result"]
    for r in results:
        assert r["loss_shape"] == [1, 64]
        assert math.isfinite(r["loss"]) and abs(r["loss"] - math.log(250)) < 1.0  # small init: near uniform
        assert r["missing_grads"] == []
    # with SP each TP rank routes its own half of the sequence, top-2
    for r in results:
        ((layer, counts),) = r["expert_tokens"].items()
        assert layer == "2" and sum(counts) == 64 // 2 * 2  # E is the second layer of A E D R
        assert r["expert_tokens_by_microbatch"] == {layer: [[counts]]}  # one step of one micro-batch


def test_routed_load_per_stage_step_and_microbatch():
    # two ranks (dp 0 and 1) of one stage route 4 experts over EP2: experts 0-1 on EP rank 0
    infos = [
        {"tp": 0, "pp": 0, "layer_numbers": [1, 2], "expert_tokens": {1: [[[3, 1, 2, 2], [4, 4, 0, 0]]], 2: [[[1, 1, 1, 1], [2, 2, 2, 2]]]}},
        {"tp": 0, "pp": 0, "layer_numbers": [1, 2], "expert_tokens": {1: [[[1, 1, 2, 2], [0, 0, 4, 4]]], 2: [[[1, 1, 1, 1], [0, 0, 4, 4]]]}},
        {"tp": 1, "pp": 0, "layer_numbers": [1, 2], "expert_tokens": {1: [[[9, 9, 9, 9], [9, 9, 9, 9]]], 2: [[[9] * 4, [9] * 4]]}},
    ]
    merged = _merge_expert_counts(infos, sequence_parallel=False)  # the TP peer routes the same tokens: skipped
    assert merged == {1: [[[4, 2, 4, 4], [4, 4, 4, 4]]], 2: [[[2, 2, 2, 2], [2, 2, 6, 6]]]}
    (stage,) = routed_load(merged, {1: 0, 2: 0}, ep=2)
    # micro-batch 0: EP rank 0 receives 4+2+2+2 = 10 of 22; micro-batch 1: 4+4+2+2 = 12 of 32
    assert stage["pp_rank"] == 0 and stage["steps"] == [[[round(10 / 11, 4), round(12 / 11, 4)], [0.75, 1.25]]]
    # the most unbalanced layer on each rank: micro-batch 0, layer 1 gives EP rank 0 6 of 14 and
    # rank 1 8 of 14; micro-batch 1, layer 2 gives EP rank 1 12 of 16
    assert stage["heaviest_layer_steps"] == [[[1.0, round(8 / 7, 4)], [1.0, 1.5]]]
    assert _merge_expert_counts(infos, sequence_parallel=True)[1][0][0] == [13, 11, 13, 13]


def test_run_summary_names_the_heaviest_routed_load():
    layout = {"tp": 1, "pp": 1, "vpp": 1, "cp": 1, "dp": 2, "ep": 2, "etp": 1}
    report = {"layout": layout, "params_mismatch_ranks": [], "construct_only": False, "pattern": "AE", "median_step_seconds": 1.0,
              "predicted_step_seconds": 1.1, "tokens_per_second": 8192.0, "measured_peak_gib": 20.0, "predicted_peak_gib": 19.8,
              "losses": [10.9, 10.1], "routed_load": [{"pp_rank": 0, "steps": [[[0.5, 1.5]], [[1.79, 0.21], [1.0, 1.0]]]}]}
    assert summary(report).endswith("took up to 1.79x the mean routed tokens in one micro-batch (moe.imbalance bands it)")
    assert "routed" not in summary({**report, "routed_load": None})


def test_recurrent_block_under_tp_and_sp_matches_one_process(runs):
    for r in runs["forward"]["result"]:
        assert r["r_max_error"] < 1e-4 * max(1.0, r["r_scale"]), r


def test_recurrent_block_parameters_are_the_planners_formula(runs):
    job = Job(Plan.from_json_dict(runs["forward"]["plan"]), 0)
    expected = block_params(job.ctx, "R", job.layout)
    assert expected.expert == 0
    assert {r["r_params"] for r in runs["forward"]["result"]} == {expected.dense}


# --------------------------------------------------------------------------- the R scan


@pytest.mark.parametrize("length,chunk", [(100, 16), (64, 64), (5, 8), (130, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_chunked_scan_equals_the_sequential_recurrence(length, chunk, dtype):
    gen = torch.Generator().manual_seed(length)
    q, k, v = (torch.randn(2, 3, length, 8, generator=gen, dtype=dtype, requires_grad=True) for _ in range(3))
    logits = torch.randn(2, 3, length, generator=gen, dtype=dtype).mul(3).requires_grad_()
    out = chunked_gated_linear_recurrence(q, k, v, F.logsigmoid(logits), chunk)
    ref = sequential_gated_linear_recurrence(q, k, v, F.logsigmoid(logits))
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {}  # fp32: chunk sums reorder the additions
    torch.testing.assert_close(out, ref, **tol)
    if dtype == torch.float64:  # gradients through long decay chains: compare exactly, in fp64
        grads = torch.autograd.grad(out.square().sum(), (q, k, v, logits))
        ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v, logits))
        for g, r in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(g, r)


def test_chunked_scan_survives_strong_decay():
    q, k, v = (torch.randn(1, 2, 200, 16) for _ in range(3))
    log_decay = F.logsigmoid(torch.full((1, 2, 200), -40.0))
    out = chunked_gated_linear_recurrence(q, k, v, log_decay)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, sequential_gated_linear_recurrence(q, k, v, log_decay), rtol=1e-4, atol=1e-4)


def test_recurrent_block_refuses_context_parallelism():
    with pytest.raises(LaunchError, match="cannot be cut by context parallelism"):
        RecurrentBlock(SimpleNamespace(context_parallel_size=2), norm=torch.nn.RMSNorm, num_heads=4, head_dim=8, layer_number=1)


# --------------------------------------------------------------------------- adapters


def test_router_gemm_adapter_matches_torch_for_every_layout():
    a, b = torch.randn(5, 7, dtype=torch.bfloat16), torch.randn(3, 7, dtype=torch.bfloat16)
    out = adapters.torch_general_gemm(a, b, torch.float32, layout="TN")[0]
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, b.float() @ a.float().t())
    g = torch.randn(3, 5)
    torch.testing.assert_close(adapters.torch_general_gemm(a.float(), g, layout="NN")[0], g @ a.float())
    torch.testing.assert_close(adapters.torch_general_gemm(b.float(), g, layout="NT")[0], g.t() @ b.float())
    with pytest.raises(ValueError, match="layout"):
        adapters.torch_general_gemm(a, b, layout="TT")


def test_router_gemm_adapter_is_installed_only_when_missing_and_routes_correctly():
    from megatron.core.transformer.moe import moe_utils

    had = hasattr(moe_utils, "te_general_gemm")
    original = getattr(moe_utils, "te_general_gemm", None)
    try:
        if had:
            del moe_utils.te_general_gemm
        assert adapters.install_router_gemm() is True
        assert adapters.install_router_gemm() is False  # already there: left alone
        x = torch.randn(6, 8, dtype=torch.bfloat16, requires_grad=True)
        w = torch.randn(4, 8, dtype=torch.bfloat16, requires_grad=True)
        logits = moe_utils.router_gating_linear(x, w, None, torch.float32)
        assert logits.dtype == torch.float32
        torch.testing.assert_close(logits, x.float() @ w.float().t())
        logits.sum().backward()
        torch.testing.assert_close(x.grad.float(), torch.ones(6, 4) @ w.float(), rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(w.grad.float(), torch.ones(6, 4).t() @ x.float(), rtol=2e-2, atol=2e-2)
    finally:
        if had:
            moe_utils.te_general_gemm = original
        elif hasattr(moe_utils, "te_general_gemm"):
            del moe_utils.te_general_gemm


@pytest.mark.parametrize("normalization,reference", [("RMSNorm", torch.nn.RMSNorm), ("LayerNorm", torch.nn.LayerNorm)])
def test_sequence_parallel_norm_marks_its_parameters_and_matches_torch(normalization, reference):
    config = SimpleNamespace(normalization=normalization, use_cpu_initialization=True, params_dtype=torch.float32, sequence_parallel=True)
    norm = adapters.SequenceParallelNorm(config, 16, eps=1e-5)
    ref = reference(16, eps=1e-5)
    assert [n for n, _ in norm.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert all(p.sequence_parallel for p in norm.parameters())
    with torch.no_grad():
        norm.weight.uniform_()
        ref.weight.copy_(norm.weight)
    x = torch.randn(3, 2, 16)
    torch.testing.assert_close(norm(x), ref(x))


# --------------------------------------------------------------------------- clear errors


def _job(tmp_path: Path, spec: dict[str, Any]) -> Job:
    return load_job(write_plan(tmp_path / "plan.json", spec))


def test_world_size_must_match_the_plan(tmp_path, monkeypatch):
    job = _job(tmp_path, CASES["moe-ep4"][1])
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(LaunchError, match=r"world_size=4 .* torchrun started 3 processes"):
        init_process(job)
    monkeypatch.delenv("RANK")
    with pytest.raises(LaunchError, match=r"\$RANK is not set"):
        init_process(job)


def test_plan_file_and_candidate_errors(tmp_path):
    (tmp_path / "spec.json").write_text('{"model": {}}')
    with pytest.raises(LaunchError, match="not a megacpp plan"):
        load_job(tmp_path / "spec.json")
    with pytest.raises(LaunchError, match="no such plan file"):
        load_job(tmp_path / "missing.json")
    plan = write_plan(tmp_path / "plan.json", CASES["dense-pp2-vpp2-uneven"][1])
    with pytest.raises(LaunchError, match=r"--candidate 3: .* holds candidates 0\.\.0"):
        load_job(plan, 3)


def test_training_without_a_gpu_says_to_construct_only(tmp_path, capsys):
    from megacpp.runtime.worker.__main__ import main

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    plan = write_plan(tmp_path / "plan.json", CASES["dense-pp2-vpp2-uneven"][1])
    assert main(["--plan", str(plan)]) == 1
    assert "pass --construct-only" in capsys.readouterr().err


def test_m_blocks_without_mamba_ssm_name_the_package(tmp_path):
    mamba = {"num_heads": 8, "head_dim": 16, "state_dim": 16, "num_groups": 2}
    job = _job(tmp_path, spec_dict("(AM)*2", 2, {"tp": 2}, te=True, mamba=mamba))
    try:
        import mamba_ssm  # noqa: F401
    except ImportError:
        with pytest.raises(LaunchError, match="mamba-ssm"):
            letter_specs(job, select_backend(job))
    else:
        pytest.skip("mamba-ssm imports here")


def test_flex_dispatcher_without_deepep_is_an_error_not_a_fallback(tmp_path):
    from megatron.core.transformer.moe import fused_a2a

    job = _job(tmp_path, spec_dict("(AE)*2", 2, {"ep": 2}, te=True, moe={**MOE, "dispatcher": "flex"}))
    if fused_a2a.HAVE_DEEP_EP:
        pytest.skip("DeepEP imports here")
    with pytest.raises(LaunchError, match="DeepEP"):
        transformer_config(job, select_backend(job), cuda=False, construct_only=True)


def test_overlaps_the_runtime_cannot_run_are_errors_that_name_the_keys(tmp_path):
    """The plan prices TE's userbuffers and Megatron's combined 1F1B; the runtime builds neither."""
    spec = spec_dict("(AE)*2", 2, {"ep": 2}, te=True, moe={**MOE, "overlap_communication": True})
    spec["training"]["tp_comm_overlap"] = True
    job = _job(tmp_path, spec)
    with pytest.raises(LaunchError, match=r"training.tp_comm_overlap and model.moe.overlap_communication: .*--engine megatron-lm"):
        transformer_config(job, select_backend(job), cuda=False, construct_only=True)


def test_megatron_fsdp_is_an_error_that_names_the_key_and_the_engine(tmp_path):
    """The runtime trains with DDP and the distributed optimizer; the plan priced Megatron-FSDP."""
    spec = spec_dict("(AD)*2", 2, {}, mlp=MLP)
    spec["training"]["data_parallel_sharding"] = "fsdp"
    job = _job(tmp_path, spec)
    with pytest.raises(LaunchError, match=r"training.data_parallel_sharding: fsdp: .*--engine megatron-lm"):
        transformer_config(job, select_backend(job), cuda=False, construct_only=True)


def test_group_limited_routing_reaches_the_router(tmp_path):
    job = _job(tmp_path, spec_dict("(AE)*2", 2, {"ep": 2}, moe={**MOE, "router_num_groups": 2, "router_group_topk": 1}))
    config = transformer_config(job, select_backend(job), cuda=False, construct_only=True)
    assert (config.moe_router_num_groups, config.moe_router_group_topk) == (2, 1)


@pytest.mark.parametrize("vpp", [1, 2])
def test_interleaved_pipelines_send_each_direction_on_its_own(tmp_path, vpp):
    """Megatron-LM's p2p settings: batched send/recv only without interleaving. Batched at PP=2 with
    VPP, a forward and a backward transfer to the same peer share one NCCL batch and are paired by
    order, so activations arrive as gradients: on 2 x H200, (AD)*4 at PP2 x VPP2 went from loss 10.58
    to 10.44 in 8 steps with one chunk's gradient norm near 5000; at PP2 alone, 10.59 to 8.76."""
    job = _job(tmp_path, spec_dict("(AD)*4", 2, {"pp": 2, "vpp": vpp}, mlp=MLP))
    config = transformer_config(job, select_backend(job), cuda=False, construct_only=True)
    assert (config.batch_p2p_comm, config.overlap_p2p_comm) == ((True, False) if vpp == 1 else (False, True))


@pytest.mark.parametrize("distopt", [False, True])
@pytest.mark.parametrize("vpp", [1, 2])
def test_data_parallel_overlaps_as_the_rendered_launch(tmp_path, distopt, vpp):
    """DDP as Megatron-LM builds it from the render (--overlap-grad-reduce, and
    --overlap-param-gather with the distributed optimizer): gradients reduce during the backward,
    parameters gather during the next forward, aligned across interleaved chunks only."""
    from megacpp.runtime.worker.train import data_parallel_config

    spec = spec_dict("(AD)*4", 2, {"pp": 2, "vpp": vpp}, mlp=MLP)
    spec["training"]["distributed_optimizer"] = distopt
    ddp = data_parallel_config(_job(tmp_path, spec), chunks=vpp, dp_cp=1)
    assert ddp.grad_reduce_in_fp32 and ddp.overlap_grad_reduce
    assert (ddp.use_distributed_optimizer, ddp.overlap_param_gather) == (distopt, distopt)
    assert ddp.align_param_gather == (distopt and vpp > 1)
    assert ddp.bucket_size == 40_000_000


@pytest.mark.parametrize("fusions", [False, True])
@pytest.mark.parametrize("gated", [False, True])
def test_runtime_takes_the_fusions_megatron_lm_takes(tmp_path, fusions, gated):
    """The runtime's config is what Megatron-LM builds from the rendered launch: bias-SwiGLU fused
    for gated MLPs (no GELU fusion without biases), bias-dropout-add fused, rope fused only with
    TE (its kernel; a local render turns it off), and none of them with backend.fusions false."""
    spec = spec_dict("(AD)*2", 1, {}, mlp={**MLP, "gated": gated})
    spec["backend"]["fusions"] = fusions
    job = _job(tmp_path, spec)
    config = transformer_config(job, select_backend(job), cuda=False, construct_only=True)
    assert (config.bias_activation_fusion, config.bias_dropout_fusion, config.apply_rope_fusion) == (fusions and gated, fusions, False)


def test_token_file_windows_and_its_errors(tmp_path):
    import numpy as np

    from megacpp.runtime.worker.data import TokenFile

    np.save(tmp_path / "tokens.npy", np.arange(100, dtype=np.int32))
    source = TokenFile(tmp_path / "tokens.npy", vocab=100, device=torch.device("cpu"))
    (batch,) = microbatches(source, seed=0, dp_rank=0, step=0, count=1, micro_batch_size=2, seq_length=10)
    assert torch.equal(batch["labels"], batch["tokens"] + 1)  # consecutive windows of the file
    np.arange(300, dtype=np.uint16).tofile(tmp_path / "tokens.bin")
    with pytest.raises(LaunchError, match="token id 299 is outside model.vocab_size=100"):
        TokenFile(tmp_path / "tokens.bin", vocab=100, device=torch.device("cpu"))
    with pytest.raises(LaunchError, match="expected a .npy or .bin file"):
        TokenFile(tmp_path / "tokens.txt", vocab=100, device=torch.device("cpu"))


def test_synthetic_tokens_follow_one_cycle_and_differ_per_replica():
    source = SyntheticChain(50, seed=1, device=torch.device("cpu"))
    succ = {int(a): int(b) for a, b in zip(source.order, source.order.roll(-1), strict=True)}
    (batch,) = microbatches(source, seed=1, dp_rank=0, step=0, count=1, micro_batch_size=3, seq_length=20)
    tokens, labels = batch["tokens"], batch["labels"]
    assert tokens.shape == labels.shape == (3, 20)
    assert all(succ[int(t)] == int(n) for t, n in zip(tokens.flatten(), labels.flatten(), strict=True))
    (again,) = microbatches(source, seed=1, dp_rank=0, step=0, count=1, micro_batch_size=3, seq_length=20)
    (other,) = microbatches(source, seed=1, dp_rank=1, step=0, count=1, micro_batch_size=3, seq_length=20)
    assert torch.equal(again["tokens"], tokens) and not torch.equal(other["tokens"], tokens)


if __name__ == "__main__":  # a rank of the forward check: torchrun -m tests.test_worker PLAN OUT
    forward_check(*sys.argv[1:3])
