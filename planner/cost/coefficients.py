"""Every fitted or measured number of the cost model, each with the run files it came from.

The files are the campaigns' results under benchmarks/evidence/; how each number was measured or
fitted, what it replaced and how well it predicts is told once in
benchmarks/evidence/cost_model_notes.md, under the term's name. Published hardware numbers stay
with their presets in planner/spec/clusters.py, which takes the measured ones from here.
"""

from __future__ import annotations

from dataclasses import dataclass

# Keys of the host-time tables beside the block letters (cost.host.host_units).
EXPERT = "expert"  # one local expert of an E block, per micro-batch
CP_STEP = "cp_step"  # one more context-parallel ring step of an A block's attention

# --- memory

# torch.cuda.max_memory_reserved over max_memory_allocated, median of 40 ranks (gpu_runs_h200x4.json)
RESERVED_OVER_ALLOCATED = 1.037
# the busiest EP rank's routed tokens over the mean in one micro-batch: at most 1.87
# (gpu_runs_h200x2_te_blind4.json, gpu_runs_h200x2_routing.json)
MEASURED_ROUTED_LOAD = 1.9
# the same in one MoE layer, what a fully recomputed stage's peak follows (gpu_runs_h200x2_te_layers.json)
MEASURED_LAYER_ROUTED_LOAD = 2.0

# --- host time per block per micro-batch, forward and backward (seconds)

# local modules, where it also holds the small kernels' GPU time: `megacpp calibrate` on
# gpu_runs_h200x8.json, gpu_runs_h200x4.json and gpu_runs_h200x1.json; M on gpu_runs_h200x1_mamba.json
MEASURED_BLOCK_OVERHEAD_S = (("A", 0.0), ("D", 2.93e-3), ("E", 12.86e-3), ("M", 0.95e-3), ("R", 2.78e-3))
# Transformer Engine, host time alone, with the small kernels' traffic per byte of saved
# activations: the pooled fit on 81 TE runs, 63 on H200 and 18 on H100 hosts (the files: notes,
# "Host time and overheads")
MEASURED_TE_BLOCK_OVERHEAD_S = (("A", 5.12e-3), ("D", 2.25e-3), ("E", 9.03e-3), ("M", 8.18e-3), ("R", 2.92e-3),
                                (CP_STEP, 2.18e-3), (EXPERT, 0.248e-3))
MEASURED_TE_SMALL_KERNEL_TRAFFIC = 18.63

# --- the host class: how fast a host issues GPU work (Cluster.host_launch_us)

# the host probe's time per tiny CUDA op (runtime/worker/measure/host.py), median over the 83 TE runs
# of the files the TE overheads above are fitted on, each run's slowest rank: the hosts those
# overheads hold (5.2-15.2 us per op on every rank; notes, "Host class")
REFERENCE_HOST_LAUNCH_US = 8.21
# a DGX H100 / H200 / B200 host (bare-metal two-socket Xeon) running Megatron-Bridge, in the same
# unit: FITTED with BLACKWELL_MATMUL_RATE_SCALE on the scale benchmark's 36 tuning rows, the pair
# with the most rows within 15%, then the least median |error| (python -m benchmarks.scale.fit_host;
# notes, "Host class")
DGX_HOST_LAUNCH_US = 3.30
# the Blackwell presets' sustained matmul rate over MAMF x Efficiency.matmul (whose 0.70 was
# measured on an H200; no Blackwell GPU has been profiled here): FITTED with DGX_HOST_LAUNCH_US on
# the scale benchmark's B200 tuning rows (python -m benchmarks.scale.fit_host; notes, "Blackwell
# matmul rate"), carried unfitted to GB200, B300 and GB300
BLACKWELL_MATMUL_RATE_SCALE = 0.88
# the share of an E block's own host time (not its local experts') that Megatron's "moe_router" and
# "moe_preprocess" CUDA-graph modules capture (the pre-MLP norm, the router and the dispatcher's
# preprocess, up to the routed-token counts' copy to the host): about 30 of the 110 kernels an E
# block launches besides its experts' in the host probes (gpu_runs_h100x1_te_host.json; notes, "CUDA graphs")
MOE_ROUTER_HOST_SHARE = 0.3

# --- the host-bound band

# the worst error of a step whose exposed host time decides it (cost.step.decides_the_step),
# b7-h100-te-moe-e8-top1-plain-mbs4 (gpu_runs_h100x1_te_blind7.json)
HOST_BOUND_ERROR = 0.66

# --- how far the plan's order of two layouts holds

# median |planned ratio / measured ratio - 1| between two layouts of one job (model, system,
# precision, GPUs, batch) that NVIDIA ran both of: the 12 pairs of the scale benchmark and its
# independent check (benchmarks/scale/results, "Measured side by side"); a smaller gap is not settled
LAYOUT_RATIO_ERROR = 0.10


