"""The search's virtual pipeline stages: every even interleaving Megatron's VPP flags accept, up to
one layer per virtual stage, next to 1-4 with any split; and verdicts that match the rules."""

from __future__ import annotations

from collections import Counter
from itertools import product

import pytest

from benchmarks.scale.truth import convert, load_runs
from megacpp.planner.megatron.args import TrainOptions, megatron_args
from megacpp.planner.plan import build_plan, make_context
from megacpp.planner.search.layout import Context, Layout
from megacpp.planner.search.rules import LEVELS, RULES, applicable, divisors
from megacpp.planner.search.space import MBS_AUTO_CHOICES, search, vpp_choices
from tests.conftest import TINY_DENSE, TINY_MOE, make_spec

HYBRID = {**TINY_MOE, "model": {**TINY_MOE["model"], "pattern": "(AEME)*4",
                                "mamba": {"num_heads": 8, "head_dim": 16, "state_dim": 16, "num_groups": 4}}}


def dense(layers: int, **changes):
    return make_spec(TINY_DENSE, **{"model.pattern": f"(AD)*{layers}", **changes})


def test_even_interleaving_reaches_one_layer_per_virtual_stage():
    # NVIDIA's Qwen3-30B-A3B recipe: 48 layers, pp=2, vp=12 and vp=24
    ctx = make_context(dense(48))
    assert vpp_choices(ctx, 2) == [1, 2, 3, 4, 6, 8, 12, 24]
    assert vpp_choices(ctx, 4) == [1, 2, 3, 4, 6, 12]
    legal = {(lay.pp, lay.vpp) for lay in search(ctx).legal}
    assert {(2, 12), (2, 24), (4, 12), (8, 6)} <= legal
    assert max(v for p, v in legal if p == 2) == 24  # one layer per virtual stage, no further


def test_uneven_interleaving_stops_at_four():
    # 61 layers (DeepSeek-V3's count) divide by no pp > 1: Megatron's VPP flags cannot interleave
    # them evenly, and beyond vpp=4 the search does not write custom layouts
    ctx = make_context(dense(61))
    assert all(vpp_choices(ctx, pp) == [1, 2, 3, 4] for pp in (2, 4, 8))
    # 80 layers, pp=8 (NVIDIA's Llama-3-70B vp=5): 10 per rank
    assert vpp_choices(make_context(dense(80)), 8) == [1, 2, 3, 4, 5, 10]


def test_pins_and_cuts_decide_vpp_alone():
    assert vpp_choices(make_context(dense(61, parallel={"vpp": 7})), 2) == [7]
    cut = make_spec(HYBRID, **{"model.pattern": "AEM|EAE|MEA|EME", "backend.megatron": "main"})
    assert vpp_choices(make_context(cut), 2) == [1, 2, 4]  # divisors of the 4 segments


def test_an_even_interleaving_is_rendered_with_megatrons_vpp_flag():
    spec = dense(48, parallel={"tp": 1, "cp": 1, "pp": 2, "vpp": 24})
    plan = build_plan(spec)
    cand = plan.candidates[0]
    assert (cand.layout.pp, cand.layout.vpp) == (2, 24)
    assert cand.split.kind == "even" and cand.split.sizes == [1] * 48
    args = megatron_args(plan.context, cand, TrainOptions())
    assert args[args.index("--num-virtual-stages-per-pipeline-rank") + 1] == "24"


def test_new_vpp_layouts_obey_the_interleaved_schedules_micro_batch_rule():
    # 8 GPUs, pp=2, dp=4, global batch 12: 3 micro-batches, not a multiple of pp
    spec = dense(48, **{"training.global_batch_size": 12, "parallel": {"tp": 1, "cp": 1, "pp": 2}})
    plan = build_plan(spec)
    assert {c.layout.vpp for c in plan.candidates} == {1}
    assert plan.rejected.by_rule["vpp-microbatches"] == 7  # vpp 2, 3, 4, 6, 8, 12, 24


