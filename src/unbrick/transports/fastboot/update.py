"""fastboot update packages (``update.zip``): what to flash, in which order, on which slot.

A package holds partition images, ``android-info.txt`` (required: what the package is for) and
optionally ``fastboot-info.txt`` (the flashing steps, in order). Without ``fastboot-info.txt``
the steps come from fastboot's fixed list of images: boot-critical images first (boot,
init_boot, dtbo, dt, pvmfw, recovery, vbmeta*, vendor_boot...), then the others (system,
vendor, product, odm...). ``boot.img`` and ``system.img`` must be there, as fastboot requires;
``*_other.img`` images go to the other slot.

:func:`plan_update` checks ``android-info.txt`` against the variables read from the device
(``unbrick.model.manifest.evaluate``, fastboot's semantics) and resolves every step to a
partition of the device: a slotted partition gets the chosen slot (the device's current slot
unless one is given), each image must fit its partition, and logical (dynamic) partitions are
refused. Everything is checked before anything is written; the checks raise
``PreflightError`` naming the check (``android-info``, ``partition-exists``,
``partition-size``, ``logical-partition``).

fastboot-info.txt lines (version 1): ``version N``, ``flash [--apply-vbmeta] [--slot-other]
PARTITION [IMAGE]``, ``reboot [bootloader|fastboot|recovery]``, ``erase PARTITION``, and
``if-wipe COMMAND...`` (only with ``wipe``); ``#`` starts a comment. ``update-super`` (dynamic
partitions) is refused.
"""

from __future__ import annotations

import shutil
import zipfile
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from unbrick.errors import ImageError, PreflightError, SourceError, UsageError
from unbrick.formats import sparse
from unbrick.model.manifest import AndroidInfo, evaluate, parse_android_info
from unbrick.transports.fastboot import protocol as p

ANDROID_INFO = "android-info.txt"
FASTBOOT_INFO = "fastboot-info.txt"
#: Highest fastboot-info.txt version understood.
FASTBOOT_INFO_VERSION = 1
MAX_INFO_BYTES = 1 << 20
#: Members listed in a package, at most.
MAX_MEMBERS = 10_000

#: Called with a variable name; the device's answer, or None when it does not know it.
Getvar = Callable[[str], str | None]


@dataclass(frozen=True)
class ImageSpec:
    """One entry of fastboot's image list."""

    partition: str
    image: str
    optional: bool = True
    #: Flashed to the other slot (``boot_other.img``...).
    secondary: bool = False
    #: Flashed before the others.
    boot_critical: bool = False


#: fastboot's images for ``update``, in its order (``ImageType::Extra`` ones are not flashed).
IMAGES: tuple[ImageSpec, ...] = (
    ImageSpec("boot", "boot.img", optional=False, boot_critical=True),
    ImageSpec("init_boot", "init_boot.img", boot_critical=True),
    ImageSpec("boot", "boot_other.img", secondary=True),
    ImageSpec("dtbo", "dtbo.img", boot_critical=True),
    ImageSpec("dts", "dt.img", boot_critical=True),
    ImageSpec("odm", "odm.img"),
    ImageSpec("odm_dlkm", "odm_dlkm.img"),
    ImageSpec("product", "product.img"),
    ImageSpec("pvmfw", "pvmfw.img", boot_critical=True),
    ImageSpec("recovery", "recovery.img", boot_critical=True),
    ImageSpec("system", "system.img", optional=False),
    ImageSpec("system_dlkm", "system_dlkm.img"),
    ImageSpec("system_ext", "system_ext.img"),
    ImageSpec("system", "system_other.img", secondary=True),
    ImageSpec("vbmeta", "vbmeta.img", boot_critical=True),
    ImageSpec("vbmeta_system", "vbmeta_system.img", boot_critical=True),
    ImageSpec("vbmeta_vendor", "vbmeta_vendor.img", boot_critical=True),
    ImageSpec("vendor", "vendor.img"),
    ImageSpec("vendor_boot", "vendor_boot.img", boot_critical=True),
    ImageSpec("vendor_dlkm", "vendor_dlkm.img"),
    ImageSpec("vendor_kernel_boot", "vendor_kernel_boot.img", boot_critical=True),
    ImageSpec("vendor", "vendor_other.img", secondary=True),
)

_REBOOT_TARGETS = ("bootloader", "fastboot", "recovery", "system")


