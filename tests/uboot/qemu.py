"""Debian's U-Boot in QEMU, for tests: a private network namespace per machine, the serial
console on a unix socket, and a TCP relay on 127.0.0.1 so drivers use ``uboot+tcp://``.

QEMU runs as ``unshare -n sh -c 'ip link set lo up && exec "$@"' sh qemu-system-...``: it has
no network but its own loopback. The console chardev is ``-serial unix:PATH,server=on,wait=on``
(a filesystem socket, reachable across network namespaces); QEMU waits for the first
connection before it starts the guest, so no output is lost. :class:`Relay` listens on
127.0.0.1 (a port picked by the kernel), connects to the unix socket when its first TCP client
arrives (which powers the board on), and splices one TCP client at a time to it: like a serial
line, output with no client attached is lost, and a new client finds U-Boot where the last one
left it. The relay also records what the host sent, and can stop forwarding (a console that
stops answering) when it sees a given command.
"""

from __future__ import annotations

import os
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
import zlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.uboot.ethnet import GuestNet

UBOOT_DIR = Path("/usr/lib/u-boot")
NOR_BYTES = 64 * 1024 * 1024
#: U-Boot's environment on QEMU virt: first 256 KiB of flash bank 2 (CONFIG_ENV_SIZE).
ENV_BYTES = 0x40000

ARCHES = {
    "arm64": ("qemu-system-aarch64", ["-cpu", "cortex-a57"], "qemu_arm64"),
    "arm": ("qemu-system-arm", [], "qemu_arm"),
}


