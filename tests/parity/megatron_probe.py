#!/usr/bin/env python
"""Ask megatron-core itself whether it accepts a batch of parallel layouts.

Standalone (imports nothing from megacpp; speaks JSON only)::

    python tests/parity/megatron_probe.py CASES.json OUT.json --world W

The parent process starts W worker processes itself (torch.multiprocessing,
start method "fork" by default so megatron is imported once in the parent; "spawn"
with --start-method spawn, ~25 s slower for W=8 on 2 cores), gloo backend,
MASTER_ADDR=127.0.0.1 on a free port it picks; no torchrun.  The workers walk every
case in the same order inside one pool; per case each rank runs these stages, each
wrapped so that an exception is captured as ``"ExcType: first line of message"``
together with the stage name:

  parallel_state  parallel_state.initialize_model_parallel(tp, pp, vpp, cp, ep, etp)
  config          TransformerConfig(...) (its __post_init__ validation)
  model           GPTModel(...) built with megatron-core's *local* (non-TE) spec, one
                  chunk per virtual pipeline stage, pre/post_process as Megatron-LM's
                  get_model() computes them
  moe_forward     only when the model has MoE, tp > 1 and sp is false: call the
                  first MoELayer's forward in training mode; megatron-core raises
                  ValueError at its very first line (before any CUDA op / collective)

Lockstep: after every stage all ranks all-gather their status over the WORLD group,
and every rank stops the case at the first stage that failed on *any* rank.  So all
ranks always leave a case at the same stage, and the number of process groups created
(torch.distributed.new_group is collective over the world) stays identical on every
rank.  The "parallel_state" and "config" stages only depend on the case (no
rank-dependent input); if one of them ever fails on only some ranks, or with different
errors, the probe aborts the whole run (non-zero exit, OUT.json not written) since
the groups might be out of step.  "model" and "moe_forward" may legitimately fail on a
subset of ranks (e.g. only the pipeline stages that hold MoE layers): see
"failed_ranks".  Between cases: destroy_model_parallel(), destroy every process group
the case created (otherwise gloo sockets leak), reset the CUDA-RNG tracker and the
num-microbatches calculator, torch.manual_seed(1234).

Result per case (list written to OUT.json, one entry per case, same order)::

  {"id", "ok", "stage", "error",
   "where", "source",          # file:line and source line of the deepest megatron frame
   "failed_ranks", "errors_agree",
   "vpp_effective",            # vpp, or the one derived from the layout string
   "moe_forward": "raised"|"passed"|"not_applicable",
   "seconds",
   "ranks": [{"rank", "tp", "cp", "dp", "pp", "ep", "etp", "edp",
              "params", "params_expert", "params_routed_expert",
              "params_shared_expert", "param_tensors", "layers", "chunks"}],
   "groups": {"tp", "cp", "dp", "pp", "ep", "etp", "edp", "dp_cp", "embd"}}

"ranks"/"groups" are present whenever parallel_state succeeded (so also for cases that
fail later; params/layers/chunks are null there).  params_expert counts parameters
whose name contains "experts" (routed *and* shared experts); the two are also given
apart.

CPU shims (CUDA unavailable), construction-only: ``torch.Tensor.cuda`` is a no-op
(megatron-core does ``weight.data.cuda()`` before all-reducing the tied embedding
between first and last pipeline stage), ``torch.cuda.Stream`` is a dummy
(MoEAlltoAllTokenDispatcher.__init__ creates a side stream) and
``torch.cuda.current_device()`` answers "cpu" (multi-latent attention builds its rotary
table on the current device).  No CUDA RNG seeding
(use_cpu_initialization=True never touches the CUDA RNG tracker);
perform_initialization=False since only shapes matter.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import sys
import tempfile
import time
import traceback

STAGES = ("parallel_state", "config", "model", "moe_forward", "batch")
LAYOUT_DEFAULTS = {"tp": 1, "pp": 1, "vpp": 1, "cp": 1, "ep": 1, "etp": 1, "sp": False}
MODEL_DEFAULTS = {
    "num_layers": 4,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_query_groups": None,
    "kv_channels": None,
    "ffn_hidden_size": None,
    "gated_linear_unit": False,
    "num_moe_experts": None,
    "moe_ffn_hidden_size": None,
    "moe_router_topk": 2,
    "moe_shared_expert_intermediate_size": None,
    "moe_token_dispatcher_type": "alltoall",
    "moe_layer_freq": 1,
    "vocab_size": 256,
    "position_embedding_type": "rope",
    "normalization": "LayerNorm",
    "share_embeddings_and_output_weights": False,
    "seq_length": 64,
    "add_bias_linear": False,
    "qk_layernorm": False,
    "softmax_type": "vanilla",
    "window_size": None,
    "window_attn_skip_freq": None,
    # multi-latent attention (MLATransformerConfig) and multi-token prediction
    "multi_latent_attention": False,
    "q_lora_rank": None,
    "kv_lora_rank": None,
    "qk_head_dim": None,
    "qk_pos_emb_head_dim": None,
    "v_head_dim": None,
    "mtp_num_layers": None,
    # parameters only: megatron-core 0.16.1's local DotProductAttention refuses MLA's k_channels /
    # v_channels (it holds no parameters); with this set it is given a subclass that drops them,
    # and MLA's isinstance check against Transformer Engine's TELinear is kept from failing without TE
    "mla_core_attention_shim": False,
    # latent MoE (moe_latent_size): megatron-core 0.16.1 builds its two projections only as
    # Transformer Engine's TELinear(parallel_mode="duplicated") and asserts HAVE_TE
    # (moe/moe_layer.py:170-192); with the shim set a torch stand-in of the same shape takes its
    # place, for parameter counts only, and the experts are megatron-core's own
    "moe_latent_size": None,
    "moe_latent_te_linear_shim": False,
}
PIPELINE_DEFAULTS = {
    "num_layers_in_first_pipeline_stage": None,
    "num_layers_in_last_pipeline_stage": None,
    "pipeline_model_parallel_layout": None,
}
MAKE_VOCAB_SIZE_DIVISIBLE_BY = 128  # Megatron-LM default


# --------------------------------------------------------------------------- helpers


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fmt_exc(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {msg[0] if msg else ''}".rstrip()


def _where(exc: BaseException) -> tuple[str | None, str | None]:
    """(file:line, source line) of the deepest megatron frame (else the deepest frame)."""
    tb = traceback.extract_tb(exc.__traceback__)
    if not tb:
        return None, None
    mframes = [f for f in tb if "/megatron/" in f.filename.replace(os.sep, "/")]
    fr = (mframes or tb)[-1]
    path = fr.filename.replace(os.sep, "/")
    for marker in ("site-packages/", "dist-packages/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{path}:{fr.lineno}", (fr.line or None)


def _normalise_case(case: dict) -> dict:
    layout = {**LAYOUT_DEFAULTS, **(case.get("layout") or {})}
    model = {**MODEL_DEFAULTS, **(case.get("model") or {})}
    pipeline = {**PIPELINE_DEFAULTS, **(case.get("pipeline") or {})}
    return {"id": str(case["id"]), "layout": layout, "model": model, "pipeline": pipeline,
            "batch": case.get("batch")}


def padded_vocab_size(vocab: int, tp: int) -> int:
    """Megatron-LM's _vocab_size_with_padding (make_vocab_size_divisible_by=128)."""
    multiple = MAKE_VOCAB_SIZE_DIVISIBLE_BY * tp
    return ((vocab + multiple - 1) // multiple) * multiple


# --------------------------------------------------------------------------- worker


class _Ctx:
    """Per-worker handles on megatron modules (imported once per process)."""


def _import_megatron():
    import warnings

    warnings.filterwarnings("ignore")
    import torch
    import torch.nn.functional as F
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_decoder_block_spec,
        get_gpt_decoder_layer_specs,
        get_gpt_layer_local_spec,
        get_gpt_mtp_block_spec,
    )
    from megatron.core.tensor_parallel import random as tp_random
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.pipeline_parallel_layer_layout import (
        PipelineParallelLayerLayout,
    )
    from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

    try:
        from megatron.core import num_microbatches_calculator as nmc
    except ImportError:  # pragma: no cover
        nmc = None

    c = _Ctx()
    c.torch, c.F, c.ps, c.GPTModel = torch, F, ps, GPTModel
    c.block_spec, c.layer_spec = get_gpt_decoder_block_spec, get_gpt_layer_local_spec
    c.tp_random, c.MoELayer, c.PPLayout, c.TransformerConfig = (
        tp_random,
        MoELayer,
        PipelineParallelLayerLayout,
        TransformerConfig,
    )
    c.MLATransformerConfig, c.mtp_block_spec = MLATransformerConfig, get_gpt_mtp_block_spec
    c.layer_specs = get_gpt_decoder_layer_specs
    c.nmc = nmc
    return c


