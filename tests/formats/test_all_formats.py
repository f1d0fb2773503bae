"""Properties every parser shares: the format table, detection, and resistance to junk."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from unbrick.errors import ImageError
from unbrick.formats.base import Context, Findings, Limits, Sniff, Source
from unbrick.formats.detect import detect, inspect_source
from unbrick.formats.registry import FORMAT_NAMES, FORMATS

pytestmark = pytest.mark.unit

#: The names the acceptance interface promises, exactly.
PROMISED = {
    *("gzip", "xz", "zstd", "bzip2", "zip", "tar", "cpio", "ihex", "srec", "uf2", "elf"),
    *("uimage", "fit", "android-sparse", "android-boot", "bmap", "trx", "dfu", "mcuboot"),
    "raw",
}

#: A plausible start of each format, to push random tails past the sniffers.
PREFIXES: dict[str, bytes] = {
    "gzip": b"\x1f\x8b\x08\x00",
    "xz": b"\xfd7zXZ\x00",
    "zstd": b"\x28\xb5\x2f\xfd",
    "bzip2": b"BZh9",
    "zip": b"PK\x03\x04",
    "cpio": b"070701",
    "ihex": b":020000040800F2\n",
    "srec": b"S00600004844521B\n",
    "uf2": struct.pack("<II", 0x0A324655, 0x9E5D5157),
    "elf": b"\x7fELF\x01\x01\x01",
    "uimage": struct.pack(">I", 0x27051956),
    "fit": struct.pack(">I", 0xD00DFEED),
    "android-sparse": struct.pack("<IHHHH", 0xED26FF3A, 1, 0, 28, 12),
    "android-boot": b"ANDROID!",
    "bmap": b'<?xml version="1.0" ?>\n<bmap version="2.0">',
    "trx": b"HDR0",
    "mcuboot": struct.pack("<I", 0x96F3B83D),
    "dfuse": b"DfuSe\x01",
}

SMALL = Limits(max_expanded_bytes=8 << 20, max_records=200_000, max_seconds=10.0)


def check_parse(data: bytes) -> Findings | None:
    try:
        return inspect_source(Source.from_bytes(data), Context(limits=SMALL))
    except ImageError:
        return None


def test_format_names_are_the_promised_set() -> None:
    assert set(FORMAT_NAMES) == PROMISED
    assert len(FORMAT_NAMES) == len(PROMISED)


def test_every_format_has_a_summary() -> None:
    for spec in FORMATS:
        assert spec.summary, spec.name


@given(st.binary(max_size=4096))
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_random_bytes_give_findings_or_image_error(data: bytes) -> None:
    result = check_parse(data)
    if result is not None:
        assert result.format in PROMISED


@pytest.mark.parametrize("name", sorted(PREFIXES))
@given(tail=st.binary(max_size=2048))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_magic_followed_by_junk_is_handled(name: str, tail: bytes) -> None:
    result = check_parse(PREFIXES[name] + tail)
    if result is not None:
        assert result.format in PROMISED


@given(st.binary(max_size=512), st.binary(max_size=64))
@settings(max_examples=300, deadline=None)
def test_sniffers_never_raise(head: bytes, tail: bytes) -> None:
    sn = Sniff(head=head, tail=tail, size=len(head) + len(tail))
    for spec in FORMATS:
        assert spec.sniff(sn) in (True, False)
    assert detect(sn).name in PROMISED


def test_empty_file_is_raw_and_invalid() -> None:
    result = check_parse(b"")
    assert result is not None
    assert result.format == "raw"
    assert not result.valid


def test_erased_and_blank_images_are_refused() -> None:
    erased = check_parse(b"\xff" * 70000)
    blank = check_parse(bytes(70000))
    assert erased is not None and blank is not None
    assert erased.format == blank.format == "raw"
    assert "0xFF" in erased.problems[0]
    assert "0x00" in blank.problems[0]
    assert erased.details["all_ff"] and blank.details["all_00"]


def test_ordinary_data_is_valid_raw() -> None:
    data = bytes(range(256)) * 300
    result = check_parse(data)
    assert result is not None
    assert result.format == "raw"
    assert result.valid
