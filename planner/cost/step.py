"""Step time of one layout on its busiest pipeline rank, term by term.

Per micro-batch: the matmuls and the unfused softmax (from the preset's measured kernel-rate
table, else FLOPs at MAMF and bytes at HBM bandwidth), the small kernels (norms, activations,
rotary, casts) as HBM traffic, the weight gradients' accumulation, and the per-block host time,
added whole for megatron-core's local modules and overlapping the GPU under Transformer Engine,
where it follows the host class of the cluster and what CUDA graphs capture of it.
Per step: those over the pipeline's micro-batch slots, the communication each axis exposes, and
the optimizer step. The fitted numbers are in cost.coefficients; how they were measured, in
benchmarks/evidence/cost_model_notes.md.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

from megacpp.planner.axes import Axis
from megacpp.planner.cost.activations import block_activation_bytes
from megacpp.planner.cost.blocks import BF16, unfused_scores
from megacpp.planner.cost.coefficients import (
    DEFAULT_EFFICIENCY,
    EXPERT,
    Efficiency,
)
from megacpp.planner.cost.communication import Comm, communication, micro_batch_floor
from megacpp.planner.cost.flops import (
    Gemms,
    block_flops,
    block_gemms,
    head_flops,
    head_gemms,
    micro_batch_tokens,
)
from megacpp.planner.cost.host import exposed_host_seconds, gpu_repeats, host_scale, host_units
from megacpp.planner.cost.kernel_rates import kernel_rates
from megacpp.planner.cost.latent import mtp_flops, mtp_proj_gemms, rank_blocks, recomputed_up_projections
from megacpp.planner.cost.memory import (
    GIB,
    StageMemory,
    first_ranks_memory,
    offload_traffic,
    offloads,
    stage_memory,
)
from megacpp.planner.cost.ranks import first_ranks, ranks, recomputed_blocks
from megacpp.planner.cost.shard import memo, shape
from megacpp.planner.search.layout import Context, Layout
from megacpp.planner.search.stages import Stage
from megacpp.planner.spec.clusters import PRESETS

# HBM traffic of the unfused softmax path per attention score, for presets without a kernel-rate
# table: the torch ops of megatron-core's FusedScaleMaskSoftmax.forward_torch_softmax as
# DotProductAttention configures it (no scale unless apply_query_key_layer_scaling): forward reads
# bf16 scores and writes fp32 (6), masks in place (8), softmax (8) and casts back (6); backward
# runs the chain in reverse, softmax backward reading the gradient and the output (6 + 12 + 8 + 6).
UNFUSED_SOFTMAX_BYTES_FORWARD = 28.0
UNFUSED_SOFTMAX_BYTES_BACKWARD = 32.0

# the breakdown's term of the exposed per-block host time (Estimate.breakdown)
HOST_TERM = "block_overhead"


@dataclass(frozen=True)
class Estimate:
    """What one layout costs: per-stage memory, per-axis communication and the step's time."""

    memory: list[StageMemory]
    communication: list[Comm]
    step_seconds: float
    compute_seconds: float
    bubble_fraction: float
    tokens_per_second: float
    mfu: float
    # step_seconds by term on the busiest pipeline rank; the terms add up to the step
    breakdown: tuple[tuple[str, float], ...] = ()
    # the busiest rank's per-block host time over the step's micro-batches, hidden or not: under
    # TE only its excess over the GPU time is in the breakdown (exposed_host_seconds)
    host_seconds: float = 0.0
    # the part of host_seconds that the local experts' own host work takes (EXPERT; TE only)
    expert_host_seconds: float = 0.0

    @property
    def peak_gib(self) -> float:
        return max(m.total_gib for m in self.memory)

    @property
    def decided_by(self) -> str | None:
        return deciding_term(dict(self.breakdown))

    @property
    def host_bound(self) -> bool:
        return self.decided_by == HOST_TERM


def deciding_term(breakdown: Mapping[str, float]) -> str | None:
    """The term of a step breakdown that decides the step: the largest (the first of equals)."""
    return max(breakdown, key=lambda term: breakdown[term]) if any(breakdown.values()) else None


