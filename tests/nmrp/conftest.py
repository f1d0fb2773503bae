"""Private network namespaces joined by a veth pair, and threads that run inside them.

Every namespaced test gets two fresh namespaces ("host" and "router") created with
``ip netns add``, one veth pair between them, and nothing else: no address outside the
namespaces is ever touched, and both namespaces (with the veth pair) are deleted afterwards.
Code under test runs in a thread that has joined a namespace with setns(2) (a network
namespace belongs to a thread, and the sockets and child processes it creates stay there), or
in a child process started with ``ip netns exec``.
"""

from __future__ import annotations

import ctypes
import os
import secrets
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.sim.conftest import FAST, to_recovery
from unbrick.sim.device import SimDevice
from unbrick.sim.kinds import create_device

_CLONE_NEWNET = 0x40000000


def need_netns() -> None:
    """Namespaced tests need root and iproute2 (CI runs as root: a missing one fails there)."""
    problem = None
    if os.geteuid() != 0:
        problem = "network namespace tests need root"
    elif shutil.which("ip") is None:
        problem = "the 'ip' program (iproute2) is not installed"
    if problem:
        if os.environ.get("CI"):
            pytest.fail(problem)
        pytest.skip(problem)


def _ip(*args: str) -> str:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)
    if proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


@dataclass(frozen=True)
class VethPair:
    host_ns: str
    router_ns: str
    host_if: str
    router_if: str

    def mac(self, side: str) -> str:
        ns, iface = (
            (self.host_ns, self.host_if) if side == "host" else (self.router_ns, self.router_if)
        )
        for line in _ip("-n", ns, "-o", "link", "show", "dev", iface).split("\\"):
            if "link/ether" in line:
                return line.split("link/ether", 1)[1].split()[0]
        raise AssertionError(f"no MAC address on {iface}")

    def addresses(self, side: str) -> str:
        ns, iface = (
            (self.host_ns, self.host_if) if side == "host" else (self.router_ns, self.router_if)
        )
        return _ip("-n", ns, "-4", "-o", "addr", "show", "dev", iface)


@pytest.fixture
def veth() -> Iterator[VethPair]:
    need_netns()
    tag = secrets.token_hex(3)
    pair = VethPair(f"ubnmrp-{tag}-h", f"ubnmrp-{tag}-r", f"nmh{tag}", f"nmr{tag}")
    created: list[str] = []
    try:
        for ns in (pair.host_ns, pair.router_ns):
            _ip("netns", "add", ns)
            created.append(ns)
        # Created inside the host namespace, so the pair never appears in the root namespace.
        veth = ["type", "veth", "peer", "name", pair.router_if, "netns", pair.router_ns]
        _ip("-n", pair.host_ns, "link", "add", pair.host_if, *veth)
        for ns, iface in ((pair.host_ns, pair.host_if), (pair.router_ns, pair.router_if)):
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "link", "set", iface, "up")
        yield pair
    finally:
        for ns in created:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)


class NsThread:
    """Runs ``fn()`` in a thread inside network namespace ``ns``; ``result()`` joins it."""

    def __init__(self, ns: str, fn: Callable[[], Any]) -> None:
        self._ns = ns
        self._fn = fn
        self._value: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, daemon=True)
        self._thread.start()

    def _main(self) -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/run/netns/{self._ns}", os.O_RDONLY)
            try:
                if libc.setns(fd, _CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns into {self._ns} failed")
            finally:
                os.close(fd)
            self._value = self._fn()
        except BaseException as e:
            self._error = e

    def result(self, timeout_s: float = 30.0) -> Any:
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise AssertionError(f"thread in {self._ns} still runs after {timeout_s} s")
        if self._error is not None:
            raise self._error
        return self._value


def run_in_ns(
    ns: str, argv: list[str | Path], timeout_s: float = 60.0
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", ns, *[str(a) for a in argv]],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


@pytest.fixture
def router(tmp_path: Path) -> Iterator[SimDevice]:
    """A simulated router stopped in its bootloader, where NMRP answers."""
    dev = create_device("router", tmp_path / "state", "nmrp1", faults=FAST)
    to_recovery(dev)
    yield dev
    dev.close()
