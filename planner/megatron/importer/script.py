"""Read a launch script as text: the Megatron-LM command it runs, never executing anything.

A bash script is scanned once, line by line: line continuations join, a quote or an array left
open continues on the next line, comments go. Each statement is expanded from what the script
assigned before it (shell.py) and split with shlex; the statement that runs pretrain_*.py is the
command, with the launcher words before it, the exported environment and the #SBATCH lines.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field

from megacpp.planner.errors import SpecError
from megacpp.planner.megatron.importer.shell import NAME, Shell, close

ENTRY_POINTS = ("pretrain_gpt.py", "pretrain_mamba.py", "pretrain_hybrid.py")
MAX_JOINED_LINES = 2000  # lines one open quote or array may span
ASSIGNMENT = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(\+?)=(.*)", re.DOTALL)
ARRAY_ASSIGNMENT = re.compile(r"\s*(?:export\s+|declare\s+-a\s+|local\s+|readonly\s+)?([A-Za-z_][A-Za-z0-9_]*)(\+?)=\(")
# a statement that may assign or export a variable
MATTERS = re.compile(r"\s*(export|declare|local|readonly|typeset|[A-Za-z_][A-Za-z0-9_]*\+?=)")
# keywords a body's first command follows on the same line: the command is read, an assignment
# after `then`, `do` or `else` runs on a condition and is not taken
BODIES = ("then", "do", "else", "{")
# statements that run no command worth reading (control flow, tests, output)
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
        elif c == "(" or (c == "{" and i and text[i - 1] == "$"):  # a { ... } group holds statements
            depth += 1
        elif c == ")" or (c == "}" and depth):
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
    first, _, rest = statement.strip().partition(" ")
    if first in BODIES and rest.strip():  # `then torchrun ...`: the command runs on a condition
        return _statement(shell, rest, exported, conditional or first != "{")
    if first in SKIPPED or (not MATTERS.match(statement) and not any(mark in statement for mark in ("$", "`", "pretrain_"))):
        return None  # neither assigns nor can run Megatron-LM: not split at all
    array = ARRAY_ASSIGNMENT.match(statement)
    if array is not None and not conditional:
        end = close(statement, array.end(), "(", ")")
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
