"""Read a launch script as text: the Megatron-LM command it runs, never executing anything.

A bash script is scanned once, line by line: line continuations join, a quote or an array left
open continues on the next line, comments go. Each statement's `$NAME`, `${NAME}`,
`${NAME:-default}`, `${ARRAY[@]}` and `$(( integer arithmetic ))` are expanded from what the
script assigned before it (quote-aware, as bash splits words), and the result is split with shlex.
Command substitution, backticks and variables the script never assigns stay as their text.
Every size is bounded, so a huge or hostile file ends in one SpecError line.
"""

from __future__ import annotations

import ast
import re
import shlex
from dataclasses import dataclass, field

from megacpp.planner.errors import SpecError

ENTRY_POINTS = ("pretrain_gpt.py", "pretrain_mamba.py", "pretrain_hybrid.py")
MAX_EXPANDED_CHARS = 1 << 20  # one statement after expansion
MAX_TOTAL_CHARS = 1 << 20  # every statement split into words, together (shlex reads ~1 MB/s)
# one word after expansion: shlex builds a word a character at a time, in time that grows with
# the square of its length, so a longer one is refused before it is split
MAX_WORD_CHARS = 32 << 10
MAX_JOINED_LINES = 2000  # lines one open quote or array may span
MAX_DEPTH = 32  # ${...} nested in defaults
MAX_VARIABLES = 10_000
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
ASSIGNMENT = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(\+?)=(.*)", re.DOTALL)
ARRAY_ASSIGNMENT = re.compile(r"\s*(?:export\s+|declare\s+-a\s+|local\s+|readonly\s+)?([A-Za-z_][A-Za-z0-9_]*)(\+?)=\(")
# a statement that may assign or export a variable
MATTERS = re.compile(r"\s*(export|declare|local|readonly|typeset|[A-Za-z_][A-Za-z0-9_]*\+?=)")
# statements that run no command worth reading (control flow, tests, output); an assignment after
# `then` or `do` is conditional and is not taken
SKIPPED = {"if", "then", "else", "elif", "fi", "for", "while", "until", "do", "done", "case", "esac", "function",
           "{", "}", "[", "[[", "test", "echo", "printf", "set", "source", ".", "cd", "mkdir", "trap", "wait", "exit",
           "return", "shift", "unset", "ulimit", "umask"}


@dataclass
class LaunchCommand:
    """What a script launches: the Megatron-LM entry point and its arguments, the launcher's
    words before it (torchrun, srun, python), the exported environment and the #SBATCH lines."""

    entry_point: str
    args: list[str]
    launcher: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    sbatch: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    name: str | None = None  # the job's name: megacpp's `# spec:` header, else #SBATCH --job-name


class _Line:
    """The quote, bracket and comment state of a statement being read, carried across lines."""

    def __init__(self) -> None:
        self.quote = ""  # "'" or '"' while one is open
        self.parens = 0  # unquoted ( not yet closed
        self.braces = 0  # ${ not yet closed

    def scan(self, text: str) -> str:
        """`text` without its comment; the state is updated to the end of the line."""
        i, n = 0, len(text)
        while i < n:
            c = text[i]
            if self.quote == "'":
                if c == "'":
                    self.quote = ""
            elif c == "\\":
                i += 1
            elif self.quote == '"':
                if c == '"':
                    self.quote = ""
                elif c == "$" and text.startswith("${", i):
                    self.braces += 1
                    i += 1
                elif c == "}" and self.braces:
                    self.braces -= 1
            elif c in "'\"":
                self.quote = c
            elif c == "#" and (i == 0 or text[i - 1] in " \t;&|(") and not self.braces:
                return text[:i]
            elif c == "(":
                self.parens += 1
            elif c == ")":
                self.parens = max(0, self.parens - 1)
            elif c == "$" and text.startswith("${", i):
                self.braces += 1
                i += 1
            elif c == "}" and self.braces:
                self.braces -= 1
            i += 1
        return text

    @property
    def open(self) -> bool:
        return bool(self.quote or self.parens or self.braces)


