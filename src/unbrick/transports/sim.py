"""Driver of simulated devices (``sim://NAME``): the sim protocol over TCP.

``sim://NAME`` is resolved through a registry directory where each running simulator keeps
``NAME.json`` (``{"host", "port", "spi_port", "pid", "kind"}``, and ``"console_port"`` of the
serial console face and ``"tftp_port"`` of the TFTP recovery face, a UDP port, when the
simulator has them). The directory is ``?dir=`` in
the URI, else the ``registry_dir`` given to :func:`open_sim`, else :func:`default_registry_dir`.
``sim://NAME?via=spi`` opens the SPI face (a clip-on programmer on the flash chip: chip id,
read, erase, program; no reboot).

Every transfer is addressed, so a chunk retried after a corrupt frame or a dropped link is
harmless: each read/program/erase/hash is retried once (after reconnecting), then the error
is raised as a TransportError. A refused connection, or one the device closes without
answering, means the device does not answer: it is off or hard-bricked.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unbrick.errors import DeviceError, TransportError, UsageError
from unbrick.model.identity import DeviceIdentity, StorageInfo
from unbrick.model.uri import DeviceAddress
from unbrick.transports.base import BootReport, BootState, Capability
from unbrick.transports.simproto import (
    PROTOCOL_VERSION,
    FrameDecoder,
    ProtocolError,
    Request,
    Response,
    decode_response,
    encode_request,
)

log = logging.getLogger(__name__)

DEFAULT_MAX_TRANSFER = 256 * 1024
#: Boot logs longer than this keep their end.
MAX_BOOT_LOG_CHARS = 64 * 1024
NO_ANSWER = "device does not answer (powered off or hard-bricked?)"
NO_ANSWER_HINT = "check its power; a hard-bricked device needs its SPI face (sim://NAME?via=spi)"
_POLL_S = 0.02
_RECV_BYTES = 256 * 1024


@dataclass(frozen=True)
class RegistryEntry:
    """What a running simulator publishes in ``DIR/NAME.json``."""

    name: str
    host: str
    port: int
    spi_port: int
    pid: int
    kind: str
    #: The U-Boot-like serial console (``uboot+tcp://HOST:PORT``); None in older registries.
    console_port: int | None = None
    #: The bootloader's TFTP recovery server (UDP); None in older registries.
    tftp_port: int | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "host": self.host,
            "port": self.port,
            "spi_port": self.spi_port,
            "pid": self.pid,
            "kind": self.kind,
        }
        if self.console_port is not None:
            d["console_port"] = self.console_port
        if self.tftp_port is not None:
            d["tftp_port"] = self.tftp_port
        return d


def default_registry_dir(environ: Mapping[str, str], home: Path) -> Path:
    """``$UNBRICK_SIM_DIR``, else ``~/.local/state/unbrick/sim``."""
    value = environ.get("UNBRICK_SIM_DIR")
    if value:
        return Path(value)
    return home / ".local" / "state" / "unbrick" / "sim"


def registry_path(registry_dir: Path, name: str) -> Path:
    if not name or "/" in name or name.startswith("."):
        raise UsageError(f"sim device name {name!r} is not allowed")
    return registry_dir / f"{name}.json"


def read_registry(registry_dir: Path, name: str) -> RegistryEntry:
    path = registry_path(registry_dir, name)
    hint = f"start it with 'unbrick sim KIND --name {name} --registry {registry_dir}'"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise TransportError(f"no simulator named {name!r} in {registry_dir}", hint=hint) from e
    except OSError as e:
        raise TransportError(f"cannot read {path}: {e.strerror}", hint=hint) from e
    try:
        d = json.loads(text)
        return RegistryEntry(
            name=name,
            host=str(d["host"]),
            port=int(d["port"]),
            spi_port=int(d["spi_port"]),
            pid=int(d["pid"]),
            kind=str(d["kind"]),
            console_port=int(d["console_port"]) if d.get("console_port") is not None else None,
            tftp_port=int(d["tftp_port"]) if d.get("tftp_port") is not None else None,
        )
    except (ValueError, KeyError, TypeError) as e:
        raise TransportError(f"registry file {path} is damaged: {e}", hint=hint) from e


def write_registry(registry_dir: Path, entry: RegistryEntry) -> Path:
    """Publish ``entry`` atomically; returns the file's path."""
    path = registry_path(registry_dir, entry.name)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        registry_dir.mkdir(parents=True, exist_ok=True)
        with tmp.open("w", encoding="utf-8") as f:
            json.dump(entry.to_dict(), f)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise TransportError(f"cannot write registry file {path}: {e.strerror}") from e
    return path


