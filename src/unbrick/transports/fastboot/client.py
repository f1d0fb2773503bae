"""The host side of fastboot: commands and data phases over any :class:`Link`.

One :class:`FastbootClient` drives one device session: ``getvar`` (``all`` included),
``download`` within ``max-download-size``, ``flash`` (images larger than the limit are
re-sparsed into pieces that fit, each flashed in turn, as fastboot does), ``erase``,
``set_active``, the reboot variants, ``oem`` commands from an allow-list only, ``upload`` and
``fetch`` for backups. INFO and TEXT responses are passed to ``on_info`` and restart the
response timeout (a device flashing slow media keeps the session alive that way). A FAIL
becomes a :class:`FastbootFailure`; a broken link a ``TransportError``.
"""

from __future__ import annotations

import enum
import io
import logging
import re
import time
from collections.abc import Callable, Collection
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from unbrick.errors import DeviceError, ImageError, PreflightError, SourceError, UsageError
from unbrick.transports.fastboot import protocol as p
from unbrick.transports.fastboot.links import DATA_CHUNK, Link, file_size

if TYPE_CHECKING:
    from unbrick.formats import sparse

#: Android sparse image magic, little-endian (``unbrick.formats.sparse`` parses the rest; it is
#: imported only for sparse images, to keep a raw flash's start-up short).
_SPARSE_MAGIC = b"\x3a\xff\x26\xed"
_SPARSE_HEADER_BYTES = 28

log = logging.getLogger(__name__)

#: Called with the bytes just sent or received in a data phase.
ProgressCallback = Callable[[int], None]
#: Called with each INFO/TEXT message of the device.
InfoCallback = Callable[[str], None]

#: Bytes sent per message when a file goes out in one data phase (progress granularity).
_SEND_SLICE = 16 << 20
#: Raw ranges of a sparse piece at least this long are sent from the file (sendfile on
#: TCP); shorter ones are copied into the next message with the headers around them.
_DIRECT_MIN = 64 << 10

#: ``oem`` commands that are never sent, whatever an allow-list says: unbrick does not unlock or
#: relock bootloaders (unlocking wipes user data; relocking over custom images bricks phones).
_NEVER_OEM = re.compile(r"lock", re.IGNORECASE)
_HARMLESS_LOCK = re.compile(r"block|clock", re.IGNORECASE)

LOCKED_HINT = (
    "unbrick never unlocks a bootloader. To unlock it yourself: enable 'OEM unlocking' in "
    "Android's Developer options, boot to fastboot, run 'fastboot flashing unlock' (older "
    "devices: 'fastboot oem unlock') and confirm on the device. Unlocking erases all user data"
)


