"""`validate` says what is wrong with the real values, and a plan file edited by hand is refused
before anything is rendered or explained from it."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from megacpp.planner.plan import Plan, build_plan
from megacpp.planner.spec.loading import load_spec_text, spec_from_dict
from megacpp.planner.validation import validate_plan, validate_spec
from megacpp.recipes import recipe_text
from tests.conftest import TINY_DENSE

CLI = [sys.executable, "-m", "megacpp.runtime.cli"]


def _nam56r(pins: dict[str, Any], nodes: int, gbs: int) -> dict[str, Any]:
    spec = yaml.safe_load(recipe_text("nam56r"))
    spec["parallel"], spec["cluster"]["nodes"], spec["training"]["global_batch_size"] = pins, nodes, gbs
    return spec


def test_pinned_spec_is_checked_with_its_real_micro_batch_count() -> None:
    spec = _nam56r({"tp": 4, "pp": 4, "vpp": 2, "cp": 1, "dp": 16, "ep": 8, "etp": 1}, nodes=32, gbs=768)
    result = validate_spec(spec_from_dict(spec))
    assert not result["valid"]
    assert [e.split(":")[0] for e in result["errors"]] == ["hybrid-no-vpp"]  # 48 micro-batches divide by pp=4


def test_pinned_spec_lists_every_rule_it_breaks() -> None:
    spec = _nam56r({"tp": 16, "pp": 3, "cp": 2, "vpp": 1, "ep": 8, "etp": 1}, nodes=12, gbs=768)
    rules = [e.split(":")[0] for e in validate_spec(spec_from_dict(spec))["errors"]]
    assert "tp-divides-mamba-groups" in rules and "recurrent-no-cp" in rules  # cp=2, not the example's cp=1


def test_pinned_spec_that_does_not_tile_the_world_says_so() -> None:
    spec = _nam56r({"tp": 2, "pp": 3, "cp": 1, "vpp": 1, "ep": 8, "etp": 1}, nodes=1, gbs=768)
    errors = validate_spec(spec_from_dict(spec))["errors"]
    assert errors and all("Traceback" not in e for e in errors)
    assert any("6" in e and "8" in e for e in errors), errors


@pytest.fixture(scope="module")
def saved() -> dict[str, Any]:
    spec = load_spec_text(yaml.safe_dump(TINY_DENSE))
    return build_plan(spec, top=3).to_json_dict()


def _edited(saved: dict[str, Any], edit) -> dict[str, Any]:
    doc = copy.deepcopy(saved)
    edit(doc)
    return doc


EDITS = {
    "tp beyond the heads": lambda d: d["candidates"][0]["layout"].update(tp=8, dp=1),
    "micro-batches off the batch": lambda d: d["candidates"][0]["layout"].update(num_microbatches=3),
    "a split of a billion": lambda d: d["candidates"][0]["split"].update(sizes=[10**9]),
    "no candidates": lambda d: d.update(candidates=[]),
}


@pytest.mark.parametrize("edit", EDITS, ids=list(EDITS))
def test_validate_finds_a_hand_edited_plan(saved: dict[str, Any], edit: str) -> None:
    assert validate_plan(Plan.from_json_dict(saved))["valid"]
    result = validate_plan(Plan.from_json_dict(_edited(saved, EDITS[edit])))
    assert not result["valid"] and result["errors"]


@pytest.mark.parametrize("edit", ["tp beyond the heads", "micro-batches off the batch", "a split of a billion"])
def test_launch_and_explain_refuse_a_hand_edited_plan(tmp_path: Path, saved: dict[str, Any], edit: str) -> None:
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(_edited(saved, EDITS[edit])))
    out = tmp_path / "run"
    for args in (["launch", str(plan), "--dry-run", "--out", str(out)], ["explain", "layout", str(plan)]):
        result = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=60)
        assert result.returncode == 1, args
        assert result.stderr.startswith("error: inconsistent plan") and "Traceback" not in result.stderr
    assert not out.exists()
