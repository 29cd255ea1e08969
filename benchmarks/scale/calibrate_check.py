"""Calibrate on the scale truth's tuning half of one system, and check on its held-out half.

    python -m benchmarks.scale.calibrate_check [--system H100] --out DIR

Writes DIR/tuning.csv and DIR/held_out.csv, tables of measured runs as `megacpp calibrate` reads
them (one spec YAML per row under DIR/specs, the published layout and tokens/s/GPU in the row),
runs the calibration on the tuning table alone (the profile: DIR/profile.json), and prints each
coefficient before and after and the held-out rows' median |error| with the shipped coefficients
and with the profile. Nothing under benchmarks/scale/results is written.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import yaml

from benchmarks.scale.truth import (
    INDEPENDENT_FILE,
    INDEPENDENT_SYSTEMS,
    RUNS_FILE,
    convert,
    load_runs,
    published_peak_gib,
    select_newest,
)
from megacpp.planner.calibrate.cluster_fit import calibrate_table, step_seconds
from megacpp.runtime.cli.inputs import read_table

COLUMNS = ("name", "spec", "cluster", "nodes", "tp", "pp", "vpp", "cp", "ep", "etp", "mbs", "gbs", "seq",
           "precision", "recompute", "tokens_per_s_per_gpu", "peak_gib")


def write_tables(system: str, out: Path) -> dict[str, Path]:
    """One table per half of the system's plannable rows, each row's spec beside it."""
    (out / "specs").mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[dict[str, Any]]] = {"tuning": [], "held-out": []}
    for sel in select_newest(load_runs(INDEPENDENT_FILE if system in INDEPENDENT_SYSTEMS else RUNS_FILE)):
        row = sel.row
        conv = convert(row)
        if row["system"] != system or conv.spec is None:
            continue
        spec = conv.spec
        name = f"row{row['row_id']}-{row['model_key']}-x{row['num_gpus']}"
        (out / "specs" / f"{name}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
        p = spec["parallel"]
        # the independent systems' rows split by the same hash as the tuning set's
        rows["held-out" if sel.held_out else "tuning"].append({
            "name": name, "spec": f"specs/{name}.yaml", "cluster": spec["cluster"]["preset"], "nodes": spec["cluster"]["nodes"],
            "tp": p["tp"], "pp": p["pp"], "vpp": p["vpp"], "cp": p["cp"], "ep": p["ep"], "etp": p.get("etp", ""),
            "mbs": spec["training"]["micro_batch_size"], "gbs": spec["training"]["global_batch_size"], "seq": row["seq_length"], "precision": spec["training"]["precision"],
            "recompute": spec["training"]["recompute"], "tokens_per_s_per_gpu": row["tokens_per_sec_per_gpu"],
            "peak_gib": published_peak_gib(row) or "",
        })
    paths = {}
    for half, table in rows.items():
        path = paths[half] = out / f"{half.replace('-', '_')}.csv"
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(table)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale.calibrate_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--system", default="H100", choices=("H100", "B200", *INDEPENDENT_SYSTEMS))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    paths = write_tables(args.system, args.out)
    profile = calibrate_table(read_table(paths["tuning"]))
    (args.out / "profile.json").write_text(json.dumps(profile, indent=2) + "\n")
    for c in profile["coefficients"]:
        spread = c.get("left_out_range") or ["-", "-"]
        moved = (f"{c['before']:g} -> {c['after']:g} ({c['moved']:+.1%}; left-out fits {spread[0]}-{spread[1]})" if c["fitted"]
                 else f"{c['before']:g}, not fitted: {c['reason']}")
        print(f"{c['name']:<18} {moved}")
    tuning = profile["median_abs_error"]
    print(f"tuning ({len(profile['rows'])} rows): median |error| {tuning['before']:.1%} -> {tuning['after']:.1%}, "
          f"left out {tuning['left_out']:.1%}")
    held = read_table(paths["held-out"])
    fitted = profile["cluster_coefficients"]
    before = [r.measured_step_s / step_seconds(r, {}) - 1 for r in held]
    after = [r.measured_step_s / step_seconds(r, fitted) - 1 for r in held]
    for r, b, a in zip(held, before, after, strict=True):
        print(f"  held out {r.name:<40} {b:+.1%} -> {a:+.1%}")
    print(f"held-out ({len(held)} rows): median |error| {statistics.median(map(abs, before)):.1%} -> "
          f"{statistics.median(map(abs, after)):.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
