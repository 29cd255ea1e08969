"""Frozen pydantic models for every key of the spec YAML contract (DESIGN.md "Spec YAML").

Specs are inputs: nothing derived is ever written back into them. Cross-field checks that
depend only on the spec (not on a layout) live here; layout legality lives in `rules/`.
"""

from __future__ import annotations

from functools import cached_property
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from megacpp.planner.spec.pattern import Pattern, parse_pattern

# Bounds keep absurd values out with a message naming the key. They are generous: the
# largest published models are well inside them.
Count = Annotated[int, Field(ge=1, le=1 << 20)]
Dim = Annotated[int, Field(ge=1, le=1 << 20)]
Tokens = Annotated[int, Field(ge=1, le=1 << 24)]
Vocab = Annotated[int, Field(ge=1, le=1 << 24)]


# Each sub-block key of model and the pattern letter that needs it.
SUB_BLOCK_LETTERS = {"attention": "A", "mamba": "M", "moe": "E", "mlp": "D", "recurrent": "R"}


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False)


class AttentionSpec(_Frozen):
    """Self-attention (A): grouped-query attention. MLA is not modelled yet."""

    num_heads: Dim
    num_query_groups: Dim | None = None  # None: one group per head (MHA)
    head_dim: Dim | None = None  # None: hidden_size / num_heads

    @model_validator(mode="after")
    def _groups_divide_heads(self) -> AttentionSpec:
        if self.num_query_groups is not None and self.num_heads % self.num_query_groups:
            raise ValueError(
                f"num_query_groups={self.num_query_groups} must divide num_heads={self.num_heads}"
            )
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

    @model_validator(mode="after")
    def _topk_within_experts(self) -> MoESpec:
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k={self.top_k} exceeds num_experts={self.num_experts}")
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
    attention: AttentionSpec | None = None
    mamba: MambaSpec | None = None
    moe: MoESpec | None = None
    mlp: MLPSpec | None = None
    recurrent: RecurrentSpec | None = None

    @cached_property
    def parsed(self) -> Pattern:
        return parse_pattern(self.pattern)

    @model_validator(mode="after")
    def _sub_blocks_match_pattern(self) -> ModelSpec:
        parsed = parse_pattern(self.pattern)
        for key, letter in SUB_BLOCK_LETTERS.items():
            if letter in parsed.letters and getattr(self, key) is None:
                raise ValueError(f"the pattern uses {letter} blocks, so model.{key} is required")
        if self.attention and self.attention.head_dim is None and self.hidden_size % self.attention.num_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by attention.num_heads="
                f"{self.attention.num_heads}; set attention.head_dim"
            )
        m = self.mamba
        if m and "M" in parsed.letters:
            heads = self.mamba_heads
            if m.num_heads is None and (2 * self.hidden_size) % m.head_dim:
                raise ValueError(f"2*hidden_size={2 * self.hidden_size} is not divisible by mamba.head_dim={m.head_dim}")
            if heads % m.num_groups:
                raise ValueError(f"mamba heads={heads} must be divisible by mamba.num_groups={m.num_groups}")
        return self

    @property
    def head_dim(self) -> int:
        a = self.attention
        assert a is not None
        return a.head_dim or self.hidden_size // a.num_heads

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
        letters = self.parsed.letters
        return [k for k, letter in SUB_BLOCK_LETTERS.items() if getattr(self, k) is not None and letter not in letters]


class TrainingSpec(_Frozen):
    seq_length: Tokens
    global_batch_size: Annotated[int, Field(ge=1, le=1 << 24)]
    micro_batch_size: Annotated[int, Field(ge=1, le=1 << 16)] | Literal["auto"] = 1
    precision: Literal["bf16", "fp8"] = "bf16"
    recompute: Literal["none", "selective", "full"] = "none"
    distributed_optimizer: bool = True


class ClusterSpec(_Frozen):
    """A preset name, optionally with inline overrides, or a fully inline cluster."""

    preset: str | None = None
    nodes: Count = 1
    gpus_per_node: Annotated[int, Field(ge=1, le=1024)] | None = None
    gpu_memory_gib: Annotated[float, Field(gt=0, le=1 << 16)] | None = None
    nvlink_domain: Annotated[int, Field(ge=1, le=1 << 16)] | None = None
    bf16_tflops: Annotated[float, Field(gt=0, le=1e6)] | None = None
    intra_node_busbw_gbps: Annotated[float, Field(gt=0, le=1e6)] | None = None
    inter_node_busbw_gbps: Annotated[float, Field(gt=0, le=1e6)] | None = None


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


class Spec(_Frozen):
    name: str = "unnamed"
    model: ModelSpec
    training: TrainingSpec
    cluster: ClusterSpec
    backend: BackendSpec = BackendSpec()
    parallel: ParallelPins = ParallelPins()

    @model_validator(mode="after")
    def _name_is_printable(self) -> Spec:
        if len(self.name) > 200 or not self.name.isprintable():
            raise ValueError("name must be printable text of at most 200 characters")
        return self

    @property
    def pattern(self) -> Pattern:
        return self.model.parsed


