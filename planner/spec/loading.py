"""Turn YAML text (plus `--set key=value` overrides) into a Spec, with one-line errors.

Every failure becomes a SpecError naming the key, the offending value and the fix.
"""

from __future__ import annotations

import math
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import BaseModel, ValidationError

from megacpp.planner.errors import MAX_MESSAGE_CHARS as MAX_MESSAGE_CHARS
from megacpp.planner.errors import SpecError, did_you_mean, one_line, printable
from megacpp.planner.spec.models import Spec

MAX_SPEC_BYTES = 1 << 20
# A YAML alias may stand for a whole subtree; a spec is a few hundred values, so a document that
# expands to more is an alias bomb, refused before anything walks the expanded tree. One long
# string repeated by aliases is as large as many values, so its characters are counted too.
MAX_SPEC_VALUES = 100_000
MAX_SPEC_CHARS = MAX_SPEC_BYTES
# no spec value needs more digits; Python refuses to convert past 4300, and slowly before that
MAX_INT_CHARS = 100
INT_TAG = "tag:yaml.org,2002:int"
MERGE_TAG = "tag:yaml.org,2002:merge"


def read_capped(path: str | Path, cap: int, what: str) -> bytes:
    """The bytes of the regular file `path`, read no further than `cap` + 1 bytes: a FIFO, a device
    or /dev/zero is refused before it is opened for reading, so nothing blocks or grows."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise SpecError(f"{path}: no such file; pass {what}") from None
    except OSError as exc:
        raise SpecError(f"{path}: cannot be read ({exc.strerror})") from None
    if stat.S_ISDIR(info.st_mode):
        raise SpecError(f"{path}: is a directory; pass {what}")
    if not stat.S_ISREG(info.st_mode):
        raise SpecError(f"{path}: is not a regular file (a pipe, socket or device); pass {what}")
    try:
        with open(path, "rb") as f:
            raw = f.read(cap + 1)
    except OSError as exc:
        raise SpecError(f"{path}: cannot be read ({exc.strerror})") from None
    if len(raw) > cap:
        raise SpecError(f"{path}: is larger than {cap} bytes, too large for {what}")
    return raw


def load_spec(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Spec:
    """Read a spec file and apply overrides."""
    raw = read_capped(path, MAX_SPEC_BYTES, "a spec YAML or a recipe name (see `megacpp recipes`)")
    return load_spec_bytes(raw, source=str(path), overrides=overrides)


def load_spec_bytes(raw: bytes, source: str = "<spec>", overrides: list[str] | tuple[str, ...] = ()) -> Spec:
    if len(raw) > MAX_SPEC_BYTES:
        raise SpecError(f"{source}: {len(raw)} bytes is too large for a spec (limit {MAX_SPEC_BYTES})")
    if b"\x00" in raw:
        raise SpecError(f"{source}: is a binary file, not a YAML spec")
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark, as some editors write, is not content
    except UnicodeDecodeError:
        raise SpecError(f"{source}: is not UTF-8 text; save the spec as UTF-8 YAML") from None
    return load_spec_text(text, source=source, overrides=overrides)


def load_spec_text(text: str, source: str = "<spec>", overrides: list[str] | tuple[str, ...] = ()) -> Spec:
    """Parse YAML text into a Spec."""
    if not text.strip():
        raise SpecError(f"{source}: is empty; a spec needs at least model, training and cluster")
    data = parse_yaml(text, source)
    if data is None:
        raise SpecError(f"{source}: is empty (only comments); a spec needs at least model, training and cluster")
    if not isinstance(data, dict):
        raise SpecError(f"{source}: the top level must be a mapping with model, training and cluster keys")
    for item in overrides:
        apply_override(data, item)
    return spec_from_dict(data, source=source)


def parse_yaml(text: str, source: str) -> Any:
    """YAML text into Python values (duplicate keys and alias bombs refused), or one SpecError line
    "`source`: invalid YAML at line L, column C: what"."""
    try:
        return _guarded_yaml(text, source)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpecError(f"{source}: invalid YAML{where}: {one_line(problem)}") from None


def _guarded_yaml(text: str, source: str) -> Any:
    """_load_yaml, its refusals, deep nesting and PyYAML's ValueErrors as one SpecError line naming
    `source`; a yaml.YAMLError (text that is not YAML) is left to the caller."""
    try:
        return _load_yaml(text)
    except SpecError as exc:
        raise SpecError(f"{source}: {exc}") from None
    except RecursionError:
        raise SpecError(f"{source}: invalid YAML: nested too deeply") from None
    except (ValueError, OverflowError) as exc:  # PyYAML's own, e.g. an out-of-range \U escape
        raise SpecError(f"{source}: invalid YAML: {one_line(str(exc), 120)}") from None


def _line(node: yaml.Node) -> int:
    return int(node.start_mark.line) + 1


def _long_int(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag == INT_TAG and len(node.value) > MAX_INT_CHARS


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last silently),
    merge keys, and integers longer than any spec value."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, value_node in node.value:
            if key_node.tag == MERGE_TAG:
                raise SpecError(f"line {_line(key_node)}: YAML merge keys (<<) are not supported; "
                                "write the keys out in the mapping")
            key = self.construct_object(key_node, deep=True)  # type: ignore[no-untyped-call]
            if _long_int(value_node):
                raise SpecError(f"{one_line(str(key), 60)}: an integer of {len(value_node.value)} characters "
                                f"at line {_line(value_node)} is too large; no spec value needs more than {MAX_INT_CHARS}")
            if not isinstance(key, (str, int, float, bool)):
                continue
            if key in seen:
                raise SpecError(f"duplicate key {one_line(str(key), 60)!r} at line {_line(key_node)}; "
                                "each key may appear once in a mapping")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)

    def construct_bounded_int(self, node: yaml.ScalarNode) -> int:
        """An integer outside a mapping's value (a list item, a key), its length checked too."""
        if _long_int(node):
            raise SpecError(f"line {_line(node)}: an integer of {len(node.value)} characters is too large; "
                            f"no spec value needs more than {MAX_INT_CHARS}")
        return self.construct_yaml_int(node)


