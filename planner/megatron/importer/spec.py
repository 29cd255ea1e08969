"""An existing Megatron-LM launch read back into a megacpp spec with its layout pinned.

The reverse of args.py and job_args.py: each flag megacpp renders maps back onto the spec key it
came from (model.py, training.py), the flags a spec has no key for but a launch may carry go to
`launch.extra_args`, and every other flag is listed as not represented, with why, never dropped
(flags.py). Megatron-LM's own defaults stand where the script leaves a flag out (LayerNorm,
learned positions, tied embeddings, a linear decay to 0), so the spec describes the job the script runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

from megacpp.planner.errors import MegacppError, SpecError
from megacpp.planner.megatron.args import known_flags
from megacpp.planner.megatron.importer.flags import Flags
from megacpp.planner.megatron.importer.launcher import cluster_keys, launch_keys
from megacpp.planner.megatron.importer.layers import compact_pattern
from megacpp.planner.megatron.importer.model import ModelReader
from megacpp.planner.megatron.importer.script import LaunchCommand, from_arguments, read_script
from megacpp.planner.megatron.importer.training import TrainingReader
from megacpp.planner.plan import make_context
from megacpp.planner.search.stages import choose_split
from megacpp.planner.spec.clusters import PRESETS, resolve_cluster
from megacpp.planner.spec.loading import apply_override, one_line, spec_from_dict
from megacpp.planner.spec.models import ClusterSpec, Spec
from megacpp.planner.validation import broken_rules, complete_layout

DIALECTS = ("core_v0.16", "main")


@dataclass
class Imported:
    """The spec read from a launch, what it could not represent, and what else it noticed."""

    spec: Spec
    document: dict[str, Any]
    unsupported: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_yaml(self, source: str) -> str:
        """The spec YAML, headed by a comment block naming the source and every flag left out."""
        head = [f"# imported by `megacpp import` from {one_line(source, 120)}"]
        if self.unsupported:
            head.append("# not represented in this spec (the imported job set them; megacpp plans without them):")
            head += [f"#   {one_line(u, 200)}" for u in self.unsupported]
        head += [f"# note: {one_line(n, 200)}" for n in self.notes]
        return "\n".join([*head, *(line for key, value in self.document.items() for line in _section(key, value))]) + "\n"


def _flow(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=1 << 30, allow_unicode=True).removesuffix("\n...\n").strip()


def _section(key: str, value: Any) -> list[str]:
    """A top-level key in block style, each of its keys on one line (a sub-mapping in flow style)."""
    if not isinstance(value, dict):
        return [f"{key}: {_flow(value)}"]
    lines = [f"{key}:"]
    for child, inner in value.items():
        if isinstance(inner, dict) and any(isinstance(v, (dict, list)) for v in inner.values()):
            lines += ["  " + line for line in _section(child, inner)]
        else:
            lines.append(f"  {child}: {_flow(inner)}")
    return lines


@dataclass
class ImportOptions:
    """What the command line adds to a launch: the dialect, the cluster and --set overrides."""

    dialect: str | None = None  # None: from the entry point, else the dialect whose parser knows every flag
    cluster: str | None = None  # a preset (cluster.preset)
    nodes: int | None = None
    overrides: list[str] = field(default_factory=list)  # --set key=value, applied last


def _dialect(cmd: LaunchCommand, flags: Flags, chosen: str | None) -> str:
    if chosen is not None:
        if chosen not in DIALECTS:
            raise SpecError(f"--megatron {chosen!r}: choose one of {', '.join(DIALECTS)}")
        return chosen
    if cmd.entry_point == "pretrain_hybrid.py":
        return "main"
    if cmd.entry_point == "pretrain_mamba.py":
        return "core_v0.16"
    given = set(flags.order)
    if given <= known_flags("core_v0.16") or not given <= known_flags("main"):
        return "core_v0.16"
    return "main"


def import_launch(source: str | list[str], opts: ImportOptions, fallback_name: str = "imported") -> Imported:
    """A launch script's text, or Megatron-LM's argument list, read into a spec."""
    try:
        cmd = read_script(source) if isinstance(source, str) else from_arguments(source)
        return import_command(cmd, opts, cmd.name or fallback_name)
    except RecursionError:
        raise SpecError("nested too deeply") from None


def import_command(cmd: LaunchCommand, opts: ImportOptions, script_name: str | None = None) -> Imported:
    """The spec a Megatron-LM launch describes (layout pinned), and the flags it cannot carry."""
    flags = Flags(cmd.args)
    dialect = _dialect(cmd, flags, opts.dialect)
    unsupported: list[str] = []
    notes: list[str] = list(cmd.notes)
    reader = ModelReader(flags, dialect, unsupported, notes)
    model, layout, pipeline = reader.model(cmd.entry_point)
    cluster = cluster_keys(cmd, opts.cluster, opts.nodes, notes)
    world = cluster_world(cluster)
    parallel = reader.parallel(layout, world)
    training = TrainingReader(flags, dialect, unsupported, notes)
    doc: dict[str, Any] = {
        "name": script_name or "imported",
        "model": model,
        "training": training.training(parallel),
        "cluster": cluster,
        "backend": training.backend(dialect),
        "parallel": parallel,
    }
    doc.update(training.job())
    extra = training.leftovers()  # last: every flag read so far is taken
    launch = launch_keys(cmd, extra, notes, unsupported)
    if launch:
        doc["launch"] = launch
    for item in opts.overrides:
        apply_override(doc, item)
    spec = _validated(doc)
    spec, doc = _pin_uneven_split(spec, doc, pipeline, opts.overrides)
    notes += _broken_layout(spec)
    return Imported(spec=spec, document=doc, unsupported=unsupported, notes=notes)


def _broken_layout(spec: Spec) -> list[str]:
    """A note naming the first of the planner's rules the imported layout breaks: the spec is the
    script's job as written, and `megacpp validate` on it will refuse it for the same reason."""
    try:
        ctx = make_context(spec)
    except MegacppError:
        return []  # an unknown cluster: the notes already ask for one
    p, mbs = spec.parallel, spec.training.micro_batch_size
    if p.tp is None or p.pp is None or p.cp is None:
        return []
    lay = complete_layout(ctx, tp=p.tp, cp=p.cp, pp=p.pp, vpp=p.vpp or 1, ep=p.ep or 1, etp=p.etp,
                          mbs=mbs if isinstance(mbs, int) else 1)
    # a grid that does not tile the world is noted where the pins are read (ModelReader.parallel)
    broken = [b for b in broken_rules(ctx, lay) if not b.startswith("model-parallel-divides-world")]
    if not broken:
        return []
    return [f"the layout as the script writes it breaks {broken[0]}; `megacpp validate` on this spec refuses it"]