def _install_cpu_shims(torch):
    if not torch.cuda.is_available():
        # megatron-core's LanguageModule.setup_embeddings_and_output_layer does
        # `weight.data = weight.data.cuda()` before all-reducing the shared
        # embedding over the embedding group (pp > 1 and tied embeddings).
        torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[assignment]

        # MultiLatentAttention builds its RotaryEmbedding without use_cpu_initialization
        # (multi_latent_attention.py), so the rotary table asks for
        # torch.cuda.current_device(); on CPU the table lives on the CPU.
        torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]

        # MoEAlltoAllTokenDispatcher.__init__ creates a side stream
        # (`torch.cuda.Stream()`), which raises on a CPU-only torch build.  It
        # is only used in forward, which the probe never reaches.
        class _NoStream:
            def __init__(self, *a, **k):
                pass

            def wait_stream(self, *a, **k):
                pass

        torch.cuda.Stream = _NoStream  # type: ignore[assignment,misc]

        # DotProductAttention allocates a learnable softmax offset (softmax_type
        # "learnable") on torch.cuda.current_device().
        torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]


def _reset_globals(c, groups_before: set):
    """Best-effort reset between cases; every step may legitimately find nothing to undo."""
    torch, ps = c.torch, c.ps
    with contextlib.suppress(Exception):
        ps.destroy_model_parallel()
    # destroy_model_parallel only drops references; with gloo every group holds
    # sockets, so destroy every group this case created.
    with contextlib.suppress(Exception):
        from torch.distributed import distributed_c10d as c10d

        for pg in list(c10d._world.pg_map):
            if pg is c10d.GroupMember.WORLD or id(pg) in groups_before:
                continue
            with contextlib.suppress(Exception):
                torch.distributed.destroy_process_group(pg)
    with contextlib.suppress(Exception):
        c.tp_random.get_cuda_rng_tracker().reset()
    if c.nmc is not None:
        with contextlib.suppress(Exception):
            c.nmc.destroy_num_microbatches_calculator()
    torch.manual_seed(1234)