def host_bound(breakdown: Mapping[str, float]) -> bool:
    """Whether the exposed per-block host time, the host's excess over the GPU's work, decides the
    step: only there does the step follow the host rather than the GPU."""
    return deciding_term(breakdown) == HOST_TERM


# collectives inside every micro-batch, against the data-parallel ones once per step
PER_MICRO_BATCH_AXES = (Axis.TP, Axis.CP, Axis.EP, Axis.ETP, Axis.PP)


def matmul_seconds(ctx: Context, lay: Layout, letter: str, eff: Efficiency, load: float = 1.0,
                   recompute: str | None = None) -> float:
    """GPU seconds of one block's matmuls ("head": the output layer) per micro-batch on one rank,
    forward and backward plus what recompute repeats: from the preset's measured kernel-rate table
    (planner/cost/kernel_rates.py), under fp8 its Linear and GroupedLinear rows of the spec's fp8
    recipe, else FLOPs at the precision's MAMF x Efficiency.matmul shaped by the shape table
    (untabled_linear_seconds); the core work in bf16 under every precision (core_seconds); all
    over the system's Cluster.matmul_rate_scale. `recompute` prices the block under that mode
    instead of the spec's."""
    return _priced_matmul_seconds(ctx, lay, letter, eff, load, recompute) / ctx.cluster.matmul_rate_scale


def _priced_matmul_seconds(ctx: Context, lay: Layout, letter: str, eff: Efficiency, load: float,
                           recompute: str | None = None) -> float:
    """matmul_seconds at the preset's rates: the Linears at the training precision's, the core work
    (attention, the SSD scan, the R recurrence) in bf16 under every precision (TE's FP8 and NVFP4
    recipes leave core attention in bf16: fp8_dpa off)."""
    c = ctx.cluster
    precision = ctx.spec.training.precision
    fp4 = precision == "fp4" and bool(c.mamf_fp4_tflops)
    recipe = ctx.spec.training.fp8_recipe if precision == "fp8" else None
    mamf = (c.mamf_fp4_tflops or 0.0) if fp4 else c.mamf_fp8_tflops if recipe else c.mamf_bf16_tflops
    rate = mamf * 1e12 * eff.matmul
    recompute = recompute or ctx.spec.training.recompute
    again = gpu_repeats(recompute)
    if letter == "head":
        gemms = head_gemms(ctx, lay)
        again = 1.0  # the output layer is outside the recomputed blocks
    elif letter == "mtp_proj":
        gemms = mtp_proj_gemms(ctx, lay)
    else:
        gemms = block_gemms(ctx, letter, lay, load)
    up = recomputed_up_projections(ctx, lay) if letter == "A" and recompute != "none" else None  # a forward again (mla_up_proj)
    rates = kernel_rates(c.kernel_table)
    core = core_seconds(ctx, gemms, eff, recompute, again)
    if rates is None or fp4 or (recipe is not None and not rates.has_fp8(recipe)):
        return untabled_linear_seconds(ctx, gemms, eff, rate, recipe) * again + (up.flops / rate if up else 0.0) + core
    linears = sum(n * rates.linear_seconds(m, k, nn, recipe) for m, k, nn, n in gemms.linears)
    linears += sum(n * rates.linear_seconds(m, k, nn, recipe) for m, k, nn, n in up.linears) / 3 if up else 0.0
    linears += sum(rates.grouped_linear_seconds(g, m, k, n, recipe) for m, k, n, g in gemms.grouped)
    # a stated compute peak (cluster.bf16_tflops) scales the measured GPU's kernel times
    return linears * again / c.compute_scale + core


