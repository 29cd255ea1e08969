"""`megacpp validate`: is a spec plannable, or a plan file still legal for its spec?"""

from __future__ import annotations

from typing import Any

from megacpp.planner.errors import LaunchError, MegacppError, PlanError
from megacpp.planner.megatron.args import TrainOptions, known_flags, megatron_args
from megacpp.planner.megatron.job_args import extra_arg_problems, extra_arg_warnings
from megacpp.planner.plan import Candidate, Note, Plan, build_plan, make_context
from megacpp.planner.search.layout import Context, Layout
from megacpp.planner.search.rules import applicable, check_layout
from megacpp.planner.search.stages import assign_stages
from megacpp.planner.spec.clusters import resolve_cluster
from megacpp.planner.spec.models import Spec

# a layout that does not tile the world has no data-parallel size: rules past the grid are moot
GRID_LEVEL = 3

# what runs the job: stock Megatron-LM (the default verdict) or megacpp's runtime on megatron-core
ENGINES = ("megatron-lm", "megacpp")
# spec-wide warning rules that say what one engine cannot build: the rule and that engine
ENGINE_RULES = {"mamba-needs-te": "megatron-lm", "recurrent-runtime-only": "megatron-lm",
                "memory-features-need-megatron-lm": "megacpp"}


def engine_gaps(ctx: Context, notes: list[Note], best: Candidate | None) -> dict[str, list[str]]:
    """What of the spec each engine cannot run, as messages: Megatron-LM's missing layers and its
    parser's verdict on launch.extra_args, the runtime's missing features."""
    gaps: dict[str, list[str]] = {engine: [] for engine in ENGINES}
    for note in notes:
        if note.rule in ENGINE_RULES:
            gaps[ENGINE_RULES[note.rule]].append(f"{note.rule}: {note.message}")
    spec = ctx.spec
    moe = spec.model.moe
    # runtime/worker/megatron_config.py refuses these: its schedule builds neither TE's userbuffers
    # nor Megatron's combined 1F1B
    for key, on in (("training.tp_comm_overlap", spec.training.tp_comm_overlap),
                    ("model.moe.overlap_communication", moe is not None and moe.overlap_communication)):
        if on:
            gaps["megacpp"].append(f"{key}: the megacpp runtime does not overlap these collectives")
    if spec.launch.extra_args:
        try:  # megacpp's own flags for the best layout, which the extra flags must not restate
            ours = megatron_args(ctx, best, TrainOptions(), extra=False) if best is not None else []
        except LaunchError:
            ours = []  # an engine gap above already says why Megatron-LM cannot take this spec
        gaps["megatron-lm"] += extra_arg_problems(ctx, ours, known_flags(ctx.dialect))
    return gaps


def engine_ignores(ctx: Context) -> dict[str, list[str]]:
    """What of the spec an engine runs without, as warnings (the job runs, but not all of it)."""
    spec = ctx.spec
    unused = [key for key, given in (("data", spec.data is not None), ("checkpoint", spec.checkpoint is not None),
                                     ("launch.extra_args", bool(spec.launch.extra_args)),
                                     ("training.cuda_graphs", spec.training.cuda_graphs != "none")) if given]
    runtime = [f"{', '.join(unused)}: read by Megatron-LM only; the megacpp runtime trains on synthetic tokens, "
               "saves no checkpoint and captures no CUDA graphs"] if unused else []
    return {"megatron-lm": [], "megacpp": runtime}


def _engine_verdict(result: dict[str, Any], ctx: Context, notes: list[Note], best: Candidate | None, engine: str) -> dict[str, Any]:
    """`result` (the rules' verdict) judged for `engine`, with every engine's verdict beside it."""
    if engine not in ENGINES:
        raise PlanError(f"--engine {engine!r}: choose one of {', '.join(ENGINES)}")
    gaps, ignores = engine_gaps(ctx, notes, best), engine_ignores(ctx)
    engine_notes = {n.message for n in notes if n.rule in ENGINE_RULES}  # now the engines' verdicts
    verdicts: dict[str, dict[str, Any]] = {e: {"valid": result["valid"] and not gaps[e], "errors": gaps[e], "warnings": ignores[e]} for e in ENGINES}
    warnings = [w for w in result["warnings"] if w not in engine_notes] + ignores[engine] + extra_arg_warnings(ctx.spec)
    for other in ENGINES:
        if other != engine and verdicts[other]["valid"] != verdicts[engine]["valid"]:
            why = f": {verdicts[other]['errors'][0]}" if verdicts[other]["errors"] else ""
            warnings.append(f"under --engine {other} this is {'valid' if verdicts[other]['valid'] else 'invalid'}{why}")
    errors = result["errors"] + [f"--engine {engine}: {g}" for g in gaps[engine]]
    return {**result, "valid": not errors, "errors": errors, "warnings": warnings, "engine": engine, "engines": verdicts}


