"""Hostile inputs end in one clear line, quickly and in little memory, never in a hang or a traceback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import pytest
import yaml

from megacpp.planner.errors import SpecError
from megacpp.planner.spec.loading import MAX_MESSAGE_CHARS, load_spec_bytes, load_spec_text
from megacpp.planner.spec.pattern import MAX_BLOCKS, parse_pattern
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


@pytest.mark.parametrize("pattern", ["((A)*4000)*4000", "((A)*4096)*4096", "(((AD)*999)*999)*999"])
def test_huge_repeats_are_refused_before_they_are_built(pattern: str) -> None:
    tracemalloc.start()
    try:
        with pytest.raises(SpecError, match=f"more than {MAX_BLOCKS} blocks"):
            parse_pattern(pattern)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20


@pytest.mark.parametrize("layout", ["Et*2000000000|L", "E(t)*2000000000|L", "Et*99999999999|L", "Et*" + "9" * 30 + "|L",
                                    "E((t|)*1000)*1000|L"])
def test_huge_pipeline_layout_repeats_are_refused_before_they_are_built(layout: str) -> None:
    """A repeat count in parallel.pipeline_layout is a number a user types: ten digits of it must
    not build gigabytes (or overflow) before the layout is refused."""
    tracemalloc.start()
    try:
        message = _refused(TINY_YAML + f"parallel:\n  pp: 2\n  pipeline_layout: '{layout}'\n")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "expands beyond" in message and "repeat counts" in message
    assert peak < 64 << 20


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


@pytest.mark.parametrize("content", ["[]", '{"runs": [1]}', '{"runs": []}', '"text"'])
def test_calibrate_on_what_is_not_runs_is_one_line(tmp_path: Path, content: str) -> None:
    bad = tmp_path / "runs.json"
    bad.write_text(content)
    result = _cli("calibrate", str(bad), str(bad))
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr


def _profile(tmp_path: Path, **changes: object) -> Path:
    from megacpp.planner.calibrate.profile import PROFILE_SCHEMA

    doc = {"schema": PROFILE_SCHEMA, "cluster": "h200-sxm-8", "transformer_engine": False,
           "block_overhead_s": {"A": 0.001, "D": 0.002}, **changes}
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.parametrize("changes", [{"block_overhead_s": {"A": 1e308}}, {"small_kernel_traffic": 1e308},
                                     {"synchronised_share": float("nan")}, {"cluster_coefficients": {"host_launch_us": 1e308}},
                                     {"cluster_coefficients": {"nic_busbw_gbps": float("nan")}}])
def test_a_profile_with_absurd_numbers_is_refused(tmp_path: Path, changes: dict) -> None:
    spec = tmp_path / "tiny.yaml"
    spec.write_text(TINY_YAML)
    result = _cli("plan", str(spec), "--json", "--profile", str(_profile(tmp_path, **changes)))
    assert result.returncode == 1 and "malformed cluster profile" in result.stderr
    assert "Infinity" not in result.stdout and "NaN" not in result.stdout


def test_a_profile_of_another_cluster_is_refused(tmp_path: Path) -> None:
    spec = tmp_path / "tiny.yaml"
    spec.write_text(TINY_YAML.replace("h200-sxm-8", "h100-sxm-8"))
    result = _cli("plan", str(spec), "--profile", str(_profile(tmp_path)))
    assert result.returncode == 1
    assert "fitted on cluster 'h200-sxm-8'" in result.stderr and "'h100-sxm-8'" in result.stderr


def test_out_is_replaced_whole_while_a_reader_reads(tmp_path: Path) -> None:
    from megacpp.runtime.cli.executors import write_atomically

    out = tmp_path / "plan.json"
    versions = ["a" * 200_000 + "\n", "b" * 300_000 + "\n"]
    write_atomically(out, versions[0])
    seen: set[int] = set()
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            seen.add(len(out.read_text()))

    reader = threading.Thread(target=read)
    reader.start()
    for i in range(200):
        write_atomically(out, versions[i % 2])
    stop.set()
    reader.join()
    assert seen <= {len(v) for v in versions}
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]


def test_out_writes_into_a_pipe_and_through_a_symlink_without_replacing_them(tmp_path: Path) -> None:
    """`--out` on what is not a regular file (a pipe, /dev/stdout) writes into it; on a symlink it
    replaces the file the link names and keeps the link."""
    spec = tmp_path / "tiny.yaml"
    spec.write_text(TINY_YAML)
    real, link = tmp_path / "real.json", tmp_path / "link.json"
    link.symlink_to(real)
    assert _cli("plan", str(spec), "--out", str(link)).returncode == 0
    assert link.is_symlink() and json.loads(real.read_text())["candidates"]

    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    received: list[str] = []
    reader = threading.Thread(target=lambda: received.append(pipe.read_text()), daemon=True)
    reader.start()
    result = _cli("plan", str(spec), "--out", str(pipe))
    reader.join(timeout=60)
    assert result.returncode == 0, result.stderr
    assert pipe.is_fifo() and json.loads(received[0])["candidates"]


def test_out_to_dev_stdout_appends_where_the_shell_appends(tmp_path: Path) -> None:
    """`--out /dev/stdout >> log` adds the plan to the log: it neither truncates nor replaces it."""
    spec = tmp_path / "tiny.yaml"
    spec.write_text(TINY_YAML)
    log = tmp_path / "log.txt"
    log.write_text("first line\n")
    with log.open("a") as sink:
        result = subprocess.run([*CLI, "plan", str(spec), "--out", "/dev/stdout"], stdout=sink, stderr=subprocess.PIPE,
                                text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    text = log.read_text()
    assert text.startswith("first line\n{") and json.loads(text[len("first line\n"):text.index("\n}\n") + 2])["candidates"]


def test_out_on_a_folder_is_one_line(tmp_path: Path) -> None:
    spec = tmp_path / "tiny.yaml"
    spec.write_text(TINY_YAML)
    result = _cli("plan", str(spec), "--out", str(tmp_path))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"--out {tmp_path}: cannot write (Is a directory)" in result.stderr


def test_sigterm_to_megacpp_ends_the_whole_local_job(tmp_path: Path) -> None:
    """The launch script's children (torchrun and its ranks in a real job) end with megacpp."""
    pid_file = tmp_path / "child.pid"
    script = tmp_path / "launch.sh"
    script.write_text(f"sleep 300 &\necho $! > {pid_file}\nwait\n")
    driver = subprocess.Popen([sys.executable, "-c", (
        "import sys; from pathlib import Path; from megacpp.runtime.cli import executors\n"
        "try:\n    executors.run_torchrun(Path(sys.argv[1]))\n"
        "except executors.Stopped as stop:\n    sys.exit(128 + stop.signum)\n"), str(script)])
    deadline = time.monotonic() + 20
    while not pid_file.exists() or not pid_file.read_text().strip():
        assert time.monotonic() < deadline, "the launch script never started"
        time.sleep(0.05)
    child = int(pid_file.read_text())
    driver.send_signal(signal.SIGTERM)
    assert driver.wait(timeout=20) == 128 + signal.SIGTERM
    assert _ended(child)


