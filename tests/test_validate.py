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
    result = validate_spec(spec_from_dict(spec), engine="megacpp")  # the engine that runs R blocks on core_v0.16
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


# --- one verdict per engine: stock Megatron-LM (the default) or megacpp's runtime ---

def _tiny(**changes: Any):
    from tests.conftest import make_spec

    return make_spec(TINY_DENSE, **changes)


def test_each_engine_gets_its_own_verdict() -> None:
    recurrent = _tiny(**{"model.pattern": "(AD)*2 R", "model.recurrent": {"num_heads": 4, "head_dim": 16}})
    stock = validate_spec(recurrent)
    assert not stock["valid"] and stock["engine"] == "megatron-lm"
    assert stock["errors"][0].startswith("--engine megatron-lm: recurrent-runtime-only: R blocks have no Megatron layer")
    assert any(w.startswith("under --engine megacpp this is valid") for w in stock["warnings"])
    ours = validate_spec(recurrent, engine="megacpp")
    assert ours["valid"] and ours["engines"]["megatron-lm"]["valid"] is False and ours["engines"]["megacpp"]["valid"]

    offloaded = _tiny(**{"training.offload_modules": ["core_attn"], "backend.transformer_engine": True})
    assert validate_spec(offloaded)["valid"]
    runtime = validate_spec(offloaded, engine="megacpp")
    assert not runtime["valid"] and "memory-features-need-megatron-lm" in runtime["errors"][0]
    overlap = validate_spec(_tiny(**{"training.tp_comm_overlap": True, "backend.transformer_engine": True}), engine="megacpp")
    assert any("training.tp_comm_overlap: the megacpp runtime does not overlap" in e for e in overlap["errors"])


@pytest.mark.parametrize(("extra", "message"), [
    (["--exit-signal-handlr"], "--exit-signal-handlr is not a flag of Megatron-LM core_v0.16 (did you mean '--exit-signal-handler'?)"),
    (["--tensor-model-parallel-size", "2"], "--tensor-model-parallel-size would change what megacpp renders"),
    (["--micro-batch-size", "4"], "--micro-batch-size would change what megacpp renders"),
    (["--lr", "1e-3"], "--lr is set from training.lr"),
    (["--adam-beta2", "0.999"], "--adam-beta2 is set from training.adam_beta2"),
    (["--log-interval", "5", "--log-interval", "6"], "--log-interval is given twice"),
])
def test_validate_checks_the_extra_megatron_flags(extra: list[str], message: str) -> None:
    spec = _tiny(**{"launch.extra_args": extra})
    result = validate_spec(spec)
    assert not result["valid"] and any(message in e for e in result["errors"]), result["errors"]
    # the runtime does not read them: valid there, with a warning that says so
    ours = validate_spec(spec, engine="megacpp")
    assert ours["valid"] and any("launch.extra_args: read by Megatron-LM only" in w for w in ours["warnings"])


@pytest.mark.parametrize("value", ["$(touch PWNED)", "`id`", "x; rm -rf /", "l1\nl2", "${IFS}"])
def test_validate_flags_shell_syntax_in_extra_args(value: str) -> None:
    result = validate_spec(_tiny(**{"launch.extra_args": ["--tensorboard-dir", value]}))
    assert result["valid"]
    assert any("holds shell syntax or a control character" in w and "nothing runs" in w for w in result["warnings"])
    assert not any("shell syntax" in w for w in validate_spec(_tiny(**{"launch.extra_args": ["--tensorboard-dir", "/logs/x"]}))["warnings"])


def test_validate_cli_takes_the_engine(tmp_path: Path) -> None:
    spec = tmp_path / "r.yaml"
    data = copy.deepcopy(TINY_DENSE)
    data["model"] |= {"pattern": "(AD)*2 R", "recurrent": {"num_heads": 4, "head_dim": 16}}
    spec.write_text(yaml.safe_dump(data))
    stock = subprocess.run([*CLI, "validate", str(spec), "--format", "json"], capture_output=True, text=True, timeout=120)
    assert stock.returncode == 1 and json.loads(stock.stdout)[0]["engines"]["megacpp"]["valid"] is True
    ours = subprocess.run([*CLI, "validate", str(spec), "--engine", "megacpp"], capture_output=True, text=True, timeout=120)
    assert ours.returncode == 0 and "valid" in ours.stdout
