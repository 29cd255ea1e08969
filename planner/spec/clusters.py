"""Cluster presets and the resolved cluster the planner works with.

Every number carries its source tag; tags resolve in ../shared/reference/hardware_comm.md §8 and
are repeated in `SOURCES`. "ASSUMPTION" marks planner defaults that are not published facts;
"MEASURED" numbers measured on this project's GPUs, which live in planner/cost/coefficients.py.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from megacpp.planner.cost.coefficients import (
    BLACKWELL_MATMUL_RATE_SCALE,
    DGX_HOST_LAUNCH_US,
    H100_GRAD_ACCUMULATION_TBPS,
    H200_GRAD_ACCUMULATION_TBPS,
    H200_NVLINK_ALPHA_US,
    H200_PAIR_ALPHA_US,
    H200_PAIR_BUSBW_GBPS,
    REFERENCE_HOST_LAUNCH_US,
)
from megacpp.planner.errors import SpecError, did_you_mean
from megacpp.planner.spec.models import ClusterSpec

# the Cluster fields a cluster profile may set (`megacpp calibrate` on a table of the system's own
# measured runs, planner/calibrate/cluster_fit.py), each with the range its value must lie in.
# ASSUMPTION, wide on purpose: the host class 0.5-30 us per op, well outside every host probe
# reading (5.2-15.2 us); the matmul rate from half to 1.5x the preset's (beyond it the runs measure
# another GPU, not this one's clocks or kernels); the NIC from 1 GB/s to 400 GB/s per GPU
PROFILE_FIELDS = {"host_launch_us": (0.5, 30.0), "matmul_rate_scale": (0.5, 1.5), "nic_busbw_gbps": (1.0, 400.0)}

# the Cluster field that holds each collective's NVLink bus bandwidth
NVLINK_BUSBW_FIELDS = {
    "all-reduce": "nvlink_allreduce_gbps",
    "all-gather": "nvlink_allgather_gbps",
    "reduce-scatter": "nvlink_reducescatter_gbps",
    "all-to-all": "nvlink_alltoall_gbps",
    "send-recv": "nvlink_p2p_gbps",
}


class Cluster(BaseModel):
    """A fully resolved cluster: hardware numbers per GPU and per link, plus the node count."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    description: str
    nodes: int
    gpus_per_node: int
    nvlink_domain: int  # GPUs that share one NVLink/NVSwitch fabric
    gpu_memory_gib: float  # planning capacity per GPU (after context/NCCL/fragmentation headroom)
    gpu_memory_total_gib: float
    bf16_tflops: float  # dense peak
    mamf_bf16_tflops: float  # best achievable matmul rate
    fp8_tflops: float
    mamf_fp8_tflops: float
    # dense FP4 (NVFP4) peak and achievable rate where the GPU has FP4 tensor cores (Blackwell); None elsewhere
    fp4_tflops: float | None = None
    mamf_fp4_tflops: float | None = None
    # CUDA compute capability x 10 (90 Hopper, 100 B200/GB200, 103 B300/GB300, 121 GB10): what
    # Transformer Engine gates its FP8 and FP4 recipes on (rules/precision.py)
    compute_capability: int = 90
    hbm_tbps: float
    # bus bandwidth (nccl-tests busbw, GB/s) inside the NVLink domain
    nvlink_allreduce_gbps: float
    nvlink_allgather_gbps: float
    nvlink_reducescatter_gbps: float
    nvlink_alltoall_gbps: float
    nvlink_p2p_gbps: float
    nvlink_alpha_us: float
    # the same for a group of two GPUs, where it was measured: collective -> busbw, and the per-call
    # latency; NCCL moves less per GPU between two ranks than across the whole fabric
    nvlink_pair_gbps: dict[str, float] = {}
    nvlink_pair_alpha_us: float | None = None
    # rate (TB/s, bytes read and written) of megatron-core's DDP hook adding a bf16 weight gradient
    # into the fp32 main_grad buffer, where it was measured on the GPU; else Efficiency.grad_accumulation_hbm
    # of hbm_tbps. On Hopper the add runs at about the same rate on H100 and H200, well under the
    # H200's HBM bandwidth (cost.step.grad_accumulation_seconds)
    grad_accumulation_tbps: float | None = None
    # per-GPU bus bandwidth across the NIC (scale-out)
    nic_busbw_gbps: float
    nic_alpha_us: float
    # the host class: the host's time per tiny CUDA op (us), in the unit of the runtime's host probe
    # (runtime/worker/measure/host.py). The per-block host time under Transformer Engine was measured
    # on hosts of REFERENCE_HOST_LAUNCH_US and scales with it (cost.host.host_scale)
    host_launch_us: float = REFERENCE_HOST_LAUNCH_US
    # sustained copy rate (GB/s) between a GPU and its host's memory, each direction with both busy:
    # what activation offloading moves its tensors over (cost.step.offload_seconds)
    host_link_gbps: float
    # this system's sustained matmul rate over what the preset prices (its kernel-rate table's
    # times, or MAMF x Efficiency.matmul): 1 on the measured presets, BLACKWELL_MATMUL_RATE_SCALE on
    # the Blackwell ones; a cluster profile fitted to a table
    # of the system's own measured runs sets it (`megacpp calibrate`, planner/calibrate/cluster_fit.py)
    matmul_rate_scale: float = 1.0
    unified_memory: bool = False
    # the GPU kind (GPU_KINDS), None for an inline cluster that names none
    gpu: str | None = None
    # the preset whose measured kernel-rate table (cost.kernel_rates) prices the matmuls, None: FLOPs at MAMF
    kernel_table: str | None = None
    # where kernel_table cannot price a GEMM (none, or no FP8 rows of the recipe): the preset whose
    # measured table says how far below its MAMF a GEMM of each shape runs
    # (cost.step.untabled_linear_seconds, untabled_attention_seconds); None: every such GEMM at MAMF x Efficiency.matmul
    shape_table: str | None = None
    # a stated compute peak over the measured GPU's: the kernel-rate table's times are divided by it
    compute_scale: float = 1.0
    # what the numbers were built from that a plan should say (an override replacing a measurement,
    # numbers taken from another GPU)
    notes: tuple[str, ...] = ()
    # False where an inline cluster gave only its world shape (validate): step times are not meaningful,
    # and without memory_known memory is not checked (gpu_memory_gib is infinite)
    priced: bool = True
    memory_known: bool = True
    sources: dict[str, str] = {}

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    def nvlink(self, collective: str, n: int) -> tuple[float, float]:
        """Bus bandwidth (GB/s) and per-call latency (us) of a collective among `n` GPUs of the
        NVLink domain: a pair at the pair rates where the preset has them, else the fabric's."""
        if n == 2 and self.nvlink_pair_gbps:
            alpha = self.nvlink_alpha_us if self.nvlink_pair_alpha_us is None else self.nvlink_pair_alpha_us
            return self.nvlink_pair_gbps[collective], alpha
        return getattr(self, NVLINK_BUSBW_FIELDS[collective]), self.nvlink_alpha_us


