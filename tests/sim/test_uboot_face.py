"""The simulator's U-Boot console face, driven over a raw socket like a terminal.

Expected strings marked "real" were printed by Debian's U-Boot 2023.01 (qemu_arm64/qemu_arm in
QEMU 7.2) for the same commands on the same memory contents; only formats that do not depend on
the board are compared byte for byte.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import need
from unbrick.sim.device import Faults, SimDevice, decode_env, env_copies
from unbrick.sim.firmware import build_firmware
from unbrick.sim.kinds import create_device
from unbrick.sim.server import SimServer
from unbrick.sim.uboot_face import (
    ConsoleConfig,
    SparseRam,
    dump_lines,
    expand_words,
    parse_hex,
    size_text,
    split_commands,
)
from unbrick.sim.ymodem_rx import (
    ReceiveError,
    ReceiveTiming,
    crc16,
    parse_header,
    receive,
    strip_sub_padding,
)
from unbrick.transports.sim import RegistryEntry, read_registry, write_registry
from unbrick.transports.xymodem_io import FdLink, send_xmodem, send_ymodem

ROOT = Path(__file__).resolve().parents[2]
FAST = Faults(power_on_delay_s=0.01)
QUICK = ConsoleConfig(autoboot_delay_s=0.2, xmodem_poll_s=0.1, xmodem_timeout_s=5.0)
FW_OFFSET = 0x80000


def peer_tftpd() -> str:
    """tftpd-hpa's server: unpacked beside atftpd in .peers, or on PATH (atftpd installs an
    ``in.tftpd`` link to itself, which does not count)."""
    local = ROOT / ".peers/usr/sbin/in.tftpd"
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    found = shutil.which("in.tftpd")
    if found and Path(found).resolve().name != "atftpd":
        return found
    msg = "peer program 'in.tftpd' is not installed (run ./scripts/install-deps)"
    if os.environ.get("CI"):
        pytest.fail(msg)
    pytest.skip(msg)


class Term:
    """A terminal on the console port."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5.0)
        self.buf = b""

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def until(self, marker: bytes, timeout_s: float = 10.0) -> bytes:
        """Everything up to and including ``marker``."""
        deadline = time.monotonic() + timeout_s
        while marker not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {marker!r} in {self.buf[-400:]!r}")
            ready, _, _ = select.select([self.sock], [], [], left)
            if ready:
                data = self.sock.recv(65536)
                if not data:
                    raise ConnectionError(f"closed; got {self.buf[-400:]!r}")
                self.buf += data
        cut = self.buf.index(marker) + len(marker)
        out, self.buf = self.buf[:cut], self.buf[cut:]
        return out

    def closed(self, timeout_s: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.sock], [], [], 0.1)
            if ready:
                try:
                    data = self.sock.recv(65536)
                except ConnectionResetError:
                    return True
                if not data:
                    return True
                self.buf += data
        return False

    def stop_autoboot(self) -> bytes:
        banner = self.until(b"Hit any key to stop autoboot: ")
        self.send(b"\x03")
        return banner + self.until(b"=> ")

    def raw(self, data: bytes, timeout_s: float = 10.0) -> bytes:
        """Send ``data`` and return everything up to the next prompt (echo included)."""
        self.send(data)
        return self.until(b"\n=> ", timeout_s) if data != b"\x03" else self.until(b"=> ")

    def run(self, line: str, timeout_s: float = 10.0) -> str:
        """Run ``line``; its output, echo and prompt removed, with ``\\r\\n`` kept."""
        out = self.raw(line.encode() + b"\r", timeout_s)
        echo = line.encode() + b"\r\n"
        assert out.startswith(echo), out[:200]
        return out[len(echo) : -len(b"=> ")].decode()


class Rig:
    def __init__(self, device: SimDevice, config: ConsoleConfig) -> None:
        self.device = device
        self.server = SimServer(device, console=config)
        self.ports = self.server.start()
        self.terms: list[Term] = []

    def term(self) -> Term:
        t = Term(self.ports.console_port)
        self.terms.append(t)
        return t

    def prompt(self) -> Term:
        """A terminal at the prompt (autoboot interrupted)."""
        t = self.term()
        t.stop_autoboot()
        return t

    def close(self) -> None:
        for t in self.terms:
            t.close()
        self.server.stop()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    dev = create_device("router", tmp_path / "state", "c1", faults=FAST)
    r = Rig(dev, QUICK)
    yield r
    r.close()
    dev.close()


def image(version: str, size: int = 128 * 1024) -> bytes:
    return build_firmware(
        "SimRouter",
        version,
        security_version=1,
        hw_revisions=("B2",),
        regions=("EU",),
        size_bytes=size,
    )


def load_ram(term: Term, address: int, data: bytes) -> None:
    """Put ``data`` in RAM with mw.l (no transfer protocol involved)."""
    padded = data + b"\0" * (-len(data) % 4)
    words = [int.from_bytes(padded[i : i + 4], "little") for i in range(0, len(padded), 4)]
    cmds = [f"mw.l {address + 4 * i:x} {w:08x}" for i, w in enumerate(words)]
    for pos in range(0, len(cmds), 20):
        term.run("; ".join(cmds[pos : pos + 20]))


def sx_send(term: Term, command: str, program: list[str]) -> tuple[bytes, str]:
    """Start ``command`` (loadx/loady), hand the socket to ``program``; (ready line, output)."""
    term.send(command.encode() + b"\r")
    ready = term.until(b"bps...\r\n")
    assert term.buf == b"" or term.buf.startswith(b"C")
    term.sock.setblocking(True)  # lrzsz needs a blocking descriptor
    proc = subprocess.run(
        program,
        stdin=term.sock.fileno(),
        stdout=term.sock.fileno(),
        stderr=subprocess.PIPE,
        timeout=60,
        check=False,
    )
    term.sock.settimeout(5.0)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-500:]
    term.buf = b""
    rest = term.until(b"\n=> ").decode("latin-1")
    return ready, rest[rest.index("## ") :]


