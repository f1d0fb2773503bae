"""flashrom layouts: regions of a chip by name, so that one region is written, verified or read
while the rest of the chip is left as it is.

flashrom's layout file has one region a line, ``START:END NAME`` in hexadecimal with ``END``
inclusive. :func:`render_layout` writes one (checked: names flashrom can take, no overlaps,
inside the chip), :func:`parse_layout` reads one, :func:`range_region` is the region covering
exactly a byte range (flashrom rewrites partial erase blocks by reading, erasing and writing
back what lies outside the region, so the range need not be aligned). Regions the chip itself
declares (an FMAP, an Intel flash descriptor) come from flashrom's ``--fmap``/``--ifd`` output
(:func:`regions_from_entries`). Everything but :func:`write_layout_file` is pure.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from unbrick.errors import SourceError, UsageError
from unbrick.transports.flashrom.output import LayoutEntry

#: Longest layout file :func:`parse_layout` reads.
MAX_LAYOUT_CHARS = 1 << 20

_NAME = re.compile(r"^[A-Za-z0-9_.\-+]{1,64}$")
_LINE = re.compile(r"^(?:0x)?([0-9a-fA-F]{1,16}):(?:0x)?([0-9a-fA-F]{1,16})\s+(\S+)\s*$")


@dataclass(frozen=True)
class LayoutRegion:
    """A named byte range of the chip: ``size_bytes`` bytes at ``offset``."""

    name: str
    offset: int
    size_bytes: int

    @property
    def end(self) -> int:
        """First byte after the region."""
        return self.offset + self.size_bytes

    @property
    def last(self) -> int:
        """Last byte of the region (flashrom's inclusive end)."""
        return self.end - 1

    def line(self) -> str:
        """The region as a flashrom layout line."""
        return f"{self.offset:08x}:{self.last:08x} {self.name}"

    def contains(self, offset: int, length: int) -> bool:
        return self.offset <= offset and offset + length <= self.end


def check_region(region: LayoutRegion, chip_size: int | None = None) -> None:
    """UsageError unless ``region`` is one flashrom can take (and lies inside the chip)."""
    if not _NAME.match(region.name):
        raise UsageError(
            f"layout region name {region.name!r} is not one flashrom can take",
            hint="use letters, digits and _ . - + (at most 64)",
        )
    if region.offset < 0 or region.size_bytes <= 0:
        raise UsageError(
            f"layout region {region.name} has no bytes (offset {region.offset}, "
            f"size {region.size_bytes})"
        )
    if chip_size is not None and region.end > chip_size:
        raise UsageError(
            f"layout region {region.name} (0x{region.offset:x}-0x{region.last:x}) ends beyond "
            f"the {chip_size}-byte chip"
        )


def check_layout(regions: Sequence[LayoutRegion], chip_size: int | None = None) -> None:
    """UsageError unless every region is valid, names are unique and no two overlap."""
    if not regions:
        raise UsageError("a layout needs at least one region")
    names: set[str] = set()
    for region in regions:
        check_region(region, chip_size)
        if region.name in names:
            raise UsageError(f"layout region {region.name} is listed twice")
        names.add(region.name)
    ordered = sorted(regions, key=lambda r: r.offset)
    for before, after in itertools.pairwise(ordered):
        if after.offset < before.end:
            raise UsageError(
                f"layout regions {before.name} and {after.name} overlap at 0x{after.offset:x}",
                hint="flashrom does not support overlapping regions",
            )


def render_layout(regions: Sequence[LayoutRegion], chip_size: int | None = None) -> str:
    """The text of a flashrom layout file for ``regions`` (checked with :func:`check_layout`)."""
    check_layout(regions, chip_size)
    return "".join(r.line() + "\n" for r in sorted(regions, key=lambda r: r.offset))


def parse_layout(text: str) -> tuple[LayoutRegion, ...]:
    """Regions of a flashrom layout file; UsageError names the first line that is wrong.

    Blank lines and ``#`` comments are skipped (flashrom itself allows neither; files written
    for it parse the same).
    """
    if len(text) > MAX_LAYOUT_CHARS:
        raise UsageError(f"layout file of {len(text)} characters is too long")
    regions: list[LayoutRegion] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line)
        if m is None:
            raise UsageError(
                f"layout line {number} {line[:60]!r} is not START:END NAME",
                hint="write e.g. 00010000:0001ffff bootloader (hexadecimal, END inclusive)",
            )
        start, last = int(m.group(1), 16), int(m.group(2), 16)
        if last < start:
            raise UsageError(f"layout line {number}: end 0x{last:x} is before start 0x{start:x}")
        region = LayoutRegion(m.group(3), start, last - start + 1)
        check_region(region)
        regions.append(region)
    check_layout(regions)
    return tuple(regions)


def range_region(offset: int, length: int, chip_size: int | None = None) -> LayoutRegion:
    """The region covering exactly ``length`` bytes at ``offset``, named by its range
    (``0x10000-0x1ffff``) so that flashrom's messages about it say where it is."""
    region = LayoutRegion(f"0x{offset:x}-0x{offset + length - 1:x}", offset, length)
    check_region(region, chip_size)
    return region


def regions_from_entries(
    entries: Iterable[LayoutEntry], chip_size: int | None = None
) -> tuple[LayoutRegion, ...]:
    """Regions from the layout entries flashrom read from the chip (``--fmap``/``--ifd``).

    Entries that do not fit the chip (an unused descriptor slot pointing past its end) are
    dropped; names are kept as flashrom printed them.
    """
    out: list[LayoutRegion] = []
    for entry in entries:
        if entry.end < entry.start:
            continue
        region = LayoutRegion(entry.name, entry.start, entry.end - entry.start + 1)
        if chip_size is not None and region.end > chip_size:
            continue
        out.append(region)
    return tuple(out)


def find_region(regions: Iterable[LayoutRegion], name: str) -> LayoutRegion:
    """The region called ``name``; UsageError listing the names there are."""
    regions = tuple(regions)
    for region in regions:
        if region.name == name:
            return region
    names = ", ".join(r.name for r in regions) or "none"
    raise UsageError(f"the layout has no region {name!r}", hint=f"regions: {names}")


def write_layout_file(
    path: Path, regions: Sequence[LayoutRegion], chip_size: int | None = None
) -> Path:
    """Write a flashrom layout file for ``regions`` at ``path`` (atomically) and return it."""
    text = render_layout(regions, chip_size)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text, encoding="ascii")
        os.replace(tmp, path)
    except OSError as e:
        raise SourceError(f"could not write the layout file {path}: {e.strerror}") from e
    return path


__all__ = [
    "LayoutRegion",
    "check_layout",
    "check_region",
    "find_region",
    "parse_layout",
    "range_region",
    "regions_from_entries",
    "render_layout",
    "write_layout_file",
]