@dataclass(frozen=True)
class UpdateStep:
    """One step of an update. ``target`` and ``image_bytes`` are filled in by the plan."""

    action: str  # "flash" | "erase" | "reboot"
    #: Partition as the package names it (no slot suffix), or the reboot target.
    partition: str
    #: Member of the package (flash steps).
    image: str | None = None
    #: True: the other slot (secondary images, ``--slot-other``).
    other_slot: bool = False
    #: Where it goes on the device (``boot_a``); empty until planned.
    target: str = ""
    #: Size once written (a sparse image's expanded size).
    image_bytes: int = 0
    #: fastboot-info.txt line it came from (0: fastboot's image list).
    line_no: int = 0

    def describe(self) -> str:
        if self.action == "flash":
            return f"flash {self.image} -> {self.target or self.partition}"
        if self.action == "erase":
            return f"erase {self.target or self.partition}"
        return f"reboot {self.partition}"


@dataclass(frozen=True)
class UpdatePlan:
    """What ``apply`` will do, checked against the device."""

    package: Path
    product: str
    #: The slot images go to (None: the device has no slots).
    slot: str | None
    steps: tuple[UpdateStep, ...]
    #: Requirement failures overridden with ``--force android-info`` (their messages).
    overridden: tuple[str, ...] = ()
    #: android-info.txt lines skipped as syntax errors, and other remarks.
    warnings: tuple[str, ...] = ()
    #: ``set_active`` the chosen slot first (a slot was asked for explicitly).
    set_active: bool = False

    @property
    def flash_steps(self) -> tuple[UpdateStep, ...]:
        return tuple(s for s in self.steps if s.action == "flash")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (for job journals and repair logs)."""
        return {
            "package": str(self.package),
            "product": self.product,
            "slot": self.slot,
            "set_active": self.set_active,
            "steps": [
                {
                    "action": s.action,
                    "partition": s.partition,
                    "image": s.image,
                    "target": s.target,
                    "image_bytes": s.image_bytes,
                }
                for s in self.steps
            ],
            "overridden": list(self.overridden),
            "warnings": list(self.warnings),
        }


# --------------------------------------------------------------------------------------------
# fastboot-info.txt


def parse_fastboot_info(text: str, *, wipe: bool = False) -> list[UpdateStep]:
    """The steps of fastboot-info.txt (unresolved). UsageError names a line it cannot take."""
    steps: list[UpdateStep] = []
    for n, raw in enumerate(text.split("\n"), start=1):
        words = raw.split()
        if not words or words[0].startswith("#"):
            continue

        def bad(why: str, line_no: int = n, line: str = raw) -> UsageError:
            return UsageError(
                f"{FASTBOOT_INFO} line {line_no}: {why}: {line.strip()!r}",
                hint="the update package is damaged or newer than this version of unbrick",
            )

        if words[0] == "version":
            if len(words) != 2 or not words[1].isdigit():
                raise bad("malformed version line")
            if int(words[1]) > FASTBOOT_INFO_VERSION:
                raise bad(f"version {words[1]} is newer than {FASTBOOT_INFO_VERSION}")
            continue
        if words[0] == "if-wipe":
            if len(words) < 2:
                raise bad("if-wipe without a command")
            if not wipe:
                continue
            words = words[1:]
        command, args = words[0], words[1:]
        if command == "flash":
            other = "--slot-other" in args
            rest = [a for a in args if a not in ("--slot-other", "--apply-vbmeta")]
            if not rest or len(rest) > 2 or any(a.startswith("--") for a in rest):
                raise bad("flash needs PARTITION [IMAGE]")
            image = rest[1] if len(rest) == 2 else f"{rest[0]}.img"
            steps.append(UpdateStep("flash", rest[0], image, other_slot=other, line_no=n))
        elif command == "reboot":
            if len(args) > 1 or (args and args[0] not in _REBOOT_TARGETS):
                raise bad("reboot takes bootloader, fastboot or recovery")
            steps.append(UpdateStep("reboot", args[0] if args else "system", line_no=n))
        elif command == "erase":
            if len(args) != 1:
                raise bad("erase needs one partition")
            steps.append(UpdateStep("erase", args[0], line_no=n))
        elif command == "update-super":
            raise UsageError(
                f"{FASTBOOT_INFO} line {n}: the package updates the super partition (dynamic "
                "partitions), which unbrick cannot flash yet",
                hint="flash this package with 'fastboot update' from the Android platform tools",
            )
        else:
            raise bad(f"unknown command '{command}'")
    return steps


def default_steps(members: Collection[str]) -> list[UpdateStep]:
    """fastboot's image list as steps, for the images the package has (boot-critical first)."""
    for spec in IMAGES:
        if not spec.optional and spec.image not in members:
            raise ImageError(
                f"the update package has no {spec.image}, which fastboot requires",
                hint="use a complete update package (image-PRODUCT-VERSION.zip)",
            )
    present = [s for s in IMAGES if s.image in members]
    ordered = [s for s in present if s.boot_critical] + [s for s in present if not s.boot_critical]
    return [UpdateStep("flash", s.partition, s.image, other_slot=s.secondary) for s in ordered]