def test_a_published_run_without_interleaving_is_planned_without_it():
    """A scale-benchmark row with vp null ran the plain 1F1B schedule: its spec pins vpp=1, where
    the search would otherwise pick an interleaving NVIDIA did not run."""
    rows = [r for r in load_runs() if r["vp"] is None and r["pp"] > 1 and r["system"] in ("H100", "B200")]
    assert rows
    for row in rows:
        spec = convert(row).spec
        assert spec is None or spec["parallel"]["vpp"] == 1, row["row_id"]


def test_core_v016_hybrid_rejects_every_new_vpp():
    ctx = make_context(make_spec(HYBRID, **{"model.pattern": "(AEME)*6"}))  # 24 layers
    result = search(ctx)
    assert {lay.vpp for lay in result.legal} == {1}
    assert result.rejections.by_rule["hybrid-no-vpp"] > 0


def _brute_force(ctx: Context) -> tuple[set[tuple[int, ...]], Counter[str]]:
    """Every layout of the space checked whole: legal ones, and the first error rule (in level
    order) of each rejected one."""
    errors = sorted((r for r in applicable(ctx) if r.severity == "error"), key=lambda r: (r.level, RULES.index(r)))
    world, gbs = ctx.world, ctx.spec.training.global_batch_size
    mbs_choices = MBS_AUTO_CHOICES if ctx.spec.training.micro_batch_size == "auto" else (ctx.spec.training.micro_batch_size,)
    legal, by_rule = set(), Counter()
    for tp, cp, pp in product(divisors(world), repeat=3):
        if (world // tp) % cp or (world // (tp * cp)) % pp:
            continue
        dp = world // (tp * cp * pp)
        for vpp, ep, etp, mbs in product(vpp_choices(ctx, pp), divisors(world) if ctx.has_moe else [1],
                                         [d for d in divisors(world) if d <= ctx.cluster.nvlink_domain] if ctx.has_moe else [tp],
                                         mbs_choices):
            m = gbs // (mbs * dp) if gbs % (mbs * dp) == 0 else 0
            lay = Layout(tp=tp, cp=cp, pp=pp, vpp=vpp, dp=dp, ep=ep, etp=etp, sp=tp > 1 and ctx.te,
                         micro_batch_size=mbs, num_microbatches=m)
            first = next((r for r in errors if r.check(ctx, lay)), None)
            if first is None:
                legal.add((tp, cp, pp, vpp, ep, etp, mbs))
            else:
                by_rule[first.id] += 1
    return legal, by_rule


@pytest.mark.parametrize("spec", [
    dense(48, **{"training.micro_batch_size": "auto"}),
    make_spec(TINY_MOE, **{"model.pattern": "(AE)*16", "backend.transformer_engine": True}),
    make_spec(HYBRID, **{"model.pattern": "(AEME)*6", "backend.megatron": "main"}),
    make_spec(HYBRID, **{"model.pattern": "(AEME)*6"}),
], ids=["dense-48-mbs-auto", "moe-te", "hybrid-main", "hybrid-core-v016"])
def test_memoised_verdicts_match_checking_every_layout_whole(spec):
    """The search checks a rule once per combination of the axes it reads and counts rejected
    sub-trees unwalked; checking every layout of the space whole gives the same legal layouts and
    the same count per rule."""
    ctx = make_context(spec)
    assert LEVELS[0] == "spec" and not any(r.level == 0 and r.check(ctx, Layout()) for r in applicable(ctx) if r.severity == "error")
    result = search(ctx)
    legal, by_rule = _brute_force(ctx)
    assert {(x.tp, x.cp, x.pp, x.vpp, x.ep, x.etp, x.micro_batch_size) for x in result.legal} == legal
    assert result.rejections.by_rule == by_rule
    assert result.considered == len(legal) + sum(by_rule.values())
    for rule_id, shown in result.rejections.examples.items():
        rule = next(r for r in RULES if r.id == rule_id)
        for lay, message in shown:
            assert rule.check(ctx, lay) == message
