"""The worker's main sequence: plan -> process groups -> this rank's chunks -> construct or train -> report."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
from megatron.core.transformer.transformer_config import TransformerConfig

from megacpp.planner.errors import LaunchError
from megacpp.planner.spec.schedule import run_schedule
from megacpp.runtime.worker.adapters import install_cpu_shims, install_router_gemm
from megacpp.runtime.worker.distributed import (
    Process,
    coordinates,
    init_model_parallel,
    init_process,
    shutdown,
)
from megacpp.runtime.worker.job import Job, load_job
from megacpp.runtime.worker.megatron_config import Backend, select_backend, transformer_config
from megacpp.runtime.worker.model import build_chunks, count_params
from megacpp.runtime.worker.report import ExpertTokenCounter, build_report, gather, rank_info, write_report
from megacpp.runtime.worker.train import TrainResult, train


@dataclass(frozen=True)
class Options:
    """The worker's command line (see __main__.py)."""

    plan: str
    candidate: int = 0
    steps: int = 20
    warmup: int = 3
    report: str | None = None
    construct_only: bool = False
    profile: bool = False
    memory_peak: bool = False
    trace: str | None = None  # with profile: this rank's profiled step as a Chrome trace in this folder
    tokens: str | None = None
    seed: int = 1234


def _seed(seed: int, cuda: bool) -> None:
    """Megatron-LM initialize._set_random_seed: a different seed per pipeline stage, and the
    model-parallel CUDA RNG tracker on GPU (on CPU the shimmed tracker stands in)."""
    seed = seed + 100 * ps.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if cuda:
        model_parallel_cuda_manual_seed(seed)


@dataclass(frozen=True)
class Rank:
    """This process's part of a plan, built: process groups, module family, config, model chunks,
    and the adapters installed on the way."""

    process: Process
    backend: Backend
    config: TransformerConfig
    chunks: list[torch.nn.Module]
    adapters: list[str]


def build_rank(job: Job, *, seed: int, cuda: bool, construct_only: bool = False, bf16: bool | None = None) -> Rank:
    """Process groups, then the seed, then this rank's chunks (Megatron-LM's initialize_megatron,
    _set_random_seed, get_model), with the adapters this host needs. `bf16` overrides the config's
    mixed precision (bf16 on CUDA): modules read it when they are built."""
    process = init_process(job)
    adapters = ["cpu_shims"] if install_cpu_shims() else []
    init_model_parallel(job, process)
    _seed(seed, cuda)
    backend = select_backend(job)
    adapters += backend.adapters
    if "E" in job.ctx.letters and install_router_gemm():
        adapters.append("te_general_gemm")
    config = transformer_config(job, backend, cuda=cuda, construct_only=construct_only)
    if bf16 is not None:
        config.bf16 = bf16
    return Rank(process, backend, config, build_chunks(job, config, backend), adapters)


def run(opts: Options) -> dict | None:
    """Run one worker process; returns the report on rank 0 (None elsewhere)."""
    job = load_job(opts.plan, opts.candidate)
    if not opts.construct_only:
        run_schedule(job.spec.training, opts.warmup + opts.steps)  # a schedule that cannot run fails before any GPU work
    cuda = torch.cuda.is_available()
    if not opts.construct_only and not cuda:
        raise LaunchError("training needs CUDA GPUs and none is visible; on a CPU-only host pass --construct-only")
    rank = build_rank(job, seed=opts.seed, cuda=cuda, construct_only=opts.construct_only)
    process, backend, config, chunks, adapters = rank.process, rank.backend, rank.config, rank.chunks, rank.adapters
    params, params_expert = count_params(chunks)
    layer_numbers = [layer.layer_number for chunk in chunks for layer in chunk.layers]
    counter = ExpertTokenCounter(chunks, config.recompute_granularity == "full") if "E" in job.ctx.letters else None
    result = TrainResult()
    if not opts.construct_only:
        result = train(job, chunks, config, steps=opts.steps, warmup=opts.warmup, seed=opts.seed, tokens=opts.tokens,
                       profile=opts.profile, memory_peak=opts.memory_peak, on_step_end=counter.end_step if counter else None,
                       trace=Path(opts.trace) / f"trace-rank{process.rank}.json.gz" if opts.trace else None)
    info = rank_info(coordinates(process.rank), params, params_expert, layer_numbers, cuda, counter, result)
    infos = gather(info)
    report = None
    if process.rank == 0:
        backend_info = {"transformer_engine_requested": backend.te_requested, "transformer_engine_used": backend.use_te,
                        "fusions_used": job.spec.backend.fusions}
        report = build_report(job, infos, steps=opts.steps, warmup=opts.warmup, construct_only=opts.construct_only,
                              adapters=adapters, backend=backend_info, cuda=cuda)
        if opts.report:
            write_report(report, opts.report)
    shutdown()
    return report


def summary(report: dict) -> str:
    """One line for the console: the layout, parameter agreement with the plan, and the speed."""
    lay = report["layout"]
    mismatched = report["params_mismatch_ranks"]
    shape = f"tp{lay['tp']} pp{lay['pp']} vpp{lay['vpp']} cp{lay['cp']} dp{lay['dp']} ep{lay['ep']} etp{lay['etp']}"
    params = "params match the plan on every rank" if not mismatched else f"params differ from the plan on ranks {mismatched}"
    if report["construct_only"]:
        return f"built {report['pattern']} as {shape}: {params}"
    return (f"trained {report['pattern']} as {shape}: {params}; median step {report['median_step_seconds']:.4f}s "
            f"(planned {report['predicted_step_seconds']:.4f}s), {report['tokens_per_second']:.0f} tokens/s, "
            f"peak {report['measured_peak_gib']:.2f} GiB (planned {report['predicted_peak_gib']:.2f}), "
            f"loss {report['losses'][0]:.3f} -> {report['losses'][-1]:.3f}{_routing(report)}")


def _routing(report: dict) -> str:
    """The heaviest routed load any expert-parallel rank took in one micro-batch, if it routed."""
    loads = [x for stage in report.get("routed_load") or [] for step in stage["steps"] for mb in step for x in mb]
    if report["layout"]["ep"] < 2 or not loads:
        return ""
    return f"; busiest expert-parallel rank took up to {max(loads):.2f}x the mean routed tokens in one micro-batch (moe.imbalance bands it)"
