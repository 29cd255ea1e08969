"""The block-pattern grammar: letters A M E D R, `(...)*N` and `X*N` repeats, whitespace, `|` cuts.

    pattern := item*
    item    := LETTER ['*' N] | '(' pattern ')' '*' N | '|'

`|` pins a pipeline cut between the blocks around it. The parsed form is a flat block string
plus the positions at which pinned stages start.
"""

from __future__ import annotations

from dataclasses import dataclass

from megacpp.planner.errors import SpecError

BLOCK_LETTERS = {
    "A": "self-attention",
    "M": "Mamba-2 mixer",
    "E": "MoE FFN",
    "D": "dense MLP",
    "R": "recurrent (gated linear recurrence)",
}
# the deepest published stacks hold a few hundred blocks; the stage splits a search tries grow
# with the square of the depth, so a deeper pattern would keep `plan` busy for minutes
MAX_BLOCKS = 4096
DIGITS = "0123456789"  # ASCII only: str.isdigit() also takes fullwidth and Arabic-Indic digits


def _quoted(text: str, limit: int = 60) -> str:
    """The pattern as the error shows it: quoted, and cut short so that the message stays one line."""
    return repr(text) if len(text) <= limit else repr(text[: limit - 3]) + f"... ({len(text)} characters)"


@dataclass(frozen=True)
class Pattern:
    """A parsed pattern: `blocks` in depth order and `cuts`, the block indices where a pinned stage starts."""

    source: str
    blocks: str
    cuts: tuple[int, ...] = ()

    def __len__(self) -> int:
        return len(self.blocks)

    @property
    def letters(self) -> frozenset[str]:
        return frozenset(self.blocks)

    @property
    def segments(self) -> list[str]:
        """Block strings of the pinned stages (the whole pattern when there is no cut)."""
        bounds = [0, *self.cuts, len(self.blocks)]
        return [self.blocks[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]

    @property
    def is_plain_transformer(self) -> bool:
        """True when the pattern is only `AD` / `AE` pairs: one Megatron GPT layer per pair."""
        b = self.blocks
        return (
            len(b) % 2 == 0
            and all(b[i] == "A" and b[i + 1] in "DE" for i in range(0, len(b), 2))
            and all(c % 2 == 0 for c in self.cuts)
        )


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def fail(self, what: str) -> SpecError:
        return SpecError(f"model.pattern: {what} at position {self.pos} in {_quoted(self.text)}")

    def peek(self) -> str:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def count(self) -> int:
        if self.peek() != "*":
            return 1
        self.pos += 1
        self.peek()
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] in DIGITS:
            self.pos += 1
        digits = self.text[start : self.pos]
        if not digits:
            raise self.fail("'*' must be followed by a repeat count such as *13")
        if len(digits) > 6 or int(digits) < 1:
            raise self.fail(f"repeat count {digits} must be between 1 and {MAX_BLOCKS}")
        return int(digits)

    def sequence(self, depth: int) -> list[str]:
        """Parse items until ')' or the end; '|' is kept as a token."""
        out: list[str] = []
        while True:
            ch = self.peek()
            if ch == "":
                if depth:
                    raise self.fail("unbalanced '(': missing ')'")
                return out
            if ch == ")":
                if not depth:
                    raise self.fail("unbalanced ')'")
                return out
            self.pos += 1
            if ch == "(":
                inner = self.sequence(depth + 1)
                self.pos += 1  # the ')'
                if not inner:
                    raise self.fail("empty group '()'")
                if self.peek() != "*":
                    raise self.fail("a group '(...)' must be followed by a repeat count such as *13")
                item = self.repeated(inner, self.count())
            elif ch == "|":
                item = ["|"]
            elif ch in BLOCK_LETTERS:
                item = self.repeated([ch], self.count())
            else:
                hint = f" (did you mean '{ch.upper()}'?)" if ch.upper() in BLOCK_LETTERS else ""
                raise self.fail(f"unknown block letter {ch!r}{hint}; valid letters are A M E D R, '(', ')', '*', '|'")
            if len(out) + len(item) > MAX_BLOCKS:
                raise self.too_many()
            out.extend(item)

    def too_many(self) -> SpecError:
        return SpecError(f"model.pattern: more than {MAX_BLOCKS} blocks in {_quoted(self.text)}; check the repeat counts")

    def repeated(self, items: list[str], count: int) -> list[str]:
        """`items` `count` times, refused before it is built when that exceeds MAX_BLOCKS."""
        if len(items) * count > MAX_BLOCKS:
            raise self.too_many()
        return items * count


def parse_pattern(text: str) -> Pattern:
    """Parse a pattern string; raise SpecError naming the position and the fix on bad input."""
    if not isinstance(text, str):
        raise SpecError(f"model.pattern: must be a string such as \"(AEME)*13 AEMR\", got {repr(text)[:60]}")
    tokens = _Parser(text).sequence(0)
    blocks: list[str] = []
    cuts: list[int] = []
    for tok in tokens:
        if tok != "|":
            blocks.append(tok)
            continue
        if not blocks or (cuts and cuts[-1] == len(blocks)):
            raise SpecError(f"model.pattern: '|' must sit between blocks (no empty pipeline stage) in {_quoted(text)}")
        cuts.append(len(blocks))
    if not blocks:
        raise SpecError("model.pattern: is empty; write blocks such as \"(AEME)*13 AEMR\"")
    if cuts and cuts[-1] == len(blocks):
        raise SpecError(f"model.pattern: '|' must sit between blocks (no empty pipeline stage) in {_quoted(text)}")
    return Pattern(source=text, blocks="".join(blocks), cuts=tuple(cuts))
