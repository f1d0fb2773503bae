"""Sim images in real formats: uImage firmware, bootloader, calibration, manifest; bootm checks."""

from __future__ import annotations

import hashlib
import json
import struct
import tomllib
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from unbrick.errors import UsageError
from unbrick.formats.base import Context, Source
from unbrick.formats.uimage import inspect as inspect_uimage
from unbrick.model.manifest import parse_manifest
from unbrick.sim import firmware as fw

pytestmark = pytest.mark.unit

CHECK = {"min_security_version": 1, "model": "SimRouter", "hw_revision": "B2"}


def image(version: str = "2.0.0", **kw: object) -> bytes:
    args: dict[str, object] = {"security_version": 1, "size_bytes": 64 * 1024, **kw}
    return fw.build_firmware("SimRouter", version, **args)  # type: ignore[arg-type]


def test_firmware_is_a_valid_kernel_uimage_of_the_requested_size() -> None:
    data = image(size_bytes=100_000)
    assert len(data) == 100_000
    f = inspect_uimage(Source.from_bytes(data), Context())
    assert f.problems == []
    d = f.details
    assert (d["type"], d["arch"], d["os"], d["compression"]) == ("kernel", "arm", "linux", "none")
    assert d["name"] == "SimRouter 2.0.0"
    assert d["header_crc_ok"] and d["data_crc_ok"]
    assert d["data_size"] == 100_000 - 64


def test_info_block_layout() -> None:
    data = image(hw_revisions=("B1", "B2"), regions=("EU",))
    assert data[64:72] == b"UBFWINFO"
    (length,) = struct.unpack(">I", data[72:76])
    obj = json.loads(data[76 : 76 + length])
    assert obj == {
        "model": "SimRouter",
        "version": "2.0.0",
        "security_version": 1,
        "hw_revisions": ["B1", "B2"],
        "regions": ["EU"],
    }


def test_versions_differ_throughout_and_builds_are_reproducible() -> None:
    a, b = image("1.0.0"), image("2.0.0")
    assert a == image("1.0.0")
    assert a[-4096:] != b[-4096:]


def test_too_small_a_size_is_refused() -> None:
    with pytest.raises(UsageError, match="needs at least"):
        image(size_bytes=100)


_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=20)


@given(
    model=_text,
    version=_text,
    sv=st.integers(0, 2**31),
    hw=st.lists(_text, max_size=3),
    regions=st.lists(_text, max_size=3),
    panic=st.booleans(),
)
@settings(max_examples=80, deadline=None)
def test_info_round_trip(
    model: str, version: str, sv: int, hw: list[str], regions: list[str], panic: bool
) -> None:
    data = fw.build_firmware(
        model,
        version,
        security_version=sv,
        hw_revisions=tuple(hw),
        regions=tuple(regions),
        size_bytes=2048,
        panic=panic,
    )
    assert fw.read_firmware_info(data) == fw.FirmwareInfo(
        model, version, sv, tuple(hw), tuple(regions), panic
    )


@given(st.binary(max_size=400))
@settings(max_examples=300, deadline=None)
def test_read_firmware_info_never_raises(data: bytes) -> None:
    for blob in (data, image()[:80] + data, fw.IH_MAGIC.to_bytes(4, "big") + bytes(60) + data):
        info = fw.read_firmware_info(blob)
        assert info is None or isinstance(info, fw.FirmwareInfo)


def test_read_firmware_info_of_foreign_data_is_none() -> None:
    assert fw.read_firmware_info(b"\xff" * 4096) is None
    plain = fw.build_uimage(b"no info block here" * 10, name="plain")
    assert fw.read_firmware_info(plain) is None


def test_bootloader_image_and_its_check() -> None:
    boot = fw.build_bootloader("2023.01-sim")
    assert boot.startswith(b"SIMBOOT1")
    assert fw.check_bootloader(boot + b"\xff" * 1000) == ("2023.01-sim", "")
    damaged = bytearray(boot)
    damaged[5000] ^= 0x01
    assert fw.check_bootloader(bytes(damaged)) == (None, "bad CRC")
    assert fw.check_bootloader(b"\xff" * len(boot)) == (None, "bad magic")
    assert fw.check_bootloader(boot[:1000]) == (None, "image longer than its region")
    with pytest.raises(UsageError):
        fw.build_bootloader("")


def test_calibration_round_trip_and_damage() -> None:
    blob = fw.build_calibration({"serial": "S1", "mac": "02:00:00:00:00:01"})
    assert fw.read_calibration(blob + b"\xff" * 100) == {"serial": "S1", "mac": "02:00:00:00:00:01"}
    assert fw.read_calibration(blob[:-1] + bytes([blob[-1] ^ 1])) is None
    assert fw.read_calibration(b"\xff" * 64) is None


