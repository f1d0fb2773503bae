"""Parsers of U-Boot output, against answers captured from Debian's U-Boot 2023.01 in QEMU."""

from __future__ import annotations

import contextlib
import zlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from unbrick.errors import TransportError
from unbrick.transports.uboot import parse as P

pytestmark = pytest.mark.unit

DATA = Path(__file__).parent / "data"


def data(name: str) -> str:
    return (DATA / name).read_bytes().decode()


VERSION_64 = (
    "U-Boot 2023.01+dfsg-2+deb12u3 (Jun 22 2026 - 08:38:07 +0000)\r\n\r\n"
    "aarch64-linux-gnu-gcc (Debian 12.2.0-14) 12.2.0\r\nGNU ld (GNU Binutils for Debian) 2.40\r\n"
)

BDINFO_64 = """\
boot_params = 0x0000000000000000
DRAM bank   = 0x0000000000000000
-> start    = 0x0000000040000000
-> size     = 0x0000000020000000
flashstart  = 0x0000000000000000
flashsize   = 0x0000000004000000
flashoffset = 0x00000000000ed228
baudrate    = 115200 bps
relocaddr   = 0x000000005fef7000
reloc off   = 0x000000005fef7000
Build       = 64-bit
current eth = unknown
ethaddr     = (not set)
IP addr     = <NULL>
lmb_dump_all:
 memory.cnt  = 0x1
 memory[0]\t[0x40000000-0x5fffffff], 0x20000000 bytes flags: 0
 reserved.cnt  = 0x2
 reserved[0]\t[0x5ddb2000-0x5fffffff], 0x0224e000 bytes flags: 0
 reserved[1]\t[0x5edb2930-0x5fffffff], 0x0124d6d0 bytes flags: 0
devicetree  = board
Early malloc usage: 3a8 / 2000
"""

BDINFO_32 = """\
boot_params = 0x00000000
DRAM bank   = 0x00000000
-> start    = 0x40000000
-> size     = 0x20000000
relocaddr   = 0x5ff38000
Build       = 32-bit
"""


def test_version_banner_and_toolchain() -> None:
    v = P.parse_version(VERSION_64)
    assert v.version == "2023.01+dfsg-2+deb12u3"
    assert v.release == "2023.01"
    assert v.build_date == "Jun 22 2026 - 08:38:07 +0000"
    assert v.toolchain[0].startswith("aarch64-linux-gnu-gcc")
    with pytest.raises(P.UBootParseError, match="no 'U-Boot <version>' line"):
        P.parse_version("Unknown command 'version' - try 'help'")


def test_bdinfo_dram_build_and_reserved_memory() -> None:
    b = P.parse_bdinfo(BDINFO_64)
    assert b.dram == ((0x40000000, 0x20000000),)
    assert b.build_bits == 64
    assert b.relocaddr == 0x5FEF7000
    assert b.reserved[0] == (0x5DDB2000, 0x60000000)
    assert b.fields["ethaddr"] == "(not set)"
    assert b.flash_start == 0
    b32 = P.parse_bdinfo(BDINFO_32)
    assert (b32.build_bits, b32.dram) == (32, ((0x40000000, 0x20000000),))


def test_printenv_values_keep_equal_signs_and_skip_errors() -> None:
    env = P.parse_printenv(
        "arch=arm\nbootcmd=run distro_bootcmd; setenv a=b\nserial#=ABC123\n"
        '## Error: "soc" not defined\n\nEnvironment size: 4511/262140 bytes\n'
    )
    assert env == {
        "arch": "arm",
        "bootcmd": "run distro_bootcmd; setenv a=b",
        "serial#": "ABC123",
    }
    with pytest.raises(P.UBootParseError, match="not name=value"):
        P.parse_printenv("this is not an environment")


def test_help_lists_the_commands_of_the_debian_build() -> None:
    commands = P.parse_help(data("help.txt"))
    assert {"loadx", "loady", "crc32", "cmp", "virtio", "nvme", "setexpr", "itest"} <= commands
    assert "md5sum" not in commands and "mmc" not in commands


