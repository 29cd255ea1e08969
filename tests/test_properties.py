"""Property-based tests of the planner library (hypothesis; no subprocesses).

(a) every candidate of a plan is a legal, consistent layout whose stages cover the pattern;
(b) the rejection accounting adds up;
(c) the loader and planner raise nothing but MegacppError, whatever they are fed;
(d) planning is deterministic, and re-planning a plan's embedded spec reproduces it.
"""

from __future__ import annotations

import copy
import json
import math
import os
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megacpp.planner.errors import MegacppError
from megacpp.planner.plan import Plan, build_plan, make_context
from megacpp.planner.search.layout import Layout
from megacpp.planner.search.rules import check_layout
from megacpp.planner.search.space import search
from megacpp.planner.spec.clusters import PRESETS
from megacpp.planner.spec.loading import apply_override, load_spec_bytes, load_spec_text, spec_from_dict
from megacpp.planner.spec.models import Spec
from megacpp.planner.spec.pattern import parse_pattern
from tests.conftest import TINY_DENSE, TINY_MOE

LETTERS = "ADEMR"
PIN_AXES = ("tp", "pp", "vpp", "cp", "dp", "ep", "etp", "sp")
ALL_CANDIDATES = 10**6

# MEGACPP_HYPOTHESIS_SCALE=20 runs 20x the examples (a soak run); the default keeps the file fast.
SCALE = float(os.environ.get("MEGACPP_HYPOTHESIS_SCALE", "1"))


def fast(max_examples: int) -> settings:
    """Example budgets sized for well under 60 s on two cores; no example database is written into the repo."""
    return settings(
        max_examples=max(1, int(max_examples * SCALE)),
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


# --------------------------------------------------------------------------- strategies


@st.composite
def patterns(draw: st.DrawFn) -> tuple[str, str]:
    """A pattern string and the block string it must expand to."""
    if draw(st.integers(0, 3)) == 0:  # the GPT path: AD / AE pairs only
        pair = draw(st.sampled_from(["AD", "AE"]))
        n = draw(st.integers(1, 12))
        text = draw(st.sampled_from([f"({pair})*{n}", pair * n, f"({pair}) * {n}"]))
        return text, pair * n
    items: list[tuple[str, str]] = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["letter", "repeat", "group", "nested"]))
        if kind == "letter":
            letter = draw(st.sampled_from(LETTERS))
            items.append((letter, letter))
        elif kind == "repeat":
            letter, n = draw(st.sampled_from(LETTERS)), draw(st.integers(1, 4))
            items.append((f"{letter}*{n}", letter * n))
        elif kind == "group":
            inner = draw(st.text(alphabet=LETTERS, min_size=1, max_size=4))
            n = draw(st.integers(1, 3))
            items.append((f"({' '.join(inner) if n == 2 else inner})*{n}", inner * n))
        else:
            inner = draw(st.text(alphabet=LETTERS, min_size=1, max_size=2))
            tail = draw(st.sampled_from(LETTERS))
            n, k = draw(st.integers(1, 2)), draw(st.integers(1, 2))
            items.append((f"(({inner})*{n} {tail})*{k}", (inner * n + tail) * k))
    text, blocks = "", ""
    for i, (t, b) in enumerate(items):
        if i and draw(st.integers(0, 6)) == 0:
            text += " | "  # a pinned pipeline cut between two items
        else:
            text += draw(st.sampled_from(["", " "]))
        text += t
        blocks += b
    return text, blocks


