"""Activation bytes per block: what one rank keeps per token of a micro-batch for the backward,
under Megatron's recompute modules, FP8 casts and activation offloading; sources per formula.
"""

from __future__ import annotations

from megacpp.planner.cost.blocks import (
    BF16,
    FP32,
    RECURRENT_CHUNK,
    UNFUSED_KEPT_BYTES,
    expert_load,
    expert_width,
    mamba_dims,
)
from megacpp.planner.search.layout import Context, Layout


def norm_stats_bytes(ctx: Context) -> int:
    """Per-token statistics a norm keeps for backward: fp32 rstd (RMSNorm), fp32 mean and rstd (LayerNorm)."""
    return FP32 if ctx.spec.model.normalization == "rmsnorm" else 2 * FP32


def mlp_saved_bytes(f: float, gated: bool, fused: bool) -> float:
    """What megatron-core's MLP (transformer/mlp.py) keeps per token between fc1 and fc2. Gated
    with Megatron-LM's default bias-SwiGLU fusion (fused_bias_swiglu.SwiGLUFunction and its
    probability-weighted twin for experts): the fc1 output (2f) and the product, the fc2 input
    (f): 3f bf16. Gated unfused (backend.fusions false): the fc1 output (2f, kept whole by the
    silu's view of it), silu(x_glu), x_linear + glu_linear_offset (a new tensor even at offset 0)
    and their product: 5f. Plain (no fusion without biases): the fc1 output and the activation:
    2f. Read off benchmarks/activation_audit.py."""
    if not gated:
        return BF16 * f * 2
    return BF16 * f * (3 if fused else 5)


def expert_backward_bytes(ctx: Context, lay: Layout, load: float = 1.0) -> float:
    """Bytes of gradients an E block's backward holds at once per local token (after CP) of one
    micro-batch, beside the activations it kept: 7f bf16 per routed token (three tensors of 2f
    and one of f), gated or not: the blocks the backward held at the peak with launch
    --memory-peak (gpu_runs_h200x2_te_trace2.json, gpu_runs_h200x1_expert_grads.json). Those are
    TE's grouped experts, which run every local expert at once; the local modules' SequentialMLP
    runs them one after another, so its backward holds one expert's share."""
    moe = ctx.spec.model.moe
    if moe is None:
        return 0.0
    f = moe.ffn_hidden_size / lay.etp
    factor = 1 / lay.tp if lay.sp else 1.0  # routed tokens per rank follow the SP shard
    at_once = 1.0 if ctx.te else lay.ep / moe.num_experts
    return moe.top_k * lay.etp * BF16 * 7 * f * expert_load(ctx, load) * factor * at_once


def recompute_modules(ctx: Context) -> frozenset[str]:
    """The modules selective recompute drops (training.recompute_modules, or Megatron's default
    core_attn: transformer_config.py recompute_modules); none without selective recompute."""
    training = ctx.spec.training
    if training.recompute != "selective":
        return frozenset()
    return frozenset(training.recompute_modules or ("core_attn",))


def offload_modules(ctx: Context) -> frozenset[str]:
    """The modules whose saved inputs fine-grained activation offloading moves to the host."""
    return frozenset(ctx.spec.training.offload_modules or ())


def fp8_recipe(ctx: Context) -> str | None:
    """The FP8 scaling recipe a run trains with under training.precision fp8: training.fp8_recipe,
    by default Megatron-LM's own default, delayed scaling (transformer_config.py fp8_recipe); None
    for bf16 and fp4."""
    training = ctx.spec.training
    return training.fp8_recipe if training.precision == "fp8" else None


def fp8_casts(ctx: Context) -> bool:
    """Whether Transformer Engine's linears keep an FP8 copy of their input for the backward (one
    byte per element, the cast their FP8 GEMM ran on: transformer_engine/pytorch/module/linear.py
    saves the quantized input, columnwise for the weight gradient) instead of the bf16 one. NVFP4
    keeps its 4-bit copy with per-16-element scales and its columnwise transpose; priced at the
    same byte per element."""
    return ctx.te and ctx.spec.training.precision in ("fp8", "fp4")


def _separate_norm_bytes(ctx: Context, h: int, recomputed: bool) -> float:
    """A norm module of its own per token: its input and statistics, and its bf16 output, which
    the next module saves. Under layernorm recompute (CheckpointWithoutOutput,
    transformer_layer.py) the output is dropped after the forward and rebuilt from the input."""
    return BF16 * h if recomputed else BF16 * 2 * h + norm_stats_bytes(ctx)


def _fused_norm_bytes(ctx: Context, h: int, cast: float) -> float:
    """A norm fused into the next linear (TE's LayerNormLinear): its input and statistics, and
    the normalised input the linear keeps (FP8 under FP8: the fused kernel writes the cast)."""
    return BF16 * h + cast * h + norm_stats_bytes(ctx)


