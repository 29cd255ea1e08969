"""Sequence parallel (SP) and context parallel (CP) rules."""

from __future__ import annotations

from megacpp.planner.axes import Axis
from megacpp.planner.search.layout import Context, Layout
from megacpp.planner.search.rules import rule


@rule(
    "sp-needs-tp",
    axes=(Axis.TP, Axis.SP),
    severity="warning",
    where="Megatron-LM megatron/training/arguments.py:906-913 [V] (silently disables SP)",
    applies=lambda ctx: ctx.spec.parallel.sp is True,
    fails="parallel.sp=true, tp=1",
    passes="tp=2",
)
def sp_needs_tp(ctx: Context, lay: Layout) -> str | None:
    """Megatron-LM silently turns sequence parallelism off when TP == 1."""
    if lay.sp and lay.tp == 1:
        return "sp=true with tp=1: Megatron-LM silently disables sequence parallelism"
    return None


@rule(
    "moe-tp-needs-sp",
    axes=(Axis.TP, Axis.SP),
    where="[V] megatron/core/transformer/moe/moe_layer.py:379-383 (ValueError at the first training forward)",
    applies=lambda ctx: ctx.has_moe,
    fails="pattern with E, tp=2, sp=false",
    passes="sp=true (needs Transformer Engine) or tp=1",
)
def moe_tp_needs_sp(ctx: Context, lay: Layout) -> str | None:
    """Training a MoE layer with TP > 1 raises unless sequence parallelism is on (config only warns)."""
    if lay.tp > 1 and not lay.sp:
        fix = "set parallel.sp: true" if ctx.te else "set backend.transformer_engine: true (SP needs TE norms) or tp=1"
        return f"MoE with tp={lay.tp} needs sequence parallelism, which is off; {fix}"
    return None


@rule(
    "sp-needs-te-norm",
    axes=(Axis.TP, Axis.SP),
    where="[V] megatron/core/transformer/torch_norm.py:32",
    applies=lambda ctx: not ctx.te,
    fails="sp=true, backend.transformer_engine=false",
    passes="backend.transformer_engine=true",
)
def sp_needs_te_norm(ctx: Context, lay: Layout) -> str | None:
    """Without TE, megatron-core's local spec uses a torch norm that refuses sequence parallelism."""
    if lay.sp and lay.tp > 1:
        return "sequence parallelism with the local (non-TE) spec: megatron-core's torch norm refuses it; set backend.transformer_engine: true"
    return None


@rule(
    "sp-divides-sequence",
    axes=(Axis.TP, Axis.CP, Axis.SP),
    where="[V] megatron/core/tensor_parallel/mappings.py:70,174",
    fails="seq_length=1000, cp=1, tp=16, sp",
    passes="tp=8",
)
def sp_divides_sequence(ctx: Context, lay: Layout) -> str | None:
    """SP scatters the local sequence (seq_length / CP) across TP ranks; it must divide evenly."""
    local = ctx.seq // lay.cp
    if lay.sp and lay.tp > 1 and local % lay.tp:
        return f"sp with tp={lay.tp}: local sequence seq_length/cp = {local} is not divisible by tp"
    return None


@rule(
    "cp-divides-sequence",
    axes=(Axis.CP,),
    where="Megatron-LM megatron/training/arguments.py:817-820 [V]",
    fails="seq_length=1000, cp=8",
    passes="cp=4 (1000 % 8 == 0)",
)
def cp_divides_sequence(ctx: Context, lay: Layout) -> str | None:
    """With CP > 1, seq_length must be a multiple of 2 * CP (load-balanced chunking)."""
    if lay.cp > 1 and ctx.seq % (2 * lay.cp):
        return f"cp={lay.cp}: training.seq_length={ctx.seq} is not a multiple of 2*cp={2 * lay.cp}"
    return None


@rule(
    "cp-needs-te",
    axes=(Axis.CP,),
    where="[V] megatron/core/transformer/dot_product_attention.py:57-59",
    applies=lambda ctx: "A" in ctx.letters and not ctx.te,
    fails="cp=2, backend.transformer_engine=false",
    passes="backend.transformer_engine=true",
)
def cp_needs_te(ctx: Context, lay: Layout) -> str | None:
    """Context parallelism is only supported by TEDotProductAttention; the local attention refuses it."""
    if lay.cp > 1:
        return f"cp={lay.cp} needs Transformer Engine attention; set backend.transformer_engine: true or cp=1"
    return None


@rule(
    "recurrent-no-cp",
    axes=(Axis.CP,),
    where="DESIGN.md block R: state-bearing recurrence has no state hand-off between CP ranks",
    applies=lambda ctx: "R" in ctx.letters,
    fails="pattern with R, cp=2",
    passes="cp=1",
)
def recurrent_no_cp(ctx: Context, lay: Layout) -> str | None:
    """R blocks carry recurrent state along the sequence; cutting the timeline across CP ranks breaks it."""
    if lay.cp > 1:
        return f"cp={lay.cp}: R blocks carry state along the sequence and cannot be split by CP; use cp=1"
    return None


@rule(
    "mamba-cp-heads",
    axes=(Axis.TP, Axis.CP),
    where="[V] megatron/core/ssm/mamba_context_parallel.py:99-101",
    applies=lambda ctx: "M" in ctx.letters,
    fails="mamba heads=64, tp=8, cp=16",
    passes="cp=8",
)
def mamba_cp_heads(ctx: Context, lay: Layout) -> str | None:
    """Mamba CP exchanges heads all-to-all: (nheads / tp) must be divisible by CP."""
    heads = ctx.spec.model.mamba_heads
    if lay.cp > 1 and (heads // lay.tp) % lay.cp:
        return f"cp={lay.cp}: Mamba heads per TP rank ({heads}/{lay.tp} = {heads // lay.tp}) are not divisible by cp"
    return None


@rule(
    "mamba-cp-groups",
    axes=(Axis.TP, Axis.CP),
    where="[V] megatron/core/ssm/mamba_context_parallel.py:111-124",
    applies=lambda ctx: "M" in ctx.letters,
    fails="mamba.num_groups=8, tp=2, cp=3",
    passes="cp=2 or 4",
)
def mamba_cp_groups(ctx: Context, lay: Layout) -> str | None:
    """Mamba groups per TP rank (g) and CP must nest: CP % g == 0 when g < CP, else g % CP == 0."""
    m = ctx.spec.model.mamba
    assert m is not None
    g = m.num_groups // lay.tp
    if lay.cp > 1 and g and ((g < lay.cp and lay.cp % g) or (g >= lay.cp and g % lay.cp)):
        return f"cp={lay.cp}: Mamba groups per TP rank ({m.num_groups}/{lay.tp} = {g}) and cp must divide one another"
    return None
