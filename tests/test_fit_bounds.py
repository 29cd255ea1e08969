"""The search's fit check: its bounds decide only what the exact peak decides."""

from __future__ import annotations

import math

import pytest

from megacpp.planner.cost.coefficients import DEFAULT_EFFICIENCY
from megacpp.planner.cost.fits import fits
from megacpp.planner.cost.flops import routed_load
from megacpp.planner.cost.memory import peak_gib, stage_memory
from megacpp.planner.plan import make_context
from megacpp.planner.search.space import search
from megacpp.planner.search.stages import assign_stages
from megacpp.planner.spec.loading import load_spec_text
from megacpp.recipes import recipe_text


@pytest.mark.parametrize("recipe,overrides", [
    ("deepseek-v3", ("cluster.nodes=16",)),  # MTP layers on the last stage
    ("nam56r", ("training.micro_batch_size=auto",)),  # a hybrid stack, unfused attention's scores
    ("qwen-moe-style", ("model.moe.imbalance=1.5", "cluster.nodes=2")),
    ("mixtral-8x7b", ("training.recompute=selective", "training.recompute_modules=[core_attn,moe_act]")),
    ("llama-8b-dense", ("training.recompute=full", "training.recompute_num_layers=2")),  # priced, not bounded
    ("gb10-hybrid-small", ()),
])
def test_a_layout_fits_exactly_where_its_peak_is_within_the_capacity(recipe, overrides):
    """At capacities on either side of each layout's peak, the nearest included, fits() says what
    comparing the peak says, and the peak is stage_memory's largest total."""
    spec = load_spec_text(recipe_text(recipe), overrides=list(overrides))
    ctx = make_context(spec)
    load = routed_load(ctx, imbalanced=True)
    legal = search(ctx).legal
    assert legal
    for lay in legal[:: max(1, len(legal) // 150)]:
        stages = assign_stages(ctx, lay.pp, lay.vpp)[1]
        at = load if lay.ep > 1 else 1.0
        peak = peak_gib(ctx, lay, stages, DEFAULT_EFFICIENCY, at)
        assert peak == max(m.total_gib for m in stage_memory(ctx, lay, stages, DEFAULT_EFFICIENCY, at))
        for capacity in (peak, math.nextafter(peak, 0), math.nextafter(peak, math.inf), peak * 0.7, peak * 1.3):
            assert fits(ctx, lay, stages, DEFAULT_EFFICIENCY, capacity, at) == (not peak > capacity), (lay.short(), capacity)
