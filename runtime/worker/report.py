"""The run report (schema megacpp.run/1): what was built and measured, next to what the plan predicted.

Every rank contributes its coordinates, parameter counts, peak memory, step times, losses and
routed-token counts through one all_gather_object at the end; rank 0 writes the document.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import megatron.core
import torch
from megatron.core.transformer.moe.moe_layer import MoELayer

from megacpp.planner.plan import PlannedStageMemory, estimate_run, with_backend
from megacpp.runtime.worker.adapters import MEGATRON_CORE_VERSION
from megacpp.runtime.worker.job import Job
from megacpp.runtime.worker.train import TrainResult

SCHEMA = "megacpp.run/1"
GIB = float(1 << 30)


class ExpertTokenCounter:
    """Per-expert routed-token counts of every MoE layer on this rank, from the router's routing map,
    kept for every micro-batch of every step: the busiest expert-parallel rank's share moves from
    one micro-batch to the next, and the memory peak follows it.

    Counts stay on the device (no synchronisation per step). Under full recompute the router runs
    twice per micro-batch; only the first (no-grad) forward is counted. `end_step` closes a step.
    """

    def __init__(self, chunks: list[torch.nn.Module], full_recompute: bool) -> None:
        self.steps: list[dict[int, list[torch.Tensor]]] = []
        self._step: dict[int, list[torch.Tensor]] = {}
        self.full_recompute = full_recompute
        for chunk in chunks:
            for module in chunk.modules():
                if isinstance(module, MoELayer):
                    module.router.register_forward_hook(self._hook(module.layer_number))

    def _hook(self, layer_number: int):
        def count(_module, _inputs, output) -> None:
            if self.full_recompute and torch.is_grad_enabled():
                return
            self._step.setdefault(layer_number, []).append(output[1].sum(dim=0, dtype=torch.int64))

        return count

    def end_step(self) -> None:
        self.steps.append(self._step)
        self._step = {}

    def by_microbatch(self) -> dict[int, list[list[list[int]]]]:
        """Counts per layer number as [step][micro-batch][expert] (this synchronises with the
        device); a step still open counts as the last one."""
        steps = self.steps + ([self._step] if self._step else [])
        layers = sorted({layer for step in steps for layer in step})
        return {layer: [torch.stack(step[layer]).tolist() if step.get(layer) else [] for step in steps] for layer in layers}

    def as_lists(self) -> dict[int, list[int]]:
        """Counts per layer number summed over every micro-batch and step."""
        return {layer: _add_over_steps(steps) for layer, steps in self.by_microbatch().items()}


def _add(a: Any, b: Any) -> Any:
    """Element-wise sum of two equally nested lists of counts."""
    return a + b if isinstance(a, int) else [_add(x, y) for x, y in zip(a, b, strict=True)]


def _merge_expert_counts(rank_infos: list[dict[str, Any]], sequence_parallel: bool) -> dict[int, list]:
    """Each layer's [step][micro-batch][expert] counts summed over the ranks that route distinct
    tokens: every (dp, cp) replica, and every TP rank only under SP (without SP, TP peers route
    the same tokens)."""
    merged: dict[int, list] = {}
    for info in rank_infos:
        if not sequence_parallel and info["tp"] != 0:
            continue
        for layer, counts in info["expert_tokens"].items():
            merged[int(layer)] = _add(merged[int(layer)], counts) if int(layer) in merged else counts
    return dict(sorted(merged.items()))


def _add_over_steps(counts: list[list[list[int]]]) -> list[int]:
    """[step][micro-batch][expert] counts summed to one count per expert."""
    return [sum(col) for col in zip(*(mb for step in counts for mb in step), strict=True)]


def _loads(counts: list[list[int]], ep: int) -> list[float]:
    """The routed tokens each EP rank receives from these layers' counts, over the mean."""
    local = len(counts[0]) // ep
    received = [sum(sum(c[r * local:(r + 1) * local]) for c in counts) for r in range(ep)]
    mean = sum(received) / ep
    return [round(x / mean, 4) if mean else 1.0 for x in received]


def routed_load(merged: dict[int, list], stage_of_layer: dict[int, int], ep: int) -> list[dict[str, Any]]:
    """Per pipeline stage, step and micro-batch: the routed tokens each expert-parallel rank
    receives over the stage's MoE layers, over the mean (1.0 is balanced), in "steps"; and in
    "heaviest_layer_steps" the same for the stage's most unbalanced layer on each rank, which is
    what a fully recomputed stage's peak follows (it rebuilds one layer at a time). EP rank r
    holds experts [r*E/EP, (r+1)*E/EP). With several EP groups (EDP > 1) the counts are their
    sum, so this is the groups' average."""
    stages: dict[int, list[int]] = {}
    for layer in merged:
        stages.setdefault(stage_of_layer[layer], []).append(layer)
    out = []
    for pp, layers in sorted(stages.items()):
        steps, heaviest = [], []
        for s in range(len(merged[layers[0]])):
            per_mb, per_mb_heaviest = [], []
            for m in range(len(merged[layers[0]][s])):
                counts = [merged[layer][s][m] for layer in layers]
                per_mb.append(_loads(counts, ep))
                by_layer = [_loads([c], ep) for c in counts]
                per_mb_heaviest.append([max(loads[r] for loads in by_layer) for r in range(ep)])
            steps.append(per_mb)
            heaviest.append(per_mb_heaviest)
        out.append({"pp_rank": pp, "steps": steps, "heaviest_layer_steps": heaviest})
    return out


