"""Library operations on files: inspect, convert (every path), refusals leave nothing behind."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import json
import lzma
from pathlib import Path

import pytest
import zstandard

from tests.formats.test_elf import Seg, Spec, build
from unbrick.cli.main import main
from unbrick.errors import ImageError, LimitError, SourceError, UsageError
from unbrick.formats import bmap, sparse
from unbrick.formats.base import Context, Limits, Source
from unbrick.ops.images import RawOptions, companion_for, convert_path, inspect_path

pytestmark = pytest.mark.unit

FIRMWARE = hashlib.shake_256(b"firmware").digest(70_000)


def sparse_of(raw: bytes) -> bytes:
    out = io.BytesIO()
    sparse.write_sparse(Source.from_bytes(raw), out, Context())
    return out.getvalue()


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".part"))


@pytest.mark.parametrize("target", ["ihex", "srec", "uf2"])
def test_raw_to_addressed_and_back(tmp_path: Path, target: str) -> None:
    raw = tmp_path / "fw.bin"
    raw.write_bytes(FIRMWARE)
    out = tmp_path / f"fw.{target}"
    rep = convert_path(
        raw,
        out,
        target,
        raw_options=RawOptions(base_address=0x0800_0000, entry=0x0800_0101, family_id=0xE48BFF56),
    )
    assert rep.details["base_address"] == 0x0800_0000
    inspected = inspect_path(out)
    assert inspected.format == target
    assert inspected.valid, inspected.problems
    back = tmp_path / "back.bin"
    rep2 = convert_path(out, back, "raw")
    assert rep2.details["base_address"] == 0x0800_0000
    data = back.read_bytes()
    if target == "uf2":  # the last UF2 block is padded with erased flash
        assert data[: len(FIRMWARE)] == FIRMWARE
        assert set(data[len(FIRMWARE) :]) <= {0xFF}
        assert inspected.details["family_id"].lower() == "0xe48bff56"
    else:
        assert data == FIRMWARE
        assert inspected.details["segments"] == [[0x0800_0000, 0x0800_0000 + len(FIRMWARE)]]
        assert inspected.details["entry_point"] == 0x0800_0101


def test_hex_to_srec_keeps_the_address(tmp_path: Path) -> None:
    raw = tmp_path / "fw.bin"
    raw.write_bytes(FIRMWARE[:1000])
    convert_path(raw, tmp_path / "a.hex", "ihex", raw_options=RawOptions(base_address=0x1000))
    convert_path(tmp_path / "a.hex", tmp_path / "a.srec", "srec")
    report = inspect_path(tmp_path / "a.srec")
    assert report.details["segments"] == [[0x1000, 0x1000 + 1000]]


def test_elf_to_raw_by_physical_address(tmp_path: Path) -> None:
    elf = tmp_path / "fw.elf"
    elf.write_bytes(
        build(Spec(segs=[Seg(paddr=0x2000, data=b"A" * 100), Seg(paddr=0x2100, data=b"B" * 50)]))
    )
    out = tmp_path / "fw.bin"
    rep = convert_path(elf, out, "raw", raw_options=RawOptions(fill=0x00))
    assert rep.source_format == "elf"
    assert out.read_bytes() == b"A" * 100 + bytes(0x100 - 100) + b"B" * 50


@pytest.mark.parametrize(
    ("name", "pack"),
    [
        ("gzip", lambda d: gzip.compress(d, mtime=0)),
        ("xz", lzma.compress),
        ("bzip2", bz2.compress),
        ("zstd", lambda d: zstandard.ZstdCompressor().compress(d)),
    ],
)
def test_compressed_images_expand(tmp_path: Path, name: str, pack: object) -> None:
    disk = bytes(300_000) + FIRMWARE + b"\xff" * 50_000
    cases = {
        "raw": (disk, disk),
        "android-sparse": (sparse_of(disk), disk + bytes(-len(disk) % 4096)),
    }
    for inner, (payload, expected) in cases.items():
        src = tmp_path / f"{inner}.{name}"
        src.write_bytes(pack(payload))  # type: ignore[operator]
        out = tmp_path / f"{inner}.out"
        rep = convert_path(src, out, "raw")
        assert rep.source_format == name
        assert rep.details["inner_format"] == inner
        assert out.read_bytes() == expected


def test_compressed_hex_is_spooled_and_converted(tmp_path: Path) -> None:
    raw = tmp_path / "fw.bin"
    raw.write_bytes(FIRMWARE[:5000])
    convert_path(raw, tmp_path / "fw.hex", "ihex", raw_options=RawOptions(base_address=0x400))
    (tmp_path / "fw.hex.xz").write_bytes(lzma.compress((tmp_path / "fw.hex").read_bytes()))
    rep = convert_path(tmp_path / "fw.hex.xz", tmp_path / "out.bin", "raw", hash_output=True)
    assert rep.details["inner_format"] == "ihex"
    assert rep.details["base_address"] == 0x400
    assert (tmp_path / "out.bin").read_bytes() == FIRMWARE[:5000]
    assert rep.sha256 == hashlib.sha256(FIRMWARE[:5000]).hexdigest()


def test_hex_to_sparse_goes_through_raw(tmp_path: Path) -> None:
    raw = tmp_path / "fw.bin"
    raw.write_bytes(FIRMWARE[:8192])
    convert_path(raw, tmp_path / "fw.hex", "ihex")
    convert_path(tmp_path / "fw.hex", tmp_path / "fw.simg", "sparse")
    report = inspect_path(tmp_path / "fw.simg")
    assert report.format == "android-sparse" and report.details["expanded_size"] == 8192


def test_bomb_is_refused_and_leaves_no_output(tmp_path: Path) -> None:
    src = tmp_path / "bomb.gz"
    src.write_bytes(gzip.compress(bytes(20 << 20), mtime=0))
    out = tmp_path / "bomb.raw"
    with pytest.raises(LimitError):
        convert_path(src, out, "raw", limits=Limits(max_expanded_bytes=1 << 20))
    assert not out.exists()
    assert leftovers(tmp_path) == []


def test_truncated_sparse_is_refused_and_keeps_an_old_output(tmp_path: Path) -> None:
    src = tmp_path / "bad.simg"
    src.write_bytes(sparse_of(FIRMWARE)[:-100])
    out = tmp_path / "out.raw"
    out.write_bytes(b"previous good output")
    with pytest.raises(ImageError):
        convert_path(src, out, "raw")
    assert out.read_bytes() == b"previous good output"
    assert leftovers(tmp_path) == []


def test_unconvertible_format_is_a_usage_error(tmp_path: Path) -> None:
    src = tmp_path / "fw.simg"
    src.write_bytes(sparse_of(FIRMWARE))
    with pytest.raises(UsageError, match="already an Android sparse"):
        convert_path(src, tmp_path / "x", "sparse")
    with pytest.raises(UsageError, match="unknown target"):
        convert_path(src, tmp_path / "x", "vhd")


def test_output_in_a_missing_directory_is_a_source_error(tmp_path: Path) -> None:
    src = tmp_path / "fw.bin"
    src.write_bytes(FIRMWARE)
    with pytest.raises(SourceError):
        convert_path(src, tmp_path / "no" / "such" / "dir" / "x", "sparse")


def test_directory_is_not_an_image(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="directory"):
        inspect_path(tmp_path)


def test_bmap_finds_its_image_beside_it(tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    data = bytearray(1 << 20)
    data[8192:16384] = FIRMWARE[:8192]
    data[600_000:600_100] = b"x" * 100
    img.write_bytes(bytes(data))
    xml = bmap.generate_bmap(Source.from_bytes(bytes(data)), Context())
    bm = tmp_path / "disk.img.bmap"
    bm.write_text(xml)
    assert companion_for(bm) == img
    report = inspect_path(bm)
    assert report.format == "bmap" and report.valid, report.problems
    assert report.details["image_checked"] is True
    data[9000] ^= 1
    img.write_bytes(bytes(data))
    bad = inspect_path(bm)
    assert not bad.valid
    assert any("checksum mismatch for blocks range 2-3" in p for p in bad.problems)
    # An explicit --image wins over the neighbour.
    other = tmp_path / "other.raw"
    other.write_bytes(bytes(len(data)))
    assert not inspect_path(bm, companion=other).valid


def test_cli_convert_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = tmp_path / "fw.bin"
    raw.write_bytes(FIRMWARE[:600])
    uf2 = tmp_path / "fw.uf2"
    args = ["image", "convert", str(raw), "-o", str(uf2), "--to", "uf2", "--json"]
    assert main([*args, "--base", "0x10000000", "--family", "0xe48bff56"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["to"] == "uf2" and out["details"]["base_address"] == 0x1000_0000
    assert main(["image", "convert", str(raw), "-o", str(uf2), "--to", "uf2", "--base", "x"]) == 2
    assert main(["image", "convert", str(raw), "-o", str(uf2), "--to", "raw", "--fill", "300"]) == 2
    bad_bs = ["image", "convert", str(raw), "-o", str(uf2), "--to", "sparse", "--block-size", "6"]
    assert main(bad_bs) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 3 and all(
        line.startswith("unbrick: error: ") for line in err.splitlines()
    )


def test_cli_limits_refusal_exit_code(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "bomb.xz"
    src.write_bytes(lzma.compress(bytes(8 << 20)))
    code = main(["image", "inspect", str(src), "--max-expanded", str(1 << 20)])
    assert code == 9
    assert "decompression bomb" in capsys.readouterr().err
