"""Communication at scale: the links each group uses, and the overlaps Megatron schedules."""

from __future__ import annotations

import functools
import math

import pytest

from benchmarks.scale.truth import convert, load_runs, read_recipe
from megacpp.planner.axes import Axis
from megacpp.planner.cost.coefficients import DEFAULT_EFFICIENCY, FLEX_LINK_SHARE
from megacpp.planner.cost.communication import (
    Placement,
    combined_1f1b_seconds,
    communication,
    ep_overlap_layers,
    ep_overlap_unpaired,
    expert_sends,
    group_seconds,
    overlapped,
    placement,
    ring_exposed,
)
from megacpp.planner.cost.memory import stage_memory
from megacpp.planner.cost.step import block_seconds
from megacpp.planner.errors import SpecError
from megacpp.planner.megatron.args import TrainOptions, megatron_args
from megacpp.planner.plan import build_plan, estimate_run, make_context
from megacpp.planner.search.layout import Layout
from megacpp.planner.search.rules import check_layout
from megacpp.planner.search.stages import assign_stages
from megacpp.planner.spec.loading import spec_from_dict
from tests.conftest import TINY_DENSE, TINY_MOE, make_spec

GIB = 2**30
# 8 GPUs per node and per NVLink domain, one NIC per GPU at 47 GB/s (h100-sxm-8)
H100_NODES = {"cluster.preset": "h100-sxm-8", "backend.transformer_engine": True}
BIG_MOE = {"model.hidden_size": 2048, "model.moe.num_experts": 128, "model.moe.top_k": 8,
           "model.moe.ffn_hidden_size": 768, "model.attention.num_heads": 16, "model.attention.num_query_groups": 4,
           "model.attention.head_dim": 128, "training.seq_length": 4096, "training.global_batch_size": 256}


def _ctx(base=TINY_DENSE, **changes):
    return make_context(make_spec(base, **{**H100_NODES, **changes}))


def _comms(spec, **layout):
    return {c.axis: c for c in estimate_run(spec, Layout(**layout)).communication}


def test_groups_lie_on_the_machine_in_megatrons_rank_order():
    """Consecutive ranks fill an NVLink domain first: DP over 64 GPUs with TP1 holds 8 ranks per
    node; with TP8 each of its ranks is on another node; TP8 is one node."""
    ctx = _ctx(**{"cluster.nodes": 8})
    assert placement(ctx, 64, 1) == Placement(64, 8, 8)
    assert placement(ctx, 8, 8) == Placement(8, 1, 8)
    assert placement(ctx, 8, 1) == Placement(8, 8, 1) and placement(ctx, 8, 1).link == "nvlink"
    assert placement(ctx, 4, 4) == Placement(4, 2, 2) and placement(ctx, 4, 4).link == "nic"


def test_a_ring_across_nodes_runs_one_channel_per_nic_of_the_group():
    """A reduce-scatter over 8 nodes with 8 ranks on each moves 1/8 of the ring's bytes through
    each NIC (376 GB/s of bus bandwidth, the 377 measured on 4 x 8 B200 [R2]); one rank per node
    moves all of them through its NIC."""
    ctx = _ctx(**{"cluster.nodes": 8})
    size = 4 * GIB
    wide = group_seconds(ctx, "reduce-scatter", Placement(64, 8, 8), size)
    thin = group_seconds(ctx, "reduce-scatter", Placement(8, 1, 8), size)
    alpha = ctx.cluster.nic_alpha_us * 1e-6
    assert (63 / 64) * size / (wide - alpha) / 1e9 == pytest.approx(8 * ctx.cluster.nic_busbw_gbps)
    assert thin - alpha == pytest.approx(7 / 8 * size / (ctx.cluster.nic_busbw_gbps * 1e9))


def test_an_all_to_all_over_two_nodes_sends_half_its_bytes_over_the_nic_and_the_rest_over_nvlink():
    """EP16 over two nodes: each rank sends (k-1)/k = 1/2 of its buffer through its own NIC while
    7/16 of it moves over NVLink; the NIC decides, at twice the speed of all of it at NIC rate."""
    ctx = _ctx(**{"cluster.nodes": 2})
    size = GIB
    t = group_seconds(ctx, "all-to-all", Placement(16, 8, 2), size)
    c = ctx.cluster
    nic = size / 2 / (c.nic_busbw_gbps * 1e9)
    assert 7 / 16 * size / (c.nvlink_alltoall_gbps * 1e9) < nic
    assert t == pytest.approx(c.nic_alpha_us * 1e-6 + nic)
    everything_at_nic = 15 / 16 * size / (c.nic_busbw_gbps * 1e9)
    assert t < 0.6 * everything_at_nic


