"""GPU training: bf16 chunks under megatron DDP and optimizer, stepped by megatron's pipeline schedule.

The wiring follows Megatron-LM core_v0.16.1 (megatron/training/training.py get_model,
setup_model_and_optimizer, train_step; pretrain_gpt.py forward_step and loss_func) with the
arguments a plan fixes; nothing here is specific to a block letter.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from megatron.core import parallel_state as ps
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer, get_standard_config_overrides
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.module import Float16Module
from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker
from megatron.core.utils import get_attr_wrapped_model

from megacpp.planner.spec.schedule import Schedule, run_schedule
from megacpp.runtime.worker.data import SyntheticChain, TokenFile, microbatches
from megacpp.runtime.worker.job import Job
from megacpp.runtime.worker.measure.host import host_probe
from megacpp.runtime.worker.measure.memory import memory_peak_sites
from megacpp.runtime.worker.measure.profile import kernel_profile

DDP_MIN_BUCKET = 40_000_000  # Megatron-LM get_model: max(4e7, 1e6 * dp_cp) elements
GIB = float(1 << 30)


@dataclass
class TrainResult:
    """What one rank measured: wall time and loss of every step, and where memory and time went."""

    step_seconds: list[float] = field(default_factory=list)  # every step, warm-up included
    losses: list[float | None] = field(default_factory=list)  # per step; None off the last stage
    forward_backward_seconds: list[float] = field(default_factory=list)  # per step, CUDA events
    optimizer_seconds: list[float] = field(default_factory=list)
    memory: dict = field(default_factory=dict)  # phases of the last step (see MemoryPhases), every step's peak
    profile: dict | None = None  # kernel time by kind over one extra step, with --profile
    memory_peak: dict | None = None  # what is allocated at one extra step's peak, with --memory-peak
    host: dict | None = None  # how fast this host issues work (host_probe), measured before the first step


class MemoryPhases:
    """torch.cuda allocated bytes around the phases of a step: what stays resident between steps
    (weights, gradient buffer, optimizer state), the peak of forward+backward, the peak of the
    optimizer step, and the allocation at the start of every micro-batch's forward (activations
    in flight, as the pipeline schedule holds them). Host-side counters only: no synchronisation."""

    def __init__(self) -> None:
        self.peak = 0
        self.step_peaks: list[int] = []  # every step run, in order
        self.last: dict = {}
        self._mb: list[int] = []

    def _read_peak(self) -> int:
        value = torch.cuda.max_memory_allocated()
        self.peak = max(self.peak, value)
        torch.cuda.reset_peak_memory_stats()
        return value

    def begin(self) -> None:
        self._read_peak()
        self._static = torch.cuda.memory_allocated()
        self._mb = []

    def microbatch(self) -> None:
        self._mb.append(torch.cuda.memory_allocated())

    def after_forward_backward(self) -> None:
        self._fwd_bwd = self._read_peak()

    def end(self) -> None:
        optimizer = self._read_peak()
        self.step_peaks.append(max(self._fwd_bwd, optimizer))
        gib = lambda b: round(b / GIB, 4)  # noqa: E731
        self.last = {
            "resident_gib": gib(self._static),
            "forward_backward_peak_gib": gib(self._fwd_bwd),
            "optimizer_peak_gib": gib(optimizer),
            "microbatch_start_gib": [gib(b) for b in self._mb],
        }


def data_parallel_config(job: Job, chunks: int, dp_cp: int) -> DistributedDataParallelConfig:
    """DDP as the rendered Megatron-LM launch has it (planner/megatron/args.py): gradients reduced
    in training.grad_reduce_dtype bucket by bucket during the backward; with the distributed optimizer the updated
    parameters gathered bucket by bucket during the next forward, aligned across the chunks of an
    interleaved schedule (arguments.py turns align_param_gather off without one)."""
    distopt = job.spec.training.distributed_optimizer
    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=job.spec.training.grad_reduce_dtype == "fp32",
        overlap_grad_reduce=True,
        overlap_param_gather=distopt,
        align_param_gather=distopt and chunks > 1,
        use_distributed_optimizer=distopt,
        bucket_size=max(DDP_MIN_BUCKET, 1_000_000 * dp_cp),
    )


def scheduler_options(sched: Schedule) -> dict:
    """OptimizerParamScheduler's arguments for the run's schedule, as Megatron-LM builds them from
    the rendered flags (training.py get_optimizer_param_scheduler, core_v0.16.1:1354-1405), which
    counts in samples where the worker counts optimizer steps: the same curve."""
    return {"init_lr": 0.0, "max_lr": sched.lr, "min_lr": sched.min_lr, "lr_warmup_steps": sched.warmup_iters,
            "lr_decay_steps": sched.decay_iters, "lr_decay_style": sched.decay_style, "start_wd": sched.weight_decay,
            "end_wd": sched.weight_decay, "wd_incr_steps": sched.iters, "wd_incr_style": "constant",
            "wsd_decay_steps": sched.wsd_decay_iters, "lr_wsd_decay_style": sched.wsd_decay_style}


def wrap_for_training(chunks: list[torch.nn.Module], config, job: Job, sched: Schedule):
    """Float16Module + DDP around each chunk, megatron's (distributed) Adam, the run's scheduler.

    Returns (model chunks, optimizer, scheduler) and installs the config hooks the schedule calls.
    """
    for chunk in chunks:
        chunk.cuda(torch.cuda.current_device())  # torch norms are created on the CPU
    model = [Float16Module(config, chunk) for chunk in chunks] if config.bf16 else list(chunks)
    ddp_config = data_parallel_config(job, len(chunks), ps.get_data_parallel_world_size(with_context_parallel=True))
    model = [
        DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk, disable_bucketing=index > 0)
        for index, chunk in enumerate(model)
    ]
    opt_config = OptimizerConfig(
        optimizer="adam", lr=sched.lr, min_lr=sched.min_lr, weight_decay=sched.weight_decay, adam_beta1=sched.adam_beta1,
        adam_beta2=sched.adam_beta2, adam_eps=sched.adam_eps, clip_grad=sched.clip_grad, bf16=config.bf16, params_dtype=config.params_dtype,
        use_distributed_optimizer=ddp_config.use_distributed_optimizer, overlap_param_gather=ddp_config.overlap_param_gather,
    )
    optimizer = get_megatron_optimizer(opt_config, model, config_overrides=get_standard_config_overrides(opt_config))
    scheduler = OptimizerParamScheduler(optimizer, **scheduler_options(sched))
    # training.py train(): the hooks megatron's schedules call back into
    config.grad_scale_func = optimizer.scale_loss
    config.no_sync_func = [c.no_sync for c in model] if len(model) > 1 else model[0].no_sync
    config.grad_sync_func = [c.start_grad_sync for c in model] if len(model) > 1 else model[0].start_grad_sync
    if ddp_config.align_param_gather:
        config.param_sync_func = [c.start_param_sync for c in model]
    config.finalize_model_grads_func = finalize_model_grads
    return model, optimizer, scheduler


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """pretrain_gpt.loss_func: summed loss, token count, and the pair for DP-averaged reporting."""
    losses = output_tensor.view(-1).float()
    mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().clone().detach().to(torch.int)
    return loss, num_tokens, {"lm loss": torch.cat([loss.clone().detach().view(1), num_tokens.view(1)])}


def forward_step(data_iterator, model, phases: MemoryPhases | None = None):
    """One micro-batch through one chunk; only chunks with the embedding or the head read data."""
    if phases is not None:
        phases.microbatch()
    pre = get_attr_wrapped_model(model, "pre_process")
    post = get_attr_wrapped_model(model, "post_process")
    if not (pre or post):
        return model(None, None, None), partial(loss_func, None)
    batch = next(data_iterator)
    output = model(batch["tokens"] if pre else None, batch["position_ids"] if pre else None, batch["labels"] if post else None)
    return output, partial(loss_func, batch["loss_mask"])


def _step_loss(losses_reduced) -> float | None:
    """Megatron-LM train_step: token-weighted mean over micro-batches and the DP x CP group."""
    if not ps.is_pipeline_last_stage(ignore_virtual=True) or not losses_reduced:
        return None
    total = torch.vstack([x["lm loss"].view(-1) for x in losses_reduced]).sum(dim=0)
    torch.distributed.all_reduce(total, group=ps.get_data_parallel_group(with_context_parallel=True))
    return (total[0] / total[1]).item()


def train(job: Job, chunks, config, *, steps: int, warmup: int, seed: int, tokens: str | None,
          profile: bool = False, memory_peak: bool = False, on_step_end: Callable[[], None] | None = None,
          trace: Path | None = None) -> TrainResult:
    """Run warmup + steps optimizer steps; time each one between two torch.cuda.synchronize().
    The learning rate follows the spec's schedule over those steps, as Megatron-LM would.

    With `profile`, one more step runs under torch.profiler and its kernel time is summarised; with
    `memory_peak`, one more step runs under the CUDA allocator's history and its peak is broken
    down by allocation site. Neither extra step counts in the timings or losses. `on_step_end` is
    called after every step run, the extra ones included.
    """
    total = warmup + steps
    # the schedule spans the warm-up and timed steps; an extra recorded step runs past its end
    model, optimizer, scheduler = wrap_for_training(chunks, config, job, run_schedule(job.spec.training, total))
    device = torch.device("cuda", torch.cuda.current_device())
    vocab = job.spec.model.vocab_size
    source = TokenFile(tokens, vocab, device) if tokens else SyntheticChain(vocab, seed, device)
    lay, seq = job.layout, job.spec.training.seq_length
    forward_backward = get_forward_backward_func()
    phases = MemoryPhases()
    result = TrainResult(host=host_probe(device))
    step_func = partial(forward_step, phases=phases)

    def one_step(step: int) -> None:
        streams = [
            microbatches(source, seed=seed, dp_rank=ps.get_data_parallel_rank(), step=step, count=lay.num_microbatches,
                         micro_batch_size=lay.micro_batch_size, seq_length=seq)
            for _ in model
        ]
        events = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
        torch.cuda.synchronize()
        start = time.perf_counter()
        for chunk in model:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        phases.begin()
        events[0].record()
        losses_reduced = forward_backward(
            forward_step_func=step_func, data_iterator=streams if len(model) > 1 else streams[0], model=model,
            num_microbatches=lay.num_microbatches, seq_length=seq, micro_batch_size=lay.micro_batch_size,
            decoder_seq_length=seq, forward_only=False,
        )
        events[1].record()
        phases.after_forward_backward()
        update_successful, _, _ = optimizer.step()
        if update_successful:
            scheduler.step(increment=1)
        events[2].record()
        torch.cuda.synchronize()
        result.step_seconds.append(time.perf_counter() - start)
        phases.end()
        result.forward_backward_seconds.append(events[0].elapsed_time(events[1]) / 1e3)
        result.optimizer_seconds.append(events[1].elapsed_time(events[2]) / 1e3)
        result.losses.append(_step_loss(losses_reduced))
        clear_aux_losses_tracker()
        if on_step_end is not None:
            on_step_end()

    for step in range(total):
        one_step(step)
    # the peak of every warm-up and timed step (the extra recorded steps below come after)
    result.memory = {**phases.last, "step_peak_gib": [round(b / GIB, 4) for b in phases.step_peaks],
                     "peak_gib": round(phases.peak / GIB, 4)}
    for name, record_step, wanted in (("profile", partial(kernel_profile, trace=trace), profile),
                                      ("memory_peak", memory_peak_sites, memory_peak)):
        if wanted:
            timed = len(result.step_seconds)
            setattr(result, name, record_step(partial(one_step, timed)))
            for record in (result.step_seconds, result.losses, result.forward_backward_seconds, result.optimizer_seconds):
                del record[timed:]  # the extra step's own numbers are distorted by the recording
    return result