def _expert_act_bytes(ctx: Context, f: float, recomputed: bool, cast: float) -> tuple[float, float]:
    """Per routed token of a TEGroupedMLP (experts.py): (what the activation function keeps, what
    fc2 keeps of its input). Under moe_act recompute the activation keeps its input, fc1's output,
    and fc2 keeps nothing of its own (the output is dropped and rebuilt; under FP8 fc2 is told to
    keep the original, set_save_original_input)."""
    moe = ctx.spec.model.moe
    assert moe is not None
    if recomputed:
        return BF16 * f * (2 if moe.gated else 1), 0.0
    saved = mlp_saved_bytes(f, moe.gated, ctx.fused)
    if moe.gated and ctx.fused:
        # the fused weighted SwiGLU's product is fc2's input, inside mlp_saved_bytes
        return saved - BF16 * f, cast * f
    # the probability-scaled activation is fc2's input (the experts apply probs before fc2)
    return saved, cast * f


def block_activation_bytes(ctx: Context, letter: str, lay: Layout, load: float = 1.0, recompute: str | None = None,
                           fp8: bool | None = None) -> float:
    """Bytes one rank keeps per local token (after CP) of one micro-batch for one block, before
    any activation offloading (offload_bytes says what leaves the GPU).

    The split follows Korthikanti et al. [R36]: tensors inside the TP region are divided by TP;
    with SP the rest is divided by TP too. The tensors themselves are what autograd keeps in
    megatron-core 0.16.1's local modules (benchmarks/activation_audit.py lists them per block; the
    runtime trains with dropout 0, so no dropout masks). Full recompute keeps only the block input;
    selective recompute drops what its modules name (recompute_modules; core_attn keeps core
    attention's inputs instead of its score tensors). With FP8, TE's linears keep one-byte casts
    of their inputs (fp8_casts). `recompute` overrides the spec's recompute and prices the block in
    bf16 with the default modules (what a recomputed block holds again during its backward is its
    "none"; the small kernels' traffic, cost.step); `fp8` overrides the casts.
    """
    model = ctx.spec.model
    h, t = model.hidden_size, lay.tp
    outside = 1 / t if lay.sp else 1.0  # norm inputs and the linear inputs after them
    if recompute is None:
        recompute, modules, offloaded = ctx.spec.training.recompute, recompute_modules(ctx), offload_modules(ctx)
        fp8 = fp8_casts(ctx) if fp8 is None else fp8
    else:
        modules, offloaded = frozenset({"core_attn"} if recompute == "selective" else ()), frozenset()
        fp8 = bool(fp8)
    if recompute == "full":
        return BF16 * h * outside
    cast = 1.0 if fp8 else float(BF16)  # bytes of an input a TE linear keeps
    layernorm = "layernorm" in modules
    if letter == "A":
        return sum(_attention_parts(ctx, lay, modules, fp8).values())
    if letter == "D":
        mlp = model.mlp
        assert mlp is not None
        # TE fuses the pre-MLP norm into fc1; the local spec has a norm module of its own
        norm = _fused_norm_bytes(ctx, h, cast) if ctx.te else _separate_norm_bytes(ctx, h, layernorm)
        if "mlp" in modules:
            # the MLP checkpointed whole (transformer_layer.py recompute_mlp): it keeps its input,
            # the layer's hidden states with TE, the norm's output otherwise
            return (BF16 * h if ctx.te else norm) * outside
        f = mlp.ffn_hidden_size / t
        return norm * outside + mlp_saved_bytes(f, mlp.gated, ctx.fused) - (BF16 - cast) * f  # fc2's input cast
    if letter == "E":
        moe = model.moe
        assert moe is not None
        # pre_mlp_layernorm is a norm module of its own under either spec (TENorm with TE); the
        # router, the shared expert and the dispatcher read its output
        norm = _separate_norm_bytes(ctx, h, layernorm) * outside
        if "moe" in modules:
            return norm  # the MoE layer checkpointed whole (moe_layer.py): it keeps its input, the norm's output
        f, e = moe.ffn_hidden_size / lay.etp, lay.etp
        # per routed token: the expert's input (its FP8 cast, or the bf16 original that offloading
        # expert_fc1 keeps: set_save_original_input), its fp32 routing probability, the activation's
        # tensors and fc2's input (the probability-scaled activation unless the fused SwiGLU weights
        # its output itself)
        act, fc2_in = _expert_act_bytes(ctx, f, "moe_act" in modules, cast)
        fc1_in = BF16 if "expert_fc1" in offloaded else cast
        w = expert_width(ctx)
        routed = moe.top_k * e * (fc1_in * w + FP32 + act + fc2_in)
        # router: fp32 scores and aux-loss scores, the dispatcher's bool map and fp32 probs per
        # expert; int64 top-k indices (twice), fp32 top-k probs, int64 permutation indices
        router = (3 * FP32 + 1) * moe.num_experts + (3 * 8 + FP32) * moe.top_k
        shared = 0.0
        if moe.shared_expert_ffn_hidden_size and "shared_experts" not in modules:
            fs = moe.shared_expert_ffn_hidden_size / t
            shared = mlp_saved_bytes(fs, moe.gated, ctx.fused) - (BF16 - cast) * fs
            if fp8 and not layernorm:
                shared += cast * h * outside  # its fc1's FP8 cast of the norm's output
        factor = 1 / t if lay.sp else 1.0  # routed tokens per rank follow the SP shard
        # latent MoE: fc2_latent_proj keeps its input, the combined latent output (bf16; fc1_latent_proj's
        # input is the norm's output above)
        projected = BF16 * w if moe.latent_size else 0.0
        return norm + (routed * expert_load(ctx, load) + router + projected) * factor + shared
    if letter == "M":
        d_inner, heads, groups, state, _ = mamba_dims(ctx)
        # what autograd keeps in MambaMixer's training path (mamba_split_conv1d_scan_combined, the
        # memory-efficient kernel: conv and chunk states are recomputed in backward), measured with
        # benchmarks/activation_audit.py --cuda on one H200 (53412 B per token at h 2048, d_inner
        # 4096, 8 groups, state 128, 64 heads; exact): the contiguous in_proj output zxBCdt, the
        # scan output, its contiguous (l b d) copy that the gated RMSNorm keeps, the norm's output
        # (out_proj's input, cast under FP8), all bf16 d_inner wide, and the norm's fp32 rstd per
        # group. TE fuses the layer's norm into in_proj; MambaLayer has no layernorm recompute.
        norm = _fused_norm_bytes(ctx, h, cast) if ctx.te else _separate_norm_bytes(ctx, h, False)
        inside = BF16 * ((2 * d_inner + 2 * groups * state + heads) + 2 * d_inner) + cast * d_inner + FP32 * groups
        return norm * outside + inside / t
    if letter == "R":
        r = model.recurrent
        assert r is not None
        norm_and_input = _separate_norm_bytes(ctx, h, False) * outside
        heads, d, c = r.num_heads / t, r.head_dim, RECURRENT_CHUNK
        d_r, chunks = heads * d, ctx.seq / lay.cp / c
        # what autograd keeps in runtime/worker/recurrent.py, per token (benchmarks/activation_audit.py):
        # fp32: q, k and v as read by the chunked scan and their decay-weighted copies, the output
        # (9 x d_r); the in-chunk scores, decay mask and their product (3 x heads x chunk); the
        # decay logits and their logsigmoid, two decay exponentials, the norm's rstd (5 x heads);
        # the chunk states and their carried sums (2 x d_r x d / chunk); the chunk-to-chunk decay
        # (heads x chunks / chunk). bf16: the in_proj output (4 d_r + heads, kept whole by the
        # gate's view), the cast output, silu(gate) and two gated products (4 x d_r).
        kept = (FP32 * (9 * d_r + 3 * heads * c + 5 * heads + 2 * d_r * d / c + heads * chunks / c)
                + BF16 * (4 * d_r + heads + 4 * d_r))
        return norm_and_input + kept
    raise ValueError(letter)


