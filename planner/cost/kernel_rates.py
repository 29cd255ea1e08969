"""Measured GPU time of a training step's matmuls, for presets with a kernel-rate table.

`benchmarks/gpu/kernel_rates.py` times on the GPU itself (CUDA graphs, so the host's launch time,
which the step model prices separately, is left out):

- the forward plus backward of one Linear layer (three GEMMs) over a grid of M x K x N;
- megatron-core's unfused core-attention matmuls (baddbmm and bmm, forward plus backward) over
  batch x heads and sequence length;
- megatron-core's scale-mask-softmax on its torch path (fp32 cast, causal masked_fill, softmax,
  bf16 cast), forward alone and forward plus backward, over batch x heads and sequence length;
- the R block's chunked scan (runtime/worker/recurrent.py, fp32, forward plus backward) over
  heads and sequence length;
- Transformer Engine's fused causal attention (DotProductAttention, cuDNN, forward plus backward)
  over batch x heads and sequence length, where the table has it;
- Transformer Engine's GroupedLinear (the routed experts' fc1 or fc2 under TE, forward plus
  backward) over local experts x tokens per expert x K x N, where the table has it;
- TE's fused attention with sliding windows and learnable softmax offsets, and with multi-latent
  attention's widths, each over the plain kernel timed beside it (the H100's table; every preset
  prices its attention by these ratios: attention_over_flops, mla_over_d128);
- the same Linear and GroupedLinear grids in fp8 through TE's Linear and GroupedLinear under
  `te.autocast`, one set of rows per recipe (Megatron's names: tensorwise, delayed, blockwise),
  the amax, cast and transpose kernels TE runs around the fp8 GEMMs included, where the table has
  them. fp8 is priced with the rows of the spec's training.fp8_recipe; an fp8 GroupedLinear
  without its own rows is priced as that many fp8 Linears of the recipe.

Its output on one GPU of a kind is committed as `rates/<gpu>.json` and read here for the presets
in TABLES. A GEMM between grid points takes the log-linear interpolation of its neighbours' times;
beyond the largest grid value time grows in proportion (M, K, N, batch) or with the square
(sequence), below the smallest it is the smallest's (a kernel does not get faster than its
launch). Presets without a table, and fp8 on a table without rows of its recipe (mxfp8 on
Hopper), price matmuls at FLOPs / (MAMF x Efficiency.matmul).
"""

from __future__ import annotations

import json
import math
from bisect import bisect_right
from dataclasses import dataclass, field
from functools import cache
from itertools import product
from pathlib import Path

RATES_DIR = Path(__file__).parent / "rates"
# measured on one GPU of each kind, 2026-11-22, with benchmarks/gpu/kernel_rates.py
TABLES = {"h200-sxm-8": "h200.json", "h100-sxm-8": "h100.json"}


@dataclass(frozen=True)
class Grid:
    """log(seconds) on a grid of axes; `growth` is each axis's exponent beyond its last value."""

    axes: tuple[tuple[float, ...], ...]
    log_seconds: dict[tuple[float, ...], float]
    growth: tuple[int, ...]
    # points already interpolated: a search prices the same GEMM shapes for many layouts
    memo: dict[tuple[float, ...], float] = field(default_factory=dict, compare=False, repr=False)

    def seconds(self, point: tuple[float, ...]) -> float:
        if (known := self.memo.get(point)) is None:
            known = self.memo[point] = self._interpolate(point)
        return known

    def _interpolate(self, point: tuple[float, ...]) -> float:
        scale = 1.0
        corners = []
        for value, axis, power in zip(point, self.axes, self.growth, strict=True):
            if value > axis[-1]:
                scale *= (value / axis[-1]) ** power
                value = axis[-1]
            value = max(value, axis[0])
            i = min(bisect_right(axis, value), len(axis) - 1)
            lo, hi = axis[i - 1], axis[i]
            w = math.log(value / lo) / math.log(hi / lo)
            corners.append(((lo, 1 - w), (hi, w)))
        log_t = sum(math.prod(w for _, w in combo) * self.log_seconds[tuple(v for v, _ in combo)]
                    for combo in product(*corners))
        return scale * math.exp(log_t)


