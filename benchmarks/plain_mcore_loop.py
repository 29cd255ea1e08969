#!/usr/bin/env python
"""Baseline: a plain megatron-core training loop (GPTModel, local layer spec), no megacpp.

It exists to compare the megacpp runtime's tokens/s against stock megatron-core on the same
layout, in the same GPU call::

    torchrun --nproc-per-node 4 benchmarks/plain_mcore_loop.py --plan plan.json --steps 20 --report base.json
    torchrun --nproc-per-node 4 benchmarks/plain_mcore_loop.py --tp 2 --ep 2 --layers 8 --hidden 1024 ...

With --plan, the model, batch and layout come from the plan file (read with json only) and any
flag given explicitly overrides them. Only Megatron's GPT path is supported: patterns made of AD
and AE pairs. Everything else mirrors the worker: bf16 params, DDP with fp32 gradient reduction
(overlapped, as the parameter all-gather under the distributed optimizer), megatron's Adam
(distributed when the plan says so), a 5-step warm-up, the pipeline schedule from
get_forward_backward_func, synthetic tokens following one random cycle through the vocabulary,
and each step timed between two torch.cuda.synchronize() calls.

Two pieces are copied inline from megacpp's adapters because stock megatron-core 0.16.1 cannot
otherwise run these layouts without Transformer Engine: the router's `te_general_gemm` (undefined
without TE: NameError in every MoE forward) and a torch norm that accepts sequence parallelism
(the local spec's norm asserts SP off, and MoE with TP > 1 requires SP). Both are used only when
needed and listed in the report's "inline_adapters".
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import replace
from datetime import timedelta
from functools import partial

import torch
import torch.nn.functional as F

# --------------------------------------------------------------------------- arguments


def _plan_defaults(path: str, candidate: int) -> dict:
    """Flag defaults from a megacpp plan (schema megacpp.plan/1), parsed with json only."""
    with open(path) as f:
        plan = json.load(f)
    cand = plan["candidates"][candidate]
    lay, model, training = cand["layout"], plan["spec"]["model"], plan["spec"]["training"]
    blocks = plan["spec"]["model"]["pattern"]
    attention = model.get("attention") or {}
    moe, mlp = model.get("moe"), model.get("mlp")
    out = {
        "tp": lay["tp"], "pp": lay["pp"], "vpp": lay["vpp"], "cp": lay["cp"], "ep": lay["ep"], "etp": lay["etp"],
        "sp": lay["sp"], "mbs": lay["micro_batch_size"], "gbs": training["global_batch_size"], "seq": training["seq_length"],
        "hidden": model["hidden_size"], "vocab": model["vocab_size"], "heads": attention.get("num_heads"),
        "groups": attention.get("num_query_groups"), "head_dim": attention.get("head_dim"),
        "normalization": model.get("normalization", "rmsnorm"), "position_embedding": model.get("position_embedding", "rope"),
        "tie_embeddings": model.get("tie_embeddings", False), "distributed_optimizer": training.get("distributed_optimizer", True),
        "recompute": training.get("recompute", "none"),
        "pattern_source": blocks, "stage_sizes": cand["split"]["sizes"],
    }
    if mlp:
        out.update(ffn=mlp["ffn_hidden_size"], gated=mlp.get("gated", True))
    if moe:
        out.update(experts=moe["num_experts"], topk=moe.get("top_k", 2), moe_ffn=moe["ffn_hidden_size"],
                   shared_ffn=moe.get("shared_expert_ffn_hidden_size"), dispatcher=moe.get("dispatcher", "alltoall"),
                   gated=moe.get("gated", True), capacity_factor=moe.get("capacity_factor"))
    return out


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Plain megatron-core GPT training loop (baseline for megacpp's runtime).")
    ap.add_argument("--plan", help="a megacpp PLAN.json to take the model, batch and layout from")
    ap.add_argument("--candidate", type=int, default=0)
    for axis in ("tp", "pp", "vpp", "cp", "ep", "etp"):
        ap.add_argument(f"--{axis}", type=int, default=1)
    ap.add_argument("--sp", action=argparse.BooleanOptionalAction, default=False, help="sequence parallel (with tp > 1)")
    ap.add_argument("--layers", type=int, help="GPT layers (AD/AE pairs); default from --moe-layers / the plan")
    ap.add_argument("--moe-layers", help="comma list of 0/1 per layer (1: MoE); default all MoE when --experts is set")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--groups", type=int, help="query groups (default: heads)")
    ap.add_argument("--head-dim", type=int)
    ap.add_argument("--ffn", type=int, help="dense MLP hidden size (default 4*hidden)")
    ap.add_argument("--gated", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--experts", type=int)
    ap.add_argument("--topk", type=int, default=2)
    ap.add_argument("--moe-ffn", type=int)
    ap.add_argument("--shared-ffn", type=int)
    ap.add_argument("--capacity-factor", type=float)
    ap.add_argument("--dispatcher", default="alltoall", choices=("allgather", "alltoall"))
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--normalization", default="rmsnorm", choices=("rmsnorm", "layernorm"))
    ap.add_argument("--position-embedding", default="rope", choices=("rope", "learned", "none"))
    ap.add_argument("--tie-embeddings", action=argparse.BooleanOptionalAction, default=False)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--mbs", type=int, default=1)
    ap.add_argument("--gbs", type=int, default=32)
    ap.add_argument("--distributed-optimizer", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--recompute", default="none", choices=("none", "selective", "full"),
                    help="activation recompute: selective = core attention, full = every layer (uniform, 1 layer)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--report", help="write a JSON report here from rank 0")
    ap.set_defaults(pattern_source=None, stage_sizes=None)
    args = ap.parse_args(argv)
    if args.plan:
        ap.set_defaults(**_plan_defaults(args.plan, args.candidate))
        args = ap.parse_args(argv)
        pattern = "".join(ch for ch in _expand(args.pattern_source) if ch in "ADE")
        pairs = [pattern[i : i + 2] for i in range(0, len(pattern), 2)]
        if any(p not in ("AD", "AE") for p in pairs) or len(pattern) % 2:
            ap.error(f"the plan's pattern {args.pattern_source!r} is not made of AD/AE pairs; the GPT baseline cannot build it")
        args.layers = len(pairs)
        args.moe_layers = ",".join("1" if p == "AE" else "0" for p in pairs)
    if args.layers is None:
        ap.error("--layers (or --plan) is required")
    return args


def _expand(pattern: str) -> str:
    """Expand `(XY)*N` and `X*N` repeats (megacpp's pattern grammar, without `|` cuts)."""
    def parse(i: int) -> tuple[str, int]:
        out = ""
        while i < len(pattern) and pattern[i] != ")":
            ch = pattern[i]
            if ch == "(":
                inner, i = parse(i + 1)
                i += 1  # ")"
            elif ch.isspace() or ch == "|":
                i += 1
                continue
            else:
                inner, i = ch, i + 1
            if i < len(pattern) and pattern[i] == "*":
                j = i + 1
                while j < len(pattern) and pattern[j].isdigit():
                    j += 1
                inner, i = inner * int(pattern[i + 1 : j]), j
            out += inner
        return out, i

    return parse(0)[0]


# --------------------------------------------------------------------------- inline adapters


def te_general_gemm(A, B, out_dtype=None, layout="TN", out=None, bias=None, grad=False):
    """Copy of megacpp's adapter: torch GEMM for the router (TN: B@A.T, NN: B@A, NT: B.T@A)."""
    dtype = out_dtype or B.dtype
    a, b = A.to(dtype), B.to(dtype)
    result = {"TN": lambda: b @ a.t(), "NN": lambda: b @ a, "NT": lambda: b.t() @ a}[layout]()
    if bias is not None:
        result = result + bias.to(dtype)
    if out is not None:
        out.copy_(result)
        result = out
    return [result, None, None, None]


class SequenceParallelNorm(torch.nn.Module):
    """Copy of megacpp's adapter: LayerNorm/RMSNorm whose params are flagged sequence_parallel."""

    def __init__(self, config, hidden_size, eps=1e-5, **_):
        super().__init__()
        self.rms, self.eps, self.hidden_size = config.normalization == "RMSNorm", eps, hidden_size
        device = torch.cuda.current_device()
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, device=device, dtype=config.params_dtype))
        self.bias = None if self.rms else torch.nn.Parameter(torch.zeros(hidden_size, device=device, dtype=config.params_dtype))
        for p in self.parameters():
            p.sequence_parallel = config.sequence_parallel

    def forward(self, x):
        if self.rms:
            return F.rms_norm(x, (self.hidden_size,), self.weight, self.eps)
        return F.layer_norm(x, (self.hidden_size,), self.weight, self.bias, self.eps)