def logical_lines(text: str) -> list[tuple[int, str]]:
    """(first line number, text) of each logical line: continuations joined, comments removed,
    an open quote, bracket or array carried on to the lines after it."""
    out: list[tuple[int, str]] = []
    state, start, held = _Line(), 0, 0
    parts: list[str] = []
    lines = text.replace("\r\n", "\n").split("\n")
    for number, raw in enumerate(lines, 1):
        if not parts:
            start, held = number, 0
        continued = raw.endswith("\\") and not raw.endswith("\\\\") and state.quote != "'"
        body = raw[:-1] if continued else raw
        parts.append(state.scan(body))
        if continued or state.open:
            if not continued:
                parts.append("\n")
                held += 1
                if held > MAX_JOINED_LINES:
                    raise SpecError(f"line {start}: a quote, bracket or array opened here is not closed within "
                                    f"{MAX_JOINED_LINES} lines")
            continue
        out.append((start, "".join(parts)))
        parts = []
    if parts and state.open:
        raise SpecError(f"line {start}: a quote, bracket or array opened here is never closed")
    if parts:
        out.append((start, "".join(parts)))
    return out


def split_statements(text: str) -> list[tuple[bool, str]]:
    """The statements of a logical line, cut at unquoted ; && || | & (quote-aware), each with
    whether it runs only on a condition (after && or ||)."""
    out: list[tuple[bool, str]] = []
    quote, depth, start, i, n, conditional = "", 0, 0, 0, len(text), False
    while i < n:
        c = text[i]
        if quote == "'":
            quote = "" if c == "'" else quote
        elif c == "\\":
            i += 1
        elif quote == '"':
            quote = "" if c == '"' else quote
        elif c in "'\"":
            quote = c
        elif c in "({":
            depth += 1
        elif c in ")}":
            depth = max(0, depth - 1)
        elif c in ";&|" and not depth:
            out.append((conditional, text[start:i]))
            separator = c
            while i + 1 < n and text[i + 1] in "&|;":
                i += 1
                separator += text[i]
            conditional = separator in ("&&", "||")
            start = i + 1
        i += 1
    out.append((conditional, text[start:]))
    return [(cond, s) for cond, s in out if s.strip()]


def _close(text: str, i: int, opening: str, closing: str) -> int:
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


def arithmetic(expr: str, value_of) -> int | None:  # type: ignore[no-untyped-def]
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
                piece, i = text[i : i + 2], i + 2
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
            end = _close(text, i + 3, "(", ")")
            if end + 1 < len(text) and text[end + 1] == ")":
                result = arithmetic(self.expand(text[i + 3 : end], depth + 1), self._number_text)
                whole = text[i : end + 2]
                return (str(result) if result is not None else self._literal(whole, quote)), end + 2
        if text.startswith("$(", i):
            end = _close(text, i + 2, "(", ")")
            return self._literal(text[i : end + 1], quote), end + 1
        if text.startswith("${", i):
            end = _close(text, i + 2, "{", "}")
            return self._braced(text[i + 2 : end], text[i : end + 1], quote, depth), end + 1
        match = NAME.match(text, i + 1)
        if match is None:  # $1, $@, $$, or a lone $
            special = text[i : i + 2] if i + 1 < len(text) and text[i + 1] in "0123456789@*#?$!-" else "$"
            return self._literal(special, quote) if special != "$" else "$", i + len(special)
        value = self.value(match.group())
        if value is None:
            return self._literal("$" + match.group(), quote), match.end()
        return self._insert(value, quote), match.end()

    def _number_text(self, name: str) -> str | None:
        return self.value(name)

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
            return self._insert(items[int(position)], quote) if position.isdigit() and int(position) < len(items) else ""
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


def _sbatch_options(line: str) -> list[str]:
    try:
        return shlex.split(line[len("#SBATCH"):], comments=True)
    except ValueError:
        return []


