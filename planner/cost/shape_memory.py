"""What stage_memory sums per block letter on one shard shape, worked out once per shape: each
letter's activations, parameters and gradients, the embedding's, the head's and the MTP layers'
terms, and the bytes per parameter of the gradient buffer and the optimizer state.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import NamedTuple

from megacpp.planner.cost.activations import (
    block_activation_bytes,
    expert_backward_bytes,
    fp8_casts,
    fp8_recipe,
    offload_bytes,
    recompute_modules,
)
from megacpp.planner.cost.blocks import (
    BF16,
    FP32,
    BlockParams,
    block_param_tensors,
    block_params,
    embedding_param_tensors,
    embedding_params,
    head_param_tensors,
    head_params,
    norm_params,
    norm_tensors,
    padded_vocab,
    unfused_scores,
    weight_gradient_bytes,
)
from megacpp.planner.cost.flops import micro_batch_tokens
from megacpp.planner.cost.latent import (
    mtp_blocks,
    mtp_own_activation_bytes,
    mtp_own_params,
    mtp_own_tensors,
    mtp_weight_blocks,
)
from megacpp.planner.cost.ranks import (
    partial_recompute,
)
from megacpp.planner.cost.shard import memo, shape
from megacpp.planner.search.layout import Context, Layout

# per score, what the backward of a rank's last unfused attention holds beside its kept
# activations: three fp32 score-sized gradients, less the bf16 probabilities already freed; under
# selective recompute the recomputed fp32 softmax output and the checkpoint's backward (its bf16
# copy and the gradients). Read off the allocation sites (launch --memory-peak).
UNFUSED_BACKWARD_BYTES = 12.0 - BF16
SELECTIVE_BACKWARD_BYTES = FP32 + 12.0
# bytes per element of Adam's moments by dtype (--exp-avg-dtype, --exp-avg-sq-dtype: TE's FusedAdam
# keeps fp8 moments as uint8 with one scale per tensor)
STATE_BYTES = {"fp32": FP32, "bf16": BF16, "fp16": BF16, "fp8": 1}


def main_param_bytes(ctx: Context) -> float:
    """Bytes per parameter of the optimizer's master copy of the weights. fp32, except where
    Transformer Engine's FusedAdam holds it for the precision-aware optimizer (bf16 weights, and
    FP8 only under delayed scaling: optimizer_config.py use_precision_aware_optimizer_no_fp8_or_ds_fp8):
    then an fp16 master is 2 bytes, and an fp32 one keeps only the 16 bits the bf16 weight lacks
    (store_param_remainders, on by default; Megatron-LM has no flag to turn it off)."""
    opt = ctx.spec.training.optimizer
    if not opt.precision_aware:
        return FP32
    if opt.main_params_dtype == "fp16" or ctx.spec.training.precision == "bf16" or fp8_recipe(ctx) == "delayed":
        return BF16
    return FP32


def optimizer_state_bytes(ctx: Context) -> float:
    """Bytes per parameter the distributed optimizer holds (before sharding): the master weight and
    Adam's two moments in their dtypes (training.optimizer)."""
    opt = ctx.spec.training.optimizer
    return main_param_bytes(ctx) + STATE_BYTES[opt.exp_avg_dtype] + STATE_BYTES[opt.exp_avg_sq_dtype]


def gradient_bytes(ctx: Context) -> int:
    """Bytes per parameter of the gradient buffer: fp32 for bf16 training, bf16 where gradients
    are reduced in bf16 (--grad-reduce-in-bf16: accumulate_allreduce_grads_in_fp32 off, so
    distributed_data_parallel's buffers take the parameters' dtype; arguments.py)."""
    return BF16 if ctx.spec.training.grad_reduce_dtype == "bf16" else FP32


class Held(NamedTuple):
    """What one pipeline rank holds whatever the data-parallel sharding and the schedule (a tuple:
    a search makes one per shard shape and rank it prices)."""

    dense: int
    expert: int
    tensors: int
    act_per_mb: float  # bytes of activations per micro-batch in flight
    transient: float
    transient_from: str
    buffers_gib: float