def _summary_of_rejection(plan: Plan) -> str:
    if not plan.rejected.examples:
        return "no layout to check"
    top_rule = next(iter(plan.rejected.by_rule))
    example = next(e for e in plan.rejected.examples if e.rule == top_rule)
    return f"no legal layout among {plan.considered:,}; most rejected by {top_rule}: {example.message}"


def validate_spec(spec: Spec, engine: str = "megatron-lm") -> dict[str, Any]:
    """Valid when at least one layout (the pinned one, if every axis is pinned) passes every rule
    and `engine` can run what the spec asks for."""
    cluster = resolve_cluster(spec.cluster, purpose="validate")
    plan = build_plan(spec, top=1, cluster=cluster)
    ctx = make_context(spec, cluster)
    return _engine_verdict(_rules_verdict(plan, ctx), ctx, plan.notes, plan.candidates[0] if plan.candidates else None, engine)


def _rules_verdict(plan: Plan, ctx: Context) -> dict[str, Any]:
    cluster = ctx.cluster
    warnings = [n.message for n in plan.notes]
    if not plan.legal_count:
        if plan.considered == 1 and plan.rejected.examples:  # fully pinned: report every broken rule
            return {"valid": False, "errors": broken_rules(ctx, pinned_layout(ctx, plan.rejected.examples[0].layout)),
                    "warnings": warnings, "legal_count": 0}
        return {"valid": False, "errors": [_summary_of_rejection(plan)], "warnings": warnings, "legal_count": 0}
    best = plan.candidates[0]
    warnings += [w.message for w in best.warnings]
    if not plan.fitting_count:
        warnings.append(f"no legal layout fits in {plan.cluster.gpu_memory_gib:g} GiB per GPU (best peak {best.memory.peak_gib:.1f} GiB)")
    lay = best.layout
    summary = f"{plan.legal_count:,} legal layouts of {plan.considered:,}"
    if not cluster.memory_known:
        summary += " (memory not checked: the inline cluster states no cluster.gpu_memory_gib)"
    else:
        summary += f", {plan.fitting_count:,} fit"
    if cluster.priced:
        summary += f"; best tp{lay.tp} pp{lay.pp} cp{lay.cp} dp{lay.dp} ep{lay.ep} etp{lay.etp}"
    else:
        summary += "; not ranked: the inline cluster states no compute or link numbers (cluster.gpu or cluster.bf16_tflops)"
    return {"valid": True, "errors": [], "warnings": warnings, "legal_count": plan.legal_count, "summary": summary}


def pinned_layout(ctx: Context, seed: Layout) -> Layout:
    """The one layout a fully pinned spec names, every field derived as the search derives it
    (`seed` is the search's rejected example, whose axes past the rejecting rule are unbound)."""
    pins = ctx.spec.parallel
    mbs = ctx.spec.training.micro_batch_size
    return complete_layout(
        ctx, tp=pins.tp if pins.tp is not None else seed.tp, cp=pins.cp if pins.cp is not None else seed.cp,
        pp=pins.pp if pins.pp is not None else seed.pp, vpp=pins.vpp if pins.vpp is not None else seed.vpp,
        ep=pins.ep if pins.ep is not None else seed.ep, etp=pins.etp, mbs=seed.micro_batch_size if mbs == "auto" else mbs)


