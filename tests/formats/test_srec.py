"""Motorola S-records: hand-built edge cases, round trips, fuzzing and cross-checks with
srecord."""

from __future__ import annotations

import io
import json
import random
import re
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import need, run
from unbrick.errors import ImageError, LimitError, UsageError
from unbrick.formats import srec
from unbrick.formats.base import Context, Findings, Sniff, Source
from unbrick.formats.memmap import RawLayout

_ALEN = {0: 2, 1: 2, 2: 3, 3: 4, 4: 2, 5: 2, 6: 3, 7: 4, 8: 3, 9: 2}


def rec(rtype: int, address: int, data: bytes = b"", *, checksum: int | None = None) -> str:
    body = address.to_bytes(_ALEN[rtype], "big") + data
    body = bytes((len(body) + 1,)) + body
    ck = ~sum(body) & 0xFF if checksum is None else checksum
    return f"S{rtype}" + (body + bytes((ck,))).hex().upper()


def sfile(*lines: str, newline: str = "\n") -> bytes:
    return (newline.join(lines) + newline).encode()


def parse(data: bytes) -> Findings:
    return srec.inspect(Source.from_bytes(data), Context())


def convert(data: bytes, **kw: int) -> tuple[RawLayout, bytes]:
    out = io.BytesIO()
    layout = srec.to_raw(Source.from_bytes(data), out, Context(), **kw)
    return layout, out.getvalue()


# --- hand-built files ------------------------------------------------------------------------


def test_simple_file_details() -> None:
    f = parse(
        sfile(
            rec(0, 0, b"boot.bin\0"),
            rec(1, 0x100, b"\x01\x02\x03"),
            rec(2, 0x010000, b"\x04"),
            rec(3, 0x08000000, b"\x05\x06"),
            rec(3, 0x08000002, b"\x07"),
            rec(5, 4),
            rec(7, 0x08000001),
        )
    )
    assert f.valid, f.problems
    d = f.details
    assert d["header"] == "boot.bin"
    assert d["segments"] == [[0x100, 0x103], [0x10000, 0x10001], [0x08000000, 0x08000003]]
    assert d["entry_point"] == 0x08000001
    assert d["data_bytes"] == 7
    assert d["record_count"] == 7
    assert d["data_record_count"] == 4
    assert d["declared_record_count"] == 4
    assert d["data_record_types"] == ["S1", "S2", "S3"]
    assert d["termination_record"] == "S7"
    assert d["checksum_errors"] == []


@pytest.mark.parametrize(("term", "count"), [(9, 5), (8, 6), (7, 5)])
def test_termination_and_count_types(term: int, count: int) -> None:
    f = parse(sfile(rec(1, 0x10, b"\xaa"), rec(count, 1), rec(term, 0x1234)))
    assert f.valid, f.problems
    assert f.details["entry_point"] == 0x1234
    assert f.details["termination_record"] == f"S{term}"
    assert f.details["header"] is None


def test_crlf_blank_lines_and_lowercase() -> None:
    f = parse(sfile("", rec(1, 0x10, b"\xab").lower(), "  ", rec(9, 0), newline="\r\n"))
    assert f.valid, f.problems
    assert f.details["segments"] == [[0x10, 0x11]]
    assert f.details["entry_point"] == 0


def test_checksum_error_names_line() -> None:
    good = rec(1, 0x20, b"\x11\x22")
    expected = int(good[-2:], 16)
    bad = rec(1, 0x20, b"\x11\x22", checksum=expected ^ 0x40)
    f = parse(sfile(rec(0, 0), rec(1, 0, b"\x00"), bad, rec(9, 0)))
    assert f.details["checksum_errors"] == [
        {"line": 3, "expected": expected, "found": expected ^ 0x40}
    ]
    assert f.problems == [f"line 3: checksum is 0x{expected ^ 0x40:02X}, expected 0x{expected:02X}"]


def test_reserved_s4_is_a_problem() -> None:
    f = parse(sfile(rec(1, 0, b"\x01"), rec(4, 0, b"\x01"), rec(9, 0)))
    assert f.problems == ["line 2: unknown record type S4"]


