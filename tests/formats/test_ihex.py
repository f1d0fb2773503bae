"""Intel HEX: hand-built edge cases, round trips, fuzzing and cross-checks with srecord."""

from __future__ import annotations

import io
import itertools
import json
import random
import re
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import need, run
from unbrick.errors import ImageError, LimitError, UsageError
from unbrick.formats import ihex
from unbrick.formats.base import CHUNK, Context, Findings, Sniff, Source
from unbrick.formats.memmap import RawLayout


def rec(rtype: int, offset: int, data: bytes = b"", *, checksum: int | None = None) -> str:
    body = bytes((len(data), offset >> 8, offset & 0xFF, rtype)) + data
    ck = (-sum(body)) & 0xFF if checksum is None else checksum
    return ":" + (body + bytes((ck,))).hex().upper()


EOF = rec(1, 0)


def hexfile(*lines: str, newline: str = "\n") -> bytes:
    return (newline.join(lines) + newline).encode()


def parse(data: bytes) -> Findings:
    return ihex.inspect(Source.from_bytes(data), Context())


def convert(data: bytes, **kw: int) -> tuple[RawLayout, bytes]:
    out = io.BytesIO()
    layout = ihex.to_raw(Source.from_bytes(data), out, Context(), **kw)
    return layout, out.getvalue()


# --- hand-built files ------------------------------------------------------------------------


def test_simple_file_details() -> None:
    f = parse(
        hexfile(
            rec(4, 0, b"\x08\x00"),
            rec(0, 0x0000, b"\x01\x02\x03\x04"),
            rec(0, 0x0004, b"\x05\x06"),
            rec(0, 0x0100, b"\xaa"),
            rec(5, 0, (0x08000101).to_bytes(4, "big")),
            EOF,
        )
    )
    assert f.valid, f.problems
    assert f.format == "ihex"
    d = f.details
    assert d["segments"] == [[0x08000000, 0x08000006], [0x08000100, 0x08000101]]
    assert d["entry_point"] == 0x08000101
    assert d["data_bytes"] == 7
    assert d["record_count"] == 6
    assert d["checksum_errors"] == []
    assert d["address_modes"] == ["linear"]


def test_crlf_blank_lines_and_lowercase() -> None:
    lines = ["", rec(0, 0x10, b"\xab\xcd").lower(), "", "   ", EOF]
    f = parse(hexfile(*lines, newline="\r\n"))
    assert f.valid, f.problems
    assert f.details["segments"] == [[0x10, 0x12]]
    assert f.details["record_count"] == 2


def test_last_line_without_newline() -> None:
    f = parse((rec(0, 0, b"\x01") + "\n" + EOF).encode())
    assert f.valid
    assert f.details["segments"] == [[0, 1]]


def test_checksum_error_names_line() -> None:
    good = rec(0, 0x20, b"\x11\x22")
    expected = int(good[-2:], 16)
    bad = rec(0, 0x20, b"\x11\x22", checksum=(expected + 1) & 0xFF)
    f = parse(hexfile(rec(0, 0, b"\x00"), bad, EOF))
    assert not f.valid
    assert f.details["checksum_errors"] == [
        {"line": 2, "expected": expected, "found": (expected + 1) & 0xFF}
    ]
    assert f.details["checksum_error_count"] == 1
    assert any(p.startswith("line 2: checksum") for p in f.problems)


def test_unknown_record_type() -> None:
    f = parse(hexfile(rec(0, 0, b"\x01"), rec(6, 0, b"\x00"), EOF))
    assert f.problems == ["line 2: unknown record type 0x06"]


def test_wrong_length_for_extended_record() -> None:
    f = parse(hexfile(rec(4, 0, b"\x00\x01\x02"), rec(0, 0, b"\x01"), EOF))
    assert f.problems == ["line 1: a type 04 record holds 2 data bytes, not 3"]
    f = parse(hexfile(rec(1, 0, b"\x00")))
    assert f.problems[0] == "line 1: a type 01 record holds 0 data bytes, not 1"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("10000000", "does not start with ':'"),
        (":0100000001FG", "hexadecimal digit pairs"),
        (":01000000010", "hexadecimal digit pairs"),
        (":0100", "too short"),
        (":0200000001FD", "byte count says 2 data bytes but the record holds 1"),
        (":01 000000 01 FE", "hexadecimal digit pairs"),
    ],
)
def test_bad_lines_are_problems_with_line_number(line: str, message: str) -> None:
    f = parse(hexfile(rec(0, 0, b"\x01"), line, EOF))
    assert len(f.problems) == 1
    assert f.problems[0].startswith("line 2: ")
    assert message in f.problems[0]


