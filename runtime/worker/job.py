"""The job a worker runs: one candidate layout of a saved plan, with the spec it was planned from."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from megacpp.planner.errors import LaunchError, PlanError
from megacpp.planner.plan import Plan, make_context
from megacpp.planner.search.layout import Context
from megacpp.planner.spec.loading import spec_from_dict
from megacpp.planner.spec.models import Spec


@dataclass(frozen=True)
class StageSlice:
    """One (virtual) pipeline stage of the plan: the Megatron layers [start, stop) and their blocks."""

    pp_rank: int
    vp_stage: int
    start: int
    stop: int
    blocks: str
    embedding: bool
    output_head: bool


@dataclass(frozen=True)
class Job:
    """A plan document, its spec and the chosen candidate."""

    plan: dict[str, Any]
    spec: Spec
    candidate_index: int

    @cached_property
    def ctx(self) -> Context:
        return make_context(self.spec)

    @property
    def candidate(self) -> dict[str, Any]:
        return self.plan["candidates"][self.candidate_index]

    @property
    def layout(self) -> dict[str, Any]:
        return self.candidate["layout"]

    @property
    def world_size(self) -> int:
        return int(self.plan["world_size"])

    @property
    def stages(self) -> list[StageSlice]:
        return [
            StageSlice(s["pp_rank"], s["vp_stage"], s["layers"][0], s["layers"][1], s["blocks"], s["embedding"], s["output_head"])
            for s in self.candidate["stages"]
        ]

    def stages_of(self, pp_rank: int) -> list[StageSlice]:
        """This pipeline rank's chunks in virtual-stage order."""
        return sorted((s for s in self.stages if s.pp_rank == pp_rank), key=lambda s: s.vp_stage)

    @property
    def blocks_per_layer(self) -> int:
        """2 on Megatron's GPT path (each layer is an AD/AE pair), 1 for hybrid stacks."""
        return 2 if self.ctx.plain_transformer else 1

    def predicted_stage(self, pp_rank: int) -> dict[str, Any]:
        return next(m for m in self.candidate["memory"]["per_stage"] if m["pp_rank"] == pp_rank)


def load_job(path: str | Path, candidate: int = 0) -> Job:
    """Read PLAN.json (written by `megacpp plan --out`) and select candidate `candidate`."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise LaunchError(f"{path}: no such plan file; create one with `megacpp plan SPEC --out {path}`") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LaunchError(f"{path}: cannot read the plan ({exc}); re-create it with `megacpp plan SPEC --out PLAN.json`") from None
    try:
        Plan.from_json_dict(data)
    except PlanError as exc:
        raise LaunchError(f"{path}: {exc}") from None
    count = len(data["candidates"])
    if count == 0:
        raise LaunchError(f"{path}: the plan has no candidate layout; see its \"rejected\" section or `megacpp plan SPEC`")
    if not 0 <= candidate < count:
        raise LaunchError(f"--candidate {candidate}: {path} holds candidates 0..{count - 1}")
    return Job(plan=data, spec=spec_from_dict(data["spec"]), candidate_index=candidate)
