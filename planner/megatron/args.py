"""The one module that maps a plan onto Megatron-LM: entry point, flags and environment.

Everything else in megacpp speaks its own vocabulary (Axis, Layout, Spec); Megatron's flag and
field names live here. Every flag emitted is checked against the dialect's parser dump
(planner/megatron/flags/*.txt, from Megatron-LM's add_megatron_arguments).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib import resources

from megacpp.planner.errors import LaunchError
from megacpp.planner.megatron.job_args import checkpoint_flags, data_flags, schedule_flags, with_extra_args
from megacpp.planner.plan import Candidate
from megacpp.planner.search.layout import Context
from megacpp.planner.spec.schedule import run_schedule

# Hybrid pattern symbols per dialect ([V] mamba_hybrid_layer_allocation.py:25-32; [M] hybrid_layer_allocation.py:14-27).
HYBRID_SYMBOLS = {"A": "*", "M": "M", "E": "E", "D": "-", "R": "G"}
# The MoE load-balancing loss coefficient both engines train with: Megatron-LM core_v0.16.1
# examples/mixtral/train_mixtral_8x7b_distributed.sh:54.
MOE_AUX_LOSS_COEFF = 1e-2


@dataclass(frozen=True)
class TrainOptions:
    """What a launch sets beyond the spec: the length of a short run (`launch --steps`)."""

    train_iters: int | None = None  # None: the spec's train_iters or train_tokens, else 100 (schedule.py)


@cache
def known_flags(dialect: str) -> frozenset[str]:
    text = resources.files("megacpp.planner.megatron.flags").joinpath(f"{dialect}.txt").read_text()
    return frozenset(line.strip() for line in text.splitlines() if line.startswith("--"))


def entry_point(ctx: Context) -> str:
    """pretrain_gpt.py for AD/AE stacks; the hybrid entry point of the dialect otherwise."""
    if ctx.plain_transformer:
        return "pretrain_gpt.py"
    return "pretrain_mamba.py" if ctx.dialect == "core_v0.16" else "pretrain_hybrid.py"


def _hybrid_pattern(ctx: Context, cand: Candidate) -> str:
    blocks = ctx.pattern.blocks
    if "M" in ctx.letters and not ctx.te:
        raise LaunchError(
            "M blocks without Transformer Engine: Megatron-LM's mamba_stack_spec needs TE; "
            "launch with --engine megacpp, or set backend.transformer_engine: true"
        )
    if ctx.dialect == "core_v0.16":
        if "R" in blocks:
            raise LaunchError(
                "R blocks have no Megatron layer in core_v0.16; launch with --engine megacpp, "
                "or set backend.megatron: main (R renders as G, gated delta net)"
            )
        return "".join(HYBRID_SYMBOLS[b] for b in blocks)
    # `|` segments in chunk order; Megatron assigns segment k to pp_rank k % PP, vp_stage k // PP
    segments, start = [], 0
    for size in cand.split.sizes:
        segments.append("".join(HYBRID_SYMBOLS[b] for b in blocks[start : start + size]))
        start += size
    # each MTP depth as one `/` part after the main pattern (hybrid_layer_allocation.py parse_hybrid_pattern)
    mtp = "".join(HYBRID_SYMBOLS[b] for b in ctx.spec.model.mtp_layer)
    return "|".join(segments) + "".join(f"/{mtp}" for _ in range(ctx.spec.model.mtp_num_layers))


def _pipeline_flags(ctx: Context, cand: Candidate) -> list[str]:
    split, lay = cand.split, cand.layout
    if split.kind == "layout":
        last = len(split.sizes) - 1
        mtp = {st.vp_stage * lay.pp + st.pp_rank for st in cand.stages if st.mtp}
        layout = "|".join(
            ("E" if k == 0 else "") + "t" * n + "m" * ctx.spec.model.mtp_num_layers * (k in mtp) + ("L" if k == last else "")
            for k, n in enumerate(split.sizes)
        )
        return ["--pipeline-model-parallel-layout", layout]
    if split.kind == "account":  # the embedding and/or the loss counted as a layer (pinned_split)
        pins = ctx.spec.parallel
        a = ["--account-for-embedding-in-pipeline-split"] * pins.account_for_embedding
        a += ["--account-for-loss-in-pipeline-split"] * pins.account_for_loss
        return a + (["--num-virtual-stages-per-pipeline-rank", str(lay.vpp)] if lay.vpp > 1 else [])
    if split.kind == "first_last":
        return [
            "--decoder-first-pipeline-num-layers", str(split.first),
            "--decoder-last-pipeline-num-layers", str(split.last),
        ]
    if split.kind == "even" and lay.vpp > 1 and ctx.plain_transformer:
        return ["--num-virtual-stages-per-pipeline-rank", str(lay.vpp)]
    return []  # even split, or main-dialect `|` segments carried by the pattern


def _moe_layer_freq(ctx: Context) -> str:
    """`--moe-layer-freq` as Megatron's list expression, run-length encoded: ([0]*3+[1]*58)."""
    flags = [1 if unit[1] == "E" else 0 for unit in ctx.units]
    runs: list[list[int]] = []
    for f in flags:
        if runs and runs[-1][0] == f:
            runs[-1][1] += 1
        else:
            runs.append([f, 1])
    return "(" + "+".join(f"[{f}]*{n}" for f, n in runs) + ")"


