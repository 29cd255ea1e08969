"""benchmarks/gpu/megatron_lm_runs.py reads Megatron-LM's own log lines and the exit probe."""

import pytest

from benchmarks.gpu.megatron_lm_runs import parse_logs

LOG = """
 [2026-11-22 19:20:01] iteration        1/      12 | consumed samples:           16 | elapsed time per iteration (ms): 6482.9 | learning rate: 3.0E-04 | global batch size:    16 | lm loss: 1.119415E+01 | loss scale: 1.0 |
 [2026-11-22 19:20:02] iteration        2/      12 | consumed samples:           32 | elapsed time per iteration (ms): 3715.4 | learning rate: 3.0E-04 | global batch size:    16 | lm loss: 7.420267E+00 | loss scale: 1.0 |
 [2026-11-22 19:20:03] iteration        3/      12 | consumed samples:           48 | elapsed time per iteration (ms): 910.9 | learning rate: 3.0E-04 | global batch size:    16 | lm loss: 1.620005E+00 | loss scale: 1.0 |
 [2026-11-22 19:20:04] iteration        4/      12 | consumed samples:           64 | elapsed time per iteration (ms): 913.6 | learning rate: 3.0E-04 | global batch size:    16 | lm loss: 9.647000E-01 | loss scale: 1.0 |
 [2026-11-22 19:20:05] iteration        5/      12 | consumed samples:           80 | elapsed time per iteration (ms): 900.0 | learning rate: 3.0E-04 | global batch size:    16 | lm loss: 3.715401E-01 | loss scale: 1.0 |
[megacpp-probe] rank 1 max_allocated_gib 16.4037 max_reserved_gib 18.4668
[default0]:[megacpp-probe] rank 0 max_allocated_gib 19.5835 max_reserved_gib 21.2305
"""


def test_peaks_by_rank_losses_and_the_median_after_warmup():
    parsed = parse_logs(LOG + LOG, world=2)  # console and per-rank files repeat lines
    assert parsed["per_rank_peak_gib"] == [19.5835, 16.4037]
    assert parsed["per_rank_reserved_gib"] == [21.2305, 18.4668]
    assert parsed["losses"] == [11.19415, 7.420267, 1.620005, 0.9647, 0.3715401]
    assert parsed["measured_step_seconds"] == pytest.approx((0.9136 + 0.9) / 2)


def test_a_rank_that_did_not_report_is_an_error():
    with pytest.raises(ValueError, match=r"ranks reported \[0, 1\] of 4"):
        parse_logs(LOG, world=4)
