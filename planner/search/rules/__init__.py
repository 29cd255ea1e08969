"""Megatron's layout rules as small named functions with stable kebab-case ids.

Each rule reads only the layout axes it declares, returns None when the layout passes, or a
one-line message with the values and the fix. Its docstring says what Megatron enforces and
where (`[V]` = core_v0.16.1 / megatron-core 0.16.1, `[M]` = Megatron-LM main; see
../shared/reference/megatron_rules.md). Errors reject a layout; warnings only annotate it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from megacpp.planner.axes import Axis
from megacpp.planner.errors import PlanError, did_you_mean
from megacpp.planner.search.layout import Context, Layout

# Search binds axes in this order; a rule is checked at the first level where all its axes are bound.
LEVELS = ("spec", Axis.TP, Axis.CP, Axis.PP, Axis.VPP, Axis.EP, Axis.ETP, "mbs")
# What a rule may read: the mesh axes, and the micro-batching (Layout's own field names)
_AXIS_LEVEL: dict[str, int] = {
    Axis.TP: 1, Axis.CP: 2, Axis.PP: 3, Axis.DP: 3, Axis.SP: 3, Axis.VPP: 4, Axis.EP: 5, Axis.ETP: 6,
    "micro_batch_size": 7, "num_microbatches": 7,
}

Check = Callable[[Context, Layout], "str | None"]


@dataclass(frozen=True)
class Rule:
    id: str
    axes: tuple[str, ...]  # the Axis members it reads, or "micro_batch_size" / "num_microbatches"
    check: Check
    where: str
    severity: str  # "error" | "warning"
    applies: Callable[[Context], bool]
    fails: str  # an example that fails, in spec terms
    passes: str  # the same example, fixed

    @property
    def level(self) -> int:
        return max((_AXIS_LEVEL[a] for a in self.axes), default=0)

    @property
    def doc(self) -> str:
        return " ".join((self.check.__doc__ or "").split())


RULES: list[Rule] = []


def rule(
    rule_id: str,
    *,
    axes: tuple[str, ...],
    where: str,
    severity: str = "error",
    applies: Callable[[Context], bool] = lambda ctx: True,
    fails: str = "",
    passes: str = "",
) -> Callable[[Check], Check]:
    """Register a rule function under a stable id."""

    def register(fn: Check) -> Check:
        assert all(a in _AXIS_LEVEL for a in axes), axes
        RULES.append(Rule(rule_id, axes, fn, where, severity, applies, fails, passes))
        return fn

    return register


@dataclass(frozen=True)
class Violation:
    rule: str
    severity: str
    message: str


def get_rule(rule_id: str) -> Rule:
    for r in RULES:
        if r.id == rule_id:
            return r
    raise PlanError(f"unknown rule {rule_id!r}{did_you_mean(rule_id, [r.id for r in RULES])}; `megacpp explain rule --list` lists them")


def applicable(ctx: Context) -> list[Rule]:
    return [r for r in RULES if r.applies(ctx)]


def check_layout(ctx: Context, layout: Layout, rules: list[Rule] | None = None) -> list[Violation]:
    """Every violation (errors and warnings) of one complete layout, in rule order."""
    out = []
    for r in rules if rules is not None else applicable(ctx):
        message = r.check(ctx, layout)
        if message:
            out.append(Violation(r.id, r.severity, message))
    return out


def divisors(n: int) -> list[int]:
    small = [d for d in range(1, int(n**0.5) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def options(values: list[int], limit: int = 8) -> str:
    shown = values[:limit]
    return "{" + ", ".join(map(str, shown)) + (", ..." if len(values) > limit else "") + "}"


# Importing the rule modules registers them, in this order.
from megacpp.planner.search.rules import backend, grid, dims, sequence, pipeline, experts, batch, memory, features  # noqa: E402,F401,I001
from megacpp.planner.search.rules import latent, precision, sharding  # noqa: E402,F401,I001