class _Link:
    """One TCP connection speaking the sim protocol, one request at a time."""

    def __init__(self, host: str, port: int, timeout_s: float) -> None:
        try:
            self.sock = socket.create_connection((host, port), timeout=timeout_s)
        except OSError as e:
            raise TransportError(NO_ANSWER, hint=NO_ANSWER_HINT) from e
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.decoder = FrameDecoder()
        self.next_id = 1

    def exchange(self, op: str, args: dict[str, Any], payload: bytes = b"") -> Response:
        rid = self.next_id
        self.next_id += 1
        data = encode_request(Request(op, rid, args, payload))
        try:
            self.sock.sendall(data)
            while True:
                chunk = self.sock.recv(_RECV_BYTES)
                if not chunk:
                    raise TransportError(f"connection closed during {op}")
                frames = self.decoder.feed(chunk)
                if not frames:
                    continue
                resp = decode_response(frames[0])
                if resp.id != rid:
                    raise ProtocolError(f"answer to request {resp.id} while waiting for {rid}")
                return resp
        except TimeoutError as e:
            raise TransportError(f"no answer to {op} in time") from e
        except OSError as e:
            raise TransportError(f"link failed during {op}: {e.strerror or e}") from e

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


class SimDriver:
    """A simulated device opened through its generic face or its SPI face.

    Implements Identify, FlashRead, FlashErase, FlashWrite, DeviceHash, Reboot and (A/B kinds
    only) BootControl; the SPI face offers Identify, FlashRead, FlashErase and FlashWrite.
    """

    def __init__(
        self,
        address: DeviceAddress,
        *,
        host: str,
        port: int,
        face: str = "generic",
        timeout_s: float = 10.0,
        connect_wait_s: float = 1.0,
        max_transfer: int = DEFAULT_MAX_TRANSFER,
    ) -> None:
        if face not in ("generic", "spi"):
            raise UsageError(f"{address.uri}: unknown face {face!r}", hint="use via=spi or none")
        self.address = address
        self.host = host
        self.port = port
        self.face = face
        self.timeout_s = timeout_s
        self.connect_wait_s = connect_wait_s
        self._link: _Link | None = None
        self.hello: dict[str, Any] = {}
        self._connect(connect_wait_s)
        self.kind = str(self.hello.get("kind", ""))
        offered = self.hello.get("max_transfer", max_transfer)
        if not isinstance(offered, int) or offered < 1:
            raise TransportError(f"{address.uri}: the device offers a bad max_transfer {offered!r}")
        self.max_transfer = min(max_transfer, offered)
        caps = {Capability.IDENTIFY, Capability.READ, Capability.ERASE, Capability.WRITE}
        if face == "generic":
            caps |= {Capability.DEVICE_HASH, Capability.REBOOT}
            if self.hello.get("ab"):
                caps.add(Capability.BOOT_CONTROL)
        self.capabilities: frozenset[Capability] = frozenset(caps)

    # -- link -----------------------------------------------------------------------------

    def _open_link(self) -> _Link:
        link = _Link(self.host, self.port, self.timeout_s)
        try:
            resp = link.exchange("hello", {"version": PROTOCOL_VERSION})
        except TransportError:
            link.close()
            raise
        if not resp.ok:
            link.close()
            raise DeviceError(resp.error or "hello refused", hint=resp.hint)
        self.hello = resp.fields
        return link

    def _connect(self, wait_s: float) -> None:
        """(Re)connect, polling for up to ``wait_s`` while the device does not answer."""
        self._drop()
        deadline = time.monotonic() + wait_s
        while True:
            try:
                self._link = self._open_link()
                return
            except TransportError as e:
                if time.monotonic() >= deadline:
                    raise TransportError(NO_ANSWER, hint=NO_ANSWER_HINT) from e
            time.sleep(_POLL_S)

    def _ensure_link(self) -> _Link:
        if self._link is None:
            self._connect(self.connect_wait_s)
        if self._link is None:
            raise TransportError(NO_ANSWER, hint=NO_ANSWER_HINT)
        return self._link

    def _drop(self) -> None:
        if self._link is not None:
            self._link.close()
            self._link = None

    def close(self) -> None:
        self._drop()

    def __enter__(self) -> SimDriver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(
        self, op: str, args: dict[str, Any] | None = None, payload: bytes = b"", *, retry: bool
    ) -> Response:
        """One request; with ``retry``, once more after a link failure. Device refusals raise
        DeviceError (not retried)."""
        args = args or {}
        attempts = 2 if retry else 1
        last: TransportError | None = None
        for attempt in range(attempts):
            try:
                resp = self._ensure_link().exchange(op, args, payload)
            except TransportError as e:
                last = e
                log.info("sim %s: %s failed (attempt %d): %s", self.address, op, attempt + 1, e)
                self._drop()
                continue
            if not resp.ok:
                raise DeviceError(resp.error or f"{op} refused", hint=resp.hint)
            return resp
        if last is None or last.message == NO_ANSWER:
            raise TransportError(NO_ANSWER, hint=NO_ANSWER_HINT) from last
        raise TransportError(
            f"{op} failed {attempts} times: {last.message}",
            hint="check the link (cable, USB hub) and retry; transfers are addressed and safe",
        ) from last

    def _require(self, cap: Capability) -> None:
        if cap not in self.capabilities:
            raise UsageError(f"{self.address.uri} does not offer {cap.value}")

    # -- capabilities ---------------------------------------------------------------------

    def identify(self) -> DeviceIdentity:
        if self.face == "spi":
            f = self._call("chip", retry=True).fields
            try:
                st = f["storage"]
                storage = StorageInfo(
                    type=str(st["type"]),
                    size_bytes=int(st["size_bytes"]),
                    erase_block_bytes=int(st["erase_block_bytes"]),
                    page_bytes=int(st.get("page_bytes", 1)),
                )
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                raise TransportError(f"chip answer is malformed: {e!r}") from e
            return DeviceIdentity(
                model=str(f.get("chip", "")),
                serial=str(f.get("unique_id", "")),
                storage=storage,
                extra={"face": "spi", "jedec_id": str(f.get("jedec_id", "")), "kind": self.kind},
            )
        fields = self._call("identify", retry=True).fields
        try:
            return DeviceIdentity.from_dict(fields["identity"])
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise TransportError(f"identify answer is malformed: {e!r}") from e

    def read(self, offset: int, length: int) -> bytes:
        out = bytearray()
        pos, end = offset, offset + length
        while pos < end:
            n = min(self.max_transfer, end - pos)
            data = self._call("read", {"offset": pos, "length": n}, retry=True).payload
            if len(data) != n:
                raise TransportError(f"read at 0x{pos:x} returned {len(data)} of {n} bytes")
            out += data
            pos += n
        return bytes(out)

    def erase(self, offset: int, length: int) -> None:
        self._call("erase", {"offset": offset, "length": length}, retry=True)

    def program(self, offset: int, data: bytes) -> None:
        view = memoryview(data)
        for pos in range(0, len(data), self.max_transfer):
            chunk = bytes(view[pos : pos + self.max_transfer])
            self._call("program", {"offset": offset + pos}, chunk, retry=True)

    def device_hash(self, offset: int, length: int, algorithm: str = "sha256") -> str:
        self._require(Capability.DEVICE_HASH)
        args = {"offset": offset, "length": length, "algorithm": algorithm}
        digest = self._call("hash", args, retry=True).fields.get("digest")
        if not isinstance(digest, str):
            raise TransportError("hash answer has no digest")
        return digest

    def state(self) -> dict[str, Any]:
        """The device's state: ``state``, ``boot_id``, ``firmware_version``, ``booted_slot``."""
        self._require(Capability.REBOOT)
        return self._call("state", retry=True).fields

    def _wait_boot(self, previous_boot_id: int | None, deadline: float) -> dict[str, Any] | None:
        """Poll until the device answers after a boot newer than ``previous_boot_id``."""
        while time.monotonic() < deadline:
            try:
                link = self._open_link()
            except (TransportError, DeviceError):
                time.sleep(_POLL_S)
                continue
            boot_id = self.hello.get("boot_id")
            state = self.hello.get("state")
            if state in ("firmware", "bootloader") and boot_id != previous_boot_id:
                self._link = link
                return self.hello
            link.close()
            time.sleep(_POLL_S)
        return None

    def reboot(self, timeout_s: float) -> BootReport:
        self._require(Capability.REBOOT)
        deadline = time.monotonic() + timeout_s
        before = self._call("state", retry=True).fields.get("boot_id")
        try:
            self._call("reboot", retry=False)
        except TransportError as e:
            # The reset may have dropped the link before the answer came back.
            log.info("sim %s: reboot answer lost (%s); waiting for the boot", self.address, e)
        self._drop()
        hello = self._wait_boot(before, deadline)
        if hello is None:
            return BootReport(log="", state="dead")
        resp = self._call("bootlog", retry=True)
        text = resp.payload.decode("utf-8", "replace")[-MAX_BOOT_LOG_CHARS:]
        fields = resp.fields
        return BootReport(
            log=text,
            state=str(fields.get("state", hello.get("state"))),
            firmware_version=_opt_str(fields.get("firmware_version")),
            booted_slot=_opt_str(fields.get("booted_slot")),
        )

    def enter_recovery(self, timeout_s: float) -> None:
        self._require(Capability.REBOOT)
        deadline = time.monotonic() + timeout_s
        before = self._call("state", retry=True).fields.get("boot_id")
        try:
            resp = self._call("enter_recovery", retry=False)
            if not resp.fields.get("reset"):
                return
        except TransportError as e:
            log.info("sim %s: enter_recovery answer lost (%s)", self.address, e)
        self._drop()
        hello = self._wait_boot(before, deadline)
        if hello is None:
            raise TransportError(f"{NO_ANSWER} after the reset into recovery", hint=NO_ANSWER_HINT)
        if hello.get("state") != "bootloader":
            raise DeviceError(
                f"device booted into {hello.get('state')} instead of its bootloader",
                hint="retry; hold the recovery button while powering on",
            )

    def boot_state(self) -> BootState:
        self._require(Capability.BOOT_CONTROL)
        f = self._call("boot_state", retry=True).fields
        try:
            return BootState(
                active_slot=str(f["active_slot"]),
                trial_slot=_opt_str(f.get("trial_slot")),
                bootcount=int(f.get("bootcount", 0)),
                bootlimit=int(f.get("bootlimit", 3)),
                extra={str(k): str(v) for k, v in (f.get("extra") or {}).items()},
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise TransportError(f"boot_state answer is malformed: {e}") from e

    def set_trial(self, slot: str) -> None:
        self._require(Capability.BOOT_CONTROL)
        self._call("set_trial", {"slot": slot}, retry=True)

    def commit(self, slot: str) -> None:
        self._require(Capability.BOOT_CONTROL)
        self._call("commit", {"slot": slot}, retry=True)


def _opt_str(value: object) -> str | None:
    return None if value is None else str(value)


def open_sim(
    address: DeviceAddress,
    *,
    registry_dir: Path | None = None,
    timeout_s: float = 10.0,
    connect_wait_s: float = 1.0,
) -> SimDriver:
    """Open ``sim://NAME[?via=spi][&dir=DIR]``.

    The registry directory is ``?dir=`` if given, else ``registry_dir``, else
    :func:`default_registry_dir` of this process's environment.
    """
    if address.scheme != "sim" or not address.name:
        raise UsageError(f"{address.uri} is not a sim:// address", hint="use sim://NAME")
    via = address.param("via")
    if via not in (None, "", "spi"):
        raise UsageError(f"{address.uri}: unknown via={via!r}", hint="use via=spi or leave it out")
    dir_param = address.param("dir")
    if dir_param:
        directory = Path(dir_param)
    elif registry_dir is not None:
        directory = registry_dir
    else:
        directory = default_registry_dir(os.environ, Path.home())
    entry = read_registry(directory, address.name)
    face = "spi" if via == "spi" else "generic"
    return SimDriver(
        address,
        host=entry.host,
        port=entry.spi_port if face == "spi" else entry.port,
        face=face,
        timeout_s=timeout_s,
        connect_wait_s=connect_wait_s,
    )
