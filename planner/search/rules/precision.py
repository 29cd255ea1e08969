"""Precision rules: which GPU each FP8 scaling recipe and NVFP4 run on, and what a recipe refuses.

Transformer Engine checks the recipe against the GPU's compute capability when the autocast starts
(transformer_engine/pytorch/quantization.py check_recipe_support: _compute_mxfp8_support,
_compute_nvfp4_support, _compute_fp8_block_scaling_support); Megatron builds the recipe from
--fp8-recipe / --fp4-recipe (megatron/core/fp8_utils.py:550-594, fp4_utils.py:95-100, core_v0.16.1).
The cluster's compute capability is the preset's (Cluster.compute_capability).
"""

from __future__ import annotations

from megacpp.planner.search.layout import Context, Layout
from megacpp.planner.search.rules import rule

BLACKWELL = 100  # sm_100: B200, GB200; B300/GB300 are sm_103
SM120 = 120  # the consumer-Blackwell family (GB10 is sm_121)
HOPPER = 90


def _capability(ctx: Context) -> str:
    c = ctx.cluster.compute_capability
    return f"sm_{c} ({ctx.cluster.name})"


@rule(
    "mxfp8-needs-blackwell",
    axes=(),
    where="TransformerEngine transformer_engine/pytorch/quantization.py _compute_mxfp8_support (sm_100 or later, "
          "not 12.0+); [V] megatron/core/transformer/transformer_config.py:436-442 ('mxfp8' for Blackwell)",
    applies=lambda ctx: ctx.spec.training.precision == "fp8" and ctx.spec.training.fp8_recipe == "mxfp8",
    fails="training.fp8_recipe=mxfp8 on h100-sxm-8 or gb10-spark",
    passes="cluster.preset=b200-sxm-8 (or gb200-nvl72, b300-sxm-8, gb300-nvl72), or fp8_recipe: tensorwise",
)
def mxfp8_needs_blackwell(ctx: Context, lay: Layout) -> str | None:
    """MXFP8 block scaling runs on data-center Blackwell only: compute capability 10.x. Hopper has no
    MXFP8 tensor cores, and Transformer Engine refuses it on 12.0+ ("MXFP8 (for all gemm layouts) is
    not supported on 12.0+ architectures yet"; NVIDIA/Megatron-LM issue #4175)."""
    c = ctx.cluster.compute_capability
    if not BLACKWELL <= c < SM120:
        return (f"training.fp8_recipe=mxfp8 needs a B200, GB200, B300 or GB300 (sm_100 to sm_103), not "
                f"{_capability(ctx)}; use fp8_recipe: tensorwise or blockwise, or a Blackwell cluster")
    return None


@rule(
    "nvfp4-needs-blackwell",
    axes=(),
    where="TransformerEngine transformer_engine/pytorch/quantization.py _compute_nvfp4_support (sm_100 or later); "
          "[V] megatron/core/transformer/transformer_config.py:516-518 (NVFP4BlockScaling 'for Blackwell+')",
    applies=lambda ctx: ctx.spec.training.precision == "fp4",
    fails="training.precision=fp4 on h100-sxm-8",
    passes="cluster.preset=b200-sxm-8, gb200-nvl72, b300-sxm-8 or gb300-nvl72",
)
def nvfp4_needs_blackwell(ctx: Context, lay: Layout) -> str | None:
    """NVFP4 (--fp4-format e2m1, --fp4-recipe nvfp4) needs FP4 tensor cores: compute capability 10.0 or later."""
    if ctx.cluster.compute_capability < BLACKWELL or ctx.cluster.fp4_tflops is None:
        return (f"training.precision=fp4 (NVFP4) needs Blackwell FP4 tensor cores, not {_capability(ctx)}; "
                "use precision: fp8, or a B200, GB200, B300 or GB300 cluster")
    return None


@rule(
    "fp8-blockwise-needs-hopper",
    axes=(),
    where="TransformerEngine transformer_engine/pytorch/quantization.py _compute_fp8_block_scaling_support "
          "(compute capability 9.0 or later, CUDA 12.9); [V] megatron/core/fp8_utils.py:565-567 (TE >= 2.3)",
    applies=lambda ctx: ctx.spec.training.precision == "fp8" and ctx.spec.training.fp8_recipe == "blockwise",
    fails="training.fp8_recipe=blockwise on an inline cluster of an sm_89 GPU",
    passes="h100-sxm-8, h200-sxm-8 or any Blackwell preset",
)
def fp8_blockwise_needs_hopper(ctx: Context, lay: Layout) -> str | None:
    """FP8 block scaling (Float8BlockScaling: 1x128 activation and 128x128 weight blocks, the
    DeepSeek-V3 recipe) needs block-scaled FP8 GEMMs: compute capability 9.0 or later with CUDA 12.9
    and Transformer Engine 2.3. The recipe also refuses FP8 attention and pure E5M2, neither of which
    megacpp renders (it keeps attention in bf16 and the hybrid format)."""
    if ctx.cluster.compute_capability < HOPPER:
        return (f"training.fp8_recipe=blockwise needs Hopper or later (sm_90+), not {_capability(ctx)}; "
                "use fp8_recipe: delayed or tensorwise")
    return None
