"""Image into U-Boot's RAM over the serial console: unbrick's YMODEM and XMODEM-1K vs lrzsz sz.

    .venv/bin/python bench/xymodem_bench.py [--sizes 256K,1M] [--repeat 3] [--workdir DIR]

One QEMU ``virt`` machine runs Debian's U-Boot (qemu_arm64, package u-boot-qemu) with no network
device; its serial console is a TCP server on 127.0.0.1 (a port QEMU picks), which every method
connects to directly, one at a time, as to a serial-over-TCP adapter. Each run ends with a
verified image in RAM, and its time covers everything from typing the load command to the
verdict:

- ``unbrick loady``: ``UBootDriver.load`` with ``?transfer=loady`` (unbrick's YMODEM sender):
  types ``loady``, sends, waits for the prompt, then compares U-Boot's ``crc32`` of the range
  with the host's CRC-32;
- ``unbrick loadx``: the same with ``?transfer=loadx`` (XMODEM-1K);
- ``sz loady``: lrzsz ``sz --ymodem`` on the console socket (its stdin and stdout) into
  ``loady``, then ``crc32`` on the console compared with the host's ``zlib.crc32``; sz sends
  128-byte blocks unless given ``-k``;
- ``sz -k loady``: the same with ``sz --ymodem -k`` (1024-byte blocks, as unbrick sends).

The same random (incompressible) bytes go through every method, to the same RAM address, which
is zeroed (untimed) before each run so that a transfer that stored nothing cannot pass. The
methods take turns within each repeat (their order rotates), the driver is opened (and U-Boot
probed) outside the timed part. Printed per size and method: min and median seconds, KiB/s at
the median, and ratio = peer time / method time against both sz variants (>= 1.0: at least as
fast as that peer), from the min and from the median times. QEMU has no KVM here: the guest's
UART speed depends on the host's load, so compare within one run only. Exit status 0 (also when
QEMU, U-Boot or sz is missing: a line says so), 1 when a run failed to verify.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from unbrick.errors import UnbrickError
from unbrick.model.uri import parse_device_uri
from unbrick.transports.uboot.driver import UBootDriver, open_uboot
from unbrick.transports.xymodem_io import FdLink

KiB = 1024
MiB = 1024 * KiB
QEMU = "qemu-system-aarch64"
UBOOT_BIN = Path("/usr/lib/u-boot/qemu_arm64/u-boot.bin")
#: The peers: lrzsz sz as given (128-byte blocks), and with ``-k`` (1024-byte blocks).
SZ_ARGS = {"sz loady": ["--ymodem"], "sz -k loady": ["--ymodem", "-k"]}
METHODS = ("unbrick loady", "unbrick loadx", *SZ_ARGS)
PROMPT = re.compile(rb"\n=> $")
CAN = b"\x18" * 8
#: What QEMU prints on stderr once its console server listens (``wait=on``).
CONSOLE_PORT = re.compile(rb"waiting for connection on: disconnected:tcp:127\.0\.0\.1:(\d+)")


def parse_size(text: str) -> int:
    """``262144``, ``256K``, ``256KiB``, ``1M``, ``1MiB``."""
    m = re.fullmatch(r"\s*(\d+)\s*(K|KiB|M|MiB)?\s*", text, re.IGNORECASE)
    if not m or int(m.group(1)) == 0:
        raise argparse.ArgumentTypeError(f"bad size {text!r}: use e.g. 65536, 256K, 1M")
    unit = (m.group(2) or "").upper()[:1]
    return int(m.group(1)) * {"": 1, "K": KiB, "M": MiB}[unit]


def human(size: int) -> str:
    if size % MiB == 0:
        return f"{size // MiB} MiB"
    if size % KiB == 0:
        return f"{size // KiB} KiB"
    return f"{size} B"


def missing_programs() -> list[str]:
    missing = [tool for tool in (QEMU, "sz") if shutil.which(tool) is None]
    if not UBOOT_BIN.is_file():
        missing.append(f"{UBOOT_BIN} (package u-boot-qemu)")
    return missing


@contextmanager
def qemu_uboot(workdir: Path) -> Iterator[int]:
    """Start U-Boot in QEMU; yield the 127.0.0.1 TCP port of its serial console.

    The machine has no network device at all (``-nic none``), so it needs no namespace of its
    own. QEMU picks the console's port (``:0``) and names it on stderr; with ``wait=on`` the
    guest starts only when the first client connects, and QEMU accepts a new client after one
    disconnects (a serial line: output with nobody attached is lost).
    """
    log_path = workdir / "qemu.log"
    argv = [QEMU, "-M", "virt", "-cpu", "cortex-a57", "-m", "512", "-display", "none",
            "-monitor", "none", "-nic", "none", "-bios", str(UBOOT_BIN),
            "-serial", "tcp:127.0.0.1:0,server=on,wait=on"]  # fmt: skip
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 20
        while not (m := CONSOLE_PORT.search(log_path.read_bytes())):
            if proc.poll() is not None or time.monotonic() > deadline:
                text = log_path.read_text(errors="replace").strip()
                raise UnbrickError(f"QEMU did not open its console (exit {proc.poll()}): {text}")
            time.sleep(0.02)
        yield int(m.group(1))
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class RawConsole:
    """The U-Boot console on a plain TCP socket, for lrzsz: sz gets the socket's descriptor as
    stdin and stdout (a blocking one, as sz needs)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.settimeout(None)  # blocking descriptor: sz fails on EAGAIN
        self.link = FdLink(self.sock.fileno())
        self.buf = b""

    def until(self, pattern: re.Pattern[bytes], timeout_s: float) -> bytes:
        deadline = time.monotonic() + timeout_s
        while (m := pattern.search(self.buf)) is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise UnbrickError(f"no {pattern.pattern!r} from U-Boot: {self.buf[-200:]!r}")
            self.buf += self.link.read(4096, min(left, 0.5))
        text, self.buf = self.buf[: m.end()], self.buf[m.end() :]
        return text

    def run(self, command: str, timeout_s: float = 20.0) -> str:
        self.link.write(command.encode() + b"\n")
        return self.until(PROMPT, timeout_s).decode(errors="replace")

    def sync(self) -> None:
        self.link.write(b"\n")
        self.until(PROMPT, 10.0)
        self.buf = b""

    def close(self) -> None:
        self.sock.close()


