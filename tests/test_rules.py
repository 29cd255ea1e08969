"""Each rule rejects what Megatron rejects, with the values and the fix in its message."""

from __future__ import annotations

import pytest

from megacpp.planner.errors import PlanError
from megacpp.planner.plan import build_plan, make_context
from megacpp.planner.search.layout import Layout
from megacpp.planner.search.rules import RULES, check_layout, get_rule
from megacpp.planner.validation import validate_spec
from tests.conftest import TINY_DENSE, TINY_MOE, make_spec

HYBRID = {
    **TINY_DENSE,
    "model": {
        "pattern": "(AEME)*2 AEMR",
        "hidden_size": 64,
        "vocab_size": 250,
        "attention": {"num_heads": 4, "num_query_groups": 2, "head_dim": 16},
        "mamba": {"num_heads": 8, "head_dim": 16, "state_dim": 16, "num_groups": 4},
        "moe": {"num_experts": 8, "top_k": 2, "ffn_hidden_size": 64},
        "recurrent": {"num_heads": 4, "head_dim": 16},
    },
    "backend": {"transformer_engine": True, "megatron": "core_v0.16"},
}


def errors(spec, **layout):
    lay = Layout(**{"dp": 8 // (layout.get("tp", 1) * layout.get("pp", 1) * layout.get("cp", 1)), **layout})
    return {v.rule: v.message for v in check_layout(make_context(spec), lay) if v.severity == "error"}


def warnings(spec, **layout):
    lay = Layout(**{"dp": 8 // (layout.get("tp", 1) * layout.get("pp", 1) * layout.get("cp", 1)), **layout})
    return {v.rule for v in check_layout(make_context(spec), lay) if v.severity == "warning"}


def test_rule_ids_are_unique_kebab_case_and_documented():
    ids = [r.id for r in RULES]
    assert len(ids) == len(set(ids))
    for r in RULES:
        assert r.id == r.id.lower() and " " not in r.id and "_" not in r.id
        assert r.doc and r.where and r.fails and r.passes, r.id


def test_unknown_rule_suggests():
    with pytest.raises(PlanError, match="did you mean 'tp-divides-heads'"):
        get_rule("tp-divide-heads")


def test_tp_divides_heads_message_has_values_and_choices():
    spec = make_spec(TINY_DENSE, **{"model.attention": {"num_heads": 6, "num_query_groups": 6, "head_dim": 16}, "model.hidden_size": 96})
    msg = errors(spec, tp=4, etp=4)["tp-divides-heads"]
    assert "tp=4" in msg and "num_heads=6" in msg and "{1, 2, 3, 6}" in msg


def test_query_groups_may_be_fewer_than_tp():
    spec = make_spec(TINY_DENSE)  # 2 groups
    assert "query-groups-vs-tp" not in errors(spec, tp=4, etp=4)


def test_moe_with_tp_needs_sp_and_te_for_sp():
    moe = make_spec(TINY_MOE)
    assert "moe-tp-needs-sp" in errors(moe, tp=2, etp=2)
    assert "sp-needs-te-norm" in errors(moe, tp=2, etp=2, sp=True)
    te = make_spec(TINY_MOE, **{"backend.transformer_engine": True})
    assert errors(te, tp=2, etp=1, sp=True, ep=4) == {}


def test_sp_with_tp1_is_a_warning_not_an_error():
    spec = make_spec(TINY_DENSE, **{"parallel.sp": True, "backend.transformer_engine": True})
    assert "sp-needs-tp" in warnings(spec, tp=1, sp=True)
    assert errors(spec, tp=1, sp=True) == {}


def test_expert_folding_allows_ep_beyond_dp():
    te = make_spec(TINY_MOE, **{"backend.transformer_engine": True})
    # world 8, tp=4, ep=8, etp=1: EDP = 1, legal (megatron_rules.md §1, verified)
    assert errors(te, tp=4, ep=8, etp=1, sp=True) == {}
    assert "expert-grid-divides-world" in errors(te, tp=2, ep=8, etp=2, sp=True)


def test_mamba_rules():
    spec = make_spec(HYBRID)
    assert "tp-divides-mamba-groups" in errors(spec, tp=8, etp=1, sp=True)
    assert "mamba-cp-heads" not in errors(spec, tp=2, cp=2, etp=1, sp=True)
    no_te = make_spec(HYBRID, **{"backend.transformer_engine": False})
    assert "mamba-needs-te" not in errors(no_te) and "mamba-needs-te" in warnings(no_te)
    assert "mamba-needs-te" not in warnings(spec)


def test_recurrent_blocks_forbid_cp_and_warn_on_core_v016():
    spec = make_spec(HYBRID)
    assert "recurrent-no-cp" in errors(spec, cp=2)
    plan = build_plan(spec)
    assert any(n.rule == "recurrent-runtime-only" for n in plan.notes)
    main = make_spec(HYBRID, **{"backend.megatron": "main"})
    assert not any(n.rule == "recurrent-runtime-only" for n in build_plan(main).notes)


def test_core_v016_hybrid_has_no_vpp_but_main_does():
    v016 = make_spec(HYBRID, **{"model.pattern": "(AEME)*4"})
    assert "hybrid-no-vpp" in errors(v016, pp=2, vpp=2, num_microbatches=4, micro_batch_size=1)
    main = make_spec(HYBRID, **{"model.pattern": "(AEME)*4", "backend.megatron": "main"})
    assert "hybrid-no-vpp" not in errors(main, pp=2, vpp=2, num_microbatches=4, micro_batch_size=1)


def test_pipe_cuts_pin_the_stage_count():
    three = make_spec(HYBRID, **{"model.pattern": "AEME|AEME|AEMR", "backend.megatron": "main"})
    assert "pipe-cuts-match-stages" in errors(three, pp=2)
    # 3 segments on 8 GPUs: pp=3 does not divide 8 and pp=1 cannot interleave 3 virtual stages
    assert build_plan(three).legal_count == 0
    four = make_spec(HYBRID, **{"model.pattern": "AEM|EAE|MEA|EMR", "backend.megatron": "main"})
    plan = build_plan(four, top=50)
    assert plan.legal_count
    assert {(c.layout.pp, c.layout.vpp) for c in plan.candidates} <= {(2, 2), (4, 1)}
    assert all(c.split.sizes == [3, 3, 3, 3] for c in plan.candidates)


def test_core_v016_cuts_must_have_equal_middle_stages():
    bad = make_spec(HYBRID, **{"model.pattern": "AE|MEA|EMEAE|MR"})
    assert "pipe-cuts-expressible" in errors(bad, pp=4, dp=2)
    good = make_spec(HYBRID, **{"model.pattern": "AEM|EAE|MEA|EMR"})
    assert "pipe-cuts-expressible" not in errors(good, pp=4, dp=2)


def test_interleaved_schedule_needs_microbatches_multiple_of_pp():
    spec = make_spec(TINY_DENSE)
    assert "vpp-microbatches" in errors(spec, pp=4, vpp=2, dp=2, num_microbatches=6)
    assert "vpp-microbatches" not in errors(spec, pp=4, vpp=2, dp=2, num_microbatches=8)


def test_nvlink_spill_is_a_warning():
    spec = make_spec(TINY_MOE, **{"cluster.nodes": 4, "backend.transformer_engine": True})
    ctx = make_context(spec)
    found = {v.rule: v.severity for v in check_layout(ctx, Layout(tp=1, dp=32, ep=16, etp=1))}
    assert found.get("ep-outside-nvlink") == "warning"


def test_fully_pinned_layout_is_checked_exactly():
    spec = make_spec(TINY_DENSE, **{"parallel": {"tp": 2, "pp": 2, "cp": 1, "vpp": 1}})
    plan = build_plan(spec)
    assert plan.considered == 1 and plan.legal_count == 1
    assert plan.candidates[0].layout.tp == 2 and plan.candidates[0].layout.dp == 2
    bad = make_spec(TINY_DENSE, **{"parallel": {"tp": 3, "pp": 1, "cp": 1, "vpp": 1}})
    plan = build_plan(bad)
    assert plan.legal_count == 0 and plan.considered == 1
    result = validate_spec(bad)  # a fully pinned layout reports every rule it breaks
    assert not result["valid"]
    assert any("tp-divides-heads" in e for e in result["errors"])
    assert any("model-parallel-divides-world" in e for e in result["errors"])
