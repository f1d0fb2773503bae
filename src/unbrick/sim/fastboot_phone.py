"""A phone in fastboot mode, simulated: partitions in files, A/B slots, lock state, TCP and UDP.

The state directory holds the device: each partition is the file ``DIR/<partition>.img`` (slot
partitions ``boot_a.img``, ``boot_b.img``...; a partition's size is its file's size) and
``DIR/fastboot-phone.json`` keeps the rest (product, serial number, lock state, current slot and
slot metadata, max-download-size, the boot record). An empty directory gets a default layout
(A/B ``boot``, ``dtbo``, ``vbmeta``, ``system``, ``vendor``; ``misc``, ``metadata``,
``userdata``), created as sparse files. The staging buffer of downloads is ``DIR/.download``.

The device speaks the protocol of AOSP's ``fastboot`` client (as the Debian package 29.0.6
does): ``getvar`` (``all`` too), ``download``, ``flash`` (raw images from the start of the
partition; Android sparse images expanded on the device, DONT_CARE blocks left as they were,
so the pieces of a split image add up), ``erase`` (blocks read back as zeros, as on eMMC),
``set_active``, ``reboot`` / ``reboot-bootloader`` / ``reboot-fastboot`` / ``reboot-recovery``
/ ``continue``, ``fetch`` (for backups), ``upload`` (of what ``oem stage-log`` staged),
``oem device-info``, ``flashing lock|unlock|get_unlock_ability``. Flashing, erasing, fetching
and ``set_active`` are refused while the bootloader is locked. The device never sends TEXT
(fastboot 29 does not understand it); slow flashes send INFO lines as keep-alives.

After a reboot the device is away for ``reboot_offline_s`` (TCP connections are accepted and
closed at once, UDP packets go unanswered), then back in fastboot mode (the boot is recorded in
the state file). Faults (:class:`PhoneFaults`) make it vanish in the middle of a download, flash
slowly, fail one partition, corrupt one flash silently, or lack ``fetch``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO

from unbrick.errors import ImageError, LimitError, SourceError, UsageError
from unbrick.formats import sparse
from unbrick.formats.base import Context, MiB, Source
from unbrick.transports.fastboot import protocol as p

log = logging.getLogger(__name__)

STATE_FILE = "fastboot-phone.json"
DOWNLOAD_FILE = ".download"
PARTITION_SUFFIX = ".img"
SLOTS = ("a", "b")
KiB = 1024
GiB = 1024 * MiB

#: (partition, size) of a new device.
DEFAULT_LAYOUT: tuple[tuple[str, int], ...] = (
    ("boot_a", 64 * MiB),
    ("boot_b", 64 * MiB),
    ("dtbo_a", 8 * MiB),
    ("dtbo_b", 8 * MiB),
    ("vbmeta_a", 64 * KiB),
    ("vbmeta_b", 64 * KiB),
    ("system_a", 1 * GiB),
    ("system_b", 1 * GiB),
    ("vendor_a", 256 * MiB),
    ("vendor_b", 256 * MiB),
    ("misc", 1 * MiB),
    ("metadata", 16 * MiB),
    ("userdata", 512 * MiB),
)
_IO = 4 * MiB
_RETRIES = 7


@dataclass(frozen=True)
class PhoneFaults:
    """Misbehaviour for tests."""

    #: Vanish (drop the link, answer nothing) once a download has received this many bytes.
    disconnect_after_bytes: int | None = None
    #: How long the device stays away after vanishing.
    offline_s: float = 1.0
    #: How long a reboot takes before the device is back in fastboot mode.
    reboot_offline_s: float = 0.5
    #: Extra time each flash takes, with an INFO keep-alive every ``info_every_s``.
    flash_delay_s: float = 0.0
    info_every_s: float = 0.5
    #: A partition whose flash and erase fail (a worn-out block).
    fail_partition: str | None = None
    #: No fetch command (older bootloaders): max-fetch-size is not answered.
    no_fetch: bool = False
    #: The next flash of this partition answers OKAY but leaves one byte wrong (worn-out
    #: storage that does not notice); fires once.
    corrupt_partition: str | None = None


@dataclass
class SlotState:
    retry_count: int = _RETRIES
    successful: bool = True
    unbootable: bool = False


@dataclass
class PhoneState:
    """What ``fastboot-phone.json`` holds."""

    product: str = "unbrick-phone"
    serialno: str = "UNBRICK0001"
    unlocked: bool = True
    secure: bool = True
    current_slot: str = "a"
    max_download_size: int = 256 * MiB
    max_fetch_size: int = 64 * MiB
    version_bootloader: str = "unbrick-bl-1.0"
    version_baseband: str = "unbrick-bb-1.0"
    hw_revision: str = "rev1"
    variant: str = "SIM"
    #: In userspace fastboot (fastbootd) after ``reboot-fastboot``; the bootloader otherwise.
    userspace: bool = False
    slots: dict[str, SlotState] = field(default_factory=lambda: {s: SlotState() for s in SLOTS})
    #: Every reboot: {"target": "system"|"bootloader"|..., "slot": "a"}.
    boots: list[dict[str, str]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> PhoneState:
        known = {f for f in cls.__dataclass_fields__}
        values = {k: v for k, v in doc.items() if k in known}
        slots = {
            str(k): SlotState(
                **{kk: vv for kk, vv in v.items() if kk in SlotState.__dataclass_fields__}
            )
            for k, v in (values.pop("slots", None) or {}).items()
            if isinstance(v, dict)
        }
        state = cls(**values)
        if slots:
            state.slots = slots
        return state


class Vanished(Exception):
    """The device dropped off the link (a fault): the link must close without an answer."""


@dataclass(frozen=True)
class DataOut:
    """A data phase towards the host: ``size`` bytes from ``chunks``."""

    size: int
    chunks: Iterable[bytes]


Out = bytes | DataOut


def _okay(message: str = "") -> bytes:
    return p.encode_response(p.ResponseKind.OKAY, message)


def _fail(message: str) -> bytes:
    return p.encode_response(p.ResponseKind.FAIL, message[:250])


def _info(message: str) -> bytes:
    return p.encode_response(p.ResponseKind.INFO, message[:250])


class FastbootPhone:
    """The device: partitions, variables, lock state, the staging buffer. Thread-safe."""

    def __init__(self, state_dir: Path, state: PhoneState, faults: PhoneFaults) -> None:
        self.dir = state_dir
        self.state = state
        self.faults = faults
        self._lock = threading.RLock()
        self._offline_until = 0.0
        #: Bumped when the device vanishes or reboots: links of older generations close.
        self.generation = 0
        self.staged = 0
        self._staged_upload: bytes | None = None
        self._download_seen = 0
        #: How many times each command (``getvar``, ``oem``, ``fetch``...) was received.
        self.received: Counter[str] = Counter()

    # ---------------------------------------------------------------------------------------
    # Creation and persistence

    @classmethod
    def open(
        cls,
        state_dir: Path,
        *,
        product: str | None = None,
        serialno: str | None = None,
        max_download_size: int | None = None,
        unlocked: bool | None = None,
        layout: Iterable[tuple[str, int]] | None = None,
        faults: PhoneFaults | None = None,
    ) -> FastbootPhone:
        """Load the device in ``state_dir`` (creating it with ``layout`` when there is none)
        and apply the given settings (they are saved)."""
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
            if not any(state_dir.glob("*" + PARTITION_SUFFIX)):
                for name, size in layout or DEFAULT_LAYOUT:
                    check_partition_name(name)
                    with (state_dir / f"{name}{PARTITION_SUFFIX}").open("wb") as f:
                        f.truncate(size)
            path = state_dir / STATE_FILE
            state = PhoneState()
            if path.exists():
                state = PhoneState.from_json(json.loads(path.read_text()))
        except (OSError, ValueError, TypeError) as e:
            raise SourceError(f"cannot set up the fastboot phone in {state_dir}: {e}") from e
        if product is not None:
            state.product = product
        if serialno is not None:
            state.serialno = serialno
        if max_download_size is not None:
            if not 4096 <= max_download_size <= p.MAX_DOWNLOAD_BYTES:
                raise UsageError(
                    f"max-download-size {max_download_size} is not 4096..{p.MAX_DOWNLOAD_BYTES}"
                )
            state.max_download_size = max_download_size
        if unlocked is not None:
            state.unlocked = unlocked
        phone = cls(state_dir, state, faults or PhoneFaults())
        if phone.slot_count() and state.current_slot not in phone.slot_names():
            state.current_slot = phone.slot_names()[0]
        phone.save()
        return phone

    def save(self) -> None:
        path = self.dir / STATE_FILE
        tmp = path.with_suffix(".tmp")
        with self._lock:
            tmp.write_text(json.dumps(self.state.to_json(), indent=2) + "\n")
            os.replace(tmp, path)

    # ---------------------------------------------------------------------------------------
    # Partitions

    def partitions(self) -> dict[str, int]:
        """Partition name -> size in bytes, from the files in the state directory."""
        out: dict[str, int] = {}
        for path in sorted(self.dir.glob("*" + PARTITION_SUFFIX)):
            if path.name.startswith("."):
                continue
            out[path.name[: -len(PARTITION_SUFFIX)]] = path.stat().st_size
        return out

    def partition_path(self, name: str) -> Path:
        check_partition_name(name)
        return self.dir / f"{name}{PARTITION_SUFFIX}"

    def slot_names(self) -> list[str]:
        parts = self.partitions()
        return [s for s in SLOTS if any(n.endswith(f"_{s}") for n in parts)]

    def slot_count(self) -> int:
        return len(self.slot_names())

    def _slotted_bases(self) -> set[str]:
        parts = self.partitions()
        return {n[:-2] for n in parts if n[-2:] in ("_a", "_b")}

    def resolve(self, name: str) -> str | None:
        """The partition ``name`` means (a slotted base gets the current slot), or None."""
        parts = self.partitions()
        if name in parts:
            return name
        slotted = f"{name}_{self.state.current_slot}"
        if slotted in parts:
            return slotted
        return None

    # ---------------------------------------------------------------------------------------
    # Variables

    def base_variables(self) -> dict[str, str]:
        st = self.state
        out = {
            "version": "0.4",
            "version-bootloader": st.version_bootloader,
            "version-baseband": st.version_baseband,
            "product": st.product,
            "serialno": st.serialno,
            "secure": "yes" if st.secure else "no",
            "unlocked": "yes" if st.unlocked else "no",
            "variant": st.variant,
            "hw-revision": st.hw_revision,
            "max-download-size": f"0x{st.max_download_size:x}",
            "is-userspace": "yes" if st.userspace else "no",
            "off-mode-charge": "0",
            "battery-voltage": "4100",
            "battery-soc-ok": "yes",
        }
        if not self.faults.no_fetch:
            out["max-fetch-size"] = f"0x{st.max_fetch_size:x}"
        if self.slot_count():
            out["slot-count"] = str(self.slot_count())
            out["current-slot"] = st.current_slot
        return out

    def variable(self, name: str) -> str | None:
        """The answer to ``getvar:NAME`` (None: unknown variable)."""
        base = self.base_variables()
        if name in base:
            return base[name]
        key, _, arg = name.partition(":")
        if not arg:
            return None
        parts = self.partitions()
        if key == "has-slot":
            if arg in self._slotted_bases():
                return "yes"
            return "no" if arg in parts else None
        if key in ("partition-size", "partition-type", "is-logical"):
            if arg not in parts:
                return None
            if key == "partition-size":
                return f"0x{parts[arg]:X}"
            return "raw" if key == "partition-type" else "no"
        if key in ("slot-successful", "slot-unbootable", "slot-retry-count"):
            slot = self.state.slots.get(arg.removeprefix("_"))
            if slot is None or arg.removeprefix("_") not in self.slot_names():
                return None
            if key == "slot-successful":
                return "yes" if slot.successful else "no"
            if key == "slot-unbootable":
                return "yes" if slot.unbootable else "no"
            return str(slot.retry_count)
        return None

    def all_variables(self) -> dict[str, str]:
        out = self.base_variables()
        parts = self.partitions()
        for base in sorted(self._slotted_bases()):
            out[f"has-slot:{base}"] = "yes"
        for name in parts:
            if name[-2:] not in ("_a", "_b"):
                out[f"has-slot:{name}"] = "no"
        for name, size in parts.items():
            out[f"partition-size:{name}"] = f"0x{size:X}"
            out[f"partition-type:{name}"] = "raw"
            out[f"is-logical:{name}"] = "no"
        for slot in self.slot_names():
            for key in ("slot-successful", "slot-unbootable", "slot-retry-count"):
                value = self.variable(f"{key}:{slot}")
                if value is not None:
                    out[f"{key}:{slot}"] = value
        return out

    # ---------------------------------------------------------------------------------------
    # Online/offline

    def note_command(self, name: str) -> None:
        with self._lock:
            self.received[name] += 1

    def online(self) -> bool:
        return time.monotonic() >= self._offline_until

    def go_offline(self, seconds: float) -> None:
        with self._lock:
            self._offline_until = time.monotonic() + seconds
            self.generation += 1
            self.staged = 0

    def wait_online(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while not self.online():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True

    # ---------------------------------------------------------------------------------------
    # Operations (each answers with the response messages)

    def download_path(self) -> Path:
        return self.dir / DOWNLOAD_FILE

    def count_download(self, n: int) -> None:
        """Count download bytes for the vanishing fault; raises Vanished when it fires."""
        limit = self.faults.disconnect_after_bytes
        if limit is None:
            return
        self._download_seen += n
        if self._download_seen >= limit:
            self.faults = replace(self.faults, disconnect_after_bytes=None)
            self._download_seen = 0
            log.info("fastboot phone: vanishing in the middle of a download (fault)")
            self.go_offline(self.faults.offline_s)
            raise Vanished

    def flash(self, name: str) -> Iterator[bytes]:
        target = self.resolve(name)
        if target is None:
            yield _fail(f"partition ({name}) not found")
            return
        if not self.state.unlocked:
            yield _fail("Flashing is not allowed in Lock State")
            return
        if self.faults.fail_partition in (name, target):
            yield _fail(f"write of '{target}' failed: flash write error")
            return
        if not self.staged:
            yield _fail("no image downloaded")
            return
        if self.faults.flash_delay_s > 0:
            end = time.monotonic() + self.faults.flash_delay_s
            while time.monotonic() < end:
                yield _info(f"writing '{target}'...")
                time.sleep(min(self.faults.info_every_s, max(0.0, end - time.monotonic())))
        with self._lock:
            error = self._write_staged(target)
            if not error and self.faults.corrupt_partition in (name, target):
                self._corrupt(target)
        yield _fail(error) if error else _okay()

    def _corrupt(self, target: str) -> None:
        """Flip one byte in the middle of what was just written (the fault fires once)."""
        self.faults = replace(self.faults, corrupt_partition=None)
        at = min(self.staged, self.partitions()[target]) // 2
        with self.partition_path(target).open("r+b") as f:
            f.seek(at)
            old = f.read(1) or b"\0"
            f.seek(at)
            f.write(bytes([old[0] ^ 0xFF]))
        log.info("fastboot phone: flipped the byte at %d of '%s' (fault)", at, target)

    def _write_staged(self, target: str) -> str | None:
        size = self.partitions()[target]
        staged = self.staged
        with self.download_path().open("rb") as src, self.partition_path(target).open("r+b") as dst:
            head = src.read(sparse.FILE_HEADER_SIZE)
            try:
                sparse.parse_header(head)
                is_sparse = True
            except ImageError:
                is_sparse = False
            if not is_sparse:
                if staged > size:
                    return f"size too large: {staged} bytes into '{target}' of {size} bytes"
                _copy_range(src, 0, dst, 0, staged)
                return None
            try:
                layout = sparse.scan_sparse(Source(src, size=staged), Context())
            except (ImageError, LimitError) as e:
                return f"invalid sparse image: {e.message}"
            bs = layout.block_size
            if layout.total_blocks * bs > size:
                return (
                    f"size too large: sparse image of {layout.total_blocks * bs} bytes into "
                    f"'{target}' of {size} bytes"
                )
            for first, count, pattern, offset in layout.runs:
                if pattern is None:
                    _copy_range(src, offset, dst, first * bs, count * bs)
                else:
                    _fill(dst, first * bs, count * bs, pattern)
        return None

    def erase(self, name: str) -> Iterator[bytes]:
        target = self.resolve(name)
        if target is None:
            yield _fail(f"partition ({name}) not found")
            return
        if not self.state.unlocked:
            yield _fail("Erasing is not allowed in Lock State")
            return
        if self.faults.fail_partition in (name, target):
            yield _fail(f"erase of '{target}' failed: flash erase error")
            return
        with self._lock:
            path = self.partition_path(target)
            size = path.stat().st_size
            os.truncate(path, 0)
            os.truncate(path, size)
        yield _okay()

    def set_active(self, arg: str) -> Iterator[bytes]:
        slot = arg.removeprefix("_")
        if slot not in self.slot_names():
            yield _fail(f"invalid slot '{arg}'")
            return
        if not self.state.unlocked:
            yield _fail("set_active is not allowed in Lock State")
            return
        with self._lock:
            self.state.current_slot = slot
            self.state.slots[slot] = SlotState(retry_count=_RETRIES, successful=False)
            self.save()
        yield _okay()

    def reboot(self, target: str) -> None:
        """Record a reboot to ``target`` (the device goes away when its answer is out)."""
        with self._lock:
            slot = self.state.current_slot if self.slot_count() else ""
            self.state.boots.append({"target": target, "slot": slot})
            self.state.userspace = target == "fastboot"
            if target == "system" and slot:
                # The OS came up on this slot and marked it successful.
                self.state.slots.setdefault(slot, SlotState()).successful = True
            self.save()

    def fetch(self, arg: str) -> Iterator[Out]:
        if self.faults.no_fetch:
            yield _fail("unknown command")
            return
        try:
            name, offset, size = p.parse_fetch_arg(arg)
        except p.FastbootProtocolError as e:
            yield _fail(e.message)
            return
        target = self.resolve(name)
        if target is None:
            yield _fail(f"partition ({name}) not found")
            return
        if not self.state.unlocked:
            yield _fail("Fetching is not allowed in Lock State")
            return
        total = self.partitions()[target]
        start = offset or 0
        length = size if size is not None else total - start
        if start > total or length < 0 or start + length > total:
            yield _fail(f"range {start}+{length} is outside '{target}' ({total} bytes)")
            return
        if length > self.state.max_fetch_size:
            yield _fail(f"fetch of {length} bytes exceeds max-fetch-size")
            return
        yield p.encode_data(length)
        yield DataOut(length, _read_range(self.partition_path(target), start, length))
        yield _okay()

    def oem(self, arg: str) -> Iterator[Out]:
        words = arg.split()
        if words == ["device-info"]:
            yield _info(f"Device product: {self.state.product}")
            yield _info(f"Device unlocked: {'true' if self.state.unlocked else 'false'}")
            yield _info(f"Current slot: {self.state.current_slot}")
            yield _okay()
        elif words == ["stage-log"]:
            log_text = "".join(f"boot {b['target']} slot {b['slot']}\n" for b in self.state.boots)
            self._staged_upload = (f"{self.state.product} boot record\n" + log_text).encode()
            yield _okay()
        else:
            yield _fail("unknown command")

    def flashing(self, arg: str) -> Iterator[Out]:
        word = arg.strip()
        if word == "get_unlock_ability":
            yield _info("get_unlock_ability: 1")
            yield _okay()
        elif word in ("unlock", "lock"):
            with self._lock:
                if word == "unlock" and not self.state.unlocked:
                    # Unlocking wipes user data, as on real phones.
                    self.erase_silently("userdata")
                self.state.unlocked = word == "unlock"
                self.save()
            yield _okay()
        else:
            yield _fail(f"unknown flashing command '{word}'")

    def erase_silently(self, name: str) -> None:
        if name in self.partitions():
            path = self.partition_path(name)
            size = path.stat().st_size
            os.truncate(path, 0)
            os.truncate(path, size)

    def upload(self) -> Iterator[Out]:
        data = self._staged_upload
        if not data:
            yield _fail("nothing staged for upload")
            return
        self._staged_upload = None
        yield p.encode_data(len(data))
        yield DataOut(len(data), [data])
        yield _okay()


def check_partition_name(name: str) -> None:
    if not name or "/" in name or name.startswith(".") or not name.isprintable() or " " in name:
        raise UsageError(f"{name!r} is not a partition name")


def _copy_range(src: BinaryIO, src_at: int, dst: BinaryIO, dst_at: int, length: int) -> None:
    """Copy ``length`` bytes between files (copy_file_range where the kernel has it)."""
    sfd, dfd = src.fileno(), dst.fileno()
    left = length
    use_kernel = hasattr(os, "copy_file_range")
    while left > 0:
        n = 0
        if use_kernel:
            try:
                n = os.copy_file_range(sfd, dfd, min(left, 1 << 30), src_at, dst_at)
            except OSError:
                use_kernel = False
                continue
        else:
            data = os.pread(sfd, min(left, _IO), src_at)
            n = os.pwrite(dfd, data, dst_at) if data else 0
        if n <= 0:
            raise SourceError(f"the staged image ended {left} bytes early")
        left -= n
        src_at += n
        dst_at += n


def _fill(dst: BinaryIO, at: int, length: int, pattern: bytes) -> None:
    unit = pattern * (min(length, _IO) // 4)
    fd = dst.fileno()
    view = memoryview(unit)
    while length > 0:
        n = os.pwrite(fd, view[: min(length, len(unit))], at)
        at += n
        length -= n


def _read_range(path: Path, start: int, length: int) -> Iterator[bytes]:
    with path.open("rb") as f:
        f.seek(start)
        left = length
        while left > 0:
            piece = f.read(min(left, 1 * MiB))
            if not piece:
                raise SourceError(f"{path} is shorter than its partition")
            left -= len(piece)
            yield piece


class PhoneSession:
    """One host session: commands in, responses and data out. Transport-agnostic."""

    def __init__(self, phone: FastbootPhone) -> None:
        self.phone = phone
        self.generation = phone.generation
        #: Bytes of the current download still to come (0: waiting for a command).
        self.receiving = 0
        self._download: BinaryIO | None = None
        self._download_size = 0
        #: Set by a reboot: the link closes once the answer is out, then ``finish`` reboots.
        self.closing = False
        self._reboot_target: str | None = None

    def stale(self) -> bool:
        return self.generation != self.phone.generation

    def close(self) -> None:
        if self._download is not None:
            self._download.close()
            self._download = None

    def finish(self) -> None:
        """After the last answer went out: carry out a pending reboot."""
        target, self._reboot_target = self._reboot_target, None
        if target is not None:
            self.phone.go_offline(self.phone.faults.reboot_offline_s)

    def command(self, payload: bytes) -> Iterator[Out]:
        """Run one command; yields the messages for the host as they come."""
        try:
            cmd = p.parse_command(payload)
        except p.FastbootProtocolError as e:
            yield _fail(e.message)
            return
        log.debug("fastboot phone: %s %s", cmd.name, cmd.arg)
        phone = self.phone
        phone.note_command(cmd.name)
        name, arg = cmd.name, cmd.arg
        if name == "getvar":
            if arg == "all":
                for line in p.format_getvar_all(phone.all_variables()):
                    yield _info(line)
                yield _okay()
                return
            value = phone.variable(arg)
            yield _okay(value) if value is not None else _fail("GetVar Variable Not found")
        elif name == "download":
            yield from self._begin_download(arg)
        elif name == "flash":
            yield from phone.flash(arg)
        elif name == "erase":
            yield from phone.erase(arg)
        elif name == "set_active":
            yield from phone.set_active(arg)
        elif name in ("reboot", "reboot-bootloader", "reboot-fastboot", "reboot-recovery"):
            target = {
                "reboot": "system",
                "reboot-bootloader": "bootloader",
                "reboot-fastboot": "fastboot",
                "reboot-recovery": "recovery",
            }[name]
            if name == "reboot" and arg:
                target = arg
            self.closing = True
            self._reboot_target = target
            phone.reboot(target)
            yield _okay()
        elif name == "continue":
            self.closing = True
            self._reboot_target = "system"
            phone.reboot("system")
            yield _okay()
        elif name == "fetch":
            yield from phone.fetch(arg)
        elif name == "upload":
            yield from phone.upload()
        elif name == "oem":
            yield from phone.oem(arg)
        elif name == "flashing":
            yield from phone.flashing(arg)
        elif name == "boot":
            yield _fail("booting from RAM is not supported")
        else:
            yield _fail("unknown command")

    def _begin_download(self, arg: str) -> Iterator[Out]:
        try:
            size = p.parse_hex_size(arg, "download")
        except p.FastbootProtocolError as e:
            yield _fail(e.message)
            return
        if size == 0 or size > self.phone.state.max_download_size:
            yield _fail(
                f"data too large: {size} bytes, max-download-size is "
                f"{self.phone.state.max_download_size}"
            )
            return
        self.close()
        self.phone.staged = 0
        self._download = self.phone.download_path().open("w+b")
        self._download_size = size
        self.receiving = size
        yield p.encode_data(size)

    def data(self, chunk: bytes | memoryview) -> Iterator[Out]:
        """Bytes of the current download; the OKAY once all have come."""
        if not self.receiving or self._download is None:
            return
        if len(chunk) > self.receiving:
            chunk = memoryview(chunk)[: self.receiving]
        self.phone.count_download(len(chunk))
        self._download.write(chunk)
        self.receiving -= len(chunk)
        if self.receiving == 0:
            self._download.close()
            self._download = None
            self.phone.staged = self._download_size
            yield _okay()


# ---------------------------------------------------------------------------------------------
# Network faces


@dataclass(frozen=True)
class PhonePorts:
    host: str
    tcp_port: int
    udp_port: int


class FastbootServer:
    """Serves a :class:`FastbootPhone` over TCP and UDP on one port number of ``host``."""

    def __init__(
        self,
        phone: FastbootPhone,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        udp_max_packet: int = 16384,
    ) -> None:
        self.phone = phone
        self.host = host
        self.port = port
        self.udp_max_packet = udp_max_packet
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._tcp: socket.socket | None = None
        self._udp: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()

    def start(self) -> PhonePorts:
        for _ in range(50):
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                tcp.bind((self.host, self.port))
            except OSError as e:
                tcp.close()
                raise UsageError(f"cannot listen on {self.host}:{self.port}: {e.strerror}") from e
            port = tcp.getsockname()[1]
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                udp.bind((self.host, port))
            except OSError as e:
                tcp.close()
                udp.close()
                if self.port:
                    raise UsageError(f"cannot listen on UDP {self.host}:{port}: {e}") from e
                continue
            tcp.listen(8)
            tcp.settimeout(0.1)
            udp.settimeout(0.1)
            self._tcp, self._udp = tcp, udp
            break
        else:
            raise UsageError(f"no port free for both TCP and UDP on {self.host}")
        for target, name in ((self._accept_loop, "fb-tcp"), (self._udp_loop, "fb-udp")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self.ports

    @property
    def ports(self) -> PhonePorts:
        assert self._tcp is not None and self._udp is not None
        return PhonePorts(self.host, self._tcp.getsockname()[1], self._udp.getsockname()[1])

    def stop(self) -> None:
        self._stop.set()
        with self._conns_lock:
            for conn in list(self._conns):
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(5.0)
        for sock in (self._tcp, self._udp):
            if sock is not None:
                sock.close()

    def __enter__(self) -> FastbootServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- TCP ---------------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        assert self._tcp is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._tcp.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if not self.phone.online():
                conn.close()
                continue
            thread = threading.Thread(target=self._serve_tcp, args=(conn,), daemon=True)
            thread.start()

    def _serve_tcp(self, conn: socket.socket) -> None:
        with self._conns_lock:
            self._conns.add(conn)
        session = PhoneSession(self.phone)
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.settimeout(0.2)
            hello = self._recv(conn, p.TCP_HANDSHAKE_BYTES, session, patience_s=5.0)
            p.parse_handshake(hello)
            conn.sendall(p.TCP_HANDSHAKE)
            buf = bytearray(1 * MiB)
            view = memoryview(buf)
            while True:
                length = p.parse_frame_header(
                    self._recv(conn, p.TCP_LENGTH_BYTES, session, patience_s=None)
                )
                if session.receiving:
                    left = length
                    while left:
                        n = self._recv_into(conn, view[: min(left, len(buf))], session)
                        left -= n
                        for out in session.data(view[:n]):
                            self._send_tcp(conn, out)
                    continue
                if length > p.MAX_COMMAND_BYTES:
                    log.warning("fastboot phone: a %d-byte command; closing", length)
                    return
                payload = self._recv(conn, length, session, patience_s=None)
                for out in session.command(payload):
                    if session.closing:
                        # Rebooting: away before the host can reconnect, answer on the way out.
                        session.finish()
                    self._send_tcp(conn, out)
                if session.closing:
                    return
        except (Vanished, EOFError, OSError, p.FastbootProtocolError) as e:
            log.debug("fastboot phone: TCP session ends: %r", e)
        finally:
            session.close()
            with self._conns_lock:
                self._conns.discard(conn)
            with contextlib.suppress(OSError):
                conn.close()

    def _alive(self, session: PhoneSession) -> None:
        if self._stop.is_set() or session.stale():
            raise EOFError("the device went away")

    def _recv_into(self, conn: socket.socket, view: memoryview, session: PhoneSession) -> int:
        while True:
            self._alive(session)
            try:
                n = conn.recv_into(view)
            except TimeoutError:
                continue
            if n == 0:
                raise EOFError("the host closed the connection")
            return n

    def _recv(
        self, conn: socket.socket, n: int, session: PhoneSession, patience_s: float | None
    ) -> bytes:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        deadline = None if patience_s is None else time.monotonic() + patience_s
        while got < n:
            self._alive(session)
            try:
                k = conn.recv_into(view[got:])
            except TimeoutError:
                if deadline is not None and time.monotonic() > deadline:
                    raise EOFError("the host said nothing") from None
                continue
            if k == 0:
                raise EOFError("the host closed the connection")
            got += k
        return bytes(buf)

    def _send_tcp(self, conn: socket.socket, out: Out) -> None:
        conn.settimeout(30.0)
        try:
            if isinstance(out, DataOut):
                conn.sendall(p.frame_header(out.size))
                for piece in out.chunks:
                    conn.sendall(piece)
            else:
                conn.sendall(p.encode_frame(out))
        finally:
            conn.settimeout(0.2)

    # --- UDP ---------------------------------------------------------------------------------

    def _udp_loop(self) -> None:
        assert self._udp is not None
        sock = self._udp
        udp = _UdpDevice(self.phone, self.udp_max_packet)
        while not self._stop.is_set():
            try:
                datagram, addr = sock.recvfrom(p.UDP_MAX_PACKET_BYTES)
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                reply = udp.handle(datagram)
            except Exception:
                log.exception("fastboot phone: UDP packet handling failed")
                continue
            if reply is not None:
                with contextlib.suppress(OSError):
                    sock.sendto(reply, addr)


_END = object()
#: How long a read packet waits for the device's next message before it goes unanswered (the
#: host then sends it again: this is how a device stays silent while it flashes).
_UDP_READ_WAIT_S = 0.2


class _UdpDevice:
    """The device side of fastboot's UDP protocol: sequence numbers, retransmissions,
    continuation packets, and one :class:`PhoneSession`.

    A command runs on a worker thread once its last packet is acknowledged; the host's read
    packets are answered with its messages as they come (INFO keep-alives during a slow
    flash), and go unanswered while it has nothing to say.
    """

    def __init__(self, phone: FastbootPhone, max_packet: int) -> None:
        self.phone = phone
        self.device_max = max_packet
        self.max_data = p.UDP_MIN_PACKET_BYTES - p.UDP_HEADER_BYTES
        self.seq = 0
        self.last: tuple[int, bytes] | None = None
        self.session: PhoneSession | None = None
        self.assembling = bytearray()
        self.outq: queue.Queue[object] = queue.Queue()
        self.current: Iterator[tuple[int, bytes]] | None = None
        self.lookahead: tuple[int, bytes] | None = None
        self.worker: threading.Thread | None = None
        self.busy = False

    def _reset(self, session: bool = True) -> None:
        if self.session is not None:
            self.session.close()
        self.session = PhoneSession(self.phone) if session else None
        self.assembling.clear()
        self.outq = queue.Queue()
        self.current = None
        self.lookahead = None
        self.busy = False

    def handle(self, datagram: bytes) -> bytes | None:
        """The answer to one datagram (None: stay silent)."""
        if not self.phone.online():
            return None
        try:
            pkt = p.decode_packet(datagram)
        except p.FastbootProtocolError:
            return None
        if pkt.ident == p.PacketId.QUERY:
            return p.UdpPacket(p.PacketId.QUERY, 0, pkt.seq, p.encode_seq(self.seq)).encode()
        if self.last is not None and pkt.seq == self.last[0] != self.seq:
            return self.last[1]
        if pkt.seq != self.seq:
            return None
        reply = self._process(pkt)
        if reply is None:
            return None
        self.last = (pkt.seq, reply)
        self.seq = (self.seq + 1) % p.SEQ_MODULUS
        return reply

    def _error(self, seq: int, text: str) -> bytes:
        return p.UdpPacket(p.PacketId.ERROR, 0, seq, text.encode("ascii", "replace")).encode()

    def _vanish(self) -> None:
        """The device dropped off: it comes back with no session and a new sequence."""
        self._reset(session=False)
        self.seq = 0
        self.last = None

    def _process(self, pkt: p.UdpPacket) -> bytes | None:
        if pkt.ident == p.PacketId.INIT:
            try:
                _, host_max = p.parse_init(pkt.data)
            except p.FastbootProtocolError as e:
                return self._error(pkt.seq, e.message)
            self._reset()
            self.max_data = min(host_max, self.device_max) - p.UDP_HEADER_BYTES
            return p.UdpPacket(
                p.PacketId.INIT, 0, pkt.seq, p.encode_init(p.UDP_VERSION, self.device_max)
            ).encode()
        if pkt.ident != p.PacketId.FASTBOOT:
            return self._error(pkt.seq, "unknown packet id")
        session = self.session
        if session is None or session.stale():
            if session is not None and session.stale():
                self._vanish()
                return None
            return self._error(pkt.seq, "no session: send Init first")
        if pkt.data:
            if session.receiving:
                try:
                    for out in session.data(pkt.data):
                        self.outq.put(out)
                except Vanished:
                    self._vanish()
                    return None
            elif self.worker is not None and self.worker.is_alive():
                return self._error(pkt.seq, "busy: the last command is still running")
            else:
                self.assembling += pkt.data
                if len(self.assembling) > p.MAX_COMMAND_BYTES:
                    self.assembling.clear()
                    return self._error(pkt.seq, "command too long")
                if not pkt.continuation:
                    payload = bytes(self.assembling)
                    self.assembling.clear()
                    self._start(session, payload)
            return p.UdpPacket(p.PacketId.FASTBOOT, 0, pkt.seq).encode()
        # An empty packet: the host reads the next piece of what the device has to say.
        piece = self._pop(_UDP_READ_WAIT_S)
        if piece is None:
            if self.busy:
                return None  # still working: the host asks again
            return p.UdpPacket(p.PacketId.FASTBOOT, 0, pkt.seq).encode()
        reply = p.UdpPacket(p.PacketId.FASTBOOT, piece[0], pkt.seq, piece[1]).encode()
        if session.closing and not self._has_more():
            session.finish()
            self._reset()
        return reply

    def _start(self, session: PhoneSession, payload: bytes) -> None:
        # The host has read every answer of the last command: start afresh.
        outq: queue.Queue[object] = queue.Queue()
        self.outq = outq
        self.current = None
        self.lookahead = None
        self.busy = True

        def run() -> None:
            try:
                for out in session.command(payload):
                    outq.put(out)
            except Exception:
                log.exception("fastboot phone: command failed")
                outq.put(_fail("internal error of the simulator"))
            finally:
                outq.put(_END)

        self.worker = threading.Thread(target=run, name="fb-udp-command", daemon=True)
        self.worker.start()

    def _next_out(self, wait_s: float) -> object | None:
        try:
            item = self.outq.get(timeout=wait_s) if self.busy else self.outq.get_nowait()
        except queue.Empty:
            return None
        if item is _END:
            self.busy = False
            return self._next_out(0)
        return item

    def _pop(self, wait_s: float) -> tuple[int, bytes] | None:
        if self.lookahead is not None:
            item, self.lookahead = self.lookahead, None
            return item
        while True:
            if self.current is not None:
                piece = next(self.current, None)
                if piece is not None:
                    return piece
                self.current = None
            out = self._next_out(wait_s)
            if out is None:
                return None
            assert isinstance(out, bytes | DataOut)
            self.current = self._pieces(out)

    def _has_more(self) -> bool:
        if self.lookahead is None:
            self.lookahead = self._pop(_UDP_READ_WAIT_S if self.busy else 0)
        return self.lookahead is not None or self.busy

    def _pieces(self, out: Out) -> Iterator[tuple[int, bytes]]:
        if isinstance(out, bytes):
            yield 0, out
            return
        step = self.max_data
        sent = 0
        pending = b""
        for chunk in out.chunks:
            pending += chunk
            at = 0
            while len(pending) - at > step or (
                len(pending) - at == step and sent + step < out.size
            ):
                yield p.FLAG_CONTINUATION, pending[at : at + step]
                at += step
                sent += step
            pending = pending[at:]
        yield 0, pending


def parse_byte_size(text: str) -> int:
    """``268435456``, ``0x10000000``, ``256M``, ``64K``, ``1G`` as a number of bytes."""
    value = text.strip()
    units = {"K": KiB, "M": MiB, "G": GiB}
    mult = 1
    if value[-1:].upper() in units:
        mult = units[value[-1].upper()]
        value = value[:-1]
    try:
        return int(value, 0) * mult
    except ValueError as e:
        raise UsageError(
            f"{text!r} is not a size in bytes", hint="e.g. 268435456, 0x10000000 or 256M"
        ) from e