_H100 = dict(
    description="HGX/DGX H100 SXM, 8 GPUs per node on NVSwitch, 1x400G NIC per GPU",
    gpus_per_node=8,  # [R5]
    nvlink_domain=8,  # 4x NVSwitch gen3 per node [R5][R2]
    gpu_memory_gib=75.0,  # ASSUMPTION: 79.21 GiB CUDA-visible [R11] minus ctx/NCCL/fragmentation
    gpu_memory_total_gib=79.65,  # nvidia-smi 81559 MiB [R11]
    bf16_tflops=989.0,  # dense [R4]
    mamf_bf16_tflops=794.5,  # [R4]
    fp8_tflops=1979.0,  # dense [R4]
    mamf_fp8_tflops=1402.6,  # [R4]
    compute_capability=90,  # sm_90 [R53]
    hbm_tbps=3.35,  # [R4][R50]
    nvlink_allreduce_gbps=370.0,  # ring, NVLS off [R43]
    nvlink_allgather_gbps=361.0,  # [R2]
    nvlink_reducescatter_gbps=363.0,  # [R2]
    nvlink_alltoall_gbps=370.0,  # "non-allreduce ops ~370" [R43]
    nvlink_p2p_gbps=370.0,  # ASSUMPTION: effective NVLink4 rate, as non-allreduce ops [R43]
    nvlink_alpha_us=18.0,  # DERIVED from the 32 KiB all-reduce on 8xH200 [R3]
    # one ConnectX-7 400 Gb/s (50 GB/s) per GPU: DGX H100/H200 [R5], DGX B200 [R6]; cost.communication
    # gives each GPU its own NIC. 46-48 GB/s per NDR NIC in nccl-tests [R46][R45]
    nic_busbw_gbps=47.0,
    nic_alpha_us=100.0,  # DERIVED, order of magnitude [R3]
    # DGX H100 / H200 / B200: bare-metal two-socket Xeon hosts (DGX B200: Xeon 8570 [R6]), not the
    # cloud VMs the per-block host time was measured on (FITTED)
    host_launch_us=DGX_HOST_LAUNCH_US,
    # PCIe Gen5 x16 to the host [R11][R9], and on DGX B200 and B300 too [R6][R58] (ASSUMPTION: the same
    # rate there): 49-50 GB/s a direction with both directions copying at once, 55 alone, measured on
    # an H100 (benchmarks/evidence/host-link-h100) [R60]
    host_link_gbps=49.0,
)

