"""Measured rates of the kernels a megatron-core training step is made of, on one GPU.

    python benchmarks/gpu/kernel_rates.py --out FILE.json

Three tables of GPU time (each case captured in a CUDA graph and replayed, so host launch time is
left out; the median of five replays):

- `linear`: forward plus backward of `torch.nn.functional.linear` (input [M, K], weight [N, K]),
  i.e. the three GEMMs autograd runs for every Linear layer (forward, data gradient, weight
  gradient), 6 M K N FLOPs, over a grid of M, K, N in powers of two;
- `attention`: forward plus backward of megatron-core's unfused core attention matmuls
  (`torch.baddbmm` of the scores and `torch.bmm` of the context, on the same transposed views
  as transformer/dot_product_attention.py), 8 B S^2 D FLOPs for B batch x heads, S tokens, D head dim;
- `softmax`: megatron-core's scale-mask-softmax on the torch path, as its local DotProductAttention
  runs it for a causal mask in bf16 (fusions/fused_softmax.py FusedScaleMaskSoftmax: fp32 cast,
  masked_fill, softmax, bf16 cast; no scale, no fused kernel), forward alone and forward plus
  backward, for B batch x heads and S tokens (B S^2 scores);
- `recurrence`: forward plus backward of the R block's chunked scan
  (runtime/worker/recurrent.py, fp32) for H heads of head dim D over S tokens, one sequence;
- `ssd`: forward plus backward of the M block's core between its two projections, as
  megatron-core's MambaMixer trains it (ssm/mamba_mixer.py _ssm_training): mamba-ssm's
  `mamba_split_conv1d_scan_combined` (causal conv, SSD chunked scan with chunk 128, D skip and the
  silu(z) gate) for H heads of head dim 64, 8 groups and state N over S tokens; only with
  mamba-ssm and causal-conv1d installed;
- `elementwise`: bandwidth of a copy, an add and an fp32 softmax by tensor size;
- `fused_attention`: forward plus backward of Transformer Engine's DotProductAttention (causal,
  bf16, sequence-first, 4 query heads per KV group as in the GQA recipes; only with Transformer
  Engine installed) for B batch x heads, S tokens and head dim D, the core attention that
  megatron-core's TE layer spec runs instead of the unfused matmuls and softmax;
- `fused_attention_variants`: the same kernel with a sliding window (Megatron's window_size (W, 0),
  W in 128 and 1024) and with GPT-OSS's learnable softmax offset per head (softmax_type
  "learnable"), each beside the plain causal kernel timed on the same tensors (`over_causal`);
- `fused_attention_mla`: the same kernel as multi-latent attention runs it (192-wide queries and
  keys, 128-wide values, one key and value per head), beside the table's d=128 GQA kernel timed at
  the same heads and tokens (`over_d128`);
- `grouped_linear`: forward plus backward of Transformer Engine's GroupedLinear (bf16, no bias,
  only with Transformer Engine installed), G GEMMs of M tokens each with weights [N, K], 6 G M K N
  FLOPs: the routed experts of an E block as megatron-core's TEGroupedMLP runs them (fc1 and fc2
  are one GroupedLinear each; TE spreads the G GEMMs over its multi-stream cuBLAS path).
- `fp8_linear`: the `linear` grid through Transformer Engine's Linear (bf16 weights and inputs,
  no bias) under `te.autocast` with an fp8 recipe, one set of rows per recipe, named as Megatron's
  `--fp8-recipe` names them: `tensorwise` (Float8CurrentScaling, per-tensor scales from each
  tensor's amax), `delayed` (DelayedScaling, scales from an amax history) and
  `blockwise` (Float8BlockScaling, 1x128 and 128x128 blocks, Hopper with CUDA 12.9 or newer);
  MXFP8 needs Blackwell. The time is what a step pays: the three fp8 GEMMs plus the amax, cast and
  transpose kernels TE runs around them. The weight's fp8 copy is cached as megatron-core's TE
  layers cache it after a step's first micro-batch (`is_first_microbatch=False`), so the weight
  cast is left out and the input's and gradient's casts are in. Without Transformer Engine,
  recipe `scaled_mm`: the same three GEMMs through `torch._scaled_mm` (e4m3, per-tensor scales
  computed from each operand's amax, casts and transposes included);
- `fp8_grouped_linear`: the `grouped_linear` grid through GroupedLinear under the same recipes.

Needs torch, and megacpp with megatron-core installed for the softmax and the recurrence. The output for a preset
is committed as planner/cost/rates/<gpu>.json, which planner/cost/kernel_rates.py reads.

    python benchmarks/gpu/kernel_rates.py --out FILE.json --only fp8 [--fp8-recipes tensorwise delayed]

measures the fp8 tables alone and merges them into an existing FILE.json, replacing the rows of
the recipes measured and recording the device, the software and the command under `fp8_source`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

LINEAR_M = (512, 1024, 2048, 4096, 8192, 16384, 32768)
LINEAR_KN = (128, 256, 512, 1024, 2048, 4096, 8192, 16384)
ATTENTION_B = (4, 8, 16, 32, 64)
ATTENTION_S = (512, 1024, 2048, 4096, 8192)
ATTENTION_D = (64, 128)
RECURRENCE_H = (4, 8, 16, 32, 64)
RECURRENCE_S = (1024, 2048, 4096, 8192)
RECURRENCE_D = (64, 128)
ELEMENTWISE_MIB = (1, 4, 16, 64, 256, 1024, 4096)
SSD_H = (8, 16, 32, 64, 128)
SSD_S = (2048, 4096, 8192, 16384, 32768)
SSD_N = (64, 128)
SSD_HEAD_DIM, SSD_GROUPS, SSD_CHUNK, SSD_CONV = 64, 8, 128, 4  # MambaMixer's defaults


def timed(fn, min_seconds: float = 0.005) -> float:
    """GPU seconds per call of `fn`: captured `calls` times in a CUDA graph and replayed, so that
    the host's launch time (which the step model prices separately) is left out; the median of
    five replays."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, as torch.cuda.graph requires
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    calls = max(1, min(100, int(min_seconds / max(start.elapsed_time(end) / 1e3, 1e-6))))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    replays = []
    for _ in range(5):
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        replays.append(start.elapsed_time(end) / 1e3 / calls)
    del graph
    return statistics.median(replays)


