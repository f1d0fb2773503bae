"""Take a verified backup of a device's storage into the vault, and stream it back out.

The read is verified window by window (``window_bytes``, 1 MiB by default) before the window
goes to the vault, so memory stays bounded and nothing unverified is stored:

- ``device-hash``: the device hashes the window itself (DeviceHash) and the host compares that
  with the SHA-256 of the bytes it received;
- ``read-twice``: without a device hash, the window is read a second time and both reads must
  be equal.

A window that fails is read once more (a third read that agrees with one of the earlier two,
or with the device's hash, is accepted); if it still fails, VerifyError names the range. The
regions are stored as one blob (concatenated in the given order) with per-region offsets,
sizes and SHA-256 in the backup's metadata, and the verification method as ``verified_by``.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

from unbrick.engine.events import Event, EventSink, Progress
from unbrick.engine.vault import BackupRecord, BackupVault
from unbrick.errors import DeviceError, IntegrityError, UnbrickError, UsageError, VerifyError
from unbrick.model.identity import DeviceIdentity
from unbrick.model.profile import Region
from unbrick.transports.base import (
    Capability,
    Device,
    DeviceHash,
    FlashRead,
    PartitionRead,
    Partitions,
)

log = logging.getLogger(__name__)

#: Verification granularity: a failure names a range of at most this size.
WINDOW_BYTES = 1 << 20
#: The region name used when the whole storage is backed up.
WHOLE_STORAGE = "storage"
METHOD_DEVICE_HASH = "device-hash"
METHOD_READ_TWICE = "read-twice"
#: ``meta["addressing"]`` of a backup of named partitions (see :class:`PartitionSpan`).
ADDRESSING_PARTITIONS = "partitions"
#: Bytes asked for in one read of a partition (one ``fetch``).
PARTITION_TRANSFER = 1 << 20


@dataclass(frozen=True)
class BackupRegion:
    """One region inside a backup: where it was on the device and where it is in the blob."""

    name: str
    offset: int
    size_bytes: int
    sha256: str
    blob_offset: int
    kind: str = "data"
    critical: bool = False

    @property
    def end(self) -> int:
        return self.offset + self.size_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "offset": self.offset,
            "size_bytes": self.size_bytes,
            "sha256": self.sha256,
            "blob_offset": self.blob_offset,
            "kind": self.kind,
            "critical": self.critical,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BackupRegion:
        return cls(
            name=str(d["name"]),
            offset=int(d["offset"]),
            size_bytes=int(d["size_bytes"]),
            sha256=str(d["sha256"]),
            blob_offset=int(d["blob_offset"]),
            kind=str(d.get("kind", "data")),
            critical=bool(d.get("critical", False)),
        )


def backup_regions(record: BackupRecord | Mapping[str, Any]) -> list[BackupRegion]:
    """The regions a backup holds, in blob order (from its record or its ``meta``)."""
    meta = record.meta if isinstance(record, BackupRecord) else record
    name = record.short_id if isinstance(record, BackupRecord) else "metadata"
    raw = meta.get("regions")
    if not isinstance(raw, list):
        raise IntegrityError(
            f"backup {name}: its metadata lists no regions",
            hint="this is not a device backup; take a new one",
        )
    try:
        return [BackupRegion.from_dict(r) for r in raw]
    except (KeyError, TypeError, ValueError) as e:
        raise IntegrityError(f"backup {name}: bad region entry in its metadata: {e}") from e


def backup_covers(record: BackupRecord | Mapping[str, Any], offset: int, size: int) -> bool:
    """True when the device range ``offset``..``offset+size`` lies inside the backed-up
    regions (adjacent regions together count). ``record`` may also be the backup's ``meta``."""
    if size <= 0:
        return True
    pos, end = offset, offset + size
    spans = sorted((r.offset, r.end) for r in backup_regions(record))
    for start, stop in spans:
        if start > pos:
            break
        pos = max(pos, stop)
        if pos >= end:
            return True
    return pos >= end


#: Short name for :func:`backup_covers`.
covers = backup_covers


def _has(device: object, capability: Capability, protocol: type) -> bool:
    capabilities = getattr(device, "capabilities", None)
    if capabilities is not None and capability not in capabilities:
        return False
    return isinstance(device, protocol)


