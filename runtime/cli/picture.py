"""`megacpp explain layout --svg/--png`: the rank grid and the memory per stage as one picture.

Renders the explain document (planner/explain.py) with matplotlib, imported lazily so that the CLI
stays cheap and matplotlib stays optional (`pip install 'megacpp[viz]'`). No pyplot: the figure is
drawn on its own Agg canvas, so no global backend state is touched.

Left: one cell per GPU, nodes as rows and GPUs-in-node as columns (long clusters are wrapped into
side-by-side blocks of nodes), coloured by pipeline stage, hatched by expert shard, with TP groups
outlined. Beyond MAX_GRID_GPUS the grid is summarised to one cell per (pp, ep) pair. Right: stacked
memory bars per stage against the GPU's capacity.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from megacpp.planner.errors import PlanError

FORMATS = (".svg", ".png")
MAX_GRID_GPUS = 1024  # one cell per GPU up to here; a (pp, ep) summary beyond
EP_HATCHES = ("", "///", "\\\\\\", "xxx", "...", "ooo", "+++", "---")
MEMORY_PARTS = ("weights", "gradients", "optimizer", "activations", "buffers", "overhead")
MEMORY_COLOURS = ("#5b8db8", "#8fbbd9", "#f2b134", "#e8684a", "#9b8bc4", "#b8b8b8")
GRID_W, GRID_H_MAX, CELL_MAX = 8.5, 7.5, 1.1  # inches
LEFT, TOP, GAP, MEM_W = 0.8, 1.0, 1.4, 5.0  # inches


def stage_colour(pp_rank: int, pp: int) -> tuple[float, float, float]:
    """The fill colour of pipeline stage `pp_rank` of `pp`: qualitative (tab10, tab20, tab20 + tab20b), then a hue ramp."""
    from matplotlib import colormaps

    if pp <= 10:
        return colormaps["tab10"](pp_rank)[:3]
    if pp <= 40:
        return colormaps["tab20" if pp_rank < 20 else "tab20b"](pp_rank % 20)[:3]
    return colormaps["hsv"](0.9 * pp_rank / pp)[:3]  # 0.9: the wheel must not wrap back to the first stage's red


def _layout_text(lay: dict[str, Any]) -> str:
    parts = [f"tp{lay['tp']}", f"pp{lay['pp']}"] + [f"{k}{lay[k]}" for k in ("vpp", "cp") if lay[k] > 1]
    parts += [f"dp{lay['dp']}"] + ([f"ep{lay['ep']}"] if lay["ep"] > 1 else [])
    return " ".join(parts + (["sp"] if lay["sp"] else []))


def _stage_label(doc: dict[str, Any], pp_rank: int) -> str:
    """'pp0: L0-5 AEMEAE + embedding'; with virtual stages 'pp0: L0-1, L8-9, … AEAE each'."""
    chunks = [s for s in doc["stages"] if s["pp_rank"] == pp_rank]
    # a stage with no layers (only the embedding or the loss) has no span
    spans = [f"L{a}" if b - a == 1 else f"L{a}-{b - 1}" for a, b in (s["layers"] for s in chunks) if b > a]
    shapes = {s["blocks"] for s in chunks}
    blocks = next(iter(shapes)) if len(shapes) == 1 else ""
    blocks = blocks if len(blocks) <= 16 else blocks[:15] + "…"
    text = ", ".join(spans if len(spans) <= 4 else [*spans[:3], "…"]) + (f" {blocks}" if blocks else "")
    text += " each" if blocks and len(chunks) > 1 else ""
    owns = [o for s in chunks for o, on in (("embedding", s["embedding"]), ("head", s["output_head"])) if on]
    return f"pp{pp_rank}: {text}" + "".join(f" + {o}" for o in owns)


def _wrap(nodes: int, gpus_per_node: int) -> tuple[int, int]:
    """Side-by-side blocks of nodes and rows per block that give the per-GPU grid its largest cells."""
    def cell(k: int) -> float:
        return min(GRID_W / (k * (gpus_per_node + 1) - 1), GRID_H_MAX / math.ceil(nodes / k), CELL_MAX)

    k = max(range(1, nodes + 1), key=lambda k: (cell(k), nodes % k == 0, -k))
    rows = math.ceil(nodes / k)
    return math.ceil(nodes / rows), rows


def _cells(doc: dict[str, Any]) -> tuple[list[dict[str, Any]], int, int, list[tuple[int, int]]]:
    """Cells (x, y, pp, ep, tp group, label) in grid units, the grid's columns and rows, and node blocks."""
    lay, gpn = doc["layout"], doc["cluster"]["gpus_per_node"]
    moe = lay["ep"] > 1
    if doc["world_size"] > MAX_GRID_GPUS:
        nodes_of: dict[tuple[int, int], list[int]] = {}
        for r in doc["ranks"]:
            nodes_of.setdefault((r["pp"], r["ep"]), []).append(r["node"])
        cells = [{"x": ep, "y": pp, "pp": pp, "ep": ep, "group": None,
                  "label": f"pp{pp}" + (f" ep{ep}" if moe else "") + f"\n{len(n)} GPUs\nn{min(n)}-{max(n)}"}
                 for (pp, ep), n in sorted(nodes_of.items())]
        return cells, lay["ep"], lay["pp"], []
    tp_of = {r: i for i, g in enumerate(next(a["groups"] for a in doc["axes"] if a["axis"] == "tp")) for r in g}
    nodes = max(r["node"] for r in doc["ranks"]) + 1
    k, rows = _wrap(nodes, gpn)
    cells = []
    for r in doc["ranks"]:
        label = f"r{r['rank']}\ntp{r['tp']}" + (f" cp{r['cp']}" if lay["cp"] > 1 else "") + (f" ep{r['ep']}" if moe else f" dp{r['dp']}")
        cells.append({"x": (r["node"] // rows) * (gpn + 1) + r["local_rank"], "y": r["node"] % rows,
                      "pp": r["pp"], "ep": r["ep"], "group": tp_of[r["rank"]], "label": label})
    blocks = [(b * rows, min(nodes, (b + 1) * rows) - 1) for b in range(k)]
    return cells, k * (gpn + 1) - 1, rows, blocks


def _label_size(labels: list[str], cell_in: float) -> float:
    """The font size (points) at which the longest label fits 85% of a cell; 0 when that is too small to read."""
    lines = [line for text in labels for line in text.split("\n")]
    longest, count = max(map(len, lines)), max(text.count("\n") + 1 for text in labels)
    size = min(9.0, 0.85 * cell_in * 72 / (0.62 * longest), 0.85 * cell_in * 72 / (1.3 * count))
    return size if size >= 5.5 else 0.0


def _draw_grid(ax: Any, doc: dict[str, Any], cells: list[dict[str, Any]], cell_in: float, blocks: list[tuple[int, int]]) -> None:
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Rectangle

    pp, pad = doc["layout"]["pp"], 0.06
    boxes = [Rectangle((c["x"] + pad, c["y"] + pad), 1 - 2 * pad, 1 - 2 * pad) for c in cells]
    ax.add_collection(PatchCollection(boxes, facecolors=[stage_colour(c["pp"], pp) for c in cells], edgecolors="none"))
    if doc["layout"]["ep"] > 1:
        for ep in range(doc["layout"]["ep"]):
            hatch = EP_HATCHES[ep % len(EP_HATCHES)]
            mine = [b for b, c in zip(boxes, cells, strict=True) if c["ep"] == ep]
            if hatch and mine:
                ax.add_collection(PatchCollection(mine, facecolors="none", edgecolors=(0, 0, 0, 0.35), linewidths=0, hatch=hatch))
    if doc["layout"]["tp"] > 1 and blocks:  # outline each TP group's run of adjacent cells in a row
        runs: list[list[int]] = []
        for c in sorted(cells, key=lambda c: (c["y"], c["x"])):
            if runs and runs[-1][0] == c["group"] and runs[-1][1] == c["y"] and runs[-1][3] == c["x"]:
                runs[-1][3] += 1
            else:
                runs.append([c["group"], c["y"], c["x"], c["x"] + 1])
        outlines = [Rectangle((x0 + 0.02, y + 0.02), x1 - x0 - 0.04, 0.96) for _, y, x0, x1 in runs]
        ax.add_collection(PatchCollection(outlines, facecolors="none", edgecolors="#222222",
                                          linewidths=max(0.6, min(2.0, cell_in * 2.5))))
    size = _label_size([c["label"] for c in cells], cell_in)
    for c in cells if size else []:
        ax.text(c["x"] + 0.5, c["y"] + 0.5, c["label"], ha="center", va="center", fontsize=size, linespacing=1.15,
                bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "alpha": 0.75, "edgecolor": "none"})
    gpn, tick = doc["cluster"]["gpus_per_node"], min(7.5, max(5.0, cell_in * 40))
    if not blocks:  # summarised: rows are stages, columns expert shards
        ax.set_xticks([e + 0.5 for e in range(doc["layout"]["ep"])], [f"ep{e}" for e in range(doc["layout"]["ep"])])
        ax.set_yticks([p + 0.5 for p in range(pp)], [f"pp{p}" for p in range(pp)])
    else:
        ax.set_yticks([])
        stride = next(s for s in (1, 2, 4, 8, 16, 32, 64) if s * cell_in >= 0.14)
        for b, (first, last) in enumerate(blocks):
            x0 = b * (gpn + 1)
            for node in range(first, last + 1, stride):
                ax.text(x0 - 0.15, node - first + 0.5, f"n{node}" if len(blocks) == 1 else str(node),
                        ha="right", va="center", fontsize=tick)
            if len(blocks) > 1:
                ax.text(x0 + gpn / 2, -0.25 - (0.6 if cell_in >= 0.3 else 0), f"nodes {first}-{last}", ha="center", va="bottom", fontsize=8)
        shown = range(len(blocks)) if cell_in >= 0.3 else []
        ax.set_xticks([b * (gpn + 1) + g + 0.5 for b in shown for g in range(gpn)], [f"gpu{g}" for _ in shown for g in range(gpn)])
    ax.tick_params(length=0, labelsize=tick, labeltop=True, labelbottom=False)
    ax.set_frame_on(False)


