"""Expert parallelism: EP/ETP versus the number of experts and the folded expert grid."""

from __future__ import annotations

from megacpp.planner.axes import Axis
from megacpp.planner.search.layout import Context, Layout
from megacpp.planner.search.rules import divisors, options, rule


@rule(
    "ep-needs-experts",
    axes=(Axis.EP,),
    where="Megatron-LM megatron/training/arguments.py:1026 [V]; transformer_config.py (num_moe_experts must be non None)",
    applies=lambda ctx: not ctx.has_moe,
    fails="ep=2 with a pattern without E",
    passes="ep=1",
)
def ep_needs_experts(ctx: Context, lay: Layout) -> str | None:
    """Expert parallelism needs MoE layers (num_experts set)."""
    if lay.ep > 1:
        return f"ep={lay.ep} but the pattern has no E (MoE) blocks; use ep=1"
    return None


@rule(
    "ep-divides-experts",
    axes=(Axis.EP,),
    where="Megatron-LM megatron/training/arguments.py:1027-1028 [V]; megatron/core/transformer/moe/moe_layer.py:186",
    applies=lambda ctx: ctx.has_moe,
    fails="moe.num_experts=64, ep=128",
    passes="ep=64",
)
def ep_divides_experts(ctx: Context, lay: Layout) -> str | None:
    """The number of experts must be a multiple of the expert-parallel size."""
    moe = ctx.spec.model.moe
    assert moe is not None
    if moe.num_experts % lay.ep:
        return f"ep={lay.ep} does not divide moe.num_experts={moe.num_experts}; try ep in {options(divisors(moe.num_experts))}"
    return None


@rule(
    "expert-grid-divides-world",
    axes=(Axis.TP, Axis.CP, Axis.DP, Axis.PP, Axis.EP, Axis.ETP),
    where="[V] megatron/core/parallel_state.py:785-795 (checked only in initialize_model_parallel, MoE or not)",
    fails="8 GPUs, tp=2, ep=8, etp=2",
    passes="etp=1",
)
def expert_grid_divides_world(ctx: Context, lay: Layout) -> str | None:
    """MoE parallel folding: world = ETP * EP * EDP * PP, so ETP*EP must divide TP*CP*DP."""
    size = lay.etp * lay.ep * lay.pp
    if ctx.world % size:
        dense = lay.tp * lay.cp * lay.dp
        return (
            f"etp*ep*pp = {lay.etp}*{lay.ep}*{lay.pp} = {size} does not divide the world size {ctx.world}; "
            f"etp*ep must divide tp*cp*dp = {dense}"
        )
    return None


@rule(
    "flex-needs-tpxep",
    axes=(Axis.EP, Axis.ETP),
    where="[V] megatron/core/transformer/moe/token_dispatcher.py:1346",
    applies=lambda ctx: ctx.has_moe and ctx.spec.model.moe is not None and ctx.spec.model.moe.dispatcher == "flex",
    fails="moe.dispatcher=flex, ep=1, etp=1",
    passes="ep=8",
)
def flex_needs_tpxep(ctx: Context, lay: Layout) -> str | None:
    """The flex dispatcher (DeepEP / HybridEP) needs an expert group of more than one rank."""
    if lay.etp * lay.ep == 1:
        return "moe.dispatcher=flex needs etp*ep > 1; raise ep or use the alltoall dispatcher"
    return None


@rule(
    "ep-overlap-needs-ep-and-vpp",
    axes=(Axis.PP, Axis.VPP, Axis.EP),
    where="[M] megatron/core/transformer/transformer_config.py:3007-3015 ([V] 1857-1865)",
    applies=lambda ctx: ctx.has_moe and ctx.spec.model.moe is not None and ctx.spec.model.moe.overlap_communication,
    fails="moe.overlap_communication=true, ep=8, pp=2, vpp=1",
    passes="vpp=2",
)
def ep_overlap_needs_ep_and_vpp(ctx: Context, lay: Layout) -> str | None:
    """Overlapping the expert all-to-alls with compute (--overlap-moe-expert-parallel-comm) needs
    expert parallelism, and the interleaved schedule when there is a pipeline."""
    if lay.ep == 1:
        return "moe.overlap_communication needs ep > 1 (the all-to-alls it hides); raise ep or set it false"
    if lay.pp > 1 and lay.vpp == 1:
        return f"moe.overlap_communication with pp={lay.pp} needs the interleaved schedule; set vpp > 1"
    return None


@rule(
    "ep-outside-nvlink",
    axes=(Axis.EP, Axis.ETP),
    severity="warning",
    where="megatron/core/transformer/moe/README.md guidelines (EP x ETP inside the NVLink domain)",
    applies=lambda ctx: ctx.has_moe,
    fails="ep=16 on h200-sxm-8",
    passes="ep=8",
)
def ep_outside_nvlink(ctx: Context, lay: Layout) -> str | None:
    """Each E block runs two all-to-alls over the ETP*EP group; beyond the NVLink domain they use the NIC."""
    if lay.etp * lay.ep > ctx.cluster.nvlink_domain:
        return f"etp*ep = {lay.etp * lay.ep} spans more than the NVLink domain of {ctx.cluster.nvlink_domain} GPUs; expert all-to-alls cross the NIC"
    return None
