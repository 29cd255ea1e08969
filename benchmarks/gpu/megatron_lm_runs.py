"""Run the Megatron-LM launch that megacpp renders, and record what it held and how fast it ran.

On a GPU host with megacpp, megatron-core and a Megatron-LM checkout of the spec's dialect:

    MEGATRON_LM=/path/to/Megatron-LM python benchmarks/gpu/megatron_lm_runs.py --out DIR --specs DIR
        [--only NAME,...] [--steps 12] [--extra "FLAGS" --tag SUFFIX] [--profile]

Each spec is rendered with `megacpp launch SPEC --engine megatron-lm --target torchrun --dry-run`
and its launch.sh is run as a user would run it. Megatron-LM prints no steady-state memory peak,
so a sitecustomize.py on the run's PYTHONPATH makes every rank print
torch.cuda.max_memory_allocated() and max_memory_reserved() when it exits. The step time is the
median of Megatron-LM's "elapsed time per iteration" after the first three iterations; the
losses are its "lm loss" values. Writes DIR/gpu_runs.json in run_layouts.py's format, so
compare.py re-estimates these runs beside the runtime's.

--extra appends Megatron-LM arguments to the rendered command (to measure a flag the render does
not set; the run's name gets --tag). --profile runs rank 0's second-to-last iteration under
Megatron-LM's own torch profiler (--profile --use-pytorch-profiler) and summarises its trace as
run_layouts.py's --profile does, adding the GPU's busy time and the host's waits on the GPU; the
last three iterations (profiler warm-up, the profiled one, the trace's export) are left out of
the step time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere; an installed megacpp comes first
from benchmarks.gpu.run_layouts import loss_record, run, summary  # noqa: E402
from megacpp.planner.megatron.render import TE_IMPORT_CHECK  # noqa: E402

PROBE = '''import atexit
import os


def _report():
    import torch
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        print(f"[megacpp-probe] rank {os.environ.get('RANK')} max_allocated_gib {torch.cuda.max_memory_allocated() / 2**30:.4f} "
              f"max_reserved_gib {torch.cuda.max_memory_reserved() / 2**30:.4f}", flush=True)


atexit.register(_report)
'''
# --bridge-te-gaps: megatron-core's code paths that call Transformer Engine even with local modules
# (render.te_import_reasons), bridged on a host without it so that the run's memory can be read: the
# runtime's torch GEMM for the router, and CheckpointWithoutOutput's fp8 flag as its callers mean it
BRIDGE = '''

def _bridge_te_gaps():
    from megacpp.runtime.worker.adapters import install_router_gemm
    from megatron.core.tensor_parallel import random as tp_random

    install_router_gemm()
    if not tp_random.HAVE_TE:
        init = tp_random.CheckpointWithoutOutput.__init__

        def without_fp8(self, fp8=False, *args, **kwargs):
            init(self, fp8, *args, **kwargs)
            self.fp8 = bool(fp8)

        tp_random.CheckpointWithoutOutput.__init__ = without_fp8


_bridge_te_gaps()
'''
PROBE_LINE = re.compile(r"\[megacpp-probe\] rank (\d+) max_allocated_gib ([\d.]+) max_reserved_gib ([\d.]+)")
ITERATION = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?elapsed time per iteration \(ms\): ([\d.]+).*?lm loss: ([\d.Ee+-]+)")
WARMUP_ITERATIONS = 3
PROFILED_TAIL = 3  # with --profile: the profiler's warm-up iteration, the profiled one, the trace's export


def parse_logs(text: str, world: int, tail: int = 0) -> dict:
    """Per-rank peaks from the probe lines, and per-iteration times and losses from Megatron-LM's
    log (each line may appear twice: the console and the per-rank log files). The step time is the
    median after the warm-up iterations and before the last `tail` ones."""
    peaks: dict[int, tuple[float, float]] = {}
    for rank, allocated, reserved in PROBE_LINE.findall(text):
        peaks[int(rank)] = (float(allocated), float(reserved))
    iterations: dict[int, tuple[float, float]] = {}
    for it, ms, loss in ITERATION.findall(text):
        iterations[int(it)] = (float(ms) / 1e3, float(loss))
    if sorted(peaks) != list(range(world)) or not iterations:
        raise ValueError(f"ranks reported {sorted(peaks)} of {world}, {len(iterations)} iterations logged")
    ordered = [iterations[i] for i in sorted(iterations)]
    timed = [sec for sec, _ in ordered[WARMUP_ITERATIONS:len(ordered) - tail]] or [sec for sec, _ in ordered]
    return {
        "per_rank_peak_gib": [peaks[r][0] for r in range(world)],
        "per_rank_reserved_gib": [peaks[r][1] for r in range(world)],
        "iteration_seconds": [sec for sec, _ in ordered],
        "losses": [loss for _, loss in ordered],
        "measured_step_seconds": statistics.median(timed),
    }


def trace_summary(trace: dict) -> dict:
    """The profiled iteration of torch's Chrome trace, summarised as the runtime's --profile is."""
    from megacpp.runtime.worker.measure.profile import gpu_activity
    from megacpp.runtime.worker.measure.timeline import HOST_WAITS, TRACE_GPU_CATEGORIES

    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    wall = max((e["dur"] for e in events if str(e.get("name", "")).startswith("ProfilerStep#")), default=0.0) / 1e6
    gpu = [(e["name"], e["ts"], e["dur"]) for e in events if e.get("cat") in TRACE_GPU_CATEGORIES]
    waits = [e["dur"] for e in events if e.get("cat") == "cuda_runtime" and e.get("name") in HOST_WAITS]
    return gpu_activity(wall, gpu, waits)


def append_arguments(script: str, extra: list[str]) -> str:
    """The launch script with `extra` (shell-quoted) added to the end of its command."""
    lines = script.rstrip("\n").split("\n")
    lines[-1] += "".join(f" {shlex.quote(a)}" for a in extra)
    return "\n".join(lines) + "\n"


def entry(name: str, plan: dict, parsed: dict, device: dict) -> dict:
    cand = plan["candidates"][0]
    te = plan["spec"]["backend"]["transformer_engine"]
    return {
        "name": name,
        "engine": "megatron-lm",
        "layout": cand["layout"],
        "pattern": plan["spec"]["model"]["pattern"],
        "device": device,
        "world_size": len(parsed["per_rank_peak_gib"]),
        "steps": len(parsed["losses"]),
        "predicted_peak_gib": cand["memory"]["peak_gib"],
        "measured_peak_gib": max(parsed["per_rank_peak_gib"]),
        "predicted_step_seconds": cand["time"]["step_seconds"],
        "measured_step_seconds": parsed["measured_step_seconds"],
        "iteration_seconds": parsed["iteration_seconds"],
        **loss_record(parsed["losses"]),
        "backend": {"transformer_engine_requested": te, "transformer_engine_used": te,
                    "fusions_used": plan["spec"]["backend"].get("fusions", True)},
        "per_rank_peak_gib": parsed["per_rank_peak_gib"],
        "per_rank_reserved_gib": parsed["per_rank_reserved_gib"],
        "spec": plan["spec"],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--specs", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--only", default="")
    ap.add_argument("--timeout", type=float, default=240)
    ap.add_argument("--extra", default="", help="Megatron-LM arguments appended to the rendered command")
    ap.add_argument("--tag", default="", help="appended to each run's name (with --extra)")
    ap.add_argument("--profile", action="store_true", help="profile rank 0's second-to-last iteration")
    ap.add_argument("--bridge-te-gaps", action="store_true",
                    help="run where Transformer Engine does not import: bridge what megatron-core calls of it anyway")
    args = ap.parse_args()
    extra = shlex.split(args.extra)
    if not os.environ.get("MEGATRON_LM"):
        print("set MEGATRON_LM to a Megatron-LM checkout of the specs' dialect", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "log.txt"
    probe = args.out / "probe"
    probe.mkdir(exist_ok=True)
    (probe / "sitecustomize.py").write_text(PROBE + BRIDGE * args.bridge_te_gaps)
    env_path = f"{probe}:{os.environ['PYTHONPATH']}" if os.environ.get("PYTHONPATH") else str(probe)
    only = {s for s in args.only.split(",") if s}
    rows, failed = [], []

    def save() -> None:
        (args.out / "gpu_runs.json").write_text(json.dumps({"runs": rows, "failed": failed}, indent=1) + "\n")

    import torch

    device = {"name": torch.cuda.get_device_name(), "count": torch.cuda.device_count()}
    for spec in sorted(args.specs.glob("*.yaml")):
        name = spec.stem
        if only and name not in only:
            continue
        rundir = args.out / name
        if run(["megacpp", "launch", str(spec), "--engine", "megatron-lm", "--target", "torchrun", "--dry-run",
                "--steps", str(args.steps), "--out", str(rundir)], log, args.timeout) != 0:
            failed.append(name)
            continue
        trace_dir = rundir / "trace"
        profile = ["--profile", "--use-pytorch-profiler", "--profile-ranks", "0", "--tensorboard-dir", str(trace_dir),
                   "--profile-step-start", str(args.steps - 1), "--profile-step-end", str(args.steps)]
        script = rundir / "launch.sh"
        lines = script.read_text().splitlines(keepends=True)
        if args.bridge_te_gaps:  # the launch's own stop where TE does not import: bridged instead
            lines = [line for line in lines if not line.startswith(TE_IMPORT_CHECK)]
        script.write_text(append_arguments("".join(lines), extra + profile * args.profile))
        code = run(["env", f"PYTHONPATH={env_path}", "bash", str(script)], log, args.timeout)
        text = "\n".join(p.read_text(errors="replace") for p in sorted((rundir / "logs").rglob("*")) if p.is_file())
        plan = json.loads((rundir / "plan.json").read_text())
        try:
            row = entry(name + args.tag, plan, parse_logs(text, plan["world_size"], PROFILED_TAIL * args.profile), device)
            row["extra_arguments"] = extra
            if args.profile:
                traces = sorted(trace_dir.glob("*.pt.trace.json"))
                if not traces:
                    raise ValueError(f"no profiler trace in {trace_dir}")
                row["per_rank_profile"] = [trace_summary(json.loads(traces[-1].read_text()))]
                for trace in traces:
                    trace.unlink()  # tens of MB each; the summary is what is kept
        except ValueError as exc:
            print(f"{name}: FAILED (exit {code}): {exc} (see {log})", flush=True)
            failed.append(name)
            continue
        rows.append(row)
        prof = (row.get("per_rank_profile") or [None])[0]
        note = (f"; profiled: wall {prof['wall_seconds']:.3f} s, GPU busy {prof['gpu_busy_seconds']:.3f} s, "
                f"{prof['host_waits']} host waits {prof['host_wait_seconds']:.3f} s") if prof else ""
        print(summary(row["name"], row, note), flush=True)
        save()
    save()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
