"""NVIDIA's published Megatron runs on H100 and B200, turned into megacpp specs.

Three pure steps over the truth files committed next to this module (copies of
shared/scale_truth, each row with its source_url):

- select: the newest published run of each distinct configuration;
- split: a deterministic held-out third, so that fits of the cost model tune on the rest only;
- convert: each selected run to a spec with its published layout pinned, marked exact,
  approximated (a feature the spec cannot express, planned without it and named) or skipped
  (a feature that cannot be planned around, named).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RUNS_FILE = HERE / "published_runs.json"
# the runs on systems nothing is fitted to: the independent check (README, "The independent check")
INDEPENDENT_FILE = HERE / "independent_runs.json"
MODELS_FILE = HERE / "models.json"

PRESETS = {"H100": "h100-sxm-8", "B200": "b200-sxm-8", "B300": "b300-sxm-8", "GB200": "gb200-nvl72",
           "GB300": "gb300-nvl72"}
INDEPENDENT_SYSTEMS = ("GB200", "GB300", "B300")
# a DGX node holds 8 GPUs; an NVL72 compute tray 4 (the presets' gpus_per_node)
GPUS_PER_NODE = {"H100": 8, "B200": 8, "B300": 8, "GB200": 4, "GB300": 4}
# Megatron-Bridge asks Slurm for a --segment of NVL72 trays, all in one rack: every node up to 18,
# else the largest divisor of the node count up to 18 (scripts/performance/utils/executors.py,
# "add --segment flag to sbatch if job uses GB200"). A run's NVLink domain is that segment.
NVL72_MAX_SEGMENT = 18
CONFIG_FIELDS = ("model_key", "system", "num_gpus", "precision", "gbs", "mbs", "seq_length",
                 "tp", "pp", "cp", "vp", "ep", "etp", "fsdp")
HELD_OUT_MODULUS = 3  # one third of the configurations is held out
# The precision label of a published row -> the spec's training.precision and fp8_recipe (truth
# README: fp8-cs = FP8 current scaling, fp8-mx = MXFP8). The NeMo 25.02 rows' plain "fp8" is NeMo
# 2.2.0's bf16_with_fp8_mixed: delayed scaling ("hybrid", amax history 1024), with FP8 weights
# (fp8_params=True), which the spec does not carry (NEMO_FP8_PARAMS, a detail of the row).
PRECISIONS = {
    "bf16": ("bf16", None), "fp8": ("fp8", "delayed"), "fp8-cs": ("fp8", "tensorwise"),
    "fp8-mx": ("fp8", "mxfp8"), "fp8-blockwise": ("fp8", "blockwise"), "nvfp4": ("fp4", None),
}
NEMO_FP8_PARAMS = "FP8 weights (NeMo's bf16_with_fp8_mixed: fp8_params=True); planned with bf16 weights"

# Hybrid-pattern symbols of Megatron (models.json _meta.hybrid_pattern_legend) -> megacpp letters.
HYBRID_LETTERS = {"M": "M", "*": "A", "-": "D", "E": "E"}

APPROXIMATIONS = {
    "fused-group-mlp-offload": "offloading of the fused grouped MLP's saved inputs (`fused_group_mlp`, under TE's op "
                               "fuser) planned as offloading the expert FC1 and activation inputs (`expert_fc1`, "
                               "`moe_act`), the tensors that MLP saves for its backward",
    "recompute-modules": "selective recompute modules the spec cannot pass to this run planned without them: "
                         "moe_act and layernorm under FP8 delayed scaling (which Megatron refuses them with)",
    "pp-layout-balanced": "the published pipeline layout leaves a virtual stage of a hybrid stack without "
                          "layers, which `|` cuts cannot pin; megacpp's own split over the same pp x vpp "
                          "stages is used",
}

SKIPS = {
    "no-architecture": "models.json has no architecture for this model",
    "layout-does-not-divide": "num_gpus is not a multiple of tp x pp x cp",
}


@cache
def load_runs(path: Path = RUNS_FILE) -> tuple[dict[str, Any], ...]:
    return tuple(json.loads(path.read_text()))


@cache
def load_models() -> dict[str, Any]:
    return json.loads(MODELS_FILE.read_text())


# Megatron-Bridge's report_memory (src/megatron/bridge/training/utils/train_utils.py) prints torch's
# peak allocated bytes / 1e9, rounded to 5 significant digits, as "memory (GB)"; the verification
# cards copy those figures under a GiB label (each has 5 significant digits: 59.000, 158.220, ...)
REPORTED_MEMORY_UNIT = 1e9


def published_peak_gib(row: dict[str, Any]) -> float | None:
    """The run's published peak allocated memory in GiB, from the card's figure in GB."""
    value = row.get("peak_allocated_memory_gib")
    return None if value is None else round(value * REPORTED_MEMORY_UNIT / 2**30, 3)


# ---------------------------------------------------------------------------------------------
# selection and split


def config_key(row: dict[str, Any]) -> tuple[Any, ...]:
    """The distinct-configuration key. Nulls that mean a default are normalised so that tables
    which print "n/a" and tables which print the default name one configuration: vp null = 1
    (truth README), ep null = 1 (no expert parallelism), fsdp null = 0 (not used). A null etp stays
    null: it is "not published", and Megatron's default for it (= tp) is an assumption."""
    norm = {"vp": row["vp"] or 1, "ep": row["ep"] or 1, "fsdp": row["fsdp"] or 0}
    return tuple(norm.get(k, row[k]) for k in CONFIG_FIELDS)


