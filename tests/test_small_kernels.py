"""The per-letter reading of the small kernels' time from the committed profiles."""

from __future__ import annotations

import pytest

from benchmarks.gpu.small_kernels import fit, observations


def test_the_fit_recovers_each_letters_traffic_from_runs_that_mix_letters():
    truth = {"A": 25.0, "D": 12.0, "E": 20.0}
    units = [{"A": 1.0, "D": 2.0}, {"A": 1.0, "E": 3.0}, {"A": 2.0, "D": 1.0, "E": 1.0}, {"D": 1.0, "E": 1.0}]
    rows = [{"units": u, "seconds": sum(truth[x] * v for x, v in u.items())} for u in units]
    assert fit(rows) == pytest.approx(truth, rel=1e-6)


@pytest.mark.evidence
def test_every_profiled_te_run_on_one_stage_is_read_with_its_letters():
    rows = observations()
    assert len(rows) > 100
    letters = set().union(*(r["units"] for r in rows))
    assert letters == set("ADEMR")
    assert all(r["seconds"] > 0 for r in rows)