# -- power-on, autoboot, prompt --------------------------------------------------------------


def test_banner_then_a_key_stops_autoboot_at_the_prompt(rig: Rig) -> None:
    assert rig.device.state == "firmware"  # the boot chain ran; the console plays it
    t = rig.term()
    banner = t.until(b"Hit any key to stop autoboot: ").decode()
    assert banner.startswith("SimROM 1.0 (SimRouter)\r\n")
    assert re.search(
        r"\r\n\r\nU-Boot 2023\.01-sim \(\w{3} \d\d \d{4} - \d\d:\d\d:\d\d \+0000\)\r\n\r\n", banner
    )
    assert "\r\nDRAM:  128 MiB\r\nFlash: 8 MiB\r\n" in banner
    assert "Loading Environment from Flash... OK\r\nIn:    serial\r\n" in banner
    assert "\n" not in banner.replace("\r\n", "")
    t.send(b"\x03")
    # real: b'  2 \x08\x08\x08 0 \r\n=> '
    assert t.until(b"=> ") == b" 2 \x08\x08\x08 0 \r\n=> "
    assert rig.device.state == "bootloader"  # the generic face sees it in U-Boot too
    assert t.run("echo ok") == "ok\r\n"


def test_left_alone_it_autoboots_the_firmware_and_reboot_shows_the_banner(rig: Rig) -> None:
    t = rig.term()
    t.until(b"Hit any key to stop autoboot: ")
    # real: b'  2 \x08\x08\x08 1 \x08\x08\x08 0 \r\n' then the boot
    assert t.until(b"\x08\x08\x08 0 \r\n") == b" 2 \x08\x08\x08 1 \x08\x08\x08 0 \r\n"
    log = t.until(b"login: ").decode()
    assert "## Booting kernel from Legacy Image at" in log
    assert "   Verifying Checksum ... OK\r\n" in log
    assert "SimRouter firmware 1.0.0 booted\r\n" in log
    assert rig.device.state == "firmware"
    t.send(b"reboot\r")
    assert b"reboot: Restarting system" in t.until(b"Restarting system\r\n")
    t.until(b"U-Boot 2023.01-sim")
    t.stop_autoboot()
    assert rig.device.state == "bootloader"


def test_a_key_sent_before_the_banner_counts_and_the_rest_is_typed_at_the_prompt(
    rig: Rig,
) -> None:
    t = rig.term()
    t.send(b"\x03echo typed-ahead\r")
    t.until(b"=> ")
    assert t.until(b"\n=> ") == b"echo typed-ahead\r\ntyped-ahead\r\n=> "


def test_soft_bricked_device_shows_the_failed_autoboot_then_the_prompt(rig: Rig) -> None:
    rig.device.simulate_brick("soft")
    assert rig.device.state == "bootloader"
    t = rig.term()
    t.until(b"Hit any key to stop autoboot: ")
    out = t.until(b"\n=> ").decode()
    assert "Bad Data CRC" in out or "Bad Header Checksum" in out
    assert out.endswith("ERROR: can't get kernel image!\r\n=> ")


def test_reset_keeps_the_terminal_and_replays_the_banner(rig: Rig) -> None:
    t = rig.prompt()
    t.send(b"reset\r")
    # real: b"reset\r\nresetting ...\r\n\r\n\r\nU-Boot ..."
    assert t.until(b"resetting ...\r\n") == b"reset\r\nresetting ...\r\n"
    banner = t.stop_autoboot()
    assert b"\r\n\r\nU-Boot 2023.01-sim" in banner
    assert rig.device.boot_id >= 3
    assert t.run("version").startswith("U-Boot 2023.01-sim (")


def test_a_newer_terminal_takes_over_and_a_reconnect_stays_at_the_prompt(rig: Rig) -> None:
    first = rig.prompt()
    second = rig.term()
    assert first.closed()
    # The boot was shown already: the line is quiet until someone types.
    assert second.raw(b"\x03") == b"<INTERRUPT>\r\n=> "
    assert second.run("echo still here") == "still here\r\n"


def test_a_reset_through_another_face_shows_the_new_boot(rig: Rig) -> None:
    t = rig.prompt()
    rig.device.set_faults(Faults(power_on_delay_s=0.3))
    rig.device.reset()  # e.g. the generic face's reboot: the terminal stays attached
    assert t.stop_autoboot().count(b"U-Boot 2023.01-sim") == 1
    assert rig.device.state == "bootloader"


def test_boot_runs_the_boot_chain_without_the_banner(rig: Rig) -> None:
    t = rig.prompt()
    t.send(b"boot\r")
    out = t.until(b"login: ").decode()
    assert out.startswith("boot\r\n")
    assert "U-Boot 2023.01-sim" not in out and "Hit any key" not in out
    assert "SimRouter firmware 1.0.0 booted" in out
    assert rig.device.state == "firmware"


def test_hard_bricked_device_shows_only_the_rom_and_ignores_input(rig: Rig) -> None:
    rig.device.simulate_brick("hard")
    assert rig.device.state == "dead"
    t = rig.term()
    out = t.until(b"halting\r\n").decode()
    assert out.startswith("SimROM 1.0 (SimRouter)\r\nROM: no valid bootloader at 0x000000")
    t.send(b"\x03version\r")
    assert not t.closed(0.3)
    assert t.buf == b""


# -- the line editor and the shell -------------------------------------------------------


