"""Per-block cost functions: each block letter owns its parameter, FLOP and activation formulas.

Parameter counts follow what megatron-core 0.16.1 instantiates on one rank (local and TE specs
hold the same counts: TE fuses the pre-norm into the following linear). FLOPs are forward FLOPs
per token for the whole (unsharded) block. Activation bytes are what one rank keeps per token of
a micro-batch for the backward pass; sources are given per formula.
"""

from __future__ import annotations

from dataclasses import dataclass

from megacpp.planner.search.layout import Context, Layout

BF16 = 2
FP32 = 4
SSD_CHUNK = 128  # Mamba-2 SSD chunk size: MambaMixer(chunk_size=128), megatron/core/ssm/mamba_mixer.py:164
RECURRENT_CHUNK = 64  # megacpp runtime R block: state checkpoint every 64 tokens
# megatron-core's local (unfused) DotProductAttention on the torch softmax path
# (fusions/fused_softmax.py forward_torch_softmax): scores go to fp32, softmax keeps its fp32
# output and the bf16 cast of it feeds the PV matmul, so 4 + 2 bytes per score stay for backward
# (the per-micro-batch growth of the PP runs' memory_phases, gpu_runs_h200x8.json).
UNFUSED_KEPT_BYTES = FP32 + BF16


def unfused_scores(ctx: Context, lay: Layout) -> float:
    """Attention score elements of one micro-batch on one rank (heads/TP x s x s); 0 with TE (fused)."""
    if ctx.te or "A" not in ctx.letters:
        return 0.0
    heads = ctx.spec.model.attention.num_heads  # type: ignore[union-attr]
    s = ctx.seq / lay.cp
    return lay.micro_batch_size * heads / lay.tp * s * s


@dataclass(frozen=True)
class BlockParams:
    dense: int  # replicated over DP (x CP) and sharded by TP
    expert: int  # routed-expert weights, sharded by EP x ETP, replicated over EDP


def norm_params(ctx: Context) -> int:
    """RMSNorm has a weight; LayerNorm a weight and a bias."""
    h = ctx.spec.model.hidden_size
    return h if ctx.spec.model.normalization == "rmsnorm" else 2 * h


def norm_tensors(ctx: Context) -> int:
    """RMSNorm is one tensor (its weight); LayerNorm two (and its bias)."""
    return 2 if ctx.spec.model.normalization == "layernorm" else 1


