"""Multi-token prediction beyond a GPT stack's last layer: a hybrid stack's MTP pattern
(model.mtp_pattern, Megatron's `/` parts), one layer's weights shared by every depth
(model.mtp_shared_weights), and MTP layers a pipeline layout places in a stage of their own (`m`).
Megatron-core 0.16.1 has no hybrid MTP, so what main builds is checked against its source
(hybrid_layer_allocation.py parse_hybrid_pattern, multi_token_prediction.py), and the standalone
layouts against megatron-core itself in test_megatron_parity.py."""

from __future__ import annotations

import re
import shlex

import pytest

from megacpp.planner.cost.blocks import block_params, norm_params, padded_vocab
from megacpp.planner.cost.coefficients import DEFAULT_EFFICIENCY
from megacpp.planner.cost.memory import stage_memory
from megacpp.planner.errors import SpecError
from megacpp.planner.megatron.importer import ImportOptions, import_launch
from megacpp.planner.megatron.render import RenderOptions, render_launch
from megacpp.planner.plan import build_plan, make_context
from megacpp.planner.search.layout import Layout
from megacpp.planner.search.rules import check_layout
from megacpp.planner.search.stages import assign_stages
from megacpp.planner.spec.models import Spec
from tests.conftest import TINY_DENSE, TINY_MOE, make_spec

MAIN = {"backend.megatron": "main", "backend.transformer_engine": True}
HYBRID = {"model.pattern": "MEMEAE | MEMEAE", "model.mamba": {"num_heads": 8, "head_dim": 16, "num_groups": 2}, **MAIN}
MTP = {"model.mtp_num_layers": 2, "model.mtp_pattern": "AE"}


def _hybrid(**changes: object) -> Spec:
    return make_spec(TINY_MOE, **{**HYBRID, **changes})


def _memory(spec: Spec, lay: Layout):
    ctx = make_context(spec)
    return stage_memory(ctx, lay, assign_stages(ctx, lay.pp, lay.vpp)[1], DEFAULT_EFFICIENCY)


def _flags(script: str) -> dict[str, str]:
    words = shlex.split(script.replace("\\\n", " "), comments=True)
    return {w: words[i + 1] for i, w in enumerate(words[:-1]) if w.startswith("--")}


# ---- the spec -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("changes", "message"), [
    ({"model.mtp_num_layers": 2}, r"model.mtp_num_layers on a hybrid pattern needs model.mtp_pattern"),
    ({"model.mtp_pattern": "AE"}, r"model.mtp_pattern describes MTP layers, but model.mtp_num_layers is 0"),
    ({"model.mtp_shared_weights": True}, r"model.mtp_shared_weights describes MTP layers.*set mtp_num_layers"),
    ({**MTP, "model.mtp_pattern": "A|E"}, r"model.mtp_pattern 'A\|E': no '\|' cuts"),
    ({**MTP, "model.mtp_pattern": "AX"}, r"model.mtp_pattern: unknown block letter 'X'"),
    ({**MTP, "model.mtp_pattern": "AD"}, r"model.mtp_pattern uses D blocks, so model.mlp is required"),
])
def test_bad_mtp_keys_are_one_line_errors(changes, message):
    with pytest.raises(SpecError, match=message) as err:
        _hybrid(**changes)
    assert "\n" not in str(err.value)


def test_a_gpt_stack_copies_its_last_layer():
    spec = make_spec(TINY_MOE, **{"model.mtp_num_layers": 1, "model.mtp_pattern": "AE"})
    assert spec.model.mtp_layer == make_spec(TINY_MOE, **{"model.mtp_num_layers": 1}).model.mtp_layer == "AE"
    with pytest.raises(SpecError, match=r"Megatron's GPT model builds each MTP layer as a copy of the last layer \(AE\)"):
        make_spec(TINY_MOE, **{"model.mtp_num_layers": 1, "model.mtp_pattern": "AEAE"})


