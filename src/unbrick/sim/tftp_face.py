"""The TFTP recovery server of a simulated router's bootloader (the "TFTP face").

Many routers (NETGEAR, ASUS, Linksys, D-Link and others) run a small TFTP server in their
bootloader's recovery mode: the technician sets a static address and ``put``\\ s a firmware
image (``tftp -m binary 192.168.1.1 -c put firmware.bin``); the bootloader checks it, writes
it to flash and restarts. :class:`TftpFace` plays that part for a
:class:`~unbrick.sim.device.SimDevice` on one UDP port:

* **Only in the bootloader.** While the device is in state ``"bootloader"`` (a soft brick, a
  failed boot, a reset into recovery) the server answers. In every other state it is silent
  (a router whose recovery server is not running: the client times out, and unbrick's client
  says "check ... that the device is in its TFTP recovery mode"); with
  ``TftpFaceConfig(answer_in_firmware=True)`` a device running its firmware answers ERROR 2
  instead, as some vendor firmwares do on port 69.
* **One write, octet mode.** A WRQ in ``octet`` mode (any file name) starts the upload from a
  new port (the transfer ID of RFC 1350). A read request is refused with ERROR 2 "Access
  violation"; ``netascii``/``mail`` with ERROR 4; a second upload while one runs with ERROR 0
  (a repeated request from the same client is ignored: it is the client retrying).
* **Options as a small router grants them**: ``blksize`` up to 1468 (``blksize_max``), the
  ``timeout`` the client asks for, and ``tsize`` (an image larger than the firmware partition
  is refused up front with ERROR 3); ``windowsize`` is not acknowledged, so the transfer runs
  lock-step (RFC 1350). Retransmission and loss handling are unbrick's own
  (:func:`unbrick.transports.tftp.transfer.receive_stream`).
* **The image is checked before the final ACK**, the way the bootloader would
  (:func:`check_recovery_image`): uImage magic, header CRC, data CRC, architecture and type,
  the anti-rollback counter (all through :func:`~unbrick.sim.firmware.check_boot`), the model
  and hardware revision in the firmware's info block, and that it fits the partition. A bad
  image is answered with an ERROR packet instead of the last ACK (code 0, "image refused:
  ..."); the flash is not touched and the device stays in recovery.
* **Then it flashes and restarts.** After the final ACK the server erases the erase blocks the
  image needs in the firmware region (the active slot on A/B kinds; bad blocks skipped on NAND,
  as ``nand write`` does) and programs the image through the device, so NOR rules and
  power-cut faults apply: a cut leaves a soft brick again, which the device boots into by
  itself. Meanwhile it still answers a repeated last block (a lost final ACK) for
  ``dally_s``; then it resets the device, which boots the new firmware.

A reset or power loss during an upload ends it (the bootloader's network stack is gone).
:meth:`TftpFace.uploads` lists every finished upload as a :class:`RecoveryUpload`, and
:meth:`TftpFace.wait_for_upload` waits for the next.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from unbrick.errors import DeviceError, TransportError, UnbrickError, UsageError
from unbrick.model.profile import Region
from unbrick.sim.device import SimDevice
from unbrick.sim.firmware import check_boot
from unbrick.sim.flash import PowerLoss, pad_to_page, skip_bad_spans
from unbrick.transports.tftp.codec import (
    MAX_BLKSIZE,
    MIN_BLKSIZE,
    Error,
    ErrorCode,
    MalformedPacket,
    OptionAck,
    Request,
    ServerLimits,
    ack_bytes,
    decode,
    encode,
    error_bytes,
    negotiate,
)
from unbrick.transports.tftp.transfer import (
    Cancelled,
    Channel,
    LossHook,
    Timing,
    TransferRefused,
    dally,
    receive_stream,
)

log = logging.getLogger(__name__)

#: The largest block a small router's TFTP stack takes (U-Boot's cap; one Ethernet frame).
ROUTER_BLKSIZE_MAX = 1468
#: Bytes programmed per flash operation (a power cut strikes one of these).
PROGRAM_CHUNK_BYTES = 64 * 1024
_ACCEPT_POLL_S = 0.1
_RECV_BYTES = 65536 + 4


@dataclass(frozen=True)
class TftpFaceConfig:
    """Behaviour and timing of the TFTP face (short timeouts in tests)."""

    #: Largest ``blksize`` granted.
    blksize_max: int = ROUTER_BLKSIZE_MAX
    #: First retransmission timeout (the client's ``timeout`` option overrides it).
    timeout_s: float = 1.0
    #: Retransmissions before an upload is given up.
    retries: int = 5
    #: After the final ACK: answer a repeated last block until none came for this long.
    dally_s: float = 1.0
    #: A device running its firmware answers ERROR 2 (True) or nothing at all (False).
    answer_in_firmware: bool = False
    #: Restart the device after a written image (False: stay in the bootloader).
    reboot: bool = True
    #: Test hook: ``loss(direction, datagram) -> True`` drops the datagram (both directions).
    loss: LossHook | None = None

    def __post_init__(self) -> None:
        if not MIN_BLKSIZE <= self.blksize_max <= MAX_BLKSIZE:
            raise UsageError(f"blksize_max must be {MIN_BLKSIZE}..{MAX_BLKSIZE}")
        if self.timeout_s <= 0 or self.retries < 0 or self.dally_s < 0:
            raise UsageError("the TFTP face needs a positive timeout and non-negative retries")


@dataclass(frozen=True)
class ImageVerdict:
    """What the bootloader made of an uploaded image."""

    ok: bool
    #: Why it was refused ("" when ok).
    reason: str = ""
    version: str | None = None


@dataclass(frozen=True)
class RecoveryUpload:
    """One finished upload (refused, failed or flashed)."""

    client: tuple[str, int]
    filename: str
    size_bytes: int
    blksize: int
    duration_s: float
    #: The image passed the bootloader's check.
    accepted: bool
    #: The image was written completely.
    flashed: bool
    #: Why the upload was refused or failed ("" when flashed).
    error: str
    #: Firmware version of the image (from its info block), when it has one.
    version: str | None
    #: Region written (or that would have been).
    region: str | None
    retransmits: int


# -- the bootloader's check (pure) -----------------------------------------------------------


def check_recovery_image(
    image: bytes,
    *,
    model: str,
    hw_revision: str,
    min_security_version: int,
    capacity_bytes: int,
) -> ImageVerdict:
    """Check ``image`` as a router's recovery bootloader does before it writes it."""
    if len(image) > capacity_bytes:
        return ImageVerdict(
            False,
            f"image of {len(image)} bytes does not fit the {capacity_bytes}-byte firmware "
            "partition",
        )
    result = check_boot(
        image,
        min_security_version=min_security_version,
        model=model,
        hw_revision=hw_revision,
    )
    info = result.info
    version = info.version if info else None
    if result.outcome == "bad":
        lines = [line.strip() for line in result.lines if line.strip()]
        failures = [line for line in lines if line != "ERROR: can't get kernel image!"]
        reason = failures[-1] if failures else "not a firmware image"
        return ImageVerdict(False, reason, version)
    if info is None:
        return ImageVerdict(False, f"no firmware info block: not a {model} image")
    if info.model != model:
        return ImageVerdict(False, f"image is for {info.model}, this board is {model}", version)
    if info.hw_revisions and hw_revision not in info.hw_revisions:
        return ImageVerdict(
            False,
            f"image supports hardware {', '.join(info.hw_revisions)}, this board is {hw_revision}",
            version,
        )
    return ImageVerdict(True, "", version)