def _attention_parts(ctx: Context, lay: Layout, modules: frozenset[str], fp8: bool) -> dict[str, float]:
    """What an A block keeps per local token, by where it is kept: the norm (TE fuses it into
    linear_qkv, input_layernorm an IdentityOp untouched by layernorm recompute), the unfused
    rotary tables, what core attention keeps of q, k and v, its scores (unfused), and its output."""
    model = ctx.spec.model
    if model.latent:
        return latent.latent_parts(ctx, lay, modules, fp8)
    h, t = model.hidden_size, lay.tp
    outside = 1 / t if lay.sp else 1.0
    cast = 1.0 if fp8 else float(BF16)
    d, heads, groups = model.head_dim, model.attention.num_heads, model.query_groups  # type: ignore[union-attr]
    norm = _fused_norm_bytes(ctx, h, cast) if ctx.te else _separate_norm_bytes(ctx, h, "layernorm" in modules)
    core = "core_attn" in modules
    # rotary: unfused, cos and sin tables for q and for k, per sequence position
    # (rope_utils.py); TE's fused kernel keeps only the rotary table, made once per run
    unfused_rope = model.position_embedding == "rope" and not (ctx.te and ctx.fused)
    rope = 4 * BF16 * d / lay.micro_batch_size if unfused_rope else 0.0
    heads_r, groups_r = heads / t, max(groups, t) / t
    qkv = (heads_r + 2 * groups_r) * d  # what the fused qkv projection writes
    rotated = model.position_embedding == "rope"
    view = True
    if ctx.te and not core:
        kept = qkv  # TE's fused attention keeps q, k, v and its output
    else:
        # Under selective recompute TE's core attention is checkpointed alike: its inputs, the
        # rotated q and k and v, a view that keeps the whole qkv output alive (the peak's
        # rotary and qkv outputs, gpu_runs_h100x1_te_blind7_peak.json).
        # dot_product_attention.py: q and k are new tensors after rotary, else views of the qkv
        # output; with GQA k and v are repeated to every head (new tensors). A view keeps the
        # whole qkv output alive. Selective recompute keeps core attention's inputs (before
        # the repeat) instead.
        if core:
            new, view = ((heads_r + groups_r) * d if rotated else 0.0), True
        elif groups_r < heads_r:
            new, view = (3 if rotated else 2) * heads_r * d, not rotated
        else:
            new, view = (2 * heads_r * d if rotated else 0.0), True
        kept = new + (qkv if view else 0.0)
    qk_norms = 0.0
    if model.attention.qk_layernorm:  # type: ignore[union-attr]
        # the query and key norms keep their inputs (views that hold the whole qkv output, unless
        # counted above) and a statistic per head, and their outputs are new tensors that what
        # follows keeps (an estimate from megatron-core's module order, attention.py
        # get_query_key_value_tensors; not yet measured on a GPU)
        whole = (ctx.te and not core) or view
        qk_norms = BF16 * ((0.0 if whole else qkv) + (heads_r + groups_r) * d) + (heads_r + groups_r) * norm_stats_bytes(ctx)
    scores = 0.0
    if not ctx.te and not core:
        # unfused: fp32 softmax output and its bf16 copy, both kept for backward (UNFUSED_KEPT_BYTES)
        scores = UNFUSED_KEPT_BYTES * heads_r * ctx.seq / lay.cp
    # core attention's output, kept by linear_proj (and by TE's fused attention: the same bf16
    # tensor); under FP8 linear_proj keeps its one-byte cast beside the bf16 output the fused
    # attention still needs, unless core attention is recomputed
    width = heads_r * d
    output = BF16 * width if not fp8 else width * (1.0 + (0.0 if core else BF16))
    return {"norm": norm * outside, "rope": rope, "core": BF16 * kept + scores + qk_norms, "output": output}


