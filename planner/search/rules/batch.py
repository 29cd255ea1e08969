"""Global batch, micro-batches and the pipeline schedule."""

from __future__ import annotations

from megacpp.planner.axes import Axis
from megacpp.planner.search.layout import Context, Layout
from megacpp.planner.search.rules import rule


@rule(
    "batch-divisible",
    axes=(Axis.DP, "micro_batch_size"),
    where="[V] megatron/core/num_microbatches_calculator.py:341",
    fails="global_batch_size=100, dp=8, micro_batch_size=1",
    passes="global_batch_size=96",
)
def batch_divisible(ctx: Context, lay: Layout) -> str | None:
    """global batch size must be divisible by micro batch size times data parallel size."""
    gbs = ctx.spec.training.global_batch_size
    if lay.dp and gbs % (lay.micro_batch_size * lay.dp):
        return (
            f"training.global_batch_size={gbs} is not divisible by micro_batch_size*dp = "
            f"{lay.micro_batch_size}*{lay.dp}; use a global batch that is a multiple of {lay.micro_batch_size * lay.dp}"
        )
    return None


@rule(
    "vpp-microbatches",
    axes=(Axis.PP, Axis.VPP, "num_microbatches"),
    where="[V] megatron/core/pipeline_parallel/schedules.py:995-1015",
    fails="pp=4, vpp=2, 6 micro-batches",
    passes="8 micro-batches",
)
def vpp_microbatches(ctx: Context, lay: Layout) -> str | None:
    """The interleaved schedule needs the number of micro-batches to be a multiple of PP (and >= PP)."""
    m = lay.num_microbatches
    if m and lay.vpp > 1 and (m < lay.pp or m % lay.pp):
        return f"vpp={lay.vpp}: {m} micro-batches per step is not a multiple of pp={lay.pp}; change global_batch_size or micro_batch_size"
    return None