# The Blackwell presets have no kernel table of their own: their GEMMs run at no more than the share
# of MAMF the H100 measured at each shape (the same cuBLAS and TE grouped kernels; Blackwell's larger
# tiles fill its SMs at no smaller shapes, so this errs fast, not slow)
BLACKWELL_SHAPE_TABLE = "h100-sxm-8"
# what every Blackwell preset takes beside its datasheet numbers
_BLACKWELL = dict(
    shape_table=BLACKWELL_SHAPE_TABLE,
    matmul_rate_scale=BLACKWELL_MATMUL_RATE_SCALE,  # FITTED on the B200 rows (cost.coefficients)
)

PRESETS: dict[str, dict] = {
    "h100-sxm-8": {**_H100, "grad_accumulation_tbps": H100_GRAD_ACCUMULATION_TBPS, "kernel_table": "h100-sxm-8"},  # MEASURED
    "h200-sxm-8": {
        **_H100,
        "kernel_table": "h200-sxm-8",  # MEASURED (cost.kernel_rates)
        # its FP8 GEMMs, not in its table: the same GH100 die's measured FP8 rows
        "shape_table": "h100-sxm-8",
        "grad_accumulation_tbps": H200_GRAD_ACCUMULATION_TBPS,  # MEASURED
        "description": "HGX/DGX H200 SXM, 8 GPUs per node on NVSwitch, 1x400G NIC per GPU",
        "gpu_memory_gib": 135.0,  # ASSUMPTION: 140.4 GiB total [R51] minus headroom
        "gpu_memory_total_gib": 140.4,  # nvidia-smi 143771 MiB [R51]
        "mamf_fp8_tflops": 1453.4,  # [R4]
        "hbm_tbps": 4.8,  # [R4]
        "nvlink_allreduce_gbps": 367.6,  # ring, 16 GiB, 8xH200 [R2][R3]
        "nvlink_allgather_gbps": 361.4,  # [R2]
        "nvlink_reducescatter_gbps": 362.9,  # [R2]
        # through torch.distributed, as megatron-core calls NCCL; nccl-tests' own 18 us [R3] leaves out the framework
        "nvlink_alpha_us": H200_NVLINK_ALPHA_US,  # MEASURED
        # two GPUs move less per GPU than the whole fabric (MEASURED)
        "nvlink_pair_gbps": dict(H200_PAIR_BUSBW_GBPS),
        "nvlink_pair_alpha_us": H200_PAIR_ALPHA_US,  # MEASURED
    },
    "b200-sxm-8": {
        **_H100,
        **_BLACKWELL,
        "description": "HGX/DGX B200, 8 GPUs per node on NVLink5 switches, 1x400G NIC per GPU",
        "gpu_memory_gib": 172.0,  # ASSUMPTION: 179.06 GiB total [R51] minus headroom
        "gpu_memory_total_gib": 179.06,  # [R51]
        "bf16_tflops": 2250.0,  # [R4][R49]
        "mamf_bf16_tflops": 1745.0,  # [R4]
        "fp8_tflops": 4500.0,  # [R4]
        "mamf_fp8_tflops": 3432.5,  # [R4]
        "fp4_tflops": 9000.0,  # dense [R4][R49]
        "mamf_fp4_tflops": 9000.0 * 3432.5 / 4500.0,  # ASSUMPTION: the measured FP8 achievable/peak ratio
        "compute_capability": 100,  # sm_100 [R53]
        "hbm_tbps": 8.0,  # [R4]
        "nvlink_allreduce_gbps": 682.0,  # ring, 8 GPUs, 8 GiB [R2]
        "nvlink_allgather_gbps": 682.0,  # ASSUMPTION: ring rate as all-reduce [R2]
        "nvlink_reducescatter_gbps": 682.0,  # ASSUMPTION: as above
        "nvlink_alltoall_gbps": 682.0,  # ASSUMPTION: as above; DeepEP measured 726/740 on 8 x B200 [R20]
        "nvlink_p2p_gbps": 682.0,  # ASSUMPTION: as above
    },
    "gb200-nvl72": {
        **_H100,
        **_BLACKWELL,
        "description": "GB200 NVL72 rack: 4 GPUs per compute tray, one 72-GPU NVLink5 domain",
        "gpus_per_node": 4,  # compute tray [R10][R2]
        "nvlink_domain": 72,  # [R7]
        "gpu_memory_gib": 178.0,  # ASSUMPTION: 185.0 GiB total [R51] minus headroom
        "gpu_memory_total_gib": 185.0,  # [R51]
        "bf16_tflops": 2500.0,  # [R4][R49]
        "mamf_bf16_tflops": 1822.0,  # [R4]
        "fp8_tflops": 5000.0,  # [R4]
        "mamf_fp8_tflops": 3615.6,  # [R4]
        "fp4_tflops": 10000.0,  # dense, per GPU [R4][R49]
        "mamf_fp4_tflops": 10000.0 * 3615.6 / 5000.0,  # ASSUMPTION: the measured FP8 achievable/peak ratio
        "compute_capability": 100,  # sm_100 [R53]
        "hbm_tbps": 8.0,  # [R4]
        "nvlink_allreduce_gbps": 680.0,  # NVL72 ring all-reduce, GTC25 slide via [R2]
        "nvlink_allgather_gbps": 680.0,  # ASSUMPTION: ring rate as all-reduce [R2]
        "nvlink_reducescatter_gbps": 680.0,  # ASSUMPTION: as above
        # ASSUMPTION: the ring rate, as on b200-sxm-8; the flex dispatcher's share of it
        # (FLEX_LINK_SHARE) gives HybridEP 537, the top of its 442-550 measured on GB200 EP8-36 [R24]
        "nvlink_alltoall_gbps": 680.0,
        "nvlink_p2p_gbps": 680.0,  # ASSUMPTION
        "host_launch_us": DGX_HOST_LAUNCH_US,  # ASSUMPTION: a Grace host [R7] issues work as a DGX host does
        # NVLink-C2C to Grace, 450 GB/s a direction [R2]; ASSUMPTION: the share of its line rate PCIe
        # Gen5 sustained with both directions busy (49 of 64 GB/s [R60])
        "host_link_gbps": 450.0 * 49.0 / 64.0,
    },
    # Blackwell Ultra. Per GPU: dense BF16 / FP8 / FP4 from NVIDIA's published rack and HGX figures
    # (GB300 NVL72: 1.1 EF dense FP4 and 360 PF FP8 over 72 GPUs, 20 TB HBM3e at 576 TB/s, 72
    # ConnectX-8 [R57]; per-GPU table [R58]). The achievable rates are not measured on these parts
    # beyond B300's BF16 matmul [R4] (MAMF 1,769 TFLOPS).
    "b300-sxm-8": {
        **_H100,
        **_BLACKWELL,
        "description": "HGX/DGX B300, 8 GPUs per node on NVLink5 switches, 1x800G NIC per GPU",
        "gpu_memory_gib": 262.0,  # ASSUMPTION: 270 GiB total [R58] minus headroom, as on B200
        "gpu_memory_total_gib": 270.0,  # [R58] (288 GB HBM3e on the datasheet [R57])
        "bf16_tflops": 2250.0,  # dense [R57][R58]
        "mamf_bf16_tflops": 1769.0,  # measured B300 matmul [R4]
        "fp8_tflops": 4500.0,  # dense [R57][R58]
        "mamf_fp8_tflops": 4500.0 * 1769.0 / 2250.0,  # ASSUMPTION: the measured BF16 achievable/peak ratio
        "fp4_tflops": 13125.0,  # dense [R57] (14,000 in [R58])
        "mamf_fp4_tflops": 13125.0 * 1769.0 / 2250.0,  # ASSUMPTION: as above
        "compute_capability": 103,  # sm_103 [R53]
        "hbm_tbps": 8.0,  # [R57]
        # NVLink5 at 1.8 TB/s per GPU as on B200 [R57]: B200's measured bus bandwidths (ASSUMPTION)
        "nvlink_allreduce_gbps": 682.0,
        "nvlink_allgather_gbps": 682.0,
        "nvlink_reducescatter_gbps": 682.0,
        "nvlink_alltoall_gbps": 682.0,
        "nvlink_p2p_gbps": 682.0,
        # one ConnectX-8 800 Gb/s (100 GB/s) per GPU [R57]; ASSUMPTION: the same 94% of line rate
        # nccl-tests reaches on 400G NDR [R46]
        "nic_busbw_gbps": 94.0,
        # ASSUMPTION: DGX B300's two-socket Xeon host (Xeon 6776P [R58]) issues work as DGX B200's
        # Xeon 8570 [R6] does: the DGX host class of the other 8-GPU presets
        "host_launch_us": DGX_HOST_LAUNCH_US,
    },
    "gb300-nvl72": {
        **_H100,
        **_BLACKWELL,
        "description": "GB300 NVL72 rack: 4 GPUs per compute tray, one 72-GPU NVLink5 domain, 1x800G NIC per GPU",
        "gpus_per_node": 4,  # compute tray: 2 Grace + 4 Blackwell Ultra [R57]
        "nvlink_domain": 72,  # [R57]
        "gpu_memory_gib": 271.0,  # ASSUMPTION: 278.0 GiB total [R59] minus headroom, as on GB200
        "gpu_memory_total_gib": 278.0,  # NVML 298,500,227,072 bytes [R59] (288 GB HBM3e on the datasheet [R57])
        "bf16_tflops": 2500.0,  # dense: 180 PF per 72 GPUs [R57][R58]
        "mamf_bf16_tflops": 1769.0 * 2500.0 / 2250.0,  # ASSUMPTION: B300's measured matmul [R4] at GB300's peak
        "fp8_tflops": 5000.0,  # dense: 360 PF per 72 GPUs [R57][R58]
        "mamf_fp8_tflops": 5000.0 * 1769.0 / 2250.0,  # ASSUMPTION: the measured BF16 achievable/peak ratio
        "fp4_tflops": 15000.0,  # dense: 1.08 EF per 72 GPUs [R57][R58]
        "mamf_fp4_tflops": 15000.0 * 1769.0 / 2250.0,  # ASSUMPTION: as above
        "compute_capability": 103,  # sm_103 [R53]
        "hbm_tbps": 8.0,  # 576 TB/s per 72 GPUs [R57]
        # the same NVLink5 fabric as GB200 NVL72 (130 TB/s per 72 GPUs [R57]): its rates (ASSUMPTION)
        "nvlink_allreduce_gbps": 680.0,
        "nvlink_allgather_gbps": 680.0,
        "nvlink_reducescatter_gbps": 680.0,
        "nvlink_alltoall_gbps": 680.0,
        "nvlink_p2p_gbps": 680.0,
        "nic_busbw_gbps": 94.0,  # 72 ConnectX-8 800 Gb/s, one per GPU [R57]; ASSUMPTION as b300-sxm-8
        "host_launch_us": DGX_HOST_LAUNCH_US,  # ASSUMPTION: a Grace host, as gb200-nvl72's
        "host_link_gbps": 450.0 * 49.0 / 64.0,  # NVLink-C2C as on gb200-nvl72 [R57]; ASSUMPTION as there
    },
    "gb10-spark": {
        "description": "NVIDIA DGX Spark (GB10): one GPU per box, 128 GB unified memory, boxes linked at 200 GbE",
        "gpus_per_node": 1,
        "nvlink_domain": 1,  # no GPU peers; NVLink-C2C to the CPU only [R17]
        "gpu_memory_gib": 105.0,  # ASSUMPTION: 119.2 GiB addressable [R19], OS and CPU share the pool [R52]
        "gpu_memory_total_gib": 119.2,  # [R19]
        "bf16_tflops": 125.0,  # DERIVED from 1 PFLOP sparse FP4 [R16][R17]
        "mamf_bf16_tflops": 92.3,  # measured BF16 matmul [R18]
        "fp8_tflops": 250.0,  # DERIVED [R16][R17]
        "mamf_fp8_tflops": 184.6,  # ASSUMPTION: 2x the measured BF16 rate
        "fp4_tflops": 500.0,  # DERIVED: 1 PFLOP sparse FP4 / 2 [R16][R17]
        "mamf_fp4_tflops": 369.2,  # ASSUMPTION: 4x the measured BF16 rate
        "compute_capability": 121,  # sm_121, SM120 family [R12][R56]
        "hbm_tbps": 0.273,  # LPDDR5x [R12]
        "nvlink_allreduce_gbps": 1.0,  # unused: the NVLink domain is one GPU
        "nvlink_allgather_gbps": 1.0,
        "nvlink_reducescatter_gbps": 1.0,
        "nvlink_alltoall_gbps": 1.0,
        "nvlink_p2p_gbps": 1.0,
        "nvlink_alpha_us": 0.0,
        "nic_busbw_gbps": 22.0,  # NCCL all_gather busbw 20-24 GB/s over one 200G QSFP link [R13]
        "nic_alpha_us": 30.0,  # ASSUMPTION: not published [R14]
        "host_launch_us": REFERENCE_HOST_LAUNCH_US,  # ASSUMPTION: not measured; the reference hosts'
        "host_link_gbps": 300.0 * 49.0 / 64.0,  # NVLink-C2C 600 GB/s both ways [R17]; ASSUMPTION as gb200-nvl72's
        "unified_memory": True,
    },
}
# the presets that take the Blackwell numbers (_BLACKWELL)
BLACKWELL_PRESETS = tuple(name for name, preset in PRESETS.items() if preset.items() >= _BLACKWELL.items())

