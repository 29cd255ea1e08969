#!/usr/bin/env python
"""What autograd keeps per token in megatron-core 0.16.1's own multi-latent attention, on CPU.

    python tests/parity/mla_activations.py '{"hidden_size": 256, ..., "recompute_modules": []}'

Builds one TransformerLayer of get_gpt_layer_local_spec(multi_latent_attention=True,
qk_layernorm=True) in bf16 on one gloo rank, its core attention told the key and value widths (the
local DotProductAttention takes neither: megacpp's rule mla-needs-te), runs one forward under
torch.autograd.graph.saved_tensors_hooks and prints, as JSON, the bytes per token the attention
still holds after the forward (a checkpoint's discarded outputs count 0), apart from what its norms
keep (norm modules' own saved tensors: implementation-specific, the local torch norm keeps fp32
copies) and from the causal mask passed in. Imports nothing from megacpp.
"""

from __future__ import annotations

import json
import os
import sys
import warnings


def main(argv: list[str]) -> int:
    warnings.filterwarnings("ignore")
    dims = json.loads(argv[0])
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=os.environ.get("MASTER_PORT", "29583"))
    import torch
    import torch.nn.functional as F

    # CPU shims: MLA's rotary table asks for the current CUDA device, and the CUDA RNG tracker and
    # its states (core attention's fork, mla_up_proj's checkpoint) stand in for CPU ones
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]
    torch.distributed.init_process_group("gloo")
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import random as tp_random

    ps.initialize_model_parallel(1, 1)
    tp_random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    tp_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    tp_random._set_cuda_rng_state = lambda *a, **k: None
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import multi_latent_attention
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.spec_utils import build_module
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    if not isinstance(multi_latent_attention.TELinear, type):
        multi_latent_attention.TELinear = type("NoTELinear", (), {})

    class WidthsDropped(DotProductAttention):
        def __init__(self, *args, k_channels=None, v_channels=None, **kwargs):
            super().__init__(*args, **kwargs)

    modules = dims.pop("recompute_modules")
    s, b = dims.pop("seq_length"), dims.pop("micro_batch_size")
    config = MLATransformerConfig(
        num_layers=1, kv_channels=dims["v_head_dim"], ffn_hidden_size=4 * dims["hidden_size"], rope_type="rope",
        normalization="RMSNorm", qk_layernorm=True, add_bias_linear=False, gated_linear_unit=True,
        activation_func=F.silu, hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=True, bf16=True,
        params_dtype=torch.bfloat16, pipeline_dtype=torch.bfloat16, apply_rope_fusion=False, masked_softmax_fusion=False,
        persist_layer_norm=False, gradient_accumulation_fusion=False, attention_softmax_in_fp32=True,
        **({"recompute_granularity": "selective", "recompute_modules": modules} if modules else {}), **dims)
    spec = get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=True, multi_latent_attention=True)
    spec.submodules.self_attention.submodules.core_attention = WidthsDropped
    layer = build_module(spec, config=config, layer_number=1).train()
    mask = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1)[None, None]
    once = {p.untyped_storage().data_ptr() for p in layer.parameters()} | {mask.untyped_storage().data_ptr()}
    where = {"attention": False, "norm": 0}
    attention = layer.self_attention
    attention.register_forward_pre_hook(lambda *a: where.update(attention=True))
    attention.register_forward_hook(lambda *a: where.update(attention=False))
    for module in [layer.input_layernorm, *[m for m in attention.modules() if "Norm" in type(m).__name__]]:
        module.register_forward_pre_hook(lambda *a: where.update(norm=where["norm"] + 1))
        module.register_forward_hook(lambda *a: where.update(norm=where["norm"] - 1))
    saved: dict[int, torch.UntypedStorage] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if where["attention"] and not where["norm"] and ptr not in once and ptr not in saved and storage.nbytes():
            saved[ptr] = storage
        return t

    x = torch.randn(s, b, dims["hidden_size"], dtype=torch.bfloat16, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x, attention_mask=mask)
    print(json.dumps({"bytes_per_token": sum(st.nbytes() for st in saved.values()) / (s * b)}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
