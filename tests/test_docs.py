"""The user guide and the command reference: short, complete, and never behind the code."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any, get_args

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from megacpp.planner.spec.models import Spec
from megacpp.runtime.cli.docs import render_cli_reference
from tests.conftest import ROOT

README = ROOT / "README.md"
ROW = re.compile(r"^\| `([a-z0-9_.]+)` \| ([^|]*) \|", re.MULTILINE)


def _sub_model(field: FieldInfo) -> type[BaseModel] | None:
    annotation = field.annotation
    return next((t for t in (annotation, *get_args(annotation)) if isinstance(t, type) and issubclass(t, BaseModel)), None)


def spec_keys(model: type[BaseModel] = Spec, prefix: str = "") -> Iterator[tuple[str, FieldInfo, bool]]:
    """Every key of the spec as a dotted path, its field, and whether it holds a mapping of keys."""
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        child = _sub_model(field)
        yield path, field, child is not None
        if child is not None:
            yield from spec_keys(child, f"{path}.")


def spec_reference() -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index("\n## The spec\n")
    return text[start : text.index("\n## ", start + 1)]


def documented_default(reference: str, key: str) -> str | None:
    """The default column of the key's table row, or the `(default ...)` that follows it in prose."""
    rows = {k: cell.strip() for k, cell in ROW.findall(reference)}
    if key in rows:
        return rows[key]
    inline = re.search(rf"`{re.escape(key)}` \(default ([^)]*)\)", reference)
    return inline.group(1) if inline else None


def yaml_text(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def test_cli_reference_is_generated_from_the_app():
    committed = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    assert committed == render_cli_reference(), "docs/cli.md is stale: python -m megacpp.runtime.cli.docs > docs/cli.md"


def test_readme_is_a_short_guide_with_the_quickstart():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 300
    assert "make demo" in text and "make test" in text
    assert "(docs/cli.md)" in text


def test_every_spec_key_is_in_the_readme_with_its_default():
    reference = spec_reference()
    missing, wrong = [], []
    for key, field, is_mapping in spec_keys():
        if f"`{key}`" not in reference:
            missing.append(key)
            continue
        if is_mapping:
            continue
        default = documented_default(reference, key)
        if default is None:
            missing.append(f"{key} (its default)")
        elif field.is_required():
            if not default.startswith("required"):
                wrong.append(f"{key}: required, README says {default!r}")
        elif field.default is not None and f"`{yaml_text(field.default)}`" not in default:
            wrong.append(f"{key}: default {yaml_text(field.default)}, README says {default!r}")
    assert not missing, f"spec keys missing from README's spec reference: {missing}"
    assert not wrong, f"README's spec reference disagrees with planner/spec/models.py: {wrong}"


def test_readme_documents_no_key_the_spec_lacks():
    known = {key for key, _, _ in spec_keys()}
    rows = [key for key, _ in ROW.findall(spec_reference())]
    assert rows and set(rows) <= known, f"README documents unknown keys: {sorted(set(rows) - known)}"
