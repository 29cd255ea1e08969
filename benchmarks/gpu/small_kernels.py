"""The small kernels' GPU time read from the committed profiles, per block letter.

    python benchmarks/gpu/small_kernels.py [--json OUT]

The step model prices every kernel that is not a GEMM, attention, the SSD scan or a collective
(norms, activations, residual adds, rotary, casts, permutations) as HBM traffic per byte of a
block's saved activations (cost.step.small_kernel_seconds) times one pooled coefficient,
Efficiency.te_small_kernel_traffic, which `megacpp calibrate` fitted together with the per-block
host time. Here the same kernels are read directly: each profiled Transformer Engine run on one
pipeline stage (hidden 1,024 or wider) gives its "other" and "copy" kernel seconds, less the
optimizer step, the gradient accumulation and the SSD scan as the model prices them; a least-squares
fit of relative error then gives a traffic per letter, beside how well each explains those seconds.
Nothing here changes the model: it is what a per-letter coefficient would be, and the pooled one's
error on the same seconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import Counter
from pathlib import Path

from benchmarks.gpu.compare import committed_results
from megacpp.planner.calibrate.lstsq import solve
from megacpp.planner.calibrate.reports import NO_OVERHEAD, run_spec
from megacpp.planner.cost.coefficients import DEFAULT_EFFICIENCY
from megacpp.planner.cost.flops import block_gemms
from megacpp.planner.cost.host import gpu_repeats
from megacpp.planner.cost.step import core_seconds, estimate, small_kernel_seconds
from megacpp.planner.plan import make_context
from megacpp.planner.search.layout import Layout
from megacpp.planner.search.stages import assign_stages

LETTERS = "ADEMR"
MIN_HIDDEN = 1024  # narrower probes are host-bound: their small kernels are launch-sized


def observations() -> list[dict]:
    """Per profiled TE run on one stage: its small-kernel seconds and the model's units per letter."""
    out = []
    for path in committed_results():
        for run in json.loads(path.read_text())["runs"]:
            profiles = [p["kernel_seconds"] for p in run.get("per_rank_profile") or () if p]
            if not profiles or run.get("spec") is None:
                continue
            spec = run_spec(run)
            if not spec.backend.transformer_engine or spec.model.hidden_size < MIN_HIDDEN:
                continue
            ctx, lay = make_context(spec), Layout.from_dict(run["layout"])
            if lay.pp != 1:
                continue
            stages = assign_stages(ctx, lay.pp, lay.vpp)[1]
            counts = Counter("".join(s.blocks for s in stages))
            repeats, micro_batches = gpu_repeats(spec.training.recompute), lay.num_microbatches
            priced = dict(estimate(ctx, lay, stages, NO_OVERHEAD).breakdown)
            scan = core_seconds(ctx, block_gemms(ctx, "M", lay), DEFAULT_EFFICIENCY, spec.training.recompute,
                                repeats) * counts["M"] * micro_batches if counts["M"] else 0.0
            measured = statistics.mean(k.get("other", 0.0) + k.get("copy", 0.0) for k in profiles)
            out.append({
                "run": run["name"], "file": path.name,
                "seconds": measured - priced.get("optimizer", 0.0) - priced.get("grad_accumulation", 0.0) - scan,
                "units": {letter: small_kernel_seconds(ctx, lay, letter) * n * micro_batches * repeats
                          for letter, n in counts.items()},
            })
    return out


def fit(rows: list[dict]) -> dict[str, float]:
    """Traffic per letter by least squares of relative error (each run's equation over its seconds)."""
    letters = [x for x in LETTERS if any(r["units"].get(x) for r in rows)]
    matrix = [[r["units"].get(x, 0.0) / r["seconds"] for x in letters] for r in rows]
    pooled = DEFAULT_EFFICIENCY.te_small_kernel_traffic
    return dict(zip(letters, solve(matrix, [1.0] * len(rows), [pooled] * len(letters)), strict=True))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the rows and the fit here")
    args = parser.parse_args(argv)
    rows = [r for r in observations() if r["seconds"] > 0]
    traffic = fit(rows)
    pooled = DEFAULT_EFFICIENCY.te_small_kernel_traffic

    def error(r: dict, per: dict[str, float] | None) -> float:
        planned = sum(u * (per[x] if per else pooled) for x, u in r["units"].items())
        return planned / r["seconds"] - 1

    per_letter = statistics.median(abs(error(r, traffic)) for r in rows)
    one = statistics.median(abs(error(r, None)) for r in rows)
    print(f"{len(rows)} profiled TE runs on one stage (hidden >= {MIN_HIDDEN})")
    print("traffic per byte of saved activations: " + ", ".join(f"{x} {v:.1f}" for x, v in traffic.items())
          + f" (pooled {pooled})")
    print(f"median |error| on the small kernels' seconds: per letter {per_letter:.1%}, pooled {one:.1%}")
    if args.json:
        args.json.write_text(json.dumps({"traffic": traffic, "pooled": pooled, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
