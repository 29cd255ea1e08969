"""Per-block costs that follow a layout's shard shape alone, worked out once per search.

cost.blocks, cost.flops and cost.activations price one block on one rank from the layout's tp, cp, sp, ep, etp and micro-batch
size (and the routed load), never from pp, vpp or dp. A search prices tens of thousands of
layouts that share far fewer shapes (DeepSeek-V3-style on 1,024 GPUs: 20,214 legal layouts,
2,100 shapes), so what depends on the shape is computed once and memoised on the Context.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import TypeVar

from megacpp.planner.search.layout import Context, Layout
from megacpp.planner.search.stages import Stage

T = TypeVar("T")


def shape(lay: Layout) -> tuple[int, int, bool, int, int, int]:
    """The layout fields the per-block formulas (cost.blocks, cost.flops, cost.activations) read."""
    return lay.tp, lay.cp, lay.sp, lay.ep, lay.etp, lay.micro_batch_size


def memo(ctx: Context, key: Hashable, make: Callable[[], T], rate_free: bool = False) -> T:
    """`make()`, computed once per `key` on this context; with `rate_free` (it reads no rate of
    the cluster), once for every context Context.with_rates makes of it too."""
    cache = ctx.rate_free_cache if rate_free else ctx.cost_cache
    value = cache.get(key, cache)  # the cache itself stands for "absent": no value is it
    if value is cache:
        value = cache[key] = make()
    return value  # type: ignore[no-any-return]


def memo_stages(ctx: Context, name: str, stages: list[Stage], pp: int, make: Callable[[], T]) -> T:
    """`make()`, computed once per stage list and pipeline depth: what a stage split puts on its
    ranks follows from the spec alone, so it is kept with Context.rate_free_cache. Keyed by the
    list's identity; the entry keeps the list alive, so the id stays its own."""
    key = (name, id(stages), pp)
    entry = ctx.rate_free_cache.get(key)
    if entry is None or entry[0] is not stages:
        entry = ctx.rate_free_cache[key] = (stages, make())
    return entry[1]  # type: ignore[no-any-return]
