"""Multi-latent attention (model.attention.mla) and multi-token prediction (model.mtp_num_layers):
the spec's errors, the rules, the cost terms, the Megatron-LM flags and the DeepSeek-V3 / Kimi K2
recipes against their published sizes."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from collections import Counter

import pytest
import yaml

from megacpp.planner.cost.blocks import BF16, block_linears
from megacpp.planner.cost.coefficients import DEFAULT_EFFICIENCY
from megacpp.planner.cost.flops import block_flops, block_gemms, head_flops, micro_batch_tokens
from megacpp.planner.cost.latent import latent_parts, mtp_flops
from megacpp.planner.cost.memory import stage_memory
from megacpp.planner.errors import LaunchError, SpecError
from megacpp.planner.megatron.render import RenderOptions, render_launch
from megacpp.planner.plan import build_plan, make_context
from megacpp.planner.search.layout import Layout
from megacpp.planner.search.rules import check_layout
from megacpp.planner.search.stages import assign_stages
from megacpp.planner.spec.loading import load_spec_text
from megacpp.planner.spec.models import Spec
from megacpp.planner.validation import validate_spec
from megacpp.recipes import recipe_text
from tests.conftest import ROOT, TINY_DENSE, TINY_MOE, make_spec

MLA = {"num_heads": 8, "mla": {"q_lora_rank": 32, "kv_lora_rank": 24, "qk_head_dim": 16, "rope_head_dim": 8, "v_head_dim": 12}}
TE = {"backend.transformer_engine": True}
MODELS = json.loads((ROOT / "benchmarks" / "scale" / "models.json").read_text())


def recipe(name: str, **changes: object) -> Spec:
    """A bundled recipe on one GPU (its parameters whole), with dotted-key changes."""
    data = yaml.safe_load(recipe_text(name))
    data.pop("parallel", None)
    data["cluster"] = {"preset": "h200-sxm-8", "nodes": 1}
    for dotted, value in changes.items():
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return load_spec_text(yaml.safe_dump(data))


def total_params(spec: Spec) -> int:
    """Every parameter of the model on one GPU (PP 1: the MTP layers share the embedding)."""
    ctx = make_context(spec)
    _, stages = assign_stages(ctx, 1, 1)
    return stage_memory(ctx, Layout(), stages, DEFAULT_EFFICIENCY)[0].params


# ---- the spec ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("change", "message"), [
    ({"model.attention": {**MLA, "num_query_groups": 2}}, r"model.attention: num_query_groups=2 does not apply to multi-latent"),
    ({"model.attention": {**MLA, "head_dim": 16}}, r"head_dim=16 does not apply to multi-latent attention .*drop it"),
    ({"model.attention": {"num_heads": 8, "mla": {"q_lora_rank": 32}}}, r"model.attention.mla.kv_lora_rank: required"),
    ({"model.attention": {"num_heads": 8, "mla": {"kv_lora_rank": 8, "rope_dim": 4}}}, r"did you mean 'rope_head_dim'"),
    ({"model.mtp_num_layers": -1}, r"model.mtp_num_layers: must be >= 0"),
])
def test_bad_keys_are_one_line_errors_naming_the_key(change, message):
    with pytest.raises(SpecError, match=message):
        make_spec(TINY_DENSE, **change)


def test_mla_needs_no_head_dim_even_when_hidden_size_does_not_split():
    spec = make_spec(TINY_DENSE, **{"model.hidden_size": 60, "model.attention": MLA, **TE})
    assert spec.model.latent is not None and spec.model.query_groups == 8


# ---- rules ------------------------------------------------------------------------------------


def _errors(spec: Spec, lay: Layout = Layout()) -> list[str]:
    return [v.rule for v in check_layout(make_context(spec), lay) if v.severity == "error"]


@pytest.mark.parametrize(("base", "change", "rule"), [
    (TINY_DENSE, {"model.attention": MLA}, "mla-needs-te"),
    (TINY_DENSE, {"model.attention": MLA, "model.pattern": "ADAMD", "model.mamba": {"num_groups": 1}, **TE}, "mla-needs-gpt-stack"),
    (TINY_MOE, {"model.mtp_num_layers": 1, "model.mtp_pattern": "AE", "model.pattern": "AEMAE", "model.mamba": {"num_groups": 1},
                **TE}, "mtp-needs-gpt-stack"),
    (TINY_DENSE, {"model.mtp_num_layers": 2, "model.mtp_shared_weights": True, **TE}, "mtp-shared-weights-needs-main"),
    (TINY_DENSE, {"model.mtp_num_layers": 1, "model.position_embedding": "learned"}, "mtp-needs-rope-or-none"),
    (TINY_MOE, {"model.mtp_num_layers": 2, "model.moe.overlap_communication": True, **TE}, "ep-overlap-mtp"),
    (TINY_DENSE, {"training.recompute": "selective", "training.recompute_modules": ["mla_up_proj"], **TE},
     "mla-up-proj-recompute-needs-mla"),
])
def test_what_megatron_forbids_is_rejected_by_its_rule(base, change, rule):
    assert rule in _errors(make_spec(base, **change), Layout(pp=2, vpp=2, ep=2, dp=4))


def test_mla_with_te_and_its_up_projection_recompute_are_legal():
    spec = make_spec(TINY_DENSE, **{"model.attention": MLA, "model.mtp_num_layers": 1, **TE,
                                    "training.recompute": "selective", "training.recompute_modules": ["mla_up_proj"]})
    assert _errors(spec, Layout(tp=2, pp=2, sp=True)) == []
    warnings = {v.rule for v in check_layout(make_context(spec), Layout())}
    assert "latent-and-mtp-need-megatron-lm" in warnings


def test_mtp_with_ep_overlap_needs_a_pipeline():
    spec = make_spec(TINY_MOE, **{"model.mtp_num_layers": 1, "model.moe.overlap_communication": True, **TE})
    assert "ep-overlap-mtp" in _errors(spec, Layout(ep=2))
    assert "ep-overlap-mtp" not in _errors(spec, Layout(pp=2, vpp=2, ep=2))


# ---- cost terms -------------------------------------------------------------------------------


def test_down_projections_are_whole_on_every_tp_rank_with_te_and_split_without():
    te = make_context(make_spec(TINY_DENSE, **{"model.attention": MLA, **TE}))
    local = make_context(make_spec(TINY_DENSE, **{"model.attention": MLA}))
    lay = Layout(tp=2, sp=True)
    q_down, q_up, kv_down, kv_up, proj = block_linears(te, "A", lay).dense
    assert (q_down, kv_down) == (64 * 32, 64 * (24 + 8))  # h -> q_lora_rank, h -> kv_lora_rank + rope
    assert (q_up, kv_up, proj) == (32 * 8 * 24 // 2, 24 * 8 * (16 + 12) // 2, 8 * 12 // 2 * 64)
    assert block_linears(local, "A", lay).dense[0] == q_down // 2


@pytest.mark.parametrize(("te", "lay"), [(True, Layout(tp=2, sp=True)), (False, Layout(tp=2)), (True, Layout(cp=2, micro_batch_size=2))])
def test_mla_gemm_shapes_add_up_to_its_flops(te, lay):
    ctx = make_context(make_spec(TINY_DENSE, **{"model.attention": MLA, "backend.transformer_engine": te}))
    tokens = micro_batch_tokens(ctx, lay)
    assert block_gemms(ctx, "A", lay).flops == pytest.approx(block_flops(ctx, "A") * tokens / lay.tp, rel=1e-9)


def test_mla_attention_is_priced_at_its_measured_widths():
    """DeepSeek-V3's core attention (192-wide keys, 128-wide values, a key per head): the measured
    H100 kernel over the tables' d=128 one (1.30-1.38), more than the mean width's 160/128; widths
    not measured keep the mean width's proportion."""
    ctx, lay = make_context(recipe("deepseek-v3")), Layout(tp=8, sp=True)
    gemms = block_gemms(ctx, "A", lay)
    assert gemms.fused_attention is not None and gemms.fused_attention[2] == 128
    assert 1.3 <= gemms.attention_time_share <= 1.38
    tiny = block_gemms(make_context(make_spec(TINY_DENSE, **{"model.attention": MLA, **TE})), "A", Layout())
    assert tiny.attention_time_share == 1.0 and tiny.fused_attention[2] == (16 + 8 + 12) // 2


