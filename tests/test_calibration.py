"""`megacpp calibrate`: the fit recovers known factors, and `plan --profile` uses them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from megacpp.planner.calibration import (
    Observation,
    calibrate,
    efficiency_from_profile,
    fit,
    leave_one_out,
    predict,
)
from megacpp.planner.cost import Efficiency
from megacpp.planner.errors import PlanError
from tests.conftest import ROOT

GPU_RUNS = ROOT / "benchmarks" / "results" / "gpu_runs_h200x4.json"


def _synthetic(truth: Efficiency) -> list[Observation]:
    shapes = [(0.05, 200, 0.01), (0.2, 100, 0.0), (0.1, 900, 0.02), (0.4, 300, 0.005), (0.02, 1200, 0.0)]
    return [
        Observation(f"run{i}", "h200-sxm-8", c, u, f, c / truth.matmul + u * truth.block_overhead_s + f)
        for i, (c, u, f) in enumerate(shapes)
    ]


def test_fit_recovers_known_factors_and_predicts_held_out_runs():
    truth = Efficiency(matmul=0.45, block_overhead_s=4e-4)
    obs = _synthetic(truth)
    got = fit(obs)
    assert got.matmul == pytest.approx(0.45, rel=1e-6)
    assert got.block_overhead_s == pytest.approx(4e-4, rel=1e-6)
    assert all(abs(row["error"]) < 1e-6 for row in leave_one_out(obs))
    assert predict(obs[0], got) == pytest.approx(obs[0].measured_seconds)


def test_fit_needs_runs_that_separate_the_factors():
    with pytest.raises(PlanError, match="at least two"):
        fit(_synthetic(Efficiency())[:1])
    same = [Observation("a", "x", 0.1, 100, 0, 0.3), Observation("b", "x", 0.2, 200, 0, 0.6)]
    with pytest.raises(PlanError, match="do not separate"):
        fit(same)


def test_calibrate_the_committed_gpu_runs():
    runs = json.loads(GPU_RUNS.read_text())["runs"]
    profile = calibrate(runs)
    assert profile["cluster"] == "h200-sxm-8" and len(profile["fitted_on"]) == len(runs) >= 8
    assert profile["matmul"] > 0 and profile["block_overhead_s"] >= 0
    # the uncalibrated model is optimistic on these launch-bound runs; the fit moves every run towards them
    for row in profile["fitted_on"]:
        assert row["uncalibrated_s"] < row["measured_s"]
    err_before = sum(abs(r["uncalibrated_s"] / r["measured_s"] - 1) for r in profile["fitted_on"])
    err_after = sum(abs(r["fitted_s"] / r["measured_s"] - 1) for r in profile["fitted_on"])
    assert err_after < err_before


def test_profile_round_trip_and_bad_profiles():
    profile = calibrate(json.loads(GPU_RUNS.read_text())["runs"])
    eff = efficiency_from_profile(json.loads(json.dumps(profile)))
    assert eff.matmul == pytest.approx(profile["matmul"])
    with pytest.raises(PlanError, match="not a megacpp cluster profile"):
        efficiency_from_profile({"schema": "other"})


def test_cli_calibrate_then_plan_with_profile(tmp_path):
    cli = [sys.executable, "-m", "megacpp.runtime.cli"]
    prof = tmp_path / "h200.json"
    done = subprocess.run([*cli, "calibrate", str(GPU_RUNS), "--out", str(prof)], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "left-out error" in done.stdout
    spec = str(ROOT / "benchmarks" / "gpu" / "specs" / "dense-tp2.yaml")
    plain = json.loads(subprocess.run([*cli, "plan", spec, "--json"], capture_output=True, text=True, cwd=ROOT).stdout)
    tuned = json.loads(subprocess.run([*cli, "plan", spec, "--json", "--profile", str(prof)], capture_output=True, text=True, cwd=ROOT).stdout)
    assert tuned["candidates"][0]["time"]["step_seconds"] > plain["candidates"][0]["time"]["step_seconds"]
    bad = subprocess.run([*cli, "plan", spec, "--profile", str(tmp_path / "missing.json")], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 1 and "no such cluster profile" in bad.stderr