def config_key_text(row: dict[str, Any]) -> str:
    """The key as text, e.g. "model_key=llama3_70b|system=H100|...|fsdp=0": what the split hashes."""
    return "|".join(f"{k}={v}" for k, v in zip(CONFIG_FIELDS, config_key(row), strict=True))


def held_out(key_text: str) -> bool:
    """Held out when the SHA-1 of the key text, read as an integer, is 0 modulo 3."""
    return int(hashlib.sha1(key_text.encode()).hexdigest(), 16) % HELD_OUT_MODULUS == 0


def release_order(release: str) -> tuple[int, ...]:
    """'25.09' < '26.02' < '26.02.01' < 'main@2026-08 (...)': a main snapshot sorts by its month,
    after any numbered release of that month."""
    main = re.match(r"main@(\d{4})-(\d{2})", release)
    if main:
        return (int(main[1]) - 2000, int(main[2]), 0, 1)
    parts = [int(p) for p in release.split(".")]
    return (*parts, *[0] * (3 - len(parts)), 0)


@dataclass(frozen=True)
class Selected:
    row: dict[str, Any]
    key_text: str
    held_out: bool
    # (row id, release, measured tokens/s/GPU) of every run of the configuration, oldest first
    releases: tuple[tuple[int, str, float], ...]

    @property
    def superseded(self) -> tuple[int, ...]:
        """Row ids of the configuration's older releases."""
        return tuple(sorted(row_id for row_id, _, _ in self.releases[:-1]))

    @property
    def half(self) -> str:
        if self.row["system"] in INDEPENDENT_SYSTEMS:
            return "independent"
        return "held-out" if self.held_out else "tuning"


