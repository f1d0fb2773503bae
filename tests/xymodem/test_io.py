"""The XMODEM/YMODEM drivers over real descriptors: pipes, a pty, a TCP socket, a lossy link."""

from __future__ import annotations

import io
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import pytest
import serial

from unbrick.errors import SourceError, TransportError
from unbrick.transports.xymodem import CANCEL, FileInfo
from unbrick.transports.xymodem_io import (
    ByteLink,
    FdLink,
    SerialLink,
    receive_xmodem,
    receive_ymodem,
    send_xmodem,
    send_ymodem,
)

pytestmark = pytest.mark.unit


class Pipes:
    """Two pipes: a link for each end."""

    def __init__(self) -> None:
        a_r, b_w = os.pipe()
        b_r, a_w = os.pipe()
        self.fds = (a_r, a_w, b_r, b_w)
        self.a = FdLink(a_r, a_w)
        self.b = FdLink(b_r, b_w)

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)


@pytest.fixture
def pipes() -> Iterator[Pipes]:
    p = Pipes()
    yield p
    p.close()


class Background:
    """Run a call in a thread; ``result()`` re-raises what it raised."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self._value: Any = None
        self._error: BaseException | None = None

        def body() -> None:
            try:
                self._value = fn()
            except BaseException as e:
                self._error = e

        self._thread = threading.Thread(target=body, daemon=True)
        self._thread.start()

    def result(self, timeout_s: float = 30.0) -> Any:
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), "the other side did not finish"
        if self._error is not None:
            raise self._error
        return self._value


class Lossy:
    """A link that corrupts chosen writes (1-based) by flipping a byte in the middle."""

    def __init__(self, inner: ByteLink, corrupt: set[int]) -> None:
        self.inner = inner
        self.corrupt = corrupt
        self.writes: list[bytes] = []

    def read(self, n: int, timeout_s: float) -> bytes:
        return self.inner.read(n, timeout_s)

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        if len(self.writes) in self.corrupt:
            buf = bytearray(data)
            buf[len(buf) // 2] ^= 0x5A
            data = bytes(buf)
        self.inner.write(data)


@pytest.mark.parametrize("size", [0, 1, 1024, 1025, 100 * 1024])
def test_xmodem_over_pipes(pipes: Pipes, size: int) -> None:
    data = random.Random(size).randbytes(size)
    seen: list[int] = []
    sender = Background(lambda: send_xmodem(pipes.a, data, progress=seen.append))
    out = io.BytesIO()
    written = receive_xmodem(pipes.b, out, size=size)
    assert sender.result() == size
    assert written == size and out.getvalue() == data
    assert seen == sorted(seen) and seen[-1] == size


def test_xmodem_receiver_without_size_keeps_the_padding(pipes: Pipes) -> None:
    data = b"q" * 1500
    sender = Background(lambda: send_xmodem(pipes.a, data))
    out = io.BytesIO()
    assert receive_xmodem(pipes.b, out) == 2048
    sender.result()
    assert out.getvalue() == data + b"\x1a" * 548


@pytest.mark.parametrize("size", [0, 1, 1023, 100 * 1024])
def test_ymodem_over_pipes_into_a_directory(pipes: Pipes, tmp_path: Path, size: int) -> None:
    data = random.Random(size).randbytes(size)
    sender = Background(lambda: send_ymodem(pipes.a, "fw.bin", data, mtime_s=1_600_000_000))
    files = receive_ymodem(pipes.b, tmp_path)
    assert sender.result() == size
    assert [(f.name, f.size_bytes, f.declared_size) for f in files] == [("fw.bin", size, size)]
    assert (tmp_path / "fw.bin").read_bytes() == data
    assert (tmp_path / "fw.bin").stat().st_mtime == 1_600_000_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fw.bin"]  # no .part left


def test_ymodem_file_object_and_size(pipes: Pipes, tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(b"0123456789" * 500)
    with src.open("rb") as f:
        sender = Background(lambda: send_ymodem(pipes.a, "part", f, size=3000))
        streams: dict[str, io.BytesIO] = {}

        def open_stream(info: FileInfo) -> BinaryIO:
            streams[info.name] = io.BytesIO()
            return streams[info.name]

        files = receive_ymodem(pipes.b, open_stream)
        assert sender.result() == 3000
    assert files[0].path is None and files[0].size_bytes == 3000
    assert streams["part"].getvalue() == (b"0123456789" * 500)[:3000]


def test_ymodem_name_cannot_escape_the_directory(pipes: Pipes, tmp_path: Path) -> None:
    inside = tmp_path / "in"
    inside.mkdir()
    sender = Background(lambda: send_ymodem(pipes.a, "../../etc/evil", b"x"))
    files = receive_ymodem(pipes.b, inside)
    sender.result()
    assert files[0].path == inside / "evil"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_ymodem_dot_dot_name_is_refused_and_the_sender_cancelled(
    pipes: Pipes, tmp_path: Path
) -> None:
    sender = Background(lambda: send_ymodem(pipes.a, "..", b"x" * 5000))
    with pytest.raises(TransportError, match=r": refusing the file name '\.\.'$"):
        receive_ymodem(pipes.b, tmp_path)
    with pytest.raises(TransportError, match=r"receiver cancelled \(CAN CAN\)"):
        sender.result()
    assert list(tmp_path.iterdir()) == []


def test_failing_callback_cancels_the_sender(pipes: Pipes) -> None:
    def refuse(info: FileInfo) -> BinaryIO:
        raise SourceError(f"disk full for {info.name}")

    sender = Background(lambda: send_ymodem(pipes.a, "a", b"x" * 5000))
    with pytest.raises(SourceError, match="disk full for a"):
        receive_ymodem(pipes.b, refuse)
    with pytest.raises(TransportError, match=r"YMODEM header block: receiver cancelled"):
        sender.result()


def test_corrupted_blocks_are_retransmitted(pipes: Pipes) -> None:
    data = random.Random(7).randbytes(8 * 1024)
    lossy = Lossy(pipes.a, corrupt={3, 4, 7})  # block 3 twice, then block 5
    sender = Background(lambda: send_xmodem(lossy, data, timeout_s=5.0))
    out = io.BytesIO()
    receive_xmodem(pipes.b, out, size=len(data))
    assert sender.result() == len(data)
    assert out.getvalue() == data
    frames = [w for w in lossy.writes if len(w) == 1029]
    assert [w[1] for w in frames] == [1, 2, 3, 3, 3, 4, 5, 5, 6, 7, 8]


def test_no_receiver_times_out_naming_the_command(pipes: Pipes) -> None:
    started = time.monotonic()
    with pytest.raises(TransportError) as caught:
        send_xmodem(pipes.a, b"x", timeout_s=0.3)
    assert caught.value.message == (
        "no 'C' or NAK from the receiver within 0.3 s: is `loadx` running?"
    )
    assert 0.25 < time.monotonic() - started < 2.0


def test_receiver_that_stops_answering_times_out_naming_the_block(pipes: Pipes) -> None:
    os.write(pipes.fds[3], b"C")  # the receiver starts, then never answers again
    with pytest.raises(TransportError) as caught:
        send_ymodem(pipes.a, "a", b"x" * 3000, timeout_s=0.2, retries=2, settle_s=0.05)
    assert caught.value.message == (
        "YMODEM header block: not acknowledged after 2 tries (0 NAK, 2 timeouts of 0.2 s)"
    )
    assert os.read(pipes.fds[2], 4096).endswith(CANCEL)  # the receiver was told


def test_receiver_cancel_stops_the_sender(pipes: Pipes) -> None:
    def receiver() -> None:
        os.write(pipes.fds[3], b"C")
        pipes.b.read(1029, 5.0)
        time.sleep(0.05)
        os.write(pipes.fds[3], b"\x18\x18")

    peer = Background(receiver)
    with pytest.raises(TransportError, match=r"^XMODEM block 1: receiver cancelled \(CAN CAN\)$"):
        send_xmodem(pipes.a, b"x" * 5000)
    peer.result()


def test_pending_bytes_start_the_transfer(pipes: Pipes) -> None:
    # The console read U-Boot's first C together with its banner: hand it over.
    def receiver() -> bytes:
        got = pipes.b.read(2000, 5.0)
        os.write(pipes.fds[3], b"\x06")
        assert pipes.b.read(10, 5.0) == b"\x04"
        os.write(pipes.fds[3], b"\x06")
        return got

    peer = Background(receiver)
    started = time.monotonic()
    send_xmodem(pipes.a, b"abc", pending=b"C")
    assert time.monotonic() - started < 1.0
    assert peer.result()[:3] == b"\x01\x01\xfe"


def test_link_closed_by_the_peer(pipes: Pipes) -> None:
    os.write(pipes.fds[3], b"C")
    os.close(pipes.fds[3])
    try:
        with pytest.raises(TransportError, match=r"^XMODEM block 1: the link was closed"):
            send_xmodem(pipes.a, b"x" * 100, timeout_s=5)
    finally:
        pipes.fds = (*pipes.fds[:3], os.open(os.devnull, os.O_WRONLY))


def test_serial_link_over_a_pty(tmp_path: Path) -> None:
    master, slave = os.openpty()
    port = serial.Serial(os.ttyname(slave), 115200)
    os.close(slave)
    try:
        data = random.Random(3).randbytes(50_000)
        sender = Background(lambda: send_ymodem(SerialLink(port), "s.bin", data))
        files = receive_ymodem(FdLink(master), tmp_path)
        assert sender.result() == len(data)
        assert files[0].path is not None and files[0].path.read_bytes() == data
        # And the other way: the pyserial side receives.
        out = io.BytesIO()
        receiver = Background(lambda: receive_xmodem(SerialLink(port), out, size=len(data)))
        send_xmodem(FdLink(master), data)
        receiver.result()
        assert out.getvalue() == data
    finally:
        port.close()
        os.close(master)


def test_serial_link_over_pyserial_socket_url() -> None:
    server = socket.create_server(("127.0.0.1", 0))
    host, tcp_port = server.getsockname()
    data = random.Random(4).randbytes(20_000)
    port = serial.serial_for_url(f"socket://{host}:{tcp_port}")
    conn, _ = server.accept()
    try:
        sender = Background(lambda: send_xmodem(SerialLink(port), data))
        out = io.BytesIO()
        receive_xmodem(FdLink(conn.fileno()), out, size=len(data))
        assert sender.result() == len(data) and out.getvalue() == data
    finally:
        port.close()
        conn.close()
        server.close()
