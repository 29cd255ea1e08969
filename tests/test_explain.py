"""`megacpp explain layout`: golden text and JSON for every recipe, the newcomer's questions, --rank, pictures.

Everything runs the real CLI in a subprocess, as a user would. Regenerate the golden files after an
intended change with MEGACPP_UPDATE_GOLDEN=1.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from megacpp.planner.cost.coefficients import LAYOUT_RATIO_ERROR
from megacpp.planner.spec.loading import load_spec_text
from megacpp.recipes import recipe_names, recipe_text
from tests.conftest import ROOT

GOLDEN = ROOT / "tests" / "golden" / "explain"
UPDATE = os.environ.get("MEGACPP_UPDATE_GOLDEN") == "1"
# rich honours these even when stdout is a pipe (colour codes, terminal width); a user's shell may set them
TERMINAL_ENV = ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "COLUMNS", "LINES", "JUPYTER_COLUMNS")


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in TERMINAL_ENV} | {"PYTHONIOENCODING": "utf-8"}
    return subprocess.run([sys.executable, "-m", "megacpp.runtime.cli", "explain", "layout", *args],
                          capture_output=True, text=True, encoding="utf-8", env=env, timeout=120)


@functools.cache
def _explain(*args: str) -> subprocess.CompletedProcess[str]:
    """Cached CLI runs: planning deepseek-v3-style takes seconds, and several tests read the same output."""
    proc = _run(*args)
    assert proc.returncode == 0, proc.stderr
    return proc


@functools.cache
def _doc(*args: str) -> dict:
    return json.loads(_explain(*args, "--json").stdout)


def _num_experts(recipe: str) -> int:
    moe = load_spec_text(recipe_text(recipe)).model.moe
    assert moe is not None
    return moe.num_experts


@pytest.mark.parametrize("fmt", ["txt", "json"])
@pytest.mark.parametrize("recipe", recipe_names())
def test_golden(recipe, fmt):
    out = _explain(recipe, *(["--json"] if fmt == "json" else [])).stdout
    path = GOLDEN / f"{recipe}.{fmt}"
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(out, encoding="utf-8")
    assert path.exists(), f"missing golden file {path}; run with MEGACPP_UPDATE_GOLDEN=1"
    assert out == path.read_text(encoding="utf-8")


def test_text_output_is_the_same_on_every_run():
    # a fresh interpreter (another hash seed) must print the same bytes as the cached run
    assert _run("nam56r").stdout == _explain("nam56r").stdout


NAM56R_64 = ("nam56r", "--nodes", "8")


def test_newcomer_which_gpus_hold_expert_17_of_the_fifth_e_block():
    doc = _doc(*NAM56R_64)
    assert doc["world_size"] == 64 and doc["cluster"]["name"].startswith("h200")
    fifth = doc["experts"][4]
    assert fifth["e_block"] == 4
    pattern_blocks = "".join(s["blocks"] for s in sorted(doc["stages"], key=lambda s: s["layers"][0]))
    assert [i for i, b in enumerate(pattern_blocks) if b == "E"][4] == fifth["block_index"]
    holders = [r for o in fifth["owners"] if o["experts"][0] <= 17 <= o["experts"][1] for r in o["ranks"]]
    per_shard = _num_experts("nam56r") // doc["layout"]["ep"]
    expected = [r["rank"] for r in doc["ranks"] if r["pp"] == fifth["pp_rank"] and r["ep"] == 17 // per_shard]
    assert holders and holders == expected


def test_newcomer_which_collective_costs_most():
    """The costliest axis is the one whose collectives add most to the step; what the compute
    hides of an axis's traffic costs nothing."""
    doc = _doc(*NAM56R_64)
    costliest = max(doc["axes"], key=lambda a: a["exposed_seconds_per_step"])
    assert costliest["exposed_seconds_per_step"] > 0 and doc["costliest_axis"] == costliest["axis"]
    assert all(0 <= a["exposed_seconds_per_step"] <= a["seconds_per_step"] + 1e-9 for a in doc["axes"])