def select_newest(rows: tuple[dict[str, Any], ...] | list[dict[str, Any]]) -> list[Selected]:
    """The newest release of each distinct configuration (ties: the lower row id), by row id."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(config_key_text(row), []).append(row)
    out = []
    for key, group in groups.items():
        runs = sorted(group, key=lambda r: (release_order(r["release"]), -r["row_id"]))
        releases = tuple((r["row_id"], r["release"].split(" ")[0], r["tokens_per_sec_per_gpu"]) for r in runs)
        out.append(Selected(runs[-1], key, held_out(key), releases))
    return sorted(out, key=lambda s: s.row["row_id"])


# ---------------------------------------------------------------------------------------------
# what each run's recipe says


@dataclass(frozen=True)
class Recipe:
    """The settings of a published run that the spec can carry, read from its settings_compact
    text and its recipe record, or for the NeMo 25.02 page's rows from NeMo 2.2.0's performance
    scripts (NEMO_*). `published` is False where neither says anything: recompute and dispatcher
    are then assumptions."""

    published: bool
    recompute: str | None  # none | selective | full; None: not stated
    recompute_modules: tuple[str, ...]
    recompute_layers: int | None
    dispatcher: str | None  # alltoall | flex; None: not stated
    flex_backend: str | None
    capacity_factor: float | None
    padded: bool
    pp_layout: str | None
    pp_layout_mentioned: bool  # a run script names a layout the table's layout does not show
    activation_offload: bool
    bf16_moments: bool
    fsdp: bool
    runtime: tuple[str, ...]  # optimisations megacpp does not price
    ep_overlap: bool = False  # expert all-to-alls overlapped with compute (moe_a2a_overlap)
    tp_comm_overlap: bool = False  # TP collectives overlapped with the GEMMs (TE userbuffers)
    grad_reduce_bf16: bool = False  # gradients reduced in bf16 (grad_reduce_in_fp32 = False)
    cuda_graphs: str | tuple[str, ...] = "none"  # the spec's training.cuda_graphs (read_cuda_graphs)
    recompute_method: str | None = None  # full recompute of some layers: uniform | block
    offload_modules: tuple[str, ...] = ()  # fine-grained activation offloading
    offload_fraction: float = 1.0
    offload_layers: int | None = None  # whole-layer CPU offloading (cpu_offloading_num_layers)
    optimizer: tuple[tuple[str, str], ...] = ()  # Adam's dtypes the recipe's source sets (RECIPE_OPTIMIZERS)


NEMO_TP_OVERLAP = ("nemotron4_340b", "llama3_70b", "llama31_405b")
# The NeMo 25.02 rows ran NeMo 2.2.0's scripts/llm/performance/pretrain_*.py (tag v2.2.0), each
# calling its model's pretrain_recipe(performance_mode=True): no recipe sets recompute, Mixtral's
# config dispatches with alltoall (nemo/collections/llm/gpt/model/mixtral.py), and both Mixtral
# recipes' pretrain_performance_optimizations add MegatronTokenDropCallback, whose defaults drop
# tokens at capacity factor 1.0 and pad every expert to it (callbacks/moe_token_drop.py)
NEMO_TOKEN_DROP = ("mixtral_8x7b", "mixtral_8x22b")
# pretrain_mixtral_8x7b.py: enable_cuda_graph = gpu in ["b200"] (megatron-core's capture of each layer)
NEMO_CUDA_GRAPHS = {("mixtral_8x7b", "B200"): "layers"}
# recommended_model_configs/model_configs_b200.csv, the row with the published layout (tp 2, pp 4,
# cp 8, vp 14, ep 8 on 256 GPUs at sequence 65,536): etp_size 1
NEMO_ETP = {("mixtral_8x22b", "B200"): 1}
# Megatron-Bridge's flat performance recipes (src/megatron/bridge/perf_recipes/) all pass through
# _benchmark_common, which sets ddp.grad_reduce_in_fp32 = False, and _perf_precision, which sets it
# again on the mixed-precision config (perf_recipes/_common.py): their gradient buffers are bf16
PERF_RECIPES = "perf_recipes/"
# Adam's state of library recipes whose settings_compact does not name it, as their source sets it
# (dtypes of the spec's training.optimizer). Nemotron 3 Super on 64 H100: Megatron-Bridge
# recipes/nemotronh/h100/nemotron_3_super.py _nemotron_3_super_pretrain_64gpu_h100_bf16_config sets
# use_precision_aware_optimizer with main_params_dtype fp16, main_grads_dtype bf16 and bf16 moments
# DeepSeek-V3 on 1,024 H100 (the card's perf_recipes/deepseek/h100/deepseek_v3.py builds on
# deepseek_v3_pretrain_config, at the card's commit an alias of recipes/deepseek/h100/deepseek_v3.py
# deepseek_v3_pretrain_1024gpu_h100_bf16_config): bf16 moments, fp32 master weights
RECIPE_OPTIMIZERS = {
    "_nemotron_3_super_pretrain_64gpu_h100_bf16_config": {
        "exp_avg_dtype": "bf16", "exp_avg_sq_dtype": "bf16", "main_params_dtype": "fp16"},
    "deepseek_v3_pretrain_1024gpu_h100_bf16_config (perf_recipes/": {"exp_avg_dtype": "bf16", "exp_avg_sq_dtype": "bf16"},
}
# The dispatcher of library recipes whose settings_compact does not name it, as their source sets
# it: that DeepSeek-V3 library recipe sets moe_flex_dispatcher_backend = "hybridep" and calls
# apply_flex_dispatcher_backend, which turns the flex dispatcher on for Hopper and Blackwell
# (training/flex_dispatcher_backend.py)
RECIPE_DISPATCHERS = {"deepseek_v3_pretrain_1024gpu_h100_bf16_config (perf_recipes/": ("flex", "hybridep")}


# Megatron-Bridge's Llama 3.1 405B library recipe counts the embedding and the loss as one pipeline
# layer each (account_for_embedding_in_pipeline_split and account_for_loss_in_pipeline_split =
# True, recipes/llama/llama3.py llama31_405b_pretrain_config from v0.2.0 on, e.g. v0.5.0 lines
# 1146-1147; v0.1.0rc3 has neither), and its perf configs build on that recipe: 126 layers + 2
# units over pp x vp virtual stages. The release from which the recipes set it, by model.
SPLIT_COUNTS_EMBEDDING_AND_LOSS = {"llama31_405b": "25.11"}


def embedding_and_loss_layout(layers: int, stages: int) -> str | None:
    """Megatron's layout string when the embedding and the loss count as a layer each: `layers` + 2
    units, the same number in every virtual stage (None where they do not divide)."""
    if stages < 2 or (layers + 2) % stages:
        return None
    per = (layers + 2) // stages
    middle = _runs(f"t*{per}|" if per > 1 else "t|", stages - 2)
    edge = "t" * (per - 1) if per <= 2 else f"t*{per - 1}"
    return f"E{edge}|{middle}{edge}L"


# At v0.2.0 the perf scripts' set_recompute_overrides (scripts/performance/utils/helpers.py:163-179)
# set recompute_modules without recompute_granularity (v0.3.0 sets "selective" beside them,
# utils/overrides.py:141-143), and under granularity None Megatron recomputes nothing: a module list
# of that release that neither the family nor the model overrides pair with a granularity ran none
MODULES_WITHOUT_GRANULARITY = ("v0.2.0",)
# Megatron-Bridge's DeepSeek-V3 library recipe, which every DeepSeek-V3 perf config builds on, keeps
# Adam's moments in bf16 under the precision-aware optimizer (recipes/deepseek/deepseek_v3.py,
# r0.1.0:240-243 to v0.5.0; perf_recipes/deepseek/common.py at v0.6.0); the perf scripts undo it
# only for Megatron-FSDP (scripts/performance/utils/overrides.py, "cannot work with FSDP together")
LIBRARY_BF16_MOMENTS = ("deepseek_v3",)


def _from_source(table: dict[str, Any], function: str) -> Any:
    """The entry of a RECIPE_* table whose recipe function the row's names, or None."""
    return next((value for name, value in table.items() if name in function), None)


def _modules(text: str | None) -> tuple[str, ...]:
    return tuple(m.strip(" '\"") for m in (text or "").split(",") if m.strip(" '\""))