def _cuda_graph_flags(ctx: Context, cand: Candidate) -> list[str]:
    """training.cuda_graphs as Megatron-LM captures them. core_v0.16.1 (arguments.py
    --cuda-graph-scope): the modules through Transformer Engine's capture, whole layers (an empty
    scope) and the whole iteration through megatron-core's own ("local"), which under expert
    parallelism asserts --moe-pad-experts-for-cuda-graph-inference (arguments.py:1158-1160; it
    changes decoding only). main names the modules --cuda-graph-modules and the whole iteration
    --cuda-graph-impl full_iteration (transformer_config.py cuda_graph_impl). The whole iteration
    asserts --no-check-for-nan-in-loss-and-grad on both."""
    graphs, main = ctx.spec.training.cuda_graphs, ctx.dialect == "main"
    if graphs == "none":
        return []
    pad = ["--moe-pad-experts-for-cuda-graph-inference"] * (not main and cand.layout.ep > 1)  # the "local" impl's assert
    if graphs == "full_iteration":
        whole = ["--cuda-graph-impl", "full_iteration"] if main else ["--cuda-graph-impl", "local", "--cuda-graph-scope", "full_iteration", *pad]
        return [*whole, "--no-check-for-nan-in-loss-and-grad"]
    if graphs == "layers":
        return ["--cuda-graph-impl", "local", *pad]
    return ["--cuda-graph-impl", "transformer_engine", "--cuda-graph-modules" if main else "--cuda-graph-scope", *graphs]


def _precision_flags(ctx: Context) -> list[str]:
    """training.precision and fp8_recipe: FP8 in the hybrid format (E4M3 forward, E5M2 gradients) with
    the recipe named unless it is Megatron's default, delayed (transformer_config.py fp8_recipe); FP4
    as NVFP4 (--fp4-format e2m1 --fp4-recipe nvfp4; transformer_config.py:508-518, which refuses fp8
    and fp4 together, 1034-1035). Both dialects accept these flags."""
    tr = ctx.spec.training
    if tr.precision == "fp8":
        return ["--fp8-format", "hybrid"] + (["--fp8-recipe", tr.fp8_recipe] if tr.fp8_recipe != "delayed" else [])
    if tr.precision == "fp4":
        return ["--fp4-format", "e2m1", "--fp4-recipe", "nvfp4"]
    return []


def _fsdp_flags(ctx: Context) -> list[str]:
    """training.data_parallel_sharding fsdp: Megatron-FSDP sharding weights, gradients and the
    optimizer state (optim_grads_params), with the fsdp_dtensor checkpoint format it asserts
    (arguments.py:690-691 in core_v0.16.1; main:1169-1170). The overlaps rendered with the
    distributed optimizer prefetch each layer's parameters and reduce-scatter its gradients under
    compute (megatron/core/distributed/fsdp/src/README.md, overlap_grad_reduce / overlap_param_gather)."""
    if ctx.spec.training.data_parallel_sharding != "fsdp":
        return []
    return ["--use-megatron-fsdp", "--data-parallel-sharding-strategy", "optim_grads_params", "--ckpt-format", "fsdp_dtensor"]


