"""Run the GPU evidence specs through `megacpp launch` and collect their run reports.

On a 4-GPU H200 host with megacpp and megatron-core installed (see benchmarks/gpu/README.md):

    python benchmarks/gpu/run_layouts.py --out DIR [--steps 12] [--only NAME,...] [--baseline NAME,...]

Each spec in benchmarks/gpu/specs is planned and launched with `--engine megacpp --target torchrun`.
For the --baseline specs, benchmarks/plain_mcore_loop.py (megatron-core alone, no megacpp code)
trains the same layout in the same call, for the tokens/s comparison. Writes DIR/gpu_runs.json.
"""

from __future__ import annotations

import argparse
import json
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


def entry(name: str, report: dict, base: dict | None) -> dict:
    losses = report.get("losses") or []
    row = {
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
        "losses": losses,
        "losses_finite": bool(losses) and all(isinstance(x, (int, float)) and x == x and abs(x) != float("inf") for x in losses),
        "loss_falls": len(losses) > 3 and statistics.mean(losses[-3:]) < statistics.mean(losses[:3]),
        "adapters": report.get("adapters"),
        "per_rank_peak_gib": [r.get("peak_allocated_gib") for r in report.get("ranks", [])],
        "per_rank_reserved_gib": [r.get("peak_reserved_gib") for r in report.get("ranks", [])],
        "expert_tokens": report.get("expert_tokens"),
    }
    if base:
        row["baseline_tokens_per_second"] = base.get("tokens_per_second")
        row["baseline_step_seconds"] = base.get("measured_step_seconds") or base.get("median_step_seconds")
        if base.get("tokens_per_second") and report.get("tokens_per_second"):
            row["runtime_over_baseline"] = round(report["tokens_per_second"] / base["tokens_per_second"], 4)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--only", default="")
    ap.add_argument("--baseline", default="")
    ap.add_argument("--timeout", type=float, default=150)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "log.txt"
    work = Path("/tmp/megacpp-gpu-runs")
    specs = sorted((HERE / "specs").glob("*.yaml"))
    only = {s for s in args.only.split(",") if s}
    baselines = {s for s in args.baseline.split(",") if s}
    rows, failed = [], []
    for spec in specs:
        name = spec.stem
        if only and name not in only:
            continue
        rundir = work / name
        start = time.time()
        code = run(["megacpp", "launch", str(spec), "--engine", "megacpp", "--target", "torchrun",
                    "--steps", str(args.steps), "--out", str(rundir)], log, args.timeout)
        report_path = rundir / "report.json"
        if code != 0 or not report_path.exists():
            failed.append(name)
            print(f"{name}: FAILED (exit {code}) after {time.time() - start:.0f} s", flush=True)
            continue
        report = json.loads(report_path.read_text())
        base = None
        if name in baselines:
            base_path = rundir / "baseline.json"
            world = str(report["world_size"])
            run(["torchrun", "--standalone", "--nproc-per-node", world, str(HERE.parent / "plain_mcore_loop.py"),
                 "--plan", str(rundir / "plan.json"), "--steps", str(args.steps), "--report", str(base_path)], log, args.timeout)
            base = json.loads(base_path.read_text()) if base_path.exists() else None
        rows.append(entry(name, report, base))
        r = rows[-1]
        extra = f"  baseline ratio {r['runtime_over_baseline']:.3f}" if "runtime_over_baseline" in r else ""
        print(f"{name}: peak {r['measured_peak_gib']:.2f} GiB (planned {r['predicted_peak_gib']:.2f}), "
              f"step {r['measured_step_seconds']:.3f} s (planned {r['predicted_step_seconds']:.3f}), "
              f"loss {r['losses'][0]:.2f} -> {r['losses'][-1]:.2f}{extra}  [{time.time() - start:.0f} s]", flush=True)
        (args.out / "gpu_runs.json").write_text(json.dumps({"runs": rows, "failed": failed}, indent=1) + "\n")
    (args.out / "gpu_runs.json").write_text(json.dumps({"runs": rows, "failed": failed}, indent=1) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
