"""NCCL bus bandwidth on one host, measured the way nccl-tests reports it, next to a cluster preset.

    torchrun --standalone --nproc-per-node 8 benchmarks/gpu/nccl_busbw.py --preset h200-sxm-8 --out nccl.json

For each collective and message size: 5 warm-up and 20 timed calls between CUDA events; algbw =
bytes / time and busbw = algbw x (2(n-1)/n for all-reduce, (n-1)/n for all-gather,
reduce-scatter and all-to-all, 1 for send-recv), nccl-tests' definitions (doc/PERFORMANCE.md).
Send-recv is the ring exchange that context parallelism and the pipeline make: every rank sends
the buffer to the next rank and receives one from the previous, in one batched call. The smallest size
gives the per-call latency the cost model's alpha stands for. Uses torch.distributed only; the
preset numbers are read from megacpp's cluster table.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist

SIZES = [8 << 10, 64 << 10, 1 << 20, 4 << 20, 16 << 20, 32 << 20, 64 << 20, 128 << 20, 1 << 30]


def timed(fn, iters: int = 20, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / iters
    slowest = torch.tensor([seconds], device="cuda")
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return slowest.item()


def collectives(size: int, n: int) -> dict:
    """One call of each collective on a `size`-byte bf16 buffer, with its nccl-tests busbw factor.
    All-gather and reduce-scatter are sized by the full (gathered) buffer, as nccl-tests does."""
    elems = size // 2
    x = torch.ones(elems, dtype=torch.bfloat16, device="cuda")
    gathered = torch.empty(elems // n * n, dtype=torch.bfloat16, device="cuda")
    shard = torch.empty(elems // n, dtype=torch.bfloat16, device="cuda")
    out = torch.empty_like(x)
    rank = dist.get_rank()
    ring = [dist.P2POp(dist.isend, x, (rank + 1) % n), dist.P2POp(dist.irecv, out, (rank - 1) % n)]

    def exchange() -> None:
        for req in dist.batch_isend_irecv(ring):
            req.wait()

    return {
        "all-reduce": (lambda: dist.all_reduce(x), 2 * (n - 1) / n),
        "all-gather": (lambda: dist.all_gather_into_tensor(gathered, x[: elems // n]), (n - 1) / n),
        "reduce-scatter": (lambda: dist.reduce_scatter_tensor(shard, x), (n - 1) / n),
        "all-to-all": (lambda: dist.all_to_all_single(out, x), (n - 1) / n),
        "send-recv": (exchange, 1.0),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="h200-sxm-8")
    ap.add_argument("--out")
    args = ap.parse_args()
    local = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local)
    dist.init_process_group("nccl")
    n, rank = dist.get_world_size(), dist.get_rank()
    rows = []
    for size in SIZES:
        for name, (fn, factor) in collectives(size, n).items():
            seconds = timed(fn)
            algbw = size / seconds / 1e9
            rows.append({"collective": name, "bytes": size, "seconds": round(seconds, 7), "algbw_gbps": round(algbw, 2),
                         "busbw_gbps": round(algbw * factor, 2)})
    if rank == 0:
        from megacpp.planner.spec.clusters import NVLINK_BUSBW_FIELDS, PRESETS

        preset = PRESETS[args.preset]
        doc = {"world_size": n, "device": torch.cuda.get_device_name(), "nccl": ".".join(map(str, torch.cuda.nccl.version())),
               "preset": args.preset, "preset_busbw_gbps": {k: preset.get(v) for k, v in NVLINK_BUSBW_FIELDS.items()},
               "preset_alpha_us": preset.get("nvlink_alpha_us"), "rows": rows}
        for r in rows:
            print(f"{r['collective']:>15} {r['bytes']:>11} B  {r['seconds'] * 1e6:9.1f} us  busbw {r['busbw_gbps']:7.1f} GB/s")
        if args.out:
            with open(args.out, "w") as f:
                json.dump(doc, f, indent=1)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
