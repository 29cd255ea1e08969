"""Pipeline rules: stage counts, virtual stages and pinned `|` cuts, per Megatron dialect."""

from __future__ import annotations

from megacpp.planner.axes import Axis
from megacpp.planner.search.layout import Context, Layout
from megacpp.planner.search.rules import divisors, options, rule
from megacpp.planner.spec.pipeline_layout import mtp_stage, stage_layers


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
    """Every pipeline (virtual) stage must own at least one layer, where the embedding and the loss
    count as one each under parallel.account_for_embedding / account_for_loss. A pipeline_layout
    string may leave stages empty (pipeline-layout-stages checks it instead)."""
    pins = ctx.spec.parallel
    if pins.pipeline_layout is not None:
        return None
    stages, units = lay.pp * lay.vpp, ctx.num_layers + pins.account_for_embedding + pins.account_for_loss
    if stages > units:
        counted = " (embedding/loss counted)" if units > ctx.num_layers else ""
        return f"pp*vpp = {stages} stages but the model has only {units} Megatron layers{counted}; lower pp or vpp"
    return None


def _accounted(ctx: Context) -> bool:
    pins = ctx.spec.parallel
    return pins.account_for_embedding or pins.account_for_loss


@rule(
    "account-split-divides",
    axes=(Axis.PP, Axis.VPP),
    where="[V] megatron/core/transformer/transformer_config.py:1435-1478; megatron/training/arguments.py:559-571",
    applies=_accounted,
    fails="126 layers with account_for_embedding and account_for_loss (128 units), pp=12",
    passes="pp=16 with vpp 1, 2, 4 or 8 (128 = 126 + embedding + loss)",
)
def account_split_divides(ctx: Context, lay: Layout) -> str | None:
    """With the embedding and/or the loss counted as a layer, Megatron splits L + emb + loss units
    evenly: PP must divide them, and VPP the units per pipeline rank."""
    pins = ctx.spec.parallel
    units = ctx.num_layers + pins.account_for_embedding + pins.account_for_loss
    if units % lay.pp:
        return (f"{units} layers with the embedding/loss counted are not divisible by pp={lay.pp}; "
                f"try pp in {options(divisors(units))}")
    if (units // lay.pp) % lay.vpp:
        return (f"{units // lay.pp} layers per pipeline rank (embedding/loss counted) are not divisible by "
                f"vpp={lay.vpp}; try vpp in {options(divisors(units // lay.pp))}")
    return None


@rule(
    "pipeline-layout-stages",
    axes=(Axis.PP, Axis.VPP),
    where="[V] megatron/training/arguments.py:516-526 (layout stages % PP); "
          "megatron/core/transformer/transformer_config.py:1340-1350 (VPP from the layout)",
    applies=lambda ctx: ctx.spec.parallel.pipeline_layout is not None,
    fails="a pipeline_layout of 32 stages with pp=6",
    passes="pp=16 (vpp=2), pp=8 (vpp=4) or pp=32",
)
def pipeline_layout_stages(ctx: Context, lay: Layout) -> str | None:
    """A pipeline layout string names every (virtual) stage: its stage count must be pp x vpp."""
    stages = len(stage_layers(ctx.spec.parallel.pipeline_layout or ""))
    if stages != lay.pp * lay.vpp:
        return (f"parallel.pipeline_layout has {stages} stages but pp*vpp = {lay.pp}*{lay.vpp} = {lay.pp * lay.vpp}; "
                f"pick pp in {options(divisors(stages))} with vpp = {stages}/pp")
    return None


@rule(
    "pipeline-layout-mtp",
    axes=(Axis.PP, Axis.VPP),
    where="[V] megatron/core/transformer/pipeline_parallel_layer_layout.py:115-132 (MTP only in a rank's last "
          "virtual stage, not on the first pp rank); multi_token_prediction.py MultiTokenPredictionBlock "
          "(asserts is_vp_last_stage)",
    applies=lambda ctx: ctx.spec.parallel.pipeline_layout is not None
    and mtp_stage(ctx.spec.parallel.pipeline_layout) is not None,
    fails="layout Et*3|(tt|)*29m|L (m in stage 30) with pp=8, vpp=4; Et*3|t*3|m|L with pp=2, vpp=2 (rank 0)",
    passes="pp=16, vpp=2 (stage 30 is rank 14's last virtual stage)",
)
def pipeline_layout_mtp(ctx: Context, lay: Layout) -> str | None:
    """Megatron builds the MTP layers only in the last virtual stage of a pipeline rank: the layout's
    chunk k that holds `m` sits on pp_rank k % pp as virtual stage k // pp, which must be vpp - 1.
    Nor on the first pp rank when there are others: its layout check says so, checks it only for the
    other virtual stages, and megatron-core 0.16.1 then hangs at model build (the embedding copy's
    all-reduce runs twice on rank 0; tests/test_megatron_parity.py saw the gloo timeout)."""
    k = mtp_stage(ctx.spec.parallel.pipeline_layout or "")
    assert k is not None
    where = f"parallel.pipeline_layout puts the MTP layers (m) in stage {k}, virtual stage {k // lay.pp} of pp_rank {k % lay.pp}"
    if k // lay.pp != lay.vpp - 1:
        return (f"{where}, but Megatron builds them only in a rank's last virtual stage ({lay.vpp - 1}); "
                f"move m to one of the last {lay.pp} stages")
    if lay.pp > 1 and k % lay.pp == 0:
        return f"{where}, but Megatron does not place them on the first pipeline rank; move m to a later rank's stage"
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