def timed_eagerly(fn, calls: int = 20) -> float:
    """GPU-clock seconds per call of `fn` run `calls` times back to back without a graph (the
    host runs ahead of large kernels, so their launches hide); the median of five rounds."""
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    rounds = []
    for _ in range(5):
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize()
        rounds.append(start.elapsed_time(end) / 1e3 / calls)
    return statistics.median(rounds)


def timed_or_eagerly(fn) -> tuple[float, str]:
    """`timed`, or `timed_eagerly` where the work will not be captured in a CUDA graph; with the
    timer used ("graph" or "eager")."""
    try:
        return timed(fn), "graph"
    except RuntimeError:
        torch.cuda.synchronize()
        return timed_eagerly(fn), "eager"


def linear_rows(dtype: torch.dtype) -> list[dict]:
    rows = []
    for m in LINEAR_M:
        for k in LINEAR_KN:
            for n in LINEAR_KN:
                x = torch.randn(m, k, device="cuda", dtype=dtype, requires_grad=True)
                w = torch.randn(n, k, device="cuda", dtype=dtype, requires_grad=True)
                g = torch.randn(m, n, device="cuda", dtype=dtype)

                def step(x=x, w=w, g=g) -> None:
                    torch.nn.functional.linear(x, w).backward(g)
                    x.grad = w.grad = None

                seconds = timed(step)
                rows.append({"m": m, "k": k, "n": n, "seconds": seconds, "tflops": round(6 * m * k * n / seconds / 1e12, 1)})
                del x, w, g
    return rows


