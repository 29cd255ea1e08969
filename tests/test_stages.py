"""Stage assignment: atomic blocks, embedding first, head last, cuts honoured, expressible splits."""

from __future__ import annotations

from megacpp.planner.plan import make_context
from megacpp.planner.search.stages import assign_stages
from tests.conftest import TINY_DENSE, make_spec

HYBRID_MODEL = {
    "hidden_size": 64,
    "vocab_size": 250,
    "attention": {"num_heads": 4, "num_query_groups": 2, "head_dim": 16},
    "mamba": {"num_heads": 8, "head_dim": 16, "state_dim": 16, "num_groups": 4},
    "moe": {"num_experts": 8, "top_k": 2, "ffn_hidden_size": 64},
}


def hybrid(pattern: str, dialect: str = "core_v0.16"):
    return make_context(make_spec(TINY_DENSE, **{"model": {"pattern": pattern, **HYBRID_MODEL},
                                                 "backend": {"transformer_engine": True, "megatron": dialect}}))


def test_stages_cover_the_pattern_in_order():
    ctx = hybrid("(AEME)*3 AEM")
    split, stages = assign_stages(ctx, 3, 1)
    assert "".join(s.blocks for s in sorted(stages, key=lambda s: s.start)) == ctx.pattern.blocks
    assert [s.embedding for s in stages] == [True, False, False]
    assert [s.output_head for s in stages] == [False, False, True]
    assert sum(split.sizes) == ctx.num_layers


def test_core_v016_hybrid_uses_even_or_first_last_split():
    ctx = hybrid("(AEME)*3 AEM")  # 15 layers on 4 stages: not even
    split, _ = assign_stages(ctx, 4, 1)
    assert split.kind == "first_last"
    middle = split.sizes[1:-1]
    assert len(set(middle)) == 1 and (split.first, split.last) == (split.sizes[0], split.sizes[-1])


def test_main_hybrid_split_is_free_and_expressed_as_pipes():
    ctx = hybrid("(AEME)*3 AEM", dialect="main")
    split, stages = assign_stages(ctx, 2, 2)
    assert split.kind in {"pipes", "even"} and len(split.sizes) == 4
    assert [(s.pp_rank, s.vp_stage) for s in stages] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert stages[0].embedding and stages[-1].output_head  # chunk 0 on pp0, last chunk on pp1/vp1


def test_gpt_path_uses_pairs_and_pipeline_layout_when_uneven():
    ctx = make_context(make_spec(TINY_DENSE, **{"model.pattern": "(AD)*7"}))
    split, stages = assign_stages(ctx, 2, 1)
    assert ctx.plain_transformer and ctx.num_layers == 7
    assert split.kind == "layout" and sum(split.sizes) == 7
    assert all(len(s.blocks) % 2 == 0 for s in stages)  # a Megatron layer (pair) is never cut


def test_head_pushes_layers_off_the_last_stage():
    # an output head worth about two layers: the last stage should get fewer layers
    ctx = make_context(make_spec(TINY_DENSE, **{"model.pattern": "(AD)*16", "model.vocab_size": 1280}))
    split, _ = assign_stages(ctx, 4, 1)
    assert split.kind == "layout" and split.sizes[-1] < max(split.sizes)


def test_even_split_kept_on_near_ties_and_spare_layers_go_last():
    # the head is negligible here: the even split costs nothing and keeps the first stage light
    ctx = make_context(make_spec(TINY_DENSE, **{"model.pattern": "(AD)*8"}))
    assert assign_stages(ctx, 4, 1)[0].sizes == (2, 2, 2, 2)
    nine = make_context(make_spec(TINY_DENSE, **{"model.pattern": "(AD)*9"}))
    sizes = assign_stages(nine, 4, 1)[0].sizes
    # 9 layers on 4 stages: the slowest stage holds 3 either way; the first stage, which keeps
    # the most micro-batches in flight, gets the fewest
    assert max(sizes) == 3 and sizes[0] == min(sizes)


def test_cuts_are_honoured():
    ctx = hybrid("AEM|EAEMEA|EM", dialect="main")
    split, stages = assign_stages(ctx, 3, 1)
    assert [s.blocks for s in stages] == ["AEM", "EAEMEA", "EM"]
    assert split.kind == "pipes"
