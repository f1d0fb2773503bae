"""The flashrom driver against the real flashrom and its dummy programmer emulating real chips.

Every assertion about the chip looks at the dummy programmer's image file, which flashrom
writes back when it exits: that file is the chip.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from tests.conftest import need
from tests.flashrom.capture import fmap_image, ifd_image
from unbrick.engine.writer import ImageData, Target, verify_range, write_range
from unbrick.errors import DeviceError, PreflightError, SourceError, UsageError, VerifyError
from unbrick.model.uri import parse_device_uri
from unbrick.tools import ToolResult
from unbrick.transports.base import Capability, FlashErase, FlashRead, FlashWrite, Identify
from unbrick.transports.flashrom import FlashromDriver, FlashromOptions, open_flashrom
from unbrick.transports.flashrom.driver import CHECK_CHIP, CHECK_WRITE_PROTECT
from unbrick.transports.flashrom.layout import find_region
from unbrick.transports.flashrom.runner import FLASHROM, Flashrom

pytestmark = pytest.mark.peer

MiB = 1 << 20
W25Q128 = "W25Q128FV"
MX25L6436_CHIP = "MX25L6436E/MX25L6445E/MX25L6465E/MX25L6473E/MX25L6473F"


@pytest.fixture(autouse=True)
def _flashrom() -> None:
    need("flashrom")


def noise(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def chip_file(tmp_path: Path, size: int, seed: int = 1, name: str = "chip.bin") -> Path:
    path = tmp_path / name
    path.write_bytes(noise(size, seed))
    return path


def uri(emulate: str, image: Path, **extra: str) -> str:
    query = "&".join(
        [f"emulate={emulate}", f"image={image}"] + [f"{k}={v}" for k, v in extra.items()]
    )
    return f"flashrom://dummy?{query}"


def opened(text: str, tmp_path: Path) -> FlashromDriver:
    options = FlashromOptions(workdir=tmp_path / "work")
    return open_flashrom(parse_device_uri(text), options=options)


def test_w25q128_identity(tmp_path: Path) -> None:
    image = chip_file(tmp_path, 16 * MiB)
    with opened(uri(W25Q128, image), tmp_path) as dev:
        assert isinstance(dev, Identify) and isinstance(dev, FlashRead)
        assert isinstance(dev, FlashErase) and isinstance(dev, FlashWrite)
        assert dev.capabilities == {
            Capability.IDENTIFY,
            Capability.READ,
            Capability.ERASE,
            Capability.WRITE,
        }
        ident = dev.identify()
        assert ident.model == "W25Q128.V"
        assert ident.storage is not None
        assert (ident.storage.type, ident.storage.size_bytes) == ("spi-nor", 16 * MiB)
        assert ident.extra["vendor"] == "Winbond" and ident.extra["wp_mode"] == "disabled"
        assert ident.serial == f"dummy:emulate={W25Q128},image={image}"
        assert dev.max_transfer == 16 * MiB


def test_read_twice_compared_then_served_from_the_copy(tmp_path: Path) -> None:
    image = chip_file(tmp_path, 16 * MiB, seed=2)
    with opened(uri(W25Q128, image), tmp_path) as dev:
        assert dev.read_all() == image.read_bytes()
        assert dev.flashrom.stats.runs.get("read") == 2
        assert dev.read(0x123456, 100) == image.read_bytes()[0x123456 : 0x123456 + 100]
        assert dev.flashrom.stats.runs.get("read") == 2  # no flashrom run per read
        result = dev.backup_to(tmp_path / "backup.bin")
        assert (tmp_path / "backup.bin").read_bytes() == image.read_bytes()
        assert result.reads == 2 and result.size_bytes == 16 * MiB


def test_write_verify_and_identical_skip(tmp_path: Path) -> None:
    image = chip_file(tmp_path, 16 * MiB, seed=3)
    new = chip_file(tmp_path, 16 * MiB, seed=4, name="new.bin")
    with opened(uri(W25Q128, image), tmp_path) as dev:
        first = dev.write_region(0, new)
        assert first.verified and not first.identical
        assert image.read_bytes() == new.read_bytes()
        dev.verify_region(0, new)
        again = dev.write_region(0, new)
        assert again.identical and again.verified_by == "identical-skip"
        assert image.read_bytes() == new.read_bytes()
        wrong = bytearray(new.read_bytes()[0x200000:0x201000])
        wrong[0x10] ^= 0xFF
        with pytest.raises(VerifyError) as e:
            dev.verify_region(0x200000, bytes(wrong))
        assert "FAILED at 0x200010" in e.value.message
        assert e.value.ranges[0][0] == 0x200010


def test_one_region_written_through_a_layout_leaves_the_rest_byte_identical(
    tmp_path: Path,
) -> None:
    image = chip_file(tmp_path, 16 * MiB, seed=5)
    before = image.read_bytes()
    with opened(uri(W25Q128, image), tmp_path) as dev:
        assert dev.read(0, 16) == before[:16]  # takes the copy
        data = noise(5000, 6)
        offset = 0x12345  # not aligned to anything: flashrom rewrites the partial blocks
        result = dev.write_region(offset, data)
        assert result.verified
        after = image.read_bytes()
        assert after[offset : offset + 5000] == data
        assert after[:offset] == before[:offset]
        assert after[offset + 5000 :] == before[offset + 5000 :]
        reads = dev.flashrom.stats.runs["read"]
        assert dev.read(0x12000, 0x2000) == after[0x12000:0x14000]
        assert dev.flashrom.stats.runs["read"] == reads + 1  # the written range, read again


def test_engine_writer_and_verifier_use_one_flashrom_write(tmp_path: Path) -> None:
    image = chip_file(tmp_path, 16 * MiB, seed=7)
    before = image.read_bytes()
    payload = noise(300_000, 8)
    source = tmp_path / "payload.bin"
    source.write_bytes(payload)
    with opened(uri(W25Q128, image), tmp_path) as dev, open(source, "rb") as f:
        target = Target("firmware", 0x100000, len(payload), 4096)
        data = ImageData(f, len(payload))
        write_range(dev, target, data)
        assert dev.flashrom.stats.runs.get("write") == 1
        assert "erase" not in dev.flashrom.stats.runs  # held back and written with the data
        assert verify_range(dev, target, data) == "read-back"
        after = image.read_bytes()
        end = 0x100000 + len(payload)
        erased_end = 0x100000 + -(-len(payload) // 4096) * 4096
        assert after[0x100000:end] == payload
        assert after[end:erased_end] == b"\xff" * (erased_end - end)
        assert after[:0x100000] == before[:0x100000]
        assert after[erased_end:] == before[erased_end:]


def test_erase_without_program_is_carried_out(tmp_path: Path) -> None:
    image = chip_file(tmp_path, 16 * MiB, seed=9)
    before = image.read_bytes()
    with opened(uri(W25Q128, image), tmp_path) as dev:
        dev.erase(0x20000, 0x1000)
        dev.erase(0x21000, 0x1000)  # merged with the one before
        assert dev.read(0x20000, 0x2000) == b"\xff" * 0x2000
        assert dev.flashrom.stats.runs["erase"] == 1
    after = image.read_bytes()
    assert after[0x20000:0x22000] == b"\xff" * 0x2000
    assert after[:0x20000] == before[:0x20000] and after[0x22000:] == before[0x22000:]
    with opened(uri(W25Q128, image), tmp_path) as dev:
        dev.erase(0x40000, 0x1000)  # nothing follows: close carries it out
    assert image.read_bytes()[0x40000:0x41000] == b"\xff" * 0x1000


def test_mx25l6436_needs_chip_and_the_error_lists_the_candidates(tmp_path: Path) -> None:
    image = chip_file(tmp_path, 8 * MiB, seed=10)
    with pytest.raises(UsageError) as e:
        opened(uri("MX25L6436", image), tmp_path)
    for name in ("MX25L6405", "MX25L6405D", "MX25L6406E/MX25L6408E", MX25L6436_CHIP):
        assert name in e.value.message
    assert "chip=" in e.value.hint
    with opened(uri("MX25L6436", image, chip=MX25L6436_CHIP), tmp_path) as dev:
        assert dev.identify().model == MX25L6436_CHIP
        assert dev.chip.size_bytes == 8 * MiB
        dev.write_region(0x7FF000, b"end of chip")
        assert image.read_bytes()[0x7FF000 : 0x7FF000 + 11] == b"end of chip"


def test_sst25vf032b(tmp_path: Path) -> None:
    image = chip_file(tmp_path, 4 * MiB, seed=11)
    before = image.read_bytes()
    with opened(uri("SST25VF032B", image), tmp_path) as dev:
        chip = dev.chip
        assert (chip.vendor, chip.name, chip.size_bytes) == ("SST", "SST25VF032B", 4 * MiB)
        assert chip.wp is not None and not chip.wp.supported  # flashrom has no WP for it
        assert dev.read_all() == before
        dev.write_region(0x1000, b"\x00" * 4096)
        assert dev.read(0x1000, 4096) == b"\x00" * 4096
    after = image.read_bytes()
    assert after[0x1000:0x2000] == b"\x00" * 4096
    assert after[:0x1000] == before[:0x1000] and after[0x2000:] == before[0x2000:]


def test_hardware_write_protection_refuses_before_writing(tmp_path: Path) -> None:
    image = chip_file(tmp_path, 16 * MiB, seed=12)
    before = image.read_bytes()
    # WP pin active, status register protect bit and BP0-2 set: all of the chip, locked.
    with opened(uri(W25Q128, image, hwwp="yes", spi_status="0x9c"), tmp_path) as dev:
        wp = dev.wp_status()
        assert wp is not None and wp.locked and (wp.mode, wp.length) == ("hardware", 16 * MiB)
        assert dev.identify().extra["wp_mode"] == "hardware"
        with pytest.raises(PreflightError) as e:
            dev.write_region(0x1000, b"new")
        assert e.value.check_id == CHECK_WRITE_PROTECT
        assert "nothing was written" in e.value.hint
        with pytest.raises(PreflightError):
            dev.erase(0, 4096)
        with pytest.raises(PreflightError):
            dev.program(0, b"x")
        assert "write" not in dev.flashrom.stats.runs and "erase" not in dev.flashrom.stats.runs
    assert image.read_bytes() == before


def test_protection_flashrom_can_lift_is_not_refused(tmp_path: Path) -> None:
    image = chip_file(tmp_path, 16 * MiB, seed=13)
    # Block protection bits set but the status register not locked: flashrom clears them.
    with opened(uri(W25Q128, image, hwwp="yes", spi_status="0x1c"), tmp_path) as dev:
        wp = dev.chip.wp
        assert wp is not None and wp.mode == "disabled" and wp.length == 16 * MiB
        assert dev.write_region(0x3000, b"lifted").verified
    assert image.read_bytes()[0x3000:0x3006] == b"lifted"


def test_spi_blacklist_failures_are_clean_errors(tmp_path: Path) -> None:
    image = chip_file(tmp_path, 16 * MiB, seed=14)
    # Page program refused by the programmer: flashrom erases, cannot write, says so.
    with opened(uri(W25Q128, image, spi_blacklist="02"), tmp_path) as dev:
        with pytest.raises(DeviceError) as e:
            dev.write_region(0x10000, b"never written")
        assert "spi_write_cmd failed" in e.value.message
        assert "may have changed" in e.value.message and "restore the backup" in e.value.hint
    assert image.read_bytes()[0x10000:0x1000D] != b"never written"
    # Reads refused.
    with opened(uri(W25Q128, image, spi_blacklist="03"), tmp_path) as dev:
        with pytest.raises(DeviceError, match="Read operation failed"):
            dev.read_all()
        with pytest.raises(DeviceError):
            dev.verify_region(0, b"x")
    # The ID command refused: no chip to work with.
    with pytest.raises(DeviceError, match="unidentified chip"):
        opened(uri(W25Q128, image, spi_blacklist="9f"), tmp_path)


def test_unexpected_chip_is_refused(tmp_path: Path) -> None:
    image = chip_file(tmp_path, 16 * MiB, seed=15)
    with pytest.raises(PreflightError) as e:
        opened(uri(W25Q128, image, expect="MX25L6436E"), tmp_path)
    assert e.value.check_id == CHECK_CHIP
    assert "W25Q128.V" in e.value.message and "MX25L6436E" in e.value.message
    with opened(uri(W25Q128, image, expect="W25Q128FV"), tmp_path) as dev:
        assert dev.chip.name == "W25Q128.V"
    address = parse_device_uri(uri(W25Q128, image))
    with pytest.raises(PreflightError):
        open_flashrom(address, options=FlashromOptions(expected_chip="SST25VF032B"))


class UnstableRead:
    """flashrom, except that the second whole-chip read comes back with one byte changed."""

    def __init__(self, offset: int) -> None:
        self.offset = offset
        self.reads = 0

    def run(
        self,
        args: Sequence[str],
        *,
        timeout_s: float = 60.0,
        check: bool = True,
        input_bytes: bytes | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
    ) -> ToolResult:
        result = FLASHROM.run(args, timeout_s=timeout_s, check=check)
        if "-r" in args:
            self.reads += 1
            if self.reads == 2:
                out = Path(args[args.index("-r") + 1])
                data = bytearray(out.read_bytes())
                data[self.offset] ^= 0x01
                out.write_bytes(data)
        return result


def test_two_reads_that_differ_name_the_first_differing_offset(tmp_path: Path) -> None:
    image = chip_file(tmp_path, 16 * MiB, seed=16)
    address = parse_device_uri(uri(W25Q128, image))
    dev = open_flashrom(address, flashrom=Flashrom(UnstableRead(0xABCDE)))
    with dev, pytest.raises(VerifyError) as e:
        dev.read(0, 16)
    assert "differ, first at offset 0xabcde" in e.value.message
    assert e.value.ranges == [(0xABCDE, 1)]
    assert "nothing was written" in e.value.hint


def test_fmap_region_restored_alone(tmp_path: Path) -> None:
    image = tmp_path / "chip.bin"
    areas = [(0, 0x10000, "BOOT"), (0x10000, 0x1000, "FMAP"), (0x11000, 0xFEF000, "RW_A")]
    image.write_bytes(fmap_image(16 * MiB, areas, 0x10000))
    with opened(uri(W25Q128, image), tmp_path) as dev:
        regions = dev.read_layout("fmap")
        assert [(r.offset, r.size_bytes, r.name) for r in regions] == areas
        boot = find_region(regions, "BOOT")
        before = image.read_bytes()
        dev.restore_region(boot, noise(0x10000, 17))
        with pytest.raises(UsageError, match="holds 65536"):
            dev.restore_region(boot, b"short")
    after = image.read_bytes()
    assert after[:0x10000] == noise(0x10000, 17)
    assert after[0x10000:] == before[0x10000:]


def test_ifd_regions(tmp_path: Path) -> None:
    image = tmp_path / "chip.bin"
    image.write_bytes(ifd_image(16 * MiB))
    with opened(uri(W25Q128, image), tmp_path) as dev:
        regions = dev.read_layout("ifd")
        assert {r.name: (r.offset, r.size_bytes) for r in regions} == {
            "fd": (0, 0x1000),
            "bios": (0x400000, 0xC00000),
            "me": (0x1000, 0x3FF000),
        }
        with pytest.raises(DeviceError, match="no FMAP"):
            dev.read_layout("fmap")


def test_bad_parameters_and_ranges(tmp_path: Path) -> None:
    image = chip_file(tmp_path, 16 * MiB, seed=18)
    with pytest.raises(UsageError, match="bogus=1"):
        opened(uri(W25Q128, image, bogus="1"), tmp_path)
    with pytest.raises(UsageError, match="has no programmer"):
        opened("flashrom://nosuchprogrammer", tmp_path)
    with opened(uri(W25Q128, image), tmp_path) as dev:
        with pytest.raises(UsageError, match="outside"):
            dev.write_region(16 * MiB - 2, b"abc")
        with pytest.raises(UsageError, match="outside"):
            dev.read(-1, 2)
        work = dev._workdir()
        assert work.is_dir()
    assert not work.exists()  # removed on close


def test_missing_image_file_is_a_source_error(tmp_path: Path) -> None:
    image = chip_file(tmp_path, 16 * MiB, seed=19)
    with opened(uri(W25Q128, image), tmp_path) as dev, pytest.raises(SourceError):
        dev.write_region(0, tmp_path / "absent.bin")
