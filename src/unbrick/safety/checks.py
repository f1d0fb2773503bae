"""The named pre-flight checks: pure decisions made before anything is written to a device.

:func:`run_preflight` takes a :class:`PreflightContext` (what the device said, the profile, the
target regions, facts about the image and its integrity checks, the manifest, the backup status
and the user's options) and returns one :class:`CheckResult` per check, in the order of
:data:`CHECK_IDS`. :meth:`PreflightResult.refusal` turns the first failing check into the error
to raise. Nothing here does I/O; the engine gathers the facts and converts the reports of
``unbrick.ops.images`` and ``unbrick.trust.verify`` with :meth:`ImageFacts.from_dict` and
:meth:`IntegrityFacts.from_dict`.

Overrides: ``--force CHECK_ID --reason TEXT`` (``PreflightOptions.forced``) marks a failing
*overridable* check as passed and forced; the result keeps the reason so that the job record
shows it. Forcing a check that cannot be overridden, or a check that does not exist, is a
UsageError raised before any check runs. The checks and their rules are listed in
:data:`CHECKS` (and in docs/profiles.md, "Pre-flight checks").
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from unbrick.errors import IntegrityError, PreflightError, SignatureError, UsageError
from unbrick.model.identity import DeviceIdentity
from unbrick.model.manifest import AndroidInfo, Manifest, Requirements, evaluate
from unbrick.model.profile import Profile, Region
from unbrick.model.profile_toml import region_size_bytes
from unbrick.model.versions import compare
from unbrick.safety.results import CheckResult

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CheckSpec:
    id: str
    overridable: bool
    #: What the check requires, for documentation and ``unbrick flash --help``.
    rule: str
    #: For checks that cannot be forced: why not (shown when someone tries).
    why_not: str = ""


CHECKS: tuple[CheckSpec, ...] = (
    CheckSpec(
        "image.integrity",
        False,
        "every checksum or signature of the image that was given passed (a manifest's sha256 "
        "counts); with none, the image goes unchecked and the plan says so",
        "a file whose checksum or signature is wrong may be corrupt or tampered with",
    ),
    CheckSpec(
        "image.valid",
        False,
        "the image parsed and its own checks (headers, CRCs, lengths) passed",
        "writing a damaged image bricks the device",
    ),
    CheckSpec("image.format", True, "the image format is one the target region accepts"),
    CheckSpec(
        "image.size",
        False,
        "the image fits the target region",
        "an image larger than its region would overwrite the next region",
    ),
    CheckSpec("device.model", True, "the device model is one the image and profile support"),
    CheckSpec("device.hw_revision", True, "the hardware revision is one the image supports"),
    CheckSpec("device.region", True, "the device's market region is one the image supports"),
    CheckSpec(
        "device.bootloader",
        True,
        "the device's bootloader is at least the manifest's and the profile's min_bootloader",
    ),
    CheckSpec(
        "android.requirements",
        True,
        "the device meets the image's android-info.txt (as fastboot checks it; a missing "
        "partition-exists partition cannot be forced)",
    ),
    CheckSpec(
        "firmware.antirollback",
        False,
        "the image's security version is at least the device's anti-rollback counter",
        "the device refuses (or fails to boot) firmware below its anti-rollback counter",
    ),
    CheckSpec(
        "firmware.downgrade",
        True,
        "the image version is not older than the running firmware, unless --allow-downgrade",
    ),
    CheckSpec(
        "region.critical",
        False,
        "a critical region (bootloader, calibration) is written only with --allow-critical "
        "and a verified backup",
        "use --allow-critical and keep a verified backup; a bad write there can hard-brick "
        "the device",
    ),
    CheckSpec(
        "backup.verified",
        True,
        "a verified backup covering the target exists or will be taken before writing",
    ),
    CheckSpec(
        "device.identity",
        True,
        "the device matches the profile's identification rules and storage size",
    ),
    CheckSpec(
        "device.write_protect",
        False,
        "no write-protected range of the chip (as the programmer reports it) overlaps the target",
        "a protected range refuses the write, or takes only part of it; lifting the protection "
        "is a deliberate act on the board (the WP# pin, the status register)",
    ),
    CheckSpec(
        "device.unlocked",
        False,
        "a device that reports a bootloader lock state (fastboot 'unlocked') is unlocked",
        "a locked bootloader refuses every write; unlocking wipes the user's data and is the "
        "owner's decision, never unbrick's",
    ),
)
CHECK_IDS: tuple[str, ...] = tuple(c.id for c in CHECKS)
_SPECS: dict[str, CheckSpec] = {c.id: c for c in CHECKS}


# ---------------------------------------------------------------------------------------------
# Facts the engine gathers


@dataclass(frozen=True)
class ImageFacts:
    """What inspecting the image found (``unbrick.ops.images.ImageReport`` as plain data)."""

    format: str
    size_bytes: int
    sha256: str
    valid: bool
    problems: tuple[str, ...] = ()
    #: Bytes the image takes on the device when that differs from the file size (sparse
    #: images, compressed streams); ``None``: the file size.
    expanded_size_bytes: int | None = None

    @property
    def write_size_bytes(self) -> int:
        return self.expanded_size_bytes if self.expanded_size_bytes is not None else self.size_bytes

    @classmethod
    def from_dict(
        cls, d: Mapping[str, Any], *, expanded_size_bytes: int | None = None
    ) -> ImageFacts:
        """From ``ImageReport.to_dict()``."""
        return cls(
            format=str(d["format"]),
            size_bytes=int(d["size"]),
            sha256=str(d["sha256"]).lower(),
            valid=bool(d["valid"]),
            problems=tuple(str(p) for p in d.get("problems", ())),
            expanded_size_bytes=expanded_size_bytes,
        )


@dataclass(frozen=True)
class IntegrityCheckFacts:
    """One requested integrity check (``unbrick.trust.verify.Check``)."""

    id: str
    passed: bool
    detail: str = ""
    #: Name of the error class behind a failure ("SignatureError", "IntegrityError"...).
    error: str | None = None
    weak: bool = False


class _CheckLike(Protocol):
    @property
    def id(self) -> str: ...
    @property
    def passed(self) -> bool: ...
    @property
    def detail(self) -> str: ...
    @property
    def error(self) -> str | None: ...
    @property
    def weak(self) -> bool: ...


class _ReportLike(Protocol):
    @property
    def checks(self) -> list[Any]: ...


@dataclass(frozen=True)
class IntegrityFacts:
    """The integrity checks that ran on the image (``VerifyReport`` as plain data)."""

    checks: tuple[IntegrityCheckFacts, ...] = ()

    @property
    def requested(self) -> tuple[str, ...]:
        return tuple(c.id for c in self.checks)

    @property
    def passed(self) -> tuple[str, ...]:
        return tuple(c.id for c in self.checks if c.passed)

    @classmethod
    def from_report(cls, report: _ReportLike | None) -> IntegrityFacts:
        """From a ``VerifyReport`` (read through its attributes; None: nothing was checked)."""
        if report is None:
            return cls()
        out: list[IntegrityCheckFacts] = []
        for c in report.checks:
            check: _CheckLike = c
            out.append(
                IntegrityCheckFacts(check.id, check.passed, check.detail, check.error, check.weak)
            )
        return cls(tuple(out))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> IntegrityFacts:
        """From ``VerifyReport.to_dict()``."""
        return cls(
            tuple(
                IntegrityCheckFacts(
                    id=str(c["id"]),
                    passed=bool(c["passed"]),
                    detail=str(c.get("detail") or ""),
                    error=c.get("error"),
                    weak=bool(c.get("weak", False)),
                )
                for c in d.get("checks", ())
            )
        )


@dataclass(frozen=True)
class BackupStatus:
    """Whether a verified backup covering every target region exists."""

    verified: bool = False
    backup_id: str | None = None


@dataclass(frozen=True)
class PreflightOptions:
    allow_downgrade: bool = False
    allow_critical: bool = False
    #: ``--force CHECK_ID --reason TEXT``: check id -> reason.
    forced: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PreflightContext:
    identity: DeviceIdentity
    profile: Profile
    #: The regions the job writes (the engine has already resolved an A/B group to a slot).
    targets: tuple[Region, ...]
    image: ImageFacts
    integrity: IntegrityFacts = field(default_factory=IntegrityFacts)
    manifest: Manifest | None = None
    android_info: AndroidInfo | None = None
    #: ``fastboot getvar`` answers for ``android_info.variables()``; missing: not answered.
    android_vars: Mapping[str, str] = field(default_factory=dict)
    backup: BackupStatus = field(default_factory=BackupStatus)
    #: The job will take and verify a backup of the targets before writing (and dry runs).
    backup_planned: bool = False
    #: Why no backup can be taken over this link (it cannot read the device), or "".
    backup_impossible: str = ""
    options: PreflightOptions = field(default_factory=PreflightOptions)


# ---------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class PreflightResult:
    results: tuple[CheckResult, ...]

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    def get(self, check_id: str) -> CheckResult:
        return next(r for r in self.results if r.id == check_id)

    def failed(self) -> tuple[CheckResult, ...]:
        return tuple(r for r in self.results if not r.passed)

    def forced(self) -> tuple[CheckResult, ...]:
        """The overridden checks, to be recorded with the job."""
        return tuple(r for r in self.results if r.forced)

    def refusal(self) -> PreflightError | IntegrityError | None:
        """The error for the first failing check that was not forced; None when all passed."""
        for r in self.results:
            if r.passed:
                continue
            if r.error == "SignatureError":
                return SignatureError(r.message)
            if r.error == "IntegrityError":
                return IntegrityError(r.message)
            hint = "nothing was written to the device"
            if r.overridable:
                hint += f"; to override: --force {r.id} --reason TEXT"
            return PreflightError(r.message, check_id=r.id, overridable=r.overridable, hint=hint)
        return None

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "checks": [r.to_dict() for r in self.results]}


@dataclass(frozen=True)
class _Outcome:
    passed: bool
    message: str
    detail: Mapping[str, Any] = field(default_factory=dict)
    error: str = "PreflightError"
    #: Overrides the check's static overridability for this failure.
    overridable: bool | None = None


def _ok(message: str, **detail: Any) -> _Outcome:
    return _Outcome(True, message, detail)


def _fail(message: str, **detail: Any) -> _Outcome:
    return _Outcome(False, message, detail)


def _names(regions: tuple[Region, ...]) -> str:
    return ", ".join(f"'{r.name}'" for r in regions)


def _one_of(values: tuple[str, ...]) -> str:
    if len(values) == 1:
        return repr(values[0])
    return "one of " + ", ".join(repr(v) for v in values)


# ---------------------------------------------------------------------------------------------
# The checks


def _image_integrity(ctx: PreflightContext) -> _Outcome:
    checks = ctx.integrity.checks
    m = ctx.manifest
    if m is not None and m.sha256 is not None and m.sha256 != ctx.image.sha256.lower():
        return _Outcome(
            False,
            f"image sha256 is {ctx.image.sha256} but manifest {m.source or ''} says {m.sha256}; "
            "do not flash it: download the image again or use the manifest made for it",
            {"expected": m.sha256, "found": ctx.image.sha256},
            error="IntegrityError",
        )
    for c in checks:
        if not c.passed:
            error = "SignatureError" if c.error == "SignatureError" else "IntegrityError"
            return _Outcome(
                False,
                f"integrity check '{c.id}' failed: {c.detail or 'no detail'}; "
                "do not flash this file: get it again from the official source",
                {"check": c.id, "error": c.error, "detail": c.detail},
                error=error,
            )
    passed = [c.id for c in checks]
    if m is not None and m.sha256 is not None:
        passed.append("manifest sha256")
    if not passed:
        # Nothing to check against is not a failed check: the image's own structure is
        # judged by image.valid, and the plan and the repair log say it went unchecked.
        return _ok(
            "no checksum or signature given: the image is flashed unchecked (give --sha256 "
            "HEX, a checksum file, a signature or a manifest to check it)",
            requested=[],
            unchecked=True,
        )
    weak = [c.id for c in checks if c.weak]
    note = f" (weak digest: {', '.join(weak)})" if weak else ""
    return _ok(f"image verified by {', '.join(passed)}{note}", passed=passed, weak=weak)


def _image_valid(ctx: PreflightContext) -> _Outcome:
    img = ctx.image
    if img.valid and not img.problems:
        return _ok(f"image parsed as a valid {img.format} image", format=img.format)
    problems = list(img.problems) or ["it failed its own checks"]
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return _fail(
        f"image is not a valid {img.format} image: {problems[0]}{more}; "
        "get an undamaged copy of the image",
        format=img.format,
        problems=problems,
    )


def _image_format(ctx: PreflightContext) -> _Outcome:
    fmt = ctx.image.format
    m = ctx.manifest
    if m is not None and m.target is not None:
        hits = [t for t in ctx.targets if m.target in (t.name, t.slot_group)]
        if not hits:
            return _fail(
                f"manifest says the image is for region '{m.target}', but the job writes "
                f"{_names(ctx.targets)}; write it to '{m.target}' or use the right image",
                expected=m.target,
                found=[t.name for t in ctx.targets],
            )
    for t in ctx.targets:
        if t.formats and fmt not in t.formats:
            return _fail(
                f"region '{t.name}' takes {', '.join(t.formats)} images but this image is {fmt}; "
                "use the image made for this region (or convert it)",
                region=t.name,
                expected=list(t.formats),
                found=fmt,
            )
    return _ok(f"region(s) {_names(ctx.targets)} accept {fmt} images", format=fmt)


def _fastboot_size(text: str) -> int | None:
    """A ``getvar partition-size`` answer, read as fastboot does (hex, ``0x`` optional)."""
    value = text.strip()
    if not value.startswith("0x"):
        value = "0x" + value
    try:
        return int(value, 16)
    except ValueError:
        return None


def _capacity(ctx: PreflightContext, region: Region) -> int | None:
    storage = ctx.identity.storage
    size = region_size_bytes(region, storage.size_bytes if storage is not None else None)
    if size is None:
        answer = ctx.android_vars.get(f"partition-size:{region.name}")
        if answer is not None:
            size = _fastboot_size(answer)
    return size


def _image_size(ctx: PreflightContext) -> _Outcome:
    need = ctx.image.write_size_bytes
    if need <= 0:
        return _fail("image is empty; nothing sensible can be written", found=need)
    unknown: list[str] = []
    for t in ctx.targets:
        cap = _capacity(ctx, t)
        if cap is None:
            unknown.append(t.name)
            continue
        if need > cap:
            return _fail(
                f"image is {need} bytes but region '{t.name}' holds {cap} bytes "
                f"({need - cap} too many); use the image made for this device",
                region=t.name,
                expected_max=cap,
                found=need,
            )
    if unknown:
        return _ok(
            f"image is {need} bytes; the size of {', '.join(unknown)} is known only to the "
            "device, which refuses an image that does not fit",
            found=need,
            unknown=unknown,
        )
    return _ok(f"image ({need} bytes) fits {_names(ctx.targets)}", found=need)


def _requirements(ctx: PreflightContext) -> list[Requirements]:
    c = ctx.profile.compat
    out = [
        Requirements(
            source=f"profile {ctx.profile.id}",
            models=c.models,
            hw_revisions=c.hw_revisions,
            regions=c.regions,
            min_bootloader=c.min_bootloader,
        )
    ]
    if ctx.manifest is not None:
        out.append(ctx.manifest.requirements())
    return out


def _listed(ctx: PreflightContext, what: str, label: str, found: str | None) -> _Outcome:
    for req in _requirements(ctx):
        allowed: tuple[str, ...] = getattr(req, what)
        if not allowed:
            continue
        if found is None:
            return _fail(
                f"device did not report its {label}; {req.source} requires {_one_of(allowed)}; "
                f"check the device, or --force if you know its {label}",
                source=req.source,
                expected=list(allowed),
                found=None,
            )
        if found not in allowed:
            return _fail(
                f"device {label} is {found!r} but {req.source} requires {_one_of(allowed)}; "
                f"use the firmware made for {label} {found!r}",
                source=req.source,
                expected=list(allowed),
                found=found,
            )
    if found is None:
        return _ok(f"no {label} requirement", found=None)
    return _ok(f"device {label} {found!r} is supported", found=found)


def _device_model(ctx: PreflightContext) -> _Outcome:
    return _listed(ctx, "models", "model", ctx.identity.model)


def _device_hw_revision(ctx: PreflightContext) -> _Outcome:
    return _listed(ctx, "hw_revisions", "hardware revision", ctx.identity.hw_revision)


def _device_region(ctx: PreflightContext) -> _Outcome:
    return _listed(ctx, "regions", "region", ctx.identity.region)


def _device_bootloader(ctx: PreflightContext) -> _Outcome:
    found = ctx.identity.bootloader_version
    mins = [(r.source, r.min_bootloader) for r in _requirements(ctx) if r.min_bootloader]
    for source, minimum in mins:
        assert minimum is not None
        if found is None:
            return _fail(
                f"device did not report its bootloader version; {source} needs {minimum} or "
                "later; check it on the device's console, or --force if you know it",
                source=source,
                expected_min=minimum,
                found=None,
            )
        if compare(found, minimum) < 0:
            return _fail(
                f"bootloader {found} is older than {minimum}, which {source} needs; update "
                "the bootloader first (a critical region: --allow-critical)",
                source=source,
                expected_min=minimum,
                found=found,
            )
    if not mins:
        return _ok("no minimum bootloader version", found=found)
    return _ok(f"bootloader {found} is recent enough", found=found)


def _android_requirements(ctx: PreflightContext) -> _Outcome:
    info = ctx.android_info
    if info is None:
        return _ok("no android-info.txt to check")
    failures = evaluate(info, ctx.android_vars)
    ignored = [f"line {n}: {text}" for n, text in info.ignored]
    if not failures:
        return _ok(
            f"device meets all {len(info.requirements)} android-info.txt requirements",
            ignored=ignored,
        )
    first = failures[0]
    more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
    return _Outcome(
        False,
        f"android-info.txt: {first.message}{more}; use the factory image made for this device",
        {"failures": [f.message for f in failures], "ignored": ignored},
        overridable=all(f.overridable for f in failures),
    )


def _antirollback(ctx: PreflightContext) -> _Outcome:
    device_sv = ctx.identity.security_version
    image_sv = ctx.manifest.security_version if ctx.manifest is not None else None
    if not device_sv:
        return _ok("device has no anti-rollback counter set", device=device_sv, image=image_sv)
    if image_sv is None:
        return _fail(
            f"device refuses firmware below security version {device_sv}, and this image "
            "declares none (no manifest); give the image's manifest",
            device=device_sv,
            image=None,
        )
    if image_sv < device_sv:
        return _fail(
            f"image security version {image_sv} is below the device's anti-rollback counter "
            f"{device_sv}; the device would refuse it: use firmware with security version "
            f"{device_sv} or later",
            device=device_sv,
            image=image_sv,
        )
    return _ok(
        f"image security version {image_sv} >= device counter {device_sv}",
        device=device_sv,
        image=image_sv,
    )


def _downgrade(ctx: PreflightContext) -> _Outcome:
    current = ctx.identity.firmware_version
    new = ctx.manifest.version if ctx.manifest is not None else None
    if current is None or new is None:
        which = (
            "the device did not report its firmware version"
            if current is None
            else ("the image's version is unknown (no manifest)")
        )
        return _ok(f"downgrade not checked: {which}", current=current, image=new)
    if compare(new, current) >= 0:
        return _ok(f"image version {new} is not older than the running {current}")
    if ctx.options.allow_downgrade:
        return _ok(
            f"downgrade from {current} to {new} allowed by --allow-downgrade",
            current=current,
            image=new,
        )
    return _fail(
        f"image version {new} is older than the running firmware {current}; "
        "pass --allow-downgrade if you mean to go back",
        current=current,
        image=new,
    )


def _backup_available(ctx: PreflightContext) -> bool:
    return ctx.backup.verified or ctx.backup_planned


def _region_critical(ctx: PreflightContext) -> _Outcome:
    critical = tuple(t for t in ctx.targets if t.critical)
    if not critical:
        return _ok("no critical region is written")
    names = _names(critical)
    if not ctx.options.allow_critical:
        return _fail(
            f"region {names} is critical (a bad write can hard-brick the device); "
            "pass --allow-critical, with a verified backup, if you must write it",
            regions=[r.name for r in critical],
        )
    if not _backup_available(ctx):
        return _fail(
            f"region {names} is critical and no verified backup of it exists; "
            "take one with 'unbrick backup' before writing it",
            regions=[r.name for r in critical],
        )
    return _ok(f"critical region {names} allowed by --allow-critical, with a backup")


def _device_write_protect(ctx: PreflightContext) -> _Outcome:
    extra = ctx.identity.extra
    mode = extra.get("wp_mode")
    if mode is None:
        return _ok("the device reports no write protection")
    try:
        start, length = int(extra.get("wp_start", "0"), 0), int(extra.get("wp_length", "0"), 0)
    except ValueError:
        return _fail(f"the device reported an unreadable write-protect range {extra!r}")
    if mode == "disabled" or length <= 0:
        return _ok(f"write protection is {mode}")
    storage = ctx.identity.storage
    hit = []
    for t in ctx.targets:
        size = region_size_bytes(t, storage.size_bytes if storage is not None else None)
        end = t.offset + (size or 0)
        if t.offset < start + length and start < end:
            hit.append(t.name)
    protected = f"0x{start:x}-0x{start + length - 1:x}"
    if not hit:
        return _ok(f"write protection ({mode}) covers {protected}, outside the target")
    return _fail(
        f"the chip's write protection ({mode}) covers {protected}, which overlaps "
        f"{', '.join(repr(h) for h in hit)}; nothing was written. Release the WP# pin (or the "
        "clip's WP wire) and clear the protection ('flashrom --wp-disable'), then try again",
        mode=mode,
        start=start,
        length=length,
    )


def _device_unlocked(ctx: PreflightContext) -> _Outcome:
    state = ctx.identity.extra.get("unlocked")
    if state is None:
        return _ok("the device reports no bootloader lock")
    if state.strip().lower() in ("yes", "true", "1"):
        return _ok("the bootloader is unlocked")
    return _fail(
        f"the bootloader of {ctx.identity.model} ({ctx.identity.serial}) is locked: it refuses "
        "every write, and unbrick never unlocks it. To unlock it yourself: enable 'OEM "
        "unlocking' in Android's Developer options, boot to fastboot, run 'fastboot flashing "
        "unlock' (older devices: 'fastboot oem unlock') and confirm on the device; unlocking "
        "erases all user data",
        unlocked=state,
    )


def _backup_verified(ctx: PreflightContext) -> _Outcome:
    if ctx.backup.verified:
        which = (
            f"verified backup {ctx.backup.backup_id}"
            if ctx.backup.backup_id
            else "a verified backup"
        )
        return _ok(f"{which} covers the target", backup_id=ctx.backup.backup_id)
    if ctx.backup_planned:
        return _ok("a backup of the target will be taken and verified before writing")
    if ctx.backup_impossible:
        # Critical regions still need one (region.critical); a phone's other slot, or the
        # vendor's images, are the way back for the rest.
        return _ok(f"no backup: {ctx.backup_impossible}", impossible=ctx.backup_impossible)
    return _fail(
        f"no verified backup covers {_names(ctx.targets)}; take one with 'unbrick backup' "
        "(or let the job take one) so that the device can be restored",
        regions=[t.name for t in ctx.targets],
    )


def _device_identity(ctx: PreflightContext) -> _Outcome:
    p = ctx.profile
    ident = ctx.identity
    reported = ident.storage
    if (
        reported is not None
        and p.storage.size_bytes
        and reported.size_bytes
        and reported.size_bytes != p.storage.size_bytes
    ):
        return _fail(
            f"device reports {reported.size_bytes} bytes of {reported.type} storage but "
            f"profile '{p.id}' describes {p.storage.size_bytes}; choose the profile for "
            "this device",
            expected=p.storage.size_bytes,
            found=reported.size_bytes,
        )
    if not p.match:
        return _ok(f"profile '{p.id}' has no identification rules; it was chosen by name")
    fields = ident.fields()
    for rule in p.match:
        if rule.matches(ident):
            continue
        if rule.equals is not None:
            expected = repr(rule.equals)
        elif rule.one_of:
            expected = _one_of(rule.one_of)
        else:
            expected = f"a match for /{rule.pattern}/"
        found = fields.get(rule.field)
        shown = repr(found) if found is not None else "not reported"
        return _fail(
            f"device does not match profile '{p.id}': {rule.field} is {shown}, the profile expects "
            f"{expected}; choose the profile for this device",
            field=rule.field,
            expected=expected,
            found=found,
        )
    return _ok(f"device matches profile '{p.id}'")


_RUNNERS: dict[str, Callable[[PreflightContext], _Outcome]] = {
    "image.integrity": _image_integrity,
    "image.valid": _image_valid,
    "image.format": _image_format,
    "image.size": _image_size,
    "device.model": _device_model,
    "device.hw_revision": _device_hw_revision,
    "device.region": _device_region,
    "device.bootloader": _device_bootloader,
    "android.requirements": _android_requirements,
    "firmware.antirollback": _antirollback,
    "firmware.downgrade": _downgrade,
    "region.critical": _region_critical,
    "backup.verified": _backup_verified,
    "device.identity": _device_identity,
    "device.write_protect": _device_write_protect,
    "device.unlocked": _device_unlocked,
}
assert tuple(_RUNNERS) == CHECK_IDS


def validate_forced(forced: Mapping[str, str]) -> None:
    """Refuse ``--force`` requests for unknown or non-overridable checks, or without a reason."""
    for check_id, reason in forced.items():
        spec = _SPECS.get(check_id)
        if spec is None:
            raise UsageError(
                f"--force {check_id}: there is no check with that id",
                hint=f"checks: {', '.join(CHECK_IDS)}",
            )
        if not spec.overridable:
            raise UsageError(
                f"--force {check_id}: this check cannot be overridden: {spec.why_not}",
                hint="nothing was written to the device",
            )
        if not reason.strip():
            raise UsageError(
                f"--force {check_id} needs --reason TEXT saying why",
                hint="the reason is kept with the job's record",
            )


def run_preflight(ctx: PreflightContext) -> PreflightResult:
    """Run every check in order; see the module's notes. Raises UsageError for bad --force."""
    if not ctx.targets:
        raise UsageError("the job names no target region", hint="give --region NAME")
    forced = ctx.options.forced
    validate_forced(forced)
    results: list[CheckResult] = []
    for spec in CHECKS:
        outcome = _RUNNERS[spec.id](ctx)
        overridable = spec.overridable if outcome.overridable is None else outcome.overridable
        passed, was_forced, reason = outcome.passed, False, None
        message = outcome.message
        if not passed and spec.id in forced:
            if overridable:
                passed, was_forced, reason = True, True, forced[spec.id]
                message = f"{message} [forced: {reason}]"
                log.warning("pre-flight check %s forced: %s", spec.id, reason)
            else:
                message = f"{message}; --force cannot override this failure"
        results.append(
            CheckResult(
                id=spec.id,
                passed=passed,
                overridable=overridable,
                forced=was_forced,
                message=message,
                detail=outcome.detail,
                reason=reason,
                error=outcome.error,
            )
        )
    return PreflightResult(tuple(results))
