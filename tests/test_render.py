"""Rendered launch scripts: golden files, Megatron flag existence, shell syntax, no injection.

Regenerate the golden files after an intended change with MEGACPP_UPDATE_GOLDEN=1.
"""

from __future__ import annotations

import functools
import os
import shlex
import stat
import subprocess
from pathlib import Path

import pytest

from megacpp.planner.errors import LaunchError
from megacpp.planner.megatron.args import MOE_AUX_LOSS_COEFF, known_flags
from megacpp.planner.megatron.render import RenderOptions, render_launch
from megacpp.planner.plan import build_plan
from megacpp.planner.spec.loading import load_spec_text
from megacpp.recipes import recipe_names, recipe_text
from tests.conftest import ROOT, TINY_DENSE, TINY_MOE, make_spec

GOLDEN = ROOT / "tests" / "golden" / "launch"
UPDATE = os.environ.get("MEGACPP_UPDATE_GOLDEN") == "1"
COMBOS = [(r, e, t) for r in recipe_names() for e in ("megatron-lm", "megacpp") for t in ("torchrun", "slurm")]


@functools.cache
def _plan(recipe: str, *overrides: str):
    return build_plan(load_spec_text(recipe_text(recipe), overrides=list(overrides)), top=1)


def _render(plan, engine, target):
    try:
        files = render_launch(plan, RenderOptions(target=target, engine=engine))
    except LaunchError as exc:
        return f"LaunchError: {exc}\n"
    return files["launch.sh" if target == "torchrun" else "job.sbatch"]


def _megatron_lm_words(plan) -> list[str]:
    """The words of the Megatron-LM launch.sh rendered for `plan`, its line continuations joined."""
    return shlex.split(render_launch(plan, RenderOptions(engine="megatron-lm"))["launch.sh"].replace("\\\n", " "))


@pytest.mark.parametrize("recipe,engine,target", COMBOS, ids=["-".join(c) for c in COMBOS])
def test_golden(recipe, engine, target):
    text = _render(_plan(recipe), engine, target)
    path = GOLDEN / f"{recipe}.{engine}.{target}.txt"
    if UPDATE:
        path.write_text(text)
    assert path.exists(), f"missing golden file {path}; run with MEGACPP_UPDATE_GOLDEN=1"
    assert text == path.read_text()


def test_nam56r_on_main_renders_r_as_gated_delta_net():
    text = _render(_plan("nam56r", "backend.megatron=main"), "megatron-lm", "torchrun")
    assert "pretrain_hybrid.py" in text and "--hybrid-layer-pattern" in text
    pattern = shlex.split(text.split("--hybrid-layer-pattern", 1)[1])[0]
    assert pattern.replace("|", "").endswith("*EMG") and "--num-layers" not in text


def test_r_blocks_refused_on_core_v016_megatron_lm_with_the_fix():
    with pytest.raises(LaunchError, match="--engine megacpp"):
        render_launch(_plan("nam56r"), RenderOptions(engine="megatron-lm"))


def test_m_blocks_without_te_render_for_the_runtime_only():
    plan = _plan("nam56r", "backend.megatron=main", "backend.transformer_engine=false")
    with pytest.raises(LaunchError, match="M blocks without Transformer Engine.*--engine megacpp"):
        render_launch(plan, RenderOptions(engine="megatron-lm"))
    assert "megacpp.runtime.worker" in render_launch(plan, RenderOptions(engine="megacpp"))["launch.sh"]


@pytest.mark.parametrize("dialect", ["core_v0.16", "main"])
@pytest.mark.parametrize("recipe", recipe_names())
def test_every_megatron_flag_exists_in_the_dialects_parser(recipe, dialect):
    try:
        files = render_launch(_plan(recipe, f"backend.megatron={dialect}"), RenderOptions(engine="megatron-lm"))
    except LaunchError:
        pytest.skip("this recipe cannot run on stock Megatron-LM in this dialect (asserted elsewhere)")
    tokens = shlex.split(files["launch.sh"], comments=True)
    start = next(i for i, t in enumerate(tokens) if "/pretrain_" in t)
    megatron = {t for t in tokens[start:] if t.startswith("--")}
    assert megatron and megatron <= known_flags(dialect), megatron - known_flags(dialect)


