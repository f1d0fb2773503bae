"""The NMRP client of a simulated NETGEAR bootloader: what nmrpflash talks to on a real router.

A NETGEAR bootloader listens for NMRP for a few seconds after power-on (and for as long as
needed when its firmware is damaged). :class:`NmrpClient` plays that part for a
:class:`~unbrick.sim.device.SimDevice` in its bootloader, on one Ethernet interface (in tests,
one end of a veth pair inside a private network namespace; the caller runs it there):

1. wait for ADVERTISE carrying the magic ``NTGR``; answer CONF_REQ (again for every
   ADVERTISE until the configuration comes);
2. take CONF_ACK: give the interface the address and netmask it carries (``ip addr``), note
   FW_UP and the region, start a TFTP server on that address (port 69);
3. send TFTP_UL_REQ (with FILE_NAME when configured) and accept one upload (a write request,
   octet mode; ``blksize`` and ``tsize`` options; resends TFTP_UL_REQ when no write request
   comes);
4. write the received image into the device's firmware region (erase, program, read back its
   hash), sending KEEP_ALIVE_REQ every ``keepalive_interval_s`` meanwhile;
5. send CLOSE_REQ, wait for CLOSE_ACK, remove the address, and restart the device.

The TFTP server here is deliberately minimal (one write, window size 1), lenient like a
bootloader's (nmrpflash 0.9.14 sends stray bytes after its write request's options, which
``unbrick.transports.tftp``'s stricter decoder refuses), and injects faults:
``drop_data_blocks`` ignores the first arrival of the listed DATA blocks, as if the network had
lost them, so the sender must retransmit; ``reject_uploads`` discards whole uploads and asks
for the image again (what later nmrpflash versions take as a refused image). Runs until
done; ``stop`` ends a wait early.
"""

from __future__ import annotations

import logging
import select
import socket
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field

from unbrick.errors import DeviceError, ToolError, TransportError
from unbrick.sim.device import SimDevice
from unbrick.sim.flash import MAX_OP_BYTES
from unbrick.tools import Tool
from unbrick.transports.nmrp import codec
from unbrick.transports.nmrp.codec import Code, Frame, Message, NmrpProtocolError
from unbrick.transports.nmrp.server import IP_TOOL, RawLink

log = logging.getLogger(__name__)

_RRQ, _WRQ, _DATA, _ACK, _ERROR, _OACK = 1, 2, 3, 4, 5, 6
_ERR_UNDEFINED, _ERR_DISK_FULL, _ERR_ILLEGAL, _ERR_UNKNOWN_TID = 0, 3, 4, 5
_MAX_PACKET = 65468
#: Bytes programmed per flash operation (between two chances to send a keep-alive).
PROGRAM_CHUNK = 64 * 1024


@dataclass(frozen=True)
class NmrpClientFaults:
    """Faults of one session."""

    #: DATA block numbers whose first arrival is ignored (the sender must resend them).
    drop_data_blocks: frozenset[int] = frozenset()
    #: Uploads to reject (as a bootloader does with an image for another board): the image
    #: is discarded and TFTP_UL_REQ sent again.
    reject_uploads: int = 0


@dataclass(frozen=True)
class NmrpClientConfig:
    interface: str
    #: The device region that receives the image.
    region_name: str = "firmware"
    magic: bytes = codec.DEFAULT_MAGIC
    #: FILE_NAME sent with TFTP_UL_REQ (None: no option, the server picks the name).
    file_name: str | None = None
    #: How long to listen for an ADVERTISE.
    listen_s: float = 30.0
    #: Waits for CONF_ACK, a write request, a DATA block, CLOSE_ACK.
    step_timeout_s: float = 2.0
    #: Resends of TFTP_UL_REQ, of an ACK, of CLOSE_REQ.
    retries: int = 3
    keepalive_interval_s: float = 0.2
    #: Time the bootloader spends checking a received image before writing (or rejecting) it.
    image_check_s: float = 0.05
    max_blksize: int = 1468
    tftp_port: int = 69
    #: Restart the device (normal boot) after the session.
    reboot: bool = True
    faults: NmrpClientFaults = field(default_factory=NmrpClientFaults)


