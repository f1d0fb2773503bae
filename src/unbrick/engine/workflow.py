"""The safe flash workflow: plan, preflight, backup, write, verify, reboot, validate, commit.

``Workbench`` is the library entry point a CLI or a flash station calls. It holds no global
state: the job store, backup vault, profiles, device opener, event sink and work directory are
given to it. Every step is journaled before it runs (``JobStore.begin_step``) so ``resume`` can
pick up a job interrupted by a crash, a kill or a power cut, re-reading the device first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import getpass
import hashlib
import logging
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from unbrick.engine import backup as backups
from unbrick.engine.events import Event, EventSink, Progress, progress_event
from unbrick.engine.states import JobState, transition
from unbrick.engine.store import JobRecord, JobStore, new_job_id
from unbrick.engine.vault import BackupVault
from unbrick.engine.writer import (
    ImageData,
    Target,
    bad_ranges,
    partition_bad_ranges,
    partition_digest,
    range_digest,
    verify_range,
    write_range,
)
from unbrick.errors import (
    DeviceError,
    JobError,
    PreflightError,
    RolledBack,
    SourceError,
    TransportError,
    UnbrickError,
    UsageError,
    VerifyError,
)
from unbrick.model.identity import DeviceIdentity
from unbrick.model.manifest import Manifest, parse_android_info, parse_manifest
from unbrick.model.profile import Profile, Region
from unbrick.model.profile_toml import ProfileSet
from unbrick.model.uri import DeviceAddress, parse_device_uri
from unbrick.ops.images import (
    TO_RAW,
    ImageReport,
    RawOptions,
    ReportCache,
    convert_path,
    inspect_path,
)
from unbrick.safety import checks
from unbrick.transports.base import (
    BootControl,
    BootReport,
    Capability,
    Device,
    Identify,
    ImageWrite,
    OemCommands,
    PartitionRead,
    Partitions,
    Reboot,
    WriteTarget,
)
from unbrick.trust.verify import VerifyReport, verify_file

log = logging.getLogger(__name__)

#: Image formats written to flash as they are (the device's bootloader reads them).
FLASHABLE_AS_IS = ("raw", "uimage", "fit", "trx", "android-boot", "mcuboot", "elf")


@dataclass(frozen=True)
class IntegrityRequest:
    """Checks requested on the image file (see ``unbrick image verify``)."""

    sha256: str | None = None
    sums: Path | None = None
    signature: Path | None = None
    minisign_key: Path | None = None
    gpg_keyring: Path | None = None
    cms_ca: Path | None = None

    @property
    def any(self) -> bool:
        return any(v is not None for v in (self.sha256, self.sums, self.signature))


@dataclass(frozen=True)
class FlashRequest:
    image: Path
    region: str | None = None
    offset: int | None = None
    #: Profile id to use instead of matching the device's identity.
    profile_id: str | None = None
    manifest: Path | None = None
    #: Android ``android-info.txt`` whose require/reject lines must hold for the device.
    android_info: Path | None = None
    integrity: IntegrityRequest = field(default_factory=IntegrityRequest)
    allow_downgrade: bool = False
    allow_critical: bool = False
    #: check id -> reason, for ``--force CHECK_ID --reason TEXT``.
    forced: tuple[tuple[str, str], ...] = ()
    operator: str = ""
    #: "full" (whole storage) or "target" (only what will be written); None: the profile's
    #: choice for the link (``[link.PROTOCOL] backup_scope``), else "full".
    backup_scope: str | None = None
    #: Two-pass devices: the loader image staged before the main write.
    loader: Path | None = None


@dataclass
class Plan:
    """What a flash job will do, and what the checks said. ``--dry-run`` prints this."""

    device_uri: str
    identity: DeviceIdentity
    profile: Profile
    target: Target
    slot: str | None
    image_path: Path
    image_format: str
    image_sha256: str
    image_size: int
    flash_path: Path
    manifest: Manifest | None
    #: Version the first boot must report (from the manifest).
    expect_version: str | None
    #: Two-pass devices: the loader written to the profile's loader region first.
    loader_path: Path | None
    preflight: checks.PreflightResult
    steps: list[str]
    estimate_s: float
    forced: dict[str, str]
    #: "full" or "target": what the backup before the write covers.
    backup_scope: str = "full"

    @property
    def ok(self) -> bool:
        return self.preflight.refusal() is None

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": self.device_uri,
            "identity": self.identity.to_dict(),
            "profile": self.profile.id,
            "target": {
                "region": self.target.region,
                "offset": self.target.offset,
                "size": self.target.size,
                "slot": self.slot,
            },
            "image": {
                "path": str(self.image_path),
                "format": self.image_format,
                "sha256": self.image_sha256,
                "size": self.image_size,
                "version": self.expect_version,
            },
            "checks": [c.to_dict() for c in self.preflight.results],
            "steps": self.steps,
            "estimate_s": round(self.estimate_s, 1),
            "forced": self.forced,
            "backup_scope": self.backup_scope,
            "ok": self.ok,
        }


@dataclass(frozen=True)
class JobResult:
    job_id: str
    state: JobState
    outcome: str
    boot: BootReport | None = None
    backup_id: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "job": self.job_id,
            "state": self.state.value,
            "outcome": self.outcome,
            "backup": self.backup_id,
            "boot": None
            if self.boot is None
            else {
                "state": self.boot.state,
                "firmware_version": self.boot.firmware_version,
                "slot": self.boot.booted_slot,
            },
            "detail": self.detail,
        }


@dataclass(frozen=True)
class OemResult:
    """An ``oem`` command the profile allowed, and the device's answer."""

    device_uri: str
    profile_id: str
    command: str
    #: The device's INFO/TEXT lines, in order, and the text of its final OKAY.
    lines: tuple[str, ...]
    value: str
    #: The profile's allow-list the command was checked against.
    allowed: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": self.device_uri,
            "profile": self.profile_id,
            "command": self.command,
            "lines": list(self.lines),
            "value": self.value,
            "allowed": list(self.allowed),
        }


class _Cut(TransportError):
    """Internal: the device went away mid-job; the job stays resumable."""


