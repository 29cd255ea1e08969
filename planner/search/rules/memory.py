"""Spec-wide rules of the memory features: selective recompute modules, partial full recompute,
fine-grained activation offloading and the precision-aware optimizer."""

from __future__ import annotations

from megacpp.planner.axes import Axis
from megacpp.planner.cost.activations import fp8_recipe, offload_modules, recompute_modules
from megacpp.planner.search.layout import Context, Layout
from megacpp.planner.search.rules import rule


@rule(
    "moe-act-recompute-needs-grouped-gemm",
    axes=(),
    where="[V] megatron/core/transformer/transformer_config.py:1213-1216",
    applies=lambda ctx: "moe_act" in recompute_modules(ctx),
    fails="recompute_modules [moe_act], backend.transformer_engine=false",
    passes="backend.transformer_engine=true (experts as TE grouped GEMMs)",
)
def moe_act_needs_grouped_gemm(ctx: Context, lay: Layout) -> str | None:
    """moe_act recompute exists only in TEGroupedMLP: Megatron refuses it without
    --moe-grouped-gemm, which megacpp renders with Transformer Engine."""
    if not ctx.te:
        return ("training.recompute_modules: moe_act needs the experts' grouped GEMMs (--moe-grouped-gemm, Transformer "
                "Engine); set backend.transformer_engine: true or drop moe_act")
    return None


@rule(
    "mla-up-proj-recompute-needs-mla",
    axes=(),
    where="[V] megatron/core/transformer/transformer_config.py:1218-1222",
    applies=lambda ctx: "mla_up_proj" in recompute_modules(ctx) and ctx.spec.model.latent is None,
    fails="recompute_modules [mla_up_proj] with grouped-query attention",
    passes="model.attention.mla set, or recompute_modules [core_attn]",
)
def mla_up_proj_needs_mla(ctx: Context, lay: Layout) -> str | None:
    """mla_up_proj recomputes multi-latent attention's up projections; Megatron refuses it without
    MLA (model.attention.mla)."""
    return ("training.recompute_modules: mla_up_proj needs multi-latent attention (model.attention.mla); "
            "set attention.mla or drop mla_up_proj")


@rule(
    "fp8-delayed-recompute-modules",
    axes=(),
    where="[V] megatron/core/transformer/transformer_config.py:1241-1247",
    applies=lambda ctx: fp8_recipe(ctx) == "delayed" and bool({"moe_act", "layernorm"} & recompute_modules(ctx)),
    fails="training.precision=fp8 (fp8_recipe delayed, the default), recompute_modules [moe_act, layernorm]",
    passes="training.fp8_recipe=tensorwise, mxfp8 or blockwise (Transformer Engine 2.6+), or recompute_modules [core_attn, moe]",
)
def fp8_delayed_recompute(ctx: Context, lay: Layout) -> str | None:
    """Under FP8 with delayed scaling (training.fp8_recipe delayed, the default) Megatron refuses
    moe_act and layernorm recompute: their outputs are dropped and rebuilt, and delayed scaling's
    amax history would see the rebuilt casts twice. The other recipes scale each cast from its own
    values and allow them (with Transformer Engine 2.6 or later, transformer_config.py:1248-1252)."""
    named = sorted({"moe_act", "layernorm"} & recompute_modules(ctx))
    return (f"training.recompute_modules: {', '.join(named)} under fp8 with delayed scaling: Megatron refuses "
            "them; set training.fp8_recipe: tensorwise (or mxfp8, blockwise), or drop them")


@rule(
    "activation-offload-needs-te",
    axes=(),
    where="[V] megatron/training/arguments.py:1222-1227",
    applies=lambda ctx: bool(offload_modules(ctx)),
    fails="training.offload_modules [expert_fc1], backend.transformer_engine=false",
    passes="backend.transformer_engine=true",
)
def offload_needs_te(ctx: Context, lay: Layout) -> str | None:
    """Fine-grained activation offloading runs only with the Transformer Engine implementation."""
    if not ctx.te:
        return "training.offload_modules needs Transformer Engine (--transformer-impl transformer_engine); set backend.transformer_engine: true"
    return None


@rule(
    "offload-attn-proj-needs-core-attn",
    axes=(),
    where="[V] megatron/core/transformer/transformer_config.py:1287-1292",
    applies=lambda ctx: "attn_proj" in offload_modules(ctx),
    fails="training.offload_modules [attn_proj]",
    passes="training.offload_modules [core_attn, attn_proj]",
)
def attn_proj_needs_core_attn(ctx: Context, lay: Layout) -> str | None:
    """attn_proj's input is core attention's output, which core attention's own backward needs:
    Megatron offloads it only together with core_attn."""
    if "core_attn" not in offload_modules(ctx):
        return "training.offload_modules: attn_proj needs core_attn too (its input is core attention's output); add core_attn"
    return None


