"""The R block: megacpp's state-bearing gated linear recurrence, tensor-parallel over heads.

Per head h with head_dim d, at every token t::

    decay_t = sigmoid(a_t)                      # one scalar per head and token
    S_t     = decay_t * S_{t-1} + k_t v_t^T     # state [d x d]
    o_t     = q_t S_t

followed by a per-head RMS norm of o (weight only), an output gate silu(g_t), and the output
projection. Parameters on one rank (planner/cost/blocks.py, letter R)::

    norm + h * (4*d_r + H) / tp  (in_proj: q, k, v, g and H decay logits)
         + d_r / tp * h          (out_proj)
         + d_r / tp              (gated norm weight)

with d_r = H * d. The in_proj is a ColumnParallelLinear and the out_proj a RowParallelLinear,
so under sequence parallelism the block gathers the sequence before the recurrence and
reduce-scatters after it, exactly like megatron's attention and MLP. Heads never cross ranks;
the recurrence runs over the full local sequence, so context parallelism (which would cut the
timeline) is refused.

The scan is chunked (chunk = RECURRENT_CHUNK tokens): inside a chunk it is a masked,
decay-weighted attention; across chunks the per-chunk states are combined with one matrix
product over the chunk axis, so there is no Python loop over time. It runs in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.module import MegatronModule

from megacpp.planner.cost.blocks import RECURRENT_CHUNK
from megacpp.planner.errors import LaunchError

GATED_NORM_EPS = 1e-6


def sequential_gated_linear_recurrence(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor
) -> torch.Tensor:
    """Reference recurrence, one token at a time. q, k, v: [B, H, T, d]; log_decay: [B, H, T]."""
    B, H, T, d = q.shape
    state = q.new_zeros(B, H, d, v.shape[-1])
    out = []
    for t in range(T):
        state = log_decay[:, :, t, None, None].exp() * state + k[:, :, t, :, None] * v[:, :, t, None, :]
        out.append(torch.einsum("bhd,bhde->bhe", q[:, :, t], state))
    return torch.stack(out, dim=2)


def chunked_gated_linear_recurrence(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor, chunk: int = RECURRENT_CHUNK
) -> torch.Tensor:
    """The same recurrence computed chunk-parallel. q, k, v: [B, H, T, d]; log_decay <= 0: [B, H, T].

    With b_t the cumulative log decay inside a chunk and g_c a chunk's total, the state entering
    chunk c is S_c = sum_{j<c} exp(g_{j+1} + ... + g_{c-1}) U_j, where U_j = sum_s
    exp(g_j - b_s) k_s v_s^T is what chunk j adds. Every exponent is a sum of log decays over a
    forward interval, so it is <= 0 and nothing overflows.
    """
    B, H, T, d = q.shape
    pad = -T % chunk
    if pad:  # zero keys/values and zero log decay leave the state untouched
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        log_decay = F.pad(log_decay, (0, pad))
    n = (T + pad) // chunk
    q, k, v = (x.reshape(B, H, n, chunk, x.shape[-1]) for x in (q, k, v))
    b = log_decay.reshape(B, H, n, chunk).cumsum(-1)  # inclusive, within each chunk
    g = b[..., -1]  # [B, H, n]

    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    intra = torch.exp((b[..., :, None] - b[..., None, :]).masked_fill(~causal, float("-inf")))
    out = ((q @ k.transpose(-1, -2)) * intra) @ v  # [B, H, n, C, d]

    contrib = (k * torch.exp(g[..., None] - b)[..., None]).transpose(-1, -2) @ v  # U_j: [B, H, n, d, d]
    total = g.cumsum(-1)  # G_{j+1} for chunk j
    before = torch.ones(n, n, dtype=torch.bool, device=q.device).tril(-1)  # j < c
    carry = torch.exp(((total - g)[..., :, None] - total[..., None, :]).masked_fill(~before, float("-inf")))
    states = (carry @ contrib.flatten(-2)).reshape(B, H, n, d, v.shape[-1])  # S_c entering chunk c
    out = out + (q * b.exp()[..., None]) @ states
    return out.reshape(B, H, n * chunk, -1)[:, :, :T]


class RecurrentBlock(MegatronModule):
    """Pre-norm gated linear recurrence with a residual connection; input and output [s, b, h]."""

    def __init__(self, config, norm: type, num_heads: int, head_dim: int, layer_number: int, pg_collection=None) -> None:
        if config.context_parallel_size > 1:
            raise LaunchError(
                f"R blocks carry state along the sequence and cannot be cut by context parallelism "
                f"(cp={config.context_parallel_size}); choose a candidate with cp=1"
            )
        super().__init__(config=config)
        pg = pg_collection or ProcessGroupCollection.use_mpu_process_groups()
        tp = pg.tp.size()
        if num_heads % tp:
            raise LaunchError(f"recurrent.num_heads={num_heads} is not divisible by tp={tp}")
        self.layer_number = layer_number
        self.heads = num_heads // tp
        self.head_dim = head_dim
        self.local_dim = self.heads * head_dim
        d_r = num_heads * head_dim
        self.norm = norm(config, config.hidden_size, eps=config.layernorm_epsilon)
        self.in_proj = tensor_parallel.ColumnParallelLinear(
            config.hidden_size, 4 * d_r + num_heads, config=config, init_method=config.init_method,
            bias=False, gather_output=False, tp_group=pg.tp,
        )
        self.out_proj = tensor_parallel.RowParallelLinear(
            d_r, config.hidden_size, config=config, init_method=config.output_layer_init_method,
            bias=False, input_is_parallel=True, skip_bias_add=True, tp_group=pg.tp,
        )
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        self.gate_norm_weight = torch.nn.Parameter(torch.ones(self.local_dim, device=device, dtype=config.params_dtype))
        tensor_parallel.set_tensor_model_parallel_attributes(self.gate_norm_weight, True, 0, 1)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        residual = hidden_states
        projected, _ = self.in_proj(self.norm(hidden_states))  # [s, b, 4*d_local + heads]; SP gathered
        s, b, _ = projected.shape
        q, k, v, gate, logits = projected.split([self.local_dim] * 4 + [self.heads], dim=-1)

        def heads_first(x: torch.Tensor) -> torch.Tensor:  # [s, b, H*d] -> [b, H, s, d] fp32
            return x.float().reshape(s, b, self.heads, self.head_dim).permute(1, 2, 0, 3)

        log_decay = F.logsigmoid(logits.float()).permute(1, 2, 0)  # [b, H, s]
        out = chunked_gated_linear_recurrence(heads_first(q) * self.head_dim**-0.5, heads_first(k), heads_first(v), log_decay)
        out = out * torch.rsqrt(out.pow(2).mean(-1, keepdim=True) + GATED_NORM_EPS)  # per-head RMS norm
        out = out.permute(2, 0, 1, 3).reshape(s, b, self.local_dim).to(hidden_states.dtype)
        out = out * self.gate_norm_weight * F.silu(gate)
        projected_out, _ = self.out_proj(out)  # reduce-scatter back to the SP shard
        return residual + projected_out