@pytest.mark.parametrize("recipe,engine,target", COMBOS, ids=["-".join(c) for c in COMBOS])
def test_scripts_pass_bash_n(recipe, engine, target, tmp_path):
    text = _render(_plan(recipe), engine, target)
    if text.startswith("LaunchError"):
        pytest.skip(text)
    script = tmp_path / "s.sh"
    script.write_text(text)
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_uneven_pipeline_and_vpp_flags():
    plan = build_plan(make_spec(TINY_DENSE, **{"model.pattern": "(AD)*7", "parallel": {"tp": 1, "pp": 2, "vpp": 1, "cp": 1}}))
    text = render_launch(plan, RenderOptions(engine="megatron-lm"))["launch.sh"]
    assert "--pipeline-model-parallel-layout" in text and "--transformer-impl local" in text
    assert "--no-persist-layer-norm" in text and "--no-rope-fusion" in text


@pytest.mark.parametrize("te", [False, True])
def test_local_modules_run_without_apex(te):
    """Megatron-LM defaults gradient-accumulation fusion and the masked-softmax kernel on; both are
    Apex CUDA extensions, and without them a local-module run fails at model build (seen on
    2 x H200). The softmax runs in fp32, as megatron-core's config and the runtime run it and the
    cost model prices it (Megatron-LM alone defaults it to bf16). A TE render leaves the softmax
    alone and probes for Apex before it turns the fusion off (the test below)."""
    plan = build_plan(make_spec(TINY_DENSE, **{"backend.transformer_engine": te}))
    text = render_launch(plan, RenderOptions(engine="megatron-lm"))["launch.sh"]
    for flag in ("--no-gradient-accumulation-fusion \\", "--no-masked-softmax-fusion", "--attention-softmax-in-fp32"):
        assert (flag in text) is not te


@pytest.mark.parametrize("te", [False, True])
@pytest.mark.parametrize("data", [None, {"paths": ["/data/corpus_text_document"]}])
def test_the_dataloader_builds_no_attention_mask(te, data):
    """Both attention paths make their own causal mask, so the s x s mask Megatron-LM's dataloader
    builds by default per sample is left out, with mock data and with a corpus alike."""
    plan = build_plan(make_spec(TINY_DENSE, **{"backend.transformer_engine": te, "data": data}))
    text = render_launch(plan, RenderOptions(engine="megatron-lm"))["launch.sh"]
    assert text.count("--no-create-attention-mask-in-dataloader") == 1


@pytest.mark.parametrize("te", [False, True])
@pytest.mark.parametrize("fusions", [False, True])
def test_fusions_off_render_megatron_lm_unfused(te, fusions):
    """backend.fusions false turns off the fusions Megatron-LM takes by default, each flag once
    (a local render turns rope fusion off anyway); true leaves its defaults."""
    plan = build_plan(make_spec(TINY_DENSE, **{"backend.transformer_engine": te, "backend.fusions": fusions}))
    args = _megatron_lm_words(plan)
    for flag in ("--no-bias-swiglu-fusion", "--no-bias-dropout-fusion", "--no-rope-fusion"):
        expected = 0 if fusions and (te or flag != "--no-rope-fusion") else 1
        assert args.count(flag) == expected, flag


@pytest.mark.parametrize("te", [False, True])
@pytest.mark.parametrize("fusions", [False, True])
def test_te_moe_launch_fuses_the_token_permutation(te, fusions):
    """With TE and the fusions on, an MoE launch runs TE's fused token permutation, as
    Megatron-Bridge's MoE recipes do (Megatron-LM leaves it off); never without TE, which
    provides the kernels, nor with the fusions off, nor without experts."""
    plan = build_plan(make_spec(TINY_MOE, **{"backend.transformer_engine": te, "backend.fusions": fusions}))
    assert _megatron_lm_words(plan).count("--moe-permute-fusion") == (1 if te and fusions else 0)
    assert "--moe-permute-fusion" not in _megatron_lm_words(build_plan(make_spec(TINY_DENSE)))


def test_moe_launch_balances_routing_as_the_runtime_trains():
    """Megatron-LM's aux-loss coefficient defaults to 0 (no load balancing); the render passes the
    runtime's, and an fp32 router as the runtime runs it, for any expert count."""
    plan = build_plan(make_spec(TINY_MOE))
    args = _megatron_lm_words(plan)
    assert args[args.index("--moe-aux-loss-coeff") + 1] == f"{MOE_AUX_LOSS_COEFF:g}"
    assert args[args.index("--moe-router-dtype") + 1] == "fp32"


@pytest.mark.parametrize("distopt", [False, True])
def test_launch_overlaps_data_parallel_communication_as_the_runtime(distopt):
    """Gradients reduce during the backward with or without the distributed optimizer (Megatron-LM
    defaults to after it), and the parameters gather during the next forward with it, as
    megacpp's runtime trains; Megatron-LM refuses --overlap-param-gather without it."""
    plan = build_plan(make_spec(TINY_DENSE, **{"training.distributed_optimizer": distopt}))
    args = _megatron_lm_words(plan)
    assert args.count("--overlap-grad-reduce") == 1
    assert args.count("--overlap-param-gather") == args.count("--use-distributed-optimizer") == int(distopt)