def _fail_or_skip(message: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


_NETNS_OK: list[bool] = []


def need_qemu(arch: str = "arm64") -> None:
    """Skip (locally) or fail (in CI) when QEMU, U-Boot or network namespaces are missing."""
    program, _, build = ARCHES[arch]
    for tool in (program, "unshare", "ip"):
        if shutil.which(tool) is None:
            _fail_or_skip(f"peer program '{tool}' is not installed (run ./scripts/install-deps)")
    if not (UBOOT_DIR / build / "u-boot.bin").is_file():
        _fail_or_skip(f"{UBOOT_DIR / build / 'u-boot.bin'} is missing (package u-boot-qemu)")
    if not _NETNS_OK:
        proc = subprocess.run(
            ["unshare", "-n", "sh", "-c", "ip link set lo up"], capture_output=True, timeout=30
        )
        _NETNS_OK.append(proc.returncode == 0)
    if not _NETNS_OK[0]:
        _fail_or_skip("cannot create a network namespace here (unshare -n needs root)")


def env_image(variables: Mapping[str, str], size: int = ENV_BYTES) -> bytes:
    """A U-Boot environment block (what ``mkenvimage -s SIZE`` makes): CRC-32 (little
    endian) of the data, then ``name=value`` strings, each NUL-terminated, and zero padding."""
    body = b"".join(f"{k}={v}".encode() + b"\0" for k, v in variables.items()) + b"\0"
    data = body.ljust(size - 4, b"\0")
    return struct.pack("<I", zlib.crc32(data)) + data


def make_nor(path: Path, env: Mapping[str, str] | None = None) -> Path:
    """A 64 MiB flash bank: erased (0xFF), with an environment at its start if given."""
    with open(path, "wb") as f:
        block = b"\xff" * (1 << 20)
        for _ in range(NOR_BYTES >> 20):
            f.write(block)
        if env is not None:
            f.seek(0)
            f.write(env_image(env))
    return path


def make_disk(path: Path, size: int = 64 * 1024 * 1024) -> Path:
    """A blank (sparse, zero) disk image."""
    with open(path, "wb") as f:
        f.truncate(size)
    return path


class Relay:
    """127.0.0.1 TCP port <-> a unix-socket serial console (one TCP client at a time)."""

    def __init__(self, unix_path: Path, *, connect_timeout_s: float = 20.0) -> None:
        self.unix_path = unix_path
        self.connect_timeout_s = connect_timeout_s
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(4)
        self.port: int = self._listener.getsockname()[1]
        self._unix: socket.socket | None = None
        self._client: socket.socket | None = None
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._listener, selectors.EVENT_READ, "listen")
        self._stop = threading.Event()
        self._lock = threading.Lock()
        #: Everything hosts sent, and everything the device printed (while forwarded).
        self.host_bytes = bytearray()
        self.device_bytes = bytearray()
        self.stalled = threading.Event()
        self._stall_on: bytes | None = None
        self.connections = 0
        self._thread = threading.Thread(target=self._loop, name="uboot-relay", daemon=True)
        self._thread.start()

    # -- control ---------------------------------------------------------------------------

    def stall(self) -> None:
        """From now on, forward nothing either way: the console stops answering."""
        self.stalled.set()

    def stall_on(self, command: bytes) -> None:
        """Stall as soon as a host sends ``command`` (e.g. b"loadx")."""
        with self._lock:
            self._stall_on = command

    def host_text(self) -> str:
        with self._lock:
            return self.host_bytes.decode("utf-8", "replace")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for s in (self._client, self._unix, self._listener):
            if s is not None:
                with suppress(OSError):
                    s.close()
        self._sel.close()

    # -- the loop ---------------------------------------------------------------------------

    def _connect_unix(self) -> None:
        deadline = time.monotonic() + self.connect_timeout_s
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(str(self.unix_path))
                break
            except OSError:
                s.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        s.setblocking(False)
        self._unix = s
        self._sel.register(s, selectors.EVENT_READ, "unix")

    def _drop_client(self) -> None:
        if self._client is not None:
            self._sel.unregister(self._client)
            self._client.close()
            self._client = None

    def _loop(self) -> None:
        while not self._stop.is_set():
            for key, _ in self._sel.select(timeout=0.1):
                if key.data == "listen":
                    conn, _ = self._listener.accept()
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    self._drop_client()
                    if self._unix is None:
                        self._connect_unix()
                    conn.setblocking(False)
                    self._client = conn
                    self.connections += 1
                    self._sel.register(conn, selectors.EVENT_READ, "client")
                elif key.data == "unix":
                    try:
                        data = self._unix.recv(65536) if self._unix else b""
                    except BlockingIOError:
                        continue
                    if not data:  # QEMU exited
                        self._sel.unregister(key.fileobj)
                        if self._unix is not None:
                            self._unix.close()
                        self._unix = None
                        self._drop_client()
                        continue
                    if self.stalled.is_set() or self._client is None:
                        continue
                    with self._lock:
                        self.device_bytes += data
                    try:
                        self._client.setblocking(True)
                        self._client.sendall(data)
                        self._client.setblocking(False)
                    except OSError:
                        self._drop_client()
                elif key.data == "client":
                    try:
                        data = self._client.recv(65536) if self._client else b""
                    except BlockingIOError:
                        continue
                    except OSError:
                        data = b""
                    if not data:
                        self._drop_client()
                        continue
                    with self._lock:
                        self.host_bytes += data
                        trigger = self._stall_on
                        if trigger and trigger in self.host_bytes[-(len(data) + len(trigger)) :]:
                            self.stalled.set()
                    if self.stalled.is_set() or self._unix is None:
                        continue
                    self._unix.setblocking(True)
                    self._unix.sendall(data)
                    self._unix.setblocking(False)


