"""Run reports decoded into the step-time model's terms, for `megacpp calibrate` and the comparisons.

A report (`megacpp launch --engine megacpp`'s report.json, or one run of a gpu_runs file) carries
its spec, layout, the backend that actually ran and the measured step time; an Observation is
that run priced with no per-block overhead and no small-kernel traffic, beside the units those
are counted in, so a fit can solve for them. A report is checked here, where it is read: a field
a fit cannot use or a layout its spec's GPUs could not have run is refused in one line naming the
run and the field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from pydantic import ValidationError

from megacpp.planner.cost.coefficients import DEFAULT_EFFICIENCY, REFERENCE_HOST_LAUNCH_US
from megacpp.planner.cost.host import gpu_repeats, host_repeats, host_units
from megacpp.planner.cost.step import estimate, small_kernel_seconds
from megacpp.planner.errors import PlanError, one_line
from megacpp.planner.plan import make_context, with_backend
from megacpp.planner.search.layout import Context, Layout
from megacpp.planner.search.stages import assign_stages
from megacpp.planner.spec.loading import shown, spec_from_dict
from megacpp.planner.spec.models import Spec
from megacpp.planner.validation import broken_rules, complete_layout

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


# a training step longer than a day is a unit slip or corruption, not a measurement; one under
# 100 us too: a step launches hundreds of kernels, each some microseconds of host time
MIN_STEP_SECONDS, MAX_STEP_SECONDS = 1e-4, 86400.0
# rules the megacpp runtime's adapters lift (runtime/worker/adapters.py), keyed by the adapter's
# name in the report's "adapters": such a run ran although stock megatron-core refuses its layout
LIFTED_BY_ADAPTER = {"sequence_parallel_norm": "sp-needs-te-norm"}
LAYOUT_DEGREES = ("tp", "pp", "vpp", "cp", "dp", "ep", "etp", "micro_batch_size", "num_microbatches")


def report_name(run: Any, source: str | None = None, index: int | None = None) -> str:
    """How errors name a run: its file (where known), then its name, else its position."""
    name = run.get("name") if isinstance(run, dict) else None
    run_id = repr(one_line(name, 60)) if isinstance(name, str) and name else f"#{index + 1}" if index is not None else "?"
    return f"{source}: run {run_id}" if source else f"run {run_id}"


def _refuse(where: str, field: str, problem: str) -> PlanError:
    return PlanError(f"{where}: {field} {problem}")


def check_report(run: Any, where: str) -> None:
    """Refuse a run report whose fields a fit cannot use (`where` names it): the wrong types, a
    step time that is not a positive finite number of seconds, a backend record of non-booleans."""
    if not isinstance(run, dict):
        raise PlanError(f"{where}: not a run report: expected a JSON object with spec, layout and measured_step_seconds, "
                        f"got {shown(run, 40)}")
    for key in ("spec", "layout", "measured_step_seconds"):
        if run.get(key) is None:
            raise _refuse(where, key, "is missing; reports from `megacpp launch --engine megacpp` carry it")
    for key in ("name", "engine"):
        if run.get(key) is not None and not isinstance(run[key], str):
            raise _refuse(where, key, f"must be a string, got {shown(run[key], 40)}")
    step = run["measured_step_seconds"]
    if (not isinstance(step, (int, float)) or isinstance(step, bool) or not math.isfinite(step)
            or not MIN_STEP_SECONDS <= step <= MAX_STEP_SECONDS):
        raise _refuse(where, "measured_step_seconds", f"must be a positive finite number of seconds (from "
                      f"{MIN_STEP_SECONDS:g} to {MAX_STEP_SECONDS:g}), got {shown(step, 40)}; remove the run or re-measure it")
    backend = run.get("backend")
    if backend is not None and not isinstance(backend, dict):
        raise _refuse(where, "backend", f"must be an object such as {{\"transformer_engine_used\": true}}, got {shown(backend, 40)}")
    for key, value in (backend or {}).items():
        if key in ("transformer_engine_used", "fusions_used") and value is not None and not isinstance(value, bool):
            raise _refuse(where, f"backend.{key}", f"must be true or false, got {shown(value, 40)}")
    adapters = run.get("adapters")
    if adapters is not None and not (isinstance(adapters, list) and all(isinstance(a, str) for a in adapters)):
        raise _refuse(where, "adapters", f"must be a list of adapter names, got {shown(adapters, 40)}")
    if not isinstance(run["layout"], dict):
        raise _refuse(where, "layout", f"must be an object of degrees such as {{\"tp\": 2, \"pp\": 1}}, got {shown(run['layout'], 40)}")


def run_spec(run: dict[str, Any], where: str | None = None) -> Spec:
    """A run report's spec with the backend that actually ran (its "backend" record). Reports
    without `fusions_used` predate backend.fusions: megacpp's runtime ran without Megatron's
    fusions then, and Megatron-LM's launches (engine "megatron-lm") with its defaults. A spec that
    names no host class (cluster.host_launch_us) ran on the hosts the per-block host time was
    measured on, REFERENCE_HOST_LAUNCH_US: the runtime's committed runs."""
    spec = spec_from_dict(run["spec"], source=f"{where or report_name(run)} spec")
    if spec.cluster.host_launch_us is None:
        spec = spec.model_copy(update={"cluster": spec.cluster.model_copy(update={"host_launch_us": REFERENCE_HOST_LAUNCH_US})})
    backend = run.get("backend") or {}
    te = backend.get("transformer_engine_used", spec.backend.transformer_engine)
    fused = backend.get("fusions_used", run.get("engine") == "megatron-lm")
    return with_backend(spec, transformer_engine=bool(te), fusions=bool(fused))


