"""Fixtures and helpers of the TFTP tests: servers on 127.0.0.1 port 0, peer programs, a
deterministic loss hook, and a raw UDP client for packet-level checks."""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from unbrick.transports.tftp import TftpServer
from unbrick.transports.tftp.transfer import Direction

ROOT = Path(__file__).resolve().parents[2]


def in_tftpd() -> str | None:
    """tftpd-hpa's server: unpacked beside atftpd (the packages conflict), or on PATH.

    atftpd installs ``in.tftpd`` as a link to itself, so a PATH hit counts only when it is not
    atftpd.
    """
    unpacked = ROOT / ".peers" / "usr" / "sbin" / "in.tftpd"
    if unpacked.is_file() and os.access(unpacked, os.X_OK):
        return str(unpacked)
    found = shutil.which("in.tftpd")
    if found and Path(found).resolve().name != "atftpd":
        return found
    return None


def need_in_tftpd() -> str:
    """Like conftest ``need``: fails in CI, skips elsewhere."""
    path = in_tftpd()
    if path is None:
        msg = "tftpd-hpa's in.tftpd is not installed (run ./scripts/install-deps)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return path


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def udp_listening(port: int) -> bool:
    """Whether some socket is bound to UDP 127.0.0.1:port (from /proc/net/udp)."""
    try:
        lines = Path("/proc/net/udp").read_text().splitlines()[1:]
    except OSError:
        return True
    want = f"0100007F:{port:04X}"
    return any(line.split()[1] == want for line in lines if len(line.split()) > 1)


def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not udp_listening(port):
        if proc.poll() is not None:
            out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
            pytest.fail(f"peer server exited {proc.returncode} before listening:\n{out}")
        if time.monotonic() > deadline:
            pytest.fail(f"peer server did not listen on UDP port {port}")
        time.sleep(0.02)


@contextmanager
def peer_server(argv: list[str], port: int) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_listening(port, proc)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        if proc.stdout:
            proc.stdout.close()


@contextmanager
def tftpd_hpa(root: Path) -> Iterator[int]:
    """tftpd-hpa on 127.0.0.1 (it exits 66 in a loopback-only namespace: see PEERS.md)."""
    binary = need_in_tftpd()
    port = free_udp_port()
    argv = [binary, "-L", "-4", "-a", f"127.0.0.1:{port}", "-s", "-c", "-u", "root"]
    with peer_server([*argv, "-B", "65464", str(root)], port):
        yield port


@contextmanager
def atftpd(root: Path) -> Iterator[int]:
    """atftpd in the foreground on 127.0.0.1 (``--daemon --no-fork``), logging to stdout."""
    from tests.conftest import need

    need("atftpd")
    port = free_udp_port()
    argv = [
        "atftpd", "--daemon", "--no-fork", "--port", str(port), "--bind-address", "127.0.0.1",
        "--user", "root.root", "--logfile", "-", "--retry-timeout", "1", str(root),
    ]  # fmt: skip
    with peer_server(argv, port):
        yield port


def run_peer(argv: list[str], timeout_s: float = 120.0) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(argv, capture_output=True, timeout=timeout_s, check=False)


def output(proc: subprocess.CompletedProcess[bytes]) -> str:
    return (proc.stdout + proc.stderr).decode(errors="replace")


class SeededLoss:
    """Drops ``rate`` of the datagrams it sees, from a seeded generator (thread-safe).

    Requests (RRQ/WRQ) are never dropped: a peer client only repeats its request after its
    own, long timeout. Everything else (DATA, ACK, OACK, ERROR) may be.
    """

    def __init__(self, rate: float, seed: int) -> None:
        self.rate = rate
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.dropped = {"in": 0, "out": 0}
        self.seen = {"in": 0, "out": 0}

    def __call__(self, direction: Direction, datagram: bytes) -> bool:
        if datagram[:2] in (b"\0\1", b"\0\2"):
            return False
        with self.lock:
            self.seen[direction] += 1
            if self.rng.random() < self.rate:
                self.dropped[direction] += 1
                return True
        return False


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    root.mkdir()
    return root


@pytest.fixture
def make_server(data_root: Path) -> Iterator[Callable[..., TftpServer]]:
    servers: list[TftpServer] = []

    def make(**kw: Any) -> TftpServer:
        kw.setdefault("host", "127.0.0.1")
        kw.setdefault("timeout_s", 0.2)
        server = TftpServer(kw.pop("root", data_root), **kw)
        server.start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


def payload(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


class RawClient:
    """A UDP socket for speaking TFTP packet by packet."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(2.0)

    def send(self, datagram: bytes, to: tuple[str, int]) -> None:
        self.sock.sendto(datagram, to)

    def recv(self, timeout_s: float = 2.0) -> tuple[bytes, tuple[str, int]]:
        self.sock.settimeout(timeout_s)
        data, peer = self.sock.recvfrom(70000)
        return data, (str(peer[0]), int(peer[1]))

    def recv_all(self, timeout_s: float) -> list[tuple[float, bytes, tuple[str, int]]]:
        """Every datagram until ``timeout_s`` passes without one; with arrival times."""
        got = []
        while True:
            try:
                data, peer = self.recv(timeout_s)
            except TimeoutError:
                return got
            got.append((time.monotonic(), data, peer))

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def raw() -> Iterator[RawClient]:
    client = RawClient()
    yield client
    client.close()
