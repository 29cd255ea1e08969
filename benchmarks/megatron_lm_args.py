"""Megatron-LM's own start-up checks over the launches megacpp renders, run on a CPU.

    MEGATRON_LM=/path/to/Megatron-LM python benchmarks/megatron_lm_args.py --dialect core_v0.16 [--out FILE]

Every bundled recipe and every configuration of the scale benchmark's published runs
(benchmarks/scale, both truth sets; as run, and with the layout free) is planned, its top --top
layouts rendered as `megacpp launch --engine megatron-lm` renders them (the arguments and the
job's environment), and each handed to the checkout's `parse_args` and `validate_args`: what
`pretrain_gpt.py` checks before it builds anything. A launch they refuse would stop at start-up
on the cluster. Specs the dialect cannot plan or render (megacpp says why) are counted apart.

The checkout must be of the dialect (core_v0.16: tag core_v0.16.1 on Python 3.11 or later, beside
megatron-core 0.16.1; main: its own megatron/core, Python 3.12) and import on a CPU: its imports
want six, regex and triton. Where `validate_args` asks the GPU or Transformer Engine, it is
answered as the job's hosts would: compute capability 9 on H100 and H200 presets and 10 on the
Blackwell ones, and TE 2.20.2, the version of the evidence's runs. Exit 1 when a launch is refused.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
from pathlib import Path
from typing import Any

sys.path.append(str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks.scale import truth  # noqa: E402
from megacpp.planner import MegacppError, build_plan, spec_from_dict  # noqa: E402
from megacpp.planner.megatron.args import TrainOptions, environment, megatron_args  # noqa: E402
from megacpp.planner.spec.loading import parse_yaml  # noqa: E402
from megacpp.recipes import recipe_names, recipe_text  # noqa: E402

TE_VERSION = "2.20.2"
HOPPER = {"h100", "h200"}


def specs() -> list[tuple[str, dict[str, Any]]]:
    """(name, spec document) of every bundled recipe, and every published configuration as run
    and with its layout free."""
    out = [(f"recipe {name}", parse_yaml(recipe_text(name), name)) for name in recipe_names()]
    for path in (truth.RUNS_FILE, truth.INDEPENDENT_FILE):
        for sel in truth.select_newest(truth.load_runs(path)):
            conv = truth.convert(sel.row)
            if conv.spec is not None and conv.search_spec is not None:
                name = f"row {sel.row['row_id']} {sel.row['model_key']} {sel.row['system']}"
                out += [(name, conv.spec), (f"{name} (layout free)", conv.search_spec)]
    return out


def check(megatron: Any, torch: Any, name: str, doc: dict[str, Any], dialect: str, top: int = 1) -> list[dict[str, Any]]:
    """The verdicts of one spec's top `top` layouts: planned and rendered in `dialect`, then
    Megatron-LM's checks (one "not planned" verdict where there is nothing to render)."""
    doc = {**doc, "backend": {**doc.get("backend", {}), "megatron": dialect}}
    try:
        plan = build_plan(spec_from_dict(doc, source=name), top=top)
    except MegacppError as exc:
        return [{"spec": name, "verdict": "not planned", "why": str(exc)}]
    if not plan.candidates:
        return [{"spec": name, "verdict": "not planned", "why": f"no legal layout under {dialect}"}]
    return [_launch(megatron, torch, name, plan, cand) for cand in plan.candidates]


def _launch(megatron: Any, torch: Any, name: str, plan: Any, cand: Any) -> dict[str, Any]:
    try:
        argv = megatron_args(plan.context, cand, TrainOptions())
    except MegacppError as exc:
        return {"spec": name, "verdict": "not planned", "why": str(exc)}
    arch = 9 if plan.context.cluster.gpu in HOPPER else 10
    saved_env, saved_argv, saved_capability = dict(os.environ), sys.argv, torch.cuda.get_device_capability
    megatron.get_device_arch_version = lambda: arch
    torch.cuda.get_device_capability = lambda *a, **k: (arch, 0)
    os.environ.update(environment(plan.context, cand), RANK="0", LOCAL_RANK="0", WORLD_SIZE=str(plan.world_size))
    sys.argv = ["pretrain_gpt.py", *argv]
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            megatron.validate_args(megatron.parse_args(), {})
        return {"spec": name, "verdict": "accepted", "layout": cand.layout.short()}
    except (AssertionError, ValueError, TypeError, SystemExit) as exc:  # what its checks raise
        return {"spec": name, "verdict": "refused", "layout": cand.layout.short(),
                "why": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        sys.argv, torch.cuda.get_device_capability = saved_argv, saved_capability


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python benchmarks/megatron_lm_args.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dialect", choices=["core_v0.16", "main"], required=True)
    ap.add_argument("--megatron-lm", type=Path, default=os.environ.get("MEGATRON_LM"),
                    help="a Megatron-LM checkout of the dialect (default: $MEGATRON_LM)")
    ap.add_argument("--top", type=int, default=5, help="layouts checked per spec (default 5)")
    ap.add_argument("--out", type=Path, help="write the verdicts as JSON")
    args = ap.parse_args(argv)
    if args.megatron_lm is None or not (args.megatron_lm / "megatron" / "training" / "arguments.py").is_file():
        print("error: --megatron-lm (or MEGATRON_LM) must name a Megatron-LM checkout", file=sys.stderr)
        return 2
    sys.path.insert(0, str(args.megatron_lm))
    import megatron.training.arguments as megatron  # the checkout's, ahead of any installed copy
    import torch
    from megatron.core import package_info
    from packaging.version import Version

    megatron.is_te_min_version = lambda version, check_equality=True: Version(TE_VERSION) >= Version(version)
    verdicts = [v for name, doc in specs() for v in check(megatron, torch, name, doc, args.dialect, args.top)]
    for v in verdicts:
        if v["verdict"] != "accepted":
            print(f"{v['spec']}: {v['verdict']}: {v['why']}")
    counts = {k: sum(v["verdict"] == k for v in verdicts) for k in ("accepted", "refused", "not planned")}
    checked = len({v["spec"] for v in verdicts})
    print(f"Megatron-LM {args.dialect} ({package_info.__version__}) at {args.megatron_lm}, the top {args.top} layouts "
          f"of {checked} specs: {counts['accepted']} launches accepted, {counts['refused']} refused, "
          f"{counts['not planned']} not planned or rendered in this dialect")
    if args.out:
        args.out.write_text(json.dumps({"dialect": args.dialect, "megatron_core": package_info.__version__,
                                        "te_version": TE_VERSION, "top": args.top, "specs": checked,
                                        "counts": counts, "verdicts": verdicts}, indent=1) + "\n")
    return 1 if counts["refused"] else 0


if __name__ == "__main__":
    sys.exit(main())
