"""Run reports decoded into the step-time model's terms, for `megacpp calibrate` and the comparisons.

A report (`megacpp launch --engine megacpp`'s report.json, or one run of a gpu_runs file) carries
its spec, layout, the backend that actually ran and the measured step time; an Observation is
that run priced with no per-block overhead and no small-kernel traffic, beside the units those
are counted in, so a fit can solve for them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from megacpp.planner.cost.coefficients import DEFAULT_EFFICIENCY, REFERENCE_HOST_LAUNCH_US
from megacpp.planner.cost.host import gpu_repeats, host_repeats, host_units
from megacpp.planner.cost.step import estimate, small_kernel_seconds
from megacpp.planner.errors import PlanError
from megacpp.planner.plan import make_context, with_backend
from megacpp.planner.search.layout import Layout
from megacpp.planner.search.stages import assign_stages
from megacpp.planner.spec.loading import spec_from_dict
from megacpp.planner.spec.models import Spec

NO_OVERHEAD = replace(DEFAULT_EFFICIENCY, block_overhead_s=(), te_block_overhead_s=(), small_kernel_traffic=0.0,
                      te_small_kernel_traffic=0.0)


@dataclass(frozen=True)
class Observation:
    """One measured run in the model's terms, on its busiest pipeline rank."""

    name: str
    cluster: str
    te: bool  # the run used Transformer Engine modules
    base_seconds: float  # the model's step time with no block overhead
    units: dict[str, float]  # block x micro-batch slots per letter on the busiest rank (x cost.host.host_repeats)
    measured_seconds: float
    small_units: float = 0.0  # cost.step.small_kernel_seconds of the busiest rank's blocks, x the same slots
    compute_seconds: float = 0.0  # the matmul and softmax part of base_seconds (the rest is communication)


def run_spec(run: dict[str, Any]) -> Spec:
    """A run report's spec with the backend that actually ran (its "backend" record). Reports
    without `fusions_used` predate backend.fusions: megacpp's runtime ran without Megatron's
    fusions then, and Megatron-LM's launches (engine "megatron-lm") with its defaults. A spec that
    names no host class (cluster.host_launch_us) ran on the hosts the per-block host time was
    measured on, REFERENCE_HOST_LAUNCH_US: the runtime's committed runs."""
    spec = spec_from_dict(run["spec"], source=f"run {run.get('name', '?')} spec")
    if spec.cluster.host_launch_us is None:
        spec = spec.model_copy(update={"cluster": spec.cluster.model_copy(update={"host_launch_us": REFERENCE_HOST_LAUNCH_US})})
    backend = run.get("backend") or {}
    te = backend.get("transformer_engine_used", spec.backend.transformer_engine)
    fused = backend.get("fusions_used", run.get("engine") == "megatron-lm")
    return with_backend(spec, transformer_engine=bool(te), fusions=bool(fused))


def observe(run: dict[str, Any]) -> Observation:
    """Decompose one run report (with its spec) into the model's terms, for the backend that ran."""
    if not isinstance(run, dict):
        raise PlanError(f"not a run report: expected a JSON object with spec, layout and measured_step_seconds, got {str(run)[:60]!r}")
    for key in ("spec", "layout", "measured_step_seconds"):
        if run.get(key) is None:
            raise PlanError(f"run report {run.get('name', '?')}: missing '{key}'; reports from `megacpp launch --engine megacpp` carry it")
    spec = run_spec(run)
    ctx = make_context(spec)
    lay = Layout.from_dict(run["layout"])
    _, stages = assign_stages(ctx, lay.pp, lay.vpp)
    est = estimate(ctx, lay, stages, NO_OVERHEAD)
    slots = lay.num_microbatches + (lay.pp - 1) / lay.vpp
    blocks = max(("".join(s.blocks for s in stages if s.pp_rank == p) for p in range(lay.pp)), key=len)  # the busiest rank's
    return Observation(
        name=str(run.get("name") or spec.name),
        cluster=ctx.cluster.name,
        te=spec.backend.transformer_engine,
        base_seconds=est.step_seconds,
        units={key: n * slots * host_repeats(spec.training.recompute, ctx.te) for key, n in host_units(ctx, lay, blocks).items()},
        measured_seconds=float(run["measured_step_seconds"]),
        small_units=small_kernel_seconds(ctx, lay, blocks) * slots * gpu_repeats(spec.training.recompute),
        compute_seconds=est.compute_seconds,
    )
