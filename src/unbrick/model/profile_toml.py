"""Device profiles from TOML: a strict loader and the set of known profiles.

The layout is documented key by key in ``docs/profiles.md``. Every table is checked against its
known keys, so a misspelt key is an error that names the key, the table and the file, rather
than a setting that silently does nothing. Values are checked for type and range: regions lie
inside the storage, are aligned to erase blocks and do not overlap; A/B slot pairs are complete;
``default_region`` exists; bootloader regions are critical; regular expressions compile.

Two conventions stand in for facts ``Profile`` has no field for (see docs/profiles.md):
``StorageSpec.size_bytes == 0`` means "the size is read from the device" (``size = "device"``),
and ``Region.size == 0`` means the region's extent is known only on the device: to the end of
the storage (``size = "rest"`` when the storage size is unknown) or, for a region with neither
``offset`` nor ``size``, a partition the device finds by name (fastboot, GPT).

This module is pure: :func:`load_profile` takes bytes; only :func:`builtin_profile_sources`
reads the profiles shipped in the package, through ``importlib.resources``.
"""

from __future__ import annotations

import itertools
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

from unbrick.errors import UsageError
from unbrick.formats.registry import FORMAT_NAMES
from unbrick.model.identity import STORAGE_TYPES, DeviceIdentity
from unbrick.model.profile import (
    BootCheck,
    Compatibility,
    Loader,
    MatchRule,
    Profile,
    Recovery,
    Region,
    StorageSpec,
)
from unbrick.model.uri import SCHEMES

FAMILIES = ("router", "nas", "phone", "sbc", "mcu", "iot", "other")
REGION_KINDS = ("firmware", "bootloader", "env", "data", "calibration", "loader")
VERIFY_MODES = ("auto", "device-hash", "read-back")
SLOT_LETTERS = ("a", "b")
#: Identity fields a ``[match]`` table may name directly (``DeviceIdentity.fields()``); any
#: other field a transport reports goes under ``[match.extra]``.
MATCH_FIELDS = (
    "model",
    "serial",
    "hw_revision",
    "region",
    "bootloader_version",
    "firmware_version",
    "security_version",
    "storage_type",
    "storage_size",
)
#: Storage types whose size may be left to the device (``size = "device"``).
DEVICE_SIZED = ("block", "emmc", "spi-nor", "nor", "nand")
MAX_PROFILE_BYTES = 1 << 20

#: Link protocols a profile may set defaults for (the protocols of device URIs).
LINK_PROTOCOLS = frozenset(protocol for protocol, _, _ in SCHEMES.values())
BACKUP_SCOPES = ("full", "target", "none")
#: Link protocols whose devices take ``oem`` commands (``[link.PROTOCOL] oem_allow``).
OEM_LINKS = ("fastboot",)
_PARAM = re.compile(r"[a-z][a-z0-9_]{0,39}")
#: One allowed oem command: words of printable ASCII without quotes, separated by one space.
_OEM_COMMAND = re.compile(r"[!#-&(-~]+(?: [!#-&(-~]+)*")
_OEM_COMMAND_MAX = 200

_TOP_KEYS = (
    "id",
    "name",
    "family",
    "default_region",
    "verify",
    "match",
    "storage",
    "region",
    "recovery",
    "boot",
    "compat",
    "loader",
    "link",
)
_STORAGE_KEYS = ("type", "size", "erase_block", "bad_blocks")
_REGION_KEYS = ("name", "offset", "size", "kind", "critical", "slot", "slot_group", "formats")
_RECOVERY_KEYS = ("instructions", "methods", "wait_s")
_BOOT_KEYS = (
    "success_pattern",
    "failure_patterns",
    "expect_version",
    "timeout_s",
    "version_pattern",
)
_COMPAT_KEYS = ("models", "hw_revisions", "regions", "min_bootloader")
_LOADER_KEYS = ("region", "description")
_RULE_KEYS = ("equals", "one_of", "pattern")

_ID = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
_METHOD = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
_FIELD = re.compile(r"[A-Za-z_][A-Za-z0-9_.:-]{0,63}")
_SIZE = re.compile(r"\s*(0[xX][0-9a-fA-F_]+|[0-9][0-9_]*)\s*([KMGT]iB)?\s*")
_UNITS = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}
_MAX_BYTES = 1 << 50


# ---------------------------------------------------------------------------------------------
# Sizes