def _attention_feature_flags(ctx: Context) -> list[str]:
    """QK layernorm, sliding windows and attention sinks (transformer_config.py qk_layernorm,
    window_size, window_attn_skip_freq, softmax_type; arguments.py --window-size reads "W,0" with
    tuple_type, --window-attn-skip-freq an int)."""
    attention = ctx.spec.model.attention
    assert attention is not None
    a: list[str] = []
    if attention.qk_layernorm:
        a.append("--qk-layernorm")
    if attention.window_size is not None:
        a += ["--window-size", f"{attention.window_size},0"]
        if attention.window_full_every is not None:
            a += ["--window-attn-skip-freq", str(attention.window_full_every)]
    if attention.sinks:
        a += ["--softmax-type", "learnable"]
    return a


def _latent_attention_flags(ctx: Context) -> list[str]:
    """Multi-latent attention (arguments.py _add_mla_args; core_transformer_config_from_args builds an
    MLATransformerConfig). --qk-layernorm gives the latents their norms (gpt_layer_specs.py: q/kv
    layernorm, fused into the up projections with TE). --kv-channels is the value head width, which
    the local spec's DotProductAttention shapes its output by (dot_product_attention.py projection_size).
    The rotary type stays Megatron's MLA default (yarn, scaling factor 1: plain rotary at the trained
    length), the one its fused MLA rotary kernel supports (transformer_config.py MLATransformerConfig)."""
    m = ctx.spec.model.latent
    assert m is not None
    q = ["--q-lora-rank", str(m.q_lora_rank)] if m.q_lora_rank else []
    return ["--multi-latent-attention", *q, "--kv-lora-rank", str(m.kv_lora_rank), "--qk-head-dim", str(m.qk_head_dim),
            "--qk-pos-emb-head-dim", str(m.rope_head_dim), "--v-head-dim", str(m.v_head_dim),
            "--kv-channels", str(m.v_head_dim), "--qk-layernorm"]


def _memory_flags(ctx: Context) -> list[str]:
    """Recompute, activation offloading and the precision-aware optimizer (the spec's training
    keys; transformer_config.py recompute_*, offload_modules, activation_offload_fraction;
    arguments.py --use-precision-aware-optimizer, --exp-avg-dtype, --exp-avg-sq-dtype, --main-params-dtype)."""
    tr = ctx.spec.training
    a: list[str] = []
    if tr.recompute == "selective":
        a += ["--recompute-granularity", "selective"]
        if tr.recompute_modules is not None:
            a += ["--recompute-modules", *tr.recompute_modules]
    elif tr.recompute == "full":
        a += ["--recompute-granularity", "full", "--recompute-method", tr.recompute_method or "uniform",
              "--recompute-num-layers", str(tr.recompute_num_layers or 1)]
    if tr.offload_layers is not None:
        a += ["--cpu-offloading-num-layers", str(tr.offload_layers)]
    if tr.offload_modules is not None:
        a += ["--fine-grained-activation-offloading", "--offload-modules", *tr.offload_modules]
        if tr.activation_offload_fraction != 1.0:  # main only (rule offload-fraction-needs-main)
            a += ["--activation-offload-fraction", f"{tr.activation_offload_fraction:g}"]
    opt = tr.optimizer
    if opt.precision_aware:
        a.append("--use-precision-aware-optimizer")
        for flag, dtype in (("--exp-avg-dtype", opt.exp_avg_dtype), ("--exp-avg-sq-dtype", opt.exp_avg_sq_dtype),
                            ("--main-params-dtype", opt.main_params_dtype)):
            if dtype != "fp32":
                a += [flag, dtype]
    return a