def test_line_editing_interrupt_and_unknown_commands(rig: Rig) -> None:
    t = rig.prompt()
    # real samples, byte for byte
    assert t.raw(b"ab\x08c\n") == b"ab\x08 \x08c\r\nUnknown command 'ac' - try 'help'\r\n=> "
    assert t.raw(b"\x03") == b"<INTERRUPT>\r\n=> "
    assert t.raw(b"foo\x03") == b"foo<INTERRUPT>\r\n=> "
    assert t.raw(b"foo\n") == b"foo\r\nUnknown command 'foo' - try 'help'\r\n=> "
    # "\r\n" is one line end, not a command and an empty (repeating) line
    assert t.raw(b"echo once\r\n") == b"echo once\r\nonce\r\n=> "
    assert t.run("ver").startswith("U-Boot 2023.01-sim")  # a unique prefix names a command


def test_hush_quoting_variables_and_exit_status(rig: Rig) -> None:
    t = rig.prompt()
    # real samples
    assert t.run('echo a  b "c  d"; echo $?') == "a b c  d\r\n0\r\n"
    assert t.run("false; echo $?") == "1\r\n"
    assert t.run('nosuch; echo "<rc=$?>"') == "Unknown command 'nosuch' - try 'help'\r\n<rc=1>\r\n"
    assert t.run("setenv x 5; echo ${x} $x") == "5 5\r\n"
    assert t.run("run nosuch") == '## Error: "nosuch" not defined\r\n'
    assert t.run('setenv s "echo hi; echo there"; run s') == "hi\r\nthere\r\n"
    assert t.run("true && echo yes || echo no") == "yes\r\n"
    assert t.run("false && echo yes || echo no") == "no\r\n"
    assert t.run("echo '$x' \\$x") == "$x $x\r\n"


def test_environment_commands(rig: Rig) -> None:
    t = rig.prompt()
    # real samples
    assert t.run("printenv bootdelay") == "bootdelay=2\r\n"
    assert t.run("printenv nosuch") == '## Error: "nosuch" not defined\r\n'
    assert t.run("setenv foo bar") == ""
    assert t.run("printenv foo") == "foo=bar\r\n"
    assert t.run("setenv foo") == ""
    assert t.run("printenv foo") == '## Error: "foo" not defined\r\n'
    assert t.run("setenv a=b 1") == "## Error: illegal character '='in variable name \"a=b\"\r\n"
    mac = t.run("printenv ethaddr").strip().split("=", 1)[1]
    assert t.run("setenv ethaddr 52:54:00:12:34:57") == (
        '## Error: Can\'t overwrite "ethaddr"\r\n## Error inserting "ethaddr" variable, errno=1\r\n'
    )
    everything = t.run("printenv")
    assert f"\r\nethaddr={mac}\r\n" in everything
    assert "\r\nboard_name=SimRouter\r\n" in everything
    assert f"\r\nserial#={rig.device.config.serial}\r\n" in everything
    assert re.search(r"\r\n\r\nEnvironment size: \d+/65520 bytes\r\n$", everything)
    names = [line.split("=", 1)[0] for line in everything.split("\r\n\r\n")[0].split("\r\n")]
    assert names == sorted(names)


def test_saveenv_writes_the_redundant_env_through_the_device(rig: Rig) -> None:
    t = rig.prompt()
    t.run("setenv bootdelay 1; setenv fromconsole yes")
    out = t.run("saveenv")
    assert out == (
        "Saving Environment to Flash... Un-Protected 1 sectors\r\nErasing Flash...\r\n"
        ". done\r\nErased 1 sectors\r\nWriting to Flash... done\r\nProtected 1 sectors\r\nOK\r\n"
    )
    eb = rig.device.config.geometry.erase_block_bytes
    copies = [decode_env(rig.device.read(off, eb)) for off in env_copies(rig.device.config)]
    newest = max(c for c in copies if c is not None)
    assert newest[1]["fromconsole"] == "yes"
    assert all(c is not None for c in copies)  # the older copy stays valid
    t.send(b"reset\r")
    banner = t.stop_autoboot()
    assert b"Hit any key to stop autoboot:  1 " in banner  # the saved bootdelay
    assert t.run("printenv fromconsole") == "fromconsole=yes\r\n"


def test_help_lists_commands_in_u_boots_format(rig: Rig) -> None:
    t = rig.prompt()
    listing = t.run("help")
    for line in (  # real lines
        "?         - alias for 'help'",
        "bdinfo    - print Board Info structure",
        "cmp       - memory compare",
        "crc32     - checksum calculation",
        "erase     - erase FLASH memory",
        "loadx     - load binary file over serial line (xmodem mode)",
        "loady     - load binary file over serial line (ymodem mode)",
        "tftpboot  - load file via network using TFTP protocol",
    ):
        assert f"{line}\r\n" in listing
    # real sample (generic part)
    assert t.run("help loadx") == (
        "loadx - load binary file over serial line (xmodem mode)\r\n\r\nUsage:\r\n"
        "loadx [ addr [ baud ] ]\r\n"
        "    - load binary file over serial line at address 'addr' with baudrate 'baud'\r\n"
    )
    assert t.run("help nosuch") == (
        "Unknown command 'nosuch' - try 'help' without arguments for list of all known "
        "commands\r\n\r\n"
    )


def test_version_and_bdinfo(rig: Rig) -> None:
    t = rig.prompt()
    version = t.run("version").split("\r\n")
    assert re.fullmatch(r"U-Boot 2023\.01-sim \(.+ \+0000\)", version[0])
    assert version[1] == ""
    assert "gcc" in version[2] and version[3].startswith("GNU ld")
    info = dict(
        (k.strip(), v.strip())
        for k, _, v in (line.partition("= ") for line in t.run("bdinfo").split("\r\n") if line)
    )
    # the 32-bit layout of the real qemu_arm output
    assert info["-> start"] == "0x40000000"
    assert info["-> size"] == "0x08000000"
    assert info["flashstart"] == "0x00000000"
    assert info["flashsize"] == "0x00800000"
    assert info["baudrate"] == "115200 bps"
    assert info["Build"] == "32-bit"


# -- memory commands ---------------------------------------------------------------------