def parse_size(value: object) -> int:
    """An integer, or a string: decimal or ``0x`` hex, optionally followed by KiB/MiB/GiB/TiB.

    Raises ValueError with a short reason; the loader turns it into a UsageError naming the key.
    """
    if isinstance(value, bool):
        raise ValueError("expected a number, not a boolean")
    if isinstance(value, int):
        number = value
    elif isinstance(value, str):
        m = _SIZE.fullmatch(value)
        if m is None:
            raise ValueError(f"{value!r} is not a size (write 0x40000, 262144 or '256KiB')")
        number = int(m.group(1), 0) * _UNITS.get(m.group(2) or "", 1)
    else:
        raise ValueError(f"expected a number or a size string, not {type(value).__name__}")
    if not 0 <= number <= _MAX_BYTES:
        raise ValueError(f"{number} is out of range")
    return number


def region_size_bytes(region: Region, storage_size_bytes: int | None) -> int | None:
    """A region's size in bytes, resolving ``size == 0`` against the device's storage size.

    ``None`` when the size is known only to the device (a partition found by name, or a
    device that did not report its storage size).
    """
    if region.size:
        return region.size
    if storage_size_bytes is None or storage_size_bytes <= region.offset:
        return None
    return storage_size_bytes - region.offset


# ---------------------------------------------------------------------------------------------
# The strict reader