def test_non_ascii_line_is_a_problem() -> None:
    f = parse(hexfile(rec(0, 0, b"\x01")).replace(b"\n", b"\n:\xff\xfe\n") + EOF.encode())
    assert f.problems[0].startswith("line 2: ")


def test_overlap_with_different_values_is_a_problem() -> None:
    f = parse(hexfile(rec(0, 0x10, bytes(16)), rec(0, 0x18, b"\x00" * 4 + b"\x01" * 4), EOF))
    assert f.problems == [
        "line 2: data at 0x1c differs from data written earlier at the same address"
    ]
    assert f.details["segments"] == [[0x10, 0x20]]


def test_overlap_with_same_values_is_a_warning() -> None:
    f = parse(hexfile(rec(0, 0x10, bytes(range(16))), rec(0, 0x14, bytes(range(4, 8))), EOF))
    assert f.valid
    assert f.warnings == ["4 bytes are written more than once (with the same values)"]


def test_overlap_written_before_later_conflict_in_reverse_order() -> None:
    # The second record lands first in the address space; the conflict is on line 3.
    f = parse(
        hexfile(rec(0, 0x20, b"\x01\x02"), rec(0, 0x10, bytes(32)), rec(0, 0x21, b"\x02"), EOF)
    )
    assert f.problems == [
        "line 2: data at 0x20 differs from data written earlier at the same address"
    ]


def test_missing_eof_is_a_problem() -> None:
    f = parse(hexfile(rec(0, 0, b"\x01")))
    assert f.problems == ["no end-of-file record (type 01): the file may be truncated"]


def test_content_after_eof_is_a_problem() -> None:
    f = parse(hexfile(rec(0, 0, b"\x01"), EOF, "", rec(0, 8, b"\x02")))
    assert f.problems == ["line 4: content after the end-of-file record (line 2) is ignored"]
    assert f.details["segments"] == [[0, 1]]


def test_start_segment_address() -> None:
    f = parse(hexfile(rec(0, 0, b"\x01"), rec(3, 0, b"\x12\x34\x00\x10"), EOF))
    assert f.details["entry_point"] == 0x12340 + 0x10
    assert f.details["start_segment"] == {"cs": 0x1234, "ip": 0x10}


def test_conflicting_start_addresses() -> None:
    f = parse(hexfile(rec(5, 0, b"\x00\x00\x01\x00"), rec(5, 0, b"\x00\x00\x02\x00"), EOF))
    assert f.problems == ["line 2: start address 0x200 differs from 0x100 given on line 1"]


def test_segment_addressing_wraps_within_the_segment() -> None:
    f = parse(hexfile(rec(2, 0, b"\xf0\x00"), rec(0, 0xFFF8, bytes(16)), EOF))
    assert f.details["segments"] == [[0xF0000, 0xF0008], [0xFFFF8, 0x100000]]
    assert f.details["address_modes"] == ["segment"]


def test_linear_addressing_wraps_at_4gib() -> None:
    f = parse(hexfile(rec(4, 0, b"\xff\xff"), rec(0, 0xFFF8, bytes(16)), EOF))
    assert f.details["segments"] == [[0, 8], [0xFFFFFFF8, 0x100000000]]


def test_empty_data_record_is_allowed() -> None:
    f = parse(hexfile(rec(0, 0), rec(0, 4, b"\x01"), EOF))
    assert f.valid
    assert f.details["segments"] == [[4, 5]]


def test_file_without_data_warns() -> None:
    f = parse(hexfile(EOF))
    assert f.valid
    assert f.details["segments"] == []
    assert f.warnings == ["the file holds no data"]


