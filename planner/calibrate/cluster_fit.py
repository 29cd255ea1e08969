"""`megacpp calibrate TABLE`: fit a few named cluster coefficients to a system's own measured runs.

The coefficients are Cluster fields that carry to any layout on the same system (PROFILE_FIELDS):

    matmul_rate_scale  the sustained matmul rate over what the preset prices (kernel-rate table or MAMF)
    host_launch_us     the host class: how fast the host issues GPU work (host time under TE follows it)
    nic_busbw_gbps     the inter-node bus bandwidth per GPU

A coefficient is fitted only where the rows pin it down: some row's step must move with it
(its elasticity, d log step / d log coefficient over a factor of 2 either way, at least
MIN_EFFECT), in a way the coefficients already chosen cannot mimic (the part of its elasticities
across rows outside theirs at least MIN_EFFECT somewhere), and no more coefficients than rows
less one (one row, one coefficient). The rest keep the preset's values, each with the reason.
The fit minimises, within the bounds, the sum over rows of a robust loss of the log error
log(planned step / measured step): squared below SCALE (5%), absolute beyond it (soft L1), so a
row mispriced by terms the fit does not hold moves the coefficients as one vote, not by the
square of its error. It is solved by iteratively reweighted Gauss-Newton steps in log space.
Each row is also predicted by a fit of the other rows alone (leave-one-out; in MAX_FOLDS folds
beyond MAX_FOLDS rows): where that error is no better than the uncalibrated one, the rows do not
pin the coefficients down beyond their other errors.
"""

from __future__ import annotations

import math
from typing import Any

from megacpp.planner.calibrate.lstsq import solve
from megacpp.planner.calibrate.profile import PROFILE_SCHEMA
from megacpp.planner.calibrate.table import MeasuredRun
from megacpp.planner.cost.step import estimate
from megacpp.planner.errors import PlanError
from megacpp.planner.spec.clusters import PROFILE_FIELDS

# what each coefficient is, in the table calibrate prints, and its unit
MEANING = {
    "matmul_rate_scale": ("x", "sustained matmul rate over the preset's"),
    "host_launch_us": ("us", "host class: time per tiny CUDA op"),
    "nic_busbw_gbps": ("GB/s", "inter-node bus bandwidth per GPU"),
}
# the order in which coefficients are considered where their effects tie
ORDER = ("matmul_rate_scale", "host_launch_us", "nic_busbw_gbps")
# the least elasticity (percent of step per percent of coefficient) that lets rows pin a coefficient
MIN_EFFECT = 0.05
MAX_ITERATIONS = 25
MAX_FOLDS = 20  # leave-one-out up to this many rows, then this many folds
SCALE = 0.05  # log errors below this weigh as in least squares, above it as in least absolute error


def step_seconds(run: MeasuredRun, values: dict[str, float]) -> float:
    """The row's planned step with the cluster coefficients `values` in place of its own."""
    key = tuple(sorted(values.items()))
    if key not in run.planned:
        run.planned[key] = estimate(run.ctx.with_rates(values), run.layout, run.stages).step_seconds
    return run.planned[key]


def effects(runs: list[MeasuredRun], at: dict[str, float]) -> dict[str, list[float]]:
    """Each row's elasticity of its step to each coefficient: the secant over half to twice
    the value at `at` (within its bounds), so that a host hidden behind the GPU at `at` but
    exposed at twice it still shows."""
    out = {}
    for name, (low, high) in PROFILE_FIELDS.items():
        lo, hi = max(at[name] / 2, low), min(at[name] * 2, high)
        out[name] = [math.log(step_seconds(r, {**at, name: hi}) / step_seconds(r, {**at, name: lo})) / math.log(hi / lo)
                     for r in runs]
    return out


