"""Frozen pydantic models for every key of the spec YAML contract (DESIGN.md "Spec YAML").

Specs are inputs: nothing derived is ever written back into them. Cross-field checks that
depend only on the spec (not on a layout) live here; layout legality lives in `rules/`.
"""

from __future__ import annotations

import re
from functools import cached_property
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from megacpp.planner.errors import SpecError
from megacpp.planner.spec.pattern import Pattern, parse_pattern
from megacpp.planner.spec.pipeline_layout import mtp_layers, stage_layers

# Bounds keep absurd values out with a message naming the key. They are generous: the
# largest published models are well inside them.
Count = Annotated[int, Field(ge=1, le=1 << 20)]
Dim = Annotated[int, Field(ge=1, le=1 << 20)]
Tokens = Annotated[int, Field(ge=1, le=1 << 24)]
Vocab = Annotated[int, Field(ge=1, le=1 << 24)]


# The per-layer modules Megatron's CUDA graphs capture (--cuda-graph-scope, megatron/core/transformer/enums.py CudaGraphScope).
CudaGraphModule = Literal["attn", "mlp", "moe", "moe_router", "moe_preprocess", "mamba"]

# What selective recompute can drop (--recompute-modules) and what fine-grained activation
# offloading can move to the host (--offload-modules): transformer_config.py recompute_modules,
# offload_modules (megatron-core 0.16.1).
RecomputeModule = Literal["core_attn", "moe_act", "layernorm", "mla_up_proj", "mlp", "moe", "shared_experts"]
OffloadModule = Literal["attn_norm", "qkv_linear", "core_attn", "attn_proj", "mlp_norm", "expert_fc1", "moe_act"]
# Adam moment dtypes Megatron-LM accepts (--exp-avg-dtype, --exp-avg-sq-dtype)
StateDtype = Literal["fp32", "bf16", "fp16", "fp8"]

# Each sub-block key of model and the pattern letter that needs it.
SUB_BLOCK_LETTERS = {"attention": "A", "mamba": "M", "moe": "E", "mlp": "D", "recurrent": "R"}


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False)


class LatentAttentionSpec(_Frozen):
    """Multi-latent attention (DeepSeek-V2/V3, arXiv:2405.04434 section 2.1): keys and values
    come up from one low-rank latent per token, queries from another (or straight from the hidden
    state), and each head's query and key carry a rotary part beside the content part, the key's
    shared by every head. Defaults are Megatron-LM's (arguments.py _add_mla_args), DeepSeek-V3's widths.
    The latents are RMS-normalised, as in every published MLA model."""

    kv_lora_rank: Dim  # the key/value latent's width
    q_lora_rank: Dim | None = None  # the query latent's width; None: queries projected from the hidden state
    qk_head_dim: Dim = 128  # a head's query/key content width (without the rotary part)
    rope_head_dim: Dim = 64  # the rotary width of a head's query and of the shared key part
    v_head_dim: Dim = 128  # a head's value width


class AttentionSpec(_Frozen):
    """Self-attention (A): grouped-query attention, or multi-latent attention with `mla`."""

    num_heads: Dim
    num_query_groups: Dim | None = None  # None: one group per head (MHA)
    head_dim: Dim | None = None  # None: hidden_size / num_heads
    # a norm over each query and key head before the scores (Qwen3; --qk-layernorm)
    qk_layernorm: bool = False
    # sliding-window attention: each token attends to itself and the window_size tokens before it
    # (Megatron's window_size (window_size, 0)); window_full_every N keeps every N-th layer's
    # attention full (--window-attn-skip-freq N: layer numbers divisible by N); None: all windowed
    window_size: Dim | None = None
    window_full_every: Annotated[int, Field(ge=2, le=1 << 20)] | None = None
    # a learnable softmax offset per head, the "attention sink" of GPT-OSS (--softmax-type learnable)
    sinks: bool = False
    mla: LatentAttentionSpec | None = None  # None: grouped-query attention

    @model_validator(mode="after")
    def _latent_attention_has_no_groups(self) -> AttentionSpec:
        """Megatron-LM: --group-query-attention is mutually exclusive with MLA (arguments.py:1265-1266
        [V]); MLA's head widths are its own (qk_head_dim, rope_head_dim, v_head_dim), not kv_channels."""
        if self.mla is not None:
            for key in ("num_query_groups", "head_dim"):
                if getattr(self, key) is not None:
                    raise ValueError(f"{key}={getattr(self, key)} does not apply to multi-latent attention (attention.mla "
                                     "sets every head's keys and values and their widths); drop it")
            for key in ("qk_layernorm", "window_size", "sinks"):
                if getattr(self, key):
                    raise ValueError(f"{key} is not planned with multi-latent attention (its latents carry their own "
                                     "norms; windows and sinks are GQA features here); drop it")
        return self

    @model_validator(mode="after")
    def _groups_divide_heads(self) -> AttentionSpec:
        if self.num_query_groups is not None and self.num_heads % self.num_query_groups:
            raise ValueError(
                f"num_query_groups={self.num_query_groups} must divide num_heads={self.num_heads}"
            )
        if self.window_full_every is not None and self.window_size is None:
            raise ValueError(f"window_full_every={self.window_full_every} picks the full-attention layers among "
                             "sliding-window ones; set window_size or drop window_full_every")
        return self


