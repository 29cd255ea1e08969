"""`megacpp calibrate`: fit a cluster's per-block overheads from measured runs.

The step-time model (planner/cost/step.py) is, on the busiest pipeline rank,

    step = sum over (m + (p-1)/v) micro-batch slots of per-micro-batch time + exposed communication
    GPU time  = matmul time + softmax time + traffic x small_kernel_seconds(blocks)
    host time = sum over blocks of overhead(letter)
    per-micro-batch time = GPU time + host time            (local modules)
                         = the longer of GPU and host time (Transformer Engine), plus
                           Efficiency.te_sync_exposed of the shorter on ranks with E blocks
                           (the MoE dispatcher's host synchronisation)

with matmul and softmax time from the preset's measured kernel-rate table (planner/cost/kernel_rates.py;
FLOPs at MAMF x matmul and bytes at HBM x hbm where a preset has none). Everything but the
per-letter overheads and the small kernels' traffic comes from the tables, the hardware preset and
the formulas; the overheads (host work, kernel launches, the MoE dispatcher's synchronisation)
and the small kernels' GPU time are what a run measures beyond them. The local modules' overheads
also hold their small kernels (their traffic is 0); under TE the small kernels are a term of
their own and the host runs ahead of the GPU (cost.host.exposed_host_seconds). `fit` solves them by
least squares on relative error, keeping them non-negative; `leave_one_out` reports how well each
run is predicted by a fit that did not see it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from megacpp.planner.calibrate.lstsq import separable, solve
from megacpp.planner.calibrate.profile import check_written, profile_document
from megacpp.planner.calibrate.reports import Observation, observe
from megacpp.planner.cost.coefficients import DEFAULT_EFFICIENCY, Efficiency
from megacpp.planner.cost.host import exposed_host_seconds
from megacpp.planner.errors import PlanError

SMALL = ("small kernels",)  # the fit's column for Efficiency.traffic, beside the letters' groups


def tied(observations: list[Observation]) -> list[tuple[str, ...]]:
    """The block letters grouped by their unit columns: letters whose units are proportional in
    every run (A and D in runs of dense (AD) layers only) cannot be told apart by any fit, so they
    share one overhead per block."""
    letters = sorted({letter for o in observations for letter in o.units})
    groups: dict[tuple[float, ...], list[str]] = {}
    for letter in letters:
        column = [o.units.get(letter, 0.0) for o in observations]
        top = max(column)
        groups.setdefault(tuple(round(u / top, 9) for u in column), []).append(letter)
    return [tuple(g) for g in groups.values()]


def _columns(observations: list[Observation]) -> list[tuple[str, ...]]:
    """What a fit solves for: one overhead per group of tied letters, and the small kernels' traffic."""
    return tied(observations) + ([SMALL] if any(o.small_units for o in observations) else [])


def _units(o: Observation, column: tuple[str, ...]) -> float:
    return o.small_units if column == SMALL else sum(o.units.get(letter, 0.0) for letter in column)


def determined(observations: list[Observation], eff: Efficiency = DEFAULT_EFFICIENCY) -> bool:
    """Whether the runs pin every (tied) letter's overhead and the small kernels' traffic down,
    rather than only combinations. Under Transformer Engine, with `eff` the fit: the traffic by
    the GPU-bound runs, and every letter's overhead by the host-bound ones."""
    if observations and observations[0].te:
        host = [o for o in observations if host_bound(o, eff)]
        gpu = [o for o in observations if o not in host]
        letters = {letter for o in observations for letter in o.units}
        return (any(o.small_units for o in gpu) and letters <= {letter for o in host for letter in o.units}
                and determined([replace(o, small_units=0.0, te=False) for o in host]))
    columns = _columns(observations)
    rows = [[_units(o, c) / o.measured_seconds for c in columns] for o in observations]
    return len(observations) >= len(columns) and separable(rows)


def fit(observations: list[Observation], base: Efficiency = DEFAULT_EFFICIENCY) -> Efficiency:
    """Per-letter overheads and the small kernels' traffic that best reproduce the runs, by least
    squares on relative error, non-negative; tied letters (see `tied`) get one shared overhead."""
    if len(observations) < 2:
        raise PlanError("calibrate needs at least two measured runs")
    te = observations[0].te
    if any(o.te != te for o in observations):
        raise PlanError("calibrate runs with and without Transformer Engine separately; their overheads differ")
    return _fit_overlapped(observations, base) if te else _fit_added(observations, base)


def _nonnegative(observations: list[Observation], free: list[tuple[str, ...]], excess: Callable[[Observation], float],
                 prior: dict[tuple[str, ...], float]) -> dict[tuple[str, ...], float]:
    """Values per column minimising the relative error of excess(o) = sum of units x value;
    negative ones are clamped at zero (left out of the answer) and the rest refitted."""
    while free:
        rows = [[_units(o, c) / o.measured_seconds for c in free] for o in observations]
        rhs = [excess(o) / o.measured_seconds for o in observations]
        values = dict(zip(free, solve(rows, rhs, [prior[c] for c in free]), strict=True))
        negative = [c for c, v in values.items() if v < 0]
        if not negative:
            return values
        free = [c for c in free if c not in negative]
    return {}


