"""Block targets: what a path is, whether it is safe to write, and opening it for writing.

A target is a whole disk or partition (SD card, USB stick, eMMC in mass-storage mode), a loop
device, or a regular file standing in for a disk. Before anything is opened for writing, the
kernel's own views are consulted:

- ``/proc/self/mountinfo``: the target, any of its partitions, and anything stacked on them
  (device-mapper, md: the ``holders`` in sysfs) must not be mounted;
- ``/proc/swaps``: none of them may be active swap;
- the disks holding ``/``, ``/boot``, ``/boot/efi`` and ``/usr`` (through partitions and the
  ``slaves`` of dm/md devices) are the system disks;
- ``/sys/block/X/removable`` and the bus the disk hangs on (the path of its ``device`` link):
  a disk that is neither removable nor on USB or MMC is refused unless forced with a reason;
- a regular file must not be the image itself, nor back a loop device.

Each rule is a named check (:data:`BLOCK_CHECKS`); only ``block.removable`` may be overridden,
with ``forced={"block.removable": "why"}``. A block device is then opened with ``O_EXCL``, which
the kernel refuses (EBUSY) while the device or one of its partitions is mounted or claimed, and
its size is read with the BLKGETSIZE64 ioctl. The sysfs and procfs roots are parameters
(:class:`System`) so that tests can present other machines.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import stat
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unbrick.errors import DeviceError, PreflightError, SourceError, UsageError
from unbrick.safety.results import CheckResult

log = logging.getLogger(__name__)

#: ioctl numbers of <linux/fs.h>: size in bytes (u64) and logical sector size (int).
BLKGETSIZE64 = 0x80081272
BLKSSZGET = 0x1268


@dataclass(frozen=True)
class CheckSpec:
    """A block check: its id, whether ``--force ID --reason TEXT`` may override it, its rule."""

    id: str
    overridable: bool
    rule: str
    #: For checks that cannot be forced: why not.
    why_not: str = ""


CHECK_KIND = "block.kind"
CHECK_MOUNTED = "block.mounted"
CHECK_IN_USE = "block.in-use"
CHECK_SYSTEM = "block.system-disk"
CHECK_REMOVABLE = "block.removable"
CHECK_SAME_FILE = "block.same-file"
CHECK_SIZE = "block.size"

BLOCK_CHECKS: tuple[CheckSpec, ...] = (
    CheckSpec(
        CHECK_KIND,
        False,
        "the target is a block device or a regular file (or a path where one can be created)",
        "only disks, partitions, loop devices and image files can take a disk image",
    ),
    CheckSpec(
        CHECK_MOUNTED,
        False,
        "neither the target nor any of its partitions (nor a device stacked on them) is mounted",
        "writing under a mounted filesystem corrupts it; unmount it first",
    ),
    CheckSpec(
        CHECK_IN_USE,
        False,
        "the target is not active swap, not held by device-mapper/md, and (for a file) backs "
        "no loop device",
        "another part of the system is using the device; release it first",
    ),
    CheckSpec(
        CHECK_SYSTEM,
        False,
        "the target is not the disk holding /, /boot, /boot/efi or /usr",
        "overwriting the running system's disk destroys it",
    ),
    CheckSpec(
        CHECK_REMOVABLE,
        True,
        "a disk is removable or on a USB or MMC bus (loop devices and files always pass)",
    ),
    CheckSpec(
        CHECK_SAME_FILE,
        False,
        "the target is not the image file being written",
        "the image would overwrite itself",
    ),
    CheckSpec(
        CHECK_SIZE,
        False,
        "the image fits the target (a regular file grows as needed)",
        "an image larger than the card is cut off and will not boot",
    ),
)
BLOCK_CHECK_IDS: tuple[str, ...] = tuple(c.id for c in BLOCK_CHECKS)
_SPECS = {c.id: c for c in BLOCK_CHECKS}
_SYSTEM_MOUNTS = ("/", "/boot", "/boot/efi", "/usr")
_REMOVABLE_BUSES = ("usb", "mmc")


# ---------------------------------------------------------------------------------------------
# The kernel's views (pure parsers)


@dataclass(frozen=True)
class Mount:
    """One line of ``/proc/self/mountinfo``."""

    dev: tuple[int, int]
    mount_point: str
    fstype: str
    source: str


def _unescape(text: str) -> str:
    """Undo mountinfo's octal escapes (``\\040`` for a space)."""
    if "\\" not in text:
        return text
    out = []
    i = 0
    while i < len(text):
        if text[i] == "\\" and i + 4 <= len(text) and text[i + 1 : i + 4].isdigit():
            out.append(chr(int(text[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[Mount]:
    """The mounts listed in ``/proc/PID/mountinfo`` text; malformed lines are skipped."""
    mounts = []
    for line in text.splitlines():
        fields = line.split(" ")
        try:
            sep = fields.index("-", 6)
            major, minor = (int(x) for x in fields[2].split(":"))
            mounts.append(
                Mount(
                    dev=(major, minor),
                    mount_point=_unescape(fields[4]),
                    fstype=fields[sep + 1],
                    source=_unescape(fields[sep + 2]),
                )
            )
        except (ValueError, IndexError):
            continue
    return mounts


def parse_swaps(text: str) -> list[str]:
    """The swap files and devices listed in ``/proc/swaps`` (the header line skipped)."""
    out = []
    for line in text.splitlines()[1:]:
        parts = line.split()
        if parts:
            out.append(_unescape(parts[0]))
    return out


def bus_of(device_path: str, name: str) -> str:
    """The bus a disk hangs on, from the resolved path of its sysfs ``device`` link."""
    if name.startswith("loop"):
        return "loop"
    if not device_path:
        return "virtual"
    parts = device_path.split("/")
    if any(p.startswith("usb") for p in parts):
        return "usb"
    if any(p.startswith("mmc") for p in parts) or name.startswith("mmcblk"):
        return "mmc"
    if name.startswith("nvme") or any(p.startswith("nvme") for p in parts):
        return "nvme"
    if any(p.startswith("virtio") for p in parts):
        return "virtio"
    if any(p.startswith("ata") for p in parts):
        return "ata"
    if any(p.startswith("host") for p in parts):
        return "scsi"
    return "other"


# ---------------------------------------------------------------------------------------------
# Reading the system


@dataclass(frozen=True)
class System:
    """Where the kernel's views of this machine are (tests point these at fake trees)."""

    sys_root: Path = Path("/sys")
    mountinfo: Path = Path("/proc/self/mountinfo")
    swaps: Path = Path("/proc/swaps")

    def read(self, path: Path) -> str:
        try:
            return path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def attr(self, node: Path, name: str) -> str | None:
        """A sysfs attribute of ``node``, stripped; None when absent or unreadable."""
        try:
            return (node / name).read_text(encoding="utf-8", errors="replace").strip()
        except OSError:
            return None

    def mounts(self) -> list[Mount]:
        return parse_mountinfo(self.read(self.mountinfo))

    def swap_names(self) -> list[str]:
        return parse_swaps(self.read(self.swaps))

    def node_of(self, dev: tuple[int, int]) -> Path | None:
        """The sysfs directory of block device ``dev`` (a disk or a partition)."""
        link = self.sys_root / "dev" / "block" / f"{dev[0]}:{dev[1]}"
        if not link.exists():
            return None
        return Path(os.path.realpath(link))

    def block_node(self, name: str) -> Path | None:
        link = self.sys_root / "class" / "block" / name
        if not link.exists():
            return None
        return Path(os.path.realpath(link))

    def dev_of(self, node: Path) -> tuple[int, int] | None:
        text = self.attr(node, "dev")
        if not text or ":" not in text:
            return None
        try:
            a, b = text.split(":", 1)
            return int(a), int(b)
        except ValueError:
            return None

    def disk_node(self, node: Path) -> Path:
        """The whole disk of a partition node (the node itself for a disk)."""
        return node.parent if (node / "partition").exists() else node

    def partitions(self, disk: Path) -> list[Path]:
        try:
            return sorted(p for p in disk.iterdir() if (p / "partition").exists())
        except OSError:
            return []

    def _links(self, node: Path, what: str) -> list[str]:
        try:
            return sorted(p.name for p in (node / what).iterdir())
        except OSError:
            return []

    def holders(self, node: Path) -> list[str]:
        """Devices stacked on ``node`` (dm, md, bcache...), recursively, by kernel name."""
        seen: list[str] = []
        todo = self._links(node, "holders")
        while todo:
            name = todo.pop(0)
            if name in seen:
                continue
            seen.append(name)
            sub = self.block_node(name)
            if sub is not None:
                todo.extend(self._links(sub, "holders"))
        return seen

    def base_disks(self, node: Path, depth: int = 0) -> set[str]:
        """The physical disks under ``node``: its disk, or the slaves of a dm/md device."""
        disk = self.disk_node(node)
        slaves = self._links(disk, "slaves") if (disk / "slaves").exists() else []
        if not slaves or depth > 8:
            return {disk.name}
        out: set[str] = set()
        for name in slaves:
            sub = self.block_node(name)
            if sub is not None:
                out |= self.base_disks(sub, depth + 1)
        return out or {disk.name}

    def loop_backing_files(self) -> dict[str, str]:
        """Loop device name -> its backing file, for every attached loop device."""
        out: dict[str, str] = {}
        try:
            names = sorted(p.name for p in (self.sys_root / "block").iterdir())
        except OSError:
            return out
        for name in names:
            if name.startswith("loop"):
                backing = self.attr(self.sys_root / "block" / name / "loop", "backing_file")
                if backing:
                    out[name] = backing
        return out


# ---------------------------------------------------------------------------------------------
# What a target is


@dataclass(frozen=True)
class TargetInfo:
    """Facts about a target path, gathered before it is opened for writing."""

    path: str
    #: "disk", "partition", "file" (a regular file, or a path where one will be created),
    #: or "other" (a character device, directory... which cannot be written).
    kind: str
    exists: bool
    size_bytes: int
    logical_block_bytes: int = 512
    dev: tuple[int, int] | None = None
    #: Kernel name of the device ("sdb1", "loop3") and of its whole disk ("sdb").
    name: str | None = None
    disk: str | None = None
    #: "usb", "mmc", "loop", "nvme", "virtio", "ata", "scsi", "virtual", "other" or "file".
    bus: str = "file"
    removable: bool = False
    read_only: bool = False
    vendor: str | None = None
    model: str | None = None
    serial: str | None = None
    #: Mounts, swaps and holders found on the target, its partitions or stacked devices.
    mounts: tuple[str, ...] = ()
    swaps: tuple[str, ...] = ()
    holders: tuple[str, ...] = ()
    system_disk: bool = False
    #: For a loop device: its backing file. For a file: the loop devices it backs.
    backing_file: str | None = None
    loop_devices: tuple[str, ...] = ()
    st_dev: int | None = None
    st_ino: int | None = None

    @property
    def is_block(self) -> bool:
        return self.kind in ("disk", "partition")

    @property
    def label(self) -> str:
        """A human name: "SanDisk Ultra (sdb, usb, 29.7 GiB)"."""
        desc = " ".join(x for x in (self.vendor, self.model) if x) or self.path
        where = ", ".join(x for x in (self.name, self.bus) if x)
        return f"{desc} ({where}, {_gib(self.size_bytes)})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "kind": self.kind,
            "size_bytes": self.size_bytes,
            "logical_block_bytes": self.logical_block_bytes,
            "name": self.name,
            "disk": self.disk,
            "bus": self.bus,
            "removable": self.removable,
            "read_only": self.read_only,
            "vendor": self.vendor,
            "model": self.model,
            "serial": self.serial,
            "mounts": list(self.mounts),
            "swaps": list(self.swaps),
            "holders": list(self.holders),
            "system_disk": self.system_disk,
            "backing_file": self.backing_file,
            "loop_devices": list(self.loop_devices),
        }


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.1f} MiB"


def _usb_serial(system: System, device: Path) -> str | None:
    """The serial number of the USB device a disk belongs to (walking up its sysfs path)."""
    node = device
    for _ in range(12):
        if node == node.parent:
            break
        if (node / "idVendor").exists():
            return system.attr(node, "serial")
        node = node.parent
    return None


def _identity(system: System, disk: Path, bus: str) -> tuple[str | None, str | None, str | None]:
    device = disk / "device"
    if not device.exists():
        return None, None, None
    real = Path(os.path.realpath(device))
    vendor = system.attr(device, "vendor")
    model = system.attr(device, "model") or system.attr(device, "name")
    serial = system.attr(disk, "serial") or system.attr(device, "serial")
    if bus == "usb" and not serial:
        serial = _usb_serial(system, real)
    if bus == "mmc":
        kind = system.attr(device, "type")  # "SD" or "MMC"
        vendor = vendor or (f"{kind} manfid {system.attr(device, 'manfid')}" if kind else None)
    return vendor or None, model or None, serial or None


def inspect_target(path: str | Path, *, system: System | None = None) -> TargetInfo:
    """Gather what the kernel says about ``path`` (nothing is opened for writing)."""
    system = system or System()
    text = str(path)
    try:
        st = os.stat(text)
    except FileNotFoundError:
        parent = os.path.dirname(os.path.abspath(text))
        if not os.path.isdir(parent):
            raise SourceError(f"{text}: no such file or directory") from None
        return TargetInfo(path=text, kind="file", exists=False, size_bytes=0)
    except OSError as e:
        raise SourceError(f"{text}: cannot examine: {e.strerror}") from e
    if stat.S_ISREG(st.st_mode):
        real = os.path.realpath(text)
        loops = tuple(
            f"/dev/{name}"
            for name, backing in system.loop_backing_files().items()
            if _same_path(backing, real)
        )
        return TargetInfo(
            path=text,
            kind="file",
            exists=True,
            size_bytes=st.st_size,
            loop_devices=loops,
            st_dev=st.st_dev,
            st_ino=st.st_ino,
        )
    if not stat.S_ISBLK(st.st_mode):
        return TargetInfo(path=text, kind="other", exists=True, size_bytes=0, bus="none")
    dev = (os.major(st.st_rdev), os.minor(st.st_rdev))
    node = system.node_of(dev)
    if node is None:
        log.warning("no sysfs entry for block device %s (%d:%d)", text, *dev)
        return TargetInfo(path=text, kind="disk", exists=True, size_bytes=0, dev=dev, bus="other")
    disk = system.disk_node(node)
    is_part = disk != node
    device_link = disk / "device"
    device_path = os.path.realpath(device_link) if device_link.exists() else ""
    bus = bus_of(device_path, disk.name)
    sectors = system.attr(node, "size")
    logical = system.attr(disk / "queue", "logical_block_size")
    vendor, model, serial = _identity(system, disk, bus)

    # Everything that could be mounted: the disk, its partitions and what is stacked on them.
    nodes = [disk, *system.partitions(disk)] if not is_part else [node]
    names: set[str] = set()
    devs: set[tuple[int, int]] = set()
    holders: list[str] = []
    for n in nodes:
        names.add(n.name)
        d = system.dev_of(n)
        if d is not None:
            devs.add(d)
        for h in system.holders(n):
            if h not in holders:
                holders.append(h)
    for h in holders:
        names.add(h)
        hn = system.block_node(h)
        hd = system.dev_of(hn) if hn is not None else None
        if hd is not None:
            devs.add(hd)
    all_mounts = system.mounts()
    mounts = tuple(
        f"{m.source} on {m.mount_point}"
        for m in all_mounts
        if m.dev in devs or os.path.basename(os.path.realpath(m.source)) in names
    )
    swaps = tuple(s for s in system.swap_names() if os.path.basename(s) in names)

    system_disks: set[str] = set()
    for m in all_mounts:
        if m.mount_point in _SYSTEM_MOUNTS:
            sn = system.node_of(m.dev)
            if sn is not None:
                system_disks |= system.base_disks(sn)
    backing = system.attr(disk / "loop", "backing_file") if bus == "loop" else None
    return TargetInfo(
        path=text,
        kind="partition" if is_part else "disk",
        exists=True,
        size_bytes=int(sectors) * 512 if sectors and sectors.isdigit() else 0,
        logical_block_bytes=int(logical) if logical and logical.isdigit() else 512,
        dev=dev,
        name=node.name,
        disk=disk.name,
        bus=bus,
        removable=system.attr(disk, "removable") == "1",
        read_only=system.attr(node, "ro") == "1",
        vendor=vendor,
        model=model,
        serial=serial,
        mounts=mounts,
        swaps=swaps,
        holders=tuple(holders),
        system_disk=disk.name in system_disks,
        backing_file=backing,
    )


def _same_path(a: str, b: str) -> bool:
    a = a.removesuffix(" (deleted)")
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


# ---------------------------------------------------------------------------------------------
# Checks


def validate_forced(forced: Mapping[str, str]) -> None:
    """UsageError for ``--force`` of an unknown or non-overridable block check, or no reason.

    Ids that are not block checks are left alone (they belong to the engine's checks).
    """
    for check_id, reason in forced.items():
        spec = _SPECS.get(check_id)
        if spec is None:
            continue
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


def _result(
    check_id: str, ok: bool, message: str, forced: Mapping[str, str], **detail: Any
) -> CheckResult:
    spec = _SPECS[check_id]
    reason = forced.get(check_id) if not ok and spec.overridable else None
    if reason:
        log.warning("check %s forced: %s", check_id, reason)
        message = f"{message} [forced: {reason}]"
    return CheckResult(
        id=check_id,
        passed=ok or reason is not None,
        overridable=spec.overridable,
        forced=reason is not None,
        message=message,
        detail=detail,
        reason=reason,
    )


def check_target(
    info: TargetInfo,
    *,
    image_size: int | None = None,
    image_path: str | Path | None = None,
    forced: Mapping[str, str] | None = None,
) -> tuple[CheckResult, ...]:
    """Run every block check on ``info``, in the order of :data:`BLOCK_CHECKS`.

    ``image_size`` (bytes the target will receive) enables the size check; ``image_path``
    the same-file check. Pure: decides from the gathered facts only.
    """
    forced = dict(forced or {})
    validate_forced(forced)
    out: list[CheckResult] = []
    p = info.path
    if info.kind == "other":
        out.append(
            _result(CHECK_KIND, False, f"{p} is neither a block device nor a regular file", forced)
        )
    elif info.read_only:
        out.append(_result(CHECK_KIND, False, f"{p} is read-only (write-protect switch?)", forced))
    else:
        out.append(_result(CHECK_KIND, True, f"{p} is a {info.kind}", forced))
    if info.mounts:
        out.append(
            _result(
                CHECK_MOUNTED,
                False,
                f"{p} is mounted ({'; '.join(info.mounts)})",
                forced,
                mounts=list(info.mounts),
            )
        )
    else:
        out.append(_result(CHECK_MOUNTED, True, f"{p} is not mounted", forced))
    busy = [f"swap {s}" for s in info.swaps] + [f"held by {h}" for h in info.holders]
    busy += [f"backs {loop}" for loop in info.loop_devices]
    if busy:
        out.append(_result(CHECK_IN_USE, False, f"{p} is in use ({'; '.join(busy)})", forced))
    else:
        out.append(_result(CHECK_IN_USE, True, f"{p} is not in use", forced))
    if info.system_disk:
        out.append(_result(CHECK_SYSTEM, False, f"{p} is on the system disk {info.disk}", forced))
    else:
        out.append(_result(CHECK_SYSTEM, True, f"{p} is not the system disk", forced))
    if not info.is_block or info.bus == "loop":
        out.append(_result(CHECK_REMOVABLE, True, f"{p} is a {info.bus} target", forced))
    elif info.removable or info.bus in _REMOVABLE_BUSES:
        out.append(
            _result(CHECK_REMOVABLE, True, f"{info.label} is removable or on {info.bus}", forced)
        )
    else:
        out.append(
            _result(
                CHECK_REMOVABLE,
                False,
                f"{p} is a fixed disk: {info.label} is not removable and not on USB or MMC",
                forced,
                bus=info.bus,
            )
        )
    same = False
    if image_path is not None and info.exists:
        try:
            same = os.path.samefile(str(image_path), info.path)
        except OSError:
            same = False
    if same:
        out.append(_result(CHECK_SAME_FILE, False, f"{p} is the image file itself", forced))
    else:
        out.append(_result(CHECK_SAME_FILE, True, f"{p} is not the image file", forced))
    out.append(size_check(info, image_size, forced))
    return tuple(out)


def size_check(
    info: TargetInfo, image_size: int | None, forced: Mapping[str, str] | None = None
) -> CheckResult:
    """The ``block.size`` check: the image fits (files grow; an unknown size passes)."""
    forced = forced or {}
    p = info.path
    if image_size is None:
        return _result(CHECK_SIZE, True, f"{p}: image size not known yet", forced)
    if not info.is_block:
        return _result(CHECK_SIZE, True, f"{p} is a file and grows as needed", forced)
    if image_size > info.size_bytes:
        return _result(
            CHECK_SIZE,
            False,
            f"the image ({image_size} bytes) is larger than {p} ({info.size_bytes} bytes)",
            forced,
            image_size=image_size,
            target_size=info.size_bytes,
        )
    return _result(
        CHECK_SIZE, True, f"the image ({image_size} bytes) fits {p} ({info.size_bytes})", forced
    )


def refusal(results: Iterable[CheckResult]) -> PreflightError | None:
    """The error for the first failed check, or None when every check passed (or was forced)."""
    for r in results:
        if r.passed:
            continue
        hint = "nothing was written to the device"
        if r.overridable:
            hint += f"; to override: --force {r.id} --reason TEXT"
        elif r.id == CHECK_MOUNTED:
            hint += "; unmount it (umount) and try again"
        return PreflightError(r.message, check_id=r.id, overridable=r.overridable, hint=hint)
    return None


# ---------------------------------------------------------------------------------------------
# Opening


def device_size(fd: int) -> int:
    """Size in bytes of the open block device or file ``fd`` (BLKGETSIZE64, or fstat)."""
    st = os.fstat(fd)
    if not stat.S_ISBLK(st.st_mode):
        return st.st_size
    buf = fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8)
    return int(struct.unpack("<Q", buf)[0])


def logical_block_size(fd: int) -> int:
    """The logical sector size of a block device (512 for files and on failure)."""
    if not stat.S_ISBLK(os.fstat(fd).st_mode):
        return 512
    try:
        buf = fcntl.ioctl(fd, BLKSSZGET, b"\0" * 4)
    except OSError:
        return 512
    return int(struct.unpack("<i", buf)[0]) or 512


@dataclass
class BlockTarget:
    """A checked target, open for writing (``fd``) until :meth:`close`.

    Block devices are held with ``O_EXCL``: nothing can mount them while they are open.
    """

    info: TargetInfo
    fd: int
    checks: tuple[CheckResult, ...]
    size_bytes: int
    logical_block_bytes: int
    forced: dict[str, str] = field(default_factory=dict)
    closed: bool = False
    #: The file did not exist before :func:`open_target` created it.
    created: bool = False

    @property
    def path(self) -> str:
        return self.info.path

    @property
    def is_block(self) -> bool:
        return self.info.is_block

    def check_size(self, image_size: int) -> CheckResult:
        """Refuse (PreflightError ``block.size``) an image larger than the target."""
        info = TargetInfo(**{**_fields(self.info), "size_bytes": self.size_bytes})
        result = size_check(info, image_size, self.forced)
        err = refusal([result])
        if err is not None:
            raise err
        return result

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self.fd)

    def __enter__(self) -> BlockTarget:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _fields(info: TargetInfo) -> dict[str, Any]:
    return {name: getattr(info, name) for name in info.__dataclass_fields__}


