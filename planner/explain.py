"""`megacpp explain layout`: who holds what, what each axis costs and cannot fix, why not others.

Pure: builds one document (the `--json` output) from a plan; the console and the picture render it.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from megacpp.planner.axes import Axis
from megacpp.planner.cost.coefficients import Efficiency, within_layout_error
from megacpp.planner.cost.latent import mtp_blocks
from megacpp.planner.cost.step import deciding_term, estimate, host_bound
from megacpp.planner.errors import PlanError
from megacpp.planner.plan import Candidate, Plan
from megacpp.planner.search.layout import Context, Layout
from megacpp.planner.search.ranks import process_groups, rank_coordinates
from megacpp.planner.search.rules import check_layout, divisors
from megacpp.planner.search.space import searched_vpps
from megacpp.planner.search.stages import assign_stages
from megacpp.planner.spec.pipeline_layout import expand
from megacpp.planner.validation import broken_rules, check_consistent, complete_layout

# The split taxonomy (DESIGN.md): what each axis partitions, its main traffic, what it cannot fix.
TAXONOMY = {
    Axis.TP: ("matrices and head groups of the A/M/R/D/E projections", "expert ownership, sequence length"),
    Axis.SP: ("activations around TP regions (norms, dropout, residual), along the sequence", "anything outside TP regions; it is not CP"),
    Axis.CP: ("the token timeline; attention rebuilds context by KV exchange", "weight memory; recurrent state (R) cannot be cut casually"),
    Axis.PP: ("depth: contiguous block ranges per stage, plus embedding/head ownership", "per-layer width; adds a bubble of about (p-1)/m"),
    Axis.EP: ("ownership of expert banks; routed tokens travel by all-to-all", "dense attention memory, sequence length, head divisibility"),
    Axis.ETP: ("each expert's matrices across the expert-TP ranks", "expert ownership (that is EP), dense layers"),
    Axis.DP: ("the batch; optimizer state with the distributed optimizer", "a model that does not fit"),
    Axis.EDP: ("the batch for expert weights; expert optimizer state", "a model that does not fit"),
}
NEIGHBOUR_AXES = (Axis.TP, Axis.PP, Axis.CP, Axis.EP, Axis.ETP, Axis.VPP)


def _axis_rows(ctx: Context, lay: Layout, cand: Candidate) -> list[dict[str, Any]]:
    groups = process_groups(lay)
    def empty() -> dict[str, Any]:
        return {"collectives": [], "bytes_per_step": 0, "seconds": 0.0, "exposed": 0.0, "links": set()}

    comm: dict[Axis, dict[str, Any]] = {}
    for c in cand.communication:
        row = comm.setdefault(c.axis, empty())
        row["collectives"].append(c.collective)
        row["bytes_per_step"] += c.bytes_per_step
        row["seconds"] += c.seconds
        row["exposed"] += c.exposed_seconds
        row["links"].add(c.link)
    rows = []
    for axis, (partitions, cannot_fix) in TAXONOMY.items():
        if axis in (Axis.EP, Axis.ETP, Axis.EDP) and not ctx.has_moe:
            continue
        c = comm.get(axis) or empty()
        rows.append({
            "axis": axis.value,
            "degree": lay.degree(axis),
            "partitions": partitions,
            "cannot_fix": cannot_fix,
            "collectives": c["collectives"],
            "link": "/".join(sorted(c["links"])) or "-",
            "bytes_per_step": c["bytes_per_step"],
            "seconds_per_step": round(c["seconds"], 6),
            # what of it the compute does not hide: its share of the step
            "exposed_seconds_per_step": round(c["exposed"], 6),
            "groups": groups.get(Axis.TP if axis == Axis.SP else axis, []),
        })
    return rows


def _stage_rows(lay: Layout, cand: Candidate, mtp: str = "") -> list[dict[str, Any]]:
    """The stages with notes on what holds state or crosses them; `mtp` is the MTP layers' blocks."""
    rows = []
    for st in cand.stages:
        notes = []
        blocks = st.blocks
        if "M" in blocks and lay.cp > 1:
            notes.append(f"{blocks.count('M')} M blocks under cp={lay.cp}: heads exchanged all-to-all (TE Mamba CP)")
        if "R" in blocks:
            notes.append(f"{blocks.count('R')} R block(s): recurrent state stays on this stage; cp must be 1")
        if lay.pp > 1 and not st.output_head and blocks[-1:] in ("M", "R"):
            notes.append(f"stage ends on an {blocks[-1]} block: its state is consumed inside the stage, only activations cross")
        if st.mtp and mtp:
            where = "with the output head" if st.output_head else "before the stage with the output head and the loss"
            notes.append(f"{mtp} after the layers: multi-token prediction {where}"
                         + (", and a copy of the word embeddings" if not st.embedding else ""))
        rows.append({**st.model_dump(mode="json"), "notes": notes})
    return rows


