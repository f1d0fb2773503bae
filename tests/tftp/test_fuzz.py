"""Random and hostile datagrams against a running server: it keeps serving, answers only with
TFTP packets, and never lets a byte of a file outside its root out."""

from __future__ import annotations

import io
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from unbrick.transports.tftp import TftpServer, tftp_get
from unbrick.transports.tftp.codec import MalformedPacket, decode

MARKER = b"TOP-SECRET-7f3a9c"


@pytest.fixture(scope="module")
def jail(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TftpServer, Path, Path]]:
    base = tmp_path_factory.mktemp("fuzz")
    outside = base / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(MARKER * 100)
    root = base / "root"
    root.mkdir()
    (root / "a.bin").write_bytes(b"public " * 300)
    (root / "sub").mkdir()
    (root / "link").symlink_to(outside / "secret")
    (root / "dirlink").symlink_to(outside)
    server = TftpServer(
        root, host="127.0.0.1", allow_write=True, timeout_s=0.05, retries=0, max_sessions=4096,
        dally_s=0.0,
    )  # fmt: skip
    server.start()
    yield server, root, outside
    server.stop()


def names(outside: Path) -> st.SearchStrategy[bytes]:
    hostile = [
        b"a.bin", b"sub/../a.bin", b"../outside/secret", b"../../etc/passwd", b"link",
        b"dirlink/secret", b"sub/../../outside/secret", str(outside / "secret").encode(),
        b"/etc/passwd", b"a.bin\x01", b"\xff\xfe", b"", b".", b"..", b"sub", b"sub/",
        b"%2e%2e/outside/secret", b"..\\outside\\secret", b"new-upload.bin",
    ]  # fmt: skip
    return st.one_of(st.sampled_from(hostile), st.binary(max_size=40))


def request_datagrams(outside: Path) -> st.SearchStrategy[bytes]:
    opcode = st.sampled_from([b"\0\1", b"\0\2"])
    mode = st.sampled_from([b"octet", b"netascii", b"NETASCII", b"mail", b"binary", b""])
    option = st.tuples(
        st.sampled_from([b"blksize", b"tsize", b"timeout", b"windowsize", b"x", b""]),
        st.one_of(st.sampled_from([b"0", b"8", b"65464", b"65535", b"99999999999"]), st.binary()),
    )
    return st.builds(
        lambda op, name, m, opts: (
            op + name + b"\0" + m + b"\0" + b"".join(k + b"\0" + v + b"\0" for k, v in opts)
        ),
        opcode,
        names(outside),
        mode,
        st.lists(option, max_size=5),
    )


def any_datagram(outside: Path) -> st.SearchStrategy[bytes]:
    stray = st.builds(
        lambda op, rest: op + rest,
        st.sampled_from([b"\0\3", b"\0\4", b"\0\5", b"\0\6", b"\0\7", b"\xff\xff"]),
        st.binary(max_size=64),
    )
    return st.one_of(request_datagrams(outside), stray, st.binary(max_size=600))


def drain(sock: socket.socket, wait_s: float) -> list[bytes]:
    got = []
    sock.settimeout(wait_s)
    while True:
        try:
            got.append(sock.recv(70000))
        except TimeoutError:
            return got


def test_random_datagrams_never_crash_the_server_or_leak_outside_files(
    jail: tuple[TftpServer, Path, Path],
) -> None:
    server, root, outside = jail
    before = sorted(p.name for p in outside.iterdir())
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    sock.bind(("127.0.0.1", 0))
    replies: list[bytes] = []

    @settings(
        max_examples=250,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(datagram=any_datagram(outside))
    def probe(datagram: bytes) -> None:
        sock.sendto(datagram, server.address)
        for reply in drain(sock, 0.005):
            assert MARKER not in reply
            replies.append(reply)

    try:
        probe()
        replies.extend(drain(sock, 0.3))
    finally:
        sock.close()
    assert all(MARKER not in reply for reply in replies)
    # Every answer is a TFTP packet (DATA of a file in the root, OACK, ACK 0 or ERROR).
    for reply in replies:
        try:
            decode(reply)
        except MalformedPacket as e:  # pragma: no cover - a failure shows the packet
            pytest.fail(f"server sent a malformed packet {reply[:40]!r}: {e}")
    assert any(reply[:2] == b"\0\5" for reply in replies)  # refusals
    assert any(reply[:2] == b"\0\3" for reply in replies)  # a.bin was served
    # Still serving; nothing was written outside the root, and the secret is intact.
    out = io.BytesIO()
    tftp_get(*server.address, "a.bin", out)
    assert out.getvalue() == b"public " * 300
    assert sorted(p.name for p in outside.iterdir()) == before
    assert (outside / "secret").read_bytes() == MARKER * 100
    for path in root.rglob("*"):
        assert os.path.realpath(path).startswith(str(root.resolve())) or path.is_symlink()
