"""Cost model: per-stage memory, per-axis communication and step time for one layout.

Memory follows Megatron's bookkeeping (bf16 weights, fp32 gradient buffer, fp32 main params and
Adam moments sharded by the distributed optimizer over DP*CP for dense and EDP for expert
weights [R30]) plus activations x micro-batches in flight for the 1F1B / interleaved schedule
[R37]. Communication is alpha-beta with nccl-tests bus-bandwidth factors [R1] on the link each
group uses under Megatron's tp-cp-ep-dp-pp rank order. Constants marked ASSUMPTION are planner
defaults until calibrated against measured runs.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

from megacpp.planner.cost.blocks import (
    BF16,
    FP32,
    block_activation_bytes,
    block_flops,
    block_gemms,
    block_param_tensors,
    block_params,
    embedding_param_tensors,
    embedding_params,
    expert_backward_bytes,
    head_flops,
    head_gemms,
    head_param_tensors,
    head_params,
    micro_batch_tokens,
    padded_vocab,
    unfused_scores,
    weight_gradient_bytes,
)
from megacpp.planner.cost.kernel_rates import kernel_rates
from megacpp.planner.search.layout import Context, Layout
from megacpp.planner.search.stages import Stage
from megacpp.planner.spec.pattern import BLOCK_LETTERS

GIB = float(1 << 30)
# torch.cuda.max_memory_reserved / max_memory_allocated per rank over the 40 ranks of the ten 4 x H200
# runs in benchmarks/results/gpu_runs_h200x4.json: min 1.017, median 1.037, max 1.186.
RESERVED_OVER_ALLOCATED = 1.037
# Memory terms measured per phase (resident, forward+backward peak, optimizer peak) on the five
# 8 x H200 runs in benchmarks/results/gpu_runs_h200x8.json:
# - megatron-core's unfused attention reuses one global bf16 buffer of heads/TP x s x s scores per
#   micro-batch (utils.GlobalMemoryBuffer, dot_product_attention.py); it stays allocated. The
#   resident memory exceeded weights + gradients + optimizer by 0.20 GiB with a 0.125 GiB buffer
#   and by 1.08 GiB with a 1.0 GiB buffer.
SCORE_BUFFER_BYTES = BF16
# Transformer Engine's grouped GEMMs (the experts' GroupedLinear, which megacpp's runtime and the
# rendered Megatron-LM launch use under TE: --moe-grouped-gemm) run on its multi-stream cuBLAS
# path, which allocates one workspace per compute stream once per process and keeps it:
# nvte_get_num_compute_streams() = 4 streams (transformer_engine/common/util/multi_stream.cpp) of
# get_cublas_workspace_size_bytes() = 32 MiB + 256 B on Hopper and later
# (transformer_engine/pytorch/module/base.py, get_multi_stream_cublas_workspace). Without it the
# resident memory of every TE run with MoE exceeded the plan by 0.12-0.15 GiB, and of none without
# (benchmarks/results/gpu_runs_h200x*_te*.json, gpu_runs_h100x1_te.json).
TE_GROUPED_GEMM_WORKSPACE_BYTES = 4 * (32 * 2**20 + 256)
# - the forward+backward peak comes in the backward of a rank's last unfused attention, with every
#   activation still held but those of the blocks after it (already back-propagated). Broken down
#   by allocation site (launch --memory-peak, benchmarks/results/gpu_runs_h200x4_peaks.json):
#   without recompute the autograd engine holds three fp32 score-sized gradients (12 B per score;
#   6.06 GiB at 0.5 G scores on moe-ep1-h4096 and moe-ep4-h4096) while the bf16 probabilities
#   (2 B) are already freed; under selective recompute the recomputed fp32 softmax output (4 B)
#   and the checkpoint's backward (12 B: the recomputed bf16 copy and the gradients; 1.00 + 3.02
#   GiB at 0.25 G scores on hybrid-nam-pp2-ep2) come on top of the kept activations.
UNFUSED_BACKWARD_BYTES = 12.0 - BF16
SELECTIVE_BACKWARD_BYTES = FP32 + 12.0
# - the distributed optimizer's step holds an fp32 copy of the larger of its two shards (dense over
#   DP*CP, experts over EDP): 1.34 GiB = 4.0 B x 361M params on dense-tp8, 3.00 GiB = 4.0 B x 805M
#   expert params on moe-ep8 and moe-tp2-ep4-sp. That copy is megatron-core's torch fallback for
#   the multi-tensor kernels (utils.py local_multi_tensor_scale: dst.copy_(src * scale)), which
#   optimizer/clip_grads.py uses when neither Transformer Engine nor Apex imports. With TE it takes
#   TE's kernels and nothing is held: the optimizer peak equalled resident memory to 0.1 MiB on
#   te-dense and te-moe (benchmarks/results/gpu_runs_h200x1_te.json).
OPTIMIZER_STEP_BYTES = FP32
# HBM traffic of the unfused softmax path per attention score, for presets without a kernel-rate
# table: the torch ops of megatron-core's FusedScaleMaskSoftmax.forward_torch_softmax as
# DotProductAttention configures it (no scale unless apply_query_key_layer_scaling): forward reads
# bf16 scores and writes fp32 (6), masks in place (8), softmax (8) and casts back (6); backward
# runs the chain in reverse, softmax backward reading the gradient and the output (6 + 12 + 8 + 6).
UNFUSED_SOFTMAX_BYTES_FORWARD = 28.0
UNFUSED_SOFTMAX_BYTES_BACKWARD = 32.0


# Host and launch time per block per micro-batch (forward + backward), by letter, for megacpp's
# runtime on megatron-core 0.16.1 local modules on H200: what `megacpp calibrate
# benchmarks/results/gpu_runs_h200x8.json benchmarks/results/gpu_runs_h200x4.json
# benchmarks/results/gpu_runs_h200x1.json` fits to the 23 runs there after every modelled term
# (matmul, the unfused softmax and the R block's scan from the measured kernel-rate table,
# communication, the gradient accumulation, the optimizer step); README "Cost model against the GPUs" gives its errors on
# those runs left out one at a time and on the 2 x H200 runs outside the fit. It also holds the GPU
# time of the small kernels (norms, residual adds, activations, rotary) that the table does not price.
# E includes the dispatcher's host synchronisation on routed-token counts and the per-expert loop;
# A's launches fall inside its softmax term. M is fitted alone, the other letters held at these
# values, to the first five Mamba runs in benchmarks/results/gpu_runs_h200x1_mamba.json after the SSD
# table's scan time (least squares on relative error; left out one at a time it moves 0.56-1.42 ms).
# Before the gradient accumulation was a term of its own these were D 3.09, E 13.34, M 1.37 and
# R 2.91 ms, left out one at a time a median error of 6.6% on the 23 runs (now 6.2%). Two-GPU groups
# under SP are priced with the backward's second all-gather (communication).
MEASURED_BLOCK_OVERHEAD_S = (("A", 0.0), ("D", 2.93e-3), ("E", 12.86e-3), ("M", 0.95e-3), ("R", 2.78e-3))
EXPERT = "expert"  # overhead key: one local expert of an E block, per micro-batch (host_units)
CP_STEP = "cp_step"  # overhead key: one more context-parallel rank's step of an A block's attention (host_units)
# The same with Transformer Engine 2.20 modules, where the overhead is host time alone and runs
# ahead of the GPU (exposed_host_seconds), and the small kernels' GPU time is a term of its own
# (Efficiency.te_small_kernel_traffic, small_kernel_seconds): what `megacpp calibrate`'s fit gives on
# the 63 TE runs on H200 of benchmarks/results/gpu_runs_h200x1_te.json, gpu_runs_h200x2_te.json,
# gpu_runs_h200x2_te_heldout.json, gpu_runs_h200x1_te_mamba.json, gpu_runs_h200x2_te_blind.json,
# gpu_runs_h200x2_te_repeat.json, gpu_runs_h200x2_te_blind2.json, gpu_runs_h200x2_te_trace.json,
# gpu_runs_h200x2_te_trace2.json, the TE runs of gpu_runs_h200x1_expert_grads.json, and
# gpu_runs_h200x2_te_fused.json and gpu_runs_h200x2_te_fusions.json (the runtime with Megatron's
# fusions, and their unfused twins) and gpu_runs_h200x2_dp_overlap.json (its data-parallel overlap
# as Megatron-LM's, but for the runs of the runtime before it), with 18 runs on H100 hosts (host
# time is the host's, whichever GPU): the eight MoE runs of gpu_runs_h100x1_te_grouped.json and
# gpu_runs_h100x1_te_experts.json (8 to 128 local experts), and the ten host probes of
# gpu_runs_h100x1_te_host.json and gpu_runs_h100x1_te_host2.json (the same five stacks at hidden 512
# on two hosts: the GPU busy for 1-8% of the step, so the step is host time), after the
# fused-attention, SSD and grouped-GEMM tables' time, communication, the gradient accumulation and
# the optimizer step. Each run is priced for
# the fusions it ran (calibration.run_spec): the fused SwiGLU's smaller activations mean fewer
# small-kernel bytes. The GPU-bound runs (the dense stacks, the (MD) Mamba stack and R on PP2) fit
# the traffic, the host-bound ones (MoE, the hybrids, R on DP2, the dense stacks on TP2+SP and CP2
# at sequence 4096 with 16 micro-batches) the overheads. D shows only beside A, in ten of the 50
# host-bound runs, so the split between the two is loosely held. Full recompute adds no host time under TE
# (host_repeats). Two-GPU groups are priced at the measured pair rates (clusters.py).
# EXPERT is each local expert's share of an E block's host time: the DDP hook adds each expert's
# weight gradients into main_grad one tensor at a time (two fp32 adds per expert per micro-batch in
# the profiles), beside TE GroupedLinear's own work per expert (about seven kernels per expert per
# micro-batch in the host probes). Planned with a per-block E overhead alone, the H100 runs with 32
# and 64 local experts came 25-48% under their steps (10-13 thousand kernels per step, the GPU busy
# for 0.34-0.63 s of 0.74-0.86 s). Fitted on those five (0.43 ms, E 12.22 ms), the next three,
# planned blind, came -3.1% (24 experts), +28.6% (40) and +36.1% (128), where the overheads without
# the term said -29.9%, -14.5% and -61.6%. Read off the host probes, where the GPU idles, 8 -> 32
# local experts added 0.11-0.14 ms of forward and backward per expert and 32 -> 128 added
# 0.17-0.24 ms, on both hosts: growing a little faster than the expert count, so one number per
# expert is a first-order term. The second host ran every probe 7-39% faster than the first.
# CP_STEP is the host time of an A block's context-parallel ring steps beyond the first: TE's
# attention under CP runs one fused-attention call and one exchange of the next K/V chunk per step
# of the ring, forward and backward. Without it the dense stack at CP2 and sequence 4096, host-bound,
# came 14-21% under its step on every H200 host it ran on (gpu_runs_h200x2_te.json,
# gpu_runs_h200x2_te_fusions.json with and without fusions, and, not fitted,
# gpu_runs_h200x2_te_host1.json and gpu_runs_h200x2_te_host2.json), and A and D were pulled up to
# hold that excess. With it those five come -7.5% to +0.4%, the GPU-bound CP2 runs at sequence
# 16384 do not move (-1.1%, -3.1%), and the blind CP2 x EP2 MoE run moves from +1.6% to +11.0%; D
# falls from 2.89 to 2.13 ms, which moves two host-bound dense runs on slower hosts past 15%
# (te-dense-tp2-sp on gpu_runs_h200x2_te_host1.json -10.2% to -16.7%, blind set 6's dense run -10.9%
# to -17.8%). Over all committed runs 188 of 248 come within 15%, against 183 without it.
# On ranks with E blocks the host waits for the GPU at the dispatcher's synchronisation, and
# Efficiency.te_sync_exposed of the shorter of host and GPU time shows on top of the longer; the fit
# holds it at 0.4. Left out one at a time the fit predicts 59 of the 81 within 15% (37 within 5%,
# median 5.6%, worst -40%, the 8-expert probe on the slower host). Without CP_STEP (A 5.14, D 2.89,
# E 9.21, M 7.89, R 2.90 ms, expert 0.244 ms, traffic 18.29) 57 (39 within 5%, median 5.3%, worst
# +46%, the dense probe on the faster host). Without the synchronised share
# (A 5.10, D 2.92, E 12.97, M 8.23, R 2.92 ms, expert 0.225 ms, traffic 19.07) 54 (34 within 5%,
# median 7.4%). Fitted on the 71 runs before the host probes (A 5.10, D 3.73, E 12.66, M 7.85,
# R 2.95 ms, expert 0.32 ms, traffic 19.08; 52 of 71 within 15%, median 7.1%) it had put the probes
# 4% under to 51% over. On
# the 63 H200 runs before the expert
# term (A 5.00, D 3.91, E 14.44, M 7.88, R 3.06 ms, traffic 18.44) 50 of 63 (27 within 5%, median
# 5.5%), before the gradient accumulation was a term of its own and SP's backward all-gather
# counted (A 5.00, D 3.99, E 14.45, M 7.85, R 3.06 ms, traffic 23.12) 49 (21 within 5%, median
# 8.3%), before the optimizer step was, 45 of 59 (median 7.7%), and before the 17 runs with fusions
# 29 of 42 (median 11%). The blind sets it did not see are gpu_runs_h200x1_te_blind3.json,
# gpu_runs_h100x1_te_blind.json, the blind runs of gpu_runs_h200x2_te_blind4.json and
# gpu_runs_h200x2_te_blind5.json (README).
MEASURED_TE_SMALL_KERNEL_TRAFFIC = 18.30
MEASURED_TE_BLOCK_OVERHEAD_S = (("A", 5.25e-3), ("D", 2.13e-3), ("E", 9.00e-3), ("M", 8.18e-3), ("R", 2.79e-3),
                                (CP_STEP, 2.03e-3), (EXPERT, 0.247e-3))


# A step whose per-block host time (Estimate.host_seconds, hidden behind the GPU or not) is at
# least this share of it is bound by the host and by synchronisation rather than by the GPU, or
# near it. Over the 231 committed runs of megacpp's runtime (benchmarks/gpu/compare.py): below
# the share, 45 runs within 16.4% (median 3.6%); at or above it, 186 runs with a median error of
# 8.2% and up to 66% (b7-h100-te-moe-e8-top1-plain-mbs4, blind set 7,
# gpu_runs_h100x1_te_blind7.json: planned 0.474 s, measured 0.285; and hp-h100-te-e128 on the third
# host of the probes, gpu_runs_h100x1_te_host3.json, 0.779 s against 0.480). Host-bound steps move with the
# host: the five host probes (gpu_runs_h100x1_te_host*.json) took 1.3-2.0 times as long on the
# slowest of three H100 hosts as on the fastest (four E blocks of 32 experts: 0.982, 0.605 and
# 0.484 s), where one plan cannot be within 15% of both.
HOST_BOUND_SHARE = 0.30
HOST_BOUND_ERROR = 0.66


@dataclass(frozen=True)
class Efficiency:
    """Tunable factors; `megacpp calibrate` fits the per-letter block overheads from measured runs."""

    # fraction of MAMF a training step sustains, for presets without a kernel-rate table (fp8, and
    # GPUs not measured): the profiled matmul kernel time of dense-tp8 (0.259 s per step,
    # benchmarks/results/gpu_runs_h200x8.json) equals the FLOP model's at 0.70
    matmul: float = 0.70
    # fraction of HBM bandwidth the unfused softmax chain sustains, for presets without a kernel-rate
    # table: the whole chain (the "softmax" rows of planner/cost/rates/h200.json and h100.json, >= 1 G
    # scores) moved its 60 B per score at 0.45-0.47 of HBM on H200 and 0.53-0.56 on H100
    hbm: float = 0.50
    # Data-parallel collectives overlap compute (the render's --overlap-grad-reduce and, with the
    # distributed optimizer, --overlap-param-gather; the runtime's DDP alike): gradients reduce
    # bucket by bucket during the last micro-batch's backward, parameters gather during the first
    # micro-batch's forward. What the step still waits on is this share of the collective, or its
    # excess over that window where the window is shorter (communication, `hidden`). Profiled on 2 x
    # H200 (benchmarks/results/gpu_runs_h200x2_dp_overlap.json, exposed_communication_seconds: NCCL
    # time no other kernel covers), on a 3.9 B-parameter dense stack at DP2: the reduce-scatter
    # exposed 2.3-3.8 ms of the 30.5 ms priced (0.10; the same at 2 and 8 micro-batches), the
    # all-reduce without the distributed optimizer 4.9-7.2 ms of 48 ms (0.125), the all-gather
    # 3.6-6.5 ms of 14.9 ms (0.30). The last parameters' gradients (the embedding's, 7% of them
    # there) come out at the very end of the backward, the first bucket's parameters are gathered
    # before the forward can start.
    grad_reduce_exposed: float = 0.11
    param_gather_exposed: float = 0.30
    # MoE under TE: megatron-core's token dispatchers copy the routed-token counts to the host in
    # every MoE layer's forward (TE's grouped GEMM takes the split sizes as a host list), so the
    # host waits for the GPU there and cannot run ahead across it. On ranks with E blocks this
    # share of the shorter of host and GPU time adds to the longer (exposed_host_seconds). Chosen
    # by leave-one-out over the pooled TE fit (MEASURED_TE_BLOCK_OVERHEAD_S, refitted at each
    # value; before CP_STEP): 0.0, 0.2, 0.4, 0.6, 0.8 and 1.0 put 54, 56, 57, 56, 54 and 55 of the 81 within 15%
    # (median 7.4, 6.7, 5.3, 5.6, 6.1 and 7.0%), and 20, 21, 21, 20, 19 and 18 of the 21 blind
    # runs. Blind set 6 on one H100 (gpu_runs_h100x1_te_blind6.json) had run, planned without it,
    # when the value was chosen; it moved its MoE runs from -23%, -40% and -6.6% to -16%, -32% and
    # -3.2%. Traced (benchmarks/results/trace_phases_h100x1_te.json, benchmarks/gpu/trace_phases.py),
    # an MoE rank's forward is host-bound (the GPU idles 60-66% of it, ten waits per micro-batch)
    # and its backward GPU-bound where the experts are wide; the longer of host and GPU time taken
    # per phase instead fitted no better (README, "Traces of where the time goes").
    te_sync_exposed: float = 0.4
    # The optimizer step (Adam over this rank's shard, the gradient norm and clipping): seconds =
    # optimizer state bytes x traffic / HBM bandwidth + fixed, per backend. Fitted to the measured
    # optimizer time of every committed run without pipeline stages waiting on each other
    # (per_rank_optimizer_seconds, benchmarks/results/): with TE installed Megatron steps with TE's
    # FusedAdam, 5.38 bytes per byte of state + 1.0 ms (39 runs on H200 and H100, median error 4.8%),
    # without it with torch's Adam, 9.13 + 5.5 ms (33 runs, median 8.0%; the small shards of TP4
    # and TP8 up to 34% off).
    # Without gradient-accumulation fusion (the render passes --no-gradient-accumulation-fusion, it
    # needs Apex; the runtime sets it off alike) every weight gradient comes out of its backward in
    # bf16 and megatron-core's DDP hook adds it into the fp32 main_grad buffer
    # (distributed_data_parallel.py: param.main_grad.add_(param.grad.data)): one elementwise add per
    # weight per micro-batch, reading the buffer and the gradient and writing the buffer (10 B per
    # parameter). Profiled (most_launched, the fp32 CUDAFunctor_add kernels: one per weight tensor per
    # micro-batch) on 2 x H200 it moved those bytes at 2.12-2.75 TB/s, median 2.49 over 19 runs of
    # the runtime and of Megatron-LM (benchmarks/results/gpu_runs_h200x2_dp_overlap.json,
    # gpu_runs_h200x2_megatronlm_dp_overlap.json, gpu_runs_h200x2_te_fusions.json,
    # gpu_runs_h200x2_megatronlm_te_host3.json), and on one H100 at 2.09-2.45 TB/s, median 2.31 over
    # eight (gpu_runs_h100x1_te_grouped.json, gpu_runs_h100x1_te_experts.json): about the same rate on
    # both, so those presets carry it (Cluster.grad_accumulation_tbps). Presets without a measured
    # rate take the H200's share of HBM bandwidth (grad_accumulation_seconds).
    grad_accumulation_hbm: float = 0.52
    # With TE the optimizer step's host work grows with the rank's parameter tensors
    # (StageMemory.param_tensors): megatron-core's distributed optimizer copies gradients into and
    # parameters out of its shards tensor by tensor, and the gradient norm and FusedAdam take lists
    # of them. On two H100 hosts, stacks so small that the GPU idles (hidden 512, 15 to 525 tensors:
    # 8 to 128 local experts, benchmarks/results/gpu_runs_h100x1_te_host.json) stepped in 1 ms plus
    # 42-112 us per tensor (72 us by least squares over the ten runs). That host work overlaps the
    # state's HBM traffic: the step takes the longer of the two (optimizer_seconds). A third host
    # (gpu_runs_h100x1_te_host3.json, not in the value) stepped the same probes at 38-55 us per
    # tensor (21.5 ms for 525 tensors, 41.1 and 37.6 ms on the first two).
    optimizer_tensor_s: float = 70e-6
    optimizer_traffic: float = 5.38
    optimizer_fixed_s: float = 1.0e-3
    local_optimizer_traffic: float = 9.13
    local_optimizer_fixed_s: float = 5.5e-3
    # allocated beyond weights, gradients, optimizer state and the score buffer between steps:
    # 0.07-0.12 GiB on the five 8 x H200 runs (cuBLAS workspaces, RNG state, masks)
    overhead_gib: float = 0.1
    block_overhead_s: tuple[tuple[str, float], ...] = MEASURED_BLOCK_OVERHEAD_S  # local modules
    # with Transformer Engine modules (fused attention, TE norms and linears, grouped expert GEMMs)
    te_block_overhead_s: tuple[tuple[str, float], ...] = MEASURED_TE_BLOCK_OVERHEAD_S
    # GPU time of the small kernels (norms, activations, rotary, casts, residual adds) as HBM
    # traffic per byte of saved activations (small_kernel_seconds); `megacpp calibrate` fits it
    # with the overheads: 0 for local modules, whose small kernels hide behind their host time
    small_kernel_traffic: float = 0.0
    te_small_kernel_traffic: float = MEASURED_TE_SMALL_KERNEL_TRAFFIC

    def overhead(self, letter: str, te: bool = False) -> float:
        """Seconds per block of this letter per micro-batch, forward and backward."""
        local = dict(self.block_overhead_s).get(letter, 0.0)
        return dict(self.te_block_overhead_s).get(letter, local) if te else local

    def traffic(self, te: bool = False) -> float:
        return self.te_small_kernel_traffic if te else self.small_kernel_traffic

    def optimizer(self, te: bool = False) -> tuple[float, float]:
        """(bytes moved per byte of optimizer state, fixed seconds) of one optimizer step."""
        return (self.optimizer_traffic, self.optimizer_fixed_s) if te else (self.local_optimizer_traffic, self.local_optimizer_fixed_s)


DEFAULT_EFFICIENCY = Efficiency()


@dataclass(frozen=True)
class StageMemory:
    pp_rank: int
    params: int
    params_expert: int
    weights_gib: float
    gradients_gib: float
    optimizer_gib: float
    activations_gib: float
    buffers_gib: float
    overhead_gib: float
    transient_gib: float = 0.0  # largest short-lived allocation of forward+backward (loss, a block's backward)
    optimizer_step_gib: float = 0.0  # held only while the optimizer steps (activations are gone by then)
    transient_from: str = "nothing beyond the activations"  # what the transient is
    param_tensors: int = 0  # parameter tensors on the rank (blocks.block_param_tensors): the optimizer's host work

    @property
    def resident_gib(self) -> float:
        """What stays allocated between steps."""
        return self.weights_gib + self.gradients_gib + self.optimizer_gib + self.buffers_gib + self.overhead_gib

    @property
    def total_gib(self) -> float:
        """Peak allocated: the larger of the forward+backward peak and the optimizer-step peak."""
        return self.resident_gib + max(self.activations_gib + self.transient_gib, self.optimizer_step_gib)

    def to_dict(self) -> dict[str, float | int]:
        r = lambda x: round(x, 3)  # noqa: E731
        return {
            "pp_rank": self.pp_rank,
            "params": self.params,
            "params_expert": self.params_expert,
            "param_tensors": self.param_tensors,
            "weights_gib": r(self.weights_gib),
            "gradients_gib": r(self.gradients_gib),
            "optimizer_gib": r(self.optimizer_gib),
            "activations_gib": r(self.activations_gib),
            "buffers_gib": r(self.buffers_gib),
            "transient_gib": r(self.transient_gib),
            "transient_from": self.transient_from,
            "optimizer_step_gib": r(self.optimizer_step_gib),
            "overhead_gib": r(self.overhead_gib),
            "resident_gib": r(self.resident_gib),
            "total_gib": r(self.total_gib),
            "reserved_gib": r(self.total_gib * RESERVED_OVER_ALLOCATED),
        }


@dataclass(frozen=True)
class Comm:
    axis: str
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
class Estimate:
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


def _rank_stages(stages: list[Stage], pp_rank: int) -> list[Stage]:
    return [s for s in stages if s.pp_rank == pp_rank]


def in_flight(lay: Layout, pp_rank: int) -> float:
    """Micro-batches (in units of a full stage) whose activations one rank holds at peak [R37]."""
    m = lay.num_microbatches
    if lay.vpp == 1:
        return min(m, lay.pp - pp_rank)
    warmup_chunks = (lay.pp - pp_rank - 1) * 2 + (lay.vpp - 1) * lay.pp
    return min(m * lay.vpp, warmup_chunks + 1) / lay.vpp


def stage_memory(ctx: Context, lay: Layout, stages: list[Stage], eff: Efficiency, load: float = 1.0) -> list[StageMemory]:
    out = []
    distopt = ctx.spec.training.distributed_optimizer
    tokens = micro_batch_tokens(ctx, lay)
    recompute = ctx.spec.training.recompute
    kept = {letter: block_activation_bytes(ctx, letter, lay, load) * tokens for letter in ctx.letters}  # per micro-batch
    # what the backward of a fully recomputed block holds again: its activations as without recompute
    rebuilt = {letter: block_activation_bytes(ctx, letter, lay, load, recompute="none") * tokens
               for letter in ctx.letters} if recompute == "full" else {}
    for p in range(lay.pp):
        mine = _rank_stages(stages, p)
        dense = expert = tensors = 0
        act_per_mb = 0.0
        loss = 0.0
        has_attention = False
        for st in mine:
            for letter, n in Counter(st.blocks).items():
                bp = block_params(ctx, letter, lay)
                dense += n * bp.dense
                expert += n * bp.expert
                tensors += n * block_param_tensors(ctx, letter, lay)
                act_per_mb += n * kept[letter]
            has_attention = has_attention or "A" in st.blocks
            if st.embedding:
                dense += embedding_params(ctx, lay)
                tensors += embedding_param_tensors(ctx)
                act_per_mb += BF16 * ctx.spec.model.hidden_size * tokens / (lay.tp if lay.sp else 1)
            if st.output_head:
                dense += head_params(ctx, lay)
                tensors += head_param_tensors(ctx, lay)
                # the vocab-parallel loss's fp32 logits (softmax and its gradient are computed in
                # place in them) next to the bf16 logits: the forward+backward peak of the last
                # stages of sweep-dense-h1024, hybrid-ader-pp2, dense-pp2 and dense-pp4 exceeds
                # resident memory plus activations by 5.6-6.1 B per logit (gpu_runs_h200x*.json)
                loss = (BF16 + FP32) * tokens * padded_vocab(ctx, lay.tp) / lay.tp
        scores = unfused_scores(ctx, lay) if has_attention else 0.0
        blocks = "".join(st.blocks for st in mine)
        # the gradients a block's backward holds beside what it kept: the score gradients of an
        # unfused attention, and the routed tokens' gradients of an expert block
        grads = {"A": (SELECTIVE_BACKWARD_BYTES if recompute == "selective" else UNFUSED_BACKWARD_BYTES) * scores,
                 "E": expert_backward_bytes(ctx, lay, load) * tokens}
        # the last block of a kind is back-propagated first, after the blocks behind it freed theirs
        freed_behind = {letter: sum(kept[x] for x in blocks[blocks.rindex(letter) + 1:]) for letter in set(blocks)}
        # what the transient is, in words (StageMemory.transient_from), by size
        candidates = [(loss, "the loss's logits")]
        if recompute == "full":
            # the backward of a fully recomputed block re-runs its forward: its activations as
            # without recompute come back on top of the checkpoints, with its gradients: the
            # forward+backward peak of large-dense-full-mbs2 is 16.82 GiB above resident,
            # predicted 0.56 of checkpoints + 16.38 (benchmarks/results/gpu_runs_h200x2_large.json)
            candidates += [(rebuilt[letter] + grads.get(letter, 0.0), f"the backward of a recomputed {BLOCK_LETTERS[letter]} block")
                           for letter in sorted(set(blocks))]
        else:
            candidates += [(grads[letter] - freed_behind[letter],
                            f"the gradients of the last {BLOCK_LETTERS[letter]} block's backward")
                           for letter in grads if letter in blocks]
        # a weight's bf16 gradient until it is added into main_grad (blocks.weight_gradient_bytes),
        # the largest in the last block of its kind
        candidates += [(weight_gradient_bytes(ctx, letter, lay) - freed_behind[letter],
                        f"the bf16 gradient of the last {BLOCK_LETTERS[letter]} block's largest weight")
                       for letter in sorted(set(blocks))]
        transient, transient_from = max(candidates, key=lambda c: c[0])
        if transient <= 0:
            transient, transient_from = 0.0, "nothing beyond the activations"
        total = dense + expert
        dense_shard = lay.dp * lay.cp if distopt else 1
        expert_shard = max(lay.edp, 1) if distopt else 1
        if lay.ep == 1:
            # with EP=1 megatron-core flags expert weights allreduce=True (tensor_parallel/layers.py
            # ColumnParallelLinear: "allreduce", not (is_expert and expert_parallel)), so DDP and
            # the distributed optimizer treat them as dense: one buffer, sharded over DP*CP
            sharded = ((dense + expert, dense_shard), (0, 1))
        else:
            sharded = ((dense, dense_shard), (expert, expert_shard))
        out.append(
            StageMemory(
                pp_rank=p,
                params=total,
                params_expert=expert,
                weights_gib=BF16 * total / GIB,
                gradients_gib=FP32 * total / GIB,
                optimizer_gib=sum(3 * FP32 * n / shard for n, shard in sharded) / GIB,
                activations_gib=act_per_mb * in_flight(lay, p) / GIB,
                buffers_gib=(SCORE_BUFFER_BYTES * scores + (TE_GROUPED_GEMM_WORKSPACE_BYTES if ctx.te and "E" in blocks else 0)) / GIB,
                overhead_gib=eff.overhead_gib,
                transient_gib=transient / GIB,
                transient_from=transient_from,
                optimizer_step_gib=0.0 if ctx.te else OPTIMIZER_STEP_BYTES * max(n / shard for n, shard in sharded) / GIB,
                param_tensors=tensors,
            )
        )
    return out


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
    busiest = max(range(lay.pp), key=lambda p: sum(len(s.blocks) for s in _rank_stages(stages, p)))
    blocks = "".join(s.blocks for s in _rank_stages(stages, busiest))
    out: list[Comm] = []

    def add(axis: str, collective: str, n: int, span: int, size: float, count: float, exposed: float = 1.0,
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
        # LinearWithGradAccumulationAndAsyncCommunication.backward, TE's Linear alike). Profiled on
        # 2 x H200, TP2+SP: 3 all-gathers and 2 reduce-scatters per block per micro-batch
        # (b5-te-h8192-seq2048-m16-tp2-sp, benchmarks/results/gpu_runs_h200x2_te_blind5.json).
        link = _link(ctx, lay.tp)
        n = len(blocks) * m * passes
        if lay.sp:
            gather = _collective_seconds(ctx, "all-gather", link, lay.tp, act)
            regathers = len(blocks) * m
            sec = n * (gather + _collective_seconds(ctx, "reduce-scatter", link, lay.tp, act)) + regathers * gather
            moved = act * (n + regathers / 2)  # an all-gather moves half of what an AG+RS pair does
        else:
            sec, moved = n * _collective_seconds(ctx, "all-reduce", link, lay.tp, act), act * n
        out.append(Comm("tp", tp_collective, lay.tp, moved, link, sec, sec))
    if lay.cp > 1:
        model = ctx.spec.model
        if "A" in blocks:
            kv = BF16 * tokens * 2 * model.query_groups * model.head_dim / min(lay.tp, model.query_groups)
            # ring exchange of K,V in forward and dK,dV in backward, (cp-1) hops each
            add("cp", "send-recv", lay.cp, lay.tp * lay.cp, kv, blocks.count("A") * m * 3 * (lay.cp - 1))
        if "M" in blocks:
            add("cp", "all-to-all", lay.cp, lay.tp * lay.cp, act / lay.tp * 2, blocks.count("M") * m * 2 * passes)
    if lay.ep * lay.etp > 1 and "E" in blocks:
        moe = ctx.spec.model.moe
        assert moe is not None
        routed = BF16 * moe.top_k * tokens / (lay.tp if lay.sp else 1) * h * load
        # dispatch + combine in forward and again in backward
        add("ep", "all-to-all", lay.ep * lay.etp, lay.ep * lay.etp, routed, blocks.count("E") * m * 2 * passes)
        if lay.etp > 1:
            # expert TP gathers the routed tokens before the experts and reduce-scatters after
            add("etp", "all-gather", lay.etp, lay.etp, routed * lay.etp, blocks.count("E") * m * passes)
            add("etp", "reduce-scatter", lay.etp, lay.etp, routed * lay.etp, blocks.count("E") * m * passes)
    if lay.pp > 1:
        add("pp", "send-recv", 2, ctx.world, act / (lay.tp if lay.sp else 1), 2 * m * lay.vpp)
    big = mem[busiest]
    dense, expert = big.params - big.params_expert, big.params_expert
    dp_span = lay.tp * lay.cp * lay.dp
    forward, backward = window
    for axis, n, params in (("dp", lay.dp * lay.cp, dense), ("edp", lay.edp, expert)):
        if n > 1 and params:
            if ctx.spec.training.distributed_optimizer:
                add(axis, "reduce-scatter", n, dp_span, FP32 * params, 1, eff.grad_reduce_exposed, backward)
                add(axis, "all-gather", n, dp_span, BF16 * params, 1, eff.param_gather_exposed, forward)
            else:
                add(axis, "all-reduce", n, dp_span, FP32 * params, 1, eff.grad_reduce_exposed, backward)
    return out


def matmul_seconds(ctx: Context, lay: Layout, letter: str, eff: Efficiency, load: float = 1.0) -> float:
    """GPU seconds of one block's matmuls ("head": the output layer) per micro-batch on one rank,
    forward and backward plus what recompute repeats: from the preset's measured kernel-rate table
    (planner/cost/kernel_rates.py) in bf16, else FLOPs at MAMF x Efficiency.matmul."""
    c = ctx.cluster
    fp8 = ctx.spec.training.precision == "fp8"
    rate = (c.mamf_fp8_tflops if fp8 else c.mamf_bf16_tflops) * 1e12 * eff.matmul
    recompute = ctx.spec.training.recompute
    again = gpu_repeats(recompute)
    if letter == "head":
        gemms = head_gemms(ctx, lay)
        again = 1.0  # the output layer is outside the recomputed blocks
    else:
        gemms = block_gemms(ctx, letter, lay, load)
    rates = kernel_rates(c.name)
    if rates is None or fp8:
        return 3 * gemms.flops * again / rate
    linears = sum(n * rates.linear_seconds(m, k, nn) for m, k, nn, n in gemms.linears)
    linears += sum(rates.grouped_linear_seconds(g, m, k, n) for m, k, n, g in gemms.grouped)
    attention = rates.attention_seconds(*gemms.attention) if gemms.attention else 0.0
    fused = rates.fused_attention_seconds(*gemms.fused_attention) if gemms.fused_attention else None
    attention_again = 4 / 3 if recompute != "none" else 1.0  # selective recompute repeats core attention
    if gemms.recurrence:
        other = rates.recurrence_seconds(*gemms.recurrence)
    elif gemms.ssd and (scan := rates.ssd_seconds(*gemms.ssd)) is not None:
        other = scan
    elif fused is not None:  # TE's fused core attention, timed instead of priced by its FLOPs
        other, attention = 0.0, fused
    else:  # a table without SSD or fused-attention rows
        other = 3 * gemms.other_flops / rate
    return (linears + other) * again + attention * attention_again


def softmax_seconds(ctx: Context, lay: Layout, eff: Efficiency) -> float:
    """GPU seconds of one unfused attention's softmax chain per micro-batch on one rank, forward and
    backward plus the forward recompute repeats (0 with TE's fused attention): from the preset's
    kernel-rate table, else its HBM traffic at HBM x Efficiency.hbm."""
    scores = unfused_scores(ctx, lay)
    if not scores:
        return 0.0
    forwards = 1 if ctx.spec.training.recompute == "none" else 2  # selective and full recompute repeat it
    rates = kernel_rates(ctx.cluster.name)
    if rates is not None:
        heads = ctx.spec.model.attention.num_heads  # type: ignore[union-attr]
        return rates.softmax_seconds(lay.micro_batch_size * heads // lay.tp, ctx.seq // lay.cp, forwards)
    traffic = scores * (forwards * UNFUSED_SOFTMAX_BYTES_FORWARD + UNFUSED_SOFTMAX_BYTES_BACKWARD)
    return traffic / (ctx.cluster.hbm_tbps * 1e12 * eff.hbm)


def small_kernel_seconds(ctx: Context, lay: Layout, blocks: str, load: float = 1.0) -> float:
    """Seconds of one micro-batch's small kernels on one rank per unit of Efficiency.traffic: the
    blocks' saved activation bytes (as without recompute; block_activation_bytes) over HBM
    bandwidth. Those kernels read and write tensors of the activations' sizes, so their time
    follows the tokens of a micro-batch, not the micro-batch count: on the dense TE runs of
    benchmarks/results/gpu_runs_h200x1_te.json the profiled small kernels took 0.13-0.15 s per step
    at eight micro-batches of 4096 tokens and four of 8192 alike."""
    saved = sum(n * block_activation_bytes(ctx, letter, lay, load, recompute="none") for letter, n in Counter(blocks).items())
    return saved * micro_batch_tokens(ctx, lay) / (ctx.cluster.hbm_tbps * 1e12)


def gpu_repeats(recompute: str) -> float:
    """A block's forward + backward GPU work under a recompute mode, in units of it without
    recompute: full recompute runs every forward again (forward 1, backward 2, so 4/3)."""
    return 4 / 3 if recompute == "full" else 1.0


def host_repeats(recompute: str, te: bool) -> float:
    """The per-block overhead of one micro-batch under a recompute mode, in units of its overhead
    without recompute. Full recompute runs every forward again: 4/3 for the local modules, whose
    overheads hold their small kernels' GPU time too. Under TE, where the overhead is host time, a
    step under full recompute took no more host time than one without: the MEAE hybrid under full
    recompute on one H200 took 0.695 s (blind3-te-hybrid-meae-full,
    benchmarks/results/gpu_runs_h200x1_te_blind3.json), its per-block host time unrepeated 0.701 s
    and repeated 0.935 s, and on a faster host (gpu_runs_h200x2_te_trace2.json) its (AE), (AMDM)
    and MEAE stacks took 0.35-0.59 s where repeated host time said 0.60-0.94 s. The first forward
    runs without autograd, which records nothing for the backward."""
    return 1.0 if te else gpu_repeats(recompute)


def host_units(ctx: Context, lay: Layout, blocks: str) -> Counter[str]:
    """What one micro-batch's host time is counted in on a rank: its blocks per letter and, under
    Transformer Engine, the local experts of its E blocks (EXPERT) and, under context parallelism,
    each A block's ring steps beyond the first (CP_STEP), each at its overhead
    (Efficiency.overhead)."""
    units = Counter(blocks)
    if ctx.te and units["E"]:
        units[EXPERT] = units["E"] * ctx.spec.model.moe.num_experts // lay.ep  # type: ignore[union-attr]
    if ctx.te and units["A"] and lay.cp > 1:
        units[CP_STEP] = units["A"] * (lay.cp - 1)
    return units


def exposed_host_seconds(gpu: float, host: float, te: bool, synced: float = 0.0) -> float:
    """The part of a micro-batch's per-block overhead (`host`) that adds to its GPU time (`gpu`).

    With Transformer Engine the small kernels' GPU time is a term of its own, so what the overhead
    holds is host time (Python, launches, the dispatcher's synchronisation), and the host queues
    kernels ahead of the GPU: a micro-batch takes the longer of the two, and only the host's excess
    shows. The GPU-bound TE runs on H200 leave the GPU idle for 2-6% of the step (profiled kernel
    time against the step, exposed communication included), while the whole overhead added had put
    two GPU-bound blind runs 17% and 34% over (blind-te-dense-h2048-dp2-mbs2 and
    blind-te-mamba-md-dp2, benchmarks/results/gpu_runs_h200x2_te_blind.json). Where the host waits
    for the GPU inside the micro-batch (`synced`: Efficiency.te_sync_exposed for ranks with E
    blocks) that share of the shorter of the two shows as well. The local modules' overheads also
    hold their small kernels' GPU time (their traffic is 0), so there the whole overhead adds."""
    return max(host - gpu, 0.0) + synced * min(host, gpu) if te else host


def optimizer_seconds(ctx: Context, stage: StageMemory, eff: Efficiency) -> float:
    """One optimizer step of a stage's rank: its optimizer state (fp32 main parameters and Adam
    moments, sharded with the distributed optimizer) read and written, with the gradients and
    the bf16 parameters, at HBM bandwidth (Efficiency.optimizer); with TE, or the host's work
    per parameter tensor where that is longer (Efficiency.optimizer_tensor_s: hundreds of small
    expert weights)."""
    traffic, fixed = eff.optimizer(ctx.te)
    state = stage.optimizer_gib * GIB * traffic / (ctx.cluster.hbm_tbps * 1e12)
    host = stage.param_tensors * eff.optimizer_tensor_s if ctx.te else 0.0
    return max(state, host) + fixed


def grad_accumulation_seconds(ctx: Context, stage: StageMemory, eff: Efficiency) -> float:
    """One micro-batch's weight gradients of a stage's rank added into the gradient buffer
    at the rate measured on the preset's GPU (Cluster.grad_accumulation_tbps), else at
    Efficiency.grad_accumulation_hbm of its HBM bandwidth: the buffer read and written, the bf16
    gradient read."""
    moved = 2 * stage.gradients_gib * GIB + BF16 * stage.params
    rate = ctx.cluster.grad_accumulation_tbps or ctx.cluster.hbm_tbps * eff.grad_accumulation_hbm
    return moved / (rate * 1e12)


def estimate(ctx: Context, lay: Layout, stages: list[Stage], eff: Efficiency = DEFAULT_EFFICIENCY,
             load: float = 1.0) -> Estimate:
    """Memory, communication and step time of one legal layout; `load` > 1 prices the busiest
    expert-parallel rank under routing imbalance (blocks.routed_load)."""
    mem = stage_memory(ctx, lay, stages, eff, load)
    precision = ctx.spec.training.precision
    c = ctx.cluster
    per_letter = {letter: block_flops(ctx, letter, load) for letter in ctx.letters}
    matmul = {letter: matmul_seconds(ctx, lay, letter, eff, load) for letter in [*ctx.letters, "head"]}
    softmax = softmax_seconds(ctx, lay, eff)
    # (matmul, softmax, exposed block overhead, small kernels, gradient accumulation, host, the
    # local experts' host) per micro-batch on each pipeline rank
    per_rank = []
    for p in range(lay.pp):
        mine = _rank_stages(stages, p)
        blocks = "".join(st.blocks for st in mine)
        head = any(st.output_head for st in mine)
        gemm = sum(matmul[letter] for letter in blocks) + (matmul["head"] if head else 0.0)
        units = host_units(ctx, lay, blocks)
        repeats = host_repeats(ctx.spec.training.recompute, ctx.te)
        host = sum(n * eff.overhead(key, ctx.te) for key, n in units.items()) * repeats
        experts = units[EXPERT] * eff.overhead(EXPERT, ctx.te) * repeats
        traffic = eff.traffic(ctx.te)
        small = traffic * small_kernel_seconds(ctx, lay, blocks, load) * gpu_repeats(ctx.spec.training.recompute) if traffic else 0.0
        scores = blocks.count("A") * softmax
        accumulate = grad_accumulation_seconds(ctx, mem[p], eff)
        synced = eff.te_sync_exposed if "E" in blocks else 0.0
        per_rank.append((gemm, scores, exposed_host_seconds(gemm + scores + small + accumulate, host, ctx.te, synced), small, accumulate,
                         host, experts))
    *terms, host, experts = max(per_rank, key=lambda r: sum(r[:5]))
    t_mb = sum(terms)
    gpu_mb = terms[0] + terms[1] + terms[3] + terms[4]
    # forward 1, backward 2 (+1 recomputed); the gradients accumulate in the backward
    forward = (gpu_mb - terms[4]) / (3 * gpu_repeats(ctx.spec.training.recompute))
    comms = communication(ctx, lay, stages, mem, eff, load, window=(forward, gpu_mb - forward))
    m = lay.num_microbatches
    pipeline_units = m + (lay.pp - 1) / lay.vpp
    compute = pipeline_units * t_mb
    per_mb_comm = sum(x.exposed_seconds for x in comms if x.axis in ("tp", "cp", "ep", "etp", "pp")) / m
    data_parallel = sum(x.exposed_seconds for x in comms if x.axis in ("dp", "edp"))
    optimizer = max(optimizer_seconds(ctx, stage, eff) for stage in mem)  # the stages step at once
    step = pipeline_units * (t_mb + per_mb_comm) + data_parallel + optimizer
    bubble = (lay.pp - 1) / lay.vpp / pipeline_units
    breakdown = (
        ("matmul", m * terms[0]),
        ("softmax", m * terms[1]),
        ("block_overhead", m * terms[2]),
        ("small_kernels", m * terms[3]),
        ("grad_accumulation", m * terms[4]),
        ("communication", m * per_mb_comm),
        ("bubble", (pipeline_units - m) * (t_mb + per_mb_comm)),
        ("data_parallel", data_parallel),
        ("optimizer", optimizer),
    )
    gbs_tokens = ctx.spec.training.global_batch_size * ctx.seq
    useful = per_letter if load == 1 else {letter: block_flops(ctx, letter) for letter in ctx.letters}
    model_flops = 3 * gbs_tokens * (sum(n * useful[b] for b, n in Counter(ctx.pattern.blocks).items()) + head_flops(ctx))
    peak = (c.fp8_tflops if precision == "fp8" else c.bf16_tflops) * 1e12
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
