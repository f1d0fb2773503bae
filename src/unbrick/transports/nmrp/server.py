"""The host side of NMRP: advertise, configure the router, push the firmware, see it through.

:func:`flash_nmrp` runs one recovery on an Ethernet interface directly connected to a NETGEAR
router that is powering on (its bootloader listens for NMRP for a few seconds after power-on,
and indefinitely when its firmware is damaged):

1. ``advertise``: broadcast ADVERTISE with the magic ``NTGR`` until the router answers with
   CONF_REQ (``advertise_s`` at most).
2. ``configure``: answer CONF_ACK with the router's address and netmask (and FW_UP, and the
   region when asked), then wait for TFTP_UL_REQ (``request_s``).
3. ``upload``: push the image with TFTP to the router's TFTP server (the router is the
   server, we are the client), using the file name the router asked for when it gave one.
4. ``flash``: the router writes its flash, sending KEEP_ALIVE_REQ now and then; each is
   answered with KEEP_ALIVE_ACK and restarts the ``flash_s`` timer. The router ends with
   CLOSE_REQ, answered with CLOSE_ACK.

Like nmrpflash, the host gives its interface an address in the router's subnet (default
10.164.183.253/24, the router gets .252) and a permanent neighbour entry for the router, so
the TFTP upload does not depend on the bootloader answering ARP; both are removed afterwards
(an address the interface already had is left alone).

When anything fails before the router starts writing, the server sends CLOSE_REQ so that the
router stops waiting (best effort); once the router writes, the server never interrupts it.
Every failure names its step. Raw Ethernet needs root (CAP_NET_RAW); so does changing the
interface's addresses.

The protocol decisions live in :func:`transition` (pure); :class:`RawLink` is the AF_PACKET
socket, shared with the simulated router (``unbrick.sim.nmrp_client``).
"""

from __future__ import annotations

import enum
import errno
import logging
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from unbrick.errors import (
    DeviceError,
    SourceError,
    ToolError,
    TransportError,
    UsageError,
)
from unbrick.tools import Tool
from unbrick.transports.nmrp import codec
from unbrick.transports.nmrp.codec import Code, Frame, Message, NmrpProtocolError

log = logging.getLogger(__name__)

DEFAULT_ROUTER_IP = "10.164.183.252"
DEFAULT_HOST_IP = "10.164.183.253"
DEFAULT_NETMASK = "255.255.255.0"
#: nmrpflash's block size: an Ethernet MTU minus IP, UDP and TFTP headers, rounded down.
DEFAULT_BLKSIZE = 1456
TFTP_PORT = 69
_PACKET_OUTGOING = 4
IP_TOOL = Tool("ip", "iproute2")


# -- the raw link ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Received:
    frame: Frame
    at: float


