"""`megacpp import`: an existing Megatron-LM launch read back into a spec with its layout pinned.

Every bundled recipe's rendered launch imports back to a spec whose plan is the original plan's
chosen candidate, and that renders the same Megatron-LM command again; user-written scripts and
published-run argument lists import with every flag the spec cannot carry listed.
"""

from __future__ import annotations

import functools
import shlex
import sys

import pytest

from megacpp.planner.errors import LaunchError
from megacpp.planner.megatron.importer import ImportOptions, import_launch
from megacpp.planner.megatron.render import RenderOptions, render_launch
from megacpp.planner.plan import build_plan
from megacpp.planner.spec.loading import load_spec_text
from megacpp.recipes import recipe_names, recipe_text

CLI = [sys.executable, "-m", "megacpp.runtime.cli"]
SCRIPT = {"torchrun": "launch.sh", "slurm": "job.sbatch"}


@functools.cache
def _original(recipe: str):
    """The recipe's plan, on the dialect whose stock Megatron-LM runs it (nam56r's R blocks need main)."""
    for overrides in ([], ["backend.megatron=main"]):
        plan = build_plan(load_spec_text(recipe_text(recipe), overrides=overrides), top=1)
        try:
            render_launch(plan, RenderOptions(engine="megatron-lm"))
        except LaunchError:
            continue
        return plan
    raise AssertionError(f"{recipe} renders on no dialect")


def _megatron_words(script: str) -> list[str]:
    words = shlex.split(script.replace("\\\n", " "), comments=True)
    start = next(i for i, w in enumerate(words) if "/pretrain_" in w)
    return words[start:]


@pytest.mark.parametrize("target", ["torchrun", "slurm"])
@pytest.mark.parametrize("recipe", recipe_names())
def test_every_recipe_round_trips_through_its_rendered_launch(recipe, target):
    plan = _original(recipe)
    script = render_launch(plan, RenderOptions(target=target, engine="megatron-lm"))[SCRIPT[target]]
    imported = import_launch(script, ImportOptions(cluster=plan.spec_model.cluster.preset))
    assert imported.unsupported == []
    again = build_plan(load_spec_text(imported.to_yaml("launch.sh")), top=1)
    before, after = plan.candidates[0], again.candidates[0]
    assert after.layout == before.layout
    assert after.split == before.split and after.stages == before.stages
    assert after.memory == before.memory
    assert after.time == before.time
    assert again.legal_count == 1  # the layout is pinned
    rendered = render_launch(again, RenderOptions(target=target, engine="megatron-lm"))[SCRIPT[target]]
    assert _megatron_words(rendered) == _megatron_words(script)
