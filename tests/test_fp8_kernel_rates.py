"""fp8 matmul time from the kernel-rate tables' fp8 rows (TE's Linear and GroupedLinear under the
spec's fp8 recipe), and the MAMF fallback where a table has no rows of the recipe."""

from __future__ import annotations

import dataclasses
import json

import pytest

from megacpp.planner.cost import step
from megacpp.planner.cost.coefficients import BLACKWELL_MATMUL_RATE_SCALE, DEFAULT_EFFICIENCY
from megacpp.planner.cost.flops import block_gemms
from megacpp.planner.cost.kernel_rates import RATES_DIR, TABLES, kernel_rates
from megacpp.planner.plan import make_context
from megacpp.planner.search.layout import Layout
from megacpp.planner.spec.loading import load_spec

LLAMA = "recipes/llama-8b-dense.yaml"


def context(preset: str, precision: str, recipe: str = "tensorwise"):
    fp8 = [f"training.fp8_recipe={recipe}"] if precision == "fp8" else []
    spec = load_spec(LLAMA, [f"cluster.preset={preset}", "cluster.nodes=1", "backend.transformer_engine=true",
                             f"training.precision={precision}", *fp8])
    return make_context(spec)


def mamf_price(ctx, lay: Layout, letter: str) -> float:
    """What matmul_seconds charged for fp8 before the tables had fp8 rows: FLOPs at the fp8 MAMF."""
    rate = ctx.cluster.mamf_fp8_tflops * 1e12 * DEFAULT_EFFICIENCY.matmul
    return 3 * block_gemms(ctx, letter, lay).flops * step.gpu_repeats(ctx.spec.training.recompute) / rate


def test_fp8_linear_of_a_large_shape_is_faster_than_bf16_on_h100():
    rates = kernel_rates("h100-sxm-8")
    assert rates is not None and all(rates.has_fp8(r) for r in ("tensorwise", "delayed", "blockwise"))
    assert not rates.has_fp8("mxfp8")  # Blackwell only
    for recipe in ("tensorwise", "delayed", "blockwise"):
        for m, k, n in ((8192, 4096, 14336), (16384, 8192, 8192), (32768, 4096, 4096)):
            fp8, bf16 = rates.linear_seconds(m, k, n, recipe), rates.linear_seconds(m, k, n)
            assert 1.2 * fp8 < bf16 < 2.5 * fp8, (recipe, m, k, n, fp8, bf16)
    lay = Layout(tp=1, dp=8, num_microbatches=64)
    fp8_ctx, bf16_ctx = context("h100-sxm-8", "fp8"), context("h100-sxm-8", "bf16")
    fp8, bf16 = (step.matmul_seconds(c, lay, "D", DEFAULT_EFFICIENCY) for c in (fp8_ctx, bf16_ctx))
    assert fp8 < bf16 / 1.2  # the MLP block is all Linears
    assert fp8 != pytest.approx(mamf_price(fp8_ctx, lay, "D"))
    assert step.matmul_seconds(context("h100-sxm-8", "fp8", "delayed"), lay, "D", DEFAULT_EFFICIENCY) != fp8


@pytest.mark.parametrize("preset", sorted(TABLES))
def test_fp8_rows_reproduce_their_measurements(preset):
    rates = kernel_rates(preset)
    doc = json.loads((RATES_DIR / TABLES[preset]).read_text())
    recipes = {r["recipe"] for r in doc.get("fp8_linear", [])}
    assert set(rates.fp8_linear) == recipes
    for row in doc.get("fp8_linear", [])[::13]:
        assert rates.linear_seconds(row["m"], row["k"], row["n"], row["recipe"]) == pytest.approx(row["seconds"], rel=1e-9)
    for row in doc.get("fp8_grouped_linear", [])[::7]:
        assert rates.grouped_linear_seconds(row["g"], row["m"], row["k"], row["n"], row["recipe"]) == pytest.approx(row["seconds"], rel=1e-9)
    for recipe in recipes - set(rates.fp8_grouped_linear):  # an fp8 GroupedLinear without its own rows: that many fp8 Linears
        assert rates.grouped_linear_seconds(8, 1024, 4096, 14336, recipe) == pytest.approx(
            8 * rates.linear_seconds(1024, 4096, 14336, recipe))
    if doc.get("fp8_source"):
        assert {"command", "device", "torch", "cuda", "transformer_engine"} <= set(doc["fp8_source"])


def test_a_table_without_fp8_rows_prices_fp8_linears_at_the_mamf_and_core_attention_from_its_bf16_rows(monkeypatch):
    """A preset whose table has no fp8 rows prices the fp8 Linears at the fp8 MAMF; core attention,
    which TE's fp8 recipes leave in bf16, still comes from the table's bf16 fused-attention rows."""
    rates = kernel_rates("h100-sxm-8")
    bare = dataclasses.replace(rates, fp8_linear={}, fp8_grouped_linear={})
    assert not bare.has_fp8("tensorwise")
    with pytest.raises(ValueError, match="no fp8 rows of recipe tensorwise"):
        bare.linear_seconds(4096, 4096, 4096, "tensorwise")
    monkeypatch.setattr(step, "kernel_rates", lambda name: bare)
    lay = Layout(tp=1, dp=8, num_microbatches=64)
    ctx = context("h100-sxm-8", "fp8")
    assert step.matmul_seconds(ctx, lay, "D", DEFAULT_EFFICIENCY) == pytest.approx(mamf_price(ctx, lay, "D"))
    attention = block_gemms(ctx, "A", lay)
    core = bare.fused_attention_seconds(*attention.fused_attention) * attention.attention_time_share
    core *= 4 / 3 if ctx.spec.training.recompute != "none" else 1.0  # selective recompute repeats it
    rate = ctx.cluster.mamf_fp8_tflops * 1e12 * DEFAULT_EFFICIENCY.matmul
    expected = 3 * attention.linear_flops * step.gpu_repeats(ctx.spec.training.recompute) / rate + core
    assert step.matmul_seconds(ctx, lay, "A", DEFAULT_EFFICIENCY) == pytest.approx(expected)
    assert core > 3 * attention.other_flops / rate  # at the fp8 MAMF it would have been faster


def test_a_preset_without_a_table_prices_a_large_fp8_gemm_at_mamf():
    ctx = context("b200-sxm-8", "fp8")
    lay = Layout(tp=1, dp=8, num_microbatches=64)
    assert kernel_rates("b200-sxm-8") is None
    # at the preset's fitted Blackwell matmul rate (cost.coefficients.BLACKWELL_MATMUL_RATE_SCALE)
    assert ctx.cluster.matmul_rate_scale == BLACKWELL_MATMUL_RATE_SCALE
    assert step.matmul_seconds(ctx, lay, "D", DEFAULT_EFFICIENCY) == pytest.approx(
        mamf_price(ctx, lay, "D") / BLACKWELL_MATMUL_RATE_SCALE)
