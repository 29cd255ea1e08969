"""Enumerate every TP x CP x PP x DP factorisation x EP/ETP folding x VPP x micro-batch size.

Axes are bound level by level (LEVELS in rules/__init__.py). A rule is checked as soon as the
axes it reads are bound; when it fails, the whole sub-tree below is rejected by that rule and
counted without being walked. Every layout of the space therefore gets a verdict: legal, or the
first rule (in level order) that rejects it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from megacpp.planner.search.layout import Context, Layout
from megacpp.planner.search.rules import LEVELS, Rule, applicable, divisors

VPP_CHOICES = (1, 2, 3, 4)
MBS_AUTO_CHOICES = (1, 2, 4, 8)
MAX_EXAMPLES_PER_RULE = 3


@dataclass
class Rejections:
    count: int = 0
    by_rule: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[tuple[Layout, str]]] = field(default_factory=dict)

    def add(self, rule: Rule, layout: Layout, message: str, count: int) -> None:
        self.count += count
        self.by_rule[rule.id] += count
        shown = self.examples.setdefault(rule.id, [])
        if len(shown) < MAX_EXAMPLES_PER_RULE:
            shown.append((layout, message))


@dataclass
class SearchResult:
    considered: int
    legal: list[Layout]
    rejections: Rejections


class _Space:
    """The choice lists of one search; pins collapse an axis to its pinned value."""

    def __init__(self, ctx: Context) -> None:
        pins, world = ctx.spec.parallel, ctx.world
        self.ctx, self.world, self.pins = ctx, world, pins
        moe = ctx.has_moe
        if pins.vpp is not None:
            self.vpp = [pins.vpp]
        elif ctx.unit_cuts:
            self.vpp = divisors(len(ctx.unit_cuts) + 1)
        else:
            self.vpp = list(VPP_CHOICES)
        self.ep = [pins.ep] if pins.ep is not None else (divisors(world) if moe else [1])
        domain = max(ctx.cluster.nvlink_domain, 1)
        # ETP is searched inside the NVLink domain; pin parallel.etp to go beyond it.
        self.etp: list[int | None] = [pins.etp] if pins.etp is not None else (
            [d for d in divisors(world) if d <= domain] if moe else [None]
        )
        mbs = ctx.spec.training.micro_batch_size
        self.mbs = list(MBS_AUTO_CHOICES) if mbs == "auto" else [mbs]
        self.tail = [
            len(self.vpp) * len(self.ep) * len(self.etp) * len(self.mbs),  # below the pp level
            len(self.ep) * len(self.etp) * len(self.mbs),  # below vpp
            len(self.etp) * len(self.mbs),  # below ep
            len(self.mbs),  # below etp
        ]

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

    def size_below_cp(self, tp: int, cp: int) -> int:
        return len(self.pp(tp, cp)) * self.tail[0]

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


def search(ctx: Context) -> SearchResult:
    """Walk the layout space of `ctx`, returning legal layouts and rejection counts by rule."""
    space = _Space(ctx)
    errors = [r for r in applicable(ctx) if r.severity == "error"]
    level = [[r for r in errors if r.level == i] for i in range(len(LEVELS))]
    rej = Rejections()
    legal: list[Layout] = []
    total = space.size()
    gbs = ctx.spec.training.global_batch_size
    sp_pin = ctx.spec.parallel.sp

    fail = _first_failure(level[0], ctx, Layout())
    if fail:
        rej.add(fail[0], Layout(), fail[1], total)
        return SearchResult(total, legal, rej)

    for tp in space.tp():
        lay = Layout(tp=tp, etp=tp)
        fail = _first_failure(level[1], ctx, lay)
        if fail:
            rej.add(fail[0], lay, fail[1], space.size_below_tp(tp))
            continue
        for cp in space.cp(tp):
            lay = Layout(tp=tp, cp=cp, etp=tp)
            fail = _first_failure(level[2], ctx, lay)
            if fail:
                rej.add(fail[0], lay, fail[1], space.size_below_cp(tp, cp))
                continue
            for pp in space.pp(tp, cp):
                size = tp * cp * pp
                dp = ctx.world // size if ctx.world % size == 0 else 0
                sp = sp_pin if sp_pin is not None else (tp > 1 and ctx.te)
                lay = Layout(tp=tp, cp=cp, pp=pp, dp=dp, sp=sp, etp=tp)
                fail = _first_failure(level[3], ctx, lay)
                if fail:
                    rej.add(fail[0], lay, fail[1], space.tail[0])
                    continue
                _walk_tail(ctx, space, level, rej, legal, tp, cp, pp, dp, sp, gbs)
    return SearchResult(total, legal, rej)


def _walk_tail(
    ctx: Context, space: _Space, level: list[list[Rule]], rej: Rejections, legal: list[Layout],
    tp: int, cp: int, pp: int, dp: int, sp: bool, gbs: int,
) -> None:
    for vpp in space.vpp:
        lay = Layout(tp=tp, cp=cp, pp=pp, dp=dp, sp=sp, vpp=vpp, etp=tp)
        fail = _first_failure(level[4], ctx, lay)
        if fail:
            rej.add(fail[0], lay, fail[1], space.tail[1])
            continue
        for ep in space.ep:
            lay = Layout(tp=tp, cp=cp, pp=pp, dp=dp, sp=sp, vpp=vpp, ep=ep, etp=tp)
            fail = _first_failure(level[5], ctx, lay)
            if fail:
                rej.add(fail[0], lay, fail[1], space.tail[2])
                continue
            for etp_choice in space.etp:
                etp = tp if etp_choice is None else etp_choice
                lay = Layout(tp=tp, cp=cp, pp=pp, dp=dp, sp=sp, vpp=vpp, ep=ep, etp=etp)
                fail = _first_failure(level[6], ctx, lay)
                if fail:
                    rej.add(fail[0], lay, fail[1], space.tail[3])
                    continue
                for mbs in space.mbs:
                    m = gbs // (mbs * dp) if gbs % (mbs * dp) == 0 else 0
                    lay = Layout(tp=tp, pp=pp, vpp=vpp, cp=cp, dp=dp, ep=ep, etp=etp, sp=sp,
                                 micro_batch_size=mbs, num_microbatches=m)
                    fail = _first_failure(level[7], ctx, lay)
                    if fail:
                        rej.add(fail[0], lay, fail[1], 1)
                        continue
                    legal.append(lay)
