"""Cluster presets and the resolved cluster the planner works with.

Every number carries its source tag; tags resolve in ../shared/reference/hardware_comm.md §8 and
are repeated in `SOURCES`. "ASSUMPTION" marks planner defaults that are not published facts;
"MEASURED" numbers measured on this project's GPUs, which live in planner/cost/coefficients.py.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from megacpp.planner.cost.coefficients import (
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
    # on hosts of REFERENCE_HOST_LAUNCH_US and scales with it (cost.step.host_scale)
    host_launch_us: float = REFERENCE_HOST_LAUNCH_US
    # this system's sustained matmul rate over what the preset prices (its kernel-rate table's
    # times, or MAMF x Efficiency.matmul): 1 on every preset; a cluster profile fitted to a table
    # of the system's own measured runs sets it (`megacpp calibrate`, planner/calibrate/cluster_fit.py)
    matmul_rate_scale: float = 1.0
    unified_memory: bool = False
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
)

PRESETS: dict[str, dict] = {
    "h100-sxm-8": {**_H100, "grad_accumulation_tbps": H100_GRAD_ACCUMULATION_TBPS},  # MEASURED
    "h200-sxm-8": {
        **_H100,
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
        "nvlink_alltoall_gbps": 550.0,  # HybridEP dispatch algbw upper range [R24]
        "nvlink_p2p_gbps": 680.0,  # ASSUMPTION
        "host_launch_us": DGX_HOST_LAUNCH_US,  # ASSUMPTION: a Grace host [R7] issues work as a DGX host does
    },
    # Blackwell Ultra. Per GPU: dense BF16 / FP8 / FP4 from NVIDIA's published rack and HGX figures
    # (GB300 NVL72: 1.1 EF dense FP4 and 360 PF FP8 over 72 GPUs, 20 TB HBM3e at 576 TB/s, 72
    # ConnectX-8 [R57]; per-GPU table [R58]). The achievable rates are not measured on these parts
    # beyond B300's BF16 matmul [R4] (MAMF 1,769 TFLOPS).
    "b300-sxm-8": {
        **_H100,
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
        "nvlink_alltoall_gbps": 550.0,
        "nvlink_p2p_gbps": 680.0,
        "nic_busbw_gbps": 94.0,  # 72 ConnectX-8 800 Gb/s, one per GPU [R57]; ASSUMPTION as b300-sxm-8
        "host_launch_us": DGX_HOST_LAUNCH_US,  # ASSUMPTION: a Grace host, as gb200-nvl72's
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
        "unified_memory": True,
    },
}

SOURCES = {
    "R2": "stas00/ml-engineering network/README.md (NVLink and SHARP measurements)",
    "R3": "stas00/ml-engineering network/benchmarks/README.md (8xH200 all-reduce sweep)",
    "R4": "stas00/ml-engineering compute/accelerator/README.md (dense TFLOPS, MAMF, memory)",
    "R5": "NVIDIA DGX BasePOD reference architecture, core components",
    "R6": "NVIDIA DGX B200 user guide, introduction (8 x ConnectX-7 400 Gb/s, NVLink5 switches)",
    "R7": "NVIDIA DGX GB200 user guide, networking",
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
}

_INLINE_REQUIRED = ("gpus_per_node", "gpu_memory_gib", "bf16_tflops")


def resolve_cluster(spec: ClusterSpec, nodes: int | None = None) -> Cluster:
    """Merge a preset with inline overrides; an inline cluster needs at least the core numbers."""
    if spec.preset is not None:
        if spec.preset not in PRESETS:
            raise SpecError(
                f"cluster.preset: unknown preset {spec.preset!r}{did_you_mean(spec.preset, PRESETS)}; "
                f"choose one of {', '.join(PRESETS)} (see `megacpp clusters`)"
            )
        base = dict(PRESETS[spec.preset])
        name = spec.preset
    else:
        missing = [k for k in _INLINE_REQUIRED if getattr(spec, k) is None]
        if missing:
            raise SpecError(
                f"cluster: an inline cluster needs {', '.join('cluster.' + k for k in missing)}; "
                f"or set cluster.preset to one of {', '.join(PRESETS)}"
            )
        base = dict(PRESETS["h100-sxm-8"], description="inline cluster (link numbers from h100-sxm-8)")
        base["gpu_memory_total_gib"] = spec.gpu_memory_gib
        name = "inline"
    overrides = {
        "gpus_per_node": spec.gpus_per_node,
        "gpu_memory_gib": spec.gpu_memory_gib,
        "nvlink_domain": spec.nvlink_domain,
        "bf16_tflops": spec.bf16_tflops,
        "nic_busbw_gbps": spec.inter_node_busbw_gbps,
        "host_launch_us": spec.host_launch_us,
    }
    base.update({k: v for k, v in overrides.items() if v is not None})
    if spec.bf16_tflops is not None:
        # ASSUMPTION: keep the preset's achievable/peak ratio (MAMF is 72-80% of peak [R4]).
        ratio = PRESETS.get(spec.preset or "h100-sxm-8", _H100)
        base["mamf_bf16_tflops"] = spec.bf16_tflops * ratio["mamf_bf16_tflops"] / ratio["bf16_tflops"]
    if spec.intra_node_busbw_gbps is not None:
        for field in NVLINK_BUSBW_FIELDS.values():
            base[field] = spec.intra_node_busbw_gbps
        base["nvlink_pair_gbps"] = {}  # the stated rate holds for every group size
    if spec.nvlink_domain is None and spec.preset is None:
        base["nvlink_domain"] = base["gpus_per_node"]
    base["nodes"] = nodes if nodes is not None else spec.nodes
    return Cluster(name=name, sources=SOURCES, **base)
