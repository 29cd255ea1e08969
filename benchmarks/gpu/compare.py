"""Predicted versus measured, for every committed GPU run, under the current cost model.

    python benchmarks/gpu/compare.py [RESULTS.json ...] [--json OUT] [--markdown | --summary]

Each run in benchmarks/evidence/*/results/gpu_runs_*.json carries its spec and layout; this re-estimates it
with the cost model as it is now (for the backend that actually ran: megatron-core's local modules
or Transformer Engine, with the fusions it ran) and prints, per pipeline stage, predicted and
measured peak allocated memory, and per run predicted and measured step time.

Runs that recorded routing per micro-batch and the peak of every step (`routed_load`,
`step_peak_gib`) also get `memory_error_at_routing`: every step's peak on every rank predicted at
the routed load that rank received in that step, and the worst of those errors.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from functools import cache
from pathlib import Path

from megacpp.planner.calibrate.reports import run_spec
from megacpp.planner.cost.memory import in_flight
from megacpp.planner.plan import estimate_run
from megacpp.planner.search.layout import Layout

EVIDENCE = Path(__file__).resolve().parents[1] / "evidence"


def committed_results() -> list[Path]:
    """Every campaign's run reports, in file-name order (file names are unique across campaigns)."""
    return sorted(EVIDENCE.glob("*/results/gpu_runs_*.json"), key=lambda path: path.name)


def compare(run: dict) -> list[dict]:
    """One row per pipeline stage: predicted and measured peak (the stage's highest rank)."""
    est = estimate_run(run_spec(run), run["layout"])
    lay = run["layout"]
    per_stage = run["world_size"] // lay["pp"]
    at_routing = routing_errors(run)
    rows = []
    for p, mem in enumerate(est.memory):
        measured = max(run["per_rank_peak_gib"][p * per_stage:(p + 1) * per_stage])
        rows.append({
            "run": run["name"], "layout": layout_label(lay), "pp_rank": p, "predicted_peak_gib": round(mem.total_gib, 3), "measured_peak_gib": measured,
            "memory_error": round(mem.total_gib / measured - 1, 4), "memory_error_at_routing": at_routing.get(p),
            "predicted_step_seconds": round(est.step_seconds, 4), "measured_step_seconds": round(run["measured_step_seconds"], 4),
            "step_error": round(est.step_seconds / run["measured_step_seconds"] - 1, 4),
        })
    return rows


def in_flight_load(per_microbatch: list[float], window: int) -> float:
    """The heaviest mean load over `window` consecutive micro-batches (at most the micro-batch
    count): the activations a stage holds at once, cost.in_flight of them."""
    window = min(window, len(per_microbatch))
    return max(sum(per_microbatch[j:j + window]) / window for j in range(len(per_microbatch) - window + 1))


def routing_pairs(run: dict) -> list[dict]:
    """Every step after the first (which has no optimizer state yet) on every rank: the routed load
    the rank received (in_flight_load), its measured peak, and the stage's peak predicted at that
    load. Empty for runs without per-micro-batch routing and per-step peaks."""
    phases = run.get("per_rank_memory_phases") or []
    if not run.get("routed_load") or not all(ph and ph.get("step_peak_gib") for ph in phases):
        return []
    spec, lay = run_spec(run), run["layout"]
    layout = Layout.from_dict(lay)
    memory = cache(lambda load: [m.total_gib for m in estimate_run(spec, lay, load=load).memory])
    # under full recompute the peak rebuilds one layer of one micro-batch: its heaviest layer's
    # load where the run recorded it (runs before that recorded the stage's average only)
    full = spec.training.recompute == "full"
    by_layer = full and all("heaviest_layer_steps" in stage for stage in run["routed_load"])
    loads = {stage["pp_rank"]: stage["heaviest_layer_steps" if by_layer else "steps"] for stage in run["routed_load"]}
    pairs = []
    for coords, ph in zip(run["per_rank_coordinates"], phases, strict=True):
        p, mbs = coords["pp"], loads.get(coords["pp"])  # a stage without MoE layers routes nothing
        window = 1 if by_layer else math.ceil(in_flight(layout, p))
        for step, peak in enumerate(ph["step_peak_gib"][1:], start=1):
            load = in_flight_load([mb[coords["ep"]] for mb in mbs[step]], window) if mbs else 1.0
            pairs.append({"pp_rank": p, "load": load, "measured_gib": peak, "predicted_gib": memory(round(load, 2))[p]})
    return pairs