def test_an_interleaved_pipeline_shows_its_transfers_hidden():
    """llama-8b-dense on 16 H100 plans PP 2 x VPP 8: its pipeline moves the most bytes but the next
    chunk hides them, so the step does not show them and another axis is the costliest."""
    doc = json.loads((ROOT / "tests" / "golden" / "explain" / "llama-8b-dense.json").read_text())
    pp = next(a for a in doc["axes"] if a["axis"] == "pp")
    assert doc["layout"]["vpp"] > 1 and pp["seconds_per_step"] > 0
    assert pp["exposed_seconds_per_step"] < pp["seconds_per_step"] / 50 and doc["costliest_axis"] != "pp"


def test_newcomer_why_tp_16_was_rejected():
    rows = [w for w in _doc(*NAM56R_64)["why_not"] if w["axis"] == "tp" and w["value"] == 16]
    assert len(rows) == 1
    row = rows[0]
    assert row["verdict"] == "rejected" and row["rule"] == "tp-divides-mamba-groups"
    assert "num_groups=8" in row["message"]


def test_newcomer_facts_are_readable_in_the_text():
    doc, text = _doc(*NAM56R_64), _explain(*NAM56R_64).stdout
    lines = text.splitlines()
    tp16 = [line for line in lines if "tp=16" in line]
    assert tp16 and "rejected" in tp16[0] and "tp-divides-mamba-groups" in tp16[0] and "num_groups=8" in tp16[0]
    costliest = [line for line in lines if "costliest" in line and line.startswith("│")]
    assert len(costliest) == 1 and costliest[0].split("│")[1].strip() == doc["costliest_axis"]
    fifth = doc["experts"][4]
    e4 = [line.strip() for line in lines if line.strip().startswith("E#4 ")]
    owner = next(o for o in fifth["owners"] if o["experts"][0] <= 17 <= o["experts"][1])
    assert len(e4) == 1 and e4[0].startswith(f"E#4 (block {fifth['block_index']}, pp{fifth['pp_rank']}): ")
    assert f"{owner['experts'][0]}-{owner['experts'][1]} → {owner['ranks'][0]}" in e4[0]


@pytest.mark.parametrize("rank", [0, 13, 63])
def test_rank_focus_peers_and_experts(rank):
    doc = _doc("mixtral-8x7b", "--rank", str(rank))
    focus, lay = doc["focus"], doc["layout"]
    assert lay["ep"] > 1 and focus["rank"] == rank
    assert focus == {**doc["ranks"][rank], **{k: focus[k] for k in ("stages", "peers", "experts")}}
    axes_with_groups = {a["axis"]: a["groups"] for a in doc["axes"] if a["groups"]}
    assert set(focus["peers"]) == set(axes_with_groups)
    for axis, peers in focus["peers"].items():
        assert rank in peers and peers in axes_with_groups[axis], axis
    per_shard = _num_experts("mixtral-8x7b") // lay["ep"]
    mine = [per_shard * focus["ep"], per_shard * (focus["ep"] + 1) - 1]
    expected = [{"e_block": e["e_block"], "experts": mine} for e in doc["experts"] if e["pp_rank"] == focus["pp"]]
    assert expected and focus["experts"] == expected
    text = _explain("mixtral-8x7b", "--rank", str(rank)).stdout
    assert f"rank {rank} (node {focus['node']}, gpu {focus['local_rank']})" in text
    assert f"experts: {mine[0]}-{mine[1]} of each of its {len(expected)} E blocks" in text


PICTURES = [
    ("nam56r", "nam56r", []),
    ("nam56r", "nam56r", ["--nodes", "8"]),
    ("mixtral-8x7b", "mixtral-8x7b-1024", ["--nodes", "128"]),
    ("mixtral-8x7b", "mixtral-8x7b-4096", ["--nodes", "512"]),
]