# --------------------------------------------------------------------------- model


def build_config(args):
    from megatron.core.transformer.enums import AttnBackend
    from megatron.core.transformer.transformer_config import TransformerConfig

    moe_layers = [int(x) for x in args.moe_layers.split(",")] if args.moe_layers else [1 if args.experts else 0] * args.layers
    layout = None
    if args.stage_sizes and len(set(args.stage_sizes)) > 1:  # uneven split: Megatron's layout string
        last = len(args.stage_sizes) - 1
        layout = "|".join(("E" if k == 0 else "") + "t" * n + ("L" if k == last else "") for k, n in enumerate(args.stage_sizes))
    kw = dict(
        tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp,
        virtual_pipeline_model_parallel_size=args.vpp if args.vpp > 1 else None, context_parallel_size=args.cp,
        expert_model_parallel_size=args.ep, expert_tensor_parallel_size=args.etp,
        sequence_parallel=args.sp and args.tp > 1, pipeline_model_parallel_layout=layout,
        num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
        num_query_groups=args.groups or args.heads, kv_channels=args.head_dim or args.hidden // args.heads,
        ffn_hidden_size=args.ffn or 4 * args.hidden,
        gated_linear_unit=args.gated, activation_func=F.silu if args.gated else F.gelu,
        normalization={"rmsnorm": "RMSNorm", "layernorm": "LayerNorm"}[args.normalization], add_bias_linear=False,
        hidden_dropout=0.0, attention_dropout=0.0, init_method_std=0.02,
        bf16=True, params_dtype=torch.bfloat16, pipeline_dtype=torch.bfloat16,
        masked_softmax_fusion=False, bias_activation_fusion=False, bias_dropout_fusion=False, apply_rope_fusion=False,
        persist_layer_norm=False, gradient_accumulation_fusion=False, transformer_impl="local",
        attention_backend=AttnBackend.local, deallocate_pipeline_outputs=True,
        # Megatron-LM's p2p settings: batched only without interleaving (at PP=2 with VPP a batch
        # pairs a forward and a backward transfer to the same peer by order and swaps them)
        overlap_p2p_comm=args.vpp > 1, batch_p2p_comm=args.vpp == 1,
    )
    if args.recompute == "selective":
        kw.update(recompute_granularity="selective")
    elif args.recompute == "full":
        kw.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    if args.experts:
        kw.update(num_moe_experts=args.experts, moe_ffn_hidden_size=args.moe_ffn, moe_router_topk=args.topk,
                  moe_router_pre_softmax=args.topk == 1, moe_router_dtype="fp32", moe_router_load_balancing_type="aux_loss",
                  moe_aux_loss_coeff=1e-2, moe_shared_expert_intermediate_size=args.shared_ffn,
                  moe_token_dispatcher_type=args.dispatcher, moe_expert_capacity_factor=args.capacity_factor,
                  moe_grouped_gemm=False, moe_layer_freq=moe_layers)
    return TransformerConfig(**kw)


