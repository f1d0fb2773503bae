"""Links that carry fastboot messages: TCP, UDP and USB (pyusb, imported lazily).

A link moves whole messages (a command out, a response in) and data phases (download data
out, upload/fetch data in). Every failure of the link becomes a ``TransportError`` whose
message names the device and what was going on; nothing else escapes. Opening a link waits
for the device ("waiting for device") until its timeout: TCP and UDP retry the connection,
USB polls the bus.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO, Protocol

from unbrick.errors import TransportError
from unbrick.transports.fastboot import protocol as p

log = logging.getLogger(__name__)

#: Bytes read from a file or socket at a time in data phases.
DATA_CHUNK = 1 << 20
#: How much a TCP link reads at once for headers and responses (several fit in one read).
_READ_AHEAD = 4096
#: UDP: how long the host waits for an answer before sending a packet again.
UDP_RESEND_S = 0.5
#: UDP: the largest packet this host offers in Init (the device may ask for less).
UDP_HOST_MAX_PACKET = 16384

WaitCallback = Callable[[str], None]


class Link(Protocol):
    """What the client needs of a transport."""

    description: str

    def send_message(self, payload: bytes, timeout_s: float) -> None: ...

    def recv_message(self, timeout_s: float) -> bytes: ...

    def send_data(self, data: bytes | memoryview, timeout_s: float) -> None: ...

    def send_file(self, f: BinaryIO, offset: int, size: int, timeout_s: float) -> None: ...

    def recv_data(self, size: int, timeout_s: float) -> Iterator[bytes]: ...

    def close(self) -> None: ...


def _lost(description: str, what: str, e: BaseException | None = None) -> TransportError:
    detail = f": {e}" if e is not None and str(e) else ""
    return TransportError(
        f"fastboot device {description}: {what}{detail}",
        hint="check the cable/network and that the device is still in fastboot mode, "
        "then run 'unbrick resume'",
    )


def _file_chunks(f: BinaryIO, offset: int, size: int) -> Iterator[bytes]:
    f.seek(offset)
    left = size
    while left > 0:
        piece = f.read(min(DATA_CHUNK, left))
        if not piece:
            raise TransportError(
                f"the image ended {left} bytes early while it was being sent",
                hint="the file changed or is truncated; check it and retry",
            )
        left -= len(piece)
        yield piece


# --------------------------------------------------------------------------------------------
# TCP


class TcpLink:
    """fastboot over TCP: ``FB01`` handshake, then 8-byte big-endian length-prefixed messages.

    Incoming messages are read as a stream, as fastboot hosts do: a data phase may span
    several messages, and a message may hold the end of one data phase and nothing else.
    """

    def __init__(self, sock: socket.socket, description: str) -> None:
        self._sock = sock
        self.description = description
        #: Bytes of the current incoming message not read yet.
        self._left = 0
        #: Received and not yet consumed (one recv often holds several short messages).
        self._rbuf = bytearray()

    @classmethod
    def connect(
        cls,
        host: str,
        port: int,
        *,
        timeout_s: float,
        handshake_timeout_s: float = 2.0,
        on_wait: WaitCallback | None = None,
    ) -> TcpLink:
        """Connect and shake hands, retrying until ``timeout_s`` while the device is away."""
        description = f"tcp:{host}:{port}"
        deadline = time.monotonic() + timeout_s
        waited = False
        while True:
            sock: socket.socket | None = None
            try:
                left = max(0.05, deadline - time.monotonic())
                sock = socket.create_connection((host, port), timeout=min(left, 5.0))
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.settimeout(min(handshake_timeout_s, left))
                sock.sendall(p.TCP_HANDSHAKE)
                reply = _recv_exact(sock, p.TCP_HANDSHAKE_BYTES)
            except (OSError, EOFError) as e:
                if sock is not None:
                    sock.close()
                if time.monotonic() >= deadline:
                    raise TransportError(
                        f"no fastboot device answered at {description} within {timeout_s:g} s"
                        f" ({e or type(e).__name__})",
                        hint="put the device in fastboot mode and check its address and port",
                    ) from e
                if not waited and on_wait is not None:
                    on_wait(f"waiting for device at {description}")
                waited = True
                time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
                continue
            try:
                p.parse_handshake(reply)
            except p.FastbootProtocolError:
                sock.close()
                raise
            return cls(sock, description)

    def _io(self, timeout_s: float) -> socket.socket:
        self._sock.settimeout(max(timeout_s, 0.001))
        return self._sock

    def send_message(self, payload: bytes, timeout_s: float) -> None:
        try:
            self._io(timeout_s).sendall(p.encode_frame(payload))
        except OSError as e:
            raise _lost(self.description, "sending a command failed", e) from e

    def recv_message(self, timeout_s: float) -> bytes:
        sock = self._io(timeout_s)
        try:
            if self._left == 0:
                self._left = p.parse_frame_header(self._read_exact(sock, p.TCP_LENGTH_BYTES))
            if self._left > p.MAX_READ_RESPONSE_BYTES:
                raise p.FastbootProtocolError(
                    f"response of {self._left} bytes from {self.description} is too long"
                )
            n, self._left = self._left, 0
            return self._read_exact(sock, n)
        except TimeoutError as e:
            raise _lost(self.description, f"no answer within {timeout_s:g} s") from e
        except (OSError, EOFError) as e:
            raise _lost(self.description, "the connection was lost", e) from e

    def send_data(self, data: bytes | memoryview, timeout_s: float) -> None:
        try:
            sock = self._io(timeout_s)
            sock.sendall(p.frame_header(len(data)))
            sock.sendall(data)
        except OSError as e:
            raise _lost(self.description, "the connection was lost while sending data", e) from e

    def send_file(self, f: BinaryIO, offset: int, size: int, timeout_s: float) -> None:
        """One message holding ``size`` bytes of ``f`` at ``offset``, sent with sendfile(2)."""
        try:
            sock = self._io(timeout_s)
            sock.sendall(p.frame_header(size))
            # socket.sendfile's fallback for files without a descriptor reads from the current
            # position when offset is 0: position the file first.
            f.seek(offset)
            sent = sock.sendfile(f, offset, size)
        except OSError as e:
            raise _lost(self.description, "the connection was lost while sending data", e) from e
        if sent != size:
            raise TransportError(
                f"the image ended {size - sent} bytes early while it was being sent",
                hint="the file changed or is truncated; check it and retry",
            )

    def recv_data(self, size: int, timeout_s: float) -> Iterator[bytes]:
        sock = self._io(timeout_s)
        left = size
        buf = bytearray(min(DATA_CHUNK, max(size, 1)))
        view = memoryview(buf)
        empty = 0
        try:
            while left > 0:
                if self._left == 0:
                    self._left = p.parse_frame_header(self._read_exact(sock, p.TCP_LENGTH_BYTES))
                    empty = 0 if self._left else empty + 1
                    if empty > 1000:
                        raise p.FastbootProtocolError(
                            f"fastboot device {self.description} sends empty messages only"
                        )
                    continue
                want = min(left, self._left, len(buf))
                if self._rbuf:
                    n = min(want, len(self._rbuf))
                    view[:n] = self._rbuf[:n]
                    del self._rbuf[:n]
                else:
                    n = sock.recv_into(view[:want])
                if n == 0:
                    raise EOFError("connection closed by the device")
                self._left -= n
                left -= n
                yield bytes(view[:n])
        except TimeoutError as e:
            raise _lost(self.description, f"no data within {timeout_s:g} s") from e
        except (OSError, EOFError) as e:
            raise _lost(self.description, "the connection was lost while reading data", e) from e

    def _read_exact(self, sock: socket.socket, n: int) -> bytes:
        """``n`` bytes: first what an earlier read took in, then from the socket, reading up to
        ``_READ_AHEAD`` at once (what is read beyond ``n`` waits in ``_rbuf``)."""
        buf = self._rbuf
        while len(buf) < n:
            chunk = sock.recv(max(n - len(buf), _READ_AHEAD))
            if not chunk:
                raise EOFError("connection closed by the device")
            buf += chunk
        out = bytes(buf[:n])
        del buf[:n]
        return out

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise EOFError("connection closed by the device")
        got += k
    return bytes(buf)


# --------------------------------------------------------------------------------------------
# UDP


class UdpLink:
    """fastboot over UDP: Query, Init, then Fastboot packets, each answered once.

    A packet without an answer is sent again every ``UDP_RESEND_S`` until the operation's
    timeout; a device busy flashing may stay silent meanwhile (the protocol allows it).
    """

    def __init__(self, sock: socket.socket, description: str, *, seq: int, max_packet: int) -> None:
        self._sock = sock
        self.description = description
        self.seq = seq % p.SEQ_MODULUS
        self.max_packet = max_packet
        self._rx = bytearray(p.UDP_MAX_PACKET_BYTES)

    @property
    def max_data(self) -> int:
        return self.max_packet - p.UDP_HEADER_BYTES

    @classmethod
    def connect(
        cls,
        host: str,
        port: int,
        *,
        timeout_s: float,
        max_packet: int = UDP_HOST_MAX_PACKET,
        on_wait: WaitCallback | None = None,
    ) -> UdpLink:
        description = f"udp:{host}:{port}"
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
            family, kind, proto, _, addr = infos[0]
            sock = socket.socket(family, kind, proto)
            sock.connect(addr)
        except OSError as e:
            raise TransportError(
                f"cannot reach {description}: {e}", hint="check the device's address"
            ) from e
        link = cls(sock, description, seq=0, max_packet=p.UDP_MIN_PACKET_BYTES)
        try:
            first = True

            def waiting() -> None:
                nonlocal first
                if first and on_wait is not None:
                    on_wait(f"waiting for device at {description}")
                first = False

            answer = link._packet(p.PacketId.QUERY, 0, b"", timeout_s, on_resend=waiting)
            link.seq = p.parse_query(answer.data)
            init = link._packet(
                p.PacketId.INIT, 0, p.encode_init(p.UDP_VERSION, max_packet), timeout_s
            )
            version, device_max = p.parse_init(init.data)
            link.max_packet = min(max_packet, device_max)
            log.debug("%s: UDP version %d, packets of %d bytes", description, version, device_max)
            return link
        except BaseException:
            link.close()
            raise

    def _packet(
        self,
        ident: int,
        flags: int,
        data: bytes | memoryview,
        timeout_s: float,
        *,
        on_resend: Callable[[], None] | None = None,
    ) -> p.UdpPacket:
        """Send one packet until its answer comes; advance the sequence number."""
        seq = self.seq
        header = p.UDP_HEADER.pack(ident, flags, seq)
        request = p.UdpPacket(ident, flags, seq)
        deadline = time.monotonic() + timeout_s
        view = memoryview(self._rx)
        while True:
            try:
                self._sock.sendmsg([header, data])
            except OSError as e:
                if e.errno not in (errno.ECONNREFUSED, errno.EAGAIN):
                    raise _lost(self.description, "sending a packet failed", e) from e
            resend_at = min(deadline, time.monotonic() + UDP_RESEND_S)
            while True:
                left = resend_at - time.monotonic()
                if left <= 0:
                    break
                self._sock.settimeout(left)
                try:
                    n = self._sock.recv_into(view)
                except TimeoutError:
                    break
                except ConnectionRefusedError:
                    time.sleep(min(0.05, max(0.0, resend_at - time.monotonic())))
                    continue
                except OSError as e:
                    raise _lost(self.description, "receiving failed", e) from e
                try:
                    answer = p.decode_packet(bytes(view[:n]))
                except p.FastbootProtocolError:
                    continue  # a stray datagram; the device's answer may still come
                if not answer.answers(request):
                    continue
                self.seq = (seq + 1) % p.SEQ_MODULUS
                if answer.ident == p.PacketId.ERROR:
                    raise TransportError(
                        f"fastboot device {self.description} reported a UDP protocol error: "
                        f"{answer.data.decode('ascii', 'replace')}",
                        hint="the device restarted its fastboot session; check that it is still "
                        "in fastboot mode, then run 'unbrick resume'",
                    )
                return answer
            if time.monotonic() >= deadline:
                raise _lost(self.description, f"no answer within {timeout_s:g} s")
            if on_resend is not None:
                on_resend()

    def _exchange(self, data: bytes | memoryview, timeout_s: float) -> bytes:
        """One message out (continuation packets as needed), whatever the device sent back."""
        received = bytearray()
        for flags, piece in p.split_payload(data, self.max_data):
            answer = self._packet(p.PacketId.FASTBOOT, flags, piece, timeout_s)
            received += answer.data
            while answer.continuation:
                answer = self._packet(p.PacketId.FASTBOOT, 0, b"", timeout_s)
                received += answer.data
                if len(received) > p.MAX_DOWNLOAD_BYTES:
                    raise p.FastbootProtocolError("the device sent an endless message")
        return bytes(received)

    def send_message(self, payload: bytes, timeout_s: float) -> None:
        self.send_data(payload, timeout_s)

    def recv_message(self, timeout_s: float) -> bytes:
        deadline = time.monotonic() + timeout_s
        while True:
            data = self._exchange(b"", max(0.001, deadline - time.monotonic()))
            if data:
                return data
            if time.monotonic() >= deadline:
                raise _lost(self.description, f"no answer within {timeout_s:g} s")
            time.sleep(0.01)

    def send_data(self, data: bytes | memoryview, timeout_s: float) -> None:
        if self._exchange(data, timeout_s):
            raise p.FastbootProtocolError(
                f"fastboot device {self.description} sent data out of turn"
            )

    def send_file(self, f: BinaryIO, offset: int, size: int, timeout_s: float) -> None:
        for piece in _file_chunks(f, offset, size):
            self.send_data(piece, timeout_s)

    def recv_data(self, size: int, timeout_s: float) -> Iterator[bytes]:
        left = size
        while left > 0:
            data = self._exchange(b"", timeout_s)
            if len(data) > left:
                raise p.FastbootProtocolError(
                    f"fastboot device {self.description} sent {len(data) - left} bytes more "
                    "than it announced"
                )
            left -= len(data)
            if data:
                yield data

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()


# --------------------------------------------------------------------------------------------
# USB


def _import_usb() -> tuple[Any, Any]:
    try:
        import usb.core  # noqa: PLC0415 - optional extra, loaded only for fastboot+usb
        import usb.util  # noqa: PLC0415
    except ImportError as e:
        raise TransportError(
            "fastboot over USB needs pyusb and libusb",
            hint="install unbrick with the 'usb' extra (pip install 'unbrick[usb]') and libusb-1.0",
        ) from e
    return usb.core, usb.util


def is_fastboot_interface(intf: Any) -> bool:
    return (
        getattr(intf, "bInterfaceClass", None) == p.USB_INTERFACE_CLASS
        and getattr(intf, "bInterfaceSubClass", None) == p.USB_INTERFACE_SUBCLASS
        and getattr(intf, "bInterfaceProtocol", None) == p.USB_INTERFACE_PROTOCOL
    )


def find_fastboot_interface(dev: Any) -> Any | None:
    """The first fastboot interface of a pyusb device's active (or first) configuration."""
    try:
        cfg = dev.get_active_configuration()
    except Exception:
        try:
            cfg = next(iter(dev))
        except Exception:
            return None
    for intf in cfg:
        if is_fastboot_interface(intf):
            return intf
    return None


