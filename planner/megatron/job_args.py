"""The Megatron-LM flags of the job around the plan: data and tokenizer, the learning-rate
schedule, logging, checkpoints, and the user's extra flags (the spec's data, checkpoint, training
schedule and launch keys). args.py places them in the command; every value is user text that the
render quotes.
"""

from __future__ import annotations

import re

from megacpp.planner.errors import LaunchError, did_you_mean
from megacpp.planner.search.layout import Context
from megacpp.planner.spec.job import TokenizerSpec
from megacpp.planner.spec.models import Spec
from megacpp.planner.spec.schedule import Schedule
from megacpp.planner.spec.training import TrainingSpec


class ShellWord(str):
    """A word the render writes into the script as it is: a variable of megacpp's own script,
    never text from a spec (every other word is shell-quoted)."""


# the --load of a job whose save and load folders differ: the script sets it (render.py)
LOAD_VARIABLE = "MEGACPP_LOAD"
LOAD_FROM_SCRIPT = ShellWord(f'"${LOAD_VARIABLE}"')
# the file Megatron-LM writes into a checkpoint folder after each save (checkpointing.py
# get_checkpoint_tracker_filename): its presence means the folder holds a checkpoint
CHECKPOINT_TRACKER = "latest_checkpointed_iteration.txt"

# Flags that shape what the plan priced (layout, model, batch, precision, memory features): an
# extra arg may not set them, even where this plan does not render them, since the plan would no
# longer describe the job. Flags rendered for the plan at hand are refused as well.
PLAN_FLAGS = frozenset({
    "--tensor-model-parallel-size", "--pipeline-model-parallel-size", "--context-parallel-size",
    "--expert-model-parallel-size", "--expert-tensor-parallel-size", "--sequence-parallel",
    "--num-virtual-stages-per-pipeline-rank", "--num-layers-per-virtual-pipeline-stage",
    "--pipeline-model-parallel-layout", "--decoder-first-pipeline-num-layers", "--decoder-last-pipeline-num-layers",
    "--account-for-embedding-in-pipeline-split", "--account-for-loss-in-pipeline-split",
    "--num-layers", "--hybrid-override-pattern", "--hybrid-layer-pattern", "--is-hybrid-model", "--spec",
    "--hidden-size", "--ffn-hidden-size", "--num-attention-heads", "--num-query-groups", "--group-query-attention",
    "--kv-channels", "--seq-length", "--max-position-embeddings", "--swiglu", "--normalization",
    "--position-embedding-type", "--no-position-embedding", "--untie-embeddings-and-output-weights", "--disable-bias-linear", "--add-bias-linear",
    "--hidden-dropout", "--attention-dropout",
    "--num-experts", "--moe-router-topk", "--moe-ffn-hidden-size", "--moe-shared-expert-intermediate-size",
    "--moe-expert-capacity-factor", "--moe-pad-expert-input-to-capacity", "--moe-token-dispatcher-type", "--moe-layer-freq",
    "--mamba-num-heads", "--mamba-head-dim", "--mamba-state-dim", "--mamba-num-groups",
    "--micro-batch-size", "--global-batch-size", "--rampup-batch-size", "--bf16", "--fp16", "--fp8-format",
    "--recompute-granularity", "--recompute-method", "--recompute-num-layers", "--recompute-modules",
    "--use-distributed-optimizer", "--transformer-impl", "--cuda-graph-impl", "--cuda-graph-scope",
    "--fine-grained-activation-offloading", "--offload-modules", "--use-precision-aware-optimizer",
    "--exp-avg-dtype", "--exp-avg-sq-dtype", "--main-params-dtype", "--grad-reduce-in-bf16", "--tp-comm-overlap",
    "--overlap-moe-expert-parallel-comm", "--fp8-recipe", "--fp4-format", "--fp4-recipe", "--use-megatron-fsdp",
    "--data-parallel-sharding-strategy", "--use-torch-fsdp2",
})

