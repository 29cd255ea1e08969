"""The scale benchmark's truth handling: published rows become loadable specs with their layouts
pinned, what the spec cannot express is named, the newest run of a configuration is kept, and the
held-out split is stable. Accuracy numbers are the benchmark's output, not asserted here."""

from __future__ import annotations

import csv
import hashlib
import json
import statistics

import pytest

from benchmarks.scale import report, run, truth
from benchmarks.scale.truth import convert, load_runs, select_newest
from megacpp.planner import spec_from_dict
from megacpp.planner.megatron.args import TrainOptions, known_flags, megatron_args
from megacpp.planner.megatron.render import RenderOptions, render_launch
from megacpp.planner.plan import build_plan


def row(row_id: int) -> dict:
    return next(r for r in load_runs() if r["row_id"] == row_id)


def synthetic(row_id: int, release: str, **changes: object) -> dict:
    """A copy of Llama-3 70B on 64 H100 (row 86) under another id and release."""
    return {**row(86), "row_id": row_id, "release": release, **changes}


def test_dense_row_becomes_a_spec_with_the_published_layout_pinned() -> None:
    published = row(86)  # Llama-3 70B, 64 x H100, FP8-CS, TP4 PP8 VP5
    conv = convert(published)
    assert conv.status == "exact" and conv.skip_reason is None
    spec = spec_from_dict(conv.spec)
    assert spec.model.pattern == "(AD)*80"
    pins = spec.parallel
    assert (pins.tp, pins.pp, pins.vpp, pins.cp, pins.ep) == (4, 8, 5, 1, 1)
    assert pins.dp == 64 // (4 * 8 * 1)
    assert spec.cluster.preset == "h100-sxm-8" and spec.cluster.nodes == 8
    assert spec.training.precision == "fp8"
    assert (spec.training.global_batch_size, spec.training.micro_batch_size, spec.training.seq_length) == (256, 1, 8192)
    # the search twin keeps everything but the layout
    free = spec_from_dict(conv.search_spec)
    assert free.parallel.tp is None and free.training == spec.training


@pytest.mark.parametrize(("row_id", "field", "table", "ran"), [(11, "mbs", 4, 1), (16, "ep", 8, 64), (59, "mbs", 2, 1)])
def test_a_field_the_table_and_its_recipe_file_disagree_on_is_planned_as_the_file_ran_it(
        row_id: int, field: str, table: int, ran: int) -> None:
    published = row(row_id)
    assert published[field] == table
    spec = spec_from_dict(convert(published).spec)
    planned = {"mbs": spec.training.micro_batch_size, "ep": spec.parallel.ep}[field]
    assert planned == ran
    assert any(f"table's {field} {table}" in note for note in convert(published).assumptions)
    # selection and the held-out split still key on the published row
    assert truth.config_key(published)[truth.CONFIG_FIELDS.index(field)] == table


def test_a_row_that_agrees_with_its_recipe_file_is_planned_as_published() -> None:
    ran, notes = truth.as_run(row(86))
    assert ran == row(86) and notes == []


def test_hybrid_pattern_maps_megatron_symbols_to_block_letters() -> None:
    conv = convert(row(121))  # Nemotron 3 Nano, 8 x B200
    spec = spec_from_dict(conv.spec)
    source = truth.load_models()["nemotron_3_nano"]["hybrid_override_pattern"]
    assert spec.model.pattern == source.replace("*", "A")
    assert spec.model.mamba is not None and spec.model.moe is not None and spec.model.mlp is None
    assert conv.spec["model"]["moe"]["dispatcher"] == "flex" and conv.spec["model"]["moe"]["flex_backend"] == "hybridep"


@pytest.mark.parametrize("row_id", [284, 138])
def test_nemotron_3_super_rows_are_planned_with_latent_moe_and_their_precision(row_id: int) -> None:
    """Nemotron 3 Super's latent MoE and NVFP4 were skips; both are spec keys now."""
    conv = convert(row(row_id))
    assert conv.status != "skipped" and conv.spec["model"]["moe"]["latent_size"]
    assert conv.spec["training"]["precision"] == ("fp4" if row_id == 284 else "fp8")


