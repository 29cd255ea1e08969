"""Rank coordinates and process groups exactly as megatron-core's parallel_state builds them.

Two RankGenerators share the ranks (parallel_state.py:739-817 in core_v0.16.1), both with the
order "tp-cp-ep-dp-pp", leftmost fastest:
  dense : tp=TP,  cp=CP, ep=1,  dp=DP,  pp=PP
  expert: tp=ETP, cp=1,  ep=EP, dp=EDP, pp=PP
A group of an axis is the set of ranks that agree on every other coordinate of its generator.
"""

from __future__ import annotations

from megacpp.planner.search.layout import Layout

DENSE_AXES = ("tp", "cp", "dp", "pp")
EXPERT_AXES = ("etp", "ep", "edp", "pp")


def _sizes(lay: Layout) -> tuple[dict[str, int], dict[str, int]]:
    dense = {"tp": lay.tp, "cp": lay.cp, "dp": lay.dp, "pp": lay.pp}
    expert = {"etp": lay.etp, "ep": lay.ep, "edp": lay.edp, "pp": lay.pp}
    return dense, expert


def _coords(rank: int, sizes: dict[str, int]) -> dict[str, int]:
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
            "tp": d["tp"], "cp": d["cp"], "dp": d["dp"], "pp": d["pp"],
            "ep": e["ep"], "etp": e["etp"], "edp": e["edp"],
        })
    return rows


def _groups(world: int, sizes: dict[str, int], along: tuple[str, ...]) -> list[list[int]]:
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
        "tp": _groups(w, dense, ("tp",)),
        "cp": _groups(w, dense, ("cp",)),
        "dp": _groups(w, dense, ("dp",)),
        "dp_cp": _groups(w, dense, ("dp", "cp")),
        "pp": _groups(w, dense, ("pp",)),
        "etp": _groups(w, expert, ("etp",)),
        "ep": _groups(w, expert, ("ep",)),
        "edp": _groups(w, expert, ("edp",)),
    }
