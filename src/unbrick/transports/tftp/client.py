"""A TFTP client: pull a file from a server, or push one to a device whose recovery mode is a
TFTP server (many routers listen on 192.168.1.1:69 for a ``put`` of the firmware).

Options (blksize, windowsize, tsize) are asked for and used when the server acknowledges them
with an OACK. A server that ignores options answers with DATA 1 (read) or ACK 0 (write) and
the transfer falls back to RFC 1350 (512-byte blocks, lock-step). A server that rejects them
with an ERROR is asked once more without options. ``tsize`` is checked: a read that ends with
another size than the server announced is an error and leaves no file behind.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from unbrick.errors import SourceError, TransportError, UsageError
from unbrick.transports.tftp.codec import (
    DEFAULT_BLKSIZE,
    MAX_BLKSIZE,
    MAX_WINDOWSIZE,
    MIN_BLKSIZE,
    Ack,
    Data,
    Error,
    ErrorCode,
    MalformedPacket,
    NetasciiDecoder,
    Opcode,
    OptionAck,
    OptionError,
    Request,
    TftpRemoteError,
    TransferOptions,
    accept_oack,
    ack_bytes,
    decode,
    encode,
    error_bytes,
    netascii_encode,
    request_options,
)
from unbrick.transports.tftp.transfer import (
    Channel,
    LossHook,
    ProgressHook,
    Timing,
    receive_stream,
    send_stream,
)

log = logging.getLogger(__name__)

DEFAULT_PORT = 69
#: Memory a window may hold (blksize x windowsize); the client refuses more.
MAX_WINDOW_BYTES = 64 << 20
_SOCKET_BUFFER_BYTES = 4 << 20


@dataclass(frozen=True)
class TransferResult:
    """A finished client transfer."""

    server: tuple[str, int]
    remote: str
    size_bytes: int
    duration_s: float
    options: TransferOptions
    #: True when the server acknowledged options (OACK); False when it ignored them.
    negotiated: bool
    retransmits: int

    @property
    def bytes_per_s(self) -> float:
        return self.size_bytes / self.duration_s if self.duration_s > 0 else 0.0


def _check_params(blksize: int, windowsize: int, mode: str) -> None:
    if not MIN_BLKSIZE <= blksize <= MAX_BLKSIZE:
        raise UsageError(f"blksize {blksize} is outside {MIN_BLKSIZE}..{MAX_BLKSIZE}")
    if not 1 <= windowsize <= MAX_WINDOWSIZE:
        raise UsageError(f"windowsize {windowsize} is outside 1..{MAX_WINDOWSIZE}")
    if blksize * windowsize > MAX_WINDOW_BYTES:
        raise UsageError(
            f"a window of {windowsize} x {blksize} bytes is more than {MAX_WINDOW_BYTES} bytes"
        )
    if mode not in ("octet", "netascii"):
        raise UsageError(f"TFTP mode {mode!r} is not octet or netascii")


def _resolve(host: str, port: int) -> tuple[socket.AddressFamily, tuple[str, int]]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except socket.gaierror as e:
        raise TransportError(
            f"cannot resolve TFTP server {host!r}: {e.strerror}", hint="check the host name"
        ) from e
    family, _, _, _, address = infos[0]
    return family, (str(address[0]), int(address[1]))


class _Session:
    """The request phase: send RRQ/WRQ from a fresh port and wait for the first answer from
    the server's new transfer ID; then the socket is connected to that ID."""

    def __init__(self, host: str, port: int, *, timing: Timing, loss: LossHook | None) -> None:
        family, self.server = _resolve(host, port)
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            with contextlib.suppress(OSError):
                self.sock.setsockopt(socket.SOL_SOCKET, option, _SOCKET_BUFFER_BYTES)
        # Unbound: the first send binds an ephemeral port, the client's transfer ID.
        self.timing = timing
        self.loss = loss
        self.retransmits = 0

    def close(self) -> None:
        self.sock.close()

    def _send(self, datagram: bytes, to: tuple[str, int]) -> None:
        if self.loss is not None and self.loss("out", datagram):
            return
        try:
            self.sock.sendto(datagram, to)
        except OSError as e:
            raise TransportError(
                f"cannot send to TFTP server {to[0]}:{to[1]}: {e.strerror or e}"
            ) from e

    def request(self, datagram: bytes) -> tuple[bytes, tuple[str, int]]:
        """Send the request until a packet from the server's host answers it."""
        wait = self.timing.timeout_s
        tries = 0
        self._send(datagram, self.server)
        deadline = time.monotonic() + wait
        while True:
            remaining = deadline - time.monotonic()
            if remaining > 0:
                self.sock.settimeout(remaining)
                try:
                    answer, peer = self.sock.recvfrom(65536 + 4)
                except TimeoutError:
                    answer, peer = b"", None
                except ConnectionRefusedError:
                    answer, peer = b"", None
                except OSError as e:
                    raise TransportError(f"TFTP request to {self.server[0]} failed: {e}") from e
                if peer is not None:
                    peer = (str(peer[0]), int(peer[1]))
                    if self.loss is not None and self.loss("in", answer):
                        continue
                    if peer[0] == self.server[0] and len(answer) >= 4:
                        return answer, peer
                    continue
            tries += 1
            if tries > self.timing.retries:
                raise TransportError(
                    f"no answer from TFTP server {self.server[0]}:{self.server[1]} "
                    f"after {tries} requests",
                    hint="check the address and port, and that the device is in its "
                    "TFTP recovery mode",
                )
            wait = min(wait * 2, self.timing.max_backoff_s)
            deadline = time.monotonic() + wait
            self._send(datagram, self.server)
            self.retransmits += 1

    def channel(self, peer: tuple[str, int]) -> Channel:
        try:
            self.sock.connect(peer)
        except OSError as e:
            raise TransportError(f"cannot connect to TFTP peer {peer[0]}:{peer[1]}: {e}") from e
        return Channel(self.sock, peer, loss=self.loss)

    def reject(self, peer: tuple[str, int], code: int, message: str) -> None:
        with contextlib.suppress(TransportError):
            self._send(error_bytes(code, message), peer)


