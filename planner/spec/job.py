"""What a real training job reads, writes and where it runs: the spec's data, checkpoint and
launch keys (DESIGN.md "Spec YAML"). Every value here is user text that ends up in a script: the
render quotes each one (shlex.quote) and executes none; #SBATCH values, which sbatch parses
itself, are held to plain characters.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BeforeValidator, Field, model_validator

from megacpp.planner.spec.base import Frozen as _Frozen
from megacpp.planner.spec.base import number_from_yaml_text

TokenizerType = Literal["GPT2BPETokenizer", "SentencePieceTokenizer", "GPTSentencePieceTokenizer",
                        "HuggingFaceTokenizer", "Llama2Tokenizer", "TikTokenizer", "NullTokenizer"]
# the tokenizer files each type reads, and the ones it cannot do without (megatron/core/tokenizers/
# text/utils/build_tokenizer.py)
TOKENIZER_READS = {
    "GPT2BPETokenizer": ({"vocab_file", "merge_file"}, {"vocab_file", "merge_file"}),
    "HuggingFaceTokenizer": ({"model", "vocab_file", "merge_file"}, {"model"}),
    "NullTokenizer": (set(), set()),
    **{t: ({"model"}, {"model"}) for t in ("SentencePieceTokenizer", "GPTSentencePieceTokenizer",
                                            "Llama2Tokenizer", "TikTokenizer")},
}
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# What sbatch accepts in each #SBATCH value, without quoting: its own parser reads quotes,
# backslashes and `#`, and a newline would start a line of the script.
SLURM_VALUE = {
    "partition": re.compile(r"[A-Za-z0-9._-]+(,[A-Za-z0-9._-]+)*"),
    "account": re.compile(r"[A-Za-z0-9._-]+"),
    "qos": re.compile(r"[A-Za-z0-9._-]+(,[A-Za-z0-9._-]+)*"),
    "reservation": re.compile(r"[A-Za-z0-9._-]+(,[A-Za-z0-9._-]+)*"),
    "time": re.compile(r"\d+(-\d+)?(:\d+){0,2}|UNLIMITED|INFINITE|unlimited|infinite"),
    "constraint": re.compile(r"[A-Za-z0-9._&|,*\[\]()!:=-]+"),
    "nodelist": re.compile(r"[A-Za-z0-9._,\[\]-]+"),
    "exclude": re.compile(r"[A-Za-z0-9._,\[\]-]+"),
}


def _text_from_number(value: object) -> object:
    """An environment value or an extra argument written as a bare number (NCCL_IB_DISABLE: 1)."""
    return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def _quoted_time(value: object) -> object:
    if isinstance(value, int) and not isinstance(value, bool):
        raise ValueError(f"got the number {value}: YAML reads an unquoted 4:00:00 as 14400; quote the time, "
                         "e.g. time: \"04:00:00\"")
    return value


def _tuples(value: object) -> object:
    """YAML lists as tuples, which the frozen spec keeps."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def _no_nul(text: str) -> str:
    if "\x00" in text:
        raise ValueError("contains a NUL character, which no argument or variable can carry")
    return text


def _megatron_value(text: str) -> str:
    _no_nul(text)
    if text.startswith("-"):
        raise ValueError(f"{text[:60]!r} starts with '-', which Megatron-LM would read as a flag; write ./{text[:60]}")
    return text


Text = Annotated[str, BeforeValidator(_text_from_number), AfterValidator(_no_nul), Field(max_length=4096)]
PathText = Annotated[str, AfterValidator(_megatron_value), Field(min_length=1, max_length=4096)]
Weight = Annotated[float, BeforeValidator(number_from_yaml_text), Field(gt=0, le=1e12)]


class TokenizerSpec(_Frozen):
    """The tokenizer Megatron-LM builds (--tokenizer-type) and the files it reads."""

    type: TokenizerType = "NullTokenizer"  # NullTokenizer: pre-tokenized ids below model.vocab_size
    model: PathText | None = None  # --tokenizer-model: a SentencePiece/TikToken file, or a HuggingFace name or folder
    vocab_file: PathText | None = None
    merge_file: PathText | None = None

    @model_validator(mode="after")
    def _files_the_type_reads(self) -> TokenizerSpec:
        reads, needs = TOKENIZER_READS[self.type]
        given = {k for k in ("model", "vocab_file", "merge_file") if getattr(self, k) is not None}
        if needs - given:
            raise ValueError(f"a {self.type} needs {' and '.join(sorted(needs - given))}")
        if given - reads:
            raise ValueError(f"a {self.type} reads no {' or '.join(sorted(given - reads))}; drop it or change type")
        return self


