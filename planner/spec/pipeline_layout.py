"""Megatron's pipeline layout strings (`parallel.pipeline_layout`): the decoder layers of every
(virtual) pipeline stage, written as Megatron writes them.

Grammar (megatron/core/transformer/pipeline_parallel_layer_layout.py:283-320 in megatron-core
0.16.1; docs/user-guide/features/pipeline_parallel_layout.md): `|` separates the PP x VPP stages in
chunk order (stage k on pp_rank k % PP, virtual stage k // PP); `E` is the embedding, `t` a decoder
layer, `L` the loss, `m` an MTP layer; `x*N` and `(...)*N` repeat; commas are cosmetic. The
embedding comes first and the loss last, each exactly once (pipeline_parallel_layer_layout.py:86-151).
A stage may hold no decoder layer ("E|t*4|...|L"). The MTP layers (`m`) follow every decoder layer,
all in one stage (validate_layer_layout, lines 109-124); that the stage is the last virtual stage of
its rank depends on pp and is rule pipeline-layout-mtp's. Without `m` they go with the loss.
"""

from __future__ import annotations

import re

_SYMBOLS = re.compile(r"[EtLm|(),*0-9\s]*")
_GROUP = re.compile(r"\(([^()]*)\)\*(\d+)")
_REPEAT = re.compile(r"([EtLm])\*(\d+)")
MAX_STAGES = 1 << 14
MAX_SYMBOLS = 1 << 20


def expand(text: str) -> list[str]:
    """The stages of a layout string, each as its symbols with every repeat expanded."""
    if not _SYMBOLS.fullmatch(text):
        bad = sorted(set(re.sub(r"[EtLm|(),*0-9\s]", "", text)))
        raise ValueError(f"pipeline layout {text[:60]!r}: unknown symbols {''.join(bad)!r}; use E, t, m, L, |, (...)*N")
    flat = re.sub(r"[\s,]", "", text)
    for _ in range(64):
        if "(" not in flat:
            break
        flat = _bounded_sub(_GROUP, flat, text)
    if "(" in flat or ")" in flat:
        raise ValueError(f"pipeline layout {text[:60]!r}: unbalanced or unrepeated parentheses; write (...)*N")
    flat = _bounded_sub(_REPEAT, flat, text)
    if "*" in flat or re.search(r"\d", flat):
        raise ValueError(f"pipeline layout {text!r}: a repeat count must follow a symbol or (...)")
    stages = flat.split("|")
    if len(stages) > MAX_STAGES:
        raise ValueError(f"pipeline layout {text[:60]!r} has {len(stages)} stages; at most {MAX_STAGES}")
    return stages


def _bounded_sub(pattern: re.Pattern[str], flat: str, text: str) -> str:
    """`flat` with each `unit*N` of `pattern` repeated out, refused before the result would pass
    MAX_SYMBOLS: a repeat count of ten digits must not build gigabytes first."""
    size = len(flat)

    def repeat(m: re.Match[str]) -> str:
        nonlocal size
        digits = m[2].lstrip("0") or "0"
        count = int(digits) if len(digits) <= 7 else MAX_SYMBOLS + 1
        size += len(m[1]) * count - len(m[0])
        if size > MAX_SYMBOLS:
            raise ValueError(f"pipeline layout {text[:60]!r} expands beyond {MAX_SYMBOLS} symbols; check the repeat counts")
        return m[1] * count

    return pattern.sub(repeat, flat)


def stage_layers(text: str) -> tuple[int, ...]:
    """Decoder layers per stage of a layout string, after checking the embedding opens it and the
    loss closes it, once each."""
    stages = expand(text)
    flat = "".join(stages)
    if flat.count("E") != 1 or not stages[0].startswith("E"):
        raise ValueError(f"pipeline layout {text[:60]!r}: the embedding E must open the first stage, once")
    if flat.count("L") != 1 or not stages[-1].endswith("L"):
        raise ValueError(f"pipeline layout {text[:60]!r}: the loss L must close the last stage, once")
    if "m" in flat:
        if "t" in flat[flat.index("m"):]:
            raise ValueError(f"pipeline layout {text[:60]!r}: every decoder layer t must come before the MTP layers m")
        if sum("m" in s for s in stages) > 1:
            raise ValueError(f"pipeline layout {text[:60]!r}: all MTP layers m must sit in one stage")
    return tuple(s.count("t") for s in stages)


def mtp_layers(text: str) -> int:
    """The MTP layers (`m`) a layout string places."""
    return "".join(expand(text)).count("m")


def mtp_stage(text: str) -> int | None:
    """The stage (in chunk order) that holds the MTP layers of a layout string; None without `m`."""
    return next((k for k, s in enumerate(expand(text)) if "m" in s), None)