def _first_answer(
    session: _Session, request: Request
) -> tuple[object, bytes, tuple[str, int], Request]:
    """Send ``request`` (once more without options if the server refuses them) and return the
    decoded first answer, its datagram, the server's transfer ID and the request that was
    answered."""
    for attempt in (request, Request(request.opcode, request.filename, request.mode)):
        datagram, peer = session.request(encode(attempt))
        try:
            packet = decode(datagram)
        except MalformedPacket as e:
            session.reject(peer, ErrorCode.ILLEGAL_OPERATION, e.message)
            raise TransportError(
                f"TFTP server {peer[0]}:{peer[1]} answered with a malformed packet: {e.message}"
            ) from e
        if isinstance(packet, Error):
            if attempt.options and packet.code in (
                ErrorCode.OPTION_REFUSED,
                ErrorCode.NOT_DEFINED,
                ErrorCode.ILLEGAL_OPERATION,
            ):
                log.info(
                    "TFTP server %s:%d refused options (%s); retrying without them",
                    *peer,
                    packet.describe(),
                )
                continue
            raise TftpRemoteError(
                f"TFTP server {peer[0]}:{peer[1]} refused {request.filename!r}: "
                f"{packet.describe()}",
                code=packet.code,
            )
        return packet, datagram, peer, attempt
    raise TransportError(f"TFTP server refused {request.filename!r} with and without options")


