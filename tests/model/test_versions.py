"""Version comparison: the documented total order."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from unbrick.model.versions import at_least, compare, parse_version

pytestmark = pytest.mark.unit

#: Each inner list holds versions that compare equal; the groups are in ascending order.
ORDERED: list[list[str]] = [
    # No leading number: before every numbered version, in natural order among themselves.
    ["", "  "],
    ["b1c1-0.4-7617406"],
    ["b1c2"],
    ["unknown", "UNKNOWN"],
    ["0.9"],
    ["1.0.0-dev", "1.0-snapshot"],
    ["1.0.0-alpha", "1.0.0-ALPHA"],
    ["1.0.0-alpha.2", "1.0.0-alpha2"],
    ["1.0.0-beta"],
    ["1.0.0-pre1", "1.0.0-preview1"],
    ["1.0.0-rc1", "1.0rc1", "v1.0.0-rc.1"],
    ["1.0.0-rc2"],
    ["1.0.0-rc10"],
    ["1.0.0", "1.0", "1", "v1.0.0", "V1.0", " 1.0.0 ", "1.0.0+build5", "1.0.0_"],
    ["1.0.0a", "1.0.0-a"],
    ["1.0.0b"],
    ["1.0.0-sim"],
    ["1.0.0-sim1"],
    ["1.0.0-sim2"],
    ["1.0.0-sim10"],
    ["1.0.1"],
    ["1.2"],
    ["1.10"],
    ["2.1.0-rc1"],
    ["2.1.0", "2.1"],
    ["v2.3", "2.3"],
    ["2022.10"],
    ["2023.01-rc2"],
    ["2023.01", "2023.1"],
    ["2023.01-sim"],
    ["2023.04"],
]


def test_ordering_table() -> None:
    flat = [(g, v) for g, group in enumerate(ORDERED) for v in group]
    for (ga, a), (gb, b) in itertools.product(flat, flat):
        expected = (ga > gb) - (ga < gb)
        assert compare(a, b) == expected, (a, b)


@pytest.mark.parametrize(
    ("version", "minimum", "ok"),
    [
        ("2023.01", "2023.01", True),
        ("2023.01-sim", "2023.01", True),
        ("2023.04", "2023.01", True),
        ("2022.10", "2023.01", False),
        ("2023.01-rc2", "2023.01", False),
        ("v2024.01", "2023.01", True),
    ],
)
def test_min_bootloader_style_comparisons(version: str, minimum: str, ok: bool) -> None:
    assert at_least(version, minimum) is ok


def test_version_keeps_its_text_and_equality_is_by_order() -> None:
    a, b = parse_version("v2.1"), parse_version("2.1.0")
    assert a == b
    assert hash(a) == hash(b)
    assert str(a) == "v2.1"
    assert parse_version("1.0-rc1").is_prerelease
    assert not parse_version("1.0-sim").is_prerelease
    assert compare(parse_version("1.0"), "1.1") == -1


versions = st.one_of(
    st.text(max_size=20),
    st.from_regex(
        r"v?[0-9]{1,4}(\.[0-9]{1,4}){0,3}([-_.+~]?[a-z]{0,6}[0-9]{0,3})?", fullmatch=True
    ),
)


@settings(max_examples=300, deadline=None)
@given(versions, versions, versions)
def test_compare_is_a_total_order(a: str, b: str, c: str) -> None:
    assert compare(a, a) == 0
    assert compare(a, b) == -compare(b, a)
    if compare(a, b) <= 0 and compare(b, c) <= 0:
        assert compare(a, c) <= 0
    assert (parse_version(a) == parse_version(b)) == (compare(a, b) == 0)