def _draw_legends(ax: Any, doc: dict[str, Any]) -> None:
    from matplotlib.patches import Patch

    pp = doc["layout"]["pp"]
    stages = [Patch(facecolor=stage_colour(p, pp), label=_stage_label(doc, p)) for p in _shown_stages(pp)]
    if doc["layout"]["tp"] > 1 and doc["world_size"] <= MAX_GRID_GPUS:
        stages.append(Patch(facecolor="none", edgecolor="#222222", label=f"outline: one TP group (tp={doc['layout']['tp']})"))
    if doc["experts"] and doc["layout"]["ep"] == 1:
        last = doc["experts"][0]["owners"][0]["experts"][1]
        stages.append(Patch(facecolor="none", edgecolor="none", label=f"ep=1: every GPU holds experts 0-{last} of its E blocks"))
    first = ax.legend(handles=stages, loc="upper left", ncol=1 if len(stages) <= 12 else 2, fontsize=7.5, alignment="left",
                      title="pipeline stages (fill colour)", title_fontsize=8, frameon=False, handlelength=1.6)
    if doc["layout"]["ep"] > 1:
        shards = [Patch(facecolor="white", edgecolor="#444444", hatch=EP_HATCHES[o["ep_rank"] % len(EP_HATCHES)],
                        label=f"ep{o['ep_rank']}: " + (f"expert {o['experts'][0]}" if o["experts"][0] == o["experts"][1]
                                                       else f"experts {o['experts'][0]}-{o['experts'][1]}"))
                  for o in _shown_shards(doc)]
        ax.add_artist(first)
        ax.legend(handles=shards, loc="upper right", fontsize=7.5, title="expert shards (hatch)", title_fontsize=8, alignment="left",
                  frameon=False, handlelength=2.2, handleheight=1.4)
    ax.set_axis_off()


