"""The block-pattern grammar."""

from __future__ import annotations

import pytest

from megacpp.planner.errors import SpecError
from megacpp.planner.spec.pattern import parse_pattern


@pytest.mark.parametrize(
    "text,blocks,cuts",
    [
        ("AEMEAEMEAEMR", "AEMEAEMEAEMR", ()),
        ("(AEME)*2 AEMR", "AEMEAEMEAEMR", ()),
        ("  A E\tM  ", "AEM", ()),
        ("A*3 D", "AAAD", ()),
        ("((AE)*2 M)*2", "AEAEMAEAEM", ()),
        ("AEME | AEME", "AEMEAEME", (4,)),
        ("(AEME|)*2 AR", "AEMEAEMEAR", (4, 8)),
    ],
)
def test_parses(text, blocks, cuts):
    p = parse_pattern(text)
    assert (p.blocks, p.cuts) == (blocks, cuts)


def test_segments_follow_cuts():
    assert parse_pattern("AM|AMAM|AM").segments == ["AM", "AMAM", "AM"]


@pytest.mark.parametrize(
    "text,fragment",
    [
        ("AEX", "unknown block letter 'X'"),
        ("aem", "did you mean 'A'"),
        ("(AEME*13", "missing ')'"),
        ("AE)", "unbalanced ')'"),
        ("(AE)", "repeat count"),
        ("(AE)*0", "between 1 and"),
        ("A*", "repeat count"),
        ("", "empty"),
        ("|AE", "between blocks"),
        ("AE|", "between blocks"),
        ("A||E", "between blocks"),
        ("()*3", "empty group"),
        ("(A)*999999", "more than"),
    ],
)
def test_bad_patterns_name_the_problem(text, fragment):
    with pytest.raises(SpecError, match=fragment.replace("(", r"\(").replace(")", r"\)").replace("*", r"\*")):
        parse_pattern(text)


@pytest.mark.parametrize(
    "text,plain",
    [("(AD)*4", True), ("AD AE AE", True), ("AEME", False), ("ADA", False), ("AD|AE", True), ("A|DAE", False)],
)
def test_plain_transformer_detection(text, plain):
    assert parse_pattern(text).is_plain_transformer is plain