def _prior(base: Efficiency, group: tuple[str, ...], te: bool) -> float:
    return base.traffic(te) if group == SMALL else sum(base.overhead(letter, te) for letter in group) / len(group)


def _with(base: Efficiency, te: bool, overheads: dict[str, float], traffic: float) -> Efficiency:
    table = "te_block_overhead_s" if te else "block_overhead_s"
    merged = {**dict(getattr(base, table)), **overheads}
    return replace(base, **{table: tuple(sorted(merged.items())),
                            "te_small_kernel_traffic" if te else "small_kernel_traffic": traffic})


def _fit_added(observations: list[Observation], base: Efficiency) -> Efficiency:
    """Local modules: measured - base = sum units x overhead + small units x traffic."""
    free = _columns(observations)
    if len(observations) < len(free):
        kinds = ", ".join("=".join(g) for g in free)
        raise PlanError(f"calibrate: {len(observations)} runs cannot fit {len(free)} block kinds ({kinds}); add runs")
    values = _nonnegative(observations, free, lambda o: o.measured_seconds - o.base_seconds,
                          {g: _prior(base, g, False) for g in free})
    traffic = values.pop(SMALL, 0.0)
    fitted = {**{letter: 0.0 for o in observations for letter in o.units}, **{letter: v for g, v in values.items() for letter in g}}
    return _with(base, False, fitted, traffic)


def host_bound(o: Observation, eff: Efficiency) -> bool:
    """Whether the run's host time exceeds its GPU time (cost.host.exposed_host_seconds)."""
    return _host_seconds(o, eff) > _gpu_seconds(o, eff)


def _fit_overlapped(observations: list[Observation], base: Efficiency) -> Efficiency:
    """Transformer Engine: a run takes the longer of its GPU time (compute + small units x
    traffic) and its host time (sum of units x overhead), plus communication. The GPU-bound runs
    fit the traffic, the host-bound ones the overheads; which run is which follows the fit, so it
    is refitted until the split repeats, and the split whose fit reproduces the runs best is kept.
    The split starts from `base`'s values; letters no host-bound run has keep the values they had
    (at first `base`'s): their host time hides behind the GPU, so the runs say nothing of it."""
    eff, best, splits = base, None, set()
    while True:
        split = tuple(host_bound(o, eff) for o in observations)
        if split in splits:
            break
        splits.add(split)
        gpu = [o for o, h in zip(observations, split, strict=True) if not h]
        host = [o for o, h in zip(observations, split, strict=True) if h]
        # the synchronised share (exposed_host_seconds) couples the two fits: a GPU-bound run
        # shows some host time, a host-bound one some GPU time; solved to a fixed point
        for _ in range(100):
            current, eff = eff, _refit_split(gpu, host, eff, base)
            if _settled(eff, current):
                break
        error = sum((predict(o, eff) / o.measured_seconds - 1) ** 2 for o in observations)
        if best is None or error < best[0]:
            best = (error, eff)
    return best[1] if best else base


def _refit_split(gpu: list[Observation], host: list[Observation], eff: Efficiency, base: Efficiency) -> Efficiency:
    """One pass of the TE fit for a fixed split: the traffic from the GPU-bound runs (less the
    synchronised share of their host time at `eff`), then the overheads from the host-bound ones
    (less the synchronised share of their GPU time at that traffic)."""
    traffic = eff.traffic(True)
    if any(o.small_units for o in gpu):
        def gpu_excess(o: Observation) -> float:
            return o.measured_seconds - o.base_seconds - _synced(o, eff) * _host_seconds(o, eff)
        traffic = _nonnegative(gpu, [SMALL], gpu_excess, {SMALL: traffic}).get(SMALL, 0.0)
    overheads: dict[str, float] = {}
    if host:
        groups = tied(host)
        priced = _with(base, True, dict(eff.te_block_overhead_s), traffic)

        def host_excess(o: Observation) -> float:
            return o.measured_seconds - o.base_seconds + o.compute_seconds - _synced(o, priced) * _gpu_seconds(o, priced)
        values = _nonnegative(host, groups, host_excess, {g: _prior(eff, g, True) for g in groups})
        overheads = {letter: values.get(g, 0.0) for g in groups for letter in g}
    return _with(base, True, {**dict(eff.te_block_overhead_s), **overheads}, traffic)


def _settled(eff: Efficiency, before: Efficiency) -> bool:
    """Whether a pass of _refit_split left the overheads and the traffic where they were."""
    return (all(abs(a - b) <= 1e-12 for (_, a), (_, b) in zip(eff.te_block_overhead_s, before.te_block_overhead_s, strict=True))
            and abs(eff.traffic(True) - before.traffic(True)) <= 1e-9)


