"""Resolve a command-line SPEC argument: a YAML file, a PLAN.json file, or a bundled recipe name."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from megacpp.planner.errors import PlanError, SpecError
from megacpp.planner.plan import Plan
from megacpp.planner.spec.loading import (
    MAX_SPEC_BYTES,
    load_spec_bytes,
    load_spec_text,
    one_line,
    read_capped,
)
from megacpp.planner.spec.models import Spec
from megacpp.recipes import DEFAULT_RECIPE, recipe_names, recipe_text

# A plan of the top ten layouts is about 100 KB; a spec is capped lower when it is parsed as one.
MAX_PLAN_BYTES = 64 * MAX_SPEC_BYTES
BOM = b"\xef\xbb\xbf"


def parse_json(raw: bytes, failure: str) -> Any:
    """JSON from a file's bytes (a byte-order mark tolerated); PlanError "`failure` (why)" otherwise."""
    try:
        return json.loads(raw.removeprefix(BOM))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PlanError(f"{failure} ({one_line(str(exc), 120)})") from None
    except ValueError:  # an integer of more digits than Python converts (sys.get_int_max_str_digits)
        raise PlanError(f"{failure} (a number of more than {sys.get_int_max_str_digits()} digits)") from None
    except RecursionError:
        raise PlanError(f"{failure} (nested too deeply)") from None


def cli_overrides(sets: list[str], cluster: str | None, nodes: int | None) -> list[str]:
    extra = list(sets)
    if cluster is not None:
        extra.append(f"cluster.preset={cluster}")
    if nodes is not None:
        extra.append(f"cluster.nodes={nodes}")
    return extra


def read_input(arg: str | None, overrides: list[str] = ()) -> Spec | Plan:  # type: ignore[assignment]
    """A Spec from a YAML file or recipe name, or a Plan from a PLAN.json file."""
    if arg is None:
        return load_spec_text(recipe_text(DEFAULT_RECIPE), source=f"recipe {DEFAULT_RECIPE}", overrides=overrides)
    path = Path(arg)
    if not path.exists():
        if arg in recipe_names():
            return load_spec_text(recipe_text(arg), source=f"recipe {arg}", overrides=overrides)
        raise SpecError(f"{arg}: no such file or bundled recipe; recipes: {', '.join(recipe_names())}")
    raw = read_capped(path, MAX_PLAN_BYTES, "a spec YAML, a PLAN.json or a recipe name")
    raw = raw.removeprefix(BOM)
    if raw.lstrip()[:1] == b"{":
        data = parse_json(raw, f"{arg}: invalid JSON")
        if isinstance(data, dict) and "schema" in data:
            if overrides:
                raise PlanError(f"{arg}: --set/--cluster/--nodes apply to specs, not to a saved plan; re-plan the spec instead")
            return Plan.from_json_dict(data)
    return load_spec_bytes(raw, source=arg, overrides=overrides)


# a launch script is a few KB, a generated one with a long data blend a few hundred; reading 1 MB
# of hostile bash takes seconds (every character is scanned in Python)
MAX_SCRIPT_BYTES = MAX_SPEC_BYTES


def read_launch(words: list[str]) -> tuple[str | list[str], str]:
    """What `megacpp import` reads: one launch script's text (decoded; odd bytes replaced), or
    Megatron-LM's argument list given after --; and a name for the spec (the script's stem)."""
    from megacpp.planner.megatron.importer.script import ENTRY_POINTS

    if len(words) != 1 or words[0].startswith("-") or words[0].rsplit("/", 1)[-1] in ENTRY_POINTS:
        return list(words), "imported"
    raw = read_capped(words[0], MAX_SCRIPT_BYTES, "a launch script, or Megatron-LM's arguments after --")
    return raw.removeprefix(BOM).decode("utf-8", errors="replace"), Path(words[0]).stem or "imported"


TABLE_SUFFIXES = (".yaml", ".yml", ".csv")


def is_table(path: Path) -> bool:
    """A table of measured runs (`megacpp calibrate`), told from a run report by its suffix."""
    return path.suffix.lower() in TABLE_SUFFIXES


def read_table(path: Path) -> list[Any]:
    """The measured runs of a table file (planner/calibrate/table.py), each row's `spec` a YAML
    file relative to the table's folder or a bundled recipe name."""
    from megacpp.planner.calibrate.table import MAX_TABLE_BYTES, measured_runs, parse_table

    try:
        raw = read_capped(path, MAX_TABLE_BYTES, "a table of measured runs (.yaml or .csv)")
    except SpecError as exc:
        raise PlanError(str(exc)) from None
    specs: dict[Path, bytes] = {}

    def load(ref: str, overrides: list[str]) -> Spec:
        spec_path = path.parent / ref
        if not spec_path.exists() and ref in recipe_names():
            return load_spec_text(recipe_text(ref), source=f"recipe {ref}", overrides=overrides)
        if not spec_path.exists():
            raise SpecError(f"spec {ref!r}: no such file (relative to {path.parent}) or bundled recipe")
        if spec_path not in specs:
            specs[spec_path] = read_capped(spec_path, MAX_SPEC_BYTES, "a spec YAML")
        return load_spec_bytes(specs[spec_path], source=ref, overrides=overrides)

    return measured_runs(parse_table(raw, str(path), path.suffix.lower() == ".csv"), str(path), load)
