"""Pinned pipeline splits: the embedding and loss counted as layers (Megatron's account flags) and
explicit pipeline layout strings, empty stages included."""

from __future__ import annotations

import shlex

import pytest

from megacpp.planner.cost.flops import head_flops
from megacpp.planner.errors import SpecError
from megacpp.planner.megatron.render import RenderOptions, render_launch
from megacpp.planner.plan import build_plan, make_context
from megacpp.planner.search.layout import Layout
from megacpp.planner.search.rules import check_layout
from megacpp.planner.search.space import vpp_choices
from megacpp.planner.search.stages import assign_stages, unit_weights
from megacpp.planner.spec.pipeline_layout import stage_layers
from tests.conftest import TINY_DENSE, make_spec

# Llama-3.1-405B as NVIDIA runs it on 8 x 16 GB200/B200 ranks: 126 layers on pp 16 x vp 8
LLAMA_405B = {
    "name": "llama31-405b",
    "model": {"pattern": "(AD)*126", "hidden_size": 16384, "vocab_size": 128256,
              "attention": {"num_heads": 128, "num_query_groups": 8, "head_dim": 128},
              "mlp": {"ffn_hidden_size": 53248}},
    "training": {"seq_length": 8192, "global_batch_size": 2048, "micro_batch_size": 1},
    "cluster": {"preset": "gb200-nvl72", "nodes": 64},
    "parallel": {"tp": 4, "pp": 16, "vpp": 8, "cp": 1},
}


def errors(spec, **layout):
    lay = Layout(**layout)
    return {v.rule: v.message for v in check_layout(make_context(spec), lay) if v.severity == "error"}


def words(plan) -> list[str]:
    return shlex.split(render_launch(plan, RenderOptions(engine="megatron-lm"))["launch.sh"].replace("\\\n", " "))


def test_llama_405b_on_128_virtual_stages_is_illegal_without_the_account_flags():
    plan = build_plan(make_spec(LLAMA_405B), top=1)
    assert not plan.candidates
    assert "stages-exceed-layers" in plan.rejected.by_rule


@pytest.mark.parametrize("dialect", ["core_v0.16", "main"])
def test_llama_405b_on_pp16_vpp8_is_legal_with_both_account_flags(dialect):
    spec = make_spec(LLAMA_405B, **{"parallel.account_for_embedding": True, "parallel.account_for_loss": True,
                                    "backend.megatron": dialect})
    plan = build_plan(spec, top=1)
    cand = plan.candidates[0]
    assert (cand.layout.pp, cand.layout.vpp, cand.split.kind) == (16, 8, "account")
    # 128 units, one per virtual stage: the first holds only the embedding, the last only the loss
    assert cand.split.sizes == [0] + [1] * 126 + [0]
    first = next(s for s in cand.stages if s.pp_rank == 0 and s.vp_stage == 0)
    last = next(s for s in cand.stages if s.pp_rank == 15 and s.vp_stage == 7)
    assert (first.blocks, first.embedding, last.blocks, last.output_head) == ("", True, "", True)
    argv = words(plan)
    assert "--account-for-embedding-in-pipeline-split" in argv and "--account-for-loss-in-pipeline-split" in argv
    assert argv[argv.index("--num-virtual-stages-per-pipeline-rank") + 1] == "8"
    assert "--pipeline-model-parallel-layout" not in argv


def test_account_split_gives_first_and_last_stage_one_layer_fewer():
    spec = make_spec(TINY_DENSE, **{"model.pattern": "(AD)*6", "parallel.account_for_embedding": True,
                                    "parallel.account_for_loss": True})
    split, stages = assign_stages(make_context(spec), 2, 1)
    assert split.sizes == (3, 3) and [s.blocks for s in stages] == ["AD" * 3, "AD" * 3]
    split, _ = assign_stages(make_context(spec), 4, 1)
    assert split.sizes == (1, 2, 2, 1)


def test_account_split_must_divide_as_megatron_checks():
    spec = make_spec(TINY_DENSE, **{"model.pattern": "(AD)*7", "parallel.account_for_embedding": True})
    assert "account-split-divides" not in errors(spec, pp=2, dp=4)  # 7 + 1 = 8 units
    assert "not divisible by pp=3" in errors(spec, pp=3, dp=2, num_microbatches=8)["account-split-divides"]
    assert "not divisible by vpp=3" in errors(spec, pp=2, vpp=3, dp=4)["account-split-divides"]


def test_vpp_search_counts_the_accounted_units():
    spec = make_spec(LLAMA_405B, **{"parallel.account_for_embedding": True, "parallel.account_for_loss": True,
                                    "parallel.vpp": None})
    assert 8 in vpp_choices(make_context(spec), 16)


def test_pipeline_layout_pins_stages_empty_ones_included():
    spec = make_spec(LLAMA_405B, **{"parallel.pipeline_layout": "E|(t|)*126L"})
    plan = build_plan(spec, top=1)
    cand = plan.candidates[0]
    assert cand.split.kind == "layout" and cand.split.sizes == [0] + [1] * 126 + [0]
    argv = words(plan)
    layout = argv[argv.index("--pipeline-model-parallel-layout") + 1]
    assert stage_layers(layout) == tuple(cand.split.sizes) and layout.startswith("E|t|") and layout.endswith("|t|L")


