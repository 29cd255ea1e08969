"""The plan (DESIGN.md "Plan JSON"): ranked legal layouts, rejection counts and the profile that
priced them, as typed models that write exactly that JSON and read it back; and how it is built."""

from __future__ import annotations

from bisect import insort
from collections.abc import Iterator
from dataclasses import fields, replace
from functools import cached_property
from itertools import chain
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
)

from megacpp.planner.axes import Axis
from megacpp.planner.cost.activations import recompute_modules
from megacpp.planner.cost.coefficients import (
    DEFAULT_EFFICIENCY,
    MEASURED_LAYER_ROUTED_LOAD,
    MEASURED_ROUTED_LOAD,
    Efficiency,
)
from megacpp.planner.cost.fits import fits
from megacpp.planner.cost.flops import routed_load
from megacpp.planner.cost.step import Estimate, compute_floor, estimate, step_floor
from megacpp.planner.errors import PlanError, did_you_mean
from megacpp.planner.search.layout import Context, Layout
from megacpp.planner.search.rules import applicable, check_layout
from megacpp.planner.search.space import search
from megacpp.planner.search.stages import assign_stages
from megacpp.planner.spec.clusters import PROFILE_FIELDS, Cluster, resolve_cluster
from megacpp.planner.spec.loading import spec_from_dict
from megacpp.planner.spec.models import SUB_BLOCK_LETTERS, Spec

SCHEMA = "megacpp.plan/1"


class _Doc(BaseModel):
    """A part of the plan document: read and validated once, then only read."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    @model_serializer(mode="wrap")
    def _omit_absent(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Optional keys (None by default) are written only where they have a value."""
        fields = type(self).model_fields
        return {k: v for k, v in handler(self).items() if v is not None or fields[k].default is not None}


class Note(_Doc):
    rule: str
    message: str


class PlannedSplit(_Doc):
    """How the stage split is expressed to Megatron (search.stages.Split)."""

    kind: Literal["even", "first_last", "layout", "pipes", "account"]
    sizes: list[int]  # units per global chunk, in chunk order (chunk k -> pp_rank k % pp)
    first: int
    last: int


class PlannedStage(_Doc):
    """One (virtual) pipeline stage: Megatron layers [start, stop) and the blocks they hold."""

    pp_rank: int
    vp_stage: int
    layers: tuple[int, int]
    blocks: str
    embedding: bool
    output_head: bool
    mtp: bool | None = None  # True where the model's MTP layers run (with the output head unless a layout moves them)

    @property
    def start(self) -> int:
        return self.layers[0]

    @property
    def stop(self) -> int:
        return self.layers[1]


class PlannedStageMemory(_Doc):
    """One pipeline rank's memory (cost.memory.StageMemory.to_dict), GiB unless named otherwise."""

    pp_rank: int
    params: int
    params_expert: int
    param_tensors: int
    weights_gib: float
    gradients_gib: float
    optimizer_gib: float
    activations_gib: float
    buffers_gib: float
    transient_gib: float
    transient_from: str
    optimizer_step_gib: float
    overhead_gib: float
    resident_gib: float
    total_gib: float
    reserved_gib: float
    total_gib_high: float | None = None  # at the top of the moe.imbalance band


class PlannedMemory(_Doc):
    capacity_gib: float
    peak_gib: float
    per_stage: list[PlannedStageMemory]
    # with moe.imbalance: the busiest expert-parallel rank's routed tokens over the mean, and the peak there
    routed_load: float | None = None
    peak_gib_high: float | None = None


class PlannedComm(_Doc):
    """One collective of one axis over a training step."""

    axis: Axis
    collective: str
    group_size: int
    bytes_per_step: int
    link: str
    seconds: float
    exposed_seconds: float


class PlannedTime(_Doc):
    step_seconds: float
    compute_seconds: float
    tokens_per_second: float
    mfu: float
    bubble_fraction: float
    # per-block host time, hidden behind the GPU or not, and of it the local experts' own (TE);
    # absent from plans made before they were priced
    host_seconds: float | None = None
    expert_host_seconds: float | None = None
    step_seconds_high: float | None = None  # at the top of the moe.imbalance band


