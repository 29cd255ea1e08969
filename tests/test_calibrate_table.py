"""`megacpp calibrate TABLE`: a table of a system's own measured runs fits the cluster coefficients
its rows pin down, says which it cannot, and the profile moves `plan --profile` as fitted."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megacpp.planner.calibrate.cluster_fit import calibrate_table, step_seconds
from megacpp.planner.calibrate.profile import cluster_from_profile, efficiency_from_profile
from megacpp.planner.calibrate.table import MAX_TABLE_ROWS
from megacpp.planner.cost.coefficients import DEFAULT_EFFICIENCY, DGX_HOST_LAUNCH_US
from megacpp.planner.errors import PlanError
from megacpp.runtime.cli.inputs import read_table
from tests.conftest import ROOT

DATA = Path(__file__).parent / "data" / "calibrate"
HEADER = "name,spec,nodes,tp,pp,ep,mbs,gbs,seq,step_s"
# layouts of the small MoE on 1 to 4 nodes of 8 H100: host-bound, matmul-bound and NIC-bound rows
ROWS = ["a,moe-small.yaml,1,1,1,8,1,64,2048", "b,moe-small.yaml,2,1,1,16,8,256,4096", "c,moe-small.yaml,2,2,2,4,4,256,4096",
        "d,moe-small.yaml,4,1,4,8,2,512,2048", "e,moe-small.yaml,1,2,1,4,8,64,8192", "f,moe-small.yaml,4,2,1,16,4,256,4096"]
# the system the synthetic rows are measured on: host 2x the DGX class, matmuls 10% slower, a slower NIC
TRUTH = {"host_launch_us": 7.8, "matmul_rate_scale": 0.9, "nic_busbw_gbps": 30.0}


def _table(tmp_path: Path, rows: list[str], truth: dict[str, float], name: str = "runs.csv") -> Path:
    """A CSV table of `rows` whose measured step is the plan's at the coefficients `truth`."""
    shutil.copy(DATA / "moe-small.yaml", tmp_path / "moe-small.yaml")
    path = tmp_path / name
    path.write_text("\n".join([HEADER, *(f"{r},1" for r in rows)]) + "\n")
    measured = [step_seconds(run, truth) for run in read_table(path)]
    path.write_text("\n".join([HEADER, *(f"{r},{s:.6f}" for r, s in zip(rows, measured, strict=True))]) + "\n")
    return path


def test_a_table_measured_at_known_coefficients_gives_them_back(tmp_path):
    profile = calibrate_table(read_table(_table(tmp_path, ROWS, TRUTH)))
    assert profile["cluster"] == "h100-sxm-8" and profile["fitted_from"] == "measured runs table"
    for name, value in TRUTH.items():
        assert profile["cluster_coefficients"][name] == pytest.approx(value, rel=2e-3)
    moved = {c["name"]: c for c in profile["coefficients"]}
    before = DGX_HOST_LAUNCH_US  # the h100-sxm-8 preset's host class
    assert moved["host_launch_us"]["before"] == before
    assert moved["host_launch_us"]["moved"] == pytest.approx(TRUTH["host_launch_us"] / before - 1, abs=0.01)
    assert all(abs(r["error_after"]) < 1e-3 and abs(r["error_left_out"]) < 5e-3 for r in profile["rows"])
    assert profile["median_abs_error"]["before"] > 0.1  # the preset's coefficients were off
    assert profile["median_abs_error"]["after"] < 1e-3


def test_a_trial_of_other_rates_prices_as_a_fresh_plan_on_that_cluster(tmp_path):
    """calibrate's trials share what does not follow from the rates (Context.with_rates): each
    must still price a row as a context made anew on the changed cluster does."""
    from megacpp.planner.cost.step import estimate
    from megacpp.planner.search.layout import Context

    for run in read_table(_table(tmp_path, ROWS, TRUTH)):
        for values in ({}, TRUTH, {"host_launch_us": 20.0, "matmul_rate_scale": 0.6, "nic_busbw_gbps": 5.0}):
            fresh = Context(run.ctx.spec, run.ctx.cluster.model_copy(update=values))
            assert step_seconds(run, values) == estimate(fresh, run.layout, run.stages).step_seconds
    with pytest.raises(ValueError, match="hbm_tbps"):
        run.ctx.with_rates({"hbm_tbps": 1.0})


