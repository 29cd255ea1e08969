"""A table of a system's own measured runs, for `megacpp calibrate TABLE.yaml|TABLE.csv`.

One row per run, the same keys in YAML (a list of mappings, or `runs:` holding one) and CSV (a
header row; an empty cell is an absent key):

    name                  free text (default "row N"); unique
    spec                  a spec YAML (relative to the table's folder) or a recipe name
    model                 YAML only, instead of `spec`: the spec's model block inline
    cluster, nodes        the preset and node count (they replace the spec's; needed with `model`)
    tp pp vpp cp ep etp   the layout that ran (tp and pp needed; vpp, cp, ep 1 and etp tp if absent)
    mbs gbs seq           micro and global batch, sequence length (they replace the spec's)
    precision, recompute  bf16 | fp8, none | selective | full (they replace the spec's)
    tokens_per_s_per_gpu  measured throughput per GPU, or `step_s` the measured step; exactly one
    peak_gib              optional: the measured peak memory per GPU (reported beside the plan's)
    set                   optional spec overrides, as `megacpp plan --set` takes them ("a=1; b=2" in CSV)

Each row becomes the spec with its layout pinned; a row that is not a legal layout, or whose keys
are missing or malformed, is refused with one line naming the row and the key.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, get_args

from megacpp.planner.errors import MegacppError, PlanError, did_you_mean, printable
from megacpp.planner.plan import build_plan, make_context
from megacpp.planner.search.layout import Context, Layout
from megacpp.planner.search.stages import Stage, assign_stages
from megacpp.planner.spec.loading import apply_override, one_line, parse_yaml, shown, spec_from_dict
from megacpp.planner.spec.models import Spec
from megacpp.planner.spec.training import TrainingSpec

# a table of a few dozen runs is a few KB; each row is planned dozens of times by the fit
MAX_TABLE_BYTES = 1 << 20
MAX_TABLE_ROWS = 200

LAYOUT_KEYS = ("tp", "pp", "vpp", "cp", "ep", "etp")
TRAINING_KEYS = {"mbs": "micro_batch_size", "gbs": "global_batch_size", "seq": "seq_length"}
# the spec's own choices, so a table takes every precision and recompute mode a spec does
CHOICES = {key: get_args(TrainingSpec.model_fields[key].annotation) for key in ("precision", "recompute")}
MEASURED_KEYS = ("tokens_per_s_per_gpu", "step_s")
KEYS = ("name", "spec", "model", "cluster", "nodes", *LAYOUT_KEYS, *TRAINING_KEYS, *CHOICES, *MEASURED_KEYS,
        "peak_gib", "set")


@dataclass(frozen=True)
class MeasuredRun:
    """One row: its spec with the layout pinned, the layout as the planner prices it, and what
    the run measured."""

    name: str
    ctx: Context
    layout: Layout
    stages: list[Stage]
    measured_step_s: float
    measured_peak_gib: float | None
    # the planned step by the cluster coefficients tried (cluster_fit.step_seconds): a fit's
    # leave-one-out folds try many of the same
    planned: dict[tuple[tuple[str, float], ...], float] = field(default_factory=dict, init=False, compare=False, repr=False)

    @property
    def tokens_per_step_per_gpu(self) -> float:
        training = self.ctx.spec.training
        return training.global_batch_size * self.ctx.seq / self.ctx.world


# resolves a row's `spec` reference (a path or a recipe name) with `--set` style overrides
SpecLoader = Callable[[str, list[str]], Spec]


def parse_table(raw: bytes, source: str, is_csv: bool) -> list[dict[str, Any]]:
    """The rows of a table file's bytes, each a mapping of its keys (values as written)."""
    if len(raw) > MAX_TABLE_BYTES:
        raise PlanError(f"{source}: larger than {MAX_TABLE_BYTES} bytes; a table of measured runs is a few KB")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise PlanError(f"{source}: not UTF-8 text") from None
    rows = _csv_rows(text, source) if is_csv else _yaml_rows(text, source)
    if not rows:
        raise PlanError(f"{source}: no rows; write one row per measured run (keys: {', '.join(KEYS)})")
    return rows


def _yaml_rows(text: str, source: str) -> list[dict[str, Any]]:
    try:
        data = parse_yaml(text, source)
    except MegacppError as exc:
        raise PlanError(str(exc)) from None
    if isinstance(data, dict) and set(data) == {"runs"}:
        data = data["runs"]
    if not isinstance(data, list):
        raise PlanError(f"{source}: expected a list of rows (or `runs:` holding one), one mapping per measured run")
    _check_count(len(data), source)
    for i, row in enumerate(data, 1):
        if not isinstance(row, dict):
            raise PlanError(f"{source} row {i}: expected a mapping of keys ({', '.join(KEYS[:6])}, ...), got {shown(row, 40)}")
    return data