class Workbench:
    """Runs jobs against devices. One instance per process (or per flash station worker)."""

    def __init__(
        self,
        *,
        store: JobStore,
        vault: BackupVault,
        profiles: ProfileSet,
        open_device: Callable[[DeviceAddress], Device],
        sink: EventSink,
        workdir: Path,
        cancel: threading.Event | None = None,
        clock: Callable[[], float] = time.monotonic,
        image_reports: ReportCache | None = None,
    ) -> None:
        self.store = store
        self.vault = vault
        self.profiles = profiles
        self._open_device = open_device
        self.sink = sink
        self.workdir = workdir
        self.cancel = cancel or threading.Event()
        self.clock = clock
        #: Image reports shared with other workbenches of the same command (several targets).
        self.image_reports = image_reports

    # ---------------------------------------------------------------- probing and planning

    def probe(
        self, uri: str, profile_id: str | None = None
    ) -> tuple[DeviceIdentity, Profile | None]:
        address = self._address(uri, profile_id)
        with self._device(address) as dev:
            identity = _identify(dev, address)
        return identity, self._match_profile(identity, profile_id, required=False)

    def oem(self, uri: str, command: str, *, profile_id: str | None = None) -> OemResult:
        """Send the vendor command ``oem COMMAND`` if the device's profile allows it
        (``[link.PROTOCOL] oem_allow``: its first word or the whole command).

        UsageError, with nothing sent to the device, when the link has no oem commands, the
        profile's list lacks the command, or the command would lock or unlock the bootloader
        (refused whatever the list says). A FAIL of the device is a DeviceError.
        """
        text = " ".join(command.split())
        if not text:
            raise UsageError("no oem command given", hint="e.g. unbrick device oem URI device-info")
        address = self._address(uri, profile_id)
        with self._device(address) as dev:
            if Capability.OEM not in dev.capabilities:
                raise UsageError(
                    f"{address.scheme}:// devices take no oem commands",
                    hint="oem commands are for fastboot devices",
                )
            identity = _identify(dev, address)
            profile = self._match_profile(identity, profile_id, required=True)
            assert profile is not None
            allowed = profile.oem_allow(address.protocol)
            args = {"command": text, "profile": profile.id}
            self.sink.emit(Event("step-start", "oem", data=args))
            try:
                reply = cast(OemCommands, dev).oem(text, allowed)
            except UnbrickError as e:
                self.sink.emit(Event("step-error", "oem", data={**args, "error": e.one_line()}))
                raise
            self.sink.emit(Event("step-end", "oem", data={**args, "lines": list(reply.lines)}))
        return OemResult(
            device_uri=uri,
            profile_id=profile.id,
            command=reply.command,
            lines=reply.lines,
            value=reply.value,
            allowed=allowed,
        )

    def plan(self, uri: str, request: FlashRequest) -> Plan:
        """Probe the device and check the image against it; writes nothing."""
        address = self._address(uri, request.profile_id)
        with self._device(address) as dev:
            return self._plan(address, dev, request, job_id="")

    # ---------------------------------------------------------------- flashing

    def flash(
        self,
        uri: str,
        request: FlashRequest,
        *,
        plan: Plan | None = None,
        progress: Progress | None = None,
    ) -> JobResult:
        """Run a flash job. Raises the refusal (PreflightError/IntegrityError: nothing was
        written), VerifyError/DeviceError (job resumable), or RolledBack.

        ``plan`` is a plan just made for the same device and request (the one shown to the
        user), reused so the image is not inspected twice; the device identity is read again
        before anything is written either way.
        """
        address = self._address(uri, request.profile_id)
        job_id = new_job_id()
        with self._device(address) as dev:
            if plan is None or plan.device_uri != uri:
                plan = self._plan(address, dev, request, job_id=job_id)
            job = JobRecord(
                id=job_id,
                created_at=time.time(),
                updated_at=time.time(),
                kind="flash",
                state=JobState.PLANNED.value,
                outcome=None,
                operator=request.operator or _operator(),
                device_uri=uri,
                device_identity=plan.identity.to_dict(),
                image={
                    "path": str(plan.image_path),
                    "flash_path": str(plan.flash_path),
                    "name": plan.image_path.name,
                    "version": plan.expect_version,
                    "sha256": plan.image_sha256,
                    "size": plan.image_size,
                    "format": plan.image_format,
                },
                plan=plan.to_dict(),
                options={
                    "forced": plan.forced,
                    "allow_downgrade": request.allow_downgrade,
                    "allow_critical": request.allow_critical,
                    "backup_scope": plan.backup_scope,
                    "profile": plan.profile.id,
                    "region": plan.target.region,
                    "offset": plan.target.offset,
                    "slot": plan.slot,
                    "loader": str(plan.loader_path) if plan.loader_path else None,
                },
                data={},
            )
            self.store.create_job(job)
            self._event(job_id, "state", JobState.PLANNED.value, plan=plan.to_dict())
            state = self._move(job_id, JobState.PLANNED, JobState.PREFLIGHT)
            with self._step(job_id, "preflight") as detail:
                detail["checks"] = [c.to_dict() for c in plan.preflight.results]
                refusal = plan.preflight.refusal()
            if refusal is not None:
                self._finish(job_id, JobState.REFUSED, "refused", refusal=refusal.one_line())
                self._event(job_id, "state", JobState.REFUSED.value, reason=refusal.one_line())
                raise refusal
            root = progress or Progress("flash")
            return self._run(job_id, dev, plan, state, root, start_write_at=0, backup_id=None)

    def flash_update(
        self,
        uri: str,
        package: Path,
        *,
        forced: Mapping[str, str] | None = None,
        operator: str = "",
        progress: Progress | None = None,
    ) -> JobResult:
        """Flash an update package (a fastboot ``update.zip``: android-info.txt checked
        against the device's own variables, then each image in fastboot's order, slots
        honoured). Refusals raise before anything is written; the job is journaled."""
        address = self._address(uri, None)
        if not package.is_file():
            raise SourceError(f"{package}: no such file")
        with self._device(address) as dev:
            if not hasattr(dev, "prepare_update"):
                raise UsageError(
                    f"{address.scheme}:// devices do not take update packages",
                    hint="update packages (update.zip) are for fastboot devices",
                )
            updater = cast(Any, dev)
            identity = _identify(dev, address)
            reasons = dict(forced or {})
            plan = updater.prepare_update(package, forced=tuple(reasons))
            job_id = new_job_id()
            steps = [
                {"action": st.action, "partition": st.partition, "target": st.target}
                for st in plan.steps
            ]
            job = JobRecord(
                id=job_id,
                created_at=time.time(),
                updated_at=time.time(),
                kind="update",
                state=JobState.PLANNED.value,
                outcome=None,
                operator=operator or _operator(),
                device_uri=uri,
                device_identity=identity.to_dict(),
                image={
                    "path": str(package),
                    "name": package.name,
                    "sha256": _file_sha256(package),
                    "size": package.stat().st_size,
                    "format": "update-zip",
                },
                plan={"product": plan.product, "slot": plan.slot, "steps": steps},
                options={"forced": reasons, "overridden": list(plan.overridden)},
                data={},
            )
            self.store.create_job(job)
            state = self._move(job_id, JobState.PLANNED, JobState.PREFLIGHT)
            with self._step(job_id, "preflight") as detail:
                detail["product"] = plan.product
                detail["overridden"] = list(plan.overridden)
                detail["warnings"] = list(plan.warnings)
            state = self._move(job_id, state, JobState.WRITE)
            root = progress or Progress("update")
            root.on_change = root.on_change or (
                lambda node: self.sink.emit(progress_event(node, job_id))
            )
            total = sum(st.image_bytes for st in plan.steps) or 1
            p_write = root.child("write", total=total, unit="B")
            done = [0]

            def on_step(step: Any) -> None:
                self._event(job_id, "note", "update-step", action=step.action, target=step.target)

            def on_bytes(n: int) -> None:
                p_write.set(done[0] + n)

            self.workdir.mkdir(parents=True, exist_ok=True)
            try:
                with self._step(job_id, "write", steps=len(steps)) as detail:
                    report = updater.apply_update(
                        plan, progress=on_bytes, on_step=on_step, workdir=self.workdir
                    )
                    detail["flashed"] = [r.partition for r in report.flashed]
                state = self._move(job_id, state, JobState.VERIFY)
                with self._step(job_id, "verify") as detail:
                    detail["method"] = "link (fastboot OKAY for every image)"
                state = self._move(job_id, state, JobState.REBOOT)
                with self._step(job_id, "reboot") as detail:
                    boot = updater.reboot(30.0)
                    detail.update(state=boot.state, slot=boot.booted_slot)
            except (TransportError, DeviceError) as e:
                self._move(job_id, state, JobState.FAILED)
                self._finish(job_id, JobState.FAILED, "failed", error=str(e))
                raise DeviceError(
                    f"job {job_id} interrupted in step '{state.value}': {e}",
                    hint="bring the device back to fastboot mode and flash the package again",
                ) from e
            state = self._move(job_id, state, JobState.VALIDATE)
            state = self._move(job_id, state, JobState.COMMIT)
            state = self._move(job_id, state, JobState.DONE)
            self._finish(job_id, JobState.DONE, "success")
            p_write.finish()
            return JobResult(job_id, JobState.DONE, "success", boot=boot)

    def _plan(
        self, address: DeviceAddress, dev: Device, request: FlashRequest, job_id: str
    ) -> Plan:
        identity = _identify(dev, address)
        profile = self._match_profile(identity, request.profile_id, required=True)
        assert profile is not None
        image = request.image
        if not image.is_file():
            raise SourceError(f"{image}: no such image file")
        report = self._inspect(image)
        flash_path = image
        flash_size = report.size
        # Formats the link takes as they are (fastboot sends sparse images in pieces).
        direct: frozenset[str] = getattr(dev, "image_formats", frozenset())
        stated = report.details.get("expanded_size") if report.valid else None
        if report.format in direct and isinstance(stated, int):
            flash_size = stated
        elif report.valid and report.format not in FLASHABLE_AS_IS and report.format in TO_RAW:
            # Sparse, compressed and address-based images are expanded to what goes on flash.
            # Named by the source's SHA-256: a resumed job finds exactly what it wrote.
            work = self.workdir / "expanded"
            work.mkdir(parents=True, exist_ok=True)
            flash_path = work / f"{report.sha256}.raw"
            if not flash_path.is_file():
                convert_path(image, flash_path, "raw", raw_options=RawOptions())
            flash_size = flash_path.stat().st_size
        # What the checks judge is what goes on flash: the expanded content when there is one.
        written = self._inspect(flash_path) if flash_path != image else report
        manifest = self._manifest(request)
        android_info = None
        if request.android_info is not None:
            try:
                text = request.android_info.read_text(encoding="utf-8", errors="replace")
            except OSError as e:
                raise SourceError(f"{request.android_info}: cannot read: {e.strerror}") from e
            android_info = parse_android_info(text)
        integrity: VerifyReport | None = None
        if request.integrity.any:
            ir = request.integrity
            integrity = verify_file(
                image,
                sha256=ir.sha256,
                sums=ir.sums,
                signature=ir.signature,
                minisign_key=ir.minisign_key,
                gpg_keyring=ir.gpg_keyring,
                cms_ca=ir.cms_ca,
            )
        target, slot = self._target(dev, profile, request, flash_size, manifest)
        loader = self._loader(profile, request)
        scope = request.backup_scope or profile.backup_scope(address.protocol)
        partition_size: int | None = None
        if Capability.PARTITIONS in dev.capabilities and scope == "full":
            # Named partitions have no "whole storage" to read: the target partition is it.
            if request.backup_scope == "full":
                raise UsageError(
                    "a device of named partitions is backed up partition by partition; "
                    "--backup-scope full is not possible",
                    hint="use --backup-scope target (the partition written), or "
                    "'unbrick backup URI --region NAME' for other partitions",
                )
            scope = "target"
        source, no_backup = _backup_source(
            dev,
            scope,
            slot,
            link=f"{address.protocol} links",
            profile=f"profile {profile.id}",
        )
        if source == "partition":
            partition_size = cast(Partitions, dev).partition_size(target.region)
            if not partition_size:
                source = None
                no_backup = f"the device does not say how large '{target.region}' is"
        can_back_up = source is not None
        forced = dict(request.forced)
        ctx = checks.PreflightContext(
            identity=identity,
            profile=profile,
            targets=(self._target_region(profile, target),),
            image=checks.ImageFacts(
                format=written.format,
                size_bytes=report.size,
                sha256=report.sha256,
                valid=report.valid and written.valid,
                problems=tuple(report.problems) + tuple(written.problems),
                expanded_size_bytes=flash_size if flash_size != report.size else None,
            ),
            integrity=checks.IntegrityFacts.from_report(integrity),
            manifest=manifest,
            android_info=android_info,
            android_vars=_android_vars(identity),
            backup=checks.BackupStatus(),
            backup_planned=can_back_up,
            backup_impossible=no_backup,
            options=checks.PreflightOptions(
                allow_downgrade=request.allow_downgrade,
                allow_critical=request.allow_critical,
                forced=forced,
            ),
        )
        result = checks.run_preflight(ctx)
        steps = ["preflight", "backup"] if can_back_up else ["preflight"]
        if loader is not None:
            steps.append("stage-loader")
        steps += ["write", "verify"]
        if slot is not None:
            steps.append("set-trial-slot")
        steps += ["reboot", "validate", "commit"]
        storage = identity.storage.size_bytes if identity.storage else target.size
        backup_bytes = {"full": storage, "target": target.size}.get(scope, 0)
        if partition_size is not None:
            backup_bytes = partition_size
        # Rough: loopback links move ~20 MB/s; boots take seconds. Refined by measured rates.
        estimate = (backup_bytes * 2 + target.size * 2) / 20e6 + profile.boot.timeout_s / 10
        return Plan(
            device_uri=address.uri,
            identity=identity,
            profile=profile,
            target=target,
            slot=slot,
            image_path=image,
            image_format=report.format,
            image_sha256=report.sha256,
            image_size=report.size,
            flash_path=flash_path,
            manifest=manifest,
            expect_version=manifest.version if manifest else None,
            loader_path=loader,
            preflight=result,
            steps=steps,
            estimate_s=estimate,
            forced=forced,
            backup_scope=scope,
        )

    def _manifest(self, request: FlashRequest) -> Manifest | None:
        path = request.manifest
        if path is None:
            sidecar = request.image.with_name(request.image.name + ".manifest.toml")
            path = sidecar if sidecar.is_file() else None
        if path is None:
            return None
        try:
            data = path.read_bytes()
        except OSError as e:
            raise SourceError(f"{path}: cannot read the manifest: {e.strerror}") from e
        return parse_manifest(data, str(path))

    def _target(
        self,
        dev: Device,
        profile: Profile,
        request: FlashRequest,
        size: int,
        manifest: Manifest | None,
    ) -> tuple[Target, str | None]:
        eb = profile.storage.erase_block_bytes
        if request.offset is not None:
            if request.region is not None:
                raise UsageError("give --partition or --offset, not both")
            containing = next(
                (r for r in profile.regions if r.offset <= request.offset < r.end), None
            )
            where = containing.name if containing else f"offset-0x{request.offset:x}"
            return Target(where, request.offset, size, eb), None
        chosen = request.region or (manifest.target if manifest and manifest.target else None)
        name = chosen or profile.default_region
        if name is None:
            raise UsageError(
                f"profile {profile.id} names no default region",
                hint="give --partition NAME or --offset N",
            )
        region = profile.region(name)
        slot: str | None = None
        if region is None and not profile.slots(name) and Capability.PARTITIONS in dev.capabilities:
            # A device of named partitions: any partition it has is a target.
            if cast(Partitions, dev).partition_size(name) is None:
                raise PreflightError(
                    f"the device has no partition '{name}'",
                    check_id="image.size",
                    hint="check the name against the device's partition list "
                    "('unbrick device probe --json')",
                )
            return Target(name, 0, size, eb), None
        if region is None:
            slots = profile.slots(name)
            if not slots:
                known = ", ".join(r.name for r in profile.regions)
                raise UsageError(
                    f"profile {profile.id} has no region '{name}'", hint=f"regions: {known}"
                )
            region, slot = self._inactive_slot(dev, slots)
        elif region.slot is not None:
            slot = region.slot
        return Target(region.name, region.offset, size, eb), slot

    @staticmethod
    def _target_region(profile: Profile, target: Target) -> Region:
        """The region the checks see: the profile's, or the span from an --offset to its end."""
        region = profile.region(target.region)
        if region is not None and region.offset == target.offset:
            return region
        if region is not None:
            return dataclasses.replace(
                region, offset=target.offset, size=region.end - target.offset
            )
        end = profile.storage.size_bytes
        return Region(target.region, target.offset, max(0, end - target.offset), kind="data")

    def _inactive_slot(self, dev: Device, slots: tuple[Region, ...]) -> tuple[Region, str]:
        if Capability.BOOT_CONTROL not in dev.capabilities:
            raise UsageError(
                "this device offers no A/B boot control",
                hint="name the slot's region with --partition",
            )
        active = cast(BootControl, dev).boot_state().active_slot
        for r in slots:
            if r.slot != active:
                return r, cast(str, r.slot)
        raise DeviceError(f"no inactive slot besides '{active}'")

    def _match_profile(
        self, identity: DeviceIdentity, profile_id: str | None, *, required: bool
    ) -> Profile | None:
        if profile_id is not None:
            return self.profiles.get(profile_id)
        found = self.profiles.match(identity)
        if found:
            return found[0]
        if required:
            raise PreflightError(
                f"no profile matches this device (model {identity.model!r}, "
                f"hw revision {identity.hw_revision!r})",
                check_id="device.identity",
                hint="pass --profile NAME or FILE (see docs/profiles.md)",
            )
        return None

    # ---------------------------------------------------------------- running a job

    def _run(
        self,
        job_id: str,
        dev: Device,
        plan: Plan,
        state: JobState,
        root: Progress,
        *,
        start_write_at: int,
        backup_id: str | None,
    ) -> JobResult:
        root.on_change = root.on_change or (
            lambda node: self.sink.emit(progress_event(node, job_id))
        )
        storage = plan.identity.storage.size_bytes if plan.identity.storage else plan.target.size
        size = plan.target.size
        p_backup = root.child("backup", weight=2 * storage, total=storage, unit="B")
        p_write = root.child("write", weight=2 * size, total=size, unit="B")
        p_verify = root.child("verify", weight=size, total=size, unit="B")
        p_boot = root.child("reboot", weight=max(size, 1), total=1)
        opts = self._job_options(job_id)
        try:
            if state in (JobState.PREFLIGHT, JobState.BACKUP):
                state = self._move(job_id, state, JobState.BACKUP)
                with self._step(job_id, "enter-recovery"):
                    self._enter_recovery(dev, plan)
                source, reason = _backup_source(
                    dev,
                    str(opts.get("backup_scope", "full")),
                    plan.slot,
                    link="this link",
                    profile="the profile",
                )
                if source is None:
                    self._skip(job_id, "backup", reason)
                    p_backup.finish()
                elif source == "partition":
                    backup_id = self._backup_partition(job_id, dev, plan, p_backup)
                else:
                    backup_id = self._backup(job_id, dev, plan, p_backup, opts)
            else:
                p_backup.finish()
            if state in (JobState.BACKUP, JobState.STAGE_LOADER) and plan.loader_path:
                state = self._move(job_id, state, JobState.STAGE_LOADER)
                self._check_same_device(job_id, dev, plan.identity)
                self._stage_loader(job_id, dev, plan)
            if state in (JobState.BACKUP, JobState.STAGE_LOADER, JobState.WRITE):
                state = self._move(job_id, state, JobState.WRITE)
                self._check_same_device(job_id, dev, plan.identity)
                self._write(job_id, dev, plan, p_write, start_write_at)
            else:
                p_write.finish()
            if state in (JobState.WRITE, JobState.VERIFY):
                state = self._move(job_id, state, JobState.VERIFY)
                self._verify(job_id, dev, plan, p_verify)
            else:
                p_verify.finish()
            report: BootReport | None = None
            if state in (JobState.VERIFY, JobState.REBOOT, JobState.VALIDATE):
                state = self._move(job_id, state, JobState.REBOOT)
                if Capability.REBOOT in dev.capabilities:
                    report = self._reboot(job_id, dev, plan)
                    state = self._move(job_id, state, JobState.VALIDATE)
                    self._validate(job_id, plan, report)
                else:
                    self._skip(job_id, "reboot", _NO_RESET)
                    self._skip(job_id, "validate", _NO_RESET)
                p_boot.finish()
            state = self._move(job_id, state, JobState.COMMIT)
            if plan.slot is not None:
                self._check_same_device(job_id, dev, plan.identity)
            with self._step(job_id, "commit", slot=plan.slot) as detail:
                if plan.slot is not None and Capability.BOOT_CONTROL in dev.capabilities:
                    try:
                        cast(BootControl, dev).commit(plan.slot)
                    except TransportError as e:
                        raise _Cut(str(e)) from e
                    detail["active_slot"] = plan.slot
            state = self._move(job_id, state, JobState.DONE)
            self._finish(job_id, JobState.DONE, "success")
            root.finish()
            return JobResult(job_id, JobState.DONE, "success", report, backup_id)
        except PreflightError:
            # Raised before anything was written in this phase (the device was swapped).
            self._finish(job_id, JobState.FAILED, "refused")
            raise
        except _Cut as cut:
            # The device went away (power cut, cable): nothing more can be done now.
            self._event(job_id, "state", state.value, interrupted=str(cut))
            raise DeviceError(
                f"job {job_id} interrupted in step '{state.value}': {cut}",
                hint=f"reconnect or power the device, then run 'unbrick resume {job_id}'",
            ) from cut
        except (VerifyError, _BootFailed) as e:
            if not state.device_touched:
                raise
            return self._rollback(job_id, dev, plan, state, backup_id, e)

    def _enter_recovery(self, dev: Device, plan: Plan) -> None:
        if Capability.REBOOT in dev.capabilities:
            try:
                cast(Reboot, dev).enter_recovery(plan.profile.boot.timeout_s)
            except TransportError as e:
                raise _Cut(str(e)) from e

    def _loader(self, profile: Profile, request: FlashRequest) -> Path | None:
        """The loader to stage first: required by two-pass profiles, refused by others."""
        if profile.loader is None:
            if request.loader is not None:
                raise UsageError(f"profile {profile.id} stages no loader; drop --loader")
            return None
        if request.loader is None:
            raise UsageError(
                f"{profile.name} is flashed in two passes: a loader first "
                f"({profile.loader.description or 'see the profile'})",
                hint="give it with --loader FILE",
            )
        if profile.loader.region is None or profile.region(profile.loader.region) is None:
            raise UsageError(f"profile {profile.id} names no loader region")
        if not request.loader.is_file():
            raise SourceError(f"{request.loader}: no such loader file")
        return request.loader

    def _stage_loader(self, job_id: str, dev: Device, plan: Plan) -> None:
        """Pass one: write and verify the loader, then restart into it."""
        assert plan.loader_path is not None and plan.profile.loader is not None
        region = plan.profile.region(cast(str, plan.profile.loader.region))
        assert region is not None
        with (
            self._step(job_id, "stage-loader", region=region.name) as detail,
            _open_image(plan.loader_path) as image,
        ):
            if image.size > region.size:
                raise UsageError(
                    f"loader {plan.loader_path.name} ({image.size} bytes) does not fit "
                    f"region {region.name} ({region.size} bytes)"
                )
            target = Target(region.name, region.offset, image.size, plan.target.erase_block)
            try:
                write_range(dev, target, image)
                detail["verified_by"] = verify_range(dev, target, image)
                self._enter_recovery(dev, plan)
            except (TransportError, DeviceError) as e:
                raise _Cut(str(e)) from e
            detail["bytes"] = image.size

    def _job_options(self, job_id: str) -> dict[str, Any]:
        return dict(self.store.get_job(job_id).options)

    def _backup(
        self, job_id: str, dev: Device, plan: Plan, progress: Progress, opts: Mapping[str, Any]
    ) -> str:
        regions: list[Region] | None = None
        if opts.get("backup_scope") == "target":
            regions = [
                Region(
                    plan.target.region,
                    plan.target.offset,
                    -(-plan.target.size // plan.target.erase_block) * plan.target.erase_block,
                )
            ]
        with self._step(job_id, "backup", scope=opts.get("backup_scope", "full")) as detail:
            try:
                record = backups.take_backup(
                    dev,
                    regions,
                    vault=self.vault,
                    identity=plan.identity,
                    progress=progress,
                    sink=self.sink,
                    job_id=job_id,
                )
            except (TransportError, DeviceError) as e:
                raise _Cut(str(e)) from e
            detail["backup_id"] = record.id
            detail["verified_by"] = record.meta.get("verified_by")
        self.store.update_job(job_id, state=JobState.BACKUP.value, data={"backup_id": record.id})
        return record.id

    def _backup_partition(self, job_id: str, dev: Device, plan: Plan, progress: Progress) -> str:
        """Back up the target partition, whole, by name (``Capability.PARTITION_READ``)."""
        name = plan.target.region
        with self._step(job_id, "backup", scope="target", partition=name) as detail:
            try:
                record = backups.take_partition_backup(
                    dev,
                    [name],
                    vault=self.vault,
                    identity=plan.identity,
                    progress=progress,
                    sink=self.sink,
                    job_id=job_id,
                )
            except (TransportError, DeviceError) as e:
                raise _Cut(str(e)) from e
            detail["backup_id"] = record.id
            detail["bytes"] = record.size_bytes
            detail["verified_by"] = record.meta.get("verified_by")
        self.store.update_job(job_id, state=JobState.BACKUP.value, data={"backup_id": record.id})
        return record.id

    def _write(
        self, job_id: str, dev: Device, plan: Plan, progress: Progress, start_at: int
    ) -> None:
        with (
            self._step(
                job_id,
                "write",
                region=plan.target.region,
                offset=plan.target.offset,
                size=plan.target.size,
                start_at=start_at,
            ) as detail,
            _open_image(plan.flash_path) as image,
        ):
            if Capability.IMAGE_WRITE in dev.capabilities and start_at == 0:
                detail.update(self._write_image(job_id, dev, plan, progress))
                return
            try:
                write_range(
                    dev,
                    plan.target,
                    image,
                    start_at=start_at,
                    progress=progress,
                    checkpoint=lambda pos: self.store.set_checkpoint(job_id, "write", {"pos": pos}),
                    cancelled=self.cancel.is_set,
                )
            except (TransportError, DeviceError) as e:
                raise _Cut(str(e)) from e
            detail["bytes"] = plan.target.size - start_at

    def _write_image(
        self, job_id: str, dev: Device, plan: Plan, progress: Progress
    ) -> dict[str, Any]:
        """The link writes the whole image itself (with its own transfer and check)."""
        target = WriteTarget(
            plan.target.region, plan.target.offset, plan.target.size, slot=plan.slot
        )
        try:
            result = cast(ImageWrite, dev).write_image(
                target, plan.flash_path, progress=progress.set
            )
        except (TransportError, DeviceError) as e:
            raise _Cut(str(e)) from e
        except PreflightError:
            # The link refused before writing (the image does not fit once expanded...).
            self._finish(job_id, JobState.FAILED, "refused")
            raise
        progress.finish()
        self.store.update_job(
            job_id, state=JobState.WRITE.value, data={"verified_by": result.verified_by}
        )
        return {"bytes": result.bytes_written, "verified_by": result.verified_by, **result.detail}

    def _verify(self, job_id: str, dev: Device, plan: Plan, progress: Progress) -> None:
        by = str(self.store.get_job(job_id).data.get("verified_by") or "")
        if _reads_back_partition(dev, plan.image_format):
            # The partition is read back (fetch) and compared with the image, after the
            # link's own check.
            with (
                self._step(job_id, "verify", region=plan.target.region) as detail,
                _open_image(plan.flash_path) as image,
            ):
                progress.total = float(image.size)
                try:
                    bad = partition_bad_ranges(
                        cast(PartitionRead, dev), plan.target.region, image, progress=progress
                    )
                except (TransportError, DeviceError) as e:
                    raise _Cut(str(e)) from e
                detail["method"] = "read-back"
                detail["link_check"] = by
                if bad:
                    names = ", ".join(f"0x{o:x}-0x{o + n - 1:x}" for o, n in bad)
                    raise VerifyError(
                        f"{plan.target.region}: {len(bad)} range(s) read back differently from "
                        f"the image although the device accepted the write: {names}",
                        ranges=bad,
                    )
            progress.finish()
            return
        if by or not {Capability.READ, Capability.DEVICE_HASH} & dev.capabilities:
            # The link checked its whole-image write (or nothing can be read back or hashed):
            # its check is the verdict.
            with self._step(job_id, "verify", region=plan.target.region) as detail:
                if not by:
                    raise VerifyError(
                        f"{plan.device_uri} can neither read back nor hash "
                        f"'{plan.target.region}', and the write was not checked",
                        ranges=[(plan.target.offset, plan.target.size)],
                    )
                detail["method"] = f"link ({by})"
            progress.finish()
            return
        with (
            self._step(job_id, "verify", region=plan.target.region) as detail,
            _open_image(plan.flash_path) as image,
        ):
            try:
                detail["method"] = verify_range(dev, plan.target, image, progress=progress)
            except (TransportError, DeviceError) as e:
                raise _Cut(str(e)) from e

    def _reboot(self, job_id: str, dev: Device, plan: Plan) -> BootReport:
        if plan.slot is not None and Capability.BOOT_CONTROL in dev.capabilities:
            with self._step(job_id, "set-trial-slot", slot=plan.slot):
                try:
                    cast(BootControl, dev).set_trial(plan.slot)
                except TransportError as e:
                    raise _Cut(str(e)) from e
        with self._step(job_id, "reboot") as detail:
            try:
                report = cast(Reboot, dev).reboot(plan.profile.boot.timeout_s)
            except TransportError as e:
                raise _Cut(str(e)) from e
            detail.update(
                state=report.state,
                firmware_version=report.firmware_version,
                slot=report.booted_slot,
            )
        for line in report.log.splitlines()[-40:]:
            self.store.add_event(job_id, Event("log", "console", job_id, data={"line": line}))
        return report

    def _validate(self, job_id: str, plan: Plan, report: BootReport) -> None:
        with self._step(job_id, "validate") as detail:
            problems = boot_problems(plan.profile, report, plan.expect_version, plan.slot)
            detail["problems"] = problems
            if problems:
                raise _BootFailed("; ".join(problems))

    # ---------------------------------------------------------------- rollback and restore

    def _rollback(
        self,
        job_id: str,
        dev: Device,
        plan: Plan,
        state: JobState,
        backup_id: str | None,
        cause: Exception,
    ) -> JobResult:
        if plan.slot is None and backup_id is None:
            # Nothing to roll back to: the link could not read the device before the write.
            self._move(job_id, state, JobState.FAILED)
            self._finish(job_id, JobState.FAILED, "failed", error=str(cause))
            hint = (
                "no backup was taken (the link cannot read the device, or the profile takes "
                "none on it): write the region again (a retry on a good cable usually works) "
                "or flash the vendor's image"
            )
            if isinstance(cause, VerifyError):
                raise VerifyError(f"job {job_id}: {cause}", ranges=cause.ranges, hint=hint)
            raise DeviceError(f"job {job_id}: {cause}", hint=hint) from cause
        state = self._move(job_id, state, JobState.ROLLING_BACK)
        self._event(job_id, "state", state.value, cause=str(cause))
        try:
            with self._step(job_id, "rollback", cause=str(cause)) as detail:
                if plan.slot is not None:
                    # A/B: the old slot was never touched; make sure it stays the one that boots.
                    old = _other_slot(plan.profile, plan.slot)
                    self._enter_recovery(dev, plan)
                    cast(BootControl, dev).commit(old)
                    detail["active_slot"] = old
                else:
                    if backup_id is None:
                        raise JobError("no backup to roll back to")
                    if backups.is_partition_backup(self.vault.get(backup_id).meta):
                        self._restore_partition(job_id, dev, plan, backup_id)
                    else:
                        self._restore_region(job_id, dev, plan, backup_id)
                    detail["restored_from"] = backup_id
                report = cast(Reboot, dev).reboot(plan.profile.boot.timeout_s)
                detail.update(
                    state=report.state,
                    firmware_version=report.firmware_version,
                    slot=report.booted_slot,
                )
                old_version = plan.identity.firmware_version
                problems = boot_problems(plan.profile, report, old_version, None)
                if problems:
                    raise DeviceError("after the rollback: " + "; ".join(problems))
        except UnbrickError as e:
            self._finish(job_id, JobState.UNRECOVERED, "failed", error=e.one_line())
            raise DeviceError(
                f"job {job_id}: {cause}; the rollback failed too: {e.message}",
                hint=f"run 'unbrick resume {job_id}' or 'unbrick restore'",
            ) from e
        self._move(job_id, JobState.ROLLING_BACK, JobState.ROLLED_BACK)
        self._finish(job_id, JobState.ROLLED_BACK, "rolled_back", cause=str(cause))
        raise RolledBack(
            f"job {job_id}: {cause}; the device was restored and runs "
            f"{plan.identity.firmware_version or 'its previous firmware'}"
        )

    def _restore_region(self, job_id: str, dev: Device, plan: Plan, backup_id: str) -> None:
        """Write the backed-up content of the target's span back to the device."""
        eb = plan.target.erase_block
        span = -(-plan.target.size // eb) * eb
        self._enter_recovery(dev, plan)
        self._check_same_device(job_id, dev, plan.identity)
        self._write_from_backup(
            dev, Target(plan.target.region, plan.target.offset, span, eb), backup_id
        )

    def _restore_partition(self, job_id: str, dev: Device, plan: Plan, backup_id: str) -> None:
        """Write the backed-up partition back whole through the link (``IMAGE_WRITE``), then
        read it back and compare it with the backup."""
        name = plan.target.region
        self._enter_recovery(dev, plan)
        self._check_same_device(job_id, dev, plan.identity)
        data = self.workdir / f"restore-{backup_id[:16]}-{name}.img"
        data.parent.mkdir(parents=True, exist_ok=True)
        try:
            try:
                with open(data, "wb") as f:
                    for piece in backups.iter_region_data(self.vault, backup_id, name):
                        f.write(piece)
            except OSError as e:
                raise SourceError(f"{data}: cannot write the backup out: {e.strerror}") from e
            size = data.stat().st_size
            cast(ImageWrite, dev).write_image(WriteTarget(name, 0, size), data)
            with _open_image(data) as image:
                bad = partition_bad_ranges(cast(PartitionRead, dev), name, image)
            if bad:
                names = ", ".join(f"0x{o:x}-0x{o + n - 1:x}" for o, n in bad)
                raise VerifyError(
                    f"'{name}' does not read back as the backup after the restore: {names}",
                    ranges=bad,
                )
        finally:
            data.unlink(missing_ok=True)

    # ---------------------------------------------------------------- backup and restore

    def backup(
        self,
        uri: str,
        regions: list[str] | None = None,
        *,
        operator: str = "",
        progress: Progress | None = None,
    ) -> JobResult:
        """Read (all or the named regions of) the device into the vault, verified.

        On a device of named partitions that can read them back (fastboot with ``fetch``),
        ``regions`` are partition names, each backed up whole.
        """
        address = parse_device_uri(uri)
        job_id = new_job_id()
        with self._device(address) as dev:
            identity = _identify(dev, address)
            profile = self._match_profile(identity, None, required=False)
            chosen: list[Region] | None = None
            by_name = {Capability.PARTITIONS, Capability.PARTITION_READ} <= dev.capabilities
            if by_name and not regions:
                raise UsageError(
                    "a device of named partitions is backed up partition by partition",
                    hint="name them with --region NAME (repeatable)",
                )
            if regions and not by_name:
                if profile is None:
                    raise UsageError(
                        "regions need a profile for this device",
                        hint="pass --profile, or back up the whole storage",
                    )
                chosen = []
                for name in regions:
                    region = profile.region(name)
                    if region is None:
                        known = ", ".join(r.name for r in profile.regions)
                        raise UsageError(
                            f"no region '{name}' in profile {profile.id}", hint=f"regions: {known}"
                        )
                    chosen.append(region)
            self.store.create_job(
                self._job_record(
                    job_id, "backup", uri, identity, operator, options={"regions": regions or "all"}
                )
            )
            root = progress or Progress("backup")
            root.on_change = root.on_change or (
                lambda node: self.sink.emit(progress_event(node, job_id))
            )
            state = self._move(job_id, JobState.PLANNED, JobState.BACKUP)
            try:
                if profile is not None:
                    with self._step(job_id, "enter-recovery"), contextlib.suppress(TransportError):
                        self._enter_recovery_profile(dev, profile)
                with self._step(job_id, "backup", regions=regions or "all") as detail:
                    if by_name:
                        record = backups.take_partition_backup(
                            dev,
                            list(regions or ()),
                            vault=self.vault,
                            identity=identity,
                            progress=root,
                            sink=self.sink,
                            job_id=job_id,
                        )
                    else:
                        record = backups.take_backup(
                            dev,
                            chosen,
                            vault=self.vault,
                            identity=identity,
                            progress=root,
                            sink=self.sink,
                            job_id=job_id,
                        )
                    detail["backup_id"] = record.id
            except UnbrickError as e:
                self._finish(job_id, JobState.FAILED, "failed", error=e.one_line())
                raise
            self._move(job_id, state, JobState.DONE)
            self._finish(job_id, JobState.DONE, "success", backup_id=record.id)
            root.finish()
            return JobResult(job_id, JobState.DONE, "success", None, record.id)

    def restore(
        self,
        uri: str,
        backup_id: str,
        *,
        profile_id: str | None = None,
        allow_critical: bool = False,
        forced: Mapping[str, str] | None = None,
        operator: str = "",
        progress: Progress | None = None,
    ) -> JobResult:
        """Write a backup back: every region whose content differs, verified, then reboot and
        validate. The same safe workflow as a flash (identity checks, a backup of the current
        state first, per-range verification). Idempotent: run it again after an interruption.
        """
        address = self._address(uri, profile_id)
        full_id = self.vault.resolve(backup_id)
        record = self.vault.get(full_id)
        forced = dict(forced or {})
        if backups.is_partition_backup(record.meta):
            return self._restore_partitions(
                address,
                uri,
                full_id,
                profile_id=profile_id,
                forced=forced,
                operator=operator,
                progress=progress,
            )
        job_id = new_job_id()
        with self._device(address) as dev:
            identity = _identify(dev, address)
            profile = self._match_profile(identity, profile_id, required=True)
            assert profile is not None
            owner = DeviceIdentity.from_dict(record.meta["device_identity"])
            self.store.create_job(
                self._job_record(
                    job_id,
                    "restore",
                    uri,
                    identity,
                    operator,
                    options={
                        "backup_id": full_id,
                        "forced": forced,
                        "allow_critical": allow_critical,
                        "profile": profile.id,
                    },
                )
            )
            state = self._move(job_id, JobState.PLANNED, JobState.PREFLIGHT)
            root = progress or Progress("restore")
            root.on_change = root.on_change or (
                lambda node: self.sink.emit(progress_event(node, job_id))
            )
            try:
                with self._step(job_id, "preflight", backup=full_id) as detail:
                    _refuse_other_unit(full_id, owner, identity, forced)
                    self._enter_recovery_profile(dev, profile)
                    changed = self._changed_regions(dev, profile, full_id, record.meta)
                    detail["regions"] = [r.name for r in changed]
                    critical = [r.name for r in changed if r.critical]
                    if critical and not allow_critical and "region.critical" not in forced:
                        raise PreflightError(
                            f"restoring would rewrite critical region(s) {', '.join(critical)}",
                            check_id="region.critical",
                            overridable=True,
                            hint="pass --allow-critical if the bootloader itself is damaged",
                        )
            except PreflightError as e:
                self._finish(job_id, JobState.REFUSED, "refused", refusal=e.one_line())
                raise
            try:
                state = self._move(job_id, state, JobState.BACKUP)
                with self._step(job_id, "backup-current-state") as detail:
                    before = backups.take_backup(
                        dev,
                        None,
                        vault=self.vault,
                        identity=identity,
                        progress=root.child("backup", total=1.0),
                        sink=self.sink,
                        job_id=job_id,
                    )
                    detail["backup_id"] = before.id
                self.store.update_job(job_id, state=state.value, data={"backup_id": before.id})
                state = self._move(job_id, state, JobState.WRITE)
                eb = profile.storage.erase_block_bytes
                for region in changed:
                    self._check_same_device(job_id, dev, identity)
                    target = Target(region.name, region.offset, region.size, eb)
                    with self._step(job_id, "write", region=region.name) as detail:
                        self._write_from_backup(dev, target, full_id)
                        detail["bytes"] = region.size
                state = self._move(job_id, state, JobState.REBOOT)
                state, report = self._restored_boot(
                    job_id, dev, state, profile, owner.firmware_version, skip=""
                )
            except UnbrickError as e:
                self._finish(job_id, JobState.FAILED, "failed", error=e.one_line())
                raise
            state = self._move(job_id, state, JobState.COMMIT)
            self._move(job_id, state, JobState.DONE)
            self._finish(job_id, JobState.DONE, "success")
            root.finish()
            return JobResult(
                job_id,
                JobState.DONE,
                "success",
                report,
                full_id,
                {"regions": [r.name for r in changed]},
            )

    def _restore_partitions(
        self,
        address: DeviceAddress,
        uri: str,
        backup_id: str,
        *,
        profile_id: str | None,
        forced: Mapping[str, str],
        operator: str,
        progress: Progress | None,
    ) -> JobResult:
        """Restore a backup of named partitions (fastboot ``fetch``): each partition whose
        content differs is backed up as it is now, written back whole through the link, and
        read back; then the device reboots and its boot is checked."""
        record = self.vault.get(backup_id)
        regions = backups.backup_regions(record)
        held = [r.name for r in regions]
        job_id = new_job_id()
        with self._device(address) as dev:
            need = {Capability.PARTITIONS, Capability.PARTITION_READ, Capability.IMAGE_WRITE}
            if not need <= dev.capabilities:
                raise UsageError(
                    f"backup {backup_id[:12]} holds named partitions ({', '.join(held)}); "
                    f"{uri} cannot write and read partitions by name",
                    hint="restore it to the device it came from, in fastboot mode",
                )
            identity = _identify(dev, address)
            profile = self._match_profile(identity, profile_id, required=False)
            owner = DeviceIdentity.from_dict(record.meta["device_identity"])
            self.store.create_job(
                self._job_record(
                    job_id,
                    "restore",
                    uri,
                    identity,
                    operator,
                    options={
                        "backup_id": backup_id,
                        "forced": dict(forced),
                        "partitions": held,
                        "profile": profile.id if profile else None,
                    },
                )
            )
            state = self._move(job_id, JobState.PLANNED, JobState.PREFLIGHT)
            root = progress or Progress("restore")
            root.on_change = root.on_change or (
                lambda node: self.sink.emit(progress_event(node, job_id))
            )
            parts = cast(Partitions, dev)
            reader = cast(PartitionRead, dev)
            workdir = self.workdir / f"restore-{backup_id[:16]}"
            workdir.mkdir(parents=True, exist_ok=True)
            try:
                with self._step(job_id, "preflight", backup=backup_id) as detail:
                    _refuse_other_unit(backup_id, owner, identity, forced)
                    changed: list[str] = []
                    for region in regions:
                        size = parts.partition_size(region.name)
                        if size is None or size < region.size_bytes:
                            raise PreflightError(
                                f"the device has no partition '{region.name}' as large as the "
                                f"backup's ({region.size_bytes} bytes)",
                                check_id="image.size",
                                hint="restore it to the device it came from",
                            )
                        now = partition_digest(reader, region.name, region.size_bytes)
                        if now != region.sha256:
                            changed.append(region.name)
                    detail["partitions"] = changed
            except PreflightError as e:
                self._finish(job_id, JobState.REFUSED, "refused", refusal=e.one_line())
                shutil.rmtree(workdir, ignore_errors=True)
                raise
            try:
                state = self._move(job_id, state, JobState.BACKUP)
                if changed:
                    with self._step(job_id, "backup-current-state") as detail:
                        before = backups.take_partition_backup(
                            dev,
                            changed,
                            vault=self.vault,
                            identity=identity,
                            progress=root.child("backup", total=1.0),
                            sink=self.sink,
                            job_id=job_id,
                        )
                        detail["backup_id"] = before.id
                    self.store.update_job(job_id, state=state.value, data={"backup_id": before.id})
                else:
                    self._skip(job_id, "backup-current-state", "every partition is as backed up")
                state = self._move(job_id, state, JobState.WRITE)
                for name in changed:
                    self._check_same_device(job_id, dev, identity)
                    path = workdir / f"{name}.img"
                    with open(path, "wb") as f:
                        for piece in backups.iter_region_data(self.vault, backup_id, name):
                            f.write(piece)
                    size = path.stat().st_size
                    with self._step(job_id, "write", region=name) as detail:
                        result = cast(ImageWrite, dev).write_image(WriteTarget(name, 0, size), path)
                        detail["bytes"] = result.bytes_written
                    with (
                        self._step(job_id, "verify", region=name) as detail,
                        _open_image(path) as image,
                    ):
                        bad = partition_bad_ranges(reader, name, image)
                        detail["method"] = "read-back"
                        if bad:
                            where = ", ".join(f"0x{o:x}-0x{o + n - 1:x}" for o, n in bad)
                            raise VerifyError(
                                f"'{name}' does not read back as the backup: {where}",
                                ranges=bad,
                            )
                state = self._move(job_id, state, JobState.REBOOT)
                state, report = self._restored_boot(
                    job_id,
                    dev,
                    state,
                    profile,
                    owner.firmware_version,
                    skip="" if changed else "nothing was written",
                )
            except UnbrickError as e:
                self._finish(job_id, JobState.FAILED, "failed", error=e.one_line())
                raise
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
            state = self._move(job_id, state, JobState.COMMIT)
            self._move(job_id, state, JobState.DONE)
            self._finish(job_id, JobState.DONE, "success")
            root.finish()
            return JobResult(
                job_id, JobState.DONE, "success", report, backup_id, {"regions": changed}
            )

    def _restored_boot(
        self,
        job_id: str,
        dev: Device,
        state: JobState,
        profile: Profile | None,
        old_version: str | None,
        *,
        skip: str,
    ) -> tuple[JobState, BootReport | None]:
        """Reboot a restored device and check its boot (skipped, with ``skip`` or when the
        link cannot reset it); the job's state after, and the boot report."""
        why = skip or ("" if Capability.REBOOT in dev.capabilities else _NO_RESET)
        if why:
            self._skip(job_id, "reboot", why)
            self._skip(job_id, "validate", why)
            return state, None
        with self._step(job_id, "reboot") as detail:
            report = cast(Reboot, dev).reboot(profile.boot.timeout_s if profile else 60.0)
            detail.update(state=report.state, firmware_version=report.firmware_version)
        for line in report.log.splitlines()[-40:]:
            self.store.add_event(job_id, Event("log", "console", job_id, data={"line": line}))
        state = self._move(job_id, state, JobState.VALIDATE)
        with self._step(job_id, "validate") as detail:
            if profile is not None:
                problems = boot_problems(profile, report, old_version, None)
            else:
                problems = ["the device did not answer"] if report.state == "dead" else []
            detail["problems"] = problems
            if problems:
                raise DeviceError(
                    "the restored device does not boot: " + "; ".join(problems),
                    hint="the backup may hold a broken firmware; flash a known-good image instead",
                )
        return state, report

    def _changed_regions(
        self, dev: Device, profile: Profile, backup_id: str, meta: Mapping[str, Any]
    ) -> list[Region]:
        """Profile regions whose device content differs from the backup's."""
        covered = [r for r in profile.regions if backups.covers(meta, r.offset, r.size)]
        changed = []
        for region in covered:
            want = hashlib.sha256()
            for piece in backups.iter_range(self.vault, backup_id, region.offset, region.size):
                want.update(piece)
            got = range_digest(dev, region.offset, region.size)
            if got != want.hexdigest():
                changed.append(region)
        return changed

    def _write_from_backup(self, dev: Device, target: Target, backup_id: str) -> None:
        data = self.workdir / f"restore-{backup_id[:16]}-{target.offset:x}.bin"
        data.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(data, "wb") as f:
                for piece in backups.iter_range(self.vault, backup_id, target.offset, target.size):
                    f.write(piece)
            with _open_image(data) as image:
                write_range(dev, target, image)
                verify_range(dev, target, image)
        finally:
            data.unlink(missing_ok=True)

    def _finish(self, job_id: str, state: JobState, outcome: str, **data: Any) -> None:
        """Record how a job ended (its state, outcome and any facts worth keeping)."""
        self.store.update_job(job_id, state=state.value, outcome=outcome, data=data or None)

    def _skip(self, job_id: str, name: str, reason: str) -> None:
        step_id = self.store.begin_step(job_id, name, {})
        self.store.end_step(step_id, result="skipped", detail={"reason": reason}, error=None)
        self.sink.emit(Event("step-end", name, job_id, data={"skipped": reason}))

    def _enter_recovery_profile(self, dev: Device, profile: Profile) -> None:
        if Capability.REBOOT in dev.capabilities:
            cast(Reboot, dev).enter_recovery(profile.boot.timeout_s)

    def _job_record(
        self,
        job_id: str,
        kind: str,
        uri: str,
        identity: DeviceIdentity,
        operator: str,
        *,
        options: dict[str, Any],
    ) -> JobRecord:
        now = time.time()
        return JobRecord(
            id=job_id,
            created_at=now,
            updated_at=now,
            kind=kind,
            state=JobState.PLANNED.value,
            outcome=None,
            operator=operator or _operator(),
            device_uri=uri,
            device_identity=identity.to_dict(),
            image=None,
            plan={},
            options=options,
            data={},
        )

    # ---------------------------------------------------------------- resume

    def resume(self, job_id: str, *, progress: Progress | None = None) -> JobResult:
        """Continue an interrupted job after re-reading the device, or roll it back.

        Never silent: the resume is a journaled step that records what it found (the job's
        state, the device's state, whether the image is unchanged, where writing continues).
        """
        job = self.store.get_job(job_id)
        state = JobState(job.state)
        if state.terminal and state is not JobState.UNRECOVERED:
            raise JobError(
                f"job {job_id} already ended: {job.outcome or state.value}",
                hint="nothing to resume",
            )
        if job.kind != "flash":
            raise JobError(f"job {job_id} is a {job.kind} job; only flash jobs resume")
        profile_id = job.options.get("profile")
        address = self._address(job.device_uri, str(profile_id) if profile_id else None)
        profile = self.profiles.find(str(profile_id)) if profile_id else None
        # A job cut during its reboot finds the device still starting: wait for it a while.
        wait_s = profile.recovery.wait_s if profile is not None else 0.0
        with self._device(address, wait_s=wait_s) as dev:
            identity = _identify(dev, address)
            recorded = DeviceIdentity.from_dict(job.device_identity)
            if not identity.same_device(recorded):
                raise PreflightError(
                    f"job {job_id} was for {recorded.model} serial {recorded.serial}, but "
                    f"{job.device_uri} is {identity.model} serial {identity.serial}",
                    check_id="device.identity",
                    hint="connect the device the job was started on",
                )
            plan = self._plan_from_job(job, recorded)
            backup_id = job.data.get("backup_id")
            start_at = 0
            with self._step(job_id, "resume", state=state.value) as detail:
                image_ok = _file_sha256(plan.image_path) == plan.image_sha256
                detail["image_unchanged"] = image_ok
                if image_ok and plan.flash_path != plan.image_path:
                    image_ok = plan.flash_path.is_file()
                if (
                    state in (JobState.WRITE, JobState.VERIFY)
                    and image_ok
                    and (Capability.READ not in dev.capabilities)
                ):
                    # The link writes whole images and cannot read addresses: write it again.
                    self._enter_recovery(dev, plan)
                    detail["continue_write_at"] = 0
                elif state in (JobState.WRITE, JobState.VERIFY) and image_ok:
                    self._enter_recovery(dev, plan)
                    with _open_image(plan.flash_path) as image:
                        bad = bad_ranges(dev, plan.target, image)
                    start_at = _first_bad(bad, plan.target.erase_block, plan.target.size)
                    detail["continue_write_at"] = start_at
            if state in (JobState.ROLLING_BACK, JobState.UNRECOVERED) or (
                state.device_touched and not image_ok
            ):
                cause = (
                    JobError("the image changed or vanished since the job started")
                    if not image_ok
                    else JobError("resumed an interrupted rollback")
                )
                return self._rollback(job_id, dev, plan, state, backup_id, cause)
            if state in (JobState.PLANNED, JobState.PREFLIGHT):
                state = self._move(job_id, state, JobState.PREFLIGHT)
            if state in (JobState.STAGE_LOADER, JobState.WRITE, JobState.VERIFY):
                state = JobState.WRITE if start_at < plan.target.size else JobState.VERIFY
            return self._run(
                job_id,
                dev,
                plan,
                state,
                progress or Progress("resume"),
                start_write_at=start_at,
                backup_id=backup_id,
            )

    def _plan_from_job(self, job: JobRecord, identity: DeviceIdentity) -> Plan:
        opts = job.options
        profile = self.profiles.get(str(opts["profile"]))
        image = job.image or {}
        target = Target(
            str(opts["region"]),
            int(opts["offset"]),
            int(job.plan["target"]["size"]),
            profile.storage.erase_block_bytes,
        )
        return Plan(
            device_uri=job.device_uri,
            identity=identity,
            profile=profile,
            target=target,
            slot=opts.get("slot"),
            image_path=Path(image.get("path", "")),
            image_format=str(image.get("format", "raw")),
            image_sha256=str(image.get("sha256", "")),
            image_size=int(image.get("size", 0)),
            flash_path=Path(image.get("flash_path", image.get("path", ""))),
            manifest=None,
            expect_version=image.get("version"),
            loader_path=Path(opts["loader"]) if opts.get("loader") else None,
            preflight=checks.PreflightResult(()),
            steps=list(job.plan.get("steps", [])),
            estimate_s=0.0,
            forced=dict(opts.get("forced", {})),
        )

    # ---------------------------------------------------------------- helpers

    def _inspect(self, path: Path) -> ImageReport:
        if self.image_reports is not None:
            return self.image_reports.inspect(path)
        return inspect_path(path)

    def _address(self, uri: str, profile_id: str | None) -> DeviceAddress:
        """The device address, with the named profile's defaults for its link (``[link.X]``)
        where the URI does not set them."""
        address = parse_device_uri(uri)
        if profile_id is None:
            return address
        profile = self.profiles.get(profile_id)
        return address.with_defaults(profile.link_params(address.protocol))

    @contextlib.contextmanager
    def _device(self, address: DeviceAddress, *, wait_s: float = 0.0) -> Iterator[Device]:
        """The open device; with ``wait_s``, opening is retried that long while the device
        does not answer (it may be powering on)."""
        deadline = time.monotonic() + wait_s  # real time: it sleeps
        while True:
            try:
                dev = self._open_device(address)
                break
            except TransportError:
                if time.monotonic() >= deadline:
                    raise
                log.info("%s does not answer yet; waiting", address.uri)
                time.sleep(0.5)
        try:
            yield dev
        finally:
            with contextlib.suppress(Exception):
                dev.close()

    def _move(self, job_id: str, current: JobState, target: JobState) -> JobState:
        state = transition(current, target)
        self.store.update_job(job_id, state=state.value)
        self.sink.emit(Event("state", state.value, job_id))
        return state

    def _event(self, job_id: str, kind: str, name: str, **data: Any) -> None:
        event = Event(kind, name, job_id, data=data)
        self.sink.emit(event)
        if job_id:
            self.store.add_event(job_id, event)

    def _check_same_device(self, job_id: str, dev: Device, expected: DeviceIdentity) -> None:
        with self._step(job_id, "identity-recheck") as detail:
            try:
                now = cast(Identify, dev).identify()
            except TransportError as e:
                raise _Cut(str(e)) from e
            detail["serial"] = now.serial
            if not now.same_device(expected):
                raise PreflightError(
                    f"the device changed: expected {expected.model} serial {expected.serial}, "
                    f"found {now.model} serial {now.serial}",
                    check_id="device.identity",
                    hint="nothing was written to the new device; reconnect the right one",
                )

    @contextlib.contextmanager
    def _step(self, job_id: str, name: str, **args: Any) -> Iterator[dict[str, Any]]:
        step_id = self.store.begin_step(job_id, name, args)
        self.sink.emit(Event("step-start", name, job_id, data=args))
        t0 = self.clock()
        detail: dict[str, Any] = {}
        try:
            yield detail
        except BaseException as e:
            error = e.one_line() if isinstance(e, UnbrickError) else f"{type(e).__name__}: {e}"
            duration = round(self.clock() - t0, 3)
            self.store.end_step(step_id, result="failed", detail=detail, error=error)
            self.sink.emit(
                Event(
                    "step-error",
                    name,
                    job_id,
                    data={**detail, "error": error, "duration_s": duration},
                )
            )
            raise
        duration = round(self.clock() - t0, 3)
        self.store.end_step(step_id, result="ok", detail=detail, error=None)
        self.sink.emit(Event("step-end", name, job_id, data={**detail, "duration_s": duration}))


_NO_PARTITION_READ = (
    "the device cannot send its partitions back (a fastboot bootloader without 'fetch')"
)
_NO_RESET = (
    "this link cannot reset the device (a programmer, a card or a disk): power-cycle it or "
    "put the medium back, then check it with 'unbrick device probe'"
)


class _BootFailed(Exception):
    """Internal: the first boot after the write did not validate."""


def boot_problems(
    profile: Profile, report: BootReport, expect_version: str | None, slot: str | None
) -> list[str]:
    """Why a boot report is not a good first boot (empty: it is)."""
    problems: list[str] = []
    version = report.firmware_version
    if version is None and profile.boot.version_pattern:
        found = re.search(profile.boot.version_pattern, report.log)
        version = found.group(1) if found else None
    if report.state != "firmware":
        problems.append(f"the device did not boot its firmware (state '{report.state}')")
    for pattern in profile.boot.failure_patterns:
        m = re.search(pattern, report.log)
        if m:
            problems.append(f"boot log shows '{m.group(0)}'")
    if profile.boot.success_pattern and not re.search(profile.boot.success_pattern, report.log):
        problems.append(f"boot log lacks the success pattern /{profile.boot.success_pattern}/")
    if profile.boot.expect_version and expect_version and version != expect_version:
        problems.append(f"the device runs version {version!r}, expected {expect_version!r}")
    if slot is not None and report.booted_slot not in (None, slot):
        problems.append(f"the device booted slot '{report.booted_slot}', not the new '{slot}'")
    return problems


def _identify(dev: Device, address: DeviceAddress) -> DeviceIdentity:
    """The device's identity, with the link it was reached over in ``extra["link"]`` (the
    generic profiles match on it: ``[match.extra] link = "fastboot"``)."""
    identity = cast(Identify, dev).identify()
    if "link" in identity.extra:
        return identity
    return dataclasses.replace(identity, extra={**identity.extra, "link": address.protocol})


def _android_vars(identity: DeviceIdentity) -> dict[str, str]:
    """The fastboot variables android-info.txt lines test, from what the device reported.

    A fastboot driver reports getvar answers in ``identity.extra``; other links map the
    identity: product is the model, version-bootloader the bootloader version.
    """
    out = {"product": identity.model}
    if identity.bootloader_version:
        out["version-bootloader"] = identity.bootloader_version
    if identity.hw_revision:
        out["hw-revision"] = identity.hw_revision
    out.update(identity.extra)
    return out


def _refuse_other_unit(
    backup_id: str, owner: DeviceIdentity, identity: DeviceIdentity, forced: Mapping[str, str]
) -> None:
    """PreflightError ``backup.device`` when the backup is of another unit (unless forced)."""
    if owner.same_device(identity) or "backup.device" in forced:
        return
    raise PreflightError(
        f"backup {backup_id[:12]} is of {owner.model} serial {owner.serial}, not of this "
        f"{identity.model} serial {identity.serial}",
        check_id="backup.device",
        overridable=True,
        hint="restoring another unit's calibration data breaks radios; "
        "force only with --force backup.device --reason TEXT",
    )


def _backup_source(
    dev: Device, scope: str, slot: str | None, *, link: str, profile: str
) -> tuple[str | None, str]:
    """How the backup before a write is read, or why none is taken (``link`` and ``profile``
    name them in the reason): "storage" (address ranges, ``Capability.READ``), "partition"
    (the target partition by name, ``Capability.PARTITION_READ``), or None."""
    caps = dev.capabilities
    if Capability.PARTITIONS in caps and Capability.READ not in caps:
        if Capability.PARTITION_READ not in caps:
            return None, _NO_PARTITION_READ
        if slot is not None:
            return None, "the other slot keeps what the device runs now and is the way back"
    elif Capability.READ not in caps:
        return None, f"{link} cannot read the device back"
    if scope == "none":
        return None, f"{profile} takes no backup on {link}"
    if Capability.READ not in caps:
        return "partition", ""
    return "storage", ""


def _reads_back_partition(dev: Device, image_format: str) -> bool:
    """A partition written whole can be read back and compared with the image: the device
    reads partitions and the image is what lands on them (not a sparse image the device
    expands)."""
    caps = dev.capabilities
    direct: frozenset[str] = getattr(dev, "image_formats", frozenset())
    return (
        Capability.PARTITION_READ in caps
        and Capability.PARTITIONS in caps
        and Capability.READ not in caps
        and image_format not in direct
    )


def _other_slot(profile: Profile, slot: str) -> str:
    for r in profile.regions:
        if r.slot and r.slot != slot:
            return r.slot
    raise DeviceError(f"profile {profile.id} has no slot besides '{slot}'")


def _device_state(dev: Device) -> str:
    state = getattr(dev, "state", None)
    if callable(state):
        with contextlib.suppress(Exception):
            return str(state())
    return "unknown"


def _first_bad(bad: list[tuple[int, int]], erase_block: int, size: int) -> int:
    if not bad:
        return size
    return (bad[0][0] // erase_block) * erase_block


@contextlib.contextmanager
def _open_image(path: Path) -> Iterator[ImageData]:
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below
    except OSError as e:
        raise SourceError(f"{path}: cannot open the image: {e.strerror}") from e
    try:
        size = f.seek(0, 2)
        yield ImageData(f, size)
    finally:
        f.close()


def _file_sha256(path: Path) -> str | None:
    try:
        with open(path, "rb") as f:
            h = hashlib.sha256()
            while chunk := f.read(1 << 20):
                h.update(chunk)
            return h.hexdigest()
    except OSError:
        return None


def _operator() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


__all__ = [
    "FlashRequest",
    "IntegrityRequest",
    "JobResult",
    "OemResult",
    "Plan",
    "Workbench",
    "boot_problems",
]