def test_a_long_table_is_left_out_in_folds(tmp_path, monkeypatch):
    """Beyond MAX_FOLDS rows each row is predicted by a fit of the other folds: MAX_FOLDS fits, not one per row."""
    from megacpp.planner.calibrate import cluster_fit

    monkeypatch.setattr(cluster_fit, "MAX_FOLDS", 2)
    fits = []
    monkeypatch.setattr(cluster_fit, "fit", lambda runs, *args, **kw: fits.append(len(runs)) or {})
    rows = cluster_fit.leave_one_out(read_table(_table(tmp_path, ROWS, TRUTH)), dict(TRUTH), {})
    assert fits == [3, 3] and all(abs(r["error_left_out"]) < 1e-3 for r in rows)


def test_coefficients_the_rows_cannot_pin_keep_the_preset_with_the_reason(tmp_path):
    """One node only: nothing crosses the NIC, so it is not fitted; the host class still is."""
    truth = {"host_launch_us": 7.8}
    profile = calibrate_table(read_table(_table(tmp_path, [ROWS[0], ROWS[4], "g,moe-small.yaml,1,1,2,4,2,64,2048"], truth)))
    nic = next(c for c in profile["coefficients"] if c["name"] == "nic_busbw_gbps")
    assert not nic["fitted"] and "no row spans nodes" in nic["reason"] and nic["after"] == nic["before"]
    assert "nic_busbw_gbps" not in profile["cluster_coefficients"]
    assert profile["cluster_coefficients"]["host_launch_us"] == pytest.approx(7.8, rel=2e-3)
    # one host-bound row pins the host class alone; the matmuls hide behind the host there
    single = calibrate_table(read_table(_table(tmp_path, [ROWS[0]], truth, "one.csv")))
    assert list(single["cluster_coefficients"]) == ["host_launch_us"]
    assert all(c["fitted"] or c["reason"] for c in single["coefficients"])
    assert single["rows"][0]["error_left_out"] is None  # no other row to fit


def test_a_profile_from_a_table_moves_plan_as_fitted(tmp_path):
    cli = [sys.executable, "-m", "megacpp.runtime.cli"]
    table = _table(tmp_path, ROWS, TRUTH)
    prof = tmp_path / "mine.json"
    done = subprocess.run([*cli, "calibrate", str(table), "--out", str(prof)], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "COLUMNS": "200"})
    assert done.returncode == 0, done.stderr
    # the host class's row says how far it moved from the preset's, as fitted (to the 0.1% printed)
    line = next(row for row in done.stdout.splitlines() if "host_launch_us" in row)
    printed = float(re.search(r"([+-]\d+\.\d)%", line).group(1)) / 100
    assert printed == pytest.approx(TRUTH["host_launch_us"] / DGX_HOST_LAUNCH_US - 1, abs=2e-3)
    assert "left-out error" in done.stdout
    doc = json.loads(prof.read_text())
    assert efficiency_from_profile(doc) == DEFAULT_EFFICIENCY  # a table's profile sets no overheads
    assert cluster_from_profile(doc) == pytest.approx(TRUTH, rel=2e-3)
    # row b's layout, planned with and without the profile: the profile's step is the one measured
    spec = [str(tmp_path / "moe-small.yaml"), "--nodes", "2", "--json", "--top", "1", "--set", "parallel.tp=1", "--set", "parallel.pp=1",
            "--set", "parallel.ep=16", "--set", "training.micro_batch_size=8", "--set", "training.global_batch_size=256",
            "--set", "training.seq_length=4096"]
    plain = json.loads(subprocess.run([*cli, "plan", *spec], capture_output=True, text=True, cwd=ROOT).stdout)
    tuned = json.loads(subprocess.run([*cli, "plan", *spec, "--profile", str(prof)], capture_output=True, text=True, cwd=ROOT).stdout)
    row = next(r for r in doc["rows"] if r["name"] == "b")
    assert plain["candidates"][0]["time"]["step_seconds"] == pytest.approx(row["planned_step_s_before"], rel=1e-3)
    assert tuned["candidates"][0]["time"]["step_seconds"] == pytest.approx(row["measured_step_s"], rel=2e-3)
    assert tuned["profile"]["cluster"] == doc["cluster_coefficients"] and "cluster" not in plain["profile"]