@st.composite
def valid_spec_dicts(draw: st.DrawFn) -> dict[str, Any]:
    """Random specs that the spec model accepts (they may still have no legal layout)."""
    pattern, blocks = draw(patterns())
    letters = set(blocks)
    heads = draw(st.sampled_from([1, 2, 4, 8, 16, 32]))
    head_dim = draw(st.sampled_from([8, 16, 32]))
    hidden = heads * head_dim
    model: dict[str, Any] = {
        "pattern": pattern,
        "hidden_size": hidden,
        "vocab_size": draw(st.integers(1, 1000)),
        "normalization": draw(st.sampled_from(["rmsnorm", "layernorm"])),
        "position_embedding": draw(st.sampled_from(["rope", "learned", "none"])),
        "tie_embeddings": draw(st.booleans()),
    }
    extra = draw(st.sets(st.sampled_from(LETTERS), max_size=1))  # sometimes an unused sub-block
    if letters & {"A"} or "A" in extra:
        groups = draw(st.sampled_from([g for g in (1, 2, 4, 8, 16, 32) if heads % g == 0]))
        att: dict[str, Any] = {"num_heads": heads, "num_query_groups": groups}
        if draw(st.booleans()):
            att["head_dim"] = head_dim
        model["attention"] = att
    if letters & {"M"} or "M" in extra:
        mgroups = draw(st.sampled_from([1, 2, 4, 8]))
        mhead_dim = draw(st.sampled_from([8, 16, 32, 64]))
        mamba: dict[str, Any] = {"head_dim": mhead_dim, "num_groups": mgroups,
                                 "state_dim": draw(st.sampled_from([16, 64, 128])),
                                 "conv_kernel": draw(st.sampled_from([2, 4]))}
        derived = (2 * hidden) // mhead_dim
        if draw(st.booleans()) or (2 * hidden) % mhead_dim or derived % mgroups:
            mamba["num_heads"] = mgroups * draw(st.sampled_from([1, 2, 4, 8]))
        model["mamba"] = mamba
    if letters & {"E"} or "E" in extra:
        experts = draw(st.sampled_from([2, 4, 8, 16, 32, 64]) | st.integers(1, 64))
        moe: dict[str, Any] = {
            "num_experts": experts,
            "top_k": draw(st.integers(1, min(experts, 8))),
            "ffn_hidden_size": draw(st.sampled_from([16, 32, 48, 64, 128])),
            "gated": draw(st.booleans()),
            "dispatcher": draw(st.sampled_from(["allgather", "alltoall", "flex"])),
        }
        if draw(st.booleans()):
            moe["shared_expert_ffn_hidden_size"] = draw(st.sampled_from([32, 64, 96]))
        if draw(st.booleans()):
            moe["capacity_factor"] = draw(st.floats(0.5, 4.0))
        model["moe"] = moe
    if letters & {"D"} or "D" in extra:
        gated = model.get("moe", {}).get("gated", True) if draw(st.integers(0, 5)) else draw(st.booleans())
        model["mlp"] = {"ffn_hidden_size": draw(st.sampled_from([32, 64, 96, 128, 256])), "gated": gated}
    if letters & {"R"} or "R" in extra:
        model["recurrent"] = {"num_heads": draw(st.sampled_from([1, 2, 4, 8])),
                              "head_dim": draw(st.sampled_from([8, 16, 32]))}
    training: dict[str, Any] = {
        "seq_length": draw(st.sampled_from([16, 32, 64, 96, 100, 128, 256])),
        "global_batch_size": draw(st.sampled_from([32, 64, 96, 128, 256]) | st.integers(1, 256)),
        "micro_batch_size": draw(st.sampled_from([1, 1, 2, 4, "auto"])),
        "precision": draw(st.sampled_from(["bf16"] * 4 + ["fp8"])),
        "recompute": draw(st.sampled_from(["none", "selective", "full"])),
        "distributed_optimizer": draw(st.booleans()),
    }
    data: dict[str, Any] = {
        "name": "prop",
        "model": model,
        "training": training,
        "cluster": {"preset": draw(st.sampled_from(sorted(PRESETS))), "nodes": draw(st.integers(1, 4))},
        # TE mostly on: without it M blocks, fp8 and CP are rejected outright (rules, not the generator)
        "backend": {"transformer_engine": draw(st.integers(0, 4)) > 0,
                    "megatron": draw(st.sampled_from(["core_v0.16", "main"]))},
    }
    if draw(st.integers(0, 2)) == 0:
        pins: dict[str, Any] = {}
        # No etp pin without E blocks: the planner then emits edp=0 layouts (a known bug, see
        # test_etp_pin_without_moe_blocks_is_rejected_or_ignored).
        axes = PIN_AXES if "E" in letters else tuple(a for a in PIN_AXES if a != "etp")
        for axis in draw(st.sets(st.sampled_from(axes), min_size=1, max_size=3)):
            if axis == "sp":
                pins[axis] = draw(st.booleans())
            elif axis == "tp":  # mostly a degree the heads allow
                pins[axis] = draw(st.sampled_from([d for d in (1, 2, 4) if heads % d == 0] + [2]))
            else:
                pins[axis] = draw(st.sampled_from([1, 1, 2, 2, 4]))
        data["parallel"] = pins
    return data


