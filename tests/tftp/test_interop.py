"""Interoperability with the real programs (Debian): tftp-hpa and atftp clients against our
server, tftpd-hpa and atftpd against our client, in both directions."""

from __future__ import annotations

import hashlib
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import need
from tests.tftp.conftest import SeededLoss, atftpd, output, payload, run_peer, tftpd_hpa
from unbrick.transports.tftp import TftpRemoteError, TftpServer, tftp_get, tftp_put
from unbrick.transports.tftp.codec import ErrorCode

pytestmark = pytest.mark.peer

MakeServer = Callable[..., TftpServer]
BLKSIZES = [512, 1428, 1468, 8192, 65464]
WINDOWSIZES = [1, 4, 16, 64]
#: Small, odd-sized: several windows of small blocks, a few big blocks.
SIZE = 150_001


def atftp(direction: str, port: int, remote: str, local: Path, *options: str) -> list[str]:
    argv = ["atftp", f"--{direction}", "-r", remote, "-l", str(local)]
    for option in options:
        argv += ["--option", option]
    return [*argv, "127.0.0.1", str(port)]


def hpa(port: int, *command: str) -> list[str]:
    return ["tftp", "-m", "binary", "127.0.0.1", str(port), "-c", *command]


@pytest.mark.parametrize("windowsize", WINDOWSIZES)
@pytest.mark.parametrize("blksize", BLKSIZES)
def test_atftp_client_gets_and_puts(
    make_server: MakeServer, data_root: Path, tmp_path: Path, blksize: int, windowsize: int
) -> None:
    need("atftp")
    data = payload(SIZE, seed=blksize + windowsize)
    (data_root / "fw.bin").write_bytes(data)
    server = make_server(allow_write=True)
    port = server.address[1]
    local = tmp_path / "got.bin"
    options = (f"blksize {blksize}", f"windowsize {windowsize}")
    got = run_peer(atftp("get", port, "fw.bin", local, *options))
    assert got.returncode == 0, output(got)
    assert local.read_bytes() == data
    record = server.wait_for_transfer("fw.bin", timeout_s=5)
    assert record.ok, record.error
    assert record.options.blksize == blksize
    # Windows are cut to 128 KiB on the wire: 65464-byte blocks travel 2 at a time.
    assert record.options.windowsize == min(windowsize, max(1, 128 * 1024 // blksize))
    put = run_peer(atftp("put", port, "back.bin", local, *options))
    assert put.returncode == 0, output(put)
    assert server.wait_for_transfer("back.bin", timeout_s=5).ok
    assert (data_root / "back.bin").read_bytes() == data


def test_tftp_hpa_client_gets_and_puts(
    make_server: MakeServer, data_root: Path, tmp_path: Path
) -> None:
    need("tftp")
    data = payload(SIZE)
    (data_root / "fw.bin").write_bytes(data)
    server = make_server(allow_write=True)
    port = server.address[1]
    local = tmp_path / "got.bin"
    got = run_peer(hpa(port, "get", "fw.bin", str(local)))
    assert got.returncode == 0, output(got)
    assert local.read_bytes() == data
    assert server.wait_for_transfer("fw.bin", timeout_s=5).options.blksize == 512
    put = run_peer(hpa(port, "put", str(local), "back.bin"))
    assert put.returncode == 0, output(put)
    assert server.wait_for_transfer("back.bin", timeout_s=5).ok
    assert (data_root / "back.bin").read_bytes() == data


def test_tftp_hpa_put_is_refused_by_default(
    make_server: MakeServer, data_root: Path, tmp_path: Path
) -> None:
    need("tftp")
    local = tmp_path / "backup.bin"
    local.write_bytes(b"flash dump")
    server = make_server()
    proc = run_peer(hpa(server.address[1], "put", str(local), "backup.bin"))
    assert "Error code 2" in output(proc)
    assert "uploads are disabled" in output(proc)
    assert list(data_root.iterdir()) == []


@pytest.mark.parametrize("name", ["../secret.txt", "/etc/passwd", "link/secret.txt"])
def test_peer_clients_cannot_escape_the_root(
    make_server: MakeServer, data_root: Path, tmp_path: Path, name: str
) -> None:
    need("tftp", "atftp")
    (tmp_path / "secret.txt").write_text("secret")
    (data_root / "link").symlink_to(tmp_path)
    server = make_server()
    port = server.address[1]
    local = tmp_path / "stolen.txt"
    proc = run_peer(hpa(port, "get", name, str(local)))
    assert "Error code 2" in output(proc)
    assert not local.exists() or local.read_bytes() == b""
    proc = run_peer(atftp("get", port, name, local))
    assert proc.returncode != 0
    assert not local.exists() or local.read_bytes() == b""


@pytest.mark.slow
def test_tftp_hpa_crosses_the_block_number_rollover(
    make_server: MakeServer, data_root: Path, tmp_path: Path
) -> None:
    """More than 65535 blocks of 512 bytes (32 MiB): block numbers wrap to 0."""
    need("tftp")
    data = payload(512 * 65_536 + 777, seed=5)
    (data_root / "big.bin").write_bytes(data)
    server = make_server(allow_write=True, timeout_s=1.0)
    port = server.address[1]
    local = tmp_path / "big.bin"
    got = run_peer(hpa(port, "get", "big.bin", str(local)))
    assert got.returncode == 0, output(got)
    assert hashlib.sha256(local.read_bytes()).digest() == hashlib.sha256(data).digest()
    put = run_peer(hpa(port, "put", str(local), "big-back.bin"))
    assert put.returncode == 0, output(put)
    record = server.wait_for_transfer("big-back.bin", timeout_s=10)
    assert record.ok, record.error
    assert (data_root / "big-back.bin").read_bytes() == data


@pytest.mark.parametrize("windowsize", [1, 16])
def test_atftp_through_ten_percent_loss(
    make_server: MakeServer, data_root: Path, tmp_path: Path, windowsize: int
) -> None:
    """Our server drops 10% of the datagrams it sends and receives; transfers complete."""
    need("atftp")
    data = payload(120_000, seed=9)
    (data_root / "fw.bin").write_bytes(data)
    loss = SeededLoss(0.10, seed=windowsize)
    server = make_server(allow_write=True, loss=loss, timeout_s=0.05, retries=10)
    port = server.address[1]
    local = tmp_path / "got.bin"
    options = ("blksize 1468", f"windowsize {windowsize}")
    got = run_peer(atftp("get", port, "fw.bin", local, *options))
    assert got.returncode == 0, output(got)
    assert local.read_bytes() == data
    put = run_peer([*atftp("put", port, "back.bin", local, *options)[:-2], "--tftp-timeout",
                    "1", "127.0.0.1", str(port)])  # fmt: skip
    assert put.returncode == 0, output(put)
    assert server.wait_for_transfer("back.bin", timeout_s=10).ok
    assert (data_root / "back.bin").read_bytes() == data
    assert loss.dropped["in"] + loss.dropped["out"] > 10


def test_tftp_hpa_get_through_ten_percent_loss(
    make_server: MakeServer, data_root: Path, tmp_path: Path
) -> None:
    need("tftp")
    data = payload(60_000, seed=10)
    (data_root / "fw.bin").write_bytes(data)
    loss = SeededLoss(0.10, seed=4)
    server = make_server(loss=loss, timeout_s=0.05, retries=10)
    local = tmp_path / "got.bin"
    got = run_peer(hpa(server.address[1], "get", "fw.bin", str(local)))
    assert got.returncode == 0, output(got)
    assert local.read_bytes() == data
    assert loss.dropped["out"] > 3


def test_twenty_atftp_clients_at_once(
    make_server: MakeServer, data_root: Path, tmp_path: Path
) -> None:
    need("atftp")
    files = {f"f{i}.bin": payload(200_000 + i, seed=100 + i) for i in range(20)}
    for name, data in files.items():
        (data_root / name).write_bytes(data)
    server = make_server()
    port = server.address[1]
    procs = []
    for i, name in enumerate(files):
        options = ("blksize 1468", f"windowsize {(1, 4, 16, 64)[i % 4]}")
        argv = atftp("get", port, name, tmp_path / name, *options)
        procs.append(subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out.decode(errors="replace")
    for name, data in files.items():
        assert (tmp_path / name).read_bytes() == data
    assert all(server.wait_for_transfer(name, timeout_s=5).ok for name in files)


# --- our client against the peer servers -------------------------------------------------------


@pytest.mark.parametrize(("blksize", "windowsize"), [(512, 1), (1468, 16), (8192, 4), (65464, 1)])
def test_our_client_with_tftpd_hpa(
    data_root: Path, tmp_path: Path, blksize: int, windowsize: int
) -> None:
    data = payload(SIZE, seed=blksize)
    (data_root / "fw.bin").write_bytes(data)
    with tftpd_hpa(data_root) as port:
        local = tmp_path / "got.bin"
        got = tftp_get("127.0.0.1", port, "fw.bin", local, blksize=blksize, windowsize=windowsize)
        assert local.read_bytes() == data
        assert got.options.blksize == blksize
        assert got.options.windowsize == 1  # tftpd-hpa does not know windowsize
        assert got.options.tsize == SIZE
        sent = tftp_put(
            "127.0.0.1", port, "back.bin", local, blksize=blksize, windowsize=windowsize
        )
        assert sent.size_bytes == SIZE
    assert (data_root / "back.bin").read_bytes() == data


def test_our_client_falls_back_when_tftpd_hpa_refuses_every_option(
    data_root: Path, tmp_path: Path
) -> None:
    data = payload(5000)
    (data_root / "fw.bin").write_bytes(data)
    from tests.tftp.conftest import free_udp_port, need_in_tftpd, peer_server

    binary = need_in_tftpd()
    port = free_udp_port()
    refuse = ["-r", "blksize", "-r", "tsize", "-r", "timeout"]
    argv = [binary, "-L", "-4", "-a", f"127.0.0.1:{port}", "-s", "-c", "-u", "root", *refuse]
    with peer_server([*argv, str(data_root)], port):
        local = tmp_path / "got.bin"
        got = tftp_get("127.0.0.1", port, "fw.bin", local, blksize=1468, windowsize=8)
        assert local.read_bytes() == data
        assert not got.negotiated
        assert got.options.blksize == 512
        sent = tftp_put("127.0.0.1", port, "back.bin", local, blksize=1468)
        assert not sent.negotiated
    assert (data_root / "back.bin").read_bytes() == data


def test_our_client_reports_tftpd_hpa_errors(data_root: Path) -> None:
    with tftpd_hpa(data_root) as port, pytest.raises(TftpRemoteError) as info:
        tftp_get("127.0.0.1", port, "missing.bin", tmp := data_root / "x")
    assert info.value.code == ErrorCode.FILE_NOT_FOUND
    assert not tmp.exists()


@pytest.mark.parametrize(("blksize", "windowsize"), [(512, 1), (1468, 4), (1468, 16), (8192, 8)])
def test_our_client_with_atftpd(
    data_root: Path, tmp_path: Path, blksize: int, windowsize: int
) -> None:
    data = payload(SIZE, seed=windowsize)
    (data_root / "fw.bin").write_bytes(data)
    with atftpd(data_root) as port:
        local = tmp_path / "got.bin"
        got = tftp_get("127.0.0.1", port, "fw.bin", local, blksize=blksize, windowsize=windowsize)
        assert local.read_bytes() == data
        assert (got.options.blksize, got.options.windowsize) == (blksize, windowsize)
        sent = tftp_put(
            "127.0.0.1", port, "back.bin", local, blksize=blksize, windowsize=windowsize
        )
        assert sent.options.windowsize == windowsize
    assert (data_root / "back.bin").read_bytes() == data


def test_our_client_through_loss_against_atftpd(data_root: Path, tmp_path: Path) -> None:
    """Our client drops 10% of what it sends and receives; atftpd retransmits after 1 s."""
    data = payload(30_000, seed=12)
    (data_root / "fw.bin").write_bytes(data)
    loss = SeededLoss(0.10, seed=21)
    with atftpd(data_root) as port:
        local = tmp_path / "got.bin"
        tftp_get(
            "127.0.0.1", port, "fw.bin", local, blksize=1468, windowsize=4, timeout_s=0.1,
            retries=20, loss=loss,
        )  # fmt: skip
        assert local.read_bytes() == data
    assert loss.dropped["in"] + loss.dropped["out"] > 0
