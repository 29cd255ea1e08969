"""Fit the DGX host class (cost.coefficients.DGX_HOST_LAUNCH_US) on the tuning half of the scale
benchmark, and nothing else: the held-out rows are not read.

    python -m benchmarks.scale.fit_host [--share 0.25]

Each tuning row whose exposed host time (step_breakdown.block_overhead) is at least `share` of its
planned step on the reference hosts (REFERENCE_HOST_LAUNCH_US, where the per-block host time was
measured: the rows where the host matters, chosen without the value being fitted) is planned
again with cluster.host_launch_us set, and the host class that plans it exactly is found by
bisection (the step grows with it). The median of those
is the fit: a median, so that a row whose other terms are mispriced (its error not the host's)
moves it little. Rows no host class can match are listed and left out.
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale.fit_host", description=__doc__.split("\n\n")[0])
    parser.add_argument("--share", type=float, default=0.25, help="least exposed host share of the step for a row to count")
    args = parser.parse_args(argv)
    implied = []
    for sel in select_newest(load_runs()):
        if sel.held_out:
            continue
        conv = convert(sel.row)
        if conv.spec is None:
            continue
        measured = sel.row["tokens_per_sec_per_gpu"]
        on_reference = copy.deepcopy(conv.spec)
        on_reference["cluster"]["host_launch_us"] = REFERENCE_HOST_LAUNCH_US
        pinned = plan_pinned(on_reference, measured)
        if pinned["outcome"] != "planned":
            continue
        share = pinned["step_breakdown"][HOST_TERM] / pinned["step_seconds"]
        if share < args.share:
            continue
        value = implied_host_class(conv.spec, measured)
        label = f"row {sel.row['row_id']:>3} {sel.row['model_key']:<18} {sel.row['system']} x{sel.row['num_gpus']:<5}"
        print(f"{label} exposed host {share:.0%} of the step on the reference hosts: "
              + (f"planned exactly at {value} us" if value else "no host class plans it (other terms decide its error)"))
        if value:
            implied.append(value)
    if not implied:
        print("no tuning row is decided by the host")
        return 1
    print(f"DGX_HOST_LAUNCH_US = {statistics.median(implied):.2f} (median of {len(implied)} tuning rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