SOURCES = {
    "R2": "stas00/ml-engineering network/README.md (NVLink and SHARP measurements)",
    "R3": "stas00/ml-engineering network/benchmarks/README.md (8xH200 all-reduce sweep)",
    "R4": "stas00/ml-engineering compute/accelerator/README.md (dense TFLOPS, MAMF, memory)",
    "R5": "NVIDIA DGX BasePOD reference architecture, core components",
    "R6": "NVIDIA DGX B200 user guide, introduction (8 x ConnectX-7 400 Gb/s, NVLink5 switches)",
    "R7": "NVIDIA DGX GB200 user guide, networking",
    "R9": "MLCommons inference v4.1 H200-SXM-141GB system description (PCIe Gen5 x16)",
    "R10": "MLCommons inference v6.1 GB200-NVL72 system description",
    "R11": "nvidia-smi capture of H100 SXM (thamada/nvidia-smi)",
    "R12": "NVIDIA dgx-spark-playbooks cutile-kernels README (GB10 sm_121, 273 GB/s)",
    "R13": "NVIDIA dgx-spark-playbooks nccl README (two Sparks, 20-24 GB/s busbw)",
    "R14": "NVIDIA dgx-spark-playbooks connect-two-sparks benchmarking guide",
    "R16": "NVIDIA DGX Spark product page (1 PFLOP FP4, sparse)",
    "R17": "Hot Chips 2025 GB10 report (NVLink-C2C, TDP)",
    "R18": "huggingface/kernels PR #283 (GB10 92.3 TFLOPS BF16 matmul measured)",
    "R19": "Entrpi/qwen3.5-122B-A10B-on-spark README (128 GB / 119 GiB)",
    "R20": "deepseek-ai/DeepEP README (V2 NVLink and RDMA bandwidths)",
    "R21": "deepseek-ai/DeepEP docs/legacy.md (V1 normal-kernel bandwidths)",
    "R24": "deepseek-ai/DeepEP hybrid-ep README",
    "R43": "NVIDIA/nccl-tests issue #212 (NVLink4 ~370 GB/s effective)",
    "R45": "NVIDIA/nccl-tests issue #267 (alltoall cannot aggregate NICs)",
    "R46": "NVIDIA/nccl-tests issue #290 (NDR 46-48 GB/s per NIC)",
    "R49": "glennklockwood.com B200 page (B200/GB200 dense rates)",
    "R50": "NVIDIA H100 datasheet reproduction (sparse vs dense)",
    "R51": "public nvidia-smi captures (H200/B200/GB200 memory totals)",
    "R52": "NVIDIA dgx-spark-playbooks multi-agent-chatbot README",
    "R53": "CUDA compute capabilities (H100/H200 9.0, B200/GB200 10.0, B300/GB300 10.3, GB10 12.1); B300 10.3 "
           "also in public nvidia-smi captures of 'NVIDIA B300 SXM6 AC'",
    "R56": "mit-han-lab/fouroversix PR #33 (GB10 = compute capability 12.1, SM120 family)",
    "R57": "glennklockwood.com B300 page, citing NVIDIA: HGX B300 dense BF16 2,250 / FP8 4,500 / FP4 13,125 "
           "TFLOPS per GPU, 288 GB HBM3e at 8 TB/s, NVLink5 1.8 TB/s; GB300 NVL72 1.1 EF dense FP4, 360 PF "
           "FP8, 20 TB HBM at 576 TB/s, 130 TB/s NVLink, 72 ConnectX-8 (800 Gb/s); 4 GPUs + 2 Grace per tray",
    "R58": "verda.com/blog/gb300-nvl72-architecture, per-GPU table without sparsity (GB300: FP4 15 PF, FP8 5, "
           "BF16 2.5; B300: 14 / 4.5 / 2.25; GB300 279 GB, B300 270 GB); DGX B300 hosts on Xeon 6776P "
           "(aiwiki DGX B300 page)",
    "R59": "public NVML profile table: 'NVIDIA GB300 NVL' memoryBytes 298500227072",
    "R60": "benchmarks/evidence/host-link-h100: pinned host <-> H100 copies over PCIe Gen5 x16, 55 GB/s a "
           "direction alone, 49-50 with both directions busy (benchmarks/gpu/host_link.py)",
}

