"""Hostile inputs end in one clear line, quickly and in little memory, never in a hang or a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest
import yaml

from megacpp.planner.errors import SpecError
from megacpp.planner.spec.loading import MAX_MESSAGE_CHARS, load_spec_bytes, load_spec_text
from megacpp.planner.spec.pattern import parse_pattern
from tests.conftest import TINY_DENSE

CLI = [sys.executable, "-m", "megacpp.runtime.cli"]
TINY_YAML = yaml.safe_dump(TINY_DENSE, sort_keys=False)


def _refused(text: str) -> str:
    with pytest.raises(SpecError) as exc:
        load_spec_text(text, source="bad.yaml")
    message = str(exc.value)
    assert "\n" not in message and len(message) <= MAX_MESSAGE_CHARS
    return message


def test_alias_bomb_is_refused_before_it_expands() -> None:
    lines = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    lines += [f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},"
              f"*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)}]" for i in range(8)]
    bomb = TINY_YAML.replace("name: tiny-dense\n", "") + "\n".join(lines) + "\n"
    start = time.perf_counter()
    assert "aliases expand to more than" in _refused(bomb)
    assert time.perf_counter() - start < 2


def test_shared_alias_that_expands_modestly_still_loads() -> None:
    text = TINY_YAML.replace("gated: true", "gated: &g true").replace("micro_batch_size: 1", "micro_batch_size: 1\n  distributed_optimizer: *g")
    assert load_spec_text(text).training.distributed_optimizer is True


def test_duplicate_key_is_an_error_naming_the_key() -> None:
    text = TINY_YAML.replace("hidden_size: 64", "hidden_size: 64\n  hidden_size: 128")
    message = _refused(text)
    assert "duplicate key 'hidden_size'" in message and "line" in message


@pytest.mark.parametrize("pattern", ["(AD)*\uff14", "(AD)*\u0664", "A*\u0663\u0662"])
def test_non_ascii_digits_in_a_pattern_are_refused(pattern: str) -> None:
    with pytest.raises(SpecError, match="repeat count"):
        parse_pattern(pattern)


@pytest.mark.parametrize("pattern", ["((A)*30000)*20000", "((A)*99999)*99999", "(((AD)*999)*999)*999"])
def test_huge_repeats_are_refused_before_they_are_built(pattern: str) -> None:
    tracemalloc.start()
    try:
        with pytest.raises(SpecError, match="more than 100000 blocks"):
            parse_pattern(pattern)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20


def test_long_pattern_error_stays_one_short_line() -> None:
    message = _refused(TINY_YAML.replace("(AD)*4", "AD" * 50_000 + "x"))
    assert "100001 characters" in message or "..." in message


def test_deeply_nested_pattern_is_a_user_error() -> None:
    _refused(TINY_YAML.replace("(AD)*4", "(" * 5000 + "A" + ")*2" * 5000))


def test_byte_order_mark_before_a_spec_is_tolerated() -> None:
    assert load_spec_bytes(b"\xef\xbb\xbf" + TINY_YAML.encode()).model.hidden_size == 64


def _cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


def test_plan_on_a_fifo_fails_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "spec.yaml"
    os.mkfifo(fifo)
    result = _cli("plan", str(fifo), timeout=20)
    assert result.returncode == 1
    assert "not a regular file" in result.stderr and "Traceback" not in result.stderr


def test_validate_dev_zero_fails_without_reading_it() -> None:
    result = _cli("validate", "/dev/zero", timeout=20)
    assert result.returncode == 1
    assert "not a regular file" in result.stdout + result.stderr
    assert "Traceback" not in result.stderr


def test_deeply_nested_json_plan_is_one_line(tmp_path: Path) -> None:
    deep = tmp_path / "plan.json"
    deep.write_text('{"schema": ' + "[" * 20000 + "]" * 20000 + "}")
    for command in (("explain", "layout"), ("validate",), ("launch", "--dry-run")):
        result = _cli(*command, str(deep))
        assert result.returncode == 1, command
        assert "Traceback" not in result.stderr and "RecursionError" not in result.stdout + result.stderr


def test_saved_plan_with_a_byte_order_mark_is_read_as_a_plan(tmp_path: Path) -> None:
    spec = tmp_path / "tiny.yaml"
    spec.write_text(TINY_YAML)
    plan = tmp_path / "plan.json"
    assert _cli("plan", str(spec), "--out", str(plan), "--top", "1").returncode == 0
    plan.write_bytes(b"\xef\xbb\xbf" + plan.read_bytes())
    result = _cli("validate", str(plan), "--format", "json")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "re-checked against the embedded spec" in result.stdout
