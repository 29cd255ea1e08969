"""Per-stage memory: what one rank of each pipeline stage holds at its peak.

Megatron's bookkeeping: bf16 weights, an fp32 gradient buffer, fp32 main parameters and Adam
moments sharded by the distributed optimizer over DP*CP for dense and EDP for expert weights
[R30], plus activations x micro-batches in flight for the 1F1B / interleaved schedule [R37] and
the largest short-lived allocation of forward+backward. The measurements behind each term:
benchmarks/evidence/cost_model_notes.md, "Memory terms".
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from megacpp.planner.cost.blocks import (
    BF16,
    FP32,
    block_activation_bytes,
    block_param_tensors,
    block_params,
    embedding_param_tensors,
    embedding_params,
    expert_backward_bytes,
    fp8_casts,
    fp8_recipe,
    head_param_tensors,
    head_params,
    micro_batch_tokens,
    offload_bytes,
    padded_vocab,
    recompute_modules,
    unfused_scores,
    weight_gradient_bytes,
)
from megacpp.planner.cost.coefficients import RESERVED_OVER_ALLOCATED, Efficiency
from megacpp.planner.cost.latent import mtp_blocks, mtp_own_activation_bytes, mtp_own_params, mtp_own_tensors
from megacpp.planner.search.layout import Context, Layout
from megacpp.planner.search.stages import Stage
from megacpp.planner.spec.pattern import BLOCK_LETTERS

GIB = float(1 << 30)
# megatron-core's unfused attention keeps one global bf16 buffer of heads/TP x s x s scores per
# micro-batch allocated (utils.GlobalMemoryBuffer, dot_product_attention.py)
SCORE_BUFFER_BYTES = BF16
# TE's grouped GEMMs (the experts' GroupedLinear) keep one cuBLAS workspace per compute
# stream for the process: nvte_get_num_compute_streams() = 4 (transformer_engine/common/util/
# multi_stream.cpp) of 32 MiB + 256 B on Hopper and later (pytorch/module/base.py,
# get_multi_stream_cublas_workspace)
TE_GROUPED_GEMM_WORKSPACE_BYTES = 4 * (32 * 2**20 + 256)
# per score, what the backward of a rank's last unfused attention holds beside its kept
# activations: three fp32 score-sized gradients, less the bf16 probabilities already freed; under
# selective recompute the recomputed fp32 softmax output and the checkpoint's backward (its bf16
# copy and the gradients). Read off the allocation sites (launch --memory-peak).
UNFUSED_BACKWARD_BYTES = 12.0 - BF16
SELECTIVE_BACKWARD_BYTES = FP32 + 12.0
# the optimizer step without TE holds an fp32 copy of the larger of its two shards: megatron-core's
# torch fallback for the multi-tensor kernels (utils.py local_multi_tensor_scale: dst.copy_(src *
# scale)), which optimizer/clip_grads.py takes when neither TE nor Apex imports; TE holds none
OPTIMIZER_STEP_BYTES = FP32
# bytes per element of Adam's moments by dtype (--exp-avg-dtype, --exp-avg-sq-dtype: TE's FusedAdam
# keeps fp8 moments as uint8 with one scale per tensor)
STATE_BYTES = {"fp32": FP32, "bf16": BF16, "fp16": BF16, "fp8": 1}


@dataclass(frozen=True)
class StageMemory:
    """What one rank of a pipeline stage holds, in GiB, and its parameters."""

    pp_rank: int
    params: int
    params_expert: int
    weights_gib: float
    gradients_gib: float
    optimizer_gib: float
    activations_gib: float
    buffers_gib: float
    overhead_gib: float
    transient_gib: float = 0.0  # largest short-lived allocation of forward+backward (loss, a block's backward)
    optimizer_step_gib: float = 0.0  # held only while the optimizer steps (activations are gone by then)
    transient_from: str = "nothing beyond the activations"  # what the transient is
    param_tensors: int = 0  # parameter tensors on the rank (blocks.block_param_tensors): the optimizer's host work

    @property
    def resident_gib(self) -> float:
        """What stays allocated between steps."""
        return self.weights_gib + self.gradients_gib + self.optimizer_gib + self.buffers_gib + self.overhead_gib

    @property
    def total_gib(self) -> float:
        """Peak allocated: the larger of the forward+backward peak and the optimizer-step peak."""
        return self.resident_gib + max(self.activations_gib + self.transient_gib, self.optimizer_step_gib)

    def to_dict(self) -> dict[str, float | int]:
        r = lambda x: round(x, 3)  # noqa: E731
        return {
            "pp_rank": self.pp_rank,
            "params": self.params,
            "params_expert": self.params_expert,
            "param_tensors": self.param_tensors,
            "weights_gib": r(self.weights_gib),
            "gradients_gib": r(self.gradients_gib),
            "optimizer_gib": r(self.optimizer_gib),
            "activations_gib": r(self.activations_gib),
            "buffers_gib": r(self.buffers_gib),
            "transient_gib": r(self.transient_gib),
            "transient_from": self.transient_from,
            "optimizer_step_gib": r(self.optimizer_step_gib),
            "overhead_gib": r(self.overhead_gib),
            "resident_gib": r(self.resident_gib),
            "total_gib": r(self.total_gib),
            "reserved_gib": r(self.total_gib * RESERVED_OVER_ALLOCATED),
        }


def rank_stages(stages: list[Stage], pp_rank: int) -> list[Stage]:
    """The stages (virtual pipeline chunks) one pipeline rank holds."""
    return [s for s in stages if s.pp_rank == pp_rank]


def in_flight(lay: Layout, pp_rank: int) -> float:
    """Micro-batches (in units of a full stage) whose activations one rank holds at peak [R37]."""
    m = lay.num_microbatches
    if lay.vpp == 1:
        return min(m, lay.pp - pp_rank)
    warmup_chunks = (lay.pp - pp_rank - 1) * 2 + (lay.vpp - 1) * lay.pp
    return min(m * lay.vpp, warmup_chunks + 1) / lay.vpp


def _units(ctx: Context, blocks: str) -> list[str]:
    """A stage's blocks as Megatron layers: AD/AE pairs on the GPT path, one letter otherwise."""
    return [blocks[i : i + 2] for i in range(0, len(blocks), 2)] if ctx.plain_transformer else list(blocks)


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


