"""The learning-rate schedule a run trains with, the same for both engines.

Megatron-LM receives it as flags (planner/megatron/args.py); megacpp's runtime worker builds
megatron-core's OptimizerParamScheduler from it (runtime/worker/train.py). Both step the
scheduler once per optimizer step, so iterations here are optimizer steps.
"""

from __future__ import annotations

from dataclasses import dataclass

from megacpp.planner.errors import LaunchError
from megacpp.planner.spec.training import TrainingSpec

# A launch's length when neither `launch --steps` nor the spec gives one: a short benchmark.
BENCHMARK_ITERS = 100


@dataclass(frozen=True)
class Schedule:
    """Linear warm-up from 0 to `lr` over `warmup_iters`, then `decay_style` down to `min_lr` at
    `decay_iters` (megatron/core/optimizer_param_scheduler.py get_lr); weight decay constant; and
    Adam's betas and epsilon, which both engines' optimizers take from here."""

    iters: int  # optimizer steps this run takes
    lr: float
    min_lr: float
    warmup_iters: int
    decay_iters: int
    decay_style: str
    weight_decay: float
    clip_grad: float
    adam_beta1: float
    adam_beta2: float
    adam_eps: float
    wsd_decay_iters: int | None = None  # WSD: the last iterations of the decay, in `wsd_decay_style`
    wsd_decay_style: str | None = None


def run_schedule(training: TrainingSpec, iters: int | None = None) -> Schedule:
    """The schedule of a run of `iters` steps (None: the spec's train_iters or train_tokens, else
    BENCHMARK_ITERS). A shorter run than the spec's (`launch --steps`) keeps the spec's schedule
    and takes its first `iters` steps, as the start of the real job would."""
    own = training.run_iters
    steps = iters or own or BENCHMARK_ITERS
    decay = training.lr_decay_iters or own or steps
    if training.warmup_iters >= decay:
        raise LaunchError(f"training.warmup_iters={training.warmup_iters} needs a schedule longer than the {decay} "
                          "iterations launched; set training.lr_decay_iters or train_iters, or launch more --steps")
    wsd = training.lr_wsd_decay_iters
    if wsd is not None and training.warmup_iters + wsd > decay:
        raise LaunchError(f"training.lr_wsd_decay_iters={wsd} (after warmup_iters={training.warmup_iters}) needs a schedule "
                          f"longer than the {decay} iterations launched; set training.lr_decay_iters or train_iters, or launch more --steps")
    return Schedule(
        iters=steps,
        lr=training.lr,
        # lr / 10 to 12 digits, as a script spells it: 3e-05, not 2.9999999999999997e-05
        min_lr=float(f"{training.lr / 10:.12g}") if training.min_lr is None else training.min_lr,
        warmup_iters=training.warmup_iters,
        decay_iters=decay,
        decay_style=training.lr_decay_style,
        weight_decay=training.weight_decay,
        clip_grad=training.clip_grad,
        adam_beta1=training.adam_beta1,
        adam_beta2=training.adam_beta2,
        adam_eps=training.adam_eps,
        wsd_decay_iters=wsd,
        wsd_decay_style=training.lr_wsd_decay_style if wsd is not None else None,
    )