def _experts(ctx: Context, lay: Layout, cand: Candidate, coords: list[dict[str, int]]) -> list[dict[str, Any]]:
    """For every E block: its stage, and which ranks hold each range of experts."""
    moe = ctx.spec.model.moe
    if not ctx.has_moe or moe is None:
        return []
    per_rank = moe.num_experts // lay.ep
    out, e_index = [], 0
    step = 2 if ctx.plain_transformer else 1
    for st in sorted(cand.stages, key=lambda s: s.start):
        for offset, letter in enumerate(st.blocks):
            if letter != "E":
                continue
            owners = []
            for ep_rank in range(lay.ep):
                ranks = [c["rank"] for c in coords if c["pp"] == st.pp_rank and c["ep"] == ep_rank]
                owners.append({"experts": [ep_rank * per_rank, (ep_rank + 1) * per_rank - 1], "ep_rank": ep_rank, "ranks": ranks})
            out.append({
                "e_block": e_index,
                "block_index": st.start * step + offset,
                "pp_rank": st.pp_rank,
                "vp_stage": st.vp_stage,
                "owners": owners,
            })
            e_index += 1
    return out


def _variant(ctx: Context, lay: Layout, axis: Axis, value: int) -> Layout | None:
    changed = lay.model_copy(update={axis.value: value})
    if axis == Axis.TP and not ctx.has_moe:
        changed = changed.model_copy(update={"etp": value})
    if axis == Axis.TP and ctx.spec.parallel.sp is None:
        changed = changed.model_copy(update={"sp": value > 1 and ctx.te})
    size = changed.tp * changed.cp * changed.pp
    if ctx.world % size and axis != Axis.PP:
        # keep the variant on the cluster: shrink pp to the largest depth that still divides the world
        rest = ctx.world // (changed.tp * changed.cp) if ctx.world % (changed.tp * changed.cp) == 0 else 0
        if not rest:
            return None
        changed = changed.model_copy(update={"pp": max(d for d in divisors(rest) if d <= changed.pp), "vpp": 1})
        size = changed.tp * changed.cp * changed.pp
    if ctx.world % size:
        return None
    dp = ctx.world // size
    gbs = ctx.spec.training.global_batch_size
    m = gbs // (changed.micro_batch_size * dp) if gbs % (changed.micro_batch_size * dp) == 0 else 0
    return changed.model_copy(update={"dp": dp, "num_microbatches": m})


def _vpp_neighbours(ctx: Context, lay: Layout) -> list[int]:
    """1 and the searched virtual-stage counts just below and above the layout's (searched_vpps:
    up to one layer per virtual stage, as NVIDIA's recipes run vp 5 to 24), pinned or not."""
    choices = searched_vpps(ctx, lay.pp) if lay.pp > 1 else [1, 2]
    below = [v for v in choices if v < lay.vpp][-1:]
    above = [v for v in choices if v > lay.vpp][:1]
    return sorted({1, *below, *above} - {lay.vpp})