def megatron_args(ctx: Context, cand: Candidate, opts: TrainOptions, extra: bool = True) -> list[str]:
    """The complete Megatron-LM argument list (unquoted) for one candidate of a plan; without
    `extra`, megacpp's own flags alone (those launch.extra_args are checked against)."""
    spec, model, lay = ctx.spec, ctx.spec.model, cand.layout
    tr = spec.training
    a: list[str] = [
        "--tensor-model-parallel-size", str(lay.tp),
        "--pipeline-model-parallel-size", str(lay.pp),
        "--context-parallel-size", str(lay.cp),
    ]
    if lay.sp and lay.tp > 1:
        a.append("--sequence-parallel")
    a += _pipeline_flags(ctx, cand)
    if ctx.plain_transformer:
        a += ["--num-layers", str(ctx.num_layers)]
    elif ctx.dialect == "core_v0.16":
        a += ["--num-layers", str(ctx.num_layers), "--hybrid-override-pattern", _hybrid_pattern(ctx, cand), "--is-hybrid-model",
              "--spec", "megatron.core.models.mamba.mamba_layer_specs", "mamba_stack_spec"]
    else:
        a += ["--hybrid-layer-pattern", _hybrid_pattern(ctx, cand),
              "--spec", "megatron.core.models.hybrid.hybrid_layer_specs", "hybrid_stack_spec"]
    a += ["--hidden-size", str(model.hidden_size), "--seq-length", str(tr.seq_length),
          "--max-position-embeddings", str(tr.seq_length)]
    if model.attention and model.latent:
        a += ["--num-attention-heads", str(model.attention.num_heads), *_latent_attention_flags(ctx)]
    elif model.attention:
        a += ["--num-attention-heads", str(model.attention.num_heads), "--kv-channels", str(model.head_dim)]
        if model.query_groups != model.attention.num_heads:
            a += ["--group-query-attention", "--num-query-groups", str(model.query_groups)]
        a += _attention_feature_flags(ctx)
    else:
        # Megatron needs a head count even without attention layers; it only shapes unused defaults,
        # but TransformerConfig checks it against TP (transformer_config.py:925): one head per TP rank
        a += ["--num-attention-heads", str(lay.tp)]
    ffn = model.mlp.ffn_hidden_size if model.mlp else (model.moe.ffn_hidden_size if model.moe else 4 * model.hidden_size)
    a += ["--ffn-hidden-size", str(ffn)]
    gated = model.mlp.gated if model.mlp else (model.moe.gated if model.moe else True)
    if gated:
        a.append("--swiglu")
    a += ["--normalization", {"rmsnorm": "RMSNorm", "layernorm": "LayerNorm"}[model.normalization],
          "--position-embedding-type", {"rope": "rope", "learned": "learned_absolute", "none": "none"}[model.position_embedding],
          *(["--disable-bias-linear"] if not model.linear_bias else []),  # Megatron-LM's default adds biases
          # no dropout, as the megacpp runtime trains: both engines keep the same activations and
          # the cost model counts no dropout masks (blocks.block_activation_bytes)
          "--hidden-dropout", "0.0", "--attention-dropout", "0.0"]
    if not model.tie_embeddings:
        a.append("--untie-embeddings-and-output-weights")
    if model.mtp_num_layers:
        a += ["--mtp-num-layers", str(model.mtp_num_layers)]
        if model.mtp_shared_weights:  # main only (rule mtp-shared-weights-needs-main)
            a.append("--mtp-use-repeated-layer")
    if model.mamba and "M" in ctx.letters:
        m = model.mamba
        a += ["--mamba-num-heads", str(model.mamba_heads), "--mamba-head-dim", str(m.head_dim),
              "--mamba-state-dim", str(m.state_dim), "--mamba-num-groups", str(m.num_groups)]
    if model.recurrent and "R" in ctx.letters:  # main only: R renders as G (gated delta net)
        r = model.recurrent
        a += ["--linear-num-key-heads", str(r.num_heads), "--linear-num-value-heads", str(r.num_heads),
              "--linear-key-head-dim", str(r.head_dim), "--linear-value-head-dim", str(r.head_dim)]
    if model.moe and ctx.has_moe:
        moe = model.moe
        a += ["--num-experts", str(moe.num_experts), "--moe-router-topk", str(moe.top_k),
              "--moe-ffn-hidden-size", str(moe.ffn_hidden_size),
              "--expert-model-parallel-size", str(lay.ep), "--expert-tensor-parallel-size", str(lay.etp),
              "--moe-token-dispatcher-type", moe.dispatcher]
        if moe.dispatcher == "flex":
            a += ["--moe-flex-dispatcher-backend", moe.flex_backend]
        if moe.top_k == 1:  # TransformerConfig refuses a softmax top-1 router otherwise (transformer_config.py:1634)
            a.append("--moe-router-pre-softmax")
        if moe.shared_expert_ffn_hidden_size:
            a += ["--moe-shared-expert-intermediate-size", str(moe.shared_expert_ffn_hidden_size)]
        if moe.latent_size:  # rule moe-latent-needs-te holds the backend
            a += ["--moe-latent-size", str(moe.latent_size)]
        if moe.router_num_groups:
            a += ["--moe-router-num-groups", str(moe.router_num_groups), "--moe-router-group-topk", str(moe.router_group_topk)]
        if moe.capacity_factor is not None:
            a += ["--moe-expert-capacity-factor", f"{moe.capacity_factor:g}"]
        if moe.pad_to_capacity:
            a.append("--moe-pad-expert-input-to-capacity")
        # the router in fp32 (transformer_config.py:3118-3127 warns without it from 32 experts on)
        # and a load-balancing loss: Megatron-LM's --moe-aux-loss-coeff defaults to 0, which leaves
        # routing unbalanced (megacpp's runtime trains with the same two)
        a += ["--moe-router-dtype", "fp32", "--moe-aux-loss-coeff", f"{MOE_AUX_LOSS_COEFF:g}"]
        if ctx.plain_transformer and any(u[1] == "D" for u in ctx.units):
            a += ["--moe-layer-freq", _moe_layer_freq(ctx)]
        if ctx.te:
            a.append("--moe-grouped-gemm")
        if moe.overlap_communication and lay.ep > 1:  # rule ep-overlap-needs-ep-and-vpp holds the rest
            a.append("--overlap-moe-expert-parallel-comm")
    a += ["--micro-batch-size", str(lay.micro_batch_size), "--global-batch-size", str(tr.global_batch_size), "--bf16"]
    a += _precision_flags(ctx)
    a += _memory_flags(ctx)
    # gradients reduce bucket by bucket during the backward, and with the distributed optimizer
    # the parameters gather during the next forward, as megacpp's runtime and the cost model's
    # exposed data-parallel shares (cost.Efficiency.grad_reduce_exposed, param_gather_exposed) have them
    if tr.distributed_optimizer:
        a += ["--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather"]
    else:
        a.append("--overlap-grad-reduce")
    a += _fsdp_flags(ctx)
    if tr.grad_reduce_dtype == "bf16":
        a.append("--grad-reduce-in-bf16")
    if tr.tp_comm_overlap and ctx.te and lay.tp > 1 and lay.sp:
        # userbuffers need sequence parallelism (arguments.py:1441-1442); below TP 2 or without
        # SP there is nothing to overlap and Megatron-Bridge drops it too (comm_overlap.py)
        a.append("--tp-comm-overlap")
    a += _cuda_graph_flags(ctx, cand)
    if not spec.backend.fusions:
        a += ["--no-bias-swiglu-fusion", "--no-bias-dropout-fusion"] + ["--no-rope-fusion"] * ctx.te
    elif model.linear_bias and ctx.has_moe and ctx.te:
        # TEGroupedMLP asserts bias_dropout_fusion off when its experts carry biases
        # ([V] megatron/core/transformer/moe/experts.py:529-531), as Megatron-Bridge's GPT-OSS runs it
        a.append("--no-bias-dropout-fusion")
    if spec.backend.fusions and ctx.te and ctx.has_moe:
        # TE's fused token permutation (moe_utils.fused_permute, TE >= 2.1), off by default in
        # Megatron-LM and on in Megatron-Bridge's MoE recipes, whose runs the step is checked against
        a.append("--moe-permute-fusion")
    if ctx.te:
        a += ["--transformer-impl", "transformer_engine"]
    else:
        # stock megatron-core 0.16.1 without TE fails at config or model build otherwise (DESIGN.md).
        # Gradient-accumulation fusion and the masked-softmax kernel are Apex CUDA extensions that
        # Megatron-LM turns on by default: without them ColumnParallelLinear refuses to build
        # (layers.py:925, seen on 2 x H200) and the first causal softmax imports a missing module
        # (fused_softmax.py:31). Off, the local path runs the torch softmax the cost model prices,
        # in fp32 as megatron-core's TransformerConfig and megacpp's runtime run it: Megatron-LM
        # alone defaults it to bf16 (arguments.py lists attention_softmax_in_fp32 among its
        # "incompatible defaults"), which on 2 x H200 put the peak 27-37% under the plan.
        a += ["--transformer-impl", "local", "--no-persist-layer-norm", "--no-rope-fusion",
              "--no-gradient-accumulation-fusion", "--no-masked-softmax-fusion", "--attention-softmax-in-fp32"]
    a += data_flags(spec)
    # Every attention rendered here is causal and makes its own mask (TE's fused attention; the
    # local softmax's get_default_causal_mask, fused_softmax.py:323), so the [b, 1, s, s] boolean
    # mask the dataloader builds by default (gpt_dataset.py:739) is only host work and a copy per
    # micro-batch; NVIDIA's own llama3 and mamba example scripts turn it off. Alternating the
    # render with and without it on one 2 x H200 host, TE with CP2 at sequence 4096 stepped in
    # 0.784 and 0.750 s with it, 0.678 and 0.738 s without
    # (gpu_runs_h200x2_megatronlm_te_host2.json).
    a.append("--no-create-attention-mask-in-dataloader")
    a += schedule_flags(tr, run_schedule(tr, opts.train_iters)) + checkpoint_flags(spec)
    unknown = sorted({x for x in a if x.startswith("--")} - known_flags(ctx.dialect))
    if unknown:
        raise LaunchError(f"Megatron-LM {ctx.dialect} does not accept {', '.join(unknown)}")
    return with_extra_args(ctx, a, known_flags(ctx.dialect)) if extra else a


