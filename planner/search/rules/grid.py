"""World-size equations and NVLink placement of the dense grid (TP x CP x DP x PP)."""

from __future__ import annotations

from megacpp.planner.axes import Axis
from megacpp.planner.search.layout import Context, Layout
from megacpp.planner.search.rules import divisors, options, rule


@rule(
    "model-parallel-divides-world",
    axes=(Axis.TP, Axis.CP, Axis.PP, Axis.DP),
    where="[V] megatron/core/parallel_state.py:739-743; arguments.py:315-328",
    fails="64 GPUs with tp=3",
    passes="tp=2",
)
def model_parallel_divides_world(ctx: Context, lay: Layout) -> str | None:
    """world = TP * CP * DP * PP: the model-parallel size TP * CP * PP must divide the world size."""
    size = lay.tp * lay.cp * lay.pp
    if ctx.world % size:
        return (
            f"tp*cp*pp = {lay.tp}*{lay.cp}*{lay.pp} = {size} does not divide the world size {ctx.world}; "
            f"choose tp*cp*pp in {options(divisors(ctx.world))}"
        )
    return None


@rule(
    "dp-pin-matches-world",
    axes=(Axis.TP, Axis.CP, Axis.PP, Axis.DP),
    where="[V] megatron/core/parallel_state.py:739-743 (DP is derived: world / (TP*CP*PP))",
    applies=lambda ctx: ctx.spec.parallel.dp is not None,
    fails="parallel.dp=4 with tp=2 pp=2 on 64 GPUs",
    passes="parallel.dp=16",
)
def dp_pin_matches_world(ctx: Context, lay: Layout) -> str | None:
    """Megatron derives DP = world / (TP*CP*PP); a pinned dp must equal it."""
    pin = ctx.spec.parallel.dp
    size = lay.tp * lay.cp * lay.pp
    if ctx.world % size == 0 and ctx.world // size != pin:
        return (
            f"parallel.dp={pin} but world {ctx.world} / (tp*cp*pp = {size}) = {ctx.world // size}; "
            f"drop parallel.dp or change the cluster size"
        )
    return None


@rule(
    "tp-outside-nvlink",
    axes=(Axis.TP,),
    severity="warning",
    where="megatron/core/transformer/moe/README.md guidelines (keep TP within the NVLink domain)",
    fails="tp=16 on h200-sxm-8",
    passes="tp=8",
)
def tp_outside_nvlink(ctx: Context, lay: Layout) -> str | None:
    """TP all-reduces run on every layer; a TP group larger than the NVLink domain runs them over the NIC."""
    if lay.tp > ctx.cluster.nvlink_domain:
        return f"tp={lay.tp} spans more than the NVLink domain of {ctx.cluster.nvlink_domain} GPUs; TP collectives cross the NIC"
    return None


@rule(
    "vpp-needs-pp",
    axes=(Axis.PP, Axis.VPP),
    where="[V] megatron/core/parallel_state.py:745-749",
    fails="vpp=2 with pp=1",
    passes="pp=2",
)
def vpp_needs_pp(ctx: Context, lay: Layout) -> str | None:
    """The interleaved (virtual pipeline) schedule needs pipeline-model-parallel size > 1."""
    if lay.vpp > 1 and lay.pp == 1:
        return f"vpp={lay.vpp} needs pp > 1 (interleaved schedule); set vpp=1 or pp >= 2"
    return None