def why_not(ctx: Context, lay: Layout, chosen_step: float, eff: Efficiency) -> list[dict[str, Any]]:
    """Each axis moved to its neighbouring values: the first rule that rejects it, or its cost
    difference, priced with `eff`, the factors that priced the plan. The spec's pins of the
    candidate's dp and stage split give way as under `--versus` (_pins_let_go), named in `notes`."""
    out = []
    contexts: dict[tuple[str, ...], Context] = {(): ctx}  # one per set of pins let go, its costs memoised
    for axis in NEIGHBOUR_AXES:
        if axis == Axis.ETP and not ctx.has_moe:
            continue  # no expert to split
        current = lay.degree(axis)
        values = sorted({v for v in divisors(ctx.world) if v != current and (v in (current * 2, current // 2) or axis == Axis.TP)})
        if axis == Axis.VPP:
            values = _vpp_neighbours(ctx, lay)
        for value in values:
            variant = _variant(ctx, lay, axis, value)
            if variant is None:
                continue
            drop, notes = _pins_let_go(ctx, variant.dp, variant.pp * variant.vpp)
            if drop not in contexts:
                contexts[drop] = _without_pins(ctx, drop)
            mine = contexts[drop]
            errors = [v for v in check_layout(mine, variant) if v.severity == "error"]
            row: dict[str, Any] = {"axis": axis.value, "value": value, "layout": variant.model_dump(),
                                   **({"notes": notes} if notes else {})}
            if errors:
                row.update(verdict="rejected", rule=errors[0].rule, message=errors[0].message, also=[e.rule for e in errors[1:]])
            else:
                _, stages = assign_stages(mine, variant.pp, variant.vpp)
                est = estimate(mine, variant, stages, eff)
                fits = est.peak_gib <= ctx.cluster.gpu_memory_gib
                row.update(
                    verdict="legal" if fits else "does-not-fit",
                    peak_gib=round(est.peak_gib, 2),
                    step_seconds=round(est.step_seconds, 4),
                    step_delta=round(est.step_seconds / chosen_step - 1, 4),
                    decided_by=est.decided_by,
                )
            out.append(row)
    return out


# `--versus` words: an axis and its degree, as `megacpp plan` prints layouts (vp as NVIDIA's tables)
VERSUS_AXES = {"tp": "tp", "pp": "pp", "vpp": "vpp", "vp": "vpp", "cp": "cp", "ep": "ep", "etp": "etp", "dp": "dp",
               "mbs": "micro_batch_size"}
VERSUS_HINT = "write it as `tp4 pp8 vpp5 cp2 ep8 etp1 mbs1` (axes left out are 1, etp is tp, dp follows from the world)"


def parse_versus(text: str) -> dict[str, int]:
    """The axis degrees of a `--versus` layout such as "tp4 pp8 vp5 dp2" or "tp=4,pp=8"."""
    if len(text) > 200:
        raise PlanError(f"--versus: {len(text)} characters; {VERSUS_HINT}")
    degrees: dict[str, int] = {}
    for word in filter(None, re.split(r"[\s,]+", text.strip().lower())):
        found = re.fullmatch(r"([a-z]+)=?([0-9]{1,6})", word)
        if not found or found[1] not in VERSUS_AXES or int(found[2]) < 1:
            raise PlanError(f"--versus {word!r}: not an axis and a degree of at least 1; {VERSUS_HINT}")
        key = VERSUS_AXES[found[1]]
        if key in degrees:
            raise PlanError(f"--versus {word!r}: {found[1]} is given twice; {VERSUS_HINT}")
        degrees[key] = int(found[2])
    if not degrees:
        raise PlanError(f"--versus is empty; {VERSUS_HINT}")
    return degrees


def versus_layout(ctx: Context, text: str, d: dict[str, int], micro_batch_size: int) -> Layout:
    """The layout `--versus` names (`text`, parsed as `d`), its other fields derived as the search derives them."""
    tp, cp, pp = d.get("tp", 1), d.get("cp", 1), d.get("pp", 1)
    if ctx.world % (tp * cp * pp):
        raise PlanError(f"--versus {text!r}: tp x cp x pp = {tp * cp * pp} does not divide the {ctx.world} GPUs")
    lay = complete_layout(ctx, tp=tp, cp=cp, pp=pp, vpp=d.get("vpp", 1), ep=d.get("ep", 1), etp=d.get("etp"),
                          mbs=d.get("micro_batch_size", micro_batch_size))
    if d.get("dp", lay.dp) != lay.dp:
        raise PlanError(f"--versus {text!r}: dp is {lay.dp} on {ctx.world} GPUs at tp x cp x pp = {tp * cp * pp}, not {d['dp']}")
    return lay


def _pins_let_go(ctx: Context, dp: int, stages: int) -> tuple[tuple[str, ...], list[str]]:
    """The spec's pins that belong to the candidate's grid and not to another layout of `dp` and
    pp x vpp = `stages` (its dp follows its own tp x cp x pp; a pipeline layout string of another
    stage count gives way to megacpp's own split), each with a note naming it."""
    pins, drop, notes = ctx.spec.parallel, [], []
    if pins.dp is not None and pins.dp != dp:
        drop.append("dp")
        notes.append(f"the spec's parallel.dp={pins.dp} is the candidate's: dp follows this layout's tp x cp x pp")
    if pins.pipeline_layout is not None and len(expand(pins.pipeline_layout)) != stages:
        drop.append("pipeline_layout")
        notes.append(f"the spec's parallel.pipeline_layout names {len(expand(pins.pipeline_layout))} stages, not "
                     f"pp x vpp = {stages}: priced on megacpp's own split")
    return tuple(drop), notes


def _without_pins(ctx: Context, drop: tuple[str, ...]) -> Context:
    """`ctx` with the spec's parallel pins `drop` let go."""
    if not drop:
        return ctx
    pins = ctx.spec.parallel
    spec = ctx.spec.model_copy(update={"parallel": pins.model_copy(update=dict.fromkeys(drop))})
    return dataclasses.replace(ctx, spec=spec)


def versus(plan: Plan, cand: Candidate, text: str) -> dict[str, Any]:
    """Another layout priced beside the candidate, term by term: where a claimed speedup comes
    from (or the rules that reject it)."""
    lay = versus_layout(plan.context, text, parse_versus(text), cand.layout.micro_batch_size)  # no pin is read
    drop, notes = _pins_let_go(plan.context, lay.dp, lay.pp * lay.vpp)
    ctx = _without_pins(plan.context, drop)
    out: dict[str, Any] = {"text": text, "layout": lay.model_dump(), "notes": notes}
    if broken := broken_rules(ctx, lay):
        return {**out, "verdict": "rejected", "rules": broken}
    _, stages = assign_stages(ctx, lay.pp, lay.vpp)
    est = estimate(ctx, lay, stages, plan.efficiency)
    theirs, mine = dict(est.breakdown), cand.step_breakdown
    delta = est.step_seconds / cand.time.step_seconds - 1
    terms = [{"term": t, "candidate": round(mine.get(t, 0.0), 4), "versus": round(theirs.get(t, 0.0), 4),
              "delta": round(theirs.get(t, 0.0) - mine.get(t, 0.0), 4)} for t in dict.fromkeys([*mine, *theirs])]
    return {
        **out,
        "verdict": "legal" if est.peak_gib <= ctx.cluster.gpu_memory_gib else "does-not-fit",
        "step_seconds": round(est.step_seconds, 4),
        "step_delta": round(delta, 4),
        "settled": not within_layout_error(delta),
        "peak_gib": round(est.peak_gib, 2),
        "decided_by": est.decided_by,
        "terms": sorted(terms, key=lambda row: -abs(row["delta"])),
    }


def explain_layout(plan: Plan, candidate: int = 0, rank: int | None = None, against: str | None = None) -> dict[str, Any]:
    """The explain document for one candidate of a plan (optionally focused on one rank)."""
    if not plan.candidates:
        raise PlanError("the plan has no legal layout to explain; `megacpp plan` shows what rejected them")
    if not 0 <= candidate < len(plan.candidates):
        raise PlanError(f"--candidate {candidate}: the plan keeps candidates 0..{len(plan.candidates) - 1}")
    check_consistent(plan)
    cand = plan.candidates[candidate]
    ctx, lay = plan.context, cand.layout
    if rank is not None and not 0 <= rank < plan.world_size:
        raise PlanError(f"--rank {rank}: ranks are 0..{plan.world_size - 1}")
    coords = rank_coordinates(lay, ctx.cluster.gpus_per_node)
    axes = _axis_rows(ctx, lay, cand)
    experts = _experts(ctx, lay, cand, coords)
    # the axis whose collectives add most to the step, not the busiest link: hidden traffic is free
    costliest = max(axes, key=lambda a: a["exposed_seconds_per_step"]) if axes else None
    step = cand.time.step_seconds
    doc: dict[str, Any] = {
        "spec": plan.spec_model.name,
        "pattern": ctx.pattern.source,
        "world_size": plan.world_size,
        "cluster": plan.cluster.model_dump(mode="json"),
        "candidate": candidate,
        "layout": lay.model_dump(),
        "time": cand.time.model_dump(mode="json"),
        "step_breakdown": cand.step_breakdown,
        # the largest term of the step (cost.step.deciding_term); "block_overhead", the host's time
        # beyond the GPU's work, makes the step host-bound
        "decided_by": deciding_term(cand.step_breakdown),
        "host_bound": host_bound(cand.step_breakdown),
        "ranks": coords,
        "stages": _stage_rows(lay, cand, mtp_blocks(ctx)),
        "axes": axes,
        "costliest_axis": costliest["axis"] if costliest and costliest["exposed_seconds_per_step"] > 0 else None,
        "memory": cand.memory.model_dump(mode="json"),
        "experts": experts,
        "runners_up": [
            {"candidate": c.rank, "layout": c.layout.model_dump(), "step_seconds": c.time.step_seconds,
             "step_delta": round(c.time.step_seconds / step - 1, 4), "peak_gib": c.memory.peak_gib,
             "decided_by": deciding_term(c.step_breakdown)}
            for c in plan.candidates if c.rank != cand.rank
        ][:5],
        "why_not": why_not(ctx, lay, step, plan.efficiency),
        "rejected": {"count": plan.rejected.count, "by_rule": plan.rejected.by_rule},
    }
    if against is not None:
        doc["versus"] = versus(plan, cand, against)
    if rank is not None:
        me = coords[rank]
        stages = [s.model_dump(mode="json") for s in cand.stages if s.pp_rank == me["pp"]]
        peers = {a["axis"]: next(g for g in a["groups"] if rank in g) for a in axes if a["groups"]}
        held = [
            {"e_block": e["e_block"], "experts": o["experts"]}
            for e in experts for o in e["owners"] if rank in o["ranks"]
        ]
        doc["focus"] = {**me, "stages": stages, "peers": peers, "experts": held}
    return doc