def read_script(text: str) -> LaunchCommand:
    """The Megatron-LM command of a launch script (the statement that runs pretrain_*.py)."""
    if "\x00" in text:
        raise SpecError("is a binary file (it holds NUL bytes), not a launch script")
    shell = Shell()
    sbatch: list[str] = []
    env: dict[str, str] = {}
    exported: set[str] = set()
    found: LaunchCommand | None = None
    name = None
    for raw in text.replace("\r\n", "\n").split("\n"):
        if raw.startswith("#SBATCH"):
            sbatch += _sbatch_options(raw)
        elif raw.startswith("# spec: ") and name is None:
            try:
                name = " ".join(shlex.split(raw[len("# spec: "):]))
            except ValueError:
                name = None
    name = name or next((w.partition("=")[2] for w in sbatch if w.startswith("--job-name=")), None)
    for number, line in logical_lines(text):
        for conditional, statement in split_statements(line):
            try:
                command = _statement(shell, statement, exported, conditional)
            except SpecError as exc:
                raise SpecError(f"line {number}: {exc}") from None
            if command is not None and found is None:
                found = command
            elif command is not None:
                raise SpecError(f"line {number}: a second Megatron-LM command ({command.entry_point}); "
                                "import a script that launches one")
    if found is None:
        raise SpecError(f"runs none of {', '.join(ENTRY_POINTS)}; pass the script that launches Megatron-LM, "
                        "or its arguments after --")
    for variable in sorted(exported):
        value = shell.value(variable)
        if value is not None:
            env[variable] = value
    found.env, found.sbatch, found.name = env, sbatch, name
    return found


def _statement(shell: Shell, statement: str, exported: set[str], conditional: bool) -> LaunchCommand | None:
    """Take the statement's assignments (unless it runs on a condition); the command if it is Megatron-LM's."""
    if not MATTERS.match(statement) and not any(mark in statement for mark in ("$", "`", "pretrain_")):
        return None  # neither assigns nor can run Megatron-LM: not split at all
    array = ARRAY_ASSIGNMENT.match(statement)
    if array is not None and not conditional:
        end = _close(statement, array.end(), "(", ")")
        shell.assign_array(array.group(1), shell.words(statement[array.end() : end]), append=bool(array.group(2)))
        return None
    words = shell.words(statement)
    if not words or words[0] in SKIPPED:
        return None
    export = words[0] in ("export", "declare", "local", "readonly", "typeset")
    if export:
        words = [w for w in words[1:] if not w.startswith("-")]
    while words:
        match = ASSIGNMENT.fullmatch(words[0])
        if match is None:
            break
        if not conditional:
            shell.assign(match.group(1), match.group(3), append=bool(match.group(2)))
        if export:
            exported.add(match.group(1))
        words = words[1:]
    if export:
        exported.update(w for w in words if NAME.fullmatch(w))
        return None
    entry = next((k for k, w in enumerate(words) if w.rsplit("/", 1)[-1] in ENTRY_POINTS), None)
    if entry is None:
        return None
    return LaunchCommand(entry_point=words[entry].rsplit("/", 1)[-1], args=_without_redirections(words[entry + 1 :]),
                         launcher=words[:entry])


def _without_redirections(words: list[str]) -> list[str]:
    out, skip = [], False
    for w in words:
        if skip:
            skip = False
        elif re.fullmatch(r"\d*(>>?|<|&>|>&)", w):
            skip = True
        elif not re.fullmatch(r"\d*(>>?|<|&>)\S+|\d*>&\d+", w) and w != "":
            out.append(w)
    return out


def from_arguments(words: list[str]) -> LaunchCommand:
    """An argument list given directly: `[pretrain_*.py] --flag value ...`."""
    if words and words[0].rsplit("/", 1)[-1] in ENTRY_POINTS:
        return LaunchCommand(entry_point=words[0].rsplit("/", 1)[-1], args=list(words[1:]))
    hybrid = "pretrain_hybrid.py" if "--hybrid-layer-pattern" in words else (
        "pretrain_mamba.py" if "--hybrid-override-pattern" in words else "pretrain_gpt.py")
    return LaunchCommand(entry_point=hybrid, args=list(words))