class FastbootFailure(DeviceError):
    """The device answered FAIL. ``reason`` is its text; ``command`` what was sent."""

    def __init__(self, message: str, *, command: str, reason: str, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.command = command
        self.reason = reason


def locked_refusal(what: str, device: str) -> PreflightError:
    """The error for a locked bootloader (nothing was written)."""
    return PreflightError(
        f"the bootloader of {device} is locked: it refuses to {what}",
        check_id="bootloader-unlocked",
        overridable=False,
        hint=LOCKED_HINT,
    )


def looks_locked(reason: str) -> bool:
    """True when a FAIL text blames the lock state ("Flashing is not allowed in Lock State")."""
    return bool(_NEVER_OEM.search(_HARMLESS_LOCK.sub("", reason)))


class RebootTarget(enum.Enum):
    SYSTEM = "reboot"
    BOOTLOADER = "reboot-bootloader"
    FASTBOOTD = "reboot-fastboot"
    RECOVERY = "reboot-recovery"


@dataclass(frozen=True)
class ClientOptions:
    """Timeouts of a session, in seconds, and the block size used when re-sparsing."""

    #: Time for a response; each INFO/TEXT restarts it (fastboot's host waits 30 s).
    command_timeout_s: float = 30.0
    #: Time for one send or receive of a data phase.
    data_timeout_s: float = 60.0
    #: Slowest device write rate assumed when a flash's response timeout is derived from size.
    min_flash_bytes_per_s: int = 2 << 20
    sparse_block_bytes: int = 4096


@dataclass(frozen=True)
class CommandResult:
    """What an OKAY carried and the INFO/TEXT messages before it."""

    value: str
    info: tuple[str, ...] = ()


@dataclass
class PreparedImage:
    """An image ready for flashing: sent as is, or as sparse pieces under the limit."""

    file: BinaryIO
    #: Size of the file.
    size: int
    #: Size once written (a sparse image's expanded size; the file size otherwise).
    image_bytes: int
    is_sparse: bool
    #: Pieces to send one after another, or None to send the file as it is.
    pieces: list[sparse.SparsePiece] | None

    @property
    def wire_bytes(self) -> int:
        """Bytes the data phases carry."""
        if self.pieces is None:
            return self.size
        return sum(piece.size for piece in self.pieces)


@dataclass(frozen=True)
class FlashReport:
    partition: str
    image_bytes: int
    sent_bytes: int
    pieces: int
    sparse: bool
    seconds: float
    info: tuple[str, ...] = ()


class _DataWriter:
    """A write-only file that sends what it is given as download data, in large messages."""

    def __init__(
        self, link: Link, timeout_s: float, progress: ProgressCallback | None, cap: int
    ) -> None:
        self.link = link
        self.timeout_s = timeout_s
        self.progress = progress
        self.cap = cap
        self.buf = bytearray()
        self.sent = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        n = len(data)
        if len(self.buf) + n > self.cap:
            self.flush()
        if n >= self.cap:
            self._send(memoryview(data))
        else:
            self.buf += data
        return n

    def _send(self, data: bytes | memoryview) -> None:
        self.link.send_data(data, self.timeout_s)
        self.sent += len(data)
        if self.progress is not None:
            self.progress(len(data))

    def flush(self) -> None:
        if self.buf:
            self._send(bytes(self.buf))
            self.buf.clear()

    def seekable(self) -> bool:
        return False


class FastbootClient:
    """A fastboot session over ``link``. Not thread-safe: one command at a time."""

    def __init__(
        self,
        link: Link,
        *,
        options: ClientOptions | None = None,
        on_info: InfoCallback | None = None,
    ) -> None:
        self.link = link
        self.options = options or ClientOptions()
        self.on_info = on_info
        self._max_download: int | None = None
        self._info: list[str] = []

    @property
    def description(self) -> str:
        return self.link.description

    def close(self) -> None:
        self.link.close()

    # ---------------------------------------------------------------------------------------
    # Commands

    def _responses(self, command: str, timeout_s: float) -> p.Response:
        """Read responses until a final one; INFO/TEXT go to ``on_info`` and restart the clock."""
        while True:
            response = p.parse_response(self.link.recv_message(timeout_s))
            if response.final:
                return response
            log.debug("%s: %s %s", self.description, response.kind.value, response.message)
            self._info.append(response.message)
            if self.on_info is not None:
                self.on_info(response.message)

    def _failure(self, command: str, reason: str) -> FastbootFailure:
        hint = LOCKED_HINT if looks_locked(reason) else None
        return FastbootFailure(
            f"fastboot device {self.description} refused '{command}': {reason or 'FAIL'}",
            command=command,
            reason=reason,
            hint=hint,
        )

    def _send_command(self, command: str, timeout_s: float) -> p.Response:
        payload = p.encode_command(command)
        self._info = []
        self.link.send_message(payload, self.options.command_timeout_s)
        return self._responses(command, timeout_s)

    def command(self, command: str, *, timeout_s: float | None = None) -> CommandResult:
        """Send ``command``; its OKAY value, or FastbootFailure for a FAIL."""
        response = self._send_command(command, timeout_s or self.options.command_timeout_s)
        return self._finish(command, response)

    def _finish(self, command: str, response: p.Response) -> CommandResult:
        if response.kind is p.ResponseKind.FAIL:
            raise self._failure(command, response.message)
        if response.kind is not p.ResponseKind.OKAY:
            raise p.FastbootProtocolError(
                f"fastboot device {self.description} answered '{command}' with "
                f"{response.kind.value}, expected OKAY or FAIL"
            )
        return CommandResult(response.message, tuple(self._info))

    def getvar(self, name: str) -> str:
        return self.command(f"getvar:{name}").value.strip()

    def getvar_optional(self, name: str) -> str | None:
        """The variable, or None when the device does not know it (FAIL or empty OKAY)."""
        try:
            value = self.getvar(name)
        except FastbootFailure:
            return None
        return value or None

    def getvar_all(self) -> dict[str, str]:
        """Every variable of ``getvar all`` (from its INFO lines)."""
        result = self.command("getvar:all")
        return p.parse_getvar_all(result.info)

    def max_download_size(self) -> int:
        """``max-download-size`` (0 when the device does not say; cached per session)."""
        if self._max_download is None:
            text = self.getvar_optional("max-download-size")
            size = 0
            if text:
                try:
                    size = p.parse_number(text, "max-download-size")
                except p.FastbootProtocolError:
                    log.warning("%s: unreadable max-download-size %r", self.description, text)
            self._max_download = min(size, p.MAX_DOWNLOAD_BYTES)
        return self._max_download

    # ---------------------------------------------------------------------------------------
    # Data phases

    def _begin_download(self, size: int) -> None:
        limit = self.max_download_size()
        if limit and size > limit:
            raise UsageError(
                f"{size} bytes do not fit the device's max-download-size of {limit}",
                hint="flash() splits large images into sparse pieces",
            )
        command = f"download:{size:08x}"
        response = self._send_command(command, self.options.command_timeout_s)
        if response.kind is p.ResponseKind.FAIL:
            raise self._failure(command, response.message)
        if response.kind is not p.ResponseKind.DATA or response.size != size:
            raise p.FastbootProtocolError(
                f"fastboot device {self.description} answered '{command}' with "
                f"{response.kind.value}{response.message}, expected DATA{size:08x}"
            )

    def _end_data(self, command: str) -> CommandResult:
        return self._finish(command, self._responses(command, self.options.command_timeout_s))

    def download(
        self, data: bytes | memoryview, *, progress: ProgressCallback | None = None
    ) -> CommandResult:
        """Download ``data`` to the device's staging buffer."""
        self._begin_download(len(data))
        view = memoryview(data)
        for at in range(0, len(view), _SEND_SLICE):
            piece = view[at : at + _SEND_SLICE]
            self.link.send_data(piece, self.options.data_timeout_s)
            if progress is not None:
                progress(len(piece))
        return self._end_data("download")

    def download_file(
        self, f: BinaryIO, offset: int, size: int, *, progress: ProgressCallback | None = None
    ) -> CommandResult:
        """Download ``size`` bytes of ``f`` from ``offset`` (sendfile where the link can)."""
        self._begin_download(size)
        done = 0
        while done < size:
            n = min(_SEND_SLICE, size - done)
            self.link.send_file(f, offset + done, n, self.options.data_timeout_s)
            done += n
            if progress is not None:
                progress(n)
        return self._end_data("download")

    def _download_piece(
        self, piece: sparse.SparsePiece, f: BinaryIO, progress: ProgressCallback | None
    ) -> CommandResult:
        """Send one sparse piece: its headers from memory, its raw data straight from ``f``
        (sendfile on TCP), so that no copy of the data is made here."""
        from unbrick.formats import sparse  # noqa: PLC0415 - only for split images

        self._begin_download(piece.size)
        writer = _DataWriter(self.link, self.options.data_timeout_s, progress, DATA_CHUNK * 4)
        timeout = self.options.data_timeout_s
        for seg in piece.segments():
            if isinstance(seg, bytes):
                writer.write(seg)
                continue
            offset, length = seg
            if length < _DIRECT_MIN:
                f.seek(offset)
                writer.write(f.read(length))
                continue
            writer.flush()
            done = 0
            while done < length:
                n = min(_SEND_SLICE, length - done)
                self.link.send_file(f, offset + done, n, timeout)
                writer.sent += n
                done += n
                if progress is not None:
                    progress(n)
        writer.flush()
        if writer.sent != piece.size:
            raise ImageError(
                f"sparse piece {piece.index} came out at {writer.sent} bytes, not {piece.size}",
                format=sparse.FORMAT,
            )
        return self._end_data("download")

    def upload(self, out: BinaryIO, *, progress: ProgressCallback | None = None) -> int:
        """``upload``: read what the last command staged on the device into ``out``."""
        return self._read_data("upload", out, progress)

    def _read_data(self, command: str, out: BinaryIO, progress: ProgressCallback | None) -> int:
        response = self._send_command(command, self.options.command_timeout_s)
        if response.kind is p.ResponseKind.FAIL:
            raise self._failure(command, response.message)
        if response.kind is not p.ResponseKind.DATA or response.size is None:
            raise p.FastbootProtocolError(
                f"fastboot device {self.description} answered '{command}' with "
                f"{response.kind.value}, expected DATA"
            )
        size = response.size
        for piece in self.link.recv_data(size, self.options.data_timeout_s):
            out.write(piece)
            if progress is not None:
                progress(len(piece))
        self._end_data(command)
        return size

    def fetch(
        self,
        partition: str,
        out: BinaryIO,
        *,
        offset: int = 0,
        size: int,
        progress: ProgressCallback | None = None,
    ) -> int:
        """Read ``size`` bytes of ``partition`` from ``offset`` with ``fetch`` (in pieces of
        ``max-fetch-size``); DeviceError when the device has no fetch command."""
        limit_text = self.getvar_optional("max-fetch-size")
        limit = p.parse_number(limit_text, "max-fetch-size") if limit_text else 0
        if limit <= 0:
            raise DeviceError(
                f"fastboot device {self.description} cannot read partitions back (no fetch)",
                hint="back up this device another way (from Android, or its vendor's tool)",
            )
        done = 0
        while done < size:
            n = min(limit, size - done)
            command = p.fetch_command(partition, offset + done, n).decode()
            got = self._read_data(command, out, progress)
            if got != n:
                raise p.FastbootProtocolError(
                    f"fastboot device {self.description} sent {got} bytes for '{command}'"
                )
            done += n
        return done

    # ---------------------------------------------------------------------------------------
    # Images

    def prepare_image(self, image: Path | BinaryIO | bytes, stack: ExitStack) -> PreparedImage:
        """Open ``image`` and decide how it goes out (whole, or sparse pieces under the limit).

        Files opened here are closed by ``stack``.
        """
        if isinstance(image, bytes | bytearray):
            f: BinaryIO = io.BytesIO(image)
        elif isinstance(image, Path):
            try:
                f = stack.enter_context(image.open("rb"))
            except OSError as e:
                raise SourceError(f"cannot open image {image}: {e.strerror}") from e
        else:
            f = image
        size = file_size(f)
        if size <= 0:
            raise UsageError("the image is empty", hint="check the file")
        f.seek(0)
        head = f.read(_SPARSE_HEADER_BYTES)
        is_sparse = False
        image_bytes = size
        if head[:4] == _SPARSE_MAGIC:
            from unbrick.formats import sparse  # noqa: PLC0415 - only for sparse images

            try:
                header = sparse.parse_header(head)
            except ImageError:
                pass
            else:
                is_sparse = True
                image_bytes = header.expanded_size
        limit = self.max_download_size() or p.MAX_DOWNLOAD_BYTES
        pieces = None
        if size > limit:
            from unbrick.formats import sparse  # noqa: PLC0415 - only to split images
            from unbrick.formats.base import Context, Source  # noqa: PLC0415

            src = Source(f, size=size, name=str(image) if isinstance(image, Path) else "")
            pieces = sparse.split_sparse(
                src, limit, Context(), block_size=self.options.sparse_block_bytes
            )
        return PreparedImage(f, size, image_bytes, is_sparse, pieces)

    def _flash_timeout(self, nbytes: int) -> float:
        return self.options.command_timeout_s + nbytes / max(1, self.options.min_flash_bytes_per_s)

    def flash_prepared(
        self,
        partition: str,
        prepared: PreparedImage,
        *,
        progress: ProgressCallback | None = None,
    ) -> FlashReport:
        started = time.monotonic()
        info: list[str] = []
        command = f"flash:{partition}"
        if prepared.pieces is None:
            self.download_file(prepared.file, 0, prepared.size, progress=progress)
            result = self.command(command, timeout_s=self._flash_timeout(prepared.image_bytes))
            info.extend(result.info)
            count = 1
        else:
            count = len(prepared.pieces)
            for piece in prepared.pieces:
                log.debug(
                    "%s: sparse piece %d/%d, %d bytes",
                    self.description,
                    piece.index + 1,
                    count,
                    piece.size,
                )
                self._download_piece(piece, prepared.file, progress)
                result = self.command(command, timeout_s=self._flash_timeout(piece.size))
                info.extend(result.info)
        return FlashReport(
            partition=partition,
            image_bytes=prepared.image_bytes,
            sent_bytes=prepared.wire_bytes,
            pieces=count,
            sparse=prepared.is_sparse or prepared.pieces is not None,
            seconds=time.monotonic() - started,
            info=tuple(info),
        )

    def flash(
        self,
        partition: str,
        image: Path | BinaryIO | bytes,
        *,
        progress: ProgressCallback | None = None,
    ) -> FlashReport:
        """Download ``image`` (raw or sparse; split when over max-download-size) and flash it."""
        with ExitStack() as stack:
            prepared = self.prepare_image(image, stack)
            return self.flash_prepared(partition, prepared, progress=progress)

    def erase(self, partition: str) -> CommandResult:
        return self.command(f"erase:{partition}", timeout_s=self.options.command_timeout_s * 4)

    def set_active(self, slot: str) -> CommandResult:
        return self.command(f"set_active:{slot.removeprefix('_')}")

    def reboot(self, target: RebootTarget = RebootTarget.SYSTEM) -> CommandResult:
        """Reboot; the device answers OKAY and leaves (the link is then useless)."""
        result = self.command(target.value)
        self._max_download = None
        return result

    def oem(self, command: str, allowed: Collection[str]) -> CommandResult:
        """``oem COMMAND`` if its first word (or the whole command) is in ``allowed``.

        Commands that unlock or relock the bootloader are refused whatever ``allowed`` says.
        """
        text = " ".join(command.split())
        if not text:
            raise UsageError("an empty oem command")
        if _NEVER_OEM.search(_HARMLESS_LOCK.sub("", text)):
            raise UsageError(
                f"'oem {text}' would change the bootloader's lock state; unbrick never does that",
                hint=LOCKED_HINT,
            )
        word = text.split(" ", 1)[0]
        if text not in allowed and word not in allowed:
            raise UsageError(
                f"'oem {text}' is not in this device's allow-list of oem commands",
                hint="allowed: " + (", ".join(sorted(allowed)) or "none"),
            )
        return self.command(f"oem {text}", timeout_s=self.options.command_timeout_s * 2)
