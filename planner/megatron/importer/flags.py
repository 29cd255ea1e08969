"""The flags of an imported Megatron-LM command, and the base of the readers that turn them into
spec keys: each `--flag value...` group is taken by the key it maps onto, carried as an extra
argument where a launch can carry it, or listed as not represented, never dropped.
"""

from __future__ import annotations

import math
import re

from megacpp.planner.errors import SpecError
from megacpp.planner.megatron.args import MOE_AUX_LOSS_COEFF, known_flags
from megacpp.planner.megatron.job_args import PLAN_FLAGS, RESTATABLE, SPEC_KEY_FLAGS

# Flags of model features megacpp does not model yet: carried as extra arguments they would
# launch a model the plan does not describe, so they are listed instead.
UNMODELLED = {
    "--mtp-loss-scaling-factor": "MTP's loss scale",
    "--add-qkv-bias": "attention biases",
    "--squared-relu": "a squared-ReLU MLP", "--quick-geglu": "a quick-GeGLU MLP", "--fp4-format": "FP4 training",
    "--hybrid-attention-ratio": "a hybrid pattern by ratio", "--hybrid-mlp-ratio": "a hybrid pattern by ratio",
    "--moe-layer-recompute": "MoE layer recompute",
}
# What megacpp renders on every launch, with the value it renders (args.py): the same value is
# the spec's; another cannot be expressed.
FIXED = {"--hidden-dropout": "0", "--attention-dropout": "0", "--moe-router-dtype": "fp32",
         "--moe-aux-loss-coeff": f"{MOE_AUX_LOSS_COEFF:g}"}
# The Megatron-LM default of each schedule and logging flag a script may leave out, where it


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


class Reader:
    """Reads the flags group by group into spec keys, noting what it cannot represent."""

    def __init__(self, flags: Flags, dialect: str, unsupported: list[str], notes: list[str]) -> None:
        self.f, self.dialect, self.unsupported, self.notes = flags, dialect, unsupported, notes

    def lost(self, flag: str, why: str) -> None:
        values = self.f.groups.get(flag, [])
        self.f.taken.add(flag)
        self.unsupported.append(f"{' '.join([flag, *values])[:120]}: {why}")

    def leftovers(self) -> list[str]:
        """The fixed flags megacpp renders checked against the script's values; every flag left
        goes to launch.extra_args where a launch can carry it, or is listed."""
        f = self.f
        for flag, value in FIXED.items():
            values = f.values(flag)
            if values is None or value is None:
                continue
            same = len(values) == 1 and (values[0] == value or (is_number(values[0]) and is_number(value)
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
            elif flag in PLAN_FLAGS or flag in FIXED or negated(flag) in PLAN_FLAGS:
                self.lost(flag, "it shapes the planned model or layout, and the spec has no key for it")
            else:
                extra += [flag, *f.groups[flag]]
                f.taken.add(flag)
        return extra


def negated(flag: str) -> str:
    return "--" + flag[len("--no-"):] if flag.startswith("--no-") else flag


def is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False
