"""Megatron-LM's layer descriptions read back into megacpp's block pattern: `--moe-layer-freq`,
the hybrid pattern symbols, `--pipeline-model-parallel-layout`, and a compact pattern text.

Nothing is evaluated: the small list expressions Megatron writes (`([0]*3+[1]*58)`) and its layout
strings (`Et|(tt|)*30mL`) are parsed here, with their sizes bounded.
"""

from __future__ import annotations

import re

from megacpp.planner.errors import SpecError
from megacpp.planner.megatron.args import HYBRID_SYMBOLS
from megacpp.planner.spec.pattern import MAX_BLOCKS
from megacpp.planner.spec.pipeline_layout import expand

LETTERS = {symbol: letter for letter, symbol in HYBRID_SYMBOLS.items()}


def _repeat(items: list[str], count: int, what: str) -> list[str]:
    if count < 0 or len(items) * count > MAX_BLOCKS:
        raise SpecError(f"{what}: repeats to more than {MAX_BLOCKS} layers")
    return items * count


MAX_TEXT = 10_000  # characters of one list expression or layout string


def _bounded(text: str, flag: str) -> str:
    if len(text) > MAX_TEXT:
        raise SpecError(f"{flag}: {len(text)} characters; write repeats such as [1]*58 (at most {MAX_TEXT})")
    return text.strip()


def moe_layer_flags(text: str, num_layers: int) -> list[int]:
    """1 for each MoE layer: `--moe-layer-freq` as an integer k (every k-th layer from the first)
    or a list expression of 0/1 such as `([0]*3+[1]*58)` or `[0,1,1]`."""
    text = _bounded(text, "--moe-layer-freq")
    if re.fullmatch(r"\d{1,6}", text):
        k = int(text)
        if k < 1:
            raise SpecError(f"--moe-layer-freq {text}: must be at least 1")
        return [1 if i % k == 0 else 0 for i in range(num_layers)]
    flags = _list_expression(text.replace(" ", ""))
    if len(flags) != num_layers:
        raise SpecError(f"--moe-layer-freq {text[:60]!r} lists {len(flags)} layers, --num-layers is {num_layers}")
    return flags


def _list_expression(text: str) -> list[int]:
    """`term (+ term)*` where term is `[0,1,...]`, `[...]*N` or `(expression)`, `(...)*N`."""
    pos = 0

    def fail() -> SpecError:
        return SpecError(f"--moe-layer-freq {text[:60]!r}: not a list of 0 and 1 such as ([0]*3+[1]*58)")

    def count() -> int:
        nonlocal pos
        match = re.compile(r"\*(\d{1,6})").match(text, pos)
        if match is None:
            return 1
        pos = match.end()
        return int(match.group(1))

    def expression(depth: int) -> list[int]:
        nonlocal pos
        if depth > 32:
            raise fail()
        out: list[int] = []
        while True:
            if text.startswith("[", pos):
                end = text.find("]", pos)
                if end < 0 or not re.fullmatch(r"[01](,[01])*", text[pos + 1 : end]):
                    raise fail()
                items = [int(x) for x in text[pos + 1 : end].split(",")]
                pos = end + 1
            elif text.startswith("(", pos):
                pos += 1
                items = expression(depth + 1)
                if not text.startswith(")", pos):
                    raise fail()
                pos += 1
            else:
                raise fail()
            out += [int(x) for x in _repeat([str(i) for i in items], count(), "--moe-layer-freq")]
            if len(out) > MAX_BLOCKS:
                raise SpecError(f"--moe-layer-freq: more than {MAX_BLOCKS} layers")
            if not text.startswith("+", pos):
                return out
            pos += 1

    flags = expression(0)
    if pos != len(text):
        raise fail()
    return flags


def hybrid_letters(text: str, flag: str) -> tuple[str, list[int]]:
    """The block letters of a hybrid pattern (`*` A, `M` M, `E` E, `-` D, `G` R) and the layer
    indices where its `|` segments start."""
    letters: list[str] = []
    cuts: list[int] = []
    for symbol in text.strip():
        if symbol == "|":
            cuts.append(len(letters))
        elif symbol in LETTERS:
            letters.append(LETTERS[symbol])
        else:
            raise SpecError(f"{flag} {text[:60]!r}: unknown layer symbol {symbol!r}; megacpp reads "
                            f"{' '.join(LETTERS)} and |")
        if len(letters) > MAX_BLOCKS:
            raise SpecError(f"{flag}: more than {MAX_BLOCKS} layers")
    return "".join(letters), cuts


def pipeline_layout(text: str) -> tuple[list[int], bool]:
    """Decoder layers per chunk of `--pipeline-model-parallel-layout` (`E` embedding, `L` loss,
    `t` a layer, `m` an MTP layer, `|` between chunks, `X*N` and `(...)*N` repeats), and whether it
    places anything megacpp does not model (an MTP layer off the last stage, where megacpp places
    them, or the embedding or loss off their stages)."""
    try:  # the one expander of the layout grammar, with the spec's bounds
        chunks = expand(_bounded(text, "--pipeline-model-parallel-layout"))
    except ValueError as exc:
        raise SpecError(f"--pipeline-model-parallel-layout: {exc}") from None
    expanded = "|".join(chunks)
    sizes = [c.count("t") for c in chunks]
    standard = (chunks[0].startswith("E") and chunks[-1].endswith("L") and "m" not in "|".join(chunks[:-1])
                and expanded.count("E") == 1 and expanded.count("L") == 1 and all(sizes))
    return sizes, not standard


def compact_pattern(blocks: str, cuts: list[int] = ()) -> str:  # type: ignore[assignment]
    """The pattern text of `blocks` with pinned stage starts `cuts`: each stage's repeats folded,
    as in `(AEME)*13 AEMR` or `(AD)*3 (AE)*58`."""
    bounds = [0, *cuts, len(blocks)]
    return " | ".join(_fold(blocks[a:b]) for a, b in zip(bounds, bounds[1:], strict=False))


def _fold(text: str) -> str:
    """Greedy: at each place the repeated unit (up to 16 letters) that covers the most."""
    parts: list[str] = []
    literal = ""
    i, n = 0, len(text)
    while i < n:
        best_len, best_count = 0, 1
        for size in range(1, min(16, n - i) + 1):
            unit, count = text[i : i + size], 1
            while text.startswith(unit, i + count * size):
                count += 1
            if count > 1 and size * count > best_len * best_count:
                best_len, best_count = size, count
        if not best_len:
            literal += text[i]
            i += 1
            continue
        if literal:
            parts.append(literal)
            literal = ""
        unit = text[i : i + best_len]
        parts.append(f"{unit}*{best_count}" if best_len == 1 else f"({unit})*{best_count}")
        i += best_len * best_count
    if literal:
        parts.append(literal)
    return " ".join(parts)