# --------------------------------------------------------------------------------------------
# The package


@dataclass
class UpdatePackage:
    """An update.zip, opened. Close it (or use ``with``) when done."""

    path: Path
    zip: zipfile.ZipFile
    members: dict[str, zipfile.ZipInfo]
    android_info: AndroidInfo
    fastboot_info: str | None = None
    _image_bytes: dict[str, int] = field(default_factory=dict)

    @classmethod
    def open(cls, path: Path) -> UpdatePackage:
        try:
            zf = zipfile.ZipFile(path)
        except (OSError, zipfile.BadZipFile) as e:
            raise SourceError(
                f"{path} is not a readable zip file: {e}",
                hint="an update package is the image-PRODUCT-VERSION.zip of a factory image",
            ) from e
        try:
            infos = zf.infolist()
            if len(infos) > MAX_MEMBERS:
                raise ImageError(f"{path} lists {len(infos)} members; at most {MAX_MEMBERS}")
            members = {i.filename: i for i in infos if not i.is_dir()}
            if ANDROID_INFO not in members:
                raise ImageError(
                    f"{path} has no {ANDROID_INFO}: it is not a fastboot update package",
                    hint="use the update zip inside the factory image, not the outer archive",
                )
            info = parse_android_info(_read_text(zf, members[ANDROID_INFO]))
            fb_info = None
            if FASTBOOT_INFO in members:
                fb_info = _read_text(zf, members[FASTBOOT_INFO])
        except BaseException:
            zf.close()
            raise
        return cls(path, zf, members, info, fb_info)

    def close(self) -> None:
        self.zip.close()

    def __enter__(self) -> UpdatePackage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def image_bytes(self, name: str) -> int:
        """Size of member ``name`` once written (a sparse image's expanded size)."""
        if name not in self._image_bytes:
            info = self.members[name]
            size = info.file_size
            try:
                with self.zip.open(info) as f:
                    head = f.read(sparse.FILE_HEADER_SIZE)
                size = sparse.parse_header(head).expanded_size
            except ImageError:
                pass
            except (OSError, zipfile.BadZipFile, RuntimeError) as e:
                raise SourceError(f"{self.path}: cannot read {name}: {e}") from e
            self._image_bytes[name] = size
        return self._image_bytes[name]

    def extract(self, name: str, dest: Path) -> Path:
        """Copy member ``name`` to the file ``dest`` (whose name the caller chooses)."""
        info = self.members[name]
        try:
            with self.zip.open(info) as src, dest.open("wb") as out:
                shutil.copyfileobj(src, out, 4 << 20)
                written = out.tell()
        except (OSError, zipfile.BadZipFile, RuntimeError) as e:
            raise SourceError(f"{self.path}: cannot extract {name}: {e}") from e
        if written != info.file_size:
            raise ImageError(f"{self.path}: {name} gave {written} of {info.file_size} bytes")
        return dest


