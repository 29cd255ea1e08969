"""The only module that imports rich: tables and messages for the CLI."""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console
from rich.table import Table

out = Console(highlight=False, soft_wrap=False, width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def error(message: str) -> None:
    err.print(f"[bold red]error:[/] {message}", markup=True, highlight=False) if err.is_terminal else print(f"error: {message}", file=sys.stderr)


def print_json(text: str) -> None:
    sys.stdout.write(text + "\n")


def _layout_cell(layout: dict[str, Any]) -> str:
    parts = [f"tp{layout['tp']}", f"pp{layout['pp']}"]
    if layout["vpp"] > 1:
        parts.append(f"vpp{layout['vpp']}")
    if layout["cp"] > 1:
        parts.append(f"cp{layout['cp']}")
    parts.append(f"dp{layout['dp']}")
    if layout["ep"] > 1:
        parts.append(f"ep{layout['ep']}")
    if layout["etp"] != layout["tp"]:
        parts.append(f"etp{layout['etp']}")
    if layout["sp"]:
        parts.append("sp")
    return " ".join(parts)


def plan_table(plan: Any, top: int) -> None:
    """Ranked candidates, then why the rest were rejected."""
    c = plan.cluster
    out.print(
        f"[bold]{plan.spec['name']}[/]  {plan.spec['model']['pattern']}  on {c['nodes']} x {c['name']} "
        f"({plan.world_size} GPUs, {c['gpu_memory_gib']:g} GiB planned per GPU)"
    )
    for note in plan.notes:
        out.print(f"[yellow]note[/] {note.message}  [dim]({note.rule})[/]")
    table = Table(show_lines=False, header_style="bold")
    for name, justify in [
        ("#", "right"), ("layout", "left"), ("mbs", "right"), ("M", "right"), ("stages", "left"),
        ("peak GiB", "right"), ("step s", "right"), ("tok/s", "right"), ("MFU", "right"),
        ("bubble", "right"), ("fits", "center"), ("warnings", "left"),
    ]:
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for cand in plan.candidates[:top]:
        lay = cand.layout
        sizes = cand.split["sizes"]
        stages = "-" if len(sizes) == 1 else "/".join(map(str, sizes))
        table.add_row(
            str(cand.rank), _layout_cell(lay), str(lay["micro_batch_size"]), str(lay["num_microbatches"]), stages,
            f"{cand.memory['peak_gib']:.1f}", f"{cand.time['step_seconds']:.2f}", f"{cand.time['tokens_per_second']:,.0f}",
            f"{cand.time['mfu']:.0%}", f"{cand.time['bubble_fraction']:.1%}",
            "[green]yes[/]" if cand.fits else "[red]no[/]", ", ".join(sorted({w.rule for w in cand.warnings})),
        )
    out.print(table)
    rej = plan.rejected
    reasons = ", ".join(f"{rule} {n}" for rule, n in list(rej.by_rule.items())[:5])
    out.print(
        f"considered {plan.considered:,} layouts: {plan.legal_count:,} legal, {plan.fitting_count:,} fit in memory; "
        f"rejected {rej.count:,}" + (f" ({reasons})" if reasons else "")
    )
    if plan.candidates:
        out.print("[dim]next: `megacpp explain rule RULE` for a rejection, `megacpp plan ... --out plan.json` to save[/]")


def validate_report(results: list[dict[str, Any]], fmt: str) -> None:
    if fmt == "github":
        for r in results:
            for e in r["errors"]:
                print(f"::error file={r['file']}::{e}")
            for w in r["warnings"]:
                print(f"::warning file={r['file']}::{w}")
        return
    for r in results:
        if r["valid"]:
            out.print(f"[green]valid[/]   {r['file']}: {r['summary']}")
        else:
            out.print(f"[red]invalid[/] {r['file']}: {r['errors'][0]}")
            for e in r["errors"][1:]:
                out.print(f"        {e}")
        for w in r["warnings"]:
            out.print(f"[yellow]warning[/] {r['file']}: {w}")


def simple_table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    table = Table(title=title, header_style="bold", title_justify="left")
    for col in columns:
        table.add_column(col)
    for row in rows:
        table.add_row(*row)
    out.print(table)


def rule_text(info: dict[str, str]) -> None:
    out.print(f"[bold]{info['id']}[/] ({info['severity']})")
    out.print(info["doc"])
    out.print(f"where:  {info['where']}")
    if info.get("fails"):
        out.print(f"fails:  {info['fails']}")
    if info.get("passes"):
        out.print(f"passes: {info['passes']}")
