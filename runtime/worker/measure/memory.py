"""Memory forensics: one step's CUDA allocator history, its peak broken down by allocation site."""

from __future__ import annotations

import torch

GIB = float(1 << 30)


# Frames of these files say nothing about which model code asked for the memory.
PLUMBING = ("torch/autograd/", "torch/utils/", "torch/_", "torch/nn/modules/module.py", "torch/cuda/", "torch/overrides.py")


def allocation_site(frames: list[dict]) -> str:
    """The innermost frame outside autograd/allocator plumbing, as 'package/file.py:line function'."""
    for frame in frames:
        name = frame.get("filename", "")
        if name.endswith(".py") and not any(p in name for p in PLUMBING):
            short = name.split("site-packages/")[-1]
            return f"{short}:{frame.get('line')} {frame.get('name')}"
    return "(no Python frame: autograd engine)" if frames else "(unknown)"


def _replay(trace: list[dict], allocated_at_start: int) -> tuple[int, list[dict], list[dict], int]:
    """Allocator events in order, in one pass: the highest allocation, the blocks the step
    allocated that were live there (none if nothing rose above the start) and those live at the
    end, both in allocation order, and the bytes of blocks from before the step that it freed up
    to the peak (which lower the allocation too)."""
    live: dict[int, tuple[int, dict]] = {}  # address -> (event index, alloc event)
    ended: list[tuple[int, dict, int]] = []  # (alloc index, alloc event, free index)
    current = peak = allocated_at_start
    at, freed_before, freed_at_peak = -1, 0, 0
    for i, event in enumerate(trace):
        action, addr = event.get("action"), event.get("addr")
        if action == "alloc":
            live[addr] = (i, event)
            current += event.get("size", 0)
            if current > peak:
                peak, at, freed_at_peak = current, i, freed_before
        elif action == "free_requested":
            if addr in live:
                start, block = live.pop(addr)
                current -= block["size"]
                ended.append((start, block, i))
            else:
                current -= event.get("size", 0)
                freed_before += event.get("size", 0)
    at_peak = sorted([(s, e) for s, e, stop in ended if s <= at < stop] + [(s, e) for s, e in live.values() if s <= at],
                     key=lambda se: se[0])
    return peak, [e for _, e in at_peak], [e for _, e in live.values()], freed_at_peak


def _sizes_by_site(blocks: list[dict]) -> dict[str, list[int]]:
    """The blocks' sizes per allocation site."""
    sites: dict[str, list[int]] = {}
    for event in blocks:
        sites.setdefault(allocation_site(event.get("frames") or []), []).append(event.get("size", 0))
    return sites


def _by_site(sites: dict[str, list[int]], top: int) -> dict[str, float]:
    """GiB per allocation site, the `top` largest and the rest as "(other sites)"."""
    ranked = sorted(((site, sum(sizes)) for site, sizes in sites.items()), key=lambda kv: -kv[1])
    rest = sum(size for _, size in ranked[top:])
    return {site: round(size / GIB, 4) for site, size in ranked[:top]} | ({"(other sites)": round(rest / GIB, 4)} if rest else {})


def peak_breakdown(trace: list[dict], allocated_at_start: int, top: int = 15) -> dict:
    """Replay one step's allocator events; at the highest allocation, sum live blocks by site, with
    the sizes of each top site's largest blocks (which tensors they are follows from their sizes).
    Also what the step leaves allocated when it ends, by site, and how much of what was allocated
    before it the step freed up to its peak: memory a step keeps until the next one frees it."""
    peak, at_peak, left, freed_before = _replay(trace, allocated_at_start)
    by_site = _sizes_by_site(at_peak)
    sites = _by_site(by_site, top)
    return {
        "peak_gib": round(peak / GIB, 4),
        "before_step_gib": round(allocated_at_start / GIB, 4),
        "sites_gib": sites,
        "largest_blocks_mib": {site: sorted((round(size / 2**20, 1) for size in by_site[site]), reverse=True)[:6]
                               for site in sites if site != "(other sites)"},
        "left_after_step_gib": _by_site(_sizes_by_site(left), top),
        "freed_from_before_step_gib": round(freed_before / GIB, 4),
    }


def memory_peak_sites(run_step) -> dict:
    """Run one step under torch.cuda.memory._record_memory_history and break its peak down by the
    code that allocated each live block (allocations from before the step count as before_step)."""
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
    try:
        run_step()
        torch.cuda.synchronize()
        snapshot = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    trace = snapshot["device_traces"][torch.cuda.current_device()]
    return peak_breakdown(trace, start)
