"""How fast this host issues GPU work, measured before the first step."""

from __future__ import annotations

import platform
import statistics
import time

import torch


def host_probe(device: torch.device, ops: int = 1000, rounds: int = 7) -> dict:
    """How fast this host issues GPU work: its CPU's model name and the median host time per tiny
    CUDA op (an in-place add on one element, queued without waiting for it), over `rounds` rounds
    of `ops` ops. Every rank probes at once, sharing the host as in training. A step whose time is
    mostly per-block overhead (the per-block host time of planner/cost/step.py) moves with this number."""
    x = torch.zeros(1, device=device)
    per_op = []
    for _ in range(rounds):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(ops):
            x.add_(1)
        per_op.append((time.perf_counter() - start) / ops)
    torch.cuda.synchronize()
    return {"cpu": cpu_model(), "launch_us": round(statistics.median(per_op) * 1e6, 3)}


def cpu_model() -> str:
    """The first "model name" of /proc/cpuinfo, or platform.processor() where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), platform.processor())
    except OSError:
        return platform.processor()