def test_the_flex_dispatcher_sends_a_token_once_per_rank_and_once_per_node():
    """DeepEP / HybridEP send a token once to each rank holding one of its experts and once to
    each remote node; the alltoall dispatcher sends one copy per expert."""
    moe = make_spec(TINY_MOE, **BIG_MOE).model.moe
    flex = moe.model_copy(update={"dispatcher": "flex"})
    two_nodes = Placement(16, 8, 2)
    sent, nvlink, nic = expert_sends(moe, two_nodes)
    assert (sent, nic) == (8, 4)  # top-8 copies, half of them to the other node
    f_sent, f_nvlink, f_nic = expert_sends(flex, two_nodes)
    # P(a node gets none of 8 experts out of 128, 64 on it) = C(64, 8) / C(128, 8)
    assert f_nic == pytest.approx(1 - math.comb(64, 8) / math.comb(128, 8))
    assert f_sent == pytest.approx(16 * (1 - math.comb(120, 8) / math.comb(128, 8)))
    assert f_nic < nic / 3 and f_sent < sent and f_nvlink < nvlink


def test_node_limited_routing_sends_a_token_to_fewer_nodes_under_flex_only():
    """DeepSeek-V3's routing (256 experts in 8 groups, each token's top 8 from 4 of them) on EP64
    over 8 nodes, a group a node: the flex dispatcher sends a token to the 3.5 remote nodes of its
    4 groups on average, not the 4.6 an unlimited top 8 reaches; the alltoall dispatcher still
    sends a copy per expert. A limit that leaves every group open changes nothing."""
    base = {"num_experts": 256, "top_k": 8, "ffn_hidden_size": 2048, "dispatcher": "flex"}
    free = spec_from_dict({**TINY_MOE, "model": {**TINY_MOE["model"], "moe": base}}).model.moe
    limited = free.model_copy(update={"router_num_groups": 8, "router_group_topk": 4})
    eight_nodes = Placement(64, 8, 8)
    assert expert_sends(free, eight_nodes)[2] == pytest.approx(7 * (1 - math.comb(224, 8) / math.comb(256, 8)))
    assert expert_sends(limited, eight_nodes)[2] == pytest.approx(7 * 4 / 8)
    # a rank (4 experts) gets the token when its group is chosen and one of the group's ~2 picks is its
    ranks = 64 * 4 / 8 * (1 - math.comb(28, 2) / math.comb(32, 2))
    assert expert_sends(limited, eight_nodes)[0] == pytest.approx(ranks)
    open_limit = free.model_copy(update={"router_num_groups": 8, "router_group_topk": 8})
    assert expert_sends(open_limit, eight_nodes) == expert_sends(free, eight_nodes)
    alltoall = (free.model_copy(update={"dispatcher": "alltoall"}), limited.model_copy(update={"dispatcher": "alltoall"}))
    assert expert_sends(alltoall[0], eight_nodes) == expert_sends(alltoall[1], eight_nodes) == (8, 8 * 7 / 64, 8 * 7 / 8)


@pytest.mark.parametrize(("moe", "message"), [
    ({"router_num_groups": 8}, "router_num_groups and router_group_topk go together"),
    ({"router_group_topk": 2}, "router_num_groups and router_group_topk go together"),
    ({"router_num_groups": 5, "router_group_topk": 1}, "router_num_groups=5 must divide num_experts=48"),
    ({"router_num_groups": 4, "router_group_topk": 5}, "router_group_topk=5 exceeds router_num_groups=4"),
    ({"router_num_groups": 16, "router_group_topk": 2, "top_k": 8}, "router_group_topk=2 groups of 3 experts hold fewer than top_k=8"),
])
def test_group_limited_routing_follows_megatrons_rules(moe, message):
    spec = {**TINY_MOE["model"]["moe"], "num_experts": 48, **moe}
    with pytest.raises(SpecError, match=message):
        spec_from_dict({**TINY_MOE, "model": {**TINY_MOE["model"], "moe": spec}})