def test_the_example_table_reads_specs_recipes_and_inline_models():
    runs = read_table(DATA / "example.yaml")
    assert [r.name for r in runs] == ["moe-small-2-nodes", "mixtral-recipe", "inline-dense"]
    assert runs[0].ctx.cluster.nodes == 2 and runs[0].layout.ep == 16 and runs[0].measured_peak_gib == 21.5
    assert runs[1].ctx.spec.name == "mixtral-8x7b" and runs[1].layout.pp == 4
    # tokens/s/GPU -> step: global batch x sequence / (GPUs x tokens/s/GPU)
    assert runs[2].measured_step_s == pytest.approx(32 * 2048 / (8 * 240000))


@pytest.mark.parametrize(("row", "message"), [
    ({"tpp": 1}, r"row 1 \(bad\): 'tpp': unknown key \(did you mean 'tp'\?\)"),
    ({"tp": "two"}, r"row 1 \(bad\): 'tp': must be a positive integer, got 'two'"),
    ({"tp": 0}, r"'tp': must be a positive integer, got 0"),
    ({"step_s": None}, r"'tokens_per_s_per_gpu': give the measured tokens_per_s_per_gpu or the measured step_s"),
    ({"tokens_per_s_per_gpu": 10}, r"give the measured tokens_per_s_per_gpu or the measured step_s \(exactly one\)"),
    ({"step_s": -1}, r"'step_s': must be a positive number, got -1"),
    ({"step_s": float("nan")}, r"'step_s': must be a positive number"),
    ({"precision": "fp6"}, r"'precision': must be one of bf16, fp8, fp4, got 'fp6'"),
    ({"ep": 3}, r"'layout': tp1 pp1 cp1 vpp1 ep3 .* is not legal \(ep-divides-experts"),
    ({"tp": 16}, r"'tp': tp x pp x cp = 16 does not divide the 8 GPUs of 1 nodes"),
    ({"spec": "missing.yaml"}, r"row 1 \(bad\): spec 'missing.yaml': no such file"),
    ({"spec": None}, r"'spec': give a spec"),
    ({"cluster": "h900"}, r"row 1 \(bad\): cluster.preset: unknown preset 'h900'"),
    ({"set": 5}, r"'set': must be key=value overrides"),
    ({"pp": None}, r"'pp': the layout needs tp and pp"),
])
def test_bad_rows_are_refused_naming_the_row_and_the_key(tmp_path, row, message):
    shutil.copy(DATA / "moe-small.yaml", tmp_path / "moe-small.yaml")
    good = {"name": "bad", "spec": "moe-small.yaml", "tp": 1, "pp": 1, "ep": 8, "step_s": 1.0}
    table = tmp_path / "t.yaml"
    table.write_text(json.dumps([{k: v for k, v in {**good, **row}.items() if v is not None}]))  # JSON is YAML
    with pytest.raises(PlanError, match=message):
        read_table(table)


