"""Per-axis communication of one layout: what each parallel axis moves in one step, and its time.

Alpha-beta per collective, with nccl-tests bus-bandwidth factors [R1], on the link each group
uses under Megatron's tp-cp-ep-dp-pp rank order. The data-parallel collectives overlap the first
forward and the last backward; only their exposed share adds to the step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megacpp.planner.axes import Axis
from megacpp.planner.cost.blocks import BF16, FP32, micro_batch_tokens
from megacpp.planner.cost.coefficients import DEFAULT_EFFICIENCY, Efficiency
from megacpp.planner.cost.memory import StageMemory, rank_stages
from megacpp.planner.search.layout import Context, Layout
from megacpp.planner.search.stages import Stage


@dataclass(frozen=True)
class Comm:
    """One axis's collective over a step on the busiest rank; `exposed_seconds` of it adds to the step."""

    axis: Axis
    collective: str
    group_size: int
    bytes_per_step: float
    link: str
    seconds: float
    exposed_seconds: float

    def to_dict(self) -> dict[str, object]:
        return {
            "axis": self.axis,
            "collective": self.collective,
            "group_size": self.group_size,
            "bytes_per_step": int(self.bytes_per_step),
            "link": self.link,
            "seconds": round(self.seconds, 6),
            "exposed_seconds": round(self.exposed_seconds, 6),
        }


def _link(ctx: Context, span: int) -> str:
    """Groups whose ranks fit in one NVLink domain use NVLink, otherwise the NIC."""
    return "nvlink" if span <= ctx.cluster.nvlink_domain else "nic"


def _collective_seconds(ctx: Context, collective: str, link: str, n: int, size: float) -> float:
    """alpha + factor * S / busbw, with nccl-tests factors [R1]; NVLink rates per group size from
    Cluster.nvlink."""
    if n <= 1 or size <= 0:
        return 0.0
    c = ctx.cluster
    bw, alpha = c.nvlink(collective, n) if link == "nvlink" else (c.nic_busbw_gbps, c.nic_alpha_us)
    factor = {"all-reduce": 2 * (n - 1) / n, "send-recv": 1.0}.get(collective, (n - 1) / n)
    return alpha * 1e-6 + factor * size / (bw * 1e9)


def communication(
    ctx: Context, lay: Layout, stages: list[Stage], mem: list[StageMemory], eff: Efficiency = DEFAULT_EFFICIENCY,
    load: float = 1.0, window: tuple[float, float] = (math.inf, math.inf),
) -> list[Comm]:
    """Per-axis traffic of the busiest pipeline rank in one step; `window` is the (forward,
    backward) GPU seconds of one micro-batch there, which the data-parallel collectives overlap."""
    h = ctx.spec.model.hidden_size
    m = lay.num_microbatches
    tokens = micro_batch_tokens(ctx, lay)
    passes = 3 if ctx.spec.training.recompute == "full" else 2  # fwd, bwd (+ recompute fwd)
    busiest = max(range(lay.pp), key=lambda p: sum(len(s.blocks) for s in rank_stages(stages, p)))
    blocks = "".join(s.blocks for s in rank_stages(stages, busiest))
    out: list[Comm] = []

    def add(axis: Axis, collective: str, n: int, span: int, size: float, count: float, exposed: float = 1.0,
            hidden: float = math.inf) -> None:
        """`exposed` of the collective's time adds to the step, or all of it beyond `hidden` seconds."""
        if n <= 1 or count <= 0:
            return
        link = _link(ctx, span)
        sec = count * _collective_seconds(ctx, collective, link, n, size)
        out.append(Comm(axis, collective, n, size * count, link, sec, max(sec * exposed, sec - hidden)))

    act = BF16 * tokens * h  # one activation of a micro-batch on one rank
    tp_collective = "all-gather + reduce-scatter" if lay.sp else "all-reduce"
    if lay.tp > 1:
        # one collective in forward, one in backward per block [R36]; AG+RS moves what AR moves,
        # each at its own rate. Under SP the backward also gathers each block's input again for
        # its weight gradient: the forward kept only the rank's shard of it (megatron-core's
        # LinearWithGradAccumulationAndAsyncCommunication.backward, TE's Linear alike; profiled:
        # 3 all-gathers and 2 reduce-scatters per block per micro-batch, gpu_runs_h200x2_te_blind5.json)
        link = _link(ctx, lay.tp)
        n = len(blocks) * m * passes
        if lay.sp:
            gather = _collective_seconds(ctx, "all-gather", link, lay.tp, act)
            regathers = len(blocks) * m
            sec = n * (gather + _collective_seconds(ctx, "reduce-scatter", link, lay.tp, act)) + regathers * gather
            moved = act * (n + regathers / 2)  # an all-gather moves half of what an AG+RS pair does
        else:
            sec, moved = n * _collective_seconds(ctx, "all-reduce", link, lay.tp, act), act * n
        out.append(Comm(Axis.TP, tp_collective, lay.tp, moved, link, sec, sec))
    if lay.cp > 1:
        model = ctx.spec.model
        if "A" in blocks:
            kv = BF16 * tokens * 2 * model.query_groups * model.head_dim / min(lay.tp, model.query_groups)
            # ring exchange of K,V in forward and dK,dV in backward, (cp-1) hops each
            add(Axis.CP, "send-recv", lay.cp, lay.tp * lay.cp, kv, blocks.count("A") * m * 3 * (lay.cp - 1))
        if "M" in blocks:
            add(Axis.CP, "all-to-all", lay.cp, lay.tp * lay.cp, act / lay.tp * 2, blocks.count("M") * m * 2 * passes)
    if lay.ep * lay.etp > 1 and "E" in blocks:
        moe = ctx.spec.model.moe
        assert moe is not None
        routed = BF16 * moe.top_k * tokens / (lay.tp if lay.sp else 1) * h * load
        # dispatch + combine in forward and again in backward
        add(Axis.EP, "all-to-all", lay.ep * lay.etp, lay.ep * lay.etp, routed, blocks.count("E") * m * 2 * passes)
        if lay.etp > 1:
            # expert TP gathers the routed tokens before the experts and reduce-scatters after
            add(Axis.ETP, "all-gather", lay.etp, lay.etp, routed * lay.etp, blocks.count("E") * m * passes)
            add(Axis.ETP, "reduce-scatter", lay.etp, lay.etp, routed * lay.etp, blocks.count("E") * m * passes)
    if lay.pp > 1:
        add(Axis.PP, "send-recv", 2, ctx.world, act / (lay.tp if lay.sp else 1), 2 * m * lay.vpp)
    big = mem[busiest]
    dense, expert = big.params - big.params_expert, big.params_expert
    dp_span = lay.tp * lay.cp * lay.dp
    forward, backward = window
    for axis, n, params in ((Axis.DP, lay.dp * lay.cp, dense), (Axis.EDP, lay.edp, expert)):
        if n > 1 and params:
            if ctx.spec.training.distributed_optimizer:
                add(axis, "reduce-scatter", n, dp_span, FP32 * params, 1, eff.grad_reduce_exposed, backward)
                add(axis, "all-gather", n, dp_span, BF16 * params, 1, eff.param_gather_exposed, forward)
            else:
                add(axis, "all-reduce", n, dp_span, FP32 * params, 1, eff.grad_reduce_exposed, backward)
    return out
