"""Taking verified backups from a device, and streaming them back out."""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from pathlib import Path

import pytest

from unbrick.engine.backup import (
    METHOD_DEVICE_HASH,
    METHOD_READ_TWICE,
    WHOLE_STORAGE,
    PartitionSpan,
    backup_covers,
    backup_regions,
    is_partition_backup,
    iter_range,
    iter_region_data,
    take_backup,
    take_partition_backup,
)
from unbrick.engine.events import ListSink, Progress
from unbrick.engine.vault import BackupVault
from unbrick.errors import DeviceError, IntegrityError, UsageError, VerifyError
from unbrick.model.identity import DeviceIdentity, StorageInfo
from unbrick.model.profile import Region
from unbrick.transports.base import Capability

KiB = 1024
MiB = 1024 * KiB
STORAGE = 256 * KiB


class FakeFlash:
    """A bytearray behind FlashRead and DeviceHash.

    ``flaky``: reads touching ``bad`` return corrupted bytes: ``"always"`` on every read (each
    read differently), ``"once"`` on the first read only.
    """

    def __init__(
        self,
        data: bytes,
        *,
        max_transfer: int = 4 * KiB,
        flaky: str | None = None,
        bad: tuple[int, int] = (0, 0),
        short_reads: bool = False,
    ) -> None:
        self.data = bytearray(data)
        self.max_transfer = max_transfer
        self.capabilities = frozenset({Capability.READ, Capability.DEVICE_HASH})
        self.flaky = flaky
        self.bad = bad
        self.short_reads = short_reads
        self.reads: Counter[int] = Counter()
        self.bytes_read = 0
        self.hash_calls: list[tuple[int, int]] = []

    def read(self, offset: int, length: int) -> bytes:
        assert length <= self.max_transfer
        self.reads[offset] += 1
        self.bytes_read += length
        out = bytearray(self.data[offset : offset + length])
        lo, hi = self.bad
        n = self.reads[offset]
        corrupt = self.flaky == "always" or (self.flaky == "once" and n == 1)
        if corrupt and offset < hi and offset + length > lo:
            at = max(lo, offset) - offset
            out[at] ^= n & 0xFF or 1
        if self.short_reads:
            return bytes(out[:-1])
        return bytes(out)

    def device_hash(self, offset: int, length: int, algorithm: str = "sha256") -> str:
        assert algorithm == "sha256"
        self.hash_calls.append((offset, length))
        return hashlib.sha256(self.data[offset : offset + length]).hexdigest().upper()

    def close(self) -> None:
        return None


class ReadOnlyFlash(FakeFlash):
    """No DeviceHash: the backup must read twice."""

    def __init__(self, data: bytes, **kw: object) -> None:
        super().__init__(data, **kw)  # type: ignore[arg-type]
        self.capabilities = frozenset({Capability.READ})

    device_hash = None  # type: ignore[assignment]


def identity(size: int | None = STORAGE) -> DeviceIdentity:
    storage = StorageInfo("spi-nor", size) if size is not None else None
    return DeviceIdentity(model="R1", serial="SN42", storage=storage)


@pytest.fixture
def flash_data() -> bytes:
    return random.Random(11).randbytes(STORAGE)


@pytest.fixture
def vault(tmp_path: Path) -> BackupVault:
    return BackupVault(tmp_path / "vault", tmp_path / "config" / "key", chunk_bytes=16 * KiB)


REGIONS = [
    Region("bootloader", 0, 64 * KiB, kind="bootloader", critical=True),
    Region("env", 64 * KiB, 16 * KiB, kind="env"),
    Region("firmware", 128 * KiB, 100 * KiB),
]


