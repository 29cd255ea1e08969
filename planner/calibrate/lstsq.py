"""Least squares for a handful of unknowns: the normal equations, solved by elimination in
units that give every unknown's column the same norm."""

from __future__ import annotations

from megacpp.planner.errors import PlanError


def _normal_equations(rows: list[list[float]], rhs: list[float]) -> list[list[float]]:
    k = len(rows[0])
    return [[sum(r[i] * r[j] for r in rows) for j in range(k)] + [sum(r[i] * b for r, b in zip(rows, rhs, strict=True))]
            for i in range(k)]


def _eliminate(a: list[list[float]]) -> list[float] | None:
    """Gauss-Jordan on an augmented k x (k+1) system; None where a column is a combination of the others."""
    k = len(a)
    scale = max(abs(a[i][i]) for i in range(k))
    for col in range(k):
        pivot = max(range(col, k), key=lambda r: abs(a[r][col]))
        if abs(a[pivot][col]) <= 1e-12 * scale:
            return None
        a[col], a[pivot] = a[pivot], a[col]
        for r in range(k):
            if r != col:
                f = a[r][col] / a[col][col]
                a[r] = [x - f * y for x, y in zip(a[r], a[col], strict=True)]
    return [a[i][k] / a[i][i] for i in range(k)]


def _scaled(rows: list[list[float]]) -> tuple[list[list[float]], list[float]]:
    """The rows with every unknown's column scaled to norm 1, and the norms."""
    k = len(rows[0])
    norms = [max(sum(r[i] ** 2 for r in rows), 1e-300) ** 0.5 for i in range(k)]
    return [[r[i] / norms[i] for i in range(k)] for r in rows], norms


def separable(rows: list[list[float]]) -> bool:
    """Whether the rows determine every unknown (no column a combination of the others)."""
    scaled, _ = _scaled(rows)
    return _eliminate(_normal_equations(scaled, [0.0] * len(rows))) is not None


def solve(rows: list[list[float]], rhs: list[float], prior: list[float]) -> list[float]:
    """Least squares by the normal equations (a handful of unknowns). Where the runs do not
    determine every unknown (one letter's count a combination of the others' in every run), the
    answer is the least-squares solution nearest `prior`, measured in units that give every
    unknown's column the same norm: iterated Tikhonov from the prior with a 1e-9 ridge, which
    leaves determined values exact to far below their rounding."""
    k = len(rows[0])
    scaled, norms = _scaled(rows)
    a = _normal_equations(scaled, rhs)
    y = [p * n for p, n in zip(prior, norms, strict=True)]
    for _ in range(4):
        ridged = [row[:k] + [row[k] + 1e-9 * y[i]] for i, row in enumerate(a)]
        for i in range(k):
            ridged[i][i] += 1e-9
        solved = _eliminate(ridged)
        if solved is None:
            raise PlanError("calibrate: the runs do not separate the block kinds' overheads; add runs of other shapes")
        y = solved
    return [v / n for v, n in zip(y, norms, strict=True)]
