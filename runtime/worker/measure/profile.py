"""Kernel profiles: one step under torch.profiler, its GPU time by kind and by collective."""

from __future__ import annotations

import gzip
import shutil
import tempfile
import time
from pathlib import Path

import torch

from megacpp.runtime.worker.measure.timeline import HOST_WAITS, length, merged, overlap

# Kernel names by kind, matched in order against the lower-cased CUDA kernel name.
KERNEL_KINDS = (
    ("communication", ("nccl",)),
    ("matmul", ("gemm", "cutlass", "cublas", "sm90_xmma", "nvjet", "matmul")),
    ("attention_softmax", ("softmax", "flash", "fmha", "attn")),
    ("copy", ("memcpy", "memset", "copy", "cat")),
)


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(k in lowered for k in keys)), "other")


def kernel_profile(run_step, trace: Path | None = None) -> dict:
    """Run one step under torch.profiler and summarise it (gpu_activity); with `trace`, also
    write the step's Chrome trace (host threads, CUDA runtime calls and kernels; open it in
    Perfetto) there, gzipped.

    GPU busy time well below the wall time means the step is bound by the host (Python, launches),
    not by the kernels: the cost model's compute term cannot explain it.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        run_step()
        wall = time.perf_counter() - start
    if trace is not None:
        write_trace(prof, trace)
    events = prof.events()
    waits = [e.time_range.elapsed_us() for e in events if e.name in HOST_WAITS]
    return gpu_activity(wall, gpu_work(events), waits)


def write_trace(prof, path: Path) -> None:
    """The profiled step's Chrome trace, gzipped (a step's trace is tens of MB of JSON)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(raw))
        with raw.open("rb") as src, gzip.open(path, "wb") as dst:
            shutil.copyfileobj(src, dst)


def gpu_work(events) -> list[tuple[str, float, float]]:
    """(name, start us, duration us) of the profiled kernels, copies and memsets. Left out: the
    user annotations torch also places on the GPU timeline (c10d's "nccl:all_to_all" over its
    ncclDevKernel_SendRecv, spanning the same time), which would count that time twice; torch's own
    device-time totals leave them out alike (profiler_util.py), and Megatron-LM's traces are read
    for kernel, copy and memset events only (megatron_lm_runs.trace_summary)."""
    return [(e.name, e.time_range.start, e.time_range.elapsed_us()) for e in events
            if e.device_type == torch.autograd.DeviceType.CUDA and e.device_time_total > 0 and not e.is_user_annotation]


MOST_LAUNCHED = 15  # kernel names a profile lists by launch count
MOST_LAUNCHED_NAME = 90  # characters of each name kept (templated kernel names run to thousands)


def gpu_activity(wall: float, gpu: list[tuple[str, float, float]], waits: list[float]) -> dict:
    """A profiled step: its wall time, GPU kernel seconds by kind over `gpu` (name, start us,
    duration us, kernels and copies alike), their count, the GPU's busy time (the union of their
    intervals over every stream), the host's waits on the GPU (`waits`, durations in us) and the
    most launched kernels (name, count, seconds), which say where a step's launches go.

    Per collective (all-reduce, reduce-scatter, ...): the seconds its kernels ran (their union)
    and the part of those in which no compute or copy kernel ran, which is the communication the
    step waited on rather than hid behind compute."""
    by_kind: dict[str, float] = {}
    by_name: dict[str, list[float]] = {}
    collectives: dict[str, list[tuple[float, float]]] = {}
    others: list[tuple[float, float]] = []
    for name, start, dur in gpu:
        kind = kernel_kind(name)
        by_kind[kind] = by_kind.get(kind, 0.0) + dur / 1e6
        count_seconds = by_name.setdefault(name[:MOST_LAUNCHED_NAME], [0, 0.0])
        count_seconds[0] += 1
        count_seconds[1] += dur / 1e6
        span = (start, start + dur)
        if kind == "communication":
            collectives.setdefault(collective(name), []).append(span)
        else:
            others.append(span)
    compute = sum(v for k, v in by_kind.items() if k != "communication")
    computing = merged(others)
    comm = {c: merged(spans) for c, spans in sorted(collectives.items())}
    every = merged([span for spans in collectives.values() for span in spans] + others)
    return {
        "wall_seconds": round(wall, 6),
        "kernels": len(gpu),
        "kernel_seconds": {k: round(v, 6) for k, v in sorted(by_kind.items())},
        "compute_kernel_seconds": round(compute, 6),
        "gpu_busy_seconds": round(length(every) / 1e6, 6),
        "communication_seconds": {c: round(length(m) / 1e6, 6) for c, m in comm.items()},
        "exposed_communication_seconds": {c: round((length(m) - overlap(m, computing)) / 1e6, 6) for c, m in comm.items()},
        "host_waits": len(waits),
        "host_wait_seconds": round(sum(waits) / 1e6, 6),
        "most_launched": [[name, int(n), round(sec, 6)] for name, (n, sec) in
                          sorted(by_name.items(), key=lambda kv: (-kv[1][0], kv[0]))[:MOST_LAUNCHED]],
    }


# NCCL kernel names (ncclDevKernel_ReduceScatter_Sum_f32_RING_LL, ncclKernel_SendRecv, ...) by
# collective, matched in order against the lower-cased name without underscores
COLLECTIVES = ("allreduce", "reducescatter", "allgather", "alltoall", "sendrecv", "broadcast", "reduce")


def collective(name: str) -> str:
    lowered = name.lower().replace("_", "")
    return next((c for c in COLLECTIVES if c in lowered), "other")