def _plan_regions(regions: Sequence[Region] | None, identity: DeviceIdentity) -> list[Region]:
    storage = identity.storage.size_bytes if identity.storage is not None else None
    if regions is None:
        if storage is None:
            raise UsageError(
                f"{identity.model} serial {identity.serial} did not report its storage size",
                hint="name the regions to back up",
            )
        return [Region(WHOLE_STORAGE, 0, storage, kind="data")]
    chosen = list(regions)
    if not chosen:
        raise UsageError("no regions to back up", hint="pass None to back up the whole storage")
    seen: set[str] = set()
    for region in chosen:
        if region.name in seen:
            raise UsageError(f"region {region.name!r} is listed twice for the backup")
        seen.add(region.name)
        if region.offset < 0 or region.size <= 0:
            raise UsageError(
                f"region {region.name!r} has no bytes to back up "
                f"(offset {region.offset}, size {region.size})"
            )
        if storage is not None and region.end > storage:
            raise UsageError(
                f"region {region.name!r} ends at 0x{region.end:x}, beyond the device's "
                f"{storage}-byte storage",
                hint="check the profile against the device",
            )
    return chosen


class _Reader:
    """Verified windowed reads from one device."""

    def __init__(
        self,
        device: FlashRead,
        hasher: DeviceHash | None,
        progress: Progress | None,
        sink: EventSink,
        job_id: str,
    ) -> None:
        self.device = device
        self.hasher = hasher
        self.progress = progress
        self.sink = sink
        self.job_id = job_id
        self.transfer = max(1, int(device.max_transfer))
        self.retries = 0
        self.reads = 0

    def _read(self, start: int, length: int) -> list[bytes]:
        pieces = []
        pos, end = start, start + length
        while pos < end:
            n = min(self.transfer, end - pos)
            data = self.device.read(pos, n)
            if len(data) != n:
                raise DeviceError(
                    f"the device returned {len(data)} bytes for a {n}-byte read at 0x{pos:x}"
                )
            pieces.append(bytes(data))
            pos += n
            self.reads += 1
            if self.progress is not None:
                self.progress.advance(n)
        return pieces

    def _device_hash(self, start: int, length: int) -> str:
        assert self.hasher is not None
        return self.hasher.device_hash(start, length, "sha256").strip().lower()

    def _warn(self, message: str, start: int, length: int) -> None:
        log.warning("%s", message)
        self.sink.emit(
            Event(
                "log",
                "warning",
                self.job_id,
                data={"level": "warning", "message": message, "offset": start, "size": length},
            )
        )

    def window(self, start: int, length: int) -> list[bytes]:
        """The window's bytes, verified; VerifyError when two tries do not verify."""
        span = f"0x{start:x}-0x{start + length:x}"
        first = self._read(start, length)
        if self.hasher is not None:
            expected = self._device_hash(start, length)
            if _sha256(first) == expected:
                return first
            self.retries += 1
            self._warn(
                f"backup read of {span} does not match the device's hash; reading it again",
                start,
                length,
            )
            again = self._read(start, length)
            if _sha256(again) in (expected, self._device_hash(start, length)):
                return again
            raise VerifyError(
                f"backup read of {span} does not match the device's own hash, twice: "
                "the link is unreliable",
                ranges=[(start, length)],
                hint="nothing was written; check the cable, lower the link speed and retry",
            )
        second = self._read(start, length)
        if second == first:
            return first
        self.retries += 1
        self._warn(
            f"backup read of {span} differs between two reads; reading it a third time",
            start,
            length,
        )
        third = self._read(start, length)
        if third in (first, second):
            return third
        raise VerifyError(
            f"backup read of {span} differs between two reads: the link is unreliable",
            ranges=[(start, length)],
            hint="nothing was written; check the cable, lower the link speed and retry",
        )


def _sha256(pieces: list[bytes]) -> str:
    h = hashlib.sha256()
    for piece in pieces:
        h.update(piece)
    return h.hexdigest()