def _group_ranks(c, getter, **kw):
    try:
        g = getter(**kw)
        if g is None:
            return None
        return list(c.torch.distributed.get_process_group_ranks(g))
    except Exception:  # noqa: BLE001
        return None


def _effective_vpp(c, layout, pipeline):
    """Megatron-LM derives VPP from --pipeline-model-parallel-layout when VPP is unset."""
    vpp = layout["vpp"]
    pl = pipeline["pipeline_model_parallel_layout"]
    if pl is not None and vpp <= 1:
        try:
            if isinstance(pl, str):
                parsed = c.PPLayout.from_str(layout=pl, pipeline_model_parallel_size=layout["pp"])
            else:
                parsed = c.PPLayout(layout=pl, pipeline_model_parallel_size=layout["pp"])
            vpp = parsed.virtual_pipeline_model_parallel_size or 1
        except Exception:  # noqa: BLE001 - TransformerConfig re-raises it in "config"
            pass
    return vpp


def _stage_parallel_state(c, case, st):
    lay = case["layout"]
    vpp = _effective_vpp(c, lay, case["pipeline"])
    st["vpp"] = vpp
    c.ps.initialize_model_parallel(
        tensor_model_parallel_size=lay["tp"],
        pipeline_model_parallel_size=lay["pp"],
        virtual_pipeline_model_parallel_size=(vpp if vpp > 1 else None),
        context_parallel_size=lay["cp"],
        expert_model_parallel_size=lay["ep"],
        expert_tensor_parallel_size=lay["etp"],
        # the default backend already is gloo: skip the duplicate gloo DP groups
        create_gloo_process_groups=False,
        distributed_timeout_minutes=2,
    )