# Flags megacpp renders from a spec key (or that would override one): refused, naming the key.
SPEC_KEY_FLAGS = {
    "--train-iters": "training.train_iters or train_tokens", "--train-samples": "training.train_iters or train_tokens",
    "--lr": "training.lr", "--decoupled-lr": "training.lr", "--min-lr": "training.min_lr",
    "--lr-warmup-iters": "training.warmup_iters", "--lr-warmup-samples": "training.warmup_iters",
    "--lr-warmup-fraction": "training.warmup_iters", "--lr-warmup-init": "training.warmup_iters", "--warmup": "training.warmup_iters",
    "--lr-decay-style": "training.lr_decay_style", "--lr-decay-iters": "training.lr_decay_iters",
    "--lr-decay-samples": "training.lr_decay_iters",
    "--weight-decay": "training.weight_decay", "--start-weight-decay": "training.weight_decay",
    "--end-weight-decay": "training.weight_decay", "--weight-decay-incr-style": "training.weight_decay",
    "--clip-grad": "training.clip_grad",
    "--lr-wsd-decay-style": "training.lr_wsd_decay_style", "--lr-wsd-decay-iters": "training.lr_wsd_decay_iters",
    "--lr-wsd-decay-samples": "training.lr_wsd_decay_iters",
    "--adam-beta1": "training.adam_beta1", "--adam-beta2": "training.adam_beta2", "--adam-eps": "training.adam_eps",
    "--data-path": "data.blend or data.paths", "--train-data-path": "data.blend or data.paths",
    "--valid-data-path": "data.blend or data.paths", "--test-data-path": "data.blend or data.paths",
    "--data-args-path": "data.blend or data.paths", "--per-split-data-args-path": "data.blend or data.paths",
    "--mock-data": "data (leave it out, or data.mock: true)", "--split": "data.split",
    "--tokenizer-type": "data.tokenizer.type", "--tokenizer-model": "data.tokenizer.model",
    "--vocab-file": "data.tokenizer.vocab_file", "--merge-file": "data.tokenizer.merge_file",
    "--vocab-size": "model.vocab_size",
    "--save": "checkpoint.save", "--load": "checkpoint.load", "--save-interval": "checkpoint.interval",
    "--persistent-save-interval": "checkpoint.interval", "--no-load-optim": "checkpoint.load_optimizer",
    "--no-load-rng": "checkpoint.load_rng",
    "--no-bias-swiglu-fusion": "backend.fusions", "--no-bias-dropout-fusion": "backend.fusions",
    "--no-rope-fusion": "backend.fusions",
}

# Megatron-LM's logging and evaluation: an extra arg may restate one (it then replaces megacpp's),
# unless the spec sets the key too.
RESTATABLE = {"--log-interval": "log_interval", "--eval-interval": "eval_interval", "--eval-iters": "eval_iters"}


def _number(x: float) -> str:
    return repr(float(x))  # exact, and as the spec wrote it: 0.0003, 3e-05, 1.0


def data_flags(spec: Spec) -> list[str]:
    """Tokenizer, vocabulary and data: --mock-data with Megatron's null tokenizer without a
    `data` block (the benchmark), else the blend or paths, their split and the tokenizer's files."""
    data = spec.data
    tok = data.tokenizer if data is not None else TokenizerSpec()
    a = ["--tokenizer-type", tok.type]
    for key, flag in (("model", "--tokenizer-model"), ("vocab_file", "--vocab-file"), ("merge_file", "--merge-file")):
        value = getattr(tok, key)
        if value is not None:
            a += [flag, value]
    a += ["--vocab-size", str(spec.model.vocab_size)]
    if data is None or data.mock:
        return [*a, "--mock-data"]
    prefixes = [x for weight, prefix in data.blend for x in (_number(weight), prefix)] if data.blend else list(data.paths or ())
    return [*a, "--data-path", *prefixes, "--split", data.split]


def schedule_flags(training: TrainingSpec, sched: Schedule) -> list[str]:
    """The run's length, its learning-rate schedule, and Megatron-LM's logging and evaluation."""
    a = ["--train-iters", str(sched.iters), "--lr", _number(sched.lr), "--min-lr", _number(sched.min_lr),
         "--lr-decay-style", sched.decay_style]
    if sched.warmup_iters:
        a += ["--lr-warmup-iters", str(sched.warmup_iters)]
    if sched.decay_iters != sched.iters:  # a short run of a longer schedule
        a += ["--lr-decay-iters", str(sched.decay_iters)]
    if sched.wsd_decay_iters is not None:
        a += ["--lr-wsd-decay-style", str(sched.wsd_decay_style), "--lr-wsd-decay-iters", str(sched.wsd_decay_iters)]
    # Adam's, always: Megatron-LM's own beta2 default (0.999) is not what the runtime worker trains with
    a += ["--adam-beta1", _number(sched.adam_beta1), "--adam-beta2", _number(sched.adam_beta2), "--adam-eps", _number(sched.adam_eps)]
    return [*a, "--weight-decay", _number(sched.weight_decay), "--clip-grad", _number(sched.clip_grad),
            "--log-interval", str(training.log_interval), "--eval-iters", str(training.eval_iters),
            "--eval-interval", str(training.eval_interval or sched.iters)]