def open_driver(port: int, transfer: str, max_transfer: int) -> UBootDriver:
    uri = f"uboot+tcp://127.0.0.1:{port}?transfer={transfer}&max_transfer={max_transfer}"
    return open_uboot(parse_device_uri(uri), timeout_s=30.0)


class SenderLog(logging.Handler):
    """Counts the sender's retransmissions (DEBUG records of unbrick.transports.xymodem), to
    tell a slow line from a lossy one."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.retransmissions = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "retransmission" in str(record.msg):
            self.retransmissions += 1


def run_unbrick(port: int, transfer: str, data: bytes, addr: int, max_transfer: int) -> float:
    """Seconds for ``UBootDriver.load``: send, then crc32 in RAM (it raises on a mismatch)."""
    with open_driver(port, transfer, max_transfer) as driver:
        driver.command(f"mw.b 0x{addr:x} 0 0x{len(data):x}", timeout_s=30.0)
        t0 = time.perf_counter()
        got = driver.load(data, addr)
        elapsed = time.perf_counter() - t0
    if got != addr:
        raise UnbrickError(f"loaded at 0x{got:x}, expected 0x{addr:x}")
    return elapsed


def run_sz(port: int, argv: list[str], image: Path, data: bytes, addr: int) -> float:
    """Seconds from typing ``loady`` to U-Boot's crc32 of the range matching the host's."""
    timeout_s = 60.0 + len(data) / (5 * KiB)
    con = RawConsole(port)
    try:
        con.sync()
        con.run(f"mw.b 0x{addr:x} 0 0x{len(data):x}", 30.0)
        t0 = time.perf_counter()
        # sz reads the echo and the Ready line itself: it must see U-Boot's first C.
        con.link.write(f"loady 0x{addr:x}\n".encode())
        fd = con.sock.fileno()
        try:
            proc = subprocess.run(
                [*argv, "-q", image.name],
                stdin=fd,
                stdout=fd,
                stderr=subprocess.PIPE,
                cwd=image.parent,
                timeout=timeout_s,
            )
        except subprocess.TimeoutExpired as e:
            con.link.write(CAN)
            raise UnbrickError(f"sz did not finish within {timeout_s:.0f} s") from e
        if proc.returncode != 0:
            con.link.write(CAN)
            err = proc.stderr.decode(errors="replace").strip()
            raise UnbrickError(f"sz exited {proc.returncode}: {err}")
        report = con.until(PROMPT, 30.0).decode(errors="replace")
        out = con.run(f"crc32 0x{addr:x} 0x{len(data):x}")
        elapsed = time.perf_counter() - t0
    finally:
        con.close()
    size = re.search(r"Total Size\s*=\s*0x[0-9a-f]+ = (\d+) Bytes", report)
    if not size or int(size.group(1)) != len(data):
        raise UnbrickError(f"loady after sz: {report.strip()[-200:]!r}")
    crc = re.search(r"==> ([0-9a-f]{8})", out)
    if not crc or int(crc.group(1), 16) != zlib.crc32(data):
        raise UnbrickError(f"crc32 in RAM after sz does not match: {out.strip()!r}")
    return elapsed


Runs = dict[tuple[int, str], list[float | None]]


def ratio(peer: float | None, ours: float) -> str:
    return "-" if peer is None else f"{peer / ours:.2f}"


def print_table(sizes: list[int], runs: Runs) -> None:
    print(
        "\nratio = peer time / method time (>= 1.0: at least as fast as the peer), from the "
        "min and\nfrom the median times; peers: 'sz' = sz --ymodem, 'sz -k' = sz --ymodem -k"
    )
    print(
        f"{'size':>8}  {'method':13} {'min s':>7} {'median s':>8} {'KiB/s':>6}  "
        f"{'sz/x min':>8} {'sz/x med':>8}  {'sz-k/x min':>10} {'sz-k/x med':>10}"
    )
    for size in sizes:
        good = {m: [t for t in runs[size, m] if t is not None] for m in METHODS}
        peers = {
            name: (min(good[name]), statistics.median(good[name])) if good[name] else (None, None)
            for name in SZ_ARGS
        }
        (sz_min, sz_med), (szk_min, szk_med) = peers["sz loady"], peers["sz -k loady"]
        for method in METHODS:
            times = good[method]
            failed = len(runs[size, method]) - len(times)
            note = f"  {failed} run(s) FAILED" if failed else ""
            if not times:
                print(f"{human(size):>8}  {method:13} all runs failed")
                continue
            lo, med = min(times), statistics.median(times)
            print(
                f"{human(size):>8}  {method:13} {lo:7.2f} {med:8.2f} {size / KiB / med:6.1f}  "
                f"{ratio(sz_min, lo):>8} {ratio(sz_med, med):>8}  "
                f"{ratio(szk_min, lo):>10} {ratio(szk_med, med):>10}{note}"
            )


def measure(port: int, sz: str, sizes: list[int], repeat: int, workdir: Path) -> tuple[Runs, int]:
    """Every method ``repeat`` times per size, in rotating order; returns the times (None: the
    run failed) and the number of failed runs."""
    max_transfer = max(4 * KiB, -(-max(sizes) // KiB) * KiB)
    with open_driver(port, "loady", max_transfer) as driver:  # boots the board
        addr = driver.ram.transfer
        version = driver.probe.version.version
    print(
        f"U-Boot {version} (qemu_arm64) in QEMU, no KVM; RAM address 0x{addr:x}; "
        f"host load average {os.getloadavg()[0]:.2f}\n"
        f"sizes {', '.join(human(s) for s in sizes)}; "
        f"{repeat} repeat(s), methods alternate; random data, same bytes for all"
    )
    sender_log = SenderLog()
    sender_logger = logging.getLogger("unbrick.transports.xymodem")
    sender_logger.setLevel(logging.DEBUG)
    sender_logger.addHandler(sender_log)
    blob = random.Random(20240601).randbytes(max(sizes))
    runs: Runs = {(size, m): [] for size in sizes for m in METHODS}
    failures = 0
    for size in sizes:
        data = blob[:size]
        image = workdir / "fw.bin"
        image.write_bytes(data)
        for i in range(repeat):
            k = i % len(METHODS)
            for method in METHODS[k:] + METHODS[:k]:
                before = sender_log.retransmissions
                try:
                    if method in SZ_ARGS:
                        t: float | None = run_sz(port, [sz, *SZ_ARGS[method]], image, data, addr)
                    else:
                        transfer = method.split()[1]
                        t = run_unbrick(port, transfer, data, addr, max_transfer)
                except (UnbrickError, OSError) as e:
                    print(f"  {human(size)} {method}: FAILED: {e}")
                    t = None
                    failures += 1
                runs[size, method].append(t)
                shown = "failed" if t is None else f"{t:6.2f} s"
                if method not in SZ_ARGS:
                    shown += f" ({sender_log.retransmissions - before} retransmissions)"
                print(f"  {human(size):>8} run {i + 1} {method:14} {shown}", flush=True)
    sender_logger.removeHandler(sender_log)
    return runs, failures


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--sizes",
        type=lambda s: [parse_size(p) for p in s.split(",")],
        default=[256 * KiB, MiB],
        help="comma-separated image sizes (default 256K,1M)",
    )
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")

    missing = missing_programs()
    if missing:
        print(f"bench: skipped: missing {', '.join(missing)} (./scripts/install-deps)")
        return 0
    sz = shutil.which("sz")
    assert sz is not None
    started = time.monotonic()
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="unbrick-xymodem-bench-") as tmp:
        try:
            with qemu_uboot(Path(tmp)) as port:
                runs, failures = measure(port, sz, args.sizes, args.repeat, Path(tmp))
        except UnbrickError as e:
            print(f"bench: U-Boot in QEMU did not come up: {e.one_line()}")
            return 1
    print_table(args.sizes, runs)
    print(
        f"\ntotal {time.monotonic() - started:.0f} s; "
        f"host load average now {os.getloadavg()[0]:.2f}"
        + (f"; {failures} run(s) FAILED" if failures else "")
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
