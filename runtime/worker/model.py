"""This rank's model: one StageChunk per virtual pipeline stage of the plan.

A StageChunk is a megatron LanguageModule (so the pipeline schedules, DDP, finalize_model_grads
and the tied-embedding machinery treat it like a GPTModel chunk): the embedding on the first
stage, one module per block letter, and the final norm, output layer and vocab-parallel cross
entropy on the last stage.
"""

from __future__ import annotations

from contextlib import nullcontext
from functools import lru_cache, partial

import torch
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.common.language_module.language_module import LanguageModule
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.transformer_layer import TransformerLayer
from megatron.core.utils import make_viewless_tensor

from megacpp.planner.errors import LaunchError
from megacpp.planner.plan import PlannedStage
from megacpp.runtime.worker.blocks import build_block, letter_specs
from megacpp.runtime.worker.job import Job
from megacpp.runtime.worker.megatron_config import POSITION_EMBEDDING, Backend, vocab_size


@lru_cache(maxsize=4)
def causal_mask(length: int, device: torch.device) -> torch.Tensor:
    """[1, 1, s, s], True above the diagonal: megatron's default causal mask (transformer/utils.py
    get_default_causal_mask), built on the activations' device instead of hard-coded "cuda"."""
    return torch.ones(length, length, dtype=torch.bool, device=device).triu(1)[None, None]


