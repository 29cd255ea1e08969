"""The typed plan: read once, written back byte for byte, the profile that priced it, one axis vocabulary."""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from functools import cache
from typing import Any

import pytest

from megacpp.planner.axes import Axis
from megacpp.planner.cost.coefficients import DEFAULT_EFFICIENCY
from megacpp.planner.cost.flops import routed_load
from megacpp.planner.cost.step import compute_floor, estimate, step_floor
from megacpp.planner.errors import PlanError
from megacpp.planner.explain import explain_layout
from megacpp.planner.plan import DEFAULTS, Plan, Profile, build_plan, make_context
from megacpp.planner.search.layout import Layout
from megacpp.planner.search.space import search
from megacpp.planner.search.stages import assign_stages
from megacpp.planner.spec.loading import load_spec_text
from megacpp.planner.validation import validate_plan
from megacpp.recipes import recipe_text

# a profile as `megacpp calibrate` would fit it on a slow host: every TE block's overhead doubled
SLOW = replace(DEFAULT_EFFICIENCY, te_block_overhead_s=tuple((k, 2 * v) for k, v in DEFAULT_EFFICIENCY.te_block_overhead_s),
               te_sync_exposed=0.8)


@cache
def _text(recipe: str, *overrides: str) -> str:
    """A plan as `megacpp plan --out` writes it."""
    plan = build_plan(load_spec_text(recipe_text(recipe), overrides=list(overrides)), top=3)
    return json.dumps(plan.to_json_dict(), indent=2)


def _doc(recipe: str, *overrides: str) -> dict[str, Any]:
    return json.loads(_text(recipe, *overrides))


@pytest.mark.parametrize("recipe,overrides", [("qwen-moe-style", ()), ("mixtral-8x7b", ("model.moe.imbalance=1.5",)),
                                              ("gb10-hybrid-small", ())])
def test_a_plan_file_reads_back_to_the_same_bytes(recipe, overrides):
    text = _text(recipe, *overrides)
    plan = Plan.from_json_dict(json.loads(text))
    assert json.dumps(plan.to_json_dict(), indent=2) == text
    cand = plan.candidates[0]
    assert isinstance(cand.layout, Layout) and cand.layout.world == plan.world_size
    assert cand.time.step_seconds > 0 and cand.memory.per_stage[0].total_gib > 0
    assert plan.context.spec == plan.spec_model and plan.spec_model.name == plan.spec["name"]
    if overrides:  # the moe.imbalance band's keys are there only when the band is
        assert cand.memory.peak_gib_high is not None and "total_gib_high" in json.loads(text)["candidates"][0]["memory"]["per_stage"][0]
    else:
        assert "peak_gib_high" not in json.loads(text)["candidates"][0]["memory"]


def test_the_plan_records_the_profile_after_the_cluster():
    doc = _doc("qwen-moe-style")
    assert list(doc)[:4] == ["schema", "spec", "cluster", "profile"]
    assert doc["profile"] == {"source": "defaults", "factors": {}}
    spec = load_spec_text(recipe_text("qwen-moe-style"))
    profiled = build_plan(spec, top=1, profile=Profile.of(SLOW, source="slow.json")).to_json_dict()["profile"]
    assert profiled["source"] == "slow.json" and profiled["factors"]["te_sync_exposed"] == 0.8
    assert Plan.from_json_dict(_doc("qwen-moe-style") | {"profile": profiled}).efficiency == SLOW


def test_a_plan_made_before_the_profile_was_recorded_is_priced_with_the_defaults():
    doc = _doc("qwen-moe-style")
    del doc["profile"]
    plan = Plan.from_json_dict(doc)
    assert plan.profile == DEFAULTS and plan.efficiency == DEFAULT_EFFICIENCY
    assert explain_layout(plan)["why_not"]


def test_why_not_rows_are_priced_with_the_profile_that_priced_the_plan():
    spec = load_spec_text(recipe_text("qwen-moe-style"))
    plain = build_plan(spec, top=1)
    slow = Plan.from_json_dict(json.loads(json.dumps(build_plan(spec, top=1, profile=Profile.of(SLOW, "slow.json")).to_json_dict())))
    assert slow.candidates[0].layout == plain.candidates[0].layout
    assert slow.candidates[0].time.step_seconds > plain.candidates[0].time.step_seconds
    rows = {(w["axis"], w["value"]): w for w in explain_layout(plain)["why_not"] if w["verdict"] != "rejected"}
    slow_rows = {(w["axis"], w["value"]): w for w in explain_layout(slow)["why_not"] if w["verdict"] != "rejected"}
    shared = rows.keys() & slow_rows.keys()
    assert shared
    assert all(slow_rows[k]["step_seconds"] > rows[k]["step_seconds"] for k in shared)