class Candidate(_Doc):
    rank: int
    layout: Layout
    split: PlannedSplit
    stages: list[PlannedStage]
    memory: PlannedMemory
    communication: list[PlannedComm]
    time: PlannedTime
    # the step on the busiest pipeline rank by term (matmul, softmax, block_overhead, small_kernels,
    # grad_accumulation, communication, bubble, data_parallel, optimizer), in seconds; the terms add
    # up to time.step_seconds
    step_breakdown: dict[str, float] = {}
    fits: bool
    warnings: list[Note]


class RejectedExample(_Doc):
    layout: Layout
    rule: str
    message: str


class Rejected(_Doc):
    count: int
    by_rule: dict[str, int]
    examples: list[RejectedExample]


class PlannedCluster(_Doc):
    name: str
    nodes: int
    gpus_per_node: int
    nvlink_domain: int
    gpu_memory_gib: float
    description: str
    # the card's memory, of which gpu_memory_gib is planned (the rest is headroom); absent from older plans
    gpu_memory_total_gib: float | None = None


# Efficiency's factors by name, and whether each is a table (per block letter) or one number
_FACTORS = {f.name: isinstance(getattr(DEFAULT_EFFICIENCY, f.name), tuple) for f in fields(Efficiency)}


class Profile(_Doc):
    """What priced the plan: the shipped factors ("defaults"), or the cluster profile that
    `megacpp plan --profile` read, as the factors it set. Whatever re-prices the plan's layouts
    (explain's why-not rows, the worker's report) uses the same."""

    source: str = "defaults"
    factors: dict[str, float | dict[str, float]] = {}  # Efficiency fields that differ from the defaults
    # Cluster fields the profile sets (spec.clusters.PROFILE_FIELDS): a system's own host class,
    # matmul rate and NIC, fitted to its measured runs; absent where it sets none
    cluster: dict[str, float] | None = None

    @field_validator("factors")
    @classmethod
    def _known(cls, factors: dict[str, float | dict[str, float]]) -> dict[str, float | dict[str, float]]:
        for name, value in factors.items():
            if name not in _FACTORS:
                raise ValueError(f"unknown factor {name!r}{did_you_mean(name, list(_FACTORS))}")
            if isinstance(value, dict) != _FACTORS[name]:
                raise ValueError(f"factor {name!r} must be {'seconds by block letter' if _FACTORS[name] else 'a number'}")
        return factors

    @field_validator("cluster")
    @classmethod
    def _cluster_fields(cls, cluster: dict[str, float] | None) -> dict[str, float] | None:
        for name, value in (cluster or {}).items():
            if name not in PROFILE_FIELDS:
                raise ValueError(f"unknown cluster field {name!r}{did_you_mean(name, list(PROFILE_FIELDS))}; "
                                 f"a profile sets {', '.join(PROFILE_FIELDS)}")
            low, high = PROFILE_FIELDS[name]
            if not low <= value <= high:
                raise ValueError(f"cluster field {name!r} must be from {low:g} to {high:g}, got {value:g}")
        return cluster

    @classmethod
    def of(cls, eff: Efficiency, source: str, cluster: dict[str, float] | None = None) -> Profile:
        """The record of `eff` and the cluster fields `cluster`, read from `source` (a profile file)."""
        factors: dict[str, float | dict[str, float]] = {}
        for name in _FACTORS:
            value = getattr(eff, name)
            if value != getattr(DEFAULT_EFFICIENCY, name):
                factors[name] = dict(value) if isinstance(value, tuple) else value
        return cls(source=source, factors=factors, cluster=cluster or None)

    def on(self, cluster: Cluster) -> Cluster:
        """`cluster` with the fields this profile sets (they replace the preset's and the spec's)."""
        return cluster.model_copy(update=self.cluster) if self.cluster else cluster

    @cached_property
    def efficiency(self) -> Efficiency:
        return replace(DEFAULT_EFFICIENCY, **{k: tuple(v.items()) if isinstance(v, dict) else v for k, v in self.factors.items()})