def identifiable(runs: list[MeasuredRun], at: dict[str, float]) -> tuple[list[str], dict[str, str]]:
    """The coefficients these rows pin down, and why each other one is not fitted."""
    effect = effects(runs, at)
    biggest = {name: max(abs(e) for e in effect[name]) for name in ORDER}
    chosen: list[str] = []
    basis: list[list[float]] = []  # orthonormal, spanning the chosen coefficients' effects
    reasons: dict[str, str] = {}
    for name in sorted(ORDER, key=lambda n: -round(biggest[n], 3)):
        column = effect[name]
        for b in basis:
            dot = sum(x * y for x, y in zip(column, b, strict=True))
            column = [x - dot * y for x, y in zip(column, b, strict=True)]
        alone = max(abs(x) for x in column)
        if name == "nic_busbw_gbps" and all(r.ctx.cluster.nodes == 1 for r in runs):
            reasons[name] = "no row spans nodes: nothing crosses the NIC"
        elif name == "host_launch_us" and not any(r.ctx.te for r in runs):
            reasons[name] = "no row runs Transformer Engine: the local modules' overheads do not follow the host class"
        elif biggest[name] < MIN_EFFECT:
            hidden = {"host_launch_us": ": the host hides behind the GPU", "nic_busbw_gbps": ": little crosses the NIC"}.get(name, "")
            reasons[name] = f"no row's step depends on it (at most {biggest[name]:.3f}% per 1%, needs {MIN_EFFECT}%){hidden}"
        elif alone < MIN_EFFECT:
            reasons[name] = (f"the rows' steps move with it as with {' and '.join(chosen)}: no fit tells them apart; "
                             "add rows where they differ")
        elif len(chosen) >= max(1, len(runs) - 1):
            reasons[name] = (f"{len(runs)} rows fit at most {max(1, len(runs) - 1)} coefficients (as many as rows would "
                             "reproduce any rows, leaving none to check the fit); add rows")
        else:
            chosen.append(name)
            norm = math.sqrt(sum(x * x for x in column))
            basis.append([x / norm for x in column])
    return [n for n in ORDER if n in chosen], reasons


def _log_errors(runs: list[MeasuredRun], values: dict[str, float]) -> list[float]:
    return [math.log(step_seconds(r, values) / r.measured_step_s) for r in runs]


def fit(runs: list[MeasuredRun], names: list[str], start: dict[str, float],
        initial: dict[str, float] | None = None) -> dict[str, float]:
    """The values of `names` (the rest held at `start`) that minimise the soft-L1 loss of the rows'
    log errors within PROFILE_FIELDS' bounds: reweighted Gauss-Newton in log space (each row
    weighted by the loss's slope over its error) from `initial` (default `start`), each step
    halved until the loss falls."""
    if not names:
        return {}
    bounds = [(math.log(PROFILE_FIELDS[n][0]), math.log(PROFILE_FIELDS[n][1])) for n in names]

    def at(x: list[float]) -> dict[str, float]:
        return {**start, **{n: math.exp(v) for n, v in zip(names, x, strict=True)}}

    def clamp(x: list[float]) -> list[float]:
        return [min(max(v, lo), hi) for v, (lo, hi) in zip(x, bounds, strict=True)]

    def loss(errors: list[float]) -> float:
        return sum(2 * SCALE**2 * (math.sqrt(1 + (e / SCALE) ** 2) - 1) for e in errors)

    x = clamp([math.log({**start, **(initial or {})}[n]) for n in names])
    r = _log_errors(runs, at(x))
    total = loss(r)
    for _ in range(MAX_ITERATIONS):
        jacobian = []
        for j, (_, hi) in enumerate(bounds):
            h = 0.01 if x[j] + 0.01 <= hi else -0.01
            moved = _log_errors(runs, at([v + (h if i == j else 0.0) for i, v in enumerate(x)]))
            jacobian.append([(a - b) / h for a, b in zip(moved, r, strict=True)])
        weights = [(1 + (e / SCALE) ** 2) ** -0.25 for e in r]
        rows = [[w * jacobian[j][i] for j in range(len(names))] for i, w in enumerate(weights)]
        rhs = [-w * e for w, e in zip(weights, r, strict=True)]
        # Levenberg-Marquardt damping: a coefficient no row moves at this point stays put
        for j in range(len(names)):
            scale = math.sqrt(1e-4 * sum(row[j] ** 2 for row in rows) + 1e-8)
            rows.append([scale if i == j else 0.0 for i in range(len(names))])
            rhs.append(0.0)
        step = solve(rows, rhs, [0.0] * len(names))
        for _ in range(10):
            trial = clamp([v + s for v, s in zip(x, step, strict=True)])
            tried = _log_errors(runs, at(trial))
            if loss(tried) < total - 1e-12:
                break
            step = [s / 2 for s in step]
        else:
            break
        change = max(abs(a - b) for a, b in zip(trial, x, strict=True))
        x, r, total = trial, tried, loss(tried)
        if change < 1e-4:  # 0.01% of every coefficient
            break
    return {n: v for n, v in at(x).items() if n in names}


def _error(measured: float, planned: float) -> float:
    """(planned tokens/s - measured) / measured, as the scale benchmark reports it (rounded)."""
    return round(measured / planned - 1, 4) + 0.0  # + 0.0: no "-0.0"