def stage_memory(ctx: Context, lay: Layout, stages: list[Stage], eff: Efficiency, load: float = 1.0) -> list[StageMemory]:
    """Memory of one rank of each pipeline stage; `load` > 1 prices the busiest expert-parallel
    rank under routing imbalance (blocks.routed_load)."""
    out = []
    training = ctx.spec.training
    distopt = training.distributed_optimizer
    tokens = micro_batch_tokens(ctx, lay)
    recompute = training.recompute
    fp8 = fp8_casts(ctx)
    h_in = BF16 * ctx.spec.model.hidden_size / (lay.tp if lay.sp else 1)  # a layer's input, per token
    kept = {letter: block_activation_bytes(ctx, letter, lay, load) * tokens for letter in ctx.letters}  # per micro-batch
    # what the backward of a recomputed block (or of a selectively recomputed module) holds again:
    # its activations as without recompute
    rebuilt = {letter: block_activation_bytes(ctx, letter, lay, load, recompute="none", fp8=fp8) * tokens
               for letter in ctx.letters} if recompute == "full" else {}
    # selective recompute of modules beyond core attention: what a block's backward rebuilds of them
    modules = recompute_modules(ctx)
    base = "selective" if "core_attn" in modules else "none"
    again = {letter: max(0.0, block_activation_bytes(ctx, letter, lay, load, recompute=base, fp8=fp8) * tokens - kept[letter])
             for letter in ctx.letters} if modules - {"core_attn"} else {}
    offloaded = {letter: {m: b * tokens for m, b in offload_bytes(ctx, letter, lay, load).items()}
                 for letter in ctx.letters} if training.offload_modules else {}
    grad_bytes, state_bytes = gradient_bytes(ctx), optimizer_state_bytes(ctx)
    # the step's fp32 copies of bf16 gradient shards, unless TE's FusedAdam reads them as they are
    grad_copies = grad_bytes == BF16 and main_param_bytes(ctx) != BF16
    partial = recompute == "full" and (training.recompute_method == "block" or (training.recompute_num_layers or 1) > 1)
    for p in range(lay.pp):
        mine = rank_stages(stages, p)
        dense = expert = tensors = 0
        act_per_mb = 0.0
        loss = 0.0
        has_attention = False
        recomputed: list[list[str]] = []  # the units each checkpoint of a partial full recompute rebuilds
        for st in mine:
            for letter, n in Counter(st.blocks).items():
                bp = block_params(ctx, letter, lay)
                dense += n * bp.dense
                expert += n * bp.expert
                tensors += n * block_param_tensors(ctx, letter, lay)
                act_per_mb += 0.0 if partial else n * kept[letter]
            if partial:
                act, chunks = _partial_full_recompute(ctx, _units(ctx, st.blocks), rebuilt, h_in * tokens)
                act_per_mb += act
                recomputed += chunks
            has_attention = has_attention or "A" in st.blocks
            if st.embedding:
                dense += embedding_params(ctx, lay)
                tensors += embedding_param_tensors(ctx)
                act_per_mb += h_in * tokens
            if st.output_head:
                dense += head_params(ctx, lay)
                tensors += head_param_tensors(ctx, lay)
                # the vocab-parallel loss's fp32 logits (softmax and its gradient are computed in
                # place in them) next to the bf16 logits
                loss = (BF16 + FP32) * tokens * padded_vocab(ctx, lay.tp) / lay.tp
        mtp = mtp_memory(ctx, lay, kept, tokens) if any(st.output_head for st in mine) else None
        if mtp is not None:
            dense, expert, tensors = dense + mtp.dense, expert + mtp.expert, tensors + mtp.tensors
            act_per_mb += mtp.activations
            loss *= 1 + ctx.spec.model.mtp_num_layers  # each depth's logits beside the model's
        scores = unfused_scores(ctx, lay) if has_attention else 0.0
        blocks = "".join(st.blocks for st in mine) + (mtp_blocks(ctx) if mtp is not None else "")
        # the gradients a block's backward holds beside what it kept: the score gradients of an
        # unfused attention, and the routed tokens' gradients of an expert block; a block whose
        # modules are recomputed holds what they rebuild as well
        grads = {"A": (SELECTIVE_BACKWARD_BYTES if "core_attn" in modules else UNFUSED_BACKWARD_BYTES) * scores,
                 "E": expert_backward_bytes(ctx, lay, load) * tokens}
        for letter, extra in again.items():
            grads[letter] = grads.get(letter, 0.0) + extra
        here = sorted(set(blocks))
        # the last block of a kind is back-propagated first, after the blocks behind it freed theirs
        freed_behind = {letter: sum(kept[x] for x in blocks[blocks.rindex(letter) + 1:]) for letter in here}
        # what the transient is, in words (StageMemory.transient_from), by size
        candidates = [(loss, "the loss's logits")]
        if recompute == "full" and not partial:
            # the backward of a fully recomputed block re-runs its forward: its activations as
            # without recompute come back on top of the checkpoints, with its gradients
            candidates += [(rebuilt[letter] + grads.get(letter, 0.0), f"the backward of a recomputed {BLOCK_LETTERS[letter]} block")
                           for letter in here]
        else:
            candidates += [(grads[letter] - freed_behind[letter],
                            f"the gradients of the last {BLOCK_LETTERS[letter]} block's backward")
                           for letter in sorted(grads) if letter in freed_behind]
            # a checkpoint of several layers rebuilds them all before its backward runs
            candidates += [(sum(rebuilt[x] for x in "".join(chunk)) + max(grads.get(x, 0.0) for x in "".join(chunk)),
                            f"the backward of {len(chunk)} recomputed layers")
                           for chunk in {tuple(c) for c in recomputed}]
        # a weight's bf16 gradient until it is added into main_grad (blocks.weight_gradient_bytes),
        # the largest in the last block of its kind
        candidates += [(weight_gradient_bytes(ctx, letter, lay) - freed_behind[letter],
                        f"the bf16 gradient of the last {BLOCK_LETTERS[letter]} block's largest weight")
                       for letter in here]
        transient, transient_from = max(candidates, key=lambda c: c[0])
        if transient <= 0:
            transient, transient_from = 0.0, "nothing beyond the activations"
        total = dense + expert
        dense_shard = lay.dp * lay.cp if distopt else 1
        expert_shard = max(lay.edp, 1) if distopt else 1
        if lay.ep == 1:
            # with EP=1 megatron-core flags expert weights allreduce=True (tensor_parallel/layers.py
            # ColumnParallelLinear: "allreduce", not (is_expert and expert_parallel)), so DDP and
            # the distributed optimizer treat them as dense: one buffer, sharded over DP*CP
            sharded = ((dense + expert, dense_shard), (0, 1))
        else:
            sharded = ((dense, dense_shard), (expert, expert_shard))
        shards = sum(n / shard for n, shard in sharded)
        # what the optimizer step allocates beside the state: the fp32 copy of the larger shard
        # without TE (OPTIMIZER_STEP_BYTES), and fp32 copies of every bf16 gradient shard unless
        # the precision-aware optimizer reads them as they are (distrib_optimizer.py
        # _copy_model_grads_to_main_grads: shard_model_grad.float())
        step = 0.0 if ctx.te else OPTIMIZER_STEP_BYTES * max(n / shard for n, shard in sharded)
        if grad_copies:
            step += FP32 * shards
        activations = act_per_mb * in_flight(lay, p)
        if offloaded:
            activations -= offloaded_bytes(ctx, mine, offloaded, in_flight(lay, p))
        out.append(
            StageMemory(
                pp_rank=p,
                params=total,
                params_expert=expert,
                weights_gib=BF16 * total / GIB,
                gradients_gib=grad_bytes * total / GIB,
                optimizer_gib=state_bytes * shards / GIB,
                activations_gib=activations / GIB,
                buffers_gib=(SCORE_BUFFER_BYTES * scores + (TE_GROUPED_GEMM_WORKSPACE_BYTES if ctx.te and "E" in blocks else 0)) / GIB,
                overhead_gib=eff.overhead_gib,
                transient_gib=transient / GIB,
                transient_from=transient_from,
                optimizer_step_gib=step / GIB,
                param_tensors=tensors,
            )
        )
    return out


