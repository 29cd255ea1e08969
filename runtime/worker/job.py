"""The job a worker runs: one candidate layout of a saved plan, with the spec it was planned from."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from megacpp.planner.errors import LaunchError, MegacppError
from megacpp.planner.plan import Candidate, Plan, PlannedStage
from megacpp.planner.search.layout import Context, Layout
from megacpp.planner.search.rules.latent import runtime_missing
from megacpp.planner.spec.models import Spec


@dataclass(frozen=True)
class Job:
    """A plan document and the candidate of it this job runs."""

    plan: Plan
    candidate_index: int

    @property
    def spec(self) -> Spec:
        return self.plan.spec_model

    @property
    def ctx(self) -> Context:
        return self.plan.context

    @property
    def candidate(self) -> Candidate:
        return self.plan.candidates[self.candidate_index]

    @property
    def layout(self) -> Layout:
        return self.candidate.layout

    @property
    def world_size(self) -> int:
        return self.plan.world_size

    def stages_of(self, pp_rank: int) -> list[PlannedStage]:
        """This pipeline rank's chunks in virtual-stage order."""
        return sorted((s for s in self.candidate.stages if s.pp_rank == pp_rank), key=lambda s: s.vp_stage)

    @property
    def blocks_per_layer(self) -> int:
        """2 on Megatron's GPT path (each layer is an AD/AE pair), 1 for hybrid stacks."""
        return 2 if self.ctx.plain_transformer else 1


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
        plan = Plan.from_json_dict(data)
    except MegacppError as exc:
        raise LaunchError(f"{path}: {exc}") from None
    count = len(plan.candidates)
    if count == 0:
        raise LaunchError(f"{path}: the plan has no candidate layout; see its \"rejected\" section or `megacpp plan SPEC`")
    if not 0 <= candidate < count:
        raise LaunchError(f"--candidate {candidate}: {path} holds candidates 0..{count - 1}")
    missing = runtime_missing(plan.context)
    if missing:  # as `launch --engine megacpp` refuses them (planner/megatron/render.py)
        raise LaunchError(f"{path}: the runtime does not build {', '.join(missing)}; launch it with --engine megatron-lm")
    return Job(plan=plan, candidate_index=candidate)
