"""An 80-column terminal: the plan and explain tables keep every number whole; only text folds."""

from __future__ import annotations

import io
import re

import pytest
from rich.console import Console

from megacpp.planner.explain import explain_layout
from megacpp.planner.plan import build_plan
from megacpp.planner.spec.loading import load_spec
from megacpp.runtime.cli import console
from tests.conftest import ROOT

CUT = re.compile(r"\d…|…\d")  # a number cut with an ellipsis


@pytest.fixture
def screen(monkeypatch) -> io.StringIO:
    buffer = io.StringIO()
    monkeypatch.setattr(console, "out", Console(file=buffer, width=80, highlight=False))
    return buffer


@pytest.fixture(scope="module")
def mixtral():
    return build_plan(load_spec(ROOT / "recipes" / "mixtral-8x7b.yaml"), top=5)


def _lines(buffer: io.StringIO) -> list[str]:
    text = buffer.getvalue()
    assert not CUT.search(text), CUT.search(text)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80
    return lines


def test_the_plan_table_keeps_its_numbers(screen, mixtral):
    console.plan_table(mixtral, top=5)
    lines = _lines(screen)
    for cand in mixtral.candidates:
        t = cand.time
        row = next(line for line in lines if line.startswith(f"{cand.rank} "))
        for number in (f"{cand.memory.peak_gib:.1f}", f"{t.step_seconds:.2f}", f"{t.tokens_per_second:,.0f}",
                       f"{t.mfu:.0%}", f"{t.bubble_fraction:.1%}", str(cand.layout.num_microbatches)):
            assert f" {number} " in f" {row} ", (number, row)


def test_explain_keeps_its_numbers(screen, mixtral):
    doc = explain_layout(mixtral)
    console.explain_text(doc)
    text = "\n".join(_lines(screen))
    for a in doc["axes"]:
        assert f"{a['seconds_per_step']:.3f}" in text and f"{a['bytes_per_step'] / 1e9:,.1f}" in text
        assert f"{a['exposed_seconds_per_step']:.3f}" in text
    for r in doc["ranks"]:
        if r["node"] in (0, 7):  # the nodes shown (the rest are elided)
            assert f"r{r['rank']}" in text and f"{r['tp']}.{r['cp']}.{r['dp']}.{r['pp']}" in text
    for w in doc["why_not"]:
        assert f"{w['axis']}={w['value']}" in text


def test_a_wide_terminal_keeps_the_bordered_table(monkeypatch, mixtral):
    buffer = io.StringIO()
    monkeypatch.setattr(console, "out", Console(file=buffer, width=160, highlight=False))
    console.plan_table(mixtral, top=5)
    assert "┃ # ┃ layout" in buffer.getvalue()
