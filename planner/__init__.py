"""Pure, deterministic planning core: spec models, rules, search, cost model, plan documents.

Nothing in this package imports torch, rich, typer or subprocess, or writes files.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from megacpp.planner.errors import LaunchError, MegacppError, PlanError, SpecError

if TYPE_CHECKING:
    from megacpp.planner.plan import build_plan
    from megacpp.planner.spec.loading import load_spec, load_spec_text, spec_from_dict
    from megacpp.planner.spec.models import Spec

# the rest is imported on first use: the CLI imports the errors at start-up, and `megacpp --help`
# then builds none of the spec and plan models (a third of a second)
_LAZY = {
    "build_plan": "megacpp.planner.plan",
    "load_spec": "megacpp.planner.spec.loading",
    "load_spec_text": "megacpp.planner.spec.loading",
    "spec_from_dict": "megacpp.planner.spec.loading",
    "Spec": "megacpp.planner.spec.models",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "LaunchError",
    "MegacppError",
    "PlanError",
    "Spec",
    "SpecError",
    "build_plan",
    "load_spec",
    "load_spec_text",
    "spec_from_dict",
]