def offload_bytes(ctx: Context, letter: str, lay: Layout, load: float = 1.0) -> dict[str, float]:
    """What each offloaded module of training.offload_modules moves off the GPU per local token
    of one micro-batch for one block: the tensors saved inside that module's forward
    (fine_grained_activation_offload.py packs every tensor saved under the module's context), as
    block_activation_bytes counts them. A module the block lacks, or a norm Transformer Engine
    fuses into the next linear, moves nothing."""
    listed = offload_modules(ctx)
    if not listed:
        return {}
    model = ctx.spec.model
    modules = recompute_modules(ctx)
    h, t = model.hidden_size, lay.tp
    outside = 1 / t if lay.sp else 1.0
    fp8 = fp8_casts(ctx)
    cast = 1.0 if fp8 else float(BF16)
    layernorm = "layernorm" in modules
    out: dict[str, float] = {}
    if letter == "A":
        parts = _attention_parts(ctx, lay, modules, fp8)
        if ctx.te:
            # TE's LayerNormLinear keeps the norm's input and output (its statistics are below
            # min_offloaded_tensor_size and stay)
            out["qkv_linear"] = (BF16 + cast) * h * outside
        else:
            out["attn_norm"] = BF16 * h * outside
            out["qkv_linear"] = 0.0 if layernorm else BF16 * h * outside
        out["core_attn"] = parts["core"]
        out["attn_proj"] = parts["output"]
    elif letter == "D" and not ctx.te:
        out["mlp_norm"] = BF16 * h * outside
    elif letter == "E" and model.moe is not None and "moe" not in modules:
        moe = model.moe
        f = moe.ffn_hidden_size / lay.etp
        per_routed = moe.top_k * lay.etp * expert_load(ctx, load) * (1 / t if lay.sp else 1.0)
        out["mlp_norm"] = BF16 * h * outside
        out["expert_fc1"] = per_routed * BF16 * expert_width(ctx)
        out["moe_act"] = per_routed * _expert_act_bytes(ctx, f, "moe_act" in modules, cast)[0]
    elif letter == "E":
        out["mlp_norm"] = BF16 * h * outside
    return {m: b for m, b in out.items() if m in listed and b > 0}


# multi-latent attention's formulas (latent.py builds on these)
from megacpp.planner.cost import latent  # noqa: E402
