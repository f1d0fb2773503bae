"""The console face's optional digest commands, ``md5sum`` and ``hash``, against hashlib.

Their output is common/hash.c's ``hash_show``: "ALGO for START ... END ==> HEX", the same line
``crc32`` prints. Debian's QEMU builds lack both commands, so the formats follow U-Boot 2023.01's
sources (cmd/hash.c, cmd/md5sum.c, common/hash.c) rather than captured output.
"""

from __future__ import annotations

import hashlib
import random
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.sim.test_uboot_face import FAST, FW_OFFSET, QUICK, Rig, Term, load_ram
from unbrick.errors import UsageError
from unbrick.sim.kinds import create_device
from unbrick.sim.uboot_face import ConsoleConfig

DATA = random.Random(5).randbytes(0x100)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    dev = create_device("router", tmp_path / "state", "h1", faults=FAST)
    r = Rig(dev, QUICK)
    yield r
    r.close()
    dev.close()


def at_prompt_with_data(rig: Rig) -> Term:
    t = rig.prompt()
    load_ram(t, 0x40000000, DATA)
    return t


def test_md5sum_prints_u_boots_line(rig: Rig) -> None:
    t = at_prompt_with_data(rig)
    md5 = hashlib.md5(DATA).hexdigest()
    assert t.run("md5sum 40000000 100") == f"md5 for 40000000 ... 400000ff ==> {md5}\r\n"
    assert t.run("md5sum 0x40000000 0x80") == (
        f"md5 for 40000000 ... 4000007f ==> {hashlib.md5(DATA[:0x80]).hexdigest()}\r\n"
    )


@pytest.mark.parametrize("algorithm", ["md5", "sha1", "sha256"])
def test_hash_computes_each_algorithm_like_hashlib(rig: Rig, algorithm: str) -> None:
    t = at_prompt_with_data(rig)
    digest = hashlib.new(algorithm, DATA).hexdigest()
    expected = f"{algorithm} for 40000000 ... 400000ff ==> {digest}\r\n"
    assert t.run(f"hash {algorithm} 40000000 100") == expected
    # The algorithm name is not case-sensitive (cmd/hash.c lowers it).
    assert t.run(f"hash {algorithm.upper()} 40000000 100") == expected


def test_hash_crc32_agrees_with_the_crc32_command(rig: Rig) -> None:
    t = at_prompt_with_data(rig)
    line = f"crc32 for 40000000 ... 400000ff ==> {zlib.crc32(DATA):08x}\r\n"
    assert t.run("hash crc32 40000000 100") == line
    assert t.run("crc32 40000000 100") == line


def test_digests_read_flash_addresses_and_unmapped_zeros(rig: Rig) -> None:
    t = rig.prompt()
    dev = rig.device
    length = 0x30000
    on_flash = dev.read(FW_OFFSET, length)
    sha = hashlib.sha256(on_flash).hexdigest()
    assert t.run(f"hash sha256 {FW_OFFSET:x} {length:x}") == (
        f"sha256 for {FW_OFFSET:08x} ... {FW_OFFSET + length - 1:08x} ==> {sha}\r\n"
    )
    assert t.run(f"md5sum {FW_OFFSET:x} {length:x}").endswith(
        f"==> {hashlib.md5(on_flash).hexdigest()}\r\n"
    )
    # Past the end of the 8 MiB bank, nothing is mapped: zeros, as md shows.
    assert t.run("hash sha1 20000000 1000").endswith(
        f"==> {hashlib.sha1(bytes(0x1000)).hexdigest()}\r\n"
    )
    # A range larger than the chunk the console reads at once (1 MiB).
    big = dev.read(0, 0x180000)
    assert t.run("hash sha256 0 180000").endswith(f"==> {hashlib.sha256(big).hexdigest()}\r\n")
    # The empty range: U-Boot prints START ... START-1.
    assert t.run("hash md5 40000000 0") == (
        f"md5 for 40000000 ... 3fffffff ==> {hashlib.md5(b'').hexdigest()}\r\n"
    )


def test_results_are_stored_in_a_variable_or_at_an_address(rig: Rig) -> None:
    t = at_prompt_with_data(rig)
    sha = hashlib.sha256(DATA).digest()
    t.run("hash sha256 40000000 100 digest")
    assert t.run("printenv digest") == f"digest={sha.hex()}\r\n"
    t.run("hash sha256 40000000 100 *40001000")
    dump = t.run("md.b 40001000 20")
    assert "".join(line[10:57].replace(" ", "") for line in dump.splitlines()) == sha.hex()
    md5 = hashlib.md5(DATA).digest()
    t.run("md5sum 40000000 100 sum; md5sum 40000000 100 *40002000")
    assert t.run("printenv sum") == f"sum={md5.hex()}\r\n"
    assert t.run("md.b 40002000 10").split(": ", 1)[1][:47].replace(" ", "") == md5.hex()


