"""Per-axis communication of one layout: what each parallel axis moves in one step, and its time.

Alpha-beta per collective, with nccl-tests bus-bandwidth factors [R1], on the links each group
uses. Where a group sits follows Megatron's rank order (tp-cp-ep-dp-pp for the dense grid,
etp-ep-edp-pp for the experts'): a group of n ranks `stride` apart has g = min(n, domain / stride)
of them in each NVLink domain (8 GPUs on HGX, 72 on NVL72) and spans k = n / g domains
(`placement`). Inside one domain a collective runs at the preset's NVLink bus bandwidth; across
domains each GPU moves its NVLink share and its NIC share at once, and the slower decides.

What hides behind compute, as Megatron schedules it (`window`: the busiest rank's forward and
backward GPU seconds of one micro-batch):
- DP/EDP: the gradients reduce bucket by bucket during the last micro-batch's backward, and with
  the distributed optimizer the parameters gather during the first one's forward; the measured
  share of each shows, or all of it beyond that window. Under Megatron-FSDP every micro-batch
  gathers each layer's weights twice and reduce-scatters its gradients, under that micro-batch's compute;
- TP under `training.tp_comm_overlap` (Transformer Engine's userbuffers): each all-gather and
  reduce-scatter is cut into TP chunks pipelined with the GEMM beside it;
- EP under `model.moe.overlap_communication` (Megatron's combined 1F1B): one micro-batch's
  all-to-alls run beside the compute of another micro-batch's layers, each only as long as the
  piece beside it (combined_1f1b_seconds), except in the steps that have no partner;
- CP: TE's ring hides each K/V hop behind the attention of the chunk already received
  (ring_exposed);
- PP send/recv stays on the step (see communication()).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache

from megacpp.planner.axes import Axis
from megacpp.planner.cost.blocks import BF16, FP32, expert_load, expert_width
from megacpp.planner.cost.coefficients import DEFAULT_EFFICIENCY, FLEX_LINK_SHARE, Efficiency
from megacpp.planner.cost.flops import micro_batch_tokens
from megacpp.planner.cost.latent import rank_blocks
from megacpp.planner.cost.memory import StageMemory
from megacpp.planner.cost.ranks import rank_stages, ranks, recomputed_blocks
from megacpp.planner.cost.shard import memo, shape
from megacpp.planner.search.layout import Context, Layout
from megacpp.planner.search.stages import Stage
from megacpp.planner.spec.models import MoESpec


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


@dataclass(frozen=True)
class Placement:
    """A process group as it lies on the machine: `size` ranks, `per_domain` of them in each
    NVLink domain, over `domains` domains."""

    size: int
    per_domain: int
    domains: int

    @property
    def link(self) -> str:
        """The link that decides: NVLink inside one domain, the NIC across domains."""
        return "nvlink" if self.domains == 1 else "nic"


def placement(ctx: Context, size: int, stride: int) -> Placement:
    """Where a group of `size` ranks, `stride` apart in Megatron's rank order, lies: consecutive
    strides fill an NVLink domain of the preset before the next one starts."""
    per = max(1, min(size, ctx.cluster.nvlink_domain // stride))
    return Placement(size, per, -(-size // per))


def _collective_seconds(ctx: Context, collective: str, link: str, n: int, size: float) -> float:
    """alpha + factor * S / busbw on one link, with nccl-tests factors [R1]; NVLink rates per
    group size from Cluster.nvlink."""
    if n <= 1 or size <= 0:
        return 0.0
    c = ctx.cluster
    bw, alpha = c.nvlink(collective, n) if link == "nvlink" else (c.nic_busbw_gbps, c.nic_alpha_us)
    factor = {"all-reduce": 2 * (n - 1) / n, "send-recv": 1.0}.get(collective, (n - 1) / n)
    return alpha * 1e-6 + factor * size / (bw * 1e9)


def _split_seconds(ctx: Context, group: Placement, collective: str, nvlink_bytes: float, nic_bytes: float,
                   share: tuple[float, float] = (1.0, 1.0)) -> float:
    """One call that moves `nvlink_bytes` per GPU inside its domain and `nic_bytes` across the
    NICs at the same time: the slower link decides. `share` scales each link's rate (the flex
    dispatcher's, FLEX_LINK_SHARE)."""
    c = ctx.cluster
    nvlink = 0.0
    if nvlink_bytes > 0 and group.per_domain > 1:
        bw, _ = c.nvlink(collective, group.per_domain)
        nvlink = nvlink_bytes / (bw * share[0] * 1e9)
    nic = nic_bytes / (c.nic_busbw_gbps * share[1] * 1e9)
    return c.nic_alpha_us * 1e-6 + max(nvlink, nic)


