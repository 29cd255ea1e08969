"""Where a profiled training step's time goes, phase by phase, from its Chrome trace.

    python benchmarks/gpu/trace_phases.py TRACE.json.gz [...] [--json OUT]

The traces come from `megacpp launch --engine megacpp --profile --trace` (or run_layouts.py
--trace). Megatron's schedule runs each micro-batch's forward on the main thread and its backward
on the autograd engine's device thread, so the host's time splits into forward windows (main
thread, up to the backward's first op), backward windows (the autograd thread's ops of one
micro-batch) and the optimizer step (main thread, after the last backward). Per phase this prints
the window's wall time, the GPU's busy time inside it (the union of kernels, copies and memsets
over every stream), the host's waits on the GPU (synchronising CUDA calls on the phase's thread),
and the GPU time of the kernels that phase launched.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path

from megacpp.runtime.worker.measure.timeline import HOST_WAITS, TRACE_GPU_CATEGORIES, merged, overlap

BACKWARD_OP = "autograd::engine::evaluate_function"


def backward_windows(ops: list[dict], gap_us: float) -> list[tuple[float, float]]:
    """The autograd thread's ops clustered into one window per micro-batch: a new window starts
    after a gap longer than `gap_us` in which the thread ran nothing."""
    windows: list[list[float]] = []
    for e in sorted(ops, key=lambda e: e["ts"]):
        end = e["ts"] + e.get("dur", 0)
        if windows and e["ts"] - windows[-1][1] <= gap_us:
            windows[-1][1] = max(windows[-1][1], end)
        else:
            windows.append([e["ts"], end])
    return [(a, b) for a, b in windows]


def phases(trace: dict, gap_us: float = 2000.0) -> dict:
    """Per phase (forward, backward, optimizer): windows, wall seconds, GPU busy seconds inside
    them, the phase thread's waits on the GPU and their seconds, and the GPU seconds of the work
    launched in the phase's windows."""
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    cpu = [e for e in events if e.get("cat") == "cpu_op"]
    backward_tid = next(e["tid"] for e in cpu if e["name"].startswith(BACKWARD_OP))
    main_tid = max({e["tid"] for e in cpu if e["tid"] != backward_tid},
                   key=lambda t: sum(e.get("dur", 0) for e in cpu if e["tid"] == t))
    calls = [e for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver")]
    launched_at = {e["args"]["correlation"]: e["ts"] for e in calls if "correlation" in e.get("args", {})}
    gpu = [e for e in events if e.get("cat") in TRACE_GPU_CATEGORIES]
    busy = merged([(e["ts"], e["ts"] + e["dur"]) for e in gpu])
    main_ops = [e for e in cpu if e["tid"] == main_tid]
    start = min(e["ts"] for e in main_ops)
    end = max(max(e["ts"] + e["dur"] for e in main_ops), busy[-1][1])
    windows: list[tuple[str, float, float]] = []
    cursor = start
    for lo, hi in backward_windows([e for e in cpu if e["tid"] == backward_tid], gap_us):
        windows += [("forward", cursor, lo), ("backward", lo, hi)]
        cursor = hi
    windows.append(("optimizer", cursor, end))
    out = {phase: {"windows": 0, "wall_s": 0.0, "gpu_busy_s": 0.0, "waits": 0, "wait_s": 0.0, "launched_gpu_s": 0.0}
           for phase in ("forward", "backward", "optimizer")}
    for phase, lo, hi in windows:
        row = out[phase]
        tid = backward_tid if phase == "backward" else main_tid
        waits = [e["dur"] for e in calls if e["tid"] == tid and e["name"] in HOST_WAITS and lo <= e["ts"] < hi]
        row["windows"] += 1
        row["wall_s"] += (hi - lo) / 1e6
        row["gpu_busy_s"] += overlap(busy, [(lo, hi)]) / 1e6
        row["waits"] += len(waits)
        row["wait_s"] += sum(waits) / 1e6
    for e in gpu:
        ts = launched_at.get(e.get("args", {}).get("correlation"))
        phase = next((p for p, lo, hi in windows if ts is not None and lo <= ts < hi), None)
        if phase is not None:
            out[phase]["launched_gpu_s"] += e["dur"] / 1e6
    total = {"wall_s": round((end - start) / 1e6, 6), "gpu_busy_s": round(overlap(busy, [(start, end)]) / 1e6, 6),
             "micro_batches": len(windows) // 2}
    return {"total": total, **{p: {k: round(v, 6) if isinstance(v, float) else v for k, v in row.items()} for p, row in out.items()}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("traces", nargs="+", type=Path)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    rows = {}
    for path in args.traces:
        with gzip.open(path) if path.suffix == ".gz" else path.open() as f:
            rows[path.name] = result = phases(json.load(f))
        t = result["total"]
        print(f"{path.name}: wall {t['wall_s']:.3f} s, GPU busy {t['gpu_busy_s']:.3f} s, {t['micro_batches']} micro-batches")
        print(f"  {'phase':10} {'wall s':>8} {'GPU busy':>9} {'idle':>7} {'waits':>6} {'wait s':>7} {'launched GPU s':>15}")
        for phase in ("forward", "backward", "optimizer"):
            r = result[phase]
            print(f"  {phase:10} {r['wall_s']:8.3f} {r['gpu_busy_s']:9.3f} {r['wall_s'] - r['gpu_busy_s']:7.3f} {r['waits']:6d} "
                  f"{r['wait_s']:7.3f} {r['launched_gpu_s']:15.3f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