def tftp_get(
    host: str,
    port: int,
    remote: str,
    local: Path | BinaryIO,
    *,
    blksize: int = 1468,
    windowsize: int = 1,
    timeout_s: float = 1.0,
    retries: int = 5,
    mode: str = "octet",
    request_tsize: bool = True,
    timeout_option: int | None = None,
    loss: LossHook | None = None,
    on_progress: ProgressHook | None = None,
) -> TransferResult:
    """Read ``remote`` from the TFTP server at ``host:port`` into ``local``.

    ``local`` is a path (written to a temporary file beside it and renamed into place only
    when complete and of the announced size) or a writable binary stream. ``timeout_option``
    asks the server for that retransmission timeout (RFC 2349).
    """
    _check_params(blksize, windowsize, mode)
    timing = Timing.make(timeout_s, retries)
    asked = request_options(
        blksize=blksize,
        windowsize=windowsize,
        timeout_s=timeout_option,
        tsize=0 if request_tsize and mode == "octet" else None,
    )
    started = time.monotonic()
    if isinstance(local, Path):
        directory = local.parent if str(local.parent) else Path(".")
        try:
            fd, temp = tempfile.mkstemp(prefix=f".{local.name}.", suffix=".part", dir=directory)
        except OSError as e:
            raise SourceError(f"cannot write into {directory}: {e.strerror}") from e
        out: BinaryIO = open(fd, "wb", buffering=1 << 20)  # noqa: SIM115
    else:
        temp = ""
        out = local
    done = False
    session = _Session(host, port, timing=timing, loss=loss)
    try:
        request = Request(Opcode.RRQ, remote, mode, asked)
        packet, datagram, peer, answered = _first_answer(session, request)
        decoder = NetasciiDecoder() if mode == "netascii" else None
        write: Callable[[memoryview], object]
        if decoder is not None:
            write = lambda chunk: out.write(decoder.feed(bytes(chunk)))  # noqa: E731
        elif temp:
            write = out.write
        else:
            # The chunk is a view of the receive buffer: a caller's stream gets its own copy.
            write = lambda chunk: out.write(bytes(chunk))  # noqa: E731
        if isinstance(packet, OptionAck):
            try:
                options = accept_oack(packet, answered.options, is_read=True)
            except OptionError as e:
                session.reject(peer, ErrorCode.OPTION_REFUSED, e.message)
                raise
            ch = session.channel(peer)
            first_ack = ack_bytes(0)
            ch.send(first_ack)
            result = receive_stream(
                ch,
                write,
                blksize=options.blksize,
                windowsize=options.windowsize,
                timing=_timing(timing, options),
                last_sent=first_ack,
                on_progress=on_progress,
            )
            negotiated = True
        elif isinstance(packet, Data) and packet.block == 1:
            options = TransferOptions()
            ch = session.channel(peer)
            result = receive_stream(
                ch,
                write,
                blksize=DEFAULT_BLKSIZE,
                windowsize=1,
                timing=timing,
                last_sent=ack_bytes(0),
                first=datagram,
                on_progress=on_progress,
            )
            negotiated = False
        else:
            session.reject(peer, ErrorCode.ILLEGAL_OPERATION, "expected DATA 1 or OACK")
            raise TransportError(
                f"TFTP server {peer[0]}:{peer[1]} answered a read with {type(packet).__name__}"
            )
        if decoder is not None:
            out.write(decoder.finish())
        if options.tsize is not None and result.size_bytes != options.tsize:
            raise TransportError(
                f"TFTP read of {remote!r} ended after {result.size_bytes} bytes, but the "
                f"server announced {options.tsize}",
                hint="the file changed on the server, or the server is faulty; retry",
            )
        if temp:
            try:
                out.flush()
                os.fsync(out.fileno())
                out.close()
                os.replace(temp, local)  # type: ignore[arg-type]
            except OSError as e:
                raise SourceError(f"cannot store {local}: {e.strerror}") from e
        done = True
        return TransferResult(
            server=peer,
            remote=remote,
            size_bytes=result.size_bytes,
            duration_s=time.monotonic() - started,
            options=options,
            negotiated=negotiated,
            retransmits=session.retransmits + result.retransmits,
        )
    finally:
        session.close()
        if temp:
            if not out.closed:
                out.close()
            if not done:
                with contextlib.suppress(OSError):
                    os.unlink(temp)


