"""Data-parallel sharding rules: what Megatron-FSDP (training.data_parallel_sharding: fsdp) asks of a layout.

Megatron-LM's checks of --use-megatron-fsdp (megatron/training/arguments.py:671-703 in core_v0.16.1,
1118-1192 on main): the fsdp_dtensor checkpoint format and CUDA_DEVICE_MAX_CONNECTIONS other than 1,
which megacpp's render sets (planner/megatron/args.py); the distributed optimizer, which the spec
requires (v1 of Megatron-FSDP turns it on, main:1124-1135); Adam or SGD; no hybrid context
parallelism, no Muon. Pipeline, tensor, context and expert parallelism combine with it (the
FSDP mesh spans DP x CP, the expert mesh EDP; megatron/core/distributed/fsdp/src/README.md).
"""

from __future__ import annotations

from megacpp.planner.axes import Axis
from megacpp.planner.search.layout import Context, Layout
from megacpp.planner.search.rules import rule


@rule(
    "fsdp-tp-cp-before-blackwell",
    axes=(Axis.TP, Axis.CP),
    severity="warning",
    where="[V] megatron/training/arguments.py:925-938 (warning), 687-688 (FSDP asserts CUDA_DEVICE_MAX_CONNECTIONS != 1)",
    applies=lambda ctx: ctx.spec.training.data_parallel_sharding == "fsdp" and ctx.cluster.compute_capability < 100,
    fails="data_parallel_sharding=fsdp, tp=2 on h100-sxm-8",
    passes="tp=1 and cp=1, or a Blackwell cluster",
)
def fsdp_tp_cp_before_blackwell(ctx: Context, lay: Layout) -> str | None:
    """Before Blackwell, tensor and context parallelism want CUDA_DEVICE_MAX_CONNECTIONS=1 (their
    communication kernels must launch in issue order to overlap), while Megatron-FSDP asserts it is
    not 1. Megatron-LM warns and runs: the launch leaves the variable unset."""
    if lay.tp > 1 or lay.cp > 1:
        return (f"tp={lay.tp} cp={lay.cp} with Megatron-FSDP before Blackwell: Megatron warns that TP/CP want "
                "CUDA_DEVICE_MAX_CONNECTIONS=1, which FSDP forbids, so their overlap may suffer; "
                "prefer tp=1, cp=1 with fsdp")
    return None