# -- the server ------------------------------------------------------------------------------


class _Session:
    """One running upload: its key (client, request datagram), stop event and socket."""

    def __init__(self, key: tuple[tuple[str, int], bytes]) -> None:
        self.key = key
        self.stop = threading.Event()
        self.sock: socket.socket | None = None

    def cancel(self) -> None:
        self.stop.set()
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)


class TftpFace:
    """The TFTP recovery server of one device, on one UDP port; ``stop()`` is clean."""

    def __init__(
        self,
        device: SimDevice,
        host: str = "127.0.0.1",
        port: int = 0,
        config: TftpFaceConfig | None = None,
        *,
        stopping: threading.Event | None = None,
    ) -> None:
        self.device = device
        self.host = host
        self.port = port
        self.config = config or TftpFaceConfig()
        self._stopping = stopping or threading.Event()
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._session: _Session | None = None
        self._threads: list[threading.Thread] = []
        self._uploads: list[RecoveryUpload] = []
        self._stopped = False

    # -- life cycle -------------------------------------------------------------------------

    def start(self) -> int:
        """Bind the UDP port and serve in a background thread; returns the bound port.
        Raises OSError when the port cannot be bound."""
        if self._sock is not None:
            return self.port
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.bind((self.host, self.port))
        except OSError:
            sock.close()
            raise
        sock.settimeout(_ACCEPT_POLL_S)
        self._sock = sock
        self.port = int(sock.getsockname()[1])
        self._spawn(self._serve, sock, name=f"sim-tftp-{self.device.name}")
        return self.port

    def stop(self, timeout_s: float = 5.0) -> None:
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            session = self._session
            threads = list(self._threads)
        self._stopping.set()
        if session is not None:
            session.cancel()
        if self._sock is not None:
            self._sock.close()
        current = threading.current_thread()
        for thread in threads:
            if thread is not current:
                thread.join(timeout_s)

    def _spawn(self, target: Callable[..., None], *args: Any, name: str) -> threading.Thread:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
        thread.start()
        return thread

    # -- results ----------------------------------------------------------------------------

    def uploads(self) -> list[RecoveryUpload]:
        """Every finished upload, oldest first."""
        with self._lock:
            return list(self._uploads)

    def wait_for_upload(self, timeout_s: float, *, after: int = 0) -> RecoveryUpload:
        """The first upload that finishes after ``after`` earlier ones (by default the
        first); DeviceError when none finishes within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while len(self._uploads) <= after:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise DeviceError(
                        f"sim {self.device.name}: no TFTP upload finished within {timeout_s:g} s"
                    )
                self._cond.wait(left)
            return self._uploads[after]

    def _record(self, upload: RecoveryUpload) -> None:
        with self._cond:
            self._uploads.append(upload)
            self._cond.notify_all()

    # -- requests ---------------------------------------------------------------------------

    def _serve(self, sock: socket.socket) -> None:
        while not self._stopping.is_set():
            try:
                datagram, peer = sock.recvfrom(_RECV_BYTES)
            except TimeoutError:
                continue
            except OSError:
                return
            client = (str(peer[0]), int(peer[1]))
            loss = self.config.loss
            if loss is not None and loss("in", datagram):
                continue
            try:
                self._handle(sock, datagram, client)
            except Exception:
                log.exception("sim %s: TFTP request from %s:%d failed", self.device.name, *client)

    def _reply(self, sock: socket.socket, client: tuple[str, int], datagram: bytes) -> None:
        loss = self.config.loss
        if loss is not None and loss("out", datagram):
            return
        with contextlib.suppress(OSError):
            sock.sendto(datagram, client)

    def _handle(self, sock: socket.socket, datagram: bytes, client: tuple[str, int]) -> None:
        dev = self.device
        state = dev.state
        if state != "bootloader":
            if state == "firmware" and self.config.answer_in_firmware:
                message = "device is running its firmware: no recovery server"
                self._reply(sock, client, error_bytes(ErrorCode.ACCESS_VIOLATION, message))
            else:
                log.debug("sim %s: TFTP request ignored in state %s", dev.name, state)
            return
        try:
            packet = decode(datagram)
        except MalformedPacket as e:
            log.info("sim %s: malformed TFTP request from %s:%d: %s", dev.name, *client, e)
            if datagram[:2] != b"\0\5":
                self._reply(sock, client, error_bytes(ErrorCode.ILLEGAL_OPERATION, "malformed"))
            return
        if not isinstance(packet, Request):
            if not isinstance(packet, (Error, OptionAck)):
                self._reply(sock, client, error_bytes(ErrorCode.UNKNOWN_TID, "no such transfer"))
            return
        if packet.is_read:
            log.info("sim %s: TFTP read of %r refused", dev.name, packet.filename)
            self._reply(sock, client, error_bytes(ErrorCode.ACCESS_VIOLATION, "Access violation"))
            return
        if packet.mode != "octet":
            text = f"{packet.mode} mode is not supported: send the image in octet (binary) mode"
            self._reply(sock, client, error_bytes(ErrorCode.ILLEGAL_OPERATION, text))
            return
        key = (client, datagram)
        with self._lock:
            if self._stopped:
                return
            if self._session is not None:
                if self._session.key != key:
                    busy = "busy: another image is being uploaded"
                    self._reply(sock, client, error_bytes(ErrorCode.NOT_DEFINED, busy))
                return
            session = self._session = _Session(key)
        self._spawn(self._run_upload, session, packet, client, name=f"sim-tftp-{client[1]}")

    # -- one upload -------------------------------------------------------------------------

    def _target(self) -> Region:
        """The firmware region a recovery image goes to (the active slot on A/B kinds)."""
        cfg = self.device.config
        if cfg.ab:
            return cfg.slot_region(self.device.boot_state().active_slot)
        region = cfg.find_region("firmware")
        if region is None:
            raise DeviceError(f"sim {self.device.name} has no firmware region")
        return region

    def _capacity(self, region: Region) -> int:
        geo = self.device.config.geometry
        spans, _ = skip_bad_spans(geo, region.offset, region.size, region.end)
        good = sum(n for _, n in spans)
        if geo.type == "nand":
            good -= good % geo.page_bytes
        return good

    def _run_upload(self, session: _Session, request: Request, client: tuple[str, int]) -> None:
        dev = self.device
        cfg = self.config
        started = time.monotonic()
        buf = bytearray()
        blksize = 512
        accepted = flashed = False
        error = ""
        version: str | None = None
        region: Region | None = None
        retransmits = 0

        def on_power_loss() -> None:
            # The bootloader's network stack is gone with the power.
            session.cancel()

        dev.add_power_listener(on_power_loss)
        sock: socket.socket | None = None
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind((self.host, 0))
            sock.connect(client)
            session.sock = sock
            if self._stopping.is_set() or dev.state != "bootloader":
                raise Cancelled("the device left its bootloader")
            ch = Channel(sock, client, loss=cfg.loss, stop=session.stop)
            try:
                region = self._target()
                capacity = self._capacity(region)
                # A small router's stack knows nothing of windows: the option is not answered.
                options = tuple((k, v) for k, v in request.options if k != "windowsize")
                decision = negotiate(
                    replace(request, options=options),
                    file_size=None,
                    limits=ServerLimits(
                        blksize_max=cfg.blksize_max,
                        windowsize_max=1,
                        window_bytes_max=0,
                        max_upload_bytes=capacity,
                    ),
                )
                if decision.error is not None:
                    ch.send_error(decision.error.code, decision.error.message)
                    raise TransferRefused(decision.error.message, code=decision.error.code)
                opts = decision.options
                blksize = opts.blksize
                timing = Timing.make(float(opts.timeout_s or cfg.timeout_s), cfg.retries)
                target = region

                def complete(total: int) -> None:
                    nonlocal accepted, version
                    if opts.tsize is not None and total != opts.tsize:
                        raise TransferRefused(
                            f"received {total} bytes, the client announced {opts.tsize}"
                        )
                    verdict = check_recovery_image(
                        bytes(buf),
                        model=dev.config.model,
                        hw_revision=dev.config.hw_revision,
                        min_security_version=dev.config.security_version,
                        capacity_bytes=capacity,
                    )
                    version = verdict.version
                    if not verdict.ok:
                        log.info("sim %s: recovery image refused: %s", dev.name, verdict.reason)
                        raise TransferRefused(f"image refused: {verdict.reason}")
                    if dev.state != "bootloader":
                        raise TransferRefused("the device left its bootloader")
                    accepted = True
                    log.info(
                        "sim %s: recovery image %s (%d bytes) accepted for %s",
                        dev.name,
                        version,
                        total,
                        target.name,
                    )

                def write(chunk: memoryview) -> None:
                    buf.extend(chunk)

                first = encode(OptionAck(decision.oack)) if decision.oack else ack_bytes(0)
                ch.send(first)
                result = receive_stream(
                    ch,
                    write,
                    blksize=blksize,
                    windowsize=1,
                    timing=timing,
                    last_sent=first,
                    max_bytes=capacity,
                    on_complete=complete,
                )
                final = ack_bytes(result.blocks & 0xFFFF)
                dallier = None
                if cfg.dally_s > 0:
                    dallier = threading.Thread(
                        target=_dally_quietly,
                        args=(ch, final, result.blocks & 0xFFFF, cfg.dally_s),
                        name=f"sim-tftp-dally-{client[1]}",
                        daemon=True,
                    )
                    dallier.start()
                try:
                    self._flash(target, bytes(buf))
                    flashed = True
                finally:
                    if dallier is not None:
                        dallier.join()
            finally:
                retransmits = ch.counters.retransmits
        except PowerLoss as e:
            error = f"power lost while writing the image: {e.message}"
            log.info("sim %s: %s", dev.name, error)
        except Cancelled as e:
            error = e.message
        except TransferRefused as e:
            error = e.message
        except (TransportError, DeviceError) as e:
            error = e.message
            log.info("sim %s: TFTP recovery upload failed: %s", dev.name, e.message)
        except OSError as e:
            error = f"socket error: {e}"
            log.info("sim %s: TFTP recovery upload failed: %s", dev.name, e)
        finally:
            dev.remove_power_listener(on_power_loss)
            with self._lock:
                if self._session is session:
                    self._session = None
            if sock is not None:
                sock.close()
            self._record(
                RecoveryUpload(
                    client=client,
                    filename=request.filename,
                    size_bytes=len(buf),
                    blksize=blksize,
                    duration_s=time.monotonic() - started,
                    accepted=accepted,
                    flashed=flashed,
                    error=error,
                    version=version,
                    region=region.name if region else None,
                    retransmits=retransmits,
                )
            )
        if flashed and cfg.reboot and not self._stopping.is_set():
            log.info("sim %s: recovery image written; restarting", dev.name)
            try:
                dev.reset()
            except UnbrickError as e:
                log.info("sim %s: restart after recovery failed: %s", dev.name, e.message)

    def _flash(self, region: Region, image: bytes) -> None:
        """Erase the erase blocks ``image`` needs at the start of ``region`` and program it,
        skipping bad blocks (NAND), through the device (faults apply)."""
        dev = self.device
        geo = dev.config.geometry
        data = pad_to_page(geo, image)
        eb = geo.erase_block_bytes
        needed = -(-max(len(data), 1) // eb) * eb
        erase_spans, _ = skip_bad_spans(geo, region.offset, needed, region.end)
        for start, n in erase_spans:
            for pos in range(start, start + n, eb):
                dev.erase(pos, eb)
        spans, missing = skip_bad_spans(geo, region.offset, len(data), region.end)
        if missing:
            raise DeviceError(f"the image does not fit region {region.name}")
        at = 0
        for start, n in spans:
            for pos in range(0, n, PROGRAM_CHUNK_BYTES):
                k = min(PROGRAM_CHUNK_BYTES, n - pos)
                dev.program(start + pos, data[at : at + k])
                at += k


def _dally_quietly(ch: Channel, final: bytes, block: int, quiet_s: float) -> None:
    """:func:`dally`, ending quietly when the socket goes away (a power cut, the end)."""
    with contextlib.suppress(TransportError, OSError):
        dally(ch, final, block, quiet_s)


__all__ = [
    "ROUTER_BLKSIZE_MAX",
    "ImageVerdict",
    "RecoveryUpload",
    "TftpFace",
    "TftpFaceConfig",
    "check_recovery_image",
]
