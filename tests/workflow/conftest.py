"""A workbench wired to a simulated device over loopback, for workflow tests."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from unbrick.engine.events import ListSink
from unbrick.engine.paths import WorkbenchPaths
from unbrick.engine.store import SQLiteStore
from unbrick.engine.vault import BackupVault
from unbrick.engine.workflow import FlashRequest, IntegrityRequest, Workbench
from unbrick.model.profile_toml import ProfileSet, builtin_profile_sources
from unbrick.model.uri import DeviceAddress
from unbrick.sim.device import Faults, SimDevice
from unbrick.sim.firmware import build_firmware, manifest_for_image
from unbrick.sim.kinds import create_device
from unbrick.sim.server import SimServer
from unbrick.transports.base import Device
from unbrick.transports.registry import OpenOptions, open_device
from unbrick.transports.sim import RegistryEntry, write_registry

MODELS = {"router": "SimRouter", "router-ab": "SimRouterAB"}


@dataclass
class Bench:
    tmp: Path
    kind: str
    name: str
    device: SimDevice
    server: SimServer
    registry: Path
    paths: WorkbenchPaths
    sink: ListSink = field(default_factory=ListSink)
    store: SQLiteStore | None = None

    @property
    def uri(self) -> str:
        return f"sim://{self.name}"

    @property
    def model(self) -> str:
        return MODELS[self.kind]

    def open(self, address: DeviceAddress) -> Device:
        return open_device(address, OpenOptions(sim_registry=self.registry, timeout_s=5.0))

    def workbench(self) -> Workbench:
        if self.store is None:
            self.store = SQLiteStore(self.paths.db_path)
        return Workbench(
            store=self.store,
            vault=BackupVault(self.paths.vault_dir, self.paths.key_file),
            profiles=ProfileSet.from_sources(builtin_profile_sources(), []),
            open_device=self.open,
            sink=self.sink,
            workdir=self.paths.state_dir / "work",
        )

    def flash_bytes(self) -> bytes:
        """The whole flash, read through the device object (works in every state)."""
        size = self.device.flash.geometry.size_bytes
        step = 1 << 20
        return b"".join(self.device.spi_read(o, min(step, size - o)) for o in range(0, size, step))

    def flash_digest(self) -> str:
        return hashlib.sha256(self.flash_bytes()).hexdigest()

    def firmware(
        self,
        version: str,
        *,
        model: str | None = None,
        security_version: int = 1,
        hw_revisions: tuple[str, ...] = ("B1", "B2"),
        regions: tuple[str, ...] = ("EU", "US"),
        size_bytes: int = 200_000,
        panic: bool = False,
        manifest: bool = True,
        target: str = "firmware",
        name: str | None = None,
    ) -> Path:
        image = build_firmware(
            model or self.model,
            version,
            security_version=security_version,
            hw_revisions=hw_revisions,
            regions=regions,
            size_bytes=size_bytes,
            panic=panic,
        )
        path = self.tmp / (name or f"fw-{version}.bin")
        path.write_bytes(image)
        if manifest:
            path.with_name(path.name + ".manifest.toml").write_text(
                manifest_for_image(image, target=target)
            )
        return path

    def request(self, image: Path, **kw: object) -> FlashRequest:
        return FlashRequest(image=image, **kw)  # type: ignore[arg-type]

    def set_faults(self, faults: Faults) -> None:
        self.device.set_faults(faults)

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
        self.server.stop()
        self.device.close()


def make_bench(tmp: Path, kind: str = "router", name: str = "dut", **device_kw: object) -> Bench:
    state = tmp / "sim-state"
    device = create_device(kind, state, name, **device_kw)  # type: ignore[arg-type]
    server = SimServer(device)
    ports = server.start()
    registry = tmp / "sims"
    registry.mkdir(exist_ok=True)
    write_registry(
        registry, RegistryEntry(name, ports.host, ports.port, ports.spi_port, os.getpid(), kind)
    )
    paths = WorkbenchPaths.from_env({"UNBRICK_HOME": str(tmp / "home")})
    paths.ensure()
    return Bench(tmp, kind, name, device, server, registry, paths)


@pytest.fixture
def bench(tmp_path: Path) -> Iterator[Bench]:
    b = make_bench(tmp_path, "router")
    try:
        yield b
    finally:
        b.close()


@pytest.fixture
def bench_ab(tmp_path: Path) -> Iterator[Bench]:
    b = make_bench(tmp_path, "router-ab")
    try:
        yield b
    finally:
        b.close()


__all__ = ["Bench", "Faults", "IntegrityRequest", "make_bench"]