def rank_info(coords: dict[str, int], params: int, params_expert: int, layer_numbers: list[int], cuda: bool,
              counter: ExpertTokenCounter | None, result: TrainResult) -> dict[str, Any]:
    """Everything one rank contributes to the report."""
    info: dict[str, Any] = {**coords, "params": params, "params_expert": params_expert, "layer_numbers": layer_numbers}
    peak = max(torch.cuda.max_memory_allocated(), int(result.memory.get("peak_gib", 0) * GIB)) if cuda else None
    info["peak_allocated_gib"] = round(peak / GIB, 4) if peak is not None else None
    info["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / GIB, 4) if cuda else None
    info["expert_tokens"] = counter.by_microbatch() if counter else {}
    info["step_seconds"] = result.step_seconds
    info["losses"] = result.losses
    info["memory_phases"] = {k: v for k, v in result.memory.items() if k != "peak_gib"} or None
    info["forward_backward_seconds"] = _median(result.forward_backward_seconds)
    info["optimizer_seconds"] = _median(result.optimizer_seconds)
    info["profile"] = result.profile
    info["memory_peak"] = result.memory_peak
    info["host"] = result.host
    return info


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 6) if values else None


def gather(info: dict[str, Any]) -> list[dict[str, Any]]:
    """All ranks' infos, in rank order, on every rank."""
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, info)
    return out


def build_report(job: Job, infos: list[dict[str, Any]], *, steps: int, warmup: int, construct_only: bool,
                 adapters: list[str], backend: dict[str, Any], cuda: bool) -> dict[str, Any]:
    """The megacpp.run/1 document from every rank's info.

    The predictions are the plan's, except where the plan assumed Transformer Engine and this host
    ran megatron-core's local modules instead: then the layout is re-estimated for what ran.
    """
    memory = sorted(job.candidate.memory.per_stage, key=lambda m: m.pp_rank)
    predicted_step = job.candidate.time.step_seconds
    predicted_for = "plan"
    if backend["transformer_engine_requested"] and not backend["transformer_engine_used"]:
        est = estimate_run(with_backend(job.spec, transformer_engine=False), job.layout, job.plan.efficiency,
                           cluster=job.plan.context.cluster)
        memory, predicted_step = [PlannedStageMemory(**m.to_dict()) for m in est.memory], round(est.step_seconds, 6)
        predicted_for = "re-estimated without Transformer Engine"
    predicted_peak = [m.total_gib for m in memory]
    timed: list[float] = []
    losses: list[float | None] = []
    if not construct_only:
        # a step ends when its slowest rank ends
        per_step = [max(info["step_seconds"][i] for info in infos) for i in range(warmup + steps)]
        timed = per_step[warmup:]
        losses = next((info["losses"] for info in infos if any(x is not None for x in info["losses"])), [])
    median = statistics.median(timed) if timed else None
    training = job.spec.training
    peaks = [info["peak_allocated_gib"] for info in infos if info["peak_allocated_gib"] is not None]
    mismatched = [info["rank"] for info in infos
                  if (info["params"], info["params_expert"]) != (memory[info["pp"]].params, memory[info["pp"]].params_expert)]
    keys = ("rank", "tp", "cp", "dp", "pp", "ep", "etp", "edp", "params", "params_expert", "layer_numbers",
            "peak_allocated_gib", "peak_reserved_gib", "memory_phases", "forward_backward_seconds", "optimizer_seconds",
            "profile", "memory_peak", "host")
    experts = _merge_expert_counts(infos, job.layout.sp and job.layout.tp > 1)
    stage_of_layer = {layer: info["pp"] for info in infos for layer in info["layer_numbers"]}
    return {
        "schema": SCHEMA,
        "layout": job.layout.model_dump(),
        "pattern": job.spec.model.pattern,
        "spec": job.spec.model_dump(mode="json"),  # lets `megacpp calibrate` re-estimate this run
        "device": {"name": torch.cuda.get_device_name(), "count": torch.cuda.device_count()} if cuda else "cpu",
        "world_size": len(infos),
        "candidate": job.candidate_index,
        "steps": 0 if construct_only else steps,
        "warmup": 0 if construct_only else warmup,
        "construct_only": construct_only,
        "median_step_seconds": median,
        "step_seconds": timed,  # each timed step, its slowest rank
        "tokens_per_second": training.global_batch_size * training.seq_length / median if median else None,
        "losses": losses,  # every step run, the first `warmup` of them untimed
        "ranks": [{k: info[k] for k in keys} for info in infos],
        "params_match_plan": not mismatched,
        "params_mismatch_ranks": mismatched,
        "expert_tokens": [{"layer": layer, "tokens_per_expert": _add_over_steps(counts)} for layer, counts in experts.items()] or None,
        "expert_tokens_by_microbatch": [{"layer": layer, "steps": counts} for layer, counts in experts.items()] or None,
        "routed_load": routed_load(experts, stage_of_layer, job.layout.ep) if experts else None,
        "predicted": {"for": predicted_for, "peak_gib": predicted_peak, "step_seconds": predicted_step,
                      "params": [m.params for m in memory], "params_expert": [m.params_expert for m in memory]},
        "measured_peak_gib": max(peaks) if peaks else None,
        "predicted_peak_gib": max(predicted_peak),
        "measured_step_seconds": median,
        "predicted_step_seconds": predicted_step,
        "backend": backend,
        "adapters": adapters,
        "adapters_written_for": MEGATRON_CORE_VERSION,
        "megatron_core": megatron.core.__version__,
        "torch": torch.__version__,
    }


def write_report(report: dict[str, Any], path: str | Path) -> None:
    """Write the report as indented JSON."""
    Path(path).write_text(json.dumps(report, indent=1) + "\n")