def test_md_mw_formats_match_real_u_boot(rig: Rig) -> None:
    t = rig.prompt()
    t.run("mw.b 40000000 41 10")
    t.run("mw.l 40000010 12345678 2; mw.l 40000018 10000000")
    # real samples (the tail bytes were what QEMU's RAM held: recreated with mw)
    assert t.run("md.b 40000000 20") == (
        "40000000: 41 41 41 41 41 41 41 41 41 41 41 41 41 41 41 41  AAAAAAAAAAAAAAAA\r\n"
        "40000010: 78 56 34 12 78 56 34 12 00 00 00 10 00 00 00 00  xV4.xV4.........\r\n"
    )
    assert t.run("md.l 40000000 8") == (
        "40000000: 41414141 41414141 41414141 41414141  AAAAAAAAAAAAAAAA\r\n"
        "40000010: 12345678 12345678 10000000 00000000  xV4.xV4.........\r\n"
    )
    assert t.run("crc32 40000000 20") == "crc32 for 40000000 ... 4000001f ==> ad3a88b2\r\n"
    t.run("mw.l 40000000 deadbeef 4; mw.b 40000010 5a 2")
    assert t.run("md.b 40000000 12") == (
        "40000000: ef be ad de ef be ad de ef be ad de ef be ad de  ................\r\n"
        "40000010: 5a 5a                                            ZZ\r\n"
    )
    assert t.run("md.w 40000000 8") == (
        "40000000: beef dead beef dead beef dead beef dead  ................\r\n"
    )
    t.run("mw.l 40001000 0969baf8")
    assert t.run("md.l 40001000 1") == "40001000: 0969baf8                             ..i.\r\n"
    assert t.run("mw.x 40000000 1") == ""  # a bad size does nothing (real)


def test_an_empty_line_repeats_md_where_it_stopped(rig: Rig) -> None:
    t = rig.prompt()
    t.run("mw.b 40000010 30 10")
    t.run("md.b 40000000 10")
    # real: b'\r\n40000010: ...' (the empty line's echo, then the next 16 bytes)
    assert t.raw(b"\r") == (
        b"\r\n40000010: 30 30 30 30 30 30 30 30 30 30 30 30 30 30 30 30  0000000000000000\r\n=> "
    )


def test_crc32_cmp_and_usage_messages(rig: Rig) -> None:
    t = rig.prompt()
    # real samples
    assert t.run("crc32 40000000 0") == "crc32 for 40000000 ... 3fffffff ==> 00000000\r\n"
    assert t.run("crc32") == (
        "crc32 - checksum calculation\r\n\r\nUsage:\r\ncrc32 address count [addr]\r\n"
        "    - compute CRC32 checksum [save at addr]\r\n"
    )
    t.run("mw.b 40000000 d0 1")
    assert t.run("cmp.b 40000000 40000010 10") == (
        "byte at 0x40000000 (0xd0) != byte at 0x40000010 (0x0)\r\n"
        "Total of 0 byte(s) were the same\r\n"
    )
    t.run("mw.l 40000000 edfe0dd0; mw.l 40000010 30000000")
    assert t.run("cmp.l 40000000 40000010 4") == (
        "word at 0x40000000 (0xedfe0dd0) != word at 0x40000010 (0x30000000)\r\n"
        "Total of 0 word(s) were the same\r\n"
    )
    assert t.run("cmp.b 40100000 40200000 100") == "Total of 256 byte(s) were the same\r\n"
    assert t.run("cmp.b 40000000 40000010 4; echo $?").endswith("\r\n1\r\n")
    data = bytes(range(256)) * 4
    load_ram(t, 0x40300000, data)
    assert t.run("crc32 40300000 400 40001000") == (
        f"crc32 for 40300000 ... 403003ff ==> {zlib.crc32(data):08x}\r\n"
    )
    stored = t.run("md.b 40001000 4").split(": ", 1)[1][:11]
    assert stored == " ".join(f"{b:02x}" for b in zlib.crc32(data).to_bytes(4, "big"))
    assert t.run("cp.b 40000000 40001000") == (
        "cp - memory copy\r\n\r\nUsage:\r\ncp [.b, .w, .l] source target count\r\n"
    )
    assert t.run("cp.b 40000000 4040000 0") == "Zero length ???\r\n"


# -- flash ------------------------------------------------------------------------------


def test_flinfo_shows_the_cfi_bank_and_its_protected_sectors(rig: Rig) -> None:
    t = rig.prompt()
    lines = t.run("flinfo").split("\r\n")
    assert lines[0] == ""
    assert lines[1] == "Bank # 1: CFI conformant flash (16 x 16)  Size: 8 MB in 128 Sectors"
    assert lines[2].startswith("  AMD Standard command set, Manufacturer ID: 0x")
    assert lines[6] == "  Sector Start Addresses:"
    # bootloader (4 sectors) and env (2 sectors) are protected at boot, like U-Boot's own
    assert lines[7] == (
        "  00000000   RO   00010000   RO   00020000   RO   00030000   RO   00040000   RO "
    )
    assert (
        lines[8]
        == "  00050000   RO   00060000        00070000        00080000        00090000      "
    )
    assert lines[-2] == "  007D0000        007E0000        007F0000      "
    assert t.run("flinfo 2") == "Only FLASH Banks # 1 ... # 1 supported\r\n"