def test_deepseek_v3_flops_per_token_equal_megatron_bridges():
    """models.json: the published DeepSeek-V3 rows imply 260.0 GFLOP per token for a training step
    with one MTP layer and 249.7 without (Megatron-Bridge's flop_utils, its vocabulary padded)."""
    for mtp, published in ((1, 260.0e9), (0, 249.7e9)):
        ctx = make_context(recipe("deepseek-v3", **{"model.mtp_num_layers": mtp}))
        forward = sum(n * block_flops(ctx, b) for b, n in Counter(ctx.pattern.blocks).items()) + head_flops(ctx) + mtp_flops(ctx)
        assert 3 * forward == pytest.approx(published, rel=0.005)


def test_mtp_layers_sit_on_the_last_stage_with_an_embedding_copy():
    cut = {"model.pattern": "(AE)*2 | (AE)*2", **TE}  # the same stages with and without MTP
    spec = make_spec(TINY_MOE, **{"model.mtp_num_layers": 1, **cut})
    plain = make_spec(TINY_MOE, **cut)
    lay = Layout(pp=2, dp=4, ep=2)
    mem, base = (stage_memory(make_context(s), lay, assign_stages(make_context(s), 2, 1)[1], DEFAULT_EFFICIENCY)
                 for s in (spec, plain))
    assert mem[0].params == base[0].params
    h, vocab = 64, 256  # vocab 250 padded to 128
    extra_dense = mem[1].params - mem[1].params_expert - (base[1].params - base[1].params_expert)
    expert_layer = base[1].params_expert // 2  # the last stage holds two AE layers
    assert mem[1].params_expert - base[1].params_expert == expert_layer
    # the MTP layer's attention, router and norms, eh_proj 2h x h, three norms, the embedding copy
    assert extra_dense > 2 * h * h + 3 * h + vocab * h
    assert mem[1].activations_gib > base[1].activations_gib
    assert build_plan(spec, top=1).candidates[0].time.step_seconds > build_plan(plain, top=1).candidates[0].time.step_seconds