@dataclass(frozen=True)
class MTPMemory:
    """What the MTP layers add to one rank of the last pipeline stage (Megatron builds them there,
    multi_token_prediction.py mtp_on_this_rank): parameters and tensors, and the bytes they keep per
    micro-batch (their transformer layers as the model's, under the same recompute)."""

    dense: int
    expert: int
    tensors: int
    activations: float


def mtp_memory(ctx: Context, lay: Layout, kept: dict[str, float], tokens: float) -> MTPMemory | None:
    """The MTP layers on the last stage's rank, None without them."""
    if not ctx.spec.model.mtp_num_layers:
        return None
    dense = expert = tensors = 0
    activations = mtp_own_activation_bytes(ctx, lay) * tokens
    for letter, n in Counter(mtp_blocks(ctx)).items():
        bp = block_params(ctx, letter, lay)
        dense, expert = dense + n * bp.dense, expert + n * bp.expert
        tensors += n * block_param_tensors(ctx, letter, lay)
        activations += n * kept[letter]
    return MTPMemory(dense + mtp_own_params(ctx, lay, lay.pp), expert, tensors + mtp_own_tensors(ctx, lay.pp), activations)


def _partial_full_recompute(ctx: Context, units: list[str], rebuilt: dict[str, float], layer_input: float) -> tuple[float, list[list[str]]]:
    """What one model chunk (a virtual stage) keeps per micro-batch under full recompute of some
    layers (transformer_block.py _checkpointed_forward), and the layers each checkpoint rebuilds:
    uniform, one input per recompute_num_layers layers; block, the input of the chunk's first
    recompute_num_layers layers and everything the others keep without recompute."""
    training = ctx.spec.training
    n = training.recompute_num_layers or 1
    if training.recompute_method == "block":
        head, rest = units[:n], units[n:]
        return len(head) * layer_input + sum(rebuilt[x] for unit in rest for x in unit), [[unit] for unit in head]
    chunks = [units[i : i + n] for i in range(0, len(units), n)]
    return len(chunks) * layer_input, chunks


def offloaded_bytes(ctx: Context, mine: list[Stage], per_token: dict[str, dict[str, float]], micro_batches: float) -> float:
    """Bytes of one rank's activations that fine-grained activation offloading holds on the host
    at the peak: the listed modules' saved inputs of every micro-batch in flight, but for each
    module the last layer's group of the first chunk the backward reaches, which stays on the GPU
    so that its reload does not stall the backward (post_warmup_callback,
    fine_grained_activation_offload.py), and of the rest the share training.activation_offload_fraction."""
    if not ctx.spec.training.offload_modules:
        return 0.0
    blocks = "".join(st.blocks for st in mine)
    total: dict[str, float] = {}
    largest: dict[str, float] = {}
    for letter in blocks:
        for module, b in per_token[letter].items():
            total[module] = total.get(module, 0.0) + b
            largest[module] = max(largest.get(module, 0.0), b)
    moved = sum(total[m] * micro_batches - largest[m] for m in total)
    return max(0.0, moved) * ctx.spec.training.activation_offload_fraction