def test_protect_and_erase_messages(rig: Rig) -> None:
    t = rig.prompt()
    # real samples (addresses of this flash)
    assert t.run("protect on 80000 +10000") == "Protected 1 sectors\r\n"
    assert t.run("erase 80000 +10000") == (
        "- Warning: 1 protected sectors will not be erased!\r\n done\r\nErased 1 sectors\r\n"
    )
    assert rig.device.read(FW_OFFSET, 4) != b"\xff" * 4
    assert t.run("protect off 80000 +10000") == "Un-Protected 1 sectors\r\n"
    assert t.run("erase 80000 +10000") == "\r\n. done\r\nErased 1 sectors\r\n"
    assert rig.device.read(FW_OFFSET, 0x10000) == b"\xff" * 0x10000
    assert t.run("erase 80000 90001") == "Error: end address not on sector boundary\r\n"
    assert t.run("erase 80001 8ffff") == "Error: start address not on sector boundary\r\n"
    assert t.run("erase 800000 +10") == (
        "Error: end address (0x0080000f) not in flash!\r\nBad address format\r\n"
    )
    assert t.run("erase 80000 80000").startswith(
        "erase - erase FLASH memory\r\n\r\nUsage:\r\nerase start end\r\n"
    )
    assert t.run("erase 90000 +18000") == "\r\n.. done\r\nErased 2 sectors\r\n"
    assert t.run("protect off 1:0-1") == "Un-Protect Flash Sectors 0-1 in Bank # 1\r\n"
    assert t.run("protect on all") == "Protect Flash Bank # 1\r\n"
    assert t.run("protect off all") == "Un-Protect Flash Bank # 1\r\n"


def test_cp_to_flash_follows_nor_rules_like_the_cfi_driver(rig: Rig) -> None:
    t = rig.prompt()
    dev = rig.device
    # real sequence: 5a over erased flash, then a5 over it (refused), then 50 (bits only clear)
    t.run("erase 100000 +10000; mw.b 40000000 5a 100")
    assert t.run("cp.b 40000000 100000 100") == "Copy to Flash... done\r\n"
    t.run("mw.b 40000000 a5 100")
    assert t.run("cp.b 40000000 100000 100") == "Copy to Flash... Flash not Erased\r\n"
    assert t.run("md.b 100000 10") == (
        "00100000: 5a 5a 5a 5a 5a 5a 5a 5a 5a 5a 5a 5a 5a 5a 5a 5a  ZZZZZZZZZZZZZZZZ\r\n"
    )
    t.run("mw.b 40000000 50 100")
    assert t.run("cp.b 40000000 100000 100") == "Copy to Flash... done\r\n"
    assert dev.read(0x100000, 0x100) == b"\x50" * 0x100
    assert t.run("cp.b 40000000 0 10") == (
        "Copy to Flash... Can't write to protected Flash sectors\r\n"
    )
    assert t.run("cp.b 40000000 7ffff0 20") == "Copy to Flash... Outside available Flash\r\n"
    # flash to RAM is a plain copy (the way a backup reads flash)
    t.run("cp.b 100000 40400000 100")
    assert t.run("cmp.b 100000 40400000 100") == "Total of 256 byte(s) were the same\r\n"


def test_technician_flow_loadx_erase_cp_crc32_reset_boots_the_new_firmware(
    rig: Rig, tmp_path: Path
) -> None:
    need("sx")
    new = image("2.0.0")
    path = tmp_path / "fw.bin"
    path.write_bytes(new)
    t = rig.prompt()
    ready, done = sx_send(t, "loadx 40000000", ["sx", "-k", str(path)])
    # real: b'## Ready for binary (xmodem) download to 0x40000000 at 115200 bps...\r\n'
    assert ready == (
        b"loadx 40000000\r\n"
        b"## Ready for binary (xmodem) download to 0x40000000 at 115200 bps...\r\n"
    )
    size = len(new)
    assert done == (
        f"## Total Size      = 0x{size:08x} = {size} Bytes\r\n"
        "## Start Addr      = 0x40000000\r\n=> "
    )
    assert t.run("crc32 40000000 ${filesize}") == (
        f"crc32 for 40000000 ... {0x40000000 + size - 1:08x} ==> {zlib.crc32(new):08x}\r\n"
    )
    assert t.run(f"erase 80000 +{size:x}") == "\r\n.. done\r\nErased 2 sectors\r\n"
    assert t.run(f"cp.b 40000000 80000 {size:x}") == "Copy to Flash... done\r\n"
    assert t.run(f"crc32 80000 {size:x}").endswith(f"==> {zlib.crc32(new):08x}\r\n")
    assert rig.device.read(FW_OFFSET, size) == new
    t.send(b"reset\r")
    t.until(b"Hit any key to stop autoboot: ")
    log = t.until(b"login: ").decode()
    assert "   Image Name:   SimRouter 2.0.0\r\n" in log
    assert "SimRouter firmware 2.0.0 booted" in log
    assert rig.device.state == "firmware"
    assert rig.device.firmware_version == "2.0.0"


def expected_nor_write(old: bytes, new: bytes, buffer: int = 32) -> bytes:
    """What the CFI driver leaves: whole buffers programmed until one needs a 0->1 bit."""
    out = bytearray(old)
    for pos in range(0, len(new), buffer):
        a, b = old[pos : pos + buffer], new[pos : pos + buffer]
        if any(x & y != y for x, y in zip(a, b, strict=True)):
            break
        out[pos : pos + buffer] = bytes(x & y for x, y in zip(a, b, strict=True))
    return bytes(out)


def test_cp_without_erase_corrupts_and_crc32_shows_it(rig: Rig, tmp_path: Path) -> None:
    need("sx")
    new = image("2.0.0")
    (tmp_path / "fw.bin").write_bytes(new)
    t = rig.prompt()
    sx_send(t, "loadx 40000000", ["sx", "-k", str(tmp_path / "fw.bin")])
    old = rig.device.read(FW_OFFSET, len(new))
    # Only the first sector is erased: the second still holds the old image.
    t.run("erase 80000 +10000")
    assert t.run("cp.b 40000000 80000 20000") == "Copy to Flash... Flash not Erased\r\n"
    on_flash = rig.device.read(FW_OFFSET, len(new))
    assert on_flash[:0x10000] == new[:0x10000]
    assert on_flash[0x10000:] == expected_nor_write(old[0x10000:], new[0x10000:])
    assert on_flash != new
    crc = t.run("crc32 80000 20000").rsplit(" ", 1)[1].strip()
    assert crc == f"{zlib.crc32(on_flash):08x}" != f"{zlib.crc32(new):08x}"
    t.send(b"reset\r")
    t.until(b"Hit any key to stop autoboot: ")
    out = t.until(b"\n=> ").decode()
    assert "   Image Name:   SimRouter 2.0.0\r\n" in out
    assert "   Verifying Checksum ... Bad Data CRC\r\n" in out
    assert rig.device.state == "bootloader"  # soft-bricked by the forgotten erase


