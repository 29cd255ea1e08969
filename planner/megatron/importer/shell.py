"""The part of bash a launch script's words need: its variables and arrays, and the expansion of
`$NAME`, `${NAME}`, `${NAME:-default}` and kin, `${ARRAY[@]}` and `$(( integer arithmetic ))`,
quote-aware, as bash splits words; then shlex splits the result. Command substitution, backticks
and variables the script never assigns stay as their text: nothing is executed. Every size is
bounded, so hostile text ends in one SpecError line.
"""

from __future__ import annotations

import ast
import re
import shlex
from collections.abc import Callable

from megacpp.planner.errors import SpecError

MAX_EXPANDED_CHARS = 1 << 20  # one statement after expansion
MAX_TOTAL_CHARS = 512 << 10  # every statement split into words, together (shlex reads ~0.2-1 MB/s)
# one word after expansion: shlex builds a word a character at a time, in time that grows with
# the square of its length, so a longer one is refused before it is split
MAX_WORD_CHARS = 32 << 10
MAX_DEPTH = 32  # ${...} nested in defaults
MAX_VARIABLES = 10_000
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def close(text: str, i: int, opening: str, closing: str) -> int:
    """The index of the `closing` that matches the `opening` before `i` (quote-aware, nested)."""
    depth, quote, n = 1, "", len(text)
    while i < n:
        c = text[i]
        if quote == "'":
            quote = "" if c == "'" else quote
        elif c == "\\":
            i += 1
        elif quote == '"' and c == '"':
            quote = ""
        elif not quote and c in "'\"":
            quote = c
        elif c == opening and (not quote or opening == "{"):
            depth += 1
            if depth > MAX_DEPTH:
                raise SpecError(f"more than {MAX_DEPTH} nested {opening}...{closing}")
        elif c == closing and (not quote or closing == "}"):
            depth -= 1
            if not depth:
                return i
        i += 1
    raise SpecError(f"an unclosed {opening} in {text[:60]!r}")


def _longest_word(text: str) -> int:
    """The length of the longest word of `text`: a run without unquoted whitespace."""
    longest, start, quote, i, n = 0, 0, "", 0, len(text)
    while i < n:
        c = text[i]
        if quote:
            if c == quote:
                quote = ""
            elif c == "\\" and quote == '"':
                i += 1
        elif c == "\\":
            i += 1
        elif c in "'\"":
            quote = c
        elif c in " \t\n":
            longest, start = max(longest, i - start), i + 1
        i += 1
    return max(longest, n - start)


def arithmetic(expr: str, value_of: Callable[[str], str | None]) -> int | None:
    """Bash's integer arithmetic over + - * / % and parentheses, names read through `value_of`;
    None for anything else (nothing is evaluated but numbers)."""
    if len(expr) > 200 or not re.fullmatch(r"[A-Za-z0-9_\s+\-*/%()]*", expr):
        return None
    try:
        tree = ast.parse(expr.replace("/", "//").strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError):
        return None

    def ev(node: ast.AST) -> int:
        if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.Name):
            text = value_of(node.id.lstrip("$"))
            if text is None or not re.fullmatch(r"-?\d{1,18}", text.strip()):
                raise ValueError
            return int(text)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            return -ev(node.operand) if isinstance(node.op, ast.USub) else ev(node.operand)
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.FloorDiv, ast.Mod)):
            a, b = ev(node.left), ev(node.right)
            if isinstance(node.op, (ast.FloorDiv, ast.Mod)) and b == 0:
                raise ValueError
            result = {ast.Add: a + b, ast.Sub: a - b, ast.Mult: a * b}.get(type(node.op)) if not isinstance(
                node.op, (ast.FloorDiv, ast.Mod)) else (int(a / b) if isinstance(node.op, ast.FloorDiv) else a % b)
            assert result is not None
            if abs(result) >= 1 << 62:
                raise ValueError
            return result
        raise ValueError

    try:
        return ev(tree.body)
    except (ValueError, RecursionError):
        return None