def take_backup(
    device: Device,
    regions: Sequence[Region] | None,
    *,
    vault: BackupVault,
    identity: DeviceIdentity,
    progress: Progress | None,
    sink: EventSink,
    job_id: str = "",
    window_bytes: int = WINDOW_BYTES,
    extra_meta: Mapping[str, Any] | None = None,
) -> BackupRecord:
    """Read ``regions`` (None: the whole storage) from ``device``, verify, store in ``vault``.

    ``progress`` is a leaf whose ``total`` is set here to the number of bytes that will be read
    (twice the size for read-twice verification) and advanced as they are. Each region is a
    step: ``step-start``/``step-end`` (or ``step-error``) events named ``backup-read`` go to
    ``sink``; a window read again is a ``log`` event named ``warning``.
    """
    if not _has(device, Capability.READ, FlashRead):
        raise UsageError(
            "this device's link cannot read its storage, so no backup can be taken",
            hint="use a transport that can read the flash",
        )
    hasher: DeviceHash | None = None
    if _has(device, Capability.DEVICE_HASH, DeviceHash):
        hasher = cast(DeviceHash, device)
    method = METHOD_DEVICE_HASH if hasher is not None else METHOD_READ_TWICE
    chosen = _plan_regions(regions, identity)
    total = sum(r.size for r in chosen)
    if progress is not None:
        progress.total = float(total * (1 if hasher is not None else 2))
        progress.unit = "B"
    reader = _Reader(cast(FlashRead, device), hasher, progress, sink, job_id)
    transfer = reader.transfer
    window = max(transfer, (max(window_bytes, 1) // transfer) * transfer)
    stored: list[BackupRegion] = []

    def stream() -> Iterator[bytes]:
        blob_offset = 0
        for region in chosen:
            args = {
                "region": region.name,
                "offset": region.offset,
                "size_bytes": region.size,
                "method": method,
            }
            sink.emit(Event("step-start", "backup-read", job_id, data=args))
            t0 = time.monotonic()
            retries = reader.retries
            digest = hashlib.sha256()
            try:
                for start in range(region.offset, region.end, window):
                    for piece in reader.window(start, min(window, region.end - start)):
                        digest.update(piece)
                        yield piece
            except Exception as e:
                error = e.one_line() if isinstance(e, UnbrickError) else f"{type(e).__name__}: {e}"
                sink.emit(
                    Event(
                        "step-error",
                        "backup-read",
                        job_id,
                        data={
                            **args,
                            "error": error,
                            "duration_s": round(time.monotonic() - t0, 3),
                        },
                    )
                )
                raise
            entry = BackupRegion(
                name=region.name,
                offset=region.offset,
                size_bytes=region.size,
                sha256=digest.hexdigest(),
                blob_offset=blob_offset,
                kind=region.kind,
                critical=region.critical,
            )
            stored.append(entry)
            blob_offset += region.size
            sink.emit(
                Event(
                    "step-end",
                    "backup-read",
                    job_id,
                    data={
                        **args,
                        "sha256": entry.sha256,
                        "retries": reader.retries - retries,
                        "duration_s": round(time.monotonic() - t0, 3),
                    },
                )
            )

    def meta() -> dict[str, Any]:
        address = getattr(device, "address", None)
        return {
            "kind": "device-backup",
            "job_id": job_id,
            "device_uri": getattr(address, "uri", None),
            "device_identity": identity.to_dict(),
            "regions": [r.to_dict() for r in stored],
            "size_bytes": total,
            "verified_by": method,
            "verification": {
                "method": method,
                "window_bytes": window,
                "reads": reader.reads,
                "retries": reader.retries,
            },
            **(extra_meta or {}),
        }

    record = vault.put(stream(), meta)
    if progress is not None:
        progress.finish()
    log.info(
        "backup %s of %s serial %s: %d bytes in %d region(s), verified by %s",
        record.short_id,
        identity.model,
        identity.serial,
        record.size_bytes,
        len(stored),
        method,
    )
    return record


class PartitionSpan:
    """Named partitions of a device with ``Capability.PARTITION_READ`` as one readable address
    space (a ``FlashRead``): each partition starts where the previous one ends, so that
    :func:`take_backup` reads them as regions that do not overlap. A read never crosses from
    one partition into the next (take_backup reads inside one region at a time)."""

    max_transfer = PARTITION_TRANSFER

    def __init__(self, device: Device, partitions: Sequence[tuple[str, int]]) -> None:
        self.address = getattr(device, "address", None)
        self.capabilities = frozenset({Capability.READ})
        self._device = cast(PartitionRead, device)
        spans: list[Region] = []
        at = 0
        for name, size in partitions:
            spans.append(Region(name, at, size, kind="data"))
            at += size
        self.regions: tuple[Region, ...] = tuple(spans)

    def read(self, offset: int, length: int) -> bytes:
        for region in self.regions:
            if region.offset <= offset < region.end:
                if offset + length > region.end:
                    raise UsageError(
                        f"a read of {length} bytes at {offset - region.offset} runs past the "
                        f"end of partition '{region.name}'"
                    )
                return self._device.read_partition(region.name, offset - region.offset, length)
        raise UsageError(f"offset {offset} is in none of the partitions being read")

    def close(self) -> None:
        """The device is closed by its owner."""


def take_partition_backup(
    device: Device,
    partitions: Sequence[str],
    *,
    vault: BackupVault,
    identity: DeviceIdentity,
    progress: Progress | None,
    sink: EventSink,
    job_id: str = "",
) -> BackupRecord:
    """Back up whole partitions, by name, of a device of named partitions that can read them
    back (``Capability.PARTITIONS`` and ``Capability.PARTITION_READ``), read twice and
    compared window by window, as :func:`take_backup` does."""
    caps = device.capabilities
    if Capability.PARTITIONS not in caps or Capability.PARTITION_READ not in caps:
        raise UsageError(
            "this device cannot send its partitions back, so no backup can be taken",
            hint="fastboot needs a bootloader with 'fetch' (fastbootd of Android 12+); back the "
            "device up another way",
        )
    if not partitions:
        raise UsageError("no partitions to back up", hint="name them with --region NAME")
    sizes: list[tuple[str, int]] = []
    for name in partitions:
        size = cast(Partitions, device).partition_size(name)
        if not size:
            raise UsageError(
                f"the device has no partition '{name}', or does not say how large it is",
                hint="check the name against 'unbrick device probe --json'",
            )
        sizes.append((name, size))
    span = PartitionSpan(device, sizes)
    return take_backup(
        cast(Device, span),
        span.regions,
        vault=vault,
        identity=identity,
        progress=progress,
        sink=sink,
        job_id=job_id,
        extra_meta={"addressing": ADDRESSING_PARTITIONS},
    )


def is_partition_backup(meta: Mapping[str, Any]) -> bool:
    """True for a backup of named partitions (its offsets are not device addresses)."""
    return meta.get("addressing") == ADDRESSING_PARTITIONS


def _find_region(record: BackupRecord, name: str) -> BackupRegion:
    found = backup_regions(record)
    for region in found:
        if region.name == name:
            return region
    names = ", ".join(r.name for r in found) or "none"
    raise UsageError(
        f"backup {record.short_id} has no region {name!r} (it holds: {names})",
        hint="name one of the backed-up regions",
    )


def _stream_region_part(
    vault: BackupVault, record: BackupRecord, region: BackupRegion, start: int, length: int
) -> Iterator[bytes]:
    """``length`` bytes of ``region`` from device offset ``start``; the whole region is also
    checked against its recorded SHA-256."""
    whole = start == region.offset and length == region.size_bytes
    digest = hashlib.sha256() if whole else None
    pieces = vault.open(
        record.id, offset=region.blob_offset + (start - region.offset), length=length
    )
    for piece in pieces:
        if digest is not None:
            digest.update(piece)
        yield piece
    if digest is not None and digest.hexdigest() != region.sha256:
        raise IntegrityError(
            f"backup {record.short_id}: region {region.name!r} hashes to "
            f"{digest.hexdigest()}, not the recorded {region.sha256}",
            hint="do not restore from this backup; use another copy",
        )


def iter_region_data(vault: BackupVault, backup_id: str, region_name: str) -> Iterator[bytes]:
    """Stream one region of a backup (for a restore), checked against its recorded hash.

    Chunks are authenticated as they are decrypted; the region's SHA-256 is checked when its
    last byte has been read (an IntegrityError then means: discard what was streamed).
    """
    record = vault.get(backup_id)
    region = _find_region(record, region_name)
    return _stream_region_part(vault, record, region, region.offset, region.size_bytes)


def iter_range(vault: BackupVault, backup_id: str, offset: int, size: int) -> Iterator[bytes]:
    """Stream the backed-up content of the device range ``offset``..``offset+size``.

    The range may span adjacent regions; a region read whole is also checked against its
    recorded SHA-256. UsageError when the backup does not cover the range.
    """
    record = vault.get(backup_id)
    if not backup_covers(record, offset, size):
        spans = ", ".join(f"{r.name} 0x{r.offset:x}-0x{r.end:x}" for r in backup_regions(record))
        raise UsageError(
            f"backup {record.short_id} does not cover 0x{offset:x}-0x{offset + size:x} "
            f"(it holds {spans})",
            hint="restore from a backup that holds the whole range",
        )
    return _iter_covered(vault, record, offset, size)


def _iter_covered(
    vault: BackupVault, record: BackupRecord, offset: int, size: int
) -> Iterator[bytes]:
    regions = backup_regions(record)
    pos, end = offset, offset + size
    while pos < end:
        # The region holding ``pos`` that reaches furthest (regions may overlap).
        region = max(
            (r for r in regions if r.offset <= pos < r.end), key=lambda r: r.end, default=None
        )
        if region is None:  # backup_covers said yes; this would be a bug
            raise IntegrityError(f"backup {record.short_id}: no region holds 0x{pos:x}")
        stop = min(end, region.end)
        yield from _stream_region_part(vault, record, region, pos, stop - pos)
        pos = stop


__all__ = [
    "ADDRESSING_PARTITIONS",
    "METHOD_DEVICE_HASH",
    "METHOD_READ_TWICE",
    "WHOLE_STORAGE",
    "WINDOW_BYTES",
    "BackupRegion",
    "PartitionSpan",
    "backup_covers",
    "backup_regions",
    "covers",
    "is_partition_backup",
    "iter_range",
    "iter_region_data",
    "take_backup",
    "take_partition_backup",
]