# ---- the recipes ------------------------------------------------------------------------------


def test_deepseek_v3_has_its_published_671b_and_its_mtp_layer():
    """671B total parameters (arXiv:2412.19437), without the MTP module; models.json computes
    671.03B from the same fields. Its one MTP layer adds an MoE layer and eh_proj (11.6B); with the
    embedding and head the checkpoint keeps a copy of, the published 685B."""
    main = total_params(recipe("deepseek-v3", **{"model.mtp_num_layers": 0}))
    assert main / 1e9 == pytest.approx(MODELS["deepseek_v3"]["computed_total_params_B"], abs=0.005)
    assert round(main / 1e9) == 671
    with_mtp = total_params(recipe("deepseek-v3"))
    copies = 2 * 129280 * 7168  # the MTP module's own embedding and head in the released checkpoint
    assert with_mtp + copies == pytest.approx(685e9, rel=0.001)  # 684.49B; the card sums 671B and a rounded 14B


def test_kimi_k2_has_its_published_size():
    """Kimi K2: 1.04T total in its report (HF model card: 1.03T); models.json computes 1026.41B."""
    total = total_params(recipe("kimi-k2"))
    assert total / 1e9 == pytest.approx(MODELS["kimi_k2"]["computed_total_params_B"], abs=0.005)
    assert total / 1e12 == pytest.approx(1.04, rel=0.015)


@pytest.mark.parametrize("name", ["deepseek-v3", "kimi-k2"])
@pytest.mark.parametrize("dialect", ["core_v0.16", "main"])
def test_recipes_plan_validate_and_render_with_the_mla_flags(name, dialect):
    spec = load_spec_text(recipe_text(name), overrides=[f"backend.megatron={dialect}"])
    assert validate_spec(spec)["valid"]
    plan = build_plan(spec, top=1)
    assert plan.candidates[0].fits
    words = shlex.split(render_launch(plan, RenderOptions(engine="megatron-lm"))["launch.sh"].replace("\\\n", " "))
    flag = {w: words[i + 1] for i, w in enumerate(words[:-1]) if w.startswith("--")}
    mla = spec.model.latent
    assert mla is not None and "--multi-latent-attention" in words and "--qk-layernorm" in words
    assert (flag["--q-lora-rank"], flag["--kv-lora-rank"], flag["--qk-head-dim"], flag["--qk-pos-emb-head-dim"],
            flag["--v-head-dim"], flag["--kv-channels"]) == ("1536", "512", "128", "64", "128", "128")
    assert "--group-query-attention" not in words and flag["--recompute-modules"] == "mla_up_proj"
    mtp = spec.model.mtp_num_layers
    assert (flag.get("--mtp-num-layers"), mtp) in ((None, 0), ("1", 1))
    if "--pipeline-model-parallel-layout" in flag:
        assert flag["--pipeline-model-parallel-layout"].endswith("m" * mtp + "L")
    with pytest.raises(LaunchError, match="--engine megacpp does not build model.attention.mla"):
        render_launch(plan, RenderOptions(engine="megacpp"))


