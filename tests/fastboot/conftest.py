"""Fixtures of the fastboot tests: a simulated phone served on 127.0.0.1 (TCP and UDP)."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from unbrick.formats import sparse
from unbrick.formats.base import Context, Source
from unbrick.sim.fastboot_phone import FastbootPhone, FastbootServer, PhoneFaults

KiB = 1024
MiB = 1024 * KiB

#: A small A/B phone: fast to create, fast to compare.
LAYOUT = (
    ("boot_a", 4 * MiB),
    ("boot_b", 4 * MiB),
    ("vbmeta_a", 64 * KiB),
    ("vbmeta_b", 64 * KiB),
    ("system_a", 16 * MiB),
    ("system_b", 16 * MiB),
    ("misc", 64 * KiB),
    ("userdata", 1 * MiB),
)
FAST = PhoneFaults(reboot_offline_s=0.1, offline_s=0.3)


@dataclass
class Served:
    phone: FastbootPhone
    server: FastbootServer
    dir: Path
    port: int

    def part(self, name: str) -> bytes:
        return (self.dir / f"{name}.img").read_bytes()

    def url(self, link: str = "tcp") -> str:
        return f"fastboot+{link}://127.0.0.1:{self.port}"


ServeFactory = Callable[..., Served]


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[ServeFactory]:
    """Start a phone: ``serve(max_download_size=..., unlocked=..., faults=...)``."""
    started: list[Served] = []

    def start(
        *,
        max_download_size: int | None = None,
        unlocked: bool | None = None,
        faults: PhoneFaults = FAST,
        product: str | None = None,
        name: str = "phone",
    ) -> Served:
        state = tmp_path / name
        phone = FastbootPhone.open(
            state,
            layout=LAYOUT,
            max_download_size=max_download_size,
            unlocked=unlocked,
            faults=faults,
            product=product,
        )
        server = FastbootServer(phone)
        ports = server.start()
        assert ports.tcp_port == ports.udp_port
        served = Served(phone, server, state, ports.tcp_port)
        started.append(served)
        return served

    yield start
    for served in started:
        served.server.stop()


@pytest.fixture
def phone(serve: ServeFactory) -> Served:
    return serve()


def random_image(path: Path, size: int, *, data_every: int = 0, seed: int = 1) -> bytes:
    """A raw image: random data, or (``data_every``) a 64 KiB random run every so often."""
    rng = random.Random(seed)
    if data_every:
        buf = bytearray(size)
        for at in range(0, size, data_every):
            n = min(64 * KiB, size - at)
            buf[at : at + n] = rng.randbytes(n)
        data = bytes(buf)
    else:
        data = rng.randbytes(size)
    path.write_bytes(data)
    return data


def to_sparse(raw: Path, out: Path) -> None:
    """The Android sparse image of ``raw`` (as img2simg makes it)."""
    with raw.open("rb") as f, out.open("wb") as o:
        sparse.write_sparse(Source(f), o, Context())


def padded(data: bytes, size: int) -> bytes:
    """What a partition of ``size`` bytes holds after ``data`` went to its start (zeros after)."""
    return data + bytes(size - len(data))