def leave_one_out(runs: list[MeasuredRun], start: dict[str, float], fitted: dict[str, float]) -> list[dict[str, Any]]:
    """Each row planned with the coefficients fitted without it: the rows not in its fold choose
    which coefficients they pin down and fit them, from the whole table's fit `fitted`. One row per
    fold up to MAX_FOLDS rows (leave-one-out); beyond, MAX_FOLDS folds of every MAX_FOLDS-th row,
    so that a table of many rows costs MAX_FOLDS fits."""
    folds = min(len(runs), MAX_FOLDS)
    out: list[dict[str, Any]] = [{"left_out_step_s": None, "error_left_out": None, "left_out_coefficients": {}} for _ in runs]
    for fold in range(folds if len(runs) > 1 else 0):
        others = [run for i, run in enumerate(runs) if i % folds != fold]
        names, _ = identifiable(others, start)
        values = fit(others, names, start, initial=fitted)
        for i in range(fold, len(runs), folds):
            planned = step_seconds(runs[i], {**start, **values})
            out[i] = {"left_out_step_s": round(planned, 4), "error_left_out": _error(runs[i].measured_step_s, planned),
                      "left_out_coefficients": {n: round(v, 4) for n, v in values.items()}}
    return out


def _at_bound(name: str, value: float) -> bool:
    """Whether a fitted value sits on its bound: the rows ask for more than the coefficient can
    physically explain, so something else in them is mispriced."""
    low, high = PROFILE_FIELDS[name]
    return value <= low * 1.001 or value >= high / 1.001


def _median(values: list[float]) -> float | None:
    ordered = sorted(abs(v) for v in values)
    n = len(ordered)
    return None if not n else round(ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2, 4)


def calibrate_table(runs: list[MeasuredRun]) -> dict[str, Any]:
    """The cluster profile of a table of measured runs of one system: the coefficients the rows pin
    down, fitted (the others as the preset has them, with the reason), each row's error before
    and after, and left out of the fit."""
    if not runs:
        raise PlanError("calibrate needs at least one measured run")
    cluster = runs[0].ctx.cluster
    start = {name: float(getattr(cluster, name)) for name in PROFILE_FIELDS}
    names, reasons = identifiable(runs, start)
    fitted = fit(runs, names, start)
    after = {**start, **fitted}
    held = leave_one_out(runs, start, fitted)
    rows = []
    for run, left in zip(runs, held, strict=True):
        before, now = step_seconds(run, {}), step_seconds(run, after)
        peak = estimate(run.ctx, run.layout, run.stages).peak_gib
        rows.append({
            "name": run.name,
            "nodes": run.ctx.cluster.nodes,
            "layout": run.layout.short(),
            "measured_step_s": round(run.measured_step_s, 4),
            "measured_tokens_per_s_per_gpu": round(run.tokens_per_step_per_gpu / run.measured_step_s, 1),
            "planned_step_s_before": round(before, 4),
            "error_before": _error(run.measured_step_s, before),
            "planned_step_s_after": round(now, 4),
            "error_after": _error(run.measured_step_s, now),
            **left,
            **({"measured_peak_gib": run.measured_peak_gib, "planned_peak_gib": round(peak, 2)}
               if run.measured_peak_gib is not None else {}),
        })
    coefficients = []
    for name in ORDER:
        unit, what = MEANING[name]
        value = after[name]
        # how far the fit moves without any one row: the coefficient's jackknife range
        spread = [r["left_out_coefficients"][name] for r in held if name in r["left_out_coefficients"]]
        coefficients.append({"name": name, "unit": unit, "what": what, "before": round(start[name], 4),
                             "after": round(value, 4), "moved": round(value / start[name] - 1, 4),
                             "fitted": name in fitted, **({"reason": reasons[name]} if name in reasons else {}),
                             **({"left_out_range": [min(spread), max(spread)]} if name in fitted and spread else {}),
                             **({"at_bound": True} if name in fitted and _at_bound(name, value) else {})})
    return {
        "schema": PROFILE_SCHEMA,
        "cluster": cluster.name,
        "fitted_from": "measured runs table",
        "cluster_coefficients": {name: round(value, 4) for name, value in fitted.items()},
        "fit": f"soft-L1 on the log error of the planned step (squared below {SCALE:.0%}, absolute beyond), within bounds",
        "coefficients": coefficients,
        "median_abs_error": {"before": _median([r["error_before"] for r in rows]),
                             "after": _median([r["error_after"] for r in rows]),
                             "left_out": _median([r["error_left_out"] for r in rows if r["error_left_out"] is not None])},
        "rows": rows,
    }
