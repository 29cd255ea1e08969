"""Enumerate every TP x CP x PP x DP factorisation x VPP x EP/ETP folding x micro-batch size.

Axes are bound level by level (LEVELS in rules/__init__.py). A rule is checked as soon as the
axes it reads are bound; when it fails, the whole sub-tree below is rejected by that rule and
counted without being walked. Every layout of the space therefore gets a verdict: legal, or the
first rule (in level order) that rejects it.

Virtual stages per pipeline rank (VPP) are searched where Megatron interleaves them
(`vpp_choices`): 1 to SMALL_VPP with any split (an uneven one is rendered as an explicit
`--pipeline-model-parallel-layout`, [V] transformer_config.py:1307-1356), and every larger count
that divides the layers per pipeline rank, as Megatron's own VPP flags need, up to one layer per
virtual stage. The interleaved schedule's micro-batch rule and the rest are rules
(vpp-needs-pp, stages-exceed-layers, vpp-microbatches, hybrid-no-vpp).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any

from megacpp.planner.search.layout import Context, Layout
from megacpp.planner.search.rules import LEVELS, Rule, applicable, divisors
from megacpp.planner.spec.pipeline_layout import stage_layers

MBS_AUTO_CHOICES = (1, 2, 4, 8)
# Virtual stages per rank searched whatever the split (vpp_choices). Beyond it only even
# interleaving is searched, which Megatron's own VPP flags express:
# `--num-layers-per-virtual-pipeline-stage N` asserts L % PP == 0 and (L/PP) % N == 0 (Megatron-LM
# megatron/training/arguments.py, [V] 543-547), `--num-virtual-stages-per-pipeline-rank V` needs
# (L/PP) % V == 0 when the model is built (megatron/core/transformer/transformer_block.py:172-178
# in megatron-core 0.16.1).
SMALL_VPP = 4
MAX_EXAMPLES_PER_RULE = 3

# the bound fields of a node of the space, by Layout field name
Values = dict[str, Any]


@dataclass
class Rejections:
    count: int = 0
    by_rule: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[tuple[Layout, str]]] = field(default_factory=dict)

    def add(self, rule: Rule, layout: Layout | Values, message: str, count: int) -> None:
        """Count `count` layouts rejected by `rule`; `layout` (or its fields) is kept as one of the
        rule's first examples."""
        self.count += count
        self.by_rule[rule.id] += count
        shown = self.examples.setdefault(rule.id, [])
        if len(shown) < MAX_EXAMPLES_PER_RULE:
            shown.append((layout if isinstance(layout, Layout) else Layout(**layout), message))


@dataclass
class SearchResult:
    considered: int
    legal: list[Layout]
    rejections: Rejections


def vpp_choices(ctx: Context, pp: int) -> list[int]:
    """Virtual stages per pipeline rank searched at `pp`: the pin; with `|` cuts, the divisors of
    the segment count (pipe-cuts-match-stages keeps segments / pp); else 1 to SMALL_VPP, whose
    uneven splits megacpp renders as an explicit layout, and every larger count that divides the
    layers per pipeline rank, up to one layer per virtual stage (NVIDIA's recipes: Llama-3-70B 80
    layers pp=8 vp=5, Mixtral-8x22B 56 layers pp=4 vp=14, Qwen3-30B-A3B 48 layers pp=2 vp=12 and
    24). A larger count that does not divide them runs only from a custom layout, one per stage
    split; every integer up to the layers per rank would multiply the space (DeepSeek-V3-style on
    1,024 GPUs: 82,158 legal layouts against 20,214) for splits no published recipe uses. Pin
    parallel.vpp to plan one."""
    pin = ctx.spec.parallel.vpp
    return [pin] if pin is not None else searched_vpps(ctx, pp)


