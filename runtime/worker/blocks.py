"""One megatron-core ModuleSpec per block letter, and the builder that turns a letter into a module.

The A and D specs are the two halves of megatron's own GPT layer spec (local or TE): A keeps the
input norm and self-attention, D keeps the pre-MLP norm (fused into linear_fc1 with TE) and the
MLP. An AD pair therefore holds exactly the parameters of one GPT layer, which is what the
planner counts. E is a TransformerLayer whose MLP is megatron's MoE module spec; M is megatron's
MambaLayer; R is megacpp's RecurrentBlock. Each letter owns its norm, as in Megatron's hybrid
stack (input_layernorm for A, pre_mlp_layernorm for D and E, MambaLayer.norm for M).
"""

from __future__ import annotations

from dataclasses import replace

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.identity_op import IdentityFuncOp, IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
    get_transformer_layer_offset,
)

from megacpp.planner.errors import LaunchError
from megacpp.runtime.worker.job import Job
from megacpp.runtime.worker.megatron_config import Backend
from megacpp.runtime.worker.recurrent import RecurrentBlock


def _gpt_layer_halves(job: Job, backend: Backend):
    """(A spec, D spec) cut from megatron's GPT layer spec for this backend."""
    qk_layernorm = job.spec.model.attention is not None and job.spec.model.attention.qk_layernorm
    if backend.use_te:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        sub = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm).submodules
    else:
        normalization = {"rmsnorm": "RMSNorm", "layernorm": "LayerNorm"}[job.spec.model.normalization]
        sub = get_gpt_layer_local_spec(normalization=normalization, qk_layernorm=qk_layernorm).submodules
        sub = replace(sub, input_layernorm=backend.norm, pre_mlp_layernorm=backend.norm)
    attention = replace(sub, pre_mlp_layernorm=IdentityOp, mlp=IdentityOp, mlp_bda=IdentityFuncOp)
    mlp = replace(sub, input_layernorm=IdentityOp, self_attention=IdentityOp, self_attn_bda=IdentityFuncOp)
    return ModuleSpec(module=TransformerLayer, submodules=attention), ModuleSpec(module=TransformerLayer, submodules=mlp)


def _moe_spec(job: Job, backend: Backend):
    moe = job.spec.model.moe
    assert moe is not None
    mlp = get_moe_module_spec(use_te=backend.use_te, num_experts=moe.num_experts, moe_grouped_gemm=backend.use_te)
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(pre_mlp_layernorm=backend.norm, mlp=mlp, mlp_bda=get_bias_dropout_add),
    )


def _mamba_spec(job: Job, backend: Backend):
    try:  # mamba_mixer itself imports triton
        from megatron.core.ssm import mamba_mixer
        from megatron.core.ssm.mamba_layer import MambaLayer, MambaLayerSubmodules

        missing = None if mamba_mixer.HAVE_MAMBA_SSM else "mamba_ssm"
    except ImportError as exc:
        missing = exc.name
    if missing:
        raise LaunchError(
            f"the pattern has M blocks: megatron's MambaMixer needs mamba-ssm (with causal-conv1d and triton); "
            f"`import {missing}` fails here; install mamba-ssm or plan a pattern without M"
        )
    if backend.use_te:
        from megatron.core.extensions.transformer_engine import (
            TELayerNormColumnParallelLinear,
            TERowParallelLinear,
        )

        norm, in_proj, out_proj = IdentityOp, TELayerNormColumnParallelLinear, TERowParallelLinear
    else:
        norm, in_proj, out_proj = backend.norm, ColumnParallelLinear, RowParallelLinear
    mamba = job.spec.model.mamba
    assert mamba is not None
    mixer = ModuleSpec(
        module=mamba_mixer.MambaMixer,
        params={"d_conv": mamba.conv_kernel},
        submodules=mamba_mixer.MambaMixerSubmodules(in_proj=in_proj, out_proj=out_proj),
    )
    return ModuleSpec(module=MambaLayer, submodules=MambaLayerSubmodules(norm=norm, mixer=mixer, mamba_bda=get_bias_dropout_add))


def letter_specs(job: Job, backend: Backend) -> dict[str, object]:
    """The ModuleSpec of every letter the pattern uses (R maps to RecurrentBlock)."""
    letters = job.ctx.letters
    specs: dict[str, object] = {}
    if letters & {"A", "D"}:
        specs["A"], specs["D"] = _gpt_layer_halves(job, backend)
    if "E" in letters:
        specs["E"] = _moe_spec(job, backend)
    if "M" in letters:
        specs["M"] = _mamba_spec(job, backend)
    if "R" in letters:
        r = job.spec.model.recurrent
        assert r is not None
        specs["R"] = ModuleSpec(module=RecurrentBlock, params={"norm": backend.norm, "num_heads": r.num_heads, "head_dim": r.head_dim})
    return {k: v for k, v in specs.items() if k in letters}


def build_block(spec, config, *, layer_number: int, vp_stage: int | None, pp_rank: int, first_layer: int, pg_collection):
    """Instantiate one letter's module with its global (1-based) Megatron layer number.

    TransformerLayer adds megatron's own pipeline offset to the number it is given
    (transformer_layer.py:get_transformer_layer_offset), which assumes megatron's split; we
    subtract that offset so the layer ends up numbered as the plan's split says.
    """
    if spec.module is TransformerLayer:
        local = layer_number - get_transformer_layer_offset(config, vp_stage, pp_rank)
        layer = build_module(spec, config=config, layer_number=local, pg_collection=pg_collection, vp_stage=vp_stage)
    elif spec.module is RecurrentBlock:
        layer = build_module(spec, config=config, layer_number=layer_number, pg_collection=pg_collection)
    else:  # MambaLayer
        layer = build_module(spec, config=config, layer_number=layer_number, pg_collection=pg_collection, pp_layer_offset=first_layer)
    if layer.layer_number != layer_number:
        raise RuntimeError(f"layer numbered {layer.layer_number}, expected {layer_number}")
    return layer