class MambaSpec(_Frozen):
    """Mamba-2 mixer (M). Defaults are megatron-core's (transformer_config.py mamba_* fields)."""

    num_heads: Dim | None = None  # None: 2 * hidden_size / head_dim (expand = 2)
    head_dim: Dim = 64
    state_dim: Dim = 128
    num_groups: Dim = 8
    conv_kernel: Dim = 4


class MoESpec(_Frozen):
    """MoE FFN (E): router, token dispatcher, routed experts and an optional shared expert."""

    num_experts: Dim
    top_k: Dim = 2
    ffn_hidden_size: Dim
    gated: bool = True
    shared_expert_ffn_hidden_size: Dim | None = None
    capacity_factor: Annotated[float, Field(gt=0, le=1024)] | None = None  # None: dropless
    dispatcher: Literal["allgather", "alltoall", "flex"] = "alltoall"
    flex_backend: Literal["deepep", "hybridep"] = "deepep"  # used when dispatcher is flex
    # routed tokens on the busiest expert-parallel rank over the mean; above 1 the plan gives the
    # memory and step time of that rank as the top of a band (capacity_factor caps it)
    imbalance: Annotated[float, Field(ge=1, le=1024)] = 1.0
    # run one micro-batch's expert all-to-alls under another one's compute (Megatron's combined
    # 1F1B, --overlap-moe-expert-parallel-comm); needs the alltoall or flex dispatcher
    overlap_communication: bool = False
    # latent MoE (Nemotron 3 Super; --moe-latent-size): the routed experts and their dispatch work in
    # this narrower width, with a down- and an up-projection (hidden <-> latent) around them
    latent_size: Dim | None = None

    @model_validator(mode="after")
    def _topk_within_experts(self) -> MoESpec:
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k={self.top_k} exceeds num_experts={self.num_experts}")
        if self.overlap_communication and self.dispatcher == "allgather":
            raise ValueError("overlap_communication needs the alltoall or flex dispatcher, not allgather "
                             "(transformer_config.py:3016-3019); set dispatcher: alltoall")
        return self


class MLPSpec(_Frozen):
    """Dense MLP (D)."""

    ffn_hidden_size: Dim
    gated: bool = True


class RecurrentSpec(_Frozen):
    """Recurrent tail block (R): a gated linear recurrence carrying state along the sequence."""

    num_heads: Dim
    head_dim: Dim