def within_layout_error(delta: float) -> bool:
    """Whether two layouts' planned steps `delta` apart (relative) are within LAYOUT_RATIO_ERROR:
    an order the plan cannot settle."""
    return abs(delta) <= LAYOUT_RATIO_ERROR

# --- rates measured on the presets' GPUs (planner/spec/clusters.py)

# fp32 main_grad adds (CUDAFunctor_add<float>), median of 8 profiled runs on one H100
# (gpu_runs_h100x1_te_grouped.json, gpu_runs_h100x1_te_experts.json)
H100_GRAD_ACCUMULATION_TBPS = 2.31
# the same, median of 19 profiled runs on 2 x H200 (gpu_runs_h200x2_dp_overlap.json,
# gpu_runs_h200x2_megatronlm_dp_overlap.json, gpu_runs_h200x2_te_fusions.json, gpu_runs_h200x2_megatronlm_te_host3.json)
H200_GRAD_ACCUMULATION_TBPS = 2.49
# per-call latency through torch.distributed, median 8 KiB collective on 8 x H200 (nccl_h200x8.json)
H200_NVLINK_ALPHA_US = 59.0
# two H200s through torch.distributed: 1 GiB bus bandwidth and median 8 KiB latency (nccl_h200x2.json)
H200_PAIR_BUSBW_GBPS = {"all-reduce": 329.2, "all-gather": 265.4, "reduce-scatter": 259.1,
                        "all-to-all": 330.8, "send-recv": 360.0}
H200_PAIR_ALPHA_US = 23.5

# --- communication (cost.communication)

# the flex dispatcher's rate on (NVLink, the NIC) as a share of the preset's all-to-all bus bandwidth
# and per-GPU NIC rate; published, not fitted. DeepEP: 726/740 GB/s dispatch/combine on 8 x B200
# NVLink (V2, 64 SMs, README [R20]) against the b200 preset's 682, and 43-58 GB/s RDMA per CX-7 at
# EP16-64 (V1 normal kernels, docs/legacy.md [R21]) against 47: the links' rates. HybridEP: 536/531
# GB/s on 8 x B200 (Torch API, 16 SMs, README_Hybrid-EP.md [R24]): 0.79 of 682; 41-58 GB/s over IB
# at 16-64 H100 ranks [R24]: the NIC's rate
FLEX_LINK_SHARE = {"deepep": (1.0, 1.0), "hybridep": (0.79, 1.0)}


@dataclass(frozen=True)
class Efficiency:
    """Tunable factors; `megacpp calibrate` fits the per-letter block overheads from measured runs."""

    # share of MAMF a step's matmuls sustain without a kernel-rate table: dense-tp8 (gpu_runs_h200x8.json)
    matmul: float = 0.70
    # share of HBM bandwidth the unfused softmax sustains without a table: 0.45-0.56 (rates/h200.json, rates/h100.json)
    hbm: float = 0.50
    # share of the overlapped data-parallel collectives the step still waits on (gpu_runs_h200x2_dp_overlap.json)
    grad_reduce_exposed: float = 0.11
    param_gather_exposed: float = 0.30
    # share of the shorter of host and GPU time that adds on MoE ranks under TE: the best of 0-1 left
    # out one at a time over the pooled TE fit (notes, "Synchronisation share")
    te_sync_exposed: float = 0.4
    # share of HBM bandwidth of the gradient accumulation on presets without a measured rate: the H200's
    grad_accumulation_hbm: float = 0.52
    # the optimizer step's host work per parameter tensor under TE (gpu_runs_h100x1_te_host.json)
    optimizer_tensor_s: float = 70e-6
    # bytes moved per byte of optimizer state and fixed seconds, fitted to the measured optimizer time of
    # every committed run without waiting pipeline stages: TE's FusedAdam (39 runs), torch's Adam (33)
    optimizer_traffic: float = 5.38
    optimizer_fixed_s: float = 1.0e-3
    local_optimizer_traffic: float = 9.13
    local_optimizer_fixed_s: float = 5.5e-3
    # allocated beyond weights, gradients, optimizer state and buffers: 0.07-0.12 GiB (gpu_runs_h200x8.json)
    overhead_gib: float = 0.1
    block_overhead_s: tuple[tuple[str, float], ...] = MEASURED_BLOCK_OVERHEAD_S  # local modules
    # with Transformer Engine modules (fused attention, TE norms and linears, grouped expert GEMMs)
    te_block_overhead_s: tuple[tuple[str, float], ...] = MEASURED_TE_BLOCK_OVERHEAD_S
    # the small kernels' GPU time as HBM traffic per byte of saved activations (cost.step.small_kernel_seconds):
    # 0 for local modules, whose small kernels hide in their host time
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
