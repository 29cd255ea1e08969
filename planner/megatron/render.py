"""Render a plan into launch scripts (torchrun or Slurm) for Megatron-LM or megacpp's runtime.

All quoting happens here with shlex.quote; the templates only place pre-quoted lines. Nothing a
spec says (its name included) can reach a shell unquoted.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from importlib import resources

import jinja2

from megacpp import __version__
from megacpp.planner.errors import LaunchError
from megacpp.planner.megatron.args import TrainOptions, entry_point, environment, megatron_args
from megacpp.planner.plan import Plan
from megacpp.planner.search.layout import Layout
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


def _arg_lines(args: list[str]) -> list[str]:
    """Group `--flag value...` onto one line each, every token shell-quoted."""
    lines: list[list[str]] = []
    for tok in args:
        if tok.startswith("--") or not lines:
            lines.append([tok])
        else:
            lines[-1].append(tok)
    return [" ".join(shlex.quote(t) for t in line) for line in lines]


def _layout_summary(layout: Layout) -> str:
    d = layout.model_dump()
    return " ".join(f"{k}={v}" for k, v in d.items() if k != "sp") + f" sp={layout.sp}"


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
    else:
        preamble = []
        worker = ["-m", "megacpp.runtime.worker", "--plan", "plan.json", "--candidate", str(opts.candidate),
                  "--report", "report.json"]
        worker += ["--construct-only"] if opts.construct_only else ["--steps", str(opts.train.train_iters)]
        worker += ["--profile"] if opts.profile and not opts.construct_only else []
        worker += ["--trace", "traces"] if opts.trace and opts.profile and not opts.construct_only else []
        worker += ["--memory-peak"] if opts.memory_peak and not opts.construct_only else []
        command = [" ".join(shlex.quote(t) for t in worker)]

    env = sorted({**environment(ctx, cand), "NCCL_NVLS_ENABLE": "0"}.items()) if not opts.cpu else []
    context = {
        "version": __version__,
        "spec_name": shlex.quote(ctx.spec.name),
        "layout_summary": _layout_summary(cand.layout),
        "engine": opts.engine,
        "nnodes": nnodes,
        "nproc_per_node": nproc,
        "env": [(k, shlex.quote(v)) for k, v in env],
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
                       master_port=opts.master_port)
        script = _template("slurm.sbatch.j2").render(**context)
    return {SCRIPT_NAMES[opts.target]: script, "plan.json": json.dumps(plan.to_json_dict(), indent=2) + "\n"}
