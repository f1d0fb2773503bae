"""The two halves of a TFTP transfer, shared by the server and the client.

:func:`send_stream` sends a file as DATA blocks in windows of ``windowsize`` blocks (RFC 7440;
windowsize 1 is RFC 1350's lock-step) and :func:`receive_stream` receives one. Both work on a
:class:`Channel`: a UDP socket connected to the peer's transfer ID, with an optional loss hook
that tests use to drop packets deterministically.

Rules that keep the protocol stable under loss:

* Block numbers are tracked as absolute counts and put on the wire modulo 65536, so files of
  more than 65535 blocks roll over to block 0 (as tftp-hpa, atftp and U-Boot do).
* The sender never retransmits on a duplicate ACK, only on a timeout: answering every duplicate
  ACK doubles the traffic for the rest of the transfer (the "Sorcerer's Apprentice" bug of
  RFC 1350, fixed in RFC 1123 4.2.3.1). An ACK of a block inside the window that is not its last
  means the receiver lost the block after it: the window restarts there (RFC 7440).
* The receiver acknowledges each full window, the last (short) block, and, once until the next
  in-order block arrives, a block out of order (the last block it has in order), so a lost
  block inside a window costs one round trip instead of a timeout. In lock-step (windowsize 1)
  every duplicate block is acknowledged again.
* Retransmission timeouts back off exponentially (doubling, capped) and are counted per
  attempt; the timer does not restart on packets that make no progress.

Speed: waiting uses the kernel's receive timeout (one system call per datagram), datagrams are
received into one buffer per channel, a window leaves in one system call with UDP segmentation
offload, and the lock-step sender may poll for the ACK before it sleeps (:class:`SpinPolicy`).
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, TypeVar

from unbrick.errors import SourceError, TransportError
from unbrick.transports.tftp.codec import (
    Error,
    ErrorCode,
    MalformedPacket,
    TftpRemoteError,
    ack_bytes,
    data_header,
    decode,
    error_bytes,
)

log = logging.getLogger(__name__)

Direction = Literal["in", "out"]
#: ``loss(direction, datagram) -> True`` drops the datagram. Called from session threads: it
#: must be thread-safe when one hook serves several transfers.
LossHook = Callable[[Direction, bytes], bool]
ProgressHook = Callable[[int], None]
T = TypeVar("T")

RECV_BYTES = 65536 + 4
#: Lock-step senders try this many non-blocking receives before they sleep in the kernel...
SPIN_ATTEMPTS = 20
#: ...stop trying after this many blocks in a row whose ACK took longer (a slow link)...
SPIN_GIVE_UP = 32
#: ...and measure, every so many blocks, whether trying pays (see :class:`SpinPolicy`).
SPIN_EPOCH_BLOCKS = 512
_TIMEVAL = struct.Struct("@ll")
_DATA_HEADER = struct.Struct("!HH")
# UDP generic segmentation offload (linux/udp.h); not exported by the socket module.
_SOL_UDP = getattr(socket, "SOL_UDP", 17)
_UDP_SEGMENT = getattr(socket, "UDP_SEGMENT", 103)
_GSO_SIZE = struct.Struct("=H")
_GSO_MAX_SEGMENTS = 64
#: A GSO send must fit one IPv4 datagram: 65535 - 20 (IP) - 8 (UDP) bytes.
_GSO_MAX_BYTES = 65507
_ACK = 4
_DATA = 3
_ERROR = 5


class TransferRefused(TransportError):
    """Raised by a completion check to end a transfer with an ERROR packet instead of the
    final ACK (a size that does not match tsize, a file that cannot be committed)."""

    default_hint = "the transfer was not stored"

    def __init__(self, message: str, *, code: int = ErrorCode.NOT_DEFINED) -> None:
        super().__init__(message)
        self.code = code


class UnconfirmedEnd(TransportError):
    """Every block was sent but the last one was never acknowledged: the receiver may well have
    the whole file (its final ACK was lost and it did not wait for a repeat)."""

    default_hint = "the receiver probably has the whole file; check it before sending again"


class Cancelled(TransportError):
    """The transfer was stopped from outside (server shutdown)."""

    default_hint = "the server was stopped while the transfer ran"


class SpinPolicy:
    """Decides from measurements whether a lock-step sender polls for ACKs (pure logic).

    Polling wins on an idle machine (the ACK arrives before a sleeping thread could be woken)
    and loses on a busy one (it takes CPU time the peer needs). So the sender alternates: one
    epoch with polling, one without, then the faster way for ``exploit_epochs`` epochs, and
    measures again.
    """

    def __init__(self, attempts: int, *, exploit_epochs: int = 8) -> None:
        self.attempts = attempts
        self.exploit_epochs = exploit_epochs
        self.phase = 0
        self.with_spin_s = 0.0
        self.current = attempts

    def give_up(self) -> None:
        """Polling keeps missing (a slow link): never poll again in this transfer."""
        self.attempts = 0
        self.current = 0

    def epoch_done(self, elapsed_s: float) -> int:
        """Record how long the last epoch took; return the attempts for the next one."""
        if self.attempts == 0:
            return 0
        if self.phase == 0:
            self.with_spin_s = elapsed_s
            self.current = 0
        elif self.phase == 1:
            self.current = self.attempts if self.with_spin_s < elapsed_s else 0
        elif self.phase >= 1 + self.exploit_epochs:
            self.phase = -1
            self.current = self.attempts
        self.phase += 1
        return self.current


@dataclass
class Counters:
    retransmits: int = 0
    timeouts: int = 0


@dataclass(frozen=True)
class Timing:
    """Retransmission policy: first timeout, doubling up to ``max_backoff_s``, ``retries``
    consecutive timeouts before giving up."""

    timeout_s: float = 1.0
    retries: int = 5
    max_backoff_s: float = 8.0

    @staticmethod
    def make(timeout_s: float, retries: int, max_backoff_s: float | None = None) -> Timing:
        if timeout_s <= 0:
            raise TransportError(f"TFTP timeout {timeout_s} s is not positive")
        if retries < 0:
            raise TransportError(f"TFTP retries {retries} is negative")
        cap = max_backoff_s if max_backoff_s is not None else 8 * timeout_s
        return Timing(timeout_s, retries, max(cap, timeout_s))


class Channel:
    """A UDP socket connected to the peer's transfer ID, with the loss hook applied.

    The socket stays in blocking mode and waits with the kernel's receive timeout
    (SO_RCVTIMEO): one system call per datagram, which is what lets a Python sender keep up
    with C peers. :meth:`recv` returns None on a timeout, raises :class:`Cancelled` once
    ``stop`` is set (the owner shuts the socket down to wake a blocked receive), and
    TransportError when the peer's port is gone (ICMP port unreachable on a connected socket).
    """

    def __init__(
        self,
        sock: socket.socket,
        peer: tuple[str, int],
        *,
        loss: LossHook | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        self.sock = sock
        self.peer = peer
        self.loss = loss
        self.stop = stop
        self.counters = Counters()
        self._wait_s = -1.0
        #: Lock-step only: non-blocking receive attempts before sleeping (see
        #: :func:`_send_lockstep`); 0 turns spinning off.
        self.spin_attempts = SPIN_ATTEMPTS
        #: The datagram :meth:`recv_into` received is in ``buf[:n]`` (no allocation per packet).
        self.buf = bytearray(RECV_BYTES)
        self.view = memoryview(self.buf)
        sock.settimeout(None)

    def set_wait(self, seconds: float) -> None:
        """Make :meth:`recv` give up after ``seconds`` without a datagram."""
        if seconds == self._wait_s:
            return
        whole = int(seconds)
        micros = int((seconds - whole) * 1_000_000)
        if whole == 0 and micros == 0:
            micros = 1  # zero would mean "wait forever"
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _TIMEVAL.pack(whole, micros))
        self._wait_s = seconds

    def gone(self) -> TransportError:
        return TransportError(
            f"TFTP peer {self.peer[0]}:{self.peer[1]} is gone (port unreachable)",
            hint="the other side ended the transfer",
        )

    def send(self, datagram: bytes) -> None:
        if self.loss is not None and self.loss("out", datagram):
            return
        try:
            self.sock.send(datagram)
        except ConnectionRefusedError as e:
            raise self.gone() from e
        except OSError as e:
            self.check_stop()
            raise TransportError(f"cannot send to {self.peer[0]}:{self.peer[1]}: {e}") from e

    def sender(self) -> Callable[[bytes], object]:
        """The fastest send function: the socket's own when no loss hook is set. Its
        OSErrors are translated by :meth:`translate`."""
        return self.sock.send if self.loss is None else self.send

    def window_sender(self) -> Callable[[list[bytes]], None]:
        """A function that sends a window of DATA packets (all but the last of one size).

        Without a loss hook it hands the kernel up to 64 packets per system call with UDP
        generic segmentation offload (UDP_SEGMENT, Linux 4.18+): the packets leave as the same
        separate datagrams, at a fraction of the cost of one send each. Where the kernel
        refuses (older kernels, a segment larger than the route's MTU) it falls back to one
        send per packet for the rest of the transfer.
        """
        if self.loss is not None or not hasattr(self.sock, "sendmsg"):
            send = self.send

            def one_by_one(packets: list[bytes]) -> None:
                for packet in packets:
                    send(packet)

            return one_by_one
        sock = self.sock
        sendmsg = sock.sendmsg
        plain = sock.send
        use_gso = True

        def batched(packets: list[bytes]) -> None:
            nonlocal use_gso
            count = len(packets)
            if count == 1 or not use_gso:
                for packet in packets:
                    plain(packet)
                return
            segment = len(packets[0])
            step = min(_GSO_MAX_SEGMENTS, _GSO_MAX_BYTES // segment)
            if step < 2:
                for packet in packets:
                    plain(packet)
                return
            control = [(_SOL_UDP, _UDP_SEGMENT, _GSO_SIZE.pack(segment))]
            for start in range(0, count, step):
                batch = packets[start : start + step]
                if len(batch) == 1:
                    plain(batch[0])
                    continue
                try:
                    sendmsg(batch, control)
                except OSError as e:
                    if isinstance(e, ConnectionRefusedError):
                        raise
                    log.debug("UDP segmentation offload refused (%s); sending one by one", e)
                    use_gso = False
                    for packet in packets[start:]:
                        plain(packet)
                    return

        return batched

    def translate(self, e: OSError) -> TransportError:
        if isinstance(e, ConnectionRefusedError):
            return self.gone()
        self.check_stop()
        return TransportError(f"TFTP link to {self.peer[0]}:{self.peer[1]} failed: {e}")

    def recv(self) -> bytes | None:
        """One datagram; b"" for a dropped or empty one; None on a timeout."""
        try:
            data = self.sock.recv(RECV_BYTES)
        except BlockingIOError:
            self.check_stop()
            return None
        except ConnectionRefusedError as e:
            raise self.gone() from e
        except OSError as e:
            self.check_stop()
            raise TransportError(f"cannot receive from {self.peer[0]}:{self.peer[1]}: {e}") from e
        if not data:
            self.check_stop()
        elif self.loss is not None and self.loss("in", data):
            # Dropped: the caller ignores an empty datagram.
            return b""
        return data

    def recv_into(self) -> int:
        """Receive one datagram into :attr:`buf`: its length, 0 for a dropped or empty one,
        -1 on a timeout."""
        try:
            n = self.sock.recv_into(self.buf)
        except BlockingIOError:
            self.check_stop()
            return -1
        except ConnectionRefusedError as e:
            raise self.gone() from e
        except OSError as e:
            self.check_stop()
            raise TransportError(f"cannot receive from {self.peer[0]}:{self.peer[1]}: {e}") from e
        if n == 0:
            self.check_stop()
        elif self.loss is not None and self.loss("in", bytes(self.view[:n])):
            return 0
        return n

    def check_stop(self) -> None:
        if self.stop is not None and self.stop.is_set():
            raise Cancelled("TFTP transfer cancelled: the server is stopping")

    def send_error(self, code: int, message: str = "") -> None:
        try:
            self.send(error_bytes(code, message))
        except TransportError:
            log.debug("could not send TFTP error %d to %s", code, self.peer)


def remote_error(datagram: bytes, peer: tuple[str, int]) -> TftpRemoteError:
    try:
        packet = decode(datagram)
    except MalformedPacket:
        packet = Error(ErrorCode.NOT_DEFINED, "malformed ERROR packet")
    if not isinstance(packet, Error):
        packet = Error(ErrorCode.NOT_DEFINED, f"unexpected {type(packet).__name__}")
    return TftpRemoteError(
        f"TFTP peer {peer[0]}:{peer[1]} ended the transfer: {packet.describe()}",
        code=packet.code,
    )


def await_reply(
    ch: Channel,
    packet: bytes,
    accept: Callable[[bytes], T | None],
    *,
    timing: Timing,
    what: str,
) -> T:
    """Send ``packet`` and wait for a datagram that ``accept`` turns into a result (it returns
    None for datagrams to ignore, and may raise); retransmit with backoff on timeouts."""
    wait = timing.timeout_s
    tries = 0
    ch.send(packet)
    ch.set_wait(wait)
    deadline = time.monotonic() + wait
    while True:
        datagram = ch.recv()
        if datagram:
            result = accept(datagram)
            if result is not None:
                return result
        if datagram is not None and time.monotonic() < deadline:
            continue
        tries += 1
        _timed_out(ch, tries, what, timing)
        wait = min(wait * 2, timing.max_backoff_s)
        ch.set_wait(wait)
        deadline = time.monotonic() + wait
        ch.send(packet)
        ch.counters.retransmits += 1


def _complete(read: Callable[[int], bytes], chunk: bytes, size: int) -> bytes:
    """``chunk`` topped up to ``size`` bytes by more reads (short only at the end)."""
    if not chunk:
        return chunk
    try:
        parts = [chunk]
        have = len(chunk)
        while have < size:
            more = read(size - have)
            if not more:
                break
            parts.append(more)
            have += len(more)
    except OSError as e:
        raise SourceError(f"cannot read the file being sent: {e}") from e
    return b"".join(parts)


def _read_exact(read: Callable[[int], bytes], size: int) -> bytes:
    """``size`` bytes, fewer only at the end of the stream."""
    try:
        chunk = read(size)
    except OSError as e:
        raise SourceError(f"cannot read the file being sent: {e}") from e
    return chunk if len(chunk) >= size else _complete(read, chunk, size)


@dataclass(frozen=True)
class StreamResult:
    size_bytes: int
    blocks: int
    retransmits: int
    timeouts: int


def _timed_out(ch: Channel, tries: int, what: str, timing: Timing) -> None:
    ch.counters.timeouts += 1
    if tries > timing.retries:
        raise TransportError(
            f"TFTP peer {ch.peer[0]}:{ch.peer[1]} {what} ({tries - 1} retransmissions)",
            hint="check the link; a lossy link may need a longer timeout",
        )


def send_stream(
    ch: Channel,
    read: Callable[[int], bytes],
    *,
    blksize: int,
    windowsize: int,
    timing: Timing,
    on_progress: ProgressHook | None = None,
) -> StreamResult:
    """Send everything ``read`` returns as DATA blocks 1, 2, ...; return once the last block
    (the first shorter than ``blksize``, possibly empty) is acknowledged."""
    last_in_flight = [False]
    try:
        if windowsize == 1:
            return _send_lockstep(ch, read, blksize, timing, on_progress, last_in_flight)
        return _send_stream(ch, read, blksize, windowsize, timing, on_progress, last_in_flight)
    except OSError as e:
        error = ch.translate(e)
        if last_in_flight[0] and not isinstance(error, Cancelled):
            raise UnconfirmedEnd(f"{error.message}; every block was sent") from e
        raise error from e
    except (Cancelled, TftpRemoteError):
        raise
    except TransportError as e:
        if last_in_flight[0]:
            raise UnconfirmedEnd(
                f"{e.message}; every block was sent, the last was not acknowledged"
            ) from e
        raise


def _send_lockstep(
    ch: Channel,
    read: Callable[[int], bytes],
    blksize: int,
    timing: Timing,
    on_progress: ProgressHook | None,
    last_in_flight: list[bool],
) -> StreamResult:
    """Windowsize 1, the common case (U-Boot's default, RFC 1350 peers): the same rules as
    :func:`_send_stream` with one block in flight, kept lean because every ACK waits on it.

    The next block is read while the peer works on the current one. Then the ACK is polled
    for a few microseconds before the thread sleeps: on a fast link the ACK is usually there by
    then, and waking a sleeping thread (an idle CPU, in a virtual machine especially) costs more
    than the peer's whole turn. Polling stops for the rest of the transfer when it keeps
    missing (a link with a longer round trip), and the server turns it off when several
    transfers share the process.
    """
    send = ch.sender()
    raw_recv_into = ch.sock.recv_into if ch.loss is None else None
    policy = SpinPolicy(ch.spin_attempts if raw_recv_into is not None else 0)
    spin = policy.current
    misses = 0
    dontwait = socket.MSG_DONTWAIT
    epoch_left = SPIN_EPOCH_BLOCKS
    epoch_start = time.monotonic()
    buf = ch.buf
    monotonic = time.monotonic
    counters = ch.counters
    pack = _DATA_HEADER.pack
    ack = _ACK
    block = 1
    chunk = _read_exact(read, blksize)
    total = len(chunk)
    last = len(chunk) < blksize
    packet = pack(_DATA, 1) + chunk
    send(packet)
    last_in_flight[0] = last
    if not last:
        next_chunk = _read_exact(read, blksize)
        next_packet = pack(_DATA, 2) + next_chunk
    wire = 1
    wait = timing.timeout_s
    ch.set_wait(wait)
    tries = 0
    # The kernel's receive timeout (SO_RCVTIMEO) bounds silence; the deadline bounds a stream
    # of packets that make no progress. It starts at the first such packet, which saves a
    # clock read per block.
    deadline = 0.0
    while True:
        if raw_recv_into is not None:
            n = -2
            if spin:
                for _ in range(spin):
                    try:
                        n = raw_recv_into(buf, 0, dontwait)
                        misses = 0
                        break
                    except BlockingIOError:
                        pass
                else:
                    misses += 1
                    if misses >= SPIN_GIVE_UP:
                        policy.give_up()
                        spin = 0
            if n == -2:
                try:
                    n = raw_recv_into(buf)
                except BlockingIOError:
                    n = -1
            if n <= 0:
                ch.check_stop()
        else:
            n = ch.recv_into()
        if n == 4 and (buf[2] << 8 | buf[3]) == wire and buf[1] == ack and buf[0] == 0:
            if last:
                if on_progress is not None:
                    on_progress(total)
                return StreamResult(total, block, counters.retransmits, counters.timeouts)
            block += 1
            packet = next_packet
            send(packet)
            chunk = next_chunk
            total += len(chunk)
            wire = block & 0xFFFF
            if len(chunk) < blksize:
                last = True
                last_in_flight[0] = True
            else:
                try:
                    next_chunk = read(blksize)
                except OSError as e:
                    raise SourceError(f"cannot read the file being sent: {e}") from e
                if len(next_chunk) < blksize:
                    next_chunk = _complete(read, next_chunk, blksize)
                next_packet = pack(_DATA, (block + 1) & 0xFFFF) + next_chunk
            if tries:
                tries = 0
                wait = timing.timeout_s
                ch.set_wait(wait)
            deadline = 0.0
            epoch_left -= 1
            if not epoch_left:
                now = monotonic()
                spin = policy.epoch_done(now - epoch_start)
                epoch_start = now
                epoch_left = SPIN_EPOCH_BLOCKS
            if on_progress is not None:
                on_progress(total)
            continue
        if n >= 4 and buf[1] == _ERROR and buf[0] == 0:
            raise remote_error(bytes(ch.view[:n]), ch.peer)
        if n > 4 or (n > 0 and buf[1] != _ACK):
            log.debug("ignoring unexpected %d-byte packet from %s", n, ch.peer)
        # A duplicate ACK is never answered (the Sorcerer's Apprentice bug).
        if n >= 0:
            now = monotonic()
            if not deadline:
                deadline = now + wait
            if now < deadline:
                continue
        tries += 1
        _timed_out(ch, tries, f"stopped acknowledging (block {block & 0xFFFF})", timing)
        wait = min(wait * 2, timing.max_backoff_s)
        ch.set_wait(wait)
        deadline = 0.0
        send(packet)
        counters.retransmits += 1


def _send_stream(
    ch: Channel,
    read: Callable[[int], bytes],
    blksize: int,
    windowsize: int,
    timing: Timing,
    on_progress: ProgressHook | None,
    last_in_flight: list[bool],
) -> StreamResult:
    # queue[0] is block ``base``; the first ``inflight`` packets are the window on the wire.
    # The next window is read and built while the peer works on this one, so an ACK is
    # answered without touching the file.
    queue: list[bytes] = []
    base = 1
    inflight = 0
    eof = False
    total = 0
    send_window = ch.window_sender()
    send_one = ch.sender()
    recv_into = ch.recv_into
    buf = ch.buf
    monotonic = time.monotonic
    counters = ch.counters
    header = data_header
    ahead = 2 * windowsize

    def fill() -> None:
        nonlocal eof, total
        while len(queue) < ahead and not eof:
            chunk = _read_exact(read, blksize)
            queue.append(header((base + len(queue)) & 0xFFFF) + chunk)
            total += len(chunk)
            if len(chunk) < blksize:
                eof = True

    fill()
    send_window(queue[:windowsize])
    nacked = 0
    inflight = min(windowsize, len(queue))
    last_in_flight[0] = eof and inflight == len(queue)
    wait = timing.timeout_s
    ch.set_wait(wait)
    tries = 0
    deadline = monotonic() + wait
    while True:
        n = recv_into()
        if n == 4 and buf[1] == _ACK and buf[0] == 0:
            acked = ((buf[2] << 8 | buf[3]) - base + 1) & 0xFFFF
            if 0 < acked <= inflight:
                del queue[:acked]
                base += acked
                if not queue:
                    if on_progress is not None:
                        on_progress(total)
                    return StreamResult(total, base - 1, counters.retransmits, counters.timeouts)
                if windowsize == 1:
                    send_one(queue[0])
                    inflight = 1
                else:
                    window = queue[:windowsize]
                    send_window(window)
                    counters.retransmits += inflight - acked
                    inflight = len(window)
                last_in_flight[0] = eof and inflight == len(queue)
                if tries:
                    tries = 0
                    wait = timing.timeout_s
                    ch.set_wait(wait)
                fill()
                deadline = monotonic() + wait
                if on_progress is not None:
                    on_progress(total)
                continue
            if acked == 0 and nacked != base:
                # An ACK of the block before the window: the peer lost the window's first
                # block and asks for it again (RFC 7440 section 4; U-Boot sends one at once
                # rather than after its timeout). Resend the window, once per window: later
                # such ACKs are duplicates, and duplicates are never answered (the Sorcerer's
                # Apprentice bug); the timeout covers a resent window that is lost too.
                nacked = base
                send_window(queue[:inflight])
                counters.retransmits += inflight
                deadline = monotonic() + wait
                continue
        elif n >= 4 and buf[1] == _ERROR and buf[0] == 0:
            raise remote_error(bytes(ch.view[:n]), ch.peer)
        elif n > 0:
            log.debug("ignoring unexpected %d-byte packet from %s", n, ch.peer)
        if n >= 0 and monotonic() < deadline:
            continue
        tries += 1
        _timed_out(ch, tries, f"stopped acknowledging (block {base & 0xFFFF})", timing)
        wait = min(wait * 2, timing.max_backoff_s)
        ch.set_wait(wait)
        deadline = monotonic() + wait
        send_window(queue[:inflight])
        counters.retransmits += inflight


def receive_stream(
    ch: Channel,
    write: Callable[[memoryview], object],
    *,
    blksize: int,
    windowsize: int,
    timing: Timing,
    last_sent: bytes,
    first: bytes | None = None,
    max_bytes: int | None = None,
    on_complete: Callable[[int], None] | None = None,
    dally_s: float = 0.0,
    on_progress: ProgressHook | None = None,
) -> StreamResult:
    """Receive DATA blocks 1, 2, ... and ``write`` their payloads.

    ``last_sent``: the packet that asked for the data (OACK or ACK 0, which are retransmitted
    until block 1 arrives). ``first``: a DATA datagram already received. ``on_complete(size)``
    runs before the final ACK and may raise :class:`TransferRefused` to answer with an ERROR.
    ``dally_s``: after the final ACK, wait this long to acknowledge a retransmitted last block.
    """
    try:
        return _receive_stream(
            ch,
            write,
            blksize,
            windowsize,
            timing,
            last_sent,
            first,
            max_bytes,
            on_complete,
            dally_s,
            on_progress,
        )
    except OSError as e:
        raise ch.translate(e) from e


def _receive_stream(
    ch: Channel,
    write: Callable[[memoryview], object],
    blksize: int,
    windowsize: int,
    timing: Timing,
    last_sent: bytes,
    first: bytes | None,
    max_bytes: int | None,
    on_complete: Callable[[int], None] | None,
    dally_s: float,
    on_progress: ProgressHook | None,
) -> StreamResult:
    expected = 1
    in_window = 0
    extra_ack_sent = False
    total = 0
    wait = timing.timeout_s
    ch.set_wait(wait)
    tries = 0
    send = ch.sender()
    recv_into = ch.recv_into
    buf = ch.buf
    view = ch.view
    monotonic = time.monotonic
    counters = ch.counters
    deadline = monotonic() + wait
    pending = first
    while True:
        if pending is not None:
            n = len(pending)
            buf[:n] = pending
            pending = None
        else:
            n = recv_into()
        if n >= 4 and buf[1] == _DATA and buf[0] == 0:
            block = buf[2] << 8 | buf[3]
            if block == expected & 0xFFFF:
                size = n - 4
                if size > blksize:
                    ch.send_error(ErrorCode.ILLEGAL_OPERATION, f"block larger than {blksize}")
                    raise TransportError(
                        f"TFTP peer {ch.peer[0]}:{ch.peer[1]} sent a {size}-byte block "
                        f"after negotiating {blksize}"
                    )
                total += size
                if max_bytes is not None and total > max_bytes:
                    ch.send_error(ErrorCode.DISK_FULL, f"upload exceeds {max_bytes} bytes")
                    raise TransportError(
                        f"TFTP transfer from {ch.peer[0]}:{ch.peer[1]} exceeds the limit "
                        f"of {max_bytes} bytes",
                        hint="raise the upload limit for a file you expect to be this large",
                    )
                if size:
                    try:
                        write(view[4:n])
                    except OSError as e:
                        ch.send_error(ErrorCode.DISK_FULL, "cannot store the data")
                        raise SourceError(f"cannot store the data received: {e}") from e
                expected += 1
                in_window += 1
                extra_ack_sent = False
                deadline = monotonic() + wait
                if tries:
                    tries = 0
                    wait = timing.timeout_s
                    ch.set_wait(wait)
                if size < blksize:
                    if on_complete is not None:
                        try:
                            on_complete(total)
                        except TransferRefused as e:
                            ch.send_error(e.code, e.message)
                            raise
                    final = ack_bytes(block)
                    send(final)
                    if on_progress is not None:
                        on_progress(total)
                    if dally_s > 0:
                        dally(ch, final, block, dally_s)
                    return StreamResult(
                        total, expected - 1, counters.retransmits, counters.timeouts
                    )
                if in_window >= windowsize:
                    last_sent = ack_bytes(block)
                    send(last_sent)
                    in_window = 0
                    if on_progress is not None:
                        on_progress(total)
                continue
            if windowsize == 1 or not extra_ack_sent:
                # Out of order, or a repeat: acknowledge what we have in order, once per
                # window (every time in lock-step). Before block 1 this is ACK 0: the peer
                # evidently has the OACK.
                last_sent = ack_bytes((expected - 1) & 0xFFFF)
                send(last_sent)
                counters.retransmits += 1
                extra_ack_sent = True
                in_window = 0
        elif n >= 4 and buf[1] == _ERROR and buf[0] == 0:
            raise remote_error(bytes(view[:n]), ch.peer)
        elif n > 0:
            log.debug("ignoring unexpected %d-byte packet from %s", n, ch.peer)
        if n >= 0 and monotonic() < deadline:
            continue
        tries += 1
        _timed_out(ch, tries, f"stopped sending (waiting for block {expected & 0xFFFF})", timing)
        wait = min(wait * 2, timing.max_backoff_s)
        ch.set_wait(wait)
        deadline = monotonic() + wait
        send(last_sent)
        counters.retransmits += 1
        in_window = 0
        extra_ack_sent = False


def dally(ch: Channel, final: bytes, block: int, quiet_s: float) -> None:
    """Answer retransmissions of the last block until none has come for ``quiet_s``.

    RFC 1350: the final ACK may be lost, and the sender then repeats the last block; without
    an answer it would report a failed transfer although the data arrived.
    """
    repeat = data_header(block)
    limit = time.monotonic() + 4 * quiet_s
    deadline = time.monotonic() + quiet_s
    while True:
        remaining = min(deadline, limit) - time.monotonic()
        if remaining <= 0:
            return
        ch.set_wait(remaining)
        try:
            datagram = ch.recv()
        except TransportError:
            return
        if datagram is None:
            return
        if datagram[:4] == repeat:
            ch.send(final)
            deadline = time.monotonic() + quiet_s