class ModelSpec(_Frozen):
    pattern: str
    hidden_size: Dim
    vocab_size: Vocab
    normalization: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    position_embedding: Literal["rope", "learned", "none"] = "rope"
    tie_embeddings: bool = False
    # a bias on every linear layer (Megatron's --add-bias-linear; GPT-OSS); Megatron-LM's own
    # default is on, megacpp's is off (rendered as --disable-bias-linear)
    linear_bias: bool = False
    attention: AttentionSpec | None = None
    mamba: MambaSpec | None = None
    moe: MoESpec | None = None
    mlp: MLPSpec | None = None
    recurrent: RecurrentSpec | None = None
    # multi-token prediction (DeepSeek-V3, arXiv:2412.19437 section 2.2): layers after the last
    # one, each predicting one token further, on the last pipeline stage with the output head
    mtp_num_layers: Annotated[int, Field(ge=0, le=64)] = 0
    # the blocks of one MTP layer of a hybrid stack (Nemotron 3: "AE", Megatron's `/*E/*E`); an
    # AD/AE stack's MTP layer is a copy of its last layer, which is the default
    mtp_pattern: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    # one MTP layer's weights applied at every depth (Megatron's --mtp-use-repeated-layer; Nemotron 3)
    mtp_shared_weights: bool = False

    @cached_property
    def parsed(self) -> Pattern:
        return parse_pattern(self.pattern)

    @cached_property
    def mtp_layer(self) -> str:
        """The blocks of one MTP layer: model.mtp_pattern, else a copy of the last Megatron layer
        (gpt_builders.py: the MTP layer's spec is the last decoder layer's); "" without MTP."""
        if not self.mtp_num_layers:
            return ""
        if self.mtp_pattern is not None:
            return parse_pattern(self.mtp_pattern).blocks
        parsed = self.parsed
        return parsed.blocks[-2:] if parsed.is_plain_transformer else parsed.blocks[-1:]

    @property
    def letters(self) -> frozenset[str]:
        """The block letters the model builds: its pattern's and its MTP layers'."""
        return self.parsed.letters | frozenset(self.mtp_layer)

    @model_validator(mode="after")
    def _mtp_layer_is_expressible(self) -> ModelSpec:
        """One MTP pattern repeated per depth is what Megatron's hybrid stack builds (hybrid_layer_allocation.py
        parse_hybrid_pattern: every `/` part identical, no `|`); its GPT stack copies the last layer."""
        if not self.mtp_num_layers:
            for key in ("mtp_pattern", "mtp_shared_weights"):
                if getattr(self, key):
                    raise ValueError(f"model.{key} describes MTP layers, but model.mtp_num_layers is 0; "
                                     f"set mtp_num_layers or drop {key}")
            return self
        parsed = parse_pattern(self.pattern)
        if self.mtp_pattern is None:
            if not parsed.is_plain_transformer:
                raise ValueError("model.mtp_num_layers on a hybrid pattern needs model.mtp_pattern, the blocks of one "
                                 "MTP layer (Nemotron 3: \"AE\")")
            return self
        try:
            mtp = parse_pattern(self.mtp_pattern)
        except SpecError as exc:
            raise ValueError(str(exc).replace("model.pattern", "model.mtp_pattern", 1)) from None
        if mtp.cuts:
            raise ValueError(f"model.mtp_pattern {self.mtp_pattern!r}: no '|' cuts, one MTP layer sits on one stage")
        if parsed.is_plain_transformer and mtp.blocks != parsed.blocks[-2:]:
            raise ValueError(f"model.mtp_pattern {self.mtp_pattern!r} on an AD/AE stack: Megatron's GPT model builds each "
                             f"MTP layer as a copy of the last layer ({parsed.blocks[-2:]}); drop mtp_pattern")
        return self

    @model_validator(mode="after")
    def _sub_blocks_match_pattern(self) -> ModelSpec:
        parsed = parse_pattern(self.pattern)
        for key, letter in SUB_BLOCK_LETTERS.items():
            if letter in parsed.letters and getattr(self, key) is None:
                raise ValueError(f"the pattern uses {letter} blocks, so model.{key} is required")
            if letter in self.mtp_layer and getattr(self, key) is None:
                raise ValueError(f"model.mtp_pattern uses {letter} blocks, so model.{key} is required")
        if self.attention and self.attention.head_dim is None and self.attention.mla is None \
                and self.hidden_size % self.attention.num_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by attention.num_heads="
                f"{self.attention.num_heads}; set attention.head_dim"
            )
        m = self.mamba
        if m and "M" in self.letters:
            heads = self.mamba_heads
            if m.num_heads is None and (2 * self.hidden_size) % m.head_dim:
                raise ValueError(f"2*hidden_size={2 * self.hidden_size} is not divisible by mamba.head_dim={m.head_dim}")
            if heads % m.num_groups:
                raise ValueError(f"mamba heads={heads} must be divisible by mamba.num_groups={m.num_groups}")
        return self

    @property
    def head_dim(self) -> int:
        """A head's width; under MLA the mean of its key (content and rotary) and value widths,
        so that 2 x heads x head_dim is a token's keys and values as attention exchanges them."""
        a = self.attention
        assert a is not None
        if a.mla is not None:
            return (a.mla.qk_head_dim + a.mla.rope_head_dim + a.mla.v_head_dim) // 2
        return a.head_dim or self.hidden_size // a.num_heads

    @property
    def latent(self) -> LatentAttentionSpec | None:
        """The multi-latent attention's widths, or None for grouped-query attention."""
        return self.attention.mla if self.attention is not None else None

    @property
    def query_groups(self) -> int:
        a = self.attention
        assert a is not None
        return a.num_query_groups or a.num_heads

    @property
    def mamba_heads(self) -> int:
        m = self.mamba
        assert m is not None
        return m.num_heads or (2 * self.hidden_size) // m.head_dim

    def unused_sub_blocks(self) -> list[str]:
        letters = self.letters
        return [k for k, letter in SUB_BLOCK_LETTERS.items() if getattr(self, k) is not None and letter not in letters]


class OptimizerSpec(_Frozen):
    """Adam's state held by the distributed optimizer. A dtype other than fp32 is Megatron's
    precision-aware optimizer (Transformer Engine's FusedAdam; optimizer_config.py)."""

    exp_avg_dtype: StateDtype = "fp32"  # first moment
    exp_avg_sq_dtype: StateDtype = "fp32"  # second moment
    main_params_dtype: Literal["fp32", "fp16"] = "fp32"  # the master copy of the weights

    @property
    def precision_aware(self) -> bool:
        return (self.exp_avg_dtype, self.exp_avg_sq_dtype, self.main_params_dtype) != ("fp32",) * 3