def test_pipeline_layout_stage_count_must_be_pp_times_vpp():
    spec = make_spec(TINY_DENSE, **{"model.pattern": "(AD)*6", "parallel.pipeline_layout": "Et*2|t*2|t|tL"})
    assert "pipeline-layout-stages" not in errors(spec, pp=2, vpp=2, dp=4)
    message = errors(spec, pp=4, vpp=2, dp=2)["pipeline-layout-stages"]
    assert "has 4 stages but pp*vpp = 4*2 = 8" in message
    plan = build_plan(make_spec(TINY_DENSE, **{"model.pattern": "(AD)*6", "parallel.pipeline_layout": "Et*2|t*2|t|tL",
                                               "parallel.pp": 2}), top=1)
    assert plan.candidates[0].split.sizes == [2, 2, 1, 1] and plan.candidates[0].layout.vpp == 2


@pytest.mark.parametrize("changes,message", [
    ({"parallel.pipeline_layout": "Et*5|L"}, r"has 5 decoder layers \(t\) but the pattern has 6"),
    ({"parallel.pipeline_layout": "Et*3|t*3m|L"}, r"places 1 MTP layer\(s\) \(m\) but model.mtp_num_layers is 0; drop m"),
    ({"parallel.pipeline_layout": "Et*3|t*3mm|L", "model.mtp_num_layers": 1}, "write m 1 times"),
    ({"parallel.pipeline_layout": "Et*3|t*2mt|L", "model.mtp_num_layers": 1}, "every decoder layer t must come before"),
    ({"parallel.pipeline_layout": "Et*3|t*3m|mL", "model.mtp_num_layers": 2}, "all MTP layers m must sit in one stage"),
    ({"parallel.pipeline_layout": "Et*3|t*3x|L"}, r"unknown symbols 'x'; use E, t, m, L"),
    ({"parallel.pipeline_layout": "t*3E|t*3L"}, "the embedding E must open the first stage"),
    ({"parallel.pipeline_layout": "Et*3|t*3L", "parallel.account_for_loss": True},
     "places the embedding and the loss itself; drop account_for_embedding and account_for_loss"),
    ({"model.pattern": "(AD)*3 | (AD)*3", "parallel.account_for_loss": True}, "both pin the stage split; keep one"),
    ({"model.pattern": "AMAMAM", "model.mamba": {"num_heads": 8, "head_dim": 16},
      "parallel.account_for_embedding": True}, "applies to plain AD/AE stacks"),
])
def test_bad_pinned_splits_are_one_line_errors(changes, message):
    spec = {**TINY_DENSE, "model": {**TINY_DENSE["model"], "pattern": "(AD)*6"}}
    with pytest.raises(SpecError, match=message):
        make_spec(spec, **changes)


def test_an_empty_stage_reads_as_holding_no_layers():
    from megacpp.runtime.cli.console import _layer_range
    from megacpp.runtime.cli.picture import _stage_label

    assert (_layer_range([0, 0]), _layer_range([3, 6]), _layer_range([6, 6])) == ("none", "3-5", "none")
    doc = {"stages": [{"pp_rank": 0, "vp_stage": 0, "layers": [0, 0], "blocks": "", "embedding": True, "output_head": False},
                      {"pp_rank": 0, "vp_stage": 1, "layers": [3, 4], "blocks": "AD", "embedding": False, "output_head": False}]}
    assert _stage_label(doc, 0).startswith("pp0: L3") and "--1" not in _stage_label(doc, 0)



@pytest.mark.parametrize("pp,vpp", [(8, 5), (4, 5), (2, 12)])
def test_interleaved_splits_balance_the_ranks_not_the_chunks(pp, vpp):
    """A rank runs all its chunks per micro-batch, so the split is judged by its heaviest rank:
    Llama-3-70B's 80 layers split evenly (as Megatron does) keep every rank at 80 / pp layers plus
    the output head on one, and the split megacpp picks loads no rank more. Balancing the heaviest
    chunk against the output head instead put 12 layers on one of pp 8's ranks."""
    spec = make_spec(LLAMA_405B, **{"model.pattern": "(AD)*80", "model.hidden_size": 8192,
                                    "model.attention": {"num_heads": 64, "num_query_groups": 8, "head_dim": 128},
                                    "model.mlp": {"ffn_hidden_size": 28672}, "parallel": {}})
    ctx = make_context(spec)
    weights, head = unit_weights(ctx), head_flops(ctx)
    loads = [0.0] * pp
    for stage in assign_stages(ctx, pp, vpp)[1]:
        loads[stage.pp_rank] += sum(weights[stage.start:stage.stop]) + (head if stage.output_head else 0.0)
    assert max(loads) <= (80 // pp) * weights[0] + head + 1e-9 * max(loads)
