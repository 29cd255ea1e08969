"""Hostile specs, overrides, plan files and tables end in one bounded, printable error line: aliases
that expand to gigabytes, deep nesting, huge integers, control characters and rich markup in keys."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megacpp.planner.errors import MAX_ERROR_CHARS, SpecError
from megacpp.planner.plan import build_plan
from megacpp.planner.spec.loading import load_spec_text, shown
from megacpp.recipes import recipe_text

CLI = [sys.executable, "-m", "megacpp.runtime.cli"]
RECIPE = "llama-8b-dense"
# the CLI plans a recipe in well under 512 MiB of address space; a run that needs more is unbounded
MEMORY_LIMIT = 1 << 30
BAD_KEY = "line1\nline2\x1b[31m"


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=20, preexec_fn=_limit_memory)


def _one_line_error(*args: str) -> str:
    """The CLI's error for `args`: exit 1, one short printable line on stderr, no traceback."""
    start = time.perf_counter()
    result = _run(*args)
    assert time.perf_counter() - start < 10
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr[:2000]
    assert "\x1b" not in lines[0] and len(lines[0]) <= MAX_ERROR_CHARS + len("error: ")
    return lines[0]


def _alias_bomb(string_chars: int, levels: int) -> str:
    """A YAML list whose `levels` aliases each repeat the one before ten times, over one long string."""
    parts = [f'&s "{"x" * string_chars}"']
    names = ["s", *"abcdefghij"[:levels]]
    for prev, name in zip(names, names[1:], strict=False):
        parts.append(f"&{name} [{', '.join([f'*{prev}'] * 10)}]")
    return f"[{', '.join(parts)}]"


def _spec_file(tmp_path: Path, text: str, name: str = "spec.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _plan_file(tmp_path: Path, extra_key: str) -> str:
    doc = build_plan(load_spec_text(recipe_text(RECIPE)), top=1).to_json_dict()
    doc[extra_key] = 1
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(doc))
    return str(path)


# aliases that expand a small file to gigabytes of text


@pytest.mark.parametrize("command", ["plan", "validate"])
def test_alias_bomb_of_one_long_string_is_refused(tmp_path: Path, command: str) -> None:
    # 100 KB of text that stands for 1 GB once its aliases are expanded
    path = _spec_file(tmp_path, f"name: {_alias_bomb(100_000, 4)}\n" + recipe_text(RECIPE).split("\n", 2)[2])
    if command == "validate":
        result = _run("validate", path)
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert "aliases expand to more than" in result.stdout and len(result.stdout.splitlines()) == 1
    else:
        assert "aliases expand to more than" in _one_line_error("plan", path)


def test_alias_bomb_in_a_set_value_is_refused() -> None:
    levels = ["&a [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]"]
    levels += [f"&{b} [{', '.join([f'*{a}'] * 10)}]" for a, b in zip("abcdefgh", "bcdefghi", strict=True)]
    message = _one_line_error("plan", RECIPE, "--set", f"name=[{', '.join(levels)}]")
    assert "--set name:" in message and "aliases expand to more than" in message


def test_alias_bomb_in_a_calibrate_table_name_is_refused(tmp_path: Path) -> None:
    table = _spec_file(tmp_path, f"- {{name: {_alias_bomb(100_000, 4)}, spec: {RECIPE}, tp: 1, pp: 1, step_s: 1}}\n",
                       "table.yaml")
    assert "aliases expand to more than" in _one_line_error("calibrate", table)


def test_shown_values_are_bounded_however_large_or_deep() -> None:
    row = ["x" * 1000] * 1000
    huge = [[[row] * 1000] * 1000]  # a billion strings, by reference
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    start = time.perf_counter()
    for value in (huge, deep, {"k" * 10_000: huge}, 1 << 100_000):
        assert len(shown(value)) <= 60
    assert time.perf_counter() - start < 1
    assert shown({"a": [1, "b"]}) == repr({"a": [1, "b"]})


# nesting deeper than Python's recursion limit


def test_deeply_nested_set_value_is_one_line() -> None:
    message = _one_line_error("plan", RECIPE, "--set", "x=" + "[" * 20_000 + "]" * 20_000)
    assert "--set x:" in message and "nested too deeply" in message


