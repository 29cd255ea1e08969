"""`megacpp calibrate`: fit a cluster's efficiency factors from measured runs.

The step-time model is  step = compute / matmul + blocks * passes * overhead + exposed comm,
summed over the pipeline's (m + (p-1)/v) micro-batch slots on the busiest rank. Given measured
step times, `fit` solves the two factors (1/matmul, overhead) by least squares; `leave_one_out`
reports how well each run is predicted by a fit that did not see it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from megacpp.planner.cost import Efficiency, estimate
from megacpp.planner.errors import PlanError
from megacpp.planner.layout import Layout
from megacpp.planner.loading import spec_from_dict
from megacpp.planner.plan import make_context
from megacpp.planner.stages import assign_stages

PROFILE_SCHEMA = "megacpp.profile/1"
RAW = Efficiency(matmul=1.0, block_overhead_s=0.0)


@dataclass(frozen=True)
class Observation:
    name: str
    cluster: str
    compute_seconds: float  # at the cluster's best matmul rate (matmul = 1)
    launch_units: float  # block executions on the busiest rank per step
    fixed_seconds: float  # exposed communication, as modelled
    measured_seconds: float


def observe(run: dict[str, Any]) -> Observation:
    """Decompose one run report (with its spec) into the model's terms."""
    for key in ("spec", "layout", "measured_step_seconds"):
        if run.get(key) is None:
            raise PlanError(f"run report {run.get('name', '?')}: missing '{key}'; reports from `megacpp launch --engine megacpp` carry it")
    spec = spec_from_dict(run["spec"], source="run spec")
    ctx = make_context(spec)
    lay = Layout.from_dict(run["layout"])
    _, stages = assign_stages(ctx, lay.pp, lay.vpp)
    est = estimate(ctx, lay, stages, RAW)
    passes = 4 if spec.training.recompute == "full" else 3
    slots = lay.num_microbatches + (lay.pp - 1) / lay.vpp
    busiest = max(sum(len(s.blocks) for s in stages if s.pp_rank == p) for p in range(lay.pp))
    return Observation(
        name=str(run.get("name") or spec.name),
        cluster=ctx.cluster.name,
        compute_seconds=est.compute_seconds,
        launch_units=slots * busiest * passes,
        fixed_seconds=est.step_seconds - est.compute_seconds,
        measured_seconds=float(run["measured_step_seconds"]),
    )


def fit(observations: list[Observation]) -> Efficiency:
    """Least-squares (1/matmul, overhead) for measured - fixed = compute/matmul + units*overhead."""
    if len(observations) < 2:
        raise PlanError("calibrate needs at least two measured runs")
    sxx = sum(o.compute_seconds ** 2 for o in observations)
    syy = sum(o.launch_units ** 2 for o in observations)
    sxy = sum(o.compute_seconds * o.launch_units for o in observations)
    bx = sum(o.compute_seconds * (o.measured_seconds - o.fixed_seconds) for o in observations)
    by = sum(o.launch_units * (o.measured_seconds - o.fixed_seconds) for o in observations)
    det = sxx * syy - sxy * sxy
    if abs(det) < 1e-12 * max(sxx * syy, 1e-30):
        raise PlanError("calibrate: the runs do not separate compute from per-block overhead; add runs of other shapes")
    inv_matmul = (bx * syy - by * sxy) / det
    overhead = (by * sxx - bx * sxy) / det
    if inv_matmul <= 0 or overhead < 0:  # fall back to one factor each way, keeping both physical
        inv_matmul = max(bx / sxx, 1e-6) if overhead < 0 else 1e-6
        overhead = 0.0 if overhead < 0 else max(by / syy, 0.0)
    return Efficiency(matmul=1.0 / inv_matmul, block_overhead_s=overhead)


def predict(o: Observation, eff: Efficiency) -> float:
    return o.compute_seconds / eff.matmul + o.launch_units * eff.block_overhead_s + o.fixed_seconds


def leave_one_out(observations: list[Observation]) -> list[dict[str, Any]]:
    """Each run predicted by a fit on all the others."""
    rows = []
    for i, o in enumerate(observations):
        eff = fit(observations[:i] + observations[i + 1 :])
        p = predict(o, eff)
        rows.append({"name": o.name, "measured_s": round(o.measured_seconds, 4), "predicted_s": round(p, 4),
                     "error": round(p / o.measured_seconds - 1, 4)})
    return rows


def calibrate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The profile document: fitted factors, fit residuals and leave-one-out errors."""
    observations = [observe(r) for r in runs]
    clusters = sorted({o.cluster for o in observations})
    if len(clusters) > 1:
        raise PlanError(f"calibrate one cluster at a time; these runs span {', '.join(clusters)}")
    eff = fit(observations)
    return {
        "schema": PROFILE_SCHEMA,
        "cluster": clusters[0],
        "matmul": round(eff.matmul, 6),
        "block_overhead_s": round(eff.block_overhead_s, 9),
        "fitted_on": [
            {"name": o.name, "measured_s": round(o.measured_seconds, 4), "fitted_s": round(predict(o, eff), 4),
             "uncalibrated_s": round(o.compute_seconds / Efficiency().matmul + o.fixed_seconds, 4)}
            for o in observations
        ],
        "leave_one_out": leave_one_out(observations) if len(observations) > 2 else [],
    }


def efficiency_from_profile(profile: dict[str, Any]) -> Efficiency:
    if not isinstance(profile, dict) or profile.get("schema") != PROFILE_SCHEMA:
        raise PlanError(f"not a megacpp cluster profile: expected \"schema\": \"{PROFILE_SCHEMA}\" (made by `megacpp calibrate`)")
    try:
        return Efficiency(matmul=float(profile["matmul"]), block_overhead_s=float(profile["block_overhead_s"]))
    except (KeyError, TypeError, ValueError):
        raise PlanError("malformed cluster profile: needs numeric 'matmul' and 'block_overhead_s'") from None