def run_layout(run: dict[str, Any], ctx: Context, where: str) -> Layout:
    """The report's layout, refused unless it is one its spec's world could have run: well formed,
    the planner's rules passed (but those the run's adapters lift), dp and the micro-batch count
    those its degrees give on the spec's GPUs and batch (validation.complete_layout)."""
    try:
        lay = Layout.from_dict(run["layout"])
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(["layout", *map(str, first["loc"])])
        raise _refuse(where, field, f"is refused ({one_line(first['msg'], 80).lower()}), got {shown(first.get('input'), 40)}; "
                      f"a layout holds the whole numbers {', '.join(LAYOUT_DEGREES)} (at least 1) and sp (true or false)") from None
    derived = complete_layout(ctx, tp=lay.tp, cp=lay.cp, pp=lay.pp, vpp=lay.vpp, ep=lay.ep, etp=lay.etp,
                              mbs=lay.micro_batch_size).model_copy(update={"sp": lay.sp})
    lifted = {LIFTED_BY_ADAPTER[a] for a in run.get("adapters") or () if a in LIFTED_BY_ADAPTER}
    broken = [b for b in broken_rules(ctx, derived) if b.split(":", 1)[0] not in lifted]
    if broken:
        more = f" (and {len(broken) - 1} more)" if len(broken) > 1 else ""
        raise _refuse(where, "layout", f"{one_line(lay.short(), 60)} is not a layout of its spec on {ctx.world} GPU(s): "
                      f"{one_line(broken[0], 200)}{more}; fix the report's layout or spec")
    gbs = ctx.spec.training.global_batch_size
    if lay.dp != derived.dp:
        raise _refuse(where, "layout.dp", f"is {lay.dp}, but tp x cp x pp = {lay.tp * lay.cp * lay.pp} on the spec's "
                      f"{ctx.world} GPUs gives dp {derived.dp}; fix the report's layout or spec")
    if lay.num_microbatches != derived.num_microbatches:
        raise _refuse(where, "layout.num_microbatches", f"is {lay.num_microbatches}, but global_batch_size {gbs} over "
                      f"micro_batch_size {lay.micro_batch_size} x dp {lay.dp} gives {derived.num_microbatches}; "
                      "fix the report's layout or spec")
    return lay


def observe(run: Any, source: str | None = None, index: int | None = None) -> Observation:
    """Decompose one run report (with its spec) into the model's terms, for the backend that ran;
    a report a fit cannot use is refused, naming `source` (its file), the run and the field."""
    where = report_name(run, source, index)
    check_report(run, where)
    spec = run_spec(run, where)
    ctx = make_context(spec)
    lay = run_layout(run, ctx, where)
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
