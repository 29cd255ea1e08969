"""A parallel layout (one point of the search space) and the planning context it is judged in."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any

from megacpp.planner.spec.clusters import Cluster
from megacpp.planner.spec.models import Spec
from megacpp.planner.spec.pattern import Pattern


@dataclass(frozen=True, slots=True)
class Layout:
    """Degrees of every axis plus the micro-batching. `edp` is world / (etp * ep * pp)."""

    tp: int = 1
    pp: int = 1
    vpp: int = 1
    cp: int = 1
    dp: int = 1
    ep: int = 1
    etp: int = 1
    sp: bool = False
    micro_batch_size: int = 1
    num_microbatches: int = 1

    @property
    def edp(self) -> int:
        dense = self.tp * self.cp * self.dp
        return dense // (self.etp * self.ep) if dense % (self.etp * self.ep) == 0 else 0

    @property
    def world(self) -> int:
        return self.tp * self.cp * self.dp * self.pp

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Layout:
        """The inverse of to_dict: `edp` is derived, so it is dropped."""
        return cls(**{k: v for k, v in data.items() if k != "edp"})

    def to_dict(self) -> dict[str, int | bool]:
        d = asdict(self)
        d["edp"] = self.edp
        order = ["tp", "pp", "vpp", "cp", "dp", "ep", "etp", "edp", "sp", "micro_batch_size", "num_microbatches"]
        return {k: d[k] for k in order}

    def short(self, mbs: bool = True, compact: bool = False) -> str:
        """"tp2 pp1 dp4 ep2 etp1 sp mbs1": tp, pp and dp always, vpp, cp and ep above 1, etp where
        it differs from tp. `compact` drops every axis of size 1 ("1 GPU" when nothing is left)."""
        axes = (("tp", self.tp, True), ("pp", self.pp, True), ("vpp", self.vpp, False), ("cp", self.cp, False),
                ("dp", self.dp, True), ("ep", self.ep, False))
        parts = [f"{name}{size}" for name, size, always in axes if size > 1 or (always and not compact)]
        parts += ([f"etp{self.etp}"] if self.etp != self.tp else []) + (["sp"] if self.sp else [])
        parts += [f"mbs{self.micro_batch_size}"] if mbs else []
        return " ".join(parts) or "1 GPU"


@dataclass(frozen=True)
class Context:
    """Everything about a spec that layouts are judged against, computed once."""

    spec: Spec
    cluster: Cluster
    stage_cache: dict[Any, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def world(self) -> int:
        return self.cluster.world_size

    @property
    def pattern(self) -> Pattern:
        return self.spec.pattern

    @cached_property
    def letters(self) -> frozenset[str]:
        return self.pattern.letters

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