def padded_vocab(ctx: Context, tp: int) -> int:
    """Megatron-LM pads the vocabulary to a multiple of 128 * TP (vocab_utils.py:58-59)."""
    multiple = 128 * tp
    v = ctx.spec.model.vocab_size
    return -(-v // multiple) * multiple


def _mlp(h: int, f: int, gated: bool, split: int) -> list[int]:
    """fc1 (h -> f, or 2f gated) and fc2 (f -> h), both split by `split`; no bias."""
    return [h * f * (2 if gated else 1) // split, f // split * h]


def _mamba_dims(ctx: Context) -> tuple[int, int, int, int, int]:
    m = ctx.spec.model.mamba
    assert m is not None
    heads = ctx.spec.model.mamba_heads
    return heads * m.head_dim, heads, m.num_groups, m.state_dim, m.conv_kernel


@dataclass(frozen=True)
class Linears:
    """One block's linear weights on one rank, parameters each: `dense` once per block, `expert`
    once per local expert (`local` of them)."""

    dense: list[int]
    expert: list[int]
    local: int = 0


def block_linears(ctx: Context, letter: str, lay: Layout) -> Linears:
    """The linear weights of one block held by one rank (tp / etp / ep from the layout)."""
    model = ctx.spec.model
    h, tp = model.hidden_size, lay.tp
    if letter == "A" and model.latent:
        return Linears(latent.latent_linears(ctx, lay), [])
    if letter == "A":
        d, heads, groups = model.head_dim, model.attention.num_heads, model.query_groups  # type: ignore[union-attr]
        # linear_qkv: h -> (heads + 2*groups)*d, linear_proj: heads*d -> h (attention.py)
        return Linears([h * (heads + 2 * groups) * d // tp, heads * d // tp * h], [])
    if letter == "D":
        mlp = model.mlp
        assert mlp is not None
        return Linears(_mlp(h, mlp.ffn_hidden_size, mlp.gated, tp), [])
    if letter == "E":
        moe = model.moe
        assert moe is not None
        shared = _mlp(h, moe.shared_expert_ffn_hidden_size, moe.gated, tp) if moe.shared_expert_ffn_hidden_size else []
        router = moe.num_experts * h  # router.py: weight [num_experts, hidden]
        width = expert_width(ctx)
        # latent MoE: fc1_latent_proj h -> latent and fc2_latent_proj latent -> h, TELinear with
        # parallel_mode="duplicated" (whole on every TP rank), experts latent -> f -> latent (moe_layer.py:170-192, experts.py:544-567)
        projections = [h * width, width * h] if moe.latent_size else []
        return Linears([router, *shared, *projections], _mlp(width, moe.ffn_hidden_size, moe.gated, lay.etp), moe.num_experts // lay.ep)
    if letter == "M":
        d_inner, heads, groups, state, _ = _mamba_dims(ctx)
        in_proj = h * (2 * d_inner + 2 * groups * state + heads) // tp  # mamba_mixer.py:268-280
        return Linears([in_proj, d_inner // tp * h], [])
    if letter == "R":
        r = model.recurrent
        assert r is not None
        d_r, heads = r.num_heads * r.head_dim, r.num_heads
        # megacpp runtime R block: in_proj h -> q,k,v,gate (4*d_r) + per-head decay; out_proj d_r -> h
        return Linears([h * (4 * d_r + heads) // tp, d_r // tp * h], [])
    raise ValueError(letter)


def block_params(ctx: Context, letter: str, lay: Layout) -> BlockParams:
    """Parameters of one block held by one rank: its linears (block_linears) and the rest."""
    model = ctx.spec.model
    linears = block_linears(ctx, letter, lay)
    rest = latent.latent_norm_params(ctx) if letter == "A" and model.latent else norm_params(ctx)
    if letter == "M":
        d_inner, heads, groups, state, kernel = _mamba_dims(ctx)
        conv_dim = (d_inner + 2 * groups * state) // lay.tp
        conv = conv_dim * kernel + conv_dim  # depthwise Conv1d weight + bias
        per_head = 3 * (heads // lay.tp)  # dt_bias, A_log, D
        rest += conv + per_head + d_inner // lay.tp  # and the gated norm's weight
    elif letter == "R":
        r = model.recurrent
        assert r is not None
        rest += r.num_heads * r.head_dim // lay.tp  # gated norm d_r
    elif letter == "A":
        rest += sum(_attention_extras(ctx, lay))
    dense_bias, expert_bias = bias_params(ctx, letter, lay)
    return BlockParams(rest + sum(linears.dense) + sum(dense_bias),
                       linears.local * (sum(linears.expert) + sum(expert_bias)))


def expert_width(ctx: Context) -> int:
    """The width routed tokens travel and the experts read and write: moe.latent_size, else hidden."""
    moe = ctx.spec.model.moe
    return moe.latent_size if moe is not None and moe.latent_size else ctx.spec.model.hidden_size


def _attention_extras(ctx: Context, lay: Layout) -> list[int]:
    """An A block's parameters besides its linears and input norm, one entry per tensor: the query
    and key norms over one head's width (q_layernorm, k_layernorm: gpt_layer_specs.py qk_layernorm;
    a weight, and a bias for LayerNorm), and the learnable softmax offset, one per local head
    (dot_product_attention.py:126-138 softmax_type learnable)."""
    attention = ctx.spec.model.attention
    assert attention is not None
    out: list[int] = []
    if attention.qk_layernorm:
        out += [ctx.spec.model.head_dim] * (2 * norm_tensors(ctx))
    if attention.sinks:
        out.append(attention.num_heads // lay.tp)
    return out


def bias_params(ctx: Context, letter: str, lay: Layout) -> tuple[list[int], list[int]]:
    """The biases of one block's linears on one rank under model.linear_bias (add_bias_linear), one
    entry per tensor: (dense, per local expert). A column-parallel linear's bias is split like its
    output, a row-parallel one's is whole (tensor_parallel/layers.py); the router's is one per
    expert (router.py:56-59); TE's grouped experts hold one per expert and linear (experts.py:
    548, 571); the latent projections' are whole. Mamba's linears take no bias (mamba_mixer.py:161)."""
    model = ctx.spec.model
    if not model.linear_bias or letter in ("M", "R"):
        return [], []
    h, tp = model.hidden_size, lay.tp
    if letter == "A":
        d, heads, groups = model.head_dim, model.attention.num_heads, model.query_groups  # type: ignore[union-attr]
        return [(heads + 2 * groups) * d // tp, h], []
    if letter == "D":
        mlp = model.mlp
        assert mlp is not None
        return [mlp.ffn_hidden_size * (2 if mlp.gated else 1) // tp, h], []
    moe = model.moe
    assert moe is not None
    g = 2 if moe.gated else 1
    dense = [moe.num_experts]  # shared experts take no bias (rule shared-expert-no-bias)
    width = expert_width(ctx)
    if moe.latent_size:
        dense += [width, h]
    return dense, [moe.ffn_hidden_size * g // lay.etp, width]


def block_param_tensors(ctx: Context, letter: str, lay: Layout) -> int:
    """Parameter tensors of one block on one rank (no linear has a bias: add_bias_linear=False):
    the optimizer step does host work per tensor (Efficiency.optimizer_tensor_s). Each norm is a
    weight (and a bias for LayerNorm); TE fuses the pre-norm into the next linear and keeps it as a
    tensor of that module, so the count is the same under either spec. E: the router and one fc1
    and one fc2 weight per local expert (TEGroupedMLP's weight0..weightG-1, SequentialMLP's
    experts alike), plus the shared expert's fc1 and fc2. M (mamba_mixer.py): in_proj, the conv1d's
    weight and bias, dt_bias, A_log, D, the gated norm and out_proj. R (runtime/worker/recurrent.py):
    in_proj, out_proj and the gate norm's weight."""
    dense_bias, expert_bias = bias_params(ctx, letter, lay)
    biases = len(dense_bias) + len(expert_bias) * (ctx.spec.model.moe.num_experts // lay.ep if expert_bias else 0)  # type: ignore[union-attr]
    if letter == "E":
        linears = block_linears(ctx, letter, lay)
        return norm_tensors(ctx) + len(linears.dense) + len(linears.expert) * linears.local + biases
    if letter == "A" and ctx.spec.model.latent:  # MLA takes no QK layernorm, window or sinks (AttentionSpec)
        return latent.latent_norm_tensors(ctx) + biases
    extras = len(_attention_extras(ctx, lay)) if letter == "A" else 0
    return norm_tensors(ctx) + {"A": 2, "D": 2, "M": 8, "R": 3}[letter] + biases + extras


def embedding_param_tensors(ctx: Context) -> int:
    """The word embeddings, and the learned position embeddings where the model has them."""
    return 1 + (ctx.spec.model.position_embedding == "learned")


def head_param_tensors(ctx: Context, lay: Layout) -> int:
    """The final norm, and the output layer unless it is the embedding's on the same rank."""
    tied_on_same_rank = ctx.spec.model.tie_embeddings and lay.pp == 1
    return norm_tensors(ctx) + (0 if tied_on_same_rank else 1)


def weight_gradient_bytes(ctx: Context, letter: str, lay: Layout) -> float:
    """The largest bf16 weight gradient one block's backward produces at once on one rank. Without
    gradient-accumulation fusion each weight's gradient is a tensor of the weight's size until
    megatron-core's DDP hook adds it into the fp32 main_grad buffer and frees it. TE's grouped
    experts compute every local expert's gradient in one grouped GEMM, the local modules'
    SequentialMLP one expert after another (forward+backward peaks of gpu_runs_h200x2_te_blind5.json)."""
    linears = block_linears(ctx, letter, lay)
    at_once = linears.local if ctx.te else 1
    return BF16 * max([*linears.dense, *(at_once * n for n in linears.expert)])


def embedding_params(ctx: Context, lay: Layout) -> int:
    """Word embeddings (vocab split by TP) plus learned position embeddings (replicated)."""
    h = ctx.spec.model.hidden_size
    pos = ctx.seq * h if ctx.spec.model.position_embedding == "learned" else 0
    return padded_vocab(ctx, lay.tp) // lay.tp * h + pos


def head_params(ctx: Context, lay: Layout) -> int:
    """Final norm plus the output layer; a tied head still holds its own copy when PP > 1."""
    h = ctx.spec.model.hidden_size
    tied_on_same_rank = ctx.spec.model.tie_embeddings and lay.pp == 1
    return norm_params(ctx) + (0 if tied_on_same_rank else padded_vocab(ctx, lay.tp) // lay.tp * h)


def routed_load(ctx: Context, imbalanced: bool) -> float:
    """Routed tokens of the busiest expert-parallel rank over the mean: 1, or the spec's
    moe.imbalance capped by the capacity factor (tokens over capacity are dropped)."""
    moe = ctx.spec.model.moe
    if not imbalanced or moe is None:
        return 1.0
    return min(moe.imbalance, moe.capacity_factor) if moe.capacity_factor else moe.imbalance


def attention_layer_numbers(ctx: Context) -> list[int]:
    """Megatron's (1-based) layer number of each A block: its pair on the GPT path, its letter's
    position in a hybrid stack, as window_attn_skip_freq reads them (transformer/utils.py:451-466)."""
    return [i + 1 for i, unit in enumerate(ctx.units) if "A" in unit]


def windowed_layers(ctx: Context) -> list[bool]:
    """Whether each A block attends through the sliding window: every one, or those whose layer
    number window_full_every does not divide (is_layer_window_attention, transformer/utils.py:451-466)."""
    a = ctx.spec.model.attention
    numbers = attention_layer_numbers(ctx)
    if a is None or a.window_size is None:
        return [False] * len(numbers)
    every = a.window_full_every
    return [every is None or n % every != 0 for n in numbers]


def attention_share(ctx: Context) -> float:
    """The work of the model's core attention over that of full causal attention, averaged over its
    A blocks: a windowed layer's query at position i reads min(i, w) + 1 keys, (w + 1) - w(w + 1)/2s
    on average against s/2 for a full causal one (Megatron-Bridge's flop_utils counts windowed
    layers alike from v0.5.0; GPT-OSS in scale_truth/models.json)."""
    a = ctx.spec.model.attention
    if a is None or a.window_size is None:
        return 1.0
    windowed = windowed_layers(ctx)
    if not any(windowed):
        return 1.0
    w, s = a.window_size, ctx.seq
    short = min(1.0, ((w + 1) - w * (w + 1) / (2 * s)) / (s / 2)) if w < s else 1.0
    return sum(short if on else 1.0 for on in windowed) / len(windowed)


def block_flops(ctx: Context, letter: str, load: float = 1.0) -> float:
    """Forward FLOPs per token of one block (2 per multiply-add), whole block, causal attention;
    `load` scales the routed experts' share (see routed_load)."""
    model = ctx.spec.model
    h, s = model.hidden_size, ctx.seq
    if letter == "A" and model.latent:
        return latent.latent_flops(ctx)
    if letter == "A":
        d, heads, groups = model.head_dim, model.attention.num_heads, model.query_groups  # type: ignore[union-attr]
        # projections + QK^T and PV over a causal (half) context, Korthikanti et al. [R36]; a
        # sliding window shortens the context of its layers (attention_share)
        return 2 * h * (heads + 2 * groups) * d + 2 * heads * d * h + 2 * heads * d * s * attention_share(ctx)
    if letter == "D":
        mlp = model.mlp
        assert mlp is not None
        return 2 * h * mlp.ffn_hidden_size * (3 if mlp.gated else 2)
    if letter == "E":
        moe = model.moe
        assert moe is not None
        per_expert = 2 * expert_width(ctx) * moe.ffn_hidden_size * (3 if moe.gated else 2)
        shared = 2 * h * (moe.shared_expert_ffn_hidden_size or 0) * (3 if moe.gated else 2)
        projections = 4 * h * moe.latent_size if moe.latent_size else 0  # the down- and up-projection
        return 2 * h * moe.num_experts + moe.top_k * per_expert * load + shared + projections
    if letter == "M":
        d_inner, heads, groups, state, kernel = _mamba_dims(ctx)
        proj = 2 * h * (2 * d_inner + 2 * groups * state + heads) + 2 * d_inner * h
        conv = 2 * (d_inner + 2 * groups * state) * kernel
        # SSD: state update/readout (~6 d_inner N) plus the causal intra-chunk matmuls (DERIVED, [R31])
        ssd = 6 * d_inner * state + SSD_CHUNK * d_inner
        return proj + conv + ssd
    if letter == "R":
        r = model.recurrent
        assert r is not None
        d_r = r.num_heads * r.head_dim
        return 2 * h * (4 * d_r + r.num_heads) + 2 * d_r * h + 4 * d_r * r.head_dim
    raise ValueError(letter)


@dataclass(frozen=True)
class Gemms:
    """One block's forward matmuls on one rank for one micro-batch: Linear GEMMs as (M, K, N, how
    many), the routed experts under Transformer Engine as grouped GEMMs (M tokens per expert, K, N,
    local experts: one GroupedLinear each for fc1 and fc2), unfused core attention and the R
    block's chunked scan as (batch x heads, tokens, head dim), the M block's conv and SSD scan as
    (heads, tokens, head dim, state), and the FLOPs of what is not a Linear (Mamba's conv and SSD scan, priced by them where a preset has no SSD
    table; the R block's recurrence; fused attention)."""

    linears: tuple[tuple[float, int, int, int], ...] = ()
    grouped: tuple[tuple[float, int, int, int], ...] = ()
    attention: tuple[int, int, int] | None = None
    recurrence: tuple[int, int, int] | None = None
    ssd: tuple[int, int, int, int] | None = None  # M: (heads, tokens, head dim, state) on one rank
    fused_attention: tuple[int, int, int, int] | None = None  # A with TE: (batch x heads, sequence, head dim, CP)
    other_flops: float = 0.0
    # the share of full causal attention's work TE's fused attention does (attention_share)
    attention_share: float = 1.0

    @property
    def flops(self) -> float:
        """Forward FLOPs, the unfused attention counted causal (half its s x s) as block_flops does."""
        core = 2.0 * self.attention[0] * self.attention[1] ** 2 * self.attention[2] if self.attention else 0.0
        return 2.0 * sum(m * k * n * count for m, k, n, count in self.linears + self.grouped) + core + self.other_flops


def micro_batch_tokens(ctx: Context, lay: Layout) -> float:
    """Tokens of one micro-batch held by one rank after the CP split."""
    return lay.micro_batch_size * ctx.seq / lay.cp


def block_gemms(ctx: Context, letter: str, lay: Layout, load: float = 1.0) -> Gemms:
    """The shapes behind block_flops on one rank: M is the micro-batch's tokens on the rank (the
    whole sequence under TP, gathered under SP), N and K are split by TP (ETP for experts); routed
    experts each take top_k x EP x ETP / (TP x E) of the tokens (x `load` on the busiest rank).
    Summed, 2 M K N over the linears plus the attention and other FLOPs equal
    block_flops x tokens / TP."""
    model = ctx.spec.model
    h, tp = model.hidden_size, lay.tp
    t = micro_batch_tokens(ctx, lay)
    if letter == "A" and model.latent:
        return latent.latent_gemms(ctx, lay)
    if letter == "A":
        d, heads, groups = model.head_dim, model.attention.num_heads, model.query_groups  # type: ignore[union-attr]
        linears = ((t, h, (heads + 2 * groups) * d // tp, 1), (t, heads * d // tp, h, 1))
        share = attention_share(ctx)
        core = 2 * heads * d * ctx.seq * t / tp * share  # causal QK^T and PV, as block_flops counts them
        if ctx.te:
            return Gemms(linears, fused_attention=(lay.micro_batch_size * heads // tp, ctx.seq, d, lay.cp), other_flops=core,
                         attention_share=share)
        # the local softmax masks a window inside the whole s x s scores (fused_softmax.py window_size): no saving
        return Gemms(linears, attention=(lay.micro_batch_size * heads // tp, ctx.seq // lay.cp, d))
    if letter == "D":
        mlp = model.mlp
        assert mlp is not None
        f = mlp.ffn_hidden_size
        return Gemms(((t, h, f * (2 if mlp.gated else 1) // tp, 1), (t, f // tp, h, 1)))
    if letter == "E":
        moe = model.moe
        assert moe is not None
        f, g, w = moe.ffn_hidden_size, 2 if moe.gated else 1, expert_width(ctx)
        local = moe.num_experts // lay.ep
        per_expert = t / tp * moe.top_k * lay.ep * lay.etp / moe.num_experts * load
        router: tuple[tuple[float, int, int, int], ...] = ((t / tp, h, moe.num_experts, 1),)
        if moe.latent_size:  # duplicated on every TP rank, over the rank's sequence-parallel shard
            router += ((t / tp, h, w, 1), (t / tp, w, h, 1))
        experts = ((per_expert, w, f * g // lay.etp, local), (per_expert, f // lay.etp, w, local))
        fs = moe.shared_expert_ffn_hidden_size or 0
        shared = ((t, h, fs * g // tp, 1), (t, fs // tp, h, 1)) if fs else ()
        if ctx.te:  # TEGroupedMLP: each of fc1 and fc2 is one GroupedLinear over the local experts
            return Gemms(router + shared, grouped=experts)
        return Gemms(router + experts + shared)  # SequentialMLP: one expert after another
    if letter == "M":
        d_inner, heads, groups, state, kernel = _mamba_dims(ctx)
        linears = ((t, h, (2 * d_inner + 2 * groups * state + heads) // tp, 1), (t, d_inner // tp, h, 1))
        rest = 2 * (d_inner + 2 * groups * state) * kernel + 6 * d_inner * state + SSD_CHUNK * d_inner
        head_dim = d_inner // heads
        return Gemms(linears, ssd=(heads // tp, int(t), head_dim, state), other_flops=rest * t / tp)
    if letter == "R":
        r = model.recurrent
        assert r is not None
        d_r = r.num_heads * r.head_dim
        linears = ((t, h, (4 * d_r + r.num_heads) // tp, 1), (t, d_r // tp, h, 1))
        scan = (lay.micro_batch_size * r.num_heads // tp, ctx.seq, r.head_dim)
        return Gemms(linears, recurrence=scan, other_flops=4 * d_r * r.head_dim * t / tp)
    raise ValueError(letter)


def head_flops(ctx: Context) -> float:
    return 2.0 * ctx.spec.model.hidden_size * ctx.spec.model.vocab_size


def head_gemms(ctx: Context, lay: Layout) -> Gemms:
    """The output layer's GEMM on one rank: the padded vocabulary split by TP."""
    t = micro_batch_tokens(ctx, lay)
    return Gemms(((t, ctx.spec.model.hidden_size, padded_vocab(ctx, lay.tp) // lay.tp, 1),))


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
    return moe.top_k * lay.etp * BF16 * 7 * f * load * factor * at_once


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
        return norm + (routed * load + router + projected) * factor + shared
    if letter == "M":
        d_inner, heads, groups, state, _ = _mamba_dims(ctx)
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
        per_routed = moe.top_k * lay.etp * load * (1 / t if lay.sp else 1.0)
        out["mlp_norm"] = BF16 * h * outside
        out["expert_fc1"] = per_routed * BF16 * expert_width(ctx)
        out["moe_act"] = per_routed * _expert_act_bytes(ctx, f, "moe_act" in modules, cast)[0]
    elif letter == "E":
        out["mlp_norm"] = BF16 * h * outside
    return {m: b for m, b in out.items() if m in listed and b > 0}


# multi-latent attention's formulas (latent.py builds on the helpers above)
from megacpp.planner.cost import latent  # noqa: E402