@pytest.mark.parametrize("apex", [False, True])
def test_te_launch_keeps_gradient_fusion_only_where_apex_has_it(apex, tmp_path):
    """Under TE, Megatron-LM's output layer needs Apex's fused wgrad kernel for its default
    gradient-accumulation fusion (a TE run without Apex failed at model build on 2 x H200). The
    script probes for the kernel and turns the fusion off only where it is missing."""
    plan = build_plan(make_spec(TINY_DENSE, **{"backend.transformer_engine": True}), top=1)
    script = tmp_path / "run" / "launch.sh"
    script.parent.mkdir()
    script.write_text(render_launch(plan, RenderOptions(engine="megatron-lm"))["launch.sh"])
    site = tmp_path / "site"
    site.mkdir()
    if apex:
        (site / "fused_weight_gradient_mlp_cuda.py").write_text("")
    env = {**os.environ, "PATH": f"{_fake_bin(tmp_path)}:{os.environ['PATH']}", "ARGV_OUT": str(tmp_path / "argv"),
           "MEGATRON_LM": str(tmp_path / "mlm"), "PYTHONPATH": str(site)}
    proc = subprocess.run(["bash", str(script)], cwd=script.parent, env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    argv = (tmp_path / "argv").read_text().splitlines()
    assert "--transformer-impl" in argv and argv[-1] != ""
    assert ("--no-gradient-accumulation-fusion" in argv) is not apex


HOSTILE = ['x"; touch PWNED; echo "', "$(touch PWNED)", "`touch PWNED`", "a'b; touch PWNED", "${IFS}touch${IFS}PWNED"]


def _fake_bin(tmp: Path) -> Path:
    """torchrun/srun/scontrol stand-ins that record their argv instead of launching anything."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    for name, body in {
        "torchrun": 'printf "%s\\n" "$@" > "$ARGV_OUT"',
        "srun": 'printf "%s\\n" "$@" > "$ARGV_OUT"',
        "scontrol": "echo node1",
    }.items():
        p = bin_dir / name
        p.write_text(f"#!/usr/bin/env bash\n{body}\n")
        p.chmod(p.stat().st_mode | stat.S_IEXEC)
    return bin_dir


@pytest.mark.parametrize("name", HOSTILE)
@pytest.mark.parametrize("target", ["torchrun", "slurm"])
@pytest.mark.parametrize("engine", ["megatron-lm", "megacpp"])
def test_hostile_spec_name_executes_nothing(name, target, engine, tmp_path):
    plan = build_plan(make_spec(TINY_DENSE, name=name), top=1)
    files = render_launch(plan, RenderOptions(target=target, engine=engine))
    script = tmp_path / "run" / ("launch.sh" if target == "torchrun" else "job.sbatch")
    script.parent.mkdir()
    script.write_text(files[script.name])
    env = {**os.environ, "PATH": f"{_fake_bin(tmp_path)}:{os.environ['PATH']}", "ARGV_OUT": str(tmp_path / "argv"),
           "MEGATRON_LM": str(tmp_path / "mlm"), "SLURM_JOB_NODELIST": "node1", "SLURM_NNODES": "1", "SLURM_JOB_ID": "7"}
    proc = subprocess.run(["bash", str(script)], cwd=script.parent, env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert not list(tmp_path.rglob("PWNED")) and not (ROOT / "PWNED").exists()
    argv = (tmp_path / "argv").read_text().splitlines()
    assert "--nproc-per-node" in argv  # the launcher really ran, with its arguments intact


def test_the_runtime_worker_gets_profile_and_trace_only_when_asked():
    """launch --trace writes each rank's profiled step as a Chrome trace under a fixed folder of
    the run (no user text reaches the script); without --profile there is no profiled step."""
    plan = _plan("nam56r")

    def worker(**opts) -> list[str]:
        text = render_launch(plan, RenderOptions(engine="megacpp", **opts))["launch.sh"]
        return shlex.split(text.split("megacpp.runtime.worker", 1)[1].split("\n", 1)[0])

    assert "--profile" not in worker() and "--trace" not in worker(trace=True)
    args = worker(profile=True, trace=True)
    assert "--profile" in args and args[args.index("--trace") + 1] == "traces"
    assert "--trace" not in worker(profile=True) and "--trace" not in worker(profile=True, trace=True, construct_only=True)