@dataclass(frozen=True)
class KernelRates:
    linear: Grid  # (M, K, N) -> forward + backward seconds of one Linear
    attention: dict[int, Grid]  # head dim -> (batch x heads, tokens) -> forward + backward seconds
    recurrence: dict[int, Grid]  # the same for the R block's scan
    ssd: dict[int, Grid]  # state size -> (heads, tokens) -> the M block's conv + SSD scan, head dim 64 (may be empty)
    softmax: Grid  # (batch x heads, tokens) -> forward + backward seconds of the unfused softmax
    softmax_forward: Grid  # the same, forward alone
    fused_attention: dict[int, Grid]  # head dim -> (batch x heads, tokens) -> TE's fused attention (may be empty)
    grouped_linear: Grid | None  # (G, M, K, N) -> TE's GroupedLinear of G GEMMs of M tokens (None where not measured)
    # fp8 recipe (training.fp8_recipe) -> the Linear grid and the GroupedLinear grid in fp8 (empty where not measured)
    fp8_linear: dict[str, Grid] = field(default_factory=dict)
    fp8_grouped_linear: dict[str, Grid] = field(default_factory=dict)

    def has_fp8(self, recipe: str) -> bool:
        """Whether the table prices fp8 Linears under `recipe` (else fp8 falls back to FLOPs at the fp8 MAMF)."""
        return recipe in self.fp8_linear

    def linear_seconds(self, m: float, k: int, n: int, fp8: str | None = None) -> float:
        """Forward and backward of one Linear of M x K x N, in bf16, or in fp8 under recipe `fp8`."""
        if not (m and k and n):
            return 0.0
        return self._linear_grid(fp8).seconds((m, k, n))

    def _linear_grid(self, fp8: str | None) -> Grid:
        if fp8 is None:
            return self.linear
        if fp8 not in self.fp8_linear:
            raise ValueError(f"this kernel-rate table has no fp8 rows of recipe {fp8} (it has {sorted(self.fp8_linear) or 'none'}); "
                             "check has_fp8 first")
        return self.fp8_linear[fp8]

    def attention_seconds(self, batch_heads: int, tokens: int, head_dim: int) -> float:
        """The unfused attention matmuls' forward and backward, from the nearest measured head dim
        and in proportion to the head dim beyond it (their work is linear in it)."""
        return _per_head_dim_seconds(self.attention, head_dim, (batch_heads, tokens))

    def softmax_seconds(self, batch_heads: int, tokens: int, forwards: int = 1) -> float:
        """The unfused softmax's forward and backward, plus the forwards that recompute repeats."""
        point = (batch_heads, tokens)
        return self.softmax.seconds(point) + (forwards - 1) * self.softmax_forward.seconds(point)

    def grouped_linear_seconds(self, g: int, m: float, k: int, n: int, fp8: str | None = None) -> float:
        """Forward and backward of TE's GroupedLinear over `g` experts of `m` tokens each, in bf16
        or in fp8 under recipe `fp8`: from the grouped table of that precision where the table has
        it, else `g` Linears of that shape one after another."""
        if not (g and m and k and n):
            return 0.0
        grouped = self.grouped_linear if fp8 is None else self.fp8_grouped_linear.get(fp8)
        if grouped is None:
            return g * self.linear_seconds(m, k, n, fp8)
        return grouped.seconds((g, m, k, n))

    def fused_attention_seconds(self, batch_heads: int, tokens: int, head_dim: int, cp: int = 1) -> float | None:
        """TE's fused causal attention forward and backward on one rank, or None where the table
        has no such rows. Under context parallelism a rank computes 1/cp of the sequence's causal
        attention (TE's load-balanced ring): priced as that share of the whole sequence's kernel
        time (checked against the profiled attention kernels of gpu_runs_h200x2_te.json)."""
        if not self.fused_attention:
            return None
        return _per_head_dim_seconds(self.fused_attention, head_dim, (batch_heads, tokens)) / cp

    def recurrence_seconds(self, batch_heads: int, tokens: int, head_dim: int) -> float:
        return _nearest(self.recurrence, head_dim).seconds((batch_heads, tokens))

    def ssd_seconds(self, heads: int, tokens: int, head_dim: int, state: int) -> float | None:
        """Forward and backward of mamba_split_conv1d_scan_combined on one rank, or None where the
        table has no SSD rows. Measured at head dim 64; other head dims scale the width linearly."""
        if not self.ssd:
            return None
        return _nearest(self.ssd, state).seconds((heads * head_dim / 64, tokens))