class _Table:
    """A TOML table being read: takes known keys, names itself in errors."""

    def __init__(self, source: str, where: str, data: Mapping[str, Any], known: Iterable[str]):
        self.source = source
        self.where = where
        self.data = data
        known = tuple(known)
        for key in data:
            if key not in known:
                raise self.error(f"unknown key '{key}' in {where}; known keys: {', '.join(known)}")

    def error(self, what: str) -> UsageError:
        return UsageError(f"profile {self.source}: {what}", hint="see docs/profiles.md")

    def bad(self, key: str, what: str) -> UsageError:
        return self.error(f"'{key}' in {self.where} {what}")

    def has(self, key: str) -> bool:
        return key in self.data

    def raw(self, key: str, *, required: bool = False) -> Any:
        if key not in self.data:
            if required:
                raise self.error(f"missing key '{key}' in {self.where}")
            return None
        return self.data[key]

    def str_(
        self, key: str, *, required: bool = False, pattern: re.Pattern[str] | None = None
    ) -> str | None:
        value = self.raw(key, required=required)
        if value is None:
            return None
        if not isinstance(value, str) or not value.strip():
            raise self.bad(key, f"must be a non-empty string, not {value!r}")
        if pattern is not None and not pattern.fullmatch(value):
            raise self.bad(key, f"is {value!r}; it must match {pattern.pattern}")
        return value

    def choice(self, key: str, choices: tuple[str, ...], default: str | None = None) -> str | None:
        value = self.str_(key)
        if value is None:
            return default
        if value not in choices:
            raise self.bad(key, f"is {value!r}; expected one of: {', '.join(choices)}")
        return value

    def bool_(self, key: str, default: bool) -> bool:
        value = self.raw(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.bad(key, f"must be true or false, not {value!r}")
        return value

    def seconds(self, key: str, default: float, hi: float = 86400.0) -> float:
        value = self.raw(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.bad(key, f"must be a number of seconds, not {value!r}")
        if not 0 < value <= hi:
            raise self.bad(key, f"is {value}; it must be above 0 and at most {hi:g}")
        return float(value)

    def str_list(
        self, key: str, *, pattern: re.Pattern[str] | None = None, required: bool = False
    ) -> tuple[str, ...]:
        value = self.raw(key, required=required)
        if value is None:
            return ()
        if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
            raise self.bad(key, f"must be a list of non-empty strings, not {value!r}")
        if required and not value:
            raise self.bad(key, "must not be empty")
        for v in value:
            if pattern is not None and not pattern.fullmatch(v):
                raise self.bad(key, f"has {v!r}; each item must match {pattern.pattern}")
        if len(set(value)) != len(value):
            raise self.bad(key, f"lists an item twice: {value!r}")
        return tuple(value)

    def size(self, key: str, *, required: bool = False) -> int | None:
        value = self.raw(key, required=required)
        if value is None:
            return None
        try:
            return parse_size(value)
        except ValueError as e:
            raise self.bad(key, f"is not a valid size: {e}") from e

    def regex(self, key: str, value: str) -> str:
        try:
            re.compile(value)
        except re.error as e:
            raise self.bad(key, f"is not a valid regular expression ({e}): {value!r}") from e
        return value

    def table(self, key: str, known: Iterable[str], *, required: bool = False) -> _Table | None:
        value = self.raw(key, required=required)
        if value is None:
            return None
        if not isinstance(value, dict):
            raise self.bad(key, f"must be a table ([{key}]), not {type(value).__name__}")
        return _Table(self.source, f"[{key}]", value, known)


# ---------------------------------------------------------------------------------------------
# Sections


def _match_rule(t: _Table, key: str, value: Any) -> MatchRule:
    where = f"{t.where} '{key}'"
    if isinstance(value, str):
        return MatchRule(field=key, equals=value)
    if isinstance(value, list):
        if not value or not all(isinstance(v, str) for v in value):
            raise t.bad(key, f"must be a non-empty list of strings, not {value!r}")
        return MatchRule(field=key, one_of=tuple(value))
    if not isinstance(value, dict):
        raise t.bad(key, "must be a string, a list of strings or a table {pattern = '...'}")
    rt = _Table(t.source, where, value, _RULE_KEYS)
    if len(value) != 1:
        raise rt.error(f"{where} must set exactly one of: {', '.join(_RULE_KEYS)}")
    if rt.has("equals"):
        return MatchRule(field=key, equals=rt.str_("equals"))
    if rt.has("one_of"):
        return MatchRule(field=key, one_of=rt.str_list("one_of", required=True))
    pattern = rt.str_("pattern")
    assert pattern is not None
    return MatchRule(field=key, pattern=rt.regex("pattern", pattern))


def _match(top: _Table) -> tuple[MatchRule, ...]:
    t = top.table("match", (*MATCH_FIELDS, "extra"))
    if t is None:
        return ()
    rules = [_match_rule(t, k, v) for k, v in t.data.items() if k != "extra"]
    extra = t.raw("extra")
    if extra is not None:
        if not isinstance(extra, dict):
            raise t.bad("extra", "must be a table ([match.extra])")
        et = _Table(t.source, "[match.extra]", extra, extra.keys())
        for key, value in extra.items():
            if not _FIELD.fullmatch(key):
                raise et.error(f"field name {key!r} in [match.extra] is not valid")
            if key in MATCH_FIELDS:
                raise et.error(f"'{key}' belongs in [match], not in [match.extra]")
            rules.append(_match_rule(et, key, value))
    return tuple(rules)


def _storage(top: _Table) -> StorageSpec:
    t = top.table("storage", _STORAGE_KEYS, required=True)
    assert t is not None
    stype = t.choice("type", STORAGE_TYPES)
    if stype is None:
        raise t.error("missing key 'type' in [storage]")
    raw_size = t.raw("size", required=True)
    if raw_size == "device":
        if stype not in DEVICE_SIZED:
            raise t.bad(
                "size",
                f"may be 'device' only for storage types {', '.join(DEVICE_SIZED)}; "
                f"give the size of the {stype} chip",
            )
        size = 0
    else:
        size = t.size("size", required=True) or 0
        if size == 0:
            raise t.bad("size", "must be above 0 (or 'device' for block storage)")
    erase = t.size("erase_block", required=True) or 0
    if erase <= 0 or erase & (erase - 1):
        raise t.bad("erase_block", f"is {erase}; it must be a power of two")
    if size and size % erase:
        raise t.bad("size", f"{size:#x} is not a multiple of erase_block {erase:#x}")
    bad_blocks = t.bool_("bad_blocks", False)
    if bad_blocks and stype != "nand":
        raise t.bad("bad_blocks", f"applies only to nand storage, not {stype}")
    return StorageSpec(type=stype, size_bytes=size, erase_block_bytes=erase, bad_blocks=bad_blocks)


def _region(top: _Table, index: int, value: Any, storage: StorageSpec) -> tuple[Region, bool]:
    """One [[region]] and whether it runs to the end of a storage of unknown size."""
    label = f"[[region]] #{index + 1}"
    if not isinstance(value, dict):
        raise top.error(f"{label} must be a table")
    if isinstance(value.get("name"), str):
        label = f"{label} ('{value['name']}')"
    t = _Table(top.source, label, value, _REGION_KEYS)
    name = t.str_("name", required=True, pattern=_NAME)
    assert name is not None
    kind = t.choice("kind", REGION_KINDS, "firmware")
    assert kind is not None
    has_offset, has_size = t.has("offset"), t.has("size")
    to_end = False
    if not has_offset and not has_size:
        if storage.size_bytes:
            raise t.error(f"{label} needs 'offset' and 'size' (the storage size is known)")
        offset, size = 0, 0  # a partition the device locates by name
    elif not has_offset:
        raise t.error(f"missing key 'offset' in {label}")
    elif not has_size:
        raise t.error(f"missing key 'size' in {label}")
    else:
        offset = t.size("offset") or 0
        if t.raw("size") == "rest":
            size = storage.size_bytes - offset if storage.size_bytes else 0
            to_end = not storage.size_bytes
            if storage.size_bytes and size <= 0:
                raise t.bad("offset", f"{offset:#x} is at or past the end of the storage")
        else:
            size = t.size("size") or 0
            if size == 0:
                raise t.bad("size", "must be above 0")
    erase = storage.erase_block_bytes
    if offset % erase:
        raise t.bad("offset", f"{offset:#x} is not aligned to the erase block ({erase:#x})")
    if size % erase:
        raise t.bad("size", f"{size:#x} is not a multiple of the erase block ({erase:#x})")
    if storage.size_bytes and offset + size > storage.size_bytes:
        raise t.error(
            f"{label} ends at {offset + size:#x}, past the end of the storage "
            f"({storage.size_bytes:#x})"
        )
    slot = t.choice("slot", SLOT_LETTERS)
    group = t.str_("slot_group", pattern=_NAME)
    if (slot is None) != (group is None):
        raise t.error(f"{label} must set both 'slot' and 'slot_group', or neither")
    critical = t.bool_("critical", False)
    if kind == "bootloader" and not critical:
        raise t.bad("kind", "is 'bootloader', so the region must also say critical = true")
    formats = t.str_list("formats")
    for f in formats:
        if f not in FORMAT_NAMES:
            raise t.bad("formats", f"names unknown format {f!r}; known: {', '.join(FORMAT_NAMES)}")
    region = Region(
        name=name,
        offset=offset,
        size=size,
        kind=kind,
        critical=critical,
        slot=slot,
        slot_group=group,
        formats=formats,
    )
    return region, to_end


def _check_regions(top: _Table, regions: list[Region], to_end: list[Region]) -> None:
    names: set[str] = set()
    for r in regions:
        if r.name in names:
            raise top.error(f"two [[region]] tables are named '{r.name}'")
        names.add(r.name)
    for r in to_end:
        later = [o for o in regions if o is not r and o.offset >= r.offset and o not in to_end]
        if later or len(to_end) > 1:
            other = later[0].name if later else next(o.name for o in to_end if o is not r)
            raise top.error(
                f"region '{r.name}' runs to the end of the storage (size = \"rest\") and "
                f"overlaps '{other}'"
            )
    placed = sorted((r for r in regions if r.size), key=lambda r: r.offset)
    for a, b in itertools.pairwise(placed):
        if b.offset < a.end:
            raise top.error(
                f"regions '{a.name}' ({a.offset:#x}-{a.end:#x}) and '{b.name}' "
                f"({b.offset:#x}-{b.end:#x}) overlap"
            )
    groups: dict[str, list[Region]] = {}
    for r in regions:
        if r.slot_group is not None:
            groups.setdefault(r.slot_group, []).append(r)
    for group, members in groups.items():
        if group in names:
            raise top.error(f"slot group '{group}' has the name of a region; rename one of them")
        letters = sorted(m.slot or "" for m in members)
        if letters != list(SLOT_LETTERS):
            raise top.error(
                f"slot group '{group}' has slots {letters}; it needs exactly one region for "
                f"each of {', '.join(SLOT_LETTERS)}"
            )
        first = members[0]
        for m in members[1:]:
            if (m.size, m.kind, m.critical, m.formats) != (
                first.size,
                first.kind,
                first.critical,
                first.formats,
            ):
                raise top.error(
                    f"slots '{first.name}' and '{m.name}' of group '{group}' differ in size, "
                    "kind, critical or formats; A/B slots must be alike"
                )


def _recovery(top: _Table) -> Recovery:
    t = top.table("recovery", _RECOVERY_KEYS, required=True)
    assert t is not None
    return Recovery(
        instructions=t.str_list("instructions", required=True),
        methods=t.str_list("methods", pattern=_METHOD),
        wait_s=t.seconds("wait_s", 60.0),
    )


def _boot(top: _Table) -> BootCheck:
    t = top.table("boot", _BOOT_KEYS)
    if t is None:
        return BootCheck()
    success = t.str_("success_pattern")
    failures = t.str_list("failure_patterns")
    version = t.str_("version_pattern")
    if version is not None and re.compile(t.regex("version_pattern", version)).groups < 1:
        raise t.bad("version_pattern", f"needs a group around the version: {version!r}")
    return BootCheck(
        version_pattern=version,
        success_pattern=t.regex("success_pattern", success) if success is not None else None,
        failure_patterns=tuple(t.regex("failure_patterns", p) for p in failures),
        expect_version=t.bool_("expect_version", True),
        timeout_s=t.seconds("timeout_s", 60.0),
    )


def _links(top: _Table) -> tuple[dict[str, dict[str, str]], dict[str, tuple[str, ...]]]:
    """``[link.PROTOCOL]`` tables: URI parameter defaults (strings, numbers or booleans,
    which become "on"/"off"), ``backup_scope``, and ``oem_allow`` (kept apart from the URI
    parameters, so that a URI cannot set it)."""
    raw = top.raw("link")
    if raw is None:
        return {}, {}
    if not isinstance(raw, dict):
        raise top.bad("link", f"must be tables ([link.uboot]), not {type(raw).__name__}")
    out: dict[str, dict[str, str]] = {}
    oem: dict[str, tuple[str, ...]] = {}
    for protocol, table in raw.items():
        where = f"[link.{protocol}]"
        if protocol not in LINK_PROTOCOLS:
            raise top.error(f"unknown link {where}; known: {', '.join(sorted(LINK_PROTOCOLS))}")
        if not isinstance(table, dict):
            raise top.error(f"{where} must be a table, not {type(table).__name__}")
        params: dict[str, str] = {}
        for key, value in table.items():
            if key == "oem_allow":
                oem[protocol] = _oem_allow(top, protocol, value)
                continue
            if not _PARAM.fullmatch(key):
                raise top.error(f"'{key}' in {where} is not a URI parameter name")
            if isinstance(value, bool):
                text = "on" if value else "off"
            elif isinstance(value, (str, int)):
                text = str(value)
            else:
                raise top.error(
                    f"'{key}' in {where} must be a string, number or boolean, "
                    f"not {type(value).__name__}"
                )
            if key == "backup_scope" and text not in BACKUP_SCOPES:
                raise top.error(
                    f"'backup_scope' in {where} must be one of {', '.join(BACKUP_SCOPES)}, "
                    f"not {text!r}"
                )
            params[key] = text
        out[protocol] = params
    return out, oem


def _oem_allow(top: _Table, protocol: str, value: Any) -> tuple[str, ...]:
    """``oem_allow``: a list of oem commands (a first word, or a whole command)."""
    where = f"'oem_allow' in [link.{protocol}]"
    if protocol not in OEM_LINKS:
        raise top.error(
            f"{where}: {protocol} links have no oem commands (only {', '.join(OEM_LINKS)})"
        )
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise top.error(f"{where} must be a list of non-empty strings, not {value!r}")
    for item in value:
        if len(item) > _OEM_COMMAND_MAX or not _OEM_COMMAND.fullmatch(item):
            raise top.error(
                f"{where} has {item!r}; each item is an oem command without 'oem' (printable "
                f"ASCII words, one space apart, at most {_OEM_COMMAND_MAX} characters)"
            )
        if item.split(" ", 1)[0] == "oem":
            raise top.error(f"{where} has {item!r}; write the command without 'oem'")
    if len(set(value)) != len(value):
        raise top.error(f"{where} lists an item twice: {value!r}")
    return tuple(value)


def _compat(top: _Table) -> Compatibility:
    t = top.table("compat", _COMPAT_KEYS)
    if t is None:
        return Compatibility()
    return Compatibility(
        models=t.str_list("models"),
        hw_revisions=t.str_list("hw_revisions"),
        regions=t.str_list("regions"),
        min_bootloader=t.str_("min_bootloader"),
    )


def _loader(top: _Table, names: set[str]) -> Loader | None:
    t = top.table("loader", _LOADER_KEYS)
    if t is None:
        return None
    region = t.str_("region")
    if region is not None and region not in names:
        raise t.bad("region", f"names '{region}', which is not a [[region]] of this profile")
    return Loader(region=region, description=t.str_("description") or "")


def load_profile(data: bytes, source: str) -> Profile:
    """Parse and validate one profile; every problem is a UsageError naming ``source``."""
    if len(data) > MAX_PROFILE_BYTES:
        raise UsageError(f"profile {source}: {len(data)} bytes is too large for a profile")
    try:
        doc = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise UsageError(
            f"profile {source}: not UTF-8 text ({e.reason} at byte {e.start})",
            hint="save the profile as UTF-8",
        ) from e
    except tomllib.TOMLDecodeError as e:
        raise UsageError(
            f"profile {source}: not valid TOML: {e}", hint="see docs/profiles.md"
        ) from e
    top = _Table(source, "the top level", doc, _TOP_KEYS)
    pid = top.str_("id", required=True, pattern=_ID)
    name = top.str_("name", required=True)
    family = top.choice("family", FAMILIES)
    if family is None:
        raise top.error("missing key 'family' in the top level")
    assert pid is not None and name is not None
    storage = _storage(top)
    raw_regions = top.raw("region", required=True)
    if not isinstance(raw_regions, list) or not raw_regions:
        raise top.error("'region' must be one or more [[region]] tables")
    read = [_region(top, i, r, storage) for i, r in enumerate(raw_regions)]
    regions = [r for r, _ in read]
    _check_regions(top, regions, [r for r, to_end in read if to_end])
    names = {r.name for r in regions}
    groups = {r.slot_group for r in regions if r.slot_group}
    default = top.str_("default_region")
    if default is not None and default not in names and default not in groups:
        raise top.bad(
            "default_region",
            f"names '{default}', which is neither a region nor a slot group; "
            f"known: {', '.join(sorted(names | groups))}",
        )
    verify = top.choice("verify", VERIFY_MODES, "auto")
    assert verify is not None
    link, oem = _links(top)
    return Profile(
        id=pid,
        name=name,
        family=family,
        match=_match(top),
        storage=storage,
        regions=tuple(regions),
        recovery=_recovery(top),
        boot=_boot(top),
        compat=_compat(top),
        default_region=default,
        loader=_loader(top, names),
        verify=verify,
        source=source,
        link=link,
        oem=oem,
    )


# ---------------------------------------------------------------------------------------------
# The set of profiles


@dataclass(frozen=True)
class ProfileSet:
    """Known profiles by id. Build it with :meth:`from_sources`."""

    profiles: tuple[Profile, ...]

    @classmethod
    def from_sources(
        cls, builtin: list[tuple[str, bytes]], user: list[tuple[str, bytes]]
    ) -> ProfileSet:
        """Load ``(source, bytes)`` pairs; a user profile replaces a built-in one with its id.

        Two profiles with one id in the same list are a UsageError.
        """
        by_id: dict[str, Profile] = {}
        for group in (builtin, user):
            seen: dict[str, str] = {}
            for source, data in group:
                profile = load_profile(data, source)
                if profile.id in seen:
                    raise UsageError(
                        f"profiles {seen[profile.id]} and {source} both have id '{profile.id}'",
                        hint="give each profile its own id",
                    )
                seen[profile.id] = source
                by_id[profile.id] = profile
        return cls(tuple(sorted(by_id.values(), key=lambda p: p.id)))

    def all(self) -> tuple[Profile, ...]:
        """Every profile, by id."""
        return self.profiles

    def ids(self) -> tuple[str, ...]:
        return tuple(p.id for p in self.profiles)

    def find(self, profile_id: str) -> Profile | None:
        return next((p for p in self.profiles if p.id == profile_id), None)

    def get(self, profile_id: str) -> Profile:
        """The profile with this id; a UsageError listing the known ids if there is none."""
        profile = self.find(profile_id)
        if profile is None:
            raise UsageError(
                f"no profile with id '{profile_id}'",
                hint=f"known profiles: {', '.join(self.ids()) or 'none'}",
            )
        return profile

    def match(self, identity: DeviceIdentity) -> list[Profile]:
        """Profiles whose rules all match ``identity``, most specific (most rules) first.

        Profiles without rules never match: they are chosen by id.
        """
        hits = [p for p in self.profiles if p.matches(identity)]
        return sorted(hits, key=lambda p: (-len(p.match), p.id))


def builtin_profile_sources() -> list[tuple[str, bytes]]:
    """The profiles shipped in ``unbrick/data/profiles``, as ``("builtin:NAME.toml", bytes)``."""
    folder = resources.files("unbrick.data").joinpath("profiles")
    out: list[tuple[str, bytes]] = []
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".toml") and entry.is_file():
            out.append((f"builtin:{entry.name}", entry.read_bytes()))
    return out
