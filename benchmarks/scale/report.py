"""Summary statistics and the markdown report of the scale benchmark (results/scale.md).

Everything here is computed from the per-row records of run.py, so the markdown is always
regenerated, never edited by hand.
"""

from __future__ import annotations

import statistics
from collections import Counter
from typing import Any

from benchmarks.scale.truth import APPROXIMATIONS, SKIPS
from megacpp.planner.cost.coefficients import LAYOUT_RATIO_ERROR, within_layout_error

WITHIN = 0.15
HALVES = ("tuning", "held-out", "all")
GROUPINGS = (("system", "system"), ("family", "family"), ("precision", "precision"), ("mapping", "status"))
WORST = 10
SOURCES = {
    "megatron_bridge_performance_summary": "Megatron-Bridge performance summary",
    "nemo_framework_performance_summary (partial page capture)": "NeMo Framework performance summary",
    "megatron_bridge_model_verification_card": "Megatron-Bridge model verification card",
}


def _planned(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r["pinned"] and r["pinned"]["outcome"] == "planned"]


def _half(records: list[dict[str, Any]], half: str) -> list[dict[str, Any]]:
    return records if half == "all" else [r for r in records if r["half"] == half]


def accuracy(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Rows, within 15%, median |error|, median signed error, host-bound and fitting counts."""
    planned = _planned(records)
    errors = [r["pinned"]["error"] for r in planned]
    return {
        "rows": len(planned),
        "within_15": sum(abs(e) <= WITHIN for e in errors),
        "median_abs_error": round(statistics.median(abs(e) for e in errors), 4) if errors else None,
        "median_bias": round(statistics.median(errors), 4) if errors else None,
        "host_bound": sum(r["pinned"]["host_bound"] for r in planned),
        "fits": sum(r["pinned"]["fits"] for r in planned),
    }


def search_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    searched = [r for r in records if r["search"] and r["search"]["outcome"] == "searched"]
    speedups = [(r["search"]["claimed_speedup"], r["row_id"]) for r in searched if r["search"]["claimed_speedup"]]
    worst = max(speedups) if speedups else None
    return {
        "rows": len(searched),
        "pinned_fits": sum(r["pinned"]["fits"] for r in searched),
        "in_top": sum(r["search"]["in_top"] for r in searched),
        # the same with every VPP of a layout ranked on its own (run.deep_rank)
        "in_top_every_vpp": sum(r["search"].get("in_top_every_vpp", False) for r in searched),
        "median_claimed_speedup": round(statistics.median(s for s, _ in speedups), 3) if speedups else None,
        # rows outside the top whose top pick claims no more than the plan's median error between
        # two layouts of one job (cost.coefficients.LAYOUT_RATIO_ERROR): an order the plan cannot settle
        "outside_top_within_error": sum(not r["search"]["in_top"] and r["pinned"]["fits"] and r["search"]["claimed_speedup"] is not None
                                        and within_layout_error(r["search"]["claimed_speedup"] - 1) for r in searched),
        "worst_claimed_speedup": worst[0] if worst else None,
        "worst_row": worst[1] if worst else None,
        "search_seconds": round(sum(r["search"]["plan_seconds"] for r in searched), 1),
    }


# pairs measured at least this far apart are the ones an ordering must get right
CLEAR_GAP = 0.10


def side_by_side(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Every pair of planned configurations of one job (model, system, precision, sequence, GPU
    count and global batch) in two layouts (as run, micro-batch size included): the measured and
    the planned ratio of their tokens/s/GPU, and whether the plan orders them as measured. The
    releases of a pair may differ, and so may the software that ran them."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in _planned(records):
        pub = r["published"]
        key = (r["model_key"], r["system"], r["precision"], pub["seq_length"], r["num_gpus"], pub["gbs"])
        groups.setdefault(key, []).append(r)
    pairs = []
    for group in groups.values():
        for i, a in enumerate(group):
            for b in group[i + 1:]:
                if _layout(a["published"]) == _layout(b["published"]) and a["published"]["mbs"] == b["published"]["mbs"]:
                    continue
                measured = a["published"]["tokens_per_sec_per_gpu"] / b["published"]["tokens_per_sec_per_gpu"]
                planned = a["pinned"]["predicted_tokens_per_sec_per_gpu"] / b["pinned"]["predicted_tokens_per_sec_per_gpu"]
                pairs.append({"rows": [a["row_id"], b["row_id"]], "measured_ratio": round(measured, 3),
                              "planned_ratio": round(planned, 3), "ratio_error": round(planned / measured - 1, 4),
                              "ordered": (measured > 1) == (planned > 1)})
    clear = [p for p in pairs if max(p["measured_ratio"], 1 / p["measured_ratio"]) - 1 >= CLEAR_GAP]
    return {
        "pairs": pairs,
        "ordered": sum(p["ordered"] for p in pairs),
        "clear": len(clear),
        "clear_ordered": sum(p["ordered"] for p in clear),
        # what cost.coefficients.LAYOUT_RATIO_ERROR reads, pooled over both truth sets
        "median_abs_ratio_error": round(statistics.median(abs(p["ratio_error"]) for p in pairs), 4) if pairs else None,
    }


def release_spread(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The configurations NVIDIA ran in more than one release, each unchanged but for the software:
    how far the newest run's tokens/s/GPU lies from the run before it, and the plan's error
    against each. The truth's own spread, which no plan of one layout can follow."""
    changes = []
    for r in _planned(records):
        runs = r["releases"]
        if len(runs) < 2:
            continue
        before, newest = runs[-2], runs[-1]
        planned = r["pinned"]["predicted_tokens_per_sec_per_gpu"]
        changes.append({"row": r["row_id"], "previous_row": before["row_id"],
                        "change": round(newest["tokens_per_sec_per_gpu"] / before["tokens_per_sec_per_gpu"] - 1, 4),
                        "error": r["pinned"]["error"],
                        "error_previous": round(planned / before["tokens_per_sec_per_gpu"] - 1, 4)})
    moves = [c["change"] for c in changes]
    return {
        "configurations": changes,
        "median_abs_change": round(statistics.median(abs(x) for x in moves), 4) if moves else None,
        "beyond_15": sum(abs(x) > 0.15 for x in moves),
        "least_change": min(moves, default=None),
        "largest_change": max(moves, default=None),
    }


def summarise(records: list[dict[str, Any]], halves: tuple[str, ...] = HALVES) -> dict[str, Any]:
    groups: dict[str, dict[str, dict[str, Any]]] = {}
    for name, key in GROUPINGS:
        values = sorted({r[key] for r in _planned(records)})
        groups[name] = {v: {h: accuracy([r for r in _half(records, h) if r[key] == v]) for h in halves} for v in values}
    worst = sorted(_planned(records), key=lambda r: -abs(r["pinned"]["error"]))[:WORST]
    return {
        "selected": len(records),
        "by_source": dict(Counter(r["source_type"] for r in records)),
        "halves": dict(Counter(r["half"] for r in records)),
        "status": dict(Counter(r["status"] for r in records)),
        "skip_reasons": dict(Counter(r["skip_reason"] for r in records if r["skip_reason"])),
        "pinned_outcomes": dict(Counter(r["pinned"]["outcome"] for r in records if r["pinned"])),
        "approximations": dict(Counter(a for r in records for a in r["approximations"])),
        "accuracy": {h: accuracy(_half(records, h)) for h in halves},
        "groups": groups,
        "search": {h: search_summary(_half(records, h)) for h in halves},
        "side_by_side": side_by_side(records),
        "releases": release_spread(records),
        "worst_rows": [r["row_id"] for r in worst],
    }


# ---------------------------------------------------------------------------------------------
# markdown


def _pct(x: float | None, signed: bool = False) -> str:
    return "-" if x is None else f"{x:+.1%}" if signed else f"{x:.1%}"


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out + [""]


def _acc_cells(a: dict[str, Any]) -> list[Any]:
    return [a["rows"], a["within_15"], _pct(a["median_abs_error"]), _pct(a["median_bias"], signed=True),
            a["host_bound"], a["fits"]]


ACC_HEADER = ["rows", "within 15%", "median abs error", "median bias", "host-bound", "fits"]


def _times(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _rank(r: dict[str, Any], key: str, known_to: int) -> str:
    """One of the search's ranks of the published layout ("rank", "rank_deep", "rank_distinct"),
    known up to `known_to`."""
    value = r["search"].get(key)
    if value is not None:
        return str(value)
    return f"> {known_to}" if r["pinned"]["fits"] else "does not fit"


def _layout(p: dict[str, Any]) -> str:
    lay = p["layout"]
    parts = [f"tp{lay['tp']}", f"pp{lay['pp']}"]
    parts += [f"vp{lay['vp']}"] if (lay.get("vp") or 1) > 1 else []
    parts += [f"cp{lay['cp']}"] if lay["cp"] > 1 else []
    parts += [f"dp{lay['dp']}"]
    parts += [f"ep{lay['ep']}"] if (lay.get("ep") or 1) > 1 else []
    parts += [f"etp{lay['etp']}"] if lay.get("etp") not in (None, lay["tp"]) else []
    parts += [f"fsdp{lay['fsdp']}"] if lay.get("fsdp") else []
    return " ".join(parts)


def _search_layout(lay: dict[str, Any]) -> str:
    parts = [f"tp{lay['tp']}", f"pp{lay['pp']}"] + ([f"vp{lay['vpp']}"] if lay["vpp"] > 1 else [])
    parts += ([f"cp{lay['cp']}"] if lay["cp"] > 1 else []) + [f"dp{lay['dp']}"]
    if lay["ep"] > 1:
        parts += [f"ep{lay['ep']}"] + ([f"etp{lay['etp']}"] if lay["etp"] != lay["tp"] else [])
    return " ".join(parts)


def _halves(result: dict[str, Any]) -> tuple[str, ...]:
    """The halves a report shows, "all" last: tuning and held-out for the published runs, only
    "all" for the independent check, which nothing is fitted to."""
    return tuple(result["truth"]["halves"])


TITLES = {
    "published": "Scale benchmark: megacpp against NVIDIA's published Megatron runs",
    "independent": "Independent check: megacpp against NVIDIA's published Megatron runs on GB200, GB300 and B300",
}


def _headline(result: dict[str, Any]) -> list[str]:
    s = result["summary"]
    a, src = s["accuracy"]["all"], s["by_source"]
    st, se = s["status"], s["search"]["all"]
    planned = a["rows"]
    sources = ", ".join(f"{n} from the {SOURCES.get(k, k)}" for k, n in sorted(src.items(), key=lambda kv: -kv[1]))
    skipped = ", ".join(f"{n} {k}" for k, n in sorted(s["skip_reasons"].items()))
    not_planned = {k: n for k, n in s["pinned_outcomes"].items() if k != "planned"}
    lines = [
        f"- {result['truth_rows']} published rows on {result['truth']['systems']}; {s['selected']} distinct configurations "
        f"(newest release of each): {sources}.",
        f"- Mapped: {st.get('exact', 0)} exact, {st.get('approximated', 0)} approximated, "
        f"{st.get('skipped', 0)} skipped ({skipped or 'none'}); pinned layouts rejected or in error: "
        f"{sum(not_planned.values())}.",
        f"- Planned with the published layout pinned: {planned} rows; {a['within_15']} within 15% of the measured "
        f"tokens/s/GPU; median |error| {_pct(a['median_abs_error'])}, median bias {_pct(a['median_bias'], True)} "
        f"(negative: the plan is slower than the run); {a['host_bound']} flagged host-bound; "
        f"{a['fits']} fit in the plan's memory.",
    ]
    for half in _halves(result)[:-1]:
        h = s["accuracy"][half]
        lines.append(f"  - {half}: {h['rows']} rows, {h['within_15']} within 15%, median |error| "
                     f"{_pct(h['median_abs_error'])}, median bias {_pct(h['median_bias'], True)}.")
    if result["search"]["enabled"] and se["rows"]:
        lines.append(
            f"- Search ({result['search']['min_gpus']}+ GPUs, layout free): {se['rows']} rows; the published layout "
            f"fits the plan's memory on {se['pinned_fits']} and is in its top {result['search']['top']} on "
            f"{se['in_top']} (each layout once, at its best VPP, as `megacpp plan` ranks; {se['in_top_every_vpp']} "
            f"at the published VPP, with every VPP ranked on its own); the top "
            f"pick claims a median speedup of {_times(se['median_claimed_speedup'])} over it "
            f"(largest {_times(se['worst_claimed_speedup'])}, row {se['worst_row']}); of the {se['rows'] - se['in_top']} "
            f"outside the top {result['search']['top']}, {se['outside_top_within_error']} by a claim within the plan's "
            f"{LAYOUT_RATIO_ERROR:.0%} median error between two layouts of one job.")
    pairs = s["side_by_side"]
    if pairs["pairs"]:
        lines.append(
            f"- Measured side by side: {len(pairs['pairs'])} pairs of runs of one job (model, system, precision, "
            f"sequence, GPUs, batch) in two layouts; the plan orders {pairs['ordered']} as measured, "
            f"{pairs['clear_ordered']} of the {pairs['clear']} measured at least {CLEAR_GAP:.0%} apart; its ratio is "
            f"off by a median {pairs['median_abs_ratio_error']:.1%}.")
    spread = s["releases"]
    if spread["configurations"]:
        lines.append(
            f"- Releases of one configuration: {len(spread['configurations'])} configurations ran in more than one "
            f"release; the newest run lies a median {spread['median_abs_change']:.1%} from the run before it "
            f"({spread['beyond_15']} beyond 15%, from {_pct(spread['least_change'], True)} to "
            f"{_pct(spread['largest_change'], True)}): the measured truth's own spread between software releases.")
    m = result["machine"]
    lines.append(f"- Wall time {result['wall_seconds']:.0f} s on {m['cpus']} CPUs (Python {m['python']}).")
    return lines + [""]


# a claimed speedup over the published layout above this is explained term by term
EXPLAINED_CLAIM = 1.15


def _claims(records: list[dict[str, Any]], above: float = EXPLAINED_CLAIM) -> list[str]:
    """Each claimed speedup above `above`, the step's terms on the published layout against the
    top pick's (`megacpp explain layout SPEC --versus LAYOUT` prints the same, term by term)."""
    lines = [f"### Claims above {above:.2f}x, term by term", "",
             "Seconds per step on the busiest pipeline rank, published layout -> top pick, the terms that moved "
             "most first.", ""]
    rows = []
    for r in records:
        s = r["search"]
        if not s or s["outcome"] != "searched" or (s["claimed_speedup"] or 0) <= above:
            continue
        pick = next(c for c in s["top"] if c["fits"])
        mine, theirs = r["pinned"]["step_breakdown"], pick["step_breakdown"]
        moved = sorted(mine, key=lambda k: -abs(mine[k] - theirs.get(k, 0.0)))
        terms = "; ".join(f"{k.replace('_', ' ')} {mine[k]:.2f} -> {theirs.get(k, 0.0):.2f}" for k in moved[:4]
                          if abs(mine[k] - theirs.get(k, 0.0)) > 0.005)
        rows.append([r["row_id"], r["model_key"], _layout(r["published"]), _search_layout(pick["layout"]),
                     _times(s["claimed_speedup"]), terms])
    if not rows:
        return lines[:2] + ["None.", ""]
    return lines + _table(["row", "model", "published layout", "top pick", "claimed speedup", "terms"], rows)


def _side_by_side(pairs: dict[str, Any], by_id: dict[Any, dict[str, Any]]) -> list[str]:
    """The pairs NVIDIA measured of one job in two configurations, and how the plan orders them."""
    if not pairs["pairs"]:
        return []
    lines = ["## Measured side by side", "",
             "One job (model, system, precision, sequence, GPU count and global batch) in two layouts, micro-batch "
             "size included, each the newest run of its configuration: does the plan order them as NVIDIA measured them? A test of "
             "the ranking on layouts that ran, where the search's rank asks only whether the published layout is "
             "NVIDIA's best. The two runs may come from different releases, whose software differs too. Ratio = first "
             "row's tokens/s/GPU over the second's.", ""]
    rows = []
    for p in pairs["pairs"]:
        a, b = (by_id[i] for i in p["rows"])
        rows.append([a["model_key"], a["system"], a["precision"], a["num_gpus"],
                     f"{a['row_id']} ({a['release'].split(' ')[0]}): {_layout(a['published'])}, gbs {a['published']['gbs']} mbs {a['published']['mbs']}",
                     f"{b['row_id']} ({b['release'].split(' ')[0]}): {_layout(b['published'])}, gbs {b['published']['gbs']} mbs {b['published']['mbs']}",
                     f"{p['measured_ratio']:.2f}", f"{p['planned_ratio']:.2f}", "yes" if p["ordered"] else "no"])
    lines += _table(["model", "system", "precision", "GPUs", "first", "second", "measured ratio", "planned ratio",
                     "ordered"], rows)
    return lines


def _releases(spread: dict[str, Any], by_id: dict[Any, dict[str, Any]]) -> list[str]:
    """The configurations run in more than one release: the newest against the run before it."""
    if not spread["configurations"]:
        return []
    lines = ["## Releases of one configuration", "",
             "The same configuration (model, system, GPUs, precision, batch, sequence and layout) measured again in a "
             "later release, the software alone changed: the newest run, which the accuracy above is measured "
             "against, beside the run before it. Change = newest tokens/s/GPU over the previous run's, less 1; the "
             "plan's error against each.", ""]
    rows = []
    for c in sorted(spread["configurations"], key=lambda c: -abs(c["change"])):
        r = by_id[c["row"]]
        runs = " -> ".join(f"{x['release']}: {x['tokens_per_sec_per_gpu']:.0f}" for x in r["releases"])
        rows.append([c["row"], r["model_key"], r["system"], r["num_gpus"], r["precision"], runs,
                     _pct(c["change"], True), _pct(c["error"], True), _pct(c["error_previous"], True)])
    return lines + _table(["row", "model", "system", "GPUs", "precision", "runs (release: tokens/s/GPU)",
                           "change", "error (newest)", "error (previous)"], rows)


def render_markdown(result: dict[str, Any]) -> str:
    s = result["summary"]
    records = result["rows"]
    by_id = {r["row_id"]: r for r in records}
    lines = [
        f"# {TITLES[result['truth']['name']]}",
        "",
        f"Generated by `{result['command']}`; do not edit. Definitions and the row -> spec mapping: "
        "README.md in this folder. Error = (planned - measured) / measured tokens/s/GPU.",
        "",
    ]
    if result["truth"]["name"] == "independent":
        lines += ["Nothing in megacpp's cost model is fitted to these runs: its coefficients come from datasheets, the "
                  "H100 and H200 kernel tables and the H100 and B200 runs of `scale.md` (tuning half). How far these "
                  "rows land is how the model carries to systems it was not tuned on.", ""]
    if result["only"]:
        lines += [f"Filtered to {', '.join(result['only'])}: a partial report.", ""]
    lines += ["## Headline", ""] + _headline(result)

    lines += ["## Accuracy of the pinned plans", ""]
    for name, _ in GROUPINGS:
        rows = [[value, half, *_acc_cells(stats[half])]
                for value, stats in s["groups"][name].items() for half in _halves(result)]
        lines += [f"### By {name}", ""] + _table([name, "half", *ACC_HEADER], rows)
    lines += ["### All", ""] + _table(["half", *ACC_HEADER], [[h, *_acc_cells(s["accuracy"][h])] for h in _halves(result)])

    if result["search"]["enabled"]:
        top = result["search"]["top"]
        rows = []
        for h in _halves(result):
            x = s["search"][h]
            largest = f"{_times(x['worst_claimed_speedup'])} (row {x['worst_row']})" if x["worst_row"] is not None else "-"
            rows.append([h, x["rows"], x["pinned_fits"], x["in_top"], _times(x["median_claimed_speedup"]), largest,
                         x["search_seconds"]])
        lines += ["## Search with the layout free", "",
                  f"Rows on {result['search']['min_gpus']}+ GPUs, ranked as `megacpp plan` ranks: each layout once, at "
                  "its best VPP. Rank of the published layout = 1 + the other fitting layouts the plan estimates "
                  "strictly faster than its pinned estimate; claimed speedup = pinned step / the top fitting layout's "
                  "step (below 1 where the pinned layout does not fit the plan's memory and every layout that does "
                  "is slower).", ""]
        lines += _table(["half", "rows", "pinned fits", f"in top {top}", "median claimed speedup",
                         "largest claimed speedup", "search s"], rows)
        depth = result["search"]["rank_depth"]
        lines += [f"With the top {depth} candidates in hand the rank is read further (\"> {depth}\" beyond), and "
                  "again with every VPP of a layout ranked on its own (`megacpp plan --every-vpp`; 1 + the fitting "
                  f"layouts and VPPs estimated faster): counted so, the published layout at its published VPP is in "
                  f"the top {top} on {s['search']['all']['in_top_every_vpp']} of {s['search']['all']['rows']}.", ""]
        detail = [[r["row_id"], r["model_key"], r["system"], r["num_gpus"], _layout(r["published"]),
                   _rank(r, "rank", top), _rank(r, "rank_distinct", depth), _rank(r, "rank_deep", depth),
                   _search_layout(r["search"]["top"][0]["layout"]) if r["search"]["top"] else "-",
                   _times(r["search"]["claimed_speedup"]), f"{r['search']['plan_seconds']:.1f}"]
                  for r in records if r["search"] and r["search"]["outcome"] == "searched"]
        lines += _table(["row", "model", "system", "GPUs", "published layout", "rank", f"rank in {depth}",
                         f"rank in {depth}, every VPP", "top pick", "claimed speedup", "search s"], detail)
        lines += _claims(records)

    lines += _side_by_side(s["side_by_side"], by_id)
    lines += _releases(s["releases"], by_id)

    lines += [f"## The {WORST} worst rows", "",
              "Each with the plan's own step breakdown on its busiest pipeline rank "
              "(seconds and share of the step).", ""]
    for rid in s["worst_rows"]:
        r = by_id[rid]
        p = r["pinned"]
        terms = ", ".join(f"{k.replace('_', ' ')} {v:.2f} s ({v / p['step_seconds']:.0%})"
                          for k, v in sorted(p["step_breakdown"].items(), key=lambda kv: -kv[1]) if v > 0)
        lines.append(
            f"- row {rid} {r['model_key']} on {r['num_gpus']} x {r['system']} {r['precision']} ({r['half']}; "
            f"{_layout(r['published'])}, gbs {r['published']['gbs']} mbs {r['published']['mbs']} seq "
            f"{r['published']['seq_length']}): measured {r['published']['tokens_per_sec_per_gpu']:.0f}, planned "
            f"{p['predicted_tokens_per_sec_per_gpu']:.0f} tokens/s/GPU ({p['error']:+.1%}); planned step "
            f"{p['step_seconds']:.2f} s vs {r['published']['step_seconds']:.2f} s measured; host share "
            f"{p['host_share']:.0%}; {r['status']}"
            + (f" ({', '.join(r['approximations'])})" if r["approximations"] else "")
            + f". Breakdown: {terms}.")
    lines.append("")

    mem = [[r["row_id"], r["model_key"], r["num_gpus"], r["published"]["peak_allocated_reported_gb"],
            r["published"]["peak_allocated_gib"], r["pinned"]["peak_gib"],
            f"{r['pinned']['peak_gib'] / r['published']['peak_allocated_gib'] - 1:+.1%}", r["status"]]
           for r in _planned(records) if r["published"]["peak_allocated_gib"]]
    if mem:
        lines += ["## Memory where the run's peak is published", "",
                  "The cards print Megatron-Bridge's memory report, bytes / 1e9 (\"memory (GB)\"), under a GiB "
                  "label; the measured peak is that figure in GiB.", ""]
        lines += _table(["row", "model", "GPUs", "reported peak allocated GB", "measured peak allocated GiB",
                         "planned peak GiB", "error", "mapping"], mem)

    lines += ["## Every configuration", ""]
    every = []
    for r in records:
        p = r["pinned"]
        if p is None:
            outcome = [f"skipped: {r['skip_reason']}", "-", "-", "-", "-"]
        elif p["outcome"] != "planned":
            outcome = [f"{p['outcome']}: {p['rule']}", "-", "-", "-", "-"]
        else:
            outcome = [f"{p['predicted_tokens_per_sec_per_gpu']:.0f}", _pct(p["error"], True),
                       "yes" if p["fits"] else f"no ({p['peak_gib']:.0f} GiB)", f"{p['host_share']:.0%}",
                       ", ".join(r["approximations"]) or "-"]
        every.append([r["row_id"], r["release"].split(" ")[0], r["model_key"], r["system"], r["num_gpus"],
                      r["precision"], r["half"], _layout(r["published"]), r["published"]["gbs"],
                      r["published"]["mbs"], r["published"]["tokens_per_sec_per_gpu"], *outcome])
    lines += _table(["row", "release", "model", "system", "GPUs", "precision", "half", "layout", "gbs", "mbs",
                     "measured", "planned", "error", "fits", "host share", "approximations"], every)

    lines += ["## Approximations and skip reasons", ""]
    counts = s["approximations"]
    lines += [f"- `{k}` ({counts.get(k, 0)} rows): {v}." for k, v in APPROXIMATIONS.items()]
    lines += [f"- skipped `{k}` ({s['skip_reasons'].get(k, 0)} rows): {v}." for k, v in SKIPS.items()]
    return "\n".join(lines) + "\n"
