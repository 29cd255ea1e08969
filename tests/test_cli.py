"""What users see from the command line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

CLI = [sys.executable, "-m", "megacpp.runtime.cli"]


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*CLI, *args], capture_output=True, text=True, cwd=ROOT, timeout=120)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_help_imports_neither_torch_nor_megatron():
    """`--help` stays light; its speed (under 1 s) is measured by `make bench`, not here."""
    code = (
        "import sys;"
        "from megacpp.runtime.cli import app;"
        "from typer.testing import CliRunner; r = CliRunner().invoke(app, ['--help']);"
        "assert r.exit_code == 0, r.output;"
        "assert 'torch' not in sys.modules and not any(m.startswith('megatron') for m in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "plan" in run("--help").stdout


def test_plan_default_recipe_prints_ranked_table():
    out = run("plan", "--top", "3").stdout
    assert "nam56r-8xh200" in out and "peak GiB" in out and "considered" in out
    assert "recurrent-no-cp" in out  # why CP never shows up


def test_plan_names_the_layouts_within_its_error_of_the_best():
    """The ranked table says which runners-up lie within the plan's median error between two
    layouts of one job (10%) of the best fitting one: those a user should time, not trust the order of."""
    doc = json.loads(run("plan", "mixtral-8x7b", "--json", "--top", "5").stdout)
    fitting = [c for c in doc["candidates"] if c["fits"]]
    best = fitting[0]["time"]["step_seconds"]
    close = [f"#{c['rank']}" for c in fitting[1:] if c["time"]["step_seconds"] / best - 1 <= 0.10]
    assert close, "mixtral-8x7b's top 5 has runners-up within 10% of its best"
    out = " ".join(run("plan", "mixtral-8x7b", "--top", "5").stdout.split())
    assert f"{', '.join(close)} within 10% of #{fitting[0]['rank']}'s step" in out


def test_plan_json_follows_the_contract(tmp_path):
    doc = json.loads(run("plan", "mixtral-8x7b", "--json", "--top", "2").stdout)
    assert doc["schema"] == "megacpp.plan/1" and doc["world_size"] == 64
    cand = doc["candidates"][0]
    assert set(cand["layout"]) >= {"tp", "pp", "vpp", "cp", "dp", "ep", "etp", "edp", "sp", "micro_batch_size", "num_microbatches"}
    assert {"pp_rank", "blocks", "embedding", "output_head"} <= set(cand["stages"][0])
    assert {"capacity_gib", "peak_gib", "per_stage"} <= set(cand["memory"])
    assert {"params", "weights_gib", "gradients_gib", "optimizer_gib", "activations_gib", "buffers_gib", "overhead_gib", "total_gib"} <= set(cand["memory"]["per_stage"][0])
    assert {"axis", "collective", "bytes_per_step", "link", "seconds"} <= set(cand["communication"][0])
    assert {"step_seconds", "tokens_per_second", "mfu", "bubble_fraction"} <= set(cand["time"])
    assert {"count", "by_rule", "examples"} <= set(doc["rejected"])
    assert doc["rejected"]["count"] + doc["legal_count"] == doc["considered"]


def test_set_and_cluster_overrides(tmp_path):
    doc = json.loads(run("plan", "llama-8b-dense", "--cluster", "h200-sxm-8", "--nodes", "1",
                         "--set", "parallel.tp=2", "--json").stdout)
    assert doc["world_size"] == 8 and doc["cluster"]["name"] == "h200-sxm-8"
    assert {c["layout"]["tp"] for c in doc["candidates"]} == {2}


def test_plan_out_then_validate_the_plan_file(tmp_path):
    out = tmp_path / "plan.json"
    run("plan", "qwen-moe-style", "--out", str(out), "--top", "3")
    assert json.loads(out.read_text())["schema"] == "megacpp.plan/1"
    assert "valid" in run("validate", str(out)).stdout
    doc = json.loads(out.read_text())
    doc["candidates"][0]["layout"]["ep"] = 3  # hand-edited into an illegal layout
    out.write_text(json.dumps(doc))
    proc = run("validate", str(out), check=False)
    assert proc.returncode == 1 and "ep-divides-experts" in proc.stdout


def test_validate_github_annotations(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "recipes" / "llama-8b-dense.yaml").read_text() + "parallel: {tp: 3, pp: 1, cp: 1, vpp: 1}\n")
    proc = run("validate", str(ROOT / "recipes" / "nam56r.yaml"), str(bad), "--format", "github", check=False)
    assert proc.returncode == 1
    assert f"::error file={bad}::" in proc.stdout
    assert "::warning file=" in proc.stdout  # nam56r's runtime-only R note


@pytest.mark.parametrize("cmd", [["recipes"], ["clusters"], ["explain", "rule", "--list"]])
def test_listing_commands(cmd):
    assert run(*cmd).stdout.strip()


def test_explain_rule():
    out = run("explain", "rule", "expert-grid-divides-world").stdout
    assert "parallel_state.py" in out and "fails:" in out and "passes:" in out
    proc = run("explain", "rule", "no-such-rule", check=False)
    assert proc.returncode == 1 and "unknown rule" in proc.stderr
