"""Per-stage memory: what one rank of each pipeline stage holds at its peak.

Megatron's bookkeeping: bf16 weights, an fp32 gradient buffer, fp32 main parameters and Adam
moments sharded by the distributed optimizer over DP*CP for dense and EDP for expert weights
[R30], plus activations x micro-batches in flight for the 1F1B / interleaved schedule [R37] and
the largest short-lived allocation of forward+backward. The measurements behind each term:
benchmarks/evidence/cost_model_notes.md, "Memory terms".
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from megacpp.planner.cost.blocks import (
    BF16,
    FP32,
    BlockParams,
)
from megacpp.planner.cost.coefficients import RESERVED_OVER_ALLOCATED, Efficiency
from megacpp.planner.cost.latent import (
    rank_blocks,
)
from megacpp.planner.cost.ranks import (
    RankStages,
    checkpoints,
    first_ranks,
    layer_units,
    ranks,
)
from megacpp.planner.cost.shape_memory import (
    Held,
    MTPMemory,
    ShapeLetters,
    backward_gradients,
    ends,
    mtp_of,
    shape_letters,
)
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
# the optimizer step without TE holds an fp32 copy of the larger of its two shards: megatron-core's
# torch fallback for the multi-tensor kernels (utils.py local_multi_tensor_scale: dst.copy_(src *
# scale)), which optimizer/clip_grads.py takes when neither TE nor Apex imports; TE holds none
OPTIMIZER_STEP_BYTES = FP32
# what a rank's transient is (StageMemory.transient_from), by the block letter it comes from
_RECOMPUTED_BLOCK = {k: f"the backward of a recomputed {name} block" for k, name in BLOCK_LETTERS.items()}
_LAST_BACKWARD = {k: f"the gradients of the last {name} block's backward" for k, name in BLOCK_LETTERS.items()}
_LAST_WEIGHT_GRADIENT = {k: f"the bf16 gradient of the last {name} block's largest weight" for k, name in BLOCK_LETTERS.items()}


# not frozen: a search makes one per pipeline rank of every legal layout, and a frozen
# dataclass's __init__ takes five times as long; nothing changes one once it is made
@dataclass
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
        return _total_gib(self.weights_gib, self.gradients_gib, self.optimizer_gib, self.buffers_gib, self.overhead_gib,
                          self.activations_gib, self.transient_gib, self.optimizer_step_gib)

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


def _total_gib(weights: float, gradients: float, optimizer: float, buffers: float, overhead: float,
               activations: float, transient: float, optimizer_step: float) -> float:
    """StageMemory.total_gib from its terms: what stays allocated, and above it the larger of the
    forward+backward peak and the optimizer-step peak."""
    return weights + gradients + optimizer + buffers + overhead + max(activations + transient, optimizer_step)


def in_flight(lay: Layout, pp_rank: int) -> float:
    """Micro-batches (in units of a full stage) whose activations one rank holds at peak [R37]."""
    m = lay.num_microbatches
    if lay.vpp == 1:
        return min(m, lay.pp - pp_rank)
    warmup_chunks = (lay.pp - pp_rank - 1) * 2 + (lay.vpp - 1) * lay.pp
    return min(m * lay.vpp, warmup_chunks + 1) / lay.vpp


# unsharded layers a rank holds at once under Megatron-FSDP: the one computing and the one prefetched
FSDP_LAYERS_IN_FLIGHT = 2


def _held(ctx: Context, lay: Layout, mine: RankStages, t: ShapeLetters) -> Held:
    """What one rank holding the stages `mine` keeps (stage_memory), from its shape's letters."""
    partial, kept = t.partial, t.kept
    params, tensors_of = t.params, t.tensors
    dense = expert = tensors = 0
    act_per_mb = 0.0
    recomputed: list[list[str]] = []  # the units each checkpoint of a partial full recompute rebuilds
    for letter, n in mine.counts:
        bp = params[letter]
        dense += n * bp.dense
        expert += n * bp.expert
        tensors += n * tensors_of[letter]
        act_per_mb += 0.0 if partial else n * kept[letter]
    if partial:
        for st in mine.stages:
            act, chunks = _partial_full_recompute(ctx, layer_units(ctx, st.blocks), t.rebuilt, t.h_in * t.tokens)
            act_per_mb += act
            recomputed += chunks
    loss = 0.0
    if mine.embedding or mine.output_head or mine.final_norm:
        outer = ends(ctx, lay, t)
        if mine.embedding:
            dense += outer.embedding_params
            tensors += outer.embedding_tensors
            act_per_mb += outer.embedding_activations
        if mine.output_head:
            dense += outer.head_params
            tensors += outer.head_tensors
            loss = outer.loss
        if mine.final_norm:
            dense += outer.norm_params
            tensors += outer.norm_tensors
    mtp = mtp_of(ctx, lay, t, not mine.mtp_first) if mine.mtp else None
    if mtp is not None:
        dense, expert, tensors = dense + mtp.dense, expert + mtp.expert, tensors + mtp.tensors
        act_per_mb += mtp.activations
    # the rest follows the rank's letters and what lies behind the last of each (transient_key),
    # which far fewer ranks differ in than in their blocks
    key = mine.transient_key if mtp is None else None
    known = t.transients.get(key) if key is not None else None
    if known is None:
        known = _transient(ctx, mine, t, loss, mtp, recomputed)
        if key is not None:
            t.transients[key] = known
    return Held(dense, expert, tensors, act_per_mb, *known)


