"""The cluster profile file: what `megacpp calibrate` writes and `megacpp plan --profile` reads.

From run reports it holds the fitted per-block overheads (`block_overhead_s`, ...); from a table of
measured runs the fitted cluster coefficients (`cluster_coefficients`: Cluster fields of
spec.clusters.PROFILE_FIELDS). A profile holds either or both; the schema is the same.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

from megacpp.planner.cost.coefficients import DEFAULT_EFFICIENCY, Efficiency
from megacpp.planner.errors import PlanError, SpecError, did_you_mean
from megacpp.planner.spec.clusters import PROFILE_FIELDS
from megacpp.planner.spec.loading import reject_non_finite

PROFILE_SCHEMA = "megacpp.profile/2"
# a block's host time per micro-batch is milliseconds; beyond this a profile is corrupt, not slow
MAX_OVERHEAD_S = 10.0
MAX_TRAFFIC = 1000.0


def _number(value: Any, low: float, high: float) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and low <= value <= high


def profile_document(cluster: str, te: bool, eff: Efficiency, share: float | None, *, tied: list[list[str]], determined: bool,
                     fitted_on: list[dict[str, Any]], leave_one_out: list[dict[str, Any]]) -> dict[str, Any]:
    """The profile of a fit `eff` of one cluster's runs: what a plan reads back (the overheads, the
    small kernels' traffic, the synchronised share where one was chosen) and the fit's report."""
    return {
        "schema": PROFILE_SCHEMA,
        "cluster": cluster,
        "transformer_engine": te,
        "block_overhead_s": {letter: round(v, 6) for letter, v in (eff.te_block_overhead_s if te else eff.block_overhead_s)},
        "small_kernel_traffic": round(eff.traffic(te), 4),
        # how host time and GPU time compose (cost.host.exposed_host_seconds)
        "composition": "longer of host and GPU" if te else "added",
        # the share of the shorter that adds on ranks with E blocks (cost.host.exposed_host_seconds),
        # chosen by the runs left out one at a time (calibrate.fit.sync_share)
        **({"synchronised_share": share} if share is not None else {}),
        "tied": tied,
        "determined": determined,
        "fitted_on": fitted_on,
        "leave_one_out": leave_one_out,
    }


def check_written(profile: dict[str, Any]) -> dict[str, Any]:
    """`profile` if it is strict JSON that `megacpp plan --profile` reads back; a fit of runs whose
    steps the model cannot reproduce can yield NaN or absurd overheads, which no plan should read."""
    try:
        reject_non_finite(profile, (), set())  # strict JSON holds no NaN or infinity
    except SpecError as exc:
        raise PlanError(f"calibrate: the fit gave {exc}; the runs' measured_step_seconds are not steps the model "
                        "can reproduce: check them, or calibrate without the odd runs") from None
    try:
        efficiency_from_profile(profile)
    except PlanError as exc:
        raise PlanError(f"calibrate: the fitted profile would be refused by `plan --profile` ({exc}); check the runs' "
                        "measured_step_seconds, or calibrate without the odd runs") from None
    return profile


def efficiency_from_profile(profile: dict[str, Any]) -> Efficiency:
    """The default factors with a profile's overheads, traffic and synchronised share in place."""
    if not isinstance(profile, dict) or profile.get("schema") != PROFILE_SCHEMA:
        raise PlanError(f"not a megacpp cluster profile: expected \"schema\": \"{PROFILE_SCHEMA}\" (made by `megacpp calibrate`)")
    if "block_overhead_s" not in profile and "cluster_coefficients" in profile:
        overheads: Any = {}  # a table's profile sets cluster coefficients only
    else:
        overheads = profile.get("block_overhead_s")
    if not isinstance(overheads, dict) or not all(_number(v, 0, MAX_OVERHEAD_S) for v in overheads.values()):
        raise PlanError(f"malformed cluster profile: 'block_overhead_s' must map block letters to seconds from 0 to {MAX_OVERHEAD_S:g}")
    te = bool(profile.get("transformer_engine"))
    traffic = profile.get("small_kernel_traffic", DEFAULT_EFFICIENCY.traffic(te))  # profiles made before it: the default
    if not _number(traffic, 0, MAX_TRAFFIC):
        raise PlanError(f"malformed cluster profile: 'small_kernel_traffic' must be a number from 0 to {MAX_TRAFFIC:g}")
    share = profile.get("synchronised_share", DEFAULT_EFFICIENCY.te_sync_exposed)  # profiles made before it: the default
    if not _number(share, 0, 1):
        raise PlanError("malformed cluster profile: 'synchronised_share' must be a number from 0 to 1")
    table = "te_block_overhead_s" if te else "block_overhead_s"
    merged = {**dict(getattr(DEFAULT_EFFICIENCY, table)), **{str(k): float(v) for k, v in overheads.items()}}
    return replace(DEFAULT_EFFICIENCY, **{table: tuple(sorted(merged.items())),
                                          "te_small_kernel_traffic" if te else "small_kernel_traffic": float(traffic),
                                          "te_sync_exposed": float(share)})


def check_profile_cluster(profile: dict[str, Any], cluster: str, source: str) -> None:
    """A profile prices the cluster its runs ran on; planning another with it would mislead."""
    fitted = profile.get("cluster")
    if fitted != cluster:
        raise PlanError(f"--profile {source}: fitted on cluster {fitted!r}, but the spec plans {cluster!r}; "
                        "calibrate with this cluster's runs, or plan without --profile")


def cluster_from_profile(profile: dict[str, Any]) -> dict[str, float]:
    """The Cluster fields a profile sets (`cluster_coefficients`; none in profiles from run reports)."""
    coefficients = profile.get("cluster_coefficients", {})
    if not isinstance(coefficients, dict):
        raise PlanError("malformed cluster profile: 'cluster_coefficients' must map cluster fields to numbers")
    for name, value in coefficients.items():
        if name not in PROFILE_FIELDS:
            raise PlanError(f"malformed cluster profile: 'cluster_coefficients': unknown field {str(name)[:40]!r}"
                            f"{did_you_mean(str(name), list(PROFILE_FIELDS))}; a profile sets {', '.join(PROFILE_FIELDS)}")
        low, high = PROFILE_FIELDS[name]
        if not _number(value, low, high):
            raise PlanError(f"malformed cluster profile: 'cluster_coefficients': {name} must be a number from {low:g} to {high:g}")
    return {str(k): float(v) for k, v in coefficients.items()}
