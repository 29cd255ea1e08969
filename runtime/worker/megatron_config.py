"""Map a plan onto megatron-core: the TransformerConfig and the module backend (TE or local).

This is the one runtime module that speaks Megatron's field names (STYLE.md #4). Every value
comes from the plan's spec and layout; the rest are the settings a run without Apex and without
Megatron's compiled kernels needs (no fused softmax, no gradient-accumulation fusion, no rope
fusion without TE), the same ones DESIGN.md lists for stock Megatron-LM on the validation GPUs;
the fusions Megatron-LM takes by default otherwise are on unless the spec's backend.fusions is false.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.extensions.transformer_engine import HAVE_TE
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.transformer.enums import AttnBackend
from megatron.core.transformer.moe import fused_a2a
from megatron.core.transformer.transformer_config import TransformerConfig

from megacpp.planner.cost.blocks import padded_vocab
from megacpp.planner.errors import LaunchError
from megacpp.planner.megatron.args import MOE_AUX_LOSS_COEFF
from megacpp.planner.search.layout import Layout
from megacpp.runtime.worker.adapters import SequenceParallelNorm
from megacpp.runtime.worker.job import Job

POSITION_EMBEDDING = {"rope": "rope", "learned": "learned_absolute", "none": "none"}
NORMALIZATION = {"rmsnorm": "RMSNorm", "layernorm": "LayerNorm"}


@dataclass(frozen=True)
class Backend:
    """Which module family builds the blocks, and the norm class the local family uses."""

    te_requested: bool  # backend.transformer_engine in the spec
    use_te: bool  # requested and transformer_engine imports here
    norm: type  # norm for letter layers and the final norm
    adapters: tuple[str, ...]  # adapter names this backend relies on



def parallel_sizes(lay: Layout) -> dict[str, int | None]:
    """The layout as megatron-core's parallel-size keywords (initialize_model_parallel and TransformerConfig)."""
    return {
        "tensor_model_parallel_size": lay.tp,
        "pipeline_model_parallel_size": lay.pp,
        "virtual_pipeline_model_parallel_size": lay.vpp if lay.vpp > 1 else None,
        "context_parallel_size": lay.cp,
        "expert_model_parallel_size": lay.ep,
        "expert_tensor_parallel_size": lay.etp,
    }

def select_backend(job: Job) -> Backend:
    """TE modules when the spec asks for TE and it imports; megatron's local modules otherwise.

    The local family keeps megatron's own norm choice (LocalSpecProvider.layer_norm), except under
    sequence parallelism, which that norm refuses: there the `sequence_parallel_norm` adapter is
    used instead.
    """
    requested = job.spec.backend.transformer_engine
    use_te = requested and bool(HAVE_TE)
    rms = job.spec.model.normalization == "rmsnorm"
    if use_te:
        from megatron.core.extensions.transformer_engine import TENorm

        return Backend(requested, True, TENorm, ())
    if job.layout.sp and job.layout.tp > 1:
        return Backend(requested, False, SequenceParallelNorm, ("sequence_parallel_norm",))
    return Backend(requested, False, LocalSpecProvider().layer_norm(rms_norm=rms, for_qk=False), ())


def vocab_size(job: Job) -> int:
    """The padded vocabulary Megatron-LM would use (multiple of 128 * TP), as the planner counts it."""
    return padded_vocab(job.ctx, job.layout.tp)


def _check_requirements(job: Job, backend: Backend) -> None:
    model, letters = job.spec.model, job.ctx.letters
    if model.moe is not None and model.moe.latent_size and "E" in letters and not backend.use_te:
        raise LaunchError("model.moe.latent_size: megatron-core builds the latent projections with Transformer Engine, "
                          "which does not import here; run where TE imports, or drop latent_size")
    precision = job.spec.training.precision
    if precision != "bf16" and not backend.use_te:
        raise LaunchError(f"training.precision={precision} needs Transformer Engine, which does not import here; use precision: bf16")
    if job.spec.training.data_parallel_sharding == "fsdp":
        raise LaunchError("training.data_parallel_sharding: fsdp: the megacpp runtime trains with DDP and the distributed "
                          "optimizer, not Megatron-FSDP; launch with --engine megatron-lm, or set it to optimizer")
    if job.layout.cp > 1 and "A" in letters and not backend.use_te:
        raise LaunchError(
            f"cp={job.layout.cp}: context parallel attention needs TEDotProductAttention and Transformer Engine "
            "does not import here; choose a candidate with cp=1"
        )
    # the runtime's schedule builds neither Transformer Engine's userbuffers nor Megatron's combined
    # 1F1B (gpt_model.py build_schedule_plan), so it cannot run what these keys ask for
    overlaps = [key for key, on in (("training.tp_comm_overlap", job.spec.training.tp_comm_overlap),
                                    ("model.moe.overlap_communication", model.moe is not None and model.moe.overlap_communication))
                if on]
    if overlaps:
        raise LaunchError(f"{' and '.join(overlaps)}: the megacpp runtime does not overlap these collectives; "
                          "launch with --engine megatron-lm, or set them false and re-plan")
    if model.moe is not None and "E" in letters and model.moe.dispatcher == "flex":
        backend_name = model.moe.flex_backend
        ok = fused_a2a.HAVE_DEEP_EP if backend_name == "deepep" else fused_a2a.HAVE_HYBRIDEP
        if not ok:
            raise LaunchError(
                f"moe.dispatcher=flex with flex_backend={backend_name} needs DeepEP (`import deep_ep` fails here); "
                "set moe.dispatcher: alltoall (or allgather) and re-plan"
            )


