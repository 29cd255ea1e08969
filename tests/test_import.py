"""`megacpp import`: an existing Megatron-LM launch read back into a spec with its layout pinned.

Every bundled recipe's rendered launch imports back to a spec whose plan is the original plan's
chosen candidate, and that renders the same Megatron-LM command again; user-written scripts and
published-run argument lists import with every flag the spec cannot carry listed.
"""

from __future__ import annotations

import functools
import shlex
import subprocess
import sys

import pytest
import yaml

from megacpp.planner.errors import LaunchError, SpecError
from megacpp.planner.megatron.args import TrainOptions, megatron_args
from megacpp.planner.megatron.importer import ImportOptions, import_launch
from megacpp.planner.megatron.render import RenderOptions, render_launch
from megacpp.planner.plan import build_plan
from megacpp.planner.spec.loading import load_spec_text
from megacpp.recipes import recipe_names, recipe_text

CLI = [sys.executable, "-m", "megacpp.runtime.cli"]
SCRIPT = {"torchrun": "launch.sh", "slurm": "job.sbatch"}


@functools.cache
def _original(recipe: str):
    """The recipe's plan, on the dialect whose stock Megatron-LM runs it (nam56r's R blocks need main)."""
    for overrides in ([], ["backend.megatron=main"]):
        plan = build_plan(load_spec_text(recipe_text(recipe), overrides=overrides), top=1)
        try:
            render_launch(plan, RenderOptions(engine="megatron-lm"))
        except LaunchError:
            continue
        return plan
    raise AssertionError(f"{recipe} renders on no dialect")


def _megatron_words(script: str) -> list[str]:
    words = shlex.split(script.replace("\\\n", " "), comments=True)
    start = next(i for i, w in enumerate(words) if "/pretrain_" in w)
    return words[start:]


@pytest.mark.parametrize("target", ["torchrun", "slurm"])
@pytest.mark.parametrize("recipe", recipe_names())
def test_every_recipe_round_trips_through_its_rendered_launch(recipe, target):
    plan = _original(recipe)
    script = render_launch(plan, RenderOptions(target=target, engine="megatron-lm"))[SCRIPT[target]]
    imported = import_launch(script, ImportOptions(cluster=plan.spec_model.cluster.preset))
    assert imported.unsupported == []
    again = build_plan(load_spec_text(imported.to_yaml("launch.sh")), top=1)
    before, after = plan.candidates[0], again.candidates[0]
    assert after.layout == before.layout
    assert after.split == before.split and after.stages == before.stages
    assert after.memory == before.memory
    assert after.time == before.time
    assert again.legal_count == 1  # the layout is pinned
    rendered = render_launch(again, RenderOptions(target=target, engine="megatron-lm"))[SCRIPT[target]]
    assert _megatron_words(rendered) == _megatron_words(script)


def _published_specs() -> dict[str, object]:
    from benchmarks.scale.truth import convert, load_runs, select_newest

    specs = {}
    for sel in select_newest(load_runs()):
        conv = convert(sel.row)
        if conv.spec is not None:
            specs[f"row{sel.row['row_id']}-{sel.row['model_key']}"] = conv.spec
    return specs


PUBLISHED_SPECS = _published_specs()


@pytest.mark.parametrize("name", list(PUBLISHED_SPECS))
def test_every_published_scale_run_round_trips_through_its_rendered_launch(name):
    """The scale benchmark's specs (NVIDIA's published runs, layout pinned: MLA, MTP placed by a
    layout string, hybrid MTP, FP4, Megatron-FSDP, virtual stages...) render to a Megatron-LM
    launch that imports back to the same plan and renders the same command."""
    spec = load_spec_text(yaml.safe_dump(PUBLISHED_SPECS[name]))
    plan = build_plan(spec, top=1)
    script = render_launch(plan, RenderOptions(engine="megatron-lm"))["launch.sh"]
    imported = import_launch(script, ImportOptions(cluster=spec.cluster.preset))
    assert imported.unsupported == []
    again = build_plan(load_spec_text(imported.to_yaml("launch.sh")), top=1)
    before, after = plan.candidates[0], again.candidates[0]
    assert (after.layout, after.split, after.stages) == (before.layout, before.split, before.stages)
    assert (after.memory, after.time) == (before.memory, before.time)
    rendered = render_launch(again, RenderOptions(engine="megatron-lm"))["launch.sh"]
    assert _megatron_words(rendered) == _megatron_words(script)


