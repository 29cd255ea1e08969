"""Run GPU evidence specs through `megacpp launch` and collect their run reports.

On a GPU host with megacpp and megatron-core installed (see benchmarks/evidence/README.md):

    python benchmarks/gpu/run_layouts.py --out DIR --specs DIR [--steps 12] [--only NAME,...]
        [--baseline NAME,...] [--rounds 1] [--profile] [--trace] [--memory-peak]

Each spec in --specs (a campaign's specs/, benchmarks/evidence/NAME/specs) is planned and launched with
`--engine megacpp --target torchrun`. A spec with no legal layout is recorded as rejected, with
the planner's reason. For the --baseline specs, benchmarks/plain_mcore_loop.py (megatron-core
alone, no megacpp code) trains the same layout in the same call, for the tokens/s comparison;
with --rounds K the pair runs K times, alternating which goes first, and the ratio is the median
of the per-round ratios. Writes DIR/gpu_runs.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run(cmd: list[str], log: Path, timeout: float) -> int:
    with log.open("a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        try:
            return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            f.write(f"timed out after {timeout:.0f} s\n")
            return 124


def finite(values: list) -> bool:
    return bool(values) and all(isinstance(x, (int, float)) and x == x and abs(x) != float("inf") for x in values)


def loss_record(losses: list) -> dict:
    """A run's losses, whether they are all finite, and whether the last three average below the first three."""
    return {
        "losses": losses,
        "losses_finite": finite(losses),
        "loss_falls": len(losses) > 3 and statistics.mean(losses[-3:]) < statistics.mean(losses[:3]),
    }


def summary(name: str, row: dict, extra: str = "") -> str:
    """One console line per run: peak and step against the plan, first and last loss."""
    return (f"{name}: peak {row['measured_peak_gib']:.2f} GiB (planned {row['predicted_peak_gib']:.2f}), "
            f"step {row['measured_step_seconds']:.3f} s (planned {row['predicted_step_seconds']:.3f}), "
            f"loss {row['losses'][0]:.2f} -> {row['losses'][-1]:.2f}{extra}")


def entry(name: str, report: dict) -> dict:
    ranks = report.get("ranks", [])
    return {
        "name": name,
        "layout": report["layout"],
        "pattern": report.get("pattern"),
        "device": report.get("device"),
        "world_size": report.get("world_size"),
        "steps": report.get("steps"),
        "predicted_peak_gib": report.get("predicted_peak_gib"),
        "measured_peak_gib": report.get("measured_peak_gib"),
        "predicted_step_seconds": report.get("predicted_step_seconds"),
        "measured_step_seconds": report.get("measured_step_seconds"),
        "tokens_per_second": report.get("tokens_per_second"),
        **loss_record(report.get("losses") or []),
        "adapters": report.get("adapters"),
        "backend": report.get("backend"),
        "predicted_peak_gib_per_stage": report.get("predicted", {}).get("peak_gib"),
        "per_rank_peak_gib": [r.get("peak_allocated_gib") for r in ranks],
        "per_rank_reserved_gib": [r.get("peak_reserved_gib") for r in ranks],
        "per_rank_memory_phases": [r.get("memory_phases") for r in ranks],
        "per_rank_forward_backward_seconds": [r.get("forward_backward_seconds") for r in ranks],
        "per_rank_optimizer_seconds": [r.get("optimizer_seconds") for r in ranks],
        "per_rank_profile": [r.get("profile") for r in ranks],
        "per_rank_host": [r.get("host") for r in ranks],
        "per_rank_memory_peak": [r.get("memory_peak") for r in ranks],
        "expert_tokens": report.get("expert_tokens"),
        "routed_load": report.get("routed_load"),
        "per_rank_coordinates": [{axis: r.get(axis) for axis in ("tp", "pp", "dp", "ep")} for r in ranks],
        "spec": report.get("spec"),
    }


def launch(spec: Path, rundir: Path, steps: int, extras: list[str], log: Path, timeout: float) -> dict | None:
    cmd = ["megacpp", "launch", str(spec), "--engine", "megacpp", "--target", "torchrun", "--steps", str(steps),
           "--out", str(rundir), *extras]
    code = run(cmd, log, timeout)
    path = rundir / "report.json"
    return json.loads(path.read_text()) if code == 0 and path.exists() else None