def test_whole_storage_with_device_hash(vault: BackupVault, flash_data: bytes) -> None:
    dev = FakeFlash(flash_data)
    sink = ListSink()
    progress = Progress("backup")
    record = take_backup(
        dev,
        None,
        vault=vault,
        identity=identity(),
        progress=progress,
        sink=sink,
        job_id="J1",
        window_bytes=64 * KiB,
    )
    assert record.id == hashlib.sha256(flash_data).hexdigest()
    assert b"".join(vault.open(record.id)) == flash_data
    assert record.meta["verified_by"] == METHOD_DEVICE_HASH
    assert record.meta["job_id"] == "J1"
    assert record.meta["device_identity"]["serial"] == "SN42"
    (region,) = backup_regions(record)
    assert (region.name, region.offset, region.size_bytes) == (WHOLE_STORAGE, 0, STORAGE)
    assert region.sha256 == record.id
    # Read once, hashed by the device window by window.
    assert dev.bytes_read == STORAGE
    assert dev.hash_calls == [(o, 64 * KiB) for o in range(0, STORAGE, 64 * KiB)]
    assert progress.fraction == 1.0 and progress.done == STORAGE
    assert [(e.kind, e.name) for e in sink.events] == [
        ("step-start", "backup-read"),
        ("step-end", "backup-read"),
    ]
    assert sink.events[1].data["sha256"] == region.sha256 and sink.events[1].job == "J1"


def test_regions_read_twice_without_device_hash(vault: BackupVault, flash_data: bytes) -> None:
    dev = ReadOnlyFlash(flash_data)
    progress = Progress("backup")
    seen: list[float] = []
    progress.on_change = lambda node: seen.append(node.root.fraction)
    progress.interval_s = 0.0
    record = take_backup(
        dev, REGIONS, vault=vault, identity=identity(), progress=progress, sink=ListSink()
    )
    assert record.meta["verified_by"] == METHOD_READ_TWICE
    total = sum(r.size for r in REGIONS)
    assert record.size_bytes == total
    assert dev.bytes_read == 2 * total
    assert progress.total == 2 * total and progress.fraction == 1.0
    assert seen == sorted(seen) and seen[-1] == 1.0
    stored = backup_regions(record)
    assert [(r.name, r.offset, r.size_bytes, r.blob_offset) for r in stored] == [
        ("bootloader", 0, 64 * KiB, 0),
        ("env", 64 * KiB, 16 * KiB, 64 * KiB),
        ("firmware", 128 * KiB, 100 * KiB, 80 * KiB),
    ]
    assert stored[0].critical and stored[0].kind == "bootloader"
    for region in REGIONS:
        expect = flash_data[region.offset : region.end]
        assert b"".join(iter_region_data(vault, record.id, region.name)) == expect
        entry = next(r for r in stored if r.name == region.name)
        assert entry.sha256 == hashlib.sha256(expect).hexdigest()


def test_capability_not_declared_means_read_twice(vault: BackupVault, flash_data: bytes) -> None:
    dev = FakeFlash(flash_data)
    dev.capabilities = frozenset({Capability.READ})
    record = take_backup(
        dev, REGIONS[1:2], vault=vault, identity=identity(), progress=None, sink=ListSink()
    )
    assert record.meta["verified_by"] == METHOD_READ_TWICE and dev.hash_calls == []


@pytest.mark.parametrize("device_cls", [FakeFlash, ReadOnlyFlash])
def test_unreliable_link_is_a_verify_error_naming_the_range(
    vault: BackupVault, flash_data: bytes, device_cls: type[FakeFlash]
) -> None:
    dev = device_cls(flash_data, flaky="always", bad=(130 * KiB + 5, 130 * KiB + 6))
    sink = ListSink()
    with pytest.raises(VerifyError) as err:
        take_backup(
            dev,
            REGIONS,
            vault=vault,
            identity=identity(),
            progress=Progress(),
            sink=sink,
            job_id="J9",
            window_bytes=8 * KiB,
        )
    # The window holding the bad byte: 128 KiB + 0..8 KiB.
    assert err.value.ranges == [(128 * KiB, 8 * KiB)]
    assert "0x20000-0x22000" in err.value.message
    if device_cls is ReadOnlyFlash:
        assert "differs between two reads: the link is unreliable" in err.value.message
    else:
        assert "does not match the device's own hash" in err.value.message
    assert vault.list() == []  # nothing unverified is stored
    kinds = [(e.kind, e.name) for e in sink.events]
    assert ("step-error", "backup-read") in kinds
    assert sum(1 for e in sink.events if e.kind == "log" and e.name == "warning") == 1
    assert dev.reads[128 * KiB] == 3 if device_cls is ReadOnlyFlash else 2