def _csv_rows(text: str, source: str) -> list[dict[str, Any]]:
    try:
        reader = csv.reader(io.StringIO(text, newline=""))
        header = next(reader, None)
        if header is None:
            return []
        header = [h.strip() for h in header]
        rows = []
        for i, cells in enumerate(reader, 1):
            _check_count(i, source)
            if not any(c.strip() for c in cells):
                continue
            if len(cells) > len(header):
                raise PlanError(f"{source} row {i}: {len(cells)} cells under {len(header)} column names")
            rows.append({k: c.strip() for k, c in zip(header, cells, strict=False) if c.strip()})
    except csv.Error as exc:
        raise PlanError(f"{source}: not readable CSV ({one_line(str(exc), 120)})") from None
    return rows


def _check_count(n: int, source: str) -> None:
    if n > MAX_TABLE_ROWS:
        raise PlanError(f"{source}: more than {MAX_TABLE_ROWS} rows; calibrate plans each row dozens of times, "
                        f"so keep at most {MAX_TABLE_ROWS} runs of one system")


class _Row:
    """One row's keys, read with errors that name the row and the key."""

    def __init__(self, row: dict[str, Any], where: str) -> None:
        self.row, self.where = row, where

    def fail(self, key: str, what: str) -> PlanError:
        return PlanError(f"{self.where}: '{key}': {what}")

    def text(self, key: str) -> str | None:
        value = self.row.get(key)
        if value is None:
            return None
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise self.fail(key, f"must be text, got {shown(value, 40)}")
        return str(value)

    def integer(self, key: str) -> int | None:
        value = self.row.get(key)
        if value is None:
            return None
        try:
            number = int(value) if isinstance(value, (int, str)) and not isinstance(value, bool) else None
        except ValueError:
            number = None
        if number is None or not 1 <= number <= 1 << 24:
            raise self.fail(key, f"must be a positive integer, got {shown(value, 40)}")
        return number

    def number(self, key: str) -> float | None:
        value = self.row.get(key)
        if value is None:
            return None
        try:
            number = float(value) if isinstance(value, (int, float, str)) and not isinstance(value, bool) else None
        except ValueError:
            number = None
        if number is None or not 0 < number < 1e15:
            raise self.fail(key, f"must be a positive number, got {shown(value, 40)}")
        return number

    def choice(self, key: str) -> str | None:
        value = self.text(key)
        if value is not None and value not in CHOICES[key]:
            raise self.fail(key, f"must be one of {', '.join(CHOICES[key])}, got {shown(value, 40)}")
        return value

    def sets(self) -> list[str]:
        value = self.row.get("set")
        if value is None:
            return []
        if isinstance(value, str):
            items = [s.strip() for s in value.split(";") if s.strip()]
        elif isinstance(value, dict):
            items = [f"{k}={v}" for k, v in value.items()]
        elif isinstance(value, list) and all(isinstance(s, str) for s in value):
            items = list(value)
        else:
            raise self.fail("set", "must be key=value overrides: a list, a mapping, or 'a=1; b=2'")
        if not all("=" in s for s in items):
            raise self.fail("set", "each override is key=value, e.g. training.cuda_graphs=layers")
        return items


def _name_text(name: Any) -> str:
    """A row's name as text; one that is not text (a list, a mapping) is shown, bounded."""
    return name if isinstance(name, str) else shown(name, 200)


def measured_run(row: dict[str, Any], index: int, source: str, load: SpecLoader) -> MeasuredRun:
    """One table row as a priced run: its spec with the layout pinned, checked by the planner's rules."""
    name = row.get("name")
    where = f"{source} row {index}" + (f" ({one_line(_name_text(name), 40)})" if name is not None else "")
    r = _Row(row, where)
    unknown = [k for k in row if k not in KEYS]
    if unknown:
        key = printable(str(unknown[0]), 60)  # a CSV header or YAML key, as typed: control characters escaped
        raise r.fail(key, f"unknown key{did_you_mean(key, list(KEYS))}; a row has {', '.join(KEYS)}")
    overrides = _overrides(r)
    spec = _spec(r, overrides, load)
    measured = [k for k in MEASURED_KEYS if row.get(k) is not None]
    if len(measured) != 1:
        raise r.fail("tokens_per_s_per_gpu", "give the measured tokens_per_s_per_gpu or the measured step_s (exactly one)")
    ctx = make_context(spec)
    if spec.training.micro_batch_size == "auto":
        raise r.fail("mbs", "the spec's micro_batch_size is auto; give the micro-batch size the run used")
    layout = _pinned_layout(r, spec)
    value = r.number(measured[0])
    assert value is not None
    tokens = spec.training.global_batch_size * ctx.seq / ctx.world
    step = value if measured[0] == "step_s" else tokens / value
    return MeasuredRun(name=_name_text(name) if name is not None else f"row {index}", ctx=ctx, layout=layout,
                       stages=assign_stages(ctx, layout.pp, layout.vpp)[1], measured_step_s=step,
                       measured_peak_gib=r.number("peak_gib"))