def test_count_mismatch_is_a_problem() -> None:
    f = parse(sfile(rec(1, 0, b"\x01"), rec(1, 1, b"\x02"), rec(5, 3), rec(9, 0)))
    assert f.problems == ["line 3: S5 record count says 3 data records, 2 came before it"]
    assert f.details["declared_record_count"] == 3


def test_missing_termination_without_count_is_a_problem() -> None:
    f = parse(sfile(rec(0, 0), rec(1, 0, b"\x01")))
    assert f.problems == [
        "no termination record (S7/S8/S9) and no final record count: the file may be truncated"
    ]
    assert f.details["entry_point"] is None


def test_missing_termination_with_matching_count_is_a_warning() -> None:
    # This is what srec_cat writes when it has no start address.
    f = parse(sfile(rec(0, 0), rec(1, 0, b"\x01"), rec(5, 1)))
    assert f.valid
    assert f.warnings == ["no termination record (S7/S8/S9): the file has no start address"]
    # Data after the count record: the count no longer vouches for the end of the file.
    f = parse(sfile(rec(1, 0, b"\x01"), rec(5, 1), rec(1, 1, b"\x02")))
    assert not f.valid


def test_content_after_termination_is_a_problem() -> None:
    f = parse(sfile(rec(1, 0, b"\x01"), rec(9, 0), rec(1, 8, b"\x02")))
    assert f.problems == ["line 3: content after the termination record (line 2) is ignored"]
    assert f.details["segments"] == [[0, 1]]


def test_second_header_is_a_warning() -> None:
    f = parse(sfile(rec(0, 0, b"one"), rec(0, 0, b"two"), rec(1, 0, b"\x01"), rec(9, 0)))
    assert f.valid
    assert f.details["header"] == "one"
    assert f.warnings == ["line 2: a second S0 header record"]


def test_records_carrying_unexpected_data() -> None:
    f = parse(sfile(rec(1, 0, b"\x01"), rec(5, 1, b"\x00"), rec(9, 0, b"\x00")))
    assert f.problems == [
        "line 2: S5 count record carries data",
        "line 3: S9 termination record carries data",
    ]


def test_data_past_4gib_is_a_problem() -> None:
    f = parse(sfile(rec(3, 0xFFFFFFFE, b"\x01\x02\x03"), rec(7, 0)))
    assert f.problems == ["line 1: data runs past the 4 GiB address space"]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("X1130000", "not an S-record"),
        ("SA030000FC", "not an S-record"),
        ("S1", "record is empty"),
        ("S10300G0FC", "hexadecimal digit pairs"),
        ("S1050000FA", "byte count says 5 bytes but the record holds 3"),
        ("S30200FD", "too short for its 4-byte address"),
        ("S1 03 0000 FC", "hexadecimal digit pairs"),
    ],
)
def test_bad_lines_are_problems_with_line_number(line: str, message: str) -> None:
    f = parse(sfile(rec(1, 0, b"\x01"), line, rec(9, 0)))
    assert len(f.problems) == 1, f.problems
    assert f.problems[0].startswith("line 2: ")
    assert message in f.problems[0]


def test_overlaps() -> None:
    f = parse(sfile(rec(1, 0x10, bytes(8)), rec(1, 0x14, b"\x00\x00\x01"), rec(9, 0)))
    assert f.problems == [
        "line 2: data at 0x16 differs from data written earlier at the same address"
    ]
    f = parse(sfile(rec(1, 0x10, bytes(8)), rec(1, 0x14, bytes(2)), rec(9, 0)))
    assert f.valid
    assert f.warnings == ["2 bytes are written more than once (with the same values)"]


@pytest.mark.parametrize("data", [b"", b"\n \n", b"Some text\n"])
def test_no_records_is_an_image_error(data: bytes) -> None:
    with pytest.raises(ImageError, match="no S-records found"):
        parse(data)


def test_overlong_line_is_an_image_error() -> None:
    with pytest.raises(ImageError, match="line 2 is longer than"):
        parse(sfile(rec(1, 0, b"\x01"), "S1" + "0" * 1000))