def test_the_real_job_round_trips_with_its_data_checkpoints_and_slurm_settings():
    from tests.conftest import ROOT

    spec = load_spec_text((ROOT / "tests" / "golden" / "launch" / "real-job.yaml").read_text())
    plan = build_plan(spec, top=1)
    script = render_launch(plan, RenderOptions(target="slurm", engine="megatron-lm"))["job.sbatch"]
    imported = import_launch(script, ImportOptions(cluster="h100-sxm-8"))
    got = imported.spec
    assert imported.unsupported == []
    # a dense model's launch carries no expert TP: its etp pin is left to the plan (Megatron-LM's = tp)
    assert got.name == "real-job" and got.parallel == spec.parallel.model_copy(update={"etp": None})
    assert got.data == spec.data and got.checkpoint == spec.checkpoint
    assert got.launch == spec.launch.model_copy(update={"extra_args": [str(a) for a in spec.launch.extra_args]})
    assert got.training.run_iters == spec.training.run_iters and got.training.lr == spec.training.lr
    again = build_plan(got, top=1)
    assert again.candidates[0].time == plan.candidates[0].time
    rendered = render_launch(again, RenderOptions(target="slurm", engine="megatron-lm"))["job.sbatch"]
    assert rendered.split("# Generated")[0] == script.split("# Generated")[0]  # the #SBATCH lines
    assert _megatron_words(rendered) == _megatron_words(script)


USER_SCRIPT = r"""#!/bin/bash
# a MoE model's pretraining, written by hand
#SBATCH -N 4
#SBATCH --gpus-per-node=8
#SBATCH --partition=gpu --time=2-00:00:00
#SBATCH --mail-user=me@example.com

set -ex
GPUS_PER_NODE=8
NNODES=${SLURM_NNODES:-4}
TP=2; PP=4
EP=8
export CUDA_DEVICE_MAX_CONNECTIONS=1
export NCCL_SOCKET_IFNAME=ib0
export WANDB_PROJECT=$PROJECT
[ -f /ckpt/moe/done ] && TP=8   # conditional: not taken

MODEL_ARGS=(
    --num-layers 16            # depth
    --hidden-size 2048
    --ffn-hidden-size 5632
    --num-attention-heads 16 --group-query-attention --num-query-groups 4
    --seq-length 4096 --max-position-embeddings 4096
    --normalization RMSNorm --position-embedding-type rope --swiglu
    --untie-embeddings-and-output-weights --disable-bias-linear
    --num-experts 16 --moe-router-topk 2 --moe-ffn-hidden-size 1408
    --moe-layer-freq "([0]*2+[1]*14)"
    --multi-latent-attention
)
PAR_ARGS="--tensor-model-parallel-size $TP --pipeline-model-parallel-size $PP --expert-model-parallel-size ${EP}"
PAR_ARGS+=" --expert-tensor-parallel-size 1 --sequence-parallel"
TRAIN_ARGS=(--micro-batch-size 2 --global-batch-size $((2 * 4 * 64)) --bf16 --lr 2e-4 --min-lr 2e-5
            --lr-decay-style cosine --lr-warmup-iters 500 --train-iters 10000 --use-distributed-optimizer
            --overlap-grad-reduce --overlap-param-gather --recompute-granularity selective
            --adam-beta2 0.95 --hidden-dropout 0 --attention-dropout 0 --my-custom-flag 3)
DATA_ARGS="--data-path /data/pile_text_document --tokenizer-type GPT2BPETokenizer --vocab-file /data/vocab.json --merge-file /data/merges.txt --split 949,50,1"

srun --container-image=nvcr.io/nvidia/pytorch:24.07-py3 --container-mounts=/data:/data,/ckpt:/ckpt \
  python -m torch.distributed.run --nproc_per_node $GPUS_PER_NODE --nnodes $NNODES \
    ${MEGATRON:-/opt/megatron}/pretrain_gpt.py \
    "${MODEL_ARGS[@]}" $PAR_ARGS "${TRAIN_ARGS[@]}" $DATA_ARGS \
    --save /ckpt/moe --load /ckpt/moe --save-interval 500 \
    --log-interval 10 2>&1 | tee train.log
"""


