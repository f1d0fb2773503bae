"""Network transfers for the U-Boot driver: ``tftpboot`` from, and ``tftpput`` to, a TFTP
server of unbrick's own that runs for one driver session.

A serial line moves about 10 KiB/s at 115200 baud (90 KiB/s on QEMU's unthrottled UART); the
same device's Ethernet moves megabytes per second through U-Boot's TFTP client. When the
device address names this host's address as the device reaches it (``?serverip=``), the
driver serves each image piece from a private directory and lets the device pull it with
``tftpboot``, and reads flash back with ``tftpput`` where U-Boot has it (it is often compiled
out). Every piece is still checked with the device's ``crc32``; a network that fails makes the
driver fall back to the serial line for the rest of the session.

Device-side settings are made with ``setenv`` for the session only (never saved):
``ipaddr``/``serverip``, ``tftpblocksize`` (U-Boot caps it at 1468 without IP reassembly),
``tftpwindowsize`` (RFC 7440, U-Boot 2020.04 and later), ``tftpdstp`` when the server does
not listen on port 69 (honoured by builds with CONFIG_TFTP_PORT), a 1 s TFTP timeout with 20
retries, and ``netretry=no``, so that a dead network fails in about 20 s rather than retrying
for ever.
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from unbrick.errors import TransportError, UsageError
from unbrick.model.uri import DeviceAddress
from unbrick.transports.tftp.server import TftpServer
from unbrick.transports.uboot.parse import UBootParseError

log = logging.getLogger(__name__)

#: U-Boot's largest TFTP block without IP fragment reassembly (1500-byte MTU).
UBOOT_MAX_BLKSIZE = 1468
DEFAULT_WINDOWSIZE = 8
TFTP_PORT = 69

_TRANSFERRED = re.compile(r"^Bytes transferred = (\d+) \(([0-9a-fA-F]+) hex\)", re.M)
_NET_ERRORS = re.compile(
    r"^(?:\*\*\* ERROR: .*|TFTP error: .*|Retry count exceeded.*|ARP Retry count exceeded.*|"
    r"Abort.*|No ethernet found\..*|Error: .*|.*: No link\..*|## Error: .*|"
    r"Unknown command '.*)$",
    re.M,
)


@dataclass(frozen=True)
class NetConfig:
    """Where the device finds this host's TFTP server."""

    #: This host's address as the device reaches it (U-Boot's ``serverip``).
    serverip: str
    #: The device's own address; None: keep the device's ``ipaddr``.
    ipaddr: str | None = None
    #: Where the server binds; by default ``serverip`` port 69.
    listen_host: str = ""
    listen_port: int = TFTP_PORT
    blksize: int = UBOOT_MAX_BLKSIZE
    windowsize: int = DEFAULT_WINDOWSIZE

    def __post_init__(self) -> None:
        for name, value in (("serverip", self.serverip), ("ipaddr", self.ipaddr)):
            if value is None:
                continue
            try:
                ipaddress.IPv4Address(value)
            except ValueError as e:
                raise UsageError(
                    f"{name}={value!r} is not an IPv4 address",
                    hint="U-Boot's network stack speaks IPv4 only, e.g. serverip=192.168.1.10",
                ) from e
        if not 512 <= self.blksize <= UBOOT_MAX_BLKSIZE:
            raise UsageError(f"tftp_blksize={self.blksize} is outside 512..{UBOOT_MAX_BLKSIZE}")
        if not 1 <= self.windowsize <= 64:
            raise UsageError(f"tftp_window={self.windowsize} is outside 1..64")
        if not 0 <= self.listen_port <= 65535:
            raise UsageError(f"tftp listen port {self.listen_port} is out of range")

    @property
    def bind_host(self) -> str:
        return self.listen_host or self.serverip

    @classmethod
    def from_address(cls, address: DeviceAddress) -> NetConfig | None:
        """``?serverip=HOST_IP[&ipaddr=DEVICE_IP][&tftp_listen=BIND:PORT][&tftp_blksize=N]
        [&tftp_window=N]``; None without ``serverip``."""
        serverip = address.param("serverip")
        if not serverip:
            for key in ("ipaddr", "tftp_listen", "tftp_blksize", "tftp_window"):
                if address.param(key) is not None:
                    raise UsageError(
                        f"{address.uri}: {key}= needs serverip= (this host's address as the "
                        "device reaches it)"
                    )
            return None
        host, port = "", TFTP_PORT
        listen = address.param("tftp_listen")
        if listen:
            host, sep, port_text = listen.rpartition(":")
            if not sep or not port_text.isdigit():
                raise UsageError(f"{address.uri}: tftp_listen={listen!r}: give HOST:PORT")
            port = int(port_text)
        return cls(
            serverip=serverip,
            ipaddr=address.param("ipaddr") or None,
            listen_host=host,
            listen_port=port,
            blksize=address.int_param("tftp_blksize", UBOOT_MAX_BLKSIZE),
            windowsize=address.int_param("tftp_window", DEFAULT_WINDOWSIZE),
        )

    def env(self, server_port: int) -> list[tuple[str, str]]:
        """The ``setenv`` pairs for a session whose server listens on ``server_port``."""
        pairs = [("serverip", self.serverip)]
        if self.ipaddr:
            pairs.append(("ipaddr", self.ipaddr))
        pairs += [
            ("tftpblocksize", str(self.blksize)),
            ("tftpwindowsize", str(self.windowsize)),
            # U-Boot's shortest timeout; many U-Boot versions count timeouts per transfer
            # (not per block), so the count allows for a lossy link: a dead one fails in 20 s.
            ("tftptimeout", "1000"),
            ("tftptimeoutcountmax", "20"),
            ("netretry", "no"),
            ("autoload", "no"),
        ]
        if server_port != TFTP_PORT:
            pairs.append(("tftpdstp", str(server_port)))
        return pairs