def _transient(ctx: Context, mine: RankStages, t: ShapeLetters, loss: float, mtp: MTPMemory | None,
               recomputed: list[list[str]]) -> tuple[float, str, float]:
    """(transient bytes, what it is, buffers in GiB) of one rank (Held), given its loss's logits
    bytes, its MTP layers and the units each checkpoint of a partial full recompute rebuilds."""
    recompute = ctx.spec.training.recompute
    partial, kept, rebuilt = t.partial, t.kept, t.rebuilt
    blocks = rank_blocks(ctx, mine.blocks, mtp is not None)
    scores = t.scores if "A" in blocks else 0.0
    grads = backward_gradients(t, scores)
    # the last block of a kind is back-propagated first, after the blocks behind it freed theirs
    if mtp is None:
        here = mine.here
        freed_behind = {letter: sum(n * kept[x] for x, n in mine.behind[letter]) for letter in here}
    else:  # the MTP layers run after the stage's own blocks
        here = sorted(set(blocks))
        freed_behind = {letter: sum(kept[x] for x in blocks[blocks.rindex(letter) + 1:]) for letter in here}
    # what the transient is, in words (StageMemory.transient_from), by size
    candidates = [(loss, "the loss's logits")]
    if recompute == "full" and not partial:
        # the backward of a fully recomputed block re-runs its forward: its activations as
        # without recompute come back on top of the checkpoints, with its gradients
        candidates += [(rebuilt[letter] + grads.get(letter, 0.0), _RECOMPUTED_BLOCK[letter]) for letter in here]
    else:
        candidates += [(grads[letter] - freed_behind[letter], _LAST_BACKWARD[letter])
                       for letter in sorted(grads) if letter in freed_behind]
        # a checkpoint of several layers rebuilds them all before its backward runs
        candidates += [(sum(rebuilt[x] for x in "".join(chunk)) + max(grads.get(x, 0.0) for x in "".join(chunk)),
                        f"the backward of {len(chunk)} recomputed layers")
                       for chunk in {tuple(c) for c in recomputed}]
    # a weight's bf16 gradient until it is added into main_grad (blocks.weight_gradient_bytes),
    # the largest in the last block of its kind
    candidates += [(t.weight_gradient[letter] - freed_behind[letter], _LAST_WEIGHT_GRADIENT[letter]) for letter in here]
    transient, transient_from = max(candidates, key=lambda c: c[0])
    if transient <= 0:
        transient, transient_from = 0.0, "nothing beyond the activations"
    buffers = SCORE_BUFFER_BYTES * scores + (TE_GROUPED_GEMM_WORKSPACE_BYTES if ctx.te and "E" in blocks else 0)
    return transient, transient_from, buffers / GIB


def stage_memory(ctx: Context, lay: Layout, stages: list[Stage], eff: Efficiency, load: float = 1.0) -> list[StageMemory]:
    """Memory of one rank of each pipeline stage; `load` > 1 prices the busiest expert-parallel
    rank under routing imbalance (blocks.routed_load)."""
    return _stage_memory(ctx, lay, stages, eff, load, peaks_only=False)


