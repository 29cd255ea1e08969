"""Whether a layout fits in memory, decided from bounds where they decide it.

A search asks it of every legal layout, tens of thousands of them, and most are far from the
card's capacity either way. Two bounds follow the shard shape's per-letter terms (cost.shape_memory)
and a few counts of the stage split, without working out any rank's transient:

- above every rank's peak: one rank holding the largest count of each letter that any rank of
  the split holds, with the embedding, the head, the final norm and the MTP layers, the first rank's micro-batches
  in flight, and the largest transient, buffers and optimizer-step copies of any rank;
- below the first and the last pipeline rank's peaks: their weights, gradients, optimizer state
  and activations (the MTP layers' where they run), and the last rank's loss logits.

A layout between them is priced exactly (cost.memory.peak_gib). The bounds leave out what they
do not cover (activation offloading, Megatron-FSDP, partial full recompute): those are priced.
"""

from __future__ import annotations

from dataclasses import dataclass

from megacpp.planner.cost.blocks import BF16, FP32
from megacpp.planner.cost.coefficients import Efficiency
from megacpp.planner.cost.memory import (
    GIB,
    OPTIMIZER_STEP_BYTES,
    SCORE_BUFFER_BYTES,
    TE_GROUPED_GEMM_WORKSPACE_BYTES,
    in_flight,
    offloads,
    peak_gib,
)
from megacpp.planner.cost.ranks import RankStages, ranks
from megacpp.planner.cost.shape_memory import ShapeLetters, backward_gradients, ends, mtp_of, shape_letters
from megacpp.planner.cost.shard import memo_stages
from megacpp.planner.search.layout import Context, Layout
from megacpp.planner.search.stages import Stage

# how far a bound must clear the capacity to decide: far beyond the rounding by which its sums,
# taken in another order, can differ from peak_gib's
FIT_MARGIN = 1e-9


@dataclass(frozen=True)
class _Spread:
    """What a stage split puts on its ranks: each letter's largest count on one rank, and the first and last ranks."""

    most: tuple[tuple[str, int], ...]
    first: RankStages
    last: RankStages


def _spread(ctx: Context, stages: list[Stage], pp: int) -> _Spread:
    """_Spread of a stage list, memoised as cost.ranks.ranks is."""
    def make() -> _Spread:
        held = ranks(ctx, stages, pp)
        most: dict[str, int] = {}
        for rank in held:
            for letter, n in rank.counts:
                most[letter] = max(most.get(letter, 0), n)
        return _Spread(tuple(most.items()), held[0], held[-1])

    return memo_stages(ctx, "spread", stages, pp, make)


def _ceiling(ctx: Context, lay: Layout, t: ShapeLetters) -> tuple[float, float] | None:
    """(transient bytes, buffers GiB) that no rank of `lay`'s shard shape (`t`, its letters)
    exceeds: every candidate of cost.memory._transient before the blocks behind it are freed, and
    the score buffer with the grouped GEMMs' workspaces; None where a term is negative and the
    bounds would not hold."""
    key = lay.pp == 1  # as cost.shape_memory.ends keeps the loss's logits
    if key not in t.ceilings:
        if min(*t.kept.values(), *t.rebuilt.values(), *t.weight_gradient.values(), t.scores, t.expert_backward) < 0:
            t.ceilings[key] = None
        else:
            grads = backward_gradients(t, t.scores)
            transient = max(0.0, ends(ctx, lay, t).loss, *grads.values(), *t.weight_gradient.values(),
                            *(t.rebuilt[letter] + grads.get(letter, 0.0) for letter in t.rebuilt))
            workspace = TE_GROUPED_GEMM_WORKSPACE_BYTES if ctx.te and "E" in ctx.letters else 0
            t.ceilings[key] = (transient, (SCORE_BUFFER_BYTES * t.scores + workspace) / GIB)
    return t.ceilings[key]


