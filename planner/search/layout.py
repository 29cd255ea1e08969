"""A parallel layout (one point of the search space) and the planning context it is judged in."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    model_serializer,
    model_validator,
)

from megacpp.planner.axes import Axis
from megacpp.planner.spec.clusters import PROFILE_FIELDS, Cluster
from megacpp.planner.spec.models import Spec
from megacpp.planner.spec.pattern import Pattern

# strict: a plan file's "2", 2.0 or true is refused, not read as 2 or 1
Degree = Annotated[int, Field(ge=1, strict=True)]
# dp and the micro-batch count are 0 where the world or the batch does not divide: layouts the
# search builds to reject them by rule, which a plan keeps as examples
Quotient = Annotated[int, Field(ge=0, strict=True)]


class Layout(BaseModel):
    """Degrees of every axis plus the micro-batching, as the search builds them and a plan's
    candidates carry them. `edp` is world / (etp * ep * pp)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tp: Degree = 1
    pp: Degree = 1
    vpp: Degree = 1
    cp: Degree = 1
    dp: Quotient = 1
    ep: Degree = 1
    etp: Degree = 1
    sp: Annotated[bool, Field(strict=True)] = False
    micro_batch_size: Degree = 1
    num_microbatches: Quotient = 1

    @model_validator(mode="before")
    @classmethod
    def _drop_derived(cls, data: Any) -> Any:
        """A plan's layout carries `edp`, which is derived: it is read back, not trusted."""
        if isinstance(data, dict) and "edp" in data:
            return {k: v for k, v in data.items() if k != "edp"}
        return data

    @model_serializer(mode="wrap")
    def _with_edp(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """The plan JSON's order: the degrees, edp after etp, then sp and the micro-batching."""
        d = handler(self)
        out = {k: d[k] for k in ("tp", "pp", "vpp", "cp", "dp", "ep", "etp")}
        out["edp"] = self.edp
        return out | {k: d[k] for k in ("sp", "micro_batch_size", "num_microbatches")}

    @property
    def edp(self) -> int:
        dense = self.tp * self.cp * self.dp
        return dense // (self.etp * self.ep) if dense % (self.etp * self.ep) == 0 else 0

    @property
    def world(self) -> int:
        return self.tp * self.cp * self.dp * self.pp

    def degree(self, axis: Axis) -> int:
        """The size of `axis`: sp's is TP's where sequence parallelism is on, 1 where it is off."""
        if axis == Axis.SP:
            return self.tp if self.sp else 1
        return int(getattr(self, axis.value))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Layout:
        """A layout dict from a run report or a plan file (its `edp` is derived, so dropped)."""
        return cls.model_validate(data)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

    def but_vpp(self) -> tuple[int | bool, ...]:
        """The layout up to its VPP: the same groups on the same ranks, whatever the chunks."""
        return self.tp, self.pp, self.cp, self.dp, self.ep, self.etp, self.sp, self.micro_batch_size

    def short(self, mbs: bool = True, compact: bool = False) -> str:
        """"tp2 pp1 dp4 ep2 etp1 sp mbs1": tp, pp and dp always, vpp, cp and ep above 1, etp where
        it differs from tp. `compact` drops every axis of size 1 ("1 GPU" when nothing is left)."""
        axes = ((Axis.TP, True), (Axis.PP, True), (Axis.VPP, False), (Axis.CP, False), (Axis.DP, True), (Axis.EP, False))
        parts = [f"{axis}{self.degree(axis)}" for axis, always in axes if self.degree(axis) > 1 or (always and not compact)]
        parts += ([f"{Axis.ETP}{self.etp}"] if self.etp != self.tp else []) + ([str(Axis.SP)] if self.sp else [])
        parts += [f"mbs{self.micro_batch_size}"] if mbs else []
        return " ".join(parts) or "1 GPU"


@dataclass(frozen=True)
class Context:
    """Everything about a spec that layouts are judged against, computed once."""

    spec: Spec
    cluster: Cluster
    # caches of what follows from the spec and cluster; not init fields, so that dataclasses.replace
    # with another cluster (calibrate's fits) starts empty ones instead of sharing stale costs
    stage_cache: dict[Any, Any] = field(default_factory=dict, init=False, compare=False, repr=False)
    cost_cache: dict[Any, Any] = field(default_factory=dict, init=False, compare=False, repr=False)  # cost.shard.memo
    # what follows from the spec and a shard shape alone, never from the cluster's rates (memory
    # per block letter, a stage list's ranks): with_rates shares it
    rate_free_cache: dict[Any, Any] = field(default_factory=dict, init=False, compare=False, repr=False)

    def with_rates(self, rates: dict[str, float]) -> Context:
        """This spec on this cluster with other values of its rate coefficients (PROFILE_FIELDS;
        calibrate's trials), sharing the costs that do not follow from them."""
        if not rates.keys() <= PROFILE_FIELDS.keys():
            raise ValueError(f"not rate coefficients: {sorted(rates.keys() - PROFILE_FIELDS.keys())}")
        ctx = Context(self.spec, self.cluster.model_copy(update=rates))
        object.__setattr__(ctx, "rate_free_cache", self.rate_free_cache)  # frozen: set as __init__ does
        return ctx

    @property
    def world(self) -> int:
        return self.cluster.world_size

    @property
    def pattern(self) -> Pattern:
        return self.spec.pattern

    @cached_property
    def letters(self) -> frozenset[str]:
        """The block letters the model builds, its MTP layers' included (they obey the same rules)."""
        return self.spec.model.letters

    @property
    def dialect(self) -> str:
        return self.spec.backend.megatron

    @property
    def te(self) -> bool:
        return self.spec.backend.transformer_engine

    @property
    def fused(self) -> bool:
        """Megatron-LM's default kernel fusions (backend.fusions)."""
        return self.spec.backend.fusions

    @cached_property
    def plain_transformer(self) -> bool:
        """Only AD/AE pairs: Megatron's GPT path, one transformer layer per pair (DESIGN.md)."""
        return self.pattern.is_plain_transformer

    @cached_property
    def units(self) -> list[str]:
        """Pipeline units in depth order: Megatron layers (pairs on the GPT path, letters otherwise)."""
        b = self.pattern.blocks
        return [b[i : i + 2] for i in range(0, len(b), 2)] if self.plain_transformer else list(b)

    @cached_property
    def unit_cuts(self) -> tuple[int, ...]:
        step = 2 if self.plain_transformer else 1
        return tuple(c // step for c in self.pattern.cuts)

    @property
    def num_layers(self) -> int:
        return len(self.units)

    @property
    def has_moe(self) -> bool:
        return "E" in self.letters

    @property
    def seq(self) -> int:
        return self.spec.training.seq_length
