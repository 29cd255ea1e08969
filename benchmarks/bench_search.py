"""Search speed: `megacpp plan --json` against issue 28's targets, and the full NAM56R search.

Targets, wall time of `megacpp plan --json` in a fresh interpreter (start-up included), median
of REPEATS runs on one core of a machine that may be running other work:
- NAM56R on 1,024 H200 with `training.micro_batch_size: auto`: under 1 s;
- DeepSeek-V3-style on 1,024 H100: under 2 s;
- every bundled recipe on 16,384 GPUs (its own preset): under 3 s.
Also, in process, the full NAM56R search on 8, 1,024 and 16,384 H200 (layouts considered per
second: every layout of the space gets a verdict, sub-trees rejected by one rule are counted, not
walked; and legal layouts fully estimated per second), and `megacpp --help`.

Writes benchmarks/results/search.json (`make bench`) and exits 1 when a target is missed; with
--quick plans NAM56R on 8 GPUs once and writes nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from megacpp.planner.plan import build_plan
from megacpp.planner.spec.loading import load_spec_text
from megacpp.recipes import recipe_names, recipe_text

GPUS = (8, 1024, 16384)
REPEATS = 3
HELP_TARGET_S = 1.0
GPUS_PER_NODE = {"gb10-hybrid-small": 1}  # the recipes' presets: gb10-spark is one GPU a box, the rest 8


def _nodes(recipe: str, gpus: int) -> str:
    return f"cluster.nodes={gpus // GPUS_PER_NODE.get(recipe, 8)}"


def plan_cases() -> list[dict[str, Any]]:
    """The `megacpp plan --json` runs with a target: (name, recipe, --set overrides, target seconds)."""
    cases = [
        {"name": "nam56r 1,024 H200 mbs auto", "recipe": "nam56r",
         "set": [_nodes("nam56r", 1024), "training.micro_batch_size=auto"], "target_s": 1.0},
        {"name": "deepseek-v3-style 1,024 H100", "recipe": "deepseek-v3-style",
         "set": ["cluster.preset=h100-sxm-8", _nodes("deepseek-v3-style", 1024)], "target_s": 2.0},
    ]
    cases += [{"name": f"{r} 16,384 GPUs", "recipe": r, "set": [_nodes(r, 16384)], "target_s": 3.0}
              for r in sorted(recipe_names())]
    return cases


def _children_cpu() -> float:
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    return used.ru_utime + used.ru_stime


def _run(cmd: list[str]) -> tuple[float, float, str]:
    """Wall seconds, CPU seconds and stdout of one command: under other work the wall time grows
    with the machine's load, the CPU time much less."""
    cpu, start = _children_cpu(), time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return time.perf_counter() - start, _children_cpu() - cpu, proc.stdout


def plan_row(case: dict[str, Any], repeats: int) -> dict[str, Any]:
    """Median wall time of `megacpp plan RECIPE --set ... --json` and what the plan found."""
    cmd = [sys.executable, "-m", "megacpp.runtime.cli", "plan", case["recipe"], "--json"]
    for item in case["set"]:
        cmd += ["--set", item]
    runs = [_run(cmd) for _ in range(repeats)]
    times = [t for t, _, _ in runs]
    plan = json.loads(runs[-1][2])
    median = statistics.median(times)
    return {
        **case,
        "considered": plan["considered"],
        "legal": plan["legal_count"],
        "fit": plan["fitting_count"],
        "seconds": [round(t, 3) for t in times],
        "seconds_median": round(median, 3),
        "cpu_seconds_median": round(statistics.median(c for _, c, _ in runs), 3),
        "met": median < case["target_s"],
        "best_layout": plan["candidates"][0]["layout"] if plan["candidates"] else None,
    }


def search_row(gpus: int, repeats: int) -> dict[str, Any]:
    """The full NAM56R search on `gpus` H200 in process: build_plan, median of `repeats`."""
    spec = load_spec_text(recipe_text("nam56r"), overrides=[_nodes("nam56r", gpus)])
    times, cpu = [], []
    for _ in range(repeats):
        start, used = time.perf_counter(), time.process_time()
        plan = build_plan(spec)
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - used)
    median = statistics.median(times)
    return {
        "gpus": gpus,
        "considered": plan.considered,
        "legal": plan.legal_count,
        "fit": plan.fitting_count,
        "seconds_median": round(median, 4),
        "seconds_best": round(min(times), 4),
        "cpu_seconds_median": round(statistics.median(cpu), 4),
        "considered_per_second": round(plan.considered / median),
        "legal_estimated_per_second": round(plan.legal_count / median),
        "best_layout": plan.candidates[0].layout.to_dict() if plan.candidates else None,
    }


def help_seconds() -> float:
    """Median wall time of `megacpp --help` in a fresh interpreter (start-up and imports included)."""
    return statistics.median(_run([sys.executable, "-m", "megacpp.runtime.cli", "--help"])[0] for _ in range(5))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "search.json")
    ap.add_argument("--quick", action="store_true", help="search 8 GPUs once, write nothing")
    args = ap.parse_args(argv)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core, for this process and its children
    if args.quick:
        row = search_row(8, 1)
        print(f"8 GPUs: {row['considered']:,} considered, {row['legal']:,} legal in {row['seconds_median']:.3f} s")
        return 0
    load_before = os.getloadavg()
    searches = []
    for gpus in GPUS:
        searches.append(search_row(gpus, REPEATS))
        r = searches[-1]
        print(f"nam56r {gpus:>6} GPUs in process: {r['considered']:>9,} considered, {r['legal']:>6,} legal, "
              f"{r['fit']:>6,} fit, median {r['seconds_median']:.3f} s ({r['legal_estimated_per_second']:,} legal estimated/s)",
              flush=True)
    plans = []
    for case in plan_cases():
        plans.append(plan_row(case, REPEATS))
        r = plans[-1]
        print(f"{r['name']:<34} {r['legal']:>7,} legal, {r['fit']:>7,} fit: median {r['seconds_median']:>7.2f} s, "
              f"{r['cpu_seconds_median']:.2f} s CPU (target {r['target_s']:g} s: {'met' if r['met'] else 'MISSED'})", flush=True)
    help_s = help_seconds()
    print(f"megacpp --help: median {help_s:.3f} s (target under {HELP_TARGET_S:g} s)")
    result = {
        "benchmark": "megacpp plan --json wall time against issue 28's targets; nam56r full search (build_plan) in process",
        "machine": {"python": sys.version.split()[0], "platform": platform.platform(),
                    "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                    "load_average_before": [round(x, 2) for x in load_before],
                    "load_average_after": [round(x, 2) for x in os.getloadavg()]},
        "one_core": True,
        "repeats": REPEATS,
        "plans": plans,
        "rows": searches,
        "help_seconds_median": round(help_s, 4),
        "targets_met": all(r["met"] for r in plans) and help_s < HELP_TARGET_S,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    missed = [r["name"] for r in plans if not r["met"]]
    if missed:
        print(f"missed: {'; '.join(missed)}")
    return 0 if result["targets_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