def _spec(data: dict[str, Any]) -> Spec:
    return spec_from_dict(copy.deepcopy(data))


# --------------------------------------------------------------------------- (a) and (b)


def _chunk_order(stages: list[dict[str, Any]], pp: int) -> list[dict[str, Any]]:
    return sorted(stages, key=lambda s: s["vp_stage"] * pp + s["pp_rank"])


@fast(300)
@given(valid_spec_dicts())
def test_every_candidate_is_legal_and_covers_the_pattern(data: dict[str, Any]) -> None:
    spec = _spec(data)
    plan = build_plan(spec, top=ALL_CANDIDATES, every_vpp=True)
    ctx = make_context(spec)
    world = ctx.world
    gbs = spec.training.global_batch_size
    pins = spec.parallel
    blocks = spec.pattern.blocks

    assert plan.world_size == world
    assert len(plan.candidates) == plan.legal_count
    # the default ranking keeps each layout once, at its best VPP
    once = build_plan(spec, top=ALL_CANDIDATES).candidates
    assert [c.layout.but_vpp() for c in once] == list(dict.fromkeys(c.layout.but_vpp() for c in plan.candidates))
    assert plan.fitting_count == sum(c.fits for c in plan.candidates)
    assert [c.rank for c in plan.candidates] == list(range(len(plan.candidates)))
    for cand in plan.candidates:
        lay = cand.layout.model_dump()  # as the plan JSON has it
        tp, pp, vpp, cp, dp = lay["tp"], lay["pp"], lay["vpp"], lay["cp"], lay["dp"]
        ep, etp, edp = lay["ep"], lay["etp"], lay["edp"]
        assert tp * cp * dp * pp == world, lay
        assert ep * etp * edp * pp == world, lay
        assert lay["num_microbatches"] * lay["micro_batch_size"] * dp == gbs, lay
        if spec.training.micro_batch_size != "auto":
            assert lay["micro_batch_size"] == spec.training.micro_batch_size
        if "E" not in blocks:
            assert ep == 1, lay
        for axis in PIN_AXES:
            pin = getattr(pins, axis)
            if pin is not None:
                assert lay[axis] == pin, (axis, pin, lay)

        layout = Layout.from_dict(lay)
        assert layout == cand.layout and layout.edp == edp
        errors = [v for v in check_layout(ctx, layout) if v.severity == "error"]
        assert not errors, (lay, errors)

        stages = [s.model_dump(mode="json") for s in cand.stages]
        assert len(stages) == pp * vpp, (lay, stages)
        assert sorted((s["pp_rank"], s["vp_stage"]) for s in stages) == [
            (r, v) for r in range(pp) for v in range(vpp)
        ]
        ordered = _chunk_order(stages, pp)
        assert all(s["blocks"] for s in ordered), stages
        assert "".join(s["blocks"] for s in ordered) == blocks, (lay, stages)
        # Megatron layer ranges are contiguous and cover every layer exactly once.
        assert ordered[0]["layers"][0] == 0
        assert ordered[-1]["layers"][1] == ctx.num_layers
        assert all(a["layers"][1] == b["layers"][0] for a, b in zip(ordered, ordered[1:], strict=False))
        # pinned `|` cuts are stage boundaries
        bounds, pos = set(), 0
        for s in ordered:
            pos += len(s["blocks"])
            bounds.add(pos)
        assert set(spec.pattern.cuts) <= bounds, (spec.pattern.cuts, stages)
        emb = [s for s in stages if s["embedding"]]
        head = [s for s in stages if s["output_head"]]
        assert len(emb) == 1 and emb[0]["pp_rank"] == 0 and emb[0] is ordered[0], stages
        assert len(head) == 1 and head[0]["pp_rank"] == pp - 1 and head[0] is ordered[-1], stages

        assert len(cand.memory.per_stage) == pp
        assert all(math.isfinite(v) for v in cand.time.model_dump().values() if v is not None), cand.time
        assert cand.memory.peak_gib >= 0
        # fits is decided on the unrounded peak; peak_gib is rounded to 3 decimals
        capacity = plan.cluster.gpu_memory_gib
        if cand.fits:
            assert cand.memory.peak_gib <= capacity + 1e-3, cand.memory
        else:
            assert cand.memory.peak_gib >= capacity - 1e-3, cand.memory

    # ranking: layouts that fit first, then by step time
    keys = [(not c.fits, c.time.step_seconds) for c in plan.candidates]
    assert keys == sorted(keys)