def build_model(args, config):
    """GPTModel chunks as Megatron-LM's get_model builds them (one per virtual stage)."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    vocab = -(-args.vocab // (128 * args.tp)) * (128 * args.tp)
    chunks = []
    for i in range(args.vpp):
        vp_stage = i if args.vpp > 1 else None
        spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False,
                                          normalization=config.normalization, vp_stage=vp_stage)
        if config.sequence_parallel:  # inline adapter: SP-capable norms
            spec = replace(spec, layer_norm=SequenceParallelNorm, layer_specs=[
                replace(s, submodules=replace(s.submodules, input_layernorm=SequenceParallelNorm, pre_mlp_layernorm=SequenceParallelNorm))
                for s in spec.layer_specs])
        chunk = GPTModel(
            config=config, transformer_layer_spec=spec, vocab_size=vocab, max_sequence_length=args.seq,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            share_embeddings_and_output_weights=args.tie_embeddings,
            position_embedding_type={"rope": "rope", "learned": "learned_absolute", "none": "none"}[args.position_embedding],
            vp_stage=vp_stage,
        )
        chunks.append(chunk.cuda(torch.cuda.current_device()))
    return chunks


# --------------------------------------------------------------------------- training


def wrap(args, config, chunks, total_steps):
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.transformer.module import Float16Module

    model = [Float16Module(config, c) for c in chunks]
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=True, use_distributed_optimizer=args.distributed_optimizer,
        overlap_param_gather=args.distributed_optimizer, align_param_gather=args.distributed_optimizer and len(chunks) > 1,
        bucket_size=max(40_000_000, 1_000_000 * ps.get_data_parallel_world_size(with_context_parallel=True)),
    )
    model = [DistributedDataParallel(config=config, ddp_config=ddp_config, module=c, disable_bucketing=i > 0)
             for i, c in enumerate(model)]
    opt_config = OptimizerConfig(optimizer="adam", lr=args.lr, min_lr=args.lr, weight_decay=0.1, adam_beta1=0.9,
                                 adam_beta2=0.95, clip_grad=1.0, bf16=True, params_dtype=torch.bfloat16,
                                 use_distributed_optimizer=args.distributed_optimizer,
                                 overlap_param_gather=args.distributed_optimizer)
    optimizer = get_megatron_optimizer(opt_config, model)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=args.lr, min_lr=args.lr, lr_warmup_steps=min(5, total_steps - 1),
        lr_decay_steps=total_steps, lr_decay_style="constant", start_wd=0.1, end_wd=0.1,
        wd_incr_steps=total_steps, wd_incr_style="constant")
    config.grad_scale_func = optimizer.scale_loss
    config.no_sync_func = [c.no_sync for c in model] if len(model) > 1 else model[0].no_sync
    config.grad_sync_func = [c.start_grad_sync for c in model] if len(model) > 1 else model[0].start_grad_sync
    if ddp_config.align_param_gather:
        config.param_sync_func = [c.start_param_sync for c in model]
    config.finalize_model_grads_func = finalize_model_grads
    return model, optimizer, scheduler


def microbatches(args, order, position, dp_rank, step, count):
    """Same stream as the worker's SyntheticChain: each sample walks one random vocabulary cycle."""
    import numpy as np
    from megatron.core.utils import get_batch_on_this_cp_rank

    for index in range(count):
        seed = int(np.random.SeedSequence([args.seed, dp_rank, step, index]).generate_state(1)[0])
        start = torch.randint(args.vocab, (args.mbs,), generator=torch.Generator().manual_seed(seed)).to(order.device)
        window = order[(position[start, None] + torch.arange(args.seq + 1, device=order.device)) % args.vocab]
        tokens = window[:, :-1].contiguous()
        yield get_batch_on_this_cp_rank({
            "tokens": tokens, "labels": window[:, 1:].contiguous(), "loss_mask": torch.ones_like(tokens, dtype=torch.float),
            "position_ids": torch.arange(args.seq, device=tokens.device).expand_as(tokens).contiguous()})


