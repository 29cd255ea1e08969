"""The `megacpp` command line: parse, call one library function, print.

Importing this module must stay cheap: no torch, no megatron (checked by a test).
"""

from __future__ import annotations

import json
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from megacpp.planner.errors import LaunchError, MegacppError, PlanError, SpecError

app = typer.Typer(
    name="megacpp",
    help="Plan, explain and launch Megatron-Core parallel layouts for hybrid attention/Mamba/MoE/recurrent models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
explain_app = typer.Typer(help="Explain a layout or a rule.", no_args_is_help=True)
app.add_typer(explain_app, name="explain")

# Shared options, defined once.
SpecArg = Annotated[str | None, typer.Argument(help="Spec YAML, PLAN.json or recipe name (default: the bundled nam56r recipe).")]
SetOpt = Annotated[list[str], typer.Option("--set", help="Override a spec key: --set parallel.tp=2 (repeatable).")]
ClusterOpt = Annotated[str | None, typer.Option("--cluster", help="Cluster preset (see `megacpp clusters`).")]
NodesOpt = Annotated[int | None, typer.Option("--nodes", min=1, help="Number of nodes.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the JSON document instead of tables.")]


class Format(str, Enum):
    text = "text"
    json = "json"
    github = "github"


class Engine(str, Enum):
    megatron_lm = "megatron-lm"
    megacpp = "megacpp"


EngineOpt = Annotated[Engine, typer.Option("--engine", help="megatron-lm (stock Megatron-LM, needs $MEGATRON_LM to launch) or megacpp's runtime worker.")]


def _spec_or_plan(spec: str | None, sets: list[str], cluster: str | None, nodes: int | None):
    from megacpp.runtime.cli.inputs import cli_overrides, read_input

    return read_input(spec, cli_overrides(sets, cluster, nodes))


@app.command()
def plan(
    spec: SpecArg = None,
    cluster: ClusterOpt = None,
    nodes: NodesOpt = None,
    set_: SetOpt = [],  # noqa: B006
    top: Annotated[int, typer.Option("--top", min=1, help="How many ranked layouts to show/keep.")] = 10,
    every_vpp: Annotated[bool, typer.Option(
        "--every-vpp", help="Rank each VPP of a layout on its own (default: each layout once, at its best VPP).")] = False,
    as_json: JsonOpt = False,
    out: Annotated[Path | None, typer.Option("--out", help="Write the plan document to this file.")] = None,
    profile: Annotated[Path | None, typer.Option("--profile", help="Cluster profile from `megacpp calibrate`.")] = None,
) -> None:
    """Solve a spec into every legal layout and rank them."""
    from megacpp.planner.plan import DEFAULTS, Plan, build_plan
    from megacpp.runtime.cli import executors, stdout

    loaded = _spec_or_plan(spec, set_, cluster, nodes)
    if isinstance(loaded, Plan):
        raise PlanError(f"{spec}: is already a plan; pass the spec YAML to re-plan, or use `megacpp explain layout {spec}`")
    result = build_plan(loaded, top=top, profile=_read_profile(profile, loaded) if profile is not None else DEFAULTS,
                        every_vpp=every_vpp)
    text = json.dumps(result.to_json_dict(), indent=2)
    if out is not None:
        try:
            executors.write_atomically(out, text + "\n")
        except OSError as exc:
            raise PlanError(f"--out {out}: cannot write ({exc.strerror})") from None
    if as_json:
        stdout.print_json(text)
        return
    from megacpp.runtime.cli import console

    console.plan_table(result, top)
    if not result.legal_count:
        raise PlanError("no legal layout; the counts above name the rules that rejected them (`megacpp explain rule RULE`)")
    if out is not None:
        console.wrote(out)


@app.command()
def validate(
    files: Annotated[list[Path], typer.Argument(help="Spec YAML or PLAN.json files.")],
    fmt: Annotated[Format, typer.Option("--format", help="text, json, or github (::error annotations).")] = Format.text,
    engine: EngineOpt = Engine.megatron_lm,
) -> None:
    """Check specs and plans for the engine that will run them; exit 0 when all are valid, 1 when any is not."""
    from megacpp.planner.plan import Plan
    from megacpp.planner.validation import validate_plan, validate_spec, validation_error
    from megacpp.runtime.cli import console, stdout
    from megacpp.runtime.cli.inputs import read_input

    results = []
    for path in files:
        try:
            loaded = read_input(str(path))
            result = validate_plan(loaded, engine.value) if isinstance(loaded, Plan) else validate_spec(loaded, engine.value)
        except MegacppError as exc:
            result = validation_error(exc)
        results.append({"file": str(path), **result})
    if fmt == Format.json:
        stdout.print_json(json.dumps(results, indent=2))
    else:
        console.validate_report(results, fmt.value)
    if not all(r["valid"] for r in results):
        raise typer.Exit(1)


# run reports of a whole campaign run to a few MB
MAX_JSON_BYTES = 256 << 20


def _read_json(path: Path, what: str):
    from megacpp.planner.spec.loading import read_capped
    from megacpp.runtime.cli.inputs import parse_json

    if not path.exists():
        raise PlanError(f"{path}: no such {what} file")
    try:
        raw = read_capped(path, MAX_JSON_BYTES, f"a JSON {what}")
    except SpecError as exc:
        raise PlanError(str(exc)) from None
    return parse_json(raw, f"{path}: not a readable JSON {what}")


def _read_profile(path: Path, spec):
    """The cluster profile at `path`, as the plan records it; it must be the spec's cluster's."""
    from megacpp.planner.calibrate.profile import (
        check_profile_cluster,
        cluster_from_profile,
        efficiency_from_profile,
    )
    from megacpp.planner.plan import Profile, make_context

    doc = _read_json(path, "cluster profile")
    eff = efficiency_from_profile(doc)
    check_profile_cluster(doc, make_context(spec).cluster.name, str(path))
    return Profile.of(eff, source=str(path), cluster=cluster_from_profile(doc))


@app.command()
def calibrate(
    reports: Annotated[list[Path], typer.Argument(help="Run reports (report.json from `megacpp launch --engine megacpp`, or a gpu_runs file), or one table of measured runs (.yaml or .csv).")],
    out: Annotated[Path | None, typer.Option("--out", help="Write the cluster profile here (use with `plan --profile`).")] = None,
) -> None:
    """Fit the cluster's per-block overheads (host, launch, synchronisation) from the runtime's run
    reports, or a few cluster coefficients (matmul rate, host class, NIC bandwidth) from a table of
    the system's own measured runs.

    A table (.yaml: a list of rows; .csv: a header row) has one row per run: name; spec (a spec YAML
    relative to the table, or a recipe name) or, in YAML, model (inline); cluster and nodes; the
    layout tp, pp, vpp, cp, ep, etp; mbs, gbs, seq, precision, recompute (replacing the spec's);
    tokens_per_s_per_gpu or step_s as measured; optionally peak_gib and set (spec overrides).
    """
    from megacpp.planner.calibrate.fit import calibrate as fit_profile
    from megacpp.runtime.cli import console, executors
    from megacpp.runtime.cli.inputs import is_table, read_table

    tables = [path for path in reports if is_table(path)]
    if tables and len(reports) > 1:
        raise PlanError("calibrate takes one table of measured runs, or run reports; not both, nor two tables")
    if tables:
        from megacpp.planner.calibrate.cluster_fit import calibrate_table

        profile = calibrate_table(read_table(tables[0]))
    else:
        runs, sources = [], []
        for path in reports:
            doc = _read_json(path, "run report")
            found = (doc["runs"] if isinstance(doc, dict) and isinstance(doc.get("runs"), list)
                     else doc if isinstance(doc, list) else [doc])
            runs.extend(found)
            sources.extend([str(path)] * len(found))
        profile = fit_profile(runs, sources)
    if out is not None:
        try:
            executors.write_atomically(out, json.dumps(profile, indent=2) + "\n")
        except OSError as exc:
            raise PlanError(f"--out {out}: cannot write ({exc.strerror})") from None
    (console.table_calibration if tables else console.calibration_table)(profile)
    if out is not None:
        console.wrote(out, then=f"; use it with `megacpp plan SPEC --profile {console.user_text(out)}`")


class Target(str, Enum):
    torchrun = "torchrun"
    slurm = "slurm"


@app.command()
def launch(
    spec: Annotated[str, typer.Argument(help="Spec YAML, PLAN.json or recipe name.")],
    target: Annotated[Target, typer.Option("--target", help="torchrun (local or multi-node) or slurm (sbatch + srun).")] = Target.torchrun,
    engine: EngineOpt = Engine.megatron_lm,
    candidate: Annotated[int, typer.Option("--candidate", min=0, help="Which ranked candidate of the plan to launch.")] = 0,
    steps: Annotated[int | None, typer.Option("--steps", min=1, max=1 << 40, help="Training iterations, for a short run of the spec's schedule (default: training.train_iters or train_tokens, else 100).")] = None,
    construct_only: Annotated[bool, typer.Option("--construct-only", help="megacpp engine: build the model and report, no training.")] = False,
    profile: Annotated[bool, typer.Option("--profile", help="megacpp engine: time one extra step's kernels by kind into the report.")] = False,
    trace: Annotated[bool, typer.Option("--trace", help="megacpp engine: with --profile, also write each rank's profiled step as a Chrome trace under OUT/traces.")] = False,
    memory_peak: Annotated[bool, typer.Option("--memory-peak", help="megacpp engine: break one extra step's peak memory down by allocation site in the report.")] = False,
    nproc_per_node: Annotated[int | None, typer.Option("--nproc-per-node", min=1, help="Processes per node (default: the cluster's GPUs per node).")] = None,
    cpu: Annotated[bool, typer.Option("--cpu", help="Slurm: request CPUs, not GPUs (construction-mode jobs).")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Write and print the scripts; run nothing.")] = False,
    out: Annotated[Path, typer.Option("--out", help="Folder for the scripts, plan.json, logs and report.")] = Path("megacpp-run"),
    set_: SetOpt = [],  # noqa: B006
    cluster: ClusterOpt = None,
    nodes: NodesOpt = None,
) -> None:
    """Render the chosen layout into launch scripts and run them (torchrun) or submit them (Slurm)."""
    from megacpp.planner.megatron.args import TrainOptions
    from megacpp.planner.megatron.render import SCRIPT_NAMES, RenderOptions, render_launch
    from megacpp.planner.plan import Plan, build_plan
    from megacpp.runtime.cli import console, executors, stdout

    loaded = _spec_or_plan(spec, set_, cluster, nodes)
    plan_doc = loaded if isinstance(loaded, Plan) else build_plan(loaded, top=max(10, candidate + 1))
    opts = RenderOptions(
        target=target.value, engine=engine.value, candidate=candidate, train=TrainOptions(train_iters=steps),
        nproc_per_node=nproc_per_node, cpu=cpu, construct_only=construct_only, profile=profile or trace,
        memory_peak=memory_peak, trace=trace,
    )
    files = render_launch(plan_doc, opts)
    executors.write_files(out, files)
    script = out / SCRIPT_NAMES[target.value]
    if dry_run:
        stdout.print_json(files[script.name].rstrip("\n"))
        console.wrote(script, out / "plan.json", then=" (dry run: nothing started)")
        return
    try:
        code = executors.run_torchrun(script) if target == Target.torchrun else executors.submit_slurm(script)
    except executors.Stopped as stop:
        ended = "its process group was ended" if target == Target.torchrun else "the Slurm job was cancelled"
        console.error(f"stopped by {stop}: {ended}")
        raise typer.Exit(128 + stop.signum) from None
    if code != 0:
        raise LaunchError(f"the job failed with exit code {code}; rank logs are under {out / 'logs'}" if target == Target.torchrun
                          else f"the Slurm job failed with exit code {code}; see the megacpp-*.log in {out}")
    console.err.print(f"job finished; outputs in {out}")


class Dialect(str, Enum):
    core_v0_16 = "core_v0.16"
    main = "main"


@app.command("import")
def import_script(
    source: Annotated[list[str], typer.Argument(metavar="SCRIPT | -- ARGS", help="A Megatron-LM launch script (bash; nothing in it is run), or Megatron-LM's arguments after -- ([pretrain_*.py] --flag value ...).")],
    cluster: ClusterOpt = None,
    nodes: NodesOpt = None,
    megatron: Annotated[Dialect | None, typer.Option("--megatron", help="The Megatron-LM dialect, core_v0.16 or main (default: from the entry point, else the one whose parser knows every flag).")] = None,
    set_: SetOpt = [],  # noqa: B006
    out: Annotated[Path | None, typer.Option("--out", help="Write the spec YAML to this file instead of stdout.")] = None,
) -> None:
    """Read an existing Megatron-LM launch into a spec with its layout pinned; list every flag the spec cannot carry."""
    from megacpp.planner.megatron.importer import ImportOptions, import_launch
    from megacpp.runtime.cli import console, executors, stdout
    from megacpp.runtime.cli.inputs import read_launch

    text, name = read_launch(source)
    result = import_launch(text, ImportOptions(dialect=megatron.value if megatron else None, cluster=cluster, nodes=nodes, overrides=set_), name)
    shown = source[0] if isinstance(text, str) else "Megatron-LM arguments"
    console.import_report(result.unsupported, result.notes)
    if out is None:
        stdout.print_text(result.to_yaml(shown))
        return
    try:
        executors.write_atomically(out, result.to_yaml(shown))
    except OSError as exc:
        raise SpecError(f"--out {out}: cannot write ({exc.strerror})") from None
    console.wrote(out, then=f"; next: megacpp validate {console.user_text(out)}, megacpp explain layout {console.user_text(out)}")


@app.command()
def recipes() -> None:
    """List the bundled recipes."""
    from megacpp.planner.spec.loading import load_spec_text
    from megacpp.recipes import recipe_names, recipe_text
    from megacpp.runtime.cli import console

    rows = []
    for name in recipe_names():
        s = load_spec_text(recipe_text(name), source=f"recipe {name}")
        rows.append([name, s.model.pattern, f"{s.cluster.nodes} x {s.cluster.preset}", s.backend.megatron, s.name])
    console.simple_table("bundled recipes (megacpp plan NAME)", ["recipe", "pattern", "cluster", "megatron", "name"], rows)


@app.command()
def clusters() -> None:
    """List the cluster presets."""
    from megacpp.planner.spec.clusters import PRESETS
    from megacpp.runtime.cli import console

    rows = [
        [name, str(p["gpus_per_node"]), str(p["nvlink_domain"]), f"{p['gpu_memory_gib']:g}", f"{p['bf16_tflops']:g}", p["description"]]
        for name, p in PRESETS.items()
    ]
    console.simple_table(
        "cluster presets (--cluster NAME)", ["preset", "GPUs/node", "NVLink domain", "plan GiB", "BF16 TFLOP/s", "description"], rows
    )


@explain_app.command("layout")
def explain_layout_cmd(
    spec: SpecArg = None,
    rank: Annotated[int | None, typer.Option("--rank", min=0, help="Focus on one GPU: its stage, blocks, experts and peers.")] = None,
    candidate: Annotated[int, typer.Option("--candidate", min=0, help="Which ranked candidate to explain.")] = 0,
    versus: Annotated[str | None, typer.Option(
        "--versus", help="Price another layout beside it, term by term: 'tp4 pp8 vpp5 cp2 ep8' (left out: 1; dp follows).")] = None,
    as_json: JsonOpt = False,
    svg: Annotated[Path | None, typer.Option("--svg", help="Write the rank-grid picture as SVG.")] = None,
    png: Annotated[Path | None, typer.Option("--png", help="Write the rank-grid picture as PNG.")] = None,
    cluster: ClusterOpt = None,
    nodes: NodesOpt = None,
    set_: SetOpt = [],  # noqa: B006
) -> None:
    """The rank map, who owns what, what each split cannot fix, and why the others lost."""
    from megacpp.planner.explain import explain_layout
    from megacpp.planner.plan import Plan, build_plan
    from megacpp.runtime.cli import stdout

    loaded = _spec_or_plan(spec, set_, cluster, nodes)
    plan_doc = loaded if isinstance(loaded, Plan) else build_plan(loaded, top=max(10, candidate + 1))
    doc = explain_layout(plan_doc, candidate=candidate, rank=rank, against=versus)
    if svg is not None or png is not None:
        from megacpp.runtime.cli import console
        from megacpp.runtime.cli.picture import draw_layout

        for path in (p for p in (svg, png) if p is not None):
            draw_layout(doc, path)
            console.wrote(path)
    if as_json:
        stdout.print_json(json.dumps(doc, indent=2))
        return
    from megacpp.runtime.cli import console

    console.explain_text(doc)


@explain_app.command("rule")
def explain_rule(
    rule_id: Annotated[str | None, typer.Argument(metavar="RULE", help="Rule id, e.g. tp-divides-heads.")] = None,
    list_all: Annotated[bool, typer.Option("--list", help="List every rule id.")] = False,
) -> None:
    """What a rule checks, where Megatron enforces it, and an example that fails and passes."""
    from megacpp.planner.search.rules import RULES, get_rule
    from megacpp.runtime.cli import console

    if list_all or rule_id is None:
        console.simple_table("rules", ["rule", "severity", "where"], [[r.id, r.severity, r.where] for r in RULES])
        return
    r = get_rule(rule_id)
    console.rule_text({"id": r.id, "severity": r.severity, "doc": r.doc, "where": r.where, "fails": r.fails, "passes": r.passes})


def main() -> None:
    """Console entry point: user errors become one line on stderr and exit code 1."""
    try:
        app()
    except MegacppError as exc:
        if os.environ.get("MEGACPP_DEBUG") == "1":
            raise
        from megacpp.runtime.cli import console

        console.error(str(exc))
        sys.exit(1)


__all__ = ["app", "main", "SpecError"]

