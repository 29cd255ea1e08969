"""Per-block parameters: what megatron-core 0.16.1 instantiates of each block letter on one rank
(local and TE specs hold the same counts: TE fuses the pre-norm into the following linear).
FLOPs and GEMM shapes are in cost.flops, saved activations in cost.activations.
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


def mamba_dims(ctx: Context) -> tuple[int, int, int, int, int]:
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
        d_inner, heads, groups, state, _ = mamba_dims(ctx)
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
        d_inner, heads, groups, state, kernel = mamba_dims(ctx)
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


def expert_load(ctx: Context, load: float) -> float:
    """The rows each routed expert runs over its balanced share: the routed `load`, or with inputs
    padded to capacity (moe.pad_to_capacity) the capacity factor, however the tokens were routed
    (token_dispatcher.py pads each expert's rows before the all-to-all). The padding is work, not
    model FLOPs: block_flops leaves it out."""
    moe = ctx.spec.model.moe
    return moe.capacity_factor if moe is not None and moe.pad_to_capacity and moe.capacity_factor else load


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


# multi-latent attention's formulas (latent.py builds on the helpers above)
from megacpp.planner.cost import latent  # noqa: E402
