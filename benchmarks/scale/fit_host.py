"""Fit the scale benchmark's two coefficients on its tuning half, and nothing else (the held-out
rows are not read): the DGX host class (cost.coefficients.DGX_HOST_LAUNCH_US) and the Blackwell
presets' matmul rate scale (cost.coefficients.BLACKWELL_MATMUL_RATE_SCALE).

    python -m benchmarks.scale.fit_host [--share 0.25]

The fit is the pair that scores best on the tuning half by what the benchmark is judged by, in
the acceptance's order: the most rows within 15% of the measured tokens/s/GPU, then the least
median |error|, then the least |median bias|. Every tuning row counts, since a faster or slower
host moves every step the host does not hide, and the scale every B200 row. The median alone has
basins that buy a lower median with rows pushed past 15%, so the count leads. The pair is searched
on a grid of both: 2 to 6 us by 0.5 and 0.85 to 1.15 by 0.05, then 0.05 us and 0.01 around the
best. For reading, each tuning row whose exposed host time (step_breakdown.block_overhead) is at
least `share` of its planned step on the reference hosts (REFERENCE_HOST_LAUNCH_US) is listed with
the host class that plans it exactly (bisection: the step grows with it), or why none does; their
spread says how much the rows' other terms disagree.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from collections.abc import Callable
from typing import Any

from benchmarks.scale.run import plan_pinned
from benchmarks.scale.truth import convert, load_runs, select_newest
from megacpp.planner.cost.coefficients import (
    BLACKWELL_MATMUL_RATE_SCALE,
    REFERENCE_HOST_LAUNCH_US,
)
from megacpp.planner.cost.step import HOST_TERM
from megacpp.planner.spec.clusters import BLACKWELL_PRESETS

BOUNDS = (0.5, 30.0)  # us per op: well outside every host probe reading (5.2-15.2 us)
WITHIN = 0.15  # the acceptance's band of |error|

Row = tuple[dict[str, Any], dict[str, Any], float]


def error_at(spec: dict[str, Any], measured: float, launch_us: float, scale: float = BLACKWELL_MATMUL_RATE_SCALE) -> float:
    """The row's error with the host class `launch_us` and, on a Blackwell preset, the matmul rate `scale`."""
    at = copy.deepcopy(spec)
    at["cluster"]["host_launch_us"] = launch_us
    blackwell = spec["cluster"].get("preset") in BLACKWELL_PRESETS
    return float(plan_pinned(at, measured, {"matmul_rate_scale": scale} if blackwell else None)["error"])


def implied_host_class(spec: dict[str, Any], measured: float, steps: int = 40) -> float | None:
    """The host_launch_us that plans the row at its measured tokens/s/GPU, or None."""
    lo, hi = BOUNDS
    if not error_at(spec, measured, lo) > 0 > error_at(spec, measured, hi):
        return None
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if error_at(spec, measured, mid) > 0 else (lo, mid)
    return round((lo + hi) / 2, 3)


def tuning_rows() -> list[Row]:
    """(published row, spec, measured tokens/s/GPU) of every mapped tuning row."""
    out = []
    for sel in select_newest(load_runs()):
        conv = None if sel.held_out else convert(sel.row)
        if conv is not None and conv.spec is not None:
            out.append((sel.row, conv.spec, sel.row["tokens_per_sec_per_gpu"]))
    return out


class Scores:
    """(minus the rows within 15%, median |error| to 0.1%, |median bias|) of the tuning rows at a
    (host class, scale) pair, least best. Each row's error is kept per pair it depends on (an H100
    row's does not follow the scale)."""

    def __init__(self, rows: list[Row]) -> None:
        self.rows, self.errors = rows, {}  # type: ignore[var-annotated]

    def __call__(self, launch_us: float, scale: float) -> tuple[int, float, float]:
        errors = []
        for i, (_, spec, measured) in enumerate(self.rows):
            key = (i, launch_us, scale if spec["cluster"].get("preset") in BLACKWELL_PRESETS else None)
            if key not in self.errors:
                self.errors[key] = error_at(spec, measured, launch_us, scale)
            errors.append(self.errors[key])
        within = sum(abs(e) <= WITHIN for e in errors)
        return -within, round(statistics.median(abs(e) for e in errors), 3), abs(statistics.median(errors))


def best_on_grid(score: Callable[[float, float], tuple[int, float, float]], host: tuple[float, float, float],
                 scale: tuple[float, float, float]) -> tuple[float, float]:
    """The least-scoring (host class, scale) of a grid, each axis given as (low, high, step)."""
    def axis(lo: float, hi: float, step: float) -> list[float]:
        return [round(lo + i * step, 6) for i in range(int(round((hi - lo) / step)) + 1)]

    points = [(us, x) for us in axis(*host) for x in axis(*scale)]
    return min(points, key=lambda p: (score(*p), p))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale.fit_host", description=__doc__.split("\n\n")[0])
    parser.add_argument("--share", type=float, default=0.25, help="least exposed host share of the step for a row to be listed")
    args = parser.parse_args(argv)
    rows = tuning_rows()
    for row, spec, measured in rows:
        on_reference = copy.deepcopy(spec)
        on_reference["cluster"]["host_launch_us"] = REFERENCE_HOST_LAUNCH_US
        pinned = plan_pinned(on_reference, measured)
        if pinned["outcome"] != "planned":
            continue
        share = pinned["step_breakdown"][HOST_TERM] / pinned["step_seconds"]
        if share < args.share:
            continue
        value = implied_host_class(spec, measured)
        label = f"row {row['row_id']:>3} {row['model_key']:<18} {row['system']} x{row['num_gpus']:<5}"
        print(f"{label} exposed host {share:.0%} of the step on the reference hosts: "
              + (f"planned exactly at {value} us" if value else "no host class plans it (other terms decide its error)"))
    score = Scores(rows)
    # the scores have more than one basin: a coarse grid of both finds the best, a fine one settles it
    host, scale = best_on_grid(score, (2.0, 6.0, 0.5), (0.85, 1.15, 0.05))
    host, scale = best_on_grid(score, (max(host - 0.25, BOUNDS[0]), host + 0.25, 0.05), (scale - 0.03, scale + 0.03, 0.01))
    within, median, bias = score(host, scale)
    print(f"DGX_HOST_LAUNCH_US = {host:.2f}, BLACKWELL_MATMUL_RATE_SCALE = {scale:.2f} ({-within} of {len(rows)} tuning rows "
          f"within {WITHIN:.0%}, median |error| {median:.1%}, |median bias| {bias:.1%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