def test_the_mtp_layers_letters_need_their_rules():
    """An MTP pattern's blocks are built with the model's TP like its own: a letter only they use
    brings its rules (here D's ffn width against TP)."""
    spec = _hybrid(**{**MTP, "model.mtp_pattern": "AD", "model.mlp": {"ffn_hidden_size": 90, "gated": True},
                      "model.mamba": {"num_heads": 8, "head_dim": 16, "num_groups": 4}})
    assert "D" not in spec.pattern.letters and "D" in make_context(spec).letters
    errors = {v.rule for v in check_layout(make_context(spec), Layout(tp=4, pp=2, dp=1, sp=True)) if v.severity == "error"}
    assert "tp-divides-ffn" in errors


# ---- rules --------------------------------------------------------------------------------------


def _errors(spec: Spec, lay: Layout) -> set[str]:
    return {v.rule for v in check_layout(make_context(spec), lay) if v.severity == "error"}


def test_hybrid_mtp_and_shared_weights_need_main():
    lay = Layout(pp=2, dp=4)
    assert _errors(_hybrid(**MTP, **{"model.mtp_shared_weights": True}), lay) == set()
    core = _hybrid(**MTP, **{"model.mtp_shared_weights": True, "backend.megatron": "core_v0.16"})
    assert {"mtp-needs-gpt-stack", "mtp-shared-weights-needs-main"} <= _errors(core, lay)
    gpt = make_spec(TINY_DENSE, **{"model.mtp_num_layers": 2, "model.mtp_shared_weights": True, **MAIN})
    assert _errors(gpt, Layout(dp=8)) == set()


# ---- cost ---------------------------------------------------------------------------------------


def test_the_mtp_layers_sit_on_the_last_stage_and_shared_weights_are_held_once():
    lay = Layout(pp=2, dp=4, ep=2)
    base, own, shared = (_memory(s, lay) for s in (_hybrid(), _hybrid(**MTP), _hybrid(**MTP, **{"model.mtp_shared_weights": True})))
    ctx, h = make_context(_hybrid()), 64
    layer = sum(block_params(ctx, b, lay).dense + block_params(ctx, b, lay).expert for b in "AE")
    # per layer: enorm, hnorm, the final norm and eh_proj 2h -> h; once: the word embeddings' copy
    per_layer = layer + 3 * norm_params(ctx) + 2 * h * h
    copy = padded_vocab(ctx, 1) * h
    assert own[0].params == shared[0].params == base[0].params
    assert own[1].params - base[1].params == 2 * per_layer + copy
    assert shared[1].params - base[1].params == per_layer + copy
    # every depth runs, shared or not: the same activations and step
    assert own[1].activations_gib == shared[1].activations_gib > base[1].activations_gib
    steps = [build_plan(s, top=1).candidates[0].time.step_seconds
             for s in (_hybrid(**MTP, **{"parallel.pp": 2}), _hybrid(**MTP, **{"model.mtp_shared_weights": True, "parallel.pp": 2}),
                       _hybrid(**{"parallel.pp": 2}))]
    assert steps[0] == pytest.approx(steps[1], rel=0.01) and steps[0] > steps[2]


def test_a_layout_can_give_the_mtp_layers_a_stage_of_their_own():
    """DeepSeek-V3's documented layout `Et*3|(tt|)*29m|L` in small: m alone in rank 2's stage, the
    loss alone in rank 3's. The MTP rank holds the MTP layer and a copy of the embedding, the loss
    rank the output layer and every depth's logits; the final norm stays with the last decoder
    layer (megatron-core agrees rank by rank: tests/test_megatron_parity.py mtp-standalone-*)."""
    lay = Layout(pp=4, dp=2)
    standalone = make_spec(TINY_DENSE, **{"model.mtp_num_layers": 1, "model.pattern": "(AD)*6", "parallel.pipeline_layout": "Et*2|t*4|m|L"})
    together = make_spec(TINY_DENSE, **{"model.mtp_num_layers": 1, "model.pattern": "(AD)*6", "parallel.pipeline_layout": "Et*2|t*4||mL"})
    a, b = _memory(standalone, lay), _memory(together, lay)
    moved = a[2].params - b[2].params
    assert moved == b[3].params - a[3].params > 0
    assert a[3].transient_from == b[3].transient_from == "the loss's logits"
    stages = build_plan(standalone, top=1).candidates[0].stages
    assert [(s.pp_rank, s.blocks, bool(s.mtp), s.output_head) for s in stages] == [
        (0, "ADAD", False, False), (1, "ADADADAD", False, False), (2, "", True, False), (3, "", False, True)]
    script = render_launch(build_plan(standalone, top=1), RenderOptions(engine="megatron-lm"))["launch.sh"]
    assert _flags(script)["--pipeline-model-parallel-layout"] == "Ett|tttt|m|L"


