"""Fit the DGX host class (cost.coefficients.DGX_HOST_LAUNCH_US) on the tuning half of the scale
benchmark, and nothing else: the held-out rows are not read.

    python -m benchmarks.scale.fit_host [--share 0.25] [--step 0.05]

The fit is the host class (us per op, on a grid of `step`) that gives the tuning half its least
median |error| of tokens/s/GPU, the number the benchmark is judged by, and where that is flat the
least |median bias|: every tuning row counts,
since a faster or slower host moves every step that the host does not hide. For reading, each
tuning row whose exposed host time (step_breakdown.block_overhead) is at least `share` of its
planned step on the reference hosts (REFERENCE_HOST_LAUNCH_US) is listed with the host class that
plans it exactly (bisection: the step grows with it), or why none does; their spread says how much
the rows' other terms disagree.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from typing import Any

from benchmarks.scale.run import plan_pinned
from benchmarks.scale.truth import convert, load_runs, select_newest
from megacpp.planner.cost.coefficients import REFERENCE_HOST_LAUNCH_US
from megacpp.planner.cost.step import HOST_TERM

BOUNDS = (0.5, 30.0)  # us per op: well outside every host probe reading (5.2-15.2 us)


def error_at(spec: dict[str, Any], measured: float, launch_us: float) -> float:
    at = copy.deepcopy(spec)
    at["cluster"]["host_launch_us"] = launch_us
    return float(plan_pinned(at, measured)["error"])


def implied_host_class(spec: dict[str, Any], measured: float, steps: int = 40) -> float | None:
    """The host_launch_us that plans the row at its measured tokens/s/GPU, or None."""
    lo, hi = BOUNDS
    if not error_at(spec, measured, lo) > 0 > error_at(spec, measured, hi):
        return None
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if error_at(spec, measured, mid) > 0 else (lo, mid)
    return round((lo + hi) / 2, 3)


def tuning_rows() -> list[tuple[dict[str, Any], dict[str, Any], float]]:
    """(published row, spec, measured tokens/s/GPU) of every mapped tuning row."""
    out = []
    for sel in select_newest(load_runs()):
        conv = None if sel.held_out else convert(sel.row)
        if conv is not None and conv.spec is not None:
            out.append((sel.row, conv.spec, sel.row["tokens_per_sec_per_gpu"]))
    return out


def score(rows: list[tuple[dict[str, Any], dict[str, Any], float]], launch_us: float) -> tuple[float, float]:
    """(median |error| to 0.1%, |median bias|): the second decides where the median is flat."""
    errors = [error_at(spec, measured, launch_us) for _, spec, measured in rows]
    return round(statistics.median(abs(e) for e in errors), 3), abs(statistics.median(errors))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale.fit_host", description=__doc__.split("\n\n")[0])
    parser.add_argument("--share", type=float, default=0.25, help="least exposed host share of the step for a row to be listed")
    parser.add_argument("--step", type=float, default=0.05, help="grid step of the fit, us per op")
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
    lo, hi = BOUNDS
    grid = [round(lo + i * args.step, 6) for i in range(int((hi - lo) / args.step) + 1)]
    # the median |error| is flat away from the rows the host moves; the coarse pass finds the basin
    coarse = min(grid[::10], key=lambda us: score(rows, us))
    near = [us for us in grid if abs(us - coarse) <= 10 * args.step]
    scored = {us: score(rows, us) for us in near}
    best = min(scored, key=lambda us: (scored[us], us))
    print(f"DGX_HOST_LAUNCH_US = {best:.2f} (tuning median |error| {scored[best][0]:.1%}, |median bias| "
          f"{scored[best][1]:.1%} over {len(rows)} rows; median |error| {scored[near[0]][0]:.1%} at {near[0]:.2f}, "
          f"{scored[near[-1]][0]:.1%} at {near[-1]:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