def core_seconds(ctx: Context, gemms: Gemms, eff: Efficiency, recompute: str, again: float) -> float:
    """Forward and backward seconds of one block's work outside its Linears, in bf16, with what
    recompute repeats (`again`; core attention is repeated under selective recompute too): from the
    preset's kernel-rate table where it has the kernel (the R scan, the SSD scan, fused or unfused
    attention), else its FLOPs at the bf16 MAMF x Efficiency.matmul, TE's fused attention and the
    SSD scan at no more than the share of MAMF they run at on the shape table (Cluster.shape_table)."""
    c = ctx.cluster
    rates = kernel_rates(c.kernel_table)
    attention_again = 4 / 3 if recompute != "none" else 1.0  # selective recompute repeats core attention
    if rates is not None:
        if gemms.recurrence:
            return rates.recurrence_seconds(*gemms.recurrence) * again / c.compute_scale
        if gemms.ssd and (scan := rates.ssd_seconds(*gemms.ssd)) is not None:
            return scan * again / c.compute_scale
        if gemms.attention:
            return rates.attention_seconds(*gemms.attention) * attention_again / c.compute_scale
        if gemms.fused_attention and (fused := rates.fused_attention_seconds(*gemms.fused_attention)) is not None:
            # a sliding window and sinks change the measured full causal kernel's time
            return fused * gemms.attention_time_share * attention_again / c.compute_scale
    bf16 = c.mamf_bf16_tflops * 1e12
    if gemms.ssd:
        return untabled_ssd_seconds(ctx, gemms, eff) * again
    if gemms.fused_attention:
        return untabled_attention_seconds(ctx, gemms, eff) * attention_again
    if gemms.attention:
        return 3 * (gemms.flops - gemms.linear_flops) / (bf16 * eff.matmul) * attention_again
    return 3 * gemms.other_flops / (bf16 * eff.matmul) * again


def untabled_ssd_seconds(ctx: Context, gemms: Gemms, eff: Efficiency) -> float:
    """The M block's conv and SSD scan forward and backward on a preset without SSD rows, at the
    share of MAMF the shape table's GPU ran them at (shape_share_seconds). The chunked scan is
    small matmuls and state traffic: it ran at 3-6% of an H100's or H200's MAMF, where 0.70 priced
    it a dozen times too fast."""
    table = kernel_rates(ctx.cluster.shape_table)
    return shape_share_seconds(ctx, gemms.other_flops, table.ssd_seconds(*gemms.ssd) if table and gemms.ssd else None, eff)


def untabled_attention_seconds(ctx: Context, gemms: Gemms, eff: Efficiency) -> float:
    """TE's fused core attention of one A block forward and backward on a preset without a
    fused-attention table, at the share of MAMF the shape table's GPU ran it at
    (shape_share_seconds), windows and sinks as measured (Gemms.attention_time_share) as the
    tabled price takes them."""
    table = kernel_rates(ctx.cluster.shape_table)
    measured = table.fused_attention_seconds(*gemms.fused_attention) if table and gemms.fused_attention else None
    return shape_share_seconds(ctx, gemms.other_flops, measured * gemms.attention_time_share if measured else None, eff)


def shape_share_seconds(ctx: Context, flops: float, measured: float | None, eff: Efficiency) -> float:
    """Forward and backward seconds of core work of `flops` forward FLOPs that the shape table's
    GPU (Cluster.shape_table) ran in `measured` seconds: at the bf16 MAMF x the lower of
    Efficiency.matmul and the share of its MAMF that GPU reached; at Efficiency.matmul where
    nothing was measured."""
    c = ctx.cluster
    rate = c.mamf_bf16_tflops * 1e12 * eff.matmul
    if not measured or not flops:
        return 3 * flops / rate
    share = 3 * flops / measured / (PRESETS[c.shape_table]["mamf_bf16_tflops"] * 1e12)
    return 3 * flops / rate * max(eff.matmul / share, 1.0)


# an FP8 recipe the shape table has no rows of, read from the rows of one that casts alike: MXFP8
# (Blackwell only) and current scaling each cast every operand in one pass before the GEMM
SHAPE_RECIPES = {"mxfp8": "tensorwise"}