def cluster_world(cluster: dict[str, Any]) -> int | None:
    """GPUs in the world the cluster keys describe (None: the GPUs per node are not known)."""
    gpus = cluster.get("gpus_per_node") or PRESETS.get(cluster.get("preset") or "", {}).get("gpus_per_node")
    return gpus * cluster.get("nodes", 1) if gpus else None


def _validated(doc: dict[str, Any]) -> Spec:
    try:
        return spec_from_dict(doc, source="the imported spec")
    except SpecError as exc:
        raise SpecError(f"{exc} (fix the script, or pass --set KEY=VALUE)") from None


def _pin_uneven_split(spec: Spec, doc: dict[str, Any], pipeline: list[int] | None, overrides: list[str]) -> tuple[Spec, dict[str, Any]]:
    """Pin the script's stage split with `|` cuts where megacpp would split the pinned layout
    otherwise (the one the plan picks itself needs none). A script that states no split runs
    Megatron's even one, which is pinned alike where the layers divide."""
    pins = spec.parallel
    chunks = (pins.pp or 1) * (pins.vpp or 1)
    if chunks < 2 or any(o.startswith("model.pattern") for o in overrides):
        return spec, doc  # no split to pin, or --set changed the stages or the pattern
    if pipeline is None and (pins.pipeline_layout is not None or pins.account_for_embedding or pins.account_for_loss):
        return spec, doc  # the spec pins the split itself
    try:
        ctx = make_context(spec)
    except SpecError:  # an inline cluster without compute numbers: the split needs only FLOPs
        ctx = make_context(spec, resolve_cluster(ClusterSpec(preset="h100-sxm-8", nodes=spec.cluster.nodes)))
    if pipeline is None and ctx.num_layers % chunks == 0:
        pipeline = [ctx.num_layers // chunks] * chunks
    if pipeline is None or len(pipeline) != chunks:
        return spec, doc
    if sum(pipeline) != ctx.num_layers:
        raise SpecError(f"the script's pipeline stages hold {sum(pipeline)} layers, the model has {ctx.num_layers}")
    if list(choose_split(ctx, pins.pp or 1, pins.vpp or 1).sizes) == pipeline:
        return spec, doc
    step = 2 if ctx.plain_transformer else 1
    cuts, at = [], 0
    for size in pipeline[:-1]:
        at += size * step
        cuts.append(at)
    model = {**doc["model"], "pattern": compact_pattern(spec.pattern.blocks, cuts)}
    doc = {**doc, "model": model}
    return _validated(doc), doc
