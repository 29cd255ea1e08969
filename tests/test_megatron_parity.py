"""Legality and parameter parity against megatron-core 0.16.1 itself (CPU, gloo, local spec).

Each case is a tiny spec plus a layout on 8 ranks. megacpp's verdict (errors from its rules) must
equal Megatron's (process groups, TransformerConfig, GPTModel construction, the MoE forward
SP check and the micro-batch calculator), and on legal layouts every rank's instantiated
parameter count must equal megacpp's per-stage prediction.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from megacpp.planner.cost.coefficients import DEFAULT_EFFICIENCY
from megacpp.planner.cost.memory import stage_memory
from megacpp.planner.plan import make_context
from megacpp.planner.search.layout import Layout
from megacpp.planner.search.ranks import process_groups, rank_coordinates
from megacpp.planner.search.rules import check_layout
from megacpp.planner.search.stages import assign_stages
from megacpp.planner.spec.models import Spec
from tests.conftest import PROBE, TINY_DENSE, TINY_MOE, make_spec

pytest.importorskip("megatron.core", reason="megatron-core is installed by `make test`")

WORLD = 8


def L(tp=1, pp=1, vpp=1, cp=1, ep=1, etp=None, sp=False, mbs=1, gbs=16) -> Layout:
    dp = WORLD // (tp * pp * cp) if WORLD % (tp * pp * cp) == 0 else 0
    m = gbs // (mbs * dp) if dp and gbs % (mbs * dp) == 0 else 0
    return Layout(tp=tp, pp=pp, vpp=vpp, cp=cp, dp=dp, ep=ep, etp=tp if etp is None else etp, sp=sp,
                  micro_batch_size=mbs, num_microbatches=m)


def cases() -> list[tuple[str, Spec, Layout]]:
    d, m = TINY_DENSE, TINY_MOE
    dense = make_spec(d)
    gqa3 = make_spec(d, **{"model.hidden_size": 96, "model.attention": {"num_heads": 6, "num_query_groups": 3, "head_dim": 16}})
    ffn100 = make_spec(d, **{"model.attention": {"num_heads": 8, "num_query_groups": 8, "head_dim": 8}, "model.mlp.ffn_hidden_size": 100})
    five = make_spec(d, **{"model.pattern": "(AD)*5"})
    seven = make_spec(d, **{"model.pattern": "(AD)*7"})
    learned = make_spec(d, **{"model.position_embedding": "learned", "model.normalization": "layernorm", "model.tie_embeddings": True})
    plain = make_spec(d, **{"model.mlp.gated": False, "model.attention.num_query_groups": 4})
    moe = make_spec(m)
    moe6 = make_spec(m, **{"model.moe.num_experts": 6})
    shared = make_spec(m, **{"model.moe.shared_expert_ffn_hidden_size": 96})
    ffn60 = make_spec(m, **{"model.moe.ffn_hidden_size": 60})
    mixed = make_spec(m, **{"model.pattern": "AD (AE)*3", "model.mlp": {"ffn_hidden_size": 128, "gated": True}})
    odd_batch = make_spec(d, **{"training.global_batch_size": 12})
    # QK layernorm, sliding windows with every second layer full, attention sinks, linear biases
    features = make_spec(d, **{"model.linear_bias": True, "model.attention": {
        "num_heads": 4, "num_query_groups": 2, "head_dim": 16, "qk_layernorm": True, "window_size": 16,
        "window_full_every": 2, "sinks": True}})
    qk_layernorm = make_spec(d, **{"model.normalization": "layernorm", "model.attention.qk_layernorm": True})
    moe_bias = make_spec(m, **{"model.linear_bias": True})
    shared_bias = make_spec(m, **{"model.linear_bias": True, "model.moe.shared_expert_ffn_hidden_size": 96})
    latent = {"num_heads": 8, "mla": {"q_lora_rank": 32, "kv_lora_rank": 20, "qk_head_dim": 16, "rope_head_dim": 8, "v_head_dim": 12}}
    mla = make_spec(d, **{"model.attention": latent})
    mla_moe = make_spec(m, **{"model.attention": latent, "model.pattern": "AD (AE)*3",
                              "model.mlp": {"ffn_hidden_size": 128, "gated": True}})
    mtp = make_spec(d, **{"model.mtp_num_layers": 1})
    mtp_tied = make_spec(d, **{"model.mtp_num_layers": 1, "model.tie_embeddings": True, "model.pattern": "(AD)*5"})
    # the MTP layers in a stage of their own on rank 2, the loss alone after them (mtp_standalone);
    # and `m` in rank 1's first virtual stage, which Megatron refuses
    standalone = make_spec(d, **{"model.mtp_num_layers": 1, "model.pattern": "(AD)*6",
                                 "parallel.pipeline_layout": "Et*2|t*4|m|L"})
    mtp_early = make_spec(d, **{"model.mtp_num_layers": 1, "model.pattern": "(AD)*6",
                                "parallel.pipeline_layout": "Et*2|t*4m||L"})
    return [
        ("mla-local-tp1", mla, L()),  # the local spec's core attention refuses MLA (rule mla-needs-te)
        ("mla-moe-local-ep2", mla_moe, L(ep=2)),
        ("mtp-pp1", mtp, L()),
        ("mtp-pp2", mtp, L(pp=2)),
        ("mtp-tp2-pp2-vpp2", mtp, L(tp=2, pp=2, vpp=2)),
        ("mtp-tied-uneven-pp2", mtp_tied, L(pp=2)),
        ("mtp-standalone-pp4", standalone, L(pp=4)),
        ("mtp-standalone-tp2-pp4", standalone, L(tp=2, pp=4)),
        ("mtp-not-last-virtual-stage", mtp_early, L(pp=2, vpp=2)),
        ("dense-tp1", dense, L()),
        ("dense-tp2", dense, L(tp=2)),
        ("dense-tp4-groups-replicated", dense, L(tp=4)),
        ("dense-tp8-heads", dense, L(tp=8)),
        ("dense-tp3-world", dense, L(tp=3)),
        ("dense-pp2", dense, L(pp=2)),
        ("dense-pp4", dense, L(pp=4)),
        ("dense-pp8-too-deep", dense, L(pp=8)),
        ("dense-tp2-pp2", dense, L(tp=2, pp=2)),
        ("dense-pp2-vpp2", dense, L(pp=2, vpp=2)),
        ("dense-pp1-vpp2", dense, L(vpp=2)),
        ("dense-pp4-vpp2-too-deep", dense, L(pp=4, vpp=2)),
        ("dense-cp2-local-attention", dense, L(cp=2)),
        ("dense-tp2-sp-torch-norm", dense, L(tp=2, sp=True)),
        ("dense-mbs2", dense, L(mbs=2)),
        ("dense-batch-not-divisible", odd_batch, L(pp=1, mbs=1)),
        ("dense-batch-ok-pp2", odd_batch, L(pp=2, tp=2)),
        ("gqa3-tp2-groups", gqa3, L(tp=2)),
        ("gqa3-tp1", gqa3, L()),
        ("ffn100-tp8", ffn100, L(tp=8)),
        ("ffn100-tp4", ffn100, L(tp=4)),
        ("five-layers-pp2-uneven", five, L(pp=2)),
        ("seven-layers-pp4-uneven", seven, L(pp=4)),
        ("seven-layers-pp2-vpp2", seven, L(pp=2, vpp=2)),
        ("learned-tied-pp2", learned, L(pp=2)),
        ("learned-tied-tp2-pp1", learned, L(tp=2)),
        ("plain-mlp-tp2-pp2", plain, L(tp=2, pp=2)),
        ("moe-ep1", moe, L()),
        ("moe-ep2", moe, L(ep=2)),
        ("moe-ep4", moe, L(ep=4)),
        ("moe-ep8", moe, L(ep=8)),
        ("moe-ep16", moe, L(ep=16)),
        ("moe-ep4-etp2", moe, L(ep=4, etp=2)),
        ("moe-ep8-etp2-world", moe, L(ep=8, etp=2)),
        ("moe-pp2-ep4", moe, L(pp=2, ep=4)),
        ("moe-pp2-ep8-world", moe, L(pp=2, ep=8)),
        ("moe-pp4-ep2", moe, L(pp=4, ep=2)),
        ("moe-tp2-ep2-no-sp", moe, L(tp=2, ep=2)),
        ("moe-tp2-ep4-sp-torch-norm", moe, L(tp=2, ep=4, etp=1, sp=True)),
        ("moe6-ep4", moe6, L(ep=4)),
        ("moe6-ep2", moe6, L(ep=2)),
        ("moe-shared-ep2", shared, L(ep=2)),
        ("moe-ffn60-etp8", ffn60, L(ep=1, etp=8)),
        ("moe-ffn60-etp4", ffn60, L(ep=2, etp=4)),
        ("moe-mixed-pp2-ep2", mixed, L(pp=2, ep=2)),
        ("moe-mixed-ep8", mixed, L(ep=8)),
        ("features-tp2", features, L(tp=2)),
        ("features-pp2-vpp2", features, L(pp=2, vpp=2)),
        ("qk-layernorm-layernorm-tp4", qk_layernorm, L(tp=4)),
        ("moe-bias-ep4", moe_bias, L(ep=4)),
        ("moe-bias-pp2-ep2", moe_bias, L(pp=2, ep=2)),
        ("moe-bias-ep4-etp2", moe_bias, L(ep=4, etp=2)),
        ("moe-bias-shared-expert", shared_bias, L(ep=2)),
    ]


def mla_param_cases() -> list[tuple[str, Spec, Layout]]:
    """MLA layouts whose parameters are compared with megatron-core's own build. Its local spec
    cannot build MLA (rule mla-needs-te), so the probe gives the core attention, which holds no
    parameters, the key and value widths' keywords (mla_core_attention_shim); what these count is
    the local spec's linears and norms: the down projections column-parallel, as megacpp prices
    them without Transformer Engine (with it they are whole on every TP rank, latent.latent_linears)."""
    d, m = TINY_DENSE, TINY_MOE
    latent = {"num_heads": 8, "mla": {"q_lora_rank": 32, "kv_lora_rank": 24, "qk_head_dim": 16, "rope_head_dim": 8, "v_head_dim": 12}}
    mla = make_spec(d, **{"model.attention": latent})
    no_q = make_spec(d, **{"model.attention": {"num_heads": 4, "mla": {"kv_lora_rank": 16, "rope_head_dim": 8,
                                                                           "qk_head_dim": 8, "v_head_dim": 8}},
                           "model.normalization": "layernorm"})
    moe_mtp = make_spec(m, **{"model.attention": latent, "model.pattern": "AD (AE)*4", "model.mtp_num_layers": 2,
                              "model.mlp": {"ffn_hidden_size": 128, "gated": True}})
    return [
        ("mla-params-tp1", mla, L()),
        ("mla-params-tp2", mla, L(tp=2)),
        ("mla-params-tp2-pp2-vpp2", mla, L(tp=2, pp=2, vpp=2)),
        ("mla-params-no-q-latent-layernorm-tp4", no_q, L(tp=4)),
        ("mla-params-moe-mtp2-pp2-ep2", moe_mtp, L(pp=2, ep=2)),
        ("mla-params-moe-mtp2-pp4-ep2", moe_mtp, L(pp=4, ep=2)),
    ]


def probe_case(case_id: str, spec: Spec, lay: Layout) -> dict[str, Any]:
    model = spec.model
    ctx = make_context(spec)
    units = ctx.units
    gated = model.mlp.gated if model.mlp else model.moe.gated  # type: ignore[union-attr]
    m: dict[str, Any] = {
        "num_layers": len(units),
        "hidden_size": model.hidden_size,
        "num_attention_heads": model.attention.num_heads,  # type: ignore[union-attr]
        "num_query_groups": model.query_groups,
        "kv_channels": model.latent.v_head_dim if model.latent else model.head_dim,
        "ffn_hidden_size": model.mlp.ffn_hidden_size if model.mlp else model.moe.ffn_hidden_size,  # type: ignore[union-attr]
        "gated_linear_unit": gated,
        "vocab_size": model.vocab_size,
        "position_embedding_type": {"rope": "rope", "learned": "learned_absolute", "none": "none"}[model.position_embedding],
        "normalization": {"rmsnorm": "RMSNorm", "layernorm": "LayerNorm"}[model.normalization],
        "share_embeddings_and_output_weights": model.tie_embeddings,
        "seq_length": spec.training.seq_length,
        "add_bias_linear": model.linear_bias,
        "mtp_num_layers": model.mtp_num_layers or None,
    }
    attention = model.attention
    if attention is not None:
        m.update(qk_layernorm=attention.qk_layernorm, softmax_type="learnable" if attention.sinks else "vanilla",
                 window_size=[attention.window_size, 0] if attention.window_size else None,
                 window_attn_skip_freq=attention.window_full_every)
    if model.latent:  # rendered as Megatron-LM does (args._latent_attention_flags)
        mla = model.latent
        m.update(multi_latent_attention=True, q_lora_rank=mla.q_lora_rank, kv_lora_rank=mla.kv_lora_rank,
                 qk_head_dim=mla.qk_head_dim, qk_pos_emb_head_dim=mla.rope_head_dim, v_head_dim=mla.v_head_dim,
                 qk_layernorm=True)
    if model.moe:
        m.update(
            num_moe_experts=model.moe.num_experts,
            moe_ffn_hidden_size=model.moe.ffn_hidden_size,
            moe_router_topk=model.moe.top_k,
            moe_shared_expert_intermediate_size=model.moe.shared_expert_ffn_hidden_size,
            moe_token_dispatcher_type=model.moe.dispatcher,
            moe_layer_freq=[1 if u == "AE" else 0 for u in units],
            moe_latent_size=model.moe.latent_size,
            moe_router_num_groups=model.moe.router_num_groups,
            moe_router_group_topk=model.moe.router_group_topk,
        )
    pipeline: dict[str, Any] = {}
    # the stage split where megacpp finds the layout legal (its MLA without Transformer Engine aside:
    # mla_param_cases builds it with the core attention shimmed)
    if spec.parallel.pipeline_layout is not None:  # pinned: rendered as it is, legal or not
        pipeline["pipeline_model_parallel_layout"] = spec.parallel.pipeline_layout
    elif all(v.severity != "error" or v.rule in ("mla-needs-te", "moe-latent-needs-te") for v in check_layout(ctx, lay)):
        split, stages = assign_stages(ctx, lay.pp, lay.vpp)
        if split.kind == "layout":
            last, mtp = len(split.sizes) - 1, {s.vp_stage * lay.pp + s.pp_rank for s in stages if s.mtp}
            pipeline["pipeline_model_parallel_layout"] = "|".join(
                ("E" if k == 0 else "") + "t" * n + "m" * model.mtp_num_layers * (k in mtp) + ("L" if k == last else "")
                for k, n in enumerate(split.sizes)
            )
    layout = {"tp": lay.tp, "pp": lay.pp, "vpp": lay.vpp, "cp": lay.cp, "ep": lay.ep, "etp": lay.etp, "sp": lay.sp}
    batch = {"global_batch_size": spec.training.global_batch_size, "micro_batch_size": lay.micro_batch_size}
    return {"id": case_id, "layout": layout, "model": m, "pipeline": pipeline, "batch": batch}


def latent_moe_param_cases() -> list[tuple[str, Spec, Layout]]:
    """Latent MoE layouts whose parameters are compared with megatron-core's own build. Its local
    spec cannot build the latent projections (rule moe-latent-needs-te: they are TELinear), so the
    probe stands a duplicated torch linear of the same shape in for them (moe_latent_te_linear_shim);
    what this checks is the experts' latent widths, the router and shared expert beside them, and
    where each lands under EP, ETP and PP, all megatron-core's own (TP > 1 with MoE needs sequence
    parallelism, which the local spec's torch norm refuses: the probe runs without TE)."""
    m = TINY_MOE
    latent = make_spec(m, **{"model.moe.latent_size": 32})
    shared = make_spec(m, **{"model.moe.latent_size": 16, "model.moe.shared_expert_ffn_hidden_size": 96,
                             "model.pattern": "AD (AE)*3", "model.mlp": {"ffn_hidden_size": 128, "gated": True}})
    return [
        ("latent-moe-params-ep2", latent, L(ep=2)),
        ("latent-moe-params-ep2-etp4", latent, L(ep=2, etp=4)),
        ("latent-moe-params-shared-pp2-ep2-etp2", shared, L(pp=2, ep=2, etp=2)),
    ]


