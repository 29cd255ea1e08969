"""`megacpp validate`: is a spec plannable, or a plan file still legal for its spec?"""

from __future__ import annotations

from typing import Any

from megacpp.planner.errors import MegacppError
from megacpp.planner.plan import Plan, build_plan, make_context
from megacpp.planner.search.rules import check_layout
from megacpp.planner.spec.models import Spec


def _summary_of_rejection(plan: Plan) -> str:
    if not plan.rejected.examples:
        return "no layout to check"
    top_rule = next(iter(plan.rejected.by_rule))
    example = next(e for e in plan.rejected.examples if e.rule == top_rule)
    return f"no legal layout among {plan.considered:,}; most rejected by {top_rule}: {example.message}"


def validate_spec(spec: Spec) -> dict[str, Any]:
    """Valid when at least one layout (the pinned one, if every axis is pinned) passes every rule."""
    plan = build_plan(spec, top=1)
    warnings = [n.message for n in plan.notes]
    if not plan.legal_count:
        if plan.considered == 1 and plan.rejected.examples:  # fully pinned: report every broken rule
            lay = plan.rejected.examples[0].layout
            broken = [f"{v.rule}: {v.message}" for v in check_layout(make_context(spec), lay) if v.severity == "error"]
            return {"valid": False, "errors": broken, "warnings": warnings, "legal_count": 0}
        return {"valid": False, "errors": [_summary_of_rejection(plan)], "warnings": warnings, "legal_count": 0}
    best = plan.candidates[0]
    warnings += [w.message for w in best.warnings]
    if not plan.fitting_count:
        warnings.append(f"no legal layout fits in {plan.cluster.gpu_memory_gib:g} GiB per GPU (best peak {best.memory.peak_gib:.1f} GiB)")
    lay = best.layout
    summary = (
        f"{plan.legal_count:,} legal layouts of {plan.considered:,}, {plan.fitting_count:,} fit; best "
        f"tp{lay.tp} pp{lay.pp} cp{lay.cp} dp{lay.dp} ep{lay.ep} etp{lay.etp}"
    )
    return {"valid": True, "errors": [], "warnings": warnings, "legal_count": plan.legal_count, "summary": summary}


def validate_plan(plan: Plan) -> dict[str, Any]:
    """Re-check every candidate of a plan file against its embedded spec (Plan.from_json_dict has
    checked that each layout is well formed)."""
    ctx = plan.context
    errors = []
    if ctx.world != plan.world_size:
        errors.append(f"world_size {plan.world_size} does not match the spec's cluster ({ctx.world} GPUs)")
    for cand in plan.candidates:
        lay = cand.layout
        if lay.world != plan.world_size:
            errors.append(f"candidate {cand.rank}: tp*cp*dp*pp = {lay.world} != world_size {plan.world_size}")
            continue
        for v in check_layout(ctx, lay):
            if v.severity == "error":
                errors.append(f"candidate {cand.rank}: {v.rule}: {v.message}")
    summary = f"{len(plan.candidates)} candidate layouts re-checked against the embedded spec"
    return {"valid": not errors, "errors": errors, "warnings": [], "legal_count": len(plan.candidates), "summary": summary}


def validation_error(exc: MegacppError) -> dict[str, Any]:
    return {"valid": False, "errors": [str(exc)], "warnings": [], "legal_count": 0}
