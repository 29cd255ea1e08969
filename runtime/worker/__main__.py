"""`python -m megacpp.runtime.worker --plan PLAN.json ...`, one process per GPU under torchrun.

    torchrun --nproc-per-node 4 -m megacpp.runtime.worker --plan plan.json --steps 20 --report run.json

A user error (plan and world size disagree, a block needs a package that does not import, ...)
prints one line and exits 1; set MEGACPP_DEBUG=1 for the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv: list[str] | None = None):
    """The command line as run.Options."""
    from megacpp.runtime.worker.run import Options

    ap = argparse.ArgumentParser(prog="python -m megacpp.runtime.worker", description="Build and train one candidate of a megacpp plan on megatron-core.")
    ap.add_argument("--plan", required=True, help="PLAN.json written by `megacpp plan SPEC --out PLAN.json`")
    ap.add_argument("--candidate", type=int, default=0, help="index into the plan's candidates (default 0, the best)")
    ap.add_argument("--steps", type=int, default=20,
                    help="timed training steps (default 20); the learning rate follows the spec's training schedule")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps before them (default 3)")
    ap.add_argument("--report", help="write the run report (JSON, schema megacpp.run/1) here from rank 0")
    ap.add_argument("--construct-only", action="store_true", help="build the model and report parameters; no training (works on CPU)")
    ap.add_argument("--tokens", help="token ids to train on: .npy (integer array) or .bin (raw uint16); default synthetic")
    ap.add_argument("--profile", action="store_true", help="run one more step under torch.profiler; kernel seconds by kind per rank")
    ap.add_argument("--trace", metavar="DIR", help="with --profile: write each rank's profiled step as a Chrome trace, DIR/trace-rankN.json.gz")
    ap.add_argument("--memory-peak", action="store_true",
                    help="run one more step under the CUDA allocator's history; its peak by allocation site per rank")
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        ap.error("--steps must be at least 1 and --warmup at least 0")
    if args.trace and not args.profile:
        ap.error("--trace writes the profiled step: pass --profile with it")
    return Options(plan=args.plan, candidate=args.candidate, steps=args.steps, warmup=args.warmup, report=args.report,
                   construct_only=args.construct_only, profile=args.profile, memory_peak=args.memory_peak, trace=args.trace, tokens=args.tokens, seed=args.seed)


def main(argv: list[str] | None = None) -> int:
    """Run one worker process; 0 on success, 1 on a user error (one line on stderr)."""
    from megacpp.planner.errors import MegacppError

    opts = parse_args(argv)
    rank = os.environ.get("RANK", "?")
    try:
        from megacpp.runtime.worker.run import run, summary

        report = run(opts)
    except MegacppError as exc:
        if os.environ.get("MEGACPP_DEBUG") == "1":
            raise
        print(f"megacpp worker (rank {rank}): error: {exc}", file=sys.stderr, flush=True)
        return 1
    if report is not None:
        print(f"megacpp worker: {summary(report)}" + (f"; report: {opts.report}" if opts.report else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
