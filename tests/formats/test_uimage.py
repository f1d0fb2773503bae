"""U-Boot legacy images: cross-checks with mkimage/dumpimage, round trips, fuzzing, edge cases."""

from __future__ import annotations

import os
import re
import string
import struct
import subprocess
import time
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import need, run
from unbrick.errors import ImageError
from unbrick.formats import uimage
from unbrick.formats.base import Context, Findings, Limits, Sniff, Source
from unbrick.formats.detect import detect, inspect_source, sniff_source

SMALL = Limits(max_records=100_000, max_seconds=10.0)
EPOCH = 1_700_000_000


def parse(data: bytes) -> Findings:
    return uimage.inspect(Source.from_bytes(data), Context(limits=SMALL))


def build(
    data: bytes,
    *,
    name: bytes = b"test",
    os_id: int = 5,
    arch: int = 2,
    typ: int = 2,
    comp: int = 0,
    load: int = 0x80008000,
    entry: int = 0x80008000,
    timestamp: int = EPOCH,
    size: int | None = None,
    dcrc: int | None = None,
) -> bytes:
    """A uImage written from the layout in U-Boot's image.h, independently of the parser."""
    size = len(data) if size is None else size
    dcrc = zlib.crc32(data) if dcrc is None else dcrc
    fields = [0x27051956, 0, timestamp, size, load, entry, dcrc]
    header = struct.pack(">7I4B32s", *fields, os_id, arch, typ, comp, name)
    hcrc = zlib.crc32(header)
    header = header[:4] + struct.pack(">I", hcrc) + header[8:]
    return header + data


def multi_payload(parts: list[bytes]) -> bytes:
    table = b"".join(struct.pack(">I", len(p)) for p in parts) + bytes(4)
    body = b""
    for i, p in enumerate(parts):
        body += p
        if i != len(parts) - 1:
            body += bytes(-len(p) % 4)
    return table + body


# --- cross-checks with u-boot-tools ------------------------------------------------------


def mkimage_table(flag: str) -> dict[str, str]:
    """short name -> long name, from ``mkimage -<flag> list`` (printed to stderr)."""
    proc = subprocess.run(["mkimage", flag, "list"], capture_output=True, text=True, check=False)
    table: dict[str, str] = {}
    for line in proc.stderr.splitlines():
        m = re.match(r"^\t(\S+)\s+(.+)$", line)
        if m:
            table[m.group(1)] = m.group(2).strip()
    return table


def dumpimage(path: Path) -> dict[str, object]:
    out = run(["dumpimage", "-l", path], env={**os.environ, "TZ": "UTC"}).stdout.decode()
    info: dict[str, object] = {"raw": out, "images": []}
    for line in out.splitlines():
        m = re.match(r"^\s*Image (\d+): (\d+) Bytes", line)
        if m:
            images = info["images"]
            assert isinstance(images, list)
            images.append(int(m.group(2)))
            continue
        if ":" in line:
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    return info


COMBOS = [
    ("arm", "linux", "kernel", "none"),
    ("arm64", "linux", "kernel", "gzip"),
    ("mips", "linux", "kernel", "lzma"),
    ("powerpc", "vxworks", "standalone", "bzip2"),
    ("riscv", "u-boot", "firmware", "lz4"),
    ("x86_64", "linux", "ramdisk", "zstd"),
    ("sandbox", "rtems", "filesystem", "lzo"),
    ("m68k", "openbsd", "ramdisk", "none"),
    ("arm", "efi", "kernel_noload", "none"),
]