def first_ranks_memory(ctx: Context, lay: Layout, stages: list[Stage], eff: Efficiency, load: float = 1.0) -> list[StageMemory]:
    """stage_memory of the first rank of each kind (first_ranks) alone: a rank that holds the same
    as one before it differs from it only in its activations."""
    return _stage_memory(ctx, lay, stages, eff, load, peaks_only=True)


def _stage_memory(ctx: Context, lay: Layout, stages: list[Stage], eff: Efficiency, load: float,
                  peaks_only: bool) -> list[StageMemory]:
    return [
        StageMemory(
            pp_rank=p,
            params=params,
            params_expert=rank.expert,
            weights_gib=BF16 * resident / GIB,
            gradients_gib=grad_bytes * resident / GIB,
            optimizer_gib=state_bytes * shards / GIB,
            activations_gib=activations / GIB,
            buffers_gib=rank.buffers_gib,
            overhead_gib=eff.overhead_gib,
            transient_gib=rank.transient / GIB,
            transient_from=rank.transient_from,
            optimizer_step_gib=step / GIB,
            param_tensors=rank.tensors,
        )
        for p, rank, params, resident, shards, step, activations, grad_bytes, state_bytes
        in _rank_terms(ctx, lay, stages, load, peaks_only)
    ]


def peak_gib(ctx: Context, lay: Layout, stages: list[Stage], eff: Efficiency, load: float = 1.0) -> float:
    """The largest total_gib of stage_memory, from the ranks that can hold it: a rank has no fewer
    micro-batches in flight than the ranks after it (in_flight), so of the ranks that hold the same
    blocks the first peaks highest. With activation offloading, which moves more of them the more
    there are, every rank is priced. The search asks it of every legal layout, so it adds up the
    terms of StageMemory.total_gib without making one."""
    return max(
        _total_gib(BF16 * resident / GIB, grad_bytes * resident / GIB, state_bytes * shards / GIB, rank.buffers_gib,
                   eff.overhead_gib, activations / GIB, rank.transient / GIB, step / GIB)
        for _, rank, _, resident, shards, step, activations, grad_bytes, state_bytes
        in _rank_terms(ctx, lay, stages, load, peaks_only=not ctx.spec.training.offload_modules)
    )


def _rank_terms(ctx: Context, lay: Layout, stages: list[Stage], load: float,
                peaks_only: bool) -> Iterator[tuple[int, Held, int, float, float, float, float, int, float]]:
    """Per pipeline rank (only the first of those that hold the same, with `peaks_only`): its
    pp_rank, Held, parameters, resident parameters, optimizer-sharded parameters, optimizer-step
    bytes and activation bytes, with the bytes per parameter of the gradients and the optimizer state."""
    training = ctx.spec.training
    distopt, fsdp, te = training.distributed_optimizer, training.data_parallel_sharding == "fsdp", ctx.te
    letters = shape_letters(ctx, lay, load)
    grad_bytes, state_bytes, held = letters.grad_bytes, letters.state_bytes, letters.held
    dense_shard = lay.dp * lay.cp if distopt else 1
    expert_shard = max(lay.edp, 1) if distopt else 1
    ep1 = lay.ep == 1
    for p, stages_p in first_ranks(ctx, stages, lay.pp) if peaks_only else enumerate(ranks(ctx, stages, lay.pp)):
        rank = held.get(stages_p.key)
        if rank is None:
            rank = held[stages_p.key] = _held(ctx, lay, stages_p, letters)
        dense, expert = rank.dense, rank.expert
        total = dense + expert
        if ep1:
            # with EP=1 megatron-core flags expert weights allreduce=True (tensor_parallel/layers.py
            # ColumnParallelLinear: "allreduce", not (is_expert and expert_parallel)), so DDP and
            # the distributed optimizer treat them as dense: one buffer, sharded over DP*CP
            sharded = ((dense + expert) / dense_shard, 0.0)
        else:
            sharded = (dense / dense_shard, expert / expert_shard)
        shards = sharded[0] + sharded[1]
        resident = fsdp_resident_params(ctx, letters.params, stages_p.stages, shards) if fsdp else total
        # what the optimizer step allocates beside the state: the fp32 copy of the larger shard
        # without TE (OPTIMIZER_STEP_BYTES), and fp32 copies of every bf16 gradient shard unless
        # the precision-aware optimizer reads them as they are (distrib_optimizer.py
        # _copy_model_grads_to_main_grads: shard_model_grad.float())
        step = 0.0 if te else OPTIMIZER_STEP_BYTES * max(sharded)
        if letters.grad_copies:
            step += FP32 * shards
        activations = rank.act_per_mb * in_flight(lay, p)
        if letters.offloaded:
            activations -= offloaded_bytes(ctx, stages_p.stages, letters.offloaded, in_flight(lay, p))
        if training.offload_layers:
            activations -= offloaded_layer_bytes(ctx, stages_p.stages, letters.kept, training.offload_layers)
        yield p, rank, total, resident, shards, step, activations, grad_bytes, state_bytes