class Shell:
    """The variables and arrays a script has assigned so far, and expansion of text with them."""

    def __init__(self) -> None:
        self.scalars: dict[str, str] = {}
        self.arrays: dict[str, list[str]] = {}
        self.total = 0

    def value(self, name: str) -> str | None:
        if name in self.arrays:
            return self.arrays[name][0] if self.arrays[name] else ""
        return self.scalars.get(name)

    def assign(self, name: str, value: str, append: bool = False) -> None:
        if len(self.scalars) + len(self.arrays) >= MAX_VARIABLES and name not in self.scalars:
            raise SpecError(f"more than {MAX_VARIABLES} variables")
        new = (self.value(name) or "") + value if append else value
        if len(new) > MAX_EXPANDED_CHARS:
            raise SpecError(f"variable {name} grows past {MAX_EXPANDED_CHARS} characters")
        self.arrays.pop(name, None)
        self.scalars[name] = new

    def assign_array(self, name: str, items: list[str], append: bool = False) -> None:
        old = self.arrays.get(name, [self.scalars[name]] if name in self.scalars else []) if append else []
        if sum(map(len, old)) + sum(map(len, items)) > MAX_EXPANDED_CHARS:
            raise SpecError(f"array {name} grows past {MAX_EXPANDED_CHARS} characters")
        self.scalars.pop(name, None)
        self.arrays[name] = [*old, *items]

    def words(self, text: str) -> list[str]:
        """`text` expanded and split into words, as bash would hand them to a command."""
        expanded = self.expand(text)
        self.total += len(expanded)
        if self.total > MAX_TOTAL_CHARS:
            raise SpecError(f"the script expands to more than {MAX_TOTAL_CHARS} characters")
        if len(expanded) > MAX_WORD_CHARS and _longest_word(expanded) > MAX_WORD_CHARS:
            raise SpecError(f"a word of more than {MAX_WORD_CHARS} characters")
        try:
            lexer = shlex.shlex(expanded, posix=True)
            lexer.whitespace_split = True
            lexer.commenters = ""
            return list(lexer)
        except ValueError as exc:
            raise SpecError(f"cannot split {text.strip()[:60]!r} into words ({exc})") from None

    def expand(self, text: str, depth: int = 0) -> str:
        """`text` with every reference the script can resolve replaced, quoted for shlex."""
        if depth > MAX_DEPTH:
            raise SpecError(f"variable defaults nested more than {MAX_DEPTH} deep")
        out: list[str] = []
        size, quote, i, n = 0, "", 0, len(text)
        while i < n:
            c = text[i]
            if quote == "'" or c not in "$`\\'\"":
                if quote == "'" and c == "'":
                    quote = ""
                piece, i = c, i + 1
            elif c == "\\":
                # bash drops the backslash before $ and ` inside double quotes; shlex keeps it there
                escaped = quote == '"' and text[i + 1 : i + 2] in ("$", "`")
                piece, i = text[i + 1 : i + 2] if escaped else text[i : i + 2], i + 2
            elif c in "'\"":
                if quote == c:
                    quote = ""
                elif not quote:
                    quote = c
                piece, i = c, i + 1
            elif c == "`":
                end = text.find("`", i + 1)
                end = n - 1 if end < 0 else end
                piece, i = self._literal(text[i : end + 1], quote), end + 1
            else:
                piece, i = self._reference(text, i, quote, depth)
            out.append(piece)
            size += len(piece)
            if size > MAX_EXPANDED_CHARS:
                raise SpecError(f"a statement expands to more than {MAX_EXPANDED_CHARS} characters")
        return "".join(out)

    @staticmethod
    def _literal(text: str, quote: str) -> str:
        """Text kept as it is (an unresolved reference), as one piece of the word it sits in."""
        return text.replace("\\", "\\\\").replace('"', '\\"') if quote else shlex.quote(text)

    @staticmethod
    def _insert(value: str, quote: str) -> str:
        if quote:
            return value.replace("\\", "\\\\").replace('"', '\\"')
        return " ".join(shlex.quote(w) for w in value.split())  # bash splits an unquoted expansion

    def _reference(self, text: str, i: int, quote: str, depth: int) -> tuple[str, int]:
        """The expansion of the `$...` at `i`, and the index after it."""
        if text.startswith("$((", i):
            end = close(text, i + 3, "(", ")")
            if end + 1 < len(text) and text[end + 1] == ")":
                result = arithmetic(self.expand(text[i + 3 : end], depth + 1), self.value)
                whole = text[i : end + 2]
                return (str(result) if result is not None else self._literal(whole, quote)), end + 2
        if text.startswith("$(", i):
            end = close(text, i + 2, "(", ")")
            return self._literal(text[i : end + 1], quote), end + 1
        if text.startswith("${", i):
            end = close(text, i + 2, "{", "}")
            return self._braced(text[i + 2 : end], text[i : end + 1], quote, depth), end + 1
        match = NAME.match(text, i + 1)
        if match is None:  # $1, $@, $$, or a lone $
            special = text[i : i + 2] if i + 1 < len(text) and text[i + 1] in "0123456789@*#?$!-" else "$"
            return self._literal(special, quote) if special != "$" else "$", i + len(special)
        value = self.value(match.group())
        if value is None:
            return self._literal("$" + match.group(), quote), match.end()
        return self._insert(value, quote), match.end()

    def _braced(self, inner: str, whole: str, quote: str, depth: int) -> str:
        """${NAME}, ${NAME:-word} and its kin, ${#NAME}, ${ARRAY[@]} and ${ARRAY[i]}."""
        match = re.fullmatch(r"(#?)([A-Za-z_][A-Za-z0-9_]*)(\[[^\]]*\])?(?:(:?[-=+?])(.*))?", inner, re.DOTALL)
        if match is None:
            return self._literal(whole, quote)
        length, name, index, op, word = match.groups()
        if index is not None and not length and op is None:
            items = self.arrays.get(name, [self.scalars[name]] if name in self.scalars else None)
            if items is None:
                return self._literal(whole, quote)
            if index in ("[@]", "[*]"):
                if index == "[*]" or not quote:
                    return self._insert(" ".join(items), quote)
                return '"' + " ".join(shlex.quote(x) for x in items) + '"' if items else ""
            position = index[1:-1].strip()
            whole_number = re.fullmatch(r"[0-9]{1,9}", position) is not None  # str.isdigit takes '²', int() does not
            return self._insert(items[int(position)], quote) if whole_number and int(position) < len(items) else ""
        value = self.value(name)
        if length:
            return str(len(value)) if value is not None else self._literal(whole, quote)
        if op is None:
            return self._insert(value, quote) if value is not None else self._literal(whole, quote)
        unset = value is None or (op.startswith(":") and value == "")
        if op.endswith("-") or op.endswith("="):
            if not unset:
                return self._insert(value or "", quote)
            default = " ".join(self.words(word)) if word else ""
            if op.endswith("="):
                self.assign(name, default)
            return self._insert(default, quote)
        if op.endswith("+"):
            return self._insert(" ".join(self.words(word)), quote) if not unset else ""
        return self._insert(value or "", quote) if not unset else self._literal(whole, quote)  # ${NAME:?message}
