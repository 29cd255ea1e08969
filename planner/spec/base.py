"""The base of every spec model (frozen, strict, no unknown keys, no inf or NaN) and the value
types several of them share."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False)


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