def routing_errors(run: dict) -> dict[int, float]:
    """Per pipeline stage, the worst error of routing_pairs."""
    worst: dict[int, float] = {}
    for pair in routing_pairs(run):
        error = round(pair["predicted_gib"] / pair["measured_gib"] - 1, 4)
        if abs(error) > abs(worst.get(pair["pp_rank"], 0.0)):
            worst[pair["pp_rank"]] = error
    return worst


def host_label(file: str) -> str:
    """gpu_runs_h200x4_peaks.json -> "4 x H200 (peaks)": the host size and the evidence set."""
    stem = file.removeprefix("gpu_runs_").removesuffix(".json")
    gpu, _, rest = stem.partition("x")
    count, _, tag = rest.partition("_")
    return f"{count} x {gpu.upper()}" + (f" ({tag})" if tag else "")


def layout_label(layout: dict) -> str:
    """The README's compact label: axes above 1 only."""
    return Layout.from_dict(layout).short(mbs=False, compact=True)


def markdown(rows: list[dict]) -> str:
    lines = ["| host | run | layout | pp | peak GiB measured | predicted | error | at its routing | step s measured | predicted | error |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        step = (f"{r['measured_step_seconds']:.3f} | {r['predicted_step_seconds']:.3f} | {r['step_error']:+.1%}"
                if r["pp_rank"] == 0 else " | | ")
        routing = "" if r.get("memory_error_at_routing") is None else f"{r['memory_error_at_routing']:+.1%}"
        lines.append(f"| {host_label(r['file'])} | {r['run']} | {r['layout']} | {r['pp_rank']} | {r['measured_peak_gib']:.2f} | "
                     f"{r['predicted_peak_gib']:.2f} | {r['memory_error']:+.1%} | {routing} | {step} |")
    return "\n".join(lines)


def summary(rows: list[dict]) -> str:
    """Per campaign (the folder above a run report's results/), how many stages and runs the cost
    model predicts within 2%, 5% and 15%, and the median step-time error; then all of them."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["campaign"], []).append(r)
    lines = ["| campaign | runs | steps within 15% | median step error | stages | memory within 2% | within 5% |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, group in [*sorted(groups.items()), ("all", rows)]:
        steps = [abs(r["step_error"]) for r in group if r["pp_rank"] == 0]
        memory = [abs(r["memory_error"]) for r in group]
        label = f"**{name}**" if name == "all" else f"[{name}]({name}/NOTE.md)"
        lines.append(f"| {label} | {len(steps)} | {sum(e <= 0.15 for e in steps)} | {statistics.median(steps):.1%} | "
                     f"{len(memory)} | {sum(e <= 0.02 for e in memory)} | {sum(e <= 0.05 for e in memory)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="*", type=Path)
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument("--markdown", action="store_true", help="print the table as benchmarks/evidence/README.md shows it")
    ap.add_argument("--summary", action="store_true", help="print the per-campaign summary of benchmarks/evidence/README.md")
    args = ap.parse_args(argv)
    files = args.results or committed_results()
    rows, campaigns = [], []
    for path in files:
        doc = json.loads(path.read_text())
        for run in doc["runs"]:
            for row in compare(run):
                rows.append({"file": path.name, **row})
                campaigns.append(path.resolve().parent.parent.name)
    if args.summary:
        print(summary([{**r, "campaign": c} for r, c in zip(rows, campaigns, strict=True)]))
        return 0
    if args.markdown:
        print(markdown(rows))
        return 0
    print(f"{'file':24} {'run':20} {'pp':>2} {'pred GiB':>9} {'meas GiB':>9} {'err':>7}   {'pred s':>7} {'meas s':>7} {'err':>7}")
    for r in rows:
        print(f"{r['file']:24} {r['run']:20} {r['pp_rank']:>2} {r['predicted_peak_gib']:9.2f} {r['measured_peak_gib']:9.2f} "
              f"{r['memory_error']:+7.1%}   {r['predicted_step_seconds']:7.3f} {r['measured_step_seconds']:7.3f} {r['step_error']:+7.1%}")
    within = sum(abs(r["memory_error"]) <= 0.05 for r in rows)
    print(f"memory within 5%: {within} of {len(rows)} stages")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
