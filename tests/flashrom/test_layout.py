"""flashrom layout files: written, read back, refused when flashrom could not take them."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from unbrick.errors import UsageError
from unbrick.transports.flashrom.layout import (
    LayoutRegion,
    find_region,
    parse_layout,
    range_region,
    regions_from_entries,
    render_layout,
    write_layout_file,
)
from unbrick.transports.flashrom.output import LayoutEntry

pytestmark = pytest.mark.unit


def test_render_is_flashroms_format() -> None:
    regions = [LayoutRegion("normal", 0x9000, 0x37000), LayoutRegion("gfxrom", 0, 0x9000)]
    assert render_layout(regions, 0x80000) == "00000000:00008fff gfxrom\n00009000:0003ffff normal\n"


def test_range_region_is_named_by_its_range() -> None:
    region = range_region(0x10010, 16, 1 << 24)
    assert region.name == "0x10010-0x1001f"
    assert region.line() == "00010010:0001001f 0x10010-0x1001f"
    with pytest.raises(UsageError, match="beyond"):
        range_region(0xFFFFF0, 32, 1 << 24)
    with pytest.raises(UsageError, match="no bytes"):
        range_region(0, 0)


def test_overlaps_duplicates_and_bad_names_are_refused() -> None:
    with pytest.raises(UsageError, match="overlap"):
        render_layout([LayoutRegion("a", 0, 0x2000), LayoutRegion("b", 0x1000, 0x1000)])
    with pytest.raises(UsageError, match="twice"):
        render_layout([LayoutRegion("a", 0, 0x10), LayoutRegion("a", 0x10, 0x10)])
    with pytest.raises(UsageError, match="name"):
        render_layout([LayoutRegion("a b", 0, 0x10)])
    with pytest.raises(UsageError, match="at least one"):
        render_layout([])


def test_parse_layout_names_the_bad_line() -> None:
    text = "# boot\n0x0:0xffff boot\n\n00010000:0001ffff env\n"
    assert parse_layout(text) == (
        LayoutRegion("boot", 0, 0x10000),
        LayoutRegion("env", 0x10000, 0x10000),
    )
    with pytest.raises(UsageError, match="line 2"):
        parse_layout("0:ff a\n100 b\n")
    with pytest.raises(UsageError, match="before start"):
        parse_layout("ff:0 a\n")


def test_regions_from_entries_drop_what_does_not_fit() -> None:
    entries = [
        LayoutEntry(0, 0xFFF, "fd"),
        LayoutEntry(0x1000, 0x3FFFFF, "me"),
        LayoutEntry(0x7FFF000, 0x7FFFFFF, "pd"),  # an unused slot beyond a 16 MiB chip
    ]
    regions = regions_from_entries(entries, 16 << 20)
    assert [r.name for r in regions] == ["fd", "me"]
    assert find_region(regions, "me") == LayoutRegion("me", 0x1000, 0x3FF000)
    with pytest.raises(UsageError) as e:
        find_region(regions, "bios")
    assert "no region 'bios'" in e.value.message and e.value.hint == "regions: fd, me"


def test_write_layout_file(tmp_path: Path) -> None:
    path = write_layout_file(tmp_path / "l.txt", [LayoutRegion("x", 0x100, 0x100)], 0x1000)
    assert path.read_text() == "00000100:000001ff x\n"
    assert not (tmp_path / "l.txt.tmp").exists()


@st.composite
def layouts(draw: st.DrawFn) -> list[LayoutRegion]:
    cuts = sorted(draw(st.sets(st.integers(0, 1 << 24), min_size=2, max_size=12)))
    regions = []
    for i, (a, b) in enumerate(itertools.pairwise(cuts)):
        if draw(st.booleans()):
            name = draw(st.from_regex(r"[A-Za-z0-9_.\-+]{1,20}", fullmatch=True))
            regions.append(LayoutRegion(f"{name}{i}", a, b - a))
    return regions or [LayoutRegion("all", cuts[0], cuts[-1] - cuts[0])]


@given(layouts())
def test_render_parse_round_trip(regions: list[LayoutRegion]) -> None:
    assert parse_layout(render_layout(regions)) == tuple(sorted(regions, key=lambda r: r.offset))


@given(st.text(max_size=300))
def test_fuzz_parse_layout(text: str) -> None:
    try:
        regions = parse_layout(text)
    except UsageError as e:
        assert e.one_line()
    else:
        assert all(r.size_bytes > 0 for r in regions)
