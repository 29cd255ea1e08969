"""Latent MoE, sliding-window attention, attention sinks, QK layernorm and linear biases: what the
spec accepts, what they cost, and the Megatron rules they bring."""

from __future__ import annotations

import pytest

from megacpp.planner.cost.coefficients import DEFAULT_EFFICIENCY
from megacpp.planner.cost.communication import communication
from megacpp.planner.cost.flops import attention_share, block_flops, block_gemms, windowed_layers
from megacpp.planner.cost.memory import stage_memory
from megacpp.planner.cost.step import block_seconds, matmul_seconds
from megacpp.planner.errors import SpecError
from megacpp.planner.plan import make_context
from megacpp.planner.search.layout import Layout
from megacpp.planner.search.rules import check_layout
from megacpp.planner.search.stages import assign_stages
from tests.conftest import TINY_DENSE, TINY_MOE, make_spec


def L(tp=1, pp=1, ep=1, etp=1, dp=8, sp=False) -> Layout:
    return Layout(tp=tp, pp=pp, vpp=1, cp=1, dp=dp, ep=ep, etp=etp, sp=sp, micro_batch_size=1, num_microbatches=2)


def windowed(**attention):
    return make_spec(TINY_DENSE, **{"model.pattern": "(AD)*4", "training.seq_length": 4096,
                                    "model.attention": {"num_heads": 4, "num_query_groups": 2, "head_dim": 16, **attention}})


def test_window_full_every_picks_megatrons_full_layers():
    """window_attn_skip_freq N keeps the layers whose (1-based) number N divides full."""
    assert windowed_layers(make_context(windowed(window_size=128, window_full_every=2))) == [True, False, True, False]
    assert windowed_layers(make_context(windowed(window_size=128))) == [True] * 4
    assert windowed_layers(make_context(windowed())) == [False] * 4


def test_windowed_attention_flops_follow_the_window():
    full, ctx = make_context(windowed()), make_context(windowed(window_size=128, window_full_every=2))
    w, s = 128, 4096
    short = ((w + 1) - w * (w + 1) / (2 * s)) / (s / 2)
    assert attention_share(ctx) == pytest.approx((short + 1) / 2)
    core = 2 * 4 * 16 * s  # the causal QK^T and PV term of one token
    assert block_flops(full, "A") - block_flops(ctx, "A") == pytest.approx(core * (1 - attention_share(ctx)))
    assert attention_share(make_context(windowed(window_size=8192))) == 1.0  # a window past the sequence is full


def test_te_fused_attention_time_follows_the_window_and_the_local_softmax_does_not():
    te = {"backend.transformer_engine": True}
    full = make_context(make_spec(TINY_DENSE, **te, **{"training.seq_length": 4096}))
    ctx = make_context(make_spec(TINY_DENSE, **te, **{"training.seq_length": 4096, "model.attention.window_size": 128}))
    lay = L()
    # a 128-key window does 6% of the causal FLOPs at 4k tokens, and its measured kernel takes
    # several times that share: still well under the full kernel's time
    timed = block_gemms(ctx, "A", lay).attention_time_share
    assert attention_share(ctx) < 0.1 and 2 * attention_share(ctx) < timed < 0.5
    assert block_gemms(full, "A", lay).attention_time_share == 1.0
    assert matmul_seconds(ctx, lay, "A", DEFAULT_EFFICIENCY) < matmul_seconds(full, lay, "A", DEFAULT_EFFICIENCY)
    local = make_context(make_spec(TINY_DENSE, **{"training.seq_length": 4096, "model.attention.window_size": 128}))
    assert block_gemms(local, "A", lay).attention == block_gemms(make_context(make_spec(TINY_DENSE, **{"training.seq_length": 4096})), "A", lay).attention


def test_learnable_softmax_offsets_make_the_fused_kernel_slower_as_measured():
    """GPT-OSS's sinks (softmax_type learnable): the measured H100 kernel is 10-35% slower than the
    plain causal one, with or without a window; their FLOPs are the same."""
    te = {"backend.transformer_engine": True, "training.seq_length": 4096}
    plain, sinks = (make_context(make_spec(TINY_DENSE, **te, **extra)) for extra in ({}, {"model.attention.sinks": True}))
    lay = L()
    assert block_flops(sinks, "A") == block_flops(plain, "A")
    assert 1.05 < block_gemms(sinks, "A", lay).attention_time_share < 1.4
    assert matmul_seconds(sinks, lay, "A", DEFAULT_EFFICIENCY) > matmul_seconds(plain, lay, "A", DEFAULT_EFFICIENCY)
    window = {"model.attention.window_size": 128, "model.attention.window_full_every": 2}
    both, windowed_only = (make_context(make_spec(TINY_DENSE, **te, **window, **extra)) for extra in ({"model.attention.sinks": True}, {}))
    assert block_gemms(both, "A", lay).attention_time_share > block_gemms(windowed_only, "A", lay).attention_time_share


