"""Frozen pydantic models for the spec YAML contract (DESIGN.md "Spec YAML"): the model, cluster,
backend and parallel keys and the Spec itself; training keys are in training.py, data, checkpoint
and launch keys in job.py.

Specs are inputs: nothing derived is ever written back into them. Cross-field checks that
depend only on the spec (not on a layout) live here; layout legality lives in `rules/`.
"""

from __future__ import annotations

from functools import cached_property
from typing import Annotated, Literal

from pydantic import (
    Field,
    model_validator,
)

from megacpp.planner.errors import SpecError
from megacpp.planner.spec.base import Count, Dim, Vocab
from megacpp.planner.spec.base import Frozen as _Frozen
from megacpp.planner.spec.job import CheckpointSpec, DataSpec, LaunchSpec
from megacpp.planner.spec.pattern import Pattern, parse_pattern
from megacpp.planner.spec.pipeline_layout import mtp_layers, stage_layers
from megacpp.planner.spec.training import TrainingSpec

# Each sub-block key of model and the pattern letter that needs it.
SUB_BLOCK_LETTERS = {"attention": "A", "mamba": "M", "moe": "E", "mlp": "D", "recurrent": "R"}


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
    # pad every expert's input up to its capacity (--moe-pad-expert-input-to-capacity): static
    # shapes, and each expert runs capacity_factor times its balanced share of the tokens
    pad_to_capacity: bool = False
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
    # group-limited routing (--moe-router-num-groups, --moe-router-group-topk): the experts in
    # router_num_groups equal groups, each token's top_k drawn from router_group_topk of them;
    # node-limited when the groups are the EP group's nodes (DeepSeek-V3: 8 and 4)
    router_num_groups: Dim | None = None
    router_group_topk: Dim | None = None

    @model_validator(mode="after")
    def _topk_within_experts(self) -> MoESpec:
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k={self.top_k} exceeds num_experts={self.num_experts}")
        self._check_groups()
        if self.pad_to_capacity and self.capacity_factor is None:
            raise ValueError("pad_to_capacity pads to the capacity model.moe.capacity_factor sets "
                             "(transformer_config.py:1131-1134); set capacity_factor")
        if self.pad_to_capacity and self.dispatcher == "flex" and self.flex_backend == "deepep":
            raise ValueError("pad_to_capacity does not run with the flex dispatcher's deepep backend "
                             "(transformer_config.py:1074-1081); use flex_backend: hybridep or dispatcher: alltoall")
        if self.overlap_communication and self.dispatcher == "allgather":
            raise ValueError("overlap_communication needs the alltoall or flex dispatcher, not allgather "
                             "(transformer_config.py:3016-3019); set dispatcher: alltoall")
        return self

    def _check_groups(self) -> None:
        """Megatron's group-limited routing rules (transformer_config.py:1643-1661), and a pool of
        experts in the chosen groups no smaller than top_k (moe_utils.group_limited_topk would pick
        masked-out experts)."""
        groups, chosen = self.router_num_groups, self.router_group_topk
        if groups is None and chosen is None:
            return
        if groups is None or chosen is None:
            raise ValueError("router_num_groups and router_group_topk go together (group-limited routing); "
                             "set both or neither")
        if self.num_experts % groups:
            raise ValueError(f"router_num_groups={groups} must divide num_experts={self.num_experts}")
        if chosen > groups:
            raise ValueError(f"router_group_topk={chosen} exceeds router_num_groups={groups}")
        if chosen * (self.num_experts // groups) < self.top_k:
            raise ValueError(f"router_group_topk={chosen} groups of {self.num_experts // groups} experts hold fewer "
                             f"than top_k={self.top_k}; raise router_group_topk or lower router_num_groups")


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


