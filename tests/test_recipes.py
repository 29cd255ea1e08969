"""Every bundled recipe is planned and validated; the default recipe is what `make demo` shows."""

from __future__ import annotations

import pytest

from megacpp.planner.cost.blocks import block_params, embedding_params, head_params
from megacpp.planner.cost.coefficients import DEFAULT_EFFICIENCY
from megacpp.planner.cost.memory import stage_memory
from megacpp.planner.megatron.render import RenderOptions, render_launch
from megacpp.planner.plan import build_plan, make_context
from megacpp.planner.search.layout import Layout
from megacpp.planner.search.stages import assign_stages
from megacpp.planner.spec.loading import load_spec_text
from megacpp.planner.validation import validate_spec
from megacpp.recipes import DEFAULT_RECIPE, recipe_names, recipe_text

# the published architectures (scale_truth/models.json), with their published parameter totals
PUBLISHED = {"qwen3-30b-a3b", "qwen3-235b-a22b", "gpt-oss-120b", "nemotron-3-nano", "nemotron-3-super"}
EXPECTED = {"nam56r", "mixtral-8x7b", "deepseek-v3-style", "deepseek-v3", "kimi-k2", "qwen-moe-style", "llama-8b-dense",
            "gb10-hybrid-small", *PUBLISHED}


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


# the recipes stock Megatron-LM cannot run: their R blocks have no layer in core_v0.16
RUNTIME_ONLY = {"nam56r"}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_recipe_validates(name):
    spec = load_spec_text(recipe_text(name), source=name)
    result = validate_spec(spec, engine="megacpp" if name in RUNTIME_ONLY else "megatron-lm")
    assert result["valid"], result["errors"]
    stock = validate_spec(spec)["engines"]["megatron-lm"]
    assert stock["valid"] is (name not in RUNTIME_ONLY)
    if name in RUNTIME_ONLY:
        assert stock["errors"][0].startswith("recurrent-runtime-only")


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


def total_params(name: str) -> int:
    """Every parameter of a recipe's model, as one unsharded rank would hold it."""
    spec = load_spec_text(recipe_text(name))
    ctx = make_context(spec)
    one = Layout(tp=1, pp=1, vpp=1, cp=1, dp=1, ep=1, etp=1, sp=False, micro_batch_size=1, num_microbatches=1)
    blocks = sum(p.dense + p.expert for p in (block_params(ctx, b, one) for b in spec.pattern.blocks))
    return embedding_params(ctx, one) + head_params(ctx, one) + blocks


@pytest.mark.parametrize("name,published,rounding", [
    ("qwen3-30b-a3b", 30.5e9, 0.05e9),  # Qwen3 model card: 30.5B in total
    ("qwen3-235b-a22b", 235e9, 0.5e9),  # Qwen3 model card: 235B in total
    ("gpt-oss-120b", 116.83e9, 0.005e9),  # OpenAI gpt-oss model card: 116.83B total, biases and sinks included
    ("nemotron-3-nano", 31.6e9, 0.05e9),  # NVIDIA Nemotron 3 Nano model card: 31.6B total
])
def test_published_totals(name, published, rounding):
    assert abs(total_params(name) - published) <= rounding


def test_nemotron_3_super_is_its_verified_tensor_count():
    """NVIDIA's verification card counts 123,611,033,088 elements: the model, its one shared
    multi-token-prediction layer (*E: an attention and a latent-MoE block, the eh_proj 2h -> h and
    three norms, built once for both depths) and the router's expert-bias tensor of each of the 41
    MoE layers (a buffer in Megatron, not a parameter)."""
    spec = load_spec_text(recipe_text("nemotron-3-super"))
    ctx = make_context(spec)
    one = Layout(tp=1, pp=1, vpp=1, cp=1, dp=1, ep=1, etp=1, sp=False, micro_batch_size=1, num_microbatches=1)
    held = stage_memory(ctx, one, assign_stages(ctx, 1, 1)[1], DEFAULT_EFFICIENCY)[0].params
    assert held + 41 * 512 == 123_611_033_088
    assert (spec.model.mtp_num_layers, spec.model.mtp_shared_weights) == (2, True)
    assert spec.model.moe is not None and spec.model.moe.latent_size == 1024


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_architectures_render_their_features(name):
    spec = load_spec_text(recipe_text(name))
    text = render_launch(build_plan(spec, top=1), RenderOptions(engine="megatron-lm"))["launch.sh"]
    attention, moe = spec.model.attention, spec.model.moe
    assert attention is not None and moe is not None
    assert ("--qk-layernorm" in text) == attention.qk_layernorm
    assert ("--window-size 128,0" in text and "--window-attn-skip-freq 2" in text) == (attention.window_size == 128)
    assert ("--softmax-type learnable" in text) == attention.sinks
    assert ("--disable-bias-linear" in text) != spec.model.linear_bias
    assert ("--moe-latent-size 1024" in text) == (moe.latent_size == 1024)
