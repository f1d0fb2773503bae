"""Archives: zip, tar and cpio listings, member checks, path safety and limits."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import os
import struct
import subprocess
import tarfile
import zipfile
import zlib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import need, run
from unbrick.errors import ImageError, LimitError
from unbrick.formats.archive import SPECS, safe_member_path
from unbrick.formats.base import Context, Findings, Limits, Sniff, Source
from unbrick.formats.detect import inspect_source

MiB = 1 << 20
FAST = settings(deadline=None, max_examples=80, suppress_health_check=[HealthCheck.too_slow])
FUZZ = settings(deadline=None, max_examples=1000, suppress_health_check=[HealthCheck.too_slow])
SMALL = Limits(max_expanded_bytes=16 * MiB, max_records=500_000, max_seconds=20.0)


def inspect(data: bytes, limits: Limits | None = None) -> Findings:
    return inspect_source(Source.from_bytes(data), Context(limits=limits or Limits()))


def inspect_as(fmt: str, data: bytes, limits: Limits | None = None) -> Findings:
    """Parse with one format's parser, bypassing detection."""
    spec = next(s for s in SPECS if s.name == fmt)
    return spec.inspect(Source.from_bytes(data), Context(limits=limits or Limits()))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def names(f: Findings) -> list[str]:
    return [m["name"] for m in f.details["members"]]


def member(f: Findings, name: str) -> dict[str, Any]:
    return next(m for m in f.details["members"] if m["name"] == name)


# --- builders -----------------------------------------------------------------------------