@fast(300)
@given(valid_spec_dicts(), st.integers(1, 5))
def test_rejection_accounting_adds_up(data: dict[str, Any], top: int) -> None:
    plan = build_plan(_spec(data), top=top)
    rej = plan.rejected
    assert rej.count + plan.legal_count == plan.considered
    assert sum(rej.by_rule.values()) == rej.count
    assert all(n > 0 for n in rej.by_rule.values())
    distinct = len({lay.but_vpp() for lay in search(make_context(_spec(data))).legal})
    assert len(plan.candidates) == min(top, distinct)  # each layout once, at its best VPP
    assert plan.fitting_count <= plan.legal_count
    # every example names a rule that is counted, with its message
    for ex in rej.examples:
        assert ex.rule in rej.by_rule and ex.message
    if rej.count:
        assert rej.examples


# --------------------------------------------------------------------------- (c) only MegacppError

_json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(10**40), max_value=10**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["auto", "(AE)*2", "AEX", "h200-sxm-8", "bf16", "fp16", ".nan", "4096", ""]),
)
# Any printable key, including "[" and type names such as "int" (pydantic's union tags look alike).
_keys = st.text(alphabet=st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), max_size=8)
_json_values = st.recursive(
    _json_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(_keys, children, max_size=4),
    ),
    max_leaves=12,
)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    return out


@st.composite
def mutated_spec_dicts(draw: st.DrawFn) -> dict[str, Any]:
    """A valid spec with a few random edits: a value replaced, a key dropped, renamed or added."""
    data = copy.deepcopy(draw(st.sampled_from([TINY_DENSE, TINY_MOE]) | valid_spec_dicts()))
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(data)
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = data
        for p in path[:-1]:
            parent = parent[p]
        if not isinstance(parent, dict):
            continue
        action = draw(st.sampled_from(["replace", "replace", "delete", "rename", "add"]))
        key = path[-1]
        if action == "replace":
            parent[key] = draw(_json_values)
        elif action == "delete":
            del parent[key]
        elif action == "rename":
            parent[draw(_keys.filter(bool))] = parent.pop(key)
        else:
            parent[draw(_keys.filter(bool))] = draw(_json_values)
    return data


def _plan_if_small(spec: Spec) -> None:
    """Plan specs of a size that keeps the test fast (huge but accepted specs are out of scope here)."""
    from megacpp.planner.spec.clusters import resolve_cluster

    cluster = resolve_cluster(spec.cluster)
    if len(spec.pattern.blocks) <= 64 and cluster.world_size <= 64:
        build_plan(spec, top=3)