def test_latent_moe_and_windowed_attention_are_mapped_exactly() -> None:
    """Nemotron 3 Super's latent MoE and GPT-OSS's sliding windows, sinks and biases are spec keys
    now: neither row is skipped or approximated for them."""
    super_ = convert(row(138))  # Nemotron 3 Super, 64 x B200
    assert super_.spec is not None and super_.spec["model"]["moe"]["latent_size"] == 1024
    assert "latent-moe" not in truth.SKIPS and "sliding-window-as-full" not in truth.APPROXIMATIONS
    oss = convert(row(7))  # GPT-OSS-120B, 64 x H100
    assert oss.status == "exact" and not oss.not_modelled
    model = spec_from_dict(oss.spec).model
    assert model.linear_bias and model.attention is not None
    assert (model.attention.window_size, model.attention.window_full_every, model.attention.sinks) == (128, 2, True)
    qwen = spec_from_dict(convert(row(34)).spec).model  # Qwen3-30B-A3B, 16 x H100
    assert qwen.attention is not None and qwen.attention.qk_layernorm
    deepseek = spec_from_dict(convert(row(39)).spec).model  # MLA's qk_layernorm norms its latents, not GQA heads
    assert deepseek.attention is not None and not deepseek.attention.qk_layernorm


def test_every_published_run_maps_exactly() -> None:
    conv = convert(row(2))  # Nemotron 3 Super, 64 x H100: experts padded to a capacity factor of 1.1
    assert conv.status == "exact" and conv.approximations == ()
    moe = spec_from_dict(conv.spec).model.moe
    assert moe is not None and (moe.capacity_factor, moe.pad_to_capacity) == (1.1, True)
    assert all(convert(sel.row).status == "exact" for sel in truth.select_newest(truth.load_runs()))
    deepseek = convert(row(39))  # DeepSeek-V3, 1024 x H100: MLA, MTP and the layout "Et|(tt|)*30mL", all exact
    assert deepseek.status == "exact", deepseek.approximations


def test_a_layout_with_an_empty_stage_is_pinned_as_the_layout_string() -> None:
    conv = convert(row(39))  # "Et|(tt|)*30mL" on pp8 x vp4: the last stage holds only the MTP layer and the loss
    assert "pp-layout-balanced" not in conv.approximations
    assert conv.spec["parallel"]["pipeline_layout"] == "Et|(tt|)*30mL"
    stages = build_plan(spec_from_dict(conv.spec), top=1).candidates[0].stages
    last = next(s for s in stages if s.output_head)
    assert (last.blocks, last.mtp, last.pp_rank, last.vp_stage) == ("", True, 7, 3)
    plan = build_plan(spec_from_dict(conv.spec), top=1)
    assert plan.candidates[0].split.sizes == [1] + [2] * 30 + [0]
    assert "pipeline_layout" not in conv.search_spec["parallel"]


@pytest.mark.parametrize("row_id", [0, 2, 138, 284])
def test_hybrid_mtp_rows_are_mapped_exactly(row_id: int) -> None:
    """Nemotron 3 Super and 3.5 Lightning train two MTP depths of one shared `*E` layer (models.json
    mtp_hybrid_override_pattern, mtp_use_repeated_layer), which only main's hybrid stack builds."""
    conv = convert(row(row_id))
    assert "mtp-dropped" not in conv.approximations
    spec = spec_from_dict(conv.spec)
    assert (spec.model.mtp_num_layers, spec.model.mtp_pattern, spec.model.mtp_shared_weights) == (2, "AE", True)
    assert spec.backend.megatron == "main"
    plan = build_plan(spec, top=1)
    words = render_launch(plan, RenderOptions(engine="megatron-lm"))["launch.sh"]
    assert "/*E/*E" in words and "--mtp-use-repeated-layer" in words


