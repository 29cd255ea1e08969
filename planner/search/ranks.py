"""Rank coordinates and process groups exactly as megatron-core's parallel_state builds them.

Two RankGenerators share the ranks (parallel_state.py:739-817 in core_v0.16.1), both with the
order "tp-cp-ep-dp-pp", leftmost fastest:
  dense : tp=TP,  cp=CP, ep=1,  dp=DP,  pp=PP
  expert: tp=ETP, cp=1,  ep=EP, dp=EDP, pp=PP
A group of an axis is the set of ranks that agree on every other coordinate of its generator.
"""

from __future__ import annotations

from megacpp.planner.axes import Axis
from megacpp.planner.search.layout import Layout

# each generator's axes, fastest-varying first (its size-1 axes left out)
DENSE_AXES = (Axis.TP, Axis.CP, Axis.DP, Axis.PP)
EXPERT_AXES = (Axis.ETP, Axis.EP, Axis.EDP, Axis.PP)


def _sizes(lay: Layout) -> tuple[dict[Axis, int], dict[Axis, int]]:
    return {a: lay.degree(a) for a in DENSE_AXES}, {a: lay.degree(a) for a in EXPERT_AXES}


def _coords(rank: int, sizes: dict[Axis, int]) -> dict[Axis, int]:
    out, rest = {}, rank
    for axis, size in sizes.items():  # insertion order is fastest-varying first
        out[axis] = rest % size
        rest //= size
    return out


def rank_coordinates(lay: Layout, gpus_per_node: int) -> list[dict[str, int]]:
    """One dict per global rank: node, local_rank and every axis coordinate."""
    dense, expert = _sizes(lay)
    rows = []
    for rank in range(lay.world):
        d, e = _coords(rank, dense), _coords(rank, expert)
        rows.append({
            "rank": rank, "node": rank // gpus_per_node, "local_rank": rank % gpus_per_node,
            **{a.value: d[a] for a in DENSE_AXES}, **{a.value: e[a] for a in (Axis.EP, Axis.ETP, Axis.EDP)},
        })
    return rows


def _groups(world: int, sizes: dict[Axis, int], along: tuple[Axis, ...]) -> list[list[int]]:
    buckets: dict[tuple[int, ...], list[int]] = {}
    for rank in range(world):
        c = _coords(rank, sizes)
        key = tuple(v for k, v in c.items() if k not in along)
        buckets.setdefault(key, []).append(rank)
    return sorted(buckets.values())


def process_groups(lay: Layout) -> dict[str, list[list[int]]]:
    """Rank lists of every group megatron-core creates for these axes (dp without CP, dp_cp with it)."""
    dense, expert = _sizes(lay)
    w = lay.world
    return {
        Axis.TP: _groups(w, dense, (Axis.TP,)),
        Axis.CP: _groups(w, dense, (Axis.CP,)),
        Axis.DP: _groups(w, dense, (Axis.DP,)),
        "dp_cp": _groups(w, dense, (Axis.DP, Axis.CP)),
        Axis.PP: _groups(w, dense, (Axis.PP,)),
        Axis.ETP: _groups(w, expert, (Axis.ETP,)),
        Axis.EP: _groups(w, expert, (Axis.EP,)),
        Axis.EDP: _groups(w, expert, (Axis.EDP,)),
    }