# an inline cluster's `gpu` kind and the preset whose per-GPU numbers it takes
GPU_KINDS = {"h100": "h100-sxm-8", "h200": "h200-sxm-8", "b200": "b200-sxm-8", "b300": "b300-sxm-8", "gb200": "gb200-nvl72",
             "gb300": "gb300-nvl72", "gb10": "gb10-spark"}
# ASSUMPTION: planning headroom below a card of no known kind, as the share of the card the most
# cautious preset keeps (h100-sxm-8: 4.65 of 79.65 GiB for the CUDA context, NCCL and fragmentation)
UNKNOWN_GPU_HEADROOM = 1 - 75.0 / 79.65
# what a cluster of no known GPU kind takes, stated in its notes: per-GPU numbers no inline key sets
_GENERIC_FROM = "h100-sxm-8"


def headroom_gib(card_gib: float, preset: str | None) -> float:
    """Memory kept free below a card of `card_gib`: the preset's own headroom (its card minus its
    planning capacity), or UNKNOWN_GPU_HEADROOM of the card where no preset knows the GPU."""
    if preset is None:
        return card_gib * UNKNOWN_GPU_HEADROOM
    known = PRESETS[preset]
    return known["gpu_memory_total_gib"] - known["gpu_memory_gib"]


def resolve_cluster(spec: ClusterSpec, nodes: int | None = None, purpose: str = "plan") -> Cluster:
    """Merge a preset, or an inline cluster's GPU kind, with the spec's explicit numbers.

    `purpose` is what the caller needs: "plan" prices layouts (compute and link numbers, memory),
    "validate" checks rules, which need only the world shape; there an inline cluster's missing
    numbers stay unpriced (Cluster.priced, Cluster.memory_known)."""
    if spec.preset is not None and spec.preset not in PRESETS:
        raise SpecError(
            f"cluster.preset: unknown preset {spec.preset!r}{did_you_mean(spec.preset, PRESETS)}; "
            f"choose one of {', '.join(PRESETS)} (see `megacpp clusters`)"
        )
    if spec.gpu is not None and spec.gpu not in GPU_KINDS:
        raise SpecError(f"cluster.gpu: unknown GPU kind {spec.gpu!r}{did_you_mean(spec.gpu, GPU_KINDS)}; "
                        f"choose one of {', '.join(GPU_KINDS)}")
    kind_preset = spec.preset or (GPU_KINDS[spec.gpu] if spec.gpu else None)
    if spec.preset is not None and spec.gpu is not None and GPU_KINDS[spec.gpu] != spec.preset:
        raise SpecError(f"cluster.gpu: {spec.gpu!r} contradicts cluster.preset {spec.preset!r}, which has its own GPU; "
                        f"drop cluster.gpu, or drop cluster.preset for an inline cluster of {spec.gpu} GPUs")
    notes: list[str] = []
    if spec.preset is not None:
        base, name = dict(PRESETS[spec.preset]), spec.preset
    else:
        base, name = _inline(spec, purpose, notes), "inline"
    card = spec.gpu_memory_gib if spec.gpu_memory_gib is not None else base["gpu_memory_total_gib"]
    if spec.gpu_memory_gib is not None:
        room = headroom_gib(card, kind_preset)
        if card <= room:
            raise SpecError(f"cluster.gpu_memory_gib: {card:g} GiB is the card's memory and leaves nothing after "
                            f"the {room:.3g} GiB headroom plans keep; give the card's total (e.g. 80 for an H100)")
        base.update(gpu_memory_total_gib=card, gpu_memory_gib=round(card - room, 2))
    overrides = {
        "gpus_per_node": spec.gpus_per_node,
        "nvlink_domain": spec.nvlink_domain,
        "nic_busbw_gbps": spec.inter_node_busbw_gbps,
        "host_launch_us": spec.host_launch_us,
    }
    base.update({k: v for k, v in overrides.items() if v is not None})
    if spec.bf16_tflops is not None:
        _state_compute(base, spec.bf16_tflops, kind_preset, notes)
    if spec.intra_node_busbw_gbps is not None:
        for field in NVLINK_BUSBW_FIELDS.values():
            base[field] = spec.intra_node_busbw_gbps
        if base.get("nvlink_pair_gbps"):
            notes.append(f"cluster.intra_node_busbw_gbps prices every NVLink collective at {spec.intra_node_busbw_gbps:g} GB/s, "
                         "groups of two included (the preset's measured pair rates are not used)")
        base["nvlink_pair_gbps"] = {}  # the stated rate holds for every group size
    if spec.nvlink_domain is None and spec.preset is None:
        base["nvlink_domain"] = base["gpus_per_node"]
    base["nodes"] = nodes if nodes is not None else spec.nodes
    gpu = spec.gpu or next((k for k, p in GPU_KINDS.items() if p == spec.preset), None)
    return Cluster(name=name, gpu=gpu, notes=tuple(notes), sources=SOURCES, **base)