@pytest.mark.parametrize(("row_id", "precision", "recipe"), [
    (35, "fp8", "tensorwise"), (121, "fp8", "mxfp8"), (318, "fp8", "blockwise"), (110, "fp8", "delayed"),
    (34, "bf16", "delayed"),
])
def test_precision_labels_map_to_precision_and_fp8_recipe(row_id: int, precision: str, recipe: str) -> None:
    training = spec_from_dict(convert(row(row_id)).spec).training
    assert (training.precision, training.fp8_recipe) == (precision, recipe)


def test_fp8_current_scaling_keeps_moe_act_and_layernorm_recompute() -> None:
    conv = convert(row(35))  # Nemotron 3 Nano, 16 x H100, fp8-cs
    assert conv.status == "exact"
    assert {"moe_act", "layernorm"} <= set(conv.spec["training"]["recompute_modules"])


def test_megatron_fsdp_rows_plan_with_fsdp() -> None:
    conv = convert(row(106))  # Llama-3 8B, 8 x H100, Megatron-FSDP
    assert conv.status == "exact" and conv.spec["training"]["data_parallel_sharding"] == "fsdp"
    assert spec_from_dict(conv.spec).training.data_parallel_sharding == "fsdp"


def test_multi_latent_attention_and_mtp_are_mapped_exactly() -> None:
    conv = convert(row(159))  # DeepSeek-V3 (w/ MTP) on 256 x B200, selective [mla_up_proj]
    assert conv.status == "exact" and conv.approximations == ()
    spec = spec_from_dict(conv.spec)
    assert spec.model.latent is not None and spec.model.latent.q_lora_rank == 1536
    assert (spec.model.latent.kv_lora_rank, spec.model.latent.rope_head_dim) == (512, 64)
    assert spec.model.mtp_num_layers == 1
    assert spec.training.recompute_modules == ("mla_up_proj",)
    assert "QK layernorm" not in conv.not_modelled  # MLA's latent norms are planned


