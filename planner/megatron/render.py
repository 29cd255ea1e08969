"""Render a plan into launch scripts (torchrun or Slurm) for Megatron-LM or megacpp's runtime.

All quoting happens here with shlex.quote; the templates only place pre-quoted lines. Nothing a
spec says (its name included) can reach a shell unquoted.
"""

from __future__ import annotations

import json
import posixpath
import re
import shlex
from dataclasses import dataclass, field
from importlib import resources

import jinja2

from megacpp import __version__
from megacpp.planner.errors import LaunchError
from megacpp.planner.megatron.args import TrainOptions, entry_point, environment, megatron_args
from megacpp.planner.megatron.job_args import CHECKPOINT_TRACKER, LOAD_VARIABLE, ShellWord, resumes_from_save
from megacpp.planner.plan import Plan
from megacpp.planner.search.layout import Layout
from megacpp.planner.search.rules.latent import runtime_missing
from megacpp.planner.search.rules.memory import megatron_lm_only
from megacpp.planner.spec.models import Spec
from megacpp.planner.spec.schedule import run_schedule
from megacpp.planner.validation import check_consistent

TARGETS = ("torchrun", "slurm")
ENGINES = ("megatron-lm", "megacpp")
SCRIPT_NAMES = {"torchrun": "launch.sh", "slurm": "job.sbatch"}


@dataclass(frozen=True)
class RenderOptions:
    target: str = "torchrun"
    engine: str = "megatron-lm"
    candidate: int = 0
    train: TrainOptions = field(default_factory=TrainOptions)
    nproc_per_node: int | None = None  # default: the cluster's GPUs per node
    nnodes: int | None = None  # default: the cluster's nodes
    cpu: bool = False  # Slurm without GPUs (construction-mode jobs, tests)
    construct_only: bool = False  # megacpp engine: build the model and report, no training
    profile: bool = False  # megacpp engine: one extra step under torch.profiler, summarised in the report
    memory_peak: bool = False  # megacpp engine: one extra step's peak memory by allocation site, in the report
    trace: bool = False  # megacpp engine: with profile, each rank's profiled step as a Chrome trace under traces/
    master_port: int = 29500


def _template(name: str) -> jinja2.Template:
    text = resources.files("megacpp.templates").joinpath(name).read_text()
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True, autoescape=False)
    return env.from_string(text)


APEX_PROBE = "NO_APEX_FUSION"
# the first words of the line that stops a Megatron-LM job at once where Transformer Engine does
# not import but a code path of megatron-core calls it even with local modules (te_import_reasons)
TE_IMPORT_CHECK = 'python3 -c "import transformer_engine" 2>/dev/null ||'


def te_import_reasons(spec: Spec, letters: frozenset[str]) -> list[tuple[str, str]]:
    """Why a Megatron-LM job of local modules still needs Transformer Engine importable, each with
    the other way out: code paths of megatron-core that call it unconditionally and fail with
    NameError without it."""
    reasons = []
    if spec.backend.megatron == "core_v0.16" and "E" in letters:
        reasons.append(("megatron-core 0.16's MoE router calls its te_general_gemm (moe_utils.py:22-39, 1192)",
                        "set backend.megatron: main (which defines it without TE) or launch with --engine megacpp"))
    if "layernorm" in (spec.training.recompute_modules or ()):
        reasons.append(("recompute of layernorm runs CheckpointWithoutOutput's FP8 path, which reads TE's "
                        "FP8GlobalStateManager (tensor_parallel/random.py: fp8=False still sets self.fp8)",
                        "drop layernorm from training.recompute_modules"))
    return reasons


def _arg_lines(args: list[str]) -> list[str]:
    """Group `--flag value...` onto one line each, every token shell-quoted."""
    lines: list[list[str]] = []
    for tok in args:
        if tok.startswith("--") or not lines:
            lines.append([tok])
        else:
            lines[-1].append(tok)
    return [" ".join(t if isinstance(t, ShellWord) else shlex.quote(t) for t in line) for line in lines]


def _layout_summary(layout: Layout) -> str:
    d = layout.model_dump()
    return " ".join(f"{k}={v}" for k, v in d.items() if k != "sp") + f" sp={layout.sp}"


# Variables the scripts set or read themselves; launch.env may not export them.
SCRIPT_VARIABLES = frozenset({"NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", APEX_PROBE, LOAD_VARIABLE,
                              "SLURM_JOB_ID", "SLURM_NNODES", "SLURM_JOB_NODELIST"})