@pytest.mark.parametrize("data", [b"", b"\n\n\r\n", b"hello world\n"])
def test_no_records_is_an_image_error(data: bytes) -> None:
    with pytest.raises(ImageError, match="no Intel HEX records"):
        parse(data)


def test_overlong_line_is_an_image_error() -> None:
    with pytest.raises(ImageError, match="line 2 is longer than"):
        parse(hexfile(rec(0, 0, b"\x01"), ":" + "0" * 5000, EOF))
    with pytest.raises(ImageError, match="line 1 is longer than"):
        parse(b":" + b"0" * (3 * CHUNK))


def test_problem_list_is_capped() -> None:
    f = parse(hexfile(*(["garbage"] * 500), rec(0, 0, b"\x01"), EOF))
    assert len(f.problems) == 101
    assert f.problems[-1] == "... and 400 more problems"


def test_sniff() -> None:
    good = hexfile(rec(0, 0, b"\x01\x02"), EOF)
    assert ihex.sniff(Sniff(head=good, tail=good[-64:], size=len(good)))
    assert ihex.sniff(Sniff(head=b"\r\n" + good, tail=b"", size=len(good) + 2))
    # A damaged checksum is still Intel HEX (so the damage gets reported).
    damaged = hexfile(rec(0, 0, b"\x01", checksum=0), EOF)
    assert ihex.sniff(Sniff(head=damaged, tail=b"", size=len(damaged)))
    for bad in (b"", b":", b":zz\n", b"S1130000\n", b":0100000001\n", b"\x00" * 100):
        assert not ihex.sniff(Sniff(head=bad, tail=b"", size=len(bad)))


def test_registered() -> None:
    from unbrick.formats import detect

    good = hexfile(rec(0, 0, b"\x01\x02"), EOF)
    assert detect.detect(Sniff(head=good, tail=good[-64:], size=len(good))).name == "ihex"


# --- conversion --------------------------------------------------------------------------------


def test_to_raw_fills_gaps() -> None:
    data = hexfile(rec(4, 0, b"\x08\x00"), rec(0, 0x10, b"\x01\x02"), rec(0, 0x14, b"\x03"), EOF)
    layout, raw = convert(data)
    assert layout == RawLayout(0x08000010, 5, [(0x08000010, 0x08000012), (0x08000014, 0x08000015)])
    assert raw == b"\x01\x02\xff\xff\x03"
    layout, raw = convert(data, fill=0)
    assert raw == b"\x01\x02\x00\x00\x03"


def test_to_raw_writes_at_the_output_position() -> None:
    out = io.BytesIO()
    out.write(b"HEAD")
    layout = ihex.to_raw(
        Source.from_bytes(hexfile(rec(0, 0, b"\x01"), rec(0, 2, b"\x02"), EOF)), out, Context()
    )
    assert layout.size == 3
    assert out.getvalue() == b"HEAD\x01\xff\x02"
    assert out.tell() == 7


def test_to_raw_refuses_huge_span() -> None:
    data = hexfile(rec(0, 0, b"\x01"), rec(4, 0, b"\xff\xff"), rec(0, 0xFFFF, b"\x02"), EOF)
    out = io.BytesIO()
    with pytest.raises(LimitError) as e:
        ihex.to_raw(Source.from_bytes(data), out, Context())
    assert "max_span" in e.value.message
    assert "max_span" in e.value.hint
    assert out.getvalue() == b""
    layout, raw = convert(hexfile(rec(0, 0, b"\x01"), rec(0, 0x3FF, b"\x02"), EOF), max_span=1024)
    assert raw[0] == 1 and raw[-1] == 2
    assert layout.size == 1024
    with pytest.raises(LimitError):
        convert(hexfile(rec(0, 0, b"\x01"), rec(0, 0x400, b"\x02"), EOF), max_span=1024)


def test_to_raw_refuses_invalid_file() -> None:
    with pytest.raises(ImageError, match="cannot convert an invalid Intel HEX file: line 1"):
        convert(hexfile(rec(0, 0, b"\x01", checksum=0), EOF))
    with pytest.raises(ImageError, match="no data"):
        convert(hexfile(EOF))
    with pytest.raises(UsageError):
        convert(hexfile(rec(0, 0, b"\x01"), EOF), fill=256)