def _overrides(r: _Row) -> list[str]:
    """The row's keys as spec overrides (`--set` items)."""
    out = []
    cluster, nodes = r.text("cluster"), r.integer("nodes")
    if cluster is not None:
        out.append(f"cluster.preset={cluster}")
    if nodes is not None:
        out.append(f"cluster.nodes={nodes}")
    for key, spec_key in TRAINING_KEYS.items():
        if (value := r.integer(key)) is not None:
            out.append(f"training.{spec_key}={value}")
    for key in CHOICES:
        if (choice := r.choice(key)) is not None:
            out.append(f"training.{key}={choice}")
    return out + r.sets()


def _spec(r: _Row, overrides: list[str], load: SpecLoader) -> Spec:
    ref, model = r.text("spec"), r.row.get("model")
    if (ref is None) == (model is None):
        raise r.fail("spec", "give a spec (a spec YAML or a recipe name) or an inline model (YAML tables), exactly one")
    try:
        if ref is not None:
            spec = load(ref, overrides)
            make_context(spec)  # the cluster resolves
            return spec
        if not isinstance(model, dict):
            raise r.fail("model", "must be the spec's model block (a mapping)")
        if r.row.get("cluster") is None or r.row.get("seq") is None or r.row.get("gbs") is None:
            missing = next(k for k in ("cluster", "seq", "gbs") if r.row.get(k) is None)
            raise r.fail(missing, "a row with an inline model needs cluster, nodes, seq and gbs")
        data: dict[str, Any] = {"name": _name_text(r.row.get("name") or "table-row"), "model": model, "training": {}, "cluster": {}}
        for item in overrides:
            apply_override(data, item)
        spec = spec_from_dict(data, source=r.where)
        make_context(spec)
        return spec
    except PlanError:
        raise
    except MegacppError as exc:  # an inline model's errors already name the row (spec_from_dict's source)
        raise PlanError(f"{r.where}: {one_line(str(exc).removeprefix(f'{r.where}: '), 240)}") from None


def _pinned_layout(r: _Row, spec: Spec) -> Layout:
    """The layout the row ran, pinned in its spec and checked by the planner's rules."""
    tp, pp = r.integer("tp"), r.integer("pp")
    if tp is None or pp is None:
        raise r.fail("tp" if tp is None else "pp", "the layout needs tp and pp (vpp, cp, ep default to 1, etp to tp)")
    cp = r.integer("cp") or 1
    world = make_context(spec).world
    if world % (tp * pp * cp):
        raise r.fail("tp", f"tp x pp x cp = {tp * pp * cp} does not divide the {world} GPUs of {spec.cluster.nodes} nodes")
    pins = {"tp": tp, "pp": pp, "cp": cp, "vpp": r.integer("vpp") or 1, "ep": r.integer("ep") or 1,
            "etp": r.integer("etp") or tp, "dp": world // (tp * pp * cp)}
    if spec.model.moe is None:
        pins.pop("etp")
    pinned = spec.model_copy(update={"parallel": spec.parallel.model_copy(update=pins)})
    try:
        plan = build_plan(spec_from_dict(pinned.model_dump(mode="json"), source=r.where), top=1)
    except MegacppError as exc:
        raise PlanError(f"{r.where}: {one_line(str(exc), 240)}") from None
    if not plan.candidates:
        example = plan.rejected.examples[0] if plan.rejected.examples else None
        why = f"{example.rule}: {example.message}" if example else "no legal layout"
        raise r.fail("layout", f"{' '.join(f'{k}{v}' for k, v in pins.items())} is not legal ({one_line(why, 200)})")
    return plan.candidates[0].layout


def measured_runs(rows: list[dict[str, Any]], source: str, load: SpecLoader) -> list[MeasuredRun]:
    """Every row of a table as a measured run; names unique, one system (cluster preset) only."""
    runs: list[MeasuredRun] = []
    for i, row in enumerate(rows, 1):
        run = measured_run(row, i, source, load)
        if any(x.name == run.name for x in runs):
            raise PlanError(f"{source} row {i}: 'name': {shown(run.name)} is used by an earlier row; names must be unique")
        runs.append(run)
    systems = sorted({run.ctx.cluster.name for run in runs})
    if len(systems) > 1:
        raise PlanError(f"{source}: the rows span clusters {', '.join(systems)}; calibrate one system at a time")
    return runs