def test_bad_tables_are_refused_in_one_line(tmp_path):
    def refused(text: str, suffix: str = ".csv") -> str:
        path = tmp_path / f"t{suffix}"
        path.write_text(text)
        with pytest.raises(PlanError) as info:
            read_table(path)
        assert "\n" not in str(info.value)
        return str(info.value)

    assert "no rows" in refused(HEADER + "\n")
    assert "more than 200 rows" in refused(HEADER + "\n" + "x,moe-small.yaml,1,1,1,8,1,64,2048,1\n" * (MAX_TABLE_ROWS + 1))
    assert "expected a list of rows" in refused("name: x\n", ".yaml")
    assert "invalid YAML" in refused("- [unclosed\n", ".yaml")
    assert "row 1: expected a mapping" in refused("- 5\n", ".yaml")
    assert "3 cells under 2 column names" in refused("name,tp\na,1,2\n")
    assert "larger than" in refused("x" * ((1 << 20) + 1))
    assert "not readable CSV (field larger than field limit" in refused("name,spec\n" + "x" * 200_000 + ",y\n")
    assert "aliases expand to more than" in refused("a: &a [" + ", ".join(["x"] * 50) + "]\n" + "".join(
        f"{c}: &{c} [" + ", ".join([f"*{p}"] * 50) + "]\n" for p, c in zip("abcd", "bcde", strict=True)), ".yaml")
    assert "nested too deeply" in refused("[" * 100_000, ".yaml")
    shutil.copy(DATA / "moe-small.yaml", tmp_path / "moe-small.yaml")
    assert "'b' is used by an earlier row" in refused(HEADER + "\nb,moe-small.yaml,1,1,1,8,1,64,2048,1\nb,moe-small.yaml,1,1,1,8,1,64,2048,1\n")
    assert "span clusters" in refused("name,spec,cluster,tp,pp,ep,step_s\na,moe-small.yaml,h100-sxm-8,1,1,8,1\n"
                                      "b,moe-small.yaml,h200-sxm-8,1,1,8,1\n")


def test_cli_refuses_a_bad_table_without_a_traceback_and_a_bad_profile(tmp_path):
    cli = [sys.executable, "-m", "megacpp.runtime.cli"]
    table = tmp_path / "t.csv"
    table.write_text("name,spec,tp,step_s\na,nam56r,two,1\n")
    done = subprocess.run([*cli, "calibrate", str(table)], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "row 1 (a): 'tp': must be a positive integer, got 'two'" in done.stderr
    both = subprocess.run([*cli, "calibrate", str(table), str(table)], capture_output=True, text=True, cwd=ROOT)
    assert both.returncode == 1 and "one table" in both.stderr
    for bad, message in (({"host_launch_us": 0.0}, "host_launch_us must be a number from 0.5 to 30"),
                         ({"nvlink": 1.0}, "unknown field 'nvlink'"), ([1], "must map cluster fields")):
        with pytest.raises(PlanError, match=message):
            cluster_from_profile({"schema": "megacpp.profile/2", "cluster_coefficients": bad})


def test_a_plan_records_the_profile_s_cluster_coefficients_and_prices_with_them():
    from megacpp.planner.plan import Plan, Profile, build_plan
    from megacpp.planner.spec.loading import load_spec

    spec = load_spec(DATA / "moe-small.yaml", ["parallel.tp=1", "parallel.pp=1", "parallel.ep=8", "parallel.dp=8"])
    slow_host = Profile.of(DEFAULT_EFFICIENCY, "mine.json", cluster={"host_launch_us": 7.8})
    plain, tuned = build_plan(spec, top=1), build_plan(spec, top=1, profile=slow_host)
    assert tuned.candidates[0].time.step_seconds > plain.candidates[0].time.step_seconds  # row a is host-bound
    doc = json.loads(json.dumps(tuned.to_json_dict()))
    assert doc["profile"] == {"source": "mine.json", "factors": {}, "cluster": {"host_launch_us": 7.8}}
    again = Plan.from_json_dict(doc)
    assert again.context.cluster.host_launch_us == 7.8 and plain.context.cluster.host_launch_us == DGX_HOST_LAUNCH_US
    with pytest.raises(PlanError, match="unknown cluster field 'nvlink'"):
        Plan.from_json_dict({**doc, "profile": {**doc["profile"], "cluster": {"nvlink": 1.0}}})