def group_seconds(ctx: Context, collective: str, group: Placement, size: float) -> float:
    """One collective of `size` bytes per rank over a placed group (one pair for send-recv).

    Across domains a ring collective crosses each domain boundary once per NCCL channel, one
    channel per NIC of the group's GPUs there (one NIC per GPU on every preset [R5][R6]): each
    GPU's NIC carries 1/g of the ring's traffic while its NVLink carries the rest. With g = 8 that
    is 8 x 47 = 376 GB/s of bus bandwidth, the 377 GB/s measured on 4 x 8 B200 [R2]. An all-to-all
    sends (k-1)/k of its buffer across the NICs, which it cannot pool (one NIC per GPU [R45]), and
    (g-1)/n over NVLink; a send-recv across domains is one NIC to one NIC."""
    n = group.size
    if n <= 1 or size <= 0:
        return 0.0
    if group.domains == 1:
        return _collective_seconds(ctx, collective, "nvlink", n, size)
    g, k = group.per_domain, group.domains
    if collective == "send-recv":
        return _collective_seconds(ctx, collective, "nic", 2, size)
    if collective == "all-to-all":
        return _split_seconds(ctx, group, collective, (g - 1) / n * size, (k - 1) / k * size)
    factor = 2 * (n - 1) / n if collective == "all-reduce" else (n - 1) / n
    return _split_seconds(ctx, group, collective, factor * size * (g - 1) / g, factor * size / g)