def _stage_config(c, case, st):
    torch, F = c.torch, c.F
    lay, m, pl = case["layout"], case["model"], case["pipeline"]
    vpp = st["vpp"]
    kw = dict(
        # parallelism
        tensor_model_parallel_size=lay["tp"],
        pipeline_model_parallel_size=lay["pp"],
        virtual_pipeline_model_parallel_size=(vpp if vpp > 1 else None),
        context_parallel_size=lay["cp"],
        expert_model_parallel_size=lay["ep"],
        expert_tensor_parallel_size=lay["etp"],
        sequence_parallel=bool(lay["sp"]),
        pipeline_dtype=torch.float32,
        # model
        num_layers=m["num_layers"],
        hidden_size=m["hidden_size"],
        num_attention_heads=m["num_attention_heads"],
        num_query_groups=m["num_query_groups"],
        kv_channels=m["kv_channels"],
        ffn_hidden_size=m["ffn_hidden_size"],
        gated_linear_unit=bool(m["gated_linear_unit"]),
        activation_func=(F.silu if m["gated_linear_unit"] else F.gelu),
        normalization=m["normalization"],
        add_bias_linear=bool(m["add_bias_linear"]),
        qk_layernorm=bool(m["qk_layernorm"]),
        softmax_type=m["softmax_type"],
        window_size=(tuple(m["window_size"]) if m["window_size"] is not None else None),
        window_attn_skip_freq=m["window_attn_skip_freq"],
        # MoE
        num_moe_experts=m["num_moe_experts"],
        moe_ffn_hidden_size=m["moe_ffn_hidden_size"],
        moe_router_topk=m["moe_router_topk"],
        moe_shared_expert_intermediate_size=m["moe_shared_expert_intermediate_size"],
        moe_token_dispatcher_type=m["moe_token_dispatcher_type"],
        moe_layer_freq=m["moe_layer_freq"],
        moe_grouped_gemm=False,
        # pipeline split
        num_layers_in_first_pipeline_stage=pl["num_layers_in_first_pipeline_stage"],
        num_layers_in_last_pipeline_stage=pl["num_layers_in_last_pipeline_stage"],
        pipeline_model_parallel_layout=pl["pipeline_model_parallel_layout"],
        # CPU construction
        use_cpu_initialization=True,
        perform_initialization=False,  # shapes only: skip init_method / master weights
        params_dtype=torch.float32,
        bf16=False,
        fp16=False,
    )
    if kw["ffn_hidden_size"] is None:
        kw.pop("ffn_hidden_size")  # TransformerConfig defaults it to 4*hidden
    kw.update(qk_layernorm=bool(m["qk_layernorm"]), mtp_num_layers=m["mtp_num_layers"])
    if m["moe_latent_size"]:
        kw["moe_latent_size"] = m["moe_latent_size"]
    if m["multi_latent_attention"]:
        kw.update({k: m[k] for k in ("q_lora_rank", "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim")},
                  rope_type="rope")
        kw.pop("num_query_groups")
        st["config"] = c.MLATransformerConfig(**kw)
        return
    st["config"] = c.TransformerConfig(**kw)


def _shim_moe_latent_projections():
    """Stand a duplicated linear in for TELinear in MoELayer's latent projections: a weight
    [output, input] whole on every rank, and a bias where asked (see moe_latent_te_linear_shim)."""
    import torch
    from megatron.core.transformer.moe import moe_layer

    class DuplicatedLinear(torch.nn.Module):
        def __init__(self, input_size, output_size, *, parallel_mode, bias, **_):
            assert parallel_mode == "duplicated", parallel_mode
            super().__init__()
            self.weight = torch.nn.Parameter(torch.empty(output_size, input_size))
            if bias:
                self.bias = torch.nn.Parameter(torch.empty(output_size))

    moe_layer.HAVE_TE, moe_layer.TELinear = True, DuplicatedLinear


