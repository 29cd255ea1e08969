"""Bundled recipes: YAML specs shipped with megacpp (`megacpp recipes` lists them)."""

from __future__ import annotations

from importlib import resources

DEFAULT_RECIPE = "nam56r"


def recipe_names() -> list[str]:
    return sorted(p.name[: -len(".yaml")] for p in resources.files(__name__).iterdir() if p.name.endswith(".yaml"))


def recipe_text(name: str) -> str:
    return resources.files(__name__).joinpath(f"{name}.yaml").read_text(encoding="utf-8")