def test_group_limited_routing_renders_megatrons_flags():
    spec = make_spec(TINY_MOE, **{"model.moe.num_experts": 16, "model.moe.router_num_groups": 4,
                                  "model.moe.router_group_topk": 2})
    plan = build_plan(spec, top=1)
    args = megatron_args(plan.context, plan.candidates[0], TrainOptions())
    at = args.index("--moe-router-num-groups")
    assert args[at:at + 4] == ["--moe-router-num-groups", "4", "--moe-router-group-topk", "2"]
    plain = build_plan(make_spec(TINY_MOE, **{"model.moe.num_experts": 16}), top=1)
    assert "--moe-router-num-groups" not in megatron_args(plain.context, plain.candidates[0], TrainOptions())


def test_ep_across_nodes_is_priced_by_its_nic_share_and_flex_by_its_own_bytes():
    """Qwen3-30B-A3B-like EP16 on 2 x 8 H100: the all-to-all costs what its NIC share costs, far
    below every byte at NIC speed; the flex dispatcher (one copy per node) less again."""
    lay = {"dp": 16, "ep": 16, "num_microbatches": 16}
    spec = make_spec(TINY_MOE, **{**H100_NODES, **BIG_MOE, "cluster.nodes": 2})
    a2a = _comms(spec, **lay)["ep"]
    assert a2a.link == "nic" and a2a.group_size == 16
    routed = a2a.bytes_per_step  # every routed copy, top_k per token
    calls = 4 * 4 * 16  # E blocks x dispatch/combine in forward and backward x micro-batches
    at_nic = routed * 15 / 16 / (47e9)
    assert a2a.seconds == pytest.approx(routed / 2 / 47e9 + calls * 100e-6, rel=1e-6)
    assert a2a.seconds < 0.6 * at_nic
    flex = _comms(make_spec(TINY_MOE, **{**H100_NODES, **BIG_MOE, "cluster.nodes": 2, "model.moe.dispatcher": "flex",
                                         "model.moe.flex_backend": "hybridep"}), **lay)["ep"]
    assert flex.seconds < a2a.seconds / 3
    assert FLEX_LINK_SHARE["deepep"] == (1.0, 1.0)


def test_ep_overlap_hides_the_all_to_alls_but_the_unpaired_steps():
    """Under Megatron's combined 1F1B one micro-batch's all-to-alls run under another's compute:
    without a pipeline only the first forward's and the last backward's show (1/m), while
    compute lasts; with the interleaved schedule rank 0's warmup and cooldown steps show."""
    assert ep_overlap_unpaired(Layout(num_microbatches=64)) == 1 / 64
    assert ep_overlap_unpaired(Layout(pp=8, vpp=4, num_microbatches=64)) == (2 * 7 + 3 * 8 + 1) / (64 * 4)
    assert overlapped(10.0, 0.1, 100.0) == pytest.approx(1.0)
    assert overlapped(10.0, 0.1, 4.0) == pytest.approx(1.0 + 5.0)
    lay = {"dp": 16, "ep": 16, "num_microbatches": 16}
    base = {**H100_NODES, **BIG_MOE, "cluster.nodes": 2}
    off = _comms(make_spec(TINY_MOE, **base), **lay)["ep"]
    on = _comms(make_spec(TINY_MOE, **base, **{"model.moe.overlap_communication": True}), **lay)["ep"]
    assert on.seconds == off.seconds and off.exposed_seconds == off.seconds
    assert off.seconds / 16 <= on.exposed_seconds < off.seconds / 2


def test_combined_1f1b_overlaps_each_all_to_all_with_the_compute_beside_it():
    """Megatron pairs a forward layer with a backward layer on two streams: combine_bwd beside
    the attention's forward, the dispatches beside the MLP's backward and forward, combine_fwd
    beside the attention's backward. A layer's compute (3 x (attention + MLP) forward seconds)
    hides all-to-alls shorter than each piece beside them, and not one longer than the attention's
    forward, however long the MLP: the whole step's compute is not one pool to hide in."""
    dense = [(1.0, 2.0, 0.0)] * 4
    assert combined_1f1b_seconds(dense) == pytest.approx(4 * 3 * (1.0 + 2.0))
    assert combined_1f1b_seconds([(1.0, 2.0, 0.5)] * 4) == pytest.approx(4 * 9.0)
    # the all-to-alls (4 x 1.5 s a layer) are shorter than the layer's 9 s, yet each waits on a
    # 0.5 s attention forward or the dispatch before it
    short_attention = combined_1f1b_seconds([(0.5, 2.5, 1.5)] * 4)
    assert short_attention > 4 * 9.0 + 0.5
    assert short_attention - 4 * 9.0 < 4 * (4 * 1.5)
    # all-to-alls longer than all the compute beside them decide: the comm stream runs end to end
    assert combined_1f1b_seconds([(1.0, 1.0, 10.0)] * 4) == pytest.approx(4 * 4 * 10.0, rel=0.1)
    # each AD or AE pair is a layer; only an E block's all-to-alls are on the comm stream
    assert ep_overlap_layers("ADAEAE", {"A": 3.0, "D": 6.0, "E": 9.0}, 0.4) == [(1.0, 2.0, 0.0), (1.0, 3.0, 0.4),
                                                                               (1.0, 3.0, 0.4)]


