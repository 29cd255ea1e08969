"""The only module that imports rich: tables and messages for the CLI."""

from __future__ import annotations

import sys
from typing import Any

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from megacpp.planner.cost.coefficients import HOST_BOUND_ERROR, LAYOUT_RATIO_ERROR, within_layout_error
from megacpp.planner.cost.step import HOST_TERM, deciding_term, host_bound
from megacpp.planner.errors import MAX_ERROR_CHARS, one_line, printable
from megacpp.planner.plan import Plan
from megacpp.planner.search.layout import Layout

out = Console(highlight=False, soft_wrap=False, width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def _layer_range(layers: list[int]) -> str:
    """Megatron layers [start, stop) as "3-5"; "none" for a stage that holds only the embedding or the loss."""
    start, stop = layers
    return f"{start}-{stop - 1}" if stop > start else "none"


def fitted_table(columns: list[tuple[str, str, bool]], rows: list[list[str]], title: str | None = None) -> Table:
    """A table whose numbers are never cut. `columns` are (header, justify, number); a number
    column keeps its widest cell whole on one line. Where the terminal is narrower than the table,
    the borders go and the text columns share what is left, folding their cells over lines (and
    where even the numbers cannot fit, every column folds: nothing is cut off)."""
    widths = [max([_cell_width(r[i]) for r in rows] + [max(map(len, name.split()))]) for i, (name, _, _) in enumerate(columns)]
    full = [max(w, len(name)) for w, (name, _, _) in zip(widths, columns, strict=True)]
    kw: dict[str, Any] = {"header_style": "bold", "title": title, "title_justify": "left"}
    # rich's bordered table wraps text columns down to their longest word, and past that cuts every column
    least = [w if number else max([_longest_word(r[i]) for r in rows] + [max(map(len, name.split()))])
             for i, (w, (name, _, number)) in enumerate(zip(widths, columns, strict=True))]
    narrow = sum(least) + 3 * len(columns) + 1 > out.width
    if narrow:  # no borders: columns apart by two spaces, or one where the numbers need it
        numbers = sum(w for w, (_, _, number) in zip(widths, columns, strict=True) if number)
        gap = 2 if numbers + 2 * (len(columns) - 1) <= out.width else 1
        kw |= {"box": box.SIMPLE_HEAD, "show_edge": False, "pad_edge": False, "padding": (0, gap - 1), "collapse_padding": True}
        text = [i for i, (_, _, number) in enumerate(columns) if not number]
        left = out.width - gap * (len(columns) - 1) - numbers
        start = {i: min(full[i], 8) for i in text}  # each a few characters, the rest shared by what each still lacks
        given = sum(start.values()) or 1
        spare, lacking = left - given, sum(full[i] - start[i] for i in text) or 1
        for i in text:
            widths[i] = start[i] + spare * (full[i] - start[i]) // lacking if spare >= 0 else max(3, start[i] * left // given)
    table = Table(**kw)
    for (name, justify, _), width in zip(columns, widths, strict=True):
        table.add_column(name, justify=justify, overflow="fold", width=width if narrow else None)  # type: ignore[arg-type]
    for row in rows:
        table.add_row(*row)
    return table


def _longest_word(cell: str) -> int:
    return max((Text(word).cell_len for word in Text.from_markup(cell).plain.split()), default=0)


def _cell_width(cell: str) -> int:
    return max(Text(line).cell_len for line in Text.from_markup(cell).plain.split("\n"))


def error(message: str) -> None:
    # the message quotes user input, which must not be read as rich markup ("[/x]" would raise)
    err.print(f"[bold red]error:[/] {escape(message)}", markup=True, highlight=False) if err.is_terminal else print(f"error: {message}", file=sys.stderr)


def user_text(value: object) -> str:
    """User text (a name, a path, a flag's value) for a rich line: one printable line, markup escaped."""
    return escape(printable(str(value), MAX_ERROR_CHARS))


def wrote(*paths: object, then: str = "") -> None:
    """The "wrote PATH" line on stderr: the paths as user text, `then` (rich markup) after them."""
    err.print(f"wrote {' and '.join(user_text(p) for p in paths)}{then}")


def import_report(unsupported: list[str], notes: list[str]) -> None:
    """What `megacpp import` could not carry into the spec, and what it assumed, on stderr."""
    for line in unsupported:
        err.print(f"not represented: {printable(line, MAX_ERROR_CHARS)}", markup=False)
    for line in notes:
        err.print(f"note: {printable(line, MAX_ERROR_CHARS)}", markup=False)


def _layout_cell(layout: dict[str, Any]) -> str:
    """An explain document's layout, as the plan table shows layouts."""
    return Layout.from_dict(layout).short(mbs=False)


def _host_share(host_seconds: float | None, step_seconds: float, breakdown: dict[str, float]) -> float:
    """Per-block host time's share of the step, hidden behind the GPU or not (plans made before
    host_seconds: the overhead in the breakdown)."""
    host = breakdown.get("block_overhead", 0.0) if host_seconds is None else host_seconds
    return host / step_seconds if step_seconds else 0.0


# what each term of the step breakdown is, in explain's words
TERM_WORDS = {
    "matmul": "the matmuls (GPU)",
    "softmax": "the unfused attention softmax (GPU)",
    HOST_TERM: "the host's time beyond the GPU's work",
    "small_kernels": "the small kernels: norms, activations, casts (GPU)",
    "grad_accumulation": "the gradients' accumulation (GPU)",
    "communication": "communication inside the micro-batches",
    "bubble": "the pipeline bubble",
    "data_parallel": "the data-parallel gradient and parameter collectives",
    "optimizer": "the optimizer step",
    "offload": "activation offloading's copies the compute does not hide (host link)",
}
def _decided(term: str | None) -> str:
    """", decided by TERM" for a why-not or runner-up row, the host's term named as host-bound."""
    if not term:
        return ""
    return ", host-bound" if term == HOST_TERM else f", decided by {term.replace('_', ' ')}"


HOST_BOUND_ADVICE = f"such steps came within ±{HOST_BOUND_ERROR:.0%} on the runtime's measured runs and move with the host; `megacpp calibrate` fits this cluster"


def _capacity(plan: Plan) -> str:
    """The memory a layout plans for per GPU, and the card it keeps headroom below."""
    c = plan.cluster
    if c.gpu_memory_total_gib is None or c.gpu_memory_total_gib <= c.gpu_memory_gib:
        return f"{c.gpu_memory_gib:g} GiB planned per GPU"
    room = c.gpu_memory_total_gib - c.gpu_memory_gib
    return f"{c.gpu_memory_gib:g} of {c.gpu_memory_total_gib:g} GiB planned per GPU, {room:.3g} GiB headroom"


def plan_table(plan: Plan, top: int) -> None:
    """Ranked candidates, then why the rest were rejected."""
    c, spec = plan.cluster, plan.spec_model
    out.print(f"[bold]{user_text(spec.name)}[/]  {spec.model.pattern}  on {c.nodes} x {user_text(c.name)} ({plan.world_size} GPUs, {_capacity(plan)})")
    for note in plan.notes:
        out.print(f"[yellow]note[/] {escape(note.message)}  [dim]({note.rule})[/]")
    columns = [
        ("#", "right", True), ("layout", "left", False), ("mbs", "right", True), ("M", "right", True),
        ("stages", "left", False), ("peak GiB", "right", True), ("step s", "right", True), ("tok/s", "right", True),
        ("MFU", "right", True), ("bubble", "right", True), ("fits", "center", True), ("warnings", "left", False),
    ]
    rows = []
    any_host_bound = False
    for cand in plan.candidates[:top]:
        lay, t = cand.layout, cand.time
        flags = sorted({w.rule for w in cand.warnings})
        if host_bound(cand.step_breakdown):
            flags.append("host-bound")
            any_host_bound = True
        sizes = cand.split.sizes
        stages = "-" if len(sizes) == 1 else "/".join(map(str, sizes))
        rows.append([
            str(cand.rank), lay.short(mbs=False), str(lay.micro_batch_size), str(lay.num_microbatches), stages,
            _band(cand.memory.peak_gib, cand.memory.peak_gib_high, 1),
            _band(t.step_seconds, t.step_seconds_high, 2), f"{t.tokens_per_second:,.0f}",
            f"{t.mfu:.0%}", f"{t.bubble_fraction:.1%}",
            "[green]yes[/]" if cand.fits else "[red]no[/]", ", ".join(flags),
        ])
    out.print(fitted_table(columns, rows))
    fitting = [c for c in plan.candidates[:top] if c.fits]
    if len(fitting) > 1:
        best = fitting[0].time.step_seconds
        if close := [f"#{c.rank}" for c in fitting[1:] if within_layout_error(c.time.step_seconds / best - 1)]:
            out.print(f"{', '.join(close)} within {LAYOUT_RATIO_ERROR:.0%} of #{fitting[0].rank}'s step, inside the plan's median "
                      f"error between two layouts of one job: time {'them' if len(close) > 1 else 'it'} beside it before "
                      "choosing (`explain layout --versus` prices two term by term)")
    if any_host_bound:
        out.print(f"[yellow]host-bound[/]: the host's time beyond the GPU's work is the largest term of the step; {HOST_BOUND_ADVICE}")
    rej = plan.rejected
    reasons = ", ".join(f"{rule} {n}" for rule, n in list(rej.by_rule.items())[:5])
    out.print(
        f"considered {plan.considered:,} layouts: {plan.legal_count:,} legal, {plan.fitting_count:,} fit in memory; "
        f"rejected {rej.count:,}" + (f" ({reasons})" if reasons else "")
    )
    if plan.candidates:
        out.print("[dim]next: `megacpp explain rule RULE` for a rejection, `megacpp plan ... --out plan.json` to save[/]")


def _github(line: str, value: bool = False) -> str:
    """Text escaped for a GitHub workflow command: its message, or (`value`) a property's value;
    other control characters written as repr writes them."""
    line = line.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
    line = printable(line, 10 * MAX_ERROR_CHARS)
    return line.replace(":", "%3A").replace(",", "%2C") if value else line


def validate_report(results: list[dict[str, Any]], fmt: str) -> None:
    if fmt == "github":
        for r in results:
            for e in r["errors"]:
                print(f"::error file={_github(r['file'], value=True)}::{_github(e)}")
            for w in r["warnings"]:
                print(f"::warning file={_github(r['file'], value=True)}::{_github(w)}")
        return
    def strip(message: str, file: str) -> str:  # errors from loading already name the file, as one line
        for named in (file, one_line(file, MAX_ERROR_CHARS), printable(file, MAX_ERROR_CHARS)):
            message = message.removeprefix(f"{named}: ")
        return message

    # file names and messages quote user input, which must not be read as rich markup
    for r in results:
        file = user_text(r["file"])
        if r["valid"]:
            out.print(f"[green]valid[/]   {file}: {escape(r['summary'])}", soft_wrap=True)
        else:
            out.print(f"[red]invalid[/] {file}: {escape(strip(r['errors'][0], r['file']))}", soft_wrap=True)
            for e in r["errors"][1:]:
                out.print(f"        {escape(e)}", soft_wrap=True)
        for w in r["warnings"]:
            out.print(f"[yellow]warning[/] {file}: {escape(w)}", soft_wrap=True)


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


def _gb(n: float) -> str:
    return f"{n / 1e9:,.1f}"


def _bar(value: float, capacity: float, width: int = 30) -> str:
    filled = min(width, round(width * value / capacity)) if capacity else 0
    return "█" * filled + "·" * (width - filled)


def _ranks_text(ranks: list[dict[str, int]], gpus_per_node: int, max_nodes: int = 8) -> None:
    nodes = sorted({r["node"] for r in ranks})
    shown = nodes if len(nodes) <= max_nodes else nodes[: max_nodes // 2] + nodes[-max_nodes // 2 :]
    parts = {r["rank"]: (f"r{r['rank']}", f"{r['tp']}.{r['cp']}.{r['dp']}.{r['pp']}", f"{r['ep']}.{r['etp']}.{r['edp']}")
             for r in ranks if r["node"] in shown}
    widest = max((len(f"{a} {b}|{c}") for a, b, c in parts.values()), default=0)
    # a narrow terminal gets each cell on three lines rather than cut
    sep = ("\n", "\n") if 5 + gpus_per_node * (widest + 3) > out.width else (" ", "|")
    rows = []
    for node in shown:
        rows.append([str(node), *(f"{a}{sep[0]}{b}{sep[1]}{c}" for a, b, c in (parts[r["rank"]] for r in ranks if r["node"] == node))])
        if len(nodes) > max_nodes and node == shown[max_nodes // 2 - 1]:
            rows.append(["…", *["…"] * gpus_per_node])
    columns = [("node", "left", True), *((f"gpu{g}", "left", True) for g in range(gpus_per_node))]
    out.print(fitted_table(columns, rows, "rank map (Megatron order tp-cp-ep-dp-pp; cell: rank tp.cp.dp.pp | ep.etp.edp)"))
    if len(nodes) > max_nodes:
        out.print(f"[dim]{len(nodes) - max_nodes} of {len(nodes)} nodes elided; `--json` lists every rank, `--rank R` focuses one[/]")


def _versus_text(v: dict[str, Any]) -> None:
    """`explain layout --versus`: the other layout's step beside the candidate's, term by term."""
    head = f"[bold]versus {_layout_cell(v['layout'])}[/]"
    if v["verdict"] == "rejected":
        out.print(f"{head}: [red]rejected[/]")
        for line in [*v.get("notes", []), *v["rules"]]:
            out.print(f"  {escape(line)}")
        return
    fits = "" if v["verdict"] == "legal" else " [red](does not fit)[/]"
    out.print(f"{head}: step {v['step_seconds']:.2f} s ({v['step_delta']:+.1%} against this candidate), "
              f"peak {v['peak_gib']:.1f} GiB{fits}{_decided(v.get('decided_by'))}")
    for note in v.get("notes", []):
        out.print(f"  {escape(note)}")
    where = "beyond" if v["settled"] else "inside"
    out.print(f"  {where} the plan's median error between two layouts of one job (±{LAYOUT_RATIO_ERROR:.0%}, over the pairs "
              f"NVIDIA ran: benchmarks/scale){'' if v['settled'] else ': time both before choosing'}")
    terms = Table(header_style="bold")
    for col in ("term", "this candidate s", "versus s", "difference s"):
        terms.add_column(col, justify="left" if col == "term" else "right")
    for row in v["terms"]:
        if max(abs(row["candidate"]), abs(row["versus"])) >= 0.0005:
            terms.add_row(row["term"].replace("_", " "), f"{row['candidate']:.3f}", f"{row['versus']:.3f}", f"{row['delta']:+.3f}")
    out.print(terms)


def explain_text(doc: dict[str, Any]) -> None:
    """Human-readable explain document."""
    lay = doc["layout"]
    out.print(f"[bold]{user_text(doc['spec'])}[/]  {doc['pattern']}  on {doc['world_size']} GPUs ({user_text(doc['cluster']['name'])}) — candidate {doc['candidate']}: {_layout_cell(lay)}")
    t = doc["time"]
    out.print(f"step {t['step_seconds']:.2f} s, {t['tokens_per_second']:,.0f} tokens/s, MFU {t['mfu']:.0%}, bubble {t['bubble_fraction']:.1%}, "
              f"{lay['num_microbatches']} micro-batches of {lay['micro_batch_size']}")
    terms = [f"{term.replace('_', ' ')} {seconds:.2f}" for term, seconds in doc.get("step_breakdown", {}).items() if seconds >= 0.005]
    if terms:
        out.print(f"step on the busiest rank = {' + '.join(terms)} s")
    breakdown = doc.get("step_breakdown", {})
    decided = doc.get("decided_by") or deciding_term(breakdown)
    if decided and t["step_seconds"]:
        out.print(f"decided by: {TERM_WORDS.get(decided, decided.replace('_', ' '))}, "
                  f"{breakdown.get(decided, 0.0) / t['step_seconds']:.0%} of the step")
    share = _host_share(t.get("host_seconds"), t["step_seconds"], breakdown)
    if decided == HOST_TERM:
        shown = breakdown.get(HOST_TERM, 0.0) / t["step_seconds"]
        overlap = "" if share - shown < 0.005 else f" ({shown:.0%} of the step beyond the GPU's work)"
        out.print(f"[yellow]host-bound: per-block host time is {share:.0%} of the step{overlap}; {HOST_BOUND_ADVICE}[/]")
        experts = t.get("expert_host_seconds", 0.0) / (share * t["step_seconds"])
        if experts >= 0.1:
            out.print(f"[yellow]the routed experts' per-expert host work is {experts:.0%} of that host time; "
                      "expert parallelism divides it (fewer experts per GPU)[/]")
    elif share >= 0.005 and breakdown.get(HOST_TERM, 0.0) < 0.005 * t["step_seconds"]:
        out.print(f"[dim]per-block host time is {share:.0%} of the step; the GPU's work hides it[/]")

    rows = []
    for a in doc["axes"]:
        mark = " [bold red]← costliest[/]" if a["axis"] == doc["costliest_axis"] else ""
        coll = ", ".join(dict.fromkeys(a["collectives"])) or "-"
        rows.append([a["axis"], str(a["degree"]), a["partitions"], f"{coll} ({a['link']})", _gb(a["bytes_per_step"]),
                     f"{a['seconds_per_step']:.3f}", f"{a['exposed_seconds_per_step']:.3f}{mark}", a["cannot_fix"]])
    columns = [("axis", "left", True), ("degree", "left", True), ("partitions", "left", False), ("collectives (link)", "left", False),
               ("GB/step", "left", True), ("s/step", "left", True), ("on the step", "left", True), ("cannot fix", "left", False)]
    out.print(fitted_table(columns, rows, "axes: what each split partitions here, what it costs, what it cannot fix"))

    rows = []
    for s in doc["stages"]:
        owns = ", ".join(x for x, on in (("embedding", s["embedding"]), ("head + loss", s["output_head"])) if on) or "-"
        blocks = s["blocks"] if len(s["blocks"]) <= 40 else s["blocks"][:37] + "…"
        rows.append([str(s["pp_rank"]), str(s["vp_stage"]), _layer_range(s["layers"]), blocks, owns, "; ".join(s["notes"])])
    columns = [("pp", "left", True), ("vp", "left", True), ("layers", "left", True), ("blocks", "left", False),
               ("owns", "left", False), ("notes", "left", False)]
    out.print(fitted_table(columns, rows, "stage ownership"))

    mem = doc["memory"]
    out.print(f"[bold]memory per stage[/] (capacity {mem['capacity_gib']:g} GiB; predicts torch.cuda.max_memory_allocated)")
    for m in mem["per_stage"]:
        parts = " + ".join(f"{k.removesuffix('_gib')} {m[k]:.1f}" for k in
                           ("weights_gib", "gradients_gib", "optimizer_gib", "buffers_gib", "overhead_gib", "activations_gib", "transient_gib"))
        high = f" (up to {m['total_gib_high']:.1f} with moe.imbalance)" if "total_gib_high" in m else ""
        out.print(f"  pp{m['pp_rank']} {_bar(m['total_gib'], mem['capacity_gib'])} {m['total_gib']:6.1f} GiB = {parts}{high}")
    for why, stages_ in _peak_notes(mem["per_stage"]).items():
        out.print(f"  pp{_rank_list(stages_)}: {why}")

    _ranks_text(doc["ranks"], doc["cluster"]["gpus_per_node"])

    if doc["experts"]:
        out.print("[bold]experts[/] (which ranks hold each expert range, per E block)")
        for e in doc["experts"][:6]:
            owners = "; ".join(f"{o['experts'][0]}-{o['experts'][1]} → {_rank_list(o['ranks'])}" for o in e["owners"][:8])
            more = f"; … {len(e['owners']) - 8} more" if len(e["owners"]) > 8 else ""
            out.print(f"  E#{e['e_block']} (block {e['block_index']}, pp{e['pp_rank']}): {owners}{more}")
        if len(doc["experts"]) > 6:
            out.print(f"  … {len(doc['experts']) - 6} more E blocks; `--json` lists all")

    rows = []
    for w in doc["why_not"]:
        if w["verdict"] == "rejected":
            rows.append([f"{w['axis']}={w['value']}", "[red]rejected[/]", f"{w['rule']}: {w['message']}"])
        else:
            fits = "" if w["verdict"] == "legal" else " [red](does not fit)[/]"
            rows.append([f"{w['axis']}={w['value']}", "[green]legal[/]" + fits,
                         f"step {w['step_delta']:+.1%} ({w['step_seconds']:.2f} s), peak {w['peak_gib']:.1f} GiB"
                         + _decided(w.get("decided_by"))])
    columns = [("change", "left", True), ("verdict", "left", False), ("rule / cost", "left", False)]
    out.print(fitted_table(columns, rows, "why not: each axis moved to its neighbours"))
    for note in dict.fromkeys(n for w in doc["why_not"] for n in w.get("notes", ())):
        out.print(f"  {note}")
    if doc["runners_up"]:
        out.print("[bold]runners-up[/]: " + "; ".join(
            f"#{r['candidate']} {_layout_cell(r['layout'])} {r['step_delta']:+.1%}{_decided(r.get('decided_by'))}"
            for r in doc["runners_up"][:3]))
        if close := [f"#{r['candidate']}" for r in doc["runners_up"][:3] if within_layout_error(r["step_delta"])]:
            out.print(f"  {', '.join(close)} within the plan's median error between two layouts of one job "
                      f"(±{LAYOUT_RATIO_ERROR:.0%}): time {'them' if len(close) > 1 else 'it'} beside this one before choosing")
    if "versus" in doc:
        _versus_text(doc["versus"])
    if "focus" in doc:
        f = doc["focus"]
        out.print(f"[bold]rank {f['rank']}[/] (node {f['node']}, gpu {f['local_rank']}): tp {f['tp']} cp {f['cp']} dp {f['dp']} pp {f['pp']} "
                  f"ep {f['ep']} etp {f['etp']} edp {f['edp']}")
        for s in f["stages"]:
            out.print(f"  holds layers {_layer_range(s['layers'])}: {s['blocks']}")
        for axis, peers in f["peers"].items():
            out.print(f"  {axis} peers: {_rank_list(peers)}")
        if f["experts"]:
            spans = sorted({tuple(e["experts"]) for e in f["experts"]})
            out.print(f"  experts: {', '.join(f'{a}-{b}' for a, b in spans)} of each of its {len(f['experts'])} E blocks")


def _peak_notes(per_stage: list[dict]) -> dict[str, list[int]]:
    """What the memory lines' sums do not say, with the pipeline stages it holds for: what the
    transient is, and where the optimizer step's copy rather than the activations sets the peak."""
    notes: dict[str, list[int]] = {}
    for m in per_stage:
        if m["transient_gib"] > 0 and "transient_from" in m:
            notes.setdefault(f"transient: {m['transient_from']}", []).append(m["pp_rank"])
        if m["optimizer_step_gib"] > m["activations_gib"] + m["transient_gib"]:
            notes.setdefault("the optimizer step's fp32 copy (made only where neither TE nor Apex is installed) "
                             "outgrows activations + transient and sets the peak", []).append(m["pp_rank"])
    return notes


def _rank_list(ranks: list[int]) -> str:
    """Compact rank lists: 0-7, or 0,8,16…(8 ranks, stride 8)."""
    if len(ranks) <= 1:
        return ",".join(map(str, ranks))
    stride = ranks[1] - ranks[0]
    if all(b - a == stride for a, b in zip(ranks, ranks[1:], strict=False)):
        if stride == 1:
            return f"{ranks[0]}-{ranks[-1]}"
        return f"{ranks[0]},{ranks[1]},…,{ranks[-1]} (stride {stride})"
    return ",".join(map(str, ranks[:12])) + ("…" if len(ranks) > 12 else "")


def _band(value: float, high: float | None, digits: int) -> str:
    """A point estimate, or its band under moe.imbalance ("52.9-53.7")."""
    return f"{value:.{digits}f}" if high is None else f"{value:.{digits}f}-{high:.{digits}f}"


def calibration_table(profile: dict[str, Any]) -> None:
    per_block = ", ".join(f"{letter} {v * 1e3:.2f} ms" for letter, v in profile["block_overhead_s"].items())
    out.print(f"[bold]{user_text(profile['cluster'])}[/]: overhead per block per micro-batch (forward + backward): {per_block}; "
              f"small kernels' traffic {profile.get('small_kernel_traffic', 0.0):g} x the saved activations")
    if profile.get("synchronised_share") is not None:
        out.print(f"on ranks with MoE blocks {profile['synchronised_share']:.0%} of the shorter of host and GPU time adds to the longer "
                  "(the dispatcher makes the host wait for the GPU), the share whose fit best predicts the runs left out one at a time")
    if not profile.get("determined", True):
        out.print("these runs do not separate every block kind (one kind's count is a combination of the others' in "
                  "every run): what they leave open keeps the shipped overheads; add runs of other shapes to fit it")
    for group in profile.get("tied", []):
        out.print(f"{', '.join(group)} come in the same proportion in every run, so no fit can tell them apart: "
                  "they share one overhead; add runs where they differ to separate them")
    loo = {r["name"]: r for r in profile["leave_one_out"]}
    bound = any("host_bound" in r for r in profile["fitted_on"])  # TE: the longer of host and GPU time
    if bound:
        out.print("a step takes the longer of its GPU and host time here: GPU-bound runs fit the small kernels' traffic, "
                  "host-bound ones the overheads (column 'bound by')")
    table = Table(header_style="bold")
    for col in ("run", *(["bound by"] if bound else []), "measured s", "uncalibrated s", "fitted s", "left-out fit s", "left-out error"):
        table.add_column(col, justify="left" if col in ("run", "bound by") else "right")
    for r in profile["fitted_on"]:
        held = loo.get(r["name"])
        table.add_row(user_text(r["name"]), *([("host" if r["host_bound"] else "GPU")] if bound else []),
                      f"{r['measured_s']:.3f}", f"{r['uncalibrated_s']:.3f}", f"{r['fitted_s']:.3f}",
                      f"{held['predicted_s']:.3f}" if held and held["predicted_s"] is not None else "-",
                      f"{held['error']:+.1%}" if held and held["error"] is not None else "-")
    out.print(table)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:+.1%}"


def table_calibration(profile: dict[str, Any]) -> None:
    """What `megacpp calibrate TABLE` fitted: each coefficient before and after, each row's error."""
    rows = profile["rows"]
    out.print(f"[bold]{user_text(profile['cluster'])}[/]: {len(rows)} measured runs; {escape(profile['fit'])}")
    coefficients = Table(header_style="bold")
    for col in ("coefficient", "unit", "before", "after", "moved", "left-out fits", "note"):
        coefficients.add_column(col, justify="right" if col in ("before", "after", "moved", "left-out fits") else "left")
    for c in profile["coefficients"]:
        spread = c.get("left_out_range")
        coefficients.add_row(c["name"], c["unit"], f"{c['before']:.4g}", f"{c['after']:.4g}" if c["fitted"] else "-",
                             _percent(c["moved"]) if c["fitted"] else "-", f"{spread[0]:.4g}-{spread[1]:.4g}" if spread else "-",
                             c["what"] if c["fitted"] else f"not fitted: {c['reason']}")
    out.print(coefficients)
    out.print("left-out fits: the range of each coefficient fitted with one row left out at a time")
    for c in profile["coefficients"]:
        if c.get("at_bound"):
            out.print(f"[yellow]{c['name']} stopped at its bound[/] ({c['after']:g} {c['unit']}): the runs ask for more than it can "
                      "explain, so the model misprices something else in them; check those runs before using the profile")
    table = Table(header_style="bold")
    peaks = any("measured_peak_gib" in r for r in rows)
    for col in ("run", "nodes", "layout", "measured tok/s/GPU", "error before", "error after", "left-out error",
                *(["peak GiB measured / planned"] if peaks else [])):
        table.add_column(col, justify="left" if col in ("run", "layout") else "right")
    for r in rows:
        table.add_row(user_text(r["name"]), str(r["nodes"]), r["layout"], f"{r['measured_tokens_per_s_per_gpu']:,.0f}",
                      _percent(r["error_before"]), _percent(r["error_after"]), _percent(r["error_left_out"]),
                      *([f"{r['measured_peak_gib']:.1f} / {r['planned_peak_gib']:.1f}" if "measured_peak_gib" in r else "-"] if peaks else []))
    out.print(table)
    median = profile["median_abs_error"]
    shown = {k: "-" if v is None else f"{v:.1%}" for k, v in median.items()}
    out.print(f"median |error|: before {shown['before']}, after {shown['after']}, "
              f"left out {shown['left_out']} (error: planned tokens/s over measured, less 1; "
              "left out: each run planned by a fit without it)")
    if median["left_out"] is not None and median["before"] is not None and median["left_out"] >= median["before"]:
        out.print("[yellow]left out, the runs are predicted no better than uncalibrated[/]: their other errors are as large "
                  "as what these coefficients explain, so the fit follows whichever runs it sees; add runs, or check the "
                  "profile on runs it did not see before trusting it")
    if peaks:
        out.print("peak memory is reported, not fitted: none of these coefficients moves it")