def test_power_cut_during_cp_drops_the_link_and_the_device_comes_back_soft_bricked(
    rig: Rig,
) -> None:
    t = rig.prompt()
    t.run("erase 80000 +20000")
    t.run("mw.l 40000000 12345678 8000")
    rig.device.set_faults(Faults(power_cut_after_ops=2, power_on_delay_s=0.05))
    t.send(b"cp.b 40000000 80000 20000\r")
    assert t.closed()
    assert b"Copy to Flash... " in t.buf
    assert b"done" not in t.buf
    # the device powers back on; a new terminal sees the failed autoboot and the prompt
    again = rig.term()
    again.until(b"Hit any key to stop autoboot: ")
    out = again.until(b"\n=> ").decode()
    assert "Wrong Image Format for bootm command" in out
    assert rig.device.state == "bootloader"
    assert rig.device.read(FW_OFFSET, 4) == b"\x78\x56\x34\x12"


def test_bootm_and_iminfo_check_images_like_the_boot_chain(rig: Rig) -> None:
    t = rig.prompt()
    # real sample
    assert t.run("bootm 40000000") == (
        "Wrong Image Format for bootm command\r\nERROR: can't get kernel image!\r\n"
    )
    assert t.run("iminfo 40000000") == (
        "\r\n## Checking Image at 40000000 ...\r\nUnknown image format!\r\n"
    )
    info = t.run("iminfo 80000").split("\r\n")
    assert info[1:4] == [
        "## Checking Image at 00080000 ...",
        "   Legacy image found",
        "   Image Name:   SimRouter 1.0.0",
    ]
    assert re.fullmatch(r"   Created:      \d{4}-\d\d-\d\d  \d\d:\d\d:\d\d UTC", info[4])
    assert info[5] == "   Image Type:   ARM Linux Kernel Image (uncompressed)"
    assert info[-2] == "   Verifying Checksum ... OK"
    # a damaged copy in RAM: bootm reports it and stays at the prompt
    t.run("cp.b 80000 40000000 20000; mw.b 40010000 0 10")
    out = t.run("bootm 40000000")
    assert out.startswith("## Booting kernel from Legacy Image at 40000000 ...\r\n")
    assert out.endswith(
        "   Verifying Checksum ... Bad Data CRC\r\nERROR: can't get kernel image!\r\n"
    )
    # a good image starts; the sim then restarts the device from flash
    t.send(b"bootm 80000\r")
    started = t.until(b"Starting kernel ...\r\n").decode()
    assert "   Verifying Checksum ... OK\r\n" in started
    t.stop_autoboot()


# -- transfers ----------------------------------------------------------------------------


@pytest.mark.peer
def test_loadx_with_lrzsz_sx_xmodem_1k_and_small_file(rig: Rig, tmp_path: Path) -> None:
    need("sx")
    t = rig.prompt()
    data = bytes((i * 7 + 3) % 251 for i in range(3000))
    path = tmp_path / "f3000.bin"
    path.write_bytes(data)
    _, done = sx_send(t, "loadx 40000000", ["sx", "-k", str(path)])
    # real: '## Total Size      = 0x00000bb8 = 3000 Bytes\r\n## Start Addr      = 0x40000000'
    assert (
        done
        == "## Total Size      = 0x00000bb8 = 3000 Bytes\r\n## Start Addr      = 0x40000000\r\n=> "
    )
    assert (
        t.run("crc32 40000000 bb8")
        == f"crc32 for 40000000 ... 40000bb7 ==> {zlib.crc32(data):08x}\r\n"
    )
    assert t.run("printenv filesize") == "filesize=bb8\r\n"
    (tmp_path / "small.bin").write_bytes(b"hello")
    _, done = sx_send(t, "loadx 40100000", ["sx", str(tmp_path / "small.bin")])
    assert done.startswith("## Total Size      = 0x00000005 = 5 Bytes\r\n")
    assert t.run("md.b 40100000 10") == (  # real sample (RAM was zero there too)
        "40100000: 68 65 6c 6c 6f 00 00 00 00 00 00 00 00 00 00 00  hello...........\r\n"
    )


@pytest.mark.peer
def test_loady_with_lrzsz_sz_ymodem(rig: Rig, tmp_path: Path) -> None:
    need("sz")
    t = rig.prompt()
    data = bytes((i * 13 + 1) % 256 for i in range(3000)) + b"\x1a\x1a\x1a"
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    ready, done = sx_send(t, "loady", ["sz", "--ymodem", str(path)])
    assert ready.endswith(
        b"## Ready for binary (ymodem) download to 0x40200000 at 115200 bps...\r\n"
    )
    # YMODEM knows the size: trailing SUB bytes of the file are kept
    assert (
        done
        == "## Total Size      = 0x00000bbb = 3003 Bytes\r\n## Start Addr      = 0x40200000\r\n=> "
    )
    assert t.run("crc32 40200000 bbb").endswith(f"==> {zlib.crc32(data):08x}\r\n")