def test_the_step_prices_the_expert_overlap_layer_by_layer():
    """Through the step, the overlapped all-to-alls show at least what the aggregate would (their
    time beyond the step's compute, and the unpaired steps) and never more than without the overlap."""
    lay = {"dp": 16, "ep": 16, "num_microbatches": 16}
    base = {**H100_NODES, **BIG_MOE, "cluster.nodes": 2}
    off = _comms(make_spec(TINY_MOE, **base), **lay)["ep"]
    on = _comms(make_spec(TINY_MOE, **base, **{"model.moe.overlap_communication": True}), **lay)["ep"]
    assert off.seconds / 16 <= on.exposed_seconds <= off.exposed_seconds


def test_tp_overlap_leaves_the_last_reduce_scatter_chunk_and_needs_sp_and_te():
    spec = make_spec(TINY_DENSE, **{**H100_NODES, "model.hidden_size": 4096, "model.attention.num_heads": 32,
                                    "model.attention.head_dim": 128, "model.mlp.ffn_hidden_size": 14336,
                                    "training.seq_length": 4096, "training.tp_comm_overlap": True})
    on = _comms(spec, tp=4, dp=2, sp=True, num_microbatches=8)["tp"]
    assert on.exposed_seconds == pytest.approx(on.seconds / 8)  # 1 / (2 tp): the GEMMs outlast the rest
    no_sp = _comms(spec, tp=4, dp=2, sp=False, num_microbatches=8)["tp"]
    assert no_sp.exposed_seconds == no_sp.seconds
    with pytest.raises(SpecError, match="training.tp_comm_overlap needs backend.transformer_engine"):
        make_spec(TINY_DENSE, **{"training.tp_comm_overlap": True})


def test_pipeline_send_recv_crosses_the_nic_beyond_one_node():
    """Neighbouring stages are world/pp ranks apart: on two nodes they talk NIC to NIC. 1F1B
    blocks on each transfer; the interleaved schedule sends twice as often and hides what it can
    behind the next chunk, which for a stack this small is little of each hop."""
    spec = make_spec(TINY_DENSE, **{**H100_NODES, "cluster.nodes": 2, "model.hidden_size": 1024,
                                    "model.attention.head_dim": 256, "model.mlp.ffn_hidden_size": 4096})
    plain = _comms(spec, pp=2, dp=8, num_microbatches=16)["pp"]
    interleaved = _comms(spec, pp=2, vpp=2, dp=8, num_microbatches=16)["pp"]
    assert plain.link == "nic" and plain.exposed_seconds == plain.seconds
    assert plain.seconds == pytest.approx(32 * (100e-6 + plain.bytes_per_step / 32 / 47e9))
    assert interleaved.seconds == pytest.approx(2 * plain.seconds)
    assert interleaved.seconds * (2 - 1) / (16 * 2) < interleaved.exposed_seconds < interleaved.seconds
    one_node = _comms(make_spec(TINY_DENSE, **H100_NODES), pp=2, dp=4, num_microbatches=16)["pp"]
    assert one_node.link == "nvlink"