def _size_of(source: Path | BinaryIO | bytes) -> int | None:
    if isinstance(source, bytes):
        return len(source)
    if isinstance(source, Path):
        try:
            return source.stat().st_size
        except OSError as e:
            raise SourceError(f"cannot read {source}: {e.strerror}") from e
    try:
        if source.seekable():
            here = source.tell()
            end = source.seek(0, os.SEEK_END)
            source.seek(here)
            return end - here
    except (OSError, ValueError):
        return None
    return None


def tftp_put(
    host: str,
    port: int,
    remote: str,
    local: Path | BinaryIO | bytes,
    *,
    blksize: int = 1468,
    windowsize: int = 1,
    timeout_s: float = 1.0,
    retries: int = 5,
    mode: str = "octet",
    send_tsize: bool = True,
    timeout_option: int | None = None,
    window_bytes_max: int = 128 * 1024,
    loss: LossHook | None = None,
    on_progress: ProgressHook | None = None,
) -> TransferResult:
    """Write ``local`` (a path, a readable binary stream, or bytes) to ``remote`` on the TFTP
    server at ``host:port``; returns once the server acknowledged the last block.

    The windowsize asked for is cut so that a window carries at most ``window_bytes_max``
    bytes (0: no cap): a burst larger than the receiver's socket buffer is partly dropped on
    every window, and the transfer crawls.
    """
    _check_params(blksize, windowsize, mode)
    if window_bytes_max > 0:
        windowsize = min(windowsize, max(1, window_bytes_max // blksize))
    timing = Timing.make(timeout_s, retries)
    started = time.monotonic()
    stack = contextlib.ExitStack()
    with stack:
        source: BinaryIO
        if isinstance(local, bytes):
            source = io.BytesIO(local)
        elif isinstance(local, Path):
            try:
                # Closed by the ExitStack.
                source = stack.enter_context(open(local, "rb", buffering=1 << 20))  # noqa: SIM115
            except OSError as e:
                raise SourceError(f"cannot read {local}: {e.strerror}") from e
        else:
            source = local
        size = _size_of(local) if mode == "octet" else None
        if mode == "netascii":
            source = io.BytesIO(netascii_encode(source.read()))
            size = len(source.getvalue())
        asked = request_options(
            blksize=blksize,
            windowsize=windowsize,
            timeout_s=timeout_option,
            tsize=size if send_tsize else None,
        )
        session = _Session(host, port, timing=timing, loss=loss)
        stack.callback(session.close)
        request = Request(Opcode.WRQ, remote, mode, asked)
        packet, _, peer, answered = _first_answer(session, request)
        if isinstance(packet, OptionAck):
            try:
                options = accept_oack(packet, answered.options, is_read=False)
            except OptionError as e:
                session.reject(peer, ErrorCode.OPTION_REFUSED, e.message)
                raise
            negotiated = True
        elif isinstance(packet, Ack) and packet.block == 0:
            options = TransferOptions()
            negotiated = False
        else:
            session.reject(peer, ErrorCode.ILLEGAL_OPERATION, "expected ACK 0 or OACK")
            raise TransportError(
                f"TFTP server {peer[0]}:{peer[1]} answered a write with {type(packet).__name__}"
            )
        ch = session.channel(peer)
        try:
            result = send_stream(
                ch,
                source.read,
                blksize=options.blksize,
                windowsize=options.windowsize,
                timing=_timing(timing, options),
                on_progress=on_progress,
            )
        except OSError as e:
            raise SourceError(f"cannot read the file to send: {e}") from e
        return TransferResult(
            server=peer,
            remote=remote,
            size_bytes=result.size_bytes,
            duration_s=time.monotonic() - started,
            options=options,
            negotiated=negotiated,
            retransmits=session.retransmits + result.retransmits,
        )


def _timing(base: Timing, options: TransferOptions) -> Timing:
    if options.timeout_s is None:
        return base
    return Timing.make(float(options.timeout_s), base.retries)


__all__ = ["DEFAULT_PORT", "TransferResult", "tftp_get", "tftp_put"]
