"""The fastboot driver: a phone (or board) in fastboot mode, partition by partition.

``open_fastboot(address)`` connects (waiting for the device up to its timeout) and returns a
:class:`FastbootDriver`. It implements ``Identify`` (product, serial number, bootloader
version; ``extra`` holds ``secure``, ``unlocked``, ``slot-count``, ``current-slot``,
``max-download-size`` and the other plain variables), ``Reboot`` and, on A/B devices,
``BootControl`` (``set_active``). fastboot addresses partitions by name, not by offset, so
writes go through partition-level methods: :meth:`FastbootDriver.flash_partition`,
:meth:`~FastbootDriver.erase_partition`, :meth:`~FastbootDriver.partition_size`,
:meth:`~FastbootDriver.set_active`, :meth:`~FastbootDriver.read_partition` (``fetch``, where
the device has it) and the update.zip flow :meth:`~FastbootDriver.prepare_update` /
:meth:`~FastbootDriver.apply_update`.

A locked bootloader is refused before anything is sent (``PreflightError`` with check id
``bootloader-unlocked`` and the unlock instructions); unbrick never unlocks one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from unbrick.errors import (
    DeviceError,
    PreflightError,
    TransportError,
    UnbrickError,
    UsageError,
)
from unbrick.model.identity import DeviceIdentity
from unbrick.model.uri import DeviceAddress
from unbrick.transports.base import BootReport, BootState, Capability
from unbrick.transports.fastboot import protocol as p
from unbrick.transports.fastboot.client import (
    ClientOptions,
    CommandResult,
    FastbootClient,
    FastbootFailure,
    FlashReport,
    InfoCallback,
    ProgressCallback,
    RebootTarget,
    locked_refusal,
    looks_locked,
)
from unbrick.transports.fastboot.links import UDP_HOST_MAX_PACKET, Link, WaitCallback, open_link

if TYPE_CHECKING:
    from unbrick.transports.fastboot.update import UpdatePlan, UpdateStep

log = logging.getLogger(__name__)

#: Variables read one by one when ``getvar all`` is not available.
IDENTITY_VARS = (
    "product",
    "serialno",
    "version-bootloader",
    "version-baseband",
    "hw-revision",
    "variant",
    "secure",
    "unlocked",
    "slot-count",
    "current-slot",
    "max-download-size",
    "is-userspace",
)

#: Opens a link, waiting up to the given seconds for the device.
Connect = Callable[[float], Link]


@dataclass(frozen=True)
class FastbootOptions:
    """How the driver talks to the device."""

    #: How long to wait for the device when connecting ("waiting for device").
    timeout_s: float = 10.0
    #: How long to wait for the device to come back after reboot-bootloader/-fastboot.
    reboot_wait_s: float = 60.0
    #: ``oem`` commands (first word or whole command) this device's profile allows.
    oem_allow: tuple[str, ...] = ()
    udp_max_packet: int = UDP_HOST_MAX_PACKET
    client: ClientOptions = field(default_factory=ClientOptions)


@dataclass(frozen=True)
class UpdateReport:
    plan: UpdatePlan
    flashed: tuple[FlashReport, ...]
    seconds: float


class FastbootDriver:
    """An open fastboot device. Not thread-safe."""

    def __init__(
        self,
        address: DeviceAddress,
        connect: Connect,
        options: FastbootOptions | None = None,
        *,
        on_info: InfoCallback | None = None,
    ) -> None:
        self.address = address
        self.options = options or FastbootOptions()
        self._connect = connect
        self._on_info = on_info
        self._client: FastbootClient | None = None
        self._vars: dict[str, str] | None = None
        self._answers: dict[str, str | None] = {}
        self.capabilities: frozenset[Capability] = frozenset(
            {Capability.IDENTIFY, Capability.REBOOT}
        )

    # ---------------------------------------------------------------------------------------
    # Session

    def connect(self, wait_s: float | None = None) -> FastbootClient:
        """The session, (re)connecting if needed and waiting up to ``wait_s`` for the device."""
        if self._client is None:
            link = self._connect(self.options.timeout_s if wait_s is None else wait_s)
            self._client = FastbootClient(link, options=self.options.client, on_info=self._on_info)
            self._forget()
        return self._client

    @property
    def client(self) -> FastbootClient:
        return self.connect()

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def _drop(self) -> None:
        self.close()
        self._forget()

    @contextmanager
    def _guard(self) -> Iterator[None]:
        """A broken link ends the session: the next call reconnects (waiting for the device)."""
        try:
            yield
        except TransportError:
            self._drop()
            raise

    def _forget(self) -> None:
        self._vars = None
        self._answers = {}

    def _name(self) -> str:
        product = self.getvar("product") or "device"
        serial = self.getvar("serialno")
        return f"{product} ({serial})" if serial else product

    # ---------------------------------------------------------------------------------------
    # Variables

    def variables(self) -> dict[str, str]:
        """``getvar all`` (cached until something changes); {} when the device lacks it."""
        if self._vars is None:
            try:
                with self._guard():
                    self._vars = self.client.getvar_all()
            except FastbootFailure:
                self._vars = {}
        return self._vars

    def getvar(self, name: str) -> str | None:
        """A variable (from ``getvar all`` when it was listed), None when unknown."""
        found = self.variables().get(name)
        if found:
            return found
        if name not in self._answers:
            with self._guard():
                self._answers[name] = self.client.getvar_optional(name)
        return self._answers[name]

    def identify(self) -> DeviceIdentity:
        values = dict(self.variables())
        for name in IDENTITY_VARS:
            if name not in values:
                value = self.getvar(name)
                if value is not None:
                    values[name] = value
        extra = {k: v for k, v in values.items() if ":" not in k}
        return DeviceIdentity(
            model=values.get("product", "") or "unknown",
            serial=values.get("serialno", "") or (self.address.name or ""),
            hw_revision=values.get("hw-revision"),
            bootloader_version=values.get("version-bootloader"),
            extra=extra,
        )

    def _slot_count(self) -> int:
        text = self.getvar("slot-count")
        try:
            return p.parse_number(text, "slot-count") if text else 0
        except p.FastbootProtocolError:
            return 0

    def refresh_capabilities(self) -> frozenset[Capability]:
        caps = {Capability.IDENTIFY, Capability.REBOOT}
        if self._slot_count() >= 2:
            caps.add(Capability.BOOT_CONTROL)
        self.capabilities = frozenset(caps)
        return self.capabilities

    def require_unlocked(self, what: str) -> None:
        """PreflightError (``bootloader-unlocked``) when the device says it is locked."""
        if p.parse_yes_no(self.getvar("unlocked")) is False:
            raise locked_refusal(what, self._name())

    # ---------------------------------------------------------------------------------------
    # Partitions

    def _slot_letter(self, slot: str) -> str:
        letter = slot.removeprefix("_")
        if letter == "other":
            current = (self.getvar("current-slot") or "").removeprefix("_")
            count = self._slot_count()
            others = [chr(ord("a") + i) for i in range(count) if chr(ord("a") + i) != current]
            if not current or not others:
                raise UsageError("the device has no other slot")
            return others[0]
        count = self._slot_count()
        if len(letter) != 1 or not "a" <= letter < chr(ord("a") + max(count, 0)):
            raise UsageError(
                f"slot '{slot}' is not one of the device's slots",
                hint=f"the device has {count} slot(s)" if count else "the device has no slots",
            )
        return letter

    def resolve_partition(self, name: str, slot: str | None = None) -> str:
        """The device's name for partition ``name`` (``boot`` -> ``boot_a`` on slot a).

        PreflightError (``partition-exists``) when the device has no such partition.
        """
        if not name or not name.isprintable() or " " in name or ":" in name:
            raise UsageError(f"{name!r} is not a partition name")
        has_slot = self.getvar(f"has-slot:{name}")
        if has_slot == "yes":
            if slot is None:
                current = (self.getvar("current-slot") or "").removeprefix("_")
                if not current:
                    raise DeviceError(
                        f"the device has slots for '{name}' but did not say which is current",
                        hint="give the slot explicitly",
                    )
                return f"{name}_{current}"
            return f"{name}_{self._slot_letter(slot)}"
        if slot is not None and has_slot == "no":
            raise UsageError(f"partition '{name}' has no A/B slots", hint="leave out the slot")
        if has_slot == "no" or self._size_var(name) is not None:
            return name
        raise PreflightError(
            f"the device {self._name()} has no partition '{name}'",
            check_id="partition-exists",
            hint="check the partition name with 'unbrick probe' (getvar all lists them)",
        )

    def _size_var(self, name: str) -> int | None:
        text = self.getvar(f"partition-size:{name}")
        if not text:
            return None
        try:
            return p.parse_number(text, f"partition-size:{name}")
        except p.FastbootProtocolError:
            return None

    def partition_size(self, name: str, slot: str | None = None) -> int:
        """Size in bytes of the partition (``partition-size``); DeviceError if unknown."""
        target = self.resolve_partition(name, slot)
        size = self._size_var(target)
        if size is None:
            raise DeviceError(
                f"the device does not say how large '{target}' is",
                hint="its bootloader does not answer getvar partition-size",
            )
        return size

    def flash_partition(
        self,
        name: str,
        image: Path | BinaryIO | bytes,
        slot: str | None = None,
        *,
        progress: ProgressCallback | None = None,
    ) -> FlashReport:
        """Flash ``image`` (raw or Android sparse) to partition ``name`` (on ``slot``).

        Checked before anything is sent: the bootloader is unlocked, the partition exists,
        the image (expanded) fits it, it is not a logical partition.
        """
        self.require_unlocked("flash partitions")
        target = self.resolve_partition(name, slot)
        if self.getvar(f"is-logical:{target}") == "yes":
            raise PreflightError(
                f"'{target}' is a logical (dynamic) partition inside super; unbrick cannot "
                "flash those yet",
                check_id="logical-partition",
                hint="flash it from fastbootd with 'fastboot flash' of the platform tools",
            )
        size = self._size_var(target)
        client = self.client
        with ExitStack() as stack:
            prepared = client.prepare_image(image, stack)
            if size is not None and prepared.image_bytes > size:
                raise PreflightError(
                    f"the image needs {prepared.image_bytes} bytes but partition '{target}' "
                    f"has {size}",
                    check_id="partition-size",
                    hint="check that the image is for this partition and this device",
                )
            log.info(
                "%s: flashing %s (%d bytes, %d data phase(s))",
                client.description,
                target,
                prepared.image_bytes,
                1 if prepared.pieces is None else len(prepared.pieces),
            )
            try:
                with self._guard():
                    return client.flash_prepared(target, prepared, progress=progress)
            except FastbootFailure as e:
                raise self._maybe_locked(e, "flash partitions") from e

    def _maybe_locked(self, e: FastbootFailure, what: str) -> UnbrickError:
        """A FAIL that blames the lock state becomes the locked-bootloader refusal."""
        if looks_locked(e.reason):
            return locked_refusal(what, self._name())
        return e

    def erase_partition(self, name: str, slot: str | None = None) -> None:
        self.require_unlocked("erase partitions")
        target = self.resolve_partition(name, slot)
        try:
            with self._guard():
                self.client.erase(target)
        except FastbootFailure as e:
            raise self._maybe_locked(e, "erase partitions") from e

    def set_active(self, slot: str) -> None:
        self.require_unlocked("change the active slot")
        letter = self._slot_letter(slot)
        try:
            with self._guard():
                self.client.set_active(letter)
        except FastbootFailure as e:
            raise self._maybe_locked(e, "change the active slot") from e
        self._forget()

    @property
    def can_read(self) -> bool:
        """True when the device can send partitions back (``fetch``)."""
        text = self.getvar("max-fetch-size")
        try:
            return bool(text) and p.parse_number(text or "0", "max-fetch-size") > 0
        except p.FastbootProtocolError:
            return False

    def read_partition(
        self,
        name: str,
        out: BinaryIO,
        slot: str | None = None,
        *,
        offset: int = 0,
        size: int | None = None,
        progress: ProgressCallback | None = None,
    ) -> int:
        """Copy the partition (or ``size`` bytes from ``offset``) into ``out`` with ``fetch``."""
        target = self.resolve_partition(name, slot)
        total = self.partition_size(target)
        length = total - offset if size is None else size
        if offset < 0 or length < 0 or offset + length > total:
            raise UsageError(f"range {offset}+{length} is outside '{target}' ({total} bytes)")
        try:
            with self._guard():
                return self.client.fetch(target, out, offset=offset, size=length, progress=progress)
        except FastbootFailure as e:
            raise self._maybe_locked(e, "send partitions back") from e

    def oem(self, command: str) -> CommandResult:
        """An ``oem`` command from the profile's allow-list (never a lock/unlock command)."""
        with self._guard():
            return self.client.oem(command, self.options.oem_allow)

    # ---------------------------------------------------------------------------------------
    # Reboot and boot control

    def reboot_to(self, target: RebootTarget, wait_s: float | None = None) -> None:
        """Reboot to ``target``; for the bootloader or fastbootd, wait for it to come back."""
        client = self.client
        client.reboot(target)
        self._drop()
        if target in (RebootTarget.BOOTLOADER, RebootTarget.FASTBOOTD):
            self.connect(self.options.reboot_wait_s if wait_s is None else wait_s)

    def reboot(self, timeout_s: float) -> BootReport:
        """Reboot into the OS. fastboot cannot watch the OS boot: once the device has left
        fastboot mode it reports ``firmware`` for the slot it was told to boot."""
        slot = (self.getvar("current-slot") or "").removeprefix("_") or None
        self.client.reboot(RebootTarget.SYSTEM)
        self._drop()
        where = f" from slot {slot}" if slot else ""
        return BootReport(
            log=f"fastboot: reboot accepted; the device left fastboot mode to boot{where}",
            state="firmware",
            booted_slot=slot,
        )

    def enter_recovery(self, timeout_s: float) -> None:
        """Wait (up to ``timeout_s``) for the device to be in fastboot mode."""
        if self._client is not None:
            try:
                self._client.getvar("version")
                return
            except (TransportError, FastbootFailure):
                self._drop()
        try:
            self.connect(timeout_s)
        except TransportError as e:
            raise TransportError(
                f"the device did not come back in fastboot mode within {timeout_s:g} s",
                hint="hold Volume Down while powering on (or use the key combination of your "
                "device) to enter fastboot mode",
            ) from e

    def boot_state(self) -> BootState:
        current = (self.getvar("current-slot") or "").removeprefix("_")
        extra: dict[str, str] = {}
        for i in range(self._slot_count()):
            letter = chr(ord("a") + i)
            for key in ("slot-successful", "slot-unbootable", "slot-retry-count"):
                value = self.getvar(f"{key}:{letter}")
                if value is not None:
                    extra[f"{key}:{letter}"] = value
        successful = extra.get(f"slot-successful:{current}")
        return BootState(
            active_slot=current,
            trial_slot=current if successful == "no" else None,
            extra=extra,
        )

    def set_trial(self, slot: str) -> None:
        """``set_active``: the bootloader tries the slot and falls back after its retries."""
        self.set_active(slot)

    def commit(self, slot: str) -> None:
        """Keep ``slot`` active (the OS itself marks a slot successful; fastboot cannot)."""
        current = (self.getvar("current-slot") or "").removeprefix("_")
        if current != slot.removeprefix("_"):
            self.set_active(slot)

    # ---------------------------------------------------------------------------------------
    # update.zip

    def prepare_update(
        self,
        package: Path,
        *,
        slot: str | None = None,
        wipe: bool = False,
        skip_secondary: bool = False,
        forced: Collection[str] = (),
    ) -> UpdatePlan:
        """Check ``package`` against the device's variables and plan its steps.

        PreflightError when it does not fit (android-info.txt, partitions, sizes, lock).
        """
        from unbrick.transports.fastboot.update import (  # noqa: PLC0415 - zip/manifest code
            UpdatePackage,
            plan_update,
        )

        self.require_unlocked("flash partitions")
        with UpdatePackage.open(package) as pkg:
            return plan_update(
                pkg,
                self.getvar,
                slot=slot,
                wipe=wipe,
                skip_secondary=skip_secondary,
                forced=forced,
            )

    def apply_update(
        self,
        plan: UpdatePlan,
        *,
        progress: ProgressCallback | None = None,
        on_step: Callable[[UpdateStep], None] | None = None,
        workdir: Path | None = None,
        start_at: int = 0,
    ) -> UpdateReport:
        """Carry out ``plan`` step by step (images are extracted one at a time to a
        temporary directory in ``workdir``). ``start_at`` skips the steps before that index
        (a resumed job: flashing a partition again is harmless, so a job resumes at the step
        that did not finish)."""
        import shutil  # noqa: PLC0415 - update packages only
        import tempfile  # noqa: PLC0415

        from unbrick.transports.fastboot.update import UpdatePackage  # noqa: PLC0415

        started = time.monotonic()
        self.require_unlocked("flash partitions")
        flashed: list[FlashReport] = []
        tmp = Path(tempfile.mkdtemp(prefix="fastboot-update-", dir=workdir))
        try:
            with self._guard(), UpdatePackage.open(plan.package) as pkg:
                if plan.set_active and plan.slot:
                    self.set_active(plan.slot)
                for n, step in enumerate(plan.steps):
                    if n < start_at:
                        continue
                    if on_step is not None:
                        on_step(step)
                    if step.action == "reboot":
                        target = {
                            "bootloader": RebootTarget.BOOTLOADER,
                            "fastboot": RebootTarget.FASTBOOTD,
                            "recovery": RebootTarget.RECOVERY,
                        }.get(step.partition, RebootTarget.SYSTEM)
                        self.reboot_to(target)
                    elif step.action == "erase":
                        try:
                            self.client.erase(step.target)
                        except FastbootFailure as e:
                            raise self._maybe_locked(e, "erase partitions") from e
                    else:
                        assert step.image is not None
                        path = pkg.extract(step.image, tmp / f"{n:03d}.img")
                        try:
                            flashed.append(self.client.flash(step.target, path, progress=progress))
                        except FastbootFailure as e:
                            raise self._maybe_locked(e, "flash partitions") from e
                        finally:
                            path.unlink(missing_ok=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return UpdateReport(plan, tuple(flashed), time.monotonic() - started)


def open_fastboot(
    address: DeviceAddress,
    *,
    timeout_s: float = 10.0,
    oem_allow: Collection[str] = (),
    on_wait: WaitCallback | None = None,
    on_info: InfoCallback | None = None,
) -> FastbootDriver:
    """Connect to the fastboot device at ``address`` (waiting up to ``timeout_s``, or the
    URI's ``?wait=SECONDS``) and return its driver.

    URI parameters: ``wait`` (seconds to wait for the device), ``packet`` (UDP: the largest
    packet offered), ``timeout`` (seconds for a response, INFO messages restart it).
    """
    if address.protocol != "fastboot":
        raise UsageError(f"{address.uri} is not a fastboot device")
    wait_s = float(address.int_param("wait", int(timeout_s)))
    packet = address.int_param("packet", UDP_HOST_MAX_PACKET)
    if not p.UDP_MIN_PACKET_BYTES <= packet <= p.UDP_MAX_PACKET_BYTES:
        raise UsageError(f"{address.uri}: packet={packet} is not 512..{p.UDP_MAX_PACKET_BYTES}")
    command_timeout = float(address.int_param("timeout", 30))
    options = FastbootOptions(
        timeout_s=wait_s,
        oem_allow=tuple(oem_allow),
        udp_max_packet=packet,
        client=ClientOptions(command_timeout_s=command_timeout),
    )

    def connect(wait: float) -> Link:
        return open_link(
            address.link,
            host=address.host,
            port=address.port,
            serial=address.name,
            timeout_s=wait,
            udp_max_packet=packet,
            on_wait=on_wait,
        )

    driver = FastbootDriver(address, connect, options, on_info=on_info)
    try:
        driver.connect()
        driver.refresh_capabilities()
    except BaseException:
        driver.close()
        raise
    return driver