def test_the_runtime_worker_refuses_a_plan_with_mtp(tmp_path):
    from megacpp.runtime.worker.job import load_job

    path = tmp_path / "plan.json"
    path.write_text(json.dumps(build_plan(make_spec(TINY_DENSE, **{"model.mtp_num_layers": 1}), top=1).to_json_dict()))
    with pytest.raises(LaunchError, match="runtime does not build model.mtp_num_layers; launch it with --engine megatron-lm"):
        load_job(path)


@pytest.mark.parametrize(("modules", "over"), [((), 0.0), (("core_attn",), 0.0), (("mla_up_proj",), 64.0)])
def test_mla_activations_match_what_megatron_core_keeps(modules, over):
    """megatron-core 0.16.1's own MLA layer on CPU (tests/parity/mla_activations.py): what its
    attention keeps beside its norms equals latent_parts' core attention inputs, scores, output,
    rotary tables and the linears' inputs the norms write; under mla_up_proj the formula counts
    the rotary tables where the checkpoint keeps the rotary frequencies (64 B per token here)."""
    pytest.importorskip("megatron.core")
    dims = {"hidden_size": 256, "num_attention_heads": 8, "q_lora_rank": 96, "kv_lora_rank": 64, "qk_head_dim": 32,
            "qk_pos_emb_head_dim": 16, "v_head_dim": 32, "seq_length": 128, "micro_batch_size": 1,
            "recompute_modules": list(modules)}
    env = {**os.environ, "MASTER_PORT": str(29600 + len(modules) * 7 + len("".join(modules)))}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "parity" / "mla_activations.py"), json.dumps(dims)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    measured = json.loads(proc.stdout.strip().splitlines()[-1])["bytes_per_token"]
    changes = {"model.hidden_size": 256, "training.seq_length": 128, "model.attention": {  # the local (unfused) path
        "num_heads": 8, "mla": {"q_lora_rank": 96, "kv_lora_rank": 64, "qk_head_dim": 32, "rope_head_dim": 16, "v_head_dim": 32}}}
    if modules:
        changes.update({"training.recompute": "selective", "training.recompute_modules": list(modules)})
    ctx = make_context(make_spec(TINY_DENSE, **changes))
    parts = latent_parts(ctx, Layout(), frozenset(modules), False)
    written_by_norms = BF16 * (256 + 96 + 64)  # the input norm's and the latents' outputs, the linears' inputs
    assert parts["rope"] + parts["core"] + parts["output"] + written_by_norms == pytest.approx(measured + over, abs=0.1)


@pytest.mark.parametrize("preset", ["h200-sxm-8", "b200-sxm-8"])  # a kernel-rate table, and FLOPs at MAMF
def test_mla_up_proj_recompute_runs_the_up_projections_again(preset):
    from megacpp.planner.cost.step import matmul_seconds

    base = {"model.attention": MLA, **TE, "cluster.preset": preset, "training.recompute": "selective"}
    plain, again = (make_context(make_spec(TINY_DENSE, **base, **{"training.recompute_modules": modules}))
                    for modules in (["core_attn"], ["core_attn", "mla_up_proj"]))
    lay = Layout(tp=2, sp=True)
    assert matmul_seconds(again, lay, "A", DEFAULT_EFFICIENCY) > matmul_seconds(plain, lay, "A", DEFAULT_EFFICIENCY)
    assert matmul_seconds(again, lay, "D", DEFAULT_EFFICIENCY) == matmul_seconds(plain, lay, "D", DEFAULT_EFFICIENCY)