def make_tar(entries: list[tuple[str, str, bytes | str]], fmt: int = tarfile.GNU_FORMAT) -> bytes:
    """entries: (name, kind, data-or-link-target) with kind file/dir/symlink/hardlink."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for name, kind, payload in entries:
            ti = tarfile.TarInfo(name)
            ti.mtime = 1_700_000_000
            if kind == "file":
                assert isinstance(payload, bytes)
                ti.size = len(payload)
                ti.mode = 0o644
                tf.addfile(ti, io.BytesIO(payload))
                continue
            ti.type = {"dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE}.get(
                kind, tarfile.LNKTYPE
            )
            ti.mode = 0o755
            if kind in ("symlink", "hardlink"):
                assert isinstance(payload, str)
                ti.linkname = payload
            tf.addfile(ti)
    return buf.getvalue()


def make_zip(entries: list[tuple[str, bytes, int]], comment: bytes = b"") -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data, method in entries:
            zi = zipfile.ZipInfo(name, (2024, 1, 2, 3, 4, 6))
            zi.compress_type = method
            zi.external_attr = (0o100644 << 16) if not name.endswith("/") else (0o40755 << 16)
            zf.writestr(zi, data)
        zf.comment = comment
    return buf.getvalue()


def zip_symlink(name: str, target: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zi = zipfile.ZipInfo(name)
        zi.create_system = 3
        zi.external_attr = 0o120777 << 16
        zf.writestr(zi, target)
    return buf.getvalue()


def cpio_entry(
    fmt: str,
    name: str,
    data: bytes = b"",
    mode: int = 0o100644,
    ino: int = 1,
    nlink: int = 1,
    check: int | None = None,
) -> bytes:
    raw_name = name.encode() + b"\x00"
    if fmt in ("newc", "crc"):
        if check is None:
            check = sum(data) & 0xFFFFFFFF if fmt == "crc" else 0
        fields = (ino, mode, 0, 0, nlink, 1_700_000_000, len(data), 8, 1, 0, 0, len(raw_name))
        head = (b"070701" if fmt == "newc" else b"070702") + b"".join(
            b"%08x" % v for v in (*fields, check)
        )
        out = head + raw_name
        out += bytes(-len(out) % 4) + data
        return out + bytes(-len(data) % 4)
    if fmt == "odc":
        head = b"070707" + b"".join(b"%06o" % v for v in (0, ino, mode, 0, 0, nlink, 0))
        head += b"%011o" % 1_700_000_000 + b"%06o" % len(raw_name) + b"%011o" % len(data)
        return head + raw_name + data
    order = "<" if fmt == "bin-le" else ">"
    t = 1_700_000_000
    head = struct.pack(
        order + "13H",
        0o070707,
        0,
        ino,
        mode,
        0,
        0,
        nlink,
        0,
        t >> 16,
        t & 0xFFFF,
        len(raw_name),
        len(data) >> 16,
        len(data) & 0xFFFF,
    )
    out = head + raw_name + bytes(len(raw_name) % 2)
    return out + data + bytes(len(data) % 2)


def make_cpio(fmt: str, entries: list[tuple[str, bytes, int]], pad: int = 512) -> bytes:
    out = b"".join(
        cpio_entry(fmt, name, data, mode, ino=i + 1) for i, (name, data, mode) in enumerate(entries)
    )
    out += cpio_entry(fmt, "TRAILER!!!", b"", 0, ino=0)
    return out + bytes(-len(out) % pad)


# --- path safety --------------------------------------------------------------------------


def test_safe_member_path_normalises() -> None:
    assert safe_member_path("a/b") == "a/b"
    assert safe_member_path("./a//b/./c/") == "a/b/c"
    assert safe_member_path("./") == "."
    assert safe_member_path("dir\\file") == "dir/file"
    assert safe_member_path("lib/x.so", "../usr/lib/x.so.1") == "lib/x.so"
    assert safe_member_path("a/b/c", "../../d") == "a/b/c"
    assert safe_member_path("a/b", "a/c", hardlink=True) == "a/b"


@pytest.mark.parametrize(
    "name",
    ["../../etc/passwd", "/abs", "a/../../x", "C:\\Windows\\x", "c:x", "..\\..\\x", "\\\\srv\\x"],
)
def test_safe_member_path_refuses_escapes(name: str) -> None:
    with pytest.raises(LimitError, match="escapes the extraction directory") as err:
        safe_member_path(name)
    assert f"member '{name}'" in err.value.message


def test_safe_member_path_refuses_escaping_links() -> None:
    for name, target, hard in (
        ("link", "../x", False),
        ("a/link", "../../x", False),
        ("link", "/etc/passwd", False),
        ("x", "../y", True),
        ("a/b", "..", True),
    ):
        with pytest.raises(LimitError, match=f"member '{name}' links to"):
            safe_member_path(name, target, hardlink=hard)
    with pytest.raises(LimitError, match="NUL"):
        safe_member_path("a\x00b")
    with pytest.raises(LimitError, match="empty"):
        safe_member_path("a", "")


COMPONENT = st.text("abcdefghijklmnopqrstuvwxyz0123456789_-.", min_size=1, max_size=12).filter(
    lambda c: c not in (".", "..")
)


@given(st.lists(COMPONENT, min_size=1, max_size=6), st.integers(0, 6))
@FAST
def test_safe_member_path_property(parts: list[str], up: int) -> None:
    assert safe_member_path("/".join(parts)) == "/".join(parts)
    assert safe_member_path("./" + "//".join(parts) + "/") == "/".join(parts)
    target = "/".join([".."] * up + ["t"])
    escapes = up > len(parts) - 1
    if escapes:
        with pytest.raises(LimitError):
            safe_member_path("/".join(parts), target)
    else:
        assert safe_member_path("/".join(parts), target) == "/".join(parts)
    with pytest.raises(LimitError):
        safe_member_path("/".join([*parts[:1], "..", *parts]))


@given(st.text(max_size=60), st.one_of(st.none(), st.text(max_size=30)), st.booleans())
@FUZZ
def test_safe_member_path_fuzz(name: str, target: str | None, hard: bool) -> None:
    try:
        out = safe_member_path(name, target, hardlink=hard)
    except LimitError:
        return
    assert not out.startswith("/") and ".." not in out.split("/")


# --- tar ----------------------------------------------------------------------------------


def test_tar_listing_and_details() -> None:
    long = "deep/" + "x" * 120 + "/file.bin"
    blob = make_tar(
        [
            ("dir", "dir", b""),
            ("dir/a.txt", "file", b"hello\n"),
            (long, "file", b"long"),
            ("dir/link", "symlink", "a.txt"),
            ("dir/hard", "hardlink", "dir/a.txt"),
            ("inner.gz", "file", gzip.compress(b"inside", mtime=0)),
        ],
        tarfile.PAX_FORMAT,
    )
    f = inspect(blob)
    assert f.format == "tar"
    assert f.valid, f.problems
    d = f.details
    # tarfile stores directory names with a trailing slash, as GNU tar does.
    assert names(f) == ["dir/", "dir/a.txt", long, "dir/link", "dir/hard", "inner.gz"]
    assert d["member_count"] == 6
    assert d["tar_format"] == "pax"
    assert d["counts"] == {"file": 3, "dir": 1, "symlink": 1, "hardlink": 1, "other": 0}
    a = member(f, "dir/a.txt")
    assert (a["type"], a["size"], a["mode"], a["sha256"]) == ("file", 6, 0o644, sha(b"hello\n"))
    assert a["inner_format"] == "raw" and "inner" not in a
    assert member(f, "dir/link")["link_target"] == "a.txt"
    assert member(f, "dir/hard")["link_target"] == "dir/a.txt"
    inner = member(f, "inner.gz")
    assert inner["inner_format"] == "gzip"
    assert inner["inner"]["details"]["expanded_sha256"] == sha(b"inside")
    assert d["total_size"] == 6 + 4 + len(gzip.compress(b"inside", mtime=0))


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_formats_and_long_names(fmt: int) -> None:
    name = "p" * 90 + "/" + "q" * 90  # fits ustar's prefix/name split
    f = inspect(make_tar([(name, "file", b"x"), ("t", "symlink", "p" * 90)], fmt))
    assert f.valid, f.problems
    assert names(f) == [name, "t"]
    assert f.details["tar_format"] == {0: "ustar", 1: "gnu", 2: "pax"}[fmt]


@pytest.mark.parametrize(
    ("entry", "needle"),
    [
        (("../x", "file", b"x"), "member '../x' escapes the extraction directory"),
        (("/abs/file", "file", b"x"), "member '/abs/file' escapes the extraction directory"),
        (("a/../../b", "file", b"x"), "member 'a/../../b' escapes"),
        (("evil", "symlink", "../../etc"), "member 'evil' links to '../../etc'"),
        (("evil", "symlink", "/etc/passwd"), "member 'evil' links to '/etc/passwd'"),
        (("evil", "hardlink", "../outside"), "member 'evil' links to '../outside'"),
    ],
)
def test_tar_path_escapes_are_problems(entry: tuple[str, str, bytes | str], needle: str) -> None:
    f = inspect(make_tar([("ok", "file", b"fine"), entry]))
    assert not f.valid
    assert any(needle in p for p in f.problems), f.problems
    assert f.details["member_count"] == 2


def test_tar_structure_problems() -> None:
    good = make_tar([("a", "file", b"A" * 1000), ("b", "file", b"B" * 10)])
    # A damaged second header: checksum mismatch, named by offset; the first member stays listed.
    bad = bytearray(good)
    bad[1536 + 10] ^= 1
    f = inspect(bytes(bad))
    assert not f.valid and "offset 1536: checksum mismatch" in f.problems[0]
    assert names(f) == ["a"]
    # Truncated member data.
    f = inspect(good[:1000])
    assert not f.valid and "tar member 'a'" in f.problems[0] and "truncated" in f.problems[0]
    # No end-of-archive marker, and a lone zero block.
    end = 512 + 1024 + 512 + 512
    f = inspect(good[:end])
    assert f.valid and "no end-of-archive marker" in f.warnings[0]
    f = inspect(good[:end] + bytes(512))
    assert f.valid and "lone zero block" in f.warnings[0]
    f = inspect(good[:1536] + bytes(512) + good[1536:])  # a zero block between members
    assert f.valid and names(f) == ["a", "b"]
    assert "lone zero block at offset 1536" in f.warnings[0]


def tar_header(name: str, typeflag: bytes, size: int) -> bytes:
    ti = tarfile.TarInfo(name)
    ti.size = size
    ti.type = typeflag
    return ti.tobuf(tarfile.USTAR_FORMAT)


def pax_record(key: str, value: str) -> bytes:
    body = f" {key}={value}\n".encode()
    n = len(body) + 1
    while len(str(n)) + len(body) != n:
        n += 1
    return str(n).encode() + body


def test_tar_extended_header_problems() -> None:
    bad_pax = b"zz path=x\n"
    blob = tar_header("pax", b"x", len(bad_pax)) + bad_pax.ljust(512, b"\x00")
    f = inspect(blob + tar_header("a", b"0", 0) + bytes(1024))
    assert not f.valid and "malformed record" in f.problems[0]
    wrong_len = b"99 path=x\n"
    blob = tar_header("pax", b"x", len(wrong_len)) + wrong_len.ljust(512, b"\x00")
    f = inspect(blob + tar_header("a", b"0", 0) + bytes(1024))
    assert not f.valid and "bad length" in f.problems[0]
    huge = tar_header("L", b"L", 5 * MiB)
    f = inspect(huge + bytes(1024))
    assert not f.valid and "more than" in f.problems[0]
    f = inspect(tar_header("././@LongLink", b"L", 4) + b"abc\x00".ljust(512, b"\x00"))
    assert not f.valid and "no member" in f.problems[0]
    record = pax_record("size", "zz")
    size = tar_header("p", b"x", len(record)) + record.ljust(512, b"\x00")
    f = inspect(size + tar_header("a", b"0", 0) + bytes(1024))
    assert not f.valid and "not a number" in f.problems[0]


def test_tar_gnu_long_names_and_pax_size_override() -> None:
    name = "n" * 300
    blob = make_tar([(name, "file", b"data"), ("l", "symlink", "t" * 200)], tarfile.GNU_FORMAT)
    f = inspect(blob)
    assert names(f) == [name, "l"]
    assert member(f, "l")["link_target"] == "t" * 200
    record = pax_record("size", "4")
    blob = tar_header("h", b"x", len(record)) + record.ljust(512, b"\x00")
    blob += tar_header("a", b"0", 0) + b"abcd".ljust(512, b"\x00") + bytes(1024)
    f = inspect(blob)
    assert f.valid, f.problems
    assert member(f, "a")["size"] == 4 and member(f, "a")["sha256"] == sha(b"abcd")


def test_tar_members_are_capped() -> None:
    blob = make_tar([(f"f{i}", "file", b"") for i in range(20)])
    assert inspect(blob, Limits(max_members=20)).valid
    with pytest.raises(LimitError, match="more than 19 members"):
        inspect(blob, Limits(max_members=19))


def test_tar_gz_nested_depth_and_problems() -> None:
    inner = make_tar([("../evil", "file", b"x")])
    outer = gzip.compress(inner)
    f = inspect(outer)
    assert f.format == "gzip"
    assert f.details["inner_format"] == "tar"
    assert not f.valid
    assert "inside the gzip data: member '../evil' escapes" in f.problems[0]
    # tar.gz inside a zip is depth 2: refused with max_depth=1.
    z = make_zip([("a.tar.gz", gzip.compress(make_tar([("x", "file", b"1")])), 0)])
    assert inspect(z, Limits(max_depth=2)).valid
    with pytest.raises(LimitError, match="nested deeper than 1"):
        inspect(z, Limits(max_depth=1))


@st.composite
def tar_entries(draw: st.DrawFn) -> list[tuple[str, str, bytes | str]]:
    n = draw(st.integers(1, 6))
    out: list[tuple[str, str, bytes | str]] = []
    for i in range(n):
        name = "/".join(draw(st.lists(COMPONENT, min_size=1, max_size=4))) + f"_{i}"
        if draw(st.booleans()) and len(name) < 60:
            name = name + "/" + "z" * draw(st.integers(80, 160))
        kind = draw(st.sampled_from(["file", "file", "dir", "symlink"]))
        if kind == "file":
            out.append((name, kind, draw(st.binary(max_size=2000))))
        elif kind == "symlink":
            out.append((name, kind, draw(COMPONENT)))
        else:
            out.append((name, kind, b""))
    return out


@given(entries=tar_entries(), fmt=st.sampled_from([tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]))
@FAST
def test_tar_round_trip(entries: list[tuple[str, str, bytes | str]], fmt: int) -> None:
    f = inspect(make_tar(entries, fmt))
    assert f.valid, f.problems
    assert names(f) == [e[0] + "/" * (e[1] == "dir") for e in entries]
    for got, (_, kind, payload) in zip(f.details["members"], entries, strict=True):
        assert got["type"] == kind
        if kind == "file":
            assert isinstance(payload, bytes)
            assert got["size"] == len(payload) and got["sha256"] == sha(payload)
        if kind == "symlink":
            assert got["link_target"] == payload


# --- zip ----------------------------------------------------------------------------------

STORED, DEFLATED, BZIP2, LZMA = (
    zipfile.ZIP_STORED,
    zipfile.ZIP_DEFLATED,
    zipfile.ZIP_BZIP2,
    zipfile.ZIP_LZMA,
)


def test_zip_listing_and_details() -> None:
    data = b"payload " * 1000
    blob = make_zip(
        [
            ("dir/", b"", STORED),
            ("dir/s.bin", data, STORED),
            ("dir/d.bin", data, DEFLATED),
            ("b.bin", data, BZIP2),
            ("l.bin", data, LZMA),
            ("t.tar", make_tar([("x", "file", b"xx")]), DEFLATED),
        ],
        comment=b"hello",
    )
    f = inspect(blob)
    assert f.format == "zip"
    assert f.valid, f.problems
    d = f.details
    assert d["member_count"] == 6 and d["comment"] == "hello" and d["zip64"] is False
    assert d["counts"]["dir"] == 1 and d["counts"]["file"] == 5
    for name, method in (
        ("dir/s.bin", "stored"),
        ("dir/d.bin", "deflate"),
        ("b.bin", "bzip2"),
        ("l.bin", "lzma"),
    ):
        m = member(f, name)
        assert (m["method"], m["size"], m["sha256"]) == (method, len(data), sha(data))
        assert m["mode"] == 0o644
    tar_member = member(f, "t.tar")
    assert tar_member["inner_format"] == "tar"
    assert tar_member["inner"]["details"]["members"][0]["name"] == "x"


def test_zip_symlinks() -> None:
    f = inspect(zip_symlink("dir/link", "../dir2/x"))
    assert f.valid, f.problems
    m = member(f, "dir/link")
    assert (m["type"], m["link_target"]) == ("symlink", "../dir2/x")
    f = inspect(zip_symlink("link", "../../etc/passwd"))
    assert not f.valid
    assert "member 'link' links to '../../etc/passwd'" in f.problems[0]


@pytest.mark.parametrize("name", ["../x", "/abs", "a\\..\\..\\x", "C:/x"])
def test_zip_path_escapes_are_problems(name: str) -> None:
    f = inspect(make_zip([("fine", b"1", STORED), (name, b"2", DEFLATED)]))
    assert not f.valid
    assert f"member '{name}' escapes the extraction directory" in f.problems[0]


def patch(blob: bytes, old: bytes, new: bytes, count: int = -1) -> bytes:
    assert old in blob
    return blob.replace(old, new, count)


def test_zip_crc_mismatch_names_the_member() -> None:
    blob = make_zip([("a.txt", b"hello world", STORED), ("b.txt", b"x" * 500, DEFLATED)])
    f = inspect(patch(blob, b"hello world", b"hello World"))
    assert not f.valid
    assert "zip member 'a.txt': CRC-32 mismatch" in f.problems[0]
    assert member(f, "b.txt")["sha256"] == sha(b"x" * 500)
    # A corrupt deflate member.
    raw = bytearray(blob)
    pos = blob.index(b"b.txt") + 5 + 3
    raw[pos] ^= 0xFF
    f = inspect(bytes(raw))
    assert not f.valid
    assert any("'b.txt'" in p for p in f.problems), f.problems


def test_zip_overlapping_members_are_refused() -> None:
    blob = make_zip([("a", b"A" * 100, STORED)])
    eocd = blob.rindex(b"PK\x05\x06")
    cd_start = struct.unpack_from("<I", blob, eocd + 16)[0]
    cd = blob[cd_start:eocd]
    end = bytearray(blob[eocd:])
    struct.pack_into("<HHI", end, 8, 2, 2, 2 * len(cd))
    f = inspect(blob[:cd_start] + cd + cd + bytes(end))
    assert not f.valid
    assert "member 'a' overlaps member 'a'" in f.problems[0]
    assert f.details["member_count"] == 2


def test_zip_encrypted_unsupported_and_broken_headers() -> None:
    blob = make_zip([("a", b"A" * 100, STORED)])
    eocd = blob.rindex(b"PK\x05\x06")
    cd = struct.unpack_from("<I", blob, eocd + 16)[0]
    enc = bytearray(blob)
    enc[6] |= 1
    enc[cd + 8] |= 1
    f = inspect(bytes(enc))
    assert f.valid and "encrypted" in f.warnings[0]
    assert member(f, "a")["encrypted"] is True and f.details["encrypted_count"] == 1
    d64 = bytearray(blob)
    d64[8] = d64[cd + 10] = 9
    f = inspect(bytes(d64))
    assert f.valid and "deflate64" in f.warnings[0]
    past = bytearray(blob)
    struct.pack_into("<I", past, cd + 20, 10_000)
    f = inspect(bytes(past))
    assert not f.valid and "runs past the end" in f.problems[0]
    renamed = bytearray(blob)
    renamed[30] = ord("b")
    f = inspect(bytes(renamed))
    assert not f.valid and "differs from the central directory" in f.problems[0]
    count = bytearray(blob)
    struct.pack_into("<HH", count, eocd + 8, 3, 3)
    f = inspect(bytes(count))
    assert not f.valid and "end record says 3 members" in f.problems[0]
    nolocal = bytearray(blob)
    nolocal[0:4] = b"XXXX"
    f = inspect_as("zip", bytes(nolocal))
    assert not f.valid and "no local file header at offset 0" in f.problems[0]


def test_zip_bombs_are_refused() -> None:
    zeros = bytes(32 * MiB)
    blob = make_zip([("z", zeros, DEFLATED)])
    with pytest.raises(LimitError, match=r"would expand to \d+ bytes from \d+ \(ratio"):
        inspect(blob, Limits(max_ratio=100, ratio_grace_bytes=MiB))
    with pytest.raises(LimitError, match="max_expanded_bytes"):
        inspect(blob, Limits(max_expanded_bytes=8 * MiB))
    # A member that expands beyond the size its headers declare.
    eocd = blob.rindex(b"PK\x05\x06")
    cd = struct.unpack_from("<I", blob, eocd + 16)[0]
    lying = bytearray(blob)
    struct.pack_into("<I", lying, cd + 24, 1000)
    struct.pack_into("<I", lying, 22, 1000)
    with pytest.raises(LimitError, match="expands beyond its declared 1000 bytes"):
        inspect(bytes(lying))
    # Too many members.
    many = make_zip([(f"m{i}", b"", STORED) for i in range(30)])
    with pytest.raises(LimitError, match="members"):
        inspect(many, Limits(max_members=29))
    assert inspect(many, Limits(max_members=30)).valid


def test_zip_bzip2_bomb_is_bounded_by_the_ratio() -> None:
    zeros = bytes(64 * MiB)
    blob = make_zip([("z", zeros, BZIP2)])
    with pytest.raises(LimitError, match="ratio"):
        inspect(blob, Limits(max_ratio=1000, ratio_grace_bytes=MiB))


def test_zip_sniff() -> None:
    spec = next(s for s in SPECS if s.name == "zip")
    empty = make_zip([])
    assert spec.sniff(Sniff(empty, empty[-64:], len(empty)))
    f = inspect(empty)
    assert f.format == "zip" and f.valid and f.details["member_count"] == 0
    assert not spec.sniff(Sniff(b"PK\x03\x04" + bytes(26), b"", 30))


@st.composite
def zip_entries(draw: st.DrawFn) -> list[tuple[str, bytes, int]]:
    n = draw(st.integers(1, 5))
    return [
        (
            "/".join(draw(st.lists(COMPONENT, min_size=1, max_size=3))) + f"_{i}",
            draw(st.binary(max_size=3000)),
            draw(st.sampled_from([STORED, DEFLATED, BZIP2, LZMA])),
        )
        for i in range(n)
    ]


@given(zip_entries())
@FAST
def test_zip_round_trip(entries: list[tuple[str, bytes, int]]) -> None:
    f = inspect(make_zip(entries))
    assert f.valid, f.problems
    assert names(f) == [e[0] for e in entries]
    for got, (_, data, _m) in zip(f.details["members"], entries, strict=True):
        assert got["size"] == len(data) and got["sha256"] == sha(data)
        assert got["crc32"] == f"{zlib.crc32(data):08x}"


# --- cpio ---------------------------------------------------------------------------------

CPIO_FORMATS = ["newc", "crc", "odc", "bin-le", "bin-be"]


@pytest.mark.parametrize("fmt", CPIO_FORMATS)
def test_cpio_listing(fmt: str) -> None:
    blob = make_cpio(
        fmt,
        [
            (".", b"", 0o40755),
            ("bin", b"", 0o40755),
            ("bin/busybox", b"\x7fELF" + bytes(99), 0o100755),
            ("bin/sh", b"busybox", 0o120777),
            ("dev/console", b"", 0o20600),
            ("init.gz", gzip.compress(b"#!/bin/sh\n"), 0o100644),
        ],
    )
    f = inspect(blob)
    assert f.format == "cpio"
    assert f.valid, f.problems
    assert f.details["cpio_format"] == fmt
    assert names(f) == [".", "bin", "bin/busybox", "bin/sh", "dev/console", "init.gz"]
    assert [m["type"] for m in f.details["members"]] == [
        "dir",
        "dir",
        "file",
        "symlink",
        "other",
        "file",
    ]
    bb = member(f, "bin/busybox")
    assert bb["size"] == 103 and bb["mode"] == 0o755 and bb["sha256"] == sha(b"\x7fELF" + bytes(99))
    assert member(f, "bin/sh")["link_target"] == "busybox"
    assert member(f, "init.gz")["inner"]["details"]["expanded_size"] == 10


def test_cpio_crc_checksum_mismatch() -> None:
    entry = cpio_entry("crc", "file", b"abc", check=(sum(b"abc") + 1))
    f = inspect(entry + cpio_entry("crc", "TRAILER!!!", mode=0))
    assert not f.valid
    assert "member 'file': checksum mismatch" in f.problems[0]


@pytest.mark.parametrize("fmt", ["newc", "odc", "bin-le"])
def test_cpio_path_escapes(fmt: str) -> None:
    blob = make_cpio(
        fmt,
        [("../x", b"1", 0o100644), ("/abs", b"2", 0o100644), ("ln", b"../../etc", 0o120777)],
    )
    f = inspect(blob)
    assert not f.valid
    joined = "\n".join(f.problems)
    assert "member '../x' escapes the extraction directory" in joined
    assert "member '/abs' escapes the extraction directory" in joined
    assert "member 'ln' links to '../../etc'" in joined


def test_cpio_structure_problems() -> None:
    good = make_cpio("newc", [("a", b"abc", 0o100644)], pad=4)
    trailer = len(cpio_entry("newc", "TRAILER!!!", mode=0))
    f = inspect(good[:-trailer])
    assert not f.valid and "without a TRAILER!!! entry" in f.problems[0]
    f = inspect(good[: -trailer + 4])
    assert not f.valid and "truncated" in f.problems[0]
    k = good.index(b"070701", 1)
    bad = good[:k] + b"070799" + good[k + 6 :]
    f = inspect(bad)
    assert not f.valid and "bad magic" in f.problems[0]
    f = inspect_as("cpio", good[:60])
    assert not f.valid and "truncated" in f.problems[0]
    hexbad = bytearray(good)
    hexbad[10] = ord("g")
    f = inspect_as("cpio", bytes(hexbad))
    assert not f.valid and "base-16" in f.problems[0]
    no_nul = cpio_entry("newc", "ab").replace(b"ab\x00", b"abc")
    f = inspect_as("cpio", no_nul + bytes(200))
    assert not f.valid and "NUL-terminated" in f.problems[0]
    hardlinks = (
        cpio_entry("newc", "x", b"", ino=5, nlink=2)
        + cpio_entry("newc", "y", b"", ino=5, nlink=2)
        + cpio_entry("newc", "TRAILER!!!", mode=0)
    )
    f = inspect(hardlinks)
    assert member(f, "y")["type"] == "hardlink" and member(f, "y")["link_target"] == "x"


def test_cpio_concatenation_and_data_after_trailer() -> None:
    first = make_cpio("newc", [("kernel/x86/microcode/a.bin", b"uc", 0o100644)])
    second = make_cpio("newc", [("init", b"#!", 0o100755)])
    f = inspect(first + second)
    assert f.valid and f.details["archive_count"] == 2
    assert names(f) == ["kernel/x86/microcode/a.bin", "init"]
    f = inspect(first + gzip.compress(second))
    assert f.valid
    after = f.details["after_trailer"]
    assert after["format"] == "gzip"
    assert after["details"]["inner"]["details"]["members"][0]["name"] == "init"
    f = inspect(first + b"junk that is not an archive")
    assert f.valid and "unrecognised data after the cpio trailer" in f.warnings[0]


@st.composite
def cpio_entries(draw: st.DrawFn) -> list[tuple[str, bytes, int]]:
    n = draw(st.integers(1, 6))
    out = []
    for i in range(n):
        name = "/".join(draw(st.lists(COMPONENT, min_size=1, max_size=3))) + f"_{i}"
        kind = draw(st.sampled_from(["file", "dir", "symlink"]))
        if kind == "file":
            out.append((name, draw(st.binary(max_size=2000)), 0o100644))
        elif kind == "dir":
            out.append((name, b"", 0o40755))
        else:
            out.append((name, draw(COMPONENT).encode(), 0o120777))
    return out


@given(entries=cpio_entries(), fmt=st.sampled_from(CPIO_FORMATS))
@FAST
def test_cpio_round_trip(entries: list[tuple[str, bytes, int]], fmt: str) -> None:
    f = inspect(make_cpio(fmt, entries))
    assert f.valid, f.problems
    assert names(f) == [e[0] for e in entries]
    for got, (_, data, mode) in zip(f.details["members"], entries, strict=True):
        assert got["mode"] == mode & 0o7777
        if mode & 0o170000 == 0o100000:
            assert got["size"] == len(data) and got["sha256"] == sha(data)
        if mode & 0o170000 == 0o120000:
            assert got["link_target"] == data.decode()


# --- fuzzing ------------------------------------------------------------------------------


def check(data: bytes) -> None:
    for spec in SPECS:
        with contextlib.suppress(ImageError):
            assert isinstance(
                spec.inspect(Source.from_bytes(data), Context(limits=SMALL)), Findings
            )
    with contextlib.suppress(ImageError):
        assert isinstance(inspect(data, SMALL), Findings)


@given(
    st.sampled_from([b"", b"PK\x03\x04", b"070701", b"070707", b"\xc7\x71"]),
    st.binary(max_size=2048),
)
@FUZZ
def test_fuzz_random_bytes(prefix: bytes, data: bytes) -> None:
    check(prefix + data)


VALID = [
    make_tar(
        [("a", "file", b"hello"), ("d", "dir", b""), ("l", "symlink", "a"), ("z", "file", b"Z")],
        tarfile.PAX_FORMAT,
    ),
    make_tar([("n" * 150, "file", b"x" * 600)], tarfile.GNU_FORMAT),
    make_zip([("a", b"hello" * 50, DEFLATED), ("b", b"bz" * 50, BZIP2), ("c", b"c", STORED)]),
    make_zip([("l", b"lzma" * 30, LZMA)]),
    make_cpio("crc", [("a", b"abc", 0o100644), ("s", b"a", 0o120777)], pad=4),
    make_cpio("bin-be", [("a", b"abcde", 0o100644)], pad=4),
    make_cpio("odc", [("a", b"abcde", 0o100644)], pad=4),
]


@given(
    which=st.integers(0, len(VALID) - 1),
    flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), max_size=4),
    cut=st.integers(0, 10**6),
    extra=st.binary(max_size=64),
)
@FUZZ
def test_fuzz_mutated_archives(
    which: int, flips: list[tuple[int, int]], cut: int, extra: bytes
) -> None:
    blob = bytearray(VALID[which])
    for pos, x in flips:
        blob[pos % len(blob)] ^= x
    blob = blob[: max(1, cut % (len(blob) + 1))] + extra
    check(bytes(blob))


# --- cross-checks against the real tools --------------------------------------------------


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    (root / "dir" / "sub").mkdir(parents=True)
    (root / "empty").mkdir()
    (root / "a.txt").write_bytes(b"hello\n")
    (root / "dir" / "big.bin").write_bytes(os.urandom(70_000) + bytes(50_000))
    (root / "dir" / "sub" / ("long-" + "n" * 120 + ".txt")).write_bytes(b"long name")
    (root / "dir" / "link").symlink_to("../a.txt")
    os.link(root / "a.txt", root / "hard.txt")
    (root / "inner.gz").write_bytes(gzip.compress(b"compressed member", mtime=0))
    return root


def tar_tvf(path: Path) -> list[tuple[str, str, int, str | None]]:
    """(type char, name, size, link target) per line of ``tar tvf``."""
    out = run(["tar", "--numeric-owner", "-tvf", path]).stdout.decode()
    rows = []
    for line in out.splitlines():
        perms, _owner, size, _date, _time, rest = line.split(None, 5)
        target = None
        if " -> " in rest:
            rest, target = rest.split(" -> ", 1)
        elif " link to " in rest:
            rest, target = rest.split(" link to ", 1)
        rows.append((perms[0], rest, int(size), target))
    return rows


TYPE_CHAR = {"file": "-", "dir": "d", "symlink": "l", "hardlink": "h", "other": "?"}


@pytest.mark.peer
@pytest.mark.parametrize("fmt", ["gnu", "posix", "ustar"])
def test_peer_tar(tmp_path: Path, tree: Path, fmt: str) -> None:
    need("tar")
    path = tmp_path / f"t-{fmt}.tar"
    members = ["a.txt", "dir", "empty", "hard.txt", "inner.gz"]
    if fmt == "ustar":
        (tree / "dir" / "sub" / ("long-" + "n" * 120 + ".txt")).unlink()
    run(["tar", f"--format={fmt}", "-C", tree, "-cf", path, *members])
    f = inspect(path.read_bytes())
    assert f.format == "tar"
    assert f.valid, f.problems
    rows = tar_tvf(path)
    assert len(rows) == f.details["member_count"]
    for (tchar, name, size, target), m in zip(rows, f.details["members"], strict=True):
        assert m["name"] == name
        assert TYPE_CHAR[m["type"]] == tchar
        assert m["size"] == size
        assert m.get("link_target") == target
    content = {m["name"]: m for m in f.details["members"]}
    assert content["dir/big.bin"]["sha256"] == sha((tree / "dir" / "big.bin").read_bytes())
    assert content["inner.gz"]["inner"]["details"]["expanded_sha256"] == sha(b"compressed member")
    assert f.details["tar_format"] == {"gnu": "gnu", "posix": "pax", "ustar": "ustar"}[fmt]


@pytest.mark.peer
def test_peer_tar_gz_and_sparse(tmp_path: Path, tree: Path) -> None:
    need("tar", "gzip")
    tgz = tmp_path / "t.tar.gz"
    run(["tar", "-C", tree, "-czf", tgz, "."])
    plain = tmp_path / "t.tar"
    plain.write_bytes(run(["gzip", "-dc", tgz]).stdout)
    f = inspect(tgz.read_bytes())
    assert f.valid, f.problems
    assert f.details["inner_format"] == "tar"
    assert f.details["expanded_sha256"] == sha(plain.read_bytes())
    inner_members = f.details["inner"]["details"]["members"]
    assert [m["name"] for m in inner_members] == [r[1] for r in tar_tvf(plain)]
    sparse = tmp_path / "sparse.img"
    with open(sparse, "wb") as out:
        out.truncate(8 * MiB)
        out.seek(4 * MiB)
        out.write(b"data in the middle")
    for fmt in ("gnu", "posix"):
        path = tmp_path / f"s-{fmt}.tar"
        run(["tar", f"--format={fmt}", "--sparse", "-C", tmp_path, "-cf", path, "sparse.img"])
        f = inspect(path.read_bytes())
        assert f.valid, f.problems
        ((_, name, size, _),) = tar_tvf(path)
        m = f.details["members"][0]
        assert (
            (m["name"], m["size"], m["sparse"])
            == (name, size, True)
            == ("sparse.img", 8 * MiB, True)
        )


def unzip_l(path: Path) -> list[tuple[int, str]]:
    out = run(["unzip", "-l", path]).stdout.decode().splitlines()
    dashes = [i for i, line in enumerate(out) if line.startswith("---------")]
    rows = []
    for line in out[dashes[0] + 1 : dashes[1]]:
        size, _date, _time, name = line.split(None, 3)
        rows.append((int(size), name))
    return rows


@pytest.mark.peer
def test_peer_zip(tmp_path: Path, tree: Path) -> None:
    need("zip", "unzip")
    deflated = tmp_path / "d.zip"
    run(["zip", "-q", "-r", "-y", deflated, "."], cwd=tree)
    stored = tmp_path / "s.zip"
    run(["zip", "-q", "-0", "-r", stored, "a.txt", "dir"], cwd=tree)
    for path in (deflated, stored):
        f = inspect(path.read_bytes())
        assert f.valid, f.problems
        names_z1 = run(["unzip", "-Z1", path]).stdout.decode().splitlines()
        assert names(f) == names_z1
        sizes = unzip_l(path)
        assert [(m["size"], m["name"]) for m in f.details["members"]] == sizes
        big = member(f, "dir/big.bin")
        assert big["sha256"] == sha((tree / "dir" / "big.bin").read_bytes())
        assert big["method"] == ("stored" if path == stored else "deflate")
    z64 = tmp_path / "z64.zip"
    run(["zip", "-q", "-fz", z64, "a.txt", "inner.gz"], cwd=tree)
    f = inspect(z64.read_bytes())
    assert f.valid and f.details["zip64"] is True
    assert names(f) == run(["unzip", "-Z1", z64]).stdout.decode().splitlines()
    assert member(f, "inner.gz")["inner"]["details"]["expanded_sha256"] == sha(b"compressed member")
    f = inspect(deflated.read_bytes())
    assert f.details["zip64"] is False
    link = member(f, "dir/link")
    assert (link["type"], link["link_target"]) == ("symlink", "../a.txt")
    # Corrupt a member: unzip -t fails and so do we.
    blob = bytearray(stored.read_bytes())
    blob[blob.index(b"hello\n")] ^= 0x20
    bad = tmp_path / "bad.zip"
    bad.write_bytes(bytes(blob))
    assert subprocess.run(["unzip", "-tq", str(bad)], capture_output=True).returncode != 0
    f = inspect(bytes(blob))
    assert not f.valid and "zip member 'a.txt': CRC-32 mismatch" in f.problems[0]
    blob = bytearray(deflated.read_bytes())
    at = blob.index(b"dir/big.bin") + len("dir/big.bin") + 200
    blob[at] ^= 0xFF
    bad.write_bytes(bytes(blob))
    assert subprocess.run(["unzip", "-tq", str(bad)], capture_output=True).returncode != 0
    assert not inspect(bytes(blob)).valid


def cpio_tv(path: Path) -> list[tuple[str, int, str | None]]:
    out = run(["cpio", "-tv", "--quiet", "-F", path]).stdout.decode()
    rows = []
    for line in out.splitlines():
        parts = line.split(None, 8)
        name, target = parts[8], None
        if " -> " in name:
            name, target = name.split(" -> ", 1)
        rows.append((name, int(parts[4]), target))
    return rows


@pytest.mark.peer
@pytest.mark.parametrize("fmt", ["newc", "crc", "odc", "bin"])
def test_peer_cpio(tmp_path: Path, tree: Path, fmt: str) -> None:
    need("cpio")
    files = run(["find", "."], cwd=tree).stdout
    files = b"\n".join(n for n in files.split(b"\n") if n and b"hard" not in n) + b"\n"
    path = tmp_path / f"a-{fmt}.cpio"
    archive = subprocess.run(
        ["cpio", "-o", "--quiet", "-H", fmt], input=files, cwd=tree, capture_output=True
    )
    assert archive.returncode == 0, archive.stderr
    path.write_bytes(archive.stdout)
    f = inspect(path.read_bytes())
    assert f.format == "cpio"
    assert f.valid, f.problems
    rows = cpio_tv(path)
    assert [(m["name"], m["size"], m.get("link_target")) for m in f.details["members"]] == rows
    assert names(f) == run(["cpio", "-t", "--quiet", "-F", path]).stdout.decode().splitlines()
    assert member(f, "dir/big.bin")["sha256"] == sha((tree / "dir" / "big.bin").read_bytes())
    if fmt == "crc":
        blob = bytearray(path.read_bytes())
        blob[blob.index(b"hello\n")] ^= 0x01
        f = inspect(bytes(blob))
        assert not f.valid and "member 'a.txt': checksum mismatch" in f.problems[0]
        bad = tmp_path / "bad.cpio"
        bad.write_bytes(bytes(blob))
        proc = subprocess.run(
            ["cpio", "-i", "--only-verify-crc", "--quiet", "-F", str(bad)],
            capture_output=True,
            cwd=tmp_path,
        )
        assert b"checksum error" in proc.stderr or proc.returncode != 0


@pytest.mark.peer
def test_peer_cpio_gz_initramfs(tmp_path: Path, tree: Path) -> None:
    need("cpio", "gzip")
    files = b"a.txt\ndir\ndir/big.bin\n"
    archive = subprocess.run(
        ["cpio", "-o", "--quiet", "-H", "newc"], input=files, cwd=tree, capture_output=True
    ).stdout
    blob = subprocess.run(["gzip", "-9"], input=archive, capture_output=True).stdout
    path = tmp_path / "initrd.cpio"
    path.write_bytes(archive)
    f = inspect(blob)
    assert f.valid and f.details["inner_format"] == "cpio"
    listed = [m["name"] for m in f.details["inner"]["details"]["members"]]
    assert listed == run(["cpio", "-t", "--quiet", "-F", path]).stdout.decode().splitlines()
    assert sorted(listed) == ["a.txt", "dir", "dir/big.bin"]


@pytest.mark.peer
def test_peer_tools_agree_on_escapes(tmp_path: Path) -> None:
    need("tar", "unzip")
    evil_tar = tmp_path / "evil.tar"
    evil_tar.write_bytes(make_tar([("../x", "file", b"1"), ("ln", "symlink", "/etc/passwd")]))
    assert ("-", "../x", 1, None) in tar_tvf(evil_tar)
    f = inspect(evil_tar.read_bytes())
    assert "member '../x' escapes the extraction directory" in f.problems[0]
    assert "member 'ln' links to '/etc/passwd'" in f.problems[1]
    evil_zip = tmp_path / "evil.zip"
    evil_zip.write_bytes(make_zip([("../x", b"1", STORED)]))
    assert run(["unzip", "-Z1", evil_zip]).stdout.decode().split() == ["../x"]
    assert not inspect(evil_zip.read_bytes()).valid
