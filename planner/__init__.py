"""Pure, deterministic planning core: spec models, rules, search, cost model, plan documents.

Nothing in this package imports torch, rich, typer or subprocess, or writes files.
"""

from megacpp.planner.errors import LaunchError, MegacppError, PlanError, SpecError
from megacpp.planner.plan import build_plan
from megacpp.planner.spec.loading import load_spec, load_spec_text, spec_from_dict
from megacpp.planner.spec.models import Spec

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
