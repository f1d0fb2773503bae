"""Interoperability with lrzsz (rx, rz, sx, sz), both directions, byte-identical results.

The programs run on a pair of pipes (blocking descriptors). Not on a pty: at exit lrzsz
flushes its terminal (TCIOFLUSH), which on a pty can discard its last ACK before we read it.
"""

from __future__ import annotations

import io
import os
import random
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from tests.conftest import need
from unbrick.transports.xymodem import OutgoingFile
from unbrick.transports.xymodem_io import (
    FdLink,
    receive_xmodem,
    receive_ymodem,
    send_xmodem,
    send_ymodem,
    send_ymodem_batch,
)

pytestmark = pytest.mark.peer

SIZES = [0, 1, 127, 128, 1023, 1024, 1025, 100 * 1024, 1 << 20]


class Peer:
    """An lrzsz program with its stdin/stdout on pipes; ``link`` is our end."""

    def __init__(self, argv: Sequence[str], cwd: Path) -> None:
        need(argv[0])
        to_r, to_w = os.pipe()
        from_r, from_w = os.pipe()
        self._stderr = cwd / f".{argv[0]}.stderr"
        with self._stderr.open("wb") as err:
            self.proc = subprocess.Popen(list(argv), stdin=to_r, stdout=from_w, stderr=err, cwd=cwd)
        os.close(to_r)
        os.close(from_w)
        self._fds = (from_r, to_w)
        self.link = FdLink(from_r, to_w)

    def finish(self, timeout_s: float = 30.0) -> int:
        try:
            return self.proc.wait(timeout_s)
        finally:
            for fd in self._fds:
                os.close(fd)

    def stderr(self) -> str:
        return self._stderr.read_text(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def peers() -> Iterator[list[Peer]]:
    started: list[Peer] = []
    yield started
    for p in started:
        p.kill()


def payload(size: int) -> bytes:
    return random.Random(size).randbytes(size)


def start(peers: list[Peer], argv: Sequence[str], cwd: Path) -> Peer:
    peer = Peer(argv, cwd)
    peers.append(peer)
    return peer


@pytest.mark.parametrize("size", SIZES)
def test_our_xmodem_1k_into_rx(tmp_path: Path, peers: list[Peer], size: int) -> None:
    data = payload(size)
    rx = start(peers, ["rx", "-c", "-q", "out.bin"], tmp_path)  # -c: CRC-16 ('C')
    assert send_xmodem(rx.link, data) == size
    assert rx.finish() == 0, rx.stderr()
    got = (tmp_path / "out.bin").read_bytes()
    assert got[:size] == data  # compare over the real length
    assert set(got[size:]) <= {0x1A} and len(got) % 128 == 0


@pytest.mark.parametrize("size", [1, 1025, 100 * 1024])
def test_our_xmodem_into_rx_in_checksum_mode(tmp_path: Path, peers: list[Peer], size: int) -> None:
    data = payload(size)
    rx = start(peers, ["rx", "-q", "out.bin"], tmp_path)  # no -c: opens with NAK
    send_xmodem(rx.link, data)
    assert rx.finish() == 0, rx.stderr()
    got = (tmp_path / "out.bin").read_bytes()
    assert got[:size] == data and len(got) == -(-size // 128) * 128


@pytest.mark.parametrize("size", SIZES)
def test_our_ymodem_into_rz(tmp_path: Path, peers: list[Peer], size: int) -> None:
    data = payload(size)
    rz = start(peers, ["rz", "--ymodem", "-q"], tmp_path)
    assert send_ymodem(rz.link, "image.bin", data, mtime_s=1_650_000_000) == size
    assert rz.finish() == 0, rz.stderr()
    out = tmp_path / "image.bin"
    assert out.read_bytes() == data  # YMODEM carries the size: no padding
    assert out.stat().st_mtime == pytest.approx(1_650_000_000, abs=1)


@pytest.mark.slow
def test_our_ymodem_batch_into_rz(tmp_path: Path, peers: list[Peer]) -> None:
    files = [OutgoingFile(f"part{i}.bin", payload(1000 + i * 3000)) for i in range(3)]
    rz = start(peers, ["rz", "--ymodem", "-q"], tmp_path)
    send_ymodem_batch(rz.link, files)
    assert rz.finish() == 0, rz.stderr()
    for f in files:
        assert (tmp_path / f.name).read_bytes() == f.data


@pytest.mark.parametrize("size", SIZES)
def test_sz_ymodem_into_our_receiver(tmp_path: Path, peers: list[Peer], size: int) -> None:
    src = tmp_path / "send"
    src.mkdir()
    data = payload(size)
    (src / "fw.img").write_bytes(data)
    out = tmp_path / "got"
    out.mkdir()
    sz = start(peers, ["sz", "--ymodem", "-q", "fw.img"], src)
    files = receive_ymodem(sz.link, out)
    assert sz.finish() == 0, sz.stderr()
    assert [(f.name, f.size_bytes, f.declared_size) for f in files] == [("fw.img", size, size)]
    assert (out / "fw.img").read_bytes() == data


def test_sz_ymodem_batch_into_our_receiver(tmp_path: Path, peers: list[Peer]) -> None:
    names = ["a.bin", "b.bin", "c.bin"]
    for i, name in enumerate(names):
        (tmp_path / name).write_bytes(payload(i * 5000 + 7))
    out = tmp_path / "got"
    out.mkdir()
    sz = start(peers, ["sz", "--ymodem", "-q", *names], tmp_path)
    files = receive_ymodem(sz.link, out)
    assert sz.finish() == 0, sz.stderr()
    assert [f.name for f in files] == names
    for name in names:
        assert (out / name).read_bytes() == (tmp_path / name).read_bytes()


@pytest.mark.parametrize(
    ("size", "one_k"),
    [(size, True) for size in SIZES] + [(size, False) for size in SIZES if size <= 100 * 1024],
)
def test_sx_into_our_receiver(tmp_path: Path, peers: list[Peer], size: int, one_k: bool) -> None:
    data = payload(size)
    (tmp_path / "fw.img").write_bytes(data)
    sx = start(peers, ["sx", *(["-k"] if one_k else []), "-q", "fw.img"], tmp_path)
    out = io.BytesIO()
    written = receive_xmodem(sx.link, out)
    assert sx.finish() == 0, sx.stderr()
    got = out.getvalue()
    assert written == len(got)
    assert got[:size] == data and set(got[size:]) <= {0x1A}