def untabled_linear_seconds(ctx: Context, gemms: Gemms, eff: Efficiency, rate: float, recipe: str | None) -> float:
    """Forward and backward seconds of one block's Linears and GroupedLinears on a preset whose
    kernel-rate table cannot price them (none, no FP8 rows of the recipe, or NVFP4): 3 x their
    FLOPs at `rate` (the precision's MAMF x Efficiency.matmul), each at no more than the share of
    MAMF its shape runs at on the preset's shape table (Cluster.shape_table; NVFP4 reads its bf16
    rows): a grouped GEMM of 128 tokens per expert runs at a fifth to a quarter of MAMF on an H100,
    not 0.7."""
    name = ctx.cluster.shape_table
    table = kernel_rates(name)
    fp8 = SHAPE_RECIPES.get(recipe, recipe) if recipe else None
    if name is None or table is None or (fp8 is not None and not table.has_fp8(fp8)):
        return 3 * gemms.linear_flops / rate
    reference = PRESETS[name]
    mamf = (reference["mamf_fp8_tflops"] if fp8 else reference["mamf_bf16_tflops"]) * 1e12
    # (forward-and-backward FLOPs, the share of MAMF the table measured at the shape)
    shapes = [(6.0 * m * k * n * count, 6.0 * m * k * n / table.linear_seconds(m, k, n, fp8) / mamf)
              for m, k, n, count in gemms.linears if m * k * n]
    shapes += [(6.0 * m * k * n * g, 6.0 * m * k * n * g / table.grouped_linear_seconds(g, m, k, n, fp8) / mamf)
               for m, k, n, g in gemms.grouped if m * k * n]
    return sum(flops * max(eff.matmul / share, 1.0) for flops, share in shapes) / rate


def ring_attention_seconds(ctx: Context, lay: Layout, eff: Efficiency) -> float:
    """GPU seconds of one A block's fused core attention per micro-batch on one rank, forward and
    backward, under context parallelism (0 without it, or without TE, which Megatron's CP needs):
    the compute that TE's ring hides its K/V hops behind (communication.ring_exposed). From the
    preset's fused-attention rows, else its FLOPs at the bf16 MAMF (attention runs in bf16 under
    FP8 recipes)."""
    if lay.cp == 1 or not ctx.te or "A" not in ctx.letters:
        return 0.0
    gemms = block_gemms(ctx, "A", lay)
    if gemms.fused_attention is None:
        return 0.0
    rates = kernel_rates(ctx.cluster.kernel_table)
    timed = rates.fused_attention_seconds(*gemms.fused_attention) if rates is not None else None
    if timed is not None:  # as matmul_seconds prices it: windows and sinks as measured, at a stated compute peak
        return timed * gemms.attention_time_share / ctx.cluster.compute_scale
    return untabled_attention_seconds(ctx, gemms, eff)


def peak_tflops(ctx: Context) -> float:
    """The dense peak MFU is measured against: the preset's rate at the training precision."""
    c, precision = ctx.cluster, ctx.spec.training.precision
    if precision == "fp4" and c.fp4_tflops:
        return c.fp4_tflops
    return c.fp8_tflops if precision == "fp8" else c.bf16_tflops