def test_deeply_nested_set_column_of_a_csv_table_is_one_line(tmp_path: Path) -> None:
    table = _spec_file(tmp_path, f"name,spec,tp,pp,step_s,set\na,{RECIPE},1,1,1,x={'[' * 20_000}{']' * 20_000}\n", "t.csv")
    message = _one_line_error("calibrate", table)
    assert "row 1" in message and "--set x:" in message and "nested too deeply" in message


# control characters, markup and length in what errors quote


def test_plan_file_key_with_control_characters_is_escaped(tmp_path: Path) -> None:
    message = _one_line_error("explain", "layout", _plan_file(tmp_path, BAD_KEY))
    assert r"line1\nline2\x1b[31m" in message


def test_validate_github_annotation_stays_one_line(tmp_path: Path) -> None:
    path = _plan_file(tmp_path, BAD_KEY)
    for fmt, start in (("github", "::error file="), ("text", "invalid ")):
        result = _run("validate", "--format", fmt, path)
        assert result.returncode == 1 and "Traceback" not in result.stderr
        lines = result.stdout.splitlines()
        assert len(lines) == 1 and lines[0].startswith(start) and "\x1b" not in lines[0]
        assert r"line1\nline2\x1b[31m" in lines[0]


def test_huge_unknown_key_gives_a_bounded_line(tmp_path: Path) -> None:
    path = _plan_file(tmp_path, "k" * 200_000)
    assert "malformed plan file" in _one_line_error("explain", "layout", path)
    result = _run("validate", path)
    assert result.returncode == 1 and len(result.stdout) <= MAX_ERROR_CHARS + len(path) + 20


def test_explain_rule_does_not_echo_a_huge_id() -> None:
    assert "unknown rule" in _one_line_error("explain", "rule", "r" * 100_000)


@pytest.mark.parametrize("table, name", [
    ('name,spec,tp,pp,step_s,"bad\nhead\x1b[31m"\na,{recipe},1,1,1,x\n', "t.csv"),
    ('- {{name: a, spec: {recipe}, tp: 1, pp: 1, step_s: 1, "bad\\nhead\\e[31m": 1}}\n', "t.yaml"),
])
def test_calibrate_table_key_with_control_characters_is_escaped(tmp_path: Path, table: str, name: str) -> None:
    message = _one_line_error("calibrate", _spec_file(tmp_path, table.format(recipe=RECIPE), name))
    assert r"'bad\nhead\x1b[31m': unknown key" in message