@cache
def _untouched(experts: int, top_k: int, parts: int) -> float:
    """Probability that a token's top_k experts, drawn without repeats from `experts` spread
    evenly over `parts` parts, all miss one given part."""
    return math.comb(experts - experts // parts, top_k) / math.comb(experts, top_k)


@cache
def _untouched_grouped(experts: int, top_k: int, parts: int, groups: int, chosen: int) -> float:
    """_untouched under group-limited routing: Megatron picks a token's `chosen` of `groups` equal
    expert groups by their best experts' scores, then its top_k within them
    (moe_utils.group_limited_topk), so each chosen group gets about top_k / chosen of them. Where a
    part holds whole groups or lies inside one (node- and device-limited routing); other splits,
    and a limit that leaves every group open, as without it."""
    if chosen >= groups or (groups % parts and parts % groups):
        return _untouched(experts, top_k, parts)
    if parts % groups == 0:  # inside one group: missed unless that group is chosen and hits the part
        size, each = experts // groups, max(1, top_k // chosen)
        hit = chosen / groups
        return 1 - hit + hit * math.comb(size - experts // parts, each) / math.comb(size, each)
    mine = groups // parts  # whole groups: missed when none of them is chosen
    return math.comb(groups - mine, chosen) / math.comb(groups, chosen)


def expert_sends(moe: MoESpec, group: Placement) -> tuple[float, float, float]:
    """Copies of one token an expert-parallel rank dispatches: (sent, over NVLink, across the NIC).

    The alltoall dispatcher sends one copy per chosen expert, spread evenly over the group's
    ranks (Megatron's MoEAlltoAllTokenDispatcher permutes by expert, then all-to-alls). The flex
    dispatcher (DeepEP, HybridEP) sends a token once to each rank that holds one of its experts,
    and across domains once to each domain, where NVLink forwards it (DeepEP's internode normal
    kernels, RDMA then NVLink [R20][R21]; HybridEP alike, without redundant traffic [R24]), so
    group-limited routing, which keeps a token's experts within a few groups, sends fewer."""
    n, g, k = group.size, group.per_domain, group.domains
    e, top = moe.num_experts, moe.top_k
    if moe.dispatcher != "flex":
        return top, top * (g - 1) / n, top * (k - 1) / k
    limit = (moe.router_num_groups, moe.router_group_topk) if moe.router_group_topk else (1, 1)
    ranks = n * (1 - _untouched_grouped(e, top, n, *limit))
    domains = (k - 1) * (1 - _untouched_grouped(e, top, k, *limit)) if k > 1 else 0.0
    return ranks, ranks * (g - 1) / n, domains


def overlapped(seconds: float, unpaired: float, hidden: float) -> float:
    """What shows of `seconds` of communication scheduled under `hidden` seconds of compute,
    when an `unpaired` share of it has no compute beside it."""
    return unpaired * seconds + max((1 - unpaired) * seconds - hidden, 0.0)


def combined_1f1b_seconds(layers: list[tuple[float, float, float]]) -> float:
    """Seconds of one forward micro-batch paired with one backward micro-batch over a rank's
    `layers`, each (attention, MLP, one all-to-all): the attention's and the MLP's forward GPU
    seconds (the backward takes as long for the input gradient and again for the weights') and one
    dispatch or combine (0 for a layer without experts). Megatron's combined 1F1B
    (model_chunk_schedule_plan.py TransformerLayerSchedulePlan.run) pairs forward layer i with
    backward layer L-1-i on two streams, each waiting on what it consumes:
        comm: combine_bwd | dispatch_fwd -> dispatch_bwd         | combine_fwd
        comp: attn_fwd    | mlp_bwd -> mlp_bwd_dw -> mlp_fwd     | attn_bwd -> attn_bwd_dw
    so an all-to-all shows where the compute beside it is shorter, however much compute the whole
    step has."""
    comp = comm = f_ready = b_ready = 0.0  # when each stream is free; each chain's input is ready

    def send(after: float, seconds: float) -> float:
        """An all-to-all on the comm stream once `after`; a layer without experts sends nothing."""
        nonlocal comm
        if not seconds:
            return after
        comm = max(comm, after) + seconds
        return comm

    n = len(layers)
    for i in range(n):
        fa, fm, fc = layers[i]
        ba, bm, bc = layers[n - 1 - i]
        combined_bwd = send(b_ready, bc)
        comp = max(comp, f_ready) + fa
        dispatched_fwd = send(comp, fc)
        comp = max(comp, combined_bwd) + bm
        dispatched_bwd = send(comp, bc)
        comp = max(comp + bm, dispatched_fwd) + fm  # after the MLP's weight gradients
        f_ready = send(comp, fc)
        b_ready = comp = max(comp, dispatched_bwd) + ba
        comp += ba  # the attention's weight gradients
    return max(comp, comm)


def ep_overlap_layers(blocks: str, seconds: Mapping[str, float], one: float) -> list[tuple[float, float, float]]:
    """combined_1f1b_seconds' layers of a rank's `blocks`, a plain AD/AE stack (the overlap runs
    on no other, models.ModelSpec): each pair is one layer, its attention and its MLP, each
    forward a third of the block's GPU seconds per micro-batch in `seconds`."""
    return [(seconds[blocks[i]] / 3, seconds[blocks[i + 1]] / 3, one if blocks[i + 1] == "E" else 0.0)
            for i in range(0, len(blocks) - 1, 2)]


def ep_overlap_unpaired(lay: Layout) -> float:
    """Share of the expert all-to-alls without a partner micro-batch under Megatron's combined
    1F1B: without a pipeline the first forward and the last backward; with the interleaved
    schedule rank 0's warmup forwards and cooldown backwards, 2(pp-1) + (vpp-1)pp + 1 of its
    m*vpp chunk steps (schedules.py get_pp_rank_microbatches: one extra warmup step with the overlap)."""
    warmup = 1 if lay.pp == 1 else 2 * (lay.pp - 1) + (lay.vpp - 1) * lay.pp + 1
    return min(1.0, warmup / (lay.num_microbatches * lay.vpp))


def pp_overlap_unpaired(lay: Layout) -> float:
    """Share of a rank's pipeline transfers that no compute hides: all of them under 1F1B, which
    blocks on each; under the interleaved schedule the pp - 1 hops of the fill and of the drain,
    which the next stage waits on, of the 2 m vpp the rank sends."""
    return 1.0 if lay.vpp == 1 else min(1.0, (lay.pp - 1) / (lay.num_microbatches * lay.vpp))


def pipeline_p2p_exposed(lay: Layout, hop: float, forward: float, backward: float) -> float:
    """What shows of one rank's 2 m vpp pipeline transfers in a step, each `hop` seconds, with
    `forward` and `backward` the rank's GPU seconds of one micro-batch: all of them under 1F1B;
    under the interleaved schedule each runs beside the next chunk's pass (1/vpp of the
    micro-batch's), but the unpaired ones (pp_overlap_unpaired)."""
    m, vpp, unpaired = lay.num_microbatches, lay.vpp, pp_overlap_unpaired(lay)
    beside = max(hop - forward / vpp, 0.0) + max(hop - backward / vpp, 0.0)
    return unpaired * 2 * m * vpp * hop + (1 - unpaired) * m * vpp * beside


def ring_exposed(hop: float, cp: int, attention: float) -> float:
    """What shows of one A block's K/V ring per micro-batch under TE's context parallelism (its
    p2p ring, Megatron's default --cp-comm-type): each of the cp - 1 hops of K,V (forward) and of
    K,V with dK,dV (backward, two hops' bytes) runs beside the attention of the chunk already
    received, 1/cp of the block's forward (a third of `attention`) or backward (two thirds)."""
    return (cp - 1) * (max(hop - attention / 3 / cp, 0.0) + max(2 * hop - 2 * attention / 3 / cp, 0.0))


def communication(
    ctx: Context, lay: Layout, stages: list[Stage], mem: list[StageMemory], eff: Efficiency = DEFAULT_EFFICIENCY,
    load: float = 1.0, window: tuple[float, float] = (math.inf, math.inf), ring: float = 0.0, *, rank: int,
    block_seconds: Callable[[], Mapping[str, float]],
) -> list[Comm]:
    """Per-axis traffic of one pipeline rank in one step; `window` is the (forward,
    backward) GPU seconds of one micro-batch there, under which collectives overlap, and `ring` one
    A block's core attention seconds per micro-batch there (step.ring_attention_seconds), under
    which the context-parallel ring overlaps; `rank` the pipeline rank the step prices
    (step.busiest_rank), whose compute that window is; `block_seconds` gives each block letter's
    GPU seconds per micro-batch there, which the expert all-to-alls overlap layer by layer under
    Megatron's combined 1F1B (combined_1f1b_seconds), priced only where the spec overlaps them."""
    spec = ctx.spec
    h = spec.model.hidden_size
    m = lay.num_microbatches
    tokens = micro_batch_tokens(ctx, lay)
    mine = rank_stages(stages, rank)
    blocks = rank_blocks(ctx, "".join(s.blocks for s in mine), any(s.mtp for s in mine))
    again = recomputed_blocks(ctx, mine)

    def passes(letters: str | None = None) -> int:
        """Forward and backward passes of a micro-batch over the rank's blocks of `letters` (all: None),
        with the forwards full recompute runs again."""
        def count(b: str) -> int:
            return len(b) if letters is None else sum(b.count(x) for x in letters)

        return 2 * count(blocks) + count(again)
    forward, backward = window
    compute = m * (forward + backward)  # the step's GPU work on the rank, outside the pipeline bubble
    out: list[Comm] = []

    def add(axis: Axis, collective: str, group: Placement, size: float, count: float, exposed: float = 1.0,
            hidden: float = math.inf) -> None:
        """`exposed` of the collective's time adds to the step, or all of it beyond `hidden` seconds."""
        if group.size <= 1 or count <= 0:
            return
        sec = count * group_seconds(ctx, collective, group, size)
        out.append(Comm(axis, collective, group.size, size * count, group.link, sec, max(sec * exposed, sec - hidden)))

    act = BF16 * tokens * h  # one activation of a micro-batch on one rank
    if lay.tp > 1:
        # one collective in forward, one in backward per block [R36]; AG+RS moves what AR moves,
        # each at its own rate. Under SP the backward also gathers each block's input again for
        # its weight gradient: the forward kept only the rank's shard of it (megatron-core's
        # LinearWithGradAccumulationAndAsyncCommunication.backward, TE's Linear alike; profiled:
        # 3 all-gathers and 2 reduce-scatters per block per micro-batch, gpu_runs_h200x2_te_blind5.json)
        tp = placement(ctx, lay.tp, 1)
        n = m * passes()
        if lay.sp:
            gather = group_seconds(ctx, "all-gather", tp, act)
            regathers = len(blocks) * m
            sec = n * (gather + group_seconds(ctx, "reduce-scatter", tp, act)) + regathers * gather
            moved = act * (n + regathers / 2)  # an all-gather moves half of what an AG+RS pair does
        else:
            sec, moved = n * group_seconds(ctx, "all-reduce", tp, act), act * n
        shown = sec
        if spec.training.tp_comm_overlap and lay.sp and ctx.te:
            # userbuffers pipeline each exchange in TP chunks beside its GEMM: the last chunk of
            # each reduce-scatter (half of a pair's traffic) has no GEMM left to hide behind
            shown = overlapped(sec, 1 / (2 * lay.tp), compute)
        out.append(Comm(Axis.TP, "all-gather + reduce-scatter" if lay.sp else "all-reduce", lay.tp, moved, tp.link,
                        sec, shown))
    if lay.cp > 1:
        model = spec.model
        cp = placement(ctx, lay.cp, lay.tp)
        if "A" in blocks:
            kv = BF16 * tokens * 2 * model.query_groups * model.head_dim / min(lay.tp, model.query_groups)
            # ring exchange of K,V in forward and dK,dV in backward, (cp-1) hops each; the ring
            # is as slow as its slowest hop, and hides behind the attention where TE overlaps it
            count = blocks.count("A") * m
            hop = group_seconds(ctx, "send-recv", cp, kv)
            shown = count * ring_exposed(hop, lay.cp, ring) if ring else count * 3 * (lay.cp - 1) * hop
            out.append(Comm(Axis.CP, "send-recv", cp.size, kv * count * 3 * (lay.cp - 1), cp.link,
                            count * 3 * (lay.cp - 1) * hop, shown))
        if "M" in blocks:
            add(Axis.CP, "all-to-all", cp, act / lay.tp * 2, m * 2 * passes("M"))
    moe = spec.model.moe
    if moe is not None and "E" in blocks:
        token = _routed_token_bytes(ctx, lay, load)
        if lay.ep > 1:
            ep, sent, one = _dispatch(ctx, lay, moe, token)
            count = m * 2 * passes("E")  # dispatch + combine in forward and again in backward
            sec = count * one
            shown = sec
            if moe.overlap_communication:
                # Megatron pairs the layers of one model chunk's forward with those of a chunk's backward
                seconds = block_seconds()
                chunks = [ep_overlap_layers(rank_blocks(ctx, s.blocks, s.mtp), seconds, one) for s in mine]
                beside = sum(combined_1f1b_seconds(c) - 3 * sum(a + b for a, b, _ in c) for c in chunks)
                unpaired = ep_overlap_unpaired(lay)
                shown = unpaired * sec + (1 - unpaired) * m * max(beside, 0.0)
            out.append(Comm(Axis.EP, "all-to-all", ep.size, sent * token * count, ep.link, sec, shown))
        if lay.etp > 1:
            # expert TP gathers the routed tokens before the experts and reduce-scatters after
            etp = placement(ctx, lay.etp, 1)
            routed = token * moe.top_k * lay.etp
            add(Axis.ETP, "all-gather", etp, routed, m * passes("E"))
            add(Axis.ETP, "reduce-scatter", etp, routed, m * passes("E"))
    if lay.pp > 1:
        pp = _pp_pair(ctx)
        # 1F1B blocks on each send/recv (batch_p2p_comm); the interleaved schedule posts each
        # chunk's transfer and computes the next chunk before waiting on it (overlap_p2p_comm:
        # Megatron-LM's default, and what Megatron-Bridge's CommOverlapConfig sets, under VPP)
        size, count = act / (lay.tp if lay.sp else 1), 2 * m * lay.vpp
        hop = group_seconds(ctx, "send-recv", pp, size)
        out.append(Comm(Axis.PP, "send-recv", pp.size, size * count, pp.link, count * hop,
                        pipeline_p2p_exposed(lay, hop, forward, backward)))
    big = mem[rank]
    dense, expert = big.params - big.params_expert, big.params_expert
    grad = FP32 if spec.training.grad_reduce_dtype == "fp32" else BF16
    # Under the interleaved schedule rank 0's model chunks other than the first finish their last
    # backward (vpp-1)*pp chunk steps before the end, and reduce while the cooldown runs on; their
    # parameters gather alike ahead of the warmup (align_param_gather): the window grows from one
    # micro-batch's pass to 1 + (vpp-1)*pp chunk passes of it.
    chunks = (1 + (lay.vpp - 1) * lay.pp) / lay.vpp
    groups = ((Axis.DP, placement(ctx, lay.dp * lay.cp, lay.tp), dense),
              (Axis.EDP, placement(ctx, lay.edp, lay.etp * lay.ep), expert))
    fsdp = spec.training.data_parallel_sharding == "fsdp"
    for axis, group, params in groups:
        if group.size > 1 and params and fsdp:
            # Megatron-FSDP (optim_grads_params): every micro-batch gathers each layer's weights
            # before its forward and again before its backward, and reduce-scatters its gradients
            # after it (megatron/core/distributed/fsdp/src/README.md); the gathers prefetch under the
            # previous layer's compute and the reduce-scatters run under the next layer's backward,
            # so each shows the measured exposed share of its data-parallel kind, or all of it beyond
            # the micro-batches' compute
            add(axis, "all-gather", group, BF16 * params, 2 * m, eff.param_gather_exposed, m * (forward + backward))
            add(axis, "reduce-scatter", group, grad * params, m, eff.grad_reduce_exposed, m * backward)
        elif group.size > 1 and params:
            if spec.training.distributed_optimizer:
                add(axis, "reduce-scatter", group, grad * params, 1, eff.grad_reduce_exposed, backward * chunks)
                add(axis, "all-gather", group, BF16 * params, 1, eff.param_gather_exposed, forward * chunks)
            else:
                add(axis, "all-reduce", group, grad * params, 1, eff.grad_reduce_exposed, backward * chunks)
    return out


def _passes(ctx: Context) -> int:
    """The passes per micro-batch that communicate that every block of every rank runs: forward
    and backward, and the forward again where full recompute recomputes every layer."""
    training = ctx.spec.training
    return 3 if training.recompute == "full" and training.recompute_method != "block" else 2


def _fewest(ctx: Context, stages: list[Stage], pp: int) -> tuple[int, int]:
    """The fewest blocks and the fewest E blocks any pipeline rank runs (the MTP layers with the
    rank that runs them): whichever rank the step prices runs at least these; memoised per stage
    list as ranks.ranks is."""
    key = ("fewest blocks", id(stages), pp)
    cache = ctx.cost_cache
    if key not in cache or cache[key][0] is not stages:
        runs = [rank_blocks(ctx, r.blocks, r.mtp) for r in ranks(ctx, stages, pp)]
        cache[key] = (stages, (min(len(b) for b in runs), min(b.count("E") for b in runs)))
    return cache[key][1]  # type: ignore[no-any-return]


def _routed_token_bytes(ctx: Context, lay: Layout, load: float) -> float:
    """One copy of the rank's routed tokens, in the experts' width (latent MoE dispatches latents)."""
    return BF16 * micro_batch_tokens(ctx, lay) / (lay.tp if lay.sp else 1) * expert_width(ctx) * expert_load(ctx, load)


def _dispatch(ctx: Context, lay: Layout, moe: MoESpec, token: float) -> tuple[Placement, float, float]:
    """The expert-parallel group, the copies of a token it sends (expert_sends) and the seconds
    of one all-to-all of `token` bytes of routed tokens."""
    ep = placement(ctx, lay.ep, lay.etp)
    sent, nvlink, nic = expert_sends(moe, ep)
    # a flex backend without published rates (FLEX_LINK_SHARE) runs at the links' rates
    share = FLEX_LINK_SHARE.get(moe.flex_backend, (1.0, 1.0)) if moe.dispatcher == "flex" else (1.0, 1.0)
    if ep.domains == 1:
        bw, alpha = ctx.cluster.nvlink("all-to-all", ep.size)
        one = alpha * 1e-6 + nvlink * token / (bw * share[0] * 1e9)
    else:
        one = _split_seconds(ctx, ep, "all-to-all", nvlink * token, nic * token, share)
    return ep, sent, one


def _pp_pair(ctx: Context) -> Placement:
    """Two neighbouring stages, world/pp ranks apart: in one NVLink domain only if it holds the world."""
    return Placement(2, 2, 1) if ctx.world <= ctx.cluster.nvlink_domain else Placement(2, 1, 2)


def micro_batch_floor(ctx: Context, lay: Layout, stages: list[Stage], load: float = 1.0) -> float:
    """A lower bound of what communication() exposes per micro-batch on the axes inside every
    micro-batch (TP, CP, EP, ETP, PP), whatever the compute it may hide behind: TP's and EP's
    collectives at least their unpaired share where they overlap (all of them where they do not),
    ETP's whole, PP's unpaired share, CP's none. Per shard shape and stage split, without pricing
    the step."""
    tp_block, ep_block, etp_block, pp_hop = memo(ctx, ("micro-batch floor", shape(lay), load), lambda: _per_block_seconds(ctx, lay, load))
    fewest, experts = _fewest(ctx, stages, lay.pp)
    passes = _passes(ctx)
    floor = 0.0
    if tp_block:
        share = 1 / (2 * lay.tp) if ctx.spec.training.tp_comm_overlap and lay.sp and ctx.te else 1.0
        floor += share * fewest * tp_block
    if ep_block and experts:
        moe = ctx.spec.model.moe
        share = ep_overlap_unpaired(lay) if moe is not None and moe.overlap_communication else 1.0
        floor += share * experts * 2 * passes * ep_block
    if etp_block and experts:
        floor += experts * passes * etp_block
    if lay.pp > 1:
        floor += pp_overlap_unpaired(lay) * 2 * lay.vpp * pp_hop
    return floor


def _per_block_seconds(ctx: Context, lay: Layout, load: float) -> tuple[float, float, float, float]:
    """micro_batch_floor's seconds of one shard shape: TP's per block per micro-batch (its passes
    and, under SP, the backward's gather again), one EP all-to-all, ETP's gather and
    reduce-scatter per block pass, and one PP send-recv; 0 where the axis is 1."""
    h, passes = ctx.spec.model.hidden_size, _passes(ctx)
    act = BF16 * micro_batch_tokens(ctx, lay) * h
    tp_block = ep_block = etp_block = pp_hop = 0.0
    if lay.tp > 1:
        tp = placement(ctx, lay.tp, 1)
        if lay.sp:
            gather = group_seconds(ctx, "all-gather", tp, act)
            tp_block = passes * (gather + group_seconds(ctx, "reduce-scatter", tp, act)) + gather
        else:
            tp_block = passes * group_seconds(ctx, "all-reduce", tp, act)
    moe = ctx.spec.model.moe
    if moe is not None:
        token = _routed_token_bytes(ctx, lay, load)
        if lay.ep > 1:
            ep_block = _dispatch(ctx, lay, moe, token)[2]
        if lay.etp > 1:
            etp = placement(ctx, lay.etp, 1)
            routed = token * moe.top_k * lay.etp
            etp_block = group_seconds(ctx, "all-gather", etp, routed) + group_seconds(ctx, "reduce-scatter", etp, routed)
    if lay.pp > 1:
        pp_hop = group_seconds(ctx, "send-recv", _pp_pair(ctx), act / (lay.tp if lay.sp else 1))
    return tp_block, ep_block, etp_block, pp_hop