def test_flinfo_banks_sectors_and_protection() -> None:
    banks = P.parse_flinfo(data("flinfo.txt"))
    assert [b.number for b in banks] == [1, 2]
    b2 = banks[1]
    assert (b2.base, b2.size_bytes, b2.end) == (0x04000000, 32 << 20, 0x06000000)
    assert len(b2.sectors) == 256 and b2.uniform_sector_bytes == 0x20000
    assert b2.command_set == "Intel Extended"
    assert (b2.port_width_bits, b2.chip_width_bits) == (16, 16)
    assert [s.protected for s in b2.sectors[:3]] == [True, True, False]
    assert b2.sector_at(0x04041234) == P.FlashSector(0x04040000, 0x20000, False)
    assert b2.sector_at(0x06000000) is None
    assert banks[0].sectors[7].protected and not banks[0].sectors[8].protected


def test_block_device_info_of_virtio_and_nvme() -> None:
    (v,) = P.parse_blk_info(data("virtio-info.txt"), "virtio")
    assert (v.name, v.block_bytes, v.blocks, v.size_bytes) == ("virtio:0", 512, 81920, 40 << 20)
    assert v.description == "QEMU VirtIO Block Device"
    (n,) = P.parse_blk_info(data("nvme-info.txt"), "nvme")
    assert (n.name, n.blocks) == ("nvme:0", 32768)
    assert "UNB123" in n.description
    assert P.parse_blk_info("", "nvme") == ()


def test_mtd_list() -> None:
    devs = P.parse_mtd_list(data("mtd-list.txt"))
    assert [(d.name, d.type, d.block_bytes, d.size_bytes) for d in devs] == [
        ("nor0", "NOR flash", 0x20000, 0x2000000),
        ("nor1", "NOR flash", 0x20000, 0x2000000),
    ]


def test_mmc_info() -> None:
    info = P.parse_mmc_info(
        "Device: mmc@fe320000\nManufacturer ID: 3\nRd Block Len: 512\n"
        "SD version 3.0\nCapacity: 29.7 GiB\nBus Width: 4-bit\n"
    )
    assert info.read_block_bytes == 512
    assert info.capacity_bytes == int(29.7 * (1 << 30))


def test_crc32_cmp_and_transfer_results() -> None:
    r = P.parse_crc32("crc32 for 40200000 ... 4023ffff ==> d45bdc03")
    assert (r.start, r.length, r.crc) == (0x40200000, 0x40000, 0xD45BDC03)
    c = P.parse_cmp(
        "byte at 0x40201000 (0xa5) != byte at 0x04041000 (0xff)\n"
        "Total of 4096 byte(s) were the same"
    )
    assert (c.same_bytes, c.first_difference) == (4096, (0x40201000, 0xA5, 0x04041000, 0xFF))
    assert P.parse_cmp("Total of 131072 double word(s) were the same").same_bytes == 1 << 20
    t = P.parse_blk_transfer("\nvirtio write: device 0 block # 8, count 8 ... 8 blocks written: OK")
    assert (t.operation, t.block, t.count, t.ok) == ("write", 8, 8, True)
    bad = P.parse_blk_transfer(
        "virtio read: device 0 block # 1048576, count 1 ... -5 blocks read: ERROR"
    )
    assert not bad.ok and bad.done == -5
    load = P.parse_load_result(
        "\x06## Total Size      = 0x00040000 = 262144 Bytes\n## Start Addr      = 0x40200000\n"
    )
    assert (load.size_bytes, load.start) == (262144, 0x40200000)
    assert P.parse_sector_count("\n.. done\nErased 2 sectors", "Erased") == 2
    assert P.parse_sector_count("Un-Protected 2 sectors", "Un-Protected") == 2
    assert P.protected_warning("- Warning: 1 protected sectors will not be erased!\n") == 1
    assert P.split_status("Total of 0 byte(s) were the same\n<rc=1>\n") == (
        "Total of 0 byte(s) were the same",
        1,
    )