def fsdp_resident_params(ctx: Context, params: dict[str, BlockParams], mine: list[Stage], shards: float) -> float:
    """Parameters whose weights (and gradients) a rank holds under Megatron-FSDP (optim_grads_params):
    its shard of every weight and gradient, sharded over DP x CP (experts over EDP) as the
    distributed optimizer shards its state, plus the unsharded layers in flight: the layer computing
    and the next one whose all-gather is prefetched (and, in the backward, the layer whose gradient
    waits for its reduce-scatter). megatron/core/distributed/fsdp/src/README.md: parameters are
    all-gathered per module before its forward and backward and freed after; gradients are
    reduce-scattered per module. `params`: each block letter's parameters on the rank (ShapeLetters.params)."""
    per_letter = {letter: bp.dense + bp.expert for letter, bp in params.items()}
    largest = max((sum(per_letter[x] for x in unit) for st in mine for unit in layer_units(ctx, st.blocks)), default=0)
    return shards + FSDP_LAYERS_IN_FLIGHT * largest


def _partial_full_recompute(ctx: Context, units: list[str], rebuilt: dict[str, float], layer_input: float) -> tuple[float, list[list[str]]]:
    """What one model chunk (a virtual stage) keeps per micro-batch under full recompute of some
    layers (transformer_block.py _checkpointed_forward), and the layers each checkpoint rebuilds:
    uniform, one input per recompute_num_layers layers; block, the input of the chunk's first
    recompute_num_layers layers and everything the others keep without recompute."""
    chunks = checkpoints(ctx, units)
    # the block method keeps the layers after its checkpoints whole
    rest = units[len(chunks):] if ctx.spec.training.recompute_method == "block" else []
    return len(chunks) * layer_input + sum(rebuilt[x] for unit in rest for x in unit), chunks


def offloads(ctx: Context) -> bool:
    """Whether the spec offloads activations, by module or by whole layers."""
    training = ctx.spec.training
    return bool(training.offload_layers or training.offload_modules)


def _offloaded_layers(ctx: Context, mine: list[Stage], kept: dict[str, float], layers: int) -> list[float]:
    """What each of the rank's first `layers` layers keeps per micro-batch: whole-layer CPU offloading's share."""
    units = [unit for st in mine for unit in layer_units(ctx, st.blocks)][:layers]
    return [sum(kept[letter] for letter in unit) for unit in units]


def offload_traffic(ctx: Context, lay: Layout, mine: list[Stage], load: float = 1.0) -> float:
    """Bytes one rank's activation offloading sends to the host per micro-batch, and brings back
    for its backward: the saved inputs of every listed module (of the activation_offload_fraction
    of them), or the first offload_layers layers' activations whole."""
    if not offloads(ctx):
        return 0.0
    training = ctx.spec.training
    t = shape_letters(ctx, lay, load)
    if training.offload_layers:
        return sum(_offloaded_layers(ctx, mine, t.kept, training.offload_layers))
    blocks = "".join(st.blocks for st in mine)
    return sum(sum(t.offloaded[letter].values()) for letter in blocks) * training.activation_offload_fraction


def offloaded_layer_bytes(ctx: Context, mine: list[Stage], kept: dict[str, float], layers: int) -> float:
    """Bytes of activations whole-layer CPU offloading holds on the host at the peak, the end of a
    micro-batch's forward (one in flight: it needs PP 1): what the first `layers` layers keep, but
    the last of them, whose reload runs ahead of its backward (Transformer Engine's
    get_cpu_offload_context with num_layers of model_layers, transformer_block.py)."""
    per_layer = _offloaded_layers(ctx, mine, kept, layers)
    return sum(per_layer) - (per_layer[-1] if per_layer else 0.0)


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