@pytest.mark.parametrize("device_cls", [FakeFlash, ReadOnlyFlash])
def test_one_glitch_is_read_again_and_recovered(
    vault: BackupVault, flash_data: bytes, device_cls: type[FakeFlash]
) -> None:
    dev = device_cls(flash_data, flaky="once", bad=(10 * KiB, 10 * KiB + 1))
    sink = ListSink()
    record = take_backup(dev, None, vault=vault, identity=identity(), progress=None, sink=sink)
    assert b"".join(vault.open(record.id)) == flash_data
    assert record.meta["verification"]["retries"] == 1
    warnings = [e for e in sink.events if e.name == "warning"]
    # The default 1 MiB window is clipped to the 256 KiB region.
    assert len(warnings) == 1 and "backup read of 0x0-0x40000" in warnings[0].data["message"]
    assert warnings[0].data["level"] == "warning"
    assert (warnings[0].data["offset"], warnings[0].data["size"]) == (0, STORAGE)


def test_short_reads_are_device_errors(vault: BackupVault, flash_data: bytes) -> None:
    with pytest.raises(DeviceError, match="returned 4095 bytes"):
        take_backup(
            FakeFlash(flash_data, short_reads=True),
            None,
            vault=vault,
            identity=identity(),
            progress=None,
            sink=ListSink(),
        )
    assert vault.list() == []


def test_bad_requests(vault: BackupVault, flash_data: bytes) -> None:
    dev = FakeFlash(flash_data)
    kw = {"vault": vault, "progress": None, "sink": ListSink()}
    with pytest.raises(UsageError, match="storage size"):
        take_backup(dev, None, identity=identity(None), **kw)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="beyond"):
        take_backup(dev, [Region("x", STORAGE - 10, 20)], identity=identity(), **kw)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="twice"):
        take_backup(dev, [REGIONS[0], REGIONS[0]], identity=identity(), **kw)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="no bytes"):
        take_backup(dev, [Region("x", 0, 0)], identity=identity(), **kw)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="no regions"):
        take_backup(dev, [], identity=identity(), **kw)  # type: ignore[arg-type]
    dev.capabilities = frozenset({Capability.WRITE})
    with pytest.raises(UsageError, match="cannot read"):
        take_backup(dev, None, identity=identity(), **kw)  # type: ignore[arg-type]
    assert dev.bytes_read == 0


def test_covers_and_ranges(vault: BackupVault, flash_data: bytes) -> None:
    record = take_backup(
        FakeFlash(flash_data),
        REGIONS,
        vault=vault,
        identity=identity(),
        progress=None,
        sink=ListSink(),
    )
    assert backup_covers(record, 0, 80 * KiB)  # bootloader + env, adjacent
    assert backup_covers(record, 60 * KiB, 10 * KiB)
    assert backup_covers(record, 128 * KiB, 100 * KiB)
    assert not backup_covers(record, 70 * KiB, 20 * KiB)  # runs into the gap
    assert not backup_covers(record, 200 * KiB, 40 * KiB)  # past the firmware's end
    assert not backup_covers(record, 100 * KiB, 1)
    for offset, size in [
        (0, 80 * KiB),
        (60 * KiB, 10 * KiB),
        (130 * KiB + 3, 5000),
        (128 * KiB, 100 * KiB),
    ]:
        got = b"".join(iter_range(vault, record.id, offset, size))
        assert got == flash_data[offset : offset + size], (offset, size)
    with pytest.raises(UsageError, match="does not cover"):
        iter_range(vault, record.id, 70 * KiB, 20 * KiB)
    with pytest.raises(UsageError, match="bootloader, env, firmware"):
        iter_region_data(vault, record.id, "rootfs")


