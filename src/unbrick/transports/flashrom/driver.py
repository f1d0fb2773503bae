"""A device driver for flash chips behind a flashrom programmer (``flashrom://PROGRAMMER?...``).

flashrom probes the chip again on every run, and its reads, writes and verifications cover the
whole chip or whole layout regions, so the driver never runs it per erase block:

- **Identify** probes once (chip vendor, name, size, bus and ``--wp-status`` in one run).
  Several matching chip definitions are a UsageError naming them (add ``chip=NAME``); a chip
  other than the expected one (``expect=PART`` or :attr:`FlashromOptions.expected_chip`) is
  refused before anything else happens.
- **Reads** come from a copy of the chip taken by two whole-chip reads that must be equal
  (:meth:`FlashromDriver.read_all`; a difference is a VerifyError naming the first differing
  offset). After a write, the written range is read again from the chip (one region read)
  before it is served: a read-back never returns what the driver merely believes was written.
- **Writes** go through :meth:`FlashromDriver.write_region`: one flashrom run with a layout
  region covering exactly the range (flashrom keeps every byte outside it, even inside a
  shared erase block) and flashrom's own verification; "identical content" is recognised and
  reported as such. The engine's ``erase`` + ``program`` pairs become one such run: an erase is
  held back until the ``program`` that follows it and written as part of it (0xFF where the
  program does not reach); anything else (a read, another erase, close) carries it out first.
- **Write protection**: a range the chip's write protection covers while flashrom cannot lift
  it (status register locked, e.g. by the WP pin) is refused with a PreflightError before
  flashrom is asked to write.

``max_transfer`` is the chip size, so that the engine hands over a whole target in one
``program`` call.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType

from unbrick.errors import (
    DeviceError,
    PreflightError,
    SourceError,
    UnbrickError,
    UsageError,
    VerifyError,
)
from unbrick.model.identity import DeviceIdentity, StorageInfo
from unbrick.model.uri import DeviceAddress
from unbrick.transports.base import Capability
from unbrick.transports.flashrom.layout import (
    LayoutRegion,
    range_region,
    regions_from_entries,
    write_layout_file,
)
from unbrick.transports.flashrom.output import WriteProtect, chip_matches
from unbrick.transports.flashrom.runner import (
    LAYOUT_SOURCES,
    Flashrom,
    Include,
    Operation,
    Programmer,
    Request,
    TimeoutPolicy,
)

log = logging.getLogger(__name__)

#: Erase block reported for SPI NOR chips (flashrom picks the chip's erase commands itself and
#: rewrites partial blocks, so this is only the alignment the engine plans with).
DEFAULT_ERASE_BLOCK = 4096
#: Check id of the refusal of a write-protected range.
CHECK_WRITE_PROTECT = "spi.write_protect"
#: Check id of the refusal of a chip other than the expected one.
CHECK_CHIP = "spi.chip"

_CHUNK = 1 << 20
#: An erased span this short after the programmed data is written with it (0xFF).
_TAIL = 64 * 1024

Data = bytes | bytearray | memoryview | Path


@dataclass(frozen=True)
class FlashromOptions:
    """How the driver runs flashrom."""

    #: The chip the user expects (a part number such as "W25Q128FV" or flashrom's name);
    #: another chip is refused. The URI's ``expect=`` sets it too.
    expected_chip: str | None = None
    timeouts: TimeoutPolicy = field(default_factory=TimeoutPolicy)
    #: Where the driver keeps its copy of the chip and flashrom's files (a private temporary
    #: directory is made inside it and removed on close); None: the system's temporary dir.
    workdir: Path | None = None
    erase_block_bytes: int = DEFAULT_ERASE_BLOCK


@dataclass(frozen=True)
class FlashChip:
    """The chip as flashrom identified it."""

    vendor: str
    #: flashrom's chip definition name ("W25Q128.V").
    name: str
    size_bytes: int
    bus: str
    #: The ``-p`` argument it was found with.
    programmer: str
    #: ``--wp-status`` (supported=False with flashrom's reason when the chip has none).
    wp: WriteProtect | None = None


@dataclass(frozen=True)
class ReadResult:
    """A verified read of the whole chip."""

    size_bytes: int
    sha256: str
    #: How many whole-chip reads were compared (2).
    reads: int
    duration_s: float
    path: Path | None = None


@dataclass(frozen=True)
class WriteResult:
    """One region written by flashrom."""

    offset: int
    size_bytes: int
    #: flashrom found the chip already held this content and wrote nothing.
    identical: bool
    #: flashrom read the chip back after writing and printed VERIFIED.
    verified: bool
    duration_s: float

    @property
    def verified_by(self) -> str:
        return "identical-skip" if self.identical else "flashrom-verify"


@dataclass(frozen=True)
class VerifyResult:
    offset: int
    size_bytes: int
    duration_s: float


class FlashromDriver:
    """A flash chip on a flashrom programmer: Identify, FlashRead, FlashErase, FlashWrite.

    ``device_hash`` is offered too, but not declared as Capability.DEVICE_HASH: the digest is
    computed by the host over a fresh read, not by the device. Use :func:`open_flashrom`.
    """

    def __init__(
        self,
        address: DeviceAddress,
        programmer: Programmer,
        *,
        flashrom: Flashrom | None = None,
        options: FlashromOptions | None = None,
    ) -> None:
        self.address = address
        self.programmer = programmer
        self.options = options or FlashromOptions()
        self.flashrom = flashrom or Flashrom(timeouts=self.options.timeouts)
        self.expected_chip = self.options.expected_chip or address.param("expect") or None
        self.capabilities: frozenset[Capability] = frozenset(
            {Capability.IDENTIFY, Capability.READ, Capability.ERASE, Capability.WRITE}
        )
        #: The chip size once probed (the engine then hands over whole targets).
        self.max_transfer = _CHUNK
        self._chip: FlashChip | None = None
        self._dir: Path | None = None
        self._cache: Path | None = None
        self._stale: list[tuple[int, int]] = []
        self._pending_erase: tuple[int, int] | None = None
        self._closed = False

    # -----------------------------------------------------------------------------------------
    # life cycle

    def __enter__(self) -> FlashromDriver:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Carry out an erase still held back, then remove the driver's files."""
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self._closed = True
            if self._dir is not None:
                shutil.rmtree(self._dir, ignore_errors=True)
                self._dir = None
            self._cache = None

    def _workdir(self) -> Path:
        if self._closed:
            raise UsageError(f"{self.address.uri}: the device was closed")
        if self._dir is None:
            base = self.options.workdir
            try:
                if base is not None:
                    base.mkdir(parents=True, exist_ok=True)
                self._dir = Path(tempfile.mkdtemp(prefix="unbrick-flashrom-", dir=base))
            except OSError as e:
                raise SourceError(f"could not make a work directory in {base}: {e}") from e
        return self._dir

    # -----------------------------------------------------------------------------------------
    # identify

    @property
    def chip(self) -> FlashChip:
        """The chip (probed on first use)."""
        return self._chip if self._chip is not None else self.probe()

    def probe(self) -> FlashChip:
        """Probe the chip and read its write-protect status (one flashrom run)."""
        request = Request(self.programmer, Operation.PROBE, wp_status=True)
        report = self.flashrom.run(request)
        found = report.chip
        assert found is not None  # check_report refuses runs without exactly one chip
        chip = FlashChip(
            vendor=found.vendor,
            name=found.name,
            size_bytes=found.size_bytes,
            bus=found.bus,
            programmer=self.programmer.argument,
            wp=report.wp,
        )
        if self.expected_chip and not chip_matches(self.expected_chip, chip.name):
            raise PreflightError(
                f"the chip on {self.programmer.name} is {chip.vendor} {chip.name} "
                f"({chip.size_bytes // 1024} KiB), not the expected {self.expected_chip}",
                check_id=CHECK_CHIP,
                hint="nothing was written; clip the right chip or fix expect= in the device URI",
            )
        before = self._chip
        if before is not None and (before.name, before.size_bytes) != (
            chip.name,
            chip.size_bytes,
        ):
            log.warning("the chip changed from %s to %s; dropping the copy", before.name, chip.name)
            self._drop_cache()
        self._chip = chip
        self.max_transfer = chip.size_bytes
        return chip

    def identify(self) -> DeviceIdentity:
        """Probe the chip (again) and describe it. SPI chips have no serial number flashrom
        can read: the programmer and its parameters stand in for one."""
        chip = self.probe()
        extra = {
            "vendor": chip.vendor,
            "chip": chip.name,
            "bus": chip.bus,
            "programmer": self.programmer.name,
        }
        if chip.wp is not None:
            extra["write_protect"] = chip.wp.describe()
            if chip.wp.supported:
                extra["wp_mode"] = chip.wp.mode or ""
                extra["wp_start"] = str(chip.wp.start)
                extra["wp_length"] = str(chip.wp.length)
        storage_type = "spi-nor" if "SPI" in chip.bus.upper() else "nor"
        return DeviceIdentity(
            model=chip.name,
            serial=chip.programmer,
            storage=StorageInfo(
                storage_type, chip.size_bytes, erase_block_bytes=self.options.erase_block_bytes
            ),
            extra=extra,
        )

    def wp_status(self, *, refresh: bool = True) -> WriteProtect | None:
        """The chip's write protection (``--wp-status``); None when flashrom said nothing."""
        return (self.probe() if refresh else self.chip).wp

    def read_layout(self, source: str = "fmap") -> tuple[LayoutRegion, ...]:
        """The regions the chip declares: its FMAP (``source="fmap"``) or Intel flash
        descriptor (``"ifd"``), as flashrom reads them."""
        if source not in LAYOUT_SOURCES:
            raise UsageError(f"layout source {source!r} is not one of {', '.join(LAYOUT_SOURCES)}")
        chip = self.chip
        self.flush()
        request = Request(
            self.programmer, Operation.PROBE, layout_from=source, verbose=True, wp_status=True
        )
        report = self.flashrom.run(request, size_bytes=chip.size_bytes)
        regions = regions_from_entries(report.layout, chip.size_bytes)
        if not regions:
            raise DeviceError(
                f"flashrom listed no {source} regions on the chip",
                hint="give the region by offset and size instead",
            )
        return regions

    # -----------------------------------------------------------------------------------------
    # checks and files

    def _check_range(self, offset: int, length: int) -> FlashChip:
        chip = self.chip
        if offset < 0 or length < 0 or offset + length > chip.size_bytes:
            raise UsageError(
                f"range 0x{offset:x}+{length} is outside the {chip.size_bytes}-byte chip "
                f"{chip.name}"
            )
        return chip

    def _check_writable(self, offset: int, length: int) -> None:
        wp = self.chip.wp
        if wp is not None and wp.blocks(offset, length):
            raise PreflightError(
                f"the chip's write protection ({wp.describe()}) covers "
                f"0x{offset:x}-0x{offset + length - 1:x} and cannot be lifted by flashrom",
                check_id=CHECK_WRITE_PROTECT,
                hint="nothing was written; release the WP pin (or disable the protection with "
                "flashrom --wp-disable while the pin is inactive), then retry",
            )

    def _data_file(self, data: Data, name: str) -> tuple[Path, int]:
        if isinstance(data, Path):
            try:
                size = data.stat().st_size
            except OSError as e:
                raise SourceError(f"{data}: {e.strerror}") from e
            if not data.is_file():
                raise SourceError(f"{data} is not a regular file")
            return data.resolve(), size
        path = self._workdir() / name
        try:
            path.write_bytes(data)
        except OSError as e:
            raise SourceError(f"could not write {path}: {e.strerror}") from e
        return path, len(data)

    def _blank(self) -> Path:
        """A chip-sized file of zeros without data blocks: flashrom wants an image of the
        chip's size next to ``-i REGION:FILE``, and uses only the region's file."""
        path = self._workdir() / "blank.bin"
        size = self.chip.size_bytes
        if not path.exists() or path.stat().st_size != size:
            with open(path, "wb") as f:
                f.truncate(size)
        return path

    def _region_request(
        self, operation: Operation, offset: int, length: int, file: Path | None
    ) -> Request:
        chip = self.chip
        image: Path | None = None
        if offset == 0 and length == chip.size_bytes:
            image = file if operation is not Operation.ERASE else None
            return Request(self.programmer, operation, image=image)
        region = range_region(offset, length, chip.size_bytes)
        layout = write_layout_file(self._workdir() / "layout.txt", [region])
        if operation is Operation.READ:
            image = Path(os.devnull)
        elif operation in (Operation.WRITE, Operation.VERIFY):
            image = self._blank()
        return Request(
            self.programmer,
            operation,
            image=image,
            layout_file=layout,
            include=(Include(region.name, file),),
        )

    # -----------------------------------------------------------------------------------------
    # whole-chip reads and the copy

    def _drop_cache(self) -> None:
        if self._cache is not None:
            self._cache.unlink(missing_ok=True)
        self._cache = None
        self._stale = []

    def _read_chip(self, path: Path) -> None:
        chip = self.chip
        self.flashrom.run(
            Request(self.programmer, Operation.READ, image=path), size_bytes=chip.size_bytes
        )
        size = path.stat().st_size if path.exists() else -1
        if size != chip.size_bytes:
            raise DeviceError(
                f"flashrom wrote {size} bytes for the {chip.size_bytes}-byte chip {chip.name}"
            )

    def _load_cache(self) -> ReadResult:
        """Read the whole chip twice, compare, keep the copy."""
        self.flush()
        chip = self.chip
        work = self._workdir()
        t0 = time.monotonic()
        first, second = work / "read-1.bin", work / "read-2.bin"
        try:
            self._read_chip(first)
            self._read_chip(second)
            digest = _compare_reads(first, second)
        except BaseException:
            first.unlink(missing_ok=True)
            raise
        finally:
            second.unlink(missing_ok=True)
        self._drop_cache()
        cache = work / "chip.bin"
        os.replace(first, cache)
        self._cache = cache
        self._stale = []
        return ReadResult(chip.size_bytes, digest, 2, time.monotonic() - t0)

    def _fresh(self, offset: int, length: int) -> Path:
        """The copy, with any range written since it was taken read again from the chip."""
        self.flush()
        if self._cache is None:
            self._load_cache()
        elif self._stale and any(s < offset + length and offset < e for s, e in self._stale):
            start = min(s for s, _ in self._stale)
            end = max(e for _, e in self._stale)
            data = self.read_region(start, end - start)
            assert self._cache is not None
            with open(self._cache, "r+b") as f:
                f.seek(start)
                f.write(data)
            self._stale = []
        assert self._cache is not None
        return self._cache

    def _mark_stale(self, offset: int, length: int) -> None:
        if self._cache is not None and length > 0:
            self._stale.append((offset, offset + length))

    def read_all(self) -> bytes:
        """The whole chip, read twice and compared (a difference is a VerifyError naming the
        first differing offset)."""
        self._load_cache()
        assert self._cache is not None
        return self._cache.read_bytes()

    def backup_to(self, path: Path) -> ReadResult:
        """Read the whole chip twice, compare, and store it at ``path`` (atomically)."""
        result = self._load_cache()
        assert self._cache is not None
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            shutil.copyfile(self._cache, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise SourceError(f"could not write the backup {path}: {e.strerror}") from e
        return replace(result, path=path)

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` from the verified copy of the chip (taken on first
        use; ranges written since are read again first)."""
        self._check_range(offset, length)
        if length == 0:
            return b""
        cache = self._fresh(offset, length)
        with open(cache, "rb") as f:
            f.seek(offset)
            return f.read(length)

    def read_region(self, offset: int, length: int) -> bytes:
        """Read ``length`` bytes at ``offset`` from the chip now (one flashrom run, one read)."""
        chip = self._check_range(offset, length)
        if length == 0:
            return b""
        self.flush()
        out = self._workdir() / "region-read.bin"
        out.unlink(missing_ok=True)
        if offset == 0 and length == chip.size_bytes:
            self._read_chip(out)
        else:
            self.flashrom.run(
                self._region_request(Operation.READ, offset, length, out),
                size_bytes=chip.size_bytes,
            )
        try:
            data = out.read_bytes()
        except OSError as e:
            raise DeviceError(f"flashrom left no region file ({e.strerror})") from e
        finally:
            out.unlink(missing_ok=True)
        if len(data) != length:
            raise DeviceError(
                f"flashrom returned {len(data)} bytes for a {length}-byte read at 0x{offset:x}"
            )
        return data

    def device_hash(self, offset: int, length: int, algorithm: str = "sha256") -> str:
        """Digest of a range of the chip, computed on the host over the verified copy (ranges
        written since it was taken are read again first)."""
        self._check_range(offset, length)
        try:
            h = hashlib.new(algorithm)
        except ValueError as e:
            raise UsageError(f"unknown hash algorithm {algorithm!r}") from e
        cache = self._fresh(offset, length)
        with open(cache, "rb") as f:
            f.seek(offset)
            left = length
            while left:
                piece = f.read(min(_CHUNK, left))
                if not piece:
                    raise DeviceError(f"the copy of the chip ends before 0x{offset + length:x}")
                h.update(piece)
                left -= len(piece)
        return h.hexdigest()

    # -----------------------------------------------------------------------------------------
    # writes

    def write_region(self, offset: int, data: Data) -> WriteResult:
        """Write ``data`` (bytes or a file) at ``offset`` and leave every other byte as it is.

        One flashrom run: the whole chip when the data covers it, else a layout region covering
        exactly the range. flashrom verifies the chip afterwards; an identical chip is skipped.
        """
        self.flush()
        return self._write(offset, data)

    def _write(self, offset: int, data: Data) -> WriteResult:
        chip = self.chip
        path, size = self._data_file(data, "write.bin")
        if size == 0:
            raise UsageError("nothing to write: the data is empty")
        self._check_range(offset, size)
        self._check_writable(offset, size)
        request = self._region_request(Operation.WRITE, offset, size, path)
        t0 = time.monotonic()
        try:
            report = self.flashrom.run(request, size_bytes=chip.size_bytes)
        finally:
            self._mark_stale(offset, size)
        return WriteResult(offset, size, report.identical, report.verified, time.monotonic() - t0)

    def restore_region(self, region: LayoutRegion, data: Data) -> WriteResult:
        """Write ``data`` (exactly the region's size) into ``region`` only."""
        size = self._data_file(data, "restore.bin")[1] if isinstance(data, Path) else len(data)
        if size != region.size_bytes:
            raise UsageError(
                f"the data for region {region.name} is {size} bytes; the region holds "
                f"{region.size_bytes}"
            )
        return self.write_region(region.offset, data)

    def verify_region(self, offset: int, data: Data) -> VerifyResult:
        """Have flashrom compare the chip at ``offset`` with ``data``: VerifyError naming the
        first differing address otherwise."""
        self.flush()
        chip = self.chip
        path, size = self._data_file(data, "verify.bin")
        self._check_range(offset, size)
        if size == 0:
            return VerifyResult(offset, 0, 0.0)
        t0 = time.monotonic()
        self.flashrom.run(
            self._region_request(Operation.VERIFY, offset, size, path),
            size_bytes=chip.size_bytes,
        )
        return VerifyResult(offset, size, time.monotonic() - t0)

    def erase_region(self, offset: int, length: int) -> None:
        """Erase ``length`` bytes at ``offset`` now (to 0xFF), leaving the rest as it is."""
        self.flush()
        self._erase_now(offset, length)

    def _erase_now(self, offset: int, length: int) -> None:
        chip = self._check_range(offset, length)
        if length == 0:
            return
        self._check_writable(offset, length)
        try:
            self.flashrom.run(
                self._region_request(Operation.ERASE, offset, length, None),
                size_bytes=chip.size_bytes,
            )
        finally:
            self._mark_stale(offset, length)

    def flush(self) -> None:
        """Carry out an erase held back for a ``program`` that has not come."""
        pending, self._pending_erase = self._pending_erase, None
        if pending is not None:
            start, end = pending
            self._erase_now(start, end - start)

    # FlashErase / FlashWrite (the engine's calls)

    def erase(self, offset: int, length: int) -> None:
        """Erase ``offset``..``offset+length``: held back and done with the ``program`` that
        follows (one flashrom run), or before anything else touches the chip."""
        self._check_range(offset, length)
        if length == 0:
            return
        self._check_writable(offset, length)
        end = offset + length
        pending = self._pending_erase
        if pending is not None and offset <= pending[1] and pending[0] <= end:
            self._pending_erase = (min(offset, pending[0]), max(end, pending[1]))
            return
        self.flush()
        self._pending_erase = (offset, end)

    def program(self, offset: int, data: bytes) -> None:
        """Write ``data`` at ``offset`` (flashrom verifies it). An erase held back that covers
        the range is written in the same run: 0xFF from its start up to ``offset``."""
        size = len(data)
        self._check_range(offset, size)
        if size == 0:
            return
        pending = self._pending_erase
        if pending is not None and pending[0] <= offset and offset + size <= pending[1]:
            start, end = pending
            self._pending_erase = None
            stop = offset + size
            if end - stop <= max(self.options.erase_block_bytes, _TAIL):
                stop = end  # the erased tail after the data goes in the same run, as 0xFF
            elif stop < end:
                self._pending_erase = (stop, end)
            if start == offset and stop == offset + size:
                self._write(offset, data)
                return
            block = bytearray(b"\xff" * (stop - start))
            block[offset - start : offset - start + size] = data
            self._write(start, block)
            return
        self.flush()
        self._write(offset, data)


def _compare_reads(first: Path, second: Path) -> str:
    """SHA-256 of ``first`` when ``second`` is equal; VerifyError naming where they differ."""
    h = hashlib.sha256()
    first_bad: int | None = None
    last_bad: int | None = None
    pos = 0
    with open(first, "rb") as fa, open(second, "rb") as fb:
        while True:
            a = fa.read(_CHUNK)
            b = fb.read(_CHUNK)
            if not a and not b:
                break
            if a != b:
                n = min(len(a), len(b))
                diffs = list(_differing(a, b, n))
                lo = diffs[0] if diffs else n
                hi = diffs[-1] if diffs else max(len(a), len(b)) - 1
                first_bad = pos + lo if first_bad is None else first_bad
                last_bad = pos + hi
            h.update(a)
            pos += len(a)
    if first_bad is not None:
        assert last_bad is not None
        raise VerifyError(
            f"two reads of the chip differ, first at offset 0x{first_bad:x} "
            f"(last at 0x{last_bad:x})",
            ranges=[(first_bad, last_bad - first_bad + 1)],
            hint="the connection to the chip is unreliable: check the clip, wires and supply "
            "voltage, then read again; nothing was written",
        )
    return h.hexdigest()


def _differing(a: bytes, b: bytes, n: int) -> Iterator[int]:
    """Offsets below ``n`` where ``a`` and ``b`` differ: the first and the last only."""
    lo = next((i for i in range(n) if a[i] != b[i]), None)
    if lo is None:
        return
    yield lo
    hi = next(i for i in range(n - 1, -1, -1) if a[i] != b[i])
    if hi != lo:
        yield hi


def open_flashrom(
    address: DeviceAddress,
    *,
    timeout_s: float = 10.0,
    options: FlashromOptions | None = None,
    flashrom: Flashrom | None = None,
) -> FlashromDriver:
    """Open ``flashrom://PROGRAMMER?params`` and probe the chip (refusing an unexpected one).

    ``timeout_s`` is the least time the probe may take (the policy's ``base_s`` when larger);
    ``flashrom`` replaces the program runner (tests).
    """
    programmer = Programmer.from_address(address)
    opts = options or FlashromOptions()
    if timeout_s > opts.timeouts.base_s:
        opts = replace(opts, timeouts=replace(opts.timeouts, base_s=timeout_s))
    driver = FlashromDriver(address, programmer, flashrom=flashrom, options=opts)
    try:
        driver.probe()
    except BaseException:
        with contextlib.suppress(UnbrickError):
            driver.close()
        raise
    return driver


__all__ = [
    "CHECK_CHIP",
    "CHECK_WRITE_PROTECT",
    "DEFAULT_ERASE_BLOCK",
    "FlashChip",
    "FlashromDriver",
    "FlashromOptions",
    "ReadResult",
    "VerifyResult",
    "WriteResult",
    "open_flashrom",
]