def _shim_mla_core_attention(spec):
    """Give every layer spec's MLA a local core attention that accepts (and drops) the key and
    value widths, for parameter counts only (see MODEL_DEFAULTS mla_core_attention_shim)."""
    from megatron.core.transformer import multi_latent_attention
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    if not isinstance(multi_latent_attention.TELinear, type):
        # without Transformer Engine installed, megatron.core.extensions.transformer_engine
        # stands TELinear in with a MagicMock, on which MLASelfAttention's
        # isinstance(linear_proj, TELinear) (multi_latent_attention.py:183-185) raises TypeError
        multi_latent_attention.TELinear = type("NoTELinear", (), {})

    class WidthsDropped(DotProductAttention):
        def __init__(self, *args, k_channels=None, v_channels=None, **kwargs):
            super().__init__(*args, **kwargs)

    for layer in getattr(spec, "layer_specs", None) or [spec]:
        layer.submodules.self_attention.submodules.core_attention = WidthsDropped


def _stage_model(c, case, st):
    ps, cfg, m = c.ps, st["config"], case["model"]
    vpp = st["vpp"]
    chunks = []
    for i in range(vpp):
        vp_stage = i if vpp > 1 else None
        pre = ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
        post = ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
        if m["num_moe_experts"]:
            # Megatron-LM's gpt_builders: any MoE model goes through the block spec
            # (handles moe_layer_freq int/list and slices to this pipeline stage).
            spec = c.block_spec(
                cfg, use_transformer_engine=False, normalization=m["normalization"],
                vp_stage=vp_stage,
            )
        else:
            spec = c.layer_spec(
                num_experts=None, moe_grouped_gemm=False, normalization=m["normalization"],
                qk_layernorm=bool(m["qk_layernorm"]), multi_latent_attention=bool(m["multi_latent_attention"]),
            )
        if m["mla_core_attention_shim"]:
            _shim_mla_core_attention(spec)
        if m["moe_latent_te_linear_shim"]:
            _shim_moe_latent_projections()
        mtp = None
        if m["mtp_num_layers"]:
            # gpt_builders.py: the MTP layer is the last decoder layer's spec, built where
            # get_mtp_num_layers_to_build says (the last stage, or the layout's `m`)
            last = spec if not m["num_moe_experts"] else c.layer_specs(
                cfg, use_transformer_engine=False, normalization=m["normalization"])[-1]
            if m["mla_core_attention_shim"]:
                _shim_mla_core_attention(last)
            mtp = c.mtp_block_spec(cfg, last, use_transformer_engine=False, vp_stage=vp_stage)
        chunks.append(
            c.GPTModel(
                config=cfg,
                transformer_layer_spec=spec,
                vocab_size=padded_vocab_size(m["vocab_size"], case["layout"]["tp"]),
                max_sequence_length=m["seq_length"],
                pre_process=pre,
                post_process=post,
                parallel_output=True,
                share_embeddings_and_output_weights=bool(
                    m["share_embeddings_and_output_weights"]
                ),
                position_embedding_type=m["position_embedding_type"],
                rotary_percent=1.0,
                mtp_block_spec=mtp,
                vp_stage=vp_stage,
            )
        )
    st["chunks"] = chunks
    seen, total, expert, routed, shared = set(), 0, 0, 0, 0
    layers, chunk_info = [], []
    for ch in chunks:
        for name, p in ch.named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            n = p.numel()
            total += n
            if "experts" in name:
                expert += n
                if "shared_experts" in name:
                    shared += n
                else:
                    routed += n
        ch_layers = [int(layer.layer_number) for layer in ch.decoder.layers]
        layers += ch_layers
        chunk_info.append(
            {"pre_process": bool(ch.pre_process), "post_process": bool(ch.post_process),
             "layers": ch_layers}
        )
    st["info"].update(
        params=total, params_expert=expert, params_routed_expert=routed, param_tensors=len(seen),
        params_shared_expert=shared, layers=layers, chunks=chunk_info,
    )


