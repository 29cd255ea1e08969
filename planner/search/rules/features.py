"""Model features that constrain the backend or the layout: latent MoE and linear biases."""

from __future__ import annotations

from megacpp.planner.axes import Axis
from megacpp.planner.search.layout import Context, Layout
from megacpp.planner.search.rules import rule


@rule(
    "moe-latent-needs-te",
    axes=(),
    where="[V] megatron/core/transformer/moe/moe_layer.py:170-171 ([M] moe_layer.py:267): the latent projections are TELinear",
    applies=lambda ctx: ctx.has_moe and ctx.spec.model.moe is not None and ctx.spec.model.moe.latent_size is not None,
    fails="moe.latent_size=1024, backend.transformer_engine=false",
    passes="backend.transformer_engine=true",
)
def moe_latent_needs_te(ctx: Context, lay: Layout) -> str | None:
    """MoELayer builds the latent down- and up-projections (fc1_latent_proj, fc2_latent_proj) as
    Transformer Engine linears and asserts HAVE_TE ("TransformerEngine is required for MoE latent
    projections."); there is no local-spec path."""
    if not ctx.te:
        return ("model.moe.latent_size needs Transformer Engine: Megatron builds the latent projections as TELinear; "
                "set backend.transformer_engine: true or drop latent_size")
    return None


@rule(
    "moe-bias-needs-etp1",
    axes=(Axis.ETP,),
    where="[V] megatron/core/transformer/transformer_config.py:1588-1591 ([M] 2612-2615)",
    applies=lambda ctx: ctx.has_moe and ctx.spec.model.linear_bias,
    fails="model.linear_bias=true with E blocks, etp=2",
    passes="etp=1",
)
def moe_bias_needs_etp1(ctx: Context, lay: Layout) -> str | None:
    """With linear biases (add_bias_linear) and MoE layers, TransformerConfig asserts
    expert_tensor_parallel_size == 1 ("Bias in Moe is only supported when ETP==1")."""
    if lay.etp > 1:
        return f"etp={lay.etp} with model.linear_bias: Megatron supports expert biases only at etp=1; use etp=1"
    return None


@rule(
    "shared-expert-no-bias",
    axes=(),
    where="[V] megatron/core/transformer/moe/shared_experts.py:47-48",
    applies=lambda ctx: (ctx.has_moe and ctx.spec.model.linear_bias and ctx.spec.model.moe is not None
                         and ctx.spec.model.moe.shared_expert_ffn_hidden_size is not None),
    fails="model.linear_bias=true with moe.shared_expert_ffn_hidden_size=2048",
    passes="model.linear_bias=false",
)
def shared_expert_no_bias(ctx: Context, lay: Layout) -> str | None:
    """SharedExpertMLP asserts add_bias_linear is off ("bias is not supported in the shared experts")."""
    return ("model.linear_bias with a shared expert: Megatron's shared experts take no bias; "
            "set model.linear_bias: false or drop moe.shared_expert_ffn_hidden_size")