def test_writer_multiple_segments_and_64k_boundary() -> None:
    out = io.BytesIO()
    w = ihex.IhexWriter(out, record_size=32)
    w.data(0x1FFF0, bytes(range(40)))
    w.data(0x08000000, b"\xaa" * 3)
    n = w.close(entry=0x08000001)
    text = out.getvalue().decode()
    assert n == len(text.splitlines())
    assert text.endswith(":00000001FF\n")
    f = parse(out.getvalue())
    assert f.valid, f.problems
    assert f.details["segments"] == [[0x1FFF0, 0x20018], [0x08000000, 0x08000003]]
    assert f.details["entry_point"] == 0x08000001
    # No record crosses a 64 KiB boundary.
    assert ":10FFF000" in text.replace("\n", "")


def test_writer_rejects_bad_parameters() -> None:
    with pytest.raises(UsageError):
        ihex.IhexWriter(io.BytesIO(), record_size=0)
    w = ihex.IhexWriter(io.BytesIO())
    with pytest.raises(UsageError):
        w.data(0xFFFFFFFF, b"\x01\x02")
    with pytest.raises(UsageError):
        w.close(entry=1 << 32)
    with pytest.raises(UsageError):
        ihex.write_ihex(Source.from_bytes(b"\x01\x02"), io.BytesIO(), 0xFFFFFFFF, None)


# --- streaming -----------------------------------------------------------------------------------


class _Recorder(io.BytesIO):
    biggest = 0

    def read(self, n: int | None = -1, /) -> bytes:
        assert n is not None and n >= 0, "whole-file read"
        self.biggest = max(self.biggest, n)
        return super().read(n)


def test_streaming_reads_are_bounded() -> None:
    payload = random.Random(1).randbytes(1536 * 1024)
    text = io.BytesIO()
    ihex.write_ihex(Source.from_bytes(payload), text, 0x08000000, None, record_size=32)
    data = text.getvalue()
    assert len(data) > 3 * CHUNK
    rec_f = _Recorder(data)
    src = Source(rec_f, size=len(data))
    tracemalloc.start()
    try:
        f = ihex.inspect(src, Context())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert f.valid
    assert f.details["segments"] == [[0x08000000, 0x08000000 + len(payload)]]
    assert rec_f.biggest <= CHUNK
    assert peak < 4 * CHUNK, peak


# --- properties ----------------------------------------------------------------------------------


@st.composite
def layouts(draw: st.DrawFn) -> list[tuple[int, bytes]]:
    """Disjoint, non-touching pieces of data within a 1 MiB window somewhere in 4 GiB."""
    base = draw(st.integers(0, (1 << 32) - (1 << 20)))
    n = draw(st.integers(1, 6))
    offsets = sorted(
        draw(st.lists(st.integers(0, (1 << 20) - 600), min_size=n, max_size=n, unique=True))
    )
    pieces: list[tuple[int, bytes]] = []
    limit = 0
    for off in offsets:
        if off <= limit and pieces:
            continue
        length = draw(st.integers(1, 500))
        pieces.append((base + off, draw(st.binary(min_size=length, max_size=length))))
        limit = off + length
    return pieces


def _expected_raw(pieces: list[tuple[int, bytes]], fill: int) -> tuple[int, bytes]:
    lo = min(a for a, _ in pieces)
    hi = max(a + len(d) for a, d in pieces)
    buf = bytearray([fill]) * (hi - lo)
    for a, d in pieces:
        buf[a - lo : a - lo + len(d)] = d
    return lo, bytes(buf)


def _merged(pieces: list[tuple[int, bytes]]) -> list[list[int]]:
    out: list[list[int]] = []
    for a, d in sorted(pieces):
        if out and out[-1][1] >= a:
            out[-1][1] = max(out[-1][1], a + len(d))
        else:
            out.append([a, a + len(d)])
    return out