def test_error_lines_of_real_failures() -> None:
    text = "\n".join(
        [
            "Unknown command 'foo' - try 'help'",
            "Copy to Flash... Can't write to protected Flash sectors",
            "Error: start address not on sector boundary",
            '## Error: "nosuch" not defined',
            "virtio write: device 0 block # 2147483647, count 1 ... -5 blocks written: ERROR",
            "## Binary (xmodem) download aborted",
            "Copy to Flash... done",
            "virtio write: device 0 block # 8, count 8 ... 8 blocks written: OK",
        ]
    )
    assert len(P.error_lines(text)) == 6
    assert P.error_lines("Total of 4 word(s) were the same\nErased 1 sectors") == []


# -- md dumps ------------------------------------------------------------------------------------

MD_B = (
    "40200000: 41 41 41 41 41 41 41 41 41 41 41 41 41 41 41 41  AAAAAAAAAAAAAAAA\n"
    "40200010: 0a 0a 0a 0a 20 20 3d 3e 7f 20 20 20 20 20 20 20  ....  =>.       \n"
    "40200020: 00 00 00                                         ..."
)
MD_Q = (
    "40200000: 4141414141414141 4141414141414141  AAAAAAAAAAAAAAAA\n"
    "40200010: 3e3d20200a0a0a0a 202020202020207f  ....  =>.       \n"
    "40200020: 0000000000000000                   ........"
)
MD_BYTES = b"A" * 16 + b"\n\n\n\n  =>\x7f       " + b"\0" * 8


def test_md_dumps_of_every_width_give_the_same_bytes() -> None:
    assert P.parse_md(MD_B, start=0x40200000, length=0x23) == MD_BYTES[:0x23]
    assert P.parse_md(MD_Q, start=0x40200000, length=0x28, width=8) == MD_BYTES
    md_l = (
        "40200000: 41414141 41414141 41414141 41414141  AAAAAAAAAAAAAAAA\n"
        "40200010: 0a0a0a0a 3e3d2020 2020207f 20202020  ....  =>.       \n"
        "40200020: 00000000                             ...."
    )
    assert P.parse_md(md_l, start=0x40200000, length=0x24, width=4) == MD_BYTES[:0x24]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (MD_B.replace("40200010", "40200020"), "where 0x40200010 was expected"),
        (MD_B.replace("3d 3e", "3d 3f"), "ASCII column disagrees"),
        (MD_B.replace(" 0a 0a", " 0a0a"), "malformed"),
        (MD_B.rsplit("\n", 1)[0], "showed 32 of 35 bytes"),
        (MD_B + "\n40200023: 00", "more than 35 bytes"),
    ],
)
def test_md_dump_damage_is_a_parse_error(text: str, message: str) -> None:
    with pytest.raises(P.UBootParseError, match=message):
        P.parse_md(text, start=0x40200000, length=0x23)