def _stage_moe_forward(c, case, st):
    """Returns 'raised' / 'passed' / 'not_applicable' (on this rank)."""
    lay, m = case["layout"], case["model"]
    if not (m["num_moe_experts"] and lay["tp"] > 1 and not lay["sp"]):
        return "not_applicable"
    moe = None
    for ch in st["chunks"]:
        for mod in ch.modules():
            if isinstance(mod, c.MoELayer):
                moe = mod
                break
        if moe is not None:
            break
    if moe is None:
        return "not_applicable"  # no MoE layer on this pipeline stage
    moe.train()
    # Deliberately mis-shaped (hidden+1): the TP/SP check is the first statement of
    # MoELayer.forward; if it ever stops firing, the router's gating GEMM fails
    # locally on the bad shape instead of entering token-dispatch collectives.
    x = c.torch.zeros(4, 1, m["hidden_size"] + 1)
    try:
        moe(x)
    except ValueError as e:
        if "sequence parallel" in str(e):
            raise
        return "passed"
    except Exception:  # noqa: BLE001 - got past the check
        return "passed"
    return "passed"


def _stage_batch(c, case, st):
    """Megatron's micro-batch calculator: global batch % (micro batch * DP) (num_microbatches_calculator.py:341)."""
    batch = case.get("batch")
    if not batch:
        return "not_applicable"
    dp = c.ps.get_data_parallel_world_size()
    try:
        c.nmc.init_num_microbatches_calculator(
            0, None, batch["global_batch_size"], batch["micro_batch_size"], dp
        )
        return c.nmc.get_num_microbatches()
    finally:
        c.nmc.destroy_num_microbatches_calculator()


def _run_case(c, rank, world, case):
    dist = c.torch.distributed
    from torch.distributed import distributed_c10d as c10d

    groups_before = {id(pg) for pg in c10d._world.pg_map}
    st = {"vpp": None, "info": {}}
    res = {"id": case["id"], "ok": True, "stage": None, "error": None, "where": None,
           "source": None,
           "failed_ranks": [], "errors_agree": None, "vpp_effective": None,
           "moe_forward": "not_applicable", "ranks": None, "groups": None}
    fatal = None

    def gather(obj):
        out = [None] * world
        dist.all_gather_object(out, obj)
        return out

    def run_stage(name, fn):
        nonlocal fatal
        status = {"ok": True, "error": None, "where": None, "source": None, "value": None}
        try:
            status["value"] = fn(c, case, st)
        except Exception as e:  # noqa: BLE001
            where, source = _where(e)
            status.update(ok=False, error=_fmt_exc(e), where=where, source=source)
        statuses = gather(status)
        failed = [r for r, s in enumerate(statuses) if not s["ok"]]
        if failed:
            first = statuses[failed[0]]
            res.update(ok=False, stage=name, error=first["error"], where=first["where"],
                       source=first["source"],
                       failed_ranks=failed,
                       errors_agree=len({statuses[r]["error"] for r in failed}) == 1)
            if name in ("parallel_state", "config") and (
                len(failed) != world or not res["errors_agree"]
            ):
                fatal = (f"case {case['id']!r}: stage {name} failed on ranks {failed} "
                         f"only / with differing errors; process groups may be out of step")
            return False, statuses
        return True, statuses

    try:
        ok, _ = run_stage("parallel_state", _stage_parallel_state)
        res["vpp_effective"] = st["vpp"]
        if ok:
            ps = c.ps
            coords = {
                "rank": rank,
                "tp": ps.get_tensor_model_parallel_rank(),
                "cp": ps.get_context_parallel_rank(),
                "dp": ps.get_data_parallel_rank(with_context_parallel=False),
                "pp": ps.get_pipeline_model_parallel_rank(),
                "ep": ps.get_expert_model_parallel_rank(),
                "etp": ps.get_expert_tensor_parallel_rank(),
                "edp": ps.get_expert_data_parallel_rank(),
            }
            mine = {
                "tp": _group_ranks(c, ps.get_tensor_model_parallel_group),
                "cp": _group_ranks(c, ps.get_context_parallel_group),
                "dp": _group_ranks(c, ps.get_data_parallel_group, with_context_parallel=False),
                "pp": _group_ranks(c, ps.get_pipeline_model_parallel_group),
                "ep": _group_ranks(c, ps.get_expert_model_parallel_group),
                "etp": _group_ranks(c, ps.get_expert_tensor_parallel_group),
                "edp": _group_ranks(c, ps.get_expert_data_parallel_group),
                "dp_cp": _group_ranks(c, ps.get_data_parallel_group, with_context_parallel=True),
                "embd": (_group_ranks(c, ps.get_embedding_group)
                         if ps.is_rank_in_embedding_group() else None),
            }
            st["info"].update(coords)
            allg = gather(mine)
            res["groups"] = {
                k: sorted({tuple(g[k]) for g in allg if g[k] is not None})
                for k in mine
            }
            res["groups"] = {k: [list(t) for t in v] for k, v in res["groups"].items()}
            for key in ("params", "params_expert", "params_routed_expert",
                        "params_shared_expert", "param_tensors", "layers", "chunks"):
                st["info"][key] = None
            ok, _ = run_stage("config", _stage_config)
            if ok:
                ok, _ = run_stage("model", _stage_model)
            if ok:
                ok, statuses = run_stage("moe_forward", _stage_moe_forward)
                vals = {s["value"] for s in statuses if s["ok"]}
                if not ok:
                    res["moe_forward"] = "raised"
                elif "passed" in vals:
                    res["moe_forward"] = "passed"
            if ok:
                ok, statuses = run_stage("batch", _stage_batch)
                if ok:
                    res["num_microbatches"] = statuses[0]["value"]
            res["ranks"] = gather(st["info"])
    finally:
        st.clear()
        _reset_globals(c, groups_before)
    return res, fatal