def resumes_from_save(spec: Spec) -> bool:
    """Whether the script must pick --load: save and load are different folders."""
    ckpt = spec.checkpoint
    return ckpt is not None and ckpt.save is not None and ckpt.load is not None and ckpt.load != ckpt.save


def checkpoint_flags(spec: Spec) -> list[str]:
    """--save/--save-interval and --load. Without a load folder the job loads from its save
    folder, so a restarted or requeued job continues from its last checkpoint (Megatron-LM starts
    from scratch when the folder holds none); with both, the script chooses (render.py)."""
    ckpt = spec.checkpoint
    if ckpt is None:
        return []
    a: list[str] = []
    if ckpt.save is not None:
        a += ["--save", ckpt.save]
        if ckpt.interval is not None:
            a += ["--save-interval", str(ckpt.interval)]
    a += ["--load", LOAD_FROM_SCRIPT if resumes_from_save(spec) else (ckpt.load or ckpt.save or "")]
    if not ckpt.load_optimizer:
        a.append("--no-load-optim")
    if not ckpt.load_rng:
        a.append("--no-load-rng")
    return a


def _groups(args: list[str]) -> list[list[str]]:
    """`--flag value...` groups, in order."""
    groups: list[list[str]] = []
    for tok in args:
        if tok.startswith("--") or not groups:
            groups.append([tok])
        else:
            groups[-1].append(tok)
    return groups


def _flag(token: str) -> str:
    return token.split("=", 1)[0]


def extra_arg_problems(ctx: Context, rendered: list[str], known: frozenset[str]) -> list[str]:
    """Every reason the spec's launch.extra_args cannot follow `rendered` (megacpp's own flags):
    a flag unknown to the dialect's parser, given twice, or one megacpp sets from the plan or a spec key."""
    training = ctx.spec.training
    ours = {_flag(g[0]) for g in _groups(rendered)}
    seen: set[str] = set()
    problems = []
    for group in _groups(list(ctx.spec.launch.extra_args)):
        flag = _flag(group[0])
        where = f"launch.extra_args: {flag[:80]}"
        if flag not in known:
            problems.append(f"{where} is not a flag of Megatron-LM {ctx.dialect}{did_you_mean(flag, known)}")
        elif flag in seen:
            problems.append(f"{where} is given twice; keep one")
        elif flag in SPEC_KEY_FLAGS:
            problems.append(f"{where} is set from {SPEC_KEY_FLAGS[flag]} in the spec; set it there")
        elif flag in RESTATABLE:
            key = RESTATABLE[flag]
            if getattr(training, key) != TrainingSpec.model_fields[key].default:
                problems.append(f"{where} restates training.{key}={getattr(training, key)}; keep one of them")
        else:
            positive = "--" + flag[len("--no-"):] if flag.startswith("--no-") else flag
            if flag in ours or flag in PLAN_FLAGS or positive in ours or positive in PLAN_FLAGS:
                problems.append(f"{where} would change what megacpp renders from the plan (its layout, model, batch "
                                "and precision); change the spec instead (parallel: pins the layout)")
        seen.add(flag)
    return problems


# what a shell would read as code or a line break: the scripts quote every word, so such text reaches
# Megatron-LM literally, but in a flag's value it is more likely an attempt or a mistake than meant
SHELL_SYNTAX = re.compile(r"[\x00-\x1f\x7f`;&|<>]|\$[({A-Za-z_]")


def extra_arg_warnings(spec: Spec) -> list[str]:
    """Values of launch.extra_args that hold shell syntax or control characters."""
    return [f"launch.extra_args: {word[:60]!r} holds shell syntax or a control character; the scripts quote it, "
            "so Megatron-LM receives it literally and nothing runs; check it is meant"
            for word in spec.launch.extra_args if SHELL_SYNTAX.search(word)]


def with_extra_args(ctx: Context, rendered: list[str], known: frozenset[str]) -> list[str]:
    """`rendered` followed by the spec's launch.extra_args, each flag checked: known to the
    dialect's parser, given once, and not one megacpp sets from the plan or a spec key."""
    extra = ctx.spec.launch.extra_args
    if not extra:
        return rendered
    problems = extra_arg_problems(ctx, rendered, known)
    if problems:
        raise LaunchError(problems[0])
    replaced = {_flag(g[0]) for g in _groups(list(extra))} & set(RESTATABLE)
    kept = [tok for g in _groups(rendered) if _flag(g[0]) not in replaced for tok in g]
    return [*kept, *extra]