def test_a_hand_written_script_with_variables_arrays_and_srun():
    from megacpp.planner.validation import validate_spec

    imported = import_launch(USER_SCRIPT, ImportOptions(cluster="h100-sxm-8"), "user")
    spec = imported.spec
    assert spec.name == "user"
    assert spec.parallel.model_dump(exclude_defaults=True) == {"tp": 2, "pp": 4, "vpp": 1, "cp": 1, "dp": 4, "ep": 8, "etp": 1,
                                                               "sp": True}
    assert spec.cluster.nodes == 4 and spec.cluster.preset == "h100-sxm-8"
    assert spec.pattern.blocks == "AD" * 2 + "AE" * 14
    assert spec.model.moe.dispatcher == "allgather"  # Megatron-LM's default, stated
    assert spec.model.vocab_size == 50257  # GPT2BPETokenizer's
    assert (spec.training.global_batch_size, spec.training.micro_batch_size) == (512, 2)
    assert (spec.training.lr, spec.training.min_lr, spec.training.warmup_iters) == (2e-4, 2e-5, 500)
    assert spec.training.weight_decay == 0.01 and spec.training.eval_iters == 100  # Megatron-LM's defaults
    assert spec.data.paths == ("/data/pile_text_document",) and spec.data.split == "949,50,1"
    assert spec.checkpoint.save == "/ckpt/moe" and spec.checkpoint.interval == 500
    assert spec.launch.extra_args == [] and (spec.training.adam_beta1, spec.training.adam_beta2) == (0.9, 0.95)
    assert spec.training.adam_eps == 1e-08  # Megatron-LM's default, stated
    assert spec.launch.env == {"NCCL_SOCKET_IFNAME": "ib0"}
    assert spec.launch.slurm.container_mounts == ["/data:/data", "/ckpt:/ckpt"]
    assert spec.launch.slurm.time == "2-00:00:00"
    listed = "\n".join(imported.unsupported)
    # MLA, read with Megatron-LM's default latent rank; its GQA flags are Megatron's error, listed
    assert spec.model.attention.mla is not None and spec.model.attention.mla.kv_lora_rank == 32
    assert "--group-query-attention" in listed and "--num-query-groups 4" in listed
    assert "--my-custom-flag 3: unknown to Megatron-LM core_v0.16's argument parser" in listed
    assert "WANDB_PROJECT" in listed and "--mail-user" in listed
    assert len(imported.unsupported) == 5
    text = imported.to_yaml("user.sh")
    assert all(f"#   {line}" in text for line in imported.unsupported)
    assert load_spec_text(text) == spec
    assert validate_spec(spec)["valid"]


def test_megatron_defaults_stand_where_the_script_leaves_flags_out():
    imported = import_launch(["pretrain_gpt.py", "--num-layers", "4", "--hidden-size", "256", "--num-attention-heads", "4",
                              "--seq-length", "512", "--max-position-embeddings", "2048", "--vocab-size", "1000",
                              "--num-experts", "4", "--group-query-attention",
                              "--tensor-model-parallel-size", "2", "--bf16"], ImportOptions(cluster="h100-sxm-8"))
    model = imported.spec.model
    assert (model.normalization, model.position_embedding, model.tie_embeddings) == ("layernorm", "learned", True)
    assert model.attention.num_query_groups == 1  # --group-query-attention without --num-query-groups
    assert model.moe.ffn_hidden_size == 1024 and not model.moe.gated  # 4h without --swiglu
    assert imported.spec.parallel.etp == 2  # ETP is TP unless the script says otherwise
    assert imported.spec.parallel.sp is False and imported.spec.parallel.dp == 4
    assert imported.spec.training.lr_decay_style == "linear" and imported.spec.training.min_lr == 0.0
    listed = "\n".join(imported.unsupported)
    assert model.linear_bias  # Megatron-LM's default without --disable-bias-linear
    for missing in ("--hidden-dropout 0.1", "--attention-dropout 0.1", "no --overlap-grad-reduce",
                    "--max-position-embeddings 2048"):  # a learned table of 2048 rows, not 512
        assert missing in listed
    assert any("no --data-path" in n for n in imported.notes)


# Argument lists in the style of NVIDIA's published Megatron-Bridge runs (scale_truth
# published_runs.json: layout, batch and settings_compact of each), as Megatron-LM takes them.
LLAMA3_70B = """--num-layers 80 --hidden-size 8192 --ffn-hidden-size 28672 --num-attention-heads 64
 --group-query-attention --num-query-groups 8 --kv-channels 128 --seq-length 8192 --max-position-embeddings 8192
 --normalization RMSNorm --position-embedding-type rope --rotary-base 500000 --swiglu --disable-bias-linear
 --untie-embeddings-and-output-weights --hidden-dropout 0.0 --attention-dropout 0.0
 --tensor-model-parallel-size 4 --pipeline-model-parallel-size 8 --num-layers-per-virtual-pipeline-stage 2
 --context-parallel-size 1 --sequence-parallel --micro-batch-size 1 --global-batch-size 256
 --bf16 --fp8-format hybrid --fp8-recipe tensorwise --tp-comm-overlap --use-distributed-optimizer
 --overlap-grad-reduce --overlap-param-gather --tokenizer-type NullTokenizer --vocab-size 128256 --mock-data
 --train-iters 50 --lr 1.5e-4 --min-lr 1.5e-5 --lr-decay-style cosine --weight-decay 0.1 --clip-grad 1.0"""
