"""The spec's training keys (DESIGN.md "Spec YAML"): batch and sequence, precision, recompute,
memory features, the optimizer and the schedule, and their cross-field checks.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from megacpp.planner.spec.base import CudaGraphModule, OffloadModule, RecomputeModule, StateDtype, Tokens
from megacpp.planner.spec.base import Frozen as _Frozen


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
    # whole-layer CPU offloading (--cpu-offloading-num-layers): the saved activations of the first
    # offload_layers transformer layers go to host memory during the forward (Transformer Engine's
    # cpu offload context, transformer_block.py)
    offload_layers: Annotated[int, Field(ge=1, le=1 << 16)] | None = None
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
        if self.offload_layers is not None and self.offload_modules is not None:
            raise ValueError("training.offload_layers and training.offload_modules are two kinds of activation offloading "
                             "Megatron will not combine (transformer_config.py); keep one")
        if self.offload_layers is not None and self.recompute != "none":
            raise ValueError(f"training.offload_layers does not work with recompute: {self.recompute} (Megatron refuses CPU "
                             "offloading with activation recomputation, transformer_config.py); set recompute: none or drop offload_layers")
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