@settings(max_examples=150, deadline=None)
@given(
    pieces=layouts(),
    entry=st.none() | st.integers(0, 0xFFFFFFFF),
    record_size=st.integers(1, 255),
    shuffle=st.randoms(use_true_random=False),
    fill=st.integers(0, 255),
)
def test_round_trip_pieces(
    pieces: list[tuple[int, bytes]],
    entry: int | None,
    record_size: int,
    shuffle: random.Random,
    fill: int,
) -> None:
    order = list(pieces)
    shuffle.shuffle(order)
    out = io.BytesIO()
    w = ihex.IhexWriter(out, record_size=record_size)
    for a, d in order:
        w.data(a, d)
    w.close(entry)
    f = parse(out.getvalue())
    assert f.valid, f.problems
    assert f.details["segments"] == _merged(pieces)
    assert f.details["entry_point"] == entry
    assert f.details["data_bytes"] == sum(len(d) for _, d in pieces)
    layout, raw = convert(out.getvalue(), fill=fill)
    lo, expected = _expected_raw(pieces, fill)
    assert layout.base_address == lo
    assert raw == expected


@settings(max_examples=100, deadline=None)
@given(data=st.binary(min_size=1, max_size=3000), base=st.integers(0, 0xFFFFF000))
def test_round_trip_write_ihex(data: bytes, base: int) -> None:
    out = io.BytesIO()
    n = ihex.write_ihex(Source.from_bytes(data), out, base, base + 1)
    assert n == out.getvalue().count(b"\n")
    layout, raw = convert(out.getvalue())
    assert layout == RawLayout(base, len(data), [(base, base + len(data))])
    assert raw == data


def _check_parse(data: bytes) -> None:
    try:
        f = parse(data)
    except ImageError:
        return
    json.dumps(f.details)
    assert isinstance(f.details["segments"], list)
    assert isinstance(f.details["record_count"], int)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000))
def test_fuzz_random_bytes(data: bytes) -> None:
    _check_parse(data)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.sampled_from([":", "0", "1", "4", "F", "\n", "\r", " ", "Z", "05", "02"]), max_size=200
    )
)
def test_fuzz_hexish_text(parts: list[str]) -> None:
    _check_parse(("".join(parts)).encode())


_VALID = hexfile(
    rec(2, 0, b"\x10\x00"),
    rec(0, 0xFFF0, bytes(range(32))),
    rec(4, 0, b"\x08\x00"),
    rec(0, 0x0000, bytes(range(16))),
    rec(0, 0x0008, bytes(range(8, 24))),
    rec(3, 0, b"\x00\x01\x00\x02"),
    rec(5, 0, b"\x08\x00\x00\x01"),
    EOF,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["flip", "cut", "insert"]),
            st.integers(0, len(_VALID)),
            st.integers(0, 255),
        ),
        min_size=1,
        max_size=4,
    )
)
def test_fuzz_mutated_file(edits: list[tuple[str, int, int]]) -> None:
    data = bytearray(_VALID)
    for op, where, val in edits:
        pos = min(where, len(data))
        if op == "flip" and pos < len(data):
            data[pos] ^= val or 1
        elif op == "cut":
            del data[pos:]
        else:
            data[pos:pos] = bytes((val,))
    _check_parse(bytes(data))
    try:
        layout, raw = convert(bytes(data), max_span=1 << 20)
    except ImageError:
        return
    assert len(raw) == layout.size


# --- cross-checks with srecord -------------------------------------------------------------------

_RANGE = re.compile(r"([0-9A-F]+) - ([0-9A-F]+)")


def srec_info(path: Path, *fmt: str) -> tuple[list[list[int]], int | None]:
    """Data ranges (made half-open) and execution start address printed by srec_info."""
    out = run(["srec_info", path, *fmt]).stdout.decode()
    entry_m = re.search(r"Execution Start Address: ([0-9A-F]+)", out)
    data_part = out.split("Data:", 1)[1] if "Data:" in out else ""
    ranges = [[int(a, 16), int(b, 16) + 1] for a, b in _RANGE.findall(data_part)]
    return ranges, int(entry_m.group(1), 16) if entry_m else None