QWEN3_30B_A3B = """--num-layers 48 --hidden-size 2048 --ffn-hidden-size 6144 --num-attention-heads 32
 --group-query-attention --num-query-groups 4 --kv-channels 128 --qk-layernorm --seq-length 4096
 --max-position-embeddings 4096 --normalization RMSNorm --position-embedding-type rope --swiglu
 --disable-bias-linear --untie-embeddings-and-output-weights --hidden-dropout 0 --attention-dropout 0
 --num-experts 128 --moe-router-topk 8 --moe-ffn-hidden-size 768 --moe-router-load-balancing-type aux_loss
 --moe-aux-loss-coeff 1e-3 --moe-grouped-gemm --moe-permute-fusion --moe-token-dispatcher-type flex
 --moe-flex-dispatcher-backend hybridep --moe-router-dtype fp32 --expert-model-parallel-size 16
 --expert-tensor-parallel-size 1 --overlap-moe-expert-parallel-comm --cuda-graph-impl transformer_engine
 --cuda-graph-scope moe_router moe_preprocess --micro-batch-size 1 --global-batch-size 1024 --bf16
 --use-distributed-optimizer --use-precision-aware-optimizer --overlap-grad-reduce --overlap-param-gather
 --vocab-size 151936 --mock-data --train-iters 50"""
DEEPSEEK_V3 = """--num-layers 61 --hidden-size 7168 --ffn-hidden-size 18432 --num-attention-heads 128 --kv-channels 128
 --multi-latent-attention --q-lora-rank 1536 --kv-lora-rank 512 --qk-head-dim 128 --qk-pos-emb-head-dim 64
 --v-head-dim 128 --qk-layernorm --seq-length 4096 --max-position-embeddings 4096 --normalization RMSNorm
 --position-embedding-type rope --swiglu --disable-bias-linear --untie-embeddings-and-output-weights
 --hidden-dropout 0.0 --attention-dropout 0.0 --num-experts 256 --moe-router-topk 8 --moe-ffn-hidden-size 2048
 --moe-shared-expert-intermediate-size 2048 --moe-layer-freq ([0]*3+[1]*58) --moe-router-score-function sigmoid
 --moe-router-enable-expert-bias --moe-token-dispatcher-type alltoall --mtp-num-layers 1
 --tensor-model-parallel-size 2 --pipeline-model-parallel-size 8 --pipeline-model-parallel-layout Et|(tt|)*30mL
 --expert-model-parallel-size 64 --expert-tensor-parallel-size 1 --sequence-parallel
 --recompute-granularity selective --recompute-modules mla_up_proj mlp --micro-batch-size 1
 --global-batch-size 16384 --bf16 --use-distributed-optimizer --overlap-grad-reduce --vocab-size 129280 --mock-data"""
NEMOTRON_H_8B = f"""pretrain_mamba.py --num-layers 52 --hybrid-override-pattern {"M-M-M-M*-" * 4 + "M-" * 8}
 --is-hybrid-model --spec megatron.core.models.mamba.mamba_layer_specs mamba_stack_spec --hidden-size 4096
 --ffn-hidden-size 21504 --squared-relu --num-attention-heads 32 --group-query-attention --num-query-groups 8
 --kv-channels 128 --mamba-num-heads 128 --mamba-head-dim 64 --mamba-state-dim 128 --mamba-num-groups 8
 --seq-length 8192 --max-position-embeddings 8192 --normalization RMSNorm --position-embedding-type none
 --disable-bias-linear --untie-embeddings-and-output-weights --hidden-dropout 0 --attention-dropout 0
 --tensor-model-parallel-size 2 --sequence-parallel --micro-batch-size 1 --global-batch-size 768 --bf16
 --fp8-format hybrid --use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather --vocab-size 131072
 --mock-data"""