_StrictLoader.add_constructor(INT_TAG, _StrictLoader.construct_bounded_int)


def _expanded_size(node: yaml.Node, sizes: dict[int, tuple[int, int]]) -> tuple[int, int]:
    """How many values, and characters of scalar text, `node` stands for once every alias is
    expanded; each node is counted once (memoized by identity), so an alias bomb is measured in
    time linear in its text."""
    known = sizes.get(id(node))
    if known is not None:
        return known
    sizes[id(node)] = (1, 0)  # an alias loop counts once and is reported later as a loop
    if isinstance(node, yaml.MappingNode):
        parts = [_expanded_size(n, sizes) for pair in node.value for n in pair]
    elif isinstance(node, yaml.SequenceNode):
        parts = [_expanded_size(n, sizes) for n in node.value]
    else:
        parts = [(0, len(node.value))]
    values = min(1 + sum(v for v, _ in parts), MAX_SPEC_VALUES + 1)
    chars = min(sum(c for _, c in parts), MAX_SPEC_CHARS + 1)
    sizes[id(node)] = (values, chars)
    return values, chars


def _load_yaml(text: str) -> Any:
    """YAML into Python values: duplicate keys refused, and aliases counted before expansion."""
    loader = _StrictLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return None
        values, chars = _expanded_size(root, {})
        if values > MAX_SPEC_VALUES:
            raise SpecError(f"YAML aliases expand to more than {MAX_SPEC_VALUES} values; "
                            "a spec needs a few hundred, so write the values out")
        if chars > MAX_SPEC_CHARS:
            raise SpecError(f"YAML aliases expand to more than {MAX_SPEC_CHARS} characters of text; "
                            "a spec needs a few KB, so write the values out")
        return loader.construct_document(root)
    finally:
        loader.dispose()


def _override_value(key: str, value: str) -> Any:
    """An override's value parsed as YAML under the spec file's guards; text that is not YAML
    stays the text itself."""
    if not value.strip():
        return None
    try:
        return _guarded_yaml(value, f"--set {one_line(key, 60)}")
    except yaml.YAMLError:
        return value


