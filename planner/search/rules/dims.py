"""Model dimensions versus TP and ETP: every split dimension must divide evenly."""

from __future__ import annotations

from megacpp.planner.axes import Axis
from megacpp.planner.search.layout import Context, Layout
from megacpp.planner.search.rules import divisors, options, rule


def _divides(what: str, value: int, axis: Axis, degree: int) -> str | None:
    if value % degree:
        return f"{axis}={degree} does not divide {what}={value}; try {axis} in {options(divisors(value))}"
    return None


@rule(
    "tp-divides-heads",
    axes=(Axis.TP,),
    where="[V] megatron/core/transformer/transformer_config.py:924-928",
    applies=lambda ctx: "A" in ctx.letters,
    fails="attention.num_heads=30, tp=4",
    passes="tp=2",
)
def tp_divides_heads(ctx: Context, lay: Layout) -> str | None:
    """num_attention_heads must be a multiple of tensor_model_parallel_size."""
    a = ctx.spec.model.attention
    assert a is not None
    return _divides("attention.num_heads", a.num_heads, Axis.TP, lay.tp)


@rule(
    "query-groups-vs-tp",
    axes=(Axis.TP,),
    where="[V] megatron/core/transformer/transformer_config.py:939-946; attention.py:289-303 (replication)",
    applies=lambda ctx: "A" in ctx.letters,
    fails="attention.num_query_groups=6, tp=4",
    passes="tp=2 (or 3, 6)",
)
def query_groups_vs_tp(ctx: Context, lay: Layout) -> str | None:
    """num_query_groups must be a multiple or a divisor of TP (fewer groups than TP replicates KV heads)."""
    g = ctx.spec.model.query_groups
    if g % lay.tp and lay.tp % g:
        return (
            f"tp={lay.tp} is neither a divisor nor a multiple of attention.num_query_groups={g}; "
            f"try tp in {options(divisors(g))} or a multiple of {g}"
        )
    return None


@rule(
    "tp-divides-ffn",
    axes=(Axis.TP,),
    where="[V] megatron/core/tensor_parallel/layers.py:842,1166 (divide -> ensure_divisibility, utils.py:466-468)",
    applies=lambda ctx: "D" in ctx.letters,
    fails="mlp.ffn_hidden_size=1000, tp=16",
    passes="tp=8",
)
def tp_divides_ffn(ctx: Context, lay: Layout) -> str | None:
    """The dense MLP's fc1 (ColumnParallel) and fc2 (RowParallel) split ffn_hidden_size by TP."""
    m = ctx.spec.model.mlp
    assert m is not None
    return _divides("mlp.ffn_hidden_size", m.ffn_hidden_size, Axis.TP, lay.tp)


@rule(
    "tp-divides-shared-expert-ffn",
    axes=(Axis.TP,),
    where="[V] megatron/core/tensor_parallel/layers.py:842,1166 (shared experts are TP-split MLPs)",
    applies=lambda ctx: ctx.has_moe and ctx.spec.model.moe is not None and bool(ctx.spec.model.moe.shared_expert_ffn_hidden_size),
    fails="moe.shared_expert_ffn_hidden_size=1000, tp=16",
    passes="tp=8",
)
def tp_divides_shared_ffn(ctx: Context, lay: Layout) -> str | None:
    """The shared expert is a dense MLP split by TP (not ETP)."""
    moe = ctx.spec.model.moe
    assert moe is not None and moe.shared_expert_ffn_hidden_size
    return _divides("moe.shared_expert_ffn_hidden_size", moe.shared_expert_ffn_hidden_size, Axis.TP, lay.tp)


@rule(
    "etp-divides-moe-ffn",
    axes=(Axis.ETP,),
    where="[V] megatron/core/tensor_parallel/layers.py:842,1166; moe/experts.py (expert fc1/fc2 split by ETP)",
    applies=lambda ctx: ctx.has_moe,
    fails="moe.ffn_hidden_size=1000, etp=16",
    passes="etp=8",
)
def etp_divides_moe_ffn(ctx: Context, lay: Layout) -> str | None:
    """Routed expert weights are split by the expert tensor-parallel size ETP."""
    moe = ctx.spec.model.moe
    assert moe is not None
    return _divides("moe.ffn_hidden_size", moe.ffn_hidden_size, Axis.ETP, lay.etp)


@rule(
    "tp-divides-mamba-heads",
    axes=(Axis.TP,),
    where="[V] megatron/core/ssm/mamba_mixer.py:250",
    applies=lambda ctx: "M" in ctx.letters,
    fails="mamba.num_heads=24, tp=16",
    passes="tp=8",
)
def tp_divides_mamba_heads(ctx: Context, lay: Layout) -> str | None:
    """Mamba heads are split across TP ranks: nheads % tp == 0."""
    return _divides("mamba heads", ctx.spec.model.mamba_heads, Axis.TP, lay.tp)


@rule(
    "tp-divides-mamba-groups",
    axes=(Axis.TP,),
    where="[V] megatron/core/ssm/mamba_mixer.py:258",
    applies=lambda ctx: "M" in ctx.letters,
    fails="mamba.num_groups=8, tp=16",
    passes="tp=8",
)
def tp_divides_mamba_groups(ctx: Context, lay: Layout) -> str | None:
    """Mamba B/C groups are split across TP ranks: ngroups % tp == 0 (default 8 groups: tp in {1,2,4,8})."""
    m = ctx.spec.model.mamba
    assert m is not None
    return _divides("mamba.num_groups", m.num_groups, Axis.TP, lay.tp)


@rule(
    "tp-divides-recurrent-heads",
    axes=(Axis.TP,),
    where="[M] megatron/core/transformer/transformer_config.py:1495-1510 (GDN heads % TP*CP); megacpp runtime R block",
    applies=lambda ctx: "R" in ctx.letters,
    fails="recurrent.num_heads=12, tp=8",
    passes="tp=4",
)
def tp_divides_recurrent_heads(ctx: Context, lay: Layout) -> str | None:
    """R blocks split their heads across TP ranks (Megatron's G layer on main requires the same)."""
    r = ctx.spec.model.recurrent
    assert r is not None
    return _divides("recurrent.num_heads", r.num_heads, Axis.TP, lay.tp)
