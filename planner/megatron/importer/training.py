"""The training shape, memory features, optimizer, schedule, backend, data and checkpoints read
from Megatron-LM's flags, with Megatron-LM's defaults where a flag is absent
(megatron/training/arguments.py)."""

from __future__ import annotations

from typing import Any

from megacpp.planner.errors import SpecError
from megacpp.planner.megatron.importer.flags import Reader, is_number

# differs from the spec's (megatron/training/arguments.py)
MEGATRON_SCHEDULE_DEFAULTS = {"lr_decay_style": "linear", "min_lr": 0.0, "weight_decay": 0.01,
                              "log_interval": 100, "eval_iters": 100, "eval_interval": 1000,
                              "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_eps": 1e-08}
TOKENIZER_TYPES = ("GPT2BPETokenizer", "SentencePieceTokenizer", "GPTSentencePieceTokenizer", "HuggingFaceTokenizer",
                   "Llama2Tokenizer", "TikTokenizer", "NullTokenizer")
# the schedule's keys in the order the spec reference lists them
SCHEDULE_ORDER = ("train_iters", "lr", "min_lr", "warmup_iters", "lr_decay_style", "lr_decay_iters", "lr_wsd_decay_iters",
                  "lr_wsd_decay_style", "weight_decay", "clip_grad", "adam_beta1", "adam_beta2", "adam_eps", "log_interval",
                  "eval_interval", "eval_iters")
RECOMPUTE_DEFAULTS = ("uniform", 1)  # what args.py renders for a full recompute without method and count


