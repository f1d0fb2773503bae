"""XMODEM/YMODEM over a real byte link: the drivers of the machines in ``xymodem``.

A :class:`ByteLink` is anything with ``read(n, timeout_s)`` (between 1 and ``n`` bytes as soon
as any are there, ``b""`` when ``timeout_s`` passes first) and ``write(data)``. Two are here:
:class:`SerialLink` over a pyserial port (``/dev/ttyUSB0``, ``socket://``, ``rfc2217://``) and
:class:`FdLink` over file descriptors (a pty master, a pipe pair, a socket). The console driver
hands the link over once U-Boot's ``loadx``/``loady`` has printed its "Ready for binary"
line, and takes it back afterwards (U-Boot then prints its summary; after ``loadx`` one stray
ACK byte may precede it).

The send path writes each block with one ``write`` and reads the one-byte answer with one
``read``: no per-byte Python work, so the sender keeps up with QEMU's unthrottled UART.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from unbrick.errors import SourceError, TransportError, UnbrickError, UsageError
from unbrick.transports.xymodem import (
    Action,
    Event,
    FileData,
    FileEnd,
    FileInfo,
    FileStart,
    OutgoingFile,
    Receiver,
    Sender,
    Variant,
)

log = logging.getLogger(__name__)

Clock = Callable[[], float]
Progress = Callable[[int], None]
DataSource = bytes | bytearray | memoryview | BinaryIO

#: Bound on the bytes thrown away when the machine asks to discard buffered input.
_MAX_DRAIN_BYTES = 1 << 20


class ByteLink(Protocol):
    """A bidirectional byte stream with a read timeout."""

    def read(self, n: int, timeout_s: float) -> bytes:
        """Between 1 and ``n`` bytes as soon as any are available; ``b""`` after ``timeout_s``."""
        ...

    def write(self, data: bytes) -> None:
        """Send all of ``data``."""
        ...


class SerialPortLike(Protocol):
    """The part of a pyserial ``Serial`` object the link uses."""

    timeout: float | None

    @property
    def in_waiting(self) -> int: ...

    def read(self, size: int = 1) -> bytes: ...

    def write(self, data: bytes, /) -> int | None: ...


class SerialLink:
    """A :class:`ByteLink` over an open pyserial port (any URL pyserial opens).

    pyserial re-applies the port settings whenever ``timeout`` changes, so the timeout is
    rounded up to 10 ms steps and only set when it differs.
    """

    def __init__(self, port: SerialPortLike) -> None:
        self._port = port
        self._timeout: float | None = None

    def read(self, n: int, timeout_s: float) -> bytes:
        timeout = max(0.0, -(-timeout_s // 0.01) * 0.01)
        if self._timeout is None or abs(self._timeout - timeout) > 1e-9:
            self._port.timeout = timeout
            self._timeout = timeout
        first = self._port.read(1)
        if not first or n <= 1:
            return bytes(first)
        chunks = [bytes(first)]
        got = 1
        while got < n:
            waiting = self._port.in_waiting
            if waiting <= 0:
                break
            more = self._port.read(min(waiting, n - got))
            if not more:
                break
            chunks.append(bytes(more))
            got += len(more)
        return b"".join(chunks)

    def write(self, data: bytes) -> None:
        self._port.write(data)


class FdLink:
    """A :class:`ByteLink` over file descriptors: a pty master, a pair of pipes, a socket.

    The descriptors stay the caller's (not closed, flags untouched). End of file on the read
    side (the peer closed its end, or a pty whose other side is gone) raises TransportError.
    """

    def __init__(self, read_fd: int, write_fd: int | None = None) -> None:
        self._rfd = read_fd
        self._wfd = read_fd if write_fd is None else write_fd

    def read(self, n: int, timeout_s: float) -> bytes:
        ready, _, _ = select.select([self._rfd], [], [], max(timeout_s, 0.0))
        if not ready:
            return b""
        try:
            data = os.read(self._rfd, n)
        except BlockingIOError:
            return b""
        except OSError as e:
            # A pty master reads EIO once no process holds the other side open.
            raise TransportError(f"the link was closed by the other side ({e})") from e
        if not data:
            raise TransportError("the link was closed by the other side (end of file)")
        return data

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                written = os.write(self._wfd, view)
            except BlockingIOError:
                select.select([], [self._wfd], [], 1.0)
                continue
            view = view[written:]


# --- the drive loop ------------------------------------------------------------------------------


class _Machine(Protocol):
    @property
    def finished(self) -> bool: ...

    def describe(self) -> str: ...

    def start(self, now_s: float) -> Action: ...

    def receive(self, data: bytes, now_s: float) -> Action: ...

    def timeout(self, now_s: float) -> Action: ...

    def cancel(self) -> bytes: ...


def _drain(link: ByteLink) -> None:
    dropped = 0
    while dropped < _MAX_DRAIN_BYTES:
        data = link.read(4096, 0.0)
        if not data:
            break
        dropped += len(data)
    if dropped:
        log.debug("discarded %d buffered bytes", dropped)


def _drive(
    link: ByteLink,
    machine: _Machine,
    clock: Clock,
    on_events: Callable[[tuple[Event, ...]], None] | None = None,
    on_step: Callable[[], None] | None = None,
    pending: bytes = b"",
) -> None:
    """Run ``machine`` over ``link`` until it finishes; raise its error, cancel on any other.

    ``pending``: bytes already read from the link by the caller, handled before reading more.
    """
    action_error: TransportError | None = None
    try:
        action = machine.start(clock())
        while True:
            if action.flush_input:
                _drain(link)
            if action.events and on_events is not None:
                on_events(action.events)
            if action.send:
                link.write(action.send)
            if action.error is not None:
                action_error = action.error
                raise action.error
            if action.deadline_s is None:
                return
            if on_step is not None:
                on_step()
            deadline = action.deadline_s
            want = action.want_bytes
            while True:
                if pending:
                    data, pending = pending, b""
                    action = machine.receive(data, clock())
                    break
                remaining = deadline - clock()
                data = link.read(want, remaining) if remaining > 0 else b""
                if data:
                    action = machine.receive(data, clock())
                    break
                now = clock()
                if now >= deadline:
                    action = machine.timeout(now)
                    break
    except OSError as e:
        _cancel_quietly(link, machine)
        raise TransportError(
            f"{machine.describe()}: the link failed: {e}",
            hint="check the cable and that no other program uses the port",
        ) from e
    except TransportError as e:
        _cancel_quietly(link, machine)
        if e is action_error:
            raise
        raise TransportError(f"{machine.describe()}: {e.message}", hint=e.hint) from e
    except BaseException:
        # The caller's callback failed, or Ctrl-C: leave the peer in a sane state.
        _cancel_quietly(link, machine)
        raise


def _cancel_quietly(link: ByteLink, machine: _Machine) -> None:
    if machine.finished:
        return  # the machine already sent its cancel (or finished cleanly)
    with contextlib.suppress(OSError, UnbrickError):
        link.write(machine.cancel())


def _as_bytes(data: DataSource, size: int | None) -> bytes:
    if isinstance(data, bytes | bytearray | memoryview):
        raw = bytes(data)
    else:
        try:
            raw = data.read() if size is None else data.read(size)
        except OSError as e:
            raise SourceError(f"cannot read the data to send: {e}") from e
    if size is not None:
        if size < 0:
            raise UsageError(f"size must be >= 0, not {size}")
        if len(raw) < size:
            raise SourceError(f"the data to send has {len(raw)} bytes, fewer than size={size}")
        raw = raw[:size]
    return raw


# --- sending -------------------------------------------------------------------------------------


def _send(
    link: ByteLink,
    sender: Sender,
    total: int,
    progress: Progress | None,
    clock: Clock,
    pending: bytes,
) -> int:
    last = -1

    def step() -> None:
        nonlocal last
        if progress is not None and sender.bytes_acked != last:
            last = sender.bytes_acked
            progress(last)

    started = clock()
    _drive(link, sender, clock, on_step=step, pending=pending)
    step()
    elapsed = max(clock() - started, 1e-9)
    log.info(
        "%s: sent %d bytes in %.2f s (%.1f KiB/s)",
        sender.variant.value,
        total,
        elapsed,
        total / elapsed / 1024,
    )
    return total


def send_xmodem(
    link: ByteLink,
    data: DataSource,
    *,
    block_size: int = 1024,
    timeout_s: float = 10.0,
    retries: int = 10,
    progress: Progress | None = None,
    settle_s: float = 1.0,
    pending: bytes = b"",
    clock: Clock = time.monotonic,
) -> int:
    """Send ``data`` by XMODEM (1K blocks by default); returns the number of data bytes sent.

    Waits up to ``timeout_s`` for the receiver's ``C`` (CRC-16) or NAK (checksum, then 128-byte
    blocks), sends the blocks, retransmits on NAK or timeout up to ``retries`` times each, and
    ends with EOT. The last block is padded with 0x1A: the receiver gets a multiple of the block
    size, so compare checksums over the real length. ``progress`` gets the bytes acknowledged.

    ``pending``: bytes the caller already read from the link after starting the receiver.
    U-Boot's first ``C`` often arrives in the same read as its "Ready for binary" line; pass
    it on, or the transfer waits ~4 s for U-Boot's next ``C``.
    """
    raw = _as_bytes(data, None)
    sender = Sender(
        Variant.XMODEM,
        [OutgoingFile(name="", data=raw)],
        block_size=block_size,
        timeout_s=timeout_s,
        retries=retries,
        settle_s=settle_s,
    )
    return _send(link, sender, len(raw), progress, clock, pending)


def send_ymodem(
    link: ByteLink,
    name: str,
    data: DataSource,
    *,
    size: int | None = None,
    block_size: int = 1024,
    timeout_s: float = 10.0,
    retries: int = 10,
    progress: Progress | None = None,
    mtime_s: int = 0,
    mode: int = 0o100644,
    settle_s: float = 1.0,
    start_grace_s: float = 0.3,
    pending: bytes = b"",
    clock: Clock = time.monotonic,
) -> int:
    """Send one file by YMODEM as a batch of one; returns the number of data bytes sent.

    Block 0 carries ``name`` and the size (``size``, or the length of ``data``), then the data
    goes in 1K blocks, then EOT until ACKed, then the empty block 0 that ends the batch.
    ``mtime_s`` and ``mode`` go into block 0 (lrzsz applies them; U-Boot ignores them);
    ``pending`` as for :func:`send_xmodem`.
    """
    raw = _as_bytes(data, size)
    return send_ymodem_batch(
        link,
        [OutgoingFile(name=name, data=raw, mtime_s=mtime_s, mode=mode)],
        block_size=block_size,
        timeout_s=timeout_s,
        retries=retries,
        progress=progress,
        settle_s=settle_s,
        start_grace_s=start_grace_s,
        clock=clock,
        pending=pending,
    )


def send_ymodem_batch(
    link: ByteLink,
    files: Sequence[OutgoingFile],
    *,
    block_size: int = 1024,
    timeout_s: float = 10.0,
    retries: int = 10,
    progress: Progress | None = None,
    settle_s: float = 1.0,
    start_grace_s: float = 0.3,
    pending: bytes = b"",
    clock: Clock = time.monotonic,
) -> int:
    """Send several files in one YMODEM batch; returns the data bytes sent over all files.

    U-Boot's ``loady`` takes one file: send it a batch of one (:func:`send_ymodem`).
    """
    if not files:
        raise UsageError("a YMODEM batch needs at least one file")
    sender = Sender(
        Variant.YMODEM,
        files,
        block_size=block_size,
        timeout_s=timeout_s,
        retries=retries,
        settle_s=settle_s,
        start_grace_s=start_grace_s,
    )
    return _send(link, sender, sum(len(f.data) for f in files), progress, clock, pending)


# --- receiving -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReceivedFile:
    """A file received by YMODEM (or XMODEM, nameless)."""

    name: str
    #: Bytes written (YMODEM: cut to the announced size).
    size_bytes: int
    #: The size announced in block 0, if any.
    declared_size: int | None
    mtime_s: int | None
    mode: int | None
    #: Where it was written when receiving into a directory; None for a callback's stream.
    path: Path | None = None


def _write(out: BinaryIO, data: bytes) -> None:
    try:
        out.write(data)
    except OSError as e:
        raise SourceError(f"cannot write the received data: {e}") from e


def receive_xmodem(
    link: ByteLink,
    out: BinaryIO,
    *,
    size: int | None = None,
    crc: bool = True,
    timeout_s: float = 10.0,
    retries: int = 10,
    max_bytes: int | None = None,
    progress: Progress | None = None,
    pending: bytes = b"",
    clock: Clock = time.monotonic,
) -> int:
    """Receive one XMODEM transfer into ``out``; returns the number of bytes written.

    XMODEM does not carry the length: without ``size`` the result keeps the sender's 0x1A
    padding (a multiple of 128 bytes); with ``size`` it is cut to ``size`` and a shorter
    transfer is an error.
    """
    receiver = Receiver(
        Variant.XMODEM, crc=crc, timeout_s=timeout_s, retries=retries, max_bytes=max_bytes
    )
    written = 0

    def on_events(events: tuple[Event, ...]) -> None:
        nonlocal written
        for event in events:
            if isinstance(event, FileData):
                chunk = event.data
                if size is not None:
                    chunk = chunk[: max(size - written, 0)]
                if chunk:
                    _write(out, chunk)
                    written += len(chunk)

    def step() -> None:
        if progress is not None:
            progress(receiver.bytes_received)

    _drive(link, receiver, clock, on_events=on_events, on_step=step, pending=pending)
    if size is not None and written < size:
        raise TransportError(
            f"XMODEM: the sender ended after {written} of the {size} bytes expected",
            hint="send the file again",
        )
    return written


def _safe_name(name: str) -> str:
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    if base in ("", ".", "..") or "\0" in base:
        raise TransportError(
            f"refusing the file name {name!r}", hint="send the file under a plain name"
        )
    return base


class _DirectorySink:
    """Writes each received file to a temporary file, renamed into place once complete."""

    def __init__(self, directory: Path) -> None:
        self._dir = directory
        self._tmp: BinaryIO | None = None
        self._tmp_path: Path | None = None
        self.final_path: Path | None = None

    def open(self, info: FileInfo) -> BinaryIO:
        final = self._dir / _safe_name(info.name)
        try:
            fd, tmp = tempfile.mkstemp(dir=self._dir, prefix=f".{final.name}.", suffix=".part")
        except OSError as e:
            raise SourceError(f"cannot create a file in {self._dir}: {e}") from e
        self._tmp = os.fdopen(fd, "wb")
        self._tmp_path = Path(tmp)
        self.final_path = final
        return self._tmp

    def commit(self, info: FileInfo) -> Path:
        assert self._tmp is not None and self._tmp_path is not None and self.final_path
        try:
            self._tmp.flush()
            os.fsync(self._tmp.fileno())
            self._tmp.close()
            if info.mtime_s:
                os.utime(self._tmp_path, (info.mtime_s, info.mtime_s))
            os.replace(self._tmp_path, self.final_path)
        except OSError as e:
            raise SourceError(f"cannot write {self.final_path}: {e}") from e
        self._tmp = None
        self._tmp_path = None
        return self.final_path

    def abort(self) -> None:
        if self._tmp is not None:
            with contextlib.suppress(OSError):
                self._tmp.close()
        if self._tmp_path is not None:
            with contextlib.suppress(OSError):
                self._tmp_path.unlink()
        self._tmp = None
        self._tmp_path = None


def receive_ymodem(
    link: ByteLink,
    directory_or_callback: Path | str | Callable[[FileInfo], BinaryIO],
    *,
    timeout_s: float = 10.0,
    retries: int = 10,
    max_bytes: int | None = None,
    progress: Progress | None = None,
    pending: bytes = b"",
    clock: Clock = time.monotonic,
) -> list[ReceivedFile]:
    """Receive a YMODEM batch; returns the files in the order received.

    Into a directory: each file is written under the last component of its name (``..``,
    empty names refused) through a temporary file that is fsynced and renamed into place when
    complete (an existing file is replaced); mtime is applied, the mode is not. With a
    callback: it gets the :class:`FileInfo` of each file and returns a writable stream, which
    stays open (the caller's). Files are cut to the size announced in block 0.
    """
    sink: _DirectorySink | None = None
    opener: Callable[[FileInfo], BinaryIO]
    if callable(directory_or_callback):
        opener = directory_or_callback
    else:
        directory = Path(directory_or_callback)
        if not directory.is_dir():
            raise SourceError(f"{directory} is not a directory")
        sink = _DirectorySink(directory)
        opener = sink.open
    receiver = Receiver(Variant.YMODEM, timeout_s=timeout_s, retries=retries, max_bytes=max_bytes)
    received: list[ReceivedFile] = []
    current: FileInfo | None = None
    stream: BinaryIO | None = None

    def on_events(events: tuple[Event, ...]) -> None:
        nonlocal current, stream
        for event in events:
            if isinstance(event, FileStart):
                current = event.info
                stream = opener(event.info)
            elif isinstance(event, FileData):
                assert stream is not None
                _write(stream, event.data)
            elif isinstance(event, FileEnd):
                assert current is not None
                path = sink.commit(current) if sink is not None else None
                received.append(
                    ReceivedFile(
                        name=current.name,
                        size_bytes=event.received_bytes,
                        declared_size=current.size_bytes,
                        mtime_s=current.mtime_s,
                        mode=current.mode,
                        path=path,
                    )
                )
                current = None
                stream = None

    def step() -> None:
        if progress is not None:
            progress(receiver.bytes_received)

    try:
        _drive(link, receiver, clock, on_events=on_events, on_step=step, pending=pending)
    finally:
        if sink is not None:
            sink.abort()
    return received
