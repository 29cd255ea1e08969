"""Host time of a step: the per-block overhead in units of the reference hosts' time, what CUDA
graphs capture of it, the cluster's host class, and what of it the GPU's work does not hide.
"""

from __future__ import annotations

from collections import Counter

from megacpp.planner.cost.coefficients import (
    CP_STEP,
    EXPERT,
    MOE_ROUTER_HOST_SHARE,
    REFERENCE_HOST_LAUNCH_US,
)
from megacpp.planner.search.layout import Context, Layout


def gpu_repeats(recompute: str) -> float:
    """A block's forward + backward GPU work under a recompute mode, in units of it without
    recompute: full recompute runs every forward again (forward 1, backward 2, so 4/3)."""
    return 4 / 3 if recompute == "full" else 1.0


def host_repeats(recompute: str, te: bool) -> float:
    """The per-block overhead of one micro-batch under a recompute mode, in units of its overhead
    without recompute. Full recompute runs every forward again: 4/3 for the local modules, whose
    overheads hold their small kernels' GPU time too. Under TE, where the overhead is host time, it
    is not repeated: the first forward runs without autograd, which records nothing for the
    backward, and a step under full recompute measured no more host time than one without."""
    return 1.0 if te else gpu_repeats(recompute)


def host_scale(ctx: Context) -> float:
    """The cluster's host time per unit of the reference hosts' (Cluster.host_launch_us over
    REFERENCE_HOST_LAUNCH_US) under Transformer Engine, where the per-block overheads are host time:
    a host that issues a CUDA op in less time issues a block's kernels in less. The local modules'
    overheads also hold their small kernels' GPU time and stay as measured."""
    return ctx.cluster.host_launch_us / REFERENCE_HOST_LAUNCH_US if ctx.te else 1.0


def graph_captured(ctx: Context) -> dict[str, float]:
    """The share of each host-time key (block letter, EXPERT, CP_STEP) that CUDA graphs capture
    (training.cuda_graphs): a captured module replays its kernels from one graph launch, without
    the host's per-kernel work. Megatron's modules (megatron/core/transformer/enums.py
    CudaGraphScope): "attn" the attention (with its ring steps under CP), "mlp" a dense MLP,
    "mamba" a Mamba mixer, "moe" a whole MoE layer with its experts (drop-and-pad only),
    "moe_router" (with "moe_preprocess") the router and the dispatcher's preprocess, a share of an
    E block's own host time (MOE_ROUTER_HOST_SHARE); "layers" every transformer layer whole and
    "full_iteration" the whole forward-backward. The runtime's R block is Megatron's only through
    megacpp's adapters and is captured with the whole iteration only."""
    graphs = ctx.spec.training.cuda_graphs
    if graphs == "none":
        return {}
    whole = {"A": 1.0, CP_STEP: 1.0, "D": 1.0, "M": 1.0, "E": 1.0, EXPERT: 1.0}
    if graphs == "full_iteration":
        return {**whole, "R": 1.0}
    if graphs == "layers":
        return whole
    modules = set(graphs)
    captured: dict[str, float] = {}
    if "attn" in modules:
        captured.update({"A": 1.0, CP_STEP: 1.0})
    if "mlp" in modules:
        captured["D"] = 1.0
    if "mamba" in modules:
        captured["M"] = 1.0
    if "moe" in modules:
        captured.update({"E": 1.0, EXPERT: 1.0})
    elif "moe_router" in modules:
        captured["E"] = MOE_ROUTER_HOST_SHARE
    return captured


def host_units(ctx: Context, lay: Layout, blocks: str) -> Counter[str]:
    """What one micro-batch's host time is counted in on a rank, in units of the reference hosts'
    time per block: its blocks per letter and, under Transformer Engine, the local experts of its E
    blocks (EXPERT) and, under context parallelism, each A block's ring steps beyond the first
    (CP_STEP), each at its overhead (Efficiency.overhead); less what CUDA graphs capture
    (graph_captured), at the cluster's host class (host_scale)."""
    counts = Counter(blocks)
    if ctx.te and counts["E"]:
        counts[EXPERT] = counts["E"] * ctx.spec.model.moe.num_experts // lay.ep  # type: ignore[union-attr]
    if ctx.te and counts["A"] and lay.cp > 1:
        counts[CP_STEP] = counts["A"] * (lay.cp - 1)
    captured, scale = graph_captured(ctx), host_scale(ctx)
    if not captured and scale == 1.0:
        return counts
    return Counter({key: n * (1.0 - captured.get(key, 0.0)) * scale for key, n in counts.items()})  # type: ignore[misc]


def exposed_host_seconds(gpu: float, host: float, te: bool, synced: float = 0.0) -> float:
    """The part of a micro-batch's per-block overhead (`host`) that adds to its GPU time (`gpu`).

    With Transformer Engine the small kernels' GPU time is a term of its own, so what the overhead
    holds is host time (Python, launches, the dispatcher's synchronisation), and the host queues
    kernels ahead of the GPU: a micro-batch takes the longer of the two, and only the host's excess
    shows. Where the host waits for the GPU inside the micro-batch (`synced`:
    Efficiency.te_sync_exposed for ranks with E blocks whose host work is not all captured by CUDA
    graphs: the routed-token counts' copy to the host in every MoE layer's forward) that share of
    the shorter of the two shows as well: after each wait the GPU idles until the host has issued
    the layer's next work, so the host cannot run ahead across the MoE layers' forwards. The local
    modules' overheads also hold their small kernels' GPU time (their traffic is 0), so there the
    whole overhead adds."""
    return max(host - gpu, 0.0) + synced * min(host, gpu) if te else host