class RawLink:
    """An AF_PACKET socket for NMRP frames on one interface (Linux, root or CAP_NET_RAW).

    Frames that cannot be decoded are skipped (logged); frames this host sent are never
    returned.
    """

    def __init__(self, interface: str) -> None:
        self.interface = interface
        try:
            sock = socket.socket(
                socket.AF_PACKET, socket.SOCK_RAW, socket.htons(codec.ETHERTYPE_NMRP)
            )
        except PermissionError as e:
            raise TransportError(
                "raw Ethernet frames (NMRP) need root: opening a packet socket was refused",
                hint="run unbrick as root (or give it CAP_NET_RAW and CAP_NET_ADMIN)",
            ) from e
        except (AttributeError, OSError) as e:
            raise TransportError(
                f"cannot open a raw Ethernet socket: {e}", hint="NMRP needs Linux packet sockets"
            ) from e
        try:
            sock.bind((interface, codec.ETHERTYPE_NMRP))
            self.mac: bytes = sock.getsockname()[4]
        except OSError as e:
            sock.close()
            if e.errno in (errno.ENODEV, errno.ENXIO):
                raise TransportError(
                    f"network interface {interface!r} does not exist",
                    hint="list interfaces with 'ip link' and pass the one cabled to the router",
                ) from e
            raise TransportError(f"cannot bind to interface {interface!r}: {e.strerror}") from e
        if len(self.mac) != codec.MAC_BYTES:
            sock.close()
            raise TransportError(f"interface {interface!r} is not an Ethernet interface")
        self._sock = sock

    def send(self, dst: bytes, message: Message) -> None:
        data = Frame(dst=dst, src=self.mac, message=message).encode()
        try:
            self._sock.send(data)
        except OSError as e:
            if e.errno == errno.ENETDOWN:
                raise TransportError(
                    f"interface {self.interface} is down",
                    hint=f"bring it up: ip link set {self.interface} up",
                ) from e
            raise TransportError(f"cannot send on {self.interface}: {e.strerror}") from e
        log.debug("nmrp %s -> %s: %s", self.interface, codec.format_mac(dst), message.name)

    def recv(self, timeout_s: float) -> Frame | None:
        """The next frame addressed to this host (or broadcast) within ``timeout_s``."""
        deadline = time.monotonic() + max(0.0, timeout_s)
        while True:
            left = deadline - time.monotonic()
            self._sock.settimeout(max(0.0, left))
            try:
                data, addr = self._sock.recvfrom(codec.MAX_FRAME_BYTES + 64)
            except (TimeoutError, BlockingIOError):
                return None
            except OSError as e:
                raise TransportError(f"cannot receive on {self.interface}: {e.strerror}") from e
            if addr[2] == _PACKET_OUTGOING:
                continue
            try:
                frame = codec.decode_frame(data)
            except NmrpProtocolError as e:
                log.info("nmrp %s: ignoring a malformed frame: %s", self.interface, e.message)
                continue
            if frame.dst not in (self.mac, codec.BROADCAST_MAC):
                continue
            log.debug(
                "nmrp %s <- %s: %s",
                self.interface,
                codec.format_mac(frame.src),
                frame.message.name,
            )
            return frame

    def fileno(self) -> int:
        """The socket's descriptor, for select()."""
        return self._sock.fileno()

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> RawLink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- configuration and results -------------------------------------------------------------


@dataclass(frozen=True)
class NmrpTimeouts:
    """How long each step may take. Keep-alives restart the ``flash_s`` timer."""

    advertise_s: float = 60.0
    #: Time between two ADVERTISE broadcasts.
    advertise_interval_s: float = 0.25
    #: From CONF_ACK to the router's TFTP_UL_REQ.
    request_s: float = 10.0
    #: Without a keep-alive or close from the router after the upload (nmrpflash: 5 min).
    flash_s: float = 300.0
    #: Waiting for CLOSE_ACK after our own CLOSE_REQ (when giving up).
    close_s: float = 1.0
    #: Per TFTP packet, and how often one is resent before the upload fails.
    tftp_timeout_s: float = 1.0
    tftp_retries: int = 5

    def __post_init__(self) -> None:
        for name in ("advertise_s", "advertise_interval_s", "request_s", "flash_s"):
            if getattr(self, name) <= 0:
                raise UsageError(f"NMRP timeout {name} must be positive")
        if self.tftp_timeout_s <= 0 or self.tftp_retries < 0 or self.close_s < 0:
            raise UsageError("NMRP TFTP timeout must be positive, retries and close_s >= 0")


