"""Build the plan document (DESIGN.md "Plan JSON"): ranked legal layouts and rejection counts."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from megacpp.planner.cost.blocks import routed_load
from megacpp.planner.cost.model import DEFAULT_EFFICIENCY, Efficiency, Estimate, estimate
from megacpp.planner.errors import PlanError
from megacpp.planner.search.layout import Context, Layout
from megacpp.planner.search.rules import applicable, check_layout
from megacpp.planner.search.space import search
from megacpp.planner.search.stages import assign_stages
from megacpp.planner.spec.clusters import Cluster, resolve_cluster
from megacpp.planner.spec.models import SUB_BLOCK_LETTERS, Spec

SCHEMA = "megacpp.plan/1"


class _Doc(BaseModel):
    model_config = ConfigDict(frozen=True, extra="allow")


class Note(_Doc):
    rule: str
    message: str


class Candidate(_Doc):
    rank: int
    layout: dict[str, Any]
    split: dict[str, Any]
    stages: list[dict[str, Any]]
    memory: dict[str, Any]
    communication: list[dict[str, Any]]
    time: dict[str, float]
    # the step on the busiest pipeline rank by term (matmul, softmax, block_overhead, small_kernels,
    # grad_accumulation, communication, bubble, data_parallel, optimizer), in seconds; the terms add
    # up to time.step_seconds
    step_breakdown: dict[str, float] = {}
    fits: bool
    warnings: list[Note]


class RejectedExample(_Doc):
    layout: dict[str, Any]
    rule: str
    message: str


class Rejected(_Doc):
    count: int
    by_rule: dict[str, int]
    examples: list[RejectedExample]


class Plan(_Doc):
    schema_: str
    spec: dict[str, Any]
    cluster: dict[str, Any]
    world_size: int
    considered: int
    legal_count: int
    fitting_count: int
    notes: list[Note]
    candidates: list[Candidate]
    rejected: Rejected

    def to_json_dict(self) -> dict[str, Any]:
        d = self.model_dump(mode="json")
        d = {"schema": d.pop("schema_"), **d}
        return d

    @classmethod
    def from_json_dict(cls, data: dict[str, Any]) -> Plan:
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            raise PlanError(f"not a megacpp plan: expected \"schema\": \"{SCHEMA}\"; create one with `megacpp plan SPEC --out PLAN.json`")
        data = dict(data)
        data["schema_"] = data.pop("schema")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise PlanError(f"malformed plan file: {where}: {first['msg']}; re-create it with `megacpp plan --out`") from None


def make_context(spec: Spec, cluster: Cluster | None = None) -> Context:
    return Context(spec=spec, cluster=cluster or resolve_cluster(spec.cluster))


def with_backend(spec: Spec, **ran: bool) -> Spec:
    """`spec` with the backend that actually ran (BackendSpec fields): a run that asked for TE
    where it does not import runs megatron-core's local modules, whose unfused attention holds more
    memory and moves more bytes; one without Megatron's fusions keeps more activations."""
    if all(getattr(spec.backend, k) == v for k, v in ran.items()):
        return spec
    return spec.model_copy(update={"backend": spec.backend.model_copy(update=ran)})


# The heaviest routed load (busiest expert-parallel rank over the mean, one micro-batch) that the
# committed runs recorded: 1.87, the AMEM hybrid on EP2 with two sequences per micro-batch
# (benchmarks/results/gpu_runs_h200x2_te_blind4.json); MoE top-1 on EP2 reached 1.79
# (gpu_runs_h200x2_routing.json).
MEASURED_ROUTED_LOAD = 1.9
# The same for a single MoE layer (routed_load heaviest_layer_steps), which is what the peak of a
# fully recomputed stage follows: 2.0, every routed token of a layer on one of two EP ranks, in
# the full-recompute EP2 runs of benchmarks/results/gpu_runs_h200x2_te_layers.json.
MEASURED_LAYER_ROUTED_LOAD = 2.0


def estimate_run(spec: Spec, layout: dict[str, Any], eff: Efficiency = DEFAULT_EFFICIENCY, load: float = 1.0) -> Estimate:
    """Estimate one layout of `spec` (a plan's layout dict or a run report's) outside a search;
    `load` is the busiest expert-parallel rank's routed tokens over the mean (cost.estimate)."""
    ctx = make_context(spec)
    lay = Layout.from_dict(layout)
    return estimate(ctx, lay, assign_stages(ctx, lay.pp, lay.vpp)[1], eff, load)