@dataclass(frozen=True)
class ShapeLetters:
    """What stage_memory sums per block letter on a rank of one shard shape (cost.shard): bytes
    per micro-batch, parameters and parameter tensors."""

    tokens: float
    h_in: float  # a layer's input, per token
    kept: dict[str, float]
    rebuilt: dict[str, float]
    again: dict[str, float]
    offloaded: dict[str, dict[str, float]]
    params: dict[str, BlockParams]
    tensors: dict[str, int]
    weight_gradient: dict[str, float]
    scores: float  # unfused attention scores, where the rank has an A block
    expert_backward: float
    # the spec's, read here once: selective recompute's modules, whether full recompute is partial,
    # bytes per parameter of the gradient buffer and the optimizer state, and whether the step
    # makes fp32 copies of bf16 gradient shards (unless TE's FusedAdam reads them as they are)
    modules: frozenset[str]
    partial: bool
    grad_bytes: int
    state_bytes: float
    grad_copies: bool
    # _held by what a rank holds (RankStages.key), and _transient by RankStages.transient_key
    held: dict[Hashable, Held] = field(default_factory=dict)
    transients: dict[Hashable, tuple[float, str, float]] = field(default_factory=dict)
    ends: dict[bool, Ends] = field(default_factory=dict)  # _ends by whether pp is 1
    mtps: dict[bool, MTPMemory | None] = field(default_factory=dict)  # mtp_of by whether they copy the embedding
    ceilings: dict[bool, tuple[float, float] | None] = field(default_factory=dict)  # cost.fits' by whether pp is 1


def shape_letters(ctx: Context, lay: Layout, load: float) -> ShapeLetters:
    """What stage_memory sums per block letter on `lay`'s shard shape, worked out once per shape."""
    return memo(ctx, ("letters", shape(lay), load), lambda: _letters(ctx, lay, load), rate_free=True)


def _letters(ctx: Context, lay: Layout, load: float) -> ShapeLetters:
    training = ctx.spec.training
    tokens = micro_batch_tokens(ctx, lay)
    fp8 = fp8_casts(ctx)
    kept = {letter: block_activation_bytes(ctx, letter, lay, load) * tokens for letter in ctx.letters}
    # what the backward of a recomputed block (or of a selectively recomputed module) holds again:
    # its activations as without recompute
    rebuilt = {letter: block_activation_bytes(ctx, letter, lay, load, recompute="none", fp8=fp8) * tokens
               for letter in ctx.letters} if training.recompute == "full" else {}
    # selective recompute of modules beyond core attention: what a block's backward rebuilds of them
    modules = recompute_modules(ctx)
    base = "selective" if "core_attn" in modules else "none"
    again = {letter: max(0.0, block_activation_bytes(ctx, letter, lay, load, recompute=base, fp8=fp8) * tokens - kept[letter])
             for letter in ctx.letters} if modules - {"core_attn"} else {}
    offloaded = {letter: {m: b * tokens for m, b in offload_bytes(ctx, letter, lay, load).items()}
                 for letter in ctx.letters} if training.offload_modules else {}
    return ShapeLetters(
        tokens=tokens,
        h_in=BF16 * ctx.spec.model.hidden_size / (lay.tp if lay.sp else 1),
        kept=kept,
        rebuilt=rebuilt,
        again=again,
        offloaded=offloaded,
        params={letter: block_params(ctx, letter, lay) for letter in ctx.letters},
        tensors={letter: block_param_tensors(ctx, letter, lay) for letter in ctx.letters},
        weight_gradient={letter: weight_gradient_bytes(ctx, letter, lay) for letter in ctx.letters},
        scores=unfused_scores(ctx, lay),
        expert_backward=expert_backward_bytes(ctx, lay, load) * tokens,
        modules=modules,
        partial=partial_recompute(ctx),
        grad_bytes=gradient_bytes(ctx),
        state_bytes=optimizer_state_bytes(ctx),
        grad_copies=gradient_bytes(ctx) == BF16 and main_param_bytes(ctx) != BF16,
    )


