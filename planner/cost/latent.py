"""Multi-latent attention (an A block with model.attention.mla) and multi-token prediction
(model.mtp_num_layers): their parameters, FLOPs, matmuls and activations, as megatron-core 0.16.1
builds them (megatron/core/transformer/multi_latent_attention.py, multi_token_prediction.py).

blocks.py, flops.py and activations.py hand an A block to these functions when the attention is
latent; memory.py and step.py add the MTP layers to the stage where Megatron builds them.
"""

from __future__ import annotations

from megacpp.planner.cost import activations, blocks, flops
from megacpp.planner.cost.kernel_rates import mla_over_d128
from megacpp.planner.search.layout import Context, Layout
from megacpp.planner.spec.models import LatentAttentionSpec


def _mla(ctx: Context) -> LatentAttentionSpec:
    latent = ctx.spec.model.latent
    assert latent is not None
    return latent


def _widths(ctx: Context) -> tuple[int, int, int, int, int]:
    """hidden, heads, a head's query/key width (content + rotary), its value width, its rotary width."""
    a, m = ctx.spec.model.attention, _mla(ctx)
    assert a is not None
    return ctx.spec.model.hidden_size, a.num_heads, m.qk_head_dim + m.rope_head_dim, m.v_head_dim, m.rope_head_dim


