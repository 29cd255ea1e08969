"""What a profiled step's timeline is read with, in pure Python (the trace tools use it without
torch): unions of time intervals (start, end), for GPU busy time and its overlaps; the CUDA calls
in which the host waits for the GPU; and the GPU events of torch's Chrome traces."""

from __future__ import annotations

Spans = list[tuple[float, float]]

# CUDA runtime calls in which the host waits for the GPU (a .item(), a bool of a GPU tensor, a
# synchronize): while in them the host queues nothing ahead
HOST_WAITS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
# the "cat" of the GPU's own work in torch's Chrome traces: kernels, copies and memsets
TRACE_GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def merged(spans: Spans) -> Spans:
    """The union of intervals, as sorted disjoint intervals."""
    out: Spans = []
    for start, end in sorted(spans):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def length(union: Spans) -> float:
    return sum(end - start for start, end in union)


def overlap(a: Spans, b: Spans) -> float:
    """The length of the intersection of two unions of intervals (each from `merged`)."""
    total, i, j = 0.0, 0, 0
    while i < len(a) and j < len(b):
        total += max(min(a[i][1], b[j][1]) - max(a[i][0], b[j][0]), 0.0)
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total