def read_recipe(row: dict[str, Any]) -> Recipe:
    sc = row["settings_compact"]
    rc = row["recipe"]
    summary = rc.get("settings_summary") or {}
    overrides = rc.get("model_overrides") or {}
    family = " ".join(line for lines in (rc.get("family_settings") or {}).values() for line in lines)
    nemo = row["source_type"].startswith("nemo_framework")
    published = bool(summary or overrides or rc.get("function")) or nemo  # NeMo's: its 2.2.0 scripts (NEMO_*)

    recompute, modules, layers = None, (), None
    stated = re.search(r"recompute=(none|selective|full)(?:\[([^\]]*)\])?(?:/block x(\d+))?", sc)
    listed = re.search(r"recompute_modules \[([^\]]*)\]", sc)
    if stated:
        recompute, modules = stated[1], _modules(stated[2])
        layers = int(stated[3]) if stated[3] else None
    elif summary.get("recompute_num_layers"):
        recompute, layers = "full", summary["recompute_num_layers"]
    elif summary.get("recompute_modules"):
        recompute, modules = "selective", tuple(summary["recompute_modules"])
    elif "recompute_granularity=selective" in sc or overrides.get("recompute_granularity") == "selective" \
            or "recompute_granularity = 'selective'" in family:
        recompute, modules = "selective", _modules(listed[1] if listed else None)
    elif published:
        recompute = "none"  # the recipe sets no recompute: Megatron's default
    if recompute == "selective" and rc.get("ref") in MODULES_WITHOUT_GRANULARITY \
            and "recompute_granularity" not in family and "recompute_granularity" not in overrides:
        recompute, modules = "none", ()

    dispatcher, backend = None, None
    named = re.search(r"dispatcher=(flex/hybridep|flex/deepep|alltoall)", sc)
    if named:
        dispatcher, _, flex = named[1].partition("/")
        backend = flex or None
    elif "DeepEP flex dispatcher" in sc:
        dispatcher, backend = "flex", "deepep"
    elif "alltoall dispatcher" in sc or (nemo and row["model_key"] in NEMO_TOKEN_DROP):  # Mixtral's config
        dispatcher = "alltoall"
    else:
        dispatcher, backend = _from_source(RECIPE_DISPATCHERS, rc.get("function") or "") or (None, None)

    factor = re.search(r"capacity_factor=([\d.]+)", sc)
    token_drop = (bool(re.search(r"token-drop|apply_moe_token_drop", sc + family)) or "(tokendrop)" in row["model"]
                  or (nemo and row["model_key"] in NEMO_TOKEN_DROP))
    # Megatron-Bridge's apply_moe_token_drop: capacity factor 1.0, inputs padded to capacity
    capacity = float(factor[1]) if factor else (1.0 if token_drop else None)
    padded = "padded" in sc or token_drop

    layout = re.search(r"(?:pp_layout|pipeline_model_parallel_layout)=([^;\s]+)", sc)
    pp_layout = layout[1] if layout else (summary.get("pp_layout") or overrides.get("pipeline_model_parallel_layout"))

    runtime = []
    if re.search(r"overlap_grad_reduce[ =]False", sc):
        runtime.append("no gradient-reduce overlap")
    # Megatron-Bridge's Llama 3 / 3.1 library recipes set tp_comm_overlap=True with a userbuffers
    # config (src/megatron/bridge/recipes/llama/llama3.py at v0.4.1, e.g. lines 737-739); the perf
    # configs that assign only `tp_comm_overlap_cfg` keep it; Bridge drops it below TP 2 (comm_overlap.py)
    tp_overlap = row["tp"] > 1 and "tp_comm_overlap=False" not in sc + family and bool(
        re.search(r"tp_comm_overlap=True|tp_comm_overlap_cfg = comm_overlap_cfg", sc + family))
    # The NeMo Framework summary's runs came from NeMo 2.0's scripts/performance/llm/pretrain_*.py:
    # their shared set_primary_perf_configs reduces gradients in bf16 (grad_reduce_in_fp32 = False),
    # and the recipes' pretrain_performance_optimizations turn TP overlap on for these models
    # (nemo/collections/llm/recipes/{nemotron4_340b,llama3_70b,llama31_405b}.py: tp_comm_overlap=True)
    tp_overlap = tp_overlap or (nemo and row["tp"] > 1 and row["model_key"] in NEMO_TP_OVERLAP)

    function = rc.get("function") or ""
    optimizer = tuple((_from_source(RECIPE_OPTIMIZERS, function) or {}).items())

    fsdp = bool(row["fsdp"]) or "megatron_fsdp=on" in sc
    # "activation_offload=expert_fc1 (fraction 1.0)": fine-grained activation offloading
    offload = re.search(r"activation_offload=([a-z0-9_,]+)(?: \(fraction ([\d.]+)\))?", sc)
    layers_offloaded = re.search(r"cpu_offloading_num_layers=(\d+)", sc)
    return Recipe(
        published=published, recompute=recompute, recompute_modules=modules, recompute_layers=layers,
        dispatcher=dispatcher, flex_backend=backend, capacity_factor=capacity, padded=padded,
        pp_layout=pp_layout, pp_layout_mentioned=pp_layout is None and "PP layout" in sc,
        activation_offload="activation_offload=" in sc,
        bf16_moments="BF16 Adam moments" in sc or (row["model_key"] in LIBRARY_BF16_MOMENTS and published and not fsdp
                                                   and row["source_type"].startswith("megatron_bridge")),
        fsdp=fsdp, runtime=tuple(runtime),
        ep_overlap="ep_a2a_overlap=on" in sc or "EP A2A overlap (" in sc, tp_comm_overlap=tp_overlap,
        grad_reduce_bf16="grad_reduce_in_fp32 = False" in family or nemo or PERF_RECIPES in function,
        cuda_graphs=NEMO_CUDA_GRAPHS.get((row["model_key"], row["system"]), "none") if nemo else read_cuda_graphs(sc),
        recompute_method="block" if stated and stated[3] else None,
        offload_modules=_modules(offload[1]) if offload else (), offload_fraction=float(offload[2]) if offload and offload[2] else 1.0,
        optimizer=optimizer, offload_layers=int(layers_offloaded[1]) if layers_offloaded else None,
    )