def complete_layout(ctx: Context, *, tp: int, cp: int, pp: int, vpp: int, ep: int, etp: int | None, mbs: int) -> Layout:
    """A layout of these degrees with the fields the search derives: dp from the world (0 where
    tp x cp x pp does not tile it), the micro-batch count from the batch (0 where it does not
    divide), etp = tp unless given, and SP as the spec pins it or the search sets it."""
    sp, world = ctx.spec.parallel.sp, ctx.world
    size = tp * cp * pp
    dp = world // size if world % size == 0 else 0
    gbs = ctx.spec.training.global_batch_size
    m = gbs // (mbs * dp) if dp and gbs % (mbs * dp) == 0 else 0
    return Layout(tp=tp, cp=cp, pp=pp, dp=dp, vpp=vpp, ep=ep, etp=tp if etp is None else etp,
                  sp=(tp > 1 and ctx.te) if sp is None else sp, micro_batch_size=mbs, num_microbatches=m)


def broken_rules(ctx: Context, lay: Layout) -> list[str]:
    """Every error rule `lay` breaks, with its real values; past the grid only where the layout tiles the world."""
    rules = [r for r in applicable(ctx) if r.severity == "error" and (lay.dp or r.level <= GRID_LEVEL)]
    return [f"{v.rule}: {v.message}" for v in check_layout(ctx, lay, rules)]


def consistency_errors(plan: Plan) -> list[str]:
    """What makes a plan file disagree with its own spec: a candidate its rules reject, a world,
    batch or stage split that does not add up. Empty for a plan as `megacpp plan` wrote it."""
    ctx = plan.context
    errors = []
    if not plan.candidates:
        errors.append("the plan has no candidate layouts; re-create it with `megacpp plan SPEC --out PLAN.json`")
    if ctx.world != plan.world_size:
        errors.append(f"world_size {plan.world_size} does not match the spec's cluster ({ctx.world} GPUs)")
    gbs = ctx.spec.training.global_batch_size
    for cand in plan.candidates:
        lay = cand.layout
        where = f"candidate {cand.rank}"
        if lay.world != ctx.world:
            errors.append(f"{where}: tp*cp*dp*pp = {lay.world} != the cluster's {ctx.world} GPUs")
            continue
        broken = broken_rules(ctx, lay)
        errors += [f"{where}: {b}" for b in broken]
        if broken:
            continue
        if lay.micro_batch_size * lay.num_microbatches * lay.dp != gbs:
            errors.append(f"{where}: micro_batch_size {lay.micro_batch_size} x num_microbatches {lay.num_microbatches} "
                          f"x dp {lay.dp} != global_batch_size {gbs}")
        split, stages = assign_stages(ctx, lay.pp, lay.vpp)
        if list(cand.split.sizes) != list(split.sizes) or cand.split.kind != split.kind or \
                [(s.start, s.stop, s.blocks) for s in cand.stages] != [(s.start, s.stop, s.blocks) for s in stages]:
            errors.append(f"{where}: its stage split was edited ({cand.split.kind} {list(cand.split.sizes)[:8]}); "
                          f"the spec splits as {split.kind} {list(split.sizes)[:8]}")
    return errors


def check_consistent(plan: Plan) -> None:
    """Refuse a plan file that disagrees with its spec, before anything renders or explains it."""
    errors = consistency_errors(plan)
    if errors:
        more = f" (and {len(errors) - 1} more; `megacpp validate` lists them)" if len(errors) > 1 else ""
        raise PlanError(f"inconsistent plan: {errors[0]}{more}")


def validate_plan(plan: Plan, engine: str = "megatron-lm") -> dict[str, Any]:
    """Re-check every candidate of a plan file against its embedded spec (Plan.from_json_dict has
    checked that each layout is well formed), and whether `engine` can run it."""
    errors = consistency_errors(plan)
    summary = f"{len(plan.candidates)} candidate layouts re-checked against the embedded spec"
    result = {"valid": not errors, "errors": errors, "warnings": [n.message for n in plan.notes],
              "legal_count": len(plan.candidates), "summary": summary}
    best = plan.candidates[0] if plan.candidates and not errors else None
    return _engine_verdict(result, plan.context, plan.notes, best, engine)


def validation_error(exc: MegacppError) -> dict[str, Any]:
    return {"valid": False, "errors": [str(exc)], "warnings": [], "legal_count": 0}