class TrainingSpec(_Frozen):
    seq_length: Tokens
    global_batch_size: Annotated[int, Field(ge=1, le=1 << 24)]
    micro_batch_size: Annotated[int, Field(ge=1, le=1 << 16)] | Literal["auto"] = 1
    # fp8: Transformer Engine's FP8 GEMMs with the scaling recipe fp8_recipe; fp4: NVFP4 (Blackwell)
    precision: Literal["bf16", "fp8", "fp4"] = "bf16"
    # delayed (amax history), tensorwise (current scaling), mxfp8 (32-element blocks, Blackwell),
    # blockwise (1x128 / 128x128 blocks): Megatron's --fp8-recipe
    fp8_recipe: Literal["delayed", "tensorwise", "mxfp8", "blockwise"] = "delayed"
    # how data parallelism shards the training state: optimizer (the distributed optimizer shards
    # the optimizer state, as distributed_optimizer says) or fsdp (Megatron-FSDP shards weights,
    # gradients and optimizer state: optim_grads_params)
    data_parallel_sharding: Literal["optimizer", "fsdp"] = "optimizer"
    recompute: Literal["none", "selective", "full"] = "none"
    # selective: what is recomputed (None: Megatron's default, core_attn); full: which layers
    # (uniform: checkpoints of recompute_num_layers layers each, default 1; block: only the first
    # recompute_num_layers layers of each stage)
    recompute_modules: Annotated[tuple[RecomputeModule, ...], Field(strict=False, min_length=1, max_length=7)] | None = None
    recompute_method: Literal["uniform", "block"] | None = None
    recompute_num_layers: Annotated[int, Field(ge=1, le=1 << 16)] | None = None
    # fine-grained activation offloading: the modules whose saved inputs go to host memory during
    # the forward and come back for the backward, and the share of their layers that do
    offload_modules: Annotated[tuple[OffloadModule, ...], Field(strict=False, min_length=1, max_length=7)] | None = None
    activation_offload_fraction: Annotated[float, Field(ge=0, le=1)] = 1.0
    optimizer: OptimizerSpec = OptimizerSpec()
    distributed_optimizer: bool = True
    # the dtype gradients are reduced in across data-parallel ranks: fp32 (Megatron-LM's default for
    # bf16 training) or bf16 (--grad-reduce-in-bf16; Megatron-Bridge's performance recipes), half the bytes
    grad_reduce_dtype: Literal["fp32", "bf16"] = "fp32"
    # overlap the TP all-gathers and reduce-scatters with the GEMMs beside them (--tp-comm-overlap,
    # Transformer Engine's userbuffers); it applies to layouts with TP > 1 and sequence parallelism
    tp_comm_overlap: bool = False
    # CUDA graphs, as Megatron captures them: "layers" (every transformer layer whole),
    # "full_iteration" (the whole forward-backward of a step), or a list of the per-layer modules
    # Megatron names (attn, mlp, moe, moe_router, moe_preprocess, mamba); a captured module replays
    # without the host's per-kernel work
    cuda_graphs: Literal["none", "layers", "full_iteration"] | Annotated[
        tuple[CudaGraphModule, ...], Field(strict=False, min_length=1, max_length=6)] = "none"

    @model_validator(mode="after")
    def _graph_modules(self) -> TrainingSpec:
        modules = self.cuda_graphs
        if isinstance(modules, tuple):
            if len(set(modules)) < len(modules):
                raise ValueError(f"cuda_graphs lists a module twice: {list(modules)}")
            if "moe_preprocess" in modules and "moe_router" not in modules:
                raise ValueError("cuda_graphs: moe_preprocess must be listed with moe_router (Megatron captures "
                                 "the preprocess after the router); add moe_router")
            if "moe" in modules and "moe_router" in modules:  # transformer_config.py: "must not contain both moe and moe_router"
                raise ValueError("cuda_graphs: moe captures the whole MoE layer; drop moe_router and moe_preprocess")
        return self

    @model_validator(mode="after")
    def _precision_and_sharding(self) -> TrainingSpec:
        if self.fp8_recipe != "delayed" and self.precision != "fp8":
            raise ValueError(f"training.fp8_recipe={self.fp8_recipe} applies to precision: fp8, not {self.precision}; "
                             "set precision: fp8 or drop fp8_recipe")
        if self.data_parallel_sharding == "fsdp" and not self.distributed_optimizer:
            raise ValueError("training.data_parallel_sharding: fsdp shards the optimizer state too (Megatron-FSDP "
                             "runs with the distributed optimizer); set distributed_optimizer: true")
        return self

    @model_validator(mode="after")
    def _memory_features(self) -> TrainingSpec:
        """Each recompute, offload and optimizer key only where Megatron-LM reads it
        (arguments.py: no recompute method under selective; optimizer_config.py: the
        precision-aware optimizer only with the distributed optimizer)."""
        for key in ("recompute_modules", "offload_modules"):
            listed = getattr(self, key)
            if listed is not None and len(set(listed)) < len(listed):
                raise ValueError(f"training.{key} lists a module twice: {list(listed)}")
        if self.recompute_modules is not None and self.recompute != "selective":
            raise ValueError(f"training.recompute_modules applies to recompute: selective, not {self.recompute}; "
                             "set recompute: selective or drop recompute_modules")
        for key in ("recompute_method", "recompute_num_layers"):
            if getattr(self, key) is not None and self.recompute != "full":
                raise ValueError(f"training.{key} applies to recompute: full, not {self.recompute}; "
                                 f"set recompute: full or drop {key}")
        if self.offload_modules is None and self.activation_offload_fraction != 1.0:
            raise ValueError(f"training.activation_offload_fraction={self.activation_offload_fraction:g} needs "
                             "training.offload_modules (what to offload); list them or drop the fraction")
        if self.optimizer.precision_aware and not self.distributed_optimizer:
            raise ValueError("training.optimizer dtypes other than fp32 need distributed_optimizer: true "
                             "(Megatron's precision-aware optimizer shards its state); set it or keep fp32")
        return self

    # The run and its learning-rate schedule, one for both engines: Megatron-LM gets them as flags
    # (planner/megatron/args.py) and megacpp's runtime worker builds the same OptimizerParamScheduler
    # (planner/spec/schedule.py). Without a length, `launch --steps` (100) sets it.
    train_iters: Annotated[int, Field(ge=1, le=1 << 40)] | None = None
    train_tokens: Annotated[int, Field(ge=1, le=1 << 60)] | None = None  # rounded up to whole global batches
    lr: Annotated[float, Field(gt=0, le=1)] = 3e-4
    min_lr: Annotated[float, Field(ge=0, le=1)] | None = None  # None: lr / 10
    warmup_iters: Annotated[int, Field(ge=0, le=1 << 40)] = 0
    lr_decay_style: Literal["constant", "linear", "cosine", "inverse-square-root", "WSD"] = "cosine"
    lr_decay_iters: Annotated[int, Field(ge=1, le=1 << 40)] | None = None  # None: the run's length
    # WSD (warmup-stable-decay): lr holds until the last lr_wsd_decay_iters of the decay, which fall
    # to min_lr in this style (megatron/core/optimizer_param_scheduler.py get_lr)
    lr_wsd_decay_style: Literal["exponential", "linear", "cosine", "minus_sqrt"] = "exponential"
    lr_wsd_decay_iters: Annotated[int, Field(ge=1, le=1 << 40)] | None = None  # required with WSD
    weight_decay: Annotated[float, Field(ge=0, le=1e3)] = 0.1
    clip_grad: Annotated[float, Field(ge=0, le=1e6)] = 1.0  # 0: no clipping
    # Adam, stated once for both engines: Megatron-LM's own default beta2 is 0.999, megacpp's runtime
    # and Megatron's GPT-3 175B example (examples/gpt3/train_gpt3_175b_distributed.sh:42-46) use 0.95
    adam_beta1: Annotated[float, Field(ge=0, lt=1)] = 0.9
    adam_beta2: Annotated[float, Field(ge=0, lt=1)] = 0.95
    adam_eps: Annotated[float, Field(gt=0, le=1)] = 1e-8
    # Megatron-LM's logging and evaluation (the runtime worker reports every step and evaluates nothing)
    log_interval: Annotated[int, Field(ge=1, le=1 << 40)] = 1
    eval_interval: Annotated[int, Field(ge=1, le=1 << 40)] | None = None  # None: the run's length
    eval_iters: Annotated[int, Field(ge=0, le=1 << 40)] = 0

    @field_validator("lr", "min_lr", "weight_decay", "clip_grad", "adam_beta1", "adam_beta2", "adam_eps", mode="before")
    @classmethod
    def _number_text(cls, value: object) -> object:
        return number_from_yaml_text(value)

    @property
    def run_iters(self) -> int | None:
        """The run's length in optimizer steps, as the spec gives it (None: it does not)."""
        if self.train_tokens is not None:
            return -(-self.train_tokens // (self.global_batch_size * self.seq_length))
        return self.train_iters

    @model_validator(mode="after")
    def _one_schedule(self) -> TrainingSpec:
        if self.train_iters is not None and self.train_tokens is not None:
            raise ValueError("give train_iters or train_tokens, not both")
        if self.min_lr is not None and self.min_lr > self.lr:
            raise ValueError(f"min_lr={self.min_lr:g} is above lr={self.lr:g}; the schedule decays "
                             "from lr down to min_lr")
        length = self.lr_decay_iters or self.run_iters
        if length is not None and self.warmup_iters >= length:
            raise ValueError(f"warmup_iters={self.warmup_iters} must be below the {length} iterations the "
                             "learning rate decays over (lr_decay_iters, else the run's length)")
        if self.lr_decay_style == "WSD" and self.lr_wsd_decay_iters is None:
            raise ValueError("lr_decay_style WSD needs lr_wsd_decay_iters: the iterations at the end of the decay "
                             "in which the learning rate falls to min_lr (e.g. a tenth of the run)")
        if self.lr_wsd_decay_iters is not None and self.lr_decay_style != "WSD":
            raise ValueError(f"lr_wsd_decay_iters is used only with lr_decay_style WSD (it is {self.lr_decay_style!r}); "
                             "drop it or set lr_decay_style: WSD")
        if length is not None and self.lr_wsd_decay_iters is not None and self.warmup_iters + self.lr_wsd_decay_iters > length:
            raise ValueError(f"warmup_iters={self.warmup_iters} plus lr_wsd_decay_iters={self.lr_wsd_decay_iters} exceed "
                             f"the {length} iterations the learning rate decays over; shorten the WSD decay")
        return self


class ClusterSpec(_Frozen):
    """A preset name, optionally with inline overrides, or a fully inline cluster."""

    preset: str | None = None
    # an inline cluster's GPU kind (h100, h200, b200, gb200, gb10): its compute, link and memory
    # numbers are that GPU's preset's (spec.clusters.GPU_KINDS)
    gpu: str | None = None
    nodes: Count = 1
    gpus_per_node: Annotated[int, Field(ge=1, le=1024)] | None = None
    # the card's memory (GiB, as nvidia-smi reports it); a plan keeps the presets' headroom below it
    gpu_memory_gib: Annotated[float, Field(gt=0, le=1 << 16)] | None = None
    nvlink_domain: Annotated[int, Field(ge=1, le=1 << 16)] | None = None
    bf16_tflops: Annotated[float, Field(gt=0, le=1e6)] | None = None
    intra_node_busbw_gbps: Annotated[float, Field(gt=0, le=1e6)] | None = None
    inter_node_busbw_gbps: Annotated[float, Field(gt=0, le=1e6)] | None = None
    # the host class: the host's time per tiny CUDA op in microseconds, as the runtime's host probe
    # measures it (run reports' per_rank_host); None: the preset's
    host_launch_us: Annotated[float, Field(gt=0, le=1000)] | None = None


class BackendSpec(_Frozen):
    transformer_engine: bool = True
    megatron: Literal["core_v0.16", "main"] = "core_v0.16"
    # Megatron-LM's default kernel fusions: bias-SwiGLU, bias-dropout-add and, with Transformer
    # Engine, rotary embeddings. False renders --no-bias-swiglu-fusion --no-bias-dropout-fusion
    # --no-rope-fusion, the runtime runs the same unfused ops, and the plan counts what they keep.
    fusions: bool = True


class ParallelPins(_Frozen):
    """Optional pins; every omitted axis is searched."""

    tp: Count | None = None
    pp: Count | None = None
    vpp: Count | None = None
    cp: Count | None = None
    dp: Count | None = None
    ep: Count | None = None
    etp: Count | None = None
    sp: bool | None = None
    # how Megatron splits the layers over pipeline stages: the embedding and the loss each counted as
    # a layer (the first and last stage build one layer fewer), or an explicit layout string with
    # the decoder layers of every (virtual) stage, empty stages allowed (spec/pipeline_layout.py)
    account_for_embedding: bool = False
    account_for_loss: bool = False
    pipeline_layout: Annotated[str, Field(min_length=1, max_length=4096)] | None = None

    @model_validator(mode="after")
    def _one_split(self) -> ParallelPins:
        """transformer_config.py:1307-1324 (megatron-core 0.16.1): a layout string goes alone."""
        if self.pipeline_layout is not None:
            if self.account_for_embedding or self.account_for_loss:
                raise ValueError("parallel.pipeline_layout places the embedding and the loss itself; "
                                 "drop account_for_embedding and account_for_loss")
            stage_layers(self.pipeline_layout)
        return self


# ---- What a real training job reads, writes and where it runs: data, checkpoint, launch ----
# Every value here is user text that ends up in a script: the render quotes each one (shlex.quote)
# and executes none; #SBATCH values, which sbatch parses itself, are held to plain characters.

TokenizerType = Literal["GPT2BPETokenizer", "SentencePieceTokenizer", "GPTSentencePieceTokenizer",
                        "HuggingFaceTokenizer", "Llama2Tokenizer", "TikTokenizer", "NullTokenizer"]
# the tokenizer files each type reads, and the ones it cannot do without (megatron/core/tokenizers/
# text/utils/build_tokenizer.py)
TOKENIZER_READS = {
    "GPT2BPETokenizer": ({"vocab_file", "merge_file"}, {"vocab_file", "merge_file"}),
    "HuggingFaceTokenizer": ({"model", "vocab_file", "merge_file"}, {"model"}),
    "NullTokenizer": (set(), set()),
    **{t: ({"model"}, {"model"}) for t in ("SentencePieceTokenizer", "GPTSentencePieceTokenizer",
                                            "Llama2Tokenizer", "TikTokenizer")},
}
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# What sbatch accepts in each #SBATCH value, without quoting: its own parser reads quotes,
# backslashes and `#`, and a newline would start a line of the script.
SLURM_VALUE = {
    "partition": re.compile(r"[A-Za-z0-9._-]+(,[A-Za-z0-9._-]+)*"),
    "account": re.compile(r"[A-Za-z0-9._-]+"),
    "qos": re.compile(r"[A-Za-z0-9._-]+(,[A-Za-z0-9._-]+)*"),
    "reservation": re.compile(r"[A-Za-z0-9._-]+(,[A-Za-z0-9._-]+)*"),
    "time": re.compile(r"\d+(-\d+)?(:\d+){0,2}|UNLIMITED|INFINITE|unlimited|infinite"),
    "constraint": re.compile(r"[A-Za-z0-9._&|,*\[\]()!:=-]+"),
    "nodelist": re.compile(r"[A-Za-z0-9._,\[\]-]+"),
    "exclude": re.compile(r"[A-Za-z0-9._,\[\]-]+"),
}


def number_from_yaml_text(value: object) -> object:
    """YAML 1.1 reads `3e-4` (an exponent without a dot) as text; take it as the number it spells."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _text_from_number(value: object) -> object:
    """An environment value or an extra argument written as a bare number (NCCL_IB_DISABLE: 1)."""
    return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def _quoted_time(value: object) -> object:
    if isinstance(value, int) and not isinstance(value, bool):
        raise ValueError(f"got the number {value}: YAML reads an unquoted 4:00:00 as 14400; quote the time, "
                         "e.g. time: \"04:00:00\"")
    return value


def _tuples(value: object) -> object:
    """YAML lists as tuples, which the frozen spec keeps."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def _no_nul(text: str) -> str:
    if "\x00" in text:
        raise ValueError("contains a NUL character, which no argument or variable can carry")
    return text


def _megatron_value(text: str) -> str:
    _no_nul(text)
    if text.startswith("-"):
        raise ValueError(f"{text[:60]!r} starts with '-', which Megatron-LM would read as a flag; write ./{text[:60]}")
    return text


Text = Annotated[str, BeforeValidator(_text_from_number), AfterValidator(_no_nul), Field(max_length=4096)]
PathText = Annotated[str, AfterValidator(_megatron_value), Field(min_length=1, max_length=4096)]
Weight = Annotated[float, BeforeValidator(number_from_yaml_text), Field(gt=0, le=1e12)]


class TokenizerSpec(_Frozen):
    """The tokenizer Megatron-LM builds (--tokenizer-type) and the files it reads."""

    type: TokenizerType = "NullTokenizer"  # NullTokenizer: pre-tokenized ids below model.vocab_size
    model: PathText | None = None  # --tokenizer-model: a SentencePiece/TikToken file, or a HuggingFace name or folder
    vocab_file: PathText | None = None
    merge_file: PathText | None = None

    @model_validator(mode="after")
    def _files_the_type_reads(self) -> TokenizerSpec:
        reads, needs = TOKENIZER_READS[self.type]
        given = {k for k in ("model", "vocab_file", "merge_file") if getattr(self, k) is not None}
        if needs - given:
            raise ValueError(f"a {self.type} needs {' and '.join(sorted(needs - given))}")
        if given - reads:
            raise ValueError(f"a {self.type} reads no {' or '.join(sorted(given - reads))}; drop it or change type")
        return self


class DataSpec(_Frozen):
    """What Megatron-LM trains on: Megatron indexed datasets (the prefix of each .bin/.idx pair),
    as a weighted blend or a list, split into train/validation/test, read with one tokenizer."""

    blend: Annotated[tuple[tuple[Weight, PathText], ...], BeforeValidator(_tuples), Field(min_length=1, max_length=100_000)] | None = None
    paths: Annotated[tuple[PathText, ...], BeforeValidator(_tuples), Field(min_length=1, max_length=100_000)] | None = None
    split: Annotated[str, Field(max_length=100)] = "99,1,0"
    tokenizer: TokenizerSpec = TokenizerSpec()
    mock: bool = False  # Megatron-LM's synthetic data with this tokenizer (a benchmark)

    @model_validator(mode="after")
    def _one_source(self) -> DataSpec:
        given = [k for k in ("blend", "paths") if getattr(self, k) is not None]
        if self.mock and given:
            raise ValueError(f"mock trains on synthetic tokens; drop {given[0]} or mock")
        if not self.mock and len(given) != 1:
            raise ValueError("needs blend ([[weight, prefix], ...]) or paths ([prefix, ...])"
                             if not given else "blend and paths both given; keep one")
        if not re.fullmatch(r"\d+(\.\d+)?([,/]\d+(\.\d+)?){0,2}", self.split) or not any(
                float(x) for x in re.split("[,/]", self.split)):
            raise ValueError(f"split {self.split[:40]!r} is not train,validation,test proportions such as \"98,1,1\"")
        return self


class CheckpointSpec(_Frozen):
    """Megatron-LM's checkpoints. A job loads from `save` when it holds a checkpoint (a restarted
    or requeued job continues where it stopped), else from `load`."""

    save: PathText | None = None
    load: PathText | None = None  # None: save
    interval: Annotated[int, Field(ge=1, le=1 << 40)] | None = None  # iterations; None: at the end only
    load_optimizer: bool = True  # false: --no-load-optim
    load_rng: bool = True  # false: --no-load-rng

    @model_validator(mode="after")
    def _somewhere(self) -> CheckpointSpec:
        if self.save is None and self.load is None:
            raise ValueError("needs save, load or both")
        if self.interval is not None and self.save is None:
            raise ValueError(f"interval={self.interval} saves to checkpoint.save, which is not set")
        return self


class SlurmSpec(_Frozen):
    """#SBATCH settings of the job, and the pyxis container its srun runs in."""

    partition: str | None = None
    account: str | None = None
    time: Annotated[str, BeforeValidator(_quoted_time)] | None = None  # minutes, or [D-]HH:MM:SS
    qos: str | None = None
    reservation: str | None = None
    constraint: str | None = None
    nodelist: str | None = None
    exclude: str | None = None
    container_image: Annotated[str, AfterValidator(_no_nul), Field(min_length=1, max_length=4096)] | None = None
    container_mounts: Annotated[list[Annotated[str, AfterValidator(_no_nul), Field(min_length=1, max_length=4096)]],
                                Field(max_length=1000)] = []
    container_workdir: Annotated[str, AfterValidator(_no_nul), Field(min_length=1, max_length=4096)] | None = None

    @model_validator(mode="after")
    def _plain_sbatch_values(self) -> SlurmSpec:
        for key, allowed in SLURM_VALUE.items():
            value = getattr(self, key)
            if value is not None and (len(value) > 1000 or not allowed.fullmatch(value)):
                raise ValueError(f"{key}: {value[:60]!r} is not a Slurm {key} "
                                 "(letters, digits and . _ - , only; no spaces, quotes or #)")
        for mount in self.container_mounts:
            if "," in mount:
                raise ValueError(f"container_mounts: {mount[:60]!r} holds a comma; give each "
                                 "SRC:DST[:FLAGS] as its own list item")
        if (self.container_mounts or self.container_workdir) and self.container_image is None:
            raise ValueError("container_mounts and container_workdir need container_image")
        return self


class LaunchSpec(_Frozen):
    """How the job is started: more Megatron-LM flags, its environment, and Slurm's settings."""

    # appended to the Megatron-LM command after megacpp's own flags; each flag is checked against
    # the dialect's parser, and one that restates what the spec decides is refused
    extra_args: Annotated[list[Text], Field(max_length=1000)] = []
    env: Annotated[dict[str, Text], Field(max_length=1000)] = {}
    slurm: SlurmSpec = SlurmSpec()

    @model_validator(mode="after")
    def _args_and_names(self) -> LaunchSpec:
        args = self.extra_args
        if args and not args[0].startswith("--"):
            raise ValueError(f"extra_args must start with a --flag, not {args[0][:60]!r}")
        if "--" in args:
            raise ValueError("extra_args: a bare '--' would end Megatron-LM's options; drop it")
        for name in self.env:
            if not ENV_NAME.fullmatch(name):
                raise ValueError(f"env: {name[:60]!r} is not an environment variable name "
                                 "(letters, digits and _, not starting with a digit)")
        return self


class Spec(_Frozen):
    name: str = "unnamed"
    model: ModelSpec
    training: TrainingSpec
    cluster: ClusterSpec
    backend: BackendSpec = BackendSpec()
    parallel: ParallelPins = ParallelPins()
    data: DataSpec | None = None  # None: the launch is Megatron-LM's mock-data benchmark
    checkpoint: CheckpointSpec | None = None
    launch: LaunchSpec = LaunchSpec()

    @model_validator(mode="after")
    def _name_is_printable(self) -> Spec:
        if len(self.name) > 200 or not self.name.isprintable():
            raise ValueError("name must be printable text of at most 200 characters")
        return self

    @model_validator(mode="after")
    def _overlaps_are_possible(self) -> Spec:
        if self.training.tp_comm_overlap and not self.backend.transformer_engine:
            raise ValueError("training.tp_comm_overlap needs backend.transformer_engine: true (the overlap is "
                             "Transformer Engine's userbuffers); set tp_comm_overlap: false")
        moe = self.model.moe
        if moe is not None and moe.overlap_communication:
            if self.training.recompute == "full":
                raise ValueError("model.moe.overlap_communication does not run under training.recompute: full "
                                 "(transformer_config.py:3021-3023); use selective or none")
            if not self.model.parsed.is_plain_transformer:
                raise ValueError("model.moe.overlap_communication needs a plain AD/AE stack: only Megatron's GPT "
                                 "model builds the combined 1F1B schedule (gpt_model.py build_schedule_plan); set it false")
        return self

    @model_validator(mode="after")
    def _cuda_graphs_fit_the_model(self) -> Spec:
        """What megatron-core 0.16.1 asserts of the graphed modules (transformer_config.py
        __post_init__, "Check cuda graph scopes") and of the capture implementation (arguments.py
        --cuda-graph-scope: modules through Transformer Engine's capture, full_iteration through
        megatron-core's own)."""
        graphs, letters = self.training.cuda_graphs, self.model.parsed.letters
        where = f"training.cuda_graphs={graphs if isinstance(graphs, str) else list(graphs)}"
        if isinstance(graphs, tuple):
            needs = {"moe": "E", "moe_router": "E", "moe_preprocess": "E", "mlp": "D", "mamba": "M", "attn": "A"}
            missing = [m for m in graphs if needs[m] not in letters]
            if missing:
                raise ValueError(f"{where}: the pattern has no {needs[missing[0]]} blocks for {missing[0]}")
            if not self.backend.transformer_engine:
                raise ValueError(f"{where}: per-module graphs are captured by Transformer Engine "
                                 "(--cuda-graph-impl transformer_engine); set backend.transformer_engine: true "
                                 "or cuda_graphs: layers")
        captures_moe = graphs == "layers" or (isinstance(graphs, tuple) and "moe" in graphs)
        if captures_moe and "E" in letters and (self.model.moe is None or self.model.moe.capacity_factor is None):
            raise ValueError(f"{where}: a captured MoE layer needs drop-and-pad routing (static shapes); "
                             "set model.moe.capacity_factor")
        if self.training.recompute == "full" and graphs not in ("none", "full_iteration"):
            raise ValueError(f"{where}: full recompute is only supported with full_iteration CUDA graphs")
        return self

    @model_validator(mode="after")
    def _pipeline_split_fits_the_model(self) -> Spec:
        """A layout string lists every decoder layer once (pipeline_parallel_layer_layout.py:86-151);
        neither it nor the account flags apply to hybrid stacks (arguments.py:813-838 on main; core_v0.16's
        MambaStack ignores them) or to `|` cuts in the pattern, which pin the split already."""
        pins, parsed = self.parallel, self.model.parsed
        named = [k for k in ("pipeline_layout", "account_for_embedding", "account_for_loss") if getattr(pins, k)]
        if not named:
            return self
        if not parsed.is_plain_transformer:
            raise ValueError(f"parallel.{named[0]} applies to plain AD/AE stacks (Megatron's GPT model); "
                             "a hybrid stack pins its stages with `|` in the pattern")
        if parsed.cuts:
            raise ValueError(f"parallel.{named[0]} and `|` cuts in model.pattern both pin the stage split; keep one")
        if pins.pipeline_layout is not None:
            layers = sum(stage_layers(pins.pipeline_layout))
            if layers != len(parsed.blocks) // 2:
                raise ValueError(f"parallel.pipeline_layout has {layers} decoder layers (t) but the pattern has "
                                 f"{len(parsed.blocks) // 2}; list every layer once")
            mtp, want = mtp_layers(pins.pipeline_layout), self.model.mtp_num_layers
            if mtp and not want:
                raise ValueError(f"parallel.pipeline_layout places {mtp} MTP layer(s) (m) but model.mtp_num_layers is 0; "
                                 "drop m or set mtp_num_layers")
            if mtp and mtp != want:
                raise ValueError(f"parallel.pipeline_layout places {mtp} MTP layer(s) (m) but model.mtp_num_layers is "
                                 f"{want}; write m {want} times, or none to keep them with the loss")
        return self

    @property
    def pattern(self) -> Pattern:
        return self.model.parsed