def _shown_stages(pp: int) -> list[int]:
    return list(range(pp)) if pp <= 32 else [*range(31), pp - 1]


def _shown_shards(doc: dict[str, Any]) -> list[dict[str, Any]]:
    owners = doc["experts"][0]["owners"] if doc["experts"] and doc["layout"]["ep"] > 1 else []
    return owners if len(owners) <= 9 else [*owners[:8], owners[-1]]


def _draw_memory(ax: Any, doc: dict[str, Any]) -> list[Any]:
    """Stacked bars per stage against the capacity line; returns the legend handles."""
    mem, pp = doc["memory"], doc["layout"]["pp"]
    rows = sorted(mem["per_stage"], key=lambda m: m["pp_rank"])
    y = list(range(len(rows)))
    left, handles = [0.0] * len(rows), []
    for part, colour in zip(MEMORY_PARTS, MEMORY_COLOURS, strict=True):
        values = [m[f"{part}_gib"] for m in rows]
        handles.append(ax.barh(y, values, left=left, color=colour, label=part, height=0.7))
        left = [a + b for a, b in zip(left, values, strict=True)]
    cap = mem["capacity_gib"]
    ax.set_xlim(0, max(cap, *left) * 1.1)
    for yi, total in zip(y, left, strict=True):
        ax.text(total, yi, f" {total:.1f}", va="center", fontsize=7,
                bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none", "pad": 0.5})
    ax.axvline(cap, color="#c0392b", linestyle="--", linewidth=1.4)
    ax.text(cap, -0.6, f"capacity {cap:g} GiB ", color="#c0392b", ha="right", va="bottom", fontsize=8)
    ax.set_ylim(len(rows) - 0.5, -1.0)
    ax.set_yticks(y, [f"pp{m['pp_rank']}" for m in rows], fontsize=8 if len(rows) <= 24 else 6)
    for label, m in zip(ax.get_yticklabels(), rows, strict=True):
        label.set_bbox({"facecolor": stage_colour(m["pp_rank"], pp), "edgecolor": "none", "pad": 1.5, "alpha": 0.85})
    ax.set_xlabel("GiB per GPU (predicts torch.cuda.max_memory_allocated)", fontsize=8)
    ax.tick_params(axis="x", labelsize=8)
    ax.set_title("memory per GPU of each stage", fontsize=10, loc="left")
    ax.spines[["top", "right"]].set_visible(False)
    return handles


def draw_layout(doc: dict[str, Any], path: Path) -> None:
    """Write the rank grid and memory bars of an explain document to `path` (.svg or .png)."""
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise PlanError(f"{path}: cannot draw a {suffix or 'suffix-less'!r} picture; use a file name ending in .svg or .png")
    try:
        from matplotlib import rc_context
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise PlanError(f"{path}: drawing pictures needs matplotlib; pip install 'megacpp[viz]'") from None

    lay, c, t = doc["layout"], doc["cluster"], doc["time"]
    cells, cols, rows, blocks = _cells(doc)
    cell_in = min(GRID_W / cols, GRID_H_MAX / rows, CELL_MAX)
    grid_w, grid_h = cols * cell_in, rows * cell_in
    n_stages = len(_shown_stages(lay["pp"])) + (lay["tp"] > 1) + (bool(doc["experts"]) and lay["ep"] == 1)
    legend_h = 0.5 + 0.19 * max(n_stages if n_stages <= 12 else (n_stages + 1) // 2, 1.35 * len(_shown_shards(doc)))
    head = 0.45 if len(blocks) > 1 and cell_in >= 0.3 else 0.3
    mem_h = min(max(grid_h, 0.3 * lay["pp"] + 1.0), 0.6 * lay["pp"] + 1.0)
    body_h = max(head + grid_h + 0.3 + legend_h, 0.4 + mem_h + 1.2)
    width, height = LEFT + GRID_W + GAP + MEM_W + 0.6, TOP + body_h + 0.2

    with rc_context({"svg.fonttype": "none", "font.size": 8}):
        fig = Figure(figsize=(width, height), dpi=100)
        FigureCanvasAgg(fig)
        grid_top = height - TOP - head
        ax = fig.add_axes((LEFT / width, (grid_top - grid_h) / height, grid_w / width, grid_h / height))
        ax.set_xlim(0, cols)
        ax.set_ylim(rows, 0)
        _draw_grid(ax, doc, cells, cell_in, blocks)
        leg = fig.add_axes((LEFT / width, (grid_top - grid_h - 0.3 - legend_h) / height, GRID_W / width, legend_h / height))
        _draw_legends(leg, doc)
        mem_x, mem_top = (LEFT + GRID_W + GAP) / width, height - TOP - 0.4
        mem = fig.add_axes((mem_x, (mem_top - mem_h) / height, MEM_W / width, mem_h / height))
        handles = _draw_memory(mem, doc)
        fig.legend(handles=handles, loc="upper left", bbox_to_anchor=(mem_x, (mem_top - mem_h - 0.5) / height), ncol=6,
                   fontsize=7.5, frameon=False, handlelength=1.2, columnspacing=1.0)

        summary = f" — summarised: {doc['world_size'] // (lay['pp'] * lay['ep'])} GPUs per (pp, ep) cell" if not blocks else ""
        fig.text(LEFT / width, 1 - 0.3 / height, f"{doc['spec']} — {doc['world_size']} GPU{'s' * (doc['world_size'] > 1)} ({c['nodes']} × {c['gpus_per_node']} "
                 f"{c['name']}) — {_layout_text(lay)}{summary}", fontsize=12, fontweight="bold", va="top")
        fig.text(LEFT / width, 1 - 0.62 / height, f"{doc['pattern']}   step {t['step_seconds']:.2f} s, MFU {t['mfu']:.0%}, "
                 f"bubble {t['bubble_fraction']:.1%}, peak {doc['memory']['peak_gib']:.1f} of {doc['memory']['capacity_gib']:g} GiB"
                 + (f", costliest axis {doc['costliest_axis']}" if doc["costliest_axis"] else ""), fontsize=9, va="top", color="#333333")
        try:
            fig.savefig(path, format=suffix[1:], metadata={"Date": None} if suffix == ".svg" else None)
        except OSError as exc:
            raise PlanError(f"{path}: cannot write ({exc.strerror})") from None