@dataclass(frozen=True)
class NmrpConfig:
    """One NMRP recovery: where, what, and what the router is told."""

    interface: str
    image: Path
    router_ip: str = DEFAULT_ROUTER_IP
    host_ip: str = DEFAULT_HOST_IP
    netmask: str = DEFAULT_NETMASK
    #: Region to set (``NA``, ``WW``, ``GR``...), sent as DEV_REGION in CONF_ACK.
    region: str | None = None
    #: TFTP file name; by default the router's FILE_NAME, else the image's file name.
    remote_name: str | None = None
    #: Talk only to this router (``xx:xx:xx:xx:xx:xx``); by default the first that answers.
    router_mac: str | None = None
    tftp_port: int = TFTP_PORT
    blksize: int = DEFAULT_BLKSIZE
    windowsize: int = 1
    #: Add ``host_ip`` to the interface and a neighbour entry for the router (then undo).
    configure_host: bool = True
    #: Uploads in one session: a router that rejects an image asks for it again.
    max_uploads: int = 2
    timeouts: NmrpTimeouts = field(default_factory=NmrpTimeouts)

    def check(self) -> None:
        """Raise UsageError for values that cannot work."""
        try:
            prefix = codec.netmask_prefix(self.netmask)
            router = codec.parse_ipv4(self.router_ip)
            host = codec.parse_ipv4(self.host_ip)
            if self.region is not None:
                codec.region_code(self.region)
            if self.router_mac is not None:
                codec.parse_mac(self.router_mac)
        except NmrpProtocolError as e:
            raise _usage(e.message, e.hint) from e
        mask = (0xFFFFFFFF << (32 - prefix)) & 0xFFFFFFFF
        if int(router) & mask != int(host) & mask or router == host:
            raise _usage(
                f"router address {self.router_ip} and host address {self.host_ip} must differ"
                f" and share the subnet {self.netmask}",
                "choose two free addresses of one subnet (--ip, --host-ip, --netmask)",
            )
        if not 0 < self.tftp_port <= 0xFFFF or not 8 <= self.blksize <= 65464:
            raise _usage("TFTP port or block size out of range", None)
        if not 1 <= self.windowsize <= 64 or self.max_uploads < 1:
            raise _usage("windowsize must be 1..64 and max_uploads at least 1", None)


def _usage(message: str, hint: str | None) -> UsageError:
    return UsageError(message, hint=hint)


@dataclass(frozen=True)
class NmrpEvent:
    """Something the session did, for a front end to show (``step``: the Step's value)."""

    step: str
    message: str
    data: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class NmrpResult:
    router_mac: str
    router_ip: str
    netmask: str
    remote_name: str
    size_bytes: int
    uploads: int
    keepalives: int
    upload_s: float
    total_s: float


class Uploader(Protocol):
    """The TFTP client call (``unbrick.transports.tftp.client.tftp_put`` has this shape)."""

    def __call__(
        self,
        host: str,
        port: int,
        remote: str,
        local: Path,
        /,
        *,
        blksize: int,
        windowsize: int,
        timeout_s: float,
        retries: int,
    ) -> object: ...


# -- the protocol, as one pure transition function ---------------------------------------------


class Step(enum.Enum):
    ADVERTISE = "advertise"
    CONFIGURE = "configure"
    UPLOAD = "upload"
    FLASH = "flash"
    DONE = "done"


class Action(enum.Enum):
    NONE = "none"
    UPLOAD = "upload"
    DONE = "done"
    FAIL = "fail"


@dataclass(frozen=True)
class Decision:
    """What to do with one received message: reply (a code), next step, and an action."""

    step: Step
    reply: Code | None = None
    action: Action = Action.NONE
    note: str = ""


