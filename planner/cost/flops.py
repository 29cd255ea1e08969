"""FLOPs and GEMM shapes per block: each block letter's forward FLOPs per token (whole, unsharded)
and the matmuls one rank runs per micro-batch, as the step's kernel-rate tables price them.
"""

from __future__ import annotations

from dataclasses import dataclass

from megacpp.planner.cost.blocks import SSD_CHUNK, expert_load, expert_width, mamba_dims, padded_vocab
from megacpp.planner.cost.kernel_rates import attention_over_flops, window_share
from megacpp.planner.search.layout import Context, Layout


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
    short = window_share(a.window_size, ctx.seq)
    return sum(short if on else 1.0 for on in windowed) / len(windowed)


def attention_time_share(ctx: Context, batch_heads: int, head_dim: int) -> float:
    """TE's fused attention time of the model's A blocks over the full causal kernel's at their
    shape, averaged over them: each block's FLOP share (window_share) times how much longer than it
    the measured kernel runs with the block's window and sinks (kernel_rates.attention_over_flops);
    the FLOP share (attention_share) where the blocks have neither or nothing was measured."""
    a = ctx.spec.model.attention
    if a is None or (a.window_size is None and not a.sinks):
        return attention_share(ctx)
    s = ctx.seq
    window = a.window_size if a.window_size is not None and a.window_size < s else None
    times = []
    for on in windowed_layers(ctx):
        w = window if on else None
        over = attention_over_flops(batch_heads, s, head_dim, w, a.sinks)
        if over is None:
            return attention_share(ctx)
        times.append(window_share(w, s) * over)
    return sum(times) / len(times)


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
        d_inner, heads, groups, state, kernel = mamba_dims(ctx)
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
    # TE's fused attention time over the tables' full causal kernel at fused_attention's shape:
    # windows and sinks (attention_time_share), multi-latent widths (latent.latent_gemms)
    attention_time_share: float = 1.0

    @property
    def linear_flops(self) -> float:
        """Forward FLOPs of the Linears and GroupedLinears alone."""
        return 2.0 * sum(m * k * n * count for m, k, n, count in self.linears + self.grouped)

    @property
    def flops(self) -> float:
        """Forward FLOPs, the unfused attention counted causal (half its s x s) as block_flops does."""
        core = 2.0 * self.attention[0] * self.attention[1] ** 2 * self.attention[2] if self.attention else 0.0
        return self.linear_flops + core + self.other_flops


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
        core = 2 * heads * d * ctx.seq * t / tp * attention_share(ctx)  # causal QK^T and PV, as block_flops counts them
        if ctx.te:
            batch_heads = lay.micro_batch_size * heads // tp
            return Gemms(linears, fused_attention=(batch_heads, ctx.seq, d, lay.cp), other_flops=core,
                         attention_time_share=attention_time_share(ctx, batch_heads, d))
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
        per_expert = t / tp * moe.top_k * lay.ep * lay.etp / moe.num_experts * expert_load(ctx, load)
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
        d_inner, heads, groups, state, kernel = mamba_dims(ctx)
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


# multi-latent attention's formulas (latent.py builds on these)
from megacpp.planner.cost import latent  # noqa: E402