def test_sniff() -> None:
    good = sfile(rec(0, 0, b"hdr"), rec(1, 0, b"\x01"), rec(9, 0))
    assert srec.sniff(Sniff(head=good, tail=good[-64:], size=len(good)))
    damaged = sfile(rec(1, 0, b"\x01", checksum=0))
    assert srec.sniff(Sniff(head=damaged, tail=b"", size=len(damaged)))
    for bad in (b"", b"S", b"S1\n", b"S4030000FC\n", b"SX", b"Sorry\n", b":00000001FF\n"):
        assert not srec.sniff(Sniff(head=bad, tail=b"", size=len(bad)))


def test_registered() -> None:
    from unbrick.formats import detect

    good = sfile(rec(0, 0, b"hdr"), rec(1, 0, b"\x01"), rec(9, 0))
    assert detect.detect(Sniff(head=good, tail=good[-64:], size=len(good))).name == "srec"


# --- conversion and writing -----------------------------------------------------------------------


def test_to_raw_fills_gaps_and_bounds_span() -> None:
    data = sfile(rec(2, 0x20000, b"\x01"), rec(2, 0x20003, b"\x02"), rec(8, 0))
    layout, raw = convert(data)
    assert layout == RawLayout(0x20000, 4, [(0x20000, 0x20001), (0x20003, 0x20004)])
    assert raw == b"\x01\xff\xff\x02"
    with pytest.raises(LimitError, match="max_span"):
        convert(sfile(rec(3, 0, b"\x01"), rec(3, 0x20000000, b"\x02"), rec(7, 0)))
    with pytest.raises(ImageError, match="cannot convert an invalid S-record file"):
        convert(sfile(rec(1, 0, b"\x01")))


@pytest.mark.parametrize(
    ("base", "size", "entry", "data_type", "term"),
    [
        (0x100, 16, None, "S1", "S9"),
        (0xFFF0, 32, None, "S2", "S8"),
        (0, 16, 0x1000000, "S3", "S7"),
        (0x08000000, 40, 0x08000001, "S3", "S7"),
    ],
)
def test_write_srec_picks_the_address_size(
    base: int, size: int, entry: int | None, data_type: str, term: str
) -> None:
    out = io.BytesIO()
    n = srec.write_srec(Source.from_bytes(bytes(size)), out, base, entry, header="hi")
    lines = out.getvalue().decode().splitlines()
    assert n == len(lines)
    assert lines[0] == rec(0, 0, b"hi")
    assert {ln[:2] for ln in lines[1:-2]} == {data_type}
    assert lines[-2].startswith("S5")
    assert lines[-1][:2] == term
    f = parse(out.getvalue())
    assert f.valid
    assert f.details["entry_point"] == (entry or 0)


def test_writer_rejects_bad_parameters() -> None:
    with pytest.raises(UsageError):
        srec.SrecWriter(io.BytesIO(), address_length=5)
    with pytest.raises(UsageError):
        srec.SrecWriter(io.BytesIO(), address_length=4, record_size=251)
    with pytest.raises(UsageError):
        srec.SrecWriter(io.BytesIO(), header="x" * 253)
    w = srec.SrecWriter(io.BytesIO(), address_length=2)
    with pytest.raises(UsageError):
        w.data(0xFFFF, b"\x01\x02")
    with pytest.raises(UsageError):
        w.close(entry=0x10000)
    with pytest.raises(UsageError):
        srec.write_srec(Source.from_bytes(b"\x01\x02"), io.BytesIO(), 0xFFFFFFFF, None)


def test_large_counts_use_s6() -> None:
    out = io.BytesIO()
    w = srec.SrecWriter(out, address_length=4, record_size=1)
    w.data(0, bytes(70000))
    w.close(entry=None)
    assert out.getvalue().splitlines()[-2].startswith(b"S6")
    f = parse(out.getvalue())
    assert f.valid
    assert f.details["declared_record_count"] == 70000


# --- properties ----------------------------------------------------------------------------------


