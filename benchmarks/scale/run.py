"""Plan NVIDIA's published Megatron runs with their layouts pinned and compare with the measured
tokens/s/GPU; for runs on 64 GPUs or more, also search the layout space and rank the published
layout. Writes results/scale.json and results/scale.md (README.md says how to read them).

    python -m benchmarks.scale.run [--out DIR] [--search/--no-search] [--only MODEL_KEY] [--truth SET]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.scale.report import render_markdown, summarise
from benchmarks.scale.truth import (
    HERE,
    INDEPENDENT_FILE,
    RUNS_FILE,
    Conversion,
    Selected,
    as_run,
    convert,
    load_runs,
    published_peak_gib,
    select_newest,
)
from megacpp.planner import MegacppError, build_plan, spec_from_dict
from megacpp.planner.cost.step import deciding_term, host_bound
from megacpp.planner.spec.clusters import resolve_cluster

RESULTS = HERE / "results"
# each truth set: its rows, the report's file stem, the systems it covers and the halves it reports
TRUTHS = {
    "published": (RUNS_FILE, "scale", "H100 and B200", ("tuning", "held-out", "all")),
    "independent": (INDEPENDENT_FILE, "independent", "GB200, GB300 and B300", ("all",)),
}
# A run is searched with its layout unpinned from this many GPUs up: below it the published
# layouts are one or two nodes, where the space is small and the comparison says little.
SEARCH_MIN_GPUS = 64
SEARCH_TOP = 5
# how deep the published layout's rank is read (rank_deep, rank_distinct), in a second, untimed plan
RANK_DEPTH = 300
# The planner's host-bound flag (cost.step.host_bound, as `megacpp plan` and `explain layout` say it):
# the host's time beyond the GPU's work is the largest term of the step breakdown.
HOST_BOUND = "the exposed per-block host time (step_breakdown.block_overhead) is the largest term of the step"


def _published(row: dict[str, Any]) -> dict[str, Any]:
    """The run as planned: its row with the recipe file's value where the table disagrees (as_run)."""
    row, _ = as_run(row)
    tp, pp, cp = row["tp"], row["pp"], row["cp"]
    return {
        "layout": {"tp": tp, "pp": pp, "cp": cp, "vp": row["vp"], "ep": row["ep"], "etp": row["etp"],
                   "fsdp": row["fsdp"], "dp": row["num_gpus"] // (tp * pp * cp)},
        "gbs": row["gbs"], "mbs": row["mbs"], "seq_length": row["seq_length"],
        "tokens_per_sec_per_gpu": row["tokens_per_sec_per_gpu"],
        "step_seconds": row["step_time_s_derived"],
        "peak_allocated_gib": published_peak_gib(row),
        "peak_allocated_reported_gb": row.get("peak_allocated_memory_gib"),
    }


def plan_pinned(spec: dict[str, Any], measured: float, cluster_fields: dict[str, float] | None = None) -> dict[str, Any]:
    """The pinned layout's estimate, or the rule and message that reject it; `cluster_fields`
    replace those of the spec's resolved cluster (a fit trying coefficients a spec cannot state)."""
    start = time.perf_counter()
    try:
        parsed = spec_from_dict(spec, source=spec["name"])
        cluster = resolve_cluster(parsed.cluster).model_copy(update=cluster_fields) if cluster_fields else None
        plan = build_plan(parsed, top=1, cluster=cluster).to_json_dict()
    except MegacppError as exc:
        return {"outcome": "error", "rule": type(exc).__name__, "message": str(exc),
                "plan_seconds": round(time.perf_counter() - start, 3)}
    seconds = round(time.perf_counter() - start, 3)
    if not plan["candidates"]:
        rejected = plan["rejected"]
        example = rejected["examples"][0] if rejected["examples"] else {"rule": "none", "message": "no legal layout"}
        return {"outcome": "rejected", "rule": example["rule"], "message": example["message"],
                "by_rule": rejected["by_rule"], "plan_seconds": seconds}
    c = plan["candidates"][0]
    t = c["time"]
    # time.tokens_per_second is the whole job's: global batch x sequence / step (planner cost model)
    per_gpu = t["tokens_per_second"] / plan["world_size"]
    share = t.get("host_seconds", 0.0) / t["step_seconds"] if t["step_seconds"] else 0.0
    return {
        "outcome": "planned",
        "layout": c["layout"],
        "split": c["split"],
        "predicted_tokens_per_sec_per_gpu": round(per_gpu, 1),
        "step_seconds": t["step_seconds"],
        "error": round((per_gpu - measured) / measured, 4),
        "fits": c["fits"],
        "peak_gib": c["memory"]["peak_gib"],
        "capacity_gib": c["memory"]["capacity_gib"],
        "mfu": t["mfu"],
        "bubble_fraction": t["bubble_fraction"],
        "host_seconds": t.get("host_seconds", 0.0),
        "host_share": round(share, 4),
        "host_bound": host_bound(c["step_breakdown"]),
        "decided_by": deciding_term(c["step_breakdown"]),
        "step_breakdown": c["step_breakdown"],
        "warnings": sorted({w["rule"] for w in c["warnings"]}),
        "notes": sorted({n["rule"] for n in plan["notes"]}),
        "plan_seconds": seconds,
    }


def search(spec: dict[str, Any], pinned: dict[str, Any]) -> dict[str, Any]:
    """The full search with the layout free (micro-batch size, batch, precision, recompute and
    cluster as published), as `megacpp plan` ranks it: each layout once, at its best VPP. The
    published layout's rank among fitting layouts is 1 + the other layouts the plan shows strictly
    faster than its pinned estimate; with the top SEARCH_TOP + 1 candidates in hand (the published
    layout itself may be one of them, at the plan's own split) it is known up to SEARCH_TOP, beyond
    that it is "> SEARCH_TOP"."""
    start = time.perf_counter()
    try:
        plan = build_plan(spec_from_dict(spec, source=spec["name"]), top=SEARCH_TOP + 1).to_json_dict()
    except MegacppError as exc:
        return {"outcome": "error", "message": str(exc), "plan_seconds": round(time.perf_counter() - start, 3)}
    seconds = round(time.perf_counter() - start, 3)
    top = [{"layout": c["layout"], "step_seconds": c["time"]["step_seconds"], "fits": c["fits"],
            "peak_gib": c["memory"]["peak_gib"], "step_breakdown": c["step_breakdown"]} for c in plan["candidates"]]
    fitting = [c for c in top if c["fits"]]
    top = top[:SEARCH_TOP]
    out: dict[str, Any] = {"outcome": "searched", "considered": plan["considered"], "legal": plan["legal_count"],
                           "fitting": plan["fitting_count"], "top": top, "plan_seconds": seconds}
    step, mine = pinned["step_seconds"], _base(pinned["layout"])
    faster = [c for c in fitting if c["step_seconds"] < step and _base(c["layout"]) != mine]
    if not pinned["fits"]:
        out.update(rank=None, in_top=False, rank_note="the pinned layout does not fit in the plan's memory")
    elif len(faster) < SEARCH_TOP:
        out.update(rank=1 + len(faster), in_top=True)
    else:
        out.update(rank=None, in_top=False, rank_note=f"more than {SEARCH_TOP - 1} other fitting layouts are faster")
    out["claimed_speedup"] = round(step / fitting[0]["step_seconds"], 4) if fitting else None
    if pinned["fits"]:
        out.update(deep_rank(spec, pinned))
    return out


def _base(lay: dict[str, Any]) -> tuple[Any, ...]:
    """A layout up to its VPP (and the DP that follows tp, pp and cp)."""
    return lay["tp"], lay["pp"], lay["cp"], lay.get("ep") or 1, lay.get("etp")


def deep_rank(spec: dict[str, Any], pinned: dict[str, Any]) -> dict[str, Any]:
    """The published layout's rank with the top RANK_DEPTH candidates in hand, every VPP of a
    layout ranked on its own (None beyond): whether its VPP is in the top SEARCH_TOP too; and
    again with each layout counted once (1 + the other layouts of which some VPP is estimated
    strictly faster than the pinned estimate), the plan's own ranking read deeper."""
    plan = build_plan(spec_from_dict(spec, source=spec["name"]), top=RANK_DEPTH, every_vpp=True).to_json_dict()
    step, mine = pinned["step_seconds"], _base(pinned["layout"])
    faster = [c["layout"] for c in plan["candidates"] if c["fits"] and c["time"]["step_seconds"] < step]
    deep = 1 + len(faster) if len(faster) < RANK_DEPTH else None
    others = {_base(lay) for lay in faster} - {mine}
    distinct = 1 + len(others) if deep is not None else None
    return {"rank_deep": deep, "rank_distinct": distinct, "in_top_every_vpp": deep is not None and deep <= SEARCH_TOP}


def evaluate(sel: Selected, conv: Conversion, with_search: bool) -> dict[str, Any]:
    row = sel.row
    record: dict[str, Any] = {
        "row_id": row["row_id"], "source_type": row["source_type"], "source_url": row["source_url"],
        "release": row["release"],
        "model": row["model"], "model_key": row["model_key"], "family": row["model_family"],
        "system": row["system"], "num_gpus": row["num_gpus"], "precision": row["precision"],
        "config_key": sel.key_text, "half": sel.half, "superseded_rows": list(sel.superseded),
        "releases": [{"row_id": i, "release": rel, "tokens_per_sec_per_gpu": tps} for i, rel, tps in sel.releases],
        "status": conv.status, "approximations": list(conv.approximations), "assumptions": list(conv.assumptions),
        "skip_reason": conv.skip_reason, "not_modelled": list(conv.not_modelled),
        "published": _published(row), "spec": conv.spec, "pinned": None, "search": None,
    }
    if conv.spec is None:
        return record
    pinned = plan_pinned(conv.spec, row["tokens_per_sec_per_gpu"])
    record["pinned"] = pinned
    if with_search and row["num_gpus"] >= SEARCH_MIN_GPUS and pinned["outcome"] == "planned":
        assert conv.search_spec is not None
        record["search"] = search(conv.search_spec, pinned)
    return record


def _line(r: dict[str, Any]) -> str:
    head = f"row {r['row_id']:>3} {r['model_key']:<24} {r['system']} x{r['num_gpus']:<5} {r['precision']:<13}"
    p = r["pinned"]
    if p is None:
        return f"{head} skipped: {r['skip_reason']}"
    if p["outcome"] != "planned":
        return f"{head} {p['outcome']}: {p['rule']}: {p['message']}"
    s = r["search"]
    found = f", search {s['plan_seconds']:.1f} s" if s else ""
    return (f"{head} measured {r['published']['tokens_per_sec_per_gpu']:>8.0f} planned "
            f"{p['predicted_tokens_per_sec_per_gpu']:>8.0f} ({p['error']:+.1%}){found}")


def run_truth(name: str, only: list[str] | None, with_search: bool, out: Path | None) -> int:
    """Plan one truth set's newest configurations and write its report to `out` (None: nothing)."""
    path, stem, systems, halves = TRUTHS[name]
    start = time.perf_counter()
    selected = select_newest(load_runs(path))
    if only:
        selected = [s for s in selected if s.row["model_key"] in only]
    records = []
    for sel in selected:
        records.append(evaluate(sel, convert(sel.row), with_search))
        print(_line(records[-1]), flush=True)
    wall = time.perf_counter() - start
    result = {
        "schema": "megacpp.scale-benchmark/1",
        "command": "python -m benchmarks.scale.run" + (" --no-search" if not with_search else "")
                   + "".join(f" --only {k}" for k in only or []),
        "truth": {"name": name, "file": path.name, "systems": systems, "halves": list(halves)},
        "truth_rows": len(load_runs(path)),
        "only": only,
        "search": {"enabled": with_search, "min_gpus": SEARCH_MIN_GPUS, "top": SEARCH_TOP, "rank_depth": RANK_DEPTH},
        "host_bound": HOST_BOUND,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "wall_seconds": round(wall, 1),
        "summary": summarise(records, halves),
        "rows": records,
    }
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
        (out / f"{stem}.md").write_text(render_markdown(result))
        print(f"wrote {out / f'{stem}.json'} and {out / f'{stem}.md'} ({wall:.0f} s)")
    else:
        print(f"{len(records)} rows in {wall:.0f} s; nothing written (pass --out DIR)")
    return len(records)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help=f"where the reports go (default {RESULTS}; "
                                                 "with --only nothing is written unless --out is given)")
    parser.add_argument("--search", action=argparse.BooleanOptionalAction, default=True,
                        help=f"also search the unpinned layout space for runs on {SEARCH_MIN_GPUS}+ GPUs")
    parser.add_argument("--only", action="append", metavar="MODEL_KEY", help="only these models (repeatable)")
    parser.add_argument("--truth", choices=[*TRUTHS, "all"], default="all",
                        help="the published H100/B200 runs (scale.md), the GB200/GB300/B300 runs nothing is "
                             "fitted to (independent.md), or both")
    args = parser.parse_args(argv)
    names = list(TRUTHS) if args.truth == "all" else [args.truth]
    if args.only:
        known = {row["model_key"] for name in names for row in load_runs(TRUTHS[name][0])}
        unknown = sorted(set(args.only) - known)
        if unknown:
            parser.error(f"unknown model key(s) {', '.join(unknown)}; choose from {', '.join(sorted(known))}")
    out = args.out if args.out is not None else (None if args.only else RESULTS)
    for name in names:
        run_truth(name, args.only, args.search, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
