"""Write the command reference (docs/cli.md) from the typer app itself.

    python -m megacpp.runtime.cli.docs > docs/cli.md

The text depends only on the commands' declarations: no terminal width, no colours, so
tests/test_docs.py can compare the committed file with a fresh rendering.
"""

from __future__ import annotations

import inspect
import sys
from enum import Enum
from typing import Any

import typer.main

from megacpp.runtime.cli.app import app

PREFACE = """\
Generated from the command-line app by `python -m megacpp.runtime.cli.docs > docs/cli.md`;
`tests/test_docs.py` fails when this file and the app disagree. `megacpp COMMAND --help` prints
the same help in the terminal.

SPEC arguments take a spec YAML file, a bundled recipe name (`megacpp recipes`), or, where
noted, a PLAN.json written by `megacpp plan --out`. A user error (a bad key, an impossible
layout, a missing file) prints one line naming the value and the fix and exits 1; set
`MEGACPP_DEBUG=1` for the traceback. A usage error (an unknown option) exits 2.
"""


def render_cli_reference() -> str:
    """The whole reference as Markdown, one section per command in the order the app declares them."""
    root = typer.main.get_command(app)
    commands = _walk(root, ["megacpp"])
    lines = ["# megacpp command reference", "", _clean(root.help), "", PREFACE]
    lines.extend(f"- [`{' '.join(path)}`](#{'-'.join(path)}): {_summary(command)}" for path, command in commands)
    lines.append("")
    for path, command in commands:
        lines.extend(_command_section(path, command))
    return "\n".join(lines).rstrip("\n") + "\n"


def _walk(group: Any, path: list[str]) -> list[tuple[list[str], Any]]:
    found = []
    for name, command in getattr(group, "commands", {}).items():
        if getattr(command, "hidden", False):
            continue
        if getattr(command, "commands", None):
            found.extend(_walk(command, [*path, name]))
        else:
            found.append(([*path, name], command))
    return found


def _command_section(path: list[str], command: Any) -> list[str]:
    params = [p for p in command.params if not getattr(p, "hidden", False)]
    arguments = [p for p in params if not _is_option(p)]
    options = [p for p in params if _is_option(p)]
    usage = " ".join([*path, "[OPTIONS]" if options else "", *(_argument_usage(p) for p in arguments)])
    lines = [f"## {' '.join(path)}", "", "```", " ".join(usage.split()), "```", "", _clean(command.help), ""]
    lines.extend(f"- {_param_line(p)}" for p in [*arguments, *options])
    return [*lines, ""] if params else lines


def _is_option(param: Any) -> bool:
    return any(opt.startswith("-") for opt in param.opts)


def _argument_usage(param: Any) -> str:
    name = param.metavar or param.name.upper()
    name = f"{name}..." if param.nargs == -1 else name
    return name if param.required else f"[{name}]"


def _param_line(param: Any) -> str:
    if _is_option(param):
        flag = " / ".join([*param.opts, *param.secondary_opts])
        value = "" if getattr(param, "is_flag", False) else " " + _value_name(param)
        head = f"`{flag}{value}`"
    else:
        head = f"`{_argument_usage(param)}`"
    notes = []
    if param.required:
        notes.append("required")
    default = _default_text(param)
    if default:
        notes.append(f"default `{default}`")
    low, high = _bound(param, "min"), _bound(param, "max")
    if low is not None:
        notes.append(f"at least {low}")
    if high is not None:
        notes.append(f"at most {high}")
    suffix = f" ({'; '.join(notes)})" if notes else ""
    return f"{head}{suffix}: {_clean(getattr(param, 'help', None))}"


def _value_name(param: Any) -> str:
    choices = _choices(param)
    if choices:
        return "|".join(choices)
    return param.metavar or param.name.rstrip("_").upper()


def _choices(param: Any) -> list[str]:
    # an Enum default names the choices whichever way the installed typer represents the type
    if isinstance(param.default, Enum):
        return [str(member.value) for member in type(param.default)]
    return [str(c) for c in getattr(getattr(param, "type", None), "choices", None) or ()]


def _default_text(param: Any) -> str:
    default = param.default
    if param.required or default is None or default is False or default == [] or default == ():
        return ""
    return str(default.value if isinstance(default, Enum) else default)


def _bound(param: Any, which: str) -> Any:
    # newer typer keeps a range on the parameter, click keeps it on the parameter's type
    value = getattr(param, which, None)
    return value if value is not None else getattr(getattr(param, "type", None), which, None)


def _summary(command: Any) -> str:
    return _clean(command.help).split("\n\n")[0].replace("\n", " ")


def _clean(text: str | None) -> str:
    return inspect.cleandoc(text or "").strip()


def main() -> None:
    sys.stdout.write(render_cli_reference())


if __name__ == "__main__":
    main()
