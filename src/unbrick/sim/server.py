"""TCP server of a simulated device: the generic recovery interface, the SPI face, the console.

The generic face answers the sim protocol (``unbrick.transports.simproto``) as the device's
bootloader or firmware would: it does not answer at all while the device is off or dead
(connections are accepted and closed at once). The SPI face is a clip-on programmer on the
flash chip: raw chip id, read, erase and program, in every state. A power loss (a power cut or
a reset) closes every client socket of both faces. Link faults of the device's
:class:`~unbrick.sim.device.Faults` (bit errors, disconnects, a slow link) are applied to the
generic face.

The console face (:mod:`unbrick.sim.uboot_face`) is the device's serial console as U-Boot shows
it; it accepts connections in every state (a UART is always there), one terminal at a time (a
new connection takes over from the previous one). A reset keeps the terminal attached (it shows
the new banner); a power cut drops it, as it drops the other faces' clients.

The TFTP face (:mod:`unbrick.sim.tftp_face`) is the bootloader's TFTP recovery server on a UDP
port of the same host: it takes one firmware image by ``put`` while the device is in its
bootloader, checks it, writes it and restarts the device.
"""

from __future__ import annotations

import contextlib
import logging
import random
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from unbrick.errors import DeviceError, UnbrickError
from unbrick.sim.device import Faults, SimDevice
from unbrick.sim.flash import MAX_OP_BYTES, PowerLoss
from unbrick.sim.tftp_face import TftpFace, TftpFaceConfig
from unbrick.sim.uboot_face import ConsoleConfig, UBootFace
from unbrick.transports.simproto import (
    PROTOCOL_VERSION,
    Frame,
    FrameDecoder,
    ProtocolError,
    Request,
    Response,
    decode_request,
    encode_response,
    request_id,
)

log = logging.getLogger(__name__)

GENERIC = "generic"
SPI = "spi"
CONSOLE = "console"
#: What the device appends to its boot log when power is lost (as opposed to a reset).
_POWER_LOST_MARK = "<power lost>\n"
_SPI_OPS = frozenset({"hello", "chip", "read", "erase", "program"})
_ACCEPT_POLL_S = 0.1
_RECV_BYTES = 256 * 1024


@dataclass(frozen=True)
class ServerPorts:
    host: str
    port: int
    spi_port: int
    console_port: int = 0
    #: UDP port of the TFTP recovery face.
    tftp_port: int = 0


@dataclass(frozen=True)
class _Reply:
    response: Response
    #: Runs after the response is sent (a reset drops the link only once the answer left).
    after: Callable[[], None] | None = None