@pytest.mark.parametrize("recipe,label,extra", PICTURES, ids=[f"{p[0]}-{''.join(p[2]) or 'default'}" for p in PICTURES])
def test_picture_renders(recipe, label, extra, tmp_path):
    pytest.importorskip("matplotlib", reason="pictures need the viz extra: pip install 'megacpp[viz]'")
    import numpy as np
    from matplotlib.image import imread

    from megacpp.runtime.cli.picture import stage_colour

    png, svg = tmp_path / f"{label}.png", tmp_path / f"{label}.svg"
    proc = _run(recipe, *extra, "--json", "--png", str(png), "--svg", str(svg))
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {png}" in proc.stderr and f"wrote {svg}" in proc.stderr
    doc = json.loads(proc.stdout)
    pixels = imread(png)
    height, width = pixels.shape[:2]
    assert width >= 800 and height >= 300
    rgb = np.round(pixels[..., :3] * 255).astype(int)
    assert rgb.std() > 20  # not blank
    pp = doc["layout"]["pp"]
    for stage in range(pp):  # every stage's fill colour covers a visible area
        target = np.round(np.array(stage_colour(stage, pp)) * 255).astype(int)
        assert (np.abs(rgb - target).max(axis=-1) <= 2).sum() >= 200, f"stage pp{stage} colour missing"
    assert len({tuple(c) for c in rgb.reshape(-1, 3)[:: 7]}) >= pp + 2
    root = ET.parse(svg).getroot()
    assert root.tag.endswith("svg")
    assert doc["spec"] in "".join(root.itertext())


def test_bad_rank_is_one_line_and_exit_1():
    proc = _run("nam56r", "--rank", "999")
    assert proc.returncode == 1 and not proc.stdout
    assert proc.stderr.strip().splitlines() == ["error: --rank 999: ranks are 0..7"]


def test_bad_picture_suffix_names_it_and_the_choices(tmp_path):
    out = tmp_path / "out.txt"
    proc = _run("nam56r", "--png", str(out))
    assert proc.returncode == 1 and not out.exists()
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "'.txt'" in lines[0] and ".svg or .png" in lines[0]


def test_missing_matplotlib_says_how_to_install(tmp_path):
    code = ("import sys; sys.modules['matplotlib'] = None; from megacpp.runtime.cli import main; "
            f"sys.argv = ['megacpp', 'explain', 'layout', 'nam56r', '--png', {str(tmp_path / 'x.png')!r}]; main()")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'x.png'}: drawing pictures needs matplotlib; pip install 'megacpp[viz]'"
    ]


def test_host_bound_steps_say_so():
    """Small shapes on local modules are bound by per-block overhead; the explain text says how far
    such predictions were off on the measured runs. GPU-bound ones carry no such line."""
    small = _explain(str(ROOT / "benchmarks" / "evidence" / "local-fit-h200" / "specs" / "moe-ep4-alltoall.yaml")).stdout
    assert "host-bound:" in small and "megacpp calibrate" in small
    large = _explain(str(ROOT / "benchmarks" / "evidence" / "gpu-bound-shapes" / "specs" / "large-dense-dp2.yaml")).stdout
    assert "step on the busiest rank = matmul" in large and "host-bound" not in large
    planned = subprocess.run([sys.executable, "-m", "megacpp.runtime.cli", "plan", str(ROOT / "benchmarks" / "evidence" / "local-fit-h200" / "specs" / "moe-ep4-alltoall.yaml")],
                             capture_output=True, text=True, cwd=ROOT).stdout
    assert "host-bound" in planned.split("considered")[0] and "megacpp calibrate" in planned


