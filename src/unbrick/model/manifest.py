"""Firmware manifests: what an image says it is for.

Two kinds are read here, both pure (the caller reads the file and passes its bytes or text):

* unbrick's own TOML sidecar (``firmware.bin.toml`` beside ``firmware.bin``), format
  ``unbrick-manifest-1``, parsed by :func:`parse_manifest` into a :class:`Manifest`;
* Android's ``android-info.txt`` (in factory images and ``fastboot update`` zips), parsed by
  :func:`parse_android_info` and checked against the device's ``fastboot getvar`` answers by
  :func:`evaluate`, with the semantics of AOSP's fastboot (``CheckRequirements`` in
  ``system/core/fastboot/fastboot.cpp``):

  - each line is ``[require|reject] NAME=V1|V2...`` or ``require-for-product:PRODUCT NAME=V...``
    (``\\s+`` after the keyword, optional spaces around ``=``, every value trimmed); a line with
    neither keyword is a ``require`` line; empty lines are skipped and a line of any other shape
    is skipped as a syntax error (fastboot prints a warning and goes on);
  - ``board`` is an alias of the variable ``product``;
  - a value matches when it equals the variable, or when it ends in ``*`` and the variable
    starts with the text before the ``*`` (the only wildcard; ``*`` elsewhere is literal);
  - ``require`` needs one value to match; ``reject`` needs none to match;
  - ``require-for-product:P`` lines apply only when the device's ``product`` is exactly ``P``
    (otherwise they are ignored and count as met);
  - a variable the device does not answer fails the line, for ``reject`` too;
  - ``partition-exists=NAME`` (whatever its keyword or product) needs ``getvar has-slot:NAME``
    to answer ``yes`` or ``no``; fastboot's ``--force`` cannot override this one.

  Deviations, all stricter: lines starting with ``#`` are comments (fastboot reports them as
  syntax errors and skips them, except the odd ``#name=value`` it would read as a variable
  named ``#name``); a trailing carriage return is removed (fastboot's pattern would not match a
  CRLF line and would skip the requirement silently).

Both feed the pre-flight checks through :class:`Requirements`.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from unbrick.errors import UsageError

MANIFEST_FORMAT = "unbrick-manifest-1"
_MANIFEST_KEYS = (
    "format",
    "model",
    "version",
    "security_version",
    "hw_revisions",
    "regions",
    "min_bootloader",
    "target",
    "sha256",
)
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
MAX_MANIFEST_BYTES = 1 << 20


@dataclass(frozen=True)
class Requirements:
    """What an image or a profile requires of a device; empty tuples and ``None`` mean "any".

    ``source`` names where they come from ("manifest fw.bin.toml", "profile sim-router"), for
    messages. ``version`` and ``security_version`` describe the image (not the device).
    """

    source: str
    models: tuple[str, ...] = ()
    hw_revisions: tuple[str, ...] = ()
    regions: tuple[str, ...] = ()
    min_bootloader: str | None = None
    version: str | None = None
    security_version: int | None = None


@dataclass(frozen=True)
class Manifest:
    """unbrick's manifest (``format = "unbrick-manifest-1"``)."""

    model: str
    version: str
    security_version: int = 0
    #: Empty: any hardware revision / market region.
    hw_revisions: tuple[str, ...] = ()
    regions: tuple[str, ...] = ()
    min_bootloader: str | None = None
    #: The region (or A/B slot group) the image is for.
    target: str | None = None
    #: Lower-case hex SHA-256 of the image the manifest describes.
    sha256: str | None = None
    source: str = ""

    def requirements(self) -> Requirements:
        return Requirements(
            source=f"manifest {self.source}" if self.source else "manifest",
            models=(self.model,),
            hw_revisions=self.hw_revisions,
            regions=self.regions,
            min_bootloader=self.min_bootloader,
            version=self.version,
            security_version=self.security_version,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT,
            "model": self.model,
            "version": self.version,
            "security_version": self.security_version,
            "hw_revisions": list(self.hw_revisions),
            "regions": list(self.regions),
            "min_bootloader": self.min_bootloader,
            "target": self.target,
            "sha256": self.sha256,
        }


