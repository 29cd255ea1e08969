"""The model and its layout read from Megatron-LM's flags: the block pattern (GPT layers,
`--moe-layer-freq`, the hybrid patterns), its dimensions and sub-blocks, the stage split, and the
pinned parallel axes, with Megatron-LM's defaults where a flag is absent."""

from __future__ import annotations

import re
from typing import Any

from megacpp.planner.errors import SpecError
from megacpp.planner.megatron.importer.flags import Reader
from megacpp.planner.megatron.importer.layers import (
    compact_pattern,
    hybrid_letters,
    moe_layer_flags,
    pipeline_layout,
)
from megacpp.planner.spec.pattern import MAX_BLOCKS
from megacpp.planner.spec.pipeline_layout import stage_layers

GPT2_VOCAB = 50257  # GPT2BPETokenizer's vocabulary (megatron/core/tokenizers, gpt2 vocab.json)


MAX_LAYOUT_TEXT = 4096  # parallel.pipeline_layout's length limit (spec/models.py ParallelPins)
MEGATRON_KV_LORA_RANK = 32  # Megatron-LM's --kv-lora-rank default (arguments.py _add_mla_args)

class ModelReader(Reader):
    """model: and parallel: of the spec."""

    has_moe = False
    mtp_parts: list[str] = []  # a hybrid pattern's MTP parts (after `/`), as pattern text
    layout_pin: str | None = None  # --pipeline-model-parallel-layout kept as parallel.pipeline_layout

    def model(self, entry_point: str) -> tuple[dict[str, Any], dict[str, int], list[int] | None]:
        f = self.f
        hidden = f.integer("--hidden-size")
        if hidden is None:
            raise SpecError("no --hidden-size: the script does not say the model's width")
        experts = f.integer("--num-experts")
        self.has_moe = experts is not None
        pattern, pipeline, layout = self._pattern(entry_point)
        mtp = self._mtp(entry_point)
        letters = set(pattern.replace("|", "")) | set(mtp.get("mtp_pattern", ""))
        model: dict[str, Any] = {"pattern": "", "hidden_size": hidden}
        vocab = f.integer("--vocab-size")
        tokenizer = f.groups.get("--tokenizer-type", [""])[0]
        if vocab is None and tokenizer == "GPT2BPETokenizer":
            vocab = GPT2_VOCAB
        if vocab is not None:
            model["vocab_size"] = vocab
        norm = f.text("--normalization") or "LayerNorm"
        if norm in ("RMSNorm", "LayerNorm"):
            model["normalization"] = norm.lower()
        else:
            self.lost("--normalization", f"{norm} is not a spec normalization (rmsnorm, layernorm); planned as rmsnorm")
        position = "none" if f.has("--no-position-embedding") else (f.text("--position-embedding-type") or "learned_absolute")
        kinds = {"rope": "rope", "learned_absolute": "learned", "none": "none"}
        if position in kinds:
            model["position_embedding"] = kinds[position]
        else:
            self.lost("--position-embedding-type", f"{position} positions are planned as rope")
            model["position_embedding"] = "rope"
        model["tie_embeddings"] = not f.has("--untie-embeddings-and-output-weights")
        # Megatron-LM's linears carry biases unless --disable-bias-linear (model.linear_bias)
        f.has("--add-bias-linear")
        if not f.has("--disable-bias-linear"):
            model["linear_bias"] = True
        gated = f.has("--swiglu")
        ffn = f.integer("--ffn-hidden-size")
        if ffn is None:  # Megatron-LM's default (arguments.py: 4h, or 2/3 of it rounded to 64 with SwiGLU)
            ffn = int(4 * hidden * 2 / 3 / 64) * 64 if gated else 4 * hidden
        if "A" in letters:
            heads = f.integer("--num-attention-heads")
            if heads is None:
                raise SpecError("no --num-attention-heads for the attention layers")
            model["attention"] = self._latent_attention(heads) if f.has("--multi-latent-attention") else self._attention(heads)
        else:
            for flag in ("--num-attention-heads", "--kv-channels", "--num-query-groups", "--group-query-attention"):
                f.has(flag)  # Megatron needs a head count without attention layers; it shapes nothing
        if "M" in letters:
            mamba = {key: v for key, flag in (("num_heads", "--mamba-num-heads"), ("head_dim", "--mamba-head-dim"),
                                              ("state_dim", "--mamba-state-dim"), ("num_groups", "--mamba-num-groups"))
                     if (v := f.integer(flag)) is not None}
            model["mamba"] = mamba
        if "R" in letters:
            model["recurrent"] = self._recurrent()
        if "E" in letters:
            model["moe"] = self._moe(experts, ffn, gated)
        elif experts is not None:
            self._moe(experts, ffn, gated)  # read, so its flags are not listed; no E block uses them
        if "D" in letters:
            model["mlp"] = {"ffn_hidden_size": ffn, "gated": gated}
        model.update(mtp)
        model["pattern"] = pattern
        return model, layout, pipeline

    def _mtp(self, entry_point: str) -> dict[str, Any]:
        """The MTP keys: the depth, a hybrid model's MTP pattern (the `/` parts _pattern split off, or
        the deprecated --mtp-hybrid-override-pattern repeated per depth, arguments.py:774-784) and
        whether one layer's weights serve every depth."""
        f = self.f
        depths = f.integer("--mtp-num-layers") or 0
        legacy = f.text("--mtp-hybrid-override-pattern")
        out: dict[str, Any] = {}
        if entry_point == "pretrain_gpt.py":
            if legacy is not None:
                self.lost("--mtp-hybrid-override-pattern", "Megatron ignores it for GPT models, whose MTP layer "
                          "copies the last layer")
        elif self.mtp_parts:
            if depths and depths != len(self.mtp_parts):
                self.notes.append(f"--mtp-num-layers {depths} but the hybrid pattern has {len(self.mtp_parts)} MTP "
                                  "parts: Megatron-LM uses the pattern's count")
            depths = len(self.mtp_parts)
            out["mtp_pattern"] = self.mtp_parts[0]
            if legacy is not None:
                self.lost("--mtp-hybrid-override-pattern", "the hybrid pattern's `/` parts take its place")
        elif legacy is not None and depths:
            out["mtp_pattern"] = compact_pattern(hybrid_letters(legacy, "--mtp-hybrid-override-pattern")[0])
        elif depths:
            self.lost("--mtp-num-layers", "a hybrid model without an MTP pattern builds no MTP layers "
                      "(Megatron-LM warns); add `/` parts to the pattern")
            depths = 0
        if depths:
            out["mtp_num_layers"] = depths
            if f.has("--mtp-use-repeated-layer"):
                out["mtp_shared_weights"] = True
        return out

    def _attention(self, heads: int) -> dict[str, Any]:
        """Grouped-query attention with its QK layernorm, sliding window and sinks (args._attention_feature_flags)."""
        f = self.f
        attention: dict[str, Any] = {"num_heads": heads}
        groups = f.integer("--num-query-groups")
        if f.has("--group-query-attention"):  # without it Megatron-LM ignores the groups (MHA)
            attention["num_query_groups"] = groups or 1  # Megatron-LM's default: one group
        kv = f.integer("--kv-channels")
        if kv is not None:
            attention["head_dim"] = kv
        if f.has("--qk-layernorm"):
            attention["qk_layernorm"] = True
        window = f.text("--window-size")
        if window is not None:
            left, _, right = window.partition(",")
            if not re.fullmatch(r"[0-9]{1,9}", left) or right.strip() not in ("", "0"):
                self.lost("--window-size", f"{window} is not a causal window W,0")
            else:
                attention["window_size"] = int(left)
                full = f.integer("--window-attn-skip-freq")
                if full is not None:
                    attention["window_full_every"] = full
        softmax = f.text("--softmax-type")
        if softmax == "learnable":
            attention["sinks"] = True
        elif softmax not in (None, "vanilla"):
            self.lost("--softmax-type", f"{softmax} softmax is not planned")
        return attention

    def _latent_attention(self, heads: int) -> dict[str, Any]:
        """Multi-latent attention (args._latent_attention_flags): its ranks and head widths; the
        --kv-channels and --qk-layernorm megacpp renders with it are its value width and latent norms."""
        f = self.f
        kv_rank = f.integer("--kv-lora-rank")
        if kv_rank is None:
            kv_rank = MEGATRON_KV_LORA_RANK
            self.notes.append(f"--multi-latent-attention without --kv-lora-rank: Megatron-LM's default {kv_rank} stands")
        mla: dict[str, Any] = {"kv_lora_rank": kv_rank}
        for key, flag in (("q_lora_rank", "--q-lora-rank"), ("qk_head_dim", "--qk-head-dim"),
                          ("rope_head_dim", "--qk-pos-emb-head-dim"), ("v_head_dim", "--v-head-dim")):
            if (value := f.integer(flag)) is not None:
                mla[key] = value
        f.integer("--kv-channels")
        f.has("--qk-layernorm")
        return {"num_heads": heads, "mla": mla}

    def _pattern(self, entry_point: str) -> tuple[str, list[int] | None, dict[str, int]]:
        """The block pattern, the stage sizes in Megatron layers (None: Megatron's even split),
        and the pipeline axes the flags give (pp, vpp)."""
        f = self.f
        pp = f.integer("--pipeline-model-parallel-size") or 1
        layers = f.integer("--num-layers")
        vpp = f.integer("--num-virtual-stages-per-pipeline-rank")
        per_virtual = f.integer("--num-layers-per-virtual-pipeline-stage")
        sizes: list[int] | None = None
        if entry_point == "pretrain_gpt.py":
            if layers is None:
                raise SpecError("no --num-layers: the script does not say how deep the model is")
            if not 1 <= layers <= MAX_BLOCKS // 2:  # two blocks a layer; refused before a list of them is built
                raise SpecError(f"--num-layers {layers}: must be 1 to {MAX_BLOCKS // 2} (a pattern holds at most {MAX_BLOCKS} blocks)")
            freq = f.text("--moe-layer-freq")
            moe = moe_layer_flags(freq, layers) if self.has_moe and freq is not None else [int(self.has_moe)] * layers
            blocks = "".join("AE" if m else "AD" for m in moe)
        else:
            flag = "--hybrid-layer-pattern" if "--hybrid-layer-pattern" in f.groups else "--hybrid-override-pattern"
            text = f.text(flag)
            if text is None:
                raise SpecError(f"{entry_point} without --hybrid-override-pattern or --hybrid-layer-pattern: megacpp "
                                "needs the layer pattern itself (a pattern by --hybrid-*-ratio is not read)")
            f.has("--is-hybrid-model")
            f.has("--spec")  # the hybrid stack spec megacpp renders for every hybrid launch
            text, *parts = text.split("/")
            if any(part != parts[0] for part in parts):
                raise SpecError(f"{flag}: every MTP part after '/' must be the same pattern (Megatron's "
                                f"parse_hybrid_pattern refuses {'/'.join(parts)[:60]!r})")
            if parts and parts[0]:
                if "|" in parts[0]:
                    raise SpecError(f"{flag}: '|' in an MTP part {parts[0][:60]!r}; pipeline cuts belong before the first '/'")
                self.mtp_parts = [compact_pattern(hybrid_letters(parts[0], flag)[0])] * len(parts)
            blocks, cuts = hybrid_letters(text, flag)
            if layers is not None and layers != len(blocks):
                raise SpecError(f"--num-layers {layers} but {flag} has {len(blocks)} layers")
            if cuts:
                bounds = [0, *cuts, len(blocks)]
                sizes = [b - a for a, b in zip(bounds, bounds[1:], strict=False)]
                vpp = len(sizes) // pp if len(sizes) % pp == 0 else None
                if vpp is None:
                    raise SpecError(f"{flag} has {len(sizes)} '|' segments, not a multiple of "
                                    f"--pipeline-model-parallel-size {pp}")
        units = len(blocks) // 2 if entry_point == "pretrain_gpt.py" else len(blocks)
        layout_text = f.text("--pipeline-model-parallel-layout")
        first, last = f.integer("--decoder-first-pipeline-num-layers"), f.integer("--decoder-last-pipeline-num-layers")
        own_split = False  # the script's split has a stage without decoder layers: megacpp splits them itself
        self.layout_pin = None
        if layout_text is not None:
            sizes, odd = pipeline_layout(layout_text)
            vpp = len(sizes) // pp
            if odd and entry_point == "pretrain_gpt.py" and _pinnable(layout_text):
                # empty stages or MTP layers off the loss's stage: the string itself is the pin
                self.layout_pin, odd = layout_text.strip(), False
            if odd:
                own_split = 0 in sizes
                why = "megacpp's own split of the decoder layers" if own_split else "the decoder layers' split"
                self.lost("--pipeline-model-parallel-layout", "a hybrid stack's layers, or the embedding/loss off the "
                          f"first/last stage, cannot be pinned as a layout string; planned with {why}")
            if own_split or self.layout_pin is not None:
                sizes = None
        elif first is not None or last is not None:
            if pp < 2 or (vpp or 1) > 1:
                raise SpecError("--decoder-first/last-pipeline-num-layers need pipeline parallelism without virtual stages")
            f_, l_ = first or 0, last or 0
            middle, left = divmod(units - f_ - l_, max(pp - (first is not None) - (last is not None), 1))
            if left or middle < 1 and pp > 2:
                raise SpecError(f"--decoder-first/last-pipeline-num-layers {first}/{last} leave {units - f_ - l_} "
                                f"layers, which {pp} stages cannot share evenly")
            sizes = [first or middle, *[middle] * (pp - 2), last or middle]
        elif per_virtual is not None:
            vpp = units // (pp * per_virtual) if units % (pp * per_virtual) == 0 else None
            if vpp is None:
                raise SpecError(f"--num-layers-per-virtual-pipeline-stage {per_virtual} does not divide "
                                f"{units} layers over {pp} stages")
        chunks = pp * (vpp or 1)
        if sizes is None and chunks > 1 and not own_split and self.layout_pin is None:
            if units % chunks:
                raise SpecError(f"{units} layers do not split evenly over {pp} stages x {vpp or 1} virtual stages, "
                                "and the script sets no uneven split")
            sizes = [units // chunks] * chunks
        if sizes is not None and (sum(sizes) != units or len(sizes) != chunks):
            raise SpecError(f"the pipeline split {sizes[:8]} does not cover {units} layers in {chunks} chunks")
        return compact_pattern(blocks), sizes, {"pp": pp, "vpp": vpp or 1}

    def _recurrent(self) -> dict[str, Any]:
        f = self.f
        heads = {f.integer("--linear-num-key-heads"), f.integer("--linear-num-value-heads")}
        dims = {f.integer("--linear-key-head-dim"), f.integer("--linear-value-head-dim")}
        if len(heads) != 1 or len(dims) != 1 or None in heads | dims:
            raise SpecError("G layers need --linear-num-key-heads = --linear-num-value-heads and --linear-key-head-dim "
                            "= --linear-value-head-dim (megacpp's R block has one head count and width)")
        return {"num_heads": heads.pop(), "head_dim": dims.pop()}

    def _moe(self, experts: int | None, ffn: int, gated: bool) -> dict[str, Any]:
        f = self.f
        moe: dict[str, Any] = {"num_experts": experts, "top_k": f.integer("--moe-router-topk") or 2,
                               "ffn_hidden_size": f.integer("--moe-ffn-hidden-size") or ffn, "gated": gated}
        shared = f.integer("--moe-shared-expert-intermediate-size")
        if shared:
            moe["shared_expert_ffn_hidden_size"] = shared
        capacity = f.number("--moe-expert-capacity-factor")
        if capacity is not None:
            moe["capacity_factor"] = capacity
        if f.has("--moe-pad-expert-input-to-capacity"):
            moe["pad_to_capacity"] = True
        dispatcher = f.text("--moe-token-dispatcher-type") or "allgather"  # Megatron-LM's default
        moe["dispatcher"] = dispatcher
        backend = f.text("--moe-flex-dispatcher-backend")
        if dispatcher == "flex" and backend is not None:
            moe["flex_backend"] = backend
        elif backend is not None:
            self.f.taken.discard("--moe-flex-dispatcher-backend")
        if f.has("--overlap-moe-expert-parallel-comm"):
            moe["overlap_communication"] = True
        groups, chosen = f.integer("--moe-router-num-groups"), f.integer("--moe-router-group-topk")
        if chosen:  # Megatron limits routing only with a group top-k (transformer_config.py:1643)
            moe.update(router_num_groups=groups, router_group_topk=chosen)
        latent = f.integer("--moe-latent-size")
        if latent:
            moe["latent_size"] = latent
        if moe["top_k"] == 1:
            f.has("--moe-router-pre-softmax")
        f.has("--moe-grouped-gemm")
        return moe

    # ---- layout ----

    def parallel(self, pipeline: dict[str, int], world: int | None) -> dict[str, Any]:
        f = self.f
        tp = f.integer("--tensor-model-parallel-size") or 1
        cp = f.integer("--context-parallel-size") or 1
        ep = f.integer("--expert-model-parallel-size") or 1
        etp = f.integer("--expert-tensor-parallel-size")
        pins: dict[str, Any] = {"tp": tp, "pp": pipeline["pp"], "vpp": pipeline["vpp"], "cp": cp}
        size = tp * pipeline["pp"] * cp
        if world is not None and world % size == 0:
            pins["dp"] = world // size
        elif world is not None:
            self.notes.append(f"tp x pp x cp = {size} does not divide the world of {world} GPUs; `megacpp validate` says why")
        # without the flag Megatron-LM sets ETP to TP (arguments.py); a model without experts
        # leaves it to the plan, which takes TP as Megatron-LM does
        pins["ep"] = ep
        if self.has_moe:
            pins["etp"] = etp if etp is not None else tp
        pins["sp"] = f.has("--sequence-parallel") and tp > 1
        if self.layout_pin is not None:
            pins["pipeline_layout"] = self.layout_pin
        return pins


def _pinnable(text: str) -> bool:
    """Whether a layout string is one parallel.pipeline_layout takes (the embedding first, the loss last,
    MTP layers after the decoder layers in one stage): then the spec keeps it as it is."""
    try:
        stage_layers(text)
    except ValueError:
        return False
    return len(text) <= MAX_LAYOUT_TEXT