def test_explain_says_what_the_memory_sums_leave_out():
    """Under each stage's memory sum, `explain layout` says what the transient is (grouped over the
    stages it holds for) and where the optimizer step's copy, not the activations, sets the peak."""
    from megacpp.runtime.cli.console import _peak_notes

    stage = {"transient_gib": 0.2, "transient_from": "the loss's logits", "activations_gib": 2.6}
    notes = _peak_notes([{**stage, "pp_rank": 0, "optimizer_step_gib": 3.2},
                         {**stage, "pp_rank": 1, "optimizer_step_gib": 1.0},
                         {**stage, "pp_rank": 2, "transient_gib": 0.0, "optimizer_step_gib": 0.0}])
    assert notes["transient: the loss's logits"] == [0, 1]
    copy = next(k for k in notes if k.startswith("the optimizer step's fp32 copy"))
    assert notes[copy] == [0]
    text = (ROOT / "tests" / "golden" / "explain" / "llama-8b-dense.txt").read_text()
    assert "pp1: transient: the loss's logits" in text  # the last stage alone holds the head (tp1 pp2 vpp8)
    text = (ROOT / "tests" / "golden" / "explain" / "mixtral-8x7b.txt").read_text()
    assert "pp0-1: transient: the gradients of the last MoE FFN block's backward" in text


def test_a_plan_file_made_with_a_profile_explains_with_it(tmp_path):
    """`plan --profile` records the profile in the plan, and explain's why-not rows use it."""
    from megacpp.planner.calibrate.profile import PROFILE_SCHEMA
    from megacpp.planner.cost.coefficients import DEFAULT_EFFICIENCY

    slow = {"schema": PROFILE_SCHEMA, "cluster": "h200-sxm-8", "transformer_engine": True,
            "block_overhead_s": {k: 2 * v for k, v in DEFAULT_EFFICIENCY.te_block_overhead_s}}
    profile, plain, tuned = tmp_path / "slow.json", tmp_path / "plain.json", tmp_path / "tuned.json"
    profile.write_text(json.dumps(slow))
    cli = [sys.executable, "-m", "megacpp.runtime.cli", "plan", "qwen-moe-style", "--top", "1"]
    for out, extra in ((plain, []), (tuned, ["--profile", str(profile)])):
        done = subprocess.run([*cli, "--out", str(out), *extra], capture_output=True, text=True, cwd=ROOT)
        assert done.returncode == 0, done.stderr
    assert json.loads(tuned.read_text())["profile"]["source"] == str(profile)
    assert len({json.dumps(json.loads(p.read_text())["candidates"][0]["layout"]) for p in (plain, tuned)}) == 1
    rows = [{(w["axis"], w["value"]): w.get("step_seconds") for w in _doc(str(path))["why_not"] if w["verdict"] != "rejected"}
            for path in (plain, tuned)]
    shared = rows[0].keys() & rows[1].keys()
    assert shared and all(rows[1][k] > rows[0][k] for k in shared)


def test_versus_prices_my_layout_beside_the_candidate_term_by_term():
    """"Why not the layout I run now?": --versus prices it with the plan's own model, and its
    terms' differences add up to the difference of the two steps."""
    doc = _doc("llama-8b-dense", "--versus", "tp2 pp2")
    v = doc["versus"]
    assert v["layout"]["tp"] == 2 and v["layout"]["pp"] == 2 and v["layout"]["dp"] == 16 // 4
    assert v["verdict"] == "legal"
    step = doc["time"]["step_seconds"]
    assert sum(t["delta"] for t in v["terms"]) == pytest.approx(v["step_seconds"] - step, abs=2e-3)
    assert v["step_delta"] == pytest.approx(v["step_seconds"] / step - 1, abs=1e-3)
    text = _explain("llama-8b-dense", "--versus", "tp2 pp2").stdout
    assert "versus tp2 pp2 dp4" in text and "difference s" in text


def test_versus_says_whether_the_gap_is_beyond_the_plans_error_between_two_layouts():
    """A gap inside the plan's measured error between two layouts of one job is not settled: the
    user is told to time both; a wider one is."""
    close, far = (_doc("llama-8b-dense", "--versus", text)["versus"] for text in ("tp2 pp2", "tp4"))
    assert abs(close["step_delta"]) <= LAYOUT_RATIO_ERROR < abs(far["step_delta"])
    assert not close["settled"] and far["settled"]
    assert "time both before choosing" in _explain("llama-8b-dense", "--versus", "tp2 pp2").stdout
    assert "time both" not in _explain("llama-8b-dense", "--versus", "tp4").stdout