@pytest.mark.peer
@pytest.mark.parametrize(("arch", "os_name", "typ", "comp"), COMBOS)
def test_mkimage_images_agree_with_dumpimage(
    tmp_path: Path, arch: str, os_name: str, typ: str, comp: str
) -> None:
    need("mkimage", "dumpimage")
    payload = os.urandom(3001)
    (tmp_path / "data").write_bytes(payload)
    out = tmp_path / "uImage"
    run(
        ["mkimage", "-A", arch, "-O", os_name, "-T", typ, "-C", comp, "-a", "0x80008000",
         "-e", "0x8000800c", "-n", "Name with spaces", "-d", tmp_path / "data", out],
        env={**os.environ, "SOURCE_DATE_EPOCH": str(EPOCH)},
    )  # fmt: skip
    f = parse(out.read_bytes())
    assert f.valid, f.problems
    d = f.details
    assert (d["arch"], d["os"], d["type"], d["compression"]) == (arch, os_name, typ, comp)
    assert d["header_crc_ok"] is True
    assert d["data_crc_ok"] is True
    assert d["timestamp"] == EPOCH

    info = dumpimage(out)
    longs = {k: mkimage_table(k) for k in ("-A", "-O", "-T", "-C")}
    assert info["Image Name"] == d["name"] == "Name with spaces"
    expected_type = (
        f"{longs['-A'][d['arch']]} {longs['-O'][d['os']]} {longs['-T'][d['type']]} "
        f"({longs['-C'][d['compression']]})"
    )
    assert info["Image Type"] == expected_type
    assert str(info["Data Size"]).startswith(f"{d['data_size']} Bytes = ")
    assert d["data_size"] == len(payload)
    assert int(str(info["Load Address"]), 16) == d["load_address"] == 0x80008000
    assert int(str(info["Entry Point"]), 16) == d["entry_point"] == 0x8000800C
    assert info["Created"] == time.asctime(time.gmtime(d["timestamp"]))


@pytest.mark.peer
def test_multi_file_image_lists_the_same_sub_images(tmp_path: Path) -> None:
    need("mkimage", "dumpimage")
    inner = build(os.urandom(100), name=b"inner")
    parts = [inner, os.urandom(1001), os.urandom(7), os.urandom(64)]
    paths = []
    for i, p in enumerate(parts):
        path = tmp_path / f"p{i}"
        path.write_bytes(p)
        paths.append(str(path))
    out = tmp_path / "multi.img"
    run(["mkimage", "-A", "arm", "-O", "linux", "-T", "multi", "-C", "none", "-a", "0",
         "-e", "0", "-n", "multi", "-d", ":".join(paths), out])  # fmt: skip
    f = parse(out.read_bytes())
    assert f.valid, f.problems
    images = f.details["images"]
    assert [i["size"] for i in images] == [len(p) for p in parts]
    assert dumpimage(out)["images"] == [len(p) for p in parts]
    assert images[0]["format"] == "uimage"
    assert images[1]["format"] == "raw"
    data = out.read_bytes()
    for img, part in zip(images, parts, strict=True):
        assert data[img["offset"] : img["offset"] + img["size"]] == part


@pytest.mark.peer
def test_script_image_has_one_sub_image(tmp_path: Path) -> None:
    need("mkimage")
    script = b"echo hello\nsetenv bootargs console=ttyS0\n"
    (tmp_path / "boot.cmd").write_bytes(script)
    out = tmp_path / "boot.scr"
    run(["mkimage", "-A", "arm", "-T", "script", "-C", "none", "-d", tmp_path / "boot.cmd", out])
    f = parse(out.read_bytes())
    assert f.valid
    assert f.details["type"] == "script"
    (img,) = f.details["images"]
    assert out.read_bytes()[img["offset"] :] == script


@pytest.mark.peer
def test_corrupt_data_is_refused_by_dumpimage_and_by_us(tmp_path: Path) -> None:
    need("mkimage", "dumpimage")
    (tmp_path / "data").write_bytes(os.urandom(2000))
    out = tmp_path / "uImage"
    run(["mkimage", "-A", "arm", "-O", "linux", "-T", "kernel", "-C", "none", "-a", "0x1000",
         "-e", "0x1000", "-n", "k", "-d", tmp_path / "data", out])  # fmt: skip
    assert "Image Name:   k" in dumpimage(out)["raw"]  # type: ignore[operator]
    data = bytearray(out.read_bytes())
    data[64 + 1234] ^= 0x40
    out.write_bytes(data)
    # dumpimage checks both CRCs before it treats a file as a legacy image; with a bad data
    # CRC it no longer lists it as one.
    assert "Image Name:" not in str(dumpimage(out)["raw"])
    f = parse(bytes(data))
    assert f.details["header_crc_ok"] is True
    assert f.details["data_crc_ok"] is False
    assert any("data CRC mismatch" in p for p in f.problems)


