"""An existing Megatron-LM launch read back into a megacpp spec with its layout pinned.

The reverse of args.py and job_args.py: each flag megacpp renders maps back onto the spec key it
came from, the flags a spec has no key for but a launch may carry go to `launch.extra_args`, and
every other flag is listed as not represented (with why), never dropped. Megatron-LM's own
defaults stand where the script leaves a flag out (LayerNorm, learned positions, tied embeddings,
a linear decay to 0), so the spec describes the job the script runs.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from megacpp.planner.errors import SpecError
from megacpp.planner.megatron.args import MOE_AUX_LOSS_COEFF, known_flags
from megacpp.planner.megatron.import_launch import cluster_keys, launch_keys
from megacpp.planner.megatron.job_args import PLAN_FLAGS, RESTATABLE, SPEC_KEY_FLAGS
from megacpp.planner.megatron.layers import compact_pattern, hybrid_letters, moe_layer_flags, pipeline_layout
from megacpp.planner.megatron.script import LaunchCommand, from_arguments, read_script
from megacpp.planner.spec.loading import apply_override, one_line, spec_from_dict
from megacpp.planner.spec.models import Spec

DIALECTS = ("core_v0.16", "main")
# Flags of model features megacpp does not model yet: carried as extra arguments they would
# launch a model the plan does not describe, so they are listed instead.
UNMODELLED = {
    "--multi-latent-attention": "multi-latent attention (MLA)", "--q-lora-rank": "MLA", "--kv-lora-rank": "MLA",
    "--qk-head-dim": "MLA", "--qk-pos-emb-head-dim": "MLA", "--v-head-dim": "MLA",
    "--mtp-num-layers": "multi-token prediction (MTP)", "--mtp-loss-scaling-factor": "MTP",
    "--mtp-use-repeated-layer": "MTP", "--mtp-hybrid-override-pattern": "MTP",
    "--window-size": "sliding-window attention", "--window-attn-skip-freq": "sliding-window attention",
    "--moe-latent-size": "latent MoE", "--add-qkv-bias": "attention biases", "--qk-layernorm": "QK layernorm",
    "--squared-relu": "a squared-ReLU MLP", "--quick-geglu": "a quick-GeGLU MLP", "--fp4-format": "FP4 training",
    "--hybrid-attention-ratio": "a hybrid pattern by ratio", "--hybrid-mlp-ratio": "a hybrid pattern by ratio",
    "--num-experts-per-token": "MoE routing", "--moe-layer-recompute": "MoE layer recompute",
}
# What megacpp renders on every launch, with the value it renders (args.py): the same value is
# the spec's; another cannot be expressed.
FIXED = {"--hidden-dropout": "0", "--attention-dropout": "0", "--moe-router-dtype": "fp32",
         "--moe-aux-loss-coeff": f"{MOE_AUX_LOSS_COEFF:g}", "--max-position-embeddings": None}
# The Megatron-LM default of each schedule and logging flag a script may leave out, where it
# differs from the spec's (megatron/training/arguments.py)
MEGATRON_SCHEDULE_DEFAULTS = {"lr_decay_style": "linear", "min_lr": 0.0, "weight_decay": 0.01,
                              "log_interval": 100, "eval_iters": 100, "eval_interval": 1000}
TOKENIZER_TYPES = ("GPT2BPETokenizer", "SentencePieceTokenizer", "GPTSentencePieceTokenizer", "HuggingFaceTokenizer",
                   "Llama2Tokenizer", "TikTokenizer", "NullTokenizer")
GPT2_VOCAB = 50257  # GPT2BPETokenizer's vocabulary (megatron/core/tokenizers, gpt2 vocab.json)
RECOMPUTE_DEFAULTS = ("uniform", 1)  # what args.py renders for a full recompute without method and count


@dataclass
class Imported:
    """The spec read from a launch, what it could not represent, and what else it noticed."""

    spec: Spec
    document: dict[str, Any]
    unsupported: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_yaml(self, source: str) -> str:
        """The spec YAML, headed by a comment block naming the source and every flag left out."""
        head = [f"# imported by `megacpp import` from {one_line(source, 120)}"]
        if self.unsupported:
            head.append("# not represented in this spec (the imported job set them; megacpp plans without them):")
            head += [f"#   {one_line(u, 200)}" for u in self.unsupported]
        head += [f"# note: {one_line(n, 200)}" for n in self.notes]
        return "\n".join([*head, *(line for key, value in self.document.items() for line in _section(key, value))]) + "\n"


def _flow(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=1 << 30, allow_unicode=True).removesuffix("\n...\n").strip()


def _section(key: str, value: Any) -> list[str]:
    """A top-level key in block style, each of its keys on one line (a sub-mapping in flow style)."""
    if not isinstance(value, dict):
        return [f"{key}: {_flow(value)}"]
    lines = [f"{key}:"]
    for child, inner in value.items():
        if isinstance(inner, dict) and any(isinstance(v, (dict, list)) for v in inner.values()):
            lines += ["  " + line for line in _section(child, inner)]
        else:
            lines.append(f"  {child}: {_flow(inner)}")
    return lines


class Flags:
    """The script's Megatron-LM flags, each `--flag value...` group once (the last one given, as
    argparse keeps it), and which of them the spec has taken."""

    def __init__(self, args: list[str]) -> None:
        self.groups: dict[str, list[str]] = {}  # in the order given, a repeated flag where it was given last
        last: list[str] | None = None
        for token in args:
            if token.startswith("--") and not re.fullmatch(r"--?\d.*", token):
                flag, eq, value = token.partition("=")
                self.groups.pop(flag, None)
                last = self.groups[flag] = [value] if eq else []
            elif last is not None:
                last.append(token)
            else:
                raise SpecError(f"{token[:60]!r} comes before any --flag; pass Megatron-LM's arguments")
        self.taken: set[str] = set()

    def has(self, flag: str) -> bool:
        if flag in self.groups:
            self.taken.add(flag)
            return True
        return False

    def values(self, flag: str) -> list[str] | None:
        return self.groups[flag] if self.has(flag) else None

    def text(self, flag: str) -> str | None:
        values = self.values(flag)
        if values is None:
            return None
        if len(values) != 1:
            raise SpecError(f"{flag}: expected one value, got {len(values)} ({' '.join(values)[:60]!r})")
        return values[0]

    def integer(self, flag: str) -> int | None:
        value = self.text(flag)
        if value is None:
            return None
        if not re.fullmatch(r"\d{1,18}", value):
            raise SpecError(f"{flag} {value[:60]!r}: not a whole number{_unresolved(value)}")
        return int(value)

    def number(self, flag: str) -> float | None:
        value = self.text(flag)
        if value is None:
            return None
        try:
            number = float(value)
        except ValueError:
            raise SpecError(f"{flag} {value[:60]!r}: not a number{_unresolved(value)}") from None
        if not math.isfinite(number):
            raise SpecError(f"{flag} {value[:60]!r}: not a finite number")
        return number

    @property
    def order(self) -> list[str]:
        return list(self.groups)

    def left(self) -> list[str]:
        return [f for f in self.groups if f not in self.taken]


def _unresolved(value: str) -> str:
    names = re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", value)
    return f" (the script never assigns {names[0]}; set it in the script or pass --set)" if names else ""


@dataclass
class ImportOptions:
    dialect: str | None = None  # None: from the entry point, else the dialect whose parser knows every flag
    cluster: str | None = None  # a preset (cluster.preset)
    nodes: int | None = None
    name: str | None = None  # the spec's name when the script names none
    overrides: list[str] = field(default_factory=list)  # --set key=value, applied last


def _dialect(cmd: LaunchCommand, flags: Flags, chosen: str | None) -> str:
    if chosen is not None:
        if chosen not in DIALECTS:
            raise SpecError(f"--megatron {chosen!r}: choose one of {', '.join(DIALECTS)}")
        return chosen
    if cmd.entry_point == "pretrain_hybrid.py":
        return "main"
    if cmd.entry_point == "pretrain_mamba.py":
        return "core_v0.16"
    given = set(flags.order)
    if given <= known_flags("core_v0.16") or not given <= known_flags("main"):
        return "core_v0.16"
    return "main"


def import_launch(source: str | list[str], opts: ImportOptions, fallback_name: str = "imported") -> Imported:
    """A launch script's text, or Megatron-LM's argument list, read into a spec."""
    cmd = read_script(source) if isinstance(source, str) else from_arguments(source)
    try:
        return import_command(cmd, opts, cmd.name or fallback_name)
    except RecursionError:
        raise SpecError("nested too deeply") from None


def import_command(cmd: LaunchCommand, opts: ImportOptions, script_name: str | None = None) -> Imported:
    """The spec a Megatron-LM launch describes (layout pinned), and the flags it cannot carry."""
    flags = Flags(cmd.args)
    dialect = _dialect(cmd, flags, opts.dialect)
    unsupported: list[str] = []
    notes: list[str] = list(cmd.notes)
    reader = _Reader(flags, dialect, unsupported, notes)
    model, layout, pipeline = reader.model(cmd.entry_point)
    cluster = cluster_keys(cmd, opts.cluster, opts.nodes, notes)
    world = cluster_world(cluster)
    parallel = reader.parallel(layout, world)
    doc: dict[str, Any] = {
        "name": opts.name or script_name or "imported",
        "model": model,
        "training": reader.training(parallel),
        "cluster": cluster,
        "backend": reader.backend(dialect),
        "parallel": parallel,
    }
    doc.update(reader.job())
    extra = reader.leftovers()
    launch = launch_keys(cmd, extra, notes, unsupported)
    if launch:
        doc["launch"] = launch
    for item in opts.overrides:
        apply_override(doc, item)
    spec = _validated(doc)
    spec, doc = _pin_uneven_split(spec, doc, pipeline, opts.overrides)
    return Imported(spec=spec, document=doc, unsupported=unsupported, notes=notes)


def cluster_world(cluster: dict[str, Any]) -> int | None:
    from megacpp.planner.spec.clusters import PRESETS

    gpus = cluster.get("gpus_per_node") or PRESETS.get(cluster.get("preset") or "", {}).get("gpus_per_node")
    return gpus * cluster.get("nodes", 1) if gpus else None


def _validated(doc: dict[str, Any]) -> Spec:
    try:
        return spec_from_dict(doc, source="the imported spec")
    except SpecError as exc:
        raise SpecError(f"{exc} (fix the script, or pass --set KEY=VALUE)") from None


def _pin_uneven_split(spec: Spec, doc: dict[str, Any], pipeline: list[int] | None, overrides: list[str]) -> tuple[Spec, dict[str, Any]]:
    """Pin the script's stage split with `|` cuts where megacpp would split the pinned layout
    otherwise (an even split, or the one the plan picks itself, needs none)."""
    from megacpp.planner.plan import make_context
    from megacpp.planner.search.stages import choose_split
    from megacpp.planner.spec.clusters import resolve_cluster
    from megacpp.planner.spec.models import ClusterSpec

    pins = spec.parallel
    if pipeline is None or len(pipeline) < 2 or pins.pp is None or any(o.startswith("model.pattern") for o in overrides):
        return spec, doc
    try:
        ctx = make_context(spec)
    except SpecError:  # an inline cluster without compute numbers: the split needs only FLOPs
        ctx = make_context(spec, resolve_cluster(ClusterSpec(preset="h100-sxm-8", nodes=spec.cluster.nodes)))
    if sum(pipeline) != ctx.num_layers:
        raise SpecError(f"the script's pipeline stages hold {sum(pipeline)} layers, the model has {ctx.num_layers}")
    if list(choose_split(ctx, pins.pp, pins.vpp or 1).sizes) == pipeline:
        return spec, doc
    step = 2 if ctx.plain_transformer else 1
    cuts, at = [], 0
    for size in pipeline[:-1]:
        at += size * step
        cuts.append(at)
    model = {**doc["model"], "pattern": compact_pattern(spec.pattern.blocks, cuts)}
    doc = {**doc, "model": model}
    return _validated(doc), doc


class _Reader:
    """Reads the flags group by group into spec keys, noting what it cannot represent."""

    def __init__(self, flags: Flags, dialect: str, unsupported: list[str], notes: list[str]) -> None:
        self.f, self.dialect, self.unsupported, self.notes = flags, dialect, unsupported, notes
        self.te = True
        self.has_moe = False

    def lost(self, flag: str, why: str) -> None:
        values = self.f.groups.get(flag, [])
        self.f.taken.add(flag)
        self.unsupported.append(f"{' '.join([flag, *values])[:120]}: {why}")

    # ---- model ----

    def model(self, entry_point: str) -> tuple[dict[str, Any], dict[str, int], list[int] | None]:
        f = self.f
        hidden = f.integer("--hidden-size")
        if hidden is None:
            raise SpecError("no --hidden-size: the script does not say the model's width")
        experts = f.integer("--num-experts")
        self.has_moe = experts is not None
        pattern, pipeline, layout = self._pattern(entry_point)
        letters = set(pattern.replace("|", ""))
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
        if not f.has("--disable-bias-linear"):
            self.unsupported.append("linear biases (Megatron's default without --disable-bias-linear): the spec plans none")
        if f.has("--add-bias-linear"):
            self.lost("--add-bias-linear", "the spec plans linear layers without bias")
        gated = f.has("--swiglu")
        ffn = f.integer("--ffn-hidden-size")
        if ffn is None:  # Megatron-LM's default (arguments.py: 4h, or 2/3 of it rounded to 64 with SwiGLU)
            ffn = int(4 * hidden * 2 / 3 / 64) * 64 if gated else 4 * hidden
        if "A" in letters:
            heads = f.integer("--num-attention-heads")
            if heads is None:
                raise SpecError("no --num-attention-heads for the attention layers")
            attention: dict[str, Any] = {"num_heads": heads}
            groups = f.integer("--num-query-groups")
            if f.has("--group-query-attention") and groups is not None:
                attention["num_query_groups"] = groups
            kv = f.integer("--kv-channels")
            if kv is not None:
                attention["head_dim"] = kv
            model["attention"] = attention
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
        model["pattern"] = pattern
        return model, layout, pipeline

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
        if layout_text is not None:
            sizes, odd = pipeline_layout(layout_text)
            vpp = len(sizes) // pp
            if odd:
                own_split = 0 in sizes
                why = "megacpp's own split of the decoder layers" if own_split else "the decoder layers' split"
                self.lost("--pipeline-model-parallel-layout", "MTP layers or the embedding/loss off the first/last "
                          f"stage are not modelled; planned with {why}")
            if own_split:
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
        if sizes is None and chunks > 1 and not own_split:
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
        dispatcher = f.text("--moe-token-dispatcher-type") or "allgather"  # Megatron-LM's default
        moe["dispatcher"] = dispatcher
        backend = f.text("--moe-flex-dispatcher-backend")
        if dispatcher == "flex" and backend is not None:
            moe["flex_backend"] = backend
        elif backend is not None:
            self.f.taken.discard("--moe-flex-dispatcher-backend")
        if f.has("--overlap-moe-expert-parallel-comm"):
            moe["overlap_communication"] = True
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
        # without the flag Megatron-LM sets ETP to TP (arguments.py)
        pins.update(ep=ep, etp=(etp if etp is not None else tp) if self.has_moe else 1)
        pins["sp"] = f.has("--sequence-parallel") and tp > 1
        return pins

    # ---- training ----

    def training(self, pins: dict[str, Any]) -> dict[str, Any]:
        f = self.f
        seq = f.integer("--seq-length")
        if seq is None:
            raise SpecError("no --seq-length: the script does not say the sequence length")
        positions = f.integer("--max-position-embeddings")
        if positions is not None and positions < seq:
            self.unsupported.append(f"--max-position-embeddings {positions}: below --seq-length {seq}")
        mbs = f.integer("--micro-batch-size") or 1
        gbs = f.integer("--global-batch-size")
        if gbs is None:  # Megatron-LM: one micro-batch per data-parallel rank
            gbs = mbs * pins.get("dp", 1)
        training: dict[str, Any] = {"seq_length": seq, "global_batch_size": gbs, "micro_batch_size": mbs}
        if f.has("--fp8-format"):
            training["precision"] = "fp8"
            if f.groups["--fp8-format"] != ["hybrid"]:
                self.unsupported.append(f"--fp8-format {' '.join(f.groups['--fp8-format'])}: megacpp renders hybrid")
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
        if not f.has("--use-distributed-optimizer"):
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
        if impl == "full_iteration" or (impl == "local" and scope == ["full_iteration"]):
            return {"cuda_graphs": "full_iteration"}
        if impl == "local" and not scope:
            f.has("--moe-pad-experts-for-cuda-graph-inference")
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
                          ("clip_grad", "--clip-grad")):
            value = f.number(flag)
            if value is not None:
                out[key] = value
        for key, flag in (("warmup_iters", "--lr-warmup-iters"), ("lr_decay_iters", "--lr-decay-iters"),
                          ("log_interval", "--log-interval"), ("eval_iters", "--eval-iters"),
                          ("eval_interval", "--eval-interval")):
            value = f.integer(flag)
            if value is not None:
                out[key] = value
        style = f.text("--lr-decay-style")
        if style in ("constant", "linear", "cosine", "inverse-square-root"):
            out["lr_decay_style"] = style
        elif style is not None:
            self.lost("--lr-decay-style", f"{style} is not a spec decay style")
        if "lr" not in out:
            self.notes.append("no --lr in the script: the spec's default training.lr 0.0003 stands")
        if out.get("warmup_iters") == 0:
            del out["warmup_iters"]
        return out

    # ---- backend, data, checkpoint ----

    def backend(self, dialect: str) -> dict[str, Any]:
        f = self.f
        impl = f.text("--transformer-impl") or "transformer_engine"
        self.te = impl == "transformer_engine"
        if impl not in ("transformer_engine", "local"):
            self.lost("--transformer-impl", "neither transformer_engine nor local")
        unfused = [flag for flag in ("--no-bias-swiglu-fusion", "--no-bias-dropout-fusion") if f.has(flag)]
        rope = f.has("--no-rope-fusion")
        if not self.te:  # megacpp renders these for every local launch (args.py)
            for flag in ("--no-persist-layer-norm", "--no-gradient-accumulation-fusion", "--no-masked-softmax-fusion",
                         "--attention-softmax-in-fp32"):
                f.has(flag)
        else:
            f.has("--no-gradient-accumulation-fusion")  # the script's Apex probe adds it where Apex is missing
        out: dict[str, Any] = {"transformer_engine": self.te, "megatron": dialect}
        if unfused or (rope and self.te):
            out["fusions"] = False
            if len(unfused) < 2:
                self.unsupported.append(f"{' '.join(unfused + ['--no-rope-fusion'] * rope)} alone: backend.fusions "
                                        "false turns all of Megatron's fusions off")
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
            if len(paths) % 2 == 0 and all(_is_number(w) for w in paths[::2]):
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

    def leftovers(self) -> list[str]:
        """The fixed flags megacpp renders checked against the script's values; every flag left
        goes to launch.extra_args where a launch can carry it, or is listed."""
        f = self.f
        for flag, value in FIXED.items():
            values = f.values(flag)
            if values is None or value is None:
                continue
            same = len(values) == 1 and (values[0] == value or (_is_number(values[0]) and _is_number(value)
                                                                and float(values[0]) == float(value)))
            if not same:
                self.lost(flag, f"megacpp launches with {flag} {value}")
        for flag in ("--hidden-dropout", "--attention-dropout"):
            if flag not in f.groups:
                self.unsupported.append(f"{flag} 0.1 (Megatron's default; the script sets none): megacpp launches without dropout")
        extra: list[str] = []
        known = known_flags(self.dialect)
        for flag in f.left():
            if flag not in known:
                self.lost(flag, f"unknown to Megatron-LM {self.dialect}'s argument parser")
            elif flag in UNMODELLED:
                self.lost(flag, f"{UNMODELLED[flag]} is not modelled yet")
            elif flag in SPEC_KEY_FLAGS or flag in RESTATABLE:
                self.lost(flag, f"megacpp renders it from {SPEC_KEY_FLAGS.get(flag, 'training')}, which cannot say this")
            elif flag in PLAN_FLAGS or flag in FIXED or _negated(flag) in PLAN_FLAGS:
                self.lost(flag, "it shapes the planned model or layout, and the spec has no key for it")
            else:
                extra += [flag, *f.groups[flag]]
                f.taken.add(flag)
        return extra


def _negated(flag: str) -> str:
    return "--" + flag[len("--no-"):] if flag.startswith("--no-") else flag


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False