def test_a_layout_with_layers_on_every_stage_is_pinned_as_cuts() -> None:
    conv = convert(row(155))  # DeepSeek-V3 on 256 x B200: "Et*4|(t*4|)*14tmL" over pp8 x vp2
    spec = spec_from_dict(conv.spec)
    assert [len(s) // 2 for s in spec.pattern.segments] == [4] * 15 + [1]
    assert "pp-layout-balanced" not in conv.approximations
    assert "|" not in conv.search_spec["model"]["pattern"]


def test_selection_keeps_the_newest_release_of_each_configuration() -> None:
    rows = [synthetic(1, "25.11"), synthetic(2, "26.02.01"), synthetic(3, "26.06", fsdp=None),
            synthetic(4, "26.02"), synthetic(5, "25.11", gbs=128)]
    picked = {s.row["row_id"]: s.superseded for s in select_newest(rows)}
    assert picked == {3: (1, 2, 4), 5: ()}
    assert truth.release_order("main@2026-08 (see card)") > truth.release_order("26.06")
    assert truth.release_order("26.02.01") > truth.release_order("26.02") > truth.release_order("25.11")


def test_a_configuration_run_in_several_releases_is_compared_with_the_run_before_its_newest() -> None:
    rows = [synthetic(1, "26.02", tokens_per_sec_per_gpu=1000.0), synthetic(2, "25.11", tokens_per_sec_per_gpu=900.0),
            synthetic(3, "26.04", tokens_per_sec_per_gpu=1250.0), synthetic(4, "25.11", gbs=128)]
    picked = {s.row["row_id"]: s for s in select_newest(rows)}
    assert [r[0] for r in picked[3].releases] == [2, 1, 3] and len(picked[4].releases) == 1
    records = [{"row_id": rid, "releases": [{"row_id": i, "release": rel, "tokens_per_sec_per_gpu": tps}
                                            for i, rel, tps in sel.releases],
                "pinned": {"outcome": "planned", "predicted_tokens_per_sec_per_gpu": 1100.0, "error": 1100 / 1250 - 1}}
               for rid, sel in picked.items()]
    spread = report.release_spread(records)
    (only,) = spread["configurations"]  # the configuration run once has nothing to compare
    assert only["row"] == 3 and only["previous_row"] == 1
    assert only["change"] == pytest.approx(0.25) and only["error_previous"] == pytest.approx(0.10)
    assert spread["beyond_15"] == 1 and spread["median_abs_change"] == pytest.approx(0.25)


def test_nulls_that_mean_the_default_name_one_configuration() -> None:
    a = synthetic(1, "25.11", vp=1, ep=1, fsdp=0)
    b = synthetic(2, "26.02", vp=1, ep=None, fsdp=None)
    assert truth.config_key(a) == truth.config_key(b)
    assert truth.config_key(a) != truth.config_key(synthetic(3, "25.11", vp=2))


def test_truth_selection_counts() -> None:
    selected = select_newest(load_runs())
    assert len(load_runs()) == 84
    summaries = [s for s in selected if "performance_summary" in s.row["source_type"]]
    assert (len(selected), len(summaries)) == (46, 42)


def test_held_out_split_is_deterministic_and_both_halves_are_used() -> None:
    selected = select_newest(load_runs())
    for s in selected:
        digest = int(hashlib.sha1(s.key_text.encode()).hexdigest(), 16)
        assert s.held_out == (digest % 3 == 0) == truth.held_out(s.key_text)
    assert [s.half for s in selected] == [s.half for s in select_newest(list(reversed(load_runs())))]
    halves = {s.half for s in selected if convert(s.row).status != "skipped"}
    assert halves == {"tuning", "held-out"}


def test_a_pinned_plan_reports_tokens_per_gpu_and_its_error() -> None:
    published = row(108)  # Llama-3 8B on 8 x B200
    result = run.plan_pinned(convert(published).spec, published["tokens_per_sec_per_gpu"])
    assert result["outcome"] == "planned"
    assert result["layout"]["tp"] == 1 and result["layout"]["dp"] == 8
    assert result["host_bound"] == (result["decided_by"] == "block_overhead")
    assert result["decided_by"] == max(result["step_breakdown"], key=result["step_breakdown"].get)
    measured = published["tokens_per_sec_per_gpu"]
    planned = result["predicted_tokens_per_sec_per_gpu"]
    assert result["error"] == pytest.approx((planned - measured) / measured, abs=1e-3)


def test_a_rejected_pinned_layout_names_the_rule() -> None:
    spec = json.loads(json.dumps(convert(row(86)).spec))
    spec["parallel"]["tp"] = 3  # 64 heads are not divisible by 3
    spec["parallel"]["dp"] = 1
    result = run.plan_pinned(spec, 1.0)
    assert result["outcome"] in {"rejected", "error"} and result["rule"] and result["message"]


def test_only_writes_a_partial_report(tmp_path) -> None:
    assert run.main(["--only", "llama3_8b", "--no-search", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "scale.json").read_text())
    assert {r["model_key"] for r in data["rows"]} == {"llama3_8b"}
    md = (tmp_path / "scale.md").read_text()
    assert "Filtered to llama3_8b" in md and "## Every configuration" in md


@pytest.mark.parametrize("row_id", [0, 2, 4, 34])
def test_bridge_perf_recipes_reduce_gradients_in_bf16(row_id: int) -> None:
    """Megatron-Bridge's perf_recipes pass through _benchmark_common (grad_reduce_in_fp32 = False):
    the verification cards' runs keep bf16 gradient buffers, where an older summary row without the
    setting keeps fp32."""
    assert spec_from_dict(convert(row(row_id)).spec).training.grad_reduce_dtype == "bf16"
    assert spec_from_dict(convert(row(39)).spec).training.grad_reduce_dtype == "fp32"  # DeepSeek-V3, 25.09


def test_nemotron_3_super_h100_holds_its_recipes_optimizer_state() -> None:
    """Row 2 (Super, 64 H100, TP1 PP2 EP32): the library recipe's precision-aware Adam (fp16 master,
    bf16 moments: 6 bytes a parameter), bf16 gradients, and experts whose state is not sharded, as
    EDP = 64 / (EP 32 x PP 2) = 1. How close the peak comes to the card's is the benchmark's to say."""
    spec = spec_from_dict(convert(row(2)).spec)
    opt = spec.training.optimizer
    assert (opt.main_params_dtype, opt.exp_avg_dtype, opt.exp_avg_sq_dtype) == ("fp16", "bf16", "bf16")
    cand = build_plan(spec, top=1).to_json_dict()["candidates"][0]
    assert cand["layout"]["edp"] == 1 and cand["layout"]["dp"] == 32
    first = cand["memory"]["per_stage"][0]
    dense = first["params"] - first["params_expert"]
    assert first["optimizer_gib"] == pytest.approx(6 * (first["params_expert"] + dense / 32) / 2**30, rel=1e-3)
    assert first["gradients_gib"] == pytest.approx(first["weights_gib"])


def test_a_card_row_takes_the_dispatcher_and_adam_state_its_library_recipe_sets() -> None:
    """DeepSeek-V3's card run on 1,024 H100 names no dispatcher: its perf recipe builds on the
    library recipe, which sets HybridEP and bf16 Adam moments. An older summary row that states
    its dispatcher keeps its own."""
    conv = convert(row(4))
    spec = spec_from_dict(conv.spec)
    assert (spec.model.moe.dispatcher, spec.model.moe.flex_backend) == ("flex", "hybridep")
    assert (spec.training.optimizer.exp_avg_dtype, spec.training.optimizer.exp_avg_sq_dtype) == ("bf16", "bf16")
    assert not any("dispatcher not stated" in a for a in conv.assumptions)
    assert spec_from_dict(convert(row(39)).spec).model.moe.flex_backend == "deepep"  # 25.09, stated

def test_the_nemo_rows_take_what_nemo_2_2_0s_performance_scripts_set() -> None:
    """The NeMo 25.02 page's Mixtral runs: token dropping at capacity 1.0, padded
    (MegatronTokenDropCallback in the recipes' performance mode), the alltoall dispatcher, no
    recompute; 8x22B at the recommended config's etp 1, 8x7B on B200 with each layer captured in a
    CUDA graph; FP8 weights named where the spec cannot carry them."""
    big, small = (spec_from_dict(convert(row(i)).spec) for i in (42, 44))
    for spec in (big, small):
        moe = spec.model.moe
        assert (moe.capacity_factor, moe.pad_to_capacity, moe.dispatcher) == (1.0, True, "alltoall")
        assert spec.training.recompute == "none"
    assert (big.parallel.tp, big.parallel.etp) == (2, 1)
    assert (big.training.cuda_graphs, small.training.cuda_graphs) == ("none", "layers")
    conv = convert(row(42))
    assert not any("not published for this row" in a or "etp = tp" in a for a in conv.assumptions)
    assert any("FP8 weights" in n for n in conv.not_modelled)


def test_the_cards_peaks_are_read_as_the_gb_megatron_bridge_prints() -> None:
    """Megatron-Bridge's memory report prints bytes / 1e9 ("memory (GB)"), which the verification
    cards copy under a GiB label: Super's 59.000 is 54.95 GiB. A row without a peak has none."""
    assert truth.published_peak_gib(row(2)) == pytest.approx(59.0e9 / 2**30, abs=1e-3)
    assert truth.published_peak_gib(row(86)) is None
    published = run._published(row(2))
    assert published["peak_allocated_reported_gb"] == 59.0 and published["peak_allocated_gib"] == pytest.approx(54.948)

def test_the_deep_rank_counts_the_vpp_variants_of_a_layout_once() -> None:
    """Llama-3-70B on 64 H100 (row 86): many of the layouts the plan puts ahead of the published
    one are VPP variants of a few, which the distinct rank counts once, as `megacpp plan` ranks;
    a pinned step faster than every candidate is first either way."""
    conv = convert(row(86))
    pinned = run.plan_pinned(conv.spec, row(86)["tokens_per_sec_per_gpu"])
    ranks = run.deep_rank(conv.search_spec, pinned)
    assert 1 < ranks["rank_distinct"] < ranks["rank_deep"] <= run.RANK_DEPTH
    assert ranks["in_top_every_vpp"] == (ranks["rank_deep"] <= run.SEARCH_TOP)
    assert run.deep_rank(conv.search_spec, {**pinned, "step_seconds": 0.0}) == {
        "rank_deep": 1, "rank_distinct": 1, "in_top_every_vpp": True}
    # the plan's own top, each layout once, agrees with the distinct rank read deeper
    found = run.search(conv.search_spec, pinned)
    assert found["rank"] == ranks["rank_distinct"] if ranks["rank_distinct"] <= run.SEARCH_TOP else found["rank"] is None


def test_the_search_rank_sees_past_the_published_layout_at_the_plans_own_split() -> None:
    """DeepSeek-V3 on 1,024 H100 (row 39): the published layout at the plan's own stage split is
    among the plan's top 5, faster than at its published split, so a top 5 holds only four others:
    the rank reads one candidate further and agrees with the distinct rank read to 300."""
    conv = convert(row(39))
    pinned = run.plan_pinned(conv.spec, row(39)["tokens_per_sec_per_gpu"])
    ranks = run.deep_rank(conv.search_spec, pinned)
    found = run.search(conv.search_spec, pinned)
    assert any(run._base(c["layout"]) == run._base(pinned["layout"]) for c in found["top"])
    assert found["rank"] == (ranks["rank_distinct"] if ranks["rank_distinct"] <= run.SEARCH_TOP else None)
    assert len(found["top"]) == run.SEARCH_TOP


PUBLISHED = {f"row{sel.row['row_id']}": convert(sel.row).spec for sel in select_newest(load_runs())}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_every_published_run_renders_flags_mains_parser_takes(name: str) -> None:
    """Each published run's pinned plan renders a Megatron-LM launch whose every flag the main
    dialect's parser accepts (megatron_lm_flags.txt)."""
    doc = {**PUBLISHED[name], "backend": {**PUBLISHED[name].get("backend", {}), "megatron": "main"}}
    plan = build_plan(spec_from_dict(doc), top=1)
    args = megatron_args(plan.context, plan.candidates[0], TrainOptions())
    flags = {a for a in args if a.startswith("--")}
    assert flags and flags <= known_flags("main"), flags - known_flags("main")


# ---------------------------------------------------------------------------------------------
# the independent check: GB200, GB300 and B300 runs, which nothing is fitted to


@pytest.mark.parametrize("nodes, segment", [(2, 2), (16, 16), (18, 18), (32, 16), (64, 16), (20, 10), (19, 1)])
def test_an_nvl72_run_gets_megatron_bridges_slurm_segment(nodes: int, segment: int) -> None:
    assert truth.nvl72_segment(nodes) == segment


def test_an_nvl72_run_plans_on_its_segments_nvlink_domain() -> None:
    # 256 GPUs are 64 trays, given as 4 segments of 16 trays: 64 GPUs share NVLink, not 72
    assert truth.cluster("GB200", 256) == {"preset": "gb200-nvl72", "nodes": 64, "nvlink_domain": 64}
    assert truth.cluster("GB300", 8) == {"preset": "gb300-nvl72", "nodes": 2, "nvlink_domain": 8}
    assert truth.cluster("B300", 64) == {"preset": "b300-sxm-8", "nodes": 8}
    assert truth.cluster("H100", 64) == {"preset": "h100-sxm-8", "nodes": 8}


def test_the_independent_runs_are_kept_apart_from_the_runs_the_model_is_fitted_to() -> None:
    independent = load_runs(truth.INDEPENDENT_FILE)
    assert independent and all(r["system"] in truth.INDEPENDENT_SYSTEMS and r["source_url"] for r in independent)
    assert not any(r["system"] in truth.INDEPENDENT_SYSTEMS for r in load_runs())
    assert not {r["row_id"] for r in independent} & {r["row_id"] for r in load_runs()}
    selected = select_newest(independent)
    assert {s.half for s in selected} == {"independent"}
    # the fits read load_runs() alone: published H100 and B200 rows
    assert {s.row["system"] for s in select_newest(load_runs())} == {"H100", "B200"}


def test_the_independent_check_writes_its_own_report(tmp_path) -> None:
    assert run.main(["--truth", "independent", "--only", "llama3_8b", "--no-search", "--out", str(tmp_path)]) == 0
    assert not (tmp_path / "scale.json").exists()
    data = json.loads((tmp_path / "independent.json").read_text())
    assert data["truth"]["name"] == "independent" and set(data["summary"]["accuracy"]) == {"all"}
    assert data["rows"] and {r["system"] for r in data["rows"]} <= set(truth.INDEPENDENT_SYSTEMS)
    assert all(r["half"] == "independent" for r in data["rows"])
    md = (tmp_path / "independent.md").read_text()
    assert md.startswith("# Independent check") and "GB200, GB300 and B300" in md


def independent_row(row_id: int) -> dict:
    return next(r for r in load_runs(truth.INDEPENDENT_FILE) if r["row_id"] == row_id)


def test_deepseek_runs_keep_the_bf16_moments_of_their_library_recipe() -> None:
    for row_id in (39, 155, 159):
        assert convert(row(row_id)).spec["training"]["optimizer"] == {"exp_avg_dtype": "bf16", "exp_avg_sq_dtype": "bf16"}
    assert "optimizer" not in convert(row(86)).spec["training"]  # Llama-3 keeps Megatron's fp32 state


def test_a_v0_2_0_module_list_without_a_granularity_recomputes_nothing() -> None:
    assert convert(row(16)).spec["training"]["recompute"] == "none"  # GPT-OSS on 64 B200, 25.11
    later = convert(row(15)).spec["training"]  # the same recipe in 26.02 pairs the list with selective
    assert later["recompute"] == "selective" and later["recompute_modules"] == ["layernorm", "moe_act"]
    assert convert(row(159)).spec["training"]["recompute"] == "selective"  # DeepSeek-V3's family sets it


@pytest.mark.parametrize("layers, stages, layout", [
    (126, 128, "E|(t|)*126L"), (126, 64, "Et|(t*2|)*62tL"), (126, 32, "Et*3|(t*4|)*30t*3L"),
    (126, 2, "Et*63|t*63L"), (126, 12, None), (126, 1, None)])
def test_counting_embedding_and_loss_as_layers_gives_megatrons_layout(layers, stages, layout) -> None:
    assert truth.embedding_and_loss_layout(layers, stages) == layout
    if layout is not None:
        parts = truth.expand_pp_layout(layout)
        assert len(parts) == stages and sum(p.count("t") for p in parts) == layers


def test_llama_405b_runs_split_as_their_recipe_counts_embedding_and_loss() -> None:
    assert convert(row(63)).spec["parallel"]["pipeline_layout"] == "Et|(t*2|)*62tL"  # 25.11 onward
    assert "pipeline_layout" not in convert(row(70)).spec["parallel"]  # NeMo 25.02: no recipe published
    gb200 = convert(independent_row(1036))  # PP16 x VP8 = 128 stages for 126 layers
    assert gb200.spec["parallel"]["pipeline_layout"] == "E|(t|)*126L"
    assert run.plan_pinned(gb200.spec, 1.0)["outcome"] == "planned"


def test_independent_rows_carry_their_recipes_offloading() -> None:
    fsdp = convert(independent_row(1063)).spec["training"]  # Llama-3 70B, Megatron-FSDP, 40 layers to the CPU
    assert fsdp["offload_layers"] == 40 and fsdp["data_parallel_sharding"] == "fsdp"
    ultra = convert(independent_row(1016))  # Nemotron 3 Ultra offloads its fused grouped MLP
    assert ultra.spec["training"]["offload_modules"] == ["expert_fc1", "moe_act"]
    assert ultra.approximations == ("fused-group-mlp-offload",)
    assert convert(independent_row(1014)).spec["parallel"]["etp"] == 1  # the recipe file's etp, the table has none


def _record(row_id: int, layout: dict, gbs: int, measured: float, planned: float) -> dict:
    """A planned record as run.evaluate writes it, reduced to what report.side_by_side reads."""
    return {"row_id": row_id, "model_key": "m", "system": "B200", "precision": "bf16", "num_gpus": 64,
            "published": {"layout": {"tp": 1, "pp": 1, "cp": 1, "vp": None, "dp": 64, "etp": 1, "fsdp": 0, **layout},
                          "seq_length": 4096, "gbs": gbs, "mbs": 1, "tokens_per_sec_per_gpu": measured},
            "pinned": {"outcome": "planned", "predicted_tokens_per_sec_per_gpu": planned}}


def test_side_by_side_pairs_two_layouts_of_one_job_and_says_whether_the_plan_orders_them() -> None:
    """EP 8 against EP 64 of one job is a pair; the same layout at another batch is not; an
    ordering is right when the plan's ratio is on the measured side of 1."""
    records = [_record(1, {"ep": 8}, 1280, 13568, 15000),
               _record(2, {"ep": 64}, 1280, 8047, 9000),  # slower, and planned slower: ordered
               _record(3, {"ep": 32}, 1280, 9000, 8000),  # faster than EP 64, planned slower: not
               _record(4, {"ep": 8}, 512, 8213, 8700)]  # another batch: no pair with the others
    report_ = report.side_by_side(records)
    by_rows = {tuple(p["rows"]): p for p in report_["pairs"]}
    assert set(by_rows) == {(1, 2), (1, 3), (2, 3)}
    assert by_rows[(1, 2)]["ordered"] and by_rows[(1, 3)]["ordered"] and not by_rows[(2, 3)]["ordered"]
    assert by_rows[(1, 2)]["measured_ratio"] == pytest.approx(13568 / 8047, abs=1e-3)
    assert report_["ordered"] == 2 and report_["clear"] == 3 and report_["clear_ordered"] == 2


def test_calibrating_on_an_independent_system_splits_its_own_runs_by_the_same_hash(tmp_path) -> None:
    # what a GB300 user with runs of their own would do: fit on one part, check on the rest
    from benchmarks.scale.calibrate_check import write_tables

    paths = write_tables("GB300", tmp_path)
    halves = {half: list(csv.DictReader(path.open())) for half, path in paths.items()}
    assert halves["tuning"] and halves["held-out"]
    names = {r["name"] for rows in halves.values() for r in rows}
    assert all(r["cluster"] == "gb300-nvl72" for rows in halves.values() for r in rows)
    expected = {f"row{s.row['row_id']}-{s.row['model_key']}-x{s.row['num_gpus']}": s.held_out
                for s in select_newest(load_runs(truth.INDEPENDENT_FILE)) if s.row["system"] == "GB300"}
    assert names <= set(expected)
    assert all(expected[r["name"]] for r in halves["held-out"]) and not any(expected[r["name"]] for r in halves["tuning"])


def test_the_error_explain_quotes_between_two_layouts_is_the_committed_pairs_median() -> None:
    from megacpp.planner.cost.coefficients import LAYOUT_RATIO_ERROR

    pairs = [p for name in ("scale", "independent")
             for p in json.loads((run.RESULTS / f"{name}.json").read_text())["summary"]["side_by_side"]["pairs"]]
    assert len(pairs) >= 10
    assert round(statistics.median(abs(p["planned_ratio"] / p["measured_ratio"] - 1) for p in pairs), 2) == LAYOUT_RATIO_ERROR
