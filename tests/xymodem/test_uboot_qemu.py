"""Our sender into Debian's real U-Boot (``loadx``, ``loady``) in QEMU; U-Boot's crc32 decides.

QEMU runs in a private network namespace with no network at all; its console is a unix
socket (reachable across namespaces). Also measured against lrzsz ``sz --ymodem``, which
waits for U-Boot's ~4 s timeout after block 0 (U-Boot sends no ``C`` there).
"""

from __future__ import annotations

import os
import random
import re
import shutil
import socket
import subprocess
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import need
from unbrick.transports.xymodem_io import FdLink, send_xmodem, send_ymodem

pytestmark = [pytest.mark.peer, pytest.mark.slow]

UBOOT = Path("/usr/lib/u-boot/qemu_arm64/u-boot.bin")
LOAD_ADDR = 0x40200000
READY = re.compile(rb"## Ready for binary \((?:x|y)modem\) download[^\n]*\n")
PROMPT = re.compile(rb"\n=> $")


class Console:
    """The U-Boot console on a connected socket: commands, and the link for transfers."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.link = FdLink(sock.fileno())
        self.buf = b""

    def until(self, pattern: re.Pattern[bytes], timeout_s: float = 60.0) -> bytes:
        deadline = time.monotonic() + timeout_s
        while (m := pattern.search(self.buf)) is None:
            left = deadline - time.monotonic()
            assert left > 0, f"no {pattern.pattern!r} from U-Boot: {self.buf[-300:]!r}"
            self.buf += self.link.read(4096, min(left, 0.5))
        text, self.buf = self.buf[: m.end()], self.buf[m.end() :]
        return text

    def run(self, command: str) -> str:
        self.link.write(command.encode() + b"\n")
        return self.until(PROMPT).decode(errors="replace")

    def start_load(self, command: str) -> bytes:
        """Send loadx/loady; return what came after the Ready line (often U-Boot's first C)."""
        self.link.write(command.encode() + b"\n")
        self.until(READY)
        pending, self.buf = self.buf, b""
        return pending

    def crc32(self, size: int) -> int:
        out = self.run(f"crc32 0x{LOAD_ADDR:x} 0x{size:x}")
        m = re.search(r"==> ([0-9a-f]{8})", out)
        assert m, out
        return int(m.group(1), 16)


@pytest.fixture(scope="module")
def uboot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Console]:
    need("qemu-system-aarch64", "unshare", "ip")
    if not UBOOT.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{UBOOT} is missing (install u-boot-qemu)")
        pytest.skip(f"{UBOOT} is missing (install u-boot-qemu)")
    tmp = tmp_path_factory.mktemp("uboot")
    path = tmp / "console.sock"
    log = (tmp / "qemu.log").open("wb")
    qemu = subprocess.Popen(
        [
            "unshare",
            "-n",
            "sh",
            "-c",
            'ip link set lo up && exec "$@"',
            "sh",
            "qemu-system-aarch64",
            "-M",
            "virt",
            "-cpu",
            "cortex-a57",
            "-m",
            "512",
            "-display",
            "none",
            "-monitor",
            "none",
            "-nic",
            "none",
            "-bios",
            str(UBOOT),
            "-serial",
            f"unix:{path},server=on,wait=on",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                sock.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                assert qemu.poll() is None, (tmp / "qemu.log").read_text(errors="replace")
                assert time.monotonic() < deadline, "QEMU did not open its console socket"
                time.sleep(0.05)
        console = Console(sock)
        console.until(re.compile(rb"autoboot|=> $"))
        console.link.write(b"\n")
        console.until(PROMPT)
        yield console
    finally:
        sock.close()
        qemu.terminate()
        try:
            qemu.wait(10)
        except subprocess.TimeoutExpired:
            qemu.kill()
            qemu.wait()
        log.close()


def loaded_size(report: str) -> int:
    m = re.search(r"Total Size\s*=\s*0x[0-9a-f]+ = (\d+) Bytes", report)
    assert m, report
    return int(m.group(1))


@pytest.mark.parametrize("size", [1, 1025, 64 * 1024 + 7])
def test_loadx(uboot: Console, size: int) -> None:
    data = random.Random(size).randbytes(size)
    pending = uboot.start_load(f"loadx 0x{LOAD_ADDR:x}")
    send_xmodem(uboot.link, data, pending=pending)
    report = uboot.until(PROMPT).decode(errors="replace")
    assert loaded_size(report) == size  # U-Boot dropped the 0x1A padding
    assert uboot.crc32(size) == zlib.crc32(data)


@pytest.mark.parametrize("size", [0, 1, 1024, 64 * 1024 + 7])
def test_loady(uboot: Console, size: int) -> None:
    data = random.Random(size).randbytes(size) + b"\x1a\x1a\x1a"  # kept: block 0 has the size
    pending = uboot.start_load(f"loady 0x{LOAD_ADDR:x}")
    send_ymodem(uboot.link, "fw.bin", data, pending=pending)
    report = uboot.until(PROMPT).decode(errors="replace")
    assert loaded_size(report) == len(data)
    assert uboot.crc32(len(data)) == zlib.crc32(data)


def test_loady_faster_than_sz(uboot: Console, tmp_path: Path) -> None:
    need("sz")
    data = random.Random(9).randbytes(32 * 1024)
    (tmp_path / "fw.bin").write_bytes(data)

    started = time.monotonic()
    pending = uboot.start_load(f"loady 0x{LOAD_ADDR:x}")
    send_ymodem(uboot.link, "fw.bin", data, pending=pending)
    uboot.until(PROMPT)
    ours = time.monotonic() - started
    assert uboot.crc32(len(data)) == zlib.crc32(data)

    uboot.run(f"mw.b 0x{LOAD_ADDR:x} 0 0x{len(data):x}")
    sz = shutil.which("sz")
    assert sz is not None
    fd = uboot.sock.fileno()
    started = time.monotonic()
    # sz gets the console before anything reads U-Boot's first C (it skips the banner).
    uboot.link.write(f"loady 0x{LOAD_ADDR:x}\n".encode())
    subprocess.run([sz, "--ymodem", "-q", "fw.bin"], stdin=fd, stdout=fd, cwd=tmp_path, check=True)
    uboot.until(PROMPT)
    theirs = time.monotonic() - started
    assert uboot.crc32(len(data)) == zlib.crc32(data)
    # sz pays U-Boot's header timeout (2 s wait, 2 s flush, 0.25 s pause) after block 0.
    assert ours < theirs, f"ours {ours:.2f} s, sz {theirs:.2f} s"
