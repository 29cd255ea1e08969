"""Spec-wide rules: what the chosen Megatron dialect and backend can build at all."""

from __future__ import annotations

from megacpp.planner.search.layout import Context, Layout
from megacpp.planner.search.rules import rule


@rule(
    "mamba-needs-te",
    axes=(),
    severity="warning",
    where="[V] megatron/core/models/mamba/mamba_layer_specs.py:3 (imports megatron.core.extensions.transformer_engine)",
    applies=lambda ctx: "M" in ctx.letters,
    fails="pattern with M, backend.transformer_engine=false",
    passes="backend.transformer_engine=true",
)
def mamba_needs_te(ctx: Context, lay: Layout) -> str | None:
    """Megatron-LM's Mamba layer spec (mamba_stack_spec) is built from Transformer Engine modules, so
    pretrain_mamba.py cannot build M blocks without TE. megacpp's runtime builds the same MambaLayer
    and MambaMixer with megatron-core's local linears and norms (runtime/worker/blocks.py), so such
    a plan runs only through `megacpp launch --engine megacpp`."""
    if not ctx.te:
        return ("M blocks without Transformer Engine: Megatron-LM's mamba_stack_spec imports TE modules; "
                "run with `megacpp launch --engine megacpp`, or set backend.transformer_engine: true")
    return None


@rule(
    "fp8-needs-te",
    axes=(),
    where="[V] megatron/core/fp8_utils.py:24-28 (FP8 recipes exist only when HAVE_TE); fp4_utils.py:25-40 (FP4 alike)",
    applies=lambda ctx: ctx.spec.training.precision != "bf16",
    fails="training.precision=fp8 (or fp4), backend.transformer_engine=false",
    passes="training.precision=bf16",
)
def fp8_needs_te(ctx: Context, lay: Layout) -> str | None:
    """FP8 and FP4 training run through Transformer Engine's autocast; there is no such path without TE."""
    if not ctx.te:
        precision = ctx.spec.training.precision
        return f"training.precision={precision} needs Transformer Engine; set backend.transformer_engine: true or precision: bf16"
    return None


@rule(
    "mamba-fp8-in-proj-width",
    axes=(),
    where="[V] megatron/core/ssm/mamba_mixer.py:240-245",
    applies=lambda ctx: "M" in ctx.letters and ctx.spec.training.precision == "fp8",
    fails="fp8 with an in_proj width not a multiple of 16",
    passes="mamba dims whose in_proj width is a multiple of 16",
)
def mamba_fp8_width(ctx: Context, lay: Layout) -> str | None:
    """With FP8 the Mamba in_proj output width 2*d_inner + 2*ngroups*d_state + nheads must be a multiple of 16."""
    m = ctx.spec.model.mamba
    assert m is not None
    heads = ctx.spec.model.mamba_heads
    width = 2 * heads * m.head_dim + 2 * m.num_groups * m.state_dim + heads
    if width % 16:
        return f"fp8: Mamba in_proj width {width} (2*d_inner + 2*groups*state + heads) is not a multiple of 16; change mamba.num_heads or use bf16"
    return None


@rule(
    "recurrent-runtime-only",
    axes=(),
    severity="warning",
    where="[V] megatron/core/ssm/mamba_hybrid_layer_allocation.py:25-32 (symbols M * - E only)",
    applies=lambda ctx: "R" in ctx.letters and ctx.dialect == "core_v0.16",
    fails="pattern with R, backend.megatron=core_v0.16",
    passes="backend.megatron=main (R maps to G, gated delta net)",
)
def recurrent_runtime_only(ctx: Context, lay: Layout) -> str | None:
    """core_v0.16 has no recurrent layer symbol; R blocks run only through megacpp's runtime there.
    On main, R maps to Megatron's G (gated delta net)."""
    return "R blocks have no Megatron layer in core_v0.16: run with `megacpp launch --engine megacpp`, or set backend.megatron: main (R -> G)"


@rule(
    "moe-router-needs-te-on-v016",
    axes=(),
    severity="warning",
    where="[V] megatron/core/transformer/moe/moe_utils.py (te_general_gemm used by the router, defined only with TE)",
    applies=lambda ctx: ctx.has_moe and not ctx.te and ctx.dialect == "core_v0.16",
    fails="pattern with E, backend.transformer_engine=false, core_v0.16",
    passes="backend.transformer_engine=true",
)
def moe_router_te_bug(ctx: Context, lay: Layout) -> str | None:
    """A bug of megatron-core 0.16.1, not a rule: without TE the MoE router raises NameError on
    `te_general_gemm`. megacpp's runtime supplies the missing function (adapter)."""
    return "megatron-core 0.16.1 without TE: the MoE router raises NameError te_general_gemm; megacpp's runtime patches it, stock Megatron-LM needs TE"


@rule(
    "one-gating-for-mlp-and-experts",
    axes=(),
    where="[V] megatron/core/transformer/transformer_config.py gated_linear_unit (one flag, --swiglu, for dense and expert MLPs)",
    applies=lambda ctx: ctx.spec.model.mlp is not None and ctx.spec.model.moe is not None and "D" in ctx.letters and ctx.has_moe,
    fails="mlp.gated=true, moe.gated=false",
    passes="mlp.gated=true, moe.gated=true",
)
def one_gating(ctx: Context, lay: Layout) -> str | None:
    """Megatron has a single gated_linear_unit switch shared by dense MLPs and experts."""
    mlp, moe = ctx.spec.model.mlp, ctx.spec.model.moe
    assert mlp is not None and moe is not None
    if mlp.gated != moe.gated:
        return f"mlp.gated={mlp.gated} but moe.gated={moe.gated}: Megatron has one gated_linear_unit flag for both; make them equal"
    return None