def _per_head_dim_seconds(grids: dict[int, Grid], head_dim: int, point: tuple[float, ...]) -> float:
    """Attention seconds at `point` from the grid of the nearest measured head dim, scaled by the
    head dim over it: QK^T and PV do work linear in it (MLA's mean of 192-wide keys and 128-wide
    values is 160, beyond the measured 128)."""
    measured = _nearest_size(grids, head_dim)
    return grids[measured].seconds(point) * head_dim / measured


def _nearest_size(grids: dict[int, Grid], size: int) -> int:
    """The size (head dim, SSD state) measured closest to `size` on a log scale."""
    return min(grids, key=lambda d: abs(math.log(d / size)))


def _nearest(grids: dict[int, Grid], size: int) -> Grid:
    """The grid measured at the size closest to `size` (_nearest_size)."""
    return grids[_nearest_size(grids, size)]


def _grid(rows: list[dict], keys: tuple[str, ...], growth: tuple[int, ...]) -> Grid:
    """The rows as a grid; a point the benchmark skipped (too large for the GPU's memory) takes the
    nearest smaller measured point along one axis, grown by that axis's exponent."""
    axes = tuple(tuple(sorted({float(r[k]) for r in rows})) for k in keys)
    log_seconds = {tuple(float(r[k]) for k in keys): math.log(r["seconds"]) for r in rows}
    # per axis, the values along it of the points known so far, by their other coordinates
    lines: list[dict[tuple[float, ...], list[float]]] = [{} for _ in keys]

    def know(point: tuple[float, ...]) -> None:
        for i, line in enumerate(lines):
            line.setdefault(point[:i] + point[i + 1:], []).append(point[i])

    for point in log_seconds:
        know(point)
    for point in product(*axes):
        if point in log_seconds:
            continue
        for i, power in enumerate(growth):
            below = [v for v in lines[i].get(point[:i] + point[i + 1:], ()) if v < point[i]]
            if below:
                near = (*point[:i], max(below), *point[i + 1:])
                log_seconds[point] = log_seconds[near] + power * math.log(point[i] / near[i])
                know(point)
                break
    return Grid(axes, log_seconds, growth)


# TE's fused attention with sliding windows and learnable softmax offsets (sinks), and with
# multi-latent attention's widths, measured against the plain causal kernel on an H100 (cuDNN's
# kernels on Hopper); every preset reads these ratios, there being no other GPU's
ATTENTION_VARIANTS_TABLE = "h100.json"


def window_share(window: int | None, tokens: int) -> float:
    """The FLOPs of causal attention through a sliding window of `window` keys over those of full
    causal attention on `tokens` tokens: a query at position i reads min(i, w) + 1 keys,
    (w + 1) - w(w + 1)/2s on average against s/2 (None: no window)."""
    if window is None or window >= tokens:
        return 1.0
    return min(1.0, ((window + 1) - window * (window + 1) / (2 * tokens)) / (tokens / 2))


@cache
def _rates_file(name: str) -> dict:
    """One committed rates file, read once: the variant tables and a preset's grids share it."""
    return json.loads((RATES_DIR / name).read_text())


def _variant_rows(table: str) -> tuple[dict, ...]:
    """The rows of one of ATTENTION_VARIANTS_TABLE's variant tables (empty where not measured)."""
    return tuple(_rates_file(ATTENTION_VARIANTS_TABLE).get(table, ()))