def _read_text(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> str:
    if info.file_size > MAX_INFO_BYTES:
        raise ImageError(f"{info.filename} of {info.file_size} bytes is too large")
    try:
        with zf.open(info) as f:
            data = f.read(MAX_INFO_BYTES + 1)
    except (OSError, zipfile.BadZipFile, RuntimeError) as e:
        raise SourceError(f"cannot read {info.filename}: {e}") from e
    return data.decode("utf-8", "replace")


# --------------------------------------------------------------------------------------------
# Planning


def check_android_info(
    info: AndroidInfo, getvar: Getvar, *, forced: Collection[str] = ()
) -> tuple[str, ...]:
    """Check the package's requirements against the device; the overridden failures.

    Raises PreflightError(check_id="android-info") when a requirement fails (overridable with
    ``forced`` containing ``android-info``), or check_id="partition-exists" (never
    overridable) when a ``partition-exists`` requirement fails.
    """
    answers: dict[str, str] = {}
    for name in info.variables():
        value = getvar(name)
        if value is not None:
            answers[name] = value
    failures = evaluate(info, answers)
    if not failures:
        return ()
    hard = [f for f in failures if not f.overridable]
    if not hard and "android-info" in forced:
        return tuple(f.message for f in failures)
    first = (hard or failures)[0]
    more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
    product = answers.get("product", "?")
    raise PreflightError(
        f"android-info.txt: {first.message}{more}",
        check_id="partition-exists" if hard else "android-info",
        overridable=not hard,
        hint=f"this package is not for this device (product {product}); nothing was written",
    )


def plan_update(
    package: UpdatePackage,
    getvar: Getvar,
    *,
    slot: str | None = None,
    wipe: bool = False,
    skip_secondary: bool = False,
    forced: Collection[str] = (),
) -> UpdatePlan:
    """Check ``package`` against the device (``getvar``) and resolve its steps."""
    overridden = check_android_info(package.android_info, getvar, forced=forced)
    warnings = [
        f"android-info.txt line {n} skipped (not a requirement): {text!r}"
        for n, text in package.android_info.ignored
    ]
    if package.fastboot_info is not None:
        steps = parse_fastboot_info(package.fastboot_info, wipe=wipe)
    else:
        steps = default_steps(package.members)
        if wipe:
            steps.append(UpdateStep("erase", "userdata"))
    slots = _slots(getvar)
    current = (getvar("current-slot") or "").removeprefix("_") or None
    chosen = slot.removeprefix("_") if slot else current
    if slot is not None:
        if not slots:
            raise UsageError(f"slot '{slot}' asked for, but the device has no A/B slots")
        if chosen not in slots:
            raise UsageError(f"slot '{slot}' is not one of the device's slots {slots}")
    if slots and chosen is None:
        raise PreflightError(
            "the device has A/B slots but did not say which is current",
            check_id="slot",
            hint="give the slot explicitly",
        )
    other = next((s for s in slots if s != chosen), None)
    resolved: list[UpdateStep] = []
    for step in steps:
        if step.action == "reboot":
            resolved.append(step)
            continue
        if step.action == "flash" and step.image not in package.members:
            raise ImageError(
                f"the update package has no {step.image} (fastboot-info.txt line {step.line_no})"
            )
        if step.other_slot and (skip_secondary or other is None):
            continue
        target = _resolve(step, getvar, chosen, other)
        if getvar(f"is-logical:{target}") == "yes":
            raise PreflightError(
                f"'{target}' is a logical (dynamic) partition inside super; unbrick cannot "
                "flash those yet",
                check_id="logical-partition",
                hint="flash this package with 'fastboot update' from the Android platform tools",
            )
        size = _partition_size(getvar, target)
        image_bytes = 0
        if step.action == "flash":
            assert step.image is not None
            image_bytes = package.image_bytes(step.image)
            if size is not None and image_bytes > size:
                raise PreflightError(
                    f"{step.image} needs {image_bytes} bytes but partition '{target}' has {size}",
                    check_id="partition-size",
                    hint="this package is not for this device; nothing was written",
                )
        resolved.append(replace(step, target=target, image_bytes=image_bytes))
    return UpdatePlan(
        package=package.path,
        product=getvar("product") or "",
        slot=chosen if slots else None,
        steps=tuple(resolved),
        overridden=overridden,
        warnings=tuple(warnings),
        set_active=slot is not None,
    )


def _slots(getvar: Getvar) -> list[str]:
    text = getvar("slot-count")
    try:
        count = p.parse_number(text, "slot-count") if text else 0
    except p.FastbootProtocolError:
        count = 0
    return [chr(ord("a") + i) for i in range(min(count, 26))]


def _partition_size(getvar: Getvar, name: str) -> int | None:
    text = getvar(f"partition-size:{name}")
    if not text:
        return None
    try:
        return p.parse_number(text, f"partition-size:{name}")
    except p.FastbootProtocolError:
        return None


def _resolve(step: UpdateStep, getvar: Getvar, chosen: str | None, other: str | None) -> str:
    base = step.partition
    has_slot = getvar(f"has-slot:{base}")
    if has_slot == "yes":
        letter = other if step.other_slot else chosen
        return f"{base}_{letter}"
    if has_slot == "no" or _partition_size(getvar, base) is not None:
        return base
    where = f" for {step.image}" if step.image else ""
    raise PreflightError(
        f"the device has no partition '{base}'{where}",
        check_id="partition-exists",
        hint="this package is not for this device; nothing was written",
    )


def answers_from(variables: Mapping[str, str]) -> Getvar:
    """A Getvar over a dict of variables (``getvar all``, or a test's)."""
    return variables.get