def _attention_features(job: Job) -> dict:
    """QK layernorm, the sliding window with its full-attention layers, and attention sinks, as
    Megatron-LM sets them from the rendered flags (planner/megatron/args.py)."""
    a = job.spec.model.attention
    assert a is not None
    kw: dict = dict(qk_layernorm=a.qk_layernorm, softmax_type="learnable" if a.sinks else "vanilla")
    if a.window_size is not None:
        kw.update(window_size=(a.window_size, 0), window_attn_skip_freq=a.window_full_every)
    return kw


def transformer_config(job: Job, backend: Backend, *, cuda: bool, construct_only: bool) -> TransformerConfig:
    """The TransformerConfig every block of this job is built with."""
    _check_requirements(job, backend)
    model, training, lay = job.spec.model, job.spec.training, job.layout
    letters = job.ctx.letters
    mlp = model.mlp or model.moe  # the planner requires one gating for both (rule one-gating-for-mlp-and-experts)
    gated = mlp.gated if mlp else False
    ffn = mlp.ffn_hidden_size if mlp else 4 * model.hidden_size
    dtype = torch.bfloat16 if cuda else torch.float32
    fused = job.spec.backend.fusions
    kw: dict = dict(
        # parallel layout, exactly as the plan says
        **parallel_sizes(lay),
        sequence_parallel=lay.sp and lay.tp > 1,
        # model
        num_layers=job.ctx.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=ffn,
        gated_linear_unit=gated,
        activation_func=F.silu if gated else F.gelu,
        normalization=NORMALIZATION[model.normalization],
        add_bias_linear=model.linear_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=0.02,
        # precision
        bf16=cuda,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        # Megatron-LM's fusions that need neither Apex nor Megatron's compiled kernels, as its
        # launch takes them (arguments.py: bias_swiglu_fusion for --swiglu, bias_gelu_fusion off
        # without biases, bias_dropout_fusion, rope fusion through TE): torch.compile'd bias-SwiGLU
        # and bias-dropout-add (megatron/core/jit.py), TE's fused rotary kernel. The Apex ones stay
        # off (DESIGN.md "Runtime on the validation GPUs"), as the rendered launch turns them off.
        masked_softmax_fusion=importlib.util.find_spec("scaled_upper_triang_masked_softmax_cuda") is not None,
        bias_activation_fusion=fused and gated,
        # TEGroupedMLP refuses the fusion when its experts carry biases (experts.py:529-531), as the
        # rendered launch turns it off (planner/megatron/args.py)
        bias_dropout_fusion=fused and not (model.linear_bias and "E" in letters and backend.use_te),
        apply_rope_fusion=fused and backend.use_te and model.position_embedding == "rope",
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        transformer_impl="transformer_engine" if backend.use_te else "local",
        attention_backend=AttnBackend.auto if backend.use_te else AttnBackend.local,
        deallocate_pipeline_outputs=True,
        # pipeline send/recv as Megatron-LM sets them (arguments.py: --overlap-p2p-communication is on
        # and only kept for the interleaved schedule; core_transformer_config_from_args: batch_p2p_comm
        # = not overlap_p2p_comm). Batched, the interleaved schedule's steady state at PP=2 posts a
        # forward and a backward transfer to the same peer in one batch, NCCL pairs them by order,
        # and activations land in gradient buffers: the loss stops falling without any error.
        overlap_p2p_comm=lay.vpp > 1,
        batch_p2p_comm=lay.vpp == 1,
        # construction
        use_cpu_initialization=not cuda,
        perform_initialization=not construct_only,
    )
    if model.attention is not None:
        kw.update(num_attention_heads=model.attention.num_heads, num_query_groups=model.query_groups, kv_channels=model.head_dim)
        kw.update(_attention_features(job))
    else:  # no A blocks: the attention fields are required but unused; TransformerConfig still
        # checks num_attention_heads % TP (transformer_config.py:925), so give one head per TP rank
        kw.update(num_attention_heads=lay.tp, kv_channels=model.hidden_size // lay.tp)
    if model.moe is not None and "E" in letters:
        moe = model.moe
        kw.update(
            num_moe_experts=moe.num_experts,
            moe_ffn_hidden_size=moe.ffn_hidden_size,
            moe_router_topk=moe.top_k,
            moe_router_pre_softmax=moe.top_k == 1,  # transformer_config.py: required when topk is 1
            moe_router_dtype="fp32",
            moe_router_load_balancing_type="aux_loss",
            moe_aux_loss_coeff=MOE_AUX_LOSS_COEFF,
            moe_shared_expert_intermediate_size=moe.shared_expert_ffn_hidden_size,
            moe_token_dispatcher_type=moe.dispatcher,
            moe_flex_dispatcher_backend=moe.flex_backend,
            moe_expert_capacity_factor=moe.capacity_factor,
            moe_grouped_gemm=backend.use_te,
            moe_latent_size=moe.latent_size,
            moe_router_num_groups=moe.router_num_groups,
            moe_router_group_topk=moe.router_group_topk,
        )
    if model.mamba is not None and "M" in letters:
        kw.update(
            mamba_state_dim=model.mamba.state_dim,
            mamba_head_dim=model.mamba.head_dim,
            mamba_num_groups=model.mamba.num_groups,
            mamba_num_heads=model.mamba_heads,
        )
    if training.recompute == "selective":
        kw.update(recompute_granularity="selective")
    elif training.recompute == "full":
        # one layer per checkpoint, done by the stage module (see model.StageChunk)
        kw.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    if training.precision == "fp8":  # the recipe as Megatron-LM's --fp8-recipe sets it (planner/megatron/args.py)
        kw.update(fp8="hybrid", fp8_recipe=training.fp8_recipe)
    elif training.precision == "fp4":
        kw.update(fp4="e2m1", fp4_recipe="nvfp4")
    return TransformerConfig(**kw)