@rule(
    "offload-inside-recomputed-moe",
    axes=(),
    where="[M] megatron/core/transformer/transformer_config.py (offload_modules inside a recomputed MoE layer)",
    applies=lambda ctx: "moe" in recompute_modules(ctx) and bool({"expert_fc1", "moe_act"} & offload_modules(ctx)),
    fails="recompute_modules [moe], offload_modules [expert_fc1]",
    passes="recompute_modules [moe_act], offload_modules [expert_fc1]",
)
def offload_inside_recomputed_moe(ctx: Context, lay: Layout) -> str | None:
    """moe recompute checkpoints the whole MoE layer, so nothing inside it is kept to offload;
    Megatron-LM main refuses the pair, and core_v0.16, which does not check it, errors at run time."""
    inside = sorted({"expert_fc1", "moe_act"} & offload_modules(ctx))
    return (f"training.offload_modules {', '.join(inside)} inside a MoE layer that recompute_modules [moe] "
            "recomputes whole; drop moe from recompute_modules or those from offload_modules")


@rule(
    "offload-fraction-needs-main",
    axes=(),
    where="[M] megatron/core/transformer/transformer_config.py activation_offload_fraction (not in core_v0.16)",
    applies=lambda ctx: ctx.spec.training.activation_offload_fraction != 1.0 and ctx.dialect == "core_v0.16",
    fails="training.activation_offload_fraction=0.5, backend.megatron=core_v0.16",
    passes="backend.megatron=main",
)
def offload_fraction_needs_main(ctx: Context, lay: Layout) -> str | None:
    """core_v0.16 offloads every listed module of every layer; --activation-offload-fraction is main's."""
    return ("training.activation_offload_fraction: core_v0.16 has no --activation-offload-fraction (it offloads "
            "every layer); set backend.megatron: main or the fraction to 1")


def _offload_layers(ctx: Context) -> int:
    return ctx.spec.training.offload_layers or 0


@rule(
    "offload-layers-needs-te",
    axes=(),
    where="[V] megatron/core/transformer/transformer_block.py:303-321 (Transformer Engine's get_cpu_offload_context)",
    applies=lambda ctx: bool(_offload_layers(ctx)),
    fails="training.offload_layers=8, backend.transformer_engine=false",
    passes="backend.transformer_engine=true",
)
def offload_layers_needs_te(ctx: Context, lay: Layout) -> str | None:
    """Whole-layer CPU offloading is Transformer Engine's offload context; without TE Megatron
    asserts that CPU offloading is off."""
    if not ctx.te:
        return "training.offload_layers needs Transformer Engine's CPU offload context; set backend.transformer_engine: true"
    return None


@rule(
    "offload-layers-transformer-stack",
    axes=(),
    where="[V] megatron/core/transformer/transformer_block.py:303-321; megatron/core/ssm/mamba_block.py (no offload context)",
    applies=lambda ctx: bool(_offload_layers(ctx)) and not ctx.plain_transformer,
    fails="training.offload_layers=8 with a Mamba hybrid pattern",
    passes="a transformer pattern, or training.offload_modules",
)
def offload_layers_transformer_stack(ctx: Context, lay: Layout) -> str | None:
    """Only the transformer block builds the CPU offload context; a hybrid (Mamba) stack ignores
    --cpu-offloading-num-layers and keeps every layer's activations, which a plan would count as offloaded."""
    return ("training.offload_layers: a hybrid stack has no whole-layer CPU offloading (only TransformerBlock builds it); "
            "use training.offload_modules or drop offload_layers")


@rule(
    "offload-layers-below-num-layers",
    axes=(),
    where="[V] megatron/core/transformer/transformer_config.py:1137-1142",
    applies=lambda ctx: _offload_layers(ctx) >= ctx.num_layers,
    fails="training.offload_layers=32 with 32 layers",
    passes="training.offload_layers=16",
)
def offload_layers_below_num_layers(ctx: Context, lay: Layout) -> str | None:
    """CPU offloading takes fewer layers than the model has: Megatron refuses num_layers or more."""
    return (f"training.offload_layers={_offload_layers(ctx)}: Megatron offloads fewer layers than the model's "
            f"{ctx.num_layers}; set it to at most {ctx.num_layers - 1}")


@rule(
    "offload-layers-needs-pp1",
    axes=(Axis.PP,),
    where="[V] megatron/core/transformer/transformer_config.py:1144-1147",
    applies=lambda ctx: bool(_offload_layers(ctx)),
    fails="training.offload_layers=8, pp=2",
    passes="pp=1",
)
def offload_layers_needs_pp1(ctx: Context, lay: Layout) -> str | None:
    """Megatron has no CPU offloading under pipeline parallelism."""
    if lay.pp > 1:
        return f"pp={lay.pp} with training.offload_layers: Megatron offloads layers to the CPU only without pipeline parallelism; use pp=1"
    return None