def format_md(data: bytes, start: int, width: int, byteorder: str = "little") -> str:
    """What U-Boot's print_buffer prints for ``md.<width> start count``."""
    lines = []
    for off in range(0, len(data), 16):
        chunk = data[off : off + 16]
        words = [
            f"{int.from_bytes(chunk[i : i + width], byteorder):0{2 * width}x}"  # type: ignore[arg-type]
            for i in range(0, len(chunk), width)
        ]
        hexpart = " " + " ".join(words)
        full = (16 // width) * (2 * width + 1)
        ascii_col = "".join(chr(b) if 0x20 <= b <= 0x7E else "." for b in chunk)
        lines.append(f"{start + off:08x}:{hexpart.ljust(full)}  {ascii_col}")
    return "\r\n".join(lines) + "\r\n"


@settings(max_examples=150, deadline=None)
@given(
    width=st.sampled_from([1, 2, 4, 8]),
    words=st.integers(min_value=1, max_value=40),
    start_words=st.integers(min_value=0, max_value=1 << 20),
    seed=st.binary(min_size=0, max_size=320),
    order=st.sampled_from(["little", "big"]),
)
def test_md_round_trip(width: int, words: int, start_words: int, seed: bytes, order: str) -> None:
    data = (seed * (words * width // max(1, len(seed)) + 1))[: words * width] or bytes(
        words * width
    )
    start = start_words * width
    text = format_md(data, start, width, order)
    assert P.parse_md(text, start=start, length=len(data), width=width, byteorder=order) == data


@settings(max_examples=60, deadline=None)
@given(a=st.binary(max_size=600), b=st.binary(max_size=3000))
def test_crc32_combine_equals_the_crc_of_the_concatenation(a: bytes, b: bytes) -> None:
    assert P.crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)
    assert P.crc32_of_fill(0xFF, len(b)) == zlib.crc32(b"\xff" * len(b))


_PARSERS = [
    P.parse_version,
    P.parse_help,
    P.parse_printenv,
    P.parse_bdinfo,
    P.parse_flinfo,
    lambda t: P.parse_blk_info(t, "virtio"),
    P.parse_mmc_info,
    P.parse_mtd_list,
    P.parse_crc32,
    P.parse_cmp,
    lambda t: P.parse_md(t, start=0x1000, length=48, width=4),
    P.parse_blk_transfer,
    lambda t: P.parse_sector_count(t, "Erased"),
    P.parse_load_result,
    P.split_status,
    P.error_lines,
]


@settings(max_examples=300, deadline=None)
@given(
    raw=st.one_of(
        st.binary(max_size=400),
        st.text(alphabet="0123456789abcdefABx:=()#.-> \n\r\tUBootdevicTalsm", max_size=400),
    ),
    which=st.integers(min_value=0, max_value=len(_PARSERS) - 1),
)
def test_fuzz_parsers_raise_only_parse_errors(raw: bytes | str, which: int) -> None:
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    try:
        _PARSERS[which](text)
    except P.UBootParseError as e:
        assert isinstance(e, TransportError)
        assert e.message


def test_fuzz_real_answers_cut_short() -> None:
    """Every prefix of a real answer parses or fails with a typed error."""
    for text in (data("flinfo.txt")[:1500], BDINFO_64, MD_B, data("nvme-info.txt")):
        for cut in range(0, len(text), 7):
            for parser in _PARSERS:
                with contextlib.suppress(P.UBootParseError):
                    parser(text[:cut])


# ---------------------------------------------------------------------------------------------
# sf, nand, mtdparts: Debian's QEMU builds lack these commands, so the texts follow U-Boot
# 2023.01's format strings (cmd/sf.c, cmd/nand.c, drivers/mtd/nand/raw/nand_util.c,
# drivers/mtd/spi/spi-nor-core.c, cmd/legacy-mtd-utils.c).

SF_PROBE = "SF: Detected w25q128 with page size 256 Bytes, erase size 4 KiB, total 16 MiB\r\n"
NAND_INFO = (
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
NAND_ERASE = (
    "\r\nNAND erase: device 0 offset 0x180000, size 0x60000\r\n"
    "\rErasing at 0x180000 --  33% complete."
    "\rSkipping bad block at  0x001a0000" + " " * 42 + "\r\n"
    "\rErasing at 0x1c0000 -- 100% complete.\r\nOK\r\n"
)


def test_sf_probe_and_results() -> None:
    info = P.parse_sf_probe(SF_PROBE)
    assert info == P.SpiFlashInfo("w25q128", 256, 4096, 16 << 20)
    odd = P.parse_sf_probe("SF: Detected mx25l6405d with page size 256 Bytes, erase size 64 KiB, "
                           "total 8 MiB, mapped at 0\n")  # fmt: skip
    assert odd.size_bytes == 8 << 20 and odd.erase_bytes == 64 << 10
    with pytest.raises(P.UBootParseError, match="SF: Detected"):
        P.parse_sf_probe(
            "Invalid bus 0 (err=-19)\nFailed to initialize SPI flash at 0:0 (error -19)"
        )
    ok = P.parse_sf_result("device 0 offset 0x0, size 0x10000\nSF: 65536 bytes @ 0x0 Written: OK")
    assert ok == P.SfResult("Written", 65536, 0, True)
    assert P.parse_sf_result("SF: 65536 bytes @ 0 Read: OK").offset == 0
    bad = P.parse_sf_result("SF: 4096 bytes @ 0x1000 Erased: ERROR -22\r\n")
    assert (bad.verb, bad.ok, bad.code) == ("Erased", False, -22)
    with pytest.raises(P.UBootParseError):
        P.parse_sf_result("ERROR: attempting erase past flash size (0x800000)")


def test_nand_info_bad_blocks_and_transfers() -> None:
    (chip,) = P.parse_nand_info(NAND_INFO)
    assert chip == P.NandChipInfo(0, "nand0", 128 << 10, 2048, 64)
    assert P.parse_nand_info("\nno devices available\n") == ()
    with pytest.raises(P.UBootParseError, match="lacks"):
        P.parse_nand_info(NAND_INFO[:60])
    assert P.parse_nand_bad("\r\nDevice 0 bad blocks:\r\n  001a0000\r\n  00500000\r\n") == (
        0x1A0000,
        0x500000,
    )
    assert P.parse_nand_bad("\nDevice 0 bad blocks:\n") == ()
    assert P.parse_nand_bad("MTD device nand0 bad blocks list:\n\t0x00020000\n") == (0x20000,)
    with pytest.raises(P.UBootParseError):
        P.parse_nand_bad("\nDevice 0 bad blocks:\n  zz\n")
    w = P.parse_nand_rw(
        "\r\nNAND write: device 0 offset 0x180000, size 0x50000\r\n"
        "Skip bad block 0x001a0000\r\n 327680 bytes written: OK\r\n"
    )
    assert w == P.NandTransfer("write", 0x50000, True, (0x1A0000,))
    r = P.parse_nand_rw(
        "\nNAND read: device 0 whole chip\nSkipping bad block 0x00500000\n 8 bytes read: OK"
    )
    assert r.operation == "read" and r.skipped == (0x500000,)
    f = P.parse_nand_rw(
        "\nNAND write: device 0 offset 0x180000, size 0x800\n"
        "NAND write to offset 180000 failed -5\n 0 bytes written: ERROR\n"
    )
    assert not f.ok and f.messages == ("NAND write to offset 180000 failed -5",)
    early = P.parse_nand_rw("\nNAND write: Size exceeds partition or device limit\n")
    assert not early.ok and early.messages == ("Size exceeds partition or device limit",)
    with pytest.raises(P.UBootParseError):
        P.parse_nand_rw("\nNAND read: device 0 offset 0x0, size 0x800\n")


def test_nand_erase_output() -> None:
    e = P.parse_nand_erase(NAND_ERASE)
    assert e == P.NandErase(True, (0x1A0000,), 0, 0x1C0000)
    failed = P.parse_nand_erase(
        "\nNAND erase: device 0 offset 0x0, size 0x20000\n\nnand0: MTD Erase failure: -5\n\nOK\n"
    )
    assert failed.ok and failed.failures == 1  # U-Boot says OK after an erase failure
    assert not P.parse_nand_erase("Attempt to erase non block-aligned data\nERROR\n").ok
    with pytest.raises(P.UBootParseError, match="OK or ERROR"):
        P.parse_nand_erase(NAND_ERASE[:-5])


def test_mtdparts_and_mtdids() -> None:
    parts = P.parse_mtdparts(
        "mtdparts=gpmi-nand:4m(boot)ro,0x40000@0x600000(env),-(ubi);spi0.0:512k(u-boot)"
    )
    assert parts["gpmi-nand"] == (
        P.MtdPartition("boot", 0, 4 << 20, True),
        P.MtdPartition("env", 0x600000, 0x40000),
        P.MtdPartition("ubi", 0x640000, None),
    )
    assert parts["spi0.0"] == (P.MtdPartition("u-boot", 0, 512 << 10),)
    assert P.parse_mtdparts("") == {}
    for bad in ("mtdparts=nand0", "nand0:-(a),1m(b)", "nand0:1m(a", "nand0:0(a)", "x:1q(a)"):
        with pytest.raises(P.UBootParseError):
            P.parse_mtdparts(bad)
    assert P.parse_mtdids("nand0=gpmi-nand, nor0=spi0.0") == {
        "nand0": "gpmi-nand",
        "nor0": "spi0.0",
    }
    assert P.parse_mtdids("") == {}
    with pytest.raises(P.UBootParseError):
        P.parse_mtdids("nand0")


@given(
    parts=st.lists(
        st.tuples(
            st.text(alphabet="abcdefgh_-0123456789", min_size=1, max_size=12),
            st.integers(1, 4096),
            st.integers(0, 64),
            st.booleans(),
        ),
        min_size=1,
        max_size=8,
    ),
    fill=st.booleans(),
)
def test_mtdparts_round_trip(parts: list[tuple[str, int, int, bool]], fill: bool) -> None:
    items = []
    expected = []
    pos = 0
    for name, kib, gap_kib, ro in parts:
        start = pos + gap_kib * 1024
        at = f"@0x{start:x}" if gap_kib else ""
        items.append(f"{kib}k{at}({name}){'ro' if ro else ''}")
        expected.append(P.MtdPartition(name, start, kib * 1024, ro))
        pos = start + kib * 1024
    if fill:
        items.append("-(rest)")
        expected.append(P.MtdPartition("rest", pos, None))
    assert P.parse_mtdparts("mtdparts=dev0:" + ",".join(items)) == {"dev0": tuple(expected)}


_MTD_PARSERS = [
    P.parse_sf_probe,
    P.parse_sf_result,
    P.parse_nand_info,
    P.parse_nand_bad,
    P.parse_nand_rw,
    P.parse_nand_erase,
    P.parse_mtdparts,
    P.parse_mtdids,
]


@settings(max_examples=300, deadline=None)
@given(
    raw=st.one_of(
        st.binary(max_size=300),
        st.text(
            alphabet="0123456789abcdefx:=()@,;-+kKmM \n\r\tSFDevicbadytsOKERnwrig", max_size=300
        ),
    ),
    which=st.integers(min_value=0, max_value=len(_MTD_PARSERS) - 1),
)
def test_fuzz_mtd_parsers_raise_only_parse_errors(raw: bytes | str, which: int) -> None:
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    try:
        _MTD_PARSERS[which](text)
    except P.UBootParseError as e:
        assert e.message


def test_fuzz_mtd_answers_cut_short() -> None:
    for text in (SF_PROBE, NAND_INFO, NAND_ERASE, "\nDevice 0 bad blocks:\n  001a0000\n"):
        for cut in range(len(text)):
            for parser in _MTD_PARSERS:
                with contextlib.suppress(P.UBootParseError):
                    parser(text[:cut])


def test_device_digests_of_md5sum_and_hash() -> None:
    md5 = "md5 for 40000000 ... 400000ff ==> 9e107d9d372bb6826bd81d3542a419d6\n"
    res = P.parse_digest("=> md5sum 0x40000000 0x100\n" + md5, "md5")
    assert res == P.DigestResult("md5", 0x40000000, 0x100, "9e107d9d372bb6826bd81d3542a419d6")
    sha = "sha256 for 04040000 ... 0407ffff ==> " + "AB" * 32
    assert P.parse_digest(sha, "sha256").hexdigest == "ab" * 32
    assert P.parse_digest(sha, "sha256").length == 0x40000
    with pytest.raises(P.UBootParseError, match="no sha256 result"):
        P.parse_digest(md5, "sha256")
    with pytest.raises(P.UBootParseError, match="garbled md5 result"):
        P.parse_digest("md5 for 40000000 ... 400000ff ==> 9e107d9d", "md5")
    with pytest.raises(P.UBootParseError, match="no sha1 result"):
        P.parse_digest("Unknown command 'hash' - try 'help'", "sha1")