def _gpu_seconds(o: Observation, eff: Efficiency) -> float:
    return o.compute_seconds + o.small_units * eff.traffic(o.te)


def _host_seconds(o: Observation, eff: Efficiency) -> float:
    return sum(units * eff.overhead(letter, o.te) for letter, units in o.units.items())


def _synced(o: Observation, eff: Efficiency) -> float:
    """Efficiency.te_sync_exposed on runs whose busiest rank has E blocks, else 0."""
    return eff.te_sync_exposed if o.units.get("E") else 0.0


def predict(o: Observation, eff: Efficiency) -> float:
    gpu = _gpu_seconds(o, eff)
    return o.base_seconds - o.compute_seconds + gpu + exposed_host_seconds(gpu, _host_seconds(o, eff), o.te, _synced(o, eff))


def leave_one_out(observations: list[Observation], base: Efficiency = DEFAULT_EFFICIENCY) -> list[dict[str, Any]]:
    """Each run predicted by a fit on all the others (None where the others cannot be fitted)."""
    rows = []
    for i, o in enumerate(observations):
        try:
            p: float | None = predict(o, fit(observations[:i] + observations[i + 1 :], base))
        except PlanError:
            p = None
        rows.append({"name": o.name, "measured_s": round(o.measured_seconds, 4),
                     "predicted_s": None if p is None else round(p, 4),
                     "error": None if p is None else round(p / o.measured_seconds - 1, 4)})
    return rows


# the synchronised shares (Efficiency.te_sync_exposed) calibrate tries for a cluster's MoE runs
SYNC_SHARES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
# the shares' leave-one-out refits grow as the square of the runs (63 TE runs take 9 s, 252 take 95 s);
# the committed campaigns hold at most 116 runs of one cluster and backend
MAX_RUNS = 256


def sync_share(observations: list[Observation]) -> tuple[float | None, list[dict[str, Any]]]:
    """The share of the shorter of host and GPU time that shows on this cluster's MoE ranks under
    TE (Efficiency.te_sync_exposed): of SYNC_SHARES, the one whose fit predicts the runs left out
    one at a time best (lowest median error; the smaller share on a tie), with those predictions.
    None (the shipped share stays) where no run has E blocks, or under the local modules, where
    host time adds whole."""
    if len(observations) < 3 or not observations[0].te or not any(o.units.get("E") for o in observations):
        return None, leave_one_out(observations) if len(observations) > 2 else []
    best: tuple[float, float, list[dict[str, Any]]] | None = None
    for share in SYNC_SHARES:
        rows = leave_one_out(observations, replace(DEFAULT_EFFICIENCY, te_sync_exposed=share))
        errors = sorted(abs(r["error"]) for r in rows if r["error"] is not None)
        median = errors[len(errors) // 2] if errors else float("inf")
        if best is None or median < best[0]:
            best = (median, share, rows)
    assert best is not None
    return best[1], best[2]


def calibrate(runs: list[dict[str, Any]], sources: list[str] | None = None) -> dict[str, Any]:
    """The profile document: fitted overheads (and, for MoE runs under TE, the synchronised
    share), fit residuals and leave-one-out errors. `sources[i]`, where given, names the file
    runs[i] came from, for errors about it."""
    if len(runs) < 2:
        raise PlanError(f"calibrate needs at least two measured runs, got {len(runs)}; pass run reports "
                        "(report.json from `megacpp launch --engine megacpp`, or a gpu_runs file)")
    if len(runs) > MAX_RUNS:
        raise PlanError(f"calibrate fits at most {MAX_RUNS} runs at a time, got {len(runs)}; pass one cluster's reports")
    if sources is not None and len(sources) != len(runs):
        raise ValueError(f"{len(sources)} sources for {len(runs)} runs")
    observations = [observe(r, sources[i] if sources else None, i) for i, r in enumerate(runs)]
    clusters = sorted({o.cluster for o in observations})
    if len(clusters) > 1:
        raise PlanError(f"calibrate one cluster at a time; these runs span {', '.join(clusters)}")
    share, held_out = sync_share(observations)  # fit refuses fewer than two runs
    eff = fit(observations, DEFAULT_EFFICIENCY if share is None else replace(DEFAULT_EFFICIENCY, te_sync_exposed=share))
    te = observations[0].te
    bound = [te and host_bound(o, eff) for o in observations]  # under TE the overheads come from the host-bound runs
    fitted_runs = [o for o, b in zip(observations, bound, strict=True) if b] if te else observations
    fitted_on = [
        {"name": o.name, "measured_s": round(o.measured_seconds, 4), "fitted_s": round(predict(o, eff), 4),
         "uncalibrated_s": round(predict(o, DEFAULT_EFFICIENCY), 4), **({"host_bound": b} if te else {})}
        for o, b in zip(observations, bound, strict=True)
    ]
    return check_written(profile_document(clusters[0], te, eff, share, tied=[list(g) for g in tied(fitted_runs) if len(g) > 1],
                                          determined=determined(observations, eff), fitted_on=fitted_on, leave_one_out=held_out))