def softmax_seconds(ctx: Context, lay: Layout, eff: Efficiency) -> float:
    """GPU seconds of one unfused attention's softmax chain per micro-batch on one rank, forward and
    backward plus the forward recompute repeats (0 with TE's fused attention): from the preset's
    kernel-rate table, else its HBM traffic at HBM x Efficiency.hbm."""
    scores = unfused_scores(ctx, lay)
    if not scores:
        return 0.0
    forwards = 1 if ctx.spec.training.recompute == "none" else 2  # selective and full recompute repeat it
    rates = kernel_rates(ctx.cluster.kernel_table)
    if rates is not None:
        heads = ctx.spec.model.attention.num_heads  # type: ignore[union-attr]
        return rates.softmax_seconds(lay.micro_batch_size * heads // lay.tp, ctx.seq // lay.cp, forwards)
    traffic = scores * (forwards * UNFUSED_SOFTMAX_BYTES_FORWARD + UNFUSED_SOFTMAX_BYTES_BACKWARD)
    return traffic / (ctx.cluster.hbm_tbps * 1e12 * eff.hbm)


def small_kernel_seconds(ctx: Context, lay: Layout, blocks: str, load: float = 1.0) -> float:
    """Seconds of one micro-batch's small kernels on one rank per unit of Efficiency.traffic: the
    blocks' saved activation bytes (as without recompute; block_activation_bytes) over HBM
    bandwidth. Those kernels read and write tensors of the activations' sizes, so their time
    follows the tokens of a micro-batch, not the micro-batch count."""
    per_token = memo(ctx, ("saved", shape(lay), load),
                     lambda: {letter: block_activation_bytes(ctx, letter, lay, load, recompute="none") for letter in ctx.letters},
                     rate_free=True)
    saved = sum(n * per_token[letter] for letter, n in Counter(blocks).items())
    return saved * micro_batch_tokens(ctx, lay) / (ctx.cluster.hbm_tbps * 1e12)


def optimizer_seconds(ctx: Context, stage: StageMemory, eff: Efficiency) -> float:
    """One optimizer step of a stage's rank: its optimizer state (fp32 main parameters and Adam
    moments, sharded with the distributed optimizer) read and written, with the gradients and
    the bf16 parameters, at HBM bandwidth (Efficiency.optimizer); with TE, or the host's work
    per parameter tensor where that is longer (Efficiency.optimizer_tensor_s at the cluster's
    host class: hundreds of small expert weights)."""
    traffic, fixed = eff.optimizer(ctx.te)
    state = stage.optimizer_gib * GIB * traffic / (ctx.cluster.hbm_tbps * 1e12)
    host = stage.param_tensors * eff.optimizer_tensor_s * host_scale(ctx) if ctx.te else 0.0
    return max(state, host) + fixed


def grad_accumulation_seconds(ctx: Context, stage: StageMemory, eff: Efficiency) -> float:
    """One micro-batch's weight gradients of a stage's rank added into the gradient buffer
    at the rate measured on the preset's GPU (Cluster.grad_accumulation_tbps), else at
    Efficiency.grad_accumulation_hbm of its HBM bandwidth: the buffer read and written, the bf16
    gradient read. Without gradient-accumulation fusion (it needs Apex) megatron-core's DDP hook
    adds each bf16 weight gradient into the fp32 main_grad (distributed_data_parallel.py:
    param.main_grad.add_(param.grad.data)), one add per weight per micro-batch."""
    moved = 2 * stage.gradients_gib * GIB + BF16 * stage.params
    rate = ctx.cluster.grad_accumulation_tbps or ctx.cluster.hbm_tbps * eff.grad_accumulation_hbm
    return moved / (rate * 1e12)


def repeats_of(ctx: Context, blocks: str, again: str | None) -> float:
    """gpu_repeats of a rank whose `again` blocks of `blocks` full recompute runs again (None: as
    the spec's recompute mode runs them all)."""
    if again is None or ctx.spec.training.recompute != "full" or not blocks:
        return gpu_repeats(ctx.spec.training.recompute)
    return 1 + min(len(again), len(blocks)) / len(blocks) / 3


def _matmul(ctx: Context, lay: Layout, eff: Efficiency, load: float, recompute: str | None = None) -> dict[str, float]:
    """matmul_seconds of each block letter, the head and the MTP projection, once per shard shape
    (cost.shard); `recompute` as matmul_seconds takes it."""
    keys = [*ctx.letters, "head", *["mtp_proj"] * bool(ctx.spec.model.mtp_num_layers)]
    return memo(ctx, ("matmul", shape(lay), eff, load, recompute),
                lambda: {letter: matmul_seconds(ctx, lay, letter, eff, load, recompute) for letter in keys})


def block_seconds(ctx: Context, lay: Layout, eff: Efficiency, load: float) -> dict[str, float]:
    """Each block letter's GPU seconds of one micro-batch (forward and backward, as the recompute
    mode runs them): its matmuls, its small kernels and, for A, the unfused softmax; once per
    shard shape."""
    def price() -> dict[str, float]:
        matmul, traffic = _matmul(ctx, lay, eff, load), eff.traffic(ctx.te)
        repeats = gpu_repeats(ctx.spec.training.recompute)
        return {letter: matmul[letter] + (softmax_seconds(ctx, lay, eff) if letter == "A" else 0.0)
                + (traffic * repeats * small_kernel_seconds(ctx, lay, letter, load) if traffic else 0.0)
                for letter in ctx.letters}

    return memo(ctx, ("block seconds", shape(lay), eff, load), price)  # type: ignore[no-any-return]


def _rank_work(ctx: Context, lay: Layout, blocks: str, head: bool, mtp: bool, eff: Efficiency,
               load: float, again: str | None = None) -> tuple[float, float, float, float, float, float]:
    """One pipeline rank's (matmul, softmax, small kernels, host, the local experts' host, the
    host's synchronised share) per micro-batch, from its blocks, whether it has the head, whether
    it runs the MTP layers, and the blocks full recompute runs again (memory.recomputed_blocks;
    None: as many as the spec's recompute mode runs again)."""
    recompute = ctx.spec.training.recompute
    matmul = _matmul(ctx, lay, eff, load)
    depths = ctx.spec.model.mtp_num_layers
    # the MTP layers run after the rank's own blocks; the rank with the loss passes every depth's
    # hidden states through the output layer (gpt_model.py _postprocess)
    blocks = rank_blocks(ctx, blocks, mtp)
    gemm = (matmul["head"] * (1 + depths) if head else 0.0) + (matmul["mtp_proj"] if mtp else 0.0)
    traffic = eff.traffic(ctx.te)
    small = traffic * small_kernel_seconds(ctx, lay, blocks, load) if traffic else 0.0
    if recompute == "full" and again is not None and len(again) < len(blocks):
        # partial full recompute: the other blocks run once, and so do their small kernels
        once, rest = _matmul(ctx, lay, eff, load, "none"), Counter(blocks) - Counter(again)
        gemm += sum(matmul[letter] for letter in again) + sum(n * once[letter] for letter, n in rest.items())
        small += traffic * small_kernel_seconds(ctx, lay, again, load) / 3 if traffic and again else 0.0
    else:
        gemm += sum(matmul[letter] for letter in blocks)
        small *= gpu_repeats(recompute)
    units = host_units(ctx, lay, blocks)
    host_again = 1.0 if ctx.te else repeats_of(ctx, blocks, again)
    host = sum(n * eff.overhead(key, ctx.te) for key, n in units.items()) * host_again
    experts = units[EXPERT] * eff.overhead(EXPERT, ctx.te) * host_again
    scores = blocks.count("A") * softmax_seconds(ctx, lay, eff)
    synced = eff.te_sync_exposed if units["E"] else 0.0  # a captured MoE layer waits for nothing
    return gemm, scores, small, host, experts, synced


def busiest_rank(ctx: Context, lay: Layout, stages: list[Stage], mem: list[StageMemory], eff: Efficiency,
                 load: float = 1.0) -> tuple[float, ...]:
    """(matmul, softmax, exposed block overhead, small kernels, gradient accumulation, host, the
    local experts' host) per micro-batch on the pipeline rank whose first five add up to the most,
    of the ranks in `mem` (stage_memory's, or first_ranks_memory's: a rank that holds the same as
    one before it has the same terms, so the first of them decides)."""
    return _busiest(ctx, lay, stages, mem, eff, load)[1]


def _busiest(ctx: Context, lay: Layout, stages: list[Stage], mem: list[StageMemory], eff: Efficiency,
             load: float) -> tuple[int, tuple[float, ...]]:
    """busiest_rank with that rank's pipeline index."""
    per_rank = []
    work = memo(ctx, ("rank work", shape(lay), eff, load), dict)  # _rank_work by the rank's blocks
    held = ranks(ctx, stages, lay.pp)
    for stage in mem:
        rank = held[stage.pp_rank]
        again = recomputed_blocks(ctx, rank.stages)
        key = (rank.blocks, rank.output_head, rank.mtp, again)
        if key not in work:
            work[key] = _rank_work(ctx, lay, rank.blocks, rank.output_head, rank.mtp, eff, load, again)
        gemm, scores, small, host, experts, synced = work[key]
        accumulate = grad_accumulation_seconds(ctx, stage, eff)
        per_rank.append((gemm, scores, exposed_host_seconds(gemm + scores + small + accumulate, host, ctx.te, synced), small, accumulate,
                         host, experts))
    p = max(range(len(per_rank)), key=lambda i: sum(per_rank[i][:5]))
    return mem[p].pp_rank, per_rank[p]


# relative margin of step_floor under the step, for sums taken in another order
FLOOR_MARGIN = 1e-9


def step_floor(ctx: Context, lay: Layout, eff: Efficiency = DEFAULT_EFFICIENCY, load: float = 1.0,
               stages: list[Stage] | None = None) -> float:
    """A lower bound of estimate()'s step_seconds from the layout's shard shape alone: the
    pipeline's micro-batch slots times the mean pipeline rank's GPU work of one micro-batch
    (matmuls, softmax, small kernels) or its per-block host time, whichever is longer (with TE a
    micro-batch takes the longer of the two, without it their sum; exposed_host_seconds). The
    busiest rank takes at least the mean, and the step's other terms (gradient accumulation,
    communication, the optimizer) only add to it. Given the layout's stages, the collectives every
    micro-batch runs that cannot hide are added (communication.micro_batch_floor)."""

    def whole_model() -> float:
        # under partial full recompute every block running once is the bound
        again = "" if ctx.spec.training.recompute_method == "block" else None
        gemm, scores, small, host, *_ = _rank_work(ctx, lay, ctx.pattern.blocks, True, bool(ctx.spec.model.mtp_num_layers),
                                                   eff, load, again)
        return max(gemm + scores + small, host) if ctx.te else gemm + scores + small + host

    work = memo(ctx, ("floor", shape(lay), eff, load), whole_model)
    slots = lay.num_microbatches + (lay.pp - 1) / lay.vpp
    per_micro_batch = work / lay.pp + (micro_batch_floor(ctx, lay, stages, load) if stages is not None else 0.0)
    return slots * per_micro_batch * (1 - FLOOR_MARGIN)


def compute_floor(ctx: Context, lay: Layout, stages: list[Stage], eff: Efficiency = DEFAULT_EFFICIENCY,
                  load: float = 1.0) -> float:
    """estimate()'s step_seconds without its communication, a lower bound of it (exposed
    collectives only add) in far fewer steps: the busiest rank's micro-batches and the optimizer,
    both decided by the first rank of each kind (first_ranks_memory), with the collectives every
    micro-batch runs that cannot hide (communication.micro_batch_floor, less FLOOR_MARGIN for
    sums taken in another order)."""
    mem = first_ranks_memory(ctx, lay, stages, eff, load)
    rank, busiest = _busiest(ctx, lay, stages, mem, eff, load)
    # estimate() prices the same layout next, where it is not slower than the top-th step yet
    ctx.cost_cache["last busiest rank"] = (lay, stages, eff, load, (rank, busiest))
    slots = lay.num_microbatches + (lay.pp - 1) / lay.vpp
    communicating = micro_batch_floor(ctx, lay, stages, load) * (1 - FLOOR_MARGIN)
    return slots * (sum(busiest[:5]) + communicating) + max(optimizer_seconds(ctx, st, eff) for st in mem)


def _busiest_rank(ctx: Context, lay: Layout, stages: list[Stage], mem: list[StageMemory], eff: Efficiency,
                  load: float) -> tuple[int, tuple[float, ...]]:
    """_busiest of one layout, as compute_floor left it where it just priced the same layout."""
    last = ctx.cost_cache.get("last busiest rank")
    if last is not None and last[0] is lay and last[1] is stages and last[2] is eff and last[3] == load:
        return last[4]  # type: ignore[no-any-return]
    return _busiest(ctx, lay, stages, [mem[p] for p, _ in first_ranks(ctx, stages, lay.pp)], eff, load)


def offload_seconds(ctx: Context, lay: Layout, mine: list[Stage], load: float, forward: float, backward: float) -> float:
    """Per micro-batch, the host-link time of activation offloading that the compute beside it
    does not hide: the offloaded tensors go out during the forward and come back during the
    backward on streams of their own (Megatron's offload managers), each way over
    Cluster.host_link_gbps; what outlasts the forward or the backward is on the step."""
    if not offloads(ctx):
        return 0.0
    each_way = offload_traffic(ctx, lay, mine, load) / (ctx.cluster.host_link_gbps * 1e9)
    return max(0.0, each_way - forward) + max(0.0, each_way - backward)


def estimate(ctx: Context, lay: Layout, stages: list[Stage], eff: Efficiency = DEFAULT_EFFICIENCY,
             load: float = 1.0) -> Estimate:
    """Memory, communication and step time of one legal layout; `load` > 1 prices the busiest
    expert-parallel rank under routing imbalance (blocks.routed_load)."""
    mem = stage_memory(ctx, lay, stages, eff, load)
    per_letter = {letter: block_flops(ctx, letter, load) for letter in ctx.letters}
    rank, (*terms, host, experts) = _busiest_rank(ctx, lay, stages, mem, eff, load)
    t_mb = sum(terms)
    gpu_mb = terms[0] + terms[1] + terms[3] + terms[4]
    # forward 1, backward 2 (+1 recomputed); the gradients accumulate in the backward
    mine = ranks(ctx, stages, lay.pp)[rank]
    forward = (gpu_mb - terms[4]) / (3 * repeats_of(ctx, rank_blocks(ctx, mine.blocks, mine.mtp), recomputed_blocks(ctx, mine.stages)))
    comms = communication(ctx, lay, stages, mem, eff, load, window=(forward, gpu_mb - forward),
                          ring=memo(ctx, ("ring", shape(lay), eff), lambda: ring_attention_seconds(ctx, lay, eff)), rank=rank,
                          block_seconds=lambda: block_seconds(ctx, lay, eff, load))
    m = lay.num_microbatches
    pipeline_units = m + (lay.pp - 1) / lay.vpp
    compute = pipeline_units * t_mb
    per_mb_comm = sum(x.exposed_seconds for x in comms if x.axis in PER_MICRO_BATCH_AXES) / m
    offload = offload_seconds(ctx, lay, mine.stages, load, forward, gpu_mb - forward)
    data_parallel = sum(x.exposed_seconds for x in comms if x.axis in (Axis.DP, Axis.EDP))
    optimizer = max(optimizer_seconds(ctx, stage, eff) for stage in mem)  # the stages step at once
    step = pipeline_units * (t_mb + per_mb_comm + offload) + data_parallel + optimizer
    bubble = (lay.pp - 1) / lay.vpp / pipeline_units
    breakdown = (
        ("matmul", m * terms[0]),
        ("softmax", m * terms[1]),
        ("block_overhead", m * terms[2]),
        ("small_kernels", m * terms[3]),
        ("grad_accumulation", m * terms[4]),
        ("communication", m * per_mb_comm),
        ("bubble", (pipeline_units - m) * (t_mb + per_mb_comm + offload)),
        ("data_parallel", data_parallel),
        ("optimizer", optimizer),
        *((("offload", m * offload),) if offloads(ctx) else ()),
    )
    gbs_tokens = ctx.spec.training.global_batch_size * ctx.seq
    useful = per_letter if load == 1 else {letter: block_flops(ctx, letter) for letter in ctx.letters}
    model_flops = 3 * gbs_tokens * (sum(n * useful[b] for b, n in Counter(ctx.pattern.blocks).items()) + head_flops(ctx)
                                    + mtp_flops(ctx))
    peak = peak_tflops(ctx) * 1e12
    return Estimate(
        memory=mem,
        communication=comms,
        step_seconds=step,
        compute_seconds=compute,
        bubble_fraction=bubble,
        tokens_per_second=gbs_tokens / step,
        mfu=model_flops / (step * ctx.world * peak),
        breakdown=breakdown,
        host_seconds=lay.num_microbatches * host,
        expert_host_seconds=lay.num_microbatches * experts,
    )
