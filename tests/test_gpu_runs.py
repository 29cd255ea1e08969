"""What the committed GPU runs say about the runtime's training, layout against layout.

Runs of one model and training shape at the same DP size see the same tokens (the synthetic chain
is seeded per DP rank and micro-batch), so TP, SP, PP and VPP must not change what they learn.
A layout that silently corrupts training shows here: the PP2 x VPP2 runs made with batched p2p
kept a loss near 11.1 where their PP2 twin fell to 0.3.
"""

import itertools
import json

import pytest

from benchmarks.gpu.compare import summary
from tests.conftest import EVIDENCE, committed_gpu_runs


def _same_tokens() -> list[list[tuple[str, dict]]]:
    """The runtime's runs without routed experts, grouped by model, training shape, DP size and step
    count (routing turns tiny numeric differences into different expert choices)."""
    groups: dict[str, list[tuple[str, dict]]] = {}
    for name, run in committed_gpu_runs():
        spec = run["spec"]
        if run.get("engine") == "megatron-lm" or "E" in spec["model"]["pattern"]:
            continue
        key = json.dumps([spec["model"], spec["training"], run["layout"]["dp"], len(run["losses"])], sort_keys=True)
        groups.setdefault(key, []).append((f"{name}:{run['name']}", run))
    return [g for g in groups.values() if len({run["name"] for _, run in g}) > 1]


@pytest.mark.evidence
def test_layouts_of_one_model_learn_the_same():
    """The first five losses of any two such runs agree within 0.5 (small models and the Mamba
    stack drift apart later: -0.44 at step 4 between TP1 and TP2 + SP); the GPU-bound dense runs
    (hidden 4096: PP2, PP2 x VPP2, TP2, TP2 + SP, TP4 + SP) agree within 0.05 at every step."""
    groups = _same_tokens()
    assert sum(len(g) for g in groups) >= 10
    checked_large = 0
    for group in groups:
        for (a, run_a), (b, run_b) in itertools.combinations(group, 2):
            diffs = [abs(x - y) for x, y in zip(run_a["losses"], run_b["losses"], strict=True)]
            assert max(diffs[:5]) <= 0.5, (a, b, diffs)
            if run_a["spec"]["model"]["hidden_size"] >= 4096:
                assert max(diffs) <= 0.05, (a, b, diffs)
                checked_large += 1
    assert checked_large >= 10


def test_every_campaign_has_a_note_and_names_lead_to_one_file():
    """Code and tests cite a run report by its file name alone, so a name may live in one campaign
    only, and a spec by its name, so a spec that two campaigns ran is the same file in both; every
    campaign says in its NOTE.md what it tests and how it ran."""
    campaigns = [path for path in EVIDENCE.iterdir() if path.is_dir()]
    assert campaigns
    names = [path.name for path in EVIDENCE.glob("*/results/*") if path.is_file()]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
    specs: dict[str, set[str]] = {}
    for path in EVIDENCE.glob("*/specs/*.yaml"):
        specs.setdefault(path.name, set()).add(path.read_text())
    assert all(len(texts) == 1 for texts in specs.values()), [n for n, texts in specs.items() if len(texts) > 1]
    for campaign in campaigns:
        assert (campaign / "NOTE.md").is_file(), campaign.name
        assert (campaign / "results").is_dir() or (campaign / "specs").is_dir(), campaign.name


def test_the_summary_counts_each_run_once_and_each_stage():
    rows = [{"campaign": "pp2", "pp_rank": 0, "step_error": 0.10, "memory_error": 0.01},
            {"campaign": "pp2", "pp_rank": 1, "step_error": 0.10, "memory_error": -0.03},
            {"campaign": "one", "pp_rank": 0, "step_error": -0.30, "memory_error": 0.0}]
    lines = summary(rows).splitlines()
    assert lines[2] == "| [one](one/NOTE.md) | 1 | 0 | 30.0% | 1 | 1 | 1 |"
    assert lines[3] == "| [pp2](pp2/NOTE.md) | 1 | 1 | 10.0% | 2 | 1 | 2 |"
    assert lines[4] == "| **all** | 2 | 1 | 20.0% | 3 | 2 | 3 |"