@dataclass
class QemuUBoot:
    """One QEMU ``virt`` machine running Debian's U-Boot, reachable at :attr:`uri`."""

    workdir: Path
    arch: str = "arm64"
    disk: Path | None = None
    nvme: Path | None = None
    nor: Path | None = None
    memory_mib: int = 512
    #: Give the guest a NIC wired to :class:`~tests.uboot.ethnet.GuestNet` (UDP port 69 of
    #: its host goes to ``tftp_port`` on 127.0.0.1).
    network: bool = False
    tftp_port: int = 69
    net_loss: float = 0.0
    proc: subprocess.Popen[bytes] | None = None
    relay: Relay | None = None
    net: GuestNet | None = None
    _sockdir: Path | None = None
    argv: list[str] = field(default_factory=list)

    @property
    def uri(self) -> str:
        assert self.relay is not None
        return f"uboot+tcp://127.0.0.1:{self.relay.port}"

    def command(self, console: Path) -> list[str]:
        program, cpu, build = ARCHES[self.arch]
        argv = [
            program,
            "-M",
            "virt",
            *cpu,
            "-m",
            str(self.memory_mib),
            "-display",
            "none",
            "-monitor",
            "none",
            *(self.net.qemu_args() if self.net is not None else ["-nic", "none"]),
            "-bios",
            str(UBOOT_DIR / build / "u-boot.bin"),
            "-serial",
            f"unix:{console},server=on,wait=on",
        ]
        if self.nor is not None:
            argv += ["-drive", f"if=pflash,unit=1,format=raw,file={self.nor}"]
        if self.disk is not None:
            argv += [
                "-drive",
                f"if=none,id=vd0,format=raw,file={self.disk}",
                "-device",
                "virtio-blk-device,drive=vd0",
            ]
        if self.nvme is not None:
            argv += [
                "-drive",
                f"if=none,id=nv0,format=raw,file={self.nvme}",
                "-device",
                "nvme,serial=UNBRICK0001,drive=nv0",
            ]
        return argv

    def start(self) -> QemuUBoot:
        # Unix socket paths are limited to 108 bytes: keep them short, outside tmp_path.
        self._sockdir = Path(tempfile.mkdtemp(prefix="ubq", dir="/tmp"))
        console = self._sockdir / "con"
        if self.network:
            self.net = GuestNet(self._sockdir, port_map={69: self.tftp_port}, loss=self.net_loss)
        self.argv = self.command(console)
        log = open(self.workdir / f"qemu-{self.arch}.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *self.argv],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + 20
        while not console.exists():
            if self.proc.poll() is not None:
                text = (self.workdir / f"qemu-{self.arch}.log").read_text(errors="replace")
                pytest.fail(f"QEMU exited {self.proc.returncode}: {text}")
            if time.monotonic() > deadline:
                pytest.fail("QEMU did not open its console socket within 20 s")
            time.sleep(0.02)
        self.relay = Relay(console)
        return self

    def stop(self) -> int | None:
        """SIGTERM (QEMU flushes its disks), then wait; returns QEMU's exit status."""
        rc = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
            try:
                rc = self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                rc = self.proc.wait(5)
        if self.relay is not None:
            self.relay.close()
        if self.net is not None:
            self.net.close()
        if self._sockdir is not None:
            shutil.rmtree(self._sockdir, ignore_errors=True)
        return rc

    def pause(self) -> None:
        """Freeze the machine (SIGSTOP): the console stops answering."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def __enter__(self) -> QemuUBoot:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextmanager
def qemu_uboot(
    workdir: Path,
    *,
    arch: str = "arm64",
    disk: bool = True,
    nvme: bool = False,
    nor_env: Mapping[str, str] | None = None,
    disk_bytes: int = 64 * 1024 * 1024,
    network: bool = False,
    tftp_port: int = 69,
    net_loss: float = 0.0,
) -> Iterator[QemuUBoot]:
    """Start a machine with blank disk(s) and a blank NOR bank in ``workdir``."""
    need_qemu(arch)
    machine = QemuUBoot(
        workdir=workdir,
        arch=arch,
        disk=make_disk(workdir / "disk.img", disk_bytes) if disk else None,
        nvme=make_disk(workdir / "nvme.img", disk_bytes) if nvme else None,
        nor=make_nor(workdir / "nor.img", nor_env),
        network=network,
        tftp_port=tftp_port,
        net_loss=net_loss,
    )
    with machine:
        yield machine