def _only_megacpp_errors(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call fn; a MegacppError (one line of text) is fine, anything else fails the property."""
    try:
        return fn(*args, **kwargs)
    except MegacppError as exc:
        message = str(exc)
        assert message and "\n" not in message, repr(message)
        return None


@fast(375)
@given(st.one_of(_json_values, mutated_spec_dicts()))
def test_spec_from_dict_and_plan_raise_only_megacpp_errors(data: Any) -> None:
    spec = _only_megacpp_errors(spec_from_dict, data)
    if spec is not None:
        _only_megacpp_errors(_plan_if_small, spec)


_yaml_noise = st.text(alphabet=st.sampled_from(list("{}[]:,-#&*!|>'\"?%@` \n\t.~0123456789abcAEMDR")), max_size=60)


@st.composite
def yaml_texts(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["noise", "dump", "corrupt", "unicode"]))
    if kind == "noise":
        return draw(_yaml_noise)
    if kind == "unicode":
        return draw(st.text(max_size=40))
    text = yaml.safe_dump(draw(mutated_spec_dicts()), sort_keys=False)
    if kind == "corrupt" and text:
        at = draw(st.integers(0, len(text)))
        cut = draw(st.integers(0, 5))
        text = text[:at] + draw(_yaml_noise.filter(lambda s: len(s) < 6)) + text[at + cut :]
    return text


_overrides = st.lists(
    st.one_of(
        st.text(max_size=20),
        st.builds(
            lambda k, v: f"{k}={v}",
            st.sampled_from(["parallel.tp", "model.hidden_size", "model.pattern", "training", "cluster.preset",
                             "model.moe.top_k", "a..b", "", "model.hidden_size.x", "training.micro_batch_size"]),
            st.sampled_from(["2", "abc", "", ".nan", "[1, 2", "{a: 1}", "(AE)*2", "auto", "null", "-1", "1e999"]),
        ),
    ),
    max_size=2,
)


@fast(375)
@given(yaml_texts(), _overrides)
def test_load_spec_text_raises_only_megacpp_errors(text: str, overrides: list[str]) -> None:
    spec = _only_megacpp_errors(load_spec_text, text, "<fuzz>", overrides)
    if spec is not None:
        _only_megacpp_errors(_plan_if_small, spec)


@fast(150)
@given(st.binary(max_size=80) | st.text(max_size=40).map(lambda s: s.encode("utf-16")))
def test_load_spec_bytes_raises_only_megacpp_errors(raw: bytes) -> None:
    _only_megacpp_errors(load_spec_bytes, raw, "<fuzz>")


@fast(300)
@given(st.text(alphabet=st.sampled_from(list("ADEMRadx()*|0123456789 ")), max_size=24))
def test_random_patterns_raise_only_megacpp_errors(pattern: str) -> None:
    data = copy.deepcopy(TINY_MOE)
    data["model"]["pattern"] = pattern
    data["model"]["mamba"] = {"num_heads": 8, "head_dim": 16, "num_groups": 2}
    data["model"]["mlp"] = {"ffn_hidden_size": 128, "gated": True}
    data["model"]["recurrent"] = {"num_heads": 4, "head_dim": 16}
    data["backend"] = {"transformer_engine": True, "megatron": "main"}
    spec = _only_megacpp_errors(spec_from_dict, data)
    if spec is not None:
        assert set(spec.pattern.blocks) <= set(LETTERS)
        _only_megacpp_errors(_plan_if_small, spec)


@fast(150)
@given(st.dictionaries(_keys, _json_values, max_size=3), _keys | st.text(max_size=30).map(lambda t: t.replace("\n", " ")))
def test_apply_override_raises_only_megacpp_errors(data: dict[str, Any], item: str) -> None:
    _only_megacpp_errors(apply_override, data, item)


# --------------------------------------------------------------------------- (d) determinism


@fast(100)
@given(valid_spec_dicts())
def test_planning_is_deterministic(data: dict[str, Any]) -> None:
    first = build_plan(_spec(data), top=ALL_CANDIDATES).to_json_dict()
    second = build_plan(_spec(data), top=ALL_CANDIDATES).to_json_dict()
    assert json.dumps(first, sort_keys=False) == json.dumps(second, sort_keys=False)
    # the plan's embedded spec is the spec: re-planning it (what `validate PLAN.json` does) gives the same plan
    replanned = build_plan(spec_from_dict(copy.deepcopy(first["spec"])), top=ALL_CANDIDATES).to_json_dict()
    assert replanned == first
    # and the document survives a JSON round trip, and reading it back as the typed plan, unchanged
    assert json.loads(json.dumps(first)) == first
    assert json.dumps(Plan.from_json_dict(json.loads(json.dumps(first))).to_json_dict()) == json.dumps(first)


@pytest.mark.parametrize("base", [TINY_DENSE, TINY_MOE], ids=["dense", "moe"])
def test_strategy_sanity_fixed_specs_have_candidates(base: dict[str, Any]) -> None:
    """Guard against vacuous properties: the fixtures the strategies start from do plan."""
    plan = build_plan(_spec(base), top=ALL_CANDIDATES)
    assert plan.legal_count > 0 and plan.candidates


@fast(100)
@given(valid_spec_dicts())
def test_generated_specs_are_accepted(data: dict[str, Any]) -> None:
    """The generator only makes specs the spec model accepts (so (a), (b), (d) test the planner)."""
    spec = _spec(data)  # raises SpecError if the generator made an invalid spec
    assert spec.pattern.blocks
    assert spec.model.unused_sub_blocks() == [
        k for k, letter in {"attention": "A", "mamba": "M", "moe": "E", "mlp": "D", "recurrent": "R"}.items()
        if k in data["model"] and letter not in spec.pattern.blocks
    ]


@fast(375)
@given(patterns())
def test_pattern_expands_repeats_groups_and_cuts(pattern: tuple[str, str]) -> None:
    """`(..)*N`, `X*N`, nesting and whitespace expand to the expected blocks; each `|` becomes one cut."""
    text, blocks = pattern
    parsed = parse_pattern(text)
    assert parsed.blocks == blocks
    assert len(parsed.cuts) == text.count("|")
    assert list(parsed.cuts) == sorted(set(parsed.cuts)) and all(0 < c < len(blocks) for c in parsed.cuts)
    assert "".join(parsed.segments) == blocks


# --------------------------------------------------------------------------- edge cases that once crashed


def test_etp_pin_without_moe_blocks_is_rejected_or_ignored() -> None:
    data = copy.deepcopy(TINY_DENSE)  # (AD)*4 on 8 GPUs
    data["parallel"] = {"etp": 3}
    plan = build_plan(_spec(data), top=ALL_CANDIDATES)
    for cand in plan.candidates:
        lay = cand.layout
        assert lay.ep * lay.etp * lay.edp * lay.pp == plan.world_size, lay


@pytest.mark.parametrize("escape", ["\\U00110000", "\\UFFFFFFFF"])
def test_out_of_range_unicode_escape_is_a_spec_error(escape: str) -> None:
    text = yaml.safe_dump(TINY_DENSE, sort_keys=False).replace("name: tiny-dense", f'name: "{escape}"')
    assert escape in text
    with pytest.raises(MegacppError):
        load_spec_text(text)


def test_unknown_key_with_a_line_break_is_reported_on_one_line() -> None:
    data = copy.deepcopy(TINY_DENSE)
    data["bad\nkey"] = 1
    with pytest.raises(MegacppError) as info:
        spec_from_dict(data)
    assert "\n" not in str(info.value)
