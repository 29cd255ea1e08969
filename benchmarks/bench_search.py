"""Full layout search for NAM56R on 8, 1024 and 16384 H200 GPUs.

Reports layouts considered per second (every layout of the space gets a verdict: legal, or the
first rule that rejects it; sub-trees rejected by one rule are counted, not walked) and legal
layouts fully estimated per second. Runs on one core; writes benchmarks/results/search.json
(`make bench`), or with --quick searches 8 GPUs once and writes nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from megacpp.planner.plan import build_plan
from megacpp.planner.spec.loading import load_spec_text
from megacpp.recipes import recipe_text

GPUS = (8, 1024, 16384)
REPEATS = 5
HELP_TARGET_S = 1.0


def help_seconds() -> float:
    """Median wall time of `megacpp --help` in a fresh interpreter (start-up and imports included)."""
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "megacpp.runtime.cli", "--help"], capture_output=True, check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "search.json")
    ap.add_argument("--quick", action="store_true", help="search 8 GPUs once, write nothing")
    args = ap.parse_args(argv)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core
    gpu_counts, repeats = ((8,), 1) if args.quick else (GPUS, REPEATS)
    rows = []
    for gpus in gpu_counts:
        spec = load_spec_text(recipe_text("nam56r"), overrides=[f"cluster.nodes={gpus // 8}"])
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            plan = build_plan(spec)
            times.append(time.perf_counter() - start)
        best, median = min(times), statistics.median(times)
        rows.append({
            "gpus": gpus,
            "considered": plan.considered,
            "legal": plan.legal_count,
            "fit": plan.fitting_count,
            "seconds_median": round(median, 4),
            "seconds_best": round(best, 4),
            "considered_per_second": round(plan.considered / median),
            "legal_estimated_per_second": round(plan.legal_count / median),
            "best_layout": plan.candidates[0].layout.to_dict() if plan.candidates else None,
        })
        print(f"{gpus:>6} GPUs: {plan.considered:>9,} considered, {plan.legal_count:>6,} legal, "
              f"{plan.fitting_count:>6,} fit  median {median:.3f} s  "
              f"({plan.considered / median:,.0f} considered/s, {plan.legal_count / median:,.0f} legal estimated/s)")
    if args.quick:
        return 0
    help_s = help_seconds()
    print(f"megacpp --help: median {help_s:.3f} s (target under {HELP_TARGET_S:g} s)")
    result = {
        "benchmark": "nam56r full search (build_plan), one core",
        "machine": {"python": sys.version.split()[0], "platform": platform.platform(), "processor": platform.processor() or platform.machine()},
        "repeats": REPEATS,
        "target": "under 1 s for 1024 GPUs",
        "rows": rows,
        "help_seconds_median": round(help_s, 4),
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    search_ok = next(r for r in rows if r["gpus"] == 1024)["seconds_median"] < 1.0
    return 0 if search_ok and help_s < HELP_TARGET_S else 1


if __name__ == "__main__":
    sys.exit(main())
