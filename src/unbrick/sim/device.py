"""A simulated device: flash, persistent config, boot chain and fault injection.

On every power-on or reset the boot chain runs:

1. The boot ROM checks the bootloader region (magic and CRC). A bad bootloader leaves the
   device "dead" (a hard brick: the recovery interface does not answer; only the SPI face,
   a clip-on programmer on the flash chip, still works).
2. The bootloader loads its environment: two redundant copies, one per env erase block, each
   ``magic | sequence | length | crc32 | key=value\\0...``. The valid copy with the highest
   sequence wins; a write goes to the other copy, so a power cut during an env write always
   leaves one valid copy.
3. Autoboot: single-slot kinds boot the "firmware" region; A/B kinds follow U-Boot's bootcount
   scheme (``upgrade_available`` set: ``bootcount`` += 1, saved; boot the trial slot unless
   ``bootcount > bootlimit``, in which case fall back to ``active_slot`` and clear
   ``upgrade_available``, as ``altbootcmd`` does). A bad image in one A/B slot falls back to
   the other; in a single-slot device it leaves the device in its bootloader ("bootloader", a
   soft brick: the recovery interface answers), with U-Boot's messages in the boot log.
4. A good image runs: state "firmware". An image whose kernel panics resets the device; A/B
   falls back through bootcount, a single-slot device is reported in its bootloader after a
   few loops with the panic in the log.

In state "firmware" the device answers identification, state and boot-control requests but
refuses flash operations; in "bootloader" everything works.

Faults (:class:`Faults`) are set per run: an armed power cut applies the Nth flash operation
partly, drops every connection (listeners registered with :meth:`add_power_listener`), and
the device powers back on by itself after ``power_on_delay_s``. Link faults are applied by the
server, from the same object.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from unbrick.errors import DeviceError, SourceError, UsageError
from unbrick.formats.uimage import HEADER_SIZE
from unbrick.model.identity import DeviceIdentity, StorageInfo
from unbrick.model.profile import Region
from unbrick.sim.firmware import (
    RAM_ADDRESS,
    BootImage,
    check_boot,
    check_bootloader,
    read_calibration,
)
from unbrick.sim.flash import MAX_OP_BYTES, Flash, FlashGeometry, PowerLoss, pad_to_page
from unbrick.transports.base import BootState

log = logging.getLogger(__name__)

STATES = ("off", "dead", "bootloader", "firmware")
ENV_MAGIC = b"SENV"
_ENV_HEADER = struct.Struct(">4sIII")
#: Kernel panics in a row after which a single-slot device is reported in its bootloader.
PANIC_LOOPS = 3
MAX_LOG_CHARS = 64 * 1024
PROMPT = "=> "
FIRMWARE_BUSY = "device is running firmware; enter recovery first"


@dataclass(frozen=True)
class Faults:
    """Faults injected during one run of a device. Deterministic given ``seed``."""

    #: The Nth flash operation (erase/program) from now is applied only partly, then power is
    #: lost.
    power_cut_after_ops: int | None = None
    #: Seconds the device stays off after a power cut or a reset.
    power_on_delay_s: float = 0.05
    #: Probability per response frame of flipping one payload bit (generic face).
    link_bit_error_rate: float = 0.0
    #: Each connection of the generic face is dropped after this many response frames.
    disconnect_after_frames: int | None = None
    #: Throttle of the generic face.
    slow_link_bytes_per_s: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.power_cut_after_ops is not None and self.power_cut_after_ops < 1:
            raise UsageError("power-cut-after must be 1 or more")
        if not 0.0 <= self.link_bit_error_rate <= 1.0:
            raise UsageError("bit-error-rate must be between 0 and 1")
        if self.disconnect_after_frames is not None and self.disconnect_after_frames < 1:
            raise UsageError("disconnect-after must be 1 or more")
        if self.slow_link_bytes_per_s is not None and self.slow_link_bytes_per_s < 1:
            raise UsageError("slow must be 1 byte per second or more")
        if self.power_on_delay_s < 0:
            raise UsageError("power-on delay must not be negative")


@dataclass(frozen=True)
class DeviceConfig:
    """What a device is, stored as JSON beside its flash file."""

    kind: str
    model: str
    serial: str
    hw_revision: str
    region: str
    #: Anti-rollback counter: images with a lower security version are refused.
    security_version: int
    geometry: FlashGeometry
    regions: tuple[Region, ...]
    chip: str = "W25Q64JV"
    jedec_id: str = "ef4017"

    @property
    def ab(self) -> bool:
        return any(r.slot for r in self.regions)

    def find_region(self, name: str) -> Region | None:
        return next((r for r in self.regions if r.name == name), None)

    def slot_region(self, slot: str) -> Region:
        for r in self.regions:
            if r.slot == slot:
                return r
        raise DeviceError(
            f"no slot {slot!r} on this device",
            hint=f"slots: {', '.join(r.slot for r in self.regions if r.slot)}",
        )

    @property
    def slots(self) -> tuple[str, ...]:
        return tuple(sorted(r.slot for r in self.regions if r.slot))

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "model": self.model,
            "serial": self.serial,
            "hw_revision": self.hw_revision,
            "region": self.region,
            "security_version": self.security_version,
            "chip": self.chip,
            "jedec_id": self.jedec_id,
            "flash": self.geometry.to_dict(),
            "layout": [
                {
                    "name": r.name,
                    "offset": r.offset,
                    "size": r.size,
                    "kind": r.kind,
                    "critical": r.critical,
                    "slot": r.slot,
                    "slot_group": r.slot_group,
                    "formats": list(r.formats),
                }
                for r in self.regions
            ],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DeviceConfig:
        regions = tuple(
            Region(
                name=str(r["name"]),
                offset=int(r["offset"]),
                size=int(r["size"]),
                kind=str(r["kind"]),
                critical=bool(r.get("critical", False)),
                slot=r.get("slot"),
                slot_group=r.get("slot_group"),
                formats=tuple(r.get("formats", ())),
            )
            for r in d["layout"]
        )
        return cls(
            kind=str(d["kind"]),
            model=str(d["model"]),
            serial=str(d["serial"]),
            hw_revision=str(d["hw_revision"]),
            region=str(d["region"]),
            security_version=int(d["security_version"]),
            geometry=FlashGeometry.from_dict(d["flash"]),
            regions=regions,
            chip=str(d.get("chip", "W25Q64JV")),
            jedec_id=str(d.get("jedec_id", "ef4017")),
        )


def write_config(path: Path, config: DeviceConfig) -> None:
    """Write the config atomically (temp file, fsync, rename)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            json.dump(config.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise SourceError(f"cannot write device config {path}: {e.strerror}") from e


def read_config(path: Path) -> DeviceConfig:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise SourceError(
            f"cannot read device config {path}: {e.strerror}",
            hint="create the device first (unbrick sim KIND --name NAME)",
        ) from e
    try:
        return DeviceConfig.from_dict(json.loads(text))
    except (ValueError, KeyError, TypeError, DeviceError) as e:
        raise SourceError(
            f"device config {path} is damaged: {e}", hint="recreate it with --reset-factory"
        ) from e


# -- environment --------------------------------------------------------------------------


def encode_env(seq: int, env: dict[str, str], block_bytes: int) -> bytes:
    """One env copy: header, then ``key=value`` pairs each ended by NUL, then one more NUL."""
    for k, v in env.items():
        if not k or "=" in k or "\0" in k or "\0" in v:
            raise DeviceError(f"env variable {k!r} cannot be stored")
    data = b"".join(f"{k}={v}".encode() + b"\0" for k, v in sorted(env.items())) + b"\0"
    seq_len = struct.pack(">II", seq & 0xFFFFFFFF, len(data))
    crc = zlib.crc32(seq_len + data)
    out = _ENV_HEADER.pack(ENV_MAGIC, seq & 0xFFFFFFFF, len(data), crc) + data
    if len(out) > block_bytes:
        raise DeviceError(f"environment of {len(out)} bytes does not fit its {block_bytes} bytes")
    return out


def decode_env(block: bytes) -> tuple[int, dict[str, str]] | None:
    """(sequence, variables) of a valid env copy, or None."""
    if len(block) < _ENV_HEADER.size:
        return None
    magic, seq, length, crc = _ENV_HEADER.unpack_from(block)
    if magic != ENV_MAGIC or _ENV_HEADER.size + length > len(block):
        return None
    data = block[_ENV_HEADER.size : _ENV_HEADER.size + length]
    if zlib.crc32(struct.pack(">II", seq, length) + data) != crc:
        return None
    env: dict[str, str] = {}
    for item in data.split(b"\0"):
        if not item:
            continue
        key, sep, value = item.partition(b"=")
        if not sep:
            return None
        try:
            env[key.decode()] = value.decode()
        except UnicodeDecodeError:
            return None
    return seq, env


def default_env(config: DeviceConfig) -> dict[str, str]:
    env = {"bootdelay": "2", "baudrate": "115200"}
    if config.ab:
        env.update(
            {
                "active_slot": config.slots[0],
                "upgrade_available": "0",
                "bootcount": "0",
                "bootlimit": "3",
                "bootcmd": "run boot_ab",
                "altbootcmd": "setenv upgrade_available 0; saveenv; run boot_active",
            }
        )
    else:
        fw = config.find_region("firmware")
        if fw is not None and config.geometry.type == "nand":
            env["bootcmd"] = (
                f"nand read 0x{RAM_ADDRESS:x} 0x{fw.offset:x} 0x{fw.size:x}; "
                f"bootm 0x{RAM_ADDRESS:x}"
            )
        elif fw is not None:
            env["bootcmd"] = (
                f"sf probe; sf read 0x{RAM_ADDRESS:x} 0x{fw.offset:x} 0x{fw.size:x}; "
                f"bootm 0x{RAM_ADDRESS:x}"
            )
    return env


def read_lines(config: DeviceConfig, region: Region) -> list[str]:
    """What the boot command prints when it reads ``region`` into RAM."""
    if config.geometry.type == "nand":
        return [
            "",
            f"NAND read: device 0 offset 0x{region.offset:x}, size 0x{region.size:x}",
            f" {region.size} bytes read: OK",
        ]
    return [f"SF: {region.size} bytes @ 0x{region.offset:x} Read: OK"]


def env_copies(config: DeviceConfig) -> tuple[int, int]:
    """Offsets of the two env copies (the env region's first two erase blocks)."""
    env = config.find_region("env")
    eb = config.geometry.erase_block_bytes
    if env is None or env.size < 2 * eb:
        raise DeviceError("the device layout has no env region of two erase blocks")
    return env.offset, env.offset + eb


def load_env(flash: Flash, config: DeviceConfig) -> tuple[dict[str, str] | None, int, int]:
    """(variables or None when no copy is valid, newest sequence, offset of the copy to write)."""
    eb = config.geometry.erase_block_bytes
    copies = env_copies(config)
    found = [(decode_env(flash.read(off, eb)), off) for off in copies]
    valid = [(d[0], d[1], off) for d, off in found if d is not None]
    if not valid:
        return None, 0, copies[0]
    seq, env, newest = max(valid, key=lambda v: v[0])
    target = copies[1] if newest == copies[0] else copies[0]
    return env, seq, target


def save_env(flash: Flash, config: DeviceConfig, env: dict[str, str]) -> None:
    """Write ``env`` to the older copy (erase, then program): the newer copy stays valid."""
    _, seq, target = load_env(flash, config)
    eb = config.geometry.erase_block_bytes
    blob = pad_to_page(config.geometry, encode_env(seq + 1, env, eb))
    flash.erase(target, eb)
    flash.program(target, blob)


# -- the device ---------------------------------------------------------------------------


class SimDevice:
    """One simulated device. Thread-safe: every operation holds the device lock."""

    def __init__(
        self,
        name: str,
        config: DeviceConfig,
        flash: Flash,
        *,
        config_path: Path,
        faults: Faults | None = None,
    ) -> None:
        self.name = name
        self.config = config
        self.flash = flash
        self.config_path = config_path
        self.faults = faults or Faults()
        self.state = "off"
        self.boot_log = ""
        self.firmware_version: str | None = None
        self.booted_slot: str | None = None
        #: Counts power-ons; a driver sees a reset happened when it changes.
        self.boot_id = 0
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._listeners: list[Callable[[], None]] = []
        self._timer: threading.Timer | None = None
        self._closed = False
        flash.arm_power_cut(self.faults.power_cut_after_ops)

    # -- life cycle -----------------------------------------------------------------------

    @property
    def kind(self) -> str:
        return self.config.kind

    def set_faults(self, faults: Faults) -> None:
        """Replace the faults of this run (re-arms the power cut counter)."""
        with self._lock:
            self.faults = faults
            self.flash.arm_power_cut(faults.power_cut_after_ops)

    def add_power_listener(self, callback: Callable[[], None]) -> None:
        """``callback()`` runs whenever the device loses power (a cut or a reset)."""
        with self._lock:
            self._listeners.append(callback)

    def remove_power_listener(self, callback: Callable[[], None]) -> None:
        with self._lock:
            if callback in self._listeners:
                self._listeners.remove(callback)

    def power_on(self, *, recovery: bool = False) -> str:
        """Run the boot chain now if the device is off; returns the state."""
        with self._lock:
            self._check_open()
            if self.state == "off":
                self._boot(recovery)
            return self.state

    def reset(self, *, recovery: bool = False) -> None:
        """Power off now (connections drop) and boot after ``power_on_delay_s``.

        ``recovery=True`` stops the next boot in the bootloader (as holding a reset button or
        a "reboot to recovery" request does).
        """
        with self._lock:
            self._check_open()
            self._power_off("reset")
            self._schedule_power_on(recovery)

    def wait_state(self, states: tuple[str, ...], timeout_s: float) -> str:
        """Wait until the device is in one of ``states``; returns the state reached."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self.state not in states:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise DeviceError(
                        f"device {self.name} stayed {self.state!r}, expected one of {states}"
                    )
                self._cond.wait(left)
            return self.state

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            timer, self._timer = self._timer, None
            self.flash.close()
            self._cond.notify_all()
        if timer is not None:
            timer.cancel()

    def _check_open(self) -> None:
        if self._closed:
            raise DeviceError(f"device {self.name} is closed")

    def _power_off(self, why: str) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.state = "off"
        self.firmware_version = None
        self.booted_slot = None
        log.info("sim %s: power off (%s)", self.name, why)
        for callback in list(self._listeners):
            try:
                callback()
            except Exception:
                log.exception("power listener failed")
        self._cond.notify_all()

    def _schedule_power_on(self, recovery: bool) -> None:
        timer = threading.Timer(self.faults.power_on_delay_s, self._timer_power_on, (recovery,))
        timer.daemon = True
        self._timer = timer
        timer.start()

    def _timer_power_on(self, recovery: bool) -> None:
        with self._lock:
            if self._closed or self.state != "off":
                return
            self._timer = None
            self._boot(recovery)

    def _lose_power(self) -> None:
        self.boot_log += "\n<power lost>\n"
        self._power_off("power cut")
        self._schedule_power_on(False)

    def _flash_op(self, fn: Callable[[], None]) -> None:
        try:
            fn()
        except PowerLoss:
            self._lose_power()
            raise

    # -- boot chain -----------------------------------------------------------------------

    def _boot(self, recovery: bool) -> None:
        self.boot_id += 1
        lines: list[str] = []
        try:
            state, version, slot = self._run_chain(lines, recovery)
        except PowerLoss:
            self.boot_log = self._trim("\n".join(lines))
            self._lose_power()
            return
        self.state = state
        self.firmware_version = version
        self.booted_slot = slot
        self.boot_log = self._trim("\n".join(lines))
        log.info("sim %s: boot %d -> %s (%s)", self.name, self.boot_id, state, version)
        self._cond.notify_all()

    @staticmethod
    def _trim(text: str) -> str:
        return text[-MAX_LOG_CHARS:]

    def _run_chain(self, lines: list[str], recovery: bool) -> tuple[str, str | None, str | None]:
        cfg = self.config
        limit = PANIC_LOOPS
        panics = 0
        while True:
            boot_version = self._rom(lines)
            if boot_version is None:
                return "dead", None, None
            env = self._uboot_start(lines, boot_version)
            if recovery:
                lines += ["Hit any key to stop autoboot:  0 ", "sim: recovery requested", PROMPT]
                return "bootloader", None, None
            lines.append("Hit any key to stop autoboot:  0 ")
            if cfg.ab:
                limit = max(PANIC_LOOPS, _int(env.get("bootlimit"), 3) + 2)
                result, slot = self._autoboot_ab(env, lines)
            else:
                result, slot = self._autoboot_single(lines)
            if result is None:
                lines.append(PROMPT)
                return "bootloader", None, None
            if result.outcome == "boot":
                version = result.info.version if result.info else None
                return "firmware", version, slot
            panics += 1
            lines.append("Rebooting in 1 seconds..")
            if panics >= limit:
                lines += [
                    f"sim: boot loop: {panics} kernel panics in a row; stopped in the bootloader",
                    PROMPT,
                ]
                return "bootloader", None, None
            lines.append("")

    def _rom(self, lines: list[str]) -> str | None:
        bl = self.config.find_region("bootloader")
        lines.append(f"SimROM 1.0 ({self.config.model})")
        if bl is None:
            lines.append("ROM: no bootloader region; halting")
            return None
        version, why = check_bootloader(self._read_region(bl.offset, bl.size))
        if version is None:
            lines.append(f"ROM: no valid bootloader at 0x{bl.offset:06x} ({why}); halting")
            return None
        lines.append(f"ROM: bootloader at 0x{bl.offset:06x} OK")
        return version

    def _uboot_start(self, lines: list[str], version: str) -> dict[str, str]:
        cfg = self.config
        geo = cfg.geometry
        lines += [
            "",
            f"U-Boot {version} ({cfg.model})",
            "",
            f"Model: {cfg.model} rev {cfg.hw_revision}",
            "DRAM:  128 MiB",
        ]
        where = "SPIFlash"
        if geo.type == "nand":
            lines.append(f"NAND:  {geo.size_bytes // (1024 * 1024)} MiB")
            where = "NAND"
        else:
            lines.append(
                f"SF: Detected {cfg.chip.lower()} with page size 256 Bytes, erase size "
                f"{geo.erase_block_bytes // 1024} KiB, total {geo.size_bytes // (1024 * 1024)} MiB"
            )
        env, _, _ = load_env(self.flash, cfg)
        if env is None:
            lines += [
                f"Loading Environment from {where}... ",
                "*** Warning - bad CRC, using default environment",
            ]
            env = default_env(cfg)
        else:
            lines.append(f"Loading Environment from {where}... OK")
        lines += ["In:    serial", "Out:   serial", "Err:   serial", "Net:   eth0"]
        return env

    def _read_region(self, offset: int, size: int, limit: int | None = None) -> bytes:
        """``size`` bytes from ``offset``; on NAND bad blocks are skipped (up to ``limit``, the
        region's end), as the bootloader's ``nand read`` does."""
        if self.config.geometry.type == "nand":
            return self.flash.read_skip_bad(offset, size, limit)
        parts = []
        for pos in range(offset, offset + size, MAX_OP_BYTES):
            parts.append(self.flash.read(pos, min(MAX_OP_BYTES, offset + size - pos)))
        return b"".join(parts)

    def _check_slot(self, region: Region) -> BootImage:
        header = self._read_region(region.offset, min(HEADER_SIZE, region.size), region.end)
        declared = int.from_bytes(header[12:16], "big") if len(header) >= 16 else 0
        n = min(region.size, HEADER_SIZE + declared)
        return check_boot(
            self._read_region(region.offset, n, region.end),
            min_security_version=self.config.security_version,
            model=self.config.model,
            hw_revision=self.config.hw_revision,
        )

    def _autoboot_single(self, lines: list[str]) -> tuple[BootImage | None, str | None]:
        fw = self.config.find_region("firmware")
        if fw is None:
            lines.append("ERROR: no firmware region")
            return None, None
        lines.extend(read_lines(self.config, fw))
        result = self._check_slot(fw)
        lines.extend(result.lines)
        if result.outcome == "bad":
            return None, None
        return result, None

    def _autoboot_ab(
        self, env: dict[str, str], lines: list[str]
    ) -> tuple[BootImage | None, str | None]:
        cfg = self.config
        slots = cfg.slots
        active = env.get("active_slot", slots[0])
        if active not in slots:
            lines.append(f"active_slot={active!r} is not a slot; using {slots[0]}")
            active = slots[0]
        other = next(s for s in slots if s != active)
        bootlimit = _int(env.get("bootlimit"), 3)
        if env.get("upgrade_available") == "1":
            bootcount = _int(env.get("bootcount"), 0) + 1
            env["bootcount"] = str(bootcount)
            save_env(self.flash, cfg, env)
            if bootcount > bootlimit:
                lines.append(f"Warning: Bootlimit ({bootlimit}) exceeded. Using altbootcmd.")
                env["upgrade_available"] = "0"
                env["bootcount"] = "0"
                save_env(self.flash, cfg, env)
                order = [active, other]
            else:
                lines.append(f"Trying slot {other} (bootcount {bootcount} of {bootlimit})")
                order = [other, active]
        else:
            order = [active, other]
        for slot in order:
            region = cfg.slot_region(slot)
            lines.append(f"Booting slot {slot} ({region.name})")
            lines.extend(read_lines(self.config, region))
            result = self._check_slot(region)
            lines.extend(result.lines)
            if result.outcome != "bad":
                return result, slot
            lines.append(f"slot {slot}: boot failed")
        return None, None

    # -- what the recovery interface offers ------------------------------------------------

    def _require(self, *states: str) -> None:
        self._check_open()
        if self.state in states:
            return
        if self.state == "firmware":
            raise DeviceError(FIRMWARE_BUSY, hint="call enter_recovery (or reboot into recovery)")
        raise DeviceError(f"device does not answer (state {self.state})")

    def _installed_version(self) -> str | None:
        cfg = self.config
        if cfg.ab:
            env, _, _ = load_env(self.flash, cfg)
            active = (env or default_env(cfg)).get("active_slot", cfg.slots[0])
            region = cfg.slot_region(active if active in cfg.slots else cfg.slots[0])
        else:
            found = cfg.find_region("firmware")
            if found is None:
                return None
            region = found
        result = self._check_slot(region)
        return result.info.version if result.outcome != "bad" and result.info else None

    def identify(self) -> DeviceIdentity:
        with self._lock:
            self._require("bootloader", "firmware")
            cfg = self.config
            geo = cfg.geometry
            extra = {"kind": cfg.kind, "state": self.state, "boot_id": str(self.boot_id)}
            cal = cfg.find_region("calibration")
            if cal is not None:
                fields = read_calibration(self._read_region(cal.offset, cal.size))
                if fields and "mac" in fields:
                    extra["mac"] = fields["mac"]
            bl = cfg.find_region("bootloader")
            bl_version = None
            if bl is not None:
                bl_version, _ = check_bootloader(self._read_region(bl.offset, bl.size))
            if cfg.ab:
                extra["slots"] = ",".join(cfg.slots)
                if self.booted_slot:
                    extra["booted_slot"] = self.booted_slot
            version = (
                self.firmware_version if self.state == "firmware" else self._installed_version()
            )
            return DeviceIdentity(
                model=cfg.model,
                serial=cfg.serial,
                hw_revision=cfg.hw_revision,
                region=cfg.region,
                bootloader_version=bl_version,
                firmware_version=version,
                security_version=cfg.security_version,
                storage=StorageInfo(
                    type=geo.type,
                    size_bytes=geo.size_bytes,
                    erase_block_bytes=geo.erase_block_bytes,
                    page_bytes=geo.page_bytes,
                ),
                extra=extra,
            )

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {
                "state": self.state,
                "boot_id": self.boot_id,
                "firmware_version": self.firmware_version,
                "booted_slot": self.booted_slot,
            }

    def read(self, offset: int, length: int) -> bytes:
        with self._lock:
            self._require("bootloader")
            return self.flash.read(offset, length)

    def erase(self, offset: int, length: int) -> None:
        with self._lock:
            self._require("bootloader")
            self._flash_op(lambda: self.flash.erase(offset, length))

    def program(self, offset: int, data: bytes) -> None:
        with self._lock:
            self._require("bootloader")
            self._flash_op(lambda: self.flash.program(offset, data))

    def hash(self, offset: int, length: int, algorithm: str = "sha256") -> str:
        with self._lock:
            self._require("bootloader")
            return self.flash.hash(offset, length, algorithm)

    # -- A/B boot control (works from the running firmware too, as fw_setenv does) ----------

    def _require_ab(self) -> None:
        self._require("bootloader", "firmware")
        if not self.config.ab:
            raise DeviceError(
                f"{self.config.model} has a single firmware slot: no A/B boot control",
                hint="write the firmware region and reboot",
            )

    def _env(self) -> dict[str, str]:
        env, _, _ = load_env(self.flash, self.config)
        return env if env is not None else default_env(self.config)

    def boot_state(self) -> BootState:
        with self._lock:
            self._require_ab()
            env = self._env()
            slots = self.config.slots
            active = env.get("active_slot", slots[0])
            trial = None
            if env.get("upgrade_available") == "1":
                trial = next((s for s in slots if s != active), None)
            return BootState(
                active_slot=active,
                trial_slot=trial,
                bootcount=_int(env.get("bootcount"), 0),
                bootlimit=_int(env.get("bootlimit"), 3),
                extra={"upgrade_available": env.get("upgrade_available", "0")},
            )

    def set_trial(self, slot: str) -> None:
        with self._lock:
            self._require_ab()
            self.config.slot_region(slot)
            env = self._env()
            if env.get("active_slot", self.config.slots[0]) == slot:
                raise DeviceError(
                    f"slot {slot} is the active slot; only the other slot can be tried",
                    hint="write the inactive slot and try that one",
                )
            env["upgrade_available"] = "1"
            env["bootcount"] = "0"
            self._flash_op(lambda: save_env(self.flash, self.config, env))

    def commit(self, slot: str) -> None:
        with self._lock:
            self._require_ab()
            region = self.config.slot_region(slot)
            result = self._check_slot(region)
            if result.outcome != "boot":
                raise DeviceError(
                    f"slot {slot} does not hold a bootable image; refusing to make it active",
                    hint="write a good image to the slot first",
                )
            env = self._env()
            env["active_slot"] = slot
            env["upgrade_available"] = "0"
            env["bootcount"] = "0"
            self._flash_op(lambda: save_env(self.flash, self.config, env))
            sv = result.info.security_version if result.info else 0
            if sv > self.config.security_version:
                # The committed image raises the anti-rollback counter, as fuses would.
                self.config = replace(self.config, security_version=sv)
                write_config(self.config_path, self.config)

    # -- SPI face: the flash chip itself, in every state ------------------------------------

    def chip_info(self) -> dict[str, Any]:
        geo = self.config.geometry
        uid = zlib.crc32(self.config.serial.encode())
        return {
            "chip": self.config.chip,
            "jedec_id": self.config.jedec_id,
            "unique_id": f"{uid:08x}",
            "storage": StorageInfo(
                geo.type, geo.size_bytes, geo.erase_block_bytes, geo.page_bytes
            ).to_dict(),
        }

    def spi_read(self, offset: int, length: int) -> bytes:
        with self._lock:
            self._check_open()
            return self.flash.read(offset, length)

    def spi_erase(self, offset: int, length: int) -> None:
        with self._lock:
            self._check_open()
            self._flash_op(lambda: self.flash.erase(offset, length))

    def spi_program(self, offset: int, data: bytes) -> None:
        with self._lock:
            self._check_open()
            self._flash_op(lambda: self.flash.program(offset, data))

    # -- test and demo helpers --------------------------------------------------------------

    def simulate_brick(self, mode: str) -> None:
        """Damage the flash as a failed update would, then power-cycle (synchronously).

        "soft": every firmware slot keeps only the first part of its image (an update cut
        short after the erase); "hard": the bootloader is damaged the same way.
        """
        with self._lock:
            self._check_open()
            cfg = self.config
            if mode == "soft":
                targets = [r for r in cfg.regions if r.kind == "firmware"]
            elif mode == "hard":
                targets = [r for r in cfg.regions if r.kind == "bootloader"]
            else:
                raise UsageError(f"unknown brick mode {mode!r}", hint="use soft or hard")
            eb = cfg.geometry.erase_block_bytes
            bad = set(cfg.geometry.bad_blocks)
            for region in targets:
                span = min(region.size, 4 * eb)
                head = self._read_region(region.offset, span, region.end)
                for block in range(region.offset // eb, (region.offset + span) // eb):
                    if block not in bad:
                        self.flash.erase(block * eb, eb)
                good = next(b for b in range(region.offset // eb, region.end // eb) if b not in bad)
                self.flash.program(good * eb, head[: span // 4])
            self._power_off(f"{mode} brick")
            self._boot(False)


def _int(text: str | None, default: int) -> int:
    try:
        return int(text) if text is not None else default
    except ValueError:
        return default


@dataclass(frozen=True)
class DevicePaths:
    """Where a device's state lives: ``DIR/NAME.flash`` and ``DIR/NAME.json``."""

    flash: Path
    config: Path


def device_paths(state_dir: Path, name: str) -> DevicePaths:
    check_name(name)
    return DevicePaths(flash=state_dir / f"{name}.flash", config=state_dir / f"{name}.json")


def check_name(name: str) -> None:
    ok = 0 < len(name) <= 64 and not name.startswith(".")
    if not ok or any(not (c.isascii() and (c.isalnum() or c in "._-")) for c in name):
        raise UsageError(
            f"sim device name {name!r} is not allowed",
            hint="use 1 to 64 letters, digits, dots, dashes or underscores",
        )