class StageChunk(LanguageModule):
    """Blocks [start, stop) of the plan, plus the embedding and/or output head this stage owns."""

    def __init__(self, config, job: Job, stage: PlannedStage, specs: dict, backend: Backend, *, vp_stage: int | None, pg_collection) -> None:
        super().__init__(config=config, pg_collection=pg_collection)
        model = job.spec.model
        self.model_type = ModelType.encoder_or_decoder
        self.pre_process, self.post_process = stage.embedding, stage.output_head
        self.vp_stage = vp_stage
        self.share_embeddings_and_output_weights = model.tie_embeddings
        self.seq_length = job.spec.training.seq_length
        self.input_tensor: torch.Tensor | None = None
        vocab = vocab_size(job)
        position = POSITION_EMBEDDING[model.position_embedding]
        if self.pre_process:
            self.embedding = LanguageModelEmbedding(
                config=config, vocab_size=vocab, max_sequence_length=self.seq_length,
                position_embedding_type=position, scatter_to_sequence_parallel=True, tp_group=pg_collection.tp,
            )
        # TE attention applies causality itself; the local one takes the mask we pass.
        self.pass_causal_mask = not backend.use_te and "A" in stage.blocks
        self.rotary_pos_emb = None
        if position == "rope" and "A" in stage.blocks:
            self.rotary_pos_emb = RotaryEmbedding(
                kv_channels=config.kv_channels, rotary_percent=1.0, rotary_interleaved=config.rotary_interleaved,
                use_cpu_initialization=config.use_cpu_initialization, cp_group=pg_collection.cp,
            )
        self.layers = torch.nn.ModuleList(
            build_block(
                specs[letter], config, layer_number=stage.start + i // job.blocks_per_layer + 1,
                vp_stage=vp_stage, pp_rank=stage.pp_rank, first_layer=stage.start, pg_collection=pg_collection,
            )
            for i, letter in enumerate(stage.blocks)
        )
        if self.post_process:
            self.final_layernorm = backend.norm(config, config.hidden_size, eps=config.layernorm_epsilon)
            self.output_layer = tensor_parallel.ColumnParallelLinear(
                config.hidden_size, vocab, config=config, init_method=config.init_method, bias=False,
                skip_bias_add=False, gather_output=False,
                skip_weight_param_allocation=self.pre_process and self.share_embeddings_and_output_weights,
                tp_group=pg_collection.tp,
            )
        if self.pre_process or self.post_process:
            self.setup_embeddings_and_output_layer()

    def set_input_tensor(self, input_tensor) -> None:
        """Receive the previous pipeline stage's activations (called by megatron's schedules)."""
        if isinstance(input_tensor, list):
            assert len(input_tensor) == 1, "a StageChunk takes one input tensor"
            input_tensor = input_tensor[0]
        self.input_tensor = input_tensor

    @staticmethod
    def _run_layer(layer, hidden_states, rotary_pos_emb, attention_mask):
        if isinstance(layer, TransformerLayer):
            hidden_states, _ = layer(hidden_states=hidden_states, attention_mask=attention_mask, rotary_pos_emb=rotary_pos_emb)
            return hidden_states
        return layer(hidden_states)

    def forward(self, input_ids=None, position_ids=None, labels=None):
        """Token ids (first stage) or the received activations -> activations, or the per-token loss
        [b, s] on the last stage when labels are given (logits [b, s, v/tp] otherwise)."""
        if self.pre_process:
            hidden_states = self.embedding(input_ids=input_ids, position_ids=position_ids)
        else:
            hidden_states = self.input_tensor
        hidden_states = make_viewless_tensor(inp=hidden_states, requires_grad=True, keep_graph=True)
        rope = self.rotary_pos_emb(self.seq_length) if self.rotary_pos_emb is not None else None
        mask = None
        if self.pass_causal_mask:
            mask = causal_mask(self.seq_length // self.config.context_parallel_size, hidden_states.device)
        # Like TransformerBlock: dropout in SP regions must differ across TP ranks.
        rng = tensor_parallel.get_cuda_rng_tracker().fork() if self.config.sequence_parallel else nullcontext()
        full_recompute = self.config.recompute_granularity == "full" and self.training
        with rng:
            for layer in self.layers:
                if full_recompute:
                    # checkpoint saves its tensor arguments, so the layer goes into the function
                    hidden_states = tensor_parallel.checkpoint(partial(self._run_layer, layer), False, hidden_states, rope, mask)
                else:
                    hidden_states = self._run_layer(layer, hidden_states, rope, mask)
        if not self.post_process:
            return make_viewless_tensor(inp=hidden_states, requires_grad=True, keep_graph=True)
        hidden_states = self.final_layernorm(hidden_states)
        weight = self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None
        logits, _ = self.output_layer(hidden_states, weight=weight)
        if labels is None:
            return logits.transpose(0, 1).contiguous()
        return self.compute_language_model_loss(labels, logits)


def build_chunks(job: Job, config, backend: Backend) -> list[StageChunk]:
    """Build this rank's chunks (one per virtual stage), checking the plan's stage ends against Megatron's."""
    pp_rank = ps.get_pipeline_model_parallel_rank()
    vpp = job.layout.vpp
    specs = letter_specs(job, backend)
    pg = ProcessGroupCollection.use_mpu_process_groups()
    chunks = []
    for stage in job.stages_of(pp_rank):
        vp_stage = stage.vp_stage if vpp > 1 else None
        first = ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
        last = ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
        if (first, last) != (stage.embedding, stage.output_head):
            raise LaunchError(
                f"plan stage pp_rank={pp_rank} vp_stage={stage.vp_stage} has embedding={stage.embedding}, "
                f"output_head={stage.output_head} but Megatron makes it first={first}, last={last}; re-create the plan"
            )
        chunks.append(StageChunk(config, job, stage, specs, backend, vp_stage=vp_stage, pg_collection=pg))
    if not chunks:
        raise LaunchError(f"the plan has no stage for pp_rank={pp_rank}; re-create the plan")
    return chunks


def count_params(chunks: list[torch.nn.Module]) -> tuple[int, int]:
    """(all parameters, routed-expert parameters) held by this rank, each tensor counted once."""
    seen: set[int] = set()
    total = expert = 0
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            if id(param) in seen:
                continue
            seen.add(id(param))
            total += param.numel()
            if ".experts." in name:  # routed experts; shared experts live under "shared_experts."
                expert += param.numel()
    return total, expert
