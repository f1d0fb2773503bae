"""A TFTP server for devices that pull files (U-Boot ``tftpboot``, routers in TFTP-client
recovery) and, when allowed, push backups (U-Boot ``tftpput``).

Each request is served by its own thread from its own socket on an ephemeral port (the
transfer ID of RFC 1350), connected to the client so that the kernel filters strays and a
vanished client ends the session at once. Files are served from ``root`` only: names with
``..`` components, absolute names, names with NUL or control characters, and names that
resolve (through symlinks) outside ``root`` are refused with an ERROR packet and logged. Writes
are refused unless ``allow_write``; an upload goes to a temporary file in the target's
directory and replaces the target only once it is complete (and, with ``tsize``, of the
announced size).
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import selectors
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from unbrick.errors import TransportError, UsageError
from unbrick.transports.tftp.codec import (
    MAX_BLKSIZE,
    ErrorCode,
    MalformedPacket,
    NetasciiDecoder,
    OptionAck,
    Request,
    ServerLimits,
    TransferOptions,
    ack_bytes,
    decode,
    encode,
    error_bytes,
    negotiate,
    netascii_encode,
)
from unbrick.transports.tftp.transfer import (
    Cancelled,
    Channel,
    LossHook,
    Timing,
    TransferRefused,
    await_reply,
    dally,
    receive_stream,
    remote_error,
    send_stream,
)

log = logging.getLogger(__name__)

#: Socket buffers asked for each session (the kernel caps them at its maximum).
SOCKET_BUFFER_BYTES = 4 << 20
#: Largest file served in netascii mode (it is converted in memory to know its size).
MAX_NETASCII_BYTES = 64 << 20
_READ_BUFFER_BYTES = 1 << 20


class PathRefused(TransportError):
    """A requested name is not a file this server may serve or write; ``code`` is the TFTP
    error code sent to the client."""

    default_hint = "ask for a file by its path relative to the server's root"

    def __init__(self, message: str, *, code: int = ErrorCode.ACCESS_VIOLATION) -> None:
        super().__init__(message)
        self.code = code


def check_name(name: str) -> tuple[str, ...]:
    """The path components of a requested name, or PathRefused (pure; no file system).

    Refused: empty names, absolute names, ``..`` components, NUL and other control
    characters. ``.`` and empty components (``a//b``) are dropped.
    """
    if not name:
        raise PathRefused("empty file name")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        raise PathRefused(f"file name {name!r} contains a NUL or control character")
    if name.startswith("/"):
        raise PathRefused(f"absolute file name {name!r}")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise PathRefused(f"file name {name!r} escapes the root with '..'")
    if not parts:
        raise PathRefused(f"file name {name!r} names no file")
    return parts


def _inside(root: str, path: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _fd_path(fd: int) -> str | None:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None


def open_for_read(root: str, name: str) -> tuple[BinaryIO, int, str]:
    """Open ``root/name`` for reading; ``root`` must be a resolved (real) path.

    Returns the open file, its size and its resolved path. Symlinks are followed only while
    they stay inside root, and the opened descriptor is checked again, so a link swapped in
    between does not let a file outside root out.
    """
    parts = check_name(name)
    real = os.path.realpath(os.path.join(root, *parts))
    if not _inside(root, real):
        raise PathRefused(f"{name!r} resolves outside the root")
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(real, flags)
    except FileNotFoundError as e:
        raise PathRefused(f"{name!r} does not exist", code=ErrorCode.FILE_NOT_FOUND) from e
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise PathRefused(f"{name!r} is a symlink that changed while opening") from e
        raise PathRefused(f"{name!r} cannot be opened: {e.strerror}") from e
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise PathRefused(f"{name!r} is not a regular file", code=ErrorCode.FILE_NOT_FOUND)
        actual = _fd_path(fd)
        if actual is not None and not _inside(root, actual):
            raise PathRefused(f"{name!r} was opened outside the root")
        os.set_blocking(fd, True)
        return open(fd, "rb", buffering=_READ_BUFFER_BYTES, closefd=True), info.st_size, real
    except BaseException:
        with contextlib.suppress(OSError):
            os.close(fd)
        raise


def target_for_write(root: str, name: str, *, overwrite: bool) -> str:
    """The path an upload of ``name`` will replace; its directory must exist inside root."""
    parts = check_name(name)
    parent = os.path.realpath(os.path.join(root, *parts[:-1]))
    if not _inside(root, parent):
        raise PathRefused(f"{name!r} resolves outside the root")
    if not os.path.isdir(parent):
        raise PathRefused(f"the directory of {name!r} does not exist")
    target = os.path.join(parent, parts[-1])
    if os.path.islink(target):
        raise PathRefused(f"{name!r} is a symlink; uploads do not follow links")
    if os.path.lexists(target):
        if not overwrite:
            raise PathRefused(f"{name!r} already exists", code=ErrorCode.FILE_EXISTS)
        if not os.path.isfile(target):
            raise PathRefused(f"{name!r} is not a regular file")
    return target


@dataclass(frozen=True)
class TransferRecord:
    """One finished (or failed) transfer, as the server saw it."""

    client: tuple[str, int]
    filename: str
    #: "read" (a client pulled a file) or "write" (a client pushed one).
    direction: str
    mode: str
    options: TransferOptions
    size_bytes: int
    duration_s: float
    ok: bool
    error: str = ""
    retransmits: int = 0
    path: str = ""


@dataclass
class _Outcome:
    """What a session learned while it ran (filled in step by step, read for the record)."""

    options: TransferOptions = field(default_factory=TransferOptions)
    size_bytes: int = 0
    path: str = ""
    #: After an upload: the final ACK and its block, to repeat while dallying.
    final_ack: tuple[bytes, int] | None = None


@dataclass(eq=False)
class _Session:
    key: tuple[tuple[str, int], bytes]
    thread: threading.Thread | None = None
    sock: socket.socket | None = None
    started: float = field(default_factory=time.monotonic)


class TftpServer:
    """Serve files from ``root`` over TFTP until :meth:`stop`.

    ``port=0`` binds an ephemeral port (see :attr:`address`). ``loss`` is a test hook that
    may drop datagrams in either direction (called from session threads). Finished transfers
    are kept in :meth:`records` and passed to ``on_transfer`` (from the session's thread).
    """

    def __init__(
        self,
        root: Path,
        *,
        host: str,
        port: int = 0,
        allow_write: bool = False,
        overwrite: bool = False,
        max_sessions: int = 64,
        timeout_s: float = 1.0,
        retries: int = 5,
        max_backoff_s: float | None = None,
        blksize_max: int = MAX_BLKSIZE,
        windowsize_max: int = 64,
        window_bytes_max: int = 128 * 1024,
        max_upload_bytes: int = 8 << 30,
        dally_s: float | None = None,
        loss: LossHook | None = None,
        on_transfer: Callable[[TransferRecord], None] | None = None,
    ) -> None:
        if not root.is_dir():
            raise UsageError(f"TFTP root {root} is not a directory")
        if not 8 <= blksize_max <= MAX_BLKSIZE:
            raise UsageError(f"blksize limit {blksize_max} is outside 8..{MAX_BLKSIZE}")
        if max_sessions < 1 or windowsize_max < 1:
            raise UsageError("max_sessions and windowsize_max must be at least 1")
        self.root = Path(os.path.realpath(root))
        self.host = host
        self.port = port
        self.allow_write = allow_write
        self.overwrite = overwrite
        self.max_sessions = max_sessions
        self.timing = Timing.make(timeout_s, retries, max_backoff_s)
        self.limits = ServerLimits(
            blksize_max=blksize_max,
            windowsize_max=windowsize_max,
            window_bytes_max=window_bytes_max,
            max_upload_bytes=max_upload_bytes,
        )
        # U-Boot repeats an unacknowledged block after 5 s (its TFTP timeout): dally longer.
        self.dally_s = max(6.0, self.timing.max_backoff_s) if dally_s is None else dally_s
        self.loss = loss
        self.on_transfer = on_transfer
        self._sock: socket.socket | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        # Sessions running a transfer (counted against max_sessions), and every session whose
        # socket is still open (a finished upload dallies a while): stop() wakes those.
        self._sessions: dict[tuple[tuple[str, int], bytes], _Session] = {}
        self._live: set[_Session] = set()
        self._records: list[TransferRecord] = []
        self._records_changed = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._wake: tuple[socket.socket, socket.socket] | None = None

    # --- life cycle ---------------------------------------------------------------------------

    @property
    def address(self) -> tuple[str, int]:
        if self._sock is None:
            raise UsageError("the TFTP server is not started")
        name = self._sock.getsockname()
        return str(name[0]), int(name[1])

    def _family(self) -> socket.AddressFamily:
        return socket.AF_INET6 if ":" in self.host else socket.AF_INET

    def bind(self) -> tuple[str, int]:
        """Bind the request socket (without serving yet) and return the bound address."""
        if self._sock is None:
            sock = socket.socket(self._family(), socket.SOCK_DGRAM)
            try:
                # No SO_REUSEADDR: for UDP it would let two servers share the port silently.
                sock.bind((self.host, self.port))
            except OSError as e:
                sock.close()
                raise TransportError(
                    f"cannot listen on {self.host}:{self.port}: {e.strerror}",
                    hint="pick another port, or stop the program that uses it",
                ) from e
            sock.setblocking(False)
            self._sock = sock
            self._wake = socket.socketpair()
            log.info("TFTP server on %s:%d serving %s", *self.address, self.root)
        return self.address

    def start(self) -> tuple[str, int]:
        """Bind and serve in a background thread; returns the bound address."""
        address = self.bind()
        if self._thread is None:
            self._thread = threading.Thread(
                target=self.serve_forever, name=f"tftp-server-{address[1]}", daemon=True
            )
            self._thread.start()
        return address

    def serve_forever(self) -> None:
        """Serve requests in the calling thread until :meth:`stop`."""
        self.bind()
        assert self._sock is not None and self._wake is not None
        wake = self._wake[0]
        with selectors.DefaultSelector() as selector:
            selector.register(self._sock, selectors.EVENT_READ)
            selector.register(wake, selectors.EVENT_READ)
            while not self._stop.is_set():
                for key, _ in selector.select():
                    if key.fileobj is wake:
                        return
                    self._drain()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop accepting requests, cancel running sessions and wait for their threads."""
        self._stop.set()
        if self._wake is not None:
            with contextlib.suppress(OSError):
                self._wake[1].send(b"x")
        with self._lock:
            sessions = list(self._live)
        for session in sessions:
            if session.sock is not None:
                with contextlib.suppress(OSError):
                    session.sock.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + timeout_s
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(max(0.0, deadline - time.monotonic()))
        for session in sessions:
            if session.thread is not None:
                session.thread.join(max(0.0, deadline - time.monotonic()))
        if self._sock is not None:
            self._sock.close()
        if self._wake is not None:
            for end in self._wake:
                end.close()

    def __enter__(self) -> TftpServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- records ------------------------------------------------------------------------------

    def records(self) -> list[TransferRecord]:
        with self._lock:
            return list(self._records)

    def active_sessions(self) -> int:
        with self._lock:
            return len(self._sessions)

    def wait_for_transfer(
        self, filename: str, *, timeout_s: float, direction: str | None = None
    ) -> TransferRecord:
        """Block until a transfer of ``filename`` has finished (ok or not); TransportError
        after ``timeout_s``. Use it to know when a device has pulled its image."""
        deadline = time.monotonic() + timeout_s
        with self._records_changed:
            while True:
                for record in self._records:
                    if record.filename == filename and direction in (None, record.direction):
                        return record
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TransportError(
                        f"no TFTP transfer of {filename!r} within {timeout_s:g} s",
                        hint="check that the device can reach this server and asks for "
                        "this file name",
                    )
                self._records_changed.wait(remaining)

    def _record(self, record: TransferRecord) -> None:
        with self._records_changed:
            self._records.append(record)
            self._records_changed.notify_all()
        if self.on_transfer is not None:
            try:
                self.on_transfer(record)
            except Exception:
                log.exception("on_transfer callback failed")

    # --- requests -----------------------------------------------------------------------------

    def _drain(self) -> None:
        assert self._sock is not None
        for _ in range(64):
            try:
                datagram, client = self._sock.recvfrom(65536 + 4)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if self._stop.is_set():
                    return
                log.debug("TFTP request socket: %s", e)
                return
            client = (str(client[0]), int(client[1]))
            if self.loss is not None and self.loss("in", datagram):
                continue
            try:
                self._handle(datagram, client)
            except Exception:
                log.exception("TFTP request from %s:%d failed", *client)

    def _reply(self, client: tuple[str, int], datagram: bytes) -> None:
        assert self._sock is not None
        if self.loss is not None and self.loss("out", datagram):
            return
        with contextlib.suppress(OSError):
            self._sock.sendto(datagram, client)

    def _handle(self, datagram: bytes, client: tuple[str, int]) -> None:
        try:
            packet = decode(datagram)
        except MalformedPacket as e:
            log.warning("malformed TFTP request from %s:%d: %s", *client, e.message)
            if len(datagram) < 2 or datagram[:2] != b"\0\5":
                # A short, fixed answer: junk must not be answered with more bytes than needed.
                self._reply(client, error_bytes(ErrorCode.ILLEGAL_OPERATION, "malformed"))
            return
        if not isinstance(packet, Request):
            if not isinstance(packet, (OptionAck,)) and datagram[:2] != b"\0\5":
                self._reply(client, error_bytes(ErrorCode.UNKNOWN_TID, "no such transfer"))
            return
        key = (client, datagram)
        with self._lock:
            if key in self._sessions:
                log.debug("duplicate request from %s:%d ignored", *client)
                return
            if len(self._sessions) >= self.max_sessions:
                log.warning(
                    "TFTP request from %s:%d dropped: %d sessions running",
                    *client,
                    len(self._sessions),
                )
                return
            session = _Session(key)
            self._sessions[key] = session
            self._live.add(session)
        thread = threading.Thread(
            target=self._run_session,
            args=(session, packet, client),
            name=f"tftp-{client[0]}:{client[1]}",
            daemon=True,
        )
        session.thread = thread
        thread.start()

    # --- sessions -----------------------------------------------------------------------------

    def _open_session_socket(self, client: tuple[str, int]) -> socket.socket:
        sock = socket.socket(self._family(), socket.SOCK_DGRAM)
        try:
            for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER_BYTES)
            sock.bind((self.host, 0))
            sock.connect(client)
        except OSError:
            sock.close()
            raise
        return sock

    def _run_session(self, session: _Session, request: Request, client: tuple[str, int]) -> None:
        started = time.monotonic()
        direction = "read" if request.is_read else "write"
        outcome = _Outcome()
        ok = False
        error = ""
        retransmits = 0
        try:
            sock = self._open_session_socket(client)
        except OSError as e:
            log.warning("cannot open a TFTP session socket for %s:%d: %s", *client, e)
            self._finish(session, closed=True)
            return
        session.sock = sock
        if self._stop.is_set():
            sock.close()
            self._finish(session, closed=True)
            return
        ch = Channel(sock, client, loss=self.loss, stop=self._stop)
        with self._lock:
            if len(self._sessions) > 1:
                # Polling for ACKs pays off for one transfer; several share one interpreter.
                ch.spin_attempts = 0
        try:
            if request.is_read:
                self._serve_read(ch, request, outcome)
            else:
                self._serve_write(ch, request, outcome)
            ok = True
        except PathRefused as e:
            error = e.message
            log.warning(
                "refused TFTP %s of %r from %s:%d: %s",
                direction,
                request.filename,
                *client,
                e.message,
            )
            ch.send_error(e.code, e.message)
        except Cancelled as e:
            error = e.message
        except TransportError as e:
            error = e.message
            log.warning(
                "TFTP %s of %r from %s:%d failed: %s",
                direction,
                request.filename,
                *client,
                e.message,
            )
        except Exception as e:
            error = f"internal error: {type(e).__name__}: {e}"
            log.exception("TFTP session for %s:%d failed", *client)
            ch.send_error(ErrorCode.NOT_DEFINED, "server error")
        finally:
            retransmits = ch.counters.retransmits
            self._finish(session)
            options = outcome.options
            size = outcome.size_bytes
            record = TransferRecord(
                client=client,
                filename=request.filename,
                direction=direction,
                mode=request.mode,
                options=options,
                size_bytes=size,
                duration_s=time.monotonic() - started,
                ok=ok,
                error=error,
                retransmits=retransmits,
                path=outcome.path,
            )
            if ok:
                log.info(
                    "TFTP %s of %r by %s:%d: %d bytes in %.3f s (blksize %d, windowsize %d)",
                    direction,
                    request.filename,
                    *client,
                    size,
                    record.duration_s,
                    options.blksize,
                    options.windowsize,
                )
            self._record(record)
            if ok and outcome.final_ack is not None:
                # The record is out; answer a lost final ACK's retransmissions a while longer.
                with contextlib.suppress(TransportError):
                    dally(ch, *outcome.final_ack, self.dally_s)
            sock.close()
            self._finish(session, closed=True)

    def _finish(self, session: _Session, *, closed: bool = False) -> None:
        with self._lock:
            if self._sessions.get(session.key) is session:
                del self._sessions[session.key]
            if closed:
                self._live.discard(session)

    def _timing_for(self, options: TransferOptions) -> Timing:
        if options.timeout_s is None:
            return self.timing
        return Timing.make(float(options.timeout_s), self.timing.retries)

    def _serve_read(self, ch: Channel, request: Request, outcome: _Outcome) -> None:
        if request.mode == "mail":
            raise PathRefused("mail mode is not supported", code=ErrorCode.ILLEGAL_OPERATION)
        f, size, outcome.path = open_for_read(str(self.root), request.filename)
        with f:
            reader: BinaryIO = f
            if request.mode == "netascii":
                if size > MAX_NETASCII_BYTES:
                    raise PathRefused(
                        f"{request.filename!r} is too large for netascii mode",
                        code=ErrorCode.ACCESS_VIOLATION,
                    )
                converted = netascii_encode(f.read())
                reader = io.BytesIO(converted)
                size = len(converted)
            decision = negotiate(request, file_size=size, limits=self.limits)
            if decision.error is not None:
                raise PathRefused(decision.error.message, code=decision.error.code)
            options = decision.options
            outcome.options = options
            timing = self._timing_for(options)
            if decision.oack:
                await_reply(
                    ch,
                    encode(OptionAck(decision.oack)),
                    lambda datagram: _ack0(datagram, ch.peer),
                    timing=timing,
                    what="did not acknowledge the options",
                )
            result = send_stream(
                ch,
                reader.read,
                blksize=options.blksize,
                windowsize=options.windowsize,
                timing=timing,
            )
            outcome.size_bytes = result.size_bytes

    def _serve_write(self, ch: Channel, request: Request, outcome: _Outcome) -> None:
        if not self.allow_write:
            raise PathRefused("uploads are disabled on this server (start it with allow_write)")
        if request.mode == "mail":
            raise PathRefused("mail mode is not supported", code=ErrorCode.ILLEGAL_OPERATION)
        target = target_for_write(str(self.root), request.filename, overwrite=self.overwrite)
        outcome.path = target
        decision = negotiate(request, file_size=None, limits=self.limits)
        if decision.error is not None:
            raise PathRefused(decision.error.message, code=decision.error.code)
        options = decision.options
        outcome.options = options
        timing = self._timing_for(options)
        directory, base = os.path.split(target)
        fd, temp = tempfile.mkstemp(prefix=f".{base}.", suffix=".part", dir=directory)
        committed = False
        try:
            with open(fd, "wb", buffering=_READ_BUFFER_BYTES) as out:
                decoder = NetasciiDecoder() if request.mode == "netascii" else None
                write: Callable[[memoryview], object]
                if decoder is not None:
                    write = lambda chunk: out.write(decoder.feed(bytes(chunk)))  # noqa: E731
                else:
                    write = out.write

                def complete(total: int) -> None:
                    if options.tsize is not None and total != options.tsize:
                        raise TransferRefused(
                            f"received {total} bytes, the client announced {options.tsize}",
                            code=ErrorCode.NOT_DEFINED,
                        )
                    try:
                        if decoder is not None:
                            out.write(decoder.finish())
                        out.flush()
                        os.fsync(out.fileno())
                        if self.overwrite:
                            os.replace(temp, target)
                        else:
                            os.link(temp, target)
                            os.unlink(temp)
                    except FileExistsError as e:
                        raise TransferRefused(
                            f"{request.filename!r} appeared during the upload",
                            code=ErrorCode.FILE_EXISTS,
                        ) from e
                    except OSError as e:
                        raise TransferRefused(
                            f"cannot store {request.filename!r}: {e.strerror}",
                            code=ErrorCode.DISK_FULL,
                        ) from e

                first = encode(OptionAck(decision.oack)) if decision.oack else ack_bytes(0)
                ch.send(first)
                result = receive_stream(
                    ch,
                    write,
                    blksize=options.blksize,
                    windowsize=options.windowsize,
                    timing=timing,
                    last_sent=first,
                    max_bytes=self.limits.max_upload_bytes,
                    on_complete=complete,
                )
                committed = True
                outcome.size_bytes = result.size_bytes
                outcome.final_ack = (ack_bytes(result.blocks & 0xFFFF), result.blocks & 0xFFFF)
        finally:
            if not committed:
                with contextlib.suppress(OSError):
                    os.unlink(temp)


def _ack0(datagram: bytes, peer: tuple[str, int]) -> bool | None:
    """Accepts the ACK 0 that answers the OACK of a read (for :func:`await_reply`)."""
    if datagram == b"\0\4\0\0":
        return True
    if datagram[:2] == b"\0\5":
        err = remote_error(datagram, peer)
        if err.code == ErrorCode.OPTION_REFUSED:
            raise Cancelled(f"client refused the options: {err.message}")
        raise err
    return None


__all__ = [
    "PathRefused",
    "TftpServer",
    "TransferRecord",
    "check_name",
    "open_for_read",
    "target_for_write",
]