@pytest.mark.peer
@given(
    name=st.text(string.ascii_letters + string.digits + "-_.", min_size=1, max_size=31).map(
        str.encode
    ),
    load=st.integers(0, 0xFFFFFFFF),
    entry=st.integers(0, 0xFFFFFFFF),
    data=st.binary(min_size=1, max_size=2000),
    comp=st.sampled_from([0, 1, 2, 3, 4, 5, 6]),
)
@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_dumpimage_accepts_what_our_builder_writes(
    tmp_path: Path, name: bytes, load: int, entry: int, data: bytes, comp: int
) -> None:
    need("dumpimage")
    path = tmp_path / "built.img"
    path.write_bytes(build(data, name=name, load=load, entry=entry, comp=comp))
    info = dumpimage(path)
    f = parse(path.read_bytes())
    assert f.valid
    assert info["Image Name"] == f.details["name"] == name.decode()
    assert int(str(info["Load Address"]), 16) == load == f.details["load_address"]
    assert int(str(info["Entry Point"]), 16) == entry == f.details["entry_point"]
    assert str(info["Image Type"]).endswith(f"({mkimage_table('-C')[uimage.COMPRESSIONS[comp]]})")


# --- round trips ---------------------------------------------------------------------------


@given(
    name=st.binary(max_size=32).map(lambda b: b.replace(b"\0", b"x")),
    os_id=st.integers(0, 255),
    arch=st.integers(0, 255),
    typ=st.integers(0, 255).filter(lambda t: t not in (4, 6)),
    comp=st.integers(0, 255),
    load=st.integers(0, 0xFFFFFFFF),
    entry=st.integers(0, 0xFFFFFFFF),
    timestamp=st.integers(0, 0xFFFFFFFF),
    data=st.binary(max_size=3000),
)
@settings(max_examples=200, deadline=None)
def test_round_trip(
    name: bytes,
    os_id: int,
    arch: int,
    typ: int,
    comp: int,
    load: int,
    entry: int,
    timestamp: int,
    data: bytes,
) -> None:
    blob = build(
        data, name=name, os_id=os_id, arch=arch, typ=typ, comp=comp, load=load, entry=entry,
        timestamp=timestamp,
    )  # fmt: skip
    sn = Sniff(head=blob[:65536], tail=blob[-64:], size=len(blob))
    assert uimage.sniff(sn)
    f = parse(blob)
    assert f.valid, f.problems
    d = f.details
    assert d["name"] == name.decode("utf-8", "replace")
    assert (d["os_id"], d["arch_id"], d["type_id"], d["compression_id"]) == (
        os_id, arch, typ, comp,
    )  # fmt: skip
    assert d["type"] == uimage.TYPES.get(typ, f"unknown({typ})")
    assert d["arch"] == uimage.ARCHES.get(arch, f"unknown({arch})")
    assert (d["load_address"], d["entry_point"], d["timestamp"]) == (load, entry, timestamp)
    assert d["data_size"] == len(data)
    assert d["header_crc_ok"] and d["data_crc_ok"]


@given(parts=st.lists(st.binary(min_size=1, max_size=300), min_size=1, max_size=6))
@settings(max_examples=100, deadline=None)
def test_multi_round_trip(parts: list[bytes]) -> None:
    blob = build(multi_payload(parts), typ=4)
    f = parse(blob)
    assert f.valid, f.problems
    got = [blob[i["offset"] : i["offset"] + i["size"]] for i in f.details["images"]]
    assert got == parts


# --- fuzzing ---------------------------------------------------------------------------------


def parse_or_error(data: bytes) -> Findings | None:
    try:
        return parse(data)
    except ImageError:
        return None


@given(st.binary(max_size=600))
@settings(max_examples=300, deadline=None)
def test_fuzz_random_bytes(data: bytes) -> None:
    result = parse_or_error(struct.pack(">I", 0x27051956) + data)
    assert result is None or isinstance(result, Findings)
    assert isinstance(uimage.sniff(Sniff(head=data, tail=data[-64:], size=len(data))), bool)


VALID_MULTI = build(multi_payload([b"abc", os.urandom(50), b"\x7fELF" + bytes(60)]), typ=4)