def apply_override(data: dict[str, Any], item: str) -> None:
    """Apply one `dotted.key=value` override in place; the value is parsed as YAML."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise SpecError(f"--set {shown(item)}: expected key=value, e.g. --set parallel.tp=2")
    parts = key.strip().split(".")
    if not all(part.strip() for part in parts):
        raise SpecError(f"--set {shown(item)}: {shown(key.strip())} has an empty part; write a dotted key such as parallel.tp")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise SpecError(f"--set {shown(item)}: {one_line(part, 60)} is not a mapping")
        node = child
    node[parts[-1]] = _override_value(key.strip(), value)


def spec_from_dict(data: dict[str, Any], source: str = "<spec>") -> Spec:
    try:
        reject_non_finite(data, (), set())
        return Spec.model_validate(data)
    except ValidationError as exc:
        # an unknown key explains a "missing" one next to it (a typo), so report unknown keys first
        errors = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")
        raise SpecError(one_line(f"{source}: {_describe(dict(errors[0]))}")) from None
    except SpecError as exc:
        message = str(exc)
        raise SpecError(one_line(message if message.startswith(f"{source}: ") else f"{source}: {message}")) from None
    except RecursionError:
        raise SpecError(f"{source}: nested too deeply") from None


def reject_non_finite(node: Any, path: tuple[str, ...], seen: set[int], done: set[int] | None = None) -> None:
    """Refuse NaN/inf anywhere and alias loops; a subtree shared by aliases is walked once (`done`)."""
    done = set() if done is None else done
    if isinstance(node, float) and not math.isfinite(node):
        raise SpecError(f"{'.'.join(path)}: {node} is not a finite number")
    if isinstance(node, (dict, list)):
        if id(node) in seen:
            raise SpecError(f"{'.'.join(path) or 'spec'}: refers to itself (a YAML alias loop)")
        if id(node) in done:
            return
        seen.add(id(node))
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for k, v in items:
            reject_non_finite(v, (*path, str(k)), seen, done)
        seen.discard(id(node))
        done.add(id(node))


def _field_model(cls: type[BaseModel], name: str) -> type[BaseModel] | None:
    annotation = cls.model_fields[name].annotation
    candidates = [annotation, *get_args(annotation)]
    return next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)


def _clean_loc(loc: tuple[Any, ...], kind: str) -> tuple[list[str], type[BaseModel] | None]:
    """The user's key path (pydantic's union-branch tags dropped) and the model owning its last key."""
    cls: type[BaseModel] | None = Spec
    owner: type[BaseModel] | None = Spec
    path: list[str] = []
    for i, part in enumerate(loc):
        if isinstance(part, int):
            path.append(str(part))
        elif cls is not None and part in cls.model_fields:
            owner = cls
            path.append(part)
            cls = _field_model(cls, part)
        elif cls is not None and kind == "extra_forbidden" and i == len(loc) - 1:
            owner = cls
            path.append(str(part))
        # anything else is a union-branch tag such as 'constrained-int' or "literal['auto']"
    return path, owner


def shown(value: Any, limit: int = 60) -> str:
    """repr() of `value` cut to `limit` characters, built a piece at a time and stopped there, so a
    value that aliases made huge or deep costs no more than its first few items."""
    pieces: list[str] = []
    size = 0
    for piece in _repr_pieces(value, limit):
        pieces.append(piece)
        size += len(piece)
        if size > limit:
            break
    text = "".join(pieces)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _repr_pieces(value: Any, limit: int) -> Iterator[str]:
    """repr() of `value` in pieces, lazily; strings and bytes cut to `limit` before repr()."""
    if isinstance(value, dict):
        yield "{"
        for i, (k, v) in enumerate(value.items()):
            yield ", " if i else ""
            yield from _repr_pieces(k, limit)
            yield ": "
            yield from _repr_pieces(v, limit)
        yield "}"
    elif isinstance(value, (list, tuple)):
        yield "["
        for i, v in enumerate(value):
            yield ", " if i else ""
            yield from _repr_pieces(v, limit)
        yield "]"
    elif isinstance(value, (str, bytes)):
        yield repr(value[: limit + 1])
    elif isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 4 * limit:
        yield f"<an integer of {value.bit_length()} bits>"  # str() of a huge int is slow, or refused
    else:
        yield repr(value)


EXPECTED = {"training.micro_batch_size": 'a positive integer or "auto"'}


def _describe(err: dict[str, Any]) -> str:
    kind, value, ctx = err["type"], err.get("input"), err.get("ctx") or {}
    path, owner = _clean_loc(tuple(err["loc"]), kind)
    key = printable(".".join(path), 120) or "spec"
    if key in EXPECTED and kind != "missing":
        return f"{key}: expected {EXPECTED[key]}, got {shown(value)}"
    if kind == "extra_forbidden":
        fields = list(owner.model_fields) if owner else []
        hint = did_you_mean(path[-1], fields) or (f"; valid keys: {', '.join(fields)}" if fields else "")
        return f"unknown key '{key}'{hint}"
    if kind == "missing":
        return f"{key}: required key is missing"
    if kind in {"int_type", "int_parsing", "int_from_float"}:
        return f"{key}: expected an integer, got {shown(value)}"
    if kind in {"float_type", "float_parsing", "finite_number"}:
        return f"{key}: expected a finite number, got {shown(value)}"
    if kind in {"bool_type", "bool_parsing"}:
        return f"{key}: expected true or false, got {shown(value)}"
    if kind in {"string_type"}:
        return f"{key}: expected text, got {shown(value)}"
    if kind in {"model_type", "model_attributes_type", "dict_type"}:
        return f"{key}: expected a mapping of keys, got {shown(value)}"
    if kind == "literal_error":
        return f"{key}: {shown(value)} is not one of {ctx.get('expected')}"
    if kind in {"greater_than_equal", "greater_than"}:
        bound = ctx.get("ge", ctx.get("gt"))
        op = ">=" if kind == "greater_than_equal" else ">"
        return f"{key}: must be {op} {bound}, got {shown(value)}"
    if kind in {"less_than_equal", "less_than"}:
        bound = ctx.get("le", ctx.get("lt"))
        return f"{key}: {shown(value)} is absurdly large (limit {bound})"
    if kind == "value_error":
        msg = str(ctx.get("error", err["msg"]))
        return f"{key}: {msg}" if key != "spec" else msg
    if kind == "union_tag_invalid" or kind.startswith("union"):
        return f"{key}: invalid value {shown(value)}"
    return f"{key}: {err['msg']} (got {shown(value)})"