def _ended(pid: int, wait_s: float = 5.0) -> bool:
    """The process is gone, or a zombie waiting for a parent that does not reap it."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.05)
    return False


def test_slurm_job_id_is_used_only_as_a_number() -> None:
    from megacpp.planner.megatron.render import RenderOptions, render_launch
    from megacpp.planner.plan import build_plan

    plan = build_plan(load_spec_text(TINY_YAML), top=1)
    script = render_launch(plan, RenderOptions(target="slurm", engine="megatron-lm"))["job.sbatch"]
    guard = script.index('case "$SLURM_JOB_ID" in')
    assert guard < script.index("SLURM_JOB_ID %")
    poisoned = subprocess.run(["bash", "-c", script[guard: script.index("\n", guard)] + "\necho reached"],
                              env={**os.environ, "SLURM_JOB_ID": "a[$(touch /tmp/megacpp-injected)]"},
                              capture_output=True, text=True)
    assert poisoned.returncode == 1 and "reached" not in poisoned.stdout
    assert not Path("/tmp/megacpp-injected").exists()


def test_top_1_router_renders_pre_softmax() -> None:
    from megacpp.planner.megatron.render import RenderOptions, render_launch
    from megacpp.planner.plan import build_plan
    from tests.conftest import TINY_MOE

    spec = yaml.safe_dump({**TINY_MOE, "model": {**TINY_MOE["model"], "moe": {**TINY_MOE["model"]["moe"], "top_k": 1}}})
    plan = build_plan(load_spec_text(spec), top=1)
    script = render_launch(plan, RenderOptions(target="torchrun", engine="megatron-lm"))["launch.sh"]
    assert "--moe-router-topk 1" in script and "--moe-router-pre-softmax" in script