@st.composite
def layouts(draw: st.DrawFn) -> list[tuple[int, bytes]]:
    base = draw(st.integers(0, (1 << 32) - (1 << 20)))
    offsets = sorted(draw(st.sets(st.integers(0, (1 << 20) - 600), min_size=1, max_size=6)))
    pieces: list[tuple[int, bytes]] = []
    limit = -1
    for off in offsets:
        if off <= limit:
            continue
        length = draw(st.integers(1, 500))
        pieces.append((base + off, draw(st.binary(min_size=length, max_size=length))))
        limit = off + length
    return pieces


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
    record_size=st.integers(1, 250),
    header=st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40),
    shuffle=st.randoms(use_true_random=False),
)
def test_round_trip_pieces(
    pieces: list[tuple[int, bytes]],
    entry: int | None,
    record_size: int,
    header: str,
    shuffle: random.Random,
) -> None:
    order = list(pieces)
    shuffle.shuffle(order)
    out = io.BytesIO()
    w = srec.SrecWriter(out, header=header, address_length=4, record_size=record_size)
    for a, d in order:
        w.data(a, d)
    w.close(entry)
    f = parse(out.getvalue())
    assert f.valid, f.problems
    assert f.details["segments"] == _merged(pieces)
    assert f.details["entry_point"] == (entry or 0)
    assert f.details["header"] == header
    _, raw = convert(out.getvalue(), fill=0x5A)
    lo = min(a for a, _ in pieces)
    for a, d in pieces:
        assert raw[a - lo : a - lo + len(d)] == d
    assert len(raw) == max(a + len(d) for a, d in pieces) - lo


@settings(max_examples=100, deadline=None)
@given(data=st.binary(min_size=1, max_size=3000), base=st.integers(0, 0xFFFFF000))
def test_round_trip_write_srec(data: bytes, base: int) -> None:
    out = io.BytesIO()
    srec.write_srec(Source.from_bytes(data), out, base, None)
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
        st.sampled_from(["S", "0", "1", "3", "5", "9", "F", "\n", "\r", " ", "Z", "03", "07"]),
        max_size=200,
    )
)
def test_fuzz_srecish_text(parts: list[str]) -> None:
    _check_parse("".join(parts).encode())


