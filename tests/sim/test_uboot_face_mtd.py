"""The console face of the SPI NOR and NAND sim kinds: ``sf``, ``nand``, ``mtd``, ``tftpput``.

Expected texts follow U-Boot 2023.01's sources (cmd/sf.c, cmd/nand.c, cmd/mtd.c,
cmd/legacy-mtd-utils.c, drivers/mtd/nand/raw/nand_util.c, net/tftp.c); what lands in flash is
checked in the device's flash file through the SPI face (a clip on the chip), not through the
console that wrote it.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.sim.test_uboot_face import FAST, QUICK, Rig, Term
from unbrick.cli.sim import _standalone, parse_block_list
from unbrick.errors import UsageError
from unbrick.sim.device import decode_env, env_copies
from unbrick.sim.firmware import build_firmware
from unbrick.sim.flash import FlashGeometry, skip_bad_spans
from unbrick.sim.kinds import KINDS, NAND_GEOMETRY, check_bad_blocks, create_device
from unbrick.sim.uboot_face import ConsoleConfig
from unbrick.sim.uboot_mtd import (
    Part,
    check_skip_len,
    memsize,
    mtdparts_partitions,
    mtdparts_text,
    str2off,
)
from unbrick.transports.tftp.server import TftpServer
from unbrick.transports.xymodem_io import FdLink, send_xmodem

KiB = 1024
EB = 128 * KiB  # NAND erase block
FW = 0x180000  # NAND firmware partition
#: Bad blocks of the NAND rig: the second block of the firmware partition and one further on.
BAD = (13, 40)


def rig_for(tmp: Path, kind: str, config: ConsoleConfig = QUICK, **kw: object) -> Rig:
    dev = create_device(kind, tmp / "state", kind, faults=FAST, **kw)  # type: ignore[arg-type]
    return Rig(dev, config)


@pytest.fixture
def spi(tmp_path: Path) -> Iterator[Rig]:
    r = rig_for(tmp_path, "router-spi")
    yield r
    r.close()
    r.device.close()


@pytest.fixture
def nand(tmp_path: Path) -> Iterator[Rig]:
    r = rig_for(tmp_path, "router-nand", bad_blocks=BAD)
    yield r
    r.close()
    r.device.close()


def load(t: Term, address: int, data: bytes) -> None:
    """Put ``data`` in RAM with loadx (unbrick's own XMODEM sender)."""
    t.send(f"loadx {address:x}".encode() + b"\r")
    t.until(b"bps...\r\n")
    send_xmodem(FdLink(t.sock.fileno()), data, settle_s=0.0, pending=t.buf)
    t.buf = b""
    out = t.until(b"\n=> ").decode("latin-1")
    assert f"## Total Size      = 0x{len(data):08x}" in out, out


def image(model: str, version: str, size: int) -> bytes:
    return build_firmware(
        model, version, security_version=1, hw_revisions=("B2",), regions=("EU",), size_bytes=size
    )


def crc(t: Term, address: int, length: int) -> str:
    return t.run(f"crc32 {address:x} {length:x}").split("==> ")[1].strip()


# -- SPI NOR ----------------------------------------------------------------------------------


def test_spi_kind_has_no_cfi_bank_and_sf_needs_a_probe(spi: Rig) -> None:
    t = spi.term()
    banner = t.stop_autoboot().decode()
    assert (
        "Loading Environment from SPIFlash... SF: Detected w25q64jv with page size 256 Bytes, "
        "erase size 64 KiB, total 8 MiB\r\nOK\r\n"
    ) in banner
    assert "Flash:" not in banner
    assert t.run("flinfo") == "\r\nBank # 1: missing or unknown FLASH type\r\n"
    assert t.run("erase all") == "Erase Flash Bank # 1 Can't erase unknown flash type - aborted\r\n"
    assert t.run("md.b 0 10").startswith("00000000: 00 00 00 00")  # nothing mapped at 0
    assert "flashsize   = 0x00000000" in t.run("bdinfo")
    assert t.run("sf read 40200000 0 100") == "No SPI flash selected. Please run `sf probe'\r\n"
    assert t.run("sf probe 1:0") == "Failed to initialize SPI flash at 1:0 (error -19)\r\n"
    assert "Usage:\r\nsf probe [[bus:]cs] [hz] [mode]" in t.run("sf probe x")
    detected = "SF: Detected w25q64jv with page size 256 Bytes, erase size 64 KiB, total 8 MiB\r\n"
    assert t.run("sf probe") == detected
    assert t.run("sf probe 0:0 20000000 0") == detected
    assert t.run("printenv mtdids") == "mtdids=nor0=spi0.0\r\n"
    assert t.run("printenv mtdparts") == (
        "mtdparts=mtdparts=spi0.0:256k(bootloader)ro,128k(env),64k(calibration),"
        "3584k@0x80000(firmware)\r\n"
    )
    names = [line.split()[0] for line in t.run("help").splitlines() if line.strip()]
    assert {"sf", "mtd", "tftpput"} <= set(names) and "nand" not in names


def test_sf_read_write_erase_and_update_reach_the_chip(spi: Rig) -> None:
    t = spi.prompt()
    dev = spi.device
    t.run("sf probe")
    data = random.Random(1).randbytes(0x10000)
    load(t, 0x40200000, data)
    assert t.run("sf erase 400000 +1000") == "SF: 65536 bytes @ 0x400000 Erased: OK\r\n"
    assert t.run("sf write 40200000 400000 10000") == (
        "device 0 offset 0x400000, size 0x10000\r\nSF: 65536 bytes @ 0x400000 Written: OK\r\n"
    )
    assert dev.spi_read(0x400000, 0x10000) == data
    assert t.run("sf read 40400000 400000 10000") == (
        "device 0 offset 0x400000, size 0x10000\r\nSF: 65536 bytes @ 0x400000 Read: OK\r\n"
    )
    assert crc(t, 0x40400000, 0x10000) == f"{zlib.crc32(data):08x}"
    # A partition name stands for its offset (and limits the size).
    out = t.run("sf read 40400000 firmware 40")
    assert out.startswith("device 0 offset 0x80000, size 0x40\r\nSF: 64 bytes @ 0x80000 Read")
    assert "Size exceeds partition or device limit" in t.run("sf read 40400000 env 30000")
    assert t.run("sf read 40400000 nosuch 10").startswith("partition nosuch not found\r\n")
    # update rewrites only the sectors that differ.
    t.run("mw.b 40200000 5a 100")
    out = t.run("sf update 40200000 400000 20000")
    assert out.startswith("device 0 offset 0x400000, size 0x20000\r\n\r")
    assert "131072 bytes written, 0 bytes skipped in " in out
    assert dev.spi_read(0x400000, 0x100) == b"\x5a" * 0x100
    assert dev.spi_read(0x400100, 0x10000 - 0x100) == data[0x100:]
    out = t.run("sf update 40200000 400000 20000")
    assert "\r0 bytes written, 131072 bytes skipped in " in out


def test_sf_refusals_have_u_boots_messages(spi: Rig) -> None:
    t = spi.prompt()
    t.run("sf probe")
    assert (
        t.run("sf erase 7f0000 20000") == "ERROR: attempting erase past flash size (0x800000)\r\n"
    )
    # The erase size rule is enforced by the driver: only the failure code is printed.
    assert t.run("sf erase 1000 1000") == "SF: 4096 bytes @ 0x1000 Erased: ERROR -22\r\n"
    assert t.run("sf erase 401000 1000; echo $?") == (
        "SF: 4096 bytes @ 0x401000 Erased: ERROR -22\r\n1\r\n"
    )
    out = t.run("sf erase 800000 10000")
    assert out.startswith("Offset exceeds device limit\r\nsf - SPI flash sub-system\r\n")
    assert "'zz' is not a number" in t.run("sf read 40200000 0 zz")
    assert t.run("sf frobnicate").startswith("sf - SPI flash sub-system\r\n\r\nUsage:")


def test_sf_write_over_data_that_was_not_erased_ands_the_bits(spi: Rig) -> None:
    t = spi.prompt()
    t.run("sf probe")
    t.run("sf erase 410000 10000")
    t.run("mw.b 40200000 f0 100; sf write 40200000 410000 100")
    t.run("mw.b 40200000 0f 100; sf write 40200000 410000 100")
    assert spi.device.spi_read(0x410000, 0x100) == b"\x00" * 0x100  # NOR: bits only clear


def test_sf_write_fault_stores_a_flipped_bit_that_crc32_shows(tmp_path: Path) -> None:
    r = rig_for(tmp_path, "router-spi", ConsoleConfig(autoboot_delay_s=0.2, corrupt_writes=1))
    try:
        t = r.prompt()
        data = random.Random(2).randbytes(0x8000)
        load(t, 0x40200000, data)
        t.run("sf probe; sf erase 420000 10000")
        out = t.run("sf write 40200000 420000 8000")
        assert out.endswith("Written: OK\r\n")  # SPI NOR does not verify: the write looks good
        t.run("sf read 40400000 420000 8000")
        assert crc(t, 0x40400000, 0x8000) != f"{zlib.crc32(data):08x}"
        stored = r.device.spi_read(0x420000, 0x8000)
        assert sum(a != b for a, b in zip(stored, data, strict=True)) == 1
        # The fault is spent: the next write (after an erase) is good.
        t.run("sf erase 420000 10000; sf write 40200000 420000 8000")
        assert r.device.spi_read(0x420000, 0x8000) == data
    finally:
        r.close()
        r.device.close()


# -- NAND -------------------------------------------------------------------------------------


def test_nand_kind_info_bad_blocks_and_partitions(nand: Rig) -> None:
    t = nand.term()
    banner = t.stop_autoboot().decode()
    assert "NAND:  32 MiB\r\nLoading Environment from NAND... OK\r\n" in banner
    assert t.run("flinfo") == "\r\nBank # 1: missing or unknown FLASH type\r\n"
    assert t.run("nand info") == (
        "\r\nDevice 0: nand0, sector size 128 KiB\r\n"
        "  Page size         2048 b\r\n"
        "  OOB size            64 b\r\n"
        "  Erase size      131072 b\r\n"
        "  ecc strength         8 bits\r\n"
        "  ecc step size      512 b\r\n"
        "  subpagesize       2048 b\r\n"
        "  options       0x40004200\r\n"
        "  bbt options   0x00008000\r\n"
    )
    assert t.run("printenv nand_erasesize nand_writesize") == (
        "nand_erasesize=20000\r\nnand_writesize=800\r\n"
    )
    assert t.run("nand bad") == "\r\nDevice 0 bad blocks:\r\n  001a0000\r\n  00500000\r\n"
    assert t.run("printenv mtdparts") == (
        "mtdparts=mtdparts=sim-nand.0:1024k(bootloader)ro,256k(env),256k(calibration),"
        "31232k(firmware)\r\n"
    )
    out = t.run("mtd list")
    assert out.startswith("List of MTD devices:\r\n* nand0\r\n  - type: NAND flash\r\n")
    assert '  - 0x000000000000-0x000002000000 : "nand0"\r\n' in out
    assert '\t  - 0x000000180000-0x000002000000 : "firmware"\r\n' in out
    assert t.run("mtd bad firmware") == (
        "MTD device firmware bad blocks list:\r\n\t0x00020000\r\n\t0x00380000\r\n"
    )
    assert t.run("mtd bad nosuch") == "MTD device nosuch not found, ret -19\r\n"
    names = [line.split()[0] for line in t.run("help").splitlines() if line.strip()]
    assert {"nand", "mtd", "tftpput"} <= set(names) and "sf" not in names


def test_nand_erase_skips_bad_blocks_and_counts_them(nand: Rig) -> None:
    t = nand.prompt()
    dev = nand.device
    before_bad = dev.spi_read(13 * EB, EB)
    out = t.run("nand erase 180000 60000")
    assert out == (
        "\r\nNAND erase: device 0 offset 0x180000, size 0x60000\r\n"
        "\rErasing at 0x180000 --  33% complete."
        "\rSkipping bad block at  0x001a0000" + " " * 42 + "\r\n"
        "\rErasing at 0x1c0000 -- 100% complete.\r\nOK\r\n"
    )
    assert dev.spi_read(FW, EB) == b"\xff" * EB
    assert dev.spi_read(0x1C0000, EB) == b"\xff" * EB
    assert dev.spi_read(13 * EB, EB) == before_bad  # the bad block was left alone
    assert dev.spi_read(0x1E0000, 16) != b"\xff" * 16  # not in the range: factory data stays
    # .spread does not count the bad block: three good blocks are erased.
    out = t.run("nand erase.spread 180000 60000")
    assert out.count("Erasing at") == 3 and "0x1e0000 -- 100% complete." in out
    assert dev.spi_read(0x1E0000, EB) == b"\xff" * EB
    assert "Attempt to erase non block-aligned data\r\nERROR\r\n" in t.run("nand erase 180800 800")
    assert t.run("nand erase 180000").startswith("nand - NAND sub-system")
    out = t.run("nand erase.chip; echo $?")
    assert out.startswith("\r\nNAND erase.chip: device 0 whole chip\r\n") and out.endswith(
        "OK\r\n0\r\n"
    )


def test_nand_write_and_read_skip_bad_blocks_like_u_boot(nand: Rig) -> None:
    t = nand.prompt()
    dev = nand.device
    data = random.Random(3).randbytes(0x50000)  # two and a half blocks
    load(t, 0x40200000, data)
    t.run("nand erase.part firmware")
    out = t.run("nand write 40200000 180000 50000")
    assert out == (
        "\r\nNAND write: device 0 offset 0x180000, size 0x50000\r\n"
        "Skip bad block 0x001a0000\r\n 327680 bytes written: OK\r\n"
    )
    # Block 12 holds the first block of data, block 13 is bad, 14 and 15 hold the rest.
    assert dev.spi_read(FW, EB) == data[:EB]
    assert dev.spi_read(FW + 2 * EB, 0x30000) == data[EB:]
    assert dev.spi_read(FW + 2 * EB + 0x30000, 0x800) == b"\xff" * 0x800
    out = t.run("nand read 40400000 firmware 50000")
    assert out == (
        "\r\nNAND read: device 0 offset 0x180000, size 0x50000\r\n"
        "Skipping bad block 0x001a0000\r\n 327680 bytes read: OK\r\n"
    )
    assert crc(t, 0x40400000, 0x50000) == f"{zlib.crc32(data):08x}"
    # A partial last page is padded with 0xFF; reading it back gives the data.
    load(t, 0x40200000, data[:0x1234])
    t.run("nand erase 300000 20000")
    assert t.run("nand write 40200000 300000 1234").endswith(" 4660 bytes written: OK\r\n")
    assert dev.spi_read(0x300000, 0x1800) == data[:0x1234] + b"\xff" * (0x1800 - 0x1234)


def test_nand_write_refusals_and_failures(nand: Rig) -> None:
    t = nand.prompt()
    assert t.run("nand write 40200000 180100 800") == (
        "\r\nNAND write: device 0 offset 0x180100, size 0x800\r\n"
        "Attempt to write non page-aligned data\r\n 0 bytes written: ERROR\r\n"
    )
    out = t.run("nand write 40200000 calibration 60000")
    assert out == "\r\nNAND write: Size exceeds partition or device limit\r\n"
    # Three blocks from the chip's last-but-one block run off the chip.
    out = t.run("nand read 40200000 1fc0000 60000")
    assert out == "\r\nNAND read: Size exceeds partition or device limit\r\n"
    # Programming pages that hold other data fails U-Boot's read-back verify.
    t.run("mw.b 40200000 00 800")
    out = t.run("nand write 40200000 180000 800; echo $?")
    assert out.endswith("NAND write to offset 180000 failed -5\r\n 0 bytes written: ERROR\r\n1\r\n")
    assert t.run("nand read.raw 40200000 0 1").endswith("Unknown nand command suffix '.raw'.\r\n")


def test_nand_write_fault_is_caught_by_u_boots_verify(tmp_path: Path) -> None:
    r = rig_for(
        tmp_path,
        "router-nand",
        ConsoleConfig(autoboot_delay_s=0.2, corrupt_writes=1),
        bad_blocks=BAD,
    )
    try:
        t = r.prompt()
        load(t, 0x40200000, random.Random(4).randbytes(0x30000))
        t.run("nand erase 180000 80000")
        out = t.run("nand write 40200000 180000 30000")
        # The flipped bit is in the first block; U-Boot names the offset after it and, as
        # the range spans a bad block, counts the bytes before it.
        assert out.endswith("NAND write to offset 1a0000 failed -5\r\n 0 bytes written: ERROR\r\n")
    finally:
        r.close()
        r.device.close()


def test_mtd_read_write_erase_on_a_partition(nand: Rig) -> None:
    t = nand.prompt()
    dev = nand.device
    data = random.Random(5).randbytes(0x30000)
    load(t, 0x40200000, data)
    assert t.run("mtd erase firmware 0 60000") == (
        "Erasing 0x00000000 ... 0x0005ffff (3 eraseblock(s))\r\n"
        "Skipping bad block at 0x00020000\r\n"
    )
    assert t.run("mtd write firmware 40200000 0 30000") == (
        "Writing 196608 byte(s) (96 page(s)) at offset 0x00000000\r\n"
    )
    assert dev.spi_read(FW, EB) == data[:EB]
    assert dev.spi_read(FW + 2 * EB, 0x10000) == data[EB:]
    assert t.run("mtd read firmware 40400000 0 30000").startswith("Reading 196608 byte(s)")
    assert crc(t, 0x40400000, 0x30000) == f"{zlib.crc32(data):08x}"
    assert t.run("mtd write firmware 40200000 100") == "Offset not aligned with a page (0x800)\r\n"
    assert t.run("mtd erase firmware 0 1000") == "Size not a multiple of a block (0x20000)\r\n"


def test_saveenv_and_env_on_nand_and_spi(nand: Rig, tmp_path: Path) -> None:
    t = nand.prompt()
    t.run("setenv unbrick_test 42")
    assert t.run("saveenv") == (
        "Saving Environment to NAND... Erasing NAND...\r\n"
        "\rErasing at 0x100000 -- 100% complete.\r\nWriting to NAND... OK\r\nOK\r\n"
    )
    cfg = nand.device.config
    newest = max(
        (d for d in (decode_env(nand.device.spi_read(o, EB)) for o in env_copies(cfg)) if d),
        key=lambda d: d[0],
    )
    assert newest[1]["unbrick_test"] == "42"
    r = rig_for(tmp_path / "spi", "router-spi")
    try:
        t2 = r.prompt()
        t2.run("setenv unbrick_test 43")
        out = t2.run("saveenv")
        assert out.startswith("Saving Environment to SPIFlash... Erasing SPI flash...Writing to")
        t2.send(b"reset\r")
        t2.stop_autoboot()
        assert t2.run("printenv unbrick_test") == "unbrick_test=43\r\n"
    finally:
        r.close()
        r.device.close()


def test_firmware_written_around_bad_blocks_boots(nand: Rig) -> None:
    """The technician's way: erase the partition, write the image, reset."""
    t = nand.prompt()
    fw = image("SimRouterNAND", "2.0.0", 300 * KiB)
    load(t, 0x40200000, fw)
    t.run("nand erase.part firmware")
    out = t.run(f"nand write 40200000 firmware {len(fw):x}")
    assert "Skip bad block 0x001a0000" in out and out.endswith("bytes written: OK\r\n")
    t.send(b"reset\r")
    log = t.until(b"login: ", timeout_s=20).decode()
    assert "SimRouterNAND firmware 2.0.0 booted" in log
    assert nand.device.firmware_version == "2.0.0"


# -- tftpput ----------------------------------------------------------------------------------


@pytest.mark.parametrize("blksize", [1468, 512])
def test_tftpput_is_received_by_unbricks_tftp_server(
    spi: Rig, tmp_path: Path, blksize: int
) -> None:
    root = tmp_path / "tftp"
    root.mkdir()
    server = TftpServer(root, host="127.0.0.1", allow_write=True, dally_s=0.2)
    _, port = server.start()
    try:
        t = spi.prompt()
        data = random.Random(blksize).randbytes(3 * 512 * 7)  # a multiple of 512: empty last
        load(t, 0x40200000, data)
        t.run(
            f"setenv ipaddr 127.0.0.1; setenv serverip 127.0.0.1; setenv tftpdstp {port}; "
            f"setenv tftpblocksize {blksize}"
        )
        out = t.run(f"tftpput 40200000 {len(data):x} backup.bin", timeout_s=20)
        lines = out.split("\r\n")
        assert lines[:6] == [
            "Using sim-eth device",
            "TFTP to server 127.0.0.1; our IP address is 127.0.0.1",
            "Filename 'backup.bin'.",
            "Save address: 0x40200000",
            f"Save size:    0x{len(data):x}",
            "Saving: *\b" + "#" * ((len(data) // blksize + 1 + 9) // 10),
        ]
        assert lines[6].startswith("\t ") and lines[6].endswith("/s")
        assert lines[7:] == ["done", f"Bytes transferred = {len(data)} ({len(data):x} hex)", ""]
        assert (root / "backup.bin").read_bytes() == data
        assert t.run("printenv filesize") == f"filesize={len(data):x}\r\n"
        # Errors: the server's refusal, and no server address.
        (root / "backup.bin").chmod(0o444)
        out = t.run(f"tftpput 40200000 {len(data):x} /etc/passwd")
        assert "\r\nTFTP error: '" in out and "Not retrying..." in out
        assert (
            t.run("setenv serverip; tftpput 40200000 10 x") == "*** ERROR: `serverip' not set\r\n"
        )
        assert t.run("tftpput 40200000").startswith("tftpput - TFTP put command")
    finally:
        server.stop()


# -- the kinds, the sim command, the helpers --------------------------------------------------


@pytest.mark.unit
def test_kinds_and_profiles_agree() -> None:
    import tomllib

    root = Path(__file__).resolve().parents[2] / "src/unbrick/data/profiles"
    for kind, name in (
        ("router-spi", "sim-router-spi.toml"),
        ("router-nand", "sim-router-nand.toml"),
    ):
        doc = tomllib.loads((root / name).read_text())
        got = [(r["name"], r["offset"], r["size"]) for r in doc["region"]]
        spec = KINDS[kind]
        assert got == [(r.name, r.offset, r.size) for r in spec.regions]
        assert doc["match"]["model"] == spec.model
        assert doc["storage"]["type"] == spec.geometry.type
    assert KINDS["router-spi"].regions == KINDS["router"].regions
    assert NAND_GEOMETRY.erase_block_bytes == EB and NAND_GEOMETRY.page_bytes == 2048
    nand_doc = tomllib.loads((root / "sim-router-nand.toml").read_text())
    assert nand_doc["storage"]["bad_blocks"] is True


@pytest.mark.unit
def test_bad_block_options_are_checked() -> None:
    assert parse_block_list("40, 13,0x20") == (40, 13, 32)
    assert check_bad_blocks(KINDS["router-nand"], (40, 13, 40)) == (13, 40)
    with pytest.raises(UsageError, match="not a block number"):
        parse_block_list("12,x")
    with pytest.raises(UsageError, match="only NAND has bad blocks"):
        check_bad_blocks(KINDS["router-spi"], (20,))
    with pytest.raises(UsageError, match="region bootloader"):
        check_bad_blocks(KINDS["router-nand"], (3,))
    with pytest.raises(UsageError, match="outside the chip"):
        check_bad_blocks(KINDS["router-nand"], (256,))


def test_sim_command_refuses_bad_blocks_it_cannot_honour(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    common = ["--name", "n", "--registry", str(tmp_path / "reg"), "--state-dir", str(tmp_path)]
    assert _standalone(["router-nand", *common, "--bad-blocks", "2"]) == 2
    assert "region bootloader" in capsys.readouterr().err
    create_device("router-nand", tmp_path, "n", bad_blocks=(20,), power_on=False).close()
    assert _standalone(["router-nand", *common, "--bad-blocks", "21"]) == 2
    assert "made with bad blocks [20], not [21]" in capsys.readouterr().err


@pytest.mark.unit
def test_mtdparts_helpers() -> None:
    chip = 32 << 20
    parts = mtdparts_partitions(
        "mtdparts=sim-nand.0:1m(boot)ro,256k(env),0x40000@0x180000(cal),-(rest)", "sim-nand.0", chip
    )
    assert parts == [
        Part("boot", 0, 1 << 20, True),
        Part("env", 1 << 20, 256 << 10),
        Part("cal", 0x180000, 0x40000),
        Part("rest", 0x1C0000, chip - 0x1C0000),
    ]
    assert mtdparts_partitions("mtdparts=other:1m(x)", "sim-nand.0", chip) == []
    assert mtdparts_partitions("mtdparts=sim-nand.0:1m(x", "sim-nand.0", chip) == []
    assert mtdparts_partitions("mtdparts=sim-nand.0:64m(big)", "sim-nand.0", chip) == []
    assert memsize("2M") == 2 << 20 and memsize("0x10k") == 16 << 10 and memsize("x") is None
    assert str2off("0x1F") == 31 and str2off("1f") == 31 and str2off("") is None
    assert str2off("12g") is None


@given(
    sizes=st.lists(st.integers(1, 64).map(lambda n: n * 64 * KiB), min_size=1, max_size=6),
    gaps=st.lists(st.integers(0, 3).map(lambda n: n * 64 * KiB), min_size=6, max_size=6),
)
@settings(max_examples=60, deadline=None)
def test_mtdparts_text_round_trips(sizes: list[int], gaps: list[int]) -> None:
    parts = []
    pos = 0
    for i, (size, gap) in enumerate(zip(sizes, gaps, strict=False)):
        pos += gap
        parts.append(Part(f"p{i}", pos, size, i == 0))
        pos += size
    chip = pos + 64 * KiB
    assert mtdparts_partitions(mtdparts_text("id0", parts), "id0", chip) == parts


@given(
    bad=st.sets(st.integers(0, 15), max_size=6),
    start_block=st.integers(0, 15),
    page=st.integers(0, 31),
    length=st.integers(0, 6 * 64 * KiB),
)
@settings(max_examples=200, deadline=None)
def test_skip_bad_helpers_agree(bad: set[int], start_block: int, page: int, length: int) -> None:
    """The device's skip-bad read and the console's check_skip_len see the same flash."""
    geo = FlashGeometry(
        "nand", 16 * 64 * KiB, 64 * KiB, page_bytes=2 * KiB, bad_blocks=tuple(sorted(bad))
    )
    offset = start_block * 64 * KiB + page * 2 * KiB
    spans, missing = skip_bad_spans(geo, offset, length)
    used, need_skip = check_skip_len(geo, offset, length)
    assert sum(n for _, n in spans) + missing == length
    if need_skip < 0:
        assert missing > 0
    else:
        assert missing == 0
        end = spans[-1][0] + spans[-1][1] if spans else offset
        assert used == end - offset
        assert (
            need_skip
            == (
                1
                if any(b in bad for b in range(offset // (64 * KiB), -(-end // (64 * KiB))))
                else 0
            )
            or length == 0
        )
    for start, n in spans:
        assert all(
            b not in bad for b in range(start // (64 * KiB), (start + n - 1) // (64 * KiB) + 1)
        )
