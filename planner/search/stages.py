"""Pipeline stage assignment: contiguous, atomic block ranges per (virtual) stage.

The embedding sits on the first stage and the output head on the last. Stages are balanced by
forward FLOPs per unit (a Megatron layer), `|` cuts are honoured, and the split is always one the
Megatron dialect can express:

- GPT path (AD/AE pairs), both dialects: any split (`--pipeline-model-parallel-layout` when uneven);
- hybrid on main: any split (`|` segments in `--hybrid-layer-pattern`);
- hybrid on core_v0.16: an even split, or custom first/last stage sizes with equal middle stages
  (`--decoder-first/last-pipeline-num-layers`), and no virtual stages.

A GPT-path spec may pin the split instead: `parallel.pipeline_layout` (a Megatron layout string,
empty stages allowed) or `parallel.account_for_embedding` / `account_for_loss` (pinned_split).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from megacpp.planner.cost.flops import block_flops, head_flops
from megacpp.planner.cost.latent import mtp_flops
from megacpp.planner.search.layout import Context
from megacpp.planner.spec.pipeline_layout import mtp_stage, stage_layers

# Megatron's plain even split is kept unless a custom split shortens the slowest stage by more than
# this: it needs no extra flags and does not pile layers onto the memory-heavy first stages.
EVEN_TOLERANCE = 0.02


@dataclass(frozen=True)
class Split:
    """How the stage split is expressed: kind is even | first_last | layout | pipes | account (the
    embedding and loss counted as layers, spec parallel.account_for_*)."""

    kind: str
    sizes: tuple[int, ...]  # units per global chunk, in chunk order (chunk k -> pp_rank k % pp)
    first: int = 0
    last: int = 0
    # the chunk a pipeline layout puts the MTP layers in (`m`); None: the last, with the output head
    mtp_chunk: int | None = None


@dataclass(frozen=True)
class Stage:
    pp_rank: int
    vp_stage: int
    start: int  # first unit (Megatron layer) index
    stop: int
    blocks: str
    embedding: bool
    output_head: bool
    mtp: bool = False  # the model's MTP layers run here (Split.mtp_chunk)

    def to_dict(self) -> dict[str, object]:
        return {
            "pp_rank": self.pp_rank,
            "vp_stage": self.vp_stage,
            "layers": [self.start, self.stop],
            "blocks": self.blocks,
            "embedding": self.embedding,
            "output_head": self.output_head,
            **({"mtp": True} if self.mtp and not self.output_head else {}),
        }


def unit_weights(ctx: Context) -> list[float]:
    per_letter = {letter: block_flops(ctx, letter) for letter in ctx.letters}
    return [sum(per_letter[letter] for letter in unit) for unit in ctx.units]


def _partition(weights: list[float], k: int, head: float) -> tuple[int, ...]:
    """Split weights into k non-empty contiguous parts minimising the heaviest (head on the last part).

    Among splits with the same heaviest part, later stages are filled first: under 1F1B stage p
    holds pp - p micro-batches of activations, so spare layers cost least at the back.
    """
    n = len(weights)
    backwards = weights[::-1]

    def parts_for(limit: float) -> list[int] | None:
        sizes, acc, count = [], 0.0, 0
        for i, w in enumerate(backwards):
            extra = head if i == 0 else 0.0
            if count and acc + w + extra > limit:
                sizes.append(count)
                acc, count = 0.0, 0
            acc += w + extra
            count += 1
            if acc > limit:
                return None
        sizes.append(count)
        return sizes if len(sizes) <= k else None

    lo, hi = max(weights), sum(weights) + head
    for _ in range(60):
        mid = (lo + hi) / 2
        if parts_for(mid) is None:
            lo = mid
        else:
            hi = mid
    return tuple(_halve_largest(parts_for(hi) or [n], k)[::-1])


def _halve_largest(sizes: list[int], k: int) -> list[int]:
    """`sizes` with the largest part (the back-most of equals) halved, its halves in its place,
    until there are k parts. A heap of (-size, place): a place is the path of halvings from an
    original part, negated so that the back-most of equal sizes comes first."""
    heap: list[tuple[int, tuple[int, ...]]] = [(-size, (-j,)) for j, size in enumerate(sizes)]
    heapq.heapify(heap)
    for _ in range(k - len(sizes)):
        negative, place = heapq.heappop(heap)
        half = -negative // 2
        heapq.heappush(heap, (-half, (*place, 0)))
        heapq.heappush(heap, (-(-negative - half), (*place, -1)))
    return [-negative for negative, place in sorted(heap, key=lambda part: tuple(-x for x in part[1]))]


def _prefix(weights: list[float]) -> list[float]:
    out = [0.0]
    for w in weights:
        out.append(out[-1] + w)
    return out


def _cost(weights: list[float], sizes: tuple[int, ...], head: float, pp: int) -> float:
    return _cost_prefix(_prefix(weights), sizes, head, pp)


def _cost_prefix(prefix: list[float], sizes: tuple[int, ...], head: float, pp: int) -> float:
    """The heaviest pipeline rank of a split, from prefix sums (head on the last chunk's rank): a
    rank runs every one of its chunks per micro-batch, so under the interleaved schedule its
    chunks' sum, not the heaviest chunk, sets the pace."""
    loads, start = [0.0] * pp, 0
    for k, size in enumerate(sizes):
        loads[k % pp] += prefix[start + size] - prefix[start]
        start += size
    loads[(len(sizes) - 1) % pp] += head
    return max(loads)


def _rank_partition(weights: list[float], pp: int, vpp: int, head: float) -> tuple[int, ...] | None:
    """A split into pp x vpp non-empty chunks that balances the ranks' sums (_cost_prefix): the
    least per-rank budget (by bisection) under which each chunk, in order, takes units up to an
    even share of its rank's budget left over its chunks left."""
    n, chunks = len(weights), pp * vpp

    def fill(budget: float) -> tuple[int, ...] | None:
        loads, sizes, i = [0.0] * pp, [], 0
        for k in range(chunks):
            r, left = k % pp, vpp - k // pp
            extra = head if k == chunks - 1 else 0.0
            allowance = (budget - loads[r] - (head if r == (chunks - 1) % pp else 0.0)) / left
            must_leave = chunks - k - 1  # a unit for each chunk after this one
            take, acc = 0, 0.0
            while i + take < n - must_leave and (take == 0 or acc + weights[i + take] <= allowance):
                acc += weights[i + take]
                take += 1
            if k == chunks - 1:
                take, acc = n - i, sum(weights[i:])
            if take == 0 or loads[r] + acc + extra > budget * (1 + 1e-12):
                return None
            loads[r] += acc
            sizes.append(take)
            i += take
        return tuple(sizes)

    if n < chunks:
        return None
    lo, hi = (sum(weights) + head) / pp, sum(weights) + head
    if fill(hi) is None:
        return None
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if fill(mid) is not None else (mid, hi)
    return fill(hi)


def _first_last_split(weights: list[float], pp: int, head: float) -> Split:
    """Best even or first/last split (core_v0.16 hybrid stacks).

    For each middle-stage size, the first-stage size is found by bisection on prefix sums so the
    first and last stages balance; its two neighbours are tried too. O(n/(pp-2) * (log n + pp)).
    """
    n, prefix = len(weights), _prefix(weights)
    best: tuple[float, int, Split] | None = None
    even: Split | None = None
    if n % pp == 0:
        even = Split("even", (n // pp,) * pp)
    middles = [0] if pp == 2 else range(1, (n - 2) // (pp - 2) + 1)
    for middle in middles:
        rest = n - middle * (pp - 2)  # layers left for the first and last stages
        if rest < 2:
            continue
        # smallest first size whose weight reaches the last stage's (weight + head)
        lo, hi = 1, rest - 1
        while lo < hi:
            mid = (lo + hi) // 2
            last_weight = prefix[n] - prefix[n - (rest - mid)] + head
            if prefix[mid] >= last_weight:
                hi = mid
            else:
                lo = mid + 1
        for first in {lo - 1, lo, lo + 1}:
            if not 1 <= first <= rest - 1:
                continue
            sizes = (first, *(middle,) * (pp - 2), rest - first)
            cost = _cost_prefix(prefix, sizes, head, pp)
            if best is None or cost < best[0] - 1e-9:
                best = (cost, 1, Split("first_last", sizes, first, rest - first))
    if even is not None and (best is None or _cost_prefix(prefix, even.sizes, head, pp) <= best[0] * (1 + EVEN_TOLERANCE)):
        return even
    assert best is not None
    return best[2]


def _even(sizes: tuple[int, ...]) -> bool:
    """Whether a split is Megatron's default one: every chunk the same number of layers."""
    return len(sizes) > 1 and len(set(sizes)) == 1 and sizes[0] > 0


def pinned_split(ctx: Context, pp: int, vpp: int) -> Split | None:
    """The split parallel.pipeline_layout or the account flags fix, if the spec sets either.

    The account flags count the embedding and the loss as one layer each and split evenly: every
    chunk gets (L + emb + loss) / (pp x vpp) layers, the first and last chunks one fewer each
    (transformer_block.py:76-203 get_num_layers_to_build; transformer_config.py:1435-1478 in megatron-core
    0.16.1), which
    may leave them empty (Llama-3.1-405B, 126 layers on pp 16 x vp 8, as NVIDIA runs it)."""
    pins = ctx.spec.parallel
    if pins.pipeline_layout is not None:
        sizes, mtp = stage_layers(pins.pipeline_layout), mtp_stage(pins.pipeline_layout)
        if _even(sizes) and mtp in (None, len(sizes) - 1):
            return Split("even", sizes)  # Megatron's own split: no layout flag needed
        return Split("layout", sizes, mtp_chunk=mtp)
    if not (pins.account_for_embedding or pins.account_for_loss):
        return None
    chunks = pp * vpp
    per, _ = divmod(ctx.num_layers + pins.account_for_embedding + pins.account_for_loss, chunks)
    sizes = [per] * chunks
    sizes[0] -= pins.account_for_embedding
    sizes[-1] -= pins.account_for_loss
    return Split("account", tuple(sizes))


def choose_split(ctx: Context, pp: int, vpp: int) -> Split:
    """The stage split for pp x vpp chunks (rules have already checked it is expressible)."""
    pinned = pinned_split(ctx, pp, vpp)
    if pinned is not None:
        return pinned
    n, chunks = ctx.num_layers, pp * vpp
    if ctx.unit_cuts:
        bounds = [0, *ctx.unit_cuts, n]
        sizes = tuple(b - a for a, b in zip(bounds, bounds[1:], strict=False))
        if _even(sizes):  # Megatron's own split: neither a layout flag nor `|` segments needed
            return Split("even", sizes)
        kind = "pipes" if not ctx.plain_transformer and ctx.dialect == "main" else "layout"
        if not ctx.plain_transformer and ctx.dialect == "core_v0.16":
            kind = "even" if len(set(sizes)) == 1 else "first_last"
            return Split(kind, sizes, sizes[0], sizes[-1])
        return Split(kind, sizes)
    if chunks == 1:
        return Split("even", (n,))
    weights = unit_weights(ctx)
    head = head_flops(ctx) + mtp_flops(ctx)  # the MTP layers sit with the output head on the last stage
    if not ctx.plain_transformer and ctx.dialect == "core_v0.16":
        return _first_last_split(weights, pp, head)
    sizes = _partition(weights, chunks, head)
    if vpp > 1 and (by_rank := _rank_partition(weights, pp, vpp, head)) is not None:
        sizes = min(sizes, by_rank, key=lambda s: _cost(weights, s, head, pp))
    even = (n // chunks,) * chunks if n % chunks == 0 else None
    if even and _cost(weights, even, head, pp) <= _cost(weights, sizes, head, pp) * (1 + EVEN_TOLERANCE):
        return Split("even", even)
    return Split("pipes" if not ctx.plain_transformer else "layout", sizes)


def assign_stages(ctx: Context, pp: int, vpp: int) -> tuple[Split, list[Stage]]:
    """Stages in (pp_rank, vp_stage) order with their block strings (memoised per context)."""
    key = (pp, vpp)
    if key not in ctx.stage_cache:
        ctx.stage_cache[key] = _assign(ctx, pp, vpp)
    return ctx.stage_cache[key]


def _assign(ctx: Context, pp: int, vpp: int) -> tuple[Split, list[Stage]]:
    split = choose_split(ctx, pp, vpp)
    step = 2 if ctx.plain_transformer else 1
    blocks = ctx.pattern.blocks
    last = len(split.sizes) - 1
    mtp = (last if split.mtp_chunk is None else split.mtp_chunk) if ctx.spec.model.mtp_num_layers else -1
    stages, start = [], 0
    for k, size in enumerate(split.sizes):
        stop = start + size
        stages.append(
            Stage(
                pp_rank=k % pp,
                vp_stage=k // pp,
                start=start,
                stop=stop,
                blocks=blocks[start * step : stop * step],
                embedding=k == 0,
                output_head=k == last,
                mtp=k == mtp,
            )
        )
        start = stop
    stages.sort(key=lambda s: (s.pp_rank, s.vp_stage))
    return split, stages
