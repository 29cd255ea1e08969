"""Process groups: torch.distributed from the torchrun environment, then megatron's parallel_state
initialized exactly as the plan's layout says."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
from megatron.core import parallel_state as ps

from megacpp.planner.errors import LaunchError
from megacpp.runtime.worker.job import Job
from megacpp.runtime.worker.megatron_config import parallel_sizes

TIMEOUT_MINUTES = 10


@dataclass(frozen=True)
class Process:
    """This process in the job: its global and node-local rank, the world size and its device."""

    rank: int
    local_rank: int
    world_size: int
    cuda: bool

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if self.cuda else torch.device("cpu")


def _env_int(name: str) -> int:
    value = os.environ.get(name)
    if value is None:
        raise LaunchError(f"${name} is not set: start the worker with torchrun, e.g. `torchrun --nproc-per-node N -m megacpp.runtime.worker --plan PLAN.json`")
    try:
        return int(value)
    except ValueError:
        raise LaunchError(f"${name}={value!r} is not an integer") from None


def init_process(job: Job) -> Process:
    """Join the job's process group: nccl when CUDA is available, gloo otherwise."""
    rank, world, local = _env_int("RANK"), _env_int("WORLD_SIZE"), int(os.environ.get("LOCAL_RANK", "0"))
    if world != job.world_size:
        lay, cluster = job.layout, job.plan.cluster
        raise LaunchError(
            f"the plan is for world_size={job.world_size} ({cluster.nodes} x {cluster.gpus_per_node} GPUs: "
            f"tp={lay.tp} pp={lay.pp} cp={lay.cp} dp={lay.dp}) but torchrun started {world} processes; "
            f"start {job.world_size} processes or re-plan with `--nodes`/`--set cluster.gpus_per_node=...`"
        )
    cuda = torch.cuda.is_available()
    if cuda:
        if local >= torch.cuda.device_count():
            raise LaunchError(f"LOCAL_RANK={local} but only {torch.cuda.device_count()} GPUs are visible")
        torch.cuda.set_device(local)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            backend="nccl" if cuda else "gloo", rank=rank, world_size=world, timeout=timedelta(minutes=TIMEOUT_MINUTES)
        )
    return Process(rank=rank, local_rank=local, world_size=world, cuda=cuda)


def init_model_parallel(job: Job, process: Process) -> None:
    """megatron-core process groups for the plan's tp, pp, vpp, cp, ep and etp (order tp-cp-ep-dp-pp)."""
    lay = job.layout
    ps.initialize_model_parallel(
        **parallel_sizes(lay),
        distributed_timeout_minutes=TIMEOUT_MINUTES,
        # With gloo as the default backend the extra gloo groups would only duplicate it.
        create_gloo_process_groups=process.cuda,
    )
    dp = ps.get_data_parallel_world_size()
    if dp != lay.dp:
        raise LaunchError(f"megatron formed dp={dp} but the plan says dp={lay.dp}; re-create the plan")


def coordinates(rank: int) -> dict[str, int]:
    """This rank's coordinate on every axis, as megatron's parallel_state assigned it."""
    return {
        "rank": rank,
        "tp": ps.get_tensor_model_parallel_rank(),
        "cp": ps.get_context_parallel_rank(),
        "dp": ps.get_data_parallel_rank(with_context_parallel=False),
        "pp": ps.get_pipeline_model_parallel_rank(),
        "ep": ps.get_expert_model_parallel_rank(),
        "etp": ps.get_expert_tensor_parallel_rank(),
        "edp": ps.get_expert_data_parallel_rank(),
    }


def shutdown() -> None:
    """Leave the process groups cleanly."""
    ps.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