def _worker(rank, world, port, cases, out_path, verbose):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    c = _import_megatron()
    torch = c.torch
    torch.set_num_threads(1)
    _install_cpu_shims(torch)
    from datetime import timedelta

    torch.distributed.init_process_group(
        "gloo", rank=rank, world_size=world, timeout=timedelta(minutes=5)
    )
    results = []
    t_all = time.perf_counter()
    try:
        for case in cases:
            t0 = time.perf_counter()
            res, fatal = _run_case(c, rank, world, case)
            res["seconds"] = round(time.perf_counter() - t0, 3)
            results.append(res)
            if verbose and rank == 0:
                from torch.distributed import distributed_c10d as c10d

                print(f"[probe] {res['id']}: ok={res['ok']} stage={res['stage']} "
                      f"error={res['error']} ({res['seconds']}s, "
                      f"{len(c10d._world.pg_map)} live groups)", file=sys.stderr, flush=True)
            if fatal:
                raise RuntimeError(f"lockstep violation: {fatal}")
        torch.distributed.barrier()
    finally:
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump({"world": world, "seconds": round(time.perf_counter() - t_all, 3),
                           "results": results}, f)
        with contextlib.suppress(Exception):
            torch.distributed.destroy_process_group()


# --------------------------------------------------------------------------- parent


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cases", help="JSON list of cases")
    ap.add_argument("out", help="where to write the JSON list of results")
    ap.add_argument("--world", type=int, required=True, help="number of ranks")
    ap.add_argument("--start-method", choices=("fork", "spawn"), default="fork",
                    help="fork (default, imports megatron once in the parent) or spawn")
    ap.add_argument("-v", "--verbose", action="store_true", help="progress on stderr")
    args = ap.parse_args(argv)

    with open(args.cases) as f:
        raw = json.load(f)
    if not isinstance(raw, list):
        ap.error("CASES.json must hold a list")
    cases = [_normalise_case(x) for x in raw]
    ids = [x["id"] for x in cases]
    if len(set(ids)) != len(ids):
        ap.error("case ids must be unique")

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch.multiprocessing as mp

    if args.start_method == "fork":
        _import_megatron()  # warm sys.modules once; children inherit it
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="megatron_probe_") as tmp:
        part = os.path.join(tmp, "results.json")
        mp.start_processes(
            _worker,
            args=(args.world, _free_port(), cases, part, args.verbose),
            nprocs=args.world,
            join=True,
            start_method=args.start_method,
        )
        with open(part) as f:
            payload = json.load(f)
    results = payload["results"]
    if [r["id"] for r in results] != ids:
        raise SystemExit("probe: worker results do not cover every case")
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
        f.write("\n")
    if args.verbose:
        print(f"[probe] {len(results)} cases, world {args.world}: cases "
              f"{payload['seconds']:.1f}s, total (incl. start-up) "
              f"{time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