def read_cuda_graphs(settings: str) -> str | tuple[str, ...]:
    """The CUDA graphs a run's settings_compact names, as training.cuda_graphs: Megatron-Bridge's
    `cuda_graph=transformer_engine[modules]` (per-module graphs), `cuda_graph=local` with
    `full_iteration` (the whole forward-backward), and the 25.09 perf matrix's `cuda_graphs=True`,
    which set the deprecated enable_cuda_graph (megatron-core's own capture, default scope: every
    transformer layer whole; Megatron-Bridge r0.1.0 scripts/performance/utils/helpers.py
    set_cuda_graph_overrides). Rows that name none ran without (`off`)."""
    modules = re.search(r"cuda_graph=transformer_engine\[([^\]]*)\]", settings)
    if modules:
        return _modules(modules[1]) or "layers"
    if re.search(r"cuda_graph=local\s*full_iteration", settings):
        return "full_iteration"
    if re.search(r"cuda_graph=local|cuda_graphs=True", settings):
        return "layers"
    return "none"


def expressible_recompute_modules(recipe: Recipe, precision: str, mla: bool = True) -> tuple[str, ...]:
    """The run's selective recompute modules that its spec can carry: mla_up_proj only with
    multi-latent attention (rule mla-up-proj-recompute-needs-mla), and under FP8 with delayed
    scaling not moe_act or layernorm (rule fp8-delayed-recompute-modules; the current-scaling, MXFP8
    and blockwise recipes keep them)."""
    if recipe.recompute != "selective":
        return ()
    delayed = PRECISIONS.get(precision, ("bf16", None))[1] == "delayed"
    dropped = (set() if mla else {"mla_up_proj"}) | ({"moe_act", "layernorm"} if delayed else set())
    return tuple(m for m in recipe.recompute_modules or ("core_attn",) if m not in dropped)


# offload modules of Megatron's fused grouped MLP -> the spec's (fused-group-mlp-offload)
FUSED_OFFLOAD_MODULES = {"fused_group_mlp": ("expert_fc1", "moe_act")}


def memory_settings(recipe: Recipe, modules: tuple[str, ...]) -> dict[str, Any]:
    """The spec's training keys for the run's recompute modules and layers, activation offloading
    and Adam moments (what read_recipe found)."""
    out: dict[str, Any] = {}
    if recipe.recompute == "selective":
        if not modules:
            out["recompute"] = "none"  # every module it named is dropped (recompute-modules)
        elif set(modules) != {"core_attn"}:
            out["recompute_modules"] = list(modules)
    if recipe.recompute == "full" and recipe.recompute_layers:
        out["recompute_method"] = recipe.recompute_method or "uniform"
        out["recompute_num_layers"] = recipe.recompute_layers
    if recipe.offload_modules:
        out["offload_modules"] = list(dict.fromkeys(
            m for name in recipe.offload_modules for m in FUSED_OFFLOAD_MODULES.get(name, (name,))))
        if recipe.offload_fraction != 1.0:
            out["activation_offload_fraction"] = recipe.offload_fraction
    if recipe.offload_layers:
        out["offload_layers"] = recipe.offload_layers
    if recipe.bf16_moments:
        out["optimizer"] = {"exp_avg_dtype": "bf16", "exp_avg_sq_dtype": "bf16"}
    if recipe.optimizer:
        out["optimizer"] = dict(recipe.optimizer)
    return out


# ---------------------------------------------------------------------------------------------
# Megatron pipeline layouts ("Et*4|(t*4|)*14tmL")


def expand_pp_layout(layout: str) -> list[str]:
    """The stages of a Megatron pipeline_model_parallel_layout string, each as its symbols
    (E embedding, t transformer layer, m MTP layer, L loss), with `x*N` and `(...)*N` expanded."""
    def expand(text: str) -> str:
        while "(" in text:
            text = re.sub(r"\(([^()]*)\)\*(\d+)", lambda m: m[1] * int(m[2]), text)
        return re.sub(r"([A-Za-z])\*(\d+)", lambda m: m[1] * int(m[2]), text)
    return expand(layout).split("|")


# ---------------------------------------------------------------------------------------------
# row -> spec


@dataclass(frozen=True)
class Conversion:
    status: str  # exact | approximated | skipped
    spec: dict[str, Any] | None  # the published layout pinned
    search_spec: dict[str, Any] | None  # the same with every axis free (micro-batch size kept)
    approximations: tuple[str, ...] = ()
    assumptions: tuple[str, ...] = ()
    skip_reason: str | None = None
    not_modelled: tuple[str, ...] = ()  # runtime optimisations and small details, for the reader


def _runs(unit: str, n: int) -> str:
    return "" if n == 0 else unit if n == 1 else f"({unit})*{n}"