def _random_blobs(rng: random.Random, tmp_path: Path) -> list[tuple[Path, int]]:
    blobs = []
    base = rng.choice([0, 0x8000, 0x08000000, 0x10000000, 0xFFF00000 - 0x100000])
    at = base
    for i in range(rng.randint(1, 4)):
        size = rng.randint(1, 70000)
        p = tmp_path / f"in{i}.bin"
        p.write_bytes(rng.randbytes(size))
        blobs.append((p, at))
        at += size + rng.choice([0, 1, 17, 4096, 0x20000])
    return blobs


@pytest.mark.peer
@pytest.mark.parametrize("seed", range(6))
def test_srec_cat_files_agree_with_srec_info(tmp_path: Path, seed: int) -> None:
    need("srec_cat", "srec_info")
    rng = random.Random(seed)
    blobs = _random_blobs(rng, tmp_path)
    argv: list[str | Path] = ["srec_cat"]
    for p, at in blobs:
        argv += [p, "-binary", "-offset", hex(at)]
    hex_path = tmp_path / "out.hex"
    argv += ["-o", hex_path, "-intel"]
    if seed % 2:
        argv += ["-execution-start-address", hex(blobs[0][1] + 1)]
    if seed % 3 == 2:
        argv += ["-line-length", "76"]
    run(argv)
    segs, entry = srec_info(hex_path, "-intel")
    f = ihex.inspect(Source.from_bytes(hex_path.read_bytes()), Context())
    assert f.valid, f.problems
    assert f.details["segments"] == segs
    assert f.details["entry_point"] == entry
    # The raw conversion equals srec_cat's, shifted to start at 0 and filled with 0xFF.
    ours = tmp_path / "ours.bin"
    with ours.open("wb") as out:
        layout = ihex.to_raw(Source.from_bytes(hex_path.read_bytes()), out, Context())
    assert layout.base_address == segs[0][0]
    theirs = tmp_path / "theirs.bin"
    run(
        [
            "srec_cat",
            "(",
            hex_path,
            "-intel",
            "-fill",
            "0xFF",
            "-over",
            "(",
            hex_path,
            "-intel",
            ")",
            ")",
            "-offset",
            f"-{layout.base_address:#x}",
            "-o",
            theirs,
            "-binary",
        ]
    )
    assert ours.read_bytes() == theirs.read_bytes()


@pytest.mark.peer
def test_wrapping_agrees_with_srec_info(tmp_path: Path) -> None:
    need("srec_info")
    cases = [
        hexfile(rec(2, 0, b"\xf0\x00"), rec(0, 0xFFF8, bytes(16)), EOF),
        hexfile(rec(2, 0, b"\xff\xff"), rec(0, 0x20, bytes(16)), EOF),
        hexfile(rec(4, 0, b"\x00\x01"), rec(0, 0xFFF8, bytes(16)), EOF),
        hexfile(rec(4, 0, b"\xff\xff"), rec(0, 0xFFF8, bytes(16)), EOF),
        hexfile(rec(0, 0xFFF8, bytes(16)), rec(3, 0, b"\x12\x34\x00\x10"), EOF),
    ]
    for i, data in enumerate(cases):
        p = tmp_path / f"c{i}.hex"
        p.write_bytes(data)
        segs, entry = srec_info(p, "-intel")
        f = parse(data)
        assert f.details["segments"] == sorted(segs), i
        assert f.details["entry_point"] == entry, i


@pytest.mark.peer
@pytest.mark.parametrize("seed", range(4))
def test_our_writer_is_accepted_by_srecord(tmp_path: Path, seed: int) -> None:
    need("srec_cat", "srec_info")
    rng = random.Random(100 + seed)
    data = rng.randbytes(rng.randint(1, 200000))
    base = rng.choice([0, 0x1234, 0x0800FFF0, 0x20000000])
    hex_path = tmp_path / "ours.hex"
    with hex_path.open("wb") as out:
        ihex.write_ihex(
            Source.from_bytes(data), out, base, base + 0x101, record_size=rng.choice([16, 32, 255])
        )
    proc = run(["srec_info", hex_path, "-intel"])
    assert b"warning" not in proc.stderr, proc.stderr
    segs, entry = srec_info(hex_path, "-intel")
    assert segs == [[base, base + len(data)]]
    assert entry == base + 0x101
    bin_path = tmp_path / "back.bin"
    run(["srec_cat", hex_path, "-intel", "-offset", f"-{base:#x}", "-o", bin_path, "-binary"])
    assert bin_path.read_bytes() == data


