"""A layout's pipeline ranks as the cost model reads them: each rank's stages and blocks, which
ranks hold the same (the first of each kind decides their memory and time), and what full
recompute runs again on a rank.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable
from dataclasses import dataclass, replace

from megacpp.planner.cost.latent import rank_blocks
from megacpp.planner.cost.shard import memo_stages
from megacpp.planner.search.layout import Context
from megacpp.planner.search.stages import Stage


def rank_stages(stages: list[Stage], pp_rank: int) -> list[Stage]:
    """The stages (virtual pipeline chunks) one pipeline rank holds."""
    return [s for s in stages if s.pp_rank == pp_rank]


def layer_units(ctx: Context, blocks: str) -> list[str]:
    """A stage's blocks as Megatron layers: AD/AE pairs on the GPT path, one letter otherwise."""
    return [blocks[i : i + 2] for i in range(0, len(blocks), 2)] if ctx.plain_transformer else list(blocks)


@dataclass(frozen=True)
class RankStages:
    """One pipeline rank's stages, laid out as _held (and cost.step) reads them."""

    stages: list[Stage]
    key: Hashable  # what _held depends on (stage_memory memoises it by that)
    blocks: str
    counts: tuple[tuple[str, int], ...]  # Counter(blocks).items()
    here: list[str]  # the letters of its blocks, sorted
    behind: dict[str, tuple[tuple[str, int], ...]]  # the blocks behind the last block of each letter, counted
    embedding: bool
    output_head: bool
    mtp: bool  # it runs the MTP layers (Stage.mtp)
    mtp_first: bool  # they sit in the chunk with the embedding, which they share (no copy)
    final_norm: bool  # it holds the decoder's final norm
    # what _transient depends on: whether it has the head, and the blocks behind its last block of
    # each letter; None under a partial full recompute, whose checkpoints follow the stages' bounds
    transient_key: Hashable = None
    first: bool = True  # no rank before it holds the same (the same key)


def first_ranks(ctx: Context, stages: list[Stage], pp: int) -> list[tuple[int, RankStages]]:
    """(pp_rank, RankStages) of the ranks of `ranks` that no rank before holds the same as (RankStages.first)."""
    return memo_stages(ctx, "first ranks", stages, pp, lambda: [(p, rank) for p, rank in enumerate(ranks(ctx, stages, pp)) if rank.first])


def _rank_stages(ctx: Context, mine: list[Stage], pp: int) -> RankStages:
    blocks = "".join(st.blocks for st in mine)
    embedding, head = any(st.embedding for st in mine), any(st.output_head for st in mine)
    mtp, mtp_first = any(st.mtp for st in mine), any(st.mtp and st.embedding for st in mine)
    # with MTP layers the final norm moves from the loss's stage to the last decoder layer's
    # (transformer_block.py has_final_layernorm_in_this_stage)
    norm = any(st.stop == ctx.num_layers > st.start for st in mine) if ctx.spec.model.mtp_num_layers else head
    # the stages' bounds matter only to a partial full recompute (its checkpoints stay in a stage);
    # head_params, to whether pp is 1
    key = (pp == 1, embedding, head, mtp, mtp_first, norm, tuple(st.blocks for st in mine) if partial_recompute(ctx) else blocks)
    behind = {letter: tuple(Counter(blocks[blocks.rindex(letter) + 1:]).items()) for letter in set(blocks)}
    here = sorted(set(blocks))
    transient_key = None if partial_recompute(ctx) else (head, tuple((letter, behind[letter]) for letter in here))
    return RankStages(mine, key, blocks, tuple(Counter(blocks).items()), here, behind, embedding, head, mtp, mtp_first,
                      norm, transient_key)


def ranks(ctx: Context, stages: list[Stage], pp: int) -> list[RankStages]:
    """Each pipeline rank's stages (RankStages) in pp_rank order, memoised per stage list (a search's come from
    assign_stages' cache)."""
    def make() -> list[RankStages]:
        mine: list[list[Stage]] = [[] for _ in range(pp)]
        for st in stages:
            mine[st.pp_rank].append(st)
        out: list[RankStages] = []
        for m in mine:
            rank = _rank_stages(ctx, m, pp)
            out.append(replace(rank, first=all(r.key != rank.key for r in out)))
        return out

    return memo_stages(ctx, "ranks", stages, pp, make)


def recomputed_blocks(ctx: Context, mine: list[Stage]) -> str:
    """The blocks of one rank's stages whose forward full recompute runs again in the backward:
    every block, or under the block method only the first recompute_num_layers layers of each
    model chunk (transformer_block.py _checkpointed_forward), the MTP layers with the rank that
    runs them unless the block method leaves them out; none without full recompute."""
    training = ctx.spec.training
    if training.recompute != "full":
        return ""
    again = "".join(unit for st in mine for chunk in checkpoints(ctx, layer_units(ctx, st.blocks)) for unit in chunk)
    return again if training.recompute_method == "block" else rank_blocks(ctx, again, any(st.mtp for st in mine))


def checkpoints(ctx: Context, units: list[str]) -> list[list[str]]:
    """The layers each checkpoint of full recompute rebuilds in one model chunk (its Megatron
    layers, `units`; transformer_block.py _checkpointed_forward): uniform, consecutive runs of
    recompute_num_layers layers; block, each of the chunk's first recompute_num_layers layers."""
    training = ctx.spec.training
    n = training.recompute_num_layers or 1
    if training.recompute_method == "block":
        return [[unit] for unit in units[:n]]
    return [units[i : i + n] for i in range(0, len(units), n)]


def partial_recompute(ctx: Context) -> bool:
    """Whether full recompute checkpoints only some layers (memory._partial_full_recompute)."""
    training = ctx.spec.training
    return training.recompute == "full" and (training.recompute_method == "block" or (training.recompute_num_layers or 1) > 1)
