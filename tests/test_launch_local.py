"""`megacpp launch --target torchrun` on this machine: a 2-rank CPU job (construction mode), and a
failing rank that fails the whole launch."""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("megatron.core", reason="megatron-core is installed by `make test`")

CLI = [sys.executable, "-m", "megacpp.runtime.cli"]
SPEC = """\
name: local-smoke
model:
  pattern: "(AE)*2"
  hidden_size: 64
  vocab_size: 256
  attention: {num_heads: 4}
  moe: {num_experts: 4, top_k: 2, ffn_hidden_size: 64}
training: {seq_length: 64, global_batch_size: 4, micro_batch_size: 1}
cluster: {gpu: h100, gpus_per_node: 2, nodes: 1}
backend: {transformer_engine: false}
parallel: {tp: 1, pp: 1, vpp: 1, cp: 1, ep: 2, etp: 1}
"""


def _env() -> dict[str, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    return {**os.environ, "MASTER_PORT": port, "PYTHONUNBUFFERED": "1"}


def test_two_rank_cpu_job_through_megacpp_launch(tmp_path: Path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC)
    out = tmp_path / "run"
    proc = subprocess.run([*CLI, "launch", str(spec), "--engine", "megacpp", "--construct-only", "--out", str(out)],
                          capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "megacpp worker" in proc.stdout  # rank 0's log is streamed
    report = json.loads((out / "report.json").read_text())
    plan = json.loads((out / "plan.json").read_text())
    stage = plan["candidates"][0]["memory"]["per_stage"][0]
    assert report["construct_only"] and report["world_size"] == 2 and report["params_match_plan"]
    assert [r["ep"] for r in report["ranks"]] == [0, 1]
    assert all(r["params"] == stage["params"] and r["params_expert"] == stage["params_expert"] for r in report["ranks"])
    assert sorted(p.name for p in (out / "logs").rglob("*.log"))  # every rank's log is kept


def test_a_failing_rank_fails_the_launch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from megacpp.runtime.cli import executors

    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC)
    out = tmp_path / "run"
    proc = subprocess.run([*CLI, "launch", str(spec), "--engine", "megacpp", "--dry-run", "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    script = out / "launch.sh"
    text = script.read_text()
    worker = next(line for line in text.splitlines() if "-m megacpp.runtime.worker" in line)
    # rank 0 would sleep for ten minutes; rank 1 exits 3 at once: torchrun must end rank 0 too
    code = "import os, sys, time\nif os.environ['RANK'] == '0':\n    time.sleep(600)\nsys.exit(3)\n"
    script.write_text(text.replace(worker, f"  --no-python {shlex.quote(sys.executable)} -c {shlex.quote(code)}"))
    monkeypatch.setenv("MASTER_PORT", _env()["MASTER_PORT"])
    start = time.monotonic()
    rc = executors.run_torchrun(script)
    assert rc != 0
    assert time.monotonic() - start < 120