@cache
def attention_over_flops(batch_heads: int, tokens: int, head_dim: int, window: int | None, sinks: bool) -> float | None:
    """How much longer than its FLOP share of the full causal kernel (window_share) TE's fused
    attention runs with a sliding window and learnable softmax offsets, at the nearest measured
    shape and window (log distance), or None where none was measured. A 128-key window moves a
    query tile's keys in two partly masked tiles and spends per tile what a long context spreads:
    it ran at 4-5 times its FLOP share; a learnable offset added 10-35%."""
    rows = [r for r in _variant_rows("fused_attention_variants") if r["sinks"] == sinks]
    if not rows:
        return None

    def distance(r: dict) -> tuple[float, ...]:
        same = r["window"] == window
        far = 0.0 if same else abs(math.log(r["window"] / window)) if r["window"] and window else math.inf
        return far, abs(math.log(r["d"] / head_dim)), abs(math.log(r["b"] / batch_heads)), abs(math.log(r["s"] / tokens))

    nearest = min(rows, key=distance)
    return nearest["over_causal"] / window_share(nearest["window"], nearest["s"])


@cache
def mla_over_d128(batch_heads: int, tokens: int, qk_width: int, v_width: int) -> float | None:
    """TE's fused attention with multi-latent attention's widths (queries and keys `qk_width` wide
    with their rotary part, values `v_width`, a key and value per head) over the tables' d=128 GQA
    kernel at the same heads and tokens, at the nearest measured point (log distance), or None
    where these widths were not measured. 192/128 ran at 1.30-1.38 of it on an H100, where the
    mean width's proportion would say 1.25."""
    rows = [r for r in _variant_rows("fused_attention_mla") if (r["d_qk"], r["d_v"]) == (qk_width, v_width)]
    if not rows:
        return None
    nearest = min(rows, key=lambda r: (abs(math.log(r["b"] / batch_heads)), abs(math.log(r["s"] / tokens))))
    return float(nearest["over_d128"])


@cache
def kernel_rates(cluster_name: str | None) -> KernelRates | None:
    """The measured table for a preset (Cluster.kernel_table), or None where none was measured."""
    if cluster_name not in TABLES:
        return None
    doc = _rates_file(TABLES[cluster_name])
    return KernelRates(
        linear=_grid(doc["linear"], ("m", "k", "n"), (1, 1, 1)),
        attention=_per_head_dim(doc["attention"], "b", 2),
        recurrence=_per_head_dim(doc["recurrence"], "h", 1),
        ssd={n: _grid([r for r in doc.get("ssd", []) if r["n"] == n], ("h", "s"), (1, 1))
             for n in sorted({r["n"] for r in doc.get("ssd", [])})},
        softmax=_grid(doc["softmax"], ("b", "s"), (1, 2)),
        softmax_forward=_grid([{**r, "seconds": r["forward_seconds"]} for r in doc["softmax"]], ("b", "s"), (1, 2)),
        fused_attention=_per_head_dim(doc.get("fused_attention", []), "b", 2),
        grouped_linear=_grid(doc["grouped_linear"], ("g", "m", "k", "n"), (1, 1, 1, 1)) if doc.get("grouped_linear") else None,
        fp8_linear=_recipe_grids(doc.get("fp8_linear", []), ("m", "k", "n")),
        fp8_grouped_linear=_recipe_grids(doc.get("fp8_grouped_linear", []), ("g", "m", "k", "n")),
    )


def _recipe_grids(rows: list[dict], keys: tuple[str, ...]) -> dict[str, Grid]:
    """An fp8 table's rows as one grid per recipe, growing linearly on every axis."""
    return {recipe: _grid([r for r in rows if r["recipe"] == recipe], keys, (1,) * len(keys))
            for recipe in sorted({r["recipe"] for r in rows})}


def _per_head_dim(rows: list[dict], batch: str, sequence_growth: int) -> dict[int, Grid]:
    return {d: _grid([r for r in rows if r["d"] == d], (batch, "s"), (1, sequence_growth)) for d in sorted({r["d"] for r in rows})}