def open_target(
    path: str | Path,
    *,
    image_size: int | None = None,
    image_path: str | Path | None = None,
    forced: Mapping[str, str] | None = None,
    system: System | None = None,
    create: bool = True,
) -> BlockTarget:
    """Check ``path`` and open it for writing; PreflightError (nothing opened) when refused.

    A regular file is created when missing (``create``) and never truncated. ``image_size``,
    when known, is checked against the target's size; ``image_path`` must not be the target.
    """
    forced = dict(forced or {})
    info = inspect_target(path, system=system)
    if not info.exists and not create:
        raise SourceError(f"{path}: no such file or device")
    checks = check_target(info, image_size=image_size, image_path=image_path, forced=forced)
    err = refusal(checks)
    if err is not None:
        raise err
    text = str(path)
    flags = os.O_RDWR | os.O_CLOEXEC
    if info.is_block:
        flags |= os.O_EXCL
    elif create:
        flags |= os.O_CREAT
    try:
        fd = os.open(text, flags, 0o644)
    except OSError as e:
        if e.errno == errno.EBUSY:
            raise PreflightError(
                f"{text} is busy: it or one of its partitions is mounted or opened exclusively "
                "by another program",
                check_id=CHECK_MOUNTED,
                hint="nothing was written to the device; unmount it and close other programs",
            ) from e
        if e.errno in (errno.EACCES, errno.EPERM):
            raise DeviceError(
                f"{text}: permission denied", hint="run as root or join the 'disk' group"
            ) from e
        if e.errno == errno.EROFS:
            raise PreflightError(
                f"{text} is read-only", check_id=CHECK_KIND, hint="check the write-protect switch"
            ) from e
        raise DeviceError(f"{text}: cannot open for writing: {e.strerror}") from e
    try:
        st = os.fstat(fd)
        if (
            not info.is_block
            and info.exists
            and (st.st_dev, st.st_ino)
            != (
                info.st_dev,
                info.st_ino,
            )
        ):
            raise PreflightError(f"{text} changed while it was being checked", check_id=CHECK_KIND)
        if info.is_block and (os.major(st.st_rdev), os.minor(st.st_rdev)) != info.dev:
            raise PreflightError(
                f"{text} changed while it was being checked (another device was plugged in?)",
                check_id=CHECK_KIND,
            )
        size = device_size(fd)
        target = BlockTarget(
            info=info,
            fd=fd,
            checks=checks,
            size_bytes=size,
            logical_block_bytes=logical_block_size(fd),
            forced=forced,
            created=not info.exists,
        )
        if image_size is not None:
            target.check_size(image_size)
    except BaseException:
        os.close(fd)
        raise
    log.info("opened %s (%s, %d bytes)", text, info.kind, size)
    return target


def open_reader(path: str | Path) -> int:
    """Open ``path`` read-only with O_DIRECT (page-cache bypass); -1 when O_DIRECT is refused."""
    with contextlib.suppress(OSError):
        return os.open(str(path), os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECT)
    return -1