_VALID = sfile(
    rec(0, 0, b"header"),
    rec(1, 0xFFF0, bytes(range(16))),
    rec(2, 0x123456, bytes(range(20))),
    rec(3, 0x08000000, bytes(range(30))),
    rec(3, 0x08000008, bytes(range(8, 24))),
    rec(5, 4),
    rec(7, 0x08000001),
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


def srec_info(path: Path) -> tuple[list[list[int]], int | None, str | None]:
    """Data ranges (half-open), execution start address and header printed by srec_info."""
    out = run(["srec_info", path]).stdout.decode("latin-1")
    entry_m = re.search(r"Execution Start Address: ([0-9A-F]+)", out)
    header_m = re.search(r'Header: "(.*)"', out)
    data_part = out.split("Data:", 1)[1] if "Data:" in out else ""
    ranges = [[int(a, 16), int(b, 16) + 1] for a, b in _RANGE.findall(data_part)]
    return (
        ranges,
        int(entry_m.group(1), 16) if entry_m else None,
        header_m.group(1) if header_m else None,
    )


@pytest.mark.peer
@pytest.mark.parametrize("seed", range(8))
def test_srec_cat_files_agree_with_srec_info(tmp_path: Path, seed: int) -> None:
    need("srec_cat", "srec_info")
    rng = random.Random(seed)
    base = rng.choice([0, 0x100, 0x8000, 0x123456, 0x08000000])
    argv: list[str | Path] = ["srec_cat"]
    at = base
    for i in range(rng.randint(1, 3)):
        p = tmp_path / f"in{i}.bin"
        p.write_bytes(rng.randbytes(rng.randint(1, 50000)))
        argv += [p, "-binary", "-offset", hex(at)]
        at += p.stat().st_size + rng.choice([0, 3, 4096, 0x10000])
    s_path = tmp_path / "out.srec"
    argv += ["-o", s_path, "-motorola"]
    if seed % 4:
        argv += [f"-address-length={seed % 4 + 1}"] if seed % 4 > 1 else []
    if seed % 2:
        argv += ["-execution-start-address", hex(base + 4)]
    if seed % 3 == 0:
        argv += ["-header", f"image {seed}"]
    run(argv)
    segs, entry, header = srec_info(s_path)
    f = srec.inspect(Source.from_bytes(s_path.read_bytes()), Context())
    assert f.valid, f.problems
    assert f.details["segments"] == segs
    assert f.details["entry_point"] == entry
    assert f.details["header"] == header
    ours = tmp_path / "ours.bin"
    with ours.open("wb") as out:
        layout = srec.to_raw(Source.from_bytes(s_path.read_bytes()), out, Context())
    assert layout.base_address == segs[0][0]
    theirs = tmp_path / "theirs.bin"
    run(
        [
            "srec_cat",
            "(",
            s_path,
            "-fill",
            "0xFF",
            "-over",
            "(",
            s_path,
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
@pytest.mark.parametrize("seed", range(4))
def test_our_writer_is_accepted_by_srecord(tmp_path: Path, seed: int) -> None:
    need("srec_cat", "srec_info")
    rng = random.Random(200 + seed)
    data = rng.randbytes(rng.randint(1, 100000))
    base = rng.choice([0, 0x1000, 0x00FF0000, 0x20000000])
    s_path = tmp_path / "ours.srec"
    with s_path.open("wb") as out:
        srec.write_srec(
            Source.from_bytes(data),
            out,
            base,
            base + 2,
            header="unbrick test",
            record_size=rng.choice([16, 32, 64]),
        )
    proc = run(["srec_info", s_path])
    assert b"warning" not in proc.stderr, proc.stderr
    segs, entry, header = srec_info(s_path)
    assert segs == [[base, base + len(data)]]
    assert entry == base + 2
    assert header == "unbrick test"
    bin_path = tmp_path / "back.bin"
    run(["srec_cat", s_path, "-offset", f"-{base:#x}", "-o", bin_path, "-binary"])
    assert bin_path.read_bytes() == data


@pytest.mark.peer
def test_corrupt_checksum_srec_cat_and_we_agree(tmp_path: Path) -> None:
    need("srec_cat")
    good = tmp_path / "good.srec"
    with good.open("wb") as out:
        srec.write_srec(Source.from_bytes(bytes(range(256)) * 4), out, 0x08000000, 0x08000000)
    lines = good.read_bytes().split(b"\n")
    target = 9
    line = lines[target - 1]
    lines[target - 1] = line[:-1] + (b"0" if line[-1:] != b"0" else b"1")
    bad = tmp_path / "bad.srec"
    bad.write_bytes(b"\n".join(lines))
    proc = subprocess.run(
        ["srec_cat", bad, "-o", tmp_path / "x.bin", "-binary"], capture_output=True, check=False
    )
    assert proc.returncode != 0
    assert f"{target}: checksum mismatch" in " ".join(proc.stderr.decode().split())
    f = srec.inspect(Source.from_bytes(bad.read_bytes()), Context())
    assert f.details["checksum_errors"] == [
        {"line": target, "expected": int(line[-2:], 16), "found": int(lines[target - 1][-2:], 16)}
    ]


@pytest.mark.peer
def test_count_mismatch_srec_cat_and_we_agree(tmp_path: Path) -> None:
    need("srec_cat")
    p = tmp_path / "cnt.srec"
    p.write_bytes(sfile(rec(0, 0, b"x"), rec(1, 0x100, bytes(8)), rec(5, 3), rec(9, 0x100)))
    proc = subprocess.run(
        ["srec_cat", p, "-o", tmp_path / "x.bin", "-binary"], capture_output=True, check=False
    )
    assert proc.returncode != 0
    assert "3: data record count mismatch" in " ".join(proc.stderr.decode().split())
    f = srec.inspect(Source.from_bytes(p.read_bytes()), Context())
    assert f.problems == ["line 3: S5 record count says 3 data records, 1 came before it"]


def test_iter_data_checks_the_file_first() -> None:
    good = sfile(rec(1, 0x10, b"\x01\x02"), rec(3, 0x10000, b"\x03"), rec(9, 0))
    assert list(srec.iter_data(Source.from_bytes(good), Context())) == [
        (0x10, b"\x01\x02"),
        (0x10000, b"\x03"),
    ]
    with pytest.raises(ImageError, match="invalid S-record file: line 1"):
        list(srec.iter_data(Source.from_bytes(sfile(rec(1, 0, b"\x01", checksum=0))), Context()))
