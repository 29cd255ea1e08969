"""benchmarks/gpu/trace_phases.py on a Chrome trace built by hand: two micro-batches whose
forward runs on the main thread and backward on the autograd thread, then the optimizer step."""

import gzip
import json

import pytest

from benchmarks.gpu.trace_phases import main, phases

MAIN, AUTOGRAD = 1, 2


def _trace() -> dict:
    ev: list[dict] = []
    corr = iter(range(1, 1000))

    def op(tid: int, name: str, ts: float, dur: float) -> None:
        ev.append({"ph": "X", "cat": "cpu_op", "name": name, "tid": tid, "ts": ts, "dur": dur})

    def launch(tid: int, ts: float, start: float, dur: float) -> None:
        c = next(corr)
        ev.append({"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "tid": tid, "ts": ts, "dur": 5, "args": {"correlation": c}})
        ev.append({"ph": "X", "cat": "kernel", "name": "gemm", "tid": 7, "ts": start, "dur": dur, "args": {"correlation": c}})

    # micro-batch k: forward on the main thread over [t, t + 10000) us with a 1000 us wait on the
    # GPU, a 2000 us kernel; backward over [t + 10000, t + 16000) us, two kernels of 3000 us
    for k in range(2):
        t = 20000.0 * k
        op(MAIN, "forward", t, 10000)
        launch(MAIN, t + 100, t + 200, 2000)
        ev.append({"ph": "X", "cat": "cuda_runtime", "name": "cudaStreamSynchronize", "tid": MAIN, "ts": t + 2200, "dur": 1000})
        op(AUTOGRAD, "autograd::engine::evaluate_function: MmBackward0", t + 10000, 3000)
        op(AUTOGRAD, "autograd::engine::evaluate_function: AddBackward0", t + 13000, 3000)
        launch(AUTOGRAD, t + 10100, t + 10200, 3000)
        launch(AUTOGRAD, t + 13100, t + 13200, 3000)
        op(MAIN, "wait for backward", t + 10000, 6000)  # the main thread blocks in backward(); not a window of its own
        op(MAIN, "next", t + 16000, 100)
    op(MAIN, "Optimizer.step", 40000, 4000)
    launch(MAIN, 40100, 40200, 3000)
    return {"traceEvents": ev}


def test_phases_split_the_step_into_forward_backward_and_optimizer_windows():
    got = phases(_trace())
    assert got["total"]["micro_batches"] == 2
    assert got["total"]["wall_s"] == pytest.approx(0.044)
    assert got["total"]["gpu_busy_s"] == pytest.approx(2 * (0.002 + 0.006) + 0.003)
    fwd, bwd, opt = got["forward"], got["backward"], got["optimizer"]
    # forward windows: [0, 10000) and [16000, 30000) us, up to each backward's first op
    assert fwd["windows"] == 2 and fwd["wall_s"] == pytest.approx(0.010 + 0.014)
    assert fwd["waits"] == 2 and fwd["wait_s"] == pytest.approx(0.002)
    # the GPU runs the backward's last kernel 200 us into the next window
    assert fwd["gpu_busy_s"] == pytest.approx(0.0042) and fwd["launched_gpu_s"] == pytest.approx(0.004)
    assert bwd["windows"] == 2 and bwd["wall_s"] == pytest.approx(0.012)
    assert bwd["waits"] == 0 and bwd["launched_gpu_s"] == pytest.approx(0.012)
    assert bwd["gpu_busy_s"] == pytest.approx(0.012 - 2 * 0.0002)  # the last kernel of each runs past its window
    assert opt["windows"] == 1 and opt["launched_gpu_s"] == pytest.approx(0.003) and opt["gpu_busy_s"] == pytest.approx(0.0032)


def test_cli_reads_gzipped_traces_and_writes_json(tmp_path, capsys):
    path = tmp_path / "t.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump(_trace(), f)
    assert main([str(path), "--json", str(tmp_path / "out.json")]) == 0
    assert "2 micro-batches" in capsys.readouterr().out
    assert json.loads((tmp_path / "out.json").read_text())["t.json.gz"]["forward"]["windows"] == 2
