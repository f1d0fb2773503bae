"""Device URIs: where a device is, parsed into an immutable descriptor.

A URI names the protocol and the link (``uboot+serial:///dev/ttyUSB0?baud=115200``); a driver
consumes the descriptor. Parsing is pure and strict: an unknown scheme or a malformed URI is a
UsageError that lists the supported forms.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from urllib.parse import parse_qsl, unquote, urlsplit

from unbrick.errors import UsageError

#: scheme -> (protocol, link, form shown in errors)
SCHEMES: dict[str, tuple[str, str, str]] = {
    "sim": ("sim", "sim", "sim://NAME"),
    "uboot+serial": ("uboot", "serial", "uboot+serial:///dev/ttyUSB0?baud=115200"),
    "uboot+tcp": ("uboot", "tcp", "uboot+tcp://HOST:PORT"),
    "uboot+socket": ("uboot", "tcp", "uboot+socket://HOST:PORT"),
    "uboot+rfc2217": ("uboot", "rfc2217", "uboot+rfc2217://HOST:PORT"),
    "fastboot+usb": ("fastboot", "usb", "fastboot+usb://SERIAL"),
    "fastboot+tcp": ("fastboot", "tcp", "fastboot+tcp://HOST:PORT"),
    "fastboot+udp": ("fastboot", "udp", "fastboot+udp://HOST:PORT"),
    "tftp+server": ("tftp", "server", "tftp+server://BIND:PORT"),
    "tftp+client": ("tftp", "client", "tftp+client://HOST:PORT"),
    "flashrom": ("flashrom", "programmer", "flashrom://PROGRAMMER?params"),
    "block": ("block", "file", "block:///dev/sdX or block:///path/file.img"),
    "esp": ("esp", "serial", "esp://PORT (esp:///dev/ttyUSB0)"),
}

_NEEDS_HOST_PORT = {
    "uboot+tcp",
    "uboot+socket",
    "uboot+rfc2217",
    "fastboot+tcp",
    "fastboot+udp",
    "tftp+server",
    "tftp+client",
}


def supported_forms() -> str:
    return ", ".join(form for _, _, form in SCHEMES.values())


@dataclass(frozen=True)
class DeviceAddress:
    """A parsed device URI. Immutable; ``params`` keeps the query in order."""

    uri: str
    scheme: str
    protocol: str
    link: str
    host: str | None = None
    port: int | None = None
    path: str | None = None
    #: sim name, USB serial, flashrom programmer.
    name: str | None = None
    params: tuple[tuple[str, str], ...] = ()

    def param(self, key: str, default: str | None = None) -> str | None:
        for k, v in self.params:
            if k == key:
                return v
        return default

    def int_param(self, key: str, default: int) -> int:
        value = self.param(key)
        if value is None:
            return default
        try:
            return int(value, 0)
        except ValueError as e:
            raise UsageError(f"{self.uri}: parameter {key}={value!r} is not a number") from e

    def with_defaults(self, defaults: Mapping[str, str]) -> DeviceAddress:
        """This address with ``defaults`` added for the query parameters it does not set."""
        have = {k for k, _ in self.params}
        extra = tuple((k, v) for k, v in defaults.items() if k not in have)
        return replace(self, params=self.params + extra) if extra else self

    @property
    def pyserial_url(self) -> str:
        """The pyserial URL of a serial-like link (a device path, socket:// or rfc2217://)."""
        if self.link == "serial" and self.path:
            return self.path
        if self.link == "tcp":
            return f"socket://{self.host}:{self.port}"
        if self.link == "rfc2217":
            return f"rfc2217://{self.host}:{self.port}"
        raise UsageError(f"{self.uri} is not a serial link")

    def __str__(self) -> str:
        return self.uri


def parse_device_uri(text: str) -> DeviceAddress:
    """Parse ``text`` into a DeviceAddress, or raise UsageError naming what is wrong."""
    text = text.strip()
    if "://" not in text:
        raise UsageError(
            f"'{text}' is not a device URI",
            hint=f"use one of: {supported_forms()}",
        )
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as e:
        raise UsageError(f"'{text}' is malformed: {e}", hint=f"use e.g. {supported_forms()}") from e
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise UsageError(
            f"unknown device scheme '{scheme}://' in '{text}'",
            hint=f"supported: {supported_forms()}",
        )
    protocol, link, form = SCHEMES[scheme]
    if parts.fragment:
        raise UsageError(f"'{text}': a device URI has no #fragment", hint=f"use {form}")
    try:
        params = tuple(parse_qsl(parts.query, keep_blank_values=True, strict_parsing=True))
    except ValueError as e:
        if parts.query:
            raise UsageError(
                f"'{text}': malformed parameters '{parts.query}'", hint="use ?key=value&key=value"
            ) from e
        params = ()
    host = parts.hostname
    path = unquote(parts.path) or None
    name: str | None = None

    if scheme in _NEEDS_HOST_PORT:
        if not host or port is None:
            raise UsageError(f"'{text}' needs a host and a port", hint=f"use {form}")
        if path not in (None, "/"):
            raise UsageError(f"'{text}' has an unexpected path '{path}'", hint=f"use {form}")
        path = None
    elif scheme == "sim":
        name = unquote(parts.netloc)
        if not name or path not in (None, "/") or "@" in name:
            raise UsageError(f"'{text}' does not name a simulated device", hint=f"use {form}")
        path = None
    elif scheme == "fastboot+usb":
        name = unquote(parts.netloc) or None  # empty: the only device attached
        if path not in (None, "/"):
            raise UsageError(f"'{text}' has an unexpected path", hint=f"use {form}")
        path = None
    elif scheme == "flashrom":
        name = unquote(parts.netloc)
        if not name:
            raise UsageError(f"'{text}' does not name a flashrom programmer", hint=f"use {form}")
        path = None
    elif scheme in ("uboot+serial", "block"):
        if parts.netloc or not path:
            raise UsageError(
                f"'{text}' needs an absolute path after three slashes", hint=f"use {form}"
            )
    elif scheme == "esp":
        if parts.netloc and not path:
            path = "/dev/" + unquote(parts.netloc)
        elif parts.netloc or not path:
            raise UsageError(f"'{text}' does not name a serial port", hint=f"use {form}")
    return DeviceAddress(
        uri=text,
        scheme=scheme,
        protocol=protocol,
        link=link,
        host=host,
        port=port,
        path=path,
        name=name,
        params=params,
    )
