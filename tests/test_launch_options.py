"""launch speaks the other commands' flags: --candidate for a plan's candidate, --cluster/--nodes for the cluster."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

CLI = [sys.executable, "-m", "megacpp.runtime.cli"]


def _launch(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, "launch", "llama-8b-dense", "--dry-run", "--out", str(tmp_path / "run"), *args],
                          capture_output=True, text=True, timeout=120)


def test_launch_takes_cluster_and_nodes_like_plan(tmp_path: Path) -> None:
    result = _launch(tmp_path, "--cluster", "h100-sxm-8", "--nodes", "2")
    assert result.returncode == 0, result.stderr
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert plan["cluster"]["name"] == "h100-sxm-8" and plan["world_size"] == 16


def test_launch_candidate_picks_the_plans_candidate(tmp_path: Path) -> None:
    result = _launch(tmp_path, "--candidate", "1")
    assert result.returncode == 0, result.stderr
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    script = (tmp_path / "run" / "launch.sh").read_text()
    shown = dict(kv.split("=") for kv in script.split("# layout: ", 1)[1].splitlines()[0].split())
    chosen, best = plan["candidates"][1]["layout"], plan["candidates"][0]["layout"]
    assert chosen != best
    assert all(shown[k] == str(v) for k, v in chosen.items() if k != "sp")


def test_launch_has_no_rank_flag(tmp_path: Path) -> None:
    result = _launch(tmp_path, "--rank", "1")
    assert result.returncode == 2 and "--rank" in result.stderr