@pytest.mark.peer
def test_corrupt_checksum_srec_cat_and_we_agree(tmp_path: Path) -> None:
    need("srec_cat")
    good = tmp_path / "good.hex"
    with good.open("wb") as out:
        ihex.write_ihex(Source.from_bytes(bytes(range(256)) * 4), out, 0x08000000, None)
    lines = good.read_bytes().split(b"\n")
    target = 7  # 1-based line number
    line = lines[target - 1]
    flipped = b"0" if line[-1:] != b"0" else b"1"
    lines[target - 1] = line[:-1] + flipped
    bad = tmp_path / "bad.hex"
    bad.write_bytes(b"\n".join(lines))
    import subprocess

    proc = subprocess.run(
        ["srec_cat", bad, "-intel", "-o", tmp_path / "x.bin", "-binary"],
        capture_output=True,
        check=False,
    )
    assert proc.returncode != 0
    assert f"{target}: checksum mismatch" in " ".join(proc.stderr.decode().split())
    f = ihex.inspect(Source.from_bytes(bad.read_bytes()), Context())
    assert [e["line"] for e in f.details["checksum_errors"]] == [target]
    err = f.details["checksum_errors"][0]
    assert err["found"] == int(lines[target - 1][-2:], 16)
    assert err["expected"] == int(line[-2:], 16)


def test_iter_data_checks_the_file_first() -> None:
    good = hexfile(rec(0, 0x10, b"\x01\x02"), rec(4, 0, b"\x00\x01"), rec(0, 0, b"\x03"), EOF)
    assert list(ihex.iter_data(Source.from_bytes(good), Context())) == [
        (0x10, b"\x01\x02"),
        (0x10000, b"\x03"),
    ]
    with pytest.raises(ImageError, match="invalid Intel HEX file: line 1"):
        list(ihex.iter_data(Source.from_bytes(hexfile(rec(0, 0, b"\x01", checksum=0))), Context()))


# --- the shared range helpers (memmap), exercised here ---------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 300), st.integers(0, 40)), max_size=40))
def test_rangeset_matches_a_set_model(adds: list[tuple[int, int]]) -> None:
    from unbrick.formats.memmap import RangeSet

    rs = RangeSet()
    model: set[int] = set()
    for start, length in adds:
        covered = rs.add(start, start + length)
        assert sum(b - a for a, b in covered) == len(model & set(range(start, start + length)))
        model |= set(range(start, start + length))
        ranges = rs.ranges()
        assert ranges == sorted(ranges)
        assert all(e1 < s2 for (_, e1), (s2, _) in itertools.pairwise(ranges))
        assert {x for s, e in ranges for x in range(s, e)} == model
        assert rs.total() == len(model)
        probe = rs.intersect(start - 5, start + length + 5)
        assert {x for s, e in probe for x in range(s, e)} == model & set(
            range(start - 5, start + length + 5)
        )


def test_overlap_checker_partly_seen_range() -> None:
    from unbrick.formats.memmap import OverlapChecker, RangeSet

    overlaps = RangeSet()
    overlaps.add(10, 20)
    chk = OverlapChecker(overlaps)
    assert chk.feed(10, b"\x01" * 5) is None  # bytes 10..14 seen
    assert chk.feed(12, b"\x01" * 8) is None  # mixed: 12..14 agree, 15..19 new
    assert chk.feed(8, b"\x00" * 2 + b"\x01" * 9 + b"\x02") == 19
    assert chk.feed(0, b"\x07" * 40) == 10


def test_too_many_scattered_ranges_is_a_limit_error() -> None:
    from unbrick.formats import memmap

    rs = memmap.RangeSet()
    with pytest.raises(LimitError, match="separate address ranges"):
        for i in range(memmap.MAX_RANGES + 1):
            rs.add(2 * i, 2 * i + 1)