def _held_at_most(t: ShapeLetters, counts: tuple[tuple[str, int], ...]) -> tuple[int, int, float]:
    """(dense parameters, expert parameters, activation bytes per micro-batch) of `counts` blocks by letter."""
    params, kept = t.params, t.kept
    dense = expert = 0
    activations = 0.0
    for letter, n in counts:
        bp = params[letter]
        dense += n * bp.dense
        expert += n * bp.expert
        activations += n * kept[letter]
    return dense, expert, activations


def fits(ctx: Context, lay: Layout, stages: list[Stage], eff: Efficiency, capacity: float, load: float = 1.0) -> bool:
    """Whether `lay` fits in `capacity` GiB: not peak_gib(ctx, lay, stages, eff, load) > capacity,
    from the bounds (module docstring) where one decides it, else from peak_gib."""
    training = ctx.spec.training
    if offloads(ctx) or training.data_parallel_sharding == "fsdp":
        return not peak_gib(ctx, lay, stages, eff, load) > capacity
    t = shape_letters(ctx, lay, load)
    ceiling = None if t.partial else _ceiling(ctx, lay, t)
    if ceiling is None:
        return not peak_gib(ctx, lay, stages, eff, load) > capacity
    spread, outer = _spread(ctx, stages, lay.pp), ends(ctx, lay, t)
    distopt, ep1 = training.distributed_optimizer, lay.ep == 1
    dense_shard = lay.dp * lay.cp if distopt else 1
    expert_shard = max(lay.edp, 1) if distopt else 1
    flight = in_flight(lay, 0) / GIB
    per_param, per_shard = (BF16 + t.grad_bytes) / GIB, t.state_bytes / GIB
    # above: the most of each letter, the embedding, the head, the final norm and the MTP layers
    # (with their embedding copy) on one rank
    dense, expert, activations = _held_at_most(t, spread.most)
    dense += outer.embedding_params + outer.head_params + outer.norm_params
    activations += outer.embedding_activations
    most_mtp = mtp_of(ctx, lay, t, True)
    if most_mtp is not None:
        dense, expert, activations = dense + most_mtp.dense, expert + most_mtp.expert, activations + most_mtp.activations
    sharded = ((dense + expert) / dense_shard, 0.0) if ep1 else (dense / dense_shard, expert / expert_shard)
    step = (0.0 if ctx.te else OPTIMIZER_STEP_BYTES * max(sharded)) + (FP32 * (sharded[0] + sharded[1]) if t.grad_copies else 0.0)
    transient, buffers = ceiling
    above = (per_param * (dense + expert) + per_shard * (sharded[0] + sharded[1]) + buffers + eff.overhead_gib
             + max(activations * flight + transient / GIB, step / GIB))
    if above * (1 + FIT_MARGIN) <= capacity:
        return True
    # below: the first rank's, then the last rank's weights, gradients, optimizer state and
    # activations alone, the last rank's with the loss's logits (a transient at least that large)
    for p, rank in ((0, spread.first), (lay.pp - 1, spread.last)):
        dense, expert, activations = _held_at_most(t, rank.counts)
        logits = 0.0
        if rank.embedding:
            dense += outer.embedding_params
            activations += outer.embedding_activations
        if rank.output_head:
            dense += outer.head_params
            logits = outer.loss
        if rank.final_norm:
            dense += outer.norm_params
        mtp = mtp_of(ctx, lay, t, not rank.mtp_first) if rank.mtp else None
        if mtp is not None:
            dense, expert, activations = dense + mtp.dense, expert + mtp.expert, activations + mtp.activations
        sharded = ((dense + expert) / dense_shard, 0.0) if ep1 else (dense / dense_shard, expert / expert_shard)
        below = (per_param * (dense + expert) + per_shard * (sharded[0] + sharded[1]) + eff.overhead_gib
                 + activations * in_flight(lay, p) / GIB + logits / GIB)
        if below * (1 - FIT_MARGIN) > capacity:
            return False
    return not peak_gib(ctx, lay, stages, eff, load) > capacity