class Ends(NamedTuple):
    """What the embedding, the output head and the final norm add to the ranks that hold them, on
    one shard shape (and whether pp is 1: a tied head keeps its own copy only beyond one stage)."""

    embedding_params: int
    embedding_tensors: int
    embedding_activations: float  # bytes per micro-batch: the embedding's output
    head_params: int  # without the final norm, held where RankStages.final_norm says
    head_tensors: int
    norm_params: int
    norm_tensors: int
    loss: float  # bytes of the loss's logits


def ends(ctx: Context, lay: Layout, t: ShapeLetters) -> Ends:
    """Ends of `lay`'s shard shape (`t`, its letters), worked out once per shape and whether pp is 1."""
    known = t.ends.get(lay.pp == 1)
    if known is None:
        known = t.ends[lay.pp == 1] = _ends(ctx, lay, t)
    return known


def _ends(ctx: Context, lay: Layout, t: ShapeLetters) -> Ends:
    # the vocab-parallel loss's fp32 logits (softmax and its gradient are computed in place in
    # them) next to the bf16 logits; each MTP depth's loss ran first and keeps its fp32 softmax
    # for the backward, its bf16 logits freed (multi_token_prediction.py process_mtp_loss)
    loss = (BF16 + FP32 * (1 + ctx.spec.model.mtp_num_layers)) * t.tokens * padded_vocab(ctx, lay.tp) / lay.tp
    norm, norm_t = norm_params(ctx), norm_tensors(ctx)
    return Ends(embedding_params(ctx, lay), embedding_param_tensors(ctx), t.h_in * t.tokens,
                 head_params(ctx, lay) - norm, head_param_tensors(ctx, lay) - norm_t, norm, norm_t, loss)


def mtp_of(ctx: Context, lay: Layout, t: ShapeLetters, embedding_copy: bool) -> MTPMemory | None:
    """mtp_memory on `lay`'s shard shape, worked out once per shape and whether it copies the embedding."""
    if embedding_copy not in t.mtps:
        t.mtps[embedding_copy] = mtp_memory(ctx, lay, t.kept, t.tokens, embedding_copy)
    return t.mtps[embedding_copy]


def backward_gradients(t: ShapeLetters, scores: float) -> dict[str, float]:
    """The bytes a block's backward holds beside what it kept, by letter, on a rank of `t`'s shape
    whose unfused attention has `scores` elements: the score gradients of an unfused attention, and
    the routed tokens' gradients of an expert block; a block whose modules are recomputed holds
    what they rebuild as well."""
    grads = {"A": (SELECTIVE_BACKWARD_BYTES if "core_attn" in t.modules else UNFUSED_BACKWARD_BYTES) * scores,
             "E": t.expert_backward}
    for letter, extra in t.again.items():
        grads[letter] = grads.get(letter, 0.0) + extra
    return grads


@dataclass(frozen=True)
class MTPMemory:
    """What the MTP layers add to one rank of the last pipeline stage (Megatron builds them there,
    multi_token_prediction.py mtp_on_this_rank): parameters and tensors, and the bytes they keep per
    micro-batch (their transformer layers as the model's, under the same recompute)."""

    dense: int
    expert: int
    tensors: int
    activations: float


def mtp_memory(ctx: Context, lay: Layout, kept: dict[str, float], tokens: float, embedding_copy: bool) -> MTPMemory | None:
    """The MTP layers on the rank that runs them, None without them: the weights of the layers it
    builds (one under model.mtp_shared_weights), the activations of every depth it runs."""
    if not ctx.spec.model.mtp_num_layers:
        return None
    dense = expert = tensors = 0
    for letter, n in Counter(mtp_weight_blocks(ctx)).items():
        bp = block_params(ctx, letter, lay)
        dense, expert = dense + n * bp.dense, expert + n * bp.expert
        tensors += n * block_param_tensors(ctx, letter, lay)
    activations = mtp_own_activation_bytes(ctx, lay) * tokens + sum(kept[letter] for letter in mtp_blocks(ctx))
    return MTPMemory(dense + mtp_own_params(ctx, lay, embedding_copy), expert,
                     tensors + mtp_own_tensors(ctx, embedding_copy), activations)