def _bad(source: str, what: str) -> UsageError:
    return UsageError(
        f"manifest {source}: {what}",
        hint=f'see docs/profiles.md, "Firmware manifests" (format = "{MANIFEST_FORMAT}")',
    )


def _str(source: str, doc: Mapping[str, Any], key: str, *, required: bool) -> str | None:
    value = doc.get(key)
    if value is None:
        if required:
            raise _bad(source, f"missing key '{key}'")
        return None
    if not isinstance(value, str) or not value.strip():
        raise _bad(source, f"'{key}' must be a non-empty string, not {value!r}")
    return value


def _str_list(source: str, doc: Mapping[str, Any], key: str) -> tuple[str, ...]:
    value = doc.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise _bad(source, f"'{key}' must be a list of non-empty strings, not {value!r}")
    return tuple(value)


def parse_manifest(data: bytes, source: str) -> Manifest:
    """Parse an unbrick TOML manifest; unknown keys and wrong types are a UsageError."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise _bad(source, f"{len(data)} bytes is too large for a manifest")
    try:
        doc = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise _bad(source, f"not UTF-8 text ({e.reason} at byte {e.start})") from e
    except tomllib.TOMLDecodeError as e:
        raise _bad(source, f"not valid TOML: {e}") from e
    unknown = [k for k in doc if k not in _MANIFEST_KEYS]
    if unknown:
        raise _bad(source, f"unknown key '{unknown[0]}'; known keys: {', '.join(_MANIFEST_KEYS)}")
    fmt = doc.get("format")
    if fmt != MANIFEST_FORMAT:
        raise _bad(source, f"format is {fmt!r}, expected {MANIFEST_FORMAT!r}")
    model = _str(source, doc, "model", required=True)
    version = _str(source, doc, "version", required=True)
    assert model is not None and version is not None
    sv = doc.get("security_version", 0)
    if not isinstance(sv, int) or isinstance(sv, bool) or sv < 0:
        raise _bad(source, f"'security_version' must be an integer >= 0, not {sv!r}")
    sha = _str(source, doc, "sha256", required=False)
    if sha is not None and not _SHA256.fullmatch(sha):
        raise _bad(source, f"'sha256' must be 64 hex digits, not {sha!r}")
    return Manifest(
        model=model,
        version=version,
        security_version=sv,
        hw_revisions=_str_list(source, doc, "hw_revisions"),
        regions=_str_list(source, doc, "regions"),
        min_bootloader=_str(source, doc, "min_bootloader", required=False),
        target=_str(source, doc, "target", required=False),
        sha256=sha.lower() if sha else None,
        source=source,
    )


# ---------------------------------------------------------------------------------------------
# android-info.txt

_REQUIRE_REJECT = re.compile(r"(require\s+|reject\s+)?\s*(\S+)\s*=\s*(.*)", re.ASCII)
_REQUIRE_FOR_PRODUCT = re.compile(r"require-for-product:\s*(\S+)\s+(\S+)\s*=\s*(.*)", re.ASCII)
_WS = " \t\n\r\v\f"
MAX_ANDROID_INFO_CHARS = 1 << 20


@dataclass(frozen=True)
class AndroidRequirement:
    """One line of android-info.txt. ``name`` is the getvar variable (``board`` -> ``product``)."""

    line_no: int
    text: str
    name: str
    values: tuple[str, ...]
    #: ``reject`` lines: none of the values may match.
    invert: bool = False
    #: ``require-for-product:PRODUCT`` lines: applies only to that product.
    product: str | None = None

    @property
    def is_partition_exists(self) -> bool:
        return self.name == "partition-exists"


@dataclass(frozen=True)
class AndroidInfo:
    requirements: tuple[AndroidRequirement, ...]
    #: (line number, text) of lines fastboot would skip as syntax errors.
    ignored: tuple[tuple[int, str], ...] = ()

    def variables(self) -> tuple[str, ...]:
        """The getvar names :func:`evaluate` needs, in first-use order (``product`` first)."""
        out = ["product"]
        for req in self.requirements:
            name = f"has-slot:{req.values[0]}" if req.is_partition_exists else req.name
            if name not in out:
                out.append(name)
        return tuple(out)

    def boards(self) -> tuple[str, ...]:
        """Values of the unconditional ``require board=`` (``product``) lines."""
        out: list[str] = []
        for req in self.requirements:
            if req.name == "product" and not req.invert and req.product is None:
                out.extend(v for v in req.values if v not in out)
        return tuple(out)


@dataclass(frozen=True)
class RequirementFailure:
    requirement: AndroidRequirement
    #: What the device answered; ``None`` when it did not answer the variable.
    found: str | None
    message: str
    #: False for ``partition-exists``: fastboot refuses even with --force.
    overridable: bool = True


def parse_android_info(text: str) -> AndroidInfo:
    """Parse android-info.txt (see the module's notes for the rules)."""
    if len(text) > MAX_ANDROID_INFO_CHARS:
        raise UsageError(
            f"android-info.txt: {len(text)} characters is too large",
            hint="this is not an android-info.txt file",
        )
    reqs: list[AndroidRequirement] = []
    ignored: list[tuple[int, str]] = []
    for n, raw in enumerate(text.split("\n"), start=1):
        line = raw.removesuffix("\r")
        if not line or line.lstrip(_WS).startswith("#"):
            continue
        product: str | None = None
        invert = False
        m = _REQUIRE_REJECT.fullmatch(line)
        if m is not None:
            invert = (m.group(1) or "").strip(_WS) == "reject"
        else:
            m = _REQUIRE_FOR_PRODUCT.fullmatch(line)
            if m is None:
                if line.strip(_WS):
                    ignored.append((n, line))
                continue
            product = m.group(1)
        name = m.group(2)
        if name == "board":
            name = "product"
        values = tuple(v.strip(_WS) for v in m.group(3).split("|"))
        reqs.append(AndroidRequirement(n, line, name, values, invert, product))
    return AndroidInfo(tuple(reqs), tuple(ignored))


def value_matches(option: str, value: str) -> bool:
    """fastboot's comparison: equal, or ``option`` ends in ``*`` and is a prefix of ``value``."""
    if option == value:
        return True
    return option.endswith("*") and value.startswith(option[:-1])


def _alternatives(values: tuple[str, ...]) -> str:
    return " or ".join(repr(v) for v in values)


def evaluate(
    info: AndroidInfo, getvar: Mapping[str, str], product: str | None = None
) -> list[RequirementFailure]:
    """The requirements the device does not meet, in file order (empty: all met).

    ``getvar`` maps variable names to the device's answers; a missing key is a variable the
    device did not answer. ``product`` is the device's product; ``None`` reads ``product``
    from ``getvar`` (empty when absent, as fastboot does when ``getvar product`` fails).
    """
    cur_product = product if product is not None else getvar.get("product", "")
    failures: list[RequirementFailure] = []
    for req in info.requirements:
        if req.is_partition_exists:
            part = req.values[0]
            has_slot = getvar.get(f"has-slot:{part}")
            if has_slot not in ("yes", "no"):
                failures.append(
                    RequirementFailure(
                        req,
                        has_slot,
                        f"the device has no partition '{part}', which this update requires "
                        f"(line {req.line_no}); use the factory image made for this device",
                        overridable=False,
                    )
                )
            continue
        if req.product is not None and req.product != cur_product:
            continue
        value = getvar.get(req.name)
        if value is None:
            failures.append(
                RequirementFailure(
                    req,
                    None,
                    f"the device did not answer getvar '{req.name}', which this update checks "
                    f"(line {req.line_no})",
                )
            )
            continue
        matched = any(value_matches(opt, value) for opt in req.values)
        if matched != req.invert:
            continue
        verb = "rejects" if req.invert else "requires"
        failures.append(
            RequirementFailure(
                req,
                value,
                f"device {req.name} is {value!r}; the update {verb} "
                f"{_alternatives(req.values)} (line {req.line_no})",
            )
        )
    return failures