def baseline(rundir: Path, world: int, steps: int, log: Path, timeout: float, tag: str) -> dict | None:
    path = rundir / f"baseline-{tag}.json"
    run(["torchrun", "--standalone", "--nproc-per-node", str(world), str(HERE.parent / "plain_mcore_loop.py"),
         "--plan", str(rundir / "plan.json"), "--steps", str(steps), "--report", str(path)], log, timeout)
    return json.loads(path.read_text()) if path.exists() else None


def compare(spec: Path, rundir: Path, first: dict, args, log: Path, row: dict, save) -> None:
    """Alternate runtime and baseline for --rounds rounds; per-round tokens/s and their ratio,
    written into `row` (and saved) after every round."""
    rounds: list[dict] = []
    row["baseline_comparison"] = {"rounds": rounds, "runtime_over_baseline": None}
    for k in range(args.rounds):
        runtime_first = k % 2 == 0  # round 0 reuses the runtime's first report; odd rounds start with the baseline
        if k == 0:
            rt, base = first, baseline(rundir, first["world_size"], args.steps, log, args.timeout, "0")
        elif runtime_first:
            rt = launch(spec, rundir / f"round{k}", args.steps, [], log, args.timeout)
            base = baseline(rundir, first["world_size"], args.steps, log, args.timeout, str(k))
        else:
            base = baseline(rundir, first["world_size"], args.steps, log, args.timeout, str(k))
            rt = launch(spec, rundir / f"round{k}", args.steps, [], log, args.timeout)
        if not (rt and base):
            continue
        rounds.append({
            "order": "runtime first" if runtime_first else "baseline first",
            "runtime_tokens_per_second": rt["tokens_per_second"], "baseline_tokens_per_second": base["tokens_per_second"],
            "runtime_over_baseline": round(rt["tokens_per_second"] / base["tokens_per_second"], 4),
            "losses_identical": rt["losses"] == base["losses"],
        })
        ratio = round(statistics.median(r["runtime_over_baseline"] for r in rounds), 4)
        row["baseline_comparison"]["runtime_over_baseline"] = row["runtime_over_baseline"] = ratio
        save()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--specs", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--only", default="")
    ap.add_argument("--baseline", default="")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--profile", action="store_true", help="profile one extra step's kernels in each launch")
    ap.add_argument("--memory-peak", action="store_true", help="break one extra step's peak memory down by allocation site")
    ap.add_argument("--trace", action="store_true", help="with the profiled step, keep its Chrome traces under OUT/traces/NAME")
    ap.add_argument("--timeout", type=float, default=180)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    extras = ["--profile"] * (args.profile or args.trace) + ["--trace"] * args.trace + ["--memory-peak"] * args.memory_peak
    log = args.out / "log.txt"
    work = Path("/tmp/megacpp-gpu-runs")
    only = {s for s in args.only.split(",") if s}
    baselines = {s for s in args.baseline.split(",") if s}
    rows, failed, rejected = [], [], []

    def save() -> None:
        doc = {"runs": rows, "failed": failed, "rejected": rejected}
        (args.out / "gpu_runs.json").write_text(json.dumps(doc, indent=1) + "\n")

    for spec in sorted(args.specs.glob("*.yaml")):
        name = spec.stem
        if only and name not in only:
            continue
        start = time.time()
        check = subprocess.run(["megacpp", "plan", str(spec), "--top", "1"], capture_output=True, text=True)
        if check.returncode != 0:
            reason = (check.stdout.strip().splitlines() or [""])[-1:] + (check.stderr.strip().splitlines() or [""])[-1:]
            rejected.append({"name": name, "reason": " ".join(x for x in reason if x)})
            print(f"{name}: rejected by the planner: {rejected[-1]['reason']}", flush=True)
            save()
            continue
        rundir = work / name
        report = launch(spec, rundir, args.steps, extras, log, args.timeout)
        if report is None:
            failed.append(name)
            print(f"{name}: FAILED after {time.time() - start:.0f} s (see {log})", flush=True)
            save()
            continue
        if args.trace:
            shutil.copytree(rundir / "traces", args.out / "traces" / name, dirs_exist_ok=True)
        row = entry(name, report)
        rows.append(row)
        if name in baselines:
            compare(spec, rundir, report, args, log, row, save)
        extra = f"  runtime/baseline {row['runtime_over_baseline']}" if "runtime_over_baseline" in row else ""
        launch_us = [h["launch_us"] for h in row["per_rank_host"] if h]
        extra += f"  host {max(launch_us):.1f} us/op" if launch_us else ""
        print(summary(name, row, f"{extra}  [{time.time() - start:.0f} s]"), flush=True)
        save()
    save()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