def test_verify_is_silent_on_a_match_and_shows_both_digests_on_a_mismatch(rig: Rig) -> None:
    t = at_prompt_with_data(rig)
    sha = hashlib.sha256(DATA).hexdigest()
    wrong = "00" * 32
    assert t.run(f'hash -v sha256 40000000 100 {sha}; echo "<$?>"') == "<0>\r\n"
    t.run("hash sha256 40000000 100 good; hash sha256 40000000 100 *40003000")
    assert t.run('hash -v sha256 40000000 100 good; echo "<$?>"') == "<0>\r\n"
    assert t.run('hash -v sha256 40000000 100 *40003000; echo "<$?>"') == "<0>\r\n"
    assert t.run(f'hash -v sha256 40000000 100 {wrong}; echo "<$?>"') == (
        f"sha256 for 40000000 ... 400000ff ==> {sha} != {wrong} ** ERROR **\r\n<1>\r\n"
    )
    md5 = hashlib.md5(DATA).hexdigest()
    assert t.run(f'md5sum -v 40000000 100 {md5}; echo "<$?>"') == "<0>\r\n"
    assert t.run('md5sum -v 40000000 80 *40002000; echo "<$?>"').startswith(
        f"md5 for 40000000 ... 4000007f ==> {hashlib.md5(DATA[:0x80]).hexdigest()} != "
    )
    assert t.run('hash -v sha1 40000000 100 nosuchvar; echo "<$?>"') == (
        "Expected 40 hex digits in env var\r\n"
        "ERROR: nosuchvar does not contain a valid sha1 sum\r\n<1>\r\n"
    )


def test_unknown_algorithms_and_missing_arguments_print_the_usage(rig: Rig) -> None:
    t = rig.prompt()
    usage = (
        "hash - compute hash message digest\r\n\r\nUsage:\r\n"
        "hash algorithm address count [[*]hash_dest]\r\n"
        "    - compute message digest [save to env var / *address]\r\n"
        "hash -v algorithm address count [*]hash\r\n"
        "    - verify message digest of memory area to immediate value, \r\n"
        "      env var or *address\r\n"
    )
    assert t.run('hash sha3 40000000 100; echo "<$?>"') == (
        "Unknown hash algorithm 'sha3'\r\n" + usage + "<1>\r\n"
    )
    assert t.run("hash sha256 40000000") == usage
    assert t.run("hash -v sha256 40000000 100") == usage
    assert t.run("md5sum 40000000") == (
        "md5sum - compute MD5 message digest\r\n\r\nUsage:\r\n"
        "md5sum address count [[*]sum]\r\n"
        "    - compute MD5 message digest [save to sum]\r\n"
        "md5sum -v address count [*]sum\r\n"
        "    - verify md5sum of memory area\r\n"
    )


def test_help_lists_both_commands(rig: Rig) -> None:
    t = rig.prompt()
    listing = t.run("help")
    assert "hash      - compute hash message digest\r\n" in listing
    assert "md5sum    - compute MD5 message digest\r\n" in listing
    names = [line.split(" ", 1)[0] for line in listing.splitlines()]
    assert names == sorted(names)
    assert t.run("help md5sum").startswith("md5sum - compute MD5 message digest\r\n")


def test_a_u_boot_without_the_digest_commands(tmp_path: Path) -> None:
    dev = create_device("router", tmp_path / "state", "h2", faults=FAST)
    bare = Rig(dev, ConsoleConfig(autoboot_delay_s=0.2, hash_commands=()))
    try:
        t = bare.prompt()
        listing = t.run("help")
        assert "md5sum" not in listing and "hash " not in listing
        assert "crc32     - checksum calculation\r\n" in listing
        assert t.run("md5sum 40000000 100") == "Unknown command 'md5sum' - try 'help'\r\n"
        assert t.run("hash sha256 40000000 100") == "Unknown command 'hash' - try 'help'\r\n"
        assert t.run("crc32 40000000 100").startswith("crc32 for 40000000 ... 400000ff ==> ")
    finally:
        bare.close()
        dev.close()
    dev = create_device("router", tmp_path / "state", "h3", faults=FAST)
    only_hash = Rig(dev, ConsoleConfig(autoboot_delay_s=0.2, hash_commands=("hash",)))
    try:
        t = only_hash.prompt()
        assert t.run("md5sum 40000000 100") == "Unknown command 'md5sum' - try 'help'\r\n"
        assert t.run("hash md5 40000000 100").startswith("md5 for 40000000 ... 400000ff ==> ")
    finally:
        only_hash.close()
        dev.close()


@pytest.mark.unit
def test_unknown_hash_commands_are_a_usage_error() -> None:
    with pytest.raises(UsageError, match="unknown hash commands"):
        ConsoleConfig(hash_commands=("sha256sum",))
    assert ConsoleConfig().hash_commands == ("md5sum", "hash")