def _pairs_text(pairs: list[str]) -> str:
    """Run-length text of a list of "AD"/"AE" pairs: ["AD", "AD", "AE"] -> "(AD)*2 AE"."""
    out: list[str] = []
    i = 0
    while i < len(pairs):
        j = i
        while j < len(pairs) and pairs[j] == pairs[i]:
            j += 1
        out.append(_runs(pairs[i], j - i))
        i = j
    return " ".join(out)


def _gpt_pattern(pairs: list[str], stage_layers: list[int] | None) -> str:
    if stage_layers is None:
        return _pairs_text(pairs)
    stages, start = [], 0
    for n in stage_layers:
        stages.append(_pairs_text(pairs[start:start + n]))
        start += n
    return " | ".join(stages)


def _mtp_letters(m: dict[str, Any]) -> str:
    """One MTP layer of a hybrid model in block letters: Megatron's mtp_hybrid_override_pattern
    (models.json may follow it with a note in parentheses)."""
    return "".join(HYBRID_LETTERS[c] for c in m["mtp_hybrid_override_pattern"].split()[0])


def _model(m: dict[str, Any], recipe: Recipe, stage_layers: list[int] | None, mtp: int = 0) -> tuple[dict[str, Any], str]:
    """The spec's model block and its pattern without pipeline cuts."""
    if "hybrid_override_pattern" in m:
        pattern = plain = "".join(HYBRID_LETTERS[c] for c in m["hybrid_override_pattern"])
        if stage_layers is not None:
            bounds = [sum(stage_layers[:k]) for k in range(len(stage_layers) + 1)]
            pattern = " | ".join(plain[a:b] for a, b in zip(bounds, bounds[1:], strict=False))
    else:
        moe_layers = m["num_layers"] - (m.get("first_k_dense") or 0) if m.get("num_moe_experts") else 0
        pairs = ["AD"] * (m["num_layers"] - moe_layers) + ["AE"] * moe_layers
        pattern, plain = _gpt_pattern(pairs, stage_layers), _gpt_pattern(pairs, None)
    model: dict[str, Any] = {
        "pattern": pattern,
        "hidden_size": m["hidden_size"],
        "vocab_size": m["vocab_size"],
        "normalization": "layernorm" if m["normalization"].lower().startswith("layernorm") else "rmsnorm",
        "position_embedding": "none" if m["position_embedding"] == "none" else "rope",
        "tie_embeddings": bool(m["tied_embeddings"]),
        "attention": _attention(m),
    }
    if m.get("add_bias_linear"):
        model["linear_bias"] = True
    letters = plain + (_mtp_letters(m) if mtp and "hybrid_override_pattern" in m else "")  # the sub-blocks the MTP layers use too
    if "D" in letters:
        model["mlp"] = {"ffn_hidden_size": m["ffn_hidden_size"], "gated": bool(m["gated_linear_unit"])}
    if "E" in letters:
        moe: dict[str, Any] = {
            "num_experts": m["num_moe_experts"], "top_k": m["moe_router_topk"],
            "ffn_hidden_size": m["moe_ffn_hidden_size"], "gated": bool(m["gated_linear_unit"]),
            "dispatcher": recipe.dispatcher or "alltoall",
        }
        if m.get("moe_shared_expert_intermediate_size"):
            moe["shared_expert_ffn_hidden_size"] = m["moe_shared_expert_intermediate_size"]
        if recipe.dispatcher == "flex":
            moe["flex_backend"] = recipe.flex_backend
        if recipe.capacity_factor is not None:
            moe["capacity_factor"] = recipe.capacity_factor
            if recipe.padded:
                moe["pad_to_capacity"] = True
        if m.get("moe_latent_size"):
            moe["latent_size"] = m["moe_latent_size"]
        if m.get("moe_router_group_topk"):
            moe.update(router_num_groups=m["moe_router_num_groups"], router_group_topk=m["moe_router_group_topk"])
        model["moe"] = moe
    if "M" in letters:
        model["mamba"] = {"num_heads": m["mamba_num_heads"], "head_dim": m["mamba_head_dim"],
                          "state_dim": m["mamba_state_dim"], "num_groups": m["mamba_num_groups"]}
    return model, plain


def _attention(m: dict[str, Any]) -> dict[str, Any]:
    """The attention block: multi-latent attention with its ranks and head widths; or GQA's heads,
    groups, head dim, QK layernorm, and a sliding window (Megatron's window_size (W, 0) and
    window_attn_skip_freq) with the learnable softmax sink its note names."""
    if m.get("multi_latent_attention"):
        mla = {"kv_lora_rank": m["kv_lora_rank"], "qk_head_dim": m["qk_head_dim"],
               "rope_head_dim": m["qk_pos_emb_head_dim"], "v_head_dim": m["v_head_dim"]}
        if m.get("q_lora_rank"):
            mla["q_lora_rank"] = m["q_lora_rank"]
        return {"num_heads": m["num_attention_heads"], "mla": mla}
    attention: dict[str, Any] = {"num_heads": m["num_attention_heads"], "num_query_groups": m["num_query_groups"],
                                 "head_dim": m["kv_channels"]}
    if m.get("qk_layernorm"):
        attention["qk_layernorm"] = True
    window = m.get("sliding_window")
    if window:
        left, right = window["window_size"]
        assert right == 0, f"a window that looks ahead ({left}, {right}) is not causal attention"
        attention["window_size"] = left
        if window.get("window_attn_skip_freq"):
            attention["window_full_every"] = window["window_attn_skip_freq"]
        if "sink" in window.get("note", ""):
            attention["sinks"] = True
    return attention