@dataclass(frozen=True)
class NmrpClientResult:
    server_mac: str
    ip: str
    netmask: str
    #: DEV_REGION code of CONF_ACK, if any.
    region: int | None
    firmware_upgrade: bool
    file_name: str
    size_bytes: int
    #: SHA-256 of the region's first ``size_bytes`` bytes, read back after writing.
    sha256: str
    blksize: int
    keepalives_sent: int
    keepalives_acked: int
    dropped_blocks: tuple[int, ...]
    #: DATA blocks that arrived again after being acknowledged or dropped.
    repeated_blocks: int
    #: Uploads received and rejected (fault) before the one written.
    rejected_uploads: int
    #: The server answered CLOSE_REQ.
    closed: bool
    #: Device state after the restart ("firmware" when the image boots), or the state kept.
    state_after: str


class NmrpClient:
    """One NMRP session of a simulated router (see the module docstring)."""

    def __init__(
        self,
        device: SimDevice,
        config: NmrpClientConfig,
        *,
        ip_tool: Tool = IP_TOOL,
        stop: threading.Event | None = None,
    ) -> None:
        self.device = device
        self.config = config
        self._ip = ip_tool
        self._stop = stop or threading.Event()
        self.step = "listen"

    def _fail(self, message: str) -> DeviceError:
        return DeviceError(f"sim NMRP client, step '{self.step}': {message}")

    def serve(self) -> NmrpClientResult:
        cfg = self.config
        dev = self.device
        state = dev.status()["state"]
        if state != "bootloader":
            raise DeviceError(
                f"sim {dev.name} is in state {state!r}: NMRP answers only in the bootloader",
                hint="reset the device into recovery first",
            )
        region = dev.config.find_region(cfg.region_name)
        if region is None:
            raise DeviceError(f"sim {dev.name} has no region {cfg.region_name!r}")
        with RawLink(cfg.interface) as link:
            server, conf = self._configure(link)
            ip, netmask = conf.dev_ip or ("", "")
            prefix = codec.netmask_prefix(netmask)
            with self._address(f"{ip}/{prefix}"), _udp(ip, cfg.tftp_port) as listener:
                rejected = 0
                while True:
                    self.step = "upload-request"
                    wrq, peer = self._request_upload(link, server, listener)
                    self.step = "upload"
                    receiver = _Receiver(ip, peer, cfg, region.size)
                    try:
                        name, data = receiver.run(wrq)
                        time.sleep(cfg.image_check_s)
                        if rejected < cfg.faults.reject_uploads:
                            rejected += 1
                            log.info("sim nmrp: rejecting upload %d (fault)", rejected)
                            continue
                        self.step = "flash"
                        sent, acked = self._write(link, server, receiver, region.offset, data)
                    finally:
                        receiver.close()
                    break
                digest = dev.hash(region.offset, len(data), "sha256") if data else ""
                self.step = "close"
                closed = self._close(link, server)
        state_after = state
        if cfg.reboot:
            dev.reset()
            state_after = dev.wait_state(("bootloader", "firmware", "dead"), 10.0)
        self.step = "done"
        return NmrpClientResult(
            server_mac=codec.format_mac(server),
            ip=ip,
            netmask=netmask,
            region=conf.region,
            firmware_upgrade=conf.has(codec.OptionType.FW_UP),
            file_name=name,
            size_bytes=len(data),
            sha256=digest,
            blksize=receiver.blksize,
            keepalives_sent=sent,
            keepalives_acked=acked,
            dropped_blocks=tuple(receiver.dropped),
            repeated_blocks=receiver.repeated,
            rejected_uploads=rejected,
            closed=closed,
            state_after=state_after,
        )

    # -- steps ------------------------------------------------------------------------------

    def _configure(self, link: RawLink) -> tuple[bytes, Message]:
        """Answer ADVERTISE with CONF_REQ until CONF_ACK comes; (server MAC, CONF_ACK)."""
        cfg = self.config
        deadline = time.monotonic() + cfg.listen_s
        server: bytes | None = None
        while not self._stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                what = "CONF_ACK" if server else "ADVERTISE"
                raise self._fail(f"no {what} within {cfg.listen_s:g} s")
            frame = link.recv(min(left, 0.1))
            if frame is None:
                continue
            msg = frame.message
            if msg.code == Code.ADVERTISE:
                if msg.magic != cfg.magic:
                    log.info("sim nmrp: ignoring ADVERTISE with magic %r", msg.magic)
                    continue
                if server is None:
                    self.step = "configure"
                server = frame.src
                link.send(server, codec.conf_req())
            elif msg.code == Code.CONF_ACK and frame.src == server and frame.dst == link.mac:
                try:
                    if msg.dev_ip is None:
                        raise self._fail("CONF_ACK without DEV_IP")
                    codec.netmask_prefix(msg.dev_ip[1])
                except NmrpProtocolError as e:
                    raise self._fail(f"bad CONF_ACK: {e.message}") from e
                return server, msg
        raise self._fail("stopped")

    def _request_upload(
        self, link: RawLink, server: bytes, listener: socket.socket
    ) -> tuple[bytes, tuple[str, int]]:
        """Send TFTP_UL_REQ until a write request arrives; (the request, the sender)."""
        cfg = self.config
        request = codec.tftp_ul_req(cfg.file_name)
        for _ in range(cfg.retries + 1):
            link.send(server, request)
            deadline = time.monotonic() + cfg.step_timeout_s
            while (left := deadline - time.monotonic()) > 0 and not self._stop.is_set():
                fds = [listener.fileno(), link.fileno()]
                ready, _, _ = select.select(fds, [], [], min(left, 0.1))
                if listener.fileno() in ready:
                    data, peer = listener.recvfrom(_MAX_PACKET)
                    if len(data) >= 2 and struct.unpack_from(">H", data)[0] == _WRQ:
                        return data, peer
                    _send_error(listener, peer, _ERR_ILLEGAL, "only write requests")
                if link.fileno() in ready:
                    frame = link.recv(0.0)
                    if frame is not None and frame.src == server:
                        self._nmrp_while_busy(link, frame)
        raise self._fail(f"no TFTP write request after {cfg.retries + 1} upload requests")

    def _nmrp_while_busy(self, link: RawLink, frame: Frame) -> None:
        code = frame.message.code
        if code == Code.CLOSE_REQ:
            link.send(frame.src, codec.simple(Code.CLOSE_ACK))
            raise self._fail("the server closed the session")
        # Repeated CONF_ACKs, and the KEEP_ALIVE_REQ older nmrpflash sends after its upload,
        # need no answer.
        log.debug("sim nmrp: %s ignored in step %s", frame.message.name, self.step)

    def _write(
        self, link: RawLink, server: bytes, receiver: _Receiver, offset: int, data: bytes
    ) -> tuple[int, int]:
        """Erase and program the image, keeping the server informed; (keep-alives, acks)."""
        cfg = self.config
        dev = self.device
        sent = acked = 0
        next_keepalive = 0.0

        def tick() -> None:
            nonlocal sent, acked, next_keepalive
            now = time.monotonic()
            if now >= next_keepalive:
                link.send(server, codec.simple(Code.KEEP_ALIVE_REQ))
                sent += 1
                next_keepalive = now + cfg.keepalive_interval_s
            receiver.dally()
            while (frame := link.recv(0.0)) is not None:
                if frame.src != server:
                    continue
                if frame.message.code == Code.KEEP_ALIVE_ACK:
                    acked += 1
                else:
                    self._nmrp_while_busy(link, frame)

        eb = dev.config.geometry.erase_block_bytes
        span = -(-max(len(data), 1) // eb) * eb
        for pos in range(0, span, MAX_OP_BYTES):
            tick()
            dev.erase(offset + pos, min(MAX_OP_BYTES, span - pos))
        for pos in range(0, len(data), PROGRAM_CHUNK):
            tick()
            dev.program(offset + pos, data[pos : pos + PROGRAM_CHUNK])
        deadline = time.monotonic() + cfg.step_timeout_s
        while acked < sent and time.monotonic() < deadline:
            frame = link.recv(min(0.05, max(0.0, deadline - time.monotonic())))
            if frame is not None and frame.src == server:
                if frame.message.code == Code.KEEP_ALIVE_ACK:
                    acked += 1
                else:
                    self._nmrp_while_busy(link, frame)
        return sent, acked

    def _close(self, link: RawLink, server: bytes) -> bool:
        cfg = self.config
        for _ in range(cfg.retries + 1):
            link.send(server, codec.simple(Code.CLOSE_REQ))
            deadline = time.monotonic() + cfg.step_timeout_s
            while (left := deadline - time.monotonic()) > 0:
                frame = link.recv(left)
                if frame is not None and frame.src == server:
                    if frame.message.code == Code.CLOSE_ACK:
                        return True
                    log.debug("sim nmrp: %s while closing", frame.message.name)
        log.warning("sim nmrp: no CLOSE_ACK from %s", codec.format_mac(server))
        return False

    @contextmanager
    def _address(self, cidr: str) -> Iterator[None]:
        iface = self.config.interface
        try:
            self._ip.run(["addr", "replace", cidr, "dev", iface], timeout_s=10)
        except ToolError as e:
            raise self._fail(f"cannot set address {cidr} on {iface}: {e.message}") from e
        try:
            yield
        finally:
            try:
                self._ip.run(["addr", "del", cidr, "dev", iface], timeout_s=10)
            except ToolError as e:
                log.warning("sim nmrp: cannot remove %s from %s: %s", cidr, iface, e.message)


# -- a minimal TFTP write receiver ---------------------------------------------------------


@contextmanager
def _udp(ip: str, port: int) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.bind((ip, port))
    except OSError as e:
        sock.close()
        raise TransportError(f"sim TFTP server cannot bind {ip}:{port}: {e.strerror}") from e
    try:
        yield sock
    finally:
        sock.close()


def _send_error(sock: socket.socket, peer: tuple[str, int], code: int, text: str) -> None:
    with suppress(OSError):
        sock.sendto(struct.pack(">HH", _ERROR, code) + text.encode() + b"\0", peer)


def parse_request(data: bytes) -> tuple[int, str, str, dict[str, str]]:
    """(opcode, file name, mode, options with lower-case names) of a RRQ/WRQ; ValueError."""
    if len(data) < 4:
        raise ValueError("request too short")
    opcode = struct.unpack_from(">H", data)[0]
    if opcode not in (_RRQ, _WRQ):
        raise ValueError(f"opcode {opcode} is not a request")
    # What follows the last NUL is not a field. nmrpflash 0.9.14 sends stray bytes from its
    # uninitialised packet buffer after its options, so option fields that are not ASCII, an
    # option name without a value and unterminated bytes are ignored, as servers must.
    fields = data[2:].split(b"\0")[:-1]
    if len(fields) < 2:
        raise ValueError("request without a NUL-terminated file name and mode")
    try:
        name, mode = fields[0].decode("ascii"), fields[1].decode("ascii")
    except UnicodeDecodeError as e:
        raise ValueError("file name or mode is not ASCII") from e
    options: dict[str, str] = {}
    for i in range(2, len(fields) - 1, 2):
        try:
            key, value = fields[i].decode("ascii").lower(), fields[i + 1].decode("ascii")
        except UnicodeDecodeError:
            continue
        options.setdefault(key, value)
    return opcode, name, mode.lower(), options


class _Receiver:
    """Receives one upload on its own port (the transfer id), then dallies for a lost ACK."""

    def __init__(
        self, ip: str, peer: tuple[str, int], config: NmrpClientConfig, max_bytes: int
    ) -> None:
        self.peer = peer
        self.config = config
        self.max_bytes = max_bytes
        self.blksize = 512
        self.dropped: list[int] = []
        self.repeated = 0
        self._last = b""
        self._final_block: int | None = None
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind((ip, 0))

    def close(self) -> None:
        self._sock.close()

    def _send(self, packet: bytes) -> None:
        self._last = packet
        self._sock.sendto(packet, self.peer)

    def _error(self, code: int, text: str) -> DeviceError:
        _send_error(self._sock, self.peer, code, text)
        return DeviceError(f"sim NMRP client, step 'upload': {text}")

    def run(self, request: bytes) -> tuple[str, bytes]:
        """(file name, image) of the upload started by ``request``."""
        cfg = self.config
        try:
            _, name, mode, options = parse_request(request)
        except ValueError as e:
            raise self._error(_ERR_ILLEGAL, f"bad write request: {e}") from e
        if mode != "octet":
            raise self._error(_ERR_UNDEFINED, f"mode {mode!r} is not supported (octet only)")
        accepted: dict[str, str] = {}
        if "blksize" in options and options["blksize"].isdigit():
            asked = int(options["blksize"])
            if asked >= 8:
                self.blksize = min(asked, cfg.max_blksize)
                accepted["blksize"] = str(self.blksize)
        if "tsize" in options and options["tsize"].isdigit():
            if int(options["tsize"]) > self.max_bytes:
                raise self._error(_ERR_DISK_FULL, "image larger than the firmware region")
            accepted["tsize"] = options["tsize"]
        if accepted:
            body = b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in accepted.items())
            self._send(struct.pack(">H", _OACK) + body)
        else:
            self._send(struct.pack(">HH", _ACK, 0))
        parts: list[bytes] = []
        received = 0
        expected = 1
        drops = set(cfg.faults.drop_data_blocks)
        misses = 0
        while True:
            ready, _, _ = select.select([self._sock], [], [], cfg.step_timeout_s)
            if not ready:
                misses += 1
                if misses > cfg.retries:
                    raise self._error(_ERR_UNDEFINED, f"no DATA {expected} from the sender")
                self._sock.sendto(self._last, self.peer)
                continue
            data, addr = self._sock.recvfrom(_MAX_PACKET)
            if addr != self.peer:
                _send_error(self._sock, addr, _ERR_UNKNOWN_TID, "unknown transfer id")
                continue
            if len(data) < 4:
                continue
            opcode, block = struct.unpack_from(">HH", data)
            if opcode == _ERROR:
                text = data[4:].split(b"\0", 1)[0].decode("ascii", "replace")
                raise DeviceError(f"sim NMRP client, step 'upload': the sender gave up: {text}")
            if opcode != _DATA:
                continue
            if block != expected:
                if block == (expected - 1) & 0xFFFF:
                    self.repeated += 1
                    self._sock.sendto(self._last, self.peer)
                continue
            if block in drops:
                drops.discard(block)
                self.dropped.append(block)
                log.info("sim nmrp: dropping DATA %d (fault)", block)
                continue
            if block in self.dropped:
                self.repeated += 1
            misses = 0
            payload = data[4:]
            received += len(payload)
            if received > self.max_bytes:
                raise self._error(_ERR_DISK_FULL, "image larger than the firmware region")
            parts.append(payload)
            self._send(struct.pack(">HH", _ACK, block))
            if len(payload) < self.blksize:
                self._final_block = block
                return name, b"".join(parts)
            expected = (expected + 1) & 0xFFFF

    def dally(self) -> None:
        """Answer a repeated final DATA (our last ACK was lost) without blocking."""
        while True:
            ready, _, _ = select.select([self._sock], [], [], 0)
            if not ready:
                return
            try:
                data, addr = self._sock.recvfrom(_MAX_PACKET)
            except OSError:
                return
            if addr == self.peer and len(data) >= 4:
                opcode, block = struct.unpack_from(">HH", data)
                if opcode == _DATA and block == self._final_block:
                    self.repeated += 1
                    self._sock.sendto(self._last, self.peer)