class DataSpec(_Frozen):
    """What Megatron-LM trains on: Megatron indexed datasets (the prefix of each .bin/.idx pair),
    as a weighted blend or a list, split into train/validation/test, read with one tokenizer."""

    blend: Annotated[tuple[tuple[Weight, PathText], ...], BeforeValidator(_tuples), Field(min_length=1, max_length=100_000)] | None = None
    paths: Annotated[tuple[PathText, ...], BeforeValidator(_tuples), Field(min_length=1, max_length=100_000)] | None = None
    split: Annotated[str, Field(max_length=100)] = "99,1,0"
    tokenizer: TokenizerSpec = TokenizerSpec()
    mock: bool = False  # Megatron-LM's synthetic data with this tokenizer (a benchmark)

    @model_validator(mode="after")
    def _one_source(self) -> DataSpec:
        given = [k for k in ("blend", "paths") if getattr(self, k) is not None]
        if self.mock and given:
            raise ValueError(f"mock trains on synthetic tokens; drop {given[0]} or mock")
        if not self.mock and len(given) != 1:
            raise ValueError("needs blend ([[weight, prefix], ...]) or paths ([prefix, ...])"
                             if not given else "blend and paths both given; keep one")
        if not re.fullmatch(r"\d+(\.\d+)?([,/]\d+(\.\d+)?){0,2}", self.split) or not any(
                float(x) for x in re.split("[,/]", self.split)):
            raise ValueError(f"split {self.split[:40]!r} is not train,validation,test proportions such as \"98,1,1\"")
        return self


class CheckpointSpec(_Frozen):
    """Megatron-LM's checkpoints. A job loads from `save` when it holds a checkpoint (a restarted
    or requeued job continues where it stopped), else from `load`."""

    save: PathText | None = None
    load: PathText | None = None  # None: save
    interval: Annotated[int, Field(ge=1, le=1 << 40)] | None = None  # iterations; None: at the end only
    load_optimizer: bool = True  # false: --no-load-optim
    load_rng: bool = True  # false: --no-load-rng

    @model_validator(mode="after")
    def _somewhere(self) -> CheckpointSpec:
        if self.save is None and self.load is None:
            raise ValueError("needs save, load or both")
        if self.interval is not None and self.save is None:
            raise ValueError(f"interval={self.interval} saves to checkpoint.save, which is not set")
        return self


class SlurmSpec(_Frozen):
    """#SBATCH settings of the job, and the pyxis container its srun runs in."""

    partition: str | None = None
    account: str | None = None
    time: Annotated[str, BeforeValidator(_quoted_time)] | None = None  # minutes, or [D-]HH:MM:SS
    qos: str | None = None
    reservation: str | None = None
    constraint: str | None = None
    nodelist: str | None = None
    exclude: str | None = None
    container_image: Annotated[str, AfterValidator(_no_nul), Field(min_length=1, max_length=4096)] | None = None
    container_mounts: Annotated[list[Annotated[str, AfterValidator(_no_nul), Field(min_length=1, max_length=4096)]],
                                Field(max_length=1000)] = []
    container_workdir: Annotated[str, AfterValidator(_no_nul), Field(min_length=1, max_length=4096)] | None = None

    @model_validator(mode="after")
    def _plain_sbatch_values(self) -> SlurmSpec:
        for key, allowed in SLURM_VALUE.items():
            value = getattr(self, key)
            if value is not None and (len(value) > 1000 or not allowed.fullmatch(value)):
                raise ValueError(f"{key}: {value[:60]!r} is not a Slurm {key} "
                                 "(letters, digits and . _ - , only; no spaces, quotes or #)")
        for mount in self.container_mounts:
            if "," in mount:
                raise ValueError(f"container_mounts: {mount[:60]!r} holds a comma; give each "
                                 "SRC:DST[:FLAGS] as its own list item")
        if (self.container_mounts or self.container_workdir) and self.container_image is None:
            raise ValueError("container_mounts and container_workdir need container_image")
        return self


class LaunchSpec(_Frozen):
    """How the job is started: more Megatron-LM flags, its environment, and Slurm's settings."""

    # appended to the Megatron-LM command after megacpp's own flags; each flag is checked against
    # the dialect's parser, and one that restates what the spec decides is refused
    extra_args: Annotated[list[Text], Field(max_length=1000)] = []
    env: Annotated[dict[str, Text], Field(max_length=1000)] = {}
    slurm: SlurmSpec = SlurmSpec()

    @model_validator(mode="after")
    def _args_and_names(self) -> LaunchSpec:
        args = self.extra_args
        if args and not args[0].startswith("--"):
            raise ValueError(f"extra_args must start with a --flag, not {args[0][:60]!r}")
        if "--" in args:
            raise ValueError("extra_args: a bare '--' would end Megatron-LM's options; drop it")
        for name in self.env:
            if not ENV_NAME.fullmatch(name):
                raise ValueError(f"env: {name[:60]!r} is not an environment variable name "
                                 "(letters, digits and _, not starting with a digit)")
        return self