# #SBATCH option per launch.slurm key (values are checked to plain characters in SlurmSpec)
SBATCH_OPTIONS = {"partition": "partition", "account": "account", "time": "time", "qos": "qos",
                  "reservation": "reservation", "constraint": "constraint", "nodelist": "nodelist", "exclude": "exclude"}


def _job_environment(spec: Spec, defaults: dict[str, str]) -> list[tuple[str, str]]:
    """megacpp's environment for the cluster with the spec's launch.env over it, values quoted."""
    taken = sorted(SCRIPT_VARIABLES & set(spec.launch.env))
    if taken:
        raise LaunchError(f"launch.env: {taken[0]} is set by the launch script itself; "
                          "set it in the shell that runs the script instead")
    return [(k, shlex.quote(v)) for k, v in sorted({**defaults, **spec.launch.env}.items())]


def _resume_lines(spec: Spec) -> list[str]:
    """With different save and load folders, load from save once it holds a checkpoint."""
    if not resumes_from_save(spec):
        return []
    ckpt = spec.checkpoint
    assert ckpt is not None and ckpt.save is not None and ckpt.load is not None
    tracker = shlex.quote(posixpath.join(ckpt.save, CHECKPOINT_TRACKER))
    return ["# a restarted or requeued job continues from checkpoint.save once it holds a checkpoint",
            f"{LOAD_VARIABLE}={shlex.quote(ckpt.load)}",
            f"if [ -f {tracker} ]; then {LOAD_VARIABLE}={shlex.quote(ckpt.save)}; fi"]


def _sbatch_lines(spec: Spec, engine: str) -> list[str]:
    """#SBATCH options from launch.slurm, and --requeue when Megatron-LM saves checkpoints to resume from."""
    slurm = spec.launch.slurm
    lines = [f"--{option}={getattr(slurm, key)}" for key, option in SBATCH_OPTIONS.items() if getattr(slurm, key) is not None]
    if engine == "megatron-lm" and spec.checkpoint is not None and spec.checkpoint.save is not None:
        lines.append("--requeue")
    return lines


def _srun_options(spec: Spec) -> str:
    """pyxis options on srun: the container every task runs in."""
    slurm = spec.launch.slurm
    options = []
    if slurm.container_image is not None:
        options.append("--container-image=" + shlex.quote(slurm.container_image))
    if slurm.container_mounts:
        options.append("--container-mounts=" + shlex.quote(",".join(slurm.container_mounts)))
    if slurm.container_workdir is not None:
        options.append("--container-workdir=" + shlex.quote(slurm.container_workdir))
    return "".join(" " + o for o in options)


def _runtime_notes(spec: Spec) -> list[str]:
    """What the megacpp engine leaves out of a spec written for Megatron-LM, said in the script."""
    unused = [key for key, given in (("data", spec.data is not None), ("checkpoint", spec.checkpoint is not None),
                                     ("launch.extra_args", bool(spec.launch.extra_args))) if given]
    if not unused:
        return []
    return [f"# {', '.join(unused)}: read by Megatron-LM only; this runtime trains on synthetic tokens and saves no checkpoint"]