PUBLISHED = {
    # name: (arguments, cluster, nodes, the pins, what must be listed as not represented)
    "llama3-70b": (LLAMA3_70B, "h100-sxm-8", 8, dict(tp=4, pp=8, vpp=5, cp=1, dp=2, sp=True), []),
    "qwen3-30b-a3b": (QWEN3_30B_A3B, "h100-sxm-8", 2, dict(tp=1, pp=1, ep=16, etp=1, dp=16),
                      ["--moe-aux-loss-coeff 1e-3"]),
    "deepseek-v3": (DEEPSEEK_V3, "h100-sxm-8", 128, dict(tp=2, pp=8, vpp=4, ep=64, dp=64, sp=True,
                                                         pipeline_layout="Et|(tt|)*30mL"), ["no --overlap-param-gather"]),
    # the docs' layout: the MTP layer alone in rank 14's last virtual stage, the loss alone after it
    "deepseek-v3-mtp-standalone": (
        DEEPSEEK_V3.replace("--pipeline-model-parallel-size 8 --pipeline-model-parallel-layout Et|(tt|)*30mL",
                            "--pipeline-model-parallel-size 16 --pipeline-model-parallel-layout Et*3|(tt|)*29m|L"),
        "h100-sxm-8", 128, dict(tp=2, pp=16, vpp=2, ep=64, dp=32, pipeline_layout="Et*3|(tt|)*29m|L"),
        ["no --overlap-param-gather"]),
    "nemotron-h-8b": (NEMOTRON_H_8B, "h100-sxm-8", 1, dict(tp=2, pp=1, dp=4, sp=True), ["--squared-relu"]),
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_run_argument_lists(name):
    args, cluster, nodes, pins, listed = PUBLISHED[name]
    imported = import_launch(args.split(), ImportOptions(cluster=cluster, nodes=nodes))
    got = imported.spec.parallel.model_dump()
    assert {k: got[k] for k in pins} == pins
    assert len(imported.unsupported) == len(listed), imported.unsupported
    for item in listed:
        assert any(line.startswith(item + " ") or line.startswith(item + ":") for line in imported.unsupported), item
    assert load_spec_text(imported.to_yaml(name)) == imported.spec


def test_an_moe_script_without_the_permute_fusion_is_told_the_launch_adds_it():
    """A TE MoE script that leaves --moe-permute-fusion off keeps backend.fusions, whose launch
    renders it: the import says so; with the flag there is nothing to say."""
    words = QWEN3_30B_A3B.split()
    assert "--moe-permute-fusion" in words
    said = import_launch(words, ImportOptions(cluster="h100-sxm-8", nodes=2)).notes
    assert not any("--moe-permute-fusion" in n for n in said)
    without = [w for w in words if w != "--moe-permute-fusion"]
    said = import_launch(without, ImportOptions(cluster="h100-sxm-8", nodes=2)).notes
    assert any(n.startswith("no --moe-permute-fusion in the script") for n in said)


def test_published_runs_keep_what_a_launch_can_carry_and_plan():
    llama = import_launch(LLAMA3_70B.split(), ImportOptions(cluster="h100-sxm-8", nodes=8)).spec
    assert llama.training.precision == "fp8" and llama.training.fp8_recipe == "tensorwise" and llama.training.tp_comm_overlap
    assert llama.launch.extra_args == ["--rotary-base", "500000"]
    plan = build_plan(llama, top=1)
    assert plan.legal_count == 1 and plan.candidates[0].layout.vpp == 5
    qwen = import_launch(QWEN3_30B_A3B.split(), ImportOptions(cluster="h100-sxm-8", nodes=2)).spec
    moe = qwen.model.moe
    assert (moe.dispatcher, moe.flex_backend, moe.overlap_communication) == ("flex", "hybridep", True)
    assert qwen.training.cuda_graphs == ("moe_router", "moe_preprocess")
    # the permute fusion is the spec's (backend.fusions): the launch renders it once, not as an extra
    assert qwen.launch.extra_args == ["--moe-router-load-balancing-type", "aux_loss"] and qwen.backend.fusions
    plan = build_plan(qwen, top=1)
    words = megatron_args(plan.context, plan.candidates[0], TrainOptions())
    assert words.count("--moe-permute-fusion") == 1
    deepseek = import_launch(DEEPSEEK_V3.split(), ImportOptions(cluster="h100-sxm-8", nodes=128)).spec
    assert deepseek.model.pattern == "(AD)*3 (AE)*58"  # the layout string pins the stages, empty ones included
    stages = build_plan(deepseek, top=1).candidates[0].stages
    assert [len(s.blocks) // 2 for s in sorted(stages, key=lambda s: s.start)] == [1, *[2] * 30, 0]
    hybrid = import_launch(NEMOTRON_H_8B.split(), ImportOptions(cluster="h100-sxm-8")).spec
    assert hybrid.backend.megatron == "core_v0.16" and hybrid.model.position_embedding == "none"
    assert hybrid.pattern.blocks.count("A") == 4 and len(hybrid.pattern) == 52


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


HEAD = "torchrun --nproc-per-node 8 pretrain_gpt.py "
HOSTILE = {
    "an unclosed quote": ("A='never closed\n" + "x\n" * 5000, "not closed within"),
    "nested defaults": (HEAD + "${A:-" * 5000 + "x" + "}" * 5000, "nested"),
    "a doubling variable": ("A=0123456789\n" + 'A="$A$A"\n' * 40 + HEAD + "$A", "more than|grows past"),
    "a NUL byte": ("echo \x00", "binary"),
    "no Megatron command": ("echo hello\n", "runs none of"),
    "two Megatron commands": (HEAD + "--num-layers 2\n" + HEAD + "--num-layers 4\n", "a second Megatron-LM command"),
    "a deep list expression": (HEAD + "--num-layers 2 --hidden-size 8 --num-experts 2 --moe-layer-freq '"
                               + "(" * 3000 + "[1]" + ")" * 3000 + "'", "--moe-layer-freq"),
    "a layout of a million layers": (HEAD + "--pipeline-model-parallel-size 2 --num-layers 2 --hidden-size 8 "
                                     "--pipeline-model-parallel-layout '((t)*999999)*999999|L'", "expands beyond"),
    "a value the script never assigns": (HEAD + "--num-layers $LAYERS --hidden-size 8", "never assigns LAYERS"),
    "a billion layers": (HEAD + "--num-layers 1000000000 --hidden-size 8", "--num-layers 1000000000: must be 1 to 2048"),
    "no layers": (HEAD + "--num-layers 0 --hidden-size 8", "--num-layers 0: must be 1 to"),
    "a superscript array index": ("A=(16 32)\n" + HEAD + "--num-layers 2 --hidden-size ${A[\u00b2]}", "--hidden-size"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_scripts_end_in_one_line_quickly(case):
    import time

    text, message = HOSTILE[case]
    start = time.perf_counter()
    with pytest.raises(SpecError, match=message) as err:
        import_launch(text, ImportOptions(cluster="h100-sxm-8"))
    assert time.perf_counter() - start < 5
    assert "\n" not in str(err.value) and len(str(err.value)) < 400


def test_a_window_that_is_no_whole_number_is_listed_as_lost():
    """str.isdigit takes a superscript two; the window must be ASCII digits or be named as lost."""
    text = (HEAD + "--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 128 --vocab-size 100 "
            "--micro-batch-size 1 --window-size \u00b2,0")
    result = import_launch(text, ImportOptions(cluster="h100-sxm-8"))
    assert result.spec.model.attention.window_size is None
    assert any("--window-size" in item for item in result.unsupported), result.unsupported


def test_an_escaped_dollar_or_backtick_in_double_quotes_is_read_as_bash_reads_it():
    """Inside double quotes bash drops the backslash before $ and `: "/ckpt/\\$USER" saves to a
    folder named $USER, not to one with a backslash in its name."""
    text = (HEAD + "--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 128 --vocab-size 100 "
            '--micro-batch-size 1 --save "/ckpt/\\$USER/run" --data-path "/d/\\`x\\`/a" --load \'/k/\\$HOME\'')
    document = import_launch(text, ImportOptions(cluster="h100-sxm-8")).document
    assert document["checkpoint"]["save"] == "/ckpt/$USER/run"
    assert document["data"]["paths"] == ["/d/`x`/a"]
    assert document["checkpoint"]["load"] == "/k/\\$HOME"  # single quotes keep every backslash


def test_odd_bytes_and_arithmetic_nothing_is_run(tmp_path):
    marker = tmp_path / "ran"
    script = tmp_path / "odd.sh"
    script.write_bytes(b"# caf\xe9 \xff\n" + (
        f"N=$(touch {marker}) `touch {marker}`\n"
        "MBS=$(( (1 + 1) * 2 / 2 ))\n"
        + HEAD + "--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 128 --vocab-size 100 "
        "--micro-batch-size $MBS --bf16 --use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather "
        "--disable-bias-linear --hidden-dropout 0 --attention-dropout 0 --tensorboard-dir \"$N\"").encode())
    result = _cli("import", str(script), "--cluster", "h100-sxm-8", "--out", str(tmp_path / "spec.yaml"))
    assert result.returncode == 0, result.stderr
    assert not marker.exists()
    spec = load_spec_text((tmp_path / "spec.yaml").read_text())
    assert spec.training.micro_batch_size == 2 and spec.training.global_batch_size == 2 * 8  # Megatron: mbs x dp
    assert spec.launch.extra_args == ["--tensorboard-dir", f"$(touch {marker})"]


def test_cli_writes_the_spec_and_lists_what_it_left_out(tmp_path):
    script = tmp_path / "user.sh"
    script.write_text(USER_SCRIPT)
    result = _cli("import", str(script), "--cluster", "h100-sxm-8")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("# imported by `megacpp import` from")
    assert "not represented: --my-custom-flag 3: unknown to Megatron-LM core_v0.16's argument parser" in result.stderr
    spec = load_spec_text(result.stdout)
    assert spec.parallel.tp == 2
    args = ["import", "--cluster", "h100-sxm-8", "--nodes", "2", "--set", "name=from-args", "--", "pretrain_gpt.py",
            *LLAMA3_70B.split()]
    result = _cli(*args)
    assert result.returncode == 0, result.stderr
    assert load_spec_text(result.stdout).name == "from-args"


def test_cli_errors_are_one_line_without_a_traceback(tmp_path):
    big = tmp_path / "big.sh"
    big.write_bytes(b"#" * (5 << 20))
    for args in (["import", str(big)], ["import", str(tmp_path)], ["import", "--", "--hidden-size", "8"],
                 ["import", "--", "--num-layers", "2", "--hidden-size", "8", "--seq-length", "8"]):
        result = _cli(*args)
        assert result.returncode == 1, args
        assert "Traceback" not in result.stderr and result.stderr.startswith("error:"), result.stderr
        assert result.stderr.count("\n") == 1


def _variant(base, **changes):
    from tests.conftest import make_spec

    return make_spec(base, **changes)


def _variants():
    from tests.conftest import TINY_DENSE, TINY_MOE

    hybrid = {**TINY_MOE, "model": {**TINY_MOE["model"], "pattern": "(MEMA)*5",
                                     "mamba": {"num_heads": 4, "head_dim": 32, "num_groups": 2}},
              "backend": {"transformer_engine": True, "megatron": "core_v0.16"}, "training": {**TINY_MOE["training"]}}
    return {
        "gpt-vpp": _variant(TINY_DENSE, **{"model.pattern": "(AD)*8", "parallel": {"tp": 1, "pp": 2, "vpp": 2, "cp": 1}}),
        "gpt-uneven": _variant(TINY_DENSE, **{"model.pattern": "(AD)*7", "parallel": {"tp": 1, "pp": 2, "vpp": 1, "cp": 1}}),
        "gpt-pinned-cut": _variant(TINY_DENSE, **{"model.pattern": "(AD)*2 | (AD)*6", "parallel": {"pp": 2, "vpp": 1}}),
        "hybrid-first-last": _variant(hybrid, **{"cluster.gpus_per_node": 3,
                                                 "parallel": {"tp": 1, "pp": 3, "vpp": 1, "cp": 1, "ep": 1}}),
        "hybrid-main-pipes": _variant(hybrid, **{"model.pattern": "(MEMA)*4 MER", "backend.megatron": "main",
                                                 "model.recurrent": {"num_heads": 4, "head_dim": 16},
                                                 "parallel": {"tp": 1, "pp": 2, "vpp": 2, "cp": 1, "ep": 1}}),
        "moe-everything": _variant(TINY_MOE, **{
            "backend": {"transformer_engine": True, "megatron": "core_v0.16", "fusions": False},
            "model.moe": {"num_experts": 8, "top_k": 1, "ffn_hidden_size": 64, "capacity_factor": 1.25,
                          "shared_expert_ffn_hidden_size": 128, "dispatcher": "flex", "flex_backend": "hybridep",
                          "router_num_groups": 4, "router_group_topk": 2},
            "model.normalization": "layernorm", "model.position_embedding": "learned", "model.tie_embeddings": True,
            "training": {"seq_length": 64, "global_batch_size": 32, "micro_batch_size": 2, "precision": "fp8",
                         "optimizer": {"exp_avg_dtype": "bf16"}, "grad_reduce_dtype": "bf16", "tp_comm_overlap": True,
                         "cuda_graphs": ["attn", "moe_router"], "offload_modules": ["expert_fc1"],
                         "train_iters": 500, "warmup_iters": 50, "lr_decay_style": "linear", "lr_decay_iters": 1000},
            "data": {"mock": True, "tokenizer": {"type": "HuggingFaceTokenizer", "model": "/models/tok"}},
            "checkpoint": {"save": "/ckpt/x", "interval": 100, "load_optimizer": False},
            "parallel": {"tp": 2, "pp": 1, "vpp": 1, "cp": 1, "ep": 2, "etp": 1, "sp": True}}),
        "layer-offload": _variant(TINY_DENSE, **{
            "backend": {"transformer_engine": True, "megatron": "core_v0.16"},
            "training": {"seq_length": 64, "global_batch_size": 16, "offload_layers": 2},
            "parallel": {"tp": 1, "pp": 1, "vpp": 1, "cp": 1}}),
        "local-full-recompute": _variant(TINY_MOE, **{
            "training": {"seq_length": 64, "global_batch_size": 16, "recompute": "full", "recompute_method": "block",
                         "recompute_num_layers": 2, "distributed_optimizer": False, "cuda_graphs": "full_iteration"},
            "parallel": {"tp": 1, "pp": 2, "vpp": 1, "cp": 1, "ep": 4}}),
    }


VARIANTS = list(_variants())


@pytest.mark.parametrize("name", VARIANTS)
def test_spec_features_round_trip(name):
    spec = _variants()[name]
    plan = build_plan(spec, top=1)
    script = render_launch(plan, RenderOptions(engine="megatron-lm"))["launch.sh"]
    imported = import_launch(script, ImportOptions(cluster=spec.cluster.preset))
    assert imported.unsupported == []
    again = build_plan(imported.spec, top=1)
    before, after = plan.candidates[0], again.candidates[0]
    assert (after.layout, after.split, after.memory, after.time) == (before.layout, before.split, before.memory, before.time)
    rendered = render_launch(again, RenderOptions(engine="megatron-lm"))["launch.sh"]
    assert _megatron_words(rendered) == _megatron_words(script)


def test_commands_inside_if_bodies_and_brace_groups_are_read():
    from megacpp.planner.megatron.importer.script import read_script

    script = ('TP=2\nif [ "$NODE_RANK" = 0 ]; then TP=4; fi\n'
              'if [ -d /data ]; then { torchrun --nproc-per-node 8 pretrain_gpt.py --tensor-model-parallel-size $TP '
              '--lr ${LR:-1e-4}; } 2>&1 | tee log; fi\n')
    command = read_script(script)
    assert command.args == ["--tensor-model-parallel-size", "2", "--lr", "1e-4"]  # TP=4 ran on a condition
    assert command.launcher == ["torchrun", "--nproc-per-node", "8"]


@pytest.mark.parametrize("launcher,gpus", [
    ("srun -N 2 --ntasks-per-node=1 torchrun --nproc-per-node 4 --nnodes 2", 4),  # one torchrun per node
    ("srun -N 2 --ntasks-per-node=8 python", 8),  # one task per GPU
])
def test_the_world_from_srun_and_torchrun_without_a_preset(launcher, gpus):
    from megacpp.planner.validation import validate_spec

    args = ("pretrain_gpt.py --num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 64 --vocab-size 100 "
            "--bf16 --tensor-model-parallel-size 2")
    imported = import_launch(f"{launcher} {args}", ImportOptions())
    assert (imported.spec.cluster.nodes, imported.spec.cluster.gpus_per_node, imported.spec.cluster.preset) == (2, gpus, None)
    assert imported.spec.parallel.dp == gpus  # 2 nodes x gpus / tp 2
    assert any("does not name its GPU: pass --cluster PRESET" in n for n in imported.notes)
    # the world shape alone validates (memory unchecked); the GPU's kind makes it a plan
    assert validate_spec(imported.spec)["valid"]
    assert validate_spec(import_launch(f"{launcher} {args}", ImportOptions(overrides=["cluster.gpu=h100"])).spec)["valid"]


def test_launch_dry_run_then_import_then_plan_on_the_command_line(tmp_path):
    import json

    run = tmp_path / "run"
    assert _cli("launch", "llama-8b-dense", "--target", "slurm", "--dry-run", "--out", str(run)).returncode == 0
    spec = tmp_path / "imported.yaml"
    result = _cli("import", str(run / "job.sbatch"), "--cluster", "h100-sxm-8", "--out", str(spec))
    assert result.returncode == 0 and "not represented" not in result.stderr, result.stderr
    planned = _cli("plan", str(spec), "--json")
    assert planned.returncode == 0, planned.stderr
    before = json.loads((run / "plan.json").read_text())["candidates"][0]
    after = json.loads(planned.stdout)["candidates"][0]
    assert {k: after[k] for k in ("layout", "split", "memory", "time")} == {k: before[k] for k in ("layout", "split", "memory", "time")}


SMALL = HEAD + "--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 64 --vocab-size 256 --bf16 "


@pytest.mark.parametrize(("args", "key", "value", "listed"), [
    ("--fp4-format e2m1 --fp4-recipe nvfp4", "precision", "fp4", []),
    ("--fp4-format e2m1 --fp4-recipe mxfp4", "precision", "bf16", ["--fp4-format e2m1"]),
    ("--use-megatron-fsdp --data-parallel-sharding-strategy optim_grads_params --ckpt-format fsdp_dtensor",
     "data_parallel_sharding", "fsdp", []),
    ("--use-megatron-fsdp --data-parallel-sharding-strategy optim_grads", "data_parallel_sharding", "optimizer",
     ["--use-megatron-fsdp"]),
])
def test_fp4_and_megatron_fsdp_import_as_their_training_keys(args, key, value, listed):
    imported = import_launch(SMALL + args, ImportOptions(cluster="h100-sxm-8"))
    assert getattr(imported.spec.training, key) == value
    assert [u.split(":")[0] for u in imported.unsupported if u.startswith(("--fp4", "--use-megatron-fsdp", "--ckpt"))] == listed
    assert "--ckpt-format" not in imported.spec.launch.extra_args


def test_a_layout_the_rules_refuse_is_imported_as_written_with_a_note_naming_the_rule():
    """The spec is the script's job as written; the note says at once why validate will refuse it."""
    text = (HEAD + "--num-layers 4 --hidden-size 64 --num-attention-heads 4 --seq-length 128 --vocab-size 100 "
            "--micro-batch-size 1 --pipeline-model-parallel-size 2 --pipeline-model-parallel-layout 'E|t*4|L'")
    imported = import_launch(text, ImportOptions(cluster="h100-sxm-8"))
    assert imported.document["parallel"]["pipeline_layout"] == "E|t*4|L"
    assert any(n.startswith("the layout as the script writes it breaks pipeline-layout-stages") for n in imported.notes), imported.notes
    legal = import_launch(text.replace(" --pipeline-model-parallel-layout 'E|t*4|L'", ""), ImportOptions(cluster="h100-sxm-8"))
    assert not any("breaks" in n for n in legal.notes), legal.notes
