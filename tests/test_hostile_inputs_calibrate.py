"""`megacpp calibrate` on hostile run reports: one line naming the run and the field, exit code 1,
no traceback; nothing impossible is fitted, and nothing non-finite reaches a profile."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from megacpp.planner.calibrate.fit import MAX_RUNS, calibrate
from megacpp.planner.calibrate.profile import PROFILE_SCHEMA, check_written
from megacpp.planner.calibrate.reports import observe
from megacpp.planner.errors import MAX_ERROR_CHARS, PlanError
from tests.conftest import ROOT, committed_gpu_runs, evidence_file

CLI = [sys.executable, "-m", "megacpp.runtime.cli"]
# eight local-module runs on one H200: calibrates in about a second
REPORT = evidence_file("gpu_runs_h200x1.json")
# five runs on 8 x H200, for a spec made 16 GPUs
EIGHT = evidence_file("gpu_runs_h200x8.json")


def _report(tmp_path: Path, change: Callable[[dict[str, Any]], object], source: Path = REPORT) -> Path:
    """A copy of a committed report whose second run `change` has edited."""
    doc = json.loads(source.read_text())
    change(doc["runs"][1])
    path = tmp_path / "runs.json"
    path.write_text(json.dumps(doc))
    return path


def _calibrate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, "calibrate", *args], capture_output=True, text=True, timeout=120, cwd=ROOT)


def _refused(result: subprocess.CompletedProcess[str], *words: str) -> str:
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    for word in words:
        assert word in result.stderr, result.stderr
    return result.stderr


def _set(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda run: run.__setitem__(key, value)


def _layout(**degrees: Any) -> Callable[[dict[str, Any]], None]:
    return lambda run: run["layout"].update(degrees)


@pytest.mark.parametrize(("change", "field"), [
    (_set("layout", "tp2"), "layout"),
    (_set("measured_step_seconds", "abc"), "measured_step_seconds"),
    (_set("measured_step_seconds", {}), "measured_step_seconds"),
    (_set("measured_step_seconds", 0), "measured_step_seconds"),
    (_set("measured_step_seconds", -5), "measured_step_seconds"),
    (_set("measured_step_seconds", float("inf")), "measured_step_seconds"),
    (_set("measured_step_seconds", float("nan")), "measured_step_seconds"),
    (_set("measured_step_seconds", True), "measured_step_seconds"),
    (_set("measured_step_seconds", 1e308), "measured_step_seconds"),
    (_set("measured_step_seconds", 1e-300), "measured_step_seconds"),
    (_set("backend", "x"), "backend"),
    (_set("backend", {"transformer_engine_used": "no"}), "backend.transformer_engine_used"),
    (_set("name", {"a": 1}), "name"),
    (_layout(tpp=2), "layout.tpp"),
    (_layout(tp="2"), "layout.tp"),
    (_layout(dp=0), "layout.dp"),
    (_layout(dp=4), "layout.dp"),
    (_layout(num_microbatches=0), "layout.num_microbatches"),
    (_layout(tp=10**30), "layout"),
], ids=["layout-string", "step-text", "step-object", "step-zero", "step-negative", "step-infinite", "step-nan",
        "step-bool", "step-huge", "step-tiny", "backend-string", "backend-te-text", "name-object", "layout-extra-key",
        "layout-text-degree", "layout-dp-zero", "layout-dp-wrong", "layout-no-microbatches", "layout-huge-tp"])
def test_a_malformed_report_is_one_line_naming_the_run_and_the_field(tmp_path: Path, change: Callable, field: str) -> None:
    out = tmp_path / "profile.json"
    run = "run #2" if field == "name" else "run 'moe-1gpu'"  # a run without a usable name by its place
    message = _refused(_calibrate(str(_report(tmp_path, change)), "--out", str(out)), f" {field} ", f"{run}: ")
    assert len(message) <= len("error: \n") + MAX_ERROR_CHARS
    assert not out.exists()


def test_a_layout_that_does_not_tile_the_spec_s_gpus_is_refused_by_the_planner_s_rule(tmp_path: Path) -> None:
    def sixteen_gpus_tp64_pp64(run: dict[str, Any]) -> None:
        run["spec"]["cluster"]["nodes"] = 2
        run["layout"].update(tp=64, pp=64)

    result = _calibrate(str(_report(tmp_path, sixteen_gpus_tp64_pp64, EIGHT)))
    _refused(result, "layout tp64 pp64", "on 16 GPU(s)", "model-parallel-divides-world")


def test_too_many_runs_are_refused_before_any_is_fitted(tmp_path: Path) -> None:
    doc = json.loads(REPORT.read_text())
    doc["runs"] = doc["runs"] * (MAX_RUNS // len(doc["runs"]) + 1)
    many = tmp_path / "many.json"
    many.write_text(json.dumps(doc))
    _refused(_calibrate(str(many)), f"at most {MAX_RUNS} runs")


def test_errors_name_the_file_a_run_came_from() -> None:
    runs = json.loads(REPORT.read_text())["runs"]
    runs[1] = {**runs[1], "measured_step_seconds": -5}
    with pytest.raises(PlanError, match=r"^gpu_runs_h200x1\.json: run 'moe-1gpu': measured_step_seconds must be"):
        calibrate(runs, [REPORT.name] * len(runs))
    with pytest.raises(PlanError, match=r"^runs\.json: run #2: measured_step_seconds"):
        observe({k: v for k, v in runs[1].items() if k != "name"}, "runs.json", 1)


def test_every_committed_run_report_passes_the_checks() -> None:
    """The checks refuse nothing the runtime measured, such as local-module runs with sequence
    parallelism (megatron-core refuses them; the runtime's sequence_parallel_norm adapter runs them)."""
    for name, run in committed_gpu_runs():
        observe(run, name)


@pytest.mark.parametrize(("changes", "field"), [
    ({"block_overhead_s": {"A": float("nan")}}, "block_overhead_s.A"),
    ({"fitted_on": [{"name": "r", "fitted_s": float("inf")}]}, "fitted_on.0.fitted_s"),
    ({"block_overhead_s": {"A": 1e3}}, "block_overhead_s"),
])
def test_a_profile_that_plan_would_refuse_is_never_returned(changes: dict, field: str) -> None:
    profile = {"schema": PROFILE_SCHEMA, "cluster": "h200-sxm-8", "transformer_engine": False,
               "block_overhead_s": {"A": 1e-3}, "small_kernel_traffic": 0.0, **changes}
    with pytest.raises(PlanError, match=field.replace(".", r"\.")) as exc:
        check_written(profile)
    assert "\n" not in str(exc.value)


def test_a_good_report_still_calibrates_to_strict_json(tmp_path: Path) -> None:
    out = tmp_path / "profile.json"
    result = _calibrate(str(REPORT), "--out", str(out))
    assert result.returncode == 0, result.stderr

    def no_constant(name: str) -> None:
        raise AssertionError(f"{name} in the written profile")

    profile = json.loads(out.read_text(), parse_constant=no_constant)
    assert len(profile["fitted_on"]) == 8 and all(v >= 0 for v in profile["block_overhead_s"].values())


def test_the_error_names_the_file_the_run_came_from(tmp_path: Path) -> None:
    path = _report(tmp_path, _set("measured_step_seconds", -5))
    _refused(_calibrate(str(REPORT), str(path)), f"{path}: run ", "measured_step_seconds")


def test_a_report_with_a_number_of_thousands_of_digits_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "big.json"
    path.write_text('{"runs": [' + "1" * 5000 + "]}")
    _refused(_calibrate(str(path)), str(path), "digits")


def test_tied_overheads_are_named_by_their_keys(tmp_path: Path) -> None:
    """One H100's TE runs cannot tell A, E and the experts' overheads apart: the report names those
    three keys, and the profile keeps them as a list of keys."""
    out = tmp_path / "profile.json"
    result = _calibrate(str(ROOT / "benchmarks/evidence/blind-te-step/results/gpu_runs_h100x1_te_blind.json"), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "A, E, expert come in the same proportion in every run" in result.stdout
    assert ["A", "E", "expert"] in json.loads(out.read_text())["tied"]