def _skip(reason: str, recipe_runtime: tuple[str, ...] = ()) -> Conversion:
    return Conversion("skipped", None, None, skip_reason=reason, not_modelled=recipe_runtime)


# A table field -> the recipe file's key for it (workload_base_config)
RECIPE_FIELDS = {"tp": "tensor_model_parallel_size", "pp": "pipeline_model_parallel_size",
                 "cp": "context_parallel_size", "vp": "virtual_pipeline_model_parallel_size",
                 "ep": "expert_model_parallel_size", "etp": "expert_tensor_parallel_size",
                 "gbs": "global_batch_size", "mbs": "micro_batch_size"}


def as_run(row: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The row as its release's recipe file ran it, and a note per field where the table disagrees.
    The tables are typed from the runs of those files, and the three disagreements (all in the
    revised 25.11 table) side with the file: GPT-OSS on 64 H100 at the table's mbs 4 needs ~99 GiB
    per GPU, and GPT-OSS on 64 B200 measured 8,213 tokens/s/GPU at the table's ep 8, where the
    file's ep 64 measured 8,047 in 26.02 and ep 8 13,568 in 26.04.01."""
    recipe = row["recipe"]
    base = recipe.get("workload_base_config") or {}
    ran, notes = dict(row), []
    for field in recipe.get("mismatched_fields") or ():
        key = RECIPE_FIELDS.get(field)
        if key is None or key not in base:
            continue
        ran[field] = base[key]
        notes.append(f"the table's {field} {row[field]} disagrees with its release's recipe file "
                     f"({recipe.get('config_name')}: {field} {base[key]}); the file's value is planned")
    if row["etp"] is None and base.get(RECIPE_FIELDS["etp"]) is not None:
        ran["etp"] = base[RECIPE_FIELDS["etp"]]
        notes.append(f"etp not published in the table: the recipe file's etp {ran['etp']} is planned")
    elif row["etp"] is None and (row["model_key"], row["system"]) in NEMO_ETP:
        ran["etp"] = NEMO_ETP[row["model_key"], row["system"]]
        notes.append(f"etp not published in the table: NeMo 2.2.0's recommended config's etp {ran['etp']} is planned")
    return ran, notes


def nvl72_segment(nodes: int) -> int:
    """The trays of one rack a Megatron-Bridge run on `nodes` NVL72 trays is given (NVL72_MAX_SEGMENT)."""
    if nodes <= NVL72_MAX_SEGMENT:
        return nodes
    return next(s for s in range(NVL72_MAX_SEGMENT, 0, -1) if nodes % s == 0)


def cluster(system: str, num_gpus: int) -> dict[str, Any]:
    """The spec's cluster of a run: its system's preset, and on NVL72 the NVLink domain the run's
    segment spans (on 256 GPUs, 16 trays = 64 GPUs a rack, not 72)."""
    per_node = GPUS_PER_NODE[system]
    nodes = num_gpus // per_node
    out: dict[str, Any] = {"preset": PRESETS[system], "nodes": nodes}
    if PRESETS[system].endswith("nvl72"):
        out["nvlink_domain"] = nvl72_segment(nodes) * per_node
    return out


def convert(row: dict[str, Any], models: dict[str, Any] | None = None) -> Conversion:
    """The spec of one published run with its layout pinned, or the named reason it is skipped."""
    models = load_models() if models is None else models
    row, ran_notes = as_run(row)
    recipe = read_recipe(row)
    m = models.get(row["model_key"], {})
    if "hidden_size" not in m:
        return _skip("no-architecture", recipe.runtime)
    tp, pp, cp = row["tp"], row["pp"], row["cp"]
    if row["num_gpus"] % (tp * pp * cp):
        return _skip("layout-does-not-divide", recipe.runtime)
    vpp = row["vp"] or 1

    approx: list[str] = []
    assume: list[str] = list(ran_notes)
    details: list[str] = list(recipe.runtime)
    mtp = (m.get("mtp_num_layers") or 0) if "w/o MTP" not in row["model"] else 0
    modules = expressible_recompute_modules(recipe, row["precision"], bool(m.get("multi_latent_attention")))
    if recipe.recompute == "selective" and set(modules) != set(recipe.recompute_modules or ("core_attn",)):
        approx.append("recompute-modules")

    if set(recipe.offload_modules) & set(FUSED_OFFLOAD_MODULES):
        approx.append("fused-group-mlp-offload")
    counted_from = SPLIT_COUNTS_EMBEDDING_AND_LOSS.get(row["model_key"])
    counts_edges = (counted_from is not None and recipe.published and row["source_type"].startswith("megatron_bridge")
                    and release_order(row["release"]) >= release_order(counted_from))
    stage_layers, pipeline_layout = None, None
    if recipe.pp_layout:
        stages = expand_pp_layout(recipe.pp_layout)
        counts = [s.count("t") for s in stages]
        if len(stages) != pp * vpp or sum(counts) != m["num_layers"]:
            assume.append(f"pipeline layout {recipe.pp_layout} does not match pp x vp = {pp * vpp} stages of "
                          f"{m['num_layers']} layers; megacpp's split used")
        elif min(counts) > 0:
            stage_layers = counts  # pinned as `|` cuts
        elif "hybrid_override_pattern" in m:
            approx.append("pp-layout-balanced")
        else:
            # a stage without decoder layers: pinned as the layout string itself, its MTP layers (m)
            # where it puts them (a run without them drops its m)
            pipeline_layout = recipe.pp_layout if mtp else recipe.pp_layout.replace("m", "")
    elif counts_edges and (counted := embedding_and_loss_layout(m["num_layers"], pp * vpp)) is not None:
        pipeline_layout = counted
        if mtp:
            pipeline_layout = pipeline_layout[:-1] + "m" * mtp + "L"
    elif pp * vpp > 1 and m["num_layers"] % (pp * vpp) == 0:
        # no layout published: Megatron splits the layers evenly, where megacpp's own balancing
        # would weigh the output head; pinned as Megatron's layout string, `|` cuts on hybrids
        per = m["num_layers"] // (pp * vpp)
        if "hybrid_override_pattern" in m:
            stage_layers = [per] * (pp * vpp)
        else:
            pipeline_layout = f"E(t*{per}|)*{pp * vpp - 1}t*{per}{'m' * mtp}L"
    precision, fp8_recipe = PRECISIONS[row["precision"]]
    if row["source_type"].startswith("nemo_framework") and precision == "fp8":
        details.append(NEMO_FP8_PARAMS)
    if recipe.pp_layout_mentioned:
        assume.append("the run script names a DeepSeek pipeline layout that the table's pp/vp does not show; "
                      "the table's layout is planned")
    if recipe.recompute is None:
        assume.append("recompute not stated: none assumed")
    moe = bool(m.get("num_moe_experts"))
    if moe and recipe.dispatcher is None:
        assume.append("dispatcher not stated: alltoall assumed (DeepEP / HybridEP would send fewer bytes across nodes)")
    if moe and row["etp"] is None:
        assume.append("etp not published: Megatron's default etp = tp pinned")

    hybrid_main = bool(mtp) and "hybrid_override_pattern" in m
    if hybrid_main and stage_layers is None and pp > 1 and vpp == 1 and m["num_layers"] % pp == 0:
        # main builds a hybrid pattern without `|` in equal stages (hybrid_layer_allocation.py
        # select_pipeline_segment); pinned, or megacpp's own split would stand in for it
        stage_layers = [m["num_layers"] // pp] * pp
        assume.append("stage split not published: Megatron's even split of a hybrid pattern without `|` pinned")
    model, plain = _model(m, recipe, stage_layers, mtp)
    if mtp:
        model["mtp_num_layers"] = mtp
        if "hybrid_override_pattern" in m:
            model["mtp_pattern"] = _mtp_letters(m)
        if m.get("mtp_use_repeated_layer"):
            model["mtp_shared_weights"] = True
    parallel: dict[str, Any] = {"tp": tp, "pp": pp, "cp": cp, "dp": row["num_gpus"] // (tp * pp * cp)}
    parallel["vpp"] = vpp  # vp null is no interleaving: pinned too, or the search would pick one
    parallel["ep"] = row["ep"] or 1
    if moe:
        parallel["etp"] = row["etp"] if row["etp"] is not None else tp
    spec: dict[str, Any] = {
        "name": f"{row['model_key']}-{row['system'].lower()}x{row['num_gpus']}-{row['precision']}-row{row['row_id']}",
        "model": model,
        "training": {
            "seq_length": row["seq_length"],
            "global_batch_size": row["gbs"],
            "micro_batch_size": row["mbs"],
            "precision": precision,
            "recompute": recipe.recompute or "none",
        },
        "cluster": cluster(row["system"], row["num_gpus"]),
        "parallel": parallel,
    }
    if mtp and ("hybrid_override_pattern" in m or m.get("mtp_use_repeated_layer")):
        # a hybrid model's MTP layers and one MTP layer shared by every depth are newer than
        # megatron-core 0.16 (rules mtp-needs-gpt-stack, mtp-shared-weights-needs-main)
        spec["backend"] = {"megatron": "main"}
    if fp8_recipe not in (None, "delayed"):
        spec["training"]["fp8_recipe"] = fp8_recipe
    if recipe.fsdp:
        spec["training"]["data_parallel_sharding"] = "fsdp"  # Megatron-FSDP, optim_grads_params
    if pipeline_layout is not None:
        parallel["pipeline_layout"] = pipeline_layout
    # the overlaps and the reduction dtype the recipe sets (read_recipe)
    if recipe.ep_overlap and moe and parallel["ep"] > 1:
        model["moe"]["overlap_communication"] = True
    if recipe.tp_comm_overlap:
        spec["training"]["tp_comm_overlap"] = True
    if recipe.grad_reduce_bf16:
        spec["training"]["grad_reduce_dtype"] = "bf16"
    if recipe.cuda_graphs != "none":
        spec["training"]["cuda_graphs"] = recipe.cuda_graphs
    spec["training"].update(memory_settings(recipe, modules))
    search_spec = {**spec, "name": spec["name"] + "-search", "model": {**model, "pattern": plain}, "parallel": {}}
    return Conversion("approximated" if approx else "exact", spec, search_spec, tuple(approx), tuple(assume),
                      None, tuple(details))