@pytest.mark.parametrize(("layout", "pp", "vpp", "message"), [
    ("Et*2|t*4m||L", 2, 2, r"in stage 1, virtual stage 0 of pp_rank 1, but Megatron builds them only in a rank's last virtual stage"),
    ("Et*3|t*3|m|L", 2, 2, r"does not place them on the first pipeline rank"),
])
def test_mtp_layers_where_megatron_does_not_build_them_are_rejected(layout, pp, vpp, message):
    spec = make_spec(TINY_DENSE, **{"model.mtp_num_layers": 1, "model.pattern": "(AD)*6", "parallel.pipeline_layout": layout})
    found = [v for v in check_layout(make_context(spec), Layout(pp=pp, vpp=vpp, dp=8 // pp)) if v.rule == "pipeline-layout-mtp"]
    assert found and found[0].severity == "error"
    assert re.search(message, found[0].message)


# ---- render and import --------------------------------------------------------------------------


def test_main_renders_one_slash_part_per_depth_and_imports_it_back():
    spec = _hybrid(**MTP, **{"model.mtp_shared_weights": True, "parallel.pp": 2})
    plan = build_plan(spec, top=1)
    script = render_launch(plan, RenderOptions(engine="megatron-lm"))["launch.sh"]
    flags = _flags(script)
    assert flags["--hybrid-layer-pattern"] == "MEME*E|MEME*E/*E/*E"
    assert flags["--mtp-num-layers"] == "2" and "--mtp-use-repeated-layer" in script
    imported = import_launch(script, ImportOptions(cluster="h200-sxm-8"))
    assert imported.unsupported == []
    model = imported.spec.model
    assert (model.mtp_num_layers, model.mtp_pattern, model.mtp_shared_weights) == (2, "AE", True)
    before, after = plan.candidates[0], build_plan(imported.spec, top=1).candidates[0]
    assert (after.layout, after.stages, after.memory, after.time) == (before.layout, before.stages, before.memory, before.time)


HEAD = ("pretrain_hybrid.py --hidden-size 64 --num-attention-heads 4 --kv-channels 16 --mamba-num-heads 8 "
        "--mamba-head-dim 16 --mamba-num-groups 2 --num-experts 8 --moe-ffn-hidden-size 64 --seq-length 64 "
        "--position-embedding-type none --micro-batch-size 1 --global-batch-size 16 --vocab-size 250 ")


@pytest.mark.parametrize(("args", "depths", "listed"), [
    ("--hybrid-layer-pattern MEME*E/*E/*E --mtp-num-layers 2 --mtp-use-repeated-layer", 2, []),
    # Megatron-LM's older form, which it turns into the `/` parts (arguments.py:774-784)
    ("--hybrid-layer-pattern MEME*E --mtp-hybrid-override-pattern *E --mtp-num-layers 2", 2, []),
    # without a pattern for them a hybrid model builds no MTP layers (Megatron-LM only warns)
    ("--hybrid-layer-pattern MEME*E --mtp-num-layers 2", 0, ["--mtp-num-layers 2"]),
])
def test_hybrid_mtp_flags_import(args, depths, listed):
    imported = import_launch((HEAD + args).split(), ImportOptions(cluster="h200-sxm-8"))
    assert imported.spec.model.mtp_num_layers == depths
    assert imported.spec.model.mtp_pattern == ("AE" if depths else None)
    assert [u.split(":")[0] for u in imported.unsupported if u.startswith("--mtp")] == listed


def test_unequal_mtp_parts_are_refused_as_megatron_refuses_them():
    with pytest.raises(SpecError, match=r"every MTP part after '/' must be the same pattern"):
        import_launch((HEAD + "--hybrid-layer-pattern MEME*E/*E/MM").split(), ImportOptions(cluster="h200-sxm-8"))