def searched_vpps(ctx: Context, pp: int) -> list[int]:
    """vpp_choices without a pin."""
    if ctx.unit_cuts:
        return divisors(len(ctx.unit_cuts) + 1)
    pins = ctx.spec.parallel
    if pins.pipeline_layout is not None:  # its stage count fixes pp x vpp (pipeline-layout-stages)
        stages = len(stage_layers(pins.pipeline_layout))
        return [stages // pp] if stages % pp == 0 else [1]
    # the account flags split L + emb + loss units evenly (account-split-divides)
    layers = ctx.num_layers + pins.account_for_embedding + pins.account_for_loss
    even = [v for v in divisors(layers // pp) if v > SMALL_VPP] if pp > 1 and layers % pp == 0 else []
    return [*range(1, SMALL_VPP + 1), *even]


class _Space:
    """The choice lists of one search; pins collapse an axis to its pinned value."""

    def __init__(self, ctx: Context) -> None:
        pins, world = ctx.spec.parallel, ctx.world
        self.ctx, self.world, self.pins = ctx, world, pins
        moe = ctx.has_moe
        self.ep = [pins.ep] if pins.ep is not None else (divisors(world) if moe else [1])
        domain = max(ctx.cluster.nvlink_domain, 1)
        # ETP is searched inside the NVLink domain; pin parallel.etp to go beyond it.
        self.etp: list[int | None] = [pins.etp] if pins.etp is not None else (
            [d for d in divisors(world) if d <= domain] if moe else [None]
        )
        mbs = ctx.spec.training.micro_batch_size
        self.mbs = list(MBS_AUTO_CHOICES) if mbs == "auto" else [mbs]
        self.tail = [
            len(self.ep) * len(self.etp) * len(self.mbs),  # below vpp
            len(self.etp) * len(self.mbs),  # below ep
            len(self.mbs),  # below etp
        ]
        self._vpp: dict[int, list[int]] = {}

    def _split(self, pin: int | None, rest: int) -> list[int]:
        if pin is not None:
            return [pin]
        return divisors(rest) if rest >= 1 else [1]

    def tp(self) -> list[int]:
        return self._split(self.pins.tp, self.world)

    def cp(self, tp: int) -> list[int]:
        return self._split(self.pins.cp, self.world // tp if self.world % tp == 0 else 1)

    def pp(self, tp: int, cp: int) -> list[int]:
        rest = self.world // (tp * cp) if self.world % (tp * cp) == 0 else 1
        return self._split(self.pins.pp, rest)

    def vpp(self, pp: int) -> list[int]:
        if pp not in self._vpp:
            self._vpp[pp] = vpp_choices(self.ctx, pp)
        return self._vpp[pp]

    def size_below_pp(self, pp: int) -> int:
        return len(self.vpp(pp)) * self.tail[0]

    def size_below_cp(self, tp: int, cp: int) -> int:
        return sum(self.size_below_pp(pp) for pp in self.pp(tp, cp))

    def size_below_tp(self, tp: int) -> int:
        return sum(self.size_below_cp(tp, cp) for cp in self.cp(tp))

    def size(self) -> int:
        return sum(self.size_below_tp(tp) for tp in self.tp())


def _first_failure(rules: list[Rule], ctx: Context, lay: Layout) -> tuple[Rule, str] | None:
    for r in rules:
        message = r.check(ctx, lay)
        if message:
            return r, message
    return None


Failure = tuple[Rule, str] | None
_UNSEEN = object()  # a memo's "not checked yet" (a node that passes is memoised as None)


class _Level:
    """The error rules checked at one level, and their first failure memoised on the values of
    the layout fields they read: a rule reads only the axes it declares (rules/__init__.py), so
    two nodes that agree on those get the same verdict and message. Most nodes of the space then
    cost a dictionary look-up instead of a Layout and the rules' calls."""

    def __init__(self, rules: list[Rule]) -> None:
        self.rules = rules
        self.fields = tuple(sorted({str(a) for r in rules for a in r.axes}))
        # the memo's key: the values of those fields (one field's value alone, where there is one)
        self.key: Callable[[Values], Any] = itemgetter(*self.fields) if self.fields else (lambda values: ())
        self.memo: dict[Any, Failure] = {}

    def check(self, ctx: Context, values: Values) -> Failure:
        """The first rule that rejects the node of `values` (a Layout's fields), with its message."""
        if not self.rules:
            return None
        key = self.key(values)
        failure = self.memo.get(key, _UNSEEN)
        if failure is _UNSEEN:
            failure = self.memo[key] = _first_failure(self.rules, ctx, Layout(**values))
        return failure  # type: ignore[return-value]


def search(ctx: Context) -> SearchResult:
    """Walk the layout space of `ctx`, returning legal layouts and rejection counts by rule."""
    space = _Space(ctx)
    errors = [r for r in applicable(ctx) if r.severity == "error"]
    level = [_Level([r for r in errors if r.level == i]) for i in range(len(LEVELS))]
    rej = Rejections()
    legal: list[Layout] = []
    total = space.size()
    gbs = ctx.spec.training.global_batch_size
    sp_pin = ctx.spec.parallel.sp

    fail = _first_failure(level[0].rules, ctx, Layout())
    if fail:
        rej.add(fail[0], Layout(), fail[1], total)
        return SearchResult(total, legal, rej)

    for tp in space.tp():
        values: Values = {"tp": tp, "etp": tp}
        fail = level[1].check(ctx, values)
        if fail:
            rej.add(fail[0], values, fail[1], space.size_below_tp(tp))
            continue
        for cp in space.cp(tp):
            values = {"tp": tp, "cp": cp, "etp": tp}
            fail = level[2].check(ctx, values)
            if fail:
                rej.add(fail[0], values, fail[1], space.size_below_cp(tp, cp))
                continue
            for pp in space.pp(tp, cp):
                size = tp * cp * pp
                dp = ctx.world // size if ctx.world % size == 0 else 0
                sp = sp_pin if sp_pin is not None else (tp > 1 and ctx.te)
                values = {"tp": tp, "cp": cp, "pp": pp, "dp": dp, "sp": sp, "etp": tp}
                fail = level[3].check(ctx, values)
                if fail:
                    rej.add(fail[0], values, fail[1], space.size_below_pp(pp))
                    continue
                _walk_tail(ctx, space, level, rej, legal, values, gbs)
    return SearchResult(total, legal, rej)


def _walk_tail(ctx: Context, space: _Space, level: list[_Level], rej: Rejections, legal: list[Layout],
               grid: Values, gbs: int) -> None:
    """The levels below pp (VPP, EP, ETP, micro-batch size) of one TP x CP x PP x DP node."""
    tp, pp, dp = grid["tp"], grid["pp"], grid["dp"]
    for vpp in space.vpp(pp):
        values = {**grid, "vpp": vpp}
        fail = level[4].check(ctx, values)
        if fail:
            rej.add(fail[0], values, fail[1], space.tail[0])
            continue
        for ep in space.ep:
            values = {**grid, "vpp": vpp, "ep": ep}
            fail = level[5].check(ctx, values)
            if fail:
                rej.add(fail[0], values, fail[1], space.tail[1])
                continue
            for etp_choice in space.etp:
                values = {**grid, "vpp": vpp, "ep": ep, "etp": tp if etp_choice is None else etp_choice}
                fail = level[6].check(ctx, values)
                if fail:
                    rej.add(fail[0], values, fail[1], space.tail[2])
                    continue
                for mbs in space.mbs:
                    m = gbs // (mbs * dp) if gbs % (mbs * dp) == 0 else 0
                    leaf = {**values, "micro_batch_size": mbs, "num_microbatches": m}
                    fail = level[7].check(ctx, leaf)
                    if fail:
                        rej.add(fail[0], leaf, fail[1], 1)
                        continue
                    legal.append(Layout(**leaf))
