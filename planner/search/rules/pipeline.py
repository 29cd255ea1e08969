"""Pipeline rules: stage counts, virtual stages and pinned `|` cuts, per Megatron dialect."""

from __future__ import annotations

from megacpp.planner.axes import Axis
from megacpp.planner.search.layout import Context, Layout
from megacpp.planner.search.rules import rule


@rule(
    "hybrid-no-vpp",
    axes=(Axis.VPP,),
    where="[V] megatron/core/ssm/mamba_block.py:172-176",
    applies=lambda ctx: not ctx.plain_transformer and ctx.dialect == "core_v0.16",
    fails="hybrid pattern, core_v0.16, vpp=2",
    passes="vpp=1, or backend.megatron=main with `|` segments",
)
def hybrid_no_vpp(ctx: Context, lay: Layout) -> str | None:
    """core_v0.16's Mamba hybrid stack does not support virtual/interleaved pipeline parallelism."""
    if lay.vpp > 1:
        return f"vpp={lay.vpp}: core_v0.16's hybrid (Mamba) stack has no interleaved pipeline; use vpp=1 or backend.megatron: main"
    return None


@rule(
    "stages-exceed-layers",
    axes=(Axis.PP, Axis.VPP),
    where="[V] megatron/core/transformer/transformer_block.py:76-203 (get_num_layers_to_build); mamba_block.py:183-220",
    fails="8 layers with pp=4, vpp=4",
    passes="vpp=2",
)
def stages_exceed_layers(ctx: Context, lay: Layout) -> str | None:
    """Every pipeline (virtual) stage must own at least one layer."""
    stages = lay.pp * lay.vpp
    if stages > ctx.num_layers:
        return f"pp*vpp = {stages} stages but the model has only {ctx.num_layers} Megatron layers; lower pp or vpp"
    return None


@rule(
    "pipe-cuts-match-stages",
    axes=(Axis.PP, Axis.VPP),
    where="[M] Megatron-LM megatron/training/arguments.py:849-866; [V] arguments.py:516-526 (pipeline layout stages % PP)",
    applies=lambda ctx: bool(ctx.pattern.cuts),
    fails="pattern with 3 `|` segments, pp=2",
    passes="pp=3, or 4 segments with pp=2 (vpp=2)",
)
def pipe_cuts_match_stages(ctx: Context, lay: Layout) -> str | None:
    """A pattern with `|` pins its stages: the number of segments must equal pp * vpp."""
    segments = len(ctx.pattern.cuts) + 1
    if segments != lay.pp * lay.vpp:
        return (
            f"the pattern's `|` cuts make {segments} pipeline segments but pp*vpp = {lay.pp}*{lay.vpp} = "
            f"{lay.pp * lay.vpp}; pick pp dividing {segments} with vpp = {segments}/pp"
        )
    return None


@rule(
    "pipe-cuts-expressible",
    axes=(Axis.PP, Axis.VPP),
    where="[V] megatron/core/ssm/mamba_hybrid_layer_allocation.py:25-32 (no `|`); mamba_block.py:183-220 (even or first/last split)",
    applies=lambda ctx: bool(ctx.pattern.cuts) and not ctx.plain_transformer and ctx.dialect == "core_v0.16",
    fails="hybrid `AM|AMAM|AM` with 3 stages of lengths 2,4,2 on core_v0.16 (expressible), `A|AM|AMM` (not)",
    passes="cuts whose middle stages all have the same length, or backend.megatron=main",
)
def pipe_cuts_expressible(ctx: Context, lay: Layout) -> str | None:
    """core_v0.16 hybrid stacks split layers evenly, or with custom first/last stage sizes and equal
    middle stages; pinned cuts must be one of those splits."""
    lengths = [len(s) for s in ctx.pattern.segments]
    middle = lengths[1:-1]
    if len(set(middle)) > 1:
        return (
            f"core_v0.16 hybrid stacks cannot express stage sizes {lengths}: middle stages must be equal "
            "(only the first and last may differ); move the `|` cuts or set backend.megatron: main"
        )
    return None