@rule(
    "offload-layers-cuda-graphs",
    axes=(),
    where="[V] megatron/core/transformer/transformer_config.py:1722-1723; [M] allows full_iteration",
    applies=lambda ctx: bool(_offload_layers(ctx)) and ctx.spec.training.cuda_graphs != "none",
    fails="training.offload_layers=8, training.cuda_graphs=layers",
    passes="training.cuda_graphs=none (or full_iteration on backend.megatron: main)",
)
def offload_layers_cuda_graphs(ctx: Context, lay: Layout) -> str | None:
    """CPU offloading and CUDA graphs do not mix: core_v0.16 refuses any graph, main every graph
    but the whole iteration's."""
    graphs = ctx.spec.training.cuda_graphs
    if graphs == "full_iteration" and ctx.dialect != "core_v0.16":
        return None
    shown = graphs if isinstance(graphs, str) else list(graphs)
    return (f"training.cuda_graphs={shown} with training.offload_layers: Megatron captures no graph around CPU "
            "offloading (main: only full_iteration); set cuda_graphs: none")


@rule(
    "precision-aware-optimizer-needs-te",
    axes=(),
    where="[V] megatron/core/optimizer/optimizer_config.py:386-412 (TE's FusedAdam)",
    applies=lambda ctx: ctx.spec.training.optimizer.precision_aware,
    fails="training.optimizer.exp_avg_dtype=bf16, backend.transformer_engine=false",
    passes="backend.transformer_engine=true",
)
def precision_aware_needs_te(ctx: Context, lay: Layout) -> str | None:
    """Optimizer state in dtypes other than fp32 is Transformer Engine's FusedAdam (the
    precision-aware optimizer); Megatron has no other optimizer that holds it."""
    if not ctx.te:
        return "training.optimizer dtypes other than fp32 need Transformer Engine's FusedAdam; set backend.transformer_engine: true"
    return None


@rule(
    "full-recompute-ignored-by-mamba-stack",
    axes=(),
    severity="warning",
    where="[V] megatron/core/ssm/mamba_block.py MambaStack.forward (no checkpointed forward; [M] hybrid_block.py has one)",
    applies=lambda ctx: ctx.spec.training.recompute == "full" and not ctx.plain_transformer and ctx.dialect == "core_v0.16",
    fails="hybrid pattern, training.recompute=full, backend.megatron=core_v0.16",
    passes="backend.megatron=main",
)
def full_recompute_ignored(ctx: Context, lay: Layout) -> str | None:
    """megatron-core 0.16's MambaStack runs its layers without activation checkpointing: under
    pretrain_mamba.py `--recompute-granularity full` is accepted and does nothing, so the layers
    keep what they keep without recompute. megacpp's runtime recomputes them (its stage module)."""
    return ("full recompute of a hybrid stack: core_v0.16's MambaStack ignores it under Megatron-LM (the plan's memory "
            "is what `megacpp launch --engine megacpp` keeps); set backend.megatron: main")


def megatron_lm_only(ctx: Context) -> list[str]:
    """The memory-feature keys, and CUDA graphs, a spec sets that megacpp's runtime does not run."""
    training = ctx.spec.training
    keys = [key for key in ("recompute_modules", "recompute_method", "recompute_num_layers", "offload_modules", "offload_layers")
            if getattr(training, key) is not None]
    if training.recompute_modules == ("core_attn",):
        keys.remove("recompute_modules")  # the runtime's selective recompute
    if (training.recompute_num_layers or 1) == 1 and training.recompute_method in (None, "uniform"):
        keys = [k for k in keys if k not in ("recompute_method", "recompute_num_layers")]  # the runtime's full recompute
    if training.optimizer.precision_aware:
        keys.append("optimizer")
    if training.cuda_graphs != "none":
        keys.append("cuda_graphs")  # the runtime captures none, which the plan's host time would not show
    return [f"training.{key}" for key in keys]


@rule(
    "memory-features-need-megatron-lm",
    axes=(),
    severity="warning",
    where="runtime/worker/megatron_config.py (the TransformerConfig megacpp's runtime builds)",
    applies=lambda ctx: bool(megatron_lm_only(ctx)),
    fails="training.offload_modules [expert_fc1], launched with --engine megacpp",
    passes="launched with --engine megatron-lm",
)
def memory_features_need_megatron_lm(ctx: Context, lay: Layout) -> str | None:
    """megacpp's runtime trains with Megatron's default recompute modules, one layer per full
    recompute checkpoint, no activation offloading, fp32 optimizer state and no CUDA graphs; a spec that sets
    these keys otherwise is planned and rendered for Megatron-LM, and `launch --engine megacpp`
    refuses it rather than run something else."""
    return f"{', '.join(megatron_lm_only(ctx))}: Megatron-LM runs them; `megacpp launch --engine megacpp` refuses them"