def loss_func(loss_mask, output_tensor):
    losses, mask = output_tensor.view(-1).float(), loss_mask.view(-1).float()
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().clone().detach().to(torch.int)
    return loss, num_tokens, {"lm loss": torch.cat([loss.clone().detach().view(1), num_tokens.view(1)])}


def forward_step(data_iterator, model):
    from megatron.core.utils import get_attr_wrapped_model

    pre, post = get_attr_wrapped_model(model, "pre_process"), get_attr_wrapped_model(model, "post_process")
    if not (pre or post):
        return model(None, None, None), partial(loss_func, None)
    batch = next(data_iterator)
    output = model(batch["tokens"] if pre else None, batch["position_ids"] if pre else None, None,
                   labels=batch["labels"] if post else None)
    return output, partial(loss_func, batch["loss_mask"])


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.transformer.moe import moe_utils

    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local)
    torch.distributed.init_process_group("nccl", rank=rank, world_size=world, timeout=timedelta(minutes=10))
    ps.initialize_model_parallel(
        tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp,
        virtual_pipeline_model_parallel_size=args.vpp if args.vpp > 1 else None, context_parallel_size=args.cp,
        expert_model_parallel_size=args.ep, expert_tensor_parallel_size=args.etp, distributed_timeout_minutes=10)
    seed = args.seed + 100 * ps.get_pipeline_model_parallel_rank()
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    inline_adapters = []
    if args.experts and not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = te_general_gemm
        inline_adapters.append("te_general_gemm")
    config = build_config(args)
    if config.sequence_parallel:
        inline_adapters.append("sequence_parallel_norm")
    chunks = build_model(args, config)
    params = sum(p.numel() for c in chunks for p in c.parameters())
    total = args.warmup + args.steps
    model, optimizer, scheduler = wrap(args, config, chunks, total)
    gen = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(args.vocab, generator=gen)
    position = torch.empty_like(order)
    position[order] = torch.arange(args.vocab)
    order, position = order.cuda(), position.cuda()
    num_microbatches = args.gbs // (args.mbs * ps.get_data_parallel_world_size())
    forward_backward = get_forward_backward_func()
    seconds, losses = [], []
    for step in range(total):
        streams = [microbatches(args, order, position, ps.get_data_parallel_rank(), step, num_microbatches) for _ in model]
        torch.cuda.synchronize()
        start = time.perf_counter()
        for c in model:
            c.zero_grad_buffer()
        optimizer.zero_grad()
        reduced = forward_backward(forward_step_func=forward_step, data_iterator=streams if len(model) > 1 else streams[0],
                                   model=model, num_microbatches=num_microbatches, seq_length=args.seq,
                                   micro_batch_size=args.mbs, decoder_seq_length=args.seq, forward_only=False)
        ok, _, _ = optimizer.step()
        if ok:
            scheduler.step(increment=1)
        torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
        if ps.is_pipeline_last_stage(ignore_virtual=True):
            val = torch.vstack([x["lm loss"].view(-1) for x in reduced]).sum(dim=0)
            torch.distributed.all_reduce(val, group=ps.get_data_parallel_group(with_context_parallel=True))
            losses.append((val[0] / val[1]).item())
    info = {"rank": rank, "params": params, "seconds": seconds, "losses": losses,
            "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30}
    infos = [None] * world
    torch.distributed.all_gather_object(infos, info)
    if rank == 0:
        per_step = [max(i["seconds"][s] for i in infos) for s in range(total)]
        median = statistics.median(per_step[args.warmup:])
        report = {
            "schema": "megacpp.baseline/1",
            "layout": {k: getattr(args, k) for k in ("tp", "pp", "vpp", "cp", "ep", "etp", "sp", "mbs", "gbs", "seq", "recompute")},
            "layers": args.layers, "device": {"name": torch.cuda.get_device_name(), "count": torch.cuda.device_count()},
            "world_size": world, "steps": args.steps, "warmup": args.warmup, "median_step_seconds": median, "step_seconds": per_step[args.warmup:],
            "tokens_per_second": args.gbs * args.seq / median,
            "losses": next(i["losses"] for i in infos if i["losses"]),
            "ranks": [{k: i[k] for k in ("rank", "params", "peak_allocated_gib", "peak_reserved_gib")} for i in infos],
            "measured_peak_gib": max(i["peak_allocated_gib"] for i in infos),
            "inline_adapters": inline_adapters,
        }
        if args.report:
            with open(args.report, "w") as f:
                json.dump(report, f, indent=1)
        print(f"plain megatron-core: median step {median:.4f}s, {report['tokens_per_second']:.0f} tokens/s, "
              f"peak {report['measured_peak_gib']:.2f} GiB, loss {report['losses'][0]:.3f} -> {report['losses'][-1]:.3f}", flush=True)
    ps.destroy_model_parallel()
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
