"""Our client against our server, and the server packet by packet: options, rollover, loss,
duplicate ACKs, backoff, limits, the root jail and the write switch."""

from __future__ import annotations

import io
import itertools
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.tftp.conftest import RawClient, SeededLoss, payload
from unbrick.errors import TransportError, UsageError
from unbrick.transports.tftp import TftpRemoteError, TftpServer, tftp_get, tftp_put
from unbrick.transports.tftp.codec import (
    Ack,
    Data,
    Error,
    ErrorCode,
    Opcode,
    OptionAck,
    Request,
    decode,
    encode,
)
from unbrick.transports.tftp.server import PathRefused, check_name, open_for_read

MakeServer = Callable[..., TftpServer]


def rrq(name: str, *options: tuple[str, str], mode: str = "octet") -> bytes:
    return encode(Request(Opcode.RRQ, name, mode, options))


def wrq(name: str, *options: tuple[str, str]) -> bytes:
    return encode(Request(Opcode.WRQ, name, "octet", options))


@pytest.mark.parametrize(
    ("blksize", "windowsize", "size"),
    [
        (512, 1, 0),
        (512, 1, 512 * 7),  # ends with an empty block
        (512, 1, 100_001),
        (1468, 16, 300_000),
        (8, 4, 999),
        (65464, 4, 200_000),
        (1428, 64, 1428 * 64 * 2),
    ],
)
def test_get_and_put_round_trip(
    make_server: MakeServer, data_root: Path, tmp_path: Path, blksize: int, windowsize: int,
    size: int,
) -> None:  # fmt: skip
    data = payload(size, seed=size)
    (data_root / "image.bin").write_bytes(data)
    server = make_server(allow_write=True)
    host, port = server.address
    local = tmp_path / "got.bin"
    got = tftp_get(host, port, "image.bin", local, blksize=blksize, windowsize=windowsize)
    assert local.read_bytes() == data
    assert got.size_bytes == size
    assert got.negotiated
    assert got.options.tsize == size
    assert got.options.blksize == blksize
    sent = tftp_put(host, port, "back.bin", local, blksize=blksize, windowsize=windowsize)
    assert (data_root / "back.bin").read_bytes() == data
    assert sent.size_bytes == size
    # Windows carry at most 128 KiB (client and server alike): 65464-byte blocks go 2 at a time.
    windowsize = min(windowsize, max(1, 128 * 1024 // blksize))
    assert sent.options.windowsize == windowsize
    assert got.options.windowsize == windowsize
    read = server.wait_for_transfer("image.bin", timeout_s=5)
    write = server.wait_for_transfer("back.bin", timeout_s=5)
    assert (read.direction, read.ok, read.size_bytes) == ("read", True, size)
    assert read.path == str((data_root / "image.bin").resolve())
    assert (write.direction, write.ok, write.size_bytes) == ("write", True, size)
    assert (write.options.blksize, write.options.windowsize) == (blksize, windowsize)
    # No temporary file is left in the root.
    assert sorted(p.name for p in data_root.iterdir()) == ["back.bin", "image.bin"]


def test_netascii_get_and_put(make_server: MakeServer, data_root: Path) -> None:
    (data_root / "boot.scr.txt").write_bytes(b"setenv a 1\nboot\r\n\rend")
    server = make_server(allow_write=True)
    host, port = server.address
    out = io.BytesIO()
    result = tftp_get(host, port, "boot.scr.txt", out, mode="netascii", blksize=8)
    assert out.getvalue() == b"setenv a 1\nboot\r\n\rend"
    assert result.size_bytes == len(b"setenv a 1\r\nboot\r\0\r\n\r\0end")
    tftp_put(host, port, "up.txt", b"x\ny\r", mode="netascii", blksize=8)
    assert (data_root / "up.txt").read_bytes() == b"x\ny\r"


def test_netascii_wire_format(make_server: MakeServer, data_root: Path, raw: RawClient) -> None:
    (data_root / "t.txt").write_bytes(b"a\nb\r")
    server = make_server()
    raw.send(rrq("t.txt", mode="netascii"), server.address)
    data, peer = raw.recv()
    assert decode(data) == Data(1, b"a\r\nb\r\0")
    raw.send(encode(Ack(1)), peer)


def test_block_numbers_roll_over_after_65535(
    make_server: MakeServer, data_root: Path, tmp_path: Path
) -> None:
    data = payload(8 * 65_540 + 3, seed=7)  # 65541 blocks of 8 bytes
    (data_root / "big.bin").write_bytes(data)
    server = make_server(allow_write=True)
    host, port = server.address
    local = tmp_path / "big.bin"
    got = tftp_get(host, port, "big.bin", local, blksize=8, windowsize=64)
    assert local.read_bytes() == data
    assert got.options.blksize == 8
    tftp_put(host, port, "big-back.bin", local, blksize=8, windowsize=64)
    assert (data_root / "big-back.bin").read_bytes() == data


@pytest.mark.parametrize("windowsize", [1, 8])
def test_ten_percent_loss_both_ways_still_transfers_identical_files(
    make_server: MakeServer, data_root: Path, tmp_path: Path, windowsize: int
) -> None:
    data = payload(150_000, seed=3)
    (data_root / "fw.bin").write_bytes(data)
    server_loss = SeededLoss(0.10, seed=11)
    client_loss = SeededLoss(0.10, seed=12)
    server = make_server(allow_write=True, loss=server_loss, timeout_s=0.03, retries=10)
    host, port = server.address
    local = tmp_path / "fw.bin"
    tftp_get(
        host, port, "fw.bin", local, blksize=1468, windowsize=windowsize, timeout_s=0.03,
        retries=10, loss=client_loss,
    )  # fmt: skip
    assert local.read_bytes() == data
    tftp_put(
        host, port, "fw-back.bin", local, blksize=1468, windowsize=windowsize, timeout_s=0.03,
        retries=10, loss=client_loss,
    )  # fmt: skip
    assert (data_root / "fw-back.bin").read_bytes() == data
    assert server_loss.dropped["in"] > 5
    assert server_loss.dropped["out"] > 5
    assert client_loss.dropped["in"] > 5


def test_duplicate_acks_are_not_answered(
    make_server: MakeServer, data_root: Path, raw: RawClient
) -> None:
    """The Sorcerer's Apprentice bug: a server that answers every ACK, duplicates included,
    sends every later block twice. Each block must arrive exactly once."""
    data = payload(512 * 20 + 1)
    (data_root / "f.bin").write_bytes(data)
    server = make_server(timeout_s=2.0)
    raw.send(rrq("f.bin"), server.address)
    received: list[int] = []
    out = b""
    while True:
        datagram, peer = raw.recv()
        packet = decode(datagram)
        assert isinstance(packet, Data)
        received.append(packet.block)
        out += packet.payload
        ack = encode(Ack(packet.block))
        raw.send(ack, peer)
        raw.send(ack, peer)  # duplicate
        if len(packet.payload) < 512:
            break
    # Anything still in flight would be a duplicate DATA.
    extra = raw.recv_all(0.3)
    assert received == list(range(1, 22))
    assert extra == []
    assert out == data


def test_retransmission_backs_off_exponentially_then_gives_up(
    make_server: MakeServer, data_root: Path, raw: RawClient
) -> None:
    (data_root / "f.bin").write_bytes(b"x" * 100)
    server = make_server(timeout_s=0.1, retries=3)
    start = time.monotonic()
    raw.send(rrq("f.bin"), server.address)
    arrivals = raw.recv_all(1.0)
    times = [t - start for t, _, _ in arrivals]
    assert [decode(d) for _, d, _ in arrivals] == [Data(1, b"x" * 100)] * 4
    gaps = [b - a for a, b in itertools.pairwise(times)]
    # 0.1, 0.2, 0.4 s; a loaded machine adds delay to each, so check bounds and doubling.
    assert gaps[0] >= 0.09
    assert gaps[1] >= 0.19
    assert gaps[2] >= 0.39
    assert gaps[1] > 1.4 * gaps[0]
    assert gaps[2] > 1.4 * gaps[1]
    record = server.wait_for_transfer("f.bin", timeout_s=5)
    assert not record.ok
    assert "stopped acknowledging" in record.error


def test_window_restarts_after_the_block_the_receiver_acknowledges(
    make_server: MakeServer, data_root: Path, raw: RawClient
) -> None:
    """RFC 7440: an ACK inside the window means the blocks after it were lost."""
    data = payload(512 * 10)
    (data_root / "f.bin").write_bytes(data)
    server = make_server(timeout_s=2.0)
    raw.send(rrq("f.bin", ("windowsize", "4")), server.address)
    oack, peer = raw.recv()
    assert decode(oack) == OptionAck((("windowsize", "4"),))
    raw.send(encode(Ack(0)), peer)
    first = [decode(raw.recv()[0]) for _ in range(4)]
    assert [p.block for p in first] == [1, 2, 3, 4]  # type: ignore[union-attr]
    raw.send(encode(Ack(2)), peer)  # "3 and 4 were lost"
    again = [decode(raw.recv()[0]) for _ in range(4)]
    assert [p.block for p in again] == [3, 4, 5, 6]  # type: ignore[union-attr]
    raw.send(encode(Ack(2)), peer)  # "3 was lost again": the window once more, at once
    again = [decode(raw.recv()[0]) for _ in range(4)]
    assert [p.block for p in again] == [3, 4, 5, 6]  # type: ignore[union-attr]
    raw.send(encode(Ack(2)), peer)  # a duplicate of that request: ignored
    raw.send(encode(Ack(2)), peer)
    assert raw.recv_all(0.3) == []


def test_duplicate_request_starts_one_session(
    make_server: MakeServer, data_root: Path, raw: RawClient
) -> None:
    (data_root / "f.bin").write_bytes(b"abc")
    server = make_server(timeout_s=1.0)
    request = rrq("f.bin")
    raw.send(request, server.address)
    raw.send(request, server.address)
    arrivals = raw.recv_all(0.4)
    assert len({peer for _, _, peer in arrivals}) == 1
    assert decode(arrivals[0][1]) == Data(1, b"abc")


def test_sessions_beyond_the_limit_are_dropped_until_one_ends(
    make_server: MakeServer, data_root: Path
) -> None:
    (data_root / "f.bin").write_bytes(b"abc")
    server = make_server(max_sessions=1, timeout_s=0.3, retries=1)
    first, second = RawClient(), RawClient()
    try:
        first.send(rrq("f.bin"), server.address)
        assert decode(first.recv()[0]) == Data(1, b"abc")
        second.send(rrq("f.bin"), server.address)
        with pytest.raises(TimeoutError):
            second.recv(0.2)
        assert server.wait_for_transfer("f.bin", timeout_s=5).ok is False
        second.send(rrq("f.bin"), server.address)
        assert decode(second.recv()[0]) == Data(1, b"abc")
    finally:
        first.close()
        second.close()


def test_twenty_concurrent_clients(make_server: MakeServer, data_root: Path) -> None:
    files = {f"f{i}.bin": payload(50_000 + i * 1000, seed=i) for i in range(20)}
    for name, data in files.items():
        (data_root / name).write_bytes(data)
    server = make_server()
    host, port = server.address
    results: dict[str, bytes] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(20)

    def fetch(name: str, windowsize: int) -> None:
        out = io.BytesIO()
        try:
            start.wait()
            tftp_get(host, port, name, out, blksize=1024, windowsize=windowsize, retries=8)
            results[name] = out.getvalue()
        except BaseException as e:
            errors.append(e)

    threads = [
        threading.Thread(target=fetch, args=(name, 1 + i % 4 * 4)) for i, name in enumerate(files)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert results == files
    assert all(server.wait_for_transfer(name, timeout_s=5).ok for name in files)


def test_writes_are_refused_by_default(
    make_server: MakeServer, data_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = make_server()
    host, port = server.address
    with (
        caplog.at_level(logging.WARNING, "unbrick.transports.tftp"),
        pytest.raises(TftpRemoteError) as info,
    ):
        tftp_put(host, port, "backup.bin", b"data")
    assert info.value.code == ErrorCode.ACCESS_VIOLATION
    assert "uploads are disabled" in info.value.message
    assert list(data_root.iterdir()) == []
    assert "refused TFTP write of 'backup.bin'" in caplog.text


def test_existing_files_are_kept_unless_overwrite(make_server: MakeServer, data_root: Path) -> None:
    (data_root / "keep.bin").write_bytes(b"old")
    server = make_server(allow_write=True)
    with pytest.raises(TftpRemoteError) as info:
        tftp_put(*server.address, "keep.bin", b"new")
    assert info.value.code == ErrorCode.FILE_EXISTS
    assert (data_root / "keep.bin").read_bytes() == b"old"
    server2 = make_server(allow_write=True, overwrite=True)
    tftp_put(*server2.address, "keep.bin", b"new")
    assert (data_root / "keep.bin").read_bytes() == b"new"


def test_upload_larger_than_announced_or_allowed_is_discarded(
    make_server: MakeServer, data_root: Path, raw: RawClient
) -> None:
    server = make_server(allow_write=True, max_upload_bytes=1000)
    raw.send(wrq("big.bin", ("tsize", "1001")), server.address)
    packet = decode(raw.recv()[0])
    assert isinstance(packet, Error)
    assert packet.code == ErrorCode.DISK_FULL
    # Announces 100 bytes, sends 50: refused at the end, nothing stored.
    raw.send(wrq("short.bin", ("tsize", "100")), server.address)
    oack, peer = raw.recv()
    assert decode(oack) == OptionAck((("tsize", "100"),))
    raw.send(encode(Data(1, b"y" * 50)), peer)
    packet = decode(raw.recv()[0])
    assert isinstance(packet, Error)
    assert "announced 100" in packet.message
    # No tsize, but more than the limit: refused as it crosses the limit.
    raw.send(wrq("huge.bin"), server.address)
    ack0, peer = raw.recv()
    assert decode(ack0) == Ack(0)
    for block in (1, 2):
        raw.send(encode(Data(block, b"z" * 512)), peer)
        reply = decode(raw.recv()[0])
    assert isinstance(reply, Error)
    assert reply.code == ErrorCode.DISK_FULL
    time.sleep(0.1)
    assert list(data_root.iterdir()) == []


def test_tsize_of_a_read_reports_the_file_size(
    make_server: MakeServer, data_root: Path, raw: RawClient
) -> None:
    (data_root / "f.bin").write_bytes(bytes(12345))
    server = make_server()
    raw.send(rrq("f.bin", ("tsize", "0"), ("blksize", "100000"), ("x-vendor", "1")), server.address)
    oack, peer = raw.recv()
    # blksize beyond 65464 is invalid and ignored; unknown options too.
    assert decode(oack) == OptionAck((("tsize", "12345"),))
    raw.send(encode(Error(ErrorCode.OPTION_REFUSED, "no thanks")), peer)
    record = server.wait_for_transfer("f.bin", timeout_s=5)
    assert not record.ok


@pytest.mark.parametrize(
    "name", ["../secret.txt", "/etc/passwd", "a/../../secret.txt", "sub/../../secret.txt"]
)
def test_names_escaping_the_root_are_refused(
    make_server: MakeServer, data_root: Path, tmp_path: Path, name: str,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    (tmp_path / "secret.txt").write_text("secret")
    (data_root / "sub").mkdir()
    server = make_server(allow_write=True)
    with caplog.at_level(logging.WARNING, "unbrick.transports.tftp"):
        with pytest.raises(TftpRemoteError) as info:
            tftp_get(*server.address, name, io.BytesIO())
        assert info.value.code == ErrorCode.ACCESS_VIOLATION
        with pytest.raises(TftpRemoteError):
            tftp_put(*server.address, name, b"evil")
    assert (tmp_path / "secret.txt").read_text() == "secret"
    assert not (tmp_path.parent / "secret.txt").exists()
    assert f"refused TFTP read of {name!r}" in caplog.text


def test_symlinks_out_of_the_root_are_refused(
    make_server: MakeServer, data_root: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("secret")
    (data_root / "link.txt").symlink_to(outside / "secret.txt")
    (data_root / "linkdir").symlink_to(outside)
    (data_root / "inside.bin").write_bytes(b"ok")
    (data_root / "alias.bin").symlink_to("inside.bin")
    server = make_server(allow_write=True, overwrite=True)
    for name in ("link.txt", "linkdir/secret.txt"):
        with pytest.raises(TftpRemoteError) as info:
            tftp_get(*server.address, name, io.BytesIO())
        assert info.value.code == ErrorCode.ACCESS_VIOLATION
        with pytest.raises(TftpRemoteError):
            tftp_put(*server.address, name, b"evil")
    assert (outside / "secret.txt").read_text() == "secret"
    with pytest.raises(TftpRemoteError):
        tftp_put(*server.address, "linkdir/new.txt", b"evil")
    assert not (outside / "new.txt").exists()
    # A link that stays inside the root is served.
    out = io.BytesIO()
    tftp_get(*server.address, "alias.bin", out)
    assert out.getvalue() == b"ok"


def test_nul_and_control_characters_are_refused(
    make_server: MakeServer, data_root: Path, raw: RawClient
) -> None:
    (data_root / "a").write_bytes(b"a")
    server = make_server()
    # A NUL inside the name ends it early: "a" then mode "b" -> not a TFTP request.
    raw.send(b"\0\1a\0b\0octet\0", server.address)
    packet = decode(raw.recv()[0])
    assert isinstance(packet, Error)
    assert packet.code == ErrorCode.ILLEGAL_OPERATION
    raw.send(rrq("a\x01"), server.address)
    packet = decode(raw.recv()[0])
    assert isinstance(packet, Error)
    assert packet.code == ErrorCode.ACCESS_VIOLATION


def test_devices_and_directories_are_not_served(make_server: MakeServer, data_root: Path) -> None:
    (data_root / "dir").mkdir()
    os.mkfifo(data_root / "fifo")
    server = make_server()
    for name in ("dir", "fifo", "missing"):
        with pytest.raises(TftpRemoteError) as info:
            tftp_get(*server.address, name, io.BytesIO())
        assert info.value.code == ErrorCode.FILE_NOT_FOUND


@pytest.mark.unit
@pytest.mark.parametrize(
    ("name", "parts"),
    [("a", ("a",)), ("a//b/./c", ("a", "b", "c")), ("./x", ("x",)), ("dir/", ("dir",))],
)
def test_check_name_normalises(name: str, parts: tuple[str, ...]) -> None:
    assert check_name(name) == parts


@pytest.mark.unit
@pytest.mark.parametrize("name", ["", "/a", "..", "a/../b", "a\0b", "a\nb", "a\x7f", ".", "//"])
def test_check_name_refuses(name: str) -> None:
    with pytest.raises(PathRefused):
        check_name(name)


def test_open_for_read_checks_the_opened_descriptor(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "f").write_bytes(b"1234")
    f, size, path = open_for_read(str(root.resolve()), "f")
    with f:
        assert (f.read(), size, path) == (b"1234", 4, str((root / "f").resolve()))


# --- client fallbacks against minimal scripted servers -----------------------------------------


def scripted_server(script: Callable[[RawClient, tuple[str, int], bytes], None]) -> tuple[
    tuple[str, int], threading.Thread, RawClient
]:  # fmt: skip
    """A one-request server: ``script(socket, client, request)`` answers from a new port."""
    listener = RawClient()
    address = listener.sock.getsockname()

    def run() -> None:
        try:
            request, client = listener.recv(5)
            script(listener, client, request)
        except TimeoutError:
            pass

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return (str(address[0]), int(address[1])), thread, listener


def test_client_falls_back_when_the_server_ignores_options(tmp_path: Path) -> None:
    data = payload(512 + 100)

    def legacy(listener: RawClient, client: tuple[str, int], request: bytes) -> None:
        assert decode(request).options  # type: ignore[union-attr]
        tid = RawClient()
        try:
            for block in (1, 2):
                chunk = data[(block - 1) * 512 : block * 512]
                tid.send(encode(Data(block, chunk)), client)
                assert decode(tid.recv()[0]) == Ack(block)
        finally:
            tid.close()

    address, thread, listener = scripted_server(legacy)
    local = tmp_path / "x.bin"
    result = tftp_get(*address, "x.bin", local, blksize=1468, windowsize=8)
    thread.join(5)
    listener.close()
    assert local.read_bytes() == data
    assert not result.negotiated
    assert result.options.blksize == 512


def test_client_retries_without_options_when_they_are_refused() -> None:
    seen: list[Request] = []

    def picky(listener: RawClient, client: tuple[str, int], request: bytes) -> None:
        first = decode(request)
        assert isinstance(first, Request)
        seen.append(first)
        listener.send(encode(Error(ErrorCode.OPTION_REFUSED, "no options")), client)
        again, client = listener.recv(5)
        second = decode(again)
        assert isinstance(second, Request)
        seen.append(second)
        tid = RawClient()
        try:
            tid.send(encode(Ack(0)), client)
            packet = decode(tid.recv()[0])
            assert packet == Data(1, b"hello")
            tid.send(encode(Ack(1)), client)
        finally:
            tid.close()

    address, thread, listener = scripted_server(picky)
    result = tftp_put(*address, "x.bin", b"hello", blksize=1024)
    thread.join(5)
    listener.close()
    assert seen[0].options and not seen[1].options
    assert not result.negotiated


def test_client_detects_a_size_that_differs_from_tsize(tmp_path: Path) -> None:
    def liar(listener: RawClient, client: tuple[str, int], request: bytes) -> None:
        tid = RawClient()
        try:
            tid.send(encode(OptionAck((("tsize", "10"),))), client)
            assert decode(tid.recv()[0]) == Ack(0)
            tid.send(encode(Data(1, b"12345")), client)
            tid.recv()
        finally:
            tid.close()

    address, thread, listener = scripted_server(liar)
    local = tmp_path / "x.bin"
    with pytest.raises(TransportError, match="announced 10"):
        tftp_get(*address, "x.bin", local, blksize=512)
    thread.join(5)
    listener.close()
    assert list(tmp_path.iterdir()) == []  # no partial file, no temporary file


def test_client_refuses_an_oack_it_did_not_ask_for() -> None:
    def pushy(listener: RawClient, client: tuple[str, int], request: bytes) -> None:
        tid = RawClient()
        try:
            tid.send(encode(OptionAck((("blksize", "9000"),))), client)
            packet = decode(tid.recv()[0])
            assert isinstance(packet, Error)
            assert packet.code == ErrorCode.OPTION_REFUSED
        finally:
            tid.close()

    address, thread, listener = scripted_server(pushy)
    with pytest.raises(TransportError, match="blksize"):
        tftp_get(*address, "x.bin", io.BytesIO(), blksize=1468)
    thread.join(5)
    listener.close()


def test_client_times_out_naming_the_server() -> None:
    silent = RawClient()
    try:
        start = time.monotonic()
        with pytest.raises(TransportError, match="no answer from TFTP server"):
            tftp_get(*silent.sock.getsockname(), "x", io.BytesIO(), timeout_s=0.05, retries=2)
        assert time.monotonic() - start < 2
    finally:
        silent.close()


def test_client_parameters_are_checked() -> None:
    with pytest.raises(UsageError):
        tftp_get("127.0.0.1", 69, "x", io.BytesIO(), blksize=4)
    with pytest.raises(UsageError):
        tftp_put("127.0.0.1", 69, "x", b"", windowsize=0)
    with pytest.raises(UsageError):
        tftp_put("127.0.0.1", 69, "x", b"", mode="mail")


# --- server life cycle -------------------------------------------------------------------------


def test_stop_cancels_running_sessions_promptly(
    make_server: MakeServer, data_root: Path, raw: RawClient
) -> None:
    (data_root / "f.bin").write_bytes(b"x" * 2000)
    server = make_server(timeout_s=5.0)
    raw.send(rrq("f.bin"), server.address)
    raw.recv()
    assert server.active_sessions() == 1
    start = time.monotonic()
    server.stop()
    assert time.monotonic() - start < 1.0
    assert server.active_sessions() == 0


def test_wait_for_transfer_reports_a_device_pull(make_server: MakeServer, data_root: Path) -> None:
    (data_root / "uImage").write_bytes(b"kernel")
    server = make_server()
    with pytest.raises(TransportError, match="no TFTP transfer"):
        server.wait_for_transfer("uImage", timeout_s=0.05)
    threading.Timer(0.1, tftp_get, args=(*server.address, "uImage", io.BytesIO())).start()
    record = server.wait_for_transfer("uImage", timeout_s=5)
    assert record.ok
    assert record.size_bytes == 6
    assert record.direction == "read"


def test_ipv6_loopback(data_root: Path) -> None:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    (data_root / "a.bin").write_bytes(b"v6" * 3000)
    with TftpServer(data_root, host="::1", allow_write=True, timeout_s=0.2) as server:
        host, port = server.address
        assert host == "::1"
        out = io.BytesIO()
        tftp_get("::1", port, "a.bin", out, windowsize=4)
        assert out.getvalue() == b"v6" * 3000
        tftp_put("::1", port, "b.bin", b"six" * 999, windowsize=4)
        assert server.wait_for_transfer("b.bin", timeout_s=5).ok
    assert (data_root / "b.bin").read_bytes() == b"six" * 999


def test_server_arguments_are_checked(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        TftpServer(tmp_path / "missing", host="127.0.0.1")
    with pytest.raises(UsageError):
        TftpServer(tmp_path, host="127.0.0.1", blksize_max=4)
    with pytest.raises(UsageError):
        _ = TftpServer(tmp_path, host="127.0.0.1").address


def test_stray_packets_to_the_request_port_get_an_error(
    make_server: MakeServer, raw: RawClient
) -> None:
    server = make_server()
    raw.send(encode(Ack(5)), server.address)
    packet = decode(raw.recv()[0])
    assert isinstance(packet, Error)
    assert packet.code == ErrorCode.UNKNOWN_TID
    raw.send(struct.pack("!HH", 5, 0) + b"bye\0", server.address)  # an ERROR: not answered
    with pytest.raises(TimeoutError):
        raw.recv(0.2)


@pytest.mark.unit
def test_spin_policy_probes_both_ways_then_keeps_the_faster() -> None:
    from unbrick.transports.tftp.transfer import SpinPolicy

    policy = SpinPolicy(20, exploit_epochs=3)
    assert policy.current == 20  # the first epoch polls
    assert policy.epoch_done(1.0) == 0  # measured with polling; now without
    assert policy.epoch_done(2.0) == 20  # without was slower: poll
    assert [policy.epoch_done(1.0) for _ in range(3)] == [20, 20, 20]
    assert policy.epoch_done(1.0) == 0  # probing again: without polling
    assert policy.epoch_done(0.5) == 0  # without was faster now: stop polling
    policy.give_up()
    assert [policy.epoch_done(0.1) for _ in range(12)] == [0] * 12