def test_latent_moe_dispatches_latents_and_prices_its_projections():
    te = {"backend.transformer_engine": True, "model.moe.ffn_hidden_size": 128}
    base, latent = make_spec(TINY_MOE, **te), make_spec(TINY_MOE, **te, **{"model.moe.latent_size": 16})
    lay = L(ep=4)
    stages = assign_stages(make_context(base), 1, 1)[1]

    def ep_bytes(spec):
        ctx = make_context(spec)
        mem = stage_memory(ctx, lay, stages, DEFAULT_EFFICIENCY)
        comms = communication(ctx, lay, stages, mem, rank=0, block_seconds=lambda: block_seconds(ctx, lay, DEFAULT_EFFICIENCY, 1.0))
        return next(c.bytes_per_step for c in comms if c.axis == "ep")

    assert ep_bytes(latent) == pytest.approx(ep_bytes(base) * 16 / 64)
    h, f, k, e = 64, 128, 2, 8
    assert block_flops(make_context(latent), "E") == 2 * h * e + k * 2 * 16 * f * 3 + 4 * h * 16


def test_latent_window_and_bias_messages_name_the_key():
    with pytest.raises(SpecError, match="window_full_every=2 .*set window_size"):
        make_spec(TINY_DENSE, **{"model.attention.window_full_every": 2})
    local_latent = make_context(make_spec(TINY_MOE, **{"model.moe.latent_size": 16}))
    assert [v.rule for v in check_layout(local_latent, L()) if v.severity == "error"] == ["moe-latent-needs-te"]
    bias = make_context(make_spec(TINY_MOE, **{"model.linear_bias": True}))
    assert [v.rule for v in check_layout(bias, L(ep=2, etp=2, tp=2, dp=4, sp=True)) if v.severity == "error"][-1:] == ["moe-bias-needs-etp1"]
    shared = make_context(make_spec(TINY_MOE, **{"model.linear_bias": True, "model.moe.shared_expert_ffn_hidden_size": 32}))
    assert "shared-expert-no-bias" in [v.rule for v in check_layout(shared, L())]


def test_experts_padded_to_capacity_run_the_capacity_and_render_the_flag():
    """--moe-pad-expert-input-to-capacity: every expert runs capacity_factor x its balanced share
    (GEMMs, saved activations, dispatched bytes), which is work but not model FLOPs."""
    from megacpp.planner.cost.activations import block_activation_bytes
    from megacpp.planner.megatron.args import TrainOptions, megatron_args
    from megacpp.planner.plan import build_plan

    te = {"backend.transformer_engine": True, "model.moe.capacity_factor": 1.5}
    dropping, padded = make_spec(TINY_MOE, **te), make_spec(TINY_MOE, **te, **{"model.moe.pad_to_capacity": True})
    lay = L(ep=4)
    (m, k, n, g), (m2, k2, n2, g2) = (block_gemms(make_context(s), "E", lay).grouped[0] for s in (dropping, padded))
    assert (m2, k2, n2, g2) == (m * 1.5, k, n, g)
    assert block_activation_bytes(make_context(padded), "E", lay) > block_activation_bytes(make_context(dropping), "E", lay)
    assert block_flops(make_context(padded), "E") == block_flops(make_context(dropping), "E")
    def args(spec) -> list[str]:
        plan = build_plan(spec, top=1)
        return megatron_args(plan.context, plan.candidates[0], TrainOptions())

    assert "--moe-pad-expert-input-to-capacity" in args(padded)
    assert "--moe-pad-expert-input-to-capacity" not in args(dropping)


@pytest.mark.parametrize(("moe", "message"), [
    ({"pad_to_capacity": True}, "pad_to_capacity pads to the capacity model.moe.capacity_factor sets"),
    ({"pad_to_capacity": True, "capacity_factor": 1.0, "dispatcher": "flex", "flex_backend": "deepep"},
     "does not run with the flex dispatcher's deepep backend"),
])
def test_padding_to_capacity_needs_a_capacity_and_no_deepep(moe, message):
    with pytest.raises(SpecError, match=message):
        make_spec(TINY_MOE, **{f"model.moe.{k}": v for k, v in moe.items()})
