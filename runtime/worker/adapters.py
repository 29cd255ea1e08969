"""Adapters: small, explicit bridges over gaps of megatron-core 0.16.1 that the worker relies on.

Each adapter names the gap it bridges and the release it was written against, is installed only
when the gap is present, and is reported by name in the run report (`"adapters"`):

- `te_general_gemm` - the MoE router's gating GEMM calls `moe_utils.te_general_gemm`, a name that
  megatron-core 0.16.1 defines only when Transformer Engine imports (moe_utils.py:22-39,
  1192-1231), so every MoE forward without TE raises NameError. We install a torch GEMM with the
  same contract.
- `sequence_parallel_norm` - the local (non-TE) spec maps norms to `WrappedTorchNorm`, which
  asserts `not config.sequence_parallel` (torch_norm.py:32). MoE with TP > 1 must run with SP
  (moe_layer.py:379-383), so without TE we use a torch norm that accepts SP and marks its
  parameters `sequence_parallel=True`, which is what finalize_model_grads keys on to all-reduce
  their gradients over TP (finalize_model_grads.py:354).
- `cpu_shims` - construction (and small forwards) on a CPU-only torch: megatron-core calls
  `Tensor.cuda()`, `torch.cuda.Stream()`, `torch.cuda.current_device()` and the CUDA RNG tracker
  unconditionally in places that are harmless on CPU. Installed only when CUDA is unavailable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import random as tp_random
from megatron.core.transformer.moe import moe_utils

MEGATRON_CORE_VERSION = "0.16.1"  # the release these adapters were written and tested against


# --------------------------------------------------------------------------- te_general_gemm


def torch_general_gemm(
    A: torch.Tensor,
    B: torch.Tensor,
    out_dtype: torch.dtype | None = None,
    layout: str = "TN",
    out: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    grad: bool = False,
) -> list[torch.Tensor | None]:
    """Torch implementation of megatron's `te_general_gemm` wrapper (extensions/transformer_engine.py).

    TE's GEMM follows cuBLAS column-major naming; in row-major terms the three layouts the router
    uses are TN: B @ A.T (forward), NN: B @ A (input gradient), NT: B.T @ A (weight gradient).
    Operands are promoted to `out_dtype` before the product, as the router's own fp32 fallback
    does, so an fp32 router gets fp32 accumulation. Returns a list whose first element is the
    result, like TE's `general_gemm`.
    """
    dtype = out_dtype or B.dtype
    a, b = A.to(dtype), B.to(dtype)
    if layout == "TN":
        result = b @ a.t()
    elif layout == "NN":
        result = b @ a
    elif layout == "NT":
        result = b.t() @ a
    else:
        raise ValueError(f"te_general_gemm layout {layout!r}: expected TN, NN or NT")
    if bias is not None:
        result = result + bias.to(dtype)
    if out is not None:
        out.copy_(result)
        result = out
    return [result, None, None, None]


def install_router_gemm() -> bool:
    """Define `moe_utils.te_general_gemm` when megatron-core left it undefined; True if installed."""
    if hasattr(moe_utils, "te_general_gemm"):
        return False
    moe_utils.te_general_gemm = torch_general_gemm
    return True


# --------------------------------------------------------------------------- SP-capable norm


class SequenceParallelNorm(torch.nn.Module):
    """LayerNorm / RMSNorm for the local spec that also runs under sequence parallelism.

    Same constructor as megatron's `WrappedTorchNorm` (config, hidden_size, eps, ...) and the same
    parameter names (`weight`, plus `bias` for LayerNorm), so parameter counts and state dicts
    match. Under SP the input is the local sequence shard, so the computation is unchanged; the
    weight gradients are partial sums per TP rank and finalize_model_grads all-reduces every
    parameter flagged `sequence_parallel`.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_: object) -> None:
        super().__init__()
        if config.normalization not in ("LayerNorm", "RMSNorm"):
            raise ValueError(f"normalization {config.normalization!r}: expected LayerNorm or RMSNorm")
        self.rms = config.normalization == "RMSNorm"
        self.eps = eps
        self.hidden_size = hidden_size
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, device=device, dtype=config.params_dtype))
        self.bias = None
        if not self.rms:
            self.bias = torch.nn.Parameter(torch.zeros(hidden_size, device=device, dtype=config.params_dtype))
        for p in self.parameters():
            p.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rms:
            return F.rms_norm(x, (self.hidden_size,), self.weight, self.eps)
        return F.layer_norm(x, (self.hidden_size,), self.weight, self.bias, self.eps)


# --------------------------------------------------------------------------- CPU shims


class _NoEvent:
    """Stands in for torch.cuda.Event: CPU work is already complete when it is recorded."""

    def synchronize(self) -> None:
        pass

    def wait(self, *args: object, **kwargs: object) -> None:
        pass

    def query(self) -> bool:
        return True


class _NoStream:
    """Stands in for torch.cuda.Stream on a CPU-only build; every method is a no-op."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def wait_stream(self, *args: object, **kwargs: object) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def record_event(self, *args: object, **kwargs: object) -> _NoEvent:
        return _NoEvent()


def install_cpu_shims() -> bool:
    """Make megatron-core's unconditional CUDA calls harmless on a CPU-only torch; True if installed.

    - `Tensor.cuda()` returns the tensor: LanguageModule moves the tied output weight to CUDA
      before all-reducing it over the embedding group (language_module.py:223).
    - `torch.cuda.Stream` is a no-op class: MoEAlltoAllTokenDispatcher creates a side stream in
      __init__ (token_dispatcher.py:445).
    - `torch.cuda.current_device()` returns "cpu": sequence-parallel gathers and the router
      allocate their outputs there (tensor_parallel/mappings.py:91, moe/router.py:169).
    - `torch.cuda.current_stream()` returns a no-op stream (the alltoall dispatcher compares
      streams in forward).
    - The CUDA RNG tracker is megatron's inference tracker, whose `fork()` is a null context,
      since there is no CUDA generator to fork (tensor_parallel/random.py:320-336).
    """
    if torch.cuda.is_available():
        return False
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # type: ignore[method-assign]
    torch.cuda.Stream = _NoStream  # type: ignore[assignment,misc]
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]
    torch.cuda.current_stream = lambda *args, **kwargs: _NoStream()  # type: ignore[assignment]
    tp_random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    return True
