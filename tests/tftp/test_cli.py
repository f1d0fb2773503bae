"""``unbrick tftp serve/get/put`` (run as ``python -m unbrick.cli.tftp`` so that the tests do
not depend on the group being registered in the main CLI)."""

from __future__ import annotations

import io
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.tftp.conftest import payload
from unbrick.cli.tftp import parse_address
from unbrick.errors import UsageError
from unbrick.transports.tftp import TftpRemoteError, TftpServer, tftp_get, tftp_put

CLI = [sys.executable, "-m", "unbrick.cli.tftp"]


@contextmanager
def serving(*args: str) -> Iterator[tuple[subprocess.Popen[str], int]]:
    proc = subprocess.Popen(
        [*CLI, "serve", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
        assert match, line + (proc.stderr.read() if proc.stderr else "")
        yield proc, int(match.group(1))
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_prints_its_address_serves_and_stops_cleanly(
    tmp_path: Path, sig: signal.Signals
) -> None:
    data = payload(70_000)
    (tmp_path / "fw.bin").write_bytes(data)
    with serving("--root", str(tmp_path), "--listen", "127.0.0.1:0") as (proc, port):
        out = io.BytesIO()
        tftp_get("127.0.0.1", port, "fw.bin", out, windowsize=4)
        assert out.getvalue() == data
        with pytest.raises(TftpRemoteError, match="uploads are disabled"):
            tftp_put("127.0.0.1", port, "up.bin", b"x")
        proc.send_signal(sig)
        stdout, _ = proc.communicate(timeout=10)
        assert proc.returncode == 0
    assert "read 'fw.bin' by 127.0.0.1:" in stdout
    assert "70000 bytes" in stdout
    assert "write 'up.bin'" in stdout and "failed" in stdout
    assert not (tmp_path / "up.bin").exists()


def test_allow_write_and_the_client_commands(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    local = tmp_path / "backup.bin"
    local.write_bytes(payload(9000, seed=2))
    with serving("--root", str(root), "--listen", "127.0.0.1:0", "--allow-write") as (proc, port):
        put = subprocess.run(
            [*CLI, "put", f"127.0.0.1:{port}", str(local), "--blksize", "1024"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert put.returncode == 0, put.stderr
        assert "sent 'backup.bin': 9000 bytes" in put.stdout
        assert (root / "backup.bin").read_bytes() == local.read_bytes()
        fetched = tmp_path / "fetched.bin"
        get = subprocess.run(
            [*CLI, "get", f"127.0.0.1:{port}", "backup.bin", str(fetched), "--windowsize", "8"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert get.returncode == 0, get.stderr
        assert "windowsize 8" in get.stdout
        assert fetched.read_bytes() == local.read_bytes()
        missing = subprocess.run(
            [*CLI, "get", f"127.0.0.1:{port}", "nope.bin", str(tmp_path / "nope.bin")],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert missing.returncode == 5
        assert missing.stderr.startswith("unbrick: error: ")
        assert "File not found" in missing.stderr
        assert not (tmp_path / "nope.bin").exists()
        proc.terminate()


def test_serve_refuses_a_bad_listen_address(tmp_path: Path) -> None:
    proc = subprocess.run(
        [*CLI, "serve", "--root", str(tmp_path), "--listen", "127.0.0.1"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == UsageError.exit_code
    assert "is not HOST:PORT" in proc.stderr


def test_serve_reports_a_port_in_use(tmp_path: Path) -> None:
    with TftpServer(tmp_path, host="127.0.0.1") as busy:
        proc = subprocess.run(
            [*CLI, "serve", "--root", str(tmp_path), "--listen", f"127.0.0.1:{busy.address[1]}"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    assert proc.returncode == 5
    assert proc.stderr.startswith("unbrick: error: cannot listen on 127.0.0.1:")


@pytest.mark.unit
@pytest.mark.parametrize(
    ("text", "default", "expected"),
    [
        ("127.0.0.1:6969", None, ("127.0.0.1", 6969)),
        ("192.168.1.1", 69, ("192.168.1.1", 69)),
        ("[::1]:69", None, ("::1", 69)),
        ("[::1]", 69, ("::1", 69)),
        ("router.lan:0", None, ("router.lan", 0)),
    ],
)
def test_parse_address(text: str, default: int | None, expected: tuple[str, int]) -> None:
    assert parse_address(text, default_port=default, what="x") == expected


@pytest.mark.unit
@pytest.mark.parametrize("text", ["", ":69", "h:port", "h:70000", "[::1", "[::1]x", "h"])
def test_parse_address_refuses(text: str) -> None:
    with pytest.raises(UsageError):
        parse_address(text, default_port=None, what="x")


def test_get_and_put_commands_in_process(tmp_path: Path) -> None:
    """The same commands through click's runner (measured by coverage)."""
    from click.testing import CliRunner

    from unbrick.cli.tftp import tftp

    root = tmp_path / "root"
    root.mkdir()
    (root / "fw.bin").write_bytes(payload(5000, seed=8))
    runner = CliRunner()
    with TftpServer(root, host="127.0.0.1", allow_write=True) as server:
        address = f"127.0.0.1:{server.address[1]}"
        local = tmp_path / "fw.bin"
        got = runner.invoke(tftp, ["get", address, "fw.bin", str(local), "--windowsize", "4"])
        assert got.exit_code == 0, got.output
        assert "received 'fw.bin': 5000 bytes" in got.output
        assert local.read_bytes() == (root / "fw.bin").read_bytes()
        put = runner.invoke(
            tftp, ["put", address, str(local), "copy.bin", "--mode", "netascii", "--blksize", "512"]
        )
        assert put.exit_code == 0, put.output
        assert "sent 'copy.bin'" in put.output
        assert server.wait_for_transfer("copy.bin", timeout_s=5).ok
    assert (root / "copy.bin").read_bytes() == local.read_bytes()