def test_manifest_is_read_by_the_manifest_parser() -> None:
    data = image(hw_revisions=("B1", "B2"), regions=("EU", "US"))
    text = fw.manifest_for_image(data, target="firmware", min_bootloader="2023.01")
    doc = tomllib.loads(text)
    assert doc["format"] == "unbrick-manifest-1"
    assert doc["sha256"] == hashlib.sha256(data).hexdigest()
    m = parse_manifest(text.encode(), "fw.bin.toml")
    assert (m.model, m.version, m.security_version) == ("SimRouter", "2.0.0", 1)
    assert (m.hw_revisions, m.regions) == (("B1", "B2"), ("EU", "US"))
    assert (m.min_bootloader, m.target, m.sha256) == ("2023.01", "firmware", doc["sha256"])


def test_manifest_escapes_strings() -> None:
    text = fw.build_manifest_toml(
        model='Odd "model"\\', version="1", security_version=0, target="firmware", sha256="a" * 64
    )
    assert tomllib.loads(text)["model"] == 'Odd "model"\\'
    assert "min_bootloader" not in tomllib.loads(text)


# -- bootm's checks ---------------------------------------------------------------------------


def test_a_good_image_boots() -> None:
    result = fw.check_boot(image() + b"\xff" * 100, **CHECK)  # type: ignore[arg-type]
    assert result.outcome == "boot"
    text = "\n".join(result.lines)
    assert "## Booting kernel from Legacy Image at 82000000 ..." in text
    assert "   Image Name:   SimRouter 2.0.0" in text
    assert "Verifying Checksum ... OK" in text
    assert "Starting kernel ...\n\nSimRouter firmware 2.0.0 booted\n\nlogin:" in text


def _corrupt(data: bytes, pos: int) -> bytes:
    out = bytearray(data)
    out[pos] ^= 0x10
    return bytes(out)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: _corrupt(d, 1), "Bad Magic Number"),
        (lambda d: b"\xff" * len(d), "Wrong Image Format for bootm command"),
        (lambda d: _corrupt(d, 40), "Bad Header Checksum"),
        (lambda d: _corrupt(d, 5000), "Bad Data CRC"),
        (lambda d: d[:3000], "Bad Data CRC"),
    ],
)
def test_each_corruption_gives_its_u_boot_message(mutate: object, message: str) -> None:
    data = mutate(image())  # type: ignore[operator]
    result = fw.check_boot(data, **CHECK)  # type: ignore[arg-type]
    assert result.outcome == "bad"
    assert any(message in line for line in result.lines)
    assert result.lines[-1] == "ERROR: can't get kernel image!"


def _retyped(data: bytes, *, typ: int = 2, arch: int = 2, os_id: int = 5) -> bytes:
    return fw.build_uimage(data[64:], name="x", image_type=typ, arch=arch, os_id=os_id)


def test_wrong_type_and_architecture_are_refused() -> None:
    data = image()
    bad_arch = fw.check_boot(_retyped(data, arch=22), **CHECK)  # type: ignore[arg-type]
    assert "Unsupported Architecture 0x16" in bad_arch.lines
    bad_type = fw.check_boot(_retyped(data, typ=5), **CHECK)  # type: ignore[arg-type]
    assert "Wrong Image Type for bootm command" in bad_type.lines


def test_anti_rollback_refuses_an_older_security_version() -> None:
    result = fw.check_boot(image(security_version=0), **CHECK)  # type: ignore[arg-type]
    assert result.outcome == "bad"
    assert any("anti-rollback" in line for line in result.lines)


def test_panic_images_and_foreign_boards_panic() -> None:
    panic = fw.check_boot(image(panic=True), **CHECK)  # type: ignore[arg-type]
    assert panic.outcome == "panic"
    assert any(line.startswith("Kernel panic - not syncing") for line in panic.lines)
    other = fw.build_firmware("OtherBox", "1", security_version=5, size_bytes=4096)
    assert fw.check_boot(other, **CHECK).outcome == "panic"  # type: ignore[arg-type]
    wrong_rev = image(hw_revisions=("C1",))
    assert fw.check_boot(wrong_rev, **CHECK).outcome == "panic"  # type: ignore[arg-type]


@given(st.binary(max_size=300))
@settings(max_examples=200, deadline=None)
def test_check_boot_never_raises(data: bytes) -> None:
    for blob in (data, image()[:64] + data):
        assert fw.check_boot(blob, **CHECK).outcome in ("bad", "boot", "panic")  # type: ignore[arg-type]


def test_crc_helper_agrees_with_zlib() -> None:
    data = image()
    assert int.from_bytes(data[24:28], "big") == zlib.crc32(data[64:])
