"""Unions of time intervals (start, end), for a profiled step's GPU busy time and its overlaps.
Pure Python: the trace tools read them without torch."""

from __future__ import annotations

Spans = list[tuple[float, float]]


def merged(spans: Spans) -> Spans:
    """The union of intervals, as sorted disjoint intervals."""
    out: Spans = []
    for start, end in sorted(spans):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def length(union: Spans) -> float:
    return sum(end - start for start, end in union)


def overlap(a: Spans, b: Spans) -> float:
    """The length of the intersection of two unions of intervals (each from `merged`)."""
    total, i, j = 0.0, 0, 0
    while i < len(a) and j < len(b):
        total += max(min(a[i][1], b[j][1]) - max(a[i][0], b[j][0]), 0.0)
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total