def environment(ctx: Context, cand: Candidate) -> dict[str, str]:
    """Environment for the job: Megatron's own requirements plus NCCL defaults for the cluster."""
    lay, gpu = cand.layout, ctx.cluster.gpu
    env = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}  # recommended in the MoE README [R28]
    if ctx.spec.training.offload_modules is not None:
        # with TE 2.10 or later Megatron-LM asserts this, "to avoid offloading weights" (arguments.py:1222-1227)
        env["NVTE_CPU_OFFLOAD_V1"] = "1"
    if isinstance(ctx.spec.training.cuda_graphs, tuple):
        # Transformer Engine's capture beside expandable segments asserts this, "to avoid illegal
        # memory access" (arguments.py:1247-1254 in core_v0.16.1, alike on main)
        env["NCCL_GRAPH_REGISTER"] = "0"
    pre_blackwell = gpu in {"h100", "h200", None}
    # Megatron-FSDP asserts the variable is not 1 and only warns about TP/CP without it (arguments.py:
    # 687-688, 930-938 in core_v0.16.1; rule fsdp-tp-cp-before-blackwell)
    fsdp = ctx.spec.training.data_parallel_sharding == "fsdp"
    if pre_blackwell and (lay.tp > 1 or lay.cp > 1) and not fsdp:
        env["CUDA_DEVICE_MAX_CONNECTIONS"] = "1"  # Megatron-LM arguments.py:1453-1481
    if gpu == "gb10":
        # both PCIe halves of the ConnectX-7 port, or NCCL reaches half the link [R13]
        env["NCCL_IB_HCA"] = "rocep1s0f0,roceP2p1s0f0"
    return env