@pytest.fixture(scope="module")
def megatron_results(tmp_path_factory) -> dict[str, dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("parity")
    shimmed = [probe_case(*c) for c in mla_param_cases()]
    for case in shimmed:
        case["model"]["mla_core_attention_shim"] = True
    for case in (latent := [probe_case(*c) for c in latent_moe_param_cases()]):
        case["model"]["moe_latent_te_linear_shim"] = True
    shimmed += latent
    (tmp / "cases.json").write_text(json.dumps([probe_case(*c) for c in cases()] + shimmed))
    proc = subprocess.run(
        [sys.executable, str(PROBE), str(tmp / "cases.json"), str(tmp / "out.json"), "--world", str(WORLD)],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {r["id"]: r for r in json.loads((tmp / "out.json").read_text())}


def test_enough_cases_on_both_sides():
    all_cases = cases()
    verdicts = [not any(v.severity == "error" for v in check_layout(make_context(s), lay)) for _, s, lay in all_cases]
    assert len(all_cases) >= 40
    assert sum(verdicts) >= 15 and len(verdicts) - sum(verdicts) >= 15


@pytest.mark.parametrize("case_id,spec,lay", cases(), ids=[c[0] for c in cases()])
def test_verdict_matches_megatron(megatron_results, case_id, spec, lay):
    errors = [v for v in check_layout(make_context(spec), lay) if v.severity == "error"]
    result = megatron_results[case_id]
    assert (not errors) == result["ok"], (
        f"megacpp says {'legal' if not errors else [e.rule for e in errors]}, "
        f"Megatron says {'ok' if result['ok'] else result['stage'] + ': ' + str(result['error'])}"
    )


@pytest.mark.parametrize("case_id,spec,lay", cases(), ids=[c[0] for c in cases()])
def test_params_per_rank_match_megatron(megatron_results, case_id, spec, lay):
    result = megatron_results[case_id]
    if not result["ok"]:
        pytest.skip("Megatron rejects this layout")
    assert_params_match(result, spec, lay)


def assert_params_match(result: dict[str, Any], spec: Spec, lay: Layout) -> None:
    """Each rank's parameters, routed-expert parameters and parameter tensors as megacpp predicts them."""
    ctx = make_context(spec)
    _, stages = assign_stages(ctx, lay.pp, lay.vpp)
    predicted = stage_memory(ctx, lay, stages, DEFAULT_EFFICIENCY)
    for rank in result["ranks"]:
        stage = predicted[rank["pp"]]
        assert (rank["params"], rank["params_routed_expert"]) == (stage.params, stage.params_expert), f"rank {rank['rank']}"
        # the tensors the optimizer step does host work for (Efficiency.optimizer_tensor_s)
        assert rank["param_tensors"] == stage.param_tensors, f"rank {rank['rank']}"


@pytest.mark.parametrize("case_id,spec,lay", mla_param_cases(), ids=[c[0] for c in mla_param_cases()])
def test_mla_params_per_rank_match_megatron(megatron_results, case_id, spec, lay):
    """Every rank's MLA (and MTP) parameters equal megatron-core's instantiated ones (see mla_param_cases)."""
    assert any(v.rule == "mla-needs-te" for v in check_layout(make_context(spec), lay))
    assert megatron_results[case_id]["ok"], megatron_results[case_id]["error"]
    assert_params_match(megatron_results[case_id], spec, lay)


@pytest.mark.parametrize("case_id,spec,lay", latent_moe_param_cases(), ids=[c[0] for c in latent_moe_param_cases()])
def test_latent_moe_params_per_rank_match_megatron(megatron_results, case_id, spec, lay):
    """Every rank's latent-MoE parameters equal megatron-core's instantiated ones (see latent_moe_param_cases)."""
    assert any(v.rule == "moe-latent-needs-te" for v in check_layout(make_context(spec), lay))
    assert megatron_results[case_id]["ok"], megatron_results[case_id]["error"]
    assert_params_match(megatron_results[case_id], spec, lay)


@pytest.mark.parametrize("case_id,spec,lay", cases(), ids=[c[0] for c in cases()])
def test_rank_map_matches_parallel_state(megatron_results, case_id, spec, lay):
    """Coordinates and group memberships equal those megatron-core's parallel_state builds."""
    result = megatron_results[case_id]
    if result["groups"] is None:
        pytest.skip("parallel_state rejected this layout")
    groups = process_groups(lay)
    for axis in ("tp", "cp", "dp", "dp_cp", "pp", "ep", "etp", "edp"):
        assert groups[axis] == result["groups"][axis], axis
    coords = rank_coordinates(lay, gpus_per_node=8)
    for rank in result["ranks"]:
        mine = coords[rank["rank"]]
        assert {k: mine[k] for k in ("tp", "cp", "dp", "pp", "ep", "etp", "edp")} == {
            k: rank[k] for k in ("tp", "cp", "dp", "pp", "ep", "etp", "edp")
        }