def test_loadx_and_loady_with_unbricks_own_sender(rig: Rig) -> None:
    t = rig.prompt()
    data = image("3.0.0", 40 * 1024)[:40000]
    for command, mode in (("loadx 40000000", "xmodem"), ("loady 40000000", "ymodem")):
        t.send(command.encode() + b"\r")
        t.until(b"bps...\r\n")
        link = FdLink(t.sock.fileno())
        if mode == "xmodem":
            sent = send_xmodem(link, data, settle_s=0.0, pending=t.buf)
        else:
            sent = send_ymodem(link, "fw.bin", data, settle_s=0.0, pending=t.buf)
        assert sent == len(data)
        t.buf = b""
        out = t.until(b"\n=> ").decode("latin-1")
        assert out[out.index("## ") :] == (
            f"## Total Size      = 0x{len(data):08x} = {len(data)} Bytes\r\n"
            "## Start Addr      = 0x40000000\r\n=> "
        )
        assert t.run(f"crc32 40000000 {len(data):x}").endswith(f"==> {zlib.crc32(data):08x}\r\n")
        t.run("mw.b 40000000 0 10000")


def test_loadx_and_loady_cancelled_by_the_sender(rig: Rig) -> None:
    t = rig.prompt()
    for cmd, mode in (("loadx 40000000", "xmodem"), ("loady 40000000", "ymodem")):
        t.send(cmd.encode() + b"\r")
        t.until(b"bps...\r\n")
        t.until(b"C")  # the receiver asks for CRC blocks
        t.send(b"\x18\x18\x18")
        out = t.until(b"\n=> ").decode().lstrip("C")
        # real: b'C\r\nCancelled\r\n## Binary (xmodem) download aborted\r\n=> '
        assert out == f"\r\nCancelled\r\n## Binary ({mode}) download aborted\r\n=> "


def test_loadx_times_out_without_a_sender(tmp_path: Path) -> None:
    dev = create_device("router", tmp_path / "state", "to", faults=FAST)
    r = Rig(dev, ConsoleConfig(autoboot_delay_s=0.2, xmodem_poll_s=0.1, xmodem_timeout_s=0.5))
    try:
        t = r.prompt()
        out = t.run("loadx").replace("C", "")
        assert out.endswith("\r\nTimed out\r\n## Binary (xmodem) download aborted\r\n")
        assert t.run("echo back") == "back\r\n"
    finally:
        r.close()
        dev.close()