def test_versus_names_the_rules_that_reject_it_and_bad_words_in_one_line():
    rejected = _doc("llama-8b-dense", "--versus", "tp2 ep2")["versus"]
    assert rejected["verdict"] == "rejected" and any(r.startswith("ep-needs-experts") for r in rejected["rules"])
    for bad in ("tp4 px2", "tp0", "tp2 tp4", "tp3"):
        proc = _run("llama-8b-dense", "--versus", bad)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert "--versus" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_versus_is_priced_when_the_spec_pins_dp():
    """A spec with every axis pinned, dp among them (as a job's own spec is), is still asked
    "why not that one?": the other layout's dp follows its own tp x cp x pp, not the pin."""
    pinned = ("--set", "parallel.tp=1", "--set", "parallel.pp=1", "--set", "parallel.dp=16")
    assert _doc("llama-8b-dense", *pinned)["layout"]["dp"] == 16
    v = _doc("llama-8b-dense", *pinned, "--versus", "tp2 pp2")["versus"]
    assert v["verdict"] == "legal" and v["layout"]["dp"] == 4, v
    proc = _run("llama-8b-dense", *pinned, "--versus", "tp2 pp2 dp8")
    assert proc.returncode == 1 and "dp is 4" in proc.stderr, proc.stderr


def test_why_not_prices_the_neighbours_of_a_spec_that_pins_dp():
    """A pinned dp is the candidate's, as under --versus: tp 2 beside a pinned tp 1 dp 16 is
    priced at dp 8 and says so once, not refused by the pin; a dense model offers no etp."""
    pinned = ("--set", "parallel.tp=1", "--set", "parallel.pp=1", "--set", "parallel.dp=16")
    rows = {(w["axis"], w["value"]): w for w in _doc("llama-8b-dense", *pinned)["why_not"]}
    tp2 = rows[("tp", 2)]
    assert tp2["verdict"] != "rejected" and tp2["layout"]["dp"] == 8, tp2
    assert any("parallel.dp=16 is the candidate's" in note for note in tp2["notes"])
    assert "notes" not in rows[("vpp", 2)] and not any(axis == "etp" for axis, _ in rows)
    assert _explain("llama-8b-dense", *pinned).stdout.count("dp follows this layout's tp x cp x pp") == 1


def test_versus_of_another_stage_count_lets_a_pinned_pipeline_layout_go_and_says_so():
    """A pipeline layout string pins the candidate's pp x vpp stages; the other layout, of another
    stage count, is priced on megacpp's own split and the document names it. One of the same stage
    count keeps the string."""
    pinned = ("--set", "parallel.pp=2", "--set", "parallel.pipeline_layout=E(t*4|)*7t*4L")
    v = _doc("llama-8b-dense", *pinned, "--versus", "pp4")["versus"]
    assert v["verdict"] == "legal" and v["layout"]["pp"] == 4, v
    assert any("pipeline_layout names 8 stages" in note for note in v["notes"])
    kept = _doc("llama-8b-dense", *pinned, "--versus", "pp4 vpp2")["versus"]
    assert kept["verdict"] == "legal" and kept["notes"] == []
    assert "priced on megacpp's own split" in _explain("llama-8b-dense", *pinned, "--versus", "pp4").stdout

def test_why_not_offers_the_interleaved_depths_the_search_tries():
    """NVIDIA's recipes run vp 5 to 24: a candidate at pp 2 vpp 8 (16 layers a rank) is asked
    about the searched virtual stage counts just around its own, not only 2 and 4."""
    doc = _doc("llama-8b-dense", "--set", "parallel.pp=2", "--set", "parallel.vpp=8")
    offered = sorted(w["value"] for w in doc["why_not"] if w["axis"] == "vpp")
    assert offered[0] == 1 and 8 not in offered and any(v > 8 for v in offered)
