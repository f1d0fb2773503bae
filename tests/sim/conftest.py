"""Fixtures of the simulator tests: devices in tmp_path, servers on 127.0.0.1 port 0."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from unbrick.model.profile import Region
from unbrick.model.uri import parse_device_uri
from unbrick.sim.device import Faults, SimDevice
from unbrick.sim.kinds import create_device
from unbrick.sim.server import ServerPorts, SimServer
from unbrick.transports.sim import RegistryEntry, SimDriver, open_sim, write_registry

FAST = Faults(power_on_delay_s=0.01)


def to_recovery(dev: SimDevice) -> None:
    """Reset the device into its bootloader and wait for it."""
    dev.reset(recovery=True)
    assert dev.wait_state(("bootloader", "dead"), 5.0) == "bootloader"


def reboot(dev: SimDevice) -> str:
    dev.reset()
    return dev.wait_state(("bootloader", "firmware", "dead"), 5.0)


def write_region(dev: SimDevice, region: Region, data: bytes) -> None:
    """Erase ``region`` and program ``data`` at its start (device in its bootloader)."""
    dev.erase(region.offset, region.size)
    for pos in range(0, len(data), 1 << 20):
        dev.program(region.offset + pos, data[pos : pos + (1 << 20)])


@pytest.fixture
def router(tmp_path: Path) -> Iterator[SimDevice]:
    dev = create_device("router", tmp_path / "state", "r1", faults=FAST)
    yield dev
    dev.close()


@pytest.fixture
def router_ab(tmp_path: Path) -> Iterator[SimDevice]:
    dev = create_device("router-ab", tmp_path / "state", "ab1", faults=FAST)
    yield dev
    dev.close()


class Served:
    def __init__(self, dev: SimDevice, registry: Path) -> None:
        self.device = dev
        self.registry = registry
        self.server = SimServer(dev)
        self.ports: ServerPorts = self.server.start()
        write_registry(
            registry,
            RegistryEntry(
                dev.name, "127.0.0.1", self.ports.port, self.ports.spi_port, os.getpid(), dev.kind
            ),
        )

    def open(self, query: str = "", timeout_s: float = 5.0, wait_s: float = 1.0) -> SimDriver:
        uri = f"sim://{self.device.name}{query}"
        return open_sim(
            parse_device_uri(uri),
            registry_dir=self.registry,
            timeout_s=timeout_s,
            connect_wait_s=wait_s,
        )


@pytest.fixture
def served(router: SimDevice, tmp_path: Path) -> Iterator[Served]:
    s = Served(router, tmp_path / "registry")
    yield s
    s.server.stop()


@pytest.fixture
def served_ab(router_ab: SimDevice, tmp_path: Path) -> Iterator[Served]:
    s = Served(router_ab, tmp_path / "registry")
    yield s
    s.server.stop()