@pytest.mark.parametrize("edit,where", [
    (lambda d: d["candidates"][0]["layout"].update(tp="2"), "candidates.0.layout.tp"),
    (lambda d: d["candidates"][0]["layout"].update(tp=0), "candidates.0.layout.tp"),
    (lambda d: d["candidates"][0]["layout"].update(sp=1), "candidates.0.layout.sp"),
    (lambda d: d["candidates"][0]["layout"].update(tpp=2), "candidates.0.layout.tpp"),
    (lambda d: d["candidates"][0]["split"].update(kind="diagonal"), "candidates.0.split.kind"),
    (lambda d: d["candidates"][0]["time"].pop("step_seconds"), "candidates.0.time.step_seconds"),
    (lambda d: d["candidates"][0]["communication"][0].update(axis="xp"), "candidates.0.communication.0.axis"),
    (lambda d: d["profile"]["factors"].update(te_sync_exposd=0.5), "profile.factors"),
])
def test_a_malformed_plan_names_the_key(edit, where):
    doc = copy.deepcopy(_doc("qwen-moe-style"))
    edit(doc)
    with pytest.raises(PlanError, match=rf"malformed plan file: {where}\b"):
        Plan.from_json_dict(doc)


def test_a_plan_whose_layout_no_longer_passes_is_invalid_not_malformed():
    doc = _doc("qwen-moe-style")
    doc["candidates"][0]["layout"]["ep"] = 3  # edp stays as it was: it is derived, never read
    result = validate_plan(Plan.from_json_dict(doc))
    assert not result["valid"] and any("ep-divides-experts" in e for e in result["errors"])


def test_an_axis_is_its_name():
    assert f"{Axis.TP}{2}" == "tp2" and str(Axis.EDP) == "edp"
    assert {"tp": 1}[Axis.TP] == 1 and json.dumps({Axis.CP: Axis.CP}) == '{"cp": "cp"}'
    assert Layout(tp=2, dp=4, sp=True).degree(Axis.SP) == 2 and Layout(tp=2, dp=4).degree(Axis.EDP) == 8


@pytest.mark.parametrize("recipe,overrides", [("nam56r", ("training.micro_batch_size=auto",)),
                                              ("mixtral-8x7b", ("cluster.nodes=2", "training.recompute=full")),
                                              ("qwen-moe-style", ("model.moe.imbalance=1.5", "cluster.nodes=2"))])
def test_the_ranking_is_the_one_pricing_every_layout_in_full_gives(recipe, overrides):
    """build_plan prices a layout's step only while a floor under it can still rank, and checks
    the fit on the ranks that can peak; pricing every legal layout in full ranks the same
    candidates and counts the same fits, and no floor is above its step."""
    spec = load_spec_text(recipe_text(recipe), overrides=list(overrides))
    plan = build_plan(spec, top=5)
    ctx = make_context(spec)
    load = routed_load(ctx, imbalanced=True)
    scored = []
    for lay in search(ctx).legal:
        stages = assign_stages(ctx, lay.pp, lay.vpp)[1]
        est = estimate(ctx, lay, stages)
        high = estimate(ctx, lay, stages, load=load) if load > 1 and lay.ep > 1 else None
        assert step_floor(ctx, lay) <= step_floor(ctx, lay, stages=stages) <= est.step_seconds
        assert compute_floor(ctx, lay, stages) <= est.step_seconds
        scored.append(((high or est).peak_gib > ctx.cluster.gpu_memory_gib, round(est.step_seconds, 9), round(est.peak_gib, 3),
                       lay.short(), lay))
    scored.sort(key=lambda t: t[:4])
    assert [c.layout for c in build_plan(spec, top=5, every_vpp=True).candidates] == [t[-1] for t in scored[:5]]
    # by default each layout ranks once, at its best VPP
    best: dict = {}
    for t in scored:
        best.setdefault(t[-1].but_vpp(), t)
    assert [c.layout for c in plan.candidates] == [t[-1] for t in list(best.values())[:5]]
    assert len({c.layout.but_vpp() for c in plan.candidates}) == len(plan.candidates)
    assert plan.fitting_count == sum(not t[0] for t in scored)


@pytest.mark.parametrize("recipe,overrides", [
    ("qwen-moe-style", ("cluster.nodes=4", "training.tp_comm_overlap=true")),
    ("mixtral-8x7b", ("cluster.nodes=4", "model.moe.overlap_communication=true", "training.recompute=none")),
    ("qwen-moe-style", ("cluster.nodes=4", "model.moe.dispatcher=flex")),
    ("deepseek-v3", ("cluster.nodes=16",)),
])
def test_no_floor_is_above_its_step_where_collectives_overlap(recipe, overrides):
    """The floors count the collectives inside every micro-batch only as far as they cannot hide:
    under TP's userbuffers and MoE's overlapped all-to-alls too, they stay under the step."""
    ctx = make_context(load_spec_text(recipe_text(recipe), overrides=list(overrides)))
    legal = search(ctx).legal
    for lay in legal[:: max(1, len(legal) // 200)]:
        stages = assign_stages(ctx, lay.pp, lay.vpp)[1]
        step = estimate(ctx, lay, stages).step_seconds
        assert step_floor(ctx, lay, stages=stages) <= step and compute_floor(ctx, lay, stages) <= step, lay.short()