@pytest.mark.peer
def test_tftpboot_from_tftpd_hpa(rig: Rig, tmp_path: Path) -> None:
    server = peer_tftpd()
    root = tmp_path / "tftp"
    root.mkdir()
    data = bytes(range(256)) * 200 + b"end"
    (root / "fw.bin").write_bytes(data)
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    proc = subprocess.Popen(
        [server, "-L", "-4", "-a", f"127.0.0.1:{port}", "-s", "-u", "root", str(root)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        t = rig.prompt()
        assert t.run("tftpboot 40000000 fw.bin") == "*** ERROR: `serverip' not set\r\n"  # real
        t.run(f"setenv ipaddr 127.0.0.1; setenv serverip 127.0.0.1; setenv tftpdstp {port}")
        t.run("setenv tftpblocksize 1468; setenv tftptimeout 1000")
        out = t.run("tftpboot 40000000 fw.bin", timeout_s=20)
        assert out.startswith(
            "Using sim-eth device\r\nTFTP from server 127.0.0.1; our IP address is 127.0.0.1\r\n"
            "Filename 'fw.bin'.\r\nLoad address: 0x40000000\r\nLoading: *\x08#"
        )
        n = len(data)
        assert re.search(
            rf"#\r\n\t [\d.]+ (Bytes|KiB|MiB|GiB)/s\r\ndone\r\nBytes transferred = {n} "
            rf"\({n:x} hex\)\r\n$",
            out,
        )
        assert t.run(f"crc32 40000000 {n:x}").endswith(f"==> {zlib.crc32(data):08x}\r\n")
        assert t.run("printenv filesize fileaddr") == f"filesize={n:x}\r\nfileaddr=40000000\r\n"
        missing = t.run("tftpboot 40000000 nosuch.bin", timeout_s=20)
        # real: "Loading: *\b\r\nTFTP error: 'File not found' (1)\r\nNot retrying..."
        assert missing.endswith(
            "Loading: *\x08\r\nTFTP error: 'File not found' (1)\r\nNot retrying...\r\n"
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(5)


# -- registry and the sim command ----------------------------------------------------------


def test_registry_carries_the_console_port_and_reads_old_entries(tmp_path: Path) -> None:
    entry = RegistryEntry("r", "127.0.0.1", 1, 2, 3, "router", console_port=4)
    write_registry(tmp_path, entry)
    assert read_registry(tmp_path, "r") == entry
    old = {"host": "127.0.0.1", "port": 1, "spi_port": 2, "pid": 3, "kind": "router"}
    (tmp_path / "o.json").write_text(json.dumps(old))
    assert read_registry(tmp_path, "o").console_port is None


def test_the_sim_command_prints_and_registers_the_console_port(tmp_path: Path) -> None:
    argv = [
        sys.executable,
        "-m",
        "unbrick.cli.sim",
        "router",
        "--name",
        "cc",
        "--registry",
        str(tmp_path / "reg"),
        "--state-dir",
        str(tmp_path / "state"),
        "--autoboot-delay",
        "0.2",
    ]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        entry = json.loads((tmp_path / "reg" / "cc.json").read_text())
        assert f", console 127.0.0.1:{entry['console_port']}, tftp 127.0.0.1:" in line
        t = Term(entry["console_port"])
        t.stop_autoboot()
        assert t.run("printenv board_name") == "board_name=SimRouter\r\n"
        t.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
    assert rc == 0


# -- pure parts ------------------------------------------------------------------------------


@pytest.mark.unit
def test_parse_hex_is_u_boots_hextoul() -> None:
    assert parse_hex("40000000") == 0x40000000
    assert parse_hex("0x1F") == 0x1F
    assert parse_hex("12zz") == 0x12
    assert parse_hex("zz") == 0
    assert parse_hex("") == 0


@pytest.mark.unit
def test_size_text_and_command_splitting() -> None:
    assert size_text(3000) == "2.9 KiB"
    assert size_text(1024 * 1024) == "1 MiB"
    assert size_text(5) == "5 Bytes"
    assert split_commands('a; b "x;y" && c || d') == [
        (";", "a"),
        (";", ' b "x;y" '),
        ("&&", " c "),
        ("||", " d"),
    ]
    env = {"x": "5"}
    assert expand_words("echo $x ${x}y '$x' \"a $x\" $? $", lambda n: env.get(n, "7")) == [
        "echo",
        "5",
        "5y",
        "$x",
        "a 5",
        "7",
        "$",
    ]


@pytest.mark.unit
@given(st.binary(max_size=100), st.sampled_from([1, 2, 4]))
def test_dump_lines_round_trip(data: bytes, width: int) -> None:
    data = data[: len(data) - len(data) % width]
    lines = dump_lines(0x40000000, data, width)
    assert len(lines) == (len(data) + 15) // 16
    hex_chars = (16 // width) * (width * 2 + 1)
    back = b""
    for i, line in enumerate(lines):
        assert line.startswith(f"{0x40000000 + 16 * i:08x}:")
        for item in line[9 : 9 + hex_chars].split():
            back += int(item, 16).to_bytes(width, "little")
        chunk = data[16 * i : 16 * i + 16]
        assert line[9 + hex_chars :] == "  " + "".join(
            chr(b) if 0x20 <= b < 0x7F else "." for b in chunk
        )
    assert back == data


@pytest.mark.unit
@given(
    st.lists(st.tuples(st.integers(0, 1 << 20), st.binary(min_size=1, max_size=300)), max_size=8)
)
def test_sparse_ram_behaves_like_a_bytearray(writes: list[tuple[int, bytes]]) -> None:
    ram = SparseRam(0x1000, 2 << 20)
    model = bytearray(2 << 20)
    for off, data in writes:
        ram.write(0x1000 + off, data)
        model[off : off + len(data)] = data
    for off, data in writes:
        assert ram.read(0x1000 + off, len(data) + 10) == bytes(model[off : off + len(data) + 10])


# -- the receiver over a scripted link -------------------------------------------------------


class FakeLink:
    """A sender that sends its next chunk only after the receiver wrote something (as senders
    wait for an answer); silence otherwise, where time advances by the read's timeout."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = list(chunks)
        self.partial = b""
        self.answered = False
        self.sent = bytearray()
        self.now = 0.0

    def read(self, max_bytes: int, timeout_s: float) -> bytes:
        if not self.partial and self.answered and self.chunks:
            self.partial = self.chunks.pop(0)
            self.answered = False
        if self.partial:
            out, self.partial = self.partial[:max_bytes], self.partial[max_bytes:]
            return out
        self.now += max(timeout_s, 0.001)
        return b""

    def write(self, data: bytes) -> None:
        self.sent += data
        self.answered = True

    def clock(self) -> float:
        return self.now


def block(seq: int, payload: bytes, size: int = 128) -> bytes:
    body = payload.ljust(size, b"\x1a")
    return (
        bytes([1 if size == 128 else 2, seq & 0xFF, 0xFF - (seq & 0xFF)])
        + body
        + (crc16(body).to_bytes(2, "big"))
    )


def run_rx(chunks: list[bytes], *, ymodem: bool) -> tuple[bytes, FakeLink]:
    link = FakeLink(chunks)
    got = bytearray()

    def sink(off: int, data: bytes) -> None:
        got[off : off + len(data)] = data

    receive(
        link,
        ymodem=ymodem,
        sink=sink,
        limit_bytes=1 << 20,
        timing=ReceiveTiming(poll_s=1.0, char_timeout_s=1.0, timeout_s=10.0),
        clock=link.clock,
    )
    return bytes(got), link


@pytest.mark.unit
def test_receiver_xmodem_acks_drops_repeats_asks_again_and_strips_padding() -> None:
    bad = bytearray(block(2, b"B" * 128))
    bad[10] ^= 1
    got, link = run_rx(
        [block(1, b"A" * 128), block(1, b"A" * 128), bytes(bad), block(2, b"B" * 100), b"\x04"],
        ymodem=False,
    )
    assert got == b"A" * 128 + b"B" * 100
    assert bytes(link.sent) == b"C\x06\x06C\x06\x06"


@pytest.mark.unit
def test_receiver_ymodem_header_size_and_closing_block() -> None:
    header = block(0, b"fw.bin\x003000 14000000000 100644\x00")
    data = bytes(range(256)) * 12
    chunks = [header]
    chunks += [block(i + 1, data[i * 1024 : (i + 1) * 1024], 1024) for i in range(3)]
    chunks += [b"\x04", block(0, b"")]
    got, link = run_rx(chunks, ymodem=True)
    assert got == data[:3000]
    # no 'C' after the header's ACK (as U-Boot); the closing block 0 is asked for with 'C'
    assert bytes(link.sent) == b"C\x06\x06\x06\x06\x06C\x06"
    assert parse_header(b"name\x00123 0\x00") == ("name", 123)
    assert strip_sub_padding(b"ab\x1a\x1a") == b"ab\x1a\x1a"
    assert strip_sub_padding(b"ab\x1a\x1a\x1a") == b"ab"


@pytest.mark.unit
def test_receiver_errors_carry_u_boots_messages() -> None:
    with pytest.raises(ReceiveError, match=r"^Cancelled$"):
        run_rx([b"\x18\x18"], ymodem=False)
    with pytest.raises(ReceiveError, match=r"^Timed out$"):
        run_rx([], ymodem=False)
    with pytest.raises(ReceiveError, match=r"^Block sequence error$"):
        run_rx([block(1, b"x"), block(3, b"y")], ymodem=False)


@pytest.mark.unit
@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=1100), max_size=12), st.booleans())
def test_receiver_fuzz_random_bytes_end_in_a_typed_result(
    chunks: list[bytes], ymodem: bool
) -> None:
    try:
        run_rx(chunks, ymodem=ymodem)
    except ReceiveError as e:
        assert e.message