class NetworkError(TransportError):
    """U-Boot's network gave up (timeouts, no link, no server): trying again the same way
    takes as long and fails the same way."""

    default_hint = "check the network cable, serverip/ipaddr and that port 69 is not firewalled"


def parse_tftp_transfer(text: str) -> int:
    """Bytes a ``tftpboot``/``tftpput`` moved (``Bytes transferred = N (hex)``); the device's
    error line otherwise."""
    error = _NET_ERRORS.search(text)
    done = _TRANSFERRED.search(text)
    if done is not None and error is None:
        count = int(done.group(1))
        if count != int(done.group(2), 16):
            raise UBootParseError(f"garbled transfer count {done.group(0)!r}")
        return count
    if error is not None:
        raise NetworkError(f"U-Boot: {error.group(0).strip()}")
    raise UBootParseError("no 'Bytes transferred' line after the TFTP transfer")


class SessionServer:
    """A TFTP server for one driver session, serving (and receiving) files in a private
    directory that is removed on :meth:`close`."""

    def __init__(self, config: NetConfig) -> None:
        self.config = config
        self._root: Path | None = None
        self._server: TftpServer | None = None
        self._names = itertools.count(1)

    @property
    def port(self) -> int:
        return self.start()

    def start(self) -> int:
        """Start the server (once); returns its port."""
        if self._server is None:
            root = Path(tempfile.mkdtemp(prefix="unbrick-tftp-"))
            server = TftpServer(
                root,
                host=self.config.bind_host,
                port=self.config.listen_port,
                allow_write=True,
                blksize_max=self.config.blksize,
                windowsize_max=self.config.windowsize,
                dally_s=1.0,
            )
            try:
                server.start()
            except BaseException:
                shutil.rmtree(root, ignore_errors=True)
                raise
            self._root, self._server = root, server
        assert self._server is not None
        return self._server.address[1]

    def _dir(self) -> Path:
        self.start()
        assert self._root is not None
        return self._root

    def offer(self, data: bytes) -> str:
        """Put ``data`` where the device can pull it; returns the file name to ask for."""
        name = f"ubk-{os.getpid()}-{next(self._names)}.bin"
        (self._dir() / name).write_bytes(data)
        return name

    def upload_name(self) -> str:
        return f"ubk-{os.getpid()}-{next(self._names)}.up"

    def take(self, name: str, timeout_s: float) -> bytes:
        """The file the device uploaded as ``name`` (removed from the directory)."""
        assert self._server is not None
        record = self._server.wait_for_transfer(name, timeout_s=timeout_s, direction="write")
        if not record.ok:
            raise TransportError(f"the upload of {name!r} failed: {record.error}")
        path = self._dir() / name
        try:
            return path.read_bytes()
        finally:
            with contextlib.suppress(OSError):
                path.unlink()

    def withdraw(self, name: str) -> None:
        with contextlib.suppress(OSError):
            (self._dir() / name).unlink()

    def close(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)
            self._root = None


__all__ = [
    "DEFAULT_WINDOWSIZE",
    "UBOOT_MAX_BLKSIZE",
    "NetConfig",
    "NetworkError",
    "SessionServer",
    "parse_tftp_transfer",
]
