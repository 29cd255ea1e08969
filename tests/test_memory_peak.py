"""The --memory-peak breakdown (runtime/worker/measure/memory.py peak_breakdown) on allocator traces built
by hand: what it says a step's peak holds and what a step leaves for the next one to free."""

from __future__ import annotations

import pytest

memory = pytest.importorskip("megacpp.runtime.worker.measure.memory")

MIB = 2**20


def _alloc(addr: int, mib: float, where: str) -> dict:
    return {"action": "alloc", "addr": addr, "size": int(mib * MIB),
            "frames": [{"filename": f"/site-packages/{where}", "line": 1, "name": "f"}]}


def _free(addr: int, mib: float) -> dict:
    return {"action": "free_requested", "addr": addr, "size": int(mib * MIB), "frames": []}


def test_a_block_from_the_previous_step_freed_during_this_one_lowers_its_peak():
    start = 1000 * MIB  # includes a 160 MiB block the previous step left (address 9)
    trace = [
        _alloc(1, 100, "pkg/act.py"),
        _free(9, 160),  # the previous step's leftover, freed early in this step
        _alloc(2, 200, "pkg/act.py"),
        _alloc(3, 50, "pkg/grad.py"),
        _free(2, 200),
        _free(1, 100),
        _alloc(4, 160, "pkg/keep.py"),  # left for the next step
        _free(3, 50),
    ]
    out = memory.peak_breakdown(trace, start)
    # 1000 + 100 - 160 + 200 + 50 = 1190 MiB; without counting the free of block 9 it would be 1350
    assert out["peak_gib"] == pytest.approx(1190 / 1024, abs=1e-4)
    assert out["sites_gib"] == {"pkg/act.py:1 f": pytest.approx(300 / 1024, abs=1e-4),
                                "pkg/grad.py:1 f": pytest.approx(50 / 1024, abs=1e-4)}
    assert out["largest_blocks_mib"]["pkg/act.py:1 f"] == [200.0, 100.0]
    assert out["left_after_step_gib"] == {"pkg/keep.py:1 f": pytest.approx(160 / 1024, abs=1e-4)}
    assert out["freed_from_before_step_gib"] == pytest.approx(160 / 1024, abs=1e-4)


def test_a_step_that_never_rises_above_its_start_has_no_sites():
    out = memory.peak_breakdown([_free(9, 10), _alloc(1, 5, "pkg/a.py")], 100 * MIB)
    assert out["peak_gib"] == pytest.approx(100 / 1024, abs=1e-4)
    assert out["sites_gib"] == {} and out["largest_blocks_mib"] == {}
    assert out["left_after_step_gib"] == {"pkg/a.py:1 f": pytest.approx(5 / 1024, abs=1e-4)}