def _inline(spec: ClusterSpec, purpose: str, notes: list[str]) -> dict:
    """An inline cluster's numbers before the spec's explicit ones: its GPU kind's preset, or for a
    cluster of no known kind the explicit keys a plan needs, the rest stated in `notes`."""
    if spec.gpus_per_node is None:
        raise SpecError("cluster: an inline cluster needs cluster.gpus_per_node (and cluster.nodes, default 1); "
                        f"or set cluster.preset to one of {', '.join(PRESETS)}")
    if spec.gpu is not None:
        kind = GPU_KINDS[spec.gpu]
        return dict(PRESETS[kind], description=f"inline cluster of {spec.gpu} GPUs (their numbers from the {kind} preset)")
    domain = spec.nvlink_domain or spec.gpus_per_node
    needed = {"gpu_memory_gib": True, "bf16_tflops": True, "intra_node_busbw_gbps": domain > 1,
              "inter_node_busbw_gbps": spec.nodes * spec.gpus_per_node > domain}
    missing = [k for k, used in needed.items() if used and getattr(spec, k) is None]
    # its GEMMs' shapes run as on the GPU the numbers come from (Cluster.shape_table)
    base = dict(PRESETS[_GENERIC_FROM], kernel_table=None, shape_table=PRESETS[_GENERIC_FROM]["kernel_table"],
                grad_accumulation_tbps=None, nvlink_pair_gbps={},
                nvlink_pair_alpha_us=None, description="inline cluster")
    if missing and purpose == "plan":
        raise SpecError(
            f"cluster: an inline cluster without cluster.gpu needs {', '.join('cluster.' + k for k in missing)} to plan; "
            f"or set cluster.gpu to one of {', '.join(GPU_KINDS)} to take that GPU's numbers"
        )
    if missing:  # validate: rules need only the world shape
        base.update(priced=False, memory_known=spec.gpu_memory_gib is not None)
        if spec.gpu_memory_gib is None:
            base["gpu_memory_gib"] = base["gpu_memory_total_gib"] = float("inf")
        return base
    notes.append(f"cluster: an inline cluster of no known GPU kind takes HBM bandwidth, FP8 rate, collective latencies "
                 f"and the host class from {_GENERIC_FROM}; set cluster.gpu ({', '.join(GPU_KINDS)}) to use its GPU's")
    return base


def _state_compute(base: dict, bf16_tflops: float, kind_preset: str | None, notes: list[str]) -> None:
    """A stated dense BF16 peak drives every compute rate: the achievable matmul rate and the FP8
    rates keep their ratio to it (ASSUMPTION: MAMF is 72-80% of peak [R4], FP8 is twice BF16 on
    Hopper and Blackwell [R4]), and a measured kernel-rate table's times scale by it."""
    was = base["bf16_tflops"]
    scale = bf16_tflops / was
    for key in ("bf16_tflops", "mamf_bf16_tflops", "fp8_tflops", "mamf_fp8_tflops"):
        base[key] = base[key] * scale
    base["compute_scale"] = scale
    if kind_preset is not None and scale != 1.0:
        table = " and its measured kernel times" if base.get("kernel_table") else ""
        notes.append(f"cluster.bf16_tflops {bf16_tflops:g} replaces {kind_preset}'s {was:g}: its matmul and FP8 rates{table} "
                     f"are scaled by {scale:.3g}, so the step time follows the stated peak")