def latent_linears(ctx: Context, lay: Layout) -> list[int]:
    """The MLA block's linear weights on one rank (multi_latent_attention.py MLASelfAttention): the
    query down projection h -> q_lora_rank and its up projection to every head's query (or one
    projection h -> heads x (qk + rope) without a query latent), the key/value down projection
    h -> kv_lora_rank + rope (the shared rotary key), its up projection to every head's key content
    and value, and linear_proj heads x v -> h. The up projections and linear_proj are split by TP.
    The down projections are TELinear(parallel_mode="duplicated") with Transformer Engine, whole on
    every TP rank, and ColumnParallelLinear in the local spec, split by TP
    (gpt_layer_specs.py get_gpt_layer_with_transformer_engine_spec / get_gpt_layer_local_spec)."""
    h, heads, qk, v, rope = _widths(ctx)
    m, tp = _mla(ctx), lay.tp
    down = 1 if ctx.te else tp
    queries = ([h * m.q_lora_rank // down, m.q_lora_rank * heads * qk // tp] if m.q_lora_rank
               else [h * heads * qk // tp])
    return [*queries, h * (m.kv_lora_rank + rope) // down, m.kv_lora_rank * heads * (qk - rope + v) // tp,
            heads * v // tp * h]


def latent_norm_params(ctx: Context) -> int:
    """The input norm and the latents' norms (q_layernorm over q_lora_rank, kv_layernorm over
    kv_lora_rank: Megatron builds them with --qk-layernorm, which MLA renders), whole on every rank."""
    m = _mla(ctx)
    per_width = blocks.norm_params(ctx) // ctx.spec.model.hidden_size  # 1 (RMSNorm) or 2 (LayerNorm) per element
    return blocks.norm_params(ctx) + per_width * ((m.q_lora_rank or 0) + m.kv_lora_rank)


def latent_norm_tensors(ctx: Context) -> int:
    """Parameter tensors of the MLA block's norms and linears."""
    norms = 2 + (_mla(ctx).q_lora_rank is not None)
    return norms * blocks.norm_tensors(ctx) + len(latent_linears(ctx, Layout()))


def latent_flops(ctx: Context) -> float:
    """Forward FLOPs per token of the whole MLA block: its projections, and QK^T over
    heads x (qk + rope) and PV over heads x v over a causal (half) context."""
    h, heads, qk, v, _ = _widths(ctx)
    projections = sum(latent_linears(ctx, Layout()))
    return 2.0 * projections + heads * (qk + v) * ctx.seq


def latent_gemms(ctx: Context, lay: Layout) -> flops.Gemms:
    """The MLA block's forward matmuls on one rank. The duplicated down projections of Transformer
    Engine read the rank's sequence shard under SP (whole weights, t / TP tokens), the local
    column-parallel ones the gathered sequence (t tokens, weights split by TP)."""
    h, heads, qk, v, rope = _widths(ctx)
    m, tp = _mla(ctx), lay.tp
    t = flops.micro_batch_tokens(ctx, lay)
    down_t, down_split = (t / tp if lay.sp else t, 1) if ctx.te else (t, tp)
    queries: tuple[tuple[float, int, int, int], ...] = ((t, h, heads * qk // tp, 1),)
    if m.q_lora_rank:
        queries = ((down_t, h, m.q_lora_rank // down_split, 1), (t, m.q_lora_rank, heads * qk // tp, 1))
    linears = (*queries, (down_t, h, (m.kv_lora_rank + rope) // down_split, 1),
               (t, m.kv_lora_rank, heads * (qk - rope + v) // tp, 1), (t, heads * v // tp, h, 1))
    core = heads * (qk + v) * ctx.seq * t / tp  # causal QK^T and PV, as latent_flops counts them
    d = ctx.spec.model.head_dim  # the mean of the key and value widths
    if ctx.te:
        batch_heads = lay.micro_batch_size * heads // tp
        over = mla_over_d128(batch_heads, ctx.seq, qk, v)
        if over is not None:  # the measured kernel at these widths, over the d=128 one at its heads and tokens
            return flops.Gemms(linears, fused_attention=(batch_heads, ctx.seq, 128, lay.cp), other_flops=core,
                               attention_time_share=over)
        return flops.Gemms(linears, fused_attention=(batch_heads, ctx.seq, d, lay.cp), other_flops=core)
    return flops.Gemms(linears, attention=(lay.micro_batch_size * heads // tp, ctx.seq // lay.cp, d))


def recomputed_up_projections(ctx: Context, lay: Layout) -> flops.Gemms:
    """The MLA block's up projections, whose forward selective recompute of mla_up_proj runs again
    in the backward (multi_latent_attention.py qkv_up_checkpoint); none otherwise."""
    m = ctx.spec.model.latent
    if m is None or "mla_up_proj" not in activations.recompute_modules(ctx):
        return flops.Gemms()
    h, heads, qk, v, rope = _widths(ctx)
    t = flops.micro_batch_tokens(ctx, lay)
    queries = ((t, m.q_lora_rank, heads * qk // lay.tp, 1),) if m.q_lora_rank else ()
    return flops.Gemms((*queries, (t, m.kv_lora_rank, heads * (qk - rope + v) // lay.tp, 1)))


def latent_parts(ctx: Context, lay: Layout, modules: frozenset[str], fp8: bool) -> dict[str, float]:
    """What an MLA block keeps per local token for its backward, by where it is kept (the parts of
    activations._attention_parts). norm: the input norm (a module of its own under either spec) and its
    output, which both down projections read; the latents: each one's bf16 projection, its norm's
    statistics and normalised output (the up projection's input), along the SP shard like the
    layer's input. core: core attention's inputs, the
    query (heads x (qk + rope)), the key (the same) and the value (heads x v), new tensors after the
    rotary concatenation and .contiguous() (the up projections' outputs are freed); selective
    recompute of mla_up_proj drops them and rebuilds them from the latents (CheckpointWithoutOutput,
    multi_latent_attention.py qkv_up_checkpoint). The unfused softmax keeps its scores as GQA's.
    Checked on CPU against what autograd keeps in megatron-core 0.16.1's local MLA layer (its core
    attention told the widths, as tests/test_megatron_parity.py builds it; h 256, 8 heads, ranks 96
    and 64, widths 32 + 16 and 32): core attention's inputs, scores, output and the rotary tables
    to the byte without recompute and with core_attn recompute; with mla_up_proj the formula is 64 B
    per token over (the checkpoint keeps the rotary frequencies, not the tables); the norms follow
    Transformer Engine's, which MLA needs (the local torch norm keeps fp32 copies besides)."""
    h, heads, qk, v, rope = _widths(ctx)
    m, t = _mla(ctx), lay.tp
    outside = 1 / t if lay.sp else 1.0
    cast = 1.0 if fp8 else float(blocks.BF16)
    layernorm = "layernorm" in modules
    stats = activations.norm_stats_bytes(ctx)
    norm = (blocks.BF16 * h if layernorm else blocks.BF16 * h + cast * h + stats) * outside
    latents = sum(blocks.BF16 * r + stats + cast * r for r in (m.q_lora_rank, m.kv_lora_rank) if r) * outside
    heads_r = heads / t
    # under mla_up_proj the checkpoint keeps its inputs instead: the latents, and the key's rotary
    # part, a view that holds the whole key/value down projection's output
    kept = blocks.BF16 * (m.kv_lora_rank + rope) * outside if "mla_up_proj" in modules else blocks.BF16 * heads_r * (2 * qk + v)
    scores = 0.0
    if not ctx.te and "core_attn" not in modules:
        scores = blocks.UNFUSED_KEPT_BYTES * heads_r * ctx.seq / lay.cp
    unfused_rope = ctx.spec.model.position_embedding == "rope" and not (ctx.te and ctx.fused)
    rope_tables = 4 * blocks.BF16 * rope / lay.micro_batch_size if unfused_rope else 0.0
    width = heads_r * v
    output = blocks.BF16 * width if not fp8 else width * (1.0 + (0.0 if "core_attn" in modules else blocks.BF16))
    return {"norm": norm + latents, "rope": rope_tables, "core": kept + scores, "output": output}


# ---- multi-token prediction -------------------------------------------------------------------


def mtp_blocks(ctx: Context) -> str:
    """The blocks the MTP layers run, every depth's: model.mtp_pattern's on a hybrid stack
    (multi_token_prediction.py MultiTokenPredictionLayer builds a HybridStack of it), else a copy
    of the model's last Megatron layer (gpt_builders.py: attention with its MLP or MoE)."""
    return ctx.spec.model.mtp_layer * ctx.spec.model.mtp_num_layers


def mtp_weight_layers(ctx: Context) -> int:
    """MTP layers whose weights a rank holds: one under model.mtp_shared_weights, which Megatron builds
    once and applies at every depth (MultiTokenPredictionBlock._build_layers, mtp_use_repeated_layer)."""
    n = ctx.spec.model.mtp_num_layers
    return min(n, 1) if ctx.spec.model.mtp_shared_weights else n


def mtp_weight_blocks(ctx: Context) -> str:
    """The blocks whose weights the MTP layers hold (mtp_blocks without the shared depths' repeats)."""
    return ctx.spec.model.mtp_layer * mtp_weight_layers(ctx)


def rank_blocks(ctx: Context, blocks: str, mtp: bool) -> str:
    """A pipeline rank's blocks in the order it runs them: the MTP layers' after its own where it holds
    them (mtp_on_this_rank: the last stage, or the chunk a pipeline layout puts `m` in)."""
    return blocks + mtp_blocks(ctx) if mtp else blocks


def mtp_own_params(ctx: Context, lay: Layout, embedding_copy: bool) -> int:
    """What the MTP layers hold beyond their transformer layers, on one rank of their stage
    (multi_token_prediction.py MultiTokenPredictionLayer): per layer enorm and hnorm over the
    embedding and the hidden state, eh_proj 2h -> h (column parallel, split by TP) and a final
    norm; and, on a stage other than the first, a copy of the word embeddings, which the MTP layers
    look the next tokens up in (gpt_model.py: the embedding is built where pre_process or mtp_process)."""
    n = mtp_weight_layers(ctx)
    if not n:
        return 0
    h = ctx.spec.model.hidden_size
    per_layer = 3 * blocks.norm_params(ctx) + 2 * h * h // lay.tp
    return n * per_layer + (blocks.padded_vocab(ctx, lay.tp) // lay.tp * h if embedding_copy else 0)


def mtp_own_tensors(ctx: Context, embedding_copy: bool) -> int:
    """Parameter tensors of mtp_own_params: three norms and eh_proj per layer, the embedding copy."""
    n = mtp_weight_layers(ctx)
    return n * (3 * blocks.norm_tensors(ctx) + 1) + (1 if embedding_copy else 0) if n else 0


def mtp_own_flops(ctx: Context) -> float:
    """Forward FLOPs per token of the MTP layers beyond their transformer layers: eh_proj and one
    more pass of the output layer per layer (gpt_model.py _postprocess: mtp_logits per depth)."""
    h = ctx.spec.model.hidden_size
    return ctx.spec.model.mtp_num_layers * (2.0 * 2 * h * h + flops.head_flops(ctx))


def mtp_flops(ctx: Context) -> float:
    """Forward FLOPs per token of all MTP layers, their transformer layers included."""
    if not ctx.spec.model.mtp_num_layers:
        return 0.0
    return mtp_own_flops(ctx) + sum(flops.block_flops(ctx, letter) for letter in mtp_blocks(ctx))


def mtp_proj_gemms(ctx: Context, lay: Layout) -> flops.Gemms:
    """eh_proj of every MTP layer on one rank: the tokens, 2h -> h / TP."""
    h = ctx.spec.model.hidden_size
    t = flops.micro_batch_tokens(ctx, lay)
    return flops.Gemms(((t, 2 * h, h // lay.tp, ctx.spec.model.mtp_num_layers),))


def mtp_own_activation_bytes(ctx: Context, lay: Layout) -> float:
    """What the MTP layers keep per local token beyond their transformer layers: per layer the
    embedding lookup and the hidden state with their norms' statistics and outputs, eh_proj's
    2h input; the layer's own final norm input and statistics; along the SP shard."""
    h = ctx.spec.model.hidden_size
    outside = 1 / lay.tp if lay.sp else 1.0
    stats = activations.norm_stats_bytes(ctx)
    per_layer = (2 * (blocks.BF16 * h + stats) + blocks.BF16 * 2 * h + blocks.BF16 * h + stats) * outside
    return ctx.spec.model.mtp_num_layers * per_layer