def transition(step: Step, code: int) -> Decision:
    """The server's answer to message ``code`` from the router while in ``step``."""
    if code == Code.KEEP_ALIVE_REQ and step in (Step.CONFIGURE, Step.FLASH):
        return Decision(step, Code.KEEP_ALIVE_ACK)
    if step is Step.ADVERTISE:
        if code == Code.CONF_REQ:
            return Decision(Step.CONFIGURE, Code.CONF_ACK)
        return Decision(step, note="not a configuration request")
    if step is Step.CONFIGURE:
        if code == Code.CONF_REQ:
            return Decision(step, Code.CONF_ACK, note="repeated configuration request")
        if code == Code.TFTP_UL_REQ:
            return Decision(Step.UPLOAD, action=Action.UPLOAD)
        if code == Code.CLOSE_REQ:
            return Decision(
                Step.DONE,
                Code.CLOSE_ACK,
                Action.FAIL,
                "the router closed the session before asking for the firmware",
            )
        return Decision(step, note="unexpected while waiting for the upload request")
    if step is Step.FLASH:
        if code == Code.CLOSE_REQ:
            return Decision(Step.DONE, Code.CLOSE_ACK, Action.DONE)
        if code == Code.TFTP_UL_REQ:
            return Decision(
                Step.UPLOAD, action=Action.UPLOAD, note="the router asked for the firmware again"
            )
        if code == Code.CONF_REQ:
            return Decision(Step.CONFIGURE, Code.CONF_ACK, note="the router restarted the session")
        return Decision(step, note="unexpected while the router writes")
    return Decision(step, note=f"ignored in step {step.value}")


# -- the session -----------------------------------------------------------------------------


