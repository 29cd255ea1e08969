"""benchmarks/megatron_lm_args.py: each rendered launch is handed to Megatron-LM's checks as the
job would start it (its arguments and environment), and a refusal is reported with its reason."""

from __future__ import annotations

import os
import sys
import types

import torch
import yaml

from benchmarks import megatron_lm_args
from megacpp.recipes import recipe_text


def _checker(seen: list[tuple[list[str], str | None]]) -> types.SimpleNamespace:
    """A stand-in for megatron.training.arguments: parse_args reads sys.argv, validate_args makes
    Megatron-LM's assert on Transformer Engine's capture beside expandable segments."""

    def parse_args() -> list[str]:
        return list(sys.argv[1:])

    def validate_args(argv: list[str], defaults: dict) -> None:
        seen.append((argv, os.environ.get("NCCL_GRAPH_REGISTER")))
        if "transformer_engine" in argv and "expandable_segments:True" in os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""):
            assert os.environ.get("NCCL_GRAPH_REGISTER") == "0", "Setting NCCL_GRAPH_REGISTER=0 to avoid illegal memory access"

    return types.SimpleNamespace(parse_args=parse_args, validate_args=validate_args)


def test_a_launch_is_checked_with_its_environment_which_is_then_restored() -> None:
    doc = yaml.safe_load(recipe_text("llama-8b-dense"))
    doc["training"]["cuda_graphs"] = ["attn"]
    seen: list = []
    before_env, before_argv = dict(os.environ), list(sys.argv)
    capability = torch.cuda.get_device_capability
    verdicts = megatron_lm_args.check(_checker(seen), torch, "graphed", doc, "main", top=3)
    assert [v["verdict"] for v in verdicts] == ["accepted"] * 3, verdicts
    assert len({v["layout"] for v in verdicts}) == 3 and len(seen) == 3  # each layout checked as launched
    assert all("--cuda-graph-impl" in argv and register == "0" for argv, register in seen)
    assert dict(os.environ) == before_env and sys.argv == before_argv and torch.cuda.get_device_capability is capability


def test_a_refused_launch_names_megatron_lms_reason(monkeypatch) -> None:
    doc = yaml.safe_load(recipe_text("llama-8b-dense"))
    doc["training"]["cuda_graphs"] = ["attn"]
    monkeypatch.setattr(megatron_lm_args, "environment", lambda ctx, cand: {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"})
    (verdict,) = megatron_lm_args.check(_checker([]), torch, "graphed", doc, "main")
    assert verdict["verdict"] == "refused" and "NCCL_GRAPH_REGISTER=0" in verdict["why"]


def test_a_spec_the_dialect_cannot_render_is_counted_apart() -> None:
    doc = yaml.safe_load(recipe_text("nam56r"))  # R blocks have no Megatron layer in core_v0.16
    (verdict,) = megatron_lm_args.check(_checker([]), torch, "nam56r", doc, "core_v0.16")
    assert verdict["verdict"] == "not planned" and "R blocks" in verdict["why"]