def test_region_hash_mismatch_is_an_integrity_error(vault: BackupVault) -> None:
    """Metadata whose region hash disagrees with the content is caught while streaming."""
    data = b"\x5a" * 1000
    record = vault.put(
        [data],
        {
            "regions": [
                {
                    "name": "env",
                    "offset": 0,
                    "size_bytes": 1000,
                    "sha256": "00" * 32,
                    "blob_offset": 0,
                }
            ]
        },
    )
    with pytest.raises(IntegrityError, match="region 'env' hashes to"):
        b"".join(iter_region_data(vault, record.id, "env"))
    plain = vault.put([b"no regions"], {"job_id": "J1"})
    with pytest.raises(IntegrityError, match="lists no regions"):
        backup_regions(plain)


def test_covers_accepts_the_metadata_too(vault: BackupVault, flash_data: bytes) -> None:
    from unbrick.engine.backup import covers

    record = take_backup(
        FakeFlash(flash_data),
        REGIONS,
        vault=vault,
        identity=identity(),
        progress=None,
        sink=ListSink(),
    )
    assert covers(record.meta, 0, 80 * KiB) and not covers(record.meta, 0, 81 * KiB)
    assert record.to_dict()["meta"]["regions"][0]["name"] == "bootloader"
    assert record.created_iso.endswith("Z")


class FakePartitions:
    """Named partitions behind Partitions and PartitionRead; ``glitch`` corrupts the first
    read of that (partition, offset)."""

    def __init__(self, parts: dict[str, bytes], glitch: tuple[str, int] | None = None) -> None:
        self.parts = parts
        self.capabilities = frozenset({Capability.PARTITIONS, Capability.PARTITION_READ})
        self.glitch = glitch
        self.reads: Counter[tuple[str, int]] = Counter()

    def partition_size(self, name: str) -> int | None:
        return len(self.parts[name]) if name in self.parts else None

    def read_partition(self, name: str, offset: int, size: int) -> bytes:
        data = self.parts[name]
        assert offset >= 0 and offset + size <= len(data), (name, offset, size)
        self.reads[name, offset] += 1
        out = bytearray(data[offset : offset + size])
        if self.glitch == (name, offset) and self.reads[name, offset] == 1:
            out[0] ^= 0xFF
        return bytes(out)

    def close(self) -> None:
        return None


def test_named_partitions_are_read_twice_and_stored_by_name(vault: BackupVault) -> None:
    rng = random.Random(5)
    parts = {"misc": rng.randbytes(3 * MiB + 100), "persist": rng.randbytes(40 * KiB)}
    device = FakePartitions(parts, glitch=("misc", 1 * MiB))
    sink = ListSink()
    record = take_partition_backup(
        device,  # type: ignore[arg-type]
        ["persist", "misc"],
        vault=vault,
        identity=identity(None),
        progress=None,
        sink=sink,
    )
    assert is_partition_backup(record.meta) and record.meta["verified_by"] == METHOD_READ_TWICE
    assert [(r.name, r.size_bytes) for r in backup_regions(record)] == [
        ("persist", 40 * KiB),
        ("misc", 3 * MiB + 100),
    ]
    for name, data in parts.items():
        assert b"".join(iter_region_data(vault, record.id, name)) == data
    # The glitched window was read a third time; every read stayed inside its partition.
    assert device.reads["misc", 1 * MiB] == 3 and device.reads["misc", 0] == 2
    assert record.meta["verification"]["retries"] == 1


def test_partition_backups_need_the_capability_and_known_partitions(vault: BackupVault) -> None:
    device = FakePartitions({"misc": bytes(4096)})
    kw = {"vault": vault, "identity": identity(None), "progress": None, "sink": ListSink()}
    with pytest.raises(UsageError, match="has no partition 'nosuch'"):
        take_partition_backup(device, ["nosuch"], **kw)  # type: ignore[arg-type]
    device.capabilities = frozenset({Capability.PARTITIONS})
    with pytest.raises(UsageError, match="cannot send its partitions back"):
        take_partition_backup(device, ["misc"], **kw)  # type: ignore[arg-type]
    two = FakePartitions({"a": bytes(10), "b": bytes(10)})
    span = PartitionSpan(two, [("a", 10), ("b", 10)])  # type: ignore[arg-type]
    assert span.read(12, 8) == bytes(8)
    with pytest.raises(UsageError, match="runs past the end of partition 'a'"):
        span.read(5, 10)