@given(
    data=st.just(VALID_MULTI),
    flips=st.lists(
        st.tuples(st.integers(0, len(VALID_MULTI) - 1), st.integers(1, 255)), max_size=6
    ),
    cut=st.integers(0, len(VALID_MULTI)),
    extra=st.binary(max_size=40),
)
@settings(max_examples=300, deadline=None)
def test_fuzz_mutations(data: bytes, flips: list[tuple[int, int]], cut: int, extra: bytes) -> None:
    buf = bytearray(data)
    for pos, x in flips:
        buf[pos] ^= x
    mutated = bytes(buf[:cut]) + extra
    result = parse_or_error(mutated)
    # Any change to the bytes the CRCs cover must be caught; a trailing extension is fine.
    if result is not None and mutated[: len(data)] != data:
        assert not result.valid
    if result is not None and mutated == data:
        assert result.valid


# --- edge cases ---------------------------------------------------------------------------------


def test_detection_picks_uimage() -> None:
    blob = build(os.urandom(500))
    assert detect(sniff_source(Source.from_bytes(blob))).name == "uimage"
    assert inspect_source(Source.from_bytes(blob)).format == "uimage"


def test_short_header_is_an_error() -> None:
    with pytest.raises(ImageError, match="truncated"):
        parse(build(b"data")[:40])


def test_wrong_magic_is_an_error() -> None:
    with pytest.raises(ImageError, match="magic"):
        parse(b"\0" * 64 + b"data")


def test_truncated_data_is_a_problem() -> None:
    blob = build(os.urandom(1000))[:600]
    f = parse(blob)
    assert f.details["data_crc_ok"] is False
    assert f.details["header_crc_ok"] is True
    assert f.problems == [
        "image data truncated: header says 1000 bytes, file has 536 after the header"
    ]


def test_bad_header_crc_is_a_problem_and_still_sniffed() -> None:
    blob = bytearray(build(b"payload"))
    blob[8] ^= 1  # timestamp
    f = parse(bytes(blob))
    assert f.details["header_crc_ok"] is False
    assert f.details["data_crc_ok"] is True
    assert len(f.problems) == 1 and "header CRC mismatch" in f.problems[0]
    assert uimage.sniff(Sniff(head=bytes(blob), tail=b"", size=len(blob)))


def test_bad_header_crc_with_implausible_ids_is_not_sniffed() -> None:
    blob = bytearray(build(b"payload"))
    blob[4] ^= 1
    blob[28:32] = b"\xff\xff\xff\xff"
    assert not uimage.sniff(Sniff(head=bytes(blob), tail=b"", size=len(blob)))


def test_bad_data_crc_is_a_problem() -> None:
    f = parse(build(b"payload", dcrc=0x12345678))
    assert f.details["data_crc_ok"] is False
    assert "data CRC mismatch: stored 0x12345678" in f.problems[0]


def test_trailing_bytes_are_a_warning() -> None:
    f = parse(build(b"payload") + b"\xff" * 100)
    assert f.valid
    assert f.warnings == ["100 bytes follow the image data"]


def test_unknown_ids_are_named_unknown() -> None:
    f = parse(build(b"x", os_id=200, arch=201, typ=202, comp=203))
    d = f.details
    assert (d["os"], d["arch"], d["type"], d["compression"]) == (
        "unknown(200)", "unknown(201)", "unknown(202)", "unknown(203)",
    )  # fmt: skip


def test_multi_without_terminator_is_a_problem() -> None:
    f = parse(build(struct.pack(">3I", 4, 4, 4), typ=4))
    assert any("no zero terminator" in p for p in f.problems)
    assert f.details["images"] == []


def test_multi_sub_image_past_data_is_a_problem() -> None:
    payload = struct.pack(">II", 100, 0) + b"short"
    f = parse(build(payload, typ=4))
    assert any("sub-image 0 (100 bytes at offset 72) extends past" in p for p in f.problems)


def test_multi_leftover_bytes_are_a_warning() -> None:
    f = parse(build(multi_payload([b"abcd"]) + b"tail", typ=4))
    assert f.valid
    assert f.warnings == ["4 bytes of image data follow the last sub-image"]


def test_huge_multi_table_is_refused() -> None:
    payload = struct.pack(">I", 1) * 20000  # never terminated
    f = parse(build(payload, typ=4))
    assert f.problems == ["sub-image size table lists more than 4096 entries"]
    assert f.details["images"] == []


def test_payload_format_is_detected() -> None:
    inner = build(b"inner")
    f = parse(build(inner))
    assert f.details["payload_format"] == "uimage"


def test_details_are_json_serialisable() -> None:
    import json

    f = parse(build(multi_payload([b"a", b"b"]), typ=4))
    json.dumps(f.details)
