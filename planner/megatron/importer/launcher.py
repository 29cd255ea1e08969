"""The launcher around an imported Megatron-LM command: the world it runs on (torchrun, srun and
#SBATCH options) and the spec's launch keys (environment, Slurm settings, extra flags)."""

from __future__ import annotations

import re
from typing import Any

from megacpp.planner.errors import SpecError
from megacpp.planner.megatron.importer.script import LaunchCommand
from megacpp.planner.spec.clusters import PRESETS
from megacpp.planner.spec.job import ENV_NAME, SLURM_VALUE

# Options of torchrun (and python -m torch.distributed.run), srun and #SBATCH, long and short.
NODES = ("--nnodes", "--nodes", "-N")
PROCS = ("--nproc-per-node", "--nproc_per_node", "--ntasks-per-node")
SBATCH_KEYS = {"--partition": "partition", "-p": "partition", "--account": "account", "-A": "account",
               "--time": "time", "-t": "time", "--qos": "qos", "-q": "qos", "--reservation": "reservation",
               "--constraint": "constraint", "-C": "constraint", "--nodelist": "nodelist", "-w": "nodelist",
               "--exclude": "exclude", "-x": "exclude"}
# what megacpp's own Slurm script sets, or what describes the world already read
SBATCH_OWN = {"--job-name", "-J", "--nodes", "-N", "--ntasks-per-node", "--gpus-per-node", "--gres", "--exclusive",
              "--output", "-o", "--error", "-e", "--requeue", "--cpus-per-task", "-c", "--gpus", "-G", "--ntasks", "-n"}
CONTAINER = {"--container-image": "container_image", "--container-mounts": "container_mounts",
             "--container-workdir": "container_workdir"}
# The environment megacpp's scripts export themselves (args.environment, render.py), per value
OWN_ENV = {("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True"), ("NCCL_NVLS_ENABLE", "0"),
           ("CUDA_DEVICE_MAX_CONNECTIONS", "1"), ("NVTE_CPU_OFFLOAD_V1", "1"), ("NCCL_IB_HCA", "rocep1s0f0,roceP2p1s0f0"),
           ("NCCL_GRAPH_REGISTER", "0")}
# the program srun starts, which ends its options
PROGRAM = re.compile(r"torchrun|python[0-9.]*|bash|sh|env|numactl|nsys|apptainer|singularity|docker")
# Variables of the script's own plumbing, which megacpp's script sets its own way
PLUMBING = {"PYTHONPATH", "PATH", "LD_LIBRARY_PATH", "MEGATRON_LM", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT",
            "WORLD_SIZE", "GPUS_PER_NODE", "NPROC_PER_NODE", "MEGACPP_LOAD", "NO_APEX_FUSION"}


def options(words: list[str]) -> list[tuple[str, str | None]]:
    """(option, value) pairs of `--opt=value`, `--opt value` and `-o value` words; a value is
    the next word when it does not start with '-'."""
    out: list[tuple[str, str | None]] = []
    i = 0
    while i < len(words):
        word = words[i]
        if word.startswith("--") and "=" in word:
            key, _, value = word.partition("=")
            out.append((key, value))
        elif word.startswith("-") and i + 1 < len(words) and not words[i + 1].startswith("-"):
            out.append((word, words[i + 1]))
            i += 1
        elif word.startswith("-"):
            out.append((word, None))
        i += 1
    return out


def _count(value: str | None) -> int | None:
    if value is None:
        return None
    value = value.removeprefix("gpu:")
    return int(value) if re.fullmatch(r"\d{1,6}", value) and int(value) > 0 else None


def cluster_keys(cmd: LaunchCommand, preset: str | None, nodes: int | None, notes: list[str]) -> dict[str, Any]:
    """The spec's cluster: `preset` (or an inline cluster of the script's shape), with the nodes
    and GPUs per node of torchrun, srun or #SBATCH, `nodes` over them."""
    launcher = options(cmd.launcher)
    sbatch = options(cmd.sbatch)
    found_nodes = next((n for k, v in launcher if k in NODES and (n := _count(v))), None) or next(
        (n for k, v in sbatch if k in ("--nodes", "-N") and (n := _count(v))), None)
    # torchrun's processes per node first; one task per node is srun starting torchrun, not the GPU count
    gpus = next((n for k, v in launcher if k in PROCS[:2] and (n := _count(v))), None) or next(
        (n for k, v in [*launcher, *sbatch] if k in ("--ntasks-per-node", "--gpus-per-node", "--gres")
         and (n := _count(v)) and n > 1), None)
    cluster: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise SpecError(f"--cluster {preset!r}: not a preset; choose one of {', '.join(PRESETS)}")
        cluster["preset"] = preset
        if gpus is not None and gpus != PRESETS[preset]["gpus_per_node"]:
            cluster["gpus_per_node"] = gpus
    elif gpus is None:
        raise SpecError("the script does not say its GPUs per node (torchrun --nproc-per-node or #SBATCH "
                        "--gpus-per-node); pass --cluster PRESET (see `megacpp clusters`)")
    else:
        cluster["gpus_per_node"] = gpus
        notes.append("the script does not name its GPU: pass --cluster PRESET (see `megacpp clusters`), or set "
                     "cluster.gpu_memory_gib and cluster.bf16_tflops, before validate, plan or explain layout")
    cluster["nodes"] = nodes or found_nodes or 1
    if nodes is None and found_nodes is None:
        notes.append("the script does not say its node count: 1 node (pass --nodes N)")
    return cluster


def launch_keys(cmd: LaunchCommand, extra: list[str], notes: list[str], unsupported: list[str]) -> dict[str, Any]:
    """launch.extra_args, launch.env and launch.slurm, each only where the script sets it."""
    launch: dict[str, Any] = {}
    if extra:
        launch["extra_args"] = extra
    env = {}
    for name, value in cmd.env.items():
        if (name, value) in OWN_ENV:
            continue
        if name in PLUMBING or not ENV_NAME.fullmatch(name):
            if "MEGATRON_LM" not in value:  # megacpp's own scripts export the checkout they are given
                notes.append(f"export {name}: the script's own plumbing; megacpp's script sets its own")
        elif "$" in value or "`" in value:
            unsupported.append(f"export {name}={value[:60]}: refers to what the script does not assign")
        else:
            env[name] = value
    if env:
        launch["env"] = env
    slurm: dict[str, Any] = {}
    for key, value in options(cmd.sbatch):
        if key in SBATCH_KEYS and value is not None:
            field = SBATCH_KEYS[key]
            if SLURM_VALUE[field].fullmatch(value):
                slurm[field] = value
            else:
                unsupported.append(f"#SBATCH {key}={value[:60]}: not a value launch.slurm.{field} takes")
        elif key not in SBATCH_OWN:
            unsupported.append(f"#SBATCH {key}{'=' + value if value else ''}: launch.slurm has no key for it")
    if "srun" in cmd.launcher:
        srun = cmd.launcher[cmd.launcher.index("srun") + 1 :]
        program = next((i for i, w in enumerate(srun) if PROGRAM.fullmatch(w.rsplit("/", 1)[-1])), len(srun))
        for key, value in options(srun[:program]):
            if key in CONTAINER and value:
                slurm[CONTAINER[key]] = value.split(",") if key == "--container-mounts" else value
            elif key not in ("--kill-on-bad-exit", *NODES, *PROCS):
                unsupported.append(f"srun {key}{'=' + value if value else ''}: launch.slurm has no key for it")
    if slurm:
        launch["slurm"] = slurm
    return launch