def attention_rows(dtype: torch.dtype) -> list[dict]:
    rows = []
    for b in ATTENTION_B:
        for s in ATTENTION_S:
            for d in ATTENTION_D:
                if b * s * s * 2 * 6 > 60 * 2**30:  # scores, their gradient and the softmax copies
                    continue
                # [s, b, d] as megatron-core lays out query, key and value (sequence first)
                q, k, v = (torch.randn(s, b, d, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
                buffer = torch.empty(b, s, s, device="cuda", dtype=dtype)
                g = torch.randn(b, s, d, device="cuda", dtype=dtype)

                def step(q=q, k=k, v=v, buffer=buffer, g=g) -> None:
                    scores = torch.baddbmm(buffer, q.transpose(0, 1), k.transpose(0, 1).transpose(1, 2), beta=0.0, alpha=0.125)
                    context = torch.bmm(scores, v.transpose(0, 1))
                    context.backward(g)
                    q.grad = k.grad = v.grad = None

                seconds = timed(step)
                rows.append({"b": b, "s": s, "d": d, "seconds": seconds, "tflops": round(8 * b * s * s * d / seconds / 1e12, 1)})
                del q, k, v, buffer, g
                torch.cuda.empty_cache()
    return rows


def softmax_rows() -> list[dict]:
    from megatron.core.fusions.fused_softmax import FusedScaleMaskSoftmax
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.utils import attention_mask_func

    # what DotProductAttention builds from the runtime's TransformerConfig (bf16, fp32 softmax,
    # no query-key layer scaling, masked_softmax_fusion off where the fused kernel is absent)
    softmax = FusedScaleMaskSoftmax(input_in_fp16=False, input_in_bf16=True, attn_mask_type=AttnMaskType.causal,
                                    scaled_masked_softmax_fusion=False, mask_func=attention_mask_func,
                                    softmax_in_fp32=True, scale=None)
    rows = []
    for b in ATTENTION_B:
        for s in ATTENTION_S:
            if b * s * s * 16 > 60 * 2**30:  # bf16 scores and probabilities, fp32 copies and gradients
                continue
            scores = torch.randn(1, b, s, s, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            g = torch.randn(1, b, s, s, device="cuda", dtype=torch.bfloat16)

            def forward(scores=scores) -> None:
                with torch.no_grad():
                    softmax(scores, None)

            def step(scores=scores, g=g) -> None:
                softmax(scores, None).backward(g)
                scores.grad = None

            rows.append({"b": b, "s": s, "forward_seconds": timed(forward), "seconds": timed(step)})
            del scores, g
            torch.cuda.empty_cache()
    return rows


def recurrence_rows() -> list[dict]:
    from megacpp.runtime.worker.recurrent import chunked_gated_linear_recurrence

    rows = []
    for h in RECURRENCE_H:
        for s in RECURRENCE_S:
            for d in RECURRENCE_D:
                q, k, v = (torch.randn(1, h, s, d, device="cuda", requires_grad=True) for _ in range(3))
                logits = torch.randn(1, h, s, device="cuda", requires_grad=True)
                g = torch.randn(1, h, s, d, device="cuda")

                def step(q=q, k=k, v=v, logits=logits, g=g) -> None:
                    log_decay = torch.nn.functional.logsigmoid(logits)
                    chunked_gated_linear_recurrence(q, k, v, log_decay).backward(g)
                    q.grad = k.grad = v.grad = logits.grad = None

                rows.append({"h": h, "s": s, "d": d, "seconds": timed(step)})
                del q, k, v, logits, g
    return rows


def ssd_rows() -> list[dict]:
    """Empty where mamba-ssm or causal-conv1d is missing (the M block cannot be built there either)."""
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_split_conv1d_scan_combined
    except ImportError:
        return []
    rows = []
    p, g = SSD_HEAD_DIM, SSD_GROUPS
    for h in SSD_H:
        for n in SSD_N:
            for s in SSD_S:
                d, conv = h * p, h * p + 2 * g * n
                zxbcdt = torch.randn(1, s, 2 * d + 2 * g * n + h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                weight = torch.randn(conv, SSD_CONV, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                bias = torch.randn(conv, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                dt_bias, a_log, skip = (torch.randn(h, device="cuda", requires_grad=True) for _ in range(3))
                grad = torch.randn(1, s, d, device="cuda", dtype=torch.bfloat16)

                def step(x=zxbcdt, w=weight, b=bias, dt=dt_bias, a=a_log, dd=skip, gy=grad) -> None:
                    y = mamba_split_conv1d_scan_combined(x, w, b, dt, -torch.exp(a), dd, chunk_size=SSD_CHUNK,
                                                         activation="silu", headdim=p, ngroups=g, norm_before_gate=False)
                    y.backward(gy)
                    for t in (x, w, b, dt, a, dd):
                        t.grad = None

                rows.append({"h": h, "s": s, "n": n, "d": p, "seconds": timed(step)})
                del zxbcdt, weight, bias, dt_bias, a_log, skip, grad
            torch.cuda.empty_cache()
    return rows


FUSED_B = (8, 16, 32, 64, 128)
FUSED_S = (1024, 2048, 4096, 8192, 16384)
FUSED_D = (64, 128)
FUSED_QUERY_PER_GROUP = 4


def fused_attention_rows() -> list[dict]:
    import transformer_engine.pytorch as te

    rows = []
    for d in FUSED_D:
        for b in FUSED_B:
            groups = max(1, b // FUSED_QUERY_PER_GROUP)
            attention = te.DotProductAttention(b, d, num_gqa_groups=groups, attn_mask_type="causal", qkv_format="sbhd")
            for s in FUSED_S:
                # one sequence of b heads, [s, 1, heads, d] as megatron-core's TE attention lays it out
                q = torch.randn(s, 1, b, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                k, v = (torch.randn(s, 1, groups, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
                g = torch.randn(s, 1, b * d, device="cuda", dtype=torch.bfloat16)

                def step(q=q, k=k, v=v, g=g, attention=attention) -> None:
                    attention(q, k, v).backward(g)
                    q.grad = k.grad = v.grad = None

                seconds, timer = timed_or_eagerly(step)
                # causal: half of the 4 B S^2 D forward FLOPs, x 3.5 with the backward's five matmuls
                rows.append({"b": b, "s": s, "d": d, "seconds": seconds, "timer": timer,
                             "tflops": round(7 * b * s * s * d / seconds / 1e12, 1)})
                del q, k, v, g
            torch.cuda.empty_cache()
    return rows


# sliding windows (Megatron's window_size (W, 0)) and GPT-OSS's learnable softmax offset per head
# (--softmax-type learnable), against the plain causal kernel in the same run
VARIANT_B = (16, 64, 256)
VARIANT_S = (2048, 4096, 8192)
VARIANT_WINDOWS = (None, 128, 1024)


def fused_attention_variant_rows() -> list[dict]:
    import transformer_engine.pytorch as te

    rows = []
    for d in FUSED_D:
        for b in VARIANT_B:
            groups = max(1, b // FUSED_QUERY_PER_GROUP)
            for s in VARIANT_S:
                q = torch.randn(s, 1, b, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                k, v = (torch.randn(s, 1, groups, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
                g = torch.randn(s, 1, b * d, device="cuda", dtype=torch.bfloat16)
                timings = {}
                for window in VARIANT_WINDOWS:
                    for sinks in (False, True):
                        extra = {"window_size": (window, 0)} if window else {}
                        if sinks:
                            extra["softmax_type"] = "learnable"
                        attention = te.DotProductAttention(b, d, num_gqa_groups=groups, attn_mask_type="causal",
                                                           qkv_format="sbhd", **extra).cuda()

                        def step(q=q, k=k, v=v, g=g, attention=attention) -> None:
                            attention(q, k, v).backward(g)
                            q.grad = k.grad = v.grad = None

                        try:
                            timings[window, sinks] = timed_or_eagerly(step)
                        except Exception as exc:  # a variant this TE / cuDNN cannot run is recorded as such
                            torch.cuda.synchronize()
                            timings[window, sinks] = (None, f"failed: {type(exc).__name__}: {str(exc)[:160]}")
                plain = timings[None, False][0]
                for (window, sinks), (seconds, timer) in timings.items():
                    rows.append({"b": b, "s": s, "d": d, "window": window, "sinks": sinks, "seconds": seconds,
                                 "timer": timer, "over_causal": round(seconds / plain, 4) if seconds and plain else None})
                del q, k, v, g
                torch.cuda.empty_cache()
    return rows


# multi-latent attention's core (DeepSeek-V3, Kimi K2): 192-wide queries and keys (128 + the 64-wide
# rotary part), 128-wide values, a key and value per head, against the table's d=128 GQA kernel
MLA_B = (16, 32, 64, 128)
MLA_S = (2048, 4096, 8192)
MLA_WIDTHS = ((192, 128),)


def fused_attention_mla_rows() -> list[dict]:
    import transformer_engine.pytorch as te

    rows = []
    for d_qk, d_v in MLA_WIDTHS:
        for b in MLA_B:
            groups = max(1, b // FUSED_QUERY_PER_GROUP)
            mla = te.DotProductAttention(b, (d_qk, d_v), num_gqa_groups=b, attn_mask_type="causal", qkv_format="sbhd")
            plain = te.DotProductAttention(b, 128, num_gqa_groups=groups, attn_mask_type="causal", qkv_format="sbhd")
            for s in MLA_S:
                q = torch.randn(s, 1, b, d_qk, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                k = torch.randn(s, 1, b, d_qk, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                v = torch.randn(s, 1, b, d_v, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                g = torch.randn(s, 1, b * d_v, device="cuda", dtype=torch.bfloat16)
                q0 = torch.randn(s, 1, b, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                k0, v0 = (torch.randn(s, 1, groups, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
                g0 = torch.randn(s, 1, b * 128, device="cuda", dtype=torch.bfloat16)

                def step(q=q, k=k, v=v, g=g, mla=mla) -> None:
                    mla(q, k, v).backward(g)
                    q.grad = k.grad = v.grad = None

                def reference(q=q0, k=k0, v=v0, g=g0, plain=plain) -> None:
                    plain(q, k, v).backward(g)
                    q.grad = k.grad = v.grad = None

                seconds, timer = timed_or_eagerly(step)
                base, _ = timed_or_eagerly(reference)
                rows.append({"b": b, "s": s, "d_qk": d_qk, "d_v": d_v, "seconds": seconds, "timer": timer,
                             "d128_gqa_seconds": base, "over_d128": round(seconds / base, 4)})
                del q, k, v, g, q0, k0, v0, g0
                torch.cuda.empty_cache()
    return rows


GROUPED_G = (1, 4, 16, 64, 256)
GROUPED_M = (128, 512, 2048, 8192)
GROUPED_KN = (512, 1024, 2048, 4096, 8192, 16384)
GROUPED_BYTES = 48 * 2**30  # skip points whose tensors (inputs, weights, outputs, gradients) exceed this
GROUPED_FLOPS = 2e14  # and those that take more than about 0.3 s a call; the planner grows time linearly past them


def grouped_bytes(g: int, m: int, k: int, n: int) -> int:
    """bf16 bytes of a GroupedLinear point's inputs and outputs, weights, and their gradients."""
    return 2 * (2 * g * m * (k + n) + 2 * g * k * n)


def grouped_linear_rows(experts: tuple[int, ...] = GROUPED_G) -> list[dict]:
    import transformer_engine.pytorch as te

    rows = []
    for g in experts:
        for k in GROUPED_KN:
            for n in GROUPED_KN:
                if grouped_bytes(g, GROUPED_M[0], k, n) > GROUPED_BYTES:
                    continue  # the weights alone (256 experts of 16384 x 16384) do not fit
                layer = te.GroupedLinear(g, k, n, bias=False, params_dtype=torch.bfloat16, device="cuda")
                for m in GROUPED_M:
                    if grouped_bytes(g, m, k, n) > GROUPED_BYTES or 6 * g * m * k * n > GROUPED_FLOPS:
                        continue
                    x = torch.randn(g * m, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                    grad = torch.randn(g * m, n, device="cuda", dtype=torch.bfloat16)
                    splits = [m] * g

                    def step(x=x, grad=grad, splits=splits, layer=layer) -> None:
                        layer(x, splits).backward(grad)
                        x.grad = None
                        for w in layer.parameters():
                            w.grad = None

                    seconds, timer = timed_or_eagerly(step)
                    rows.append({"g": g, "m": m, "k": k, "n": n, "seconds": seconds, "timer": timer,
                                 "tflops": round(6 * g * m * k * n / seconds / 1e12, 1)})
                    del x, grad
                del layer
                torch.cuda.empty_cache()
    return rows


FP8_RECIPES = ("tensorwise", "delayed", "blockwise")  # Megatron's names of TE's fp8 recipes that run on Hopper


def fp8_recipe(name: str):
    """Transformer Engine's recipe object for Megatron's recipe name, with TE's defaults (the
    HYBRID format: e4m3 forward, e5m2 gradients)."""
    from transformer_engine.common import recipe

    return {"tensorwise": recipe.Float8CurrentScaling, "delayed": recipe.DelayedScaling,
            "blockwise": recipe.Float8BlockScaling}[name]()


def have_transformer_engine() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except ImportError:
        return False
    return True


def te_fp8_row(name: str, layer, m: int, k: int, n: int, g: int | None = None) -> dict | None:
    """One fp8 point of a TE Linear (`g` None) or GroupedLinear of `g` GEMMs of `m` tokens, or
    None where it failed."""
    import transformer_engine.pytorch as te

    recipe = fp8_recipe(name)
    tokens = m if g is None else g * m
    x = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(tokens, n, device="cuda", dtype=torch.bfloat16)
    extra = () if g is None else ([m] * g,)

    def run(first: bool) -> None:
        with te.autocast(recipe=recipe):
            y = layer(x, *extra, is_first_microbatch=first)
        y.backward(grad)
        x.grad = None
        for w in layer.parameters():
            w.grad = None

    try:
        run(True)  # quantizes and caches the weight, as a step's first micro-batch does
        seconds, timer = timed_or_eagerly(lambda: run(False))
    except Exception as error:  # noqa: BLE001 - a point that fails (memory) is left out; the planner's grid fills it
        print(f"{name} g={g} {m}x{k}x{n}: {type(error).__name__}: {str(error)[:120]}", flush=True)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        return None
    row = {"recipe": name} | ({} if g is None else {"g": g})
    return row | {"m": m, "k": k, "n": n, "seconds": seconds, "timer": timer,
                  "tflops": round(6 * (g or 1) * m * k * n / seconds / 1e12, 1)}


def fp8_linear_rows(name: str) -> list[dict]:
    """The `linear` grid in fp8 under recipe `name` (TE's Linear), or through torch._scaled_mm."""
    if name == "scaled_mm":
        return scaled_mm_linear_rows()
    import transformer_engine.pytorch as te

    rows = []
    for k in LINEAR_KN:
        for n in LINEAR_KN:
            layer = te.Linear(k, n, bias=False, params_dtype=torch.bfloat16, device="cuda")
            rows += [r for m in LINEAR_M if (r := te_fp8_row(name, layer, m, k, n))]
            del layer
        torch.cuda.empty_cache()
    return sorted(rows, key=lambda r: (r["m"], r["k"], r["n"]))


def fp8_grouped_linear_rows(name: str, experts: tuple[int, ...] = GROUPED_G) -> list[dict]:
    """The `grouped_linear` grid in fp8 under recipe `name` (TE's GroupedLinear)."""
    import transformer_engine.pytorch as te

    rows = []
    for g in experts:
        for k in GROUPED_KN:
            for n in GROUPED_KN:
                if grouped_bytes(g, GROUPED_M[0], k, n) > GROUPED_BYTES:
                    continue
                layer = te.GroupedLinear(g, k, n, bias=False, params_dtype=torch.bfloat16, device="cuda")
                rows += [r for m in GROUPED_M
                         if grouped_bytes(g, m, k, n) <= GROUPED_BYTES and 6 * g * m * k * n <= GROUPED_FLOPS
                         and (r := te_fp8_row(name, layer, m, k, n, g))]
                del layer
                torch.cuda.empty_cache()
    return rows


def scaled_mm_linear_rows() -> list[dict]:
    """Forward plus backward of a Linear as three `torch._scaled_mm` GEMMs in e4m3 with per-tensor
    scales from each operand's amax (current scaling), the casts and transposes included: the
    fallback where Transformer Engine is not installed."""
    e4m3 = torch.float8_e4m3fn
    top = torch.finfo(e4m3).max

    def cast(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale = top / t.abs().amax().float().clamp(min=1e-12)
        return (t * scale).to(e4m3), scale.reciprocal()

    rows = []
    for m in LINEAR_M:
        for k in LINEAR_KN:
            for n in LINEAR_KN:
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
                g = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)

                def step(x=x, w=w, g=g) -> None:
                    (xq, sx), (wq, sw), (gq, sg) = cast(x), cast(w), cast(g)
                    torch._scaled_mm(xq, wq.t(), scale_a=sx, scale_b=sw, out_dtype=torch.bfloat16)  # y = x w^T
                    torch._scaled_mm(gq, wq.t().contiguous().t(), scale_a=sg, scale_b=sw, out_dtype=torch.bfloat16)  # dx = g w
                    torch._scaled_mm(gq.t().contiguous(), xq.t().contiguous().t(), scale_a=sg, scale_b=sx,
                                     out_dtype=torch.bfloat16)  # dw = g^T x

                seconds, timer = timed_or_eagerly(step)
                rows.append({"recipe": "scaled_mm", "m": m, "k": k, "n": n, "seconds": seconds, "timer": timer,
                             "tflops": round(6 * m * k * n / seconds / 1e12, 1)})
                del x, w, g
    return rows


def measure_fp8(doc: dict, recipes: tuple[str, ...], tables: tuple[str, ...], out: Path) -> None:
    """Measure `tables` (fp8_linear, fp8_grouped_linear) under each recipe into `doc`, replacing
    that recipe's rows, and write `out` after every table, so that a run cut short keeps what it
    measured (`fp8_source.measured` lists it). Order: the first recipe's tables, then the other
    recipes' Linear rows, then their GroupedLinear rows (the slowest to measure)."""
    te_version = None
    if have_transformer_engine():
        import transformer_engine

        te_version = transformer_engine.__version__
    elif recipes != ("scaled_mm",):
        raise SystemExit("the fp8 recipes need Transformer Engine; without it use --fp8-recipes scaled_mm")
    props = torch.cuda.get_device_properties(0)
    only = "fp8" if len(tables) > 1 else tables[0]
    source = doc["fp8_source"] = {
        "command": f"python benchmarks/gpu/kernel_rates.py --out FILE --only {only} --fp8-recipes {' '.join(recipes)}",
        "device": props.name, "torch": torch.__version__, "cuda": torch.version.cuda,
        "transformer_engine": te_version, "date": time.strftime("%Y-%m-%d", time.gmtime()), "measured": [],
    }
    measure = {"fp8_linear": fp8_linear_rows, "fp8_grouped_linear": fp8_grouped_linear_rows}
    order = [(t, recipes[0]) for t in tables] + [(t, r) for t in tables for r in recipes[1:]]
    for table, name in order:
        if table == "fp8_grouped_linear" and name == "scaled_mm":
            continue
        began = time.monotonic()
        rows = measure[table](name)
        doc[table] = [r for r in doc.get(table, []) if r["recipe"] != name] + rows
        source["measured"].append(f"{table} {name}")
        out.write_text(json.dumps(doc, indent=1) + "\n")
        best = max(rows, key=lambda r: r["tflops"])
        print(f"{table} {name}: {len(rows)} rows in {time.monotonic() - began:.0f} s; best {best['tflops']} TFLOP/s "
              f"at {best['m']}x{best['k']}x{best['n']}", flush=True)


def elementwise_rows() -> list[dict]:
    rows = []
    for mib in ELEMENTWISE_MIB:
        n = mib * 2**20 // 2  # bf16 elements
        a = torch.randn(n, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(n, device="cuda", dtype=torch.bfloat16)
        out = torch.empty_like(a)
        f32 = torch.randn(n // 2048, 2048, device="cuda", dtype=torch.float32)  # same element count
        cases = (
            ("copy", lambda a=a, out=out: out.copy_(a), 2 * a.nbytes),
            ("add", lambda a=a, b=b, out=out: torch.add(a, b, out=out), 3 * a.nbytes),
            ("softmax_fp32", lambda f32=f32: torch.softmax(f32, dim=-1), 2 * f32.nbytes),
        )
        for name, fn, nbytes in cases:
            seconds = timed(fn)
            rows.append({"op": name, "mib": mib, "bytes": nbytes, "seconds": seconds, "tbps": round(nbytes / seconds / 1e12, 3)})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    alone = {"ssd": ssd_rows, "fused_attention": fused_attention_rows, "grouped_linear": grouped_linear_rows,
             "fused_attention_variants": fused_attention_variant_rows, "fused_attention_mla": fused_attention_mla_rows}  # tables that can be measured into an existing file
    fp8_tables = {"fp8": ("fp8_linear", "fp8_grouped_linear"), "fp8_linear": ("fp8_linear",),
                  "fp8_grouped_linear": ("fp8_grouped_linear",)}
    ap.add_argument("--only", choices=sorted(alone | fp8_tables), help="measure this table alone and merge it into --out")
    ap.add_argument("--grouped-g", type=int, nargs="+", metavar="G",
                    help="with --only grouped_linear: measure these local-expert counts alone and replace their rows in --out")
    ap.add_argument("--fp8-recipes", nargs="+", choices=(*FP8_RECIPES, "scaled_mm"), default=list(FP8_RECIPES),
                    help="with --only fp8*: the recipes to measure (scaled_mm: torch._scaled_mm, without Transformer Engine)")
    args = ap.parse_args(argv)
    if args.grouped_g and args.only != "grouped_linear":
        ap.error("--grouped-g needs --only grouped_linear")
    if args.only in fp8_tables:
        doc = json.loads(args.out.read_text()) if args.out.exists() else {}
        measure_fp8(doc, tuple(args.fp8_recipes), fp8_tables[args.only], args.out)
        return 0
    if args.only:
        doc = json.loads(args.out.read_text()) if args.out.exists() else {}
        if args.grouped_g:
            kept = [r for r in doc.get("grouped_linear", []) if r["g"] not in args.grouped_g]
            doc["grouped_linear"] = sorted(kept + grouped_linear_rows(tuple(args.grouped_g)),
                                           key=lambda r: (r["g"], r["k"], r["n"], r["m"]))
        else:
            doc[args.only] = alone[args.only]()
        args.out.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"{args.only}: {len(doc[args.only])} rows")
        return 0
    torch.backends.cuda.matmul.allow_tf32 = False
    props = torch.cuda.get_device_properties(0)
    doc = {
        "what": "forward+backward rates of Linear GEMMs, unfused attention matmuls and softmax, the R scan and elementwise kernels, bf16",
        "command": "python benchmarks/gpu/kernel_rates.py --out FILE",
        "device": props.name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "elementwise": elementwise_rows(),
        "attention": attention_rows(torch.bfloat16),
        "softmax": softmax_rows(),
        "recurrence": recurrence_rows(),
        "ssd": ssd_rows(),
        "linear": linear_rows(torch.bfloat16),
    }
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    best = max(doc["linear"], key=lambda r: r["tflops"])
    print(f"{props.name}: linear best {best['tflops']} TFLOP/s at {best['m']}x{best['k']}x{best['n']}; "
          f"attention best {max(r['tflops'] for r in doc['attention'])} TFLOP/s; "
          f"softmax {min(r['seconds'] / (r['b'] * r['s'] ** 2) for r in doc['softmax']) * 1e9:.2f} ns per score at best; "
          f"copy at 4 GiB {next(r['tbps'] for r in doc['elementwise'] if r['op'] == 'copy' and r['mib'] == 4096)} TB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