def _candidate(ctx: Context, lay: Layout, est: Estimate, high: Estimate | None, warnings: list) -> Candidate:
    """One ranked layout; `high` is its estimate at the top of the moe.imbalance band, if any."""
    split, stages = assign_stages(ctx, lay.pp, lay.vpp)
    notes = [Note(rule=v.rule, message=v.message) for v in check_layout(ctx, lay, warnings)]
    memory: dict[str, Any] = {
        "capacity_gib": ctx.cluster.gpu_memory_gib,
        "peak_gib": round(est.peak_gib, 3),
        "per_stage": [m.to_dict() for m in est.memory],
    }
    timing = {
        "step_seconds": round(est.step_seconds, 6),
        "compute_seconds": round(est.compute_seconds, 6),
        "tokens_per_second": round(est.tokens_per_second, 1),
        "mfu": round(est.mfu, 4),
        "bubble_fraction": round(est.bubble_fraction, 4),
        "host_seconds": round(est.host_seconds, 6),  # per-block host time, hidden behind the GPU or not
        "expert_host_seconds": round(est.expert_host_seconds, 6),  # of which the local experts' own (TE)
    }
    if high is not None:
        memory["routed_load"] = routed_load(ctx, imbalanced=True)
        memory["peak_gib_high"] = round(high.peak_gib, 3)
        for row, m in zip(memory["per_stage"], high.memory, strict=True):
            row["total_gib_high"] = round(m.total_gib, 3)
        timing["step_seconds_high"] = round(high.step_seconds, 6)
    return Candidate(
        rank=0,
        layout=lay.to_dict(),
        split={"kind": split.kind, "sizes": list(split.sizes), "first": split.first, "last": split.last},
        stages=[s.to_dict() for s in stages],
        memory=memory,
        communication=[c.to_dict() for c in est.communication],
        time=timing,
        step_breakdown={term: round(seconds, 6) for term, seconds in est.breakdown},
        fits=(high or est).peak_gib <= ctx.cluster.gpu_memory_gib,
        warnings=notes,
    )


def build_plan(spec: Spec, top: int = 10, eff: Efficiency = DEFAULT_EFFICIENCY) -> Plan:
    """Search the layout space of `spec`, estimate every legal layout, and rank them.

    Ranking: layouts that fit in memory first, then by estimated step time.
    """
    if top < 1:
        raise PlanError(f"--top {top}: must be at least 1")
    ctx = make_context(spec)
    result = search(ctx)
    rules = applicable(ctx)
    warnings = [r for r in rules if r.severity == "warning" and r.axes]
    spec_notes = [Note(rule=v.rule, message=v.message) for v in check_layout(ctx, Layout(), [r for r in rules if r.severity == "warning" and not r.axes])]
    spec_notes += [
        Note(rule="unused-sub-block", message=f"model.{k} is given but the pattern has no {SUB_BLOCK_LETTERS[k]} block; it is ignored")
        for k in spec.model.unused_sub_blocks()
    ]
    scored = []
    capacity = ctx.cluster.gpu_memory_gib
    load = routed_load(ctx, imbalanced=True)
    for lay in result.legal:
        stages = assign_stages(ctx, lay.pp, lay.vpp)[1]
        est = estimate(ctx, lay, stages, eff)
        # the busiest expert-parallel rank under moe.imbalance: the band's top, which must fit
        high = estimate(ctx, lay, stages, eff, load) if load > 1 and lay.ep > 1 else None
        # fitting layouts first, then faster, then lighter on memory
        scored.append(((high or est).peak_gib > capacity, round(est.step_seconds, 9), round(est.peak_gib, 3), lay.short(),
                       lay, est, high))
    scored.sort(key=lambda t: t[:4])
    chosen = [
        _candidate(ctx, lay, est, high, warnings).model_copy(update={"rank": i})
        for i, (*_, lay, est, high) in enumerate(scored[:top])
    ]
    moe = spec.model.moe
    if moe is not None and moe.imbalance == 1.0 and any(c.layout["ep"] > 1 for c in chosen):
        full = spec.training.recompute == "full"  # the peak follows one layer's load
        load, where = (MEASURED_LAYER_ROUTED_LOAD, "one layer of one micro-batch") if full else (MEASURED_ROUTED_LOAD, "one micro-batch")
        spec_notes.append(Note(rule="moe-balanced-routing", message=(
            "model.moe.imbalance is 1 (balanced routing): expert-parallel ranks are planned for the mean routed tokens, "
            f"but on the measured runs the busiest rank took up to {load:g}x the mean in {where} "
            f"early in training; set model.moe.imbalance (e.g. {load:g}) to plan for it")))
    examples = [
        RejectedExample(layout=lay.to_dict(), rule=rule_id, message=msg)
        for rule_id, shown in result.rejections.examples.items()
        for lay, msg in shown
    ]
    c = ctx.cluster
    return Plan(
        schema_=SCHEMA,
        spec=spec.model_dump(mode="json"),
        cluster={
            "name": c.name, "nodes": c.nodes, "gpus_per_node": c.gpus_per_node, "nvlink_domain": c.nvlink_domain,
            "gpu_memory_gib": c.gpu_memory_gib, "description": c.description,
        },
        world_size=ctx.world,
        considered=result.considered,
        legal_count=len(result.legal),
        fitting_count=sum(1 for s in scored if not s[0]),
        notes=spec_notes,
        candidates=chosen,
        rejected=Rejected(
            count=result.rejections.count,
            by_rule=dict(result.rejections.by_rule.most_common()),
            examples=examples,
        ),
    )
