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
    head_param_tensors,
    head_params,
    micro_batch_tokens,
    padded_vocab,
    unfused_scores,
    weight_gradient_bytes,
)
from megacpp.planner.cost.coefficients import RESERVED_OVER_ALLOCATED, Efficiency
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


def stage_memory(ctx: Context, lay: Layout, stages: list[Stage], eff: Efficiency, load: float = 1.0) -> list[StageMemory]:
    """Memory of one rank of each pipeline stage; `load` > 1 prices the busiest expert-parallel
    rank under routing imbalance (blocks.routed_load)."""
    out = []
    distopt = ctx.spec.training.distributed_optimizer
    tokens = micro_batch_tokens(ctx, lay)
    recompute = ctx.spec.training.recompute
    kept = {letter: block_activation_bytes(ctx, letter, lay, load) * tokens for letter in ctx.letters}  # per micro-batch
    # what the backward of a fully recomputed block holds again: its activations as without recompute
    rebuilt = {letter: block_activation_bytes(ctx, letter, lay, load, recompute="none") * tokens
               for letter in ctx.letters} if recompute == "full" else {}
    for p in range(lay.pp):
        mine = rank_stages(stages, p)
        dense = expert = tensors = 0
        act_per_mb = 0.0
        loss = 0.0
        has_attention = False
        for st in mine:
            for letter, n in Counter(st.blocks).items():
                bp = block_params(ctx, letter, lay)
                dense += n * bp.dense
                expert += n * bp.expert
                tensors += n * block_param_tensors(ctx, letter, lay)
                act_per_mb += n * kept[letter]
            has_attention = has_attention or "A" in st.blocks
            if st.embedding:
                dense += embedding_params(ctx, lay)
                tensors += embedding_param_tensors(ctx)
                act_per_mb += BF16 * ctx.spec.model.hidden_size * tokens / (lay.tp if lay.sp else 1)
            if st.output_head:
                dense += head_params(ctx, lay)
                tensors += head_param_tensors(ctx, lay)
                # the vocab-parallel loss's fp32 logits (softmax and its gradient are computed in
                # place in them) next to the bf16 logits
                loss = (BF16 + FP32) * tokens * padded_vocab(ctx, lay.tp) / lay.tp
        scores = unfused_scores(ctx, lay) if has_attention else 0.0
        blocks = "".join(st.blocks for st in mine)
        # the gradients a block's backward holds beside what it kept: the score gradients of an
        # unfused attention, and the routed tokens' gradients of an expert block
        grads = {"A": (SELECTIVE_BACKWARD_BYTES if recompute == "selective" else UNFUSED_BACKWARD_BYTES) * scores,
                 "E": expert_backward_bytes(ctx, lay, load) * tokens}
        # the last block of a kind is back-propagated first, after the blocks behind it freed theirs
        freed_behind = {letter: sum(kept[x] for x in blocks[blocks.rindex(letter) + 1:]) for letter in set(blocks)}
        # what the transient is, in words (StageMemory.transient_from), by size
        candidates = [(loss, "the loss's logits")]
        if recompute == "full":
            # the backward of a fully recomputed block re-runs its forward: its activations as
            # without recompute come back on top of the checkpoints, with its gradients
            candidates += [(rebuilt[letter] + grads.get(letter, 0.0), f"the backward of a recomputed {BLOCK_LETTERS[letter]} block")
                           for letter in sorted(set(blocks))]
        else:
            candidates += [(grads[letter] - freed_behind[letter],
                            f"the gradients of the last {BLOCK_LETTERS[letter]} block's backward")
                           for letter in grads if letter in blocks]
        # a weight's bf16 gradient until it is added into main_grad (blocks.weight_gradient_bytes),
        # the largest in the last block of its kind
        candidates += [(weight_gradient_bytes(ctx, letter, lay) - freed_behind[letter],
                        f"the bf16 gradient of the last {BLOCK_LETTERS[letter]} block's largest weight")
                       for letter in sorted(set(blocks))]
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
        out.append(
            StageMemory(
                pp_rank=p,
                params=total,
                params_expert=expert,
                weights_gib=BF16 * total / GIB,
                gradients_gib=FP32 * total / GIB,
                optimizer_gib=sum(3 * FP32 * n / shard for n, shard in sharded) / GIB,
                activations_gib=act_per_mb * in_flight(lay, p) / GIB,
                buffers_gib=(SCORE_BUFFER_BYTES * scores + (TE_GROUPED_GEMM_WORKSPACE_BYTES if ctx.te and "E" in blocks else 0)) / GIB,
                overhead_gib=eff.overhead_gib,
                transient_gib=transient / GIB,
                transient_from=transient_from,
                optimizer_step_gib=0.0 if ctx.te else OPTIMIZER_STEP_BYTES * max(n / shard for n, shard in sharded) / GIB,
                param_tensors=tensors,
            )
        )
    return out
