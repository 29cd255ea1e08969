"""Every bundled recipe is planned and validated; the default recipe is what `make demo` shows."""

from __future__ import annotations

import pytest

from megacpp.planner.plan import build_plan
from megacpp.planner.spec.loading import load_spec_text
from megacpp.planner.validation import validate_spec
from megacpp.recipes import DEFAULT_RECIPE, recipe_names, recipe_text

EXPECTED = {"nam56r", "mixtral-8x7b", "deepseek-v3-style", "deepseek-v3", "kimi-k2", "qwen-moe-style", "llama-8b-dense",
            "gb10-hybrid-small"}


def test_all_recipes_are_bundled():
    assert set(recipe_names()) >= EXPECTED
    assert DEFAULT_RECIPE == "nam56r"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_recipe_plans_to_fitting_layouts(name):
    spec = load_spec_text(recipe_text(name), source=name)
    plan = build_plan(spec, top=5)
    assert plan.legal_count > 0 and plan.fitting_count > 0
    best = plan.candidates[0]
    assert best.fits and best.memory.peak_gib <= plan.cluster.gpu_memory_gib
    ranked = [c.time.step_seconds for c in plan.candidates if c.fits]
    assert ranked == sorted(ranked)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_recipe_validates(name):
    result = validate_spec(load_spec_text(recipe_text(name), source=name))
    assert result["valid"], result["errors"]


def test_nam56r_is_the_hybrid_pattern_on_one_h200_node():
    spec = load_spec_text(recipe_text("nam56r"))
    assert spec.pattern.blocks == "AEME" * 13 + "AEMR"
    assert (spec.cluster.preset, spec.cluster.nodes) == ("h200-sxm-8", 1)
    plan = build_plan(spec)
    # R blocks forbid CP, the core_v0.16 hybrid stack forbids VPP: both show up as rejections.
    assert plan.rejected.by_rule["recurrent-no-cp"] > 0
    assert plan.rejected.by_rule["hybrid-no-vpp"] > 0
    assert all(c.layout.cp == 1 and c.layout.vpp == 1 for c in plan.candidates)
    assert any(n.rule == "recurrent-runtime-only" for n in plan.notes)


def test_gb10_recipe_stays_on_one_gpu():
    plan = build_plan(load_spec_text(recipe_text("gb10-hybrid-small")), top=20)
    assert plan.world_size == 1
    assert {c.layout.micro_batch_size for c in plan.candidates} >= {1, 2}