class TrainingReader(Reader):
    """training:, backend:, data: and checkpoint: of the spec."""

    te = True  # Transformer Engine modules, as backend() reads them

    def training(self, pins: dict[str, Any]) -> dict[str, Any]:
        f = self.f
        seq = f.integer("--seq-length")
        if seq is None:
            raise SpecError("no --seq-length: the script does not say the sequence length")
        positions = f.integer("--max-position-embeddings")
        learned = f.groups.get("--position-embedding-type", ["learned_absolute"]) == ["learned_absolute"] and (
            "--no-position-embedding" not in f.groups)
        if positions is not None and (positions < seq or (learned and positions != seq)):
            # megacpp renders it as the sequence length: a learned table of that many rows
            self.unsupported.append(f"--max-position-embeddings {positions}: megacpp launches with --seq-length {seq}")
        mbs = f.integer("--micro-batch-size") or 1
        gbs = f.integer("--global-batch-size")
        if gbs is None:  # Megatron-LM: one micro-batch per data-parallel rank
            gbs = mbs * pins.get("dp", 1)
        training: dict[str, Any] = {"seq_length": seq, "global_batch_size": gbs, "micro_batch_size": mbs}
        if f.has("--fp8-format"):
            training["precision"] = "fp8"
            recipe = f.text("--fp8-recipe")
            if recipe in ("tensorwise", "mxfp8", "blockwise"):
                training["fp8_recipe"] = recipe
            elif recipe not in (None, "delayed"):
                self.lost("--fp8-recipe", f"{recipe} is not a spec fp8 recipe")
            if f.groups["--fp8-format"] != ["hybrid"]:
                self.unsupported.append(f"--fp8-format {' '.join(f.groups['--fp8-format'])}: megacpp renders hybrid")
        fp4 = f.text("--fp4-format")
        if fp4 is not None:  # NVFP4, as args._precision_flags renders training.precision: fp4
            recipe = f.text("--fp4-recipe") or "nvfp4"
            if (fp4, recipe) == ("e2m1", "nvfp4") and "precision" not in training:
                training["precision"] = "fp4"
            else:
                self.lost("--fp4-format", f"{fp4} with the {recipe} recipe is not the spec's fp4 (e2m1, nvfp4)")
        if f.has("--use-megatron-fsdp"):
            # Megatron-FSDP sharding weights, gradients and optimizer state, with the checkpoint
            # format it asserts (args._fsdp_flags); another strategy is not a spec key
            strategy = f.text("--data-parallel-sharding-strategy") or "no_shard"  # Megatron-LM's default
            if strategy == "optim_grads_params":
                training["data_parallel_sharding"] = "fsdp"
                if f.groups.get("--ckpt-format") == ["fsdp_dtensor"]:
                    f.has("--ckpt-format")
            else:
                self.lost("--use-megatron-fsdp", f"Megatron-FSDP with --data-parallel-sharding-strategy {strategy}; "
                          "the spec's fsdp is optim_grads_params")
        if not f.has("--bf16"):
            if f.has("--fp16"):
                self.lost("--fp16", "fp16 training; planned as bf16")
            else:
                self.unsupported.append("fp32 weights (the script sets no --bf16): planned as bf16")
        training.update(self._recompute())
        training.update(self._optimizer())
        training.update(self._graphs())
        training.update(self._schedule())
        return training

    def _recompute(self) -> dict[str, Any]:
        f = self.f
        granularity = f.text("--recompute-granularity") or ("selective" if f.has("--recompute-activations") else None)
        out: dict[str, Any] = {}
        if granularity == "selective":
            out["recompute"] = "selective"
            modules = f.values("--recompute-modules")
            if modules:
                out["recompute_modules"] = modules
            for flag in ("--recompute-method", "--recompute-num-layers"):
                if flag in f.groups:
                    self.lost(flag, "applies to full recompute only")
        elif granularity == "full":
            out["recompute"] = "full"
            method, count = f.text("--recompute-method"), f.integer("--recompute-num-layers")
            if (method or "uniform", count or 1) != RECOMPUTE_DEFAULTS:
                out.update({k: v for k, v in (("recompute_method", method), ("recompute_num_layers", count)) if v is not None})
        elif granularity is not None:
            self.lost("--recompute-granularity", "not selective or full")
        layers = f.integer("--cpu-offloading-num-layers")
        if layers:
            out["offload_layers"] = layers
        offload = f.values("--offload-modules")
        if f.has("--fine-grained-activation-offloading") and offload:
            out["offload_modules"] = offload
            fraction = f.number("--activation-offload-fraction")
            if fraction is not None and fraction != 1.0:
                out["activation_offload_fraction"] = fraction
        return out

    def _optimizer(self) -> dict[str, Any]:
        f = self.f
        out: dict[str, Any] = {}
        # Megatron-FSDP turns the distributed optimizer on itself (arguments.py, --megatron-fsdp-version 1)
        if not f.has("--use-distributed-optimizer") and "--use-megatron-fsdp" not in f.groups:
            out["distributed_optimizer"] = False
        if f.has("--use-precision-aware-optimizer"):
            dtypes = {key: v for key, flag in (("exp_avg_dtype", "--exp-avg-dtype"), ("exp_avg_sq_dtype", "--exp-avg-sq-dtype"),
                                              ("main_params_dtype", "--main-params-dtype")) if (v := f.text(flag)) is not None}
            if dtypes:
                out["optimizer"] = dtypes
        optimizer = f.text("--optimizer")
        if optimizer not in (None, "adam"):
            self.lost("--optimizer", "the plan prices Adam's state")
        if f.has("--grad-reduce-in-bf16"):
            out["grad_reduce_dtype"] = "bf16"
        if f.has("--tp-comm-overlap"):
            out["tp_comm_overlap"] = True
        for flag in ("--overlap-grad-reduce", "--overlap-param-gather"):
            if not f.has(flag) and (flag == "--overlap-grad-reduce" or "distributed_optimizer" not in out):
                self.unsupported.append(f"no {flag}: megacpp launches with it, as the plan prices the data-parallel step")
        return out

    def _graphs(self) -> dict[str, Any]:
        f = self.f
        impl = f.text("--cuda-graph-impl")
        scope = f.values("--cuda-graph-scope") or []
        modules = f.values("--cuda-graph-modules") or []
        if impl in (None, "none"):
            return {}
        f.has("--no-check-for-nan-in-loss-and-grad")
        f.has("--moe-pad-experts-for-cuda-graph-inference")  # the local capture's assert under EP; decoding only
        if impl == "full_iteration" or (impl == "local" and scope == ["full_iteration"]):
            return {"cuda_graphs": "full_iteration"}
        if impl == "local" and not scope:
            return {"cuda_graphs": "layers"}
        if impl == "transformer_engine" and (scope or modules):
            return {"cuda_graphs": modules or scope}
        self.lost("--cuda-graph-impl", "a CUDA graph capture the spec has no value for")
        return {}

    def _schedule(self) -> dict[str, Any]:
        f = self.f
        out: dict[str, Any] = dict(MEGATRON_SCHEDULE_DEFAULTS)
        iters, samples = f.integer("--train-iters"), f.integer("--train-samples")
        if iters is not None:
            out["train_iters"] = iters
        elif samples is not None:
            self.lost("--train-samples", "a run counted in samples; give training.train_iters or train_tokens")
        for key, flag in (("lr", "--lr"), ("min_lr", "--min-lr"), ("weight_decay", "--weight-decay"),
                          ("clip_grad", "--clip-grad"), ("adam_beta1", "--adam-beta1"), ("adam_beta2", "--adam-beta2"),
                          ("adam_eps", "--adam-eps")):
            value = f.number(flag)
            if value is not None:
                out[key] = value
        for key, flag in (("warmup_iters", "--lr-warmup-iters"), ("lr_decay_iters", "--lr-decay-iters"),
                          ("lr_wsd_decay_iters", "--lr-wsd-decay-iters"),
                          ("log_interval", "--log-interval"), ("eval_iters", "--eval-iters"),
                          ("eval_interval", "--eval-interval")):
            value = f.integer(flag)
            if value is not None:
                out[key] = value
        style = f.text("--lr-decay-style")
        wsd = f.text("--lr-wsd-decay-style")
        if style in ("constant", "linear", "cosine", "inverse-square-root", "WSD"):
            out["lr_decay_style"] = style
            if style == "WSD":
                out["lr_wsd_decay_style"] = wsd or "exponential"  # Megatron-LM's default
        elif style is not None:
            self.lost("--lr-decay-style", f"{style} is not a spec decay style")
        if "lr" not in out:
            self.notes.append("no --lr in the script: the spec's default training.lr 0.0003 stands")
        if out.get("warmup_iters") == 0:
            del out["warmup_iters"]
        return {key: out[key] for key in SCHEDULE_ORDER if key in out}

    # ---- backend, data, checkpoint ----

    def backend(self, dialect: str) -> dict[str, Any]:
        f = self.f
        impl = f.text("--transformer-impl") or "transformer_engine"
        self.te = impl == "transformer_engine"
        if impl not in ("transformer_engine", "local"):
            self.lost("--transformer-impl", "neither transformer_engine nor local")
        unfused = [flag for flag in ("--no-bias-swiglu-fusion", "--no-bias-dropout-fusion") if f.has(flag)]
        # megacpp renders --no-bias-dropout-fusion for TE's grouped experts with biases (experts.py:529-531)
        if self.te and unfused == ["--no-bias-dropout-fusion"] and f.integer("--num-experts") is not None \
                and not f.has("--disable-bias-linear"):
            unfused = []
        rope = f.has("--no-rope-fusion")
        if not self.te:  # megacpp renders these for every local launch (args.py)
            for flag in ("--no-persist-layer-norm", "--no-gradient-accumulation-fusion", "--no-masked-softmax-fusion",
                         "--attention-softmax-in-fp32"):
                f.has(flag)
        else:
            f.has("--no-gradient-accumulation-fusion")  # the script's Apex probe adds it where Apex is missing
        out: dict[str, Any] = {"transformer_engine": self.te, "megatron": dialect}
        moe = self.te and f.integer("--num-experts") is not None
        permute = f.has("--moe-permute-fusion")
        if unfused or (rope and self.te):
            out["fusions"] = False
            if len(unfused) < 2:
                self.unsupported.append(f"{' '.join(unfused + ['--no-rope-fusion'] * rope)} alone: backend.fusions "
                                        "false turns all of Megatron's fusions off")
            if permute:
                self.unsupported.append("--moe-permute-fusion with the other fusions off: backend.fusions false "
                                        "turns it off too")
        elif moe and not permute:
            self.notes.append("no --moe-permute-fusion in the script: the launch adds it with backend.fusions, "
                              "TE's fused token permutation as Megatron-Bridge's MoE recipes run it")
        return out

    def job(self) -> dict[str, Any]:
        """The spec's data and checkpoint keys."""
        f = self.f
        out: dict[str, Any] = {}
        tokenizer: dict[str, Any] = {}
        kind = f.text("--tokenizer-type")
        if kind in TOKENIZER_TYPES:
            tokenizer["type"] = kind
        elif kind is not None:
            self.lost("--tokenizer-type", f"not one of {', '.join(TOKENIZER_TYPES)}")
        for key, flag in (("model", "--tokenizer-model"), ("vocab_file", "--vocab-file"), ("merge_file", "--merge-file")):
            value = f.text(flag)
            if value is not None:
                tokenizer[key] = value
        if tokenizer.get("type") == "NullTokenizer" and len(tokenizer) == 1:
            tokenizer = {}
        paths = f.values("--data-path")
        data: dict[str, Any] = {}
        if paths:
            if len(paths) % 2 == 0 and all(is_number(w) for w in paths[::2]):
                data["blend"] = [[float(w), p] for w, p in zip(paths[::2], paths[1::2], strict=True)]
            else:
                data["paths"] = paths
            split = f.text("--split")
            if split is not None:
                data["split"] = split
            f.has("--mock-data")
        elif f.has("--mock-data"):
            if tokenizer:
                data["mock"] = True
        else:
            self.notes.append("no --data-path or --mock-data: imported as Megatron-LM's mock-data benchmark")
        if data:
            if tokenizer:
                data["tokenizer"] = tokenizer
            out["data"] = data
        elif tokenizer and tokenizer.get("type", "NullTokenizer") != "NullTokenizer":
            out["data"] = {"mock": True, "tokenizer": tokenizer}
        save, load = f.text("--save"), f.text("--load")
        checkpoint: dict[str, Any] = {}
        if save is not None:
            checkpoint["save"] = save
        if load is not None and load != save:
            checkpoint["load"] = load
        interval = f.integer("--save-interval")
        if interval is not None and save is not None:
            checkpoint["interval"] = interval
        if f.has("--no-load-optim"):
            checkpoint["load_optimizer"] = False
        if f.has("--no-load-rng"):
            checkpoint["load_rng"] = False
        if checkpoint:
            out["checkpoint"] = checkpoint
        f.has("--no-create-attention-mask-in-dataloader")
        return out