class UsbLink:
    """fastboot over USB bulk endpoints (interface class 0xff, subclass 0x42, protocol 3)."""

    def __init__(self, dev: Any, intf: Any, ep_out: Any, ep_in: Any, description: str) -> None:
        self._dev = dev
        self._intf = intf
        self._out = ep_out
        self._in = ep_in
        self.description = description
        mps = int(getattr(ep_in, "wMaxPacketSize", 512) or 512)
        self._read_size = max(512, mps)
        self._usb_error: type[BaseException] = Exception

    @classmethod
    def open(
        cls,
        serial: str | None,
        *,
        timeout_s: float,
        on_wait: WaitCallback | None = None,
        usb_modules: tuple[Any, Any] | None = None,
        poll_s: float = 0.5,
    ) -> UsbLink:
        """Find the device (``serial`` or the only one), waiting up to ``timeout_s``."""
        core, util = usb_modules if usb_modules is not None else _import_usb()
        want = f"serial {serial}" if serial else "any serial"
        deadline = time.monotonic() + timeout_s
        waited = False
        while True:
            matches = _scan(core, util, serial)
            if len(matches) > 1 and not serial:
                serials = ", ".join(s or "?" for _, _, s in matches)
                raise TransportError(
                    f"{len(matches)} fastboot devices are attached ({serials})",
                    hint="name one: fastboot+usb://SERIAL",
                )
            if matches:
                dev, intf, found = matches[0]
                return cls._claim(core, util, dev, intf, f"usb:{found or '?'}")
            if time.monotonic() >= deadline:
                raise TransportError(
                    f"no fastboot device ({want}) appeared on USB within {timeout_s:g} s",
                    hint="put the device in fastboot mode, use a data cable, and check the "
                    "udev rules (permissions) of the USB device",
                )
            if not waited and on_wait is not None:
                on_wait(f"waiting for device ({want})")
            waited = True
            time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))

    @classmethod
    def _claim(cls, core: Any, util: Any, dev: Any, intf: Any, description: str) -> UsbLink:
        number = intf.bInterfaceNumber
        try:
            try:
                if dev.is_kernel_driver_active(number):
                    dev.detach_kernel_driver(number)
            except (NotImplementedError, core.USBError):
                pass
            util.claim_interface(dev, number)
        except core.USBError as e:
            raise TransportError(
                f"cannot claim the fastboot interface of {description}: {e}",
                hint="another program (adb, fastboot) may hold it, or udev rules deny access",
            ) from e

        def direction(wanted: int) -> Callable[[Any], bool]:
            def match(ep: Any) -> bool:
                is_bulk = util.endpoint_type(ep.bmAttributes) == util.ENDPOINT_TYPE_BULK
                return bool(is_bulk and util.endpoint_direction(ep.bEndpointAddress) == wanted)

            return match

        ep_out = util.find_descriptor(intf, custom_match=direction(util.ENDPOINT_OUT))
        ep_in = util.find_descriptor(intf, custom_match=direction(util.ENDPOINT_IN))
        if ep_out is None or ep_in is None:
            raise TransportError(f"{description}: the fastboot interface has no bulk endpoints")
        link = cls(dev, intf, ep_out, ep_in, description)
        link._usb_error = core.USBError
        return link

    def _ms(self, timeout_s: float) -> int:
        return max(1, int(timeout_s * 1000))

    def _fail(self, what: str, e: BaseException) -> TransportError:
        if getattr(e, "errno", None) in (errno.ETIMEDOUT, 110) or "timed out" in str(e).lower():
            return _lost(self.description, f"{what}: no answer in time")
        return _lost(self.description, what, e)

    def send_message(self, payload: bytes, timeout_s: float) -> None:
        self.send_data(payload, timeout_s)

    def recv_message(self, timeout_s: float) -> bytes:
        try:
            data = self._in.read(self._read_size, self._ms(timeout_s))
        except self._usb_error as e:
            raise self._fail("reading a response failed", e) from e
        return bytes(data)

    def send_data(self, data: bytes | memoryview, timeout_s: float) -> None:
        view = memoryview(data)
        try:
            for at in range(0, len(view), DATA_CHUNK):
                piece = view[at : at + DATA_CHUNK]
                written = self._out.write(piece, self._ms(timeout_s))
                if written != len(piece):
                    raise TransportError(
                        f"{self.description}: wrote {written} of {len(piece)} bytes"
                    )
        except self._usb_error as e:
            raise self._fail("sending failed", e) from e

    def send_file(self, f: BinaryIO, offset: int, size: int, timeout_s: float) -> None:
        for piece in _file_chunks(f, offset, size):
            self.send_data(piece, timeout_s)

    def recv_data(self, size: int, timeout_s: float) -> Iterator[bytes]:
        left = size
        chunk = max(self._read_size, (DATA_CHUNK // self._read_size) * self._read_size)
        while left > 0:
            try:
                data = bytes(
                    self._in.read(min(chunk, _round_up(left, self._read_size)), self._ms(timeout_s))
                )
            except self._usb_error as e:
                raise self._fail("reading data failed", e) from e
            if len(data) > left:
                raise p.FastbootProtocolError(
                    f"{self.description} sent {len(data) - left} bytes more than it announced"
                )
            left -= len(data)
            yield data

    def close(self) -> None:
        try:
            import usb.util  # noqa: PLC0415 - already loaded when a USB link exists

            usb.util.dispose_resources(self._dev)
        except Exception as e:  # closing must not fail
            log.debug("%s: releasing the USB device failed: %s", self.description, e)


def _round_up(n: int, unit: int) -> int:
    return -(-n // unit) * unit


def _scan(core: Any, util: Any, serial: str | None) -> list[tuple[Any, Any, str | None]]:
    out: list[tuple[Any, Any, str | None]] = []
    try:
        devices = list(core.find(find_all=True))
    except Exception as e:
        raise TransportError(
            f"cannot list USB devices: {e}",
            hint="install libusb-1.0 and check permissions on /dev/bus/usb",
        ) from e
    for dev in devices:
        intf = find_fastboot_interface(dev)
        if intf is None:
            continue
        found: str | None
        try:
            found = util.get_string(dev, dev.iSerialNumber) if dev.iSerialNumber else None
        except Exception:
            found = None
        if serial and found != serial:
            continue
        out.append((dev, intf, found))
    return out


def open_link(
    link: str,
    *,
    host: str | None = None,
    port: int | None = None,
    serial: str | None = None,
    timeout_s: float,
    udp_max_packet: int = UDP_HOST_MAX_PACKET,
    on_wait: WaitCallback | None = None,
) -> Link:
    """Open a ``tcp``, ``udp`` or ``usb`` link (the ``link`` of a fastboot device address)."""
    if link in ("tcp", "udp"):
        if not host or port is None:
            raise TransportError(f"a fastboot {link} link needs a host and a port")
        if link == "tcp":
            return TcpLink.connect(host, port, timeout_s=timeout_s, on_wait=on_wait)
        return UdpLink.connect(
            host, port, timeout_s=timeout_s, max_packet=udp_max_packet, on_wait=on_wait
        )
    if link == "usb":
        return UsbLink.open(serial, timeout_s=timeout_s, on_wait=on_wait)
    raise TransportError(f"unknown fastboot link {link!r}", hint="use tcp, udp or usb")


def file_size(f: BinaryIO) -> int:
    """Size of an open file (seekable), for data phases."""
    try:
        return os.fstat(f.fileno()).st_size
    except (OSError, AttributeError, ValueError):
        end = f.seek(0, os.SEEK_END)
        return end
