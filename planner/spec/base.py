"""The base of every spec model (frozen, strict, no unknown keys, no inf or NaN) and the value
types several of them share."""

from __future__ import annotations

import types
from functools import cache
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, model_validator


def number_from_yaml_text(value: object) -> object:
    """YAML 1.1 reads `3e-4` (an exponent without a dot) as text; take it as the number it spells."""
    if isinstance(value, str) and value.isascii():  # float() also reads other scripts' digits
        try:
            return float(value)
        except ValueError:
            return value
    return value


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _yaml_exponents(cls, data: Any) -> Any:
        """Every number field takes `3e-4` as the number YAML 1.1 would not read it as."""
        numbers = _number_fields(cls)
        if not numbers or not isinstance(data, dict):
            return data
        return {key: number_from_yaml_text(value) if key in numbers else value for key, value in data.items()}


@cache
def _number_fields(model: type[BaseModel]) -> frozenset[str]:
    """The fields of `model` that hold a float (or nothing) and never text."""
    def numeric(annotation: Any) -> bool:
        members = get_args(annotation) if get_origin(annotation) in (Union, types.UnionType) else (annotation,)
        bare = [get_args(m)[0] if get_origin(m) is Annotated else m for m in members]
        return float in bare and all(m in (float, int, type(None)) for m in bare)

    return frozenset(name for name, field in model.model_fields.items() if numeric(field.annotation))


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
