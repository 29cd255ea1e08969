"""Shared helpers: tiny specs and the path to the megatron-core probe."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from megacpp.planner.spec.loading import spec_from_dict
from megacpp.planner.spec.models import Spec

ROOT = Path(__file__).resolve().parent.parent
# one folder per measurement campaign, each with specs/, results/ and a NOTE.md; the run reports'
# file names are unique across campaigns, and tests and code comments cite them by name
EVIDENCE = ROOT / "benchmarks" / "evidence"


# stacks so small (hidden 512, 512 tokens) that the GPU idles: they measure host time, and their
# kernels are launch-sized, below what the kernel tables and the bandwidth terms describe
HOST_PROBES = ("gpu_runs_h100x1_te_host.json", "gpu_runs_h100x1_te_host2.json", "gpu_runs_h100x1_te_host3.json")


def evidence_file(name: str) -> Path:
    """A committed result file, by its file name, in whichever campaign holds it."""
    found = list(EVIDENCE.glob(f"*/results/{name}"))
    if len(found) != 1:
        raise FileNotFoundError(f"{len(found)} result files named {name} under {EVIDENCE}")
    return found[0]


def evidence_spec(name: str) -> Path:
    """A committed evidence spec, by its name (the file name without .yaml)."""
    return next(EVIDENCE.glob(f"*/specs/{name}.yaml"))


def committed_gpu_runs(host_probes: bool = True):
    """(file name, run) for every run in the committed benchmarks/evidence/*/results/gpu_runs_*.json,
    in file-name order; without the HOST_PROBES where `host_probes` is False (checks of GPU kernel time)."""
    for path in sorted(EVIDENCE.glob("*/results/gpu_runs_*.json"), key=lambda p: p.name):
        if host_probes or path.name not in HOST_PROBES:
            for run in json.loads(path.read_text())["runs"]:
                yield path.name, run


PROBE = ROOT / "tests" / "parity" / "megatron_probe.py"

TINY_DENSE: dict[str, Any] = {
    "name": "tiny-dense",
    "model": {
        "pattern": "(AD)*4",
        "hidden_size": 64,
        "vocab_size": 250,
        "attention": {"num_heads": 4, "num_query_groups": 2, "head_dim": 16},
        "mlp": {"ffn_hidden_size": 128, "gated": True},
    },
    "training": {"seq_length": 64, "global_batch_size": 16, "micro_batch_size": 1},
    "cluster": {"preset": "h200-sxm-8", "nodes": 1},
    "backend": {"transformer_engine": False, "megatron": "core_v0.16"},
}

TINY_MOE: dict[str, Any] = {
    "name": "tiny-moe",
    "model": {
        "pattern": "(AE)*4",
        "hidden_size": 64,
        "vocab_size": 250,
        "attention": {"num_heads": 4, "num_query_groups": 4, "head_dim": 16},
        "moe": {"num_experts": 8, "top_k": 2, "ffn_hidden_size": 64, "gated": True},
    },
    "training": {"seq_length": 64, "global_batch_size": 16, "micro_batch_size": 1},
    "cluster": {"preset": "h200-sxm-8", "nodes": 1},
    "backend": {"transformer_engine": False, "megatron": "core_v0.16"},
}


def make_spec(base: dict[str, Any], **changes: Any) -> Spec:
    """A copy of `base` with dotted-key changes, e.g. make_spec(TINY_DENSE, **{"model.hidden_size": 32})."""
    data = copy.deepcopy(base)
    for dotted, value in changes.items():
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return spec_from_dict(data)


@pytest.fixture
def dense_spec() -> Spec:
    return make_spec(TINY_DENSE)