def test_key_that_looks_like_rich_markup_is_printed_as_typed(tmp_path: Path) -> None:
    path = _spec_file(tmp_path, recipe_text(RECIPE).replace("  hidden_size:", '  "[/x]": 1\n  hidden_size:'))
    result = _run("validate", path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "unknown key 'model.[/x]'" in result.stdout


def test_error_messages_are_printable_and_bounded() -> None:
    message = str(SpecError(f"key {BAD_KEY * 1000}"))
    assert message.isprintable() and len(message) <= MAX_ERROR_CHARS


# merge keys, integers longer than Python converts


def test_merge_key_is_refused_by_name(tmp_path: Path) -> None:
    text = recipe_text(RECIPE).replace("training:\n", "training:\n  <<: {recompute: full}\n")
    assert "merge keys (<<) are not supported" in _one_line_error("plan", _spec_file(tmp_path, text))


@pytest.mark.parametrize("digits", ["9" * 5000, "1:" * 3000 + "1"])
def test_huge_integer_names_the_key(tmp_path: Path, digits: str) -> None:
    text = recipe_text(RECIPE).replace("hidden_size: 4096", f"hidden_size: {digits}")
    message = _one_line_error("plan", _spec_file(tmp_path, text))
    assert "hidden_size: an integer of" in message and "set_int_max_str_digits" not in message


def test_huge_integer_in_a_set_list_is_one_line() -> None:
    message = _one_line_error("plan", RECIPE, "--set", f"model.hidden_size=[{'9' * 5000}]")
    assert "--set model.hidden_size:" in message and "set_int_max_str_digits" not in message



@pytest.mark.parametrize(("key", "typed", "number"), [("cluster.gpu_memory_gib", "8e1", 80.0),
                                                     ("cluster.gpu_memory_gib", "8.0e1", 80.0),
                                                     ("model.moe.capacity_factor", "125e-2", 1.25),
                                                     ("training.lr", "3e-4", 3e-4)])
def test_every_number_key_reads_an_exponent_yaml_leaves_as_text(key: str, typed: str, number: float) -> None:
    """YAML 1.1 floats need a dot and a signed exponent, so 8e1 reaches the spec as text; every
    number key takes it as the number it spells, as training.lr always did."""
    spec = load_spec_text(recipe_text("mixtral-8x7b"), overrides=[f"{key}={typed}"])
    value: object = spec
    for part in key.split("."):
        value = getattr(value, part)
    assert value == number


@pytest.mark.parametrize("item", [".=1", "a..b=1", "parallel.=2"])
def test_a_set_key_with_an_empty_part_is_named_as_such(item: str) -> None:
    """The message names the key as written and says what is wrong with it, not an unknown key."""
    with pytest.raises(SpecError, match="has an empty part; write a dotted key such as parallel.tp"):
        load_spec_text(recipe_text("llama-8b-dense"), overrides=[item])


def test_a_name_that_looks_like_markup_is_printed_as_written(tmp_path: Path) -> None:
    """Tables and headings use rich markup; a spec named "[/x] [bold]y" is text, not markup."""
    spec = tmp_path / "named.yaml"
    spec.write_text(recipe_text(RECIPE).replace("name: llama-8b-dense", 'name: "[/x] [bold]y"'))
    for command in (("plan", str(spec)), ("explain", "layout", str(spec), "--versus", "tp2 pp2")):
        result = _run(*command)
        assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
        assert "[/x] [bold]y" in result.stdout


def test_validate_github_lines_escape_what_the_file_name_holds(tmp_path: Path) -> None:
    """A newline, a colon or a comma in a file name must not end or split the ::error line."""
    spec = tmp_path / "a\nb:c,d.yaml"
    spec.write_text(recipe_text(RECIPE).replace('pattern: "(AD)*32"', 'pattern: "(AX)*2"'))
    result = _run("validate", "--format", "github", str(spec))
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("::error file=") and "a%0Ab%3Ac%2Cd.yaml::" in lines[0], result.stdout
    text = _run("validate", str(spec)).stdout
    assert text.count("b:c,d.yaml") == 1 and "unknown block letter 'X'" in text, text


def test_digits_of_other_scripts_are_not_read_as_numbers() -> None:
    """float() reads '٣' as 3; a spec's number must be written in ASCII digits."""
    with pytest.raises(SpecError, match="cluster.gpu_memory_gib: expected a finite number"):
        load_spec_text(recipe_text(RECIPE), overrides=["cluster.gpu_memory_gib=\u0663"])
    assert "not an axis and a degree" in _one_line_error("explain", "layout", RECIPE, "--versus", "tp\u0662")


def test_what_a_script_or_a_path_holds_reaches_the_terminal_as_one_printable_line(tmp_path: Path) -> None:
    """A flag value megacpp cannot carry, and an --out path, are quoted with control characters escaped."""
    value = "v\nparallel: {tp: 8}\n\x1b[2J"
    result = _run("import", "--cluster", "h100-sxm-8", "--", "pretrain_gpt.py", "--num-layers", "2", "--hidden-size", "64",
                  "--num-attention-heads", "4", "--seq-length", "128", "--vocab-size", "100", "--unknown-flag-zz", value)
    assert result.returncode == 0 and "\x1b" not in result.stderr, result.stderr
    assert [line for line in result.stderr.splitlines() if "--unknown-flag-zz" in line] == [
        line for line in result.stderr.splitlines() if line.startswith("not represented: --unknown-flag-zz v\\nparallel")]
    out = tmp_path / "a\nb\x1b[31m.json"
    result = _run("plan", RECIPE, "--top", "1", "--out", str(out))
    assert result.returncode == 0 and out.exists()
    assert "\x1b" not in result.stderr and "wrote " in result.stderr and "a\\nb\\x1b[31m.json" in result.stderr, result.stderr