DEFAULTS = Profile()


def _shown(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Plan(_Doc):
    schema_: str
    spec: dict[str, Any]
    cluster: PlannedCluster
    profile: Profile = DEFAULTS  # plans made before it was recorded were priced with the defaults
    world_size: int
    considered: int
    legal_count: int
    fitting_count: int
    notes: list[Note]
    candidates: list[Candidate]
    rejected: Rejected

    @cached_property
    def spec_model(self) -> Spec:
        """The spec the plan was made from, as the model (`spec` is its JSON)."""
        return spec_from_dict(self.spec, source="plan spec")

    @cached_property
    def context(self) -> Context:
        return make_context(self.spec_model, profile=self.profile)

    @property
    def efficiency(self) -> Efficiency:
        return self.profile.efficiency

    def to_json_dict(self) -> dict[str, Any]:
        d = self.model_dump(mode="json")
        d = {"schema": d.pop("schema_"), **d}
        return d

    @classmethod
    def from_json_dict(cls, data: dict[str, Any]) -> Plan:
        """Read a plan document: its parts are typed and its spec validated here, once."""
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            raise PlanError(f"not a megacpp plan: expected \"schema\": \"{SCHEMA}\"; create one with `megacpp plan SPEC --out PLAN.json`")
        data = dict(data)
        data["schema_"] = data.pop("schema")
        try:
            plan = cls.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            got = "" if first["type"] == "missing" else f", got {_shown(first['input'])}"
            raise PlanError(f"malformed plan file: {where}: {first['msg']}{got}; re-create it with `megacpp plan --out`") from None
        plan.context  # noqa: B018  the embedded spec must load (a SpecError names what is wrong)
        return plan


def make_context(spec: Spec, cluster: Cluster | None = None, profile: Profile = DEFAULTS) -> Context:
    """The spec's context on `cluster` (default: the spec's), with what `profile` sets of it."""
    return Context(spec=spec, cluster=profile.on(cluster or resolve_cluster(spec.cluster)))


def with_backend(spec: Spec, **ran: bool) -> Spec:
    """`spec` with the backend that actually ran (BackendSpec fields): a run that asked for TE
    where it does not import runs megatron-core's local modules, whose unfused attention holds more
    memory and moves more bytes; one without Megatron's fusions keeps more activations."""
    if all(getattr(spec.backend, k) == v for k, v in ran.items()):
        return spec
    return spec.model_copy(update={"backend": spec.backend.model_copy(update=ran)})


def estimate_run(spec: Spec, layout: Layout | dict[str, Any], eff: Efficiency = DEFAULT_EFFICIENCY, load: float = 1.0,
                 cluster: Cluster | None = None) -> Estimate:
    """Estimate one layout of `spec` (a plan's, or a run report's layout dict) outside a search;
    `load` is the busiest expert-parallel rank's routed tokens over the mean (cost.step.estimate);
    `cluster` (default: the spec's) is a plan's, with what its profile sets."""
    ctx = make_context(spec, cluster)
    lay = layout if isinstance(layout, Layout) else Layout.from_dict(layout)
    return estimate(ctx, lay, assign_stages(ctx, lay.pp, lay.vpp)[1], eff, load)


def _candidate(ctx: Context, lay: Layout, est: Estimate, high: Estimate | None, warnings: list) -> Candidate:
    """One ranked layout; `high` is its estimate at the top of the moe.imbalance band, if any."""
    split, stages = assign_stages(ctx, lay.pp, lay.vpp)
    notes = [Note(rule=v.rule, message=v.message) for v in check_layout(ctx, lay, warnings)]
    highs = [round(m.total_gib, 3) for m in high.memory] if high is not None else [None] * len(est.memory)
    memory = PlannedMemory(
        capacity_gib=ctx.cluster.gpu_memory_gib,
        peak_gib=round(est.peak_gib, 3),
        per_stage=[PlannedStageMemory(**m.to_dict(), total_gib_high=h) for m, h in zip(est.memory, highs, strict=True)],
        routed_load=routed_load(ctx, imbalanced=True) if high is not None else None,
        peak_gib_high=round(high.peak_gib, 3) if high is not None else None,
    )
    timing = PlannedTime(
        step_seconds=round(est.step_seconds, 6),
        compute_seconds=round(est.compute_seconds, 6),
        tokens_per_second=round(est.tokens_per_second, 1),
        mfu=round(est.mfu, 4),
        bubble_fraction=round(est.bubble_fraction, 4),
        host_seconds=round(est.host_seconds, 6),
        expert_host_seconds=round(est.expert_host_seconds, 6),
        step_seconds_high=round(high.step_seconds, 6) if high is not None else None,
    )
    return Candidate(
        rank=0,
        layout=lay,
        split=PlannedSplit(kind=split.kind, sizes=list(split.sizes), first=split.first, last=split.last),
        stages=[PlannedStage(pp_rank=s.pp_rank, vp_stage=s.vp_stage, layers=(s.start, s.stop), blocks=s.blocks,
                             embedding=s.embedding, output_head=s.output_head, mtp=s.mtp or None) for s in stages],
        memory=memory,
        communication=[PlannedComm(**c.to_dict()) for c in est.communication],
        time=timing,
        step_breakdown={term: round(seconds, 6) for term, seconds in est.breakdown},
        fits=(high or est).peak_gib <= ctx.cluster.gpu_memory_gib,
        warnings=notes,
    )


def build_plan(spec: Spec, top: int = 10, profile: Profile = DEFAULTS, cluster: Cluster | None = None,
               every_vpp: bool = False) -> Plan:
    """Search the layout space of `spec`, estimate every legal layout with the factors of
    `profile`, and rank them (on `cluster`, default the spec's as resolve_cluster builds it).

    Ranking: layouts that fit in memory first, then by estimated step time. A layout ranks once,
    at its best VPP (VPP changes the schedule, not the groups), unless `every_vpp`.
    """
    if top < 1:
        raise PlanError(f"--top {top}: must be at least 1")
    ctx = make_context(spec, cluster, profile=profile)
    result = search(ctx)
    rules = applicable(ctx)
    warnings = [r for r in rules if r.severity == "warning" and r.axes]
    spec_notes = [Note(rule=v.rule, message=v.message) for v in check_layout(ctx, Layout(), [r for r in rules if r.severity == "warning" and not r.axes])]
    spec_notes += [
        Note(rule="unused-sub-block", message=f"model.{k} is given but the pattern has no {SUB_BLOCK_LETTERS[k]} block; it is ignored")
        for k in spec.model.unused_sub_blocks()
    ]
    spec_notes += [Note(rule="cluster-numbers", message=m) for m in ctx.cluster.notes]
    capacity = ctx.cluster.gpu_memory_gib
    load = routed_load(ctx, imbalanced=True)
    eff = profile.efficiency
    # every legal layout's memory decides whether it fits (fitting_count); its step, only whether
    # it ranks in the top. Steps are priced in the order of a floor under them (cost.step.step_floor)
    # until the next floor is slower than the top-th step, and a layout whose step without the
    # communication that may hide (compute_floor) is already slower is not priced further; a floor
    # never exceeds the step, nor does its rounding. Layouts that fit rank before those that do
    # not, so the misfits' floors are worked out only where fewer than `top` layouts fit
    legal = result.legal
    fitting: list[int] = []
    misfits: list[int] = []
    for i, lay in enumerate(legal):
        stages = assign_stages(ctx, lay.pp, lay.vpp)[1]
        # the busiest expert-parallel rank under moe.imbalance: the band's top, which must fit
        imbalanced = load > 1 and lay.ep > 1
        (fitting if fits(ctx, lay, stages, eff, capacity, load if imbalanced else 1.0) else misfits).append(i)

    def floor(lay: Layout) -> float:
        return round(step_floor(ctx, lay, eff, stages=assign_stages(ctx, lay.pp, lay.vpp)[1]), 9)

    def by_floor(misfit: bool, group: list[int]) -> Iterator[tuple[bool, float, int]]:
        yield from ((misfit, bound, i) for bound, i in sorted((floor(legal[i]), i) for i in group))

    scored: list[tuple[Any, ...]] = []
    kept: dict[tuple[int | bool, ...], tuple[Any, ...]] = {}  # the best VPP of each layout in `scored`
    for misfit, bound, i in chain(by_floor(False, fitting), by_floor(True, misfits)):
        if len(scored) >= top and (misfit, bound) > scored[top - 1][:2]:
            break
        lay = legal[i]
        stages = assign_stages(ctx, lay.pp, lay.vpp)[1]
        if len(scored) >= top and (misfit, round(compute_floor(ctx, lay, stages, eff), 9)) > scored[top - 1][:2]:
            continue
        est = estimate(ctx, lay, stages, eff)
        high = estimate(ctx, lay, stages, eff, load) if load > 1 and lay.ep > 1 else None
        # fitting layouts first, then faster, then lighter on memory
        entry = (misfit, round(est.step_seconds, 9), round(est.peak_gib, 3), lay.short(), lay, est, high)
        if not every_vpp:
            base = lay.but_vpp()
            other = kept.get(base)
            if other is not None:
                if other[:4] <= entry[:4]:
                    continue
                scored.remove(other)
            kept[base] = entry
        insort(scored, entry, key=lambda t: t[:4])
    chosen = [
        _candidate(ctx, lay, est, high, warnings).model_copy(update={"rank": i})
        for i, (*_, lay, est, high) in enumerate(scored[:top])
    ]
    moe = spec.model.moe
    if moe is not None and moe.imbalance == 1.0 and any(c.layout.ep > 1 for c in chosen):
        full = spec.training.recompute == "full"  # the peak follows one layer's load
        load, where = (MEASURED_LAYER_ROUTED_LOAD, "one layer of one micro-batch") if full else (MEASURED_ROUTED_LOAD, "one micro-batch")
        spec_notes.append(Note(rule="moe-balanced-routing", message=(
            "model.moe.imbalance is 1 (balanced routing): expert-parallel ranks are planned for the mean routed tokens, "
            f"but on the measured runs the busiest rank took up to {load:g}x the mean in {where} "
            f"early in training; set model.moe.imbalance (e.g. {load:g}) to plan for it")))
    if recompute_modules(ctx) - {"core_attn"}:  # a module the step does not price
        spec_notes.append(Note(rule="recompute-modules-step", message=(
            "training.recompute_modules: memory drops what each listed module drops, but the step is priced as "
            "selective recompute of core attention alone, not the modules listed (Megatron-LM's own steps of "
            "such lists came within ±15% of it: benchmarks/evidence/memory-features-h100)")))
    examples = [
        RejectedExample(layout=lay, rule=rule_id, message=msg)
        for rule_id, shown in result.rejections.examples.items()
        for lay, msg in shown
    ]
    c = ctx.cluster
    return Plan(
        schema_=SCHEMA,
        spec=spec.model_dump(mode="json"),
        cluster=PlannedCluster(name=c.name, nodes=c.nodes, gpus_per_node=c.gpus_per_node, nvlink_domain=c.nvlink_domain,
                               gpu_memory_gib=c.gpu_memory_gib, description=c.description,
                               gpu_memory_total_gib=c.gpu_memory_total_gib if c.memory_known else None),
        profile=profile,
        world_size=ctx.world,
        considered=result.considered,
        legal_count=len(result.legal),
        fitting_count=len(fitting),
        notes=spec_notes,
        candidates=chosen,
        rejected=Rejected(
            count=result.rejections.count,
            by_rule=dict(result.rejections.by_rule.most_common()),
            examples=examples,
        ),
    )