def test_the_interleaved_schedule_hides_its_pipeline_transfers_behind_the_next_chunk():
    """Megatron's interleaved schedule posts each chunk's send/recv and computes the next chunk
    before it waits (overlap_p2p_comm, what Megatron-Bridge sets under VPP): where each chunk's
    pass outlasts its transfer only the pp - 1 hops of the fill and of the drain show."""
    spec = make_spec(TINY_DENSE, **{"model.hidden_size": 4096, "model.attention.num_heads": 32,
                                    "model.attention.head_dim": 128, "model.mlp.ffn_hidden_size": 16384,
                                    "training.seq_length": 4096, "training.global_batch_size": 64})
    plain, interleaved = (_comms(spec, pp=2, vpp=vpp, dp=1, num_microbatches=64)["pp"] for vpp in (1, 2))
    assert plain.exposed_seconds == plain.seconds > 0
    assert interleaved.seconds == pytest.approx(2 * plain.seconds)
    assert interleaved.exposed_seconds == pytest.approx(interleaved.seconds * (2 - 1) / (64 * 2))


def test_bf16_gradient_reduction_halves_the_reduce_scatter_and_the_buffer():
    lay = {"dp": 16, "num_microbatches": 1}
    fp32 = make_spec(TINY_DENSE, **{**H100_NODES, "cluster.nodes": 2})
    bf16 = make_spec(TINY_DENSE, **{**H100_NODES, "cluster.nodes": 2, "training.grad_reduce_dtype": "bf16"})
    a, b = estimate_run(fp32, Layout(**lay)), estimate_run(bf16, Layout(**lay))
    rs = {c.axis: c for c in a.communication if c.collective == "reduce-scatter"}["dp"]
    rs16 = {c.axis: c for c in b.communication if c.collective == "reduce-scatter"}["dp"]
    assert rs16.bytes_per_step * 2 == rs.bytes_per_step
    assert b.memory[0].gradients_gib * 2 == pytest.approx(a.memory[0].gradients_gib)


def test_interleaving_widens_the_data_parallel_window():
    """With VPP the chunks other than rank 0's first finish their backward during the cooldown
    and reduce there: the exposed reduce-scatter shrinks."""
    spec = make_spec(TINY_DENSE, **{**H100_NODES, "cluster.nodes": 4, "model.hidden_size": 2048,
                                    "model.attention.head_dim": 512, "model.mlp.ffn_hidden_size": 8192})
    plain = _comms(spec, pp=2, dp=16, num_microbatches=1)
    interleaved = _comms(spec, pp=2, vpp=2, dp=16, num_microbatches=1)
    assert interleaved["dp"].seconds == pytest.approx(plain["dp"].seconds)
    assert interleaved["dp"].exposed_seconds < plain["dp"].exposed_seconds


def test_the_launch_renders_the_overlaps_and_the_reduction_dtype():
    moe = make_spec(TINY_MOE, **{**H100_NODES, "training.grad_reduce_dtype": "bf16", "training.tp_comm_overlap": True,
                                 "model.moe.overlap_communication": True, "parallel.tp": 2, "parallel.ep": 4})
    ctx = make_context(moe)
    cand = build_plan(moe, top=1).candidates[0]
    args = megatron_args(ctx, cand, TrainOptions())
    for flag in ("--grad-reduce-in-bf16", "--tp-comm-overlap", "--overlap-moe-expert-parallel-comm"):
        assert args.count(flag) == 1, flag
    plain = make_spec(TINY_DENSE, **{**H100_NODES, "training.tp_comm_overlap": True, "parallel.tp": 1})
    words = megatron_args(make_context(plain), build_plan(plain, top=1).candidates[0], TrainOptions())
    assert "--tp-comm-overlap" not in words and "--grad-reduce-in-bf16" not in words


def test_ep_overlap_is_refused_where_megatron_refuses_it():
    spec = make_spec(TINY_MOE, **{**H100_NODES, "model.moe.overlap_communication": True})
    ctx = make_context(spec)
    found = {v.rule: v.message for v in check_layout(ctx, Layout(pp=2, dp=4, ep=4))}
    assert "vpp > 1" in found["ep-overlap-needs-ep-and-vpp"]
    found = {v.rule for v in check_layout(ctx, Layout(pp=2, vpp=2, dp=4, ep=4))}
    assert "ep-overlap-needs-ep-and-vpp" not in found
    assert "ep > 1" in {v.rule: v.message for v in check_layout(ctx, Layout(dp=8))}["ep-overlap-needs-ep-and-vpp"]
    with pytest.raises(SpecError, match="needs the alltoall or flex dispatcher"):
        make_spec(TINY_MOE, **{"model.moe.overlap_communication": True, "model.moe.dispatcher": "allgather"})
    with pytest.raises(SpecError, match="does not run under training.recompute: full"):
        make_spec(TINY_MOE, **{"model.moe.overlap_communication": True, "training.recompute": "full"})
    with pytest.raises(SpecError, match="needs a plain AD/AE stack"):
        make_spec(TINY_MOE, **{"model.moe.overlap_communication": True, "model.pattern": "AEAEDE",
                               "model.mlp": {"ffn_hidden_size": 64}})