class SimServer:
    """Serves one device on three TCP listeners (generic, SPI, console) and one UDP port (the
    TFTP recovery face); several clients at once; ``stop()`` is clean."""

    def __init__(
        self,
        device: SimDevice,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        spi_port: int = 0,
        console_port: int = 0,
        tftp_port: int = 0,
        max_transfer: int = MAX_OP_BYTES,
        console: ConsoleConfig | None = None,
        tftp: TftpFaceConfig | None = None,
    ) -> None:
        self.device = device
        self.host = host
        self.port = port
        self.spi_port = spi_port
        self.console_port = console_port
        self.max_transfer = max_transfer
        self._lock = threading.Lock()
        self._clients: dict[socket.socket, str] = {}
        self._threads: list[threading.Thread] = []
        self._listeners: list[socket.socket] = []
        self._stopping = threading.Event()
        self._ports: ServerPorts | None = None
        self._rng = random.Random(device.faults.seed)
        self._rng_faults: Faults = device.faults
        self._rng_lock = threading.Lock()
        self.console = UBootFace(device, console, stopping=self._stopping)
        self.tftp = TftpFace(device, host, tftp_port, tftp, stopping=self._stopping)

    # -- life cycle -----------------------------------------------------------------------

    @property
    def ports(self) -> ServerPorts:
        if self._ports is None:
            raise DeviceError("the sim server is not started")
        return self._ports

    def start(self) -> ServerPorts:
        if self._ports is not None:
            return self._ports
        try:
            generic = self._listen(self.port)
            spi = self._listen(self.spi_port)
            console = self._listen(self.console_port)
            tftp_port = self.tftp.start()
        except OSError as e:
            for s in self._listeners:
                s.close()
            self._listeners.clear()
            raise DeviceError(
                f"cannot listen on {self.host}: {e.strerror}", hint="pick another port"
            ) from e
        self._ports = ServerPorts(
            self.host,
            generic.getsockname()[1],
            spi.getsockname()[1],
            console.getsockname()[1],
            tftp_port,
        )
        self.device.add_power_listener(self._on_power_loss)
        for sock, face in ((generic, GENERIC), (spi, SPI), (console, CONSOLE)):
            self._spawn(self._accept_loop, sock, face, name=f"sim-accept-{face}")
        log.info("sim %s listening on %s", self.device.name, self._ports)
        return self._ports

    def _listen(self, port: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, port))
        sock.listen(16)
        sock.settimeout(_ACCEPT_POLL_S)
        self._listeners.append(sock)
        return sock

    def _spawn(self, target: Callable[..., None], *args: Any, name: str) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
        thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        if self._stopping.is_set():
            return
        self._stopping.set()
        self.device.remove_power_listener(self._on_power_loss)
        for sock in self._listeners:
            sock.close()
        self.tftp.stop(timeout_s)
        self._drop_all()
        with self._lock:
            threads = list(self._threads)
        current = threading.current_thread()
        for thread in threads:
            if thread is not current:
                thread.join(timeout_s)

    def __enter__(self) -> SimServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _on_power_loss(self) -> None:
        # Runs with the device lock held. A reset keeps the console's terminal attached (a
        # serial line stays plugged in); a power cut drops every connection.
        cut = self.device.boot_log.endswith(_POWER_LOST_MARK)
        self._drop_all(keep=() if cut else (CONSOLE,))

    def _drop_all(self, keep: tuple[str, ...] = ()) -> None:
        with self._lock:
            clients = [conn for conn, face in self._clients.items() if face not in keep]
        for conn in clients:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    # -- connections ----------------------------------------------------------------------

    def _accept_loop(self, listener: socket.socket, face: str) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if face == GENERIC and self.device.state in ("off", "dead"):
                conn.close()  # the device does not answer
                continue
            conn.settimeout(None)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                if face == CONSOLE:
                    # One terminal at a time: the newest takes over the line.
                    for old, old_face in self._clients.items():
                        if old_face == CONSOLE:
                            with contextlib.suppress(OSError):
                                old.shutdown(socket.SHUT_RDWR)
                self._clients[conn] = face
            serve = self._serve_console if face == CONSOLE else self._serve
            self._spawn(serve, conn, face, name=f"sim-client-{face}")

    def _serve_console(self, conn: socket.socket, face: str) -> None:
        try:
            self.console.serve(conn)
        finally:
            with self._lock:
                self._clients.pop(conn, None)
            conn.close()

    def _serve(self, conn: socket.socket, face: str) -> None:
        decoder = FrameDecoder()
        sent = 0
        try:
            while not self._stopping.is_set():
                data = conn.recv(_RECV_BYTES)
                if not data:
                    return
                try:
                    frames = decoder.feed(data)
                except ProtocolError as e:
                    log.info("sim %s: dropping a %s client: %s", self.device.name, face, e)
                    return
                for frame in frames:
                    reply = self._handle(frame, face)
                    if reply is None:
                        return
                    self._send(conn, reply.response, face)
                    sent += 1
                    if reply.after is not None:
                        reply.after()
                    limit = self.device.faults.disconnect_after_frames
                    if face == GENERIC and limit is not None and sent >= limit:
                        log.info(
                            "sim %s: link drop after %d frames (fault)", self.device.name, sent
                        )
                        return
        except OSError:
            return
        finally:
            with self._lock:
                self._clients.pop(conn, None)
            conn.close()

    def _send(self, conn: socket.socket, resp: Response, face: str) -> None:
        frame = bytearray(encode_response(resp))
        faults = self.device.faults
        if face == GENERIC and faults.link_bit_error_rate > 0 and resp.payload:
            with self._rng_lock:
                if faults is not self._rng_faults:
                    self._rng, self._rng_faults = random.Random(faults.seed), faults
                if self._rng.random() < faults.link_bit_error_rate:
                    pos = len(frame) - len(resp.payload) + self._rng.randrange(len(resp.payload))
                    frame[pos] ^= 1 << self._rng.randrange(8)
        rate = faults.slow_link_bytes_per_s if face == GENERIC else None
        if not rate:
            conn.sendall(frame)
            return
        step = max(1, rate // 20)
        for pos in range(0, len(frame), step):
            conn.sendall(frame[pos : pos + step])
            if self._stopping.wait(len(frame[pos : pos + step]) / rate):
                return

    # -- requests -------------------------------------------------------------------------

    def _handle(self, frame: Frame, face: str) -> _Reply | None:
        """The reply to one request, or None to drop the connection without answering."""
        if face == GENERIC and self.device.state in ("off", "dead"):
            return None
        try:
            req = decode_request(frame)
        except ProtocolError as e:
            rid = request_id(frame)
            if rid is None:
                return None
            return _Reply(Response(rid, False, error=e.message, hint=e.hint))
        try:
            if face == SPI:
                return self._spi(req)
            return self._generic(req)
        except PowerLoss:
            return None
        except UnbrickError as e:
            return _Reply(Response(req.id, False, error=e.message, hint=e.hint or None))

    def _check_length(self, length: int) -> None:
        if length > self.max_transfer:
            raise DeviceError(
                f"transfer of {length} bytes exceeds the device's {self.max_transfer}",
                hint=f"split transfers into pieces of at most {self.max_transfer} bytes",
            )

    def _hello(self, req: Request, face: str) -> _Reply:
        version = req.args.get("version", PROTOCOL_VERSION)
        if version != PROTOCOL_VERSION:
            raise DeviceError(
                f"protocol version {version} is not supported (this sim speaks {PROTOCOL_VERSION})",
                hint="use the same unbrick version for the sim and the driver",
            )
        dev = self.device
        fields = {
            "protocol": PROTOCOL_VERSION,
            "face": face,
            "kind": dev.kind,
            "model": dev.config.model,
            "ab": dev.config.ab,
            "max_transfer": self.max_transfer,
            **dev.status(),
        }
        return _Reply(Response(req.id, True, fields))

    def _generic(self, req: Request) -> _Reply:
        dev = self.device
        op, a = req.op, req.args
        ok = Response(req.id, True)
        if op == "hello":
            return self._hello(req, GENERIC)
        if op == "identify":
            return _Reply(Response(req.id, True, {"identity": dev.identify().to_dict()}))
        if op == "state":
            return _Reply(Response(req.id, True, dev.status()))
        if op == "bootlog":
            status = dev.status()
            return _Reply(Response(req.id, True, status, dev.boot_log.encode("utf-8")))
        if op == "read":
            self._check_length(a["length"])
            return _Reply(Response(req.id, True, payload=dev.read(a["offset"], a["length"])))
        if op == "erase":
            dev.erase(a["offset"], a["length"])
            return _Reply(ok)
        if op == "program":
            self._check_length(len(req.payload))
            dev.program(a["offset"], req.payload)
            return _Reply(ok)
        if op == "hash":
            algorithm = a.get("algorithm", "sha256")
            digest = dev.hash(a["offset"], a["length"], algorithm)
            return _Reply(Response(req.id, True, {"digest": digest, "algorithm": algorithm}))
        if op == "reboot":
            return _Reply(Response(req.id, True, {"reset": True}), lambda: self._reset(False))
        if op == "enter_recovery":
            if dev.state == "firmware":
                return _Reply(Response(req.id, True, {"reset": True}), lambda: self._reset(True))
            return _Reply(Response(req.id, True, {"reset": False}))
        if op == "boot_state":
            st = dev.boot_state()
            fields = {
                "active_slot": st.active_slot,
                "trial_slot": st.trial_slot,
                "bootcount": st.bootcount,
                "bootlimit": st.bootlimit,
                "extra": st.extra,
            }
            return _Reply(Response(req.id, True, fields))
        if op == "set_trial":
            dev.set_trial(a["slot"])
            return _Reply(ok)
        if op == "commit":
            dev.commit(a["slot"])
            return _Reply(ok)
        raise DeviceError(f"op {op!r} is not offered by the recovery interface")

    def _reset(self, recovery: bool) -> None:
        try:
            self.device.reset(recovery=recovery)
        except DeviceError as e:
            log.info("sim %s: reset failed: %s", self.device.name, e)

    def _spi(self, req: Request) -> _Reply:
        dev = self.device
        op, a = req.op, req.args
        if op not in _SPI_OPS:
            raise DeviceError(
                f"op {op!r} is not offered by the SPI face",
                hint="a clip-on programmer can only identify the chip, read, erase and program",
            )
        if op == "hello":
            return self._hello(req, SPI)
        if op == "chip":
            return _Reply(Response(req.id, True, dev.chip_info()))
        if op == "read":
            self._check_length(a["length"])
            return _Reply(Response(req.id, True, payload=dev.spi_read(a["offset"], a["length"])))
        if op == "erase":
            dev.spi_erase(a["offset"], a["length"])
            return _Reply(Response(req.id, True))
        self._check_length(len(req.payload))
        dev.spi_program(a["offset"], req.payload)
        return _Reply(Response(req.id, True))
