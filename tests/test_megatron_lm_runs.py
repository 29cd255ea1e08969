"""benchmarks/gpu/megatron_lm_runs.py reads Megatron-LM's own log lines and the exit probe."""

import pytest

from benchmarks.gpu.megatron_lm_runs import append_arguments, parse_logs, trace_summary

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


def test_the_profiled_tail_is_left_out_of_the_step_time():
    parsed = parse_logs(LOG, world=2, tail=1)  # iterations 4 and 5 timed, the 5th profiled
    assert parsed["measured_step_seconds"] == pytest.approx(0.9136)
    assert len(parsed["iteration_seconds"]) == 5


def test_extra_arguments_end_the_rendered_command_quoted():
    script = 'exec torchrun \\\n  "$MEGATRON_LM/pretrain_gpt.py" \\\n  --bf16 \\\n  $MEGACPP_NO_GA_FUSION\n'
    out = append_arguments(script, ["--no-create-attention-mask-in-dataloader", "a b;rm"])
    assert out.endswith("$MEGACPP_NO_GA_FUSION --no-create-attention-mask-in-dataloader 'a b;rm'\n")
    assert out.count("\n") == script.count("\n")


def test_trace_summary_counts_busy_gpu_time_once_across_streams_and_the_host_waits():
    def x(name, cat, ts, dur):
        return {"ph": "X", "name": name, "cat": cat, "ts": ts, "dur": dur}

    trace = {"traceEvents": [
        x("ProfilerStep#9", "user_annotation", 0, 10_000),
        x("nvjet_tst_128x256_64x4", "kernel", 100, 1_000),          # matmul, stream 7
        x("ncclDevKernel_AllReduce_Sum_bf16", "kernel", 600, 1_000),  # overlaps it on another stream
        x("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16", "kernel", 3_000, 500),
        x("Memcpy DtoH (Device -> Pinned)", "gpu_memcpy", 4_000, 100),
        x("cudaStreamSynchronize", "cuda_runtime", 3_900, 700),
        x("cudaLaunchKernel", "cuda_runtime", 50, 5),
        {"ph": "i", "name": "marker", "ts": 5},                        # not a complete event
    ]}
    summary = trace_summary(trace)
    assert summary["wall_seconds"] == pytest.approx(0.010)
    assert summary["kernels"] == 4
    assert summary["kernel_seconds"] == {"attention_softmax": 0.0005, "communication": 0.001, "copy": 0.0001, "matmul": 0.001}
    assert summary["compute_kernel_seconds"] == pytest.approx(0.0016)
    assert summary["gpu_busy_seconds"] == pytest.approx(0.0015 + 0.0005 + 0.0001)  # 100..1600, 3000..3500, 4000..4100
    assert (summary["host_waits"], summary["host_wait_seconds"]) == (1, 0.0007)
    assert summary["most_launched"][0] == ["Memcpy DtoH (Device -> Pinned)", 1, 0.0001]  # ties by name
    assert ["nvjet_tst_128x256_64x4", 1, 0.001] in summary["most_launched"]


def test_the_runtime_profile_counts_kernels_not_the_annotations_over_them():
    """c10d's "nccl:all_to_all" annotation sits on the GPU timeline over its SendRecv kernel with
    the same span: the runtime's profile counts the kernel once, as Megatron-LM's trace is read."""
    from types import SimpleNamespace

    import torch

    from megacpp.runtime.worker.measure.profile import gpu_work

    def event(name, start, dur, device="CUDA", annotation=False, device_time=None):
        return SimpleNamespace(name=name, device_type=getattr(torch.autograd.DeviceType, device), is_user_annotation=annotation,
                               device_time_total=dur if device_time is None else device_time,
                               time_range=SimpleNamespace(start=start, elapsed_us=lambda d=dur: d))

    events = [event("nccl:all_to_all", 100, 500, annotation=True), event("ncclDevKernel_SendRecv", 100, 500),
              event("aten::mm", 0, 50, device="CPU"), event("nvjet_tst_128x256_64x4", 700, 200),
              event("cudaLaunchKernel", 0, 5, device_time=0)]
    assert gpu_work(events) == [("ncclDevKernel_SendRecv", 100, 500), ("nvjet_tst_128x256_64x4", 700, 200)]


def test_exposed_communication_is_collective_time_no_other_kernel_covers():
    from megacpp.runtime.worker.measure.profile import gpu_activity

    gpu = [
        ("nvjet_tst_128x256_64x4", 100, 1_000),                          # compute 100..1100
        ("ncclDevKernel_AllReduce_Sum_bf16_RING_LL", 600, 1_000),         # 600..1600: 500 under compute
        ("ncclDevKernel_ReduceScatter_Sum_f32_RING_LL", 2_000, 400),      # alone: all exposed
        ("ncclDevKernel_ReduceScatter_Sum_f32_RING_LL", 2_200, 400),      # overlaps the one before
        ("vectorized_elementwise_kernel", 2_500, 50),                     # covers 50 of them
        ("ncclDevKernel_AllGather_RING_LL", 3_000, 200),
        ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop", 2_900, 400),  # covers the all-gather
    ]
    summary = gpu_activity(0.01, gpu, [])
    assert summary["communication_seconds"] == {"allgather": 0.0002, "allreduce": 0.001, "reducescatter": 0.0006}
    assert summary["exposed_communication_seconds"] == {"allgather": 0.0, "allreduce": 0.0005, "reducescatter": 0.00055}
    assert summary["gpu_busy_seconds"] == pytest.approx(0.0015 + 0.0006 + 0.0004)