def test_scale_rows_carry_the_overlaps_and_reduction_their_recipes_set():
    """benchmarks/scale/truth.py reads each published recipe: Qwen3-235B on 256 H100 overlaps its
    expert all-to-alls and reduces in bf16 with TP overlap off; Llama 3 70B keeps the library
    recipe's TP overlap; the NeMo 25.02 rows take NeMo 2.0's performance scripts: bf16 gradient
    reduction for all, TP overlap where the model's recipe turns it on (Llama 3.1 405B, not
    Mixtral 8x7B), expert overlap for none."""
    rows = {r["row_id"]: r for r in load_runs()}
    qwen = convert(rows[46]).spec
    assert qwen["model"]["moe"]["overlap_communication"] is True
    assert qwen["training"]["grad_reduce_dtype"] == "bf16" and "tp_comm_overlap" not in qwen["training"]
    assert convert(rows[86]).spec["training"]["tp_comm_overlap"] is True
    nemo = read_recipe(rows[70])
    assert nemo.tp_comm_overlap and nemo.grad_reduce_bf16 and not nemo.ep_overlap
    mixtral = read_recipe(rows[44])
    assert mixtral.grad_reduce_bf16 and not (mixtral.tp_comm_overlap or mixtral.ep_overlap)
    assert spec_from_dict(convert(rows[39]).spec).model.moe.overlap_communication


def test_the_context_parallel_ring_hides_behind_the_attention_it_feeds():
    """TE's p2p ring sends each K/V hop beside the attention of the chunk already received: with
    no attention to hide behind all three hops' worth per ring step shows, with long attention
    none does, and in between only the hops' excess over their chunks."""
    assert ring_exposed(1.0, 4, 0.0) == pytest.approx(3 * (1.0 + 2.0))
    assert ring_exposed(1.0, 4, 1e9) == 0.0
    assert ring_exposed(1.0, 2, 3.0) == pytest.approx(0.5 + 1.0)
    # a long sequence under TE: the ring's seconds are priced whole, most of them hidden
    spec = make_spec(TINY_DENSE, **{**H100_NODES, "model.hidden_size": 4096, "model.attention.num_heads": 32,
                                    "model.attention.num_query_groups": 8, "model.attention.head_dim": 128,
                                    "training.seq_length": 32768, "training.global_batch_size": 8})
    cp = _comms(spec, tp=1, pp=1, cp=8, dp=1, micro_batch_size=1)[Axis.CP]
    assert 0 <= cp.exposed_seconds < 0.5 * cp.seconds


def test_expert_all_to_alls_are_those_of_the_rank_the_step_times():
    """With dense first layers the stage holding them can have the most blocks but the fewest E
    blocks: the step times the MoE stage, so its exposed all-to-alls are that stage's."""
    spec = make_spec(TINY_MOE, **{**H100_NODES, **BIG_MOE, "model.pattern": "(AD)*4 (AE)*4",
                                  "model.mlp": {"ffn_hidden_size": 512, "gated": True}})
    lay = Layout(tp=1, pp=2, vpp=1, cp=1, dp=4, ep=4, etp=1, sp=False, micro_batch_size=1, num_microbatches=64)
    ctx = make_context(spec)
    stages = assign_stages(ctx, lay.pp, lay.vpp)[1]
    most_blocks = max(range(2), key=lambda p: len(stages[p].blocks))
    most_experts = max(range(2), key=lambda p: stages[p].blocks.count("E"))
    assert most_blocks != most_experts
    mem = stage_memory(ctx, lay, stages, DEFAULT_EFFICIENCY)
    seconds = functools.partial(block_seconds, ctx, lay, DEFAULT_EFFICIENCY, 1.0)
    ep = [{c.axis: c for c in communication(ctx, lay, stages, mem, rank=p, block_seconds=seconds)}[Axis.EP].bytes_per_step
          for p in (0, 1)]
    timed = {c.axis: c for c in estimate_run(spec, lay).communication}[Axis.EP].bytes_per_step
    assert timed == pytest.approx(ep[most_experts]) and ep[most_experts] > ep[most_blocks]