def render_launch(plan: Plan, opts: RenderOptions) -> dict[str, str]:
    """Files to write: the launch script and the plan it runs. Raises LaunchError when impossible."""
    if opts.target not in TARGETS:
        raise LaunchError(f"--target {opts.target!r}: choose one of {', '.join(TARGETS)}")
    if opts.engine not in ENGINES:
        raise LaunchError(f"--engine {opts.engine!r}: choose one of {', '.join(ENGINES)}")
    if not plan.candidates:
        raise LaunchError("the plan has no legal layout to launch; re-plan with other pins or cluster")
    check_consistent(plan)  # a hand-edited plan file renders nothing its spec would not
    if not 0 <= opts.candidate < len(plan.candidates):
        raise LaunchError(f"--candidate {opts.candidate}: the plan keeps candidates 0..{len(plan.candidates) - 1}")
    cand = plan.candidates[opts.candidate]
    ctx = plan.context
    nproc = opts.nproc_per_node or ctx.cluster.gpus_per_node
    nnodes = opts.nnodes or ctx.cluster.nodes
    if nproc * nnodes != plan.world_size:
        raise LaunchError(f"{nnodes} node(s) x {nproc} process(es) != the plan's world size {plan.world_size}")

    if opts.engine == "megatron-lm":
        preamble = [
            'MEGATRON_LM="${MEGATRON_LM:?set MEGATRON_LM to a Megatron-LM checkout matching backend.megatron}"',
            'export PYTHONPATH="$MEGATRON_LM${PYTHONPATH:+:$PYTHONPATH}"',
        ]
        program = f'"$MEGATRON_LM/{entry_point(ctx)}"'  # a fixed file name, never spec text
        command = [program, *_arg_lines(megatron_args(ctx, cand, opts.train))]
        if ctx.te:
            # Megatron-LM turns gradient-accumulation fusion on by default; its output layer (a
            # ColumnParallelLinear even under TE) then needs Apex's fused_weight_gradient_mlp_cuda
            # and refuses to build without it (layers.py:925, seen on 2 x H200 with TE 2.20 and no
            # Apex). Keep the fusion where Apex has the kernel (NGC images), turn it off elsewhere.
            preamble.append(f'{APEX_PROBE}=""; python3 -c "import fused_weight_gradient_mlp_cuda" 2>/dev/null '
                            f'|| {APEX_PROBE}="--no-gradient-accumulation-fusion"')
            command.append(f"${APEX_PROBE}")  # unquoted on purpose: empty, or the one fixed flag
        elif reasons := te_import_reasons(ctx.spec, ctx.letters):
            why = shlex.quote(f"launch.sh: {'; '.join(c for c, _ in reasons)}: install transformer_engine on every "
                              f"host (the job still runs local modules), or {'; or '.join(r for _, r in reasons)}")
            preamble.append(f"{TE_IMPORT_CHECK} {{ echo {why} >&2; exit 1; }}")
        preamble += _resume_lines(ctx.spec)
        notes = []
    else:
        missing = runtime_missing(ctx)
        if missing:
            raise LaunchError(f"--engine megacpp does not build {', '.join(missing)} (its runtime's layers are "
                              "grouped-query attention without MTP); launch with --engine megatron-lm")
        unsupported = megatron_lm_only(ctx)
        if unsupported:
            raise LaunchError(f"--engine megacpp does not run {', '.join(unsupported)} (its runtime keeps Megatron's default "
                              "recompute, no offloading, fp32 optimizer state and no CUDA graphs); launch with --engine megatron-lm")
        preamble = []
        worker = ["-m", "megacpp.runtime.worker", "--plan", "plan.json", "--candidate", str(opts.candidate),
                  "--report", "report.json"]
        steps = run_schedule(ctx.spec.training, opts.train.train_iters).iters
        worker += ["--construct-only"] if opts.construct_only else ["--steps", str(steps)]
        worker += ["--profile"] if opts.profile and not opts.construct_only else []
        worker += ["--trace", "traces"] if opts.trace and opts.profile and not opts.construct_only else []
        worker += ["--memory-peak"] if opts.memory_peak and not opts.construct_only else []
        command = [" ".join(shlex.quote(t) for t in worker)]
        notes = _runtime_notes(ctx.spec)

    env = _job_environment(ctx.spec, {**environment(ctx, cand), "NCCL_NVLS_ENABLE": "0"} if not opts.cpu else {})
    context = {
        "version": __version__,
        "spec_name": shlex.quote(ctx.spec.name),
        "layout_summary": _layout_summary(cand.layout),
        "engine": opts.engine,
        "nnodes": nnodes,
        "nproc_per_node": nproc,
        "env": env,
        "notes": notes,
        "preamble": preamble,
        "command": command,
    }
    if opts.target == "torchrun":
        context["rendezvous"] = [("NNODES", str(nnodes)), ("NODE_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"),
                                 ("MASTER_PORT", str(opts.master_port))]
        script = _template("torchrun.sh.j2").render(**context)
    else:
        job = re.sub(r"[^A-Za-z0-9._-]", "-", ctx.spec.name)[:64].strip("-.") or "megacpp"
        context.update(job_name=job, gpus_per_node=0 if opts.cpu else nproc, log_pattern="megacpp-%j.log",
                       master_port=opts.master_port, sbatch=_sbatch_lines(ctx.spec, opts.engine), srun_options=_srun_options(ctx.spec))
        script = _template("slurm.sbatch.j2").render(**context)
    return {SCRIPT_NAMES[opts.target]: script, "plan.json": json.dumps(plan.to_json_dict(), indent=2) + "\n"}