class NmrpServer:
    """One recovery session; use :func:`flash_nmrp` unless you need to inject the link."""

    def __init__(
        self,
        config: NmrpConfig,
        *,
        link: RawLink | None = None,
        uploader: Uploader | None = None,
        on_event: Callable[[NmrpEvent], None] | None = None,
        ip_tool: Tool = IP_TOOL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        config.check()
        self.config = config
        self._link = link
        self._uploader = uploader
        self._on_event = on_event
        self._ip = ip_tool
        self._clock = clock
        self.step = Step.ADVERTISE
        self._undo: list[list[str]] = []

    # -- helpers --------------------------------------------------------------------------

    def _event(self, message: str, **data: Any) -> None:
        log.info("nmrp %s: %s", self.step.value, message)
        if self._on_event is not None:
            self._on_event(NmrpEvent(self.step.value, message, data))

    def _timeout(self, what: str, seconds: float, hint: str) -> TransportError:
        return TransportError(
            f"NMRP step '{self.step.value}' timed out on {self.config.interface}: "
            f"{what} within {seconds:g} s",
            hint=hint,
        )

    def _configure_host(self, router_mac: bytes | None) -> None:
        """Address on the interface (first call) and the router's neighbour entry."""
        cfg = self.config
        if not cfg.configure_host:
            return
        iface = cfg.interface
        prefix = codec.netmask_prefix(cfg.netmask)
        try:
            if router_mac is None:
                shown = self._ip.run(["-4", "-o", "addr", "show", "dev", iface], timeout_s=10)
                if f" {cfg.host_ip}/" in shown.out:
                    return
                self._ip.run(["addr", "add", f"{cfg.host_ip}/{prefix}", "dev", iface])
                self._undo.append(["addr", "del", f"{cfg.host_ip}/{prefix}", "dev", iface])
                self._event(f"added {cfg.host_ip}/{prefix} to {iface}")
                return
            mac = codec.format_mac(router_mac)
            self._ip.run(
                ["neigh", "replace", cfg.router_ip, "lladdr", mac, "dev", iface, "nud", "permanent"]
            )
            self._undo.append(["neigh", "del", cfg.router_ip, "dev", iface])
        except ToolError as e:
            raise TransportError(
                f"cannot configure {iface} for the TFTP upload: {e.message}",
                hint="run as root, or set the address yourself and pass --no-configure-host",
            ) from e

    def _restore_host(self) -> None:
        while self._undo:
            args = self._undo.pop()
            try:
                self._ip.run(args, timeout_s=10)
            except ToolError as e:
                log.warning("nmrp: could not undo 'ip %s': %s", " ".join(args), e.message)

    def _upload(self, remote: str) -> float:
        cfg = self.config
        uploader = self._uploader or _default_uploader()
        started = self._clock()
        self._event(
            f"uploading {cfg.image.name} to {cfg.router_ip} as {remote!r}",
            remote=remote,
            size_bytes=cfg.image.stat().st_size,
        )
        try:
            uploader(
                cfg.router_ip,
                cfg.tftp_port,
                remote,
                cfg.image,
                blksize=cfg.blksize,
                windowsize=cfg.windowsize,
                timeout_s=cfg.timeouts.tftp_timeout_s,
                retries=cfg.timeouts.tftp_retries,
            )
        except SourceError as e:
            raise SourceError(f"NMRP step 'upload' failed: {e.message}", hint=e.hint) from e
        except (DeviceError, ToolError) as e:
            raise TransportError(
                f"NMRP step 'upload' failed: {e.message}",
                hint=e.hint or "power-cycle the router and start again",
            ) from e
        return self._clock() - started

    def _drain(self, link: RawLink) -> list[Frame]:
        """Frames queued during the upload, less the requests the router repeated meanwhile
        (some bootloaders resend CONF_REQ and TFTP_UL_REQ until the upload starts)."""
        kept: list[Frame] = []
        while (frame := link.recv(0.0)) is not None:
            if frame.message.code in (Code.CONF_REQ, Code.TFTP_UL_REQ):
                log.debug("nmrp: dropping stale %s", frame.message.name)
            else:
                kept.append(frame)
        return kept

    def _close(self, link: RawLink, peer: bytes) -> None:
        """Best effort: tell the router to stop waiting, and wait briefly for its CLOSE_ACK."""
        try:
            link.send(peer, codec.simple(Code.CLOSE_REQ))
            deadline = self._clock() + self.config.timeouts.close_s
            while (left := deadline - self._clock()) > 0:
                frame = link.recv(left)
                if frame is not None and frame.message.code == Code.CLOSE_ACK:
                    return
        except TransportError as e:
            log.info("nmrp: close after a failure did not go through: %s", e.message)

    # -- the run --------------------------------------------------------------------------

    def run(self) -> NmrpResult:
        cfg = self.config
        try:
            size = cfg.image.stat().st_size
        except OSError as e:
            raise SourceError(f"cannot read image {cfg.image}: {e.strerror}") from e
        if size == 0:
            raise UsageError(f"image {cfg.image} is empty", hint="pass the firmware file")
        link = self._link or RawLink(cfg.interface)
        try:
            self._configure_host(None)
            return self._session(link, size)
        finally:
            self._restore_host()
            if self._link is None:
                link.close()

    def _session(self, link: RawLink, size: int) -> NmrpResult:
        cfg = self.config
        tmo = cfg.timeouts
        began = self._clock()
        peer = self._advertise(link)
        self._configure_host(peer)
        region = codec.region_code(cfg.region) if cfg.region else None
        conf = codec.conf_ack(cfg.router_ip, cfg.netmask, region=region)
        link.send(peer, conf)
        self._event(
            f"router {codec.format_mac(peer)} asked for its configuration: sent "
            f"{cfg.router_ip}/{codec.netmask_prefix(cfg.netmask)}",
            router_mac=codec.format_mac(peer),
        )
        uploads = keepalives = 0
        upload_s = 0.0
        remote = cfg.remote_name or cfg.image.name
        deadline = self._clock() + tmo.request_s
        pending: list[Frame] = []
        try:
            while True:
                left = deadline - self._clock()
                if left <= 0:
                    raise self._step_timeout()
                frame = pending.pop(0) if pending else link.recv(left)
                if frame is None:
                    continue
                if frame.src != peer:
                    log.debug("nmrp: ignoring %s from another host", frame.message.name)
                    continue
                code = frame.message.code
                decision = transition(self.step, code)
                if decision.note:
                    self._event(f"{frame.message.name}: {decision.note}")
                if decision.reply is Code.CONF_ACK:
                    link.send(peer, conf)
                elif decision.reply is not None:
                    link.send(peer, codec.simple(decision.reply))
                if code == Code.KEEP_ALIVE_REQ:
                    keepalives += 1
                    if self.step is Step.FLASH:
                        deadline = self._clock() + tmo.flash_s
                previous, self.step = self.step, decision.step
                if previous is not self.step and self.step is Step.CONFIGURE:
                    deadline = self._clock() + tmo.request_s
                if decision.action is Action.FAIL:
                    raise DeviceError(
                        f"NMRP step '{previous.value}': {decision.note}",
                        hint="power-cycle the router and start again",
                    )
                if decision.action is Action.DONE:
                    total = self._clock() - began
                    self._event("the router finished writing and closed the session")
                    return NmrpResult(
                        router_mac=codec.format_mac(peer),
                        router_ip=cfg.router_ip,
                        netmask=cfg.netmask,
                        remote_name=remote,
                        size_bytes=size,
                        uploads=uploads,
                        keepalives=keepalives,
                        upload_s=upload_s,
                        total_s=total,
                    )
                if decision.action is Action.UPLOAD:
                    if uploads >= cfg.max_uploads:
                        raise DeviceError(
                            f"NMRP step 'flash': the router asked for the firmware "
                            f"{uploads + 1} times: it rejects the image",
                            hint="use the image made for this exact model (and region)",
                        )
                    asked = frame.message.file_name
                    if asked:
                        self._event(f"the router asked for {asked!r}", file_name=asked)
                    remote = cfg.remote_name or asked or cfg.image.name
                    upload_s += self._upload(remote)
                    uploads += 1
                    pending = self._drain(link)
                    self.step = Step.FLASH
                    self._event("upload done; the router writes its flash", seconds=upload_s)
                    deadline = self._clock() + tmo.flash_s
        except BaseException:
            if self.step in (Step.CONFIGURE, Step.UPLOAD):
                self._close(link, peer)
            raise

    def _advertise(self, link: RawLink) -> bytes:
        cfg = self.config
        tmo = cfg.timeouts
        want = codec.parse_mac(cfg.router_mac) if cfg.router_mac else None
        dst = want or codec.BROADCAST_MAC
        message = codec.advertise()
        self._event(f"advertising on {cfg.interface}; power the router on now")
        deadline = self._clock() + tmo.advertise_s
        while (left := deadline - self._clock()) > 0:
            link.send(dst, message)
            wait_until = self._clock() + min(tmo.advertise_interval_s, left)
            while (wait := wait_until - self._clock()) > 0:
                frame = link.recv(wait)
                if frame is None:
                    break
                if frame.dst != link.mac or (want is not None and frame.src != want):
                    continue
                decision = transition(Step.ADVERTISE, frame.message.code)
                if decision.step is Step.CONFIGURE:
                    self.step = Step.CONFIGURE
                    return frame.src
                self._event(f"ignoring {frame.message.name} from {codec.format_mac(frame.src)}")
        raise self._timeout(
            "no router answered the advertisement",
            tmo.advertise_s,
            f"cable the router's LAN port directly to {cfg.interface}, start unbrick, then "
            "power the router on (its bootloader listens for NMRP only briefly)",
        )

    def _step_timeout(self) -> TransportError:
        cfg = self.config
        tmo = cfg.timeouts
        if self.step is Step.CONFIGURE:
            return self._timeout(
                "the router took its configuration but did not ask for the firmware",
                tmo.request_s,
                "power-cycle the router and try again; check that nothing else answers NMRP",
            )
        return self._timeout(
            "no keep-alive or close from the router after the upload",
            tmo.flash_s,
            "the router may still be writing: wait, then power-cycle it and check whether it "
            "boots; raise the flash timeout for slow routers",
        )


def flash_nmrp(
    config: NmrpConfig,
    *,
    uploader: Uploader | None = None,
    on_event: Callable[[NmrpEvent], None] | None = None,
) -> NmrpResult:
    """Run one NMRP recovery with ``config`` (see the module docstring)."""
    return NmrpServer(config, uploader=uploader, on_event=on_event).run()


def _default_uploader() -> Uploader:
    from unbrick.transports.tftp.client import tftp_put  # noqa: PLC0415 - loaded when used

    return tftp_put
