"""Rules of multi-latent attention (model.attention.mla) and multi-token prediction
(model.mtp_num_layers)."""

from __future__ import annotations

from megacpp.planner.axes import Axis
from megacpp.planner.search.layout import Context, Layout
from megacpp.planner.search.rules import rule


def _latent(ctx: Context) -> bool:
    return ctx.spec.model.latent is not None and "A" in ctx.letters


def _mtp(ctx: Context) -> bool:
    return ctx.spec.model.mtp_num_layers > 0


@rule(
    "mla-needs-gpt-stack",
    axes=(),
    where="[V] megatron/core/models/mamba/mamba_layer_specs.py (the hybrid stack's attention is SelfAttention); "
          "MLA's hybrid symbol `+` exists only from core_v0.19.0",
    applies=lambda ctx: _latent(ctx) and not ctx.plain_transformer,
    fails="pattern AMAM with attention.mla",
    passes="an AD/AE pattern, or attention without mla",
)
def mla_needs_gpt_stack(ctx: Context, lay: Layout) -> str | None:
    """Megatron builds multi-latent attention only in its GPT stack (--multi-latent-attention picks
    MLASelfAttention in gpt_layer_specs.py); core_v0.16's hybrid stack has no MLA layer, and main's
    `+` symbol is newer than the dialects megacpp renders."""
    return ("attention.mla needs a plain AD/AE pattern: Megatron's hybrid stack builds grouped-query attention "
            "only; use an AD/AE pattern or drop attention.mla")


@rule(
    "mla-needs-te",
    axes=(),
    where="[V] megatron/core/transformer/multi_latent_attention.py:155-165 (core attention built with k_channels, "
          "v_channels); dot_product_attention.py:42-52 (the local DotProductAttention takes neither)",
    applies=lambda ctx: _latent(ctx) and not ctx.te,
    fails="attention.mla with backend.transformer_engine=false",
    passes="backend.transformer_engine=true",
)
def mla_needs_te(ctx: Context, lay: Layout) -> str | None:
    """Multi-latent attention gives its core attention separate key and value widths; only Transformer
    Engine's TEDotProductAttention accepts them, and megatron-core 0.16.1's local spec fails at model
    build (TypeError, seen on CPU by tests/test_megatron_parity.py)."""
    return ("attention.mla needs Transformer Engine: megatron-core's local core attention has no separate key and "
            "value widths; set backend.transformer_engine: true")


@rule(
    "mtp-needs-gpt-stack",
    axes=(),
    where="[V] megatron/core/models/mamba/mamba_model.py (no MTP block); [M] --hybrid-layer-pattern `/` parts "
          "(arguments.py:864-880; hybrid_layer_allocation.py parse_hybrid_pattern)",
    applies=lambda ctx: _mtp(ctx) and not ctx.plain_transformer and ctx.dialect == "core_v0.16",
    fails="pattern AEME with model.mtp_num_layers=1, mtp_pattern AE, backend.megatron=core_v0.16",
    passes="an AD/AE pattern, or backend.megatron=main (the MTP layers as `/` parts of the hybrid pattern)",
)
def mtp_needs_gpt_stack(ctx: Context, lay: Layout) -> str | None:
    """On core_v0.16 Megatron builds MTP layers in GPTModel only (a copy of the last decoder layer,
    gpt_builders.py); its MambaModel has none. main's hybrid stack builds them from the `/` parts of
    --hybrid-layer-pattern, which megacpp renders from model.mtp_pattern."""
    return ("model.mtp_num_layers on a hybrid pattern: megatron-core 0.16's hybrid (Mamba) model has no MTP layers; "
            "set backend.megatron: main, or mtp_num_layers: 0")


@rule(
    "mtp-shared-weights-needs-main",
    axes=(),
    where="[M] megatron/core/transformer/multi_token_prediction.py MultiTokenPredictionBlock._build_layers "
          "(mtp_use_repeated_layer); core_v0.16's parser has no --mtp-use-repeated-layer",
    applies=lambda ctx: _mtp(ctx) and ctx.spec.model.mtp_shared_weights and ctx.dialect == "core_v0.16",
    fails="model.mtp_shared_weights=true with backend.megatron=core_v0.16",
    passes="backend.megatron=main",
)
def mtp_shared_weights_needs_main(ctx: Context, lay: Layout) -> str | None:
    """One MTP layer applied at every depth (--mtp-use-repeated-layer) is newer than megatron-core 0.16."""
    return ("model.mtp_shared_weights: megatron-core 0.16 builds one MTP layer per depth; set backend.megatron: main "
            "or mtp_shared_weights: false")


@rule(
    "mtp-needs-rope-or-none",
    axes=(),
    where="[V] Megatron-LM megatron/training/arguments.py:1229-1234",
    applies=lambda ctx: _mtp(ctx) and ctx.spec.model.position_embedding == "learned",
    fails="model.mtp_num_layers=1, position_embedding=learned",
    passes="position_embedding=rope",
)
def mtp_needs_rope_or_none(ctx: Context, lay: Layout) -> str | None:
    """Multi-token prediction supports rotary or no position embeddings, not learned absolute ones."""
    return ("model.mtp_num_layers with position_embedding=learned: Megatron's MTP supports rope or none; "
            "set position_embedding: rope or mtp_num_layers: 0")


@rule(
    "ep-overlap-mtp",
    axes=(Axis.PP,),
    where="[V] megatron/core/transformer/transformer_config.py:1889-1895",
    applies=lambda ctx: _mtp(ctx) and ctx.spec.model.moe is not None and ctx.spec.model.moe.overlap_communication,
    fails="moe.overlap_communication=true, mtp_num_layers=1, pp=1",
    passes="pp=2 with vpp=2",
)
def ep_overlap_mtp(ctx: Context, lay: Layout) -> str | None:
    """Overlapping the expert all-to-alls allows at most one MTP layer, and with it a pipeline."""
    n = ctx.spec.model.mtp_num_layers
    if n > 1:
        return f"moe.overlap_communication allows at most one MTP layer, not mtp_num_layers={n}; lower it or set the overlap false"
    if lay.pp == 1:
        return "moe.overlap_communication with an MTP layer needs pp > 1 (Megatron asserts it); raise pp"
    return None


def runtime_missing(ctx: Context) -> list[str]:
    """The model keys a spec sets that megacpp's runtime does not build."""
    model = ctx.spec.model
    return [key for key, given in (("model.attention.mla", model.latent is not None),
                                   ("model.mtp_num_layers", model.mtp_num_layers > 0)) if given]


@rule(
    "latent-and-mtp-need-megatron-lm",
    axes=(),
    severity="warning",
    where="runtime/worker/blocks.py (the layers megacpp's runtime builds: GQA attention, no MTP block)",
    applies=lambda ctx: bool(runtime_missing(ctx)),
    fails="model.attention.mla set, launched with --engine megacpp",
    passes="launched with --engine megatron-lm",
)
def latent_and_mtp_need_megatron_lm(ctx: Context, lay: Layout) -> str | None:
    """megacpp's runtime builds its own stage modules from megatron-core's layers: grouped-query
    attention and no multi-token prediction. A spec with MLA or MTP is planned and rendered for
    Megatron-LM, and `launch --engine megacpp` refuses it rather than train another model."""
    return f"{', '.join(runtime_missing(ctx))}: Megatron-LM builds them; `megacpp launch --engine megacpp` refuses them"
