"""The host link's sustained copy rate: pinned host memory to the GPU and back, each direction on
its own and both at once, as activation offloading moves tensors during a step.

    python benchmarks/gpu/host_link.py --out host_link.json [--sizes-mib 64 256 1024] [--repeats 10]

Writes one JSON record per size: GB/s (1e9 bytes per second) per direction, the median of the
timed repeats after two warm-ups, with CUDA events.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
from pathlib import Path


def _rate(copies, nbytes: int, repeats: int) -> float:
    """Median GB/s of one call of `copies` (which queues the copies and returns their streams)."""
    import torch

    times = []
    for i in range(repeats + 2):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for stream in copies():
            torch.cuda.current_stream().wait_stream(stream)
        end.record()
        torch.cuda.synchronize()
        if i >= 2:
            times.append(start.elapsed_time(end) / 1e3)
    return nbytes / statistics.median(times) / 1e9


def measure(size_mib: int, repeats: int) -> dict:
    import torch

    n = size_mib << 20
    host_in = torch.empty(n, dtype=torch.uint8, pin_memory=True).fill_(1)
    host_out = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    dev_in, dev_out = torch.empty(n, dtype=torch.uint8, device="cuda"), torch.ones(n, dtype=torch.uint8, device="cuda")
    up, down = torch.cuda.Stream(), torch.cuda.Stream()

    def h2d():
        with torch.cuda.stream(up):
            dev_in.copy_(host_in, non_blocking=True)
        return [up]

    def d2h():
        with torch.cuda.stream(down):
            host_out.copy_(dev_out, non_blocking=True)
        return [down]

    def both():
        return h2d() + d2h()

    return {
        "size_mib": size_mib,
        "h2d_gbps": round(_rate(h2d, n, repeats), 2),
        "d2h_gbps": round(_rate(d2h, n, repeats), 2),
        # both directions at once: the bytes of one direction over the time both take
        "bidirectional_per_direction_gbps": round(_rate(both, n, repeats), 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sizes-mib", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    import torch

    link = subprocess.run(["nvidia-smi", "--query-gpu=pcie.link.gen.current,pcie.link.gen.max,pcie.link.width.current",
                           "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
    records = [measure(s, args.repeats) for s in args.sizes_mib]
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "kernel": platform.release(),
              "pcie_gen_current_max_width": link, "repeats": args.repeats, "records": records}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
