"""unbrick's fastboot client against the simulated phone, over TCP and UDP."""

from __future__ import annotations

import io
import socket
import threading
import time
from contextlib import closing
from pathlib import Path

import pytest

from tests.fastboot.conftest import (
    KiB,
    MiB,
    Served,
    ServeFactory,
    padded,
    random_image,
    to_sparse,
)
from unbrick.errors import DeviceError, TransportError, UsageError
from unbrick.sim.fastboot_phone import PhoneFaults
from unbrick.transports.fastboot import protocol as p
from unbrick.transports.fastboot.client import (
    ClientOptions,
    FastbootClient,
    FastbootFailure,
    RebootTarget,
)
from unbrick.transports.fastboot.links import TcpLink, UdpLink, open_link

LINKS = pytest.mark.parametrize("link", ["tcp", "udp"])


def client(served: Served, link: str, **options: float) -> FastbootClient:
    return FastbootClient(
        open_link(link, host="127.0.0.1", port=served.port, timeout_s=5.0),
        options=ClientOptions(**options),  # type: ignore[arg-type]
    )


@LINKS
def test_getvar(phone: Served, link: str) -> None:
    c = client(phone, link)
    try:
        assert c.getvar("product") == "unbrick-phone"
        assert c.getvar_optional("no-such-variable") is None
        with pytest.raises(FastbootFailure) as e:
            c.getvar("no-such-variable")
        assert e.value.reason == "GetVar Variable Not found"
        assert c.max_download_size() == 256 * MiB
        every = c.getvar_all()
        assert every["serialno"] == "UNBRICK0001"
        assert every["partition-size:boot_a"] == "0x400000"
        assert every["has-slot:system"] == "yes" and every["has-slot:misc"] == "no"
    finally:
        c.close()


@LINKS
def test_flash_raw_and_sparse(phone: Served, link: str, tmp_path: Path) -> None:
    c = client(phone, link)
    boot = random_image(tmp_path / "boot.img", 3 * MiB + 100)
    done: list[int] = []
    report = c.flash("boot_b", tmp_path / "boot.img", progress=done.append)
    assert phone.part("boot_b") == padded(boot, 4 * MiB)
    assert (report.pieces, report.sparse, report.sent_bytes) == (1, False, len(boot))
    assert sum(done) == len(boot)

    raw = random_image(tmp_path / "sys.raw", 16 * MiB, data_every=1 * MiB)
    to_sparse(tmp_path / "sys.raw", tmp_path / "sys.simg")
    report = c.flash("system_a", tmp_path / "sys.simg")
    assert phone.part("system_a") == raw
    assert report.sparse and report.image_bytes == 16 * MiB
    c.close()


@LINKS
def test_flash_split_by_max_download_size(serve: ServeFactory, link: str, tmp_path: Path) -> None:
    served = serve(max_download_size=256 * KiB)
    c = client(served, link)
    raw = random_image(tmp_path / "sys.raw", 16 * MiB, data_every=512 * KiB)
    to_sparse(tmp_path / "sys.raw", tmp_path / "sys.simg")
    report = c.flash("system_b", tmp_path / "sys.simg")
    assert report.pieces > 4
    assert served.part("system_b") == raw
    # A raw image larger than the limit is re-sparsed too (its last block padded).
    boot = random_image(tmp_path / "boot.img", 1 * MiB + 10)
    report = c.flash("boot_a", boot)
    assert report.pieces == 5 and report.sparse
    assert served.part("boot_a") == padded(boot, 4 * MiB)
    with pytest.raises(UsageError):
        c.download(bytes(256 * KiB + 1))
    c.close()


@LINKS
def test_erase_set_active_reboot(phone: Served, link: str) -> None:
    c = client(phone, link)
    c.download(b"\x55" * 8192)
    c.command("flash:boot_b")
    assert phone.part("boot_b")[:8192] == b"\x55" * 8192
    c.erase("boot_b")
    assert phone.part("boot_b") == bytes(4 * MiB)
    c.set_active("_b")
    assert c.getvar("current-slot") == "b"
    c.reboot(RebootTarget.BOOTLOADER)
    c.close()
    assert phone.phone.state.boots[-1] == {"target": "bootloader", "slot": "b"}
    # The device is away while it reboots; the link waits for it.
    waits: list[str] = []
    again = FastbootClient(
        open_link(link, host="127.0.0.1", port=phone.port, timeout_s=5.0, on_wait=waits.append)
    )
    assert again.getvar("current-slot") == "b"
    again.close()


@LINKS
def test_fetch_and_upload(phone: Served, link: str, tmp_path: Path) -> None:
    data = random_image(tmp_path / "boot.img", 3 * MiB)
    phone.phone.state.max_fetch_size = 1 * MiB
    c = client(phone, link)
    c.flash("boot_a", tmp_path / "boot.img")
    out = io.BytesIO()
    assert c.fetch("boot_a", out, offset=4096, size=2 * MiB + 5) == 2 * MiB + 5
    assert out.getvalue() == data[4096 : 4096 + 2 * MiB + 5]
    c.command("oem stage-log")
    staged = io.BytesIO()
    assert c.upload(staged) == len(staged.getvalue())
    assert staged.getvalue().startswith(b"unbrick-phone boot record")
    with pytest.raises(FastbootFailure):
        c.upload(io.BytesIO())
    c.close()


def test_fetch_unsupported(serve: ServeFactory) -> None:
    served = serve(faults=PhoneFaults(no_fetch=True))
    c = client(served, "tcp")
    with pytest.raises(DeviceError, match="cannot read partitions back"):
        c.fetch("boot_a", io.BytesIO(), size=4096)
    c.close()


def test_oem_allow_list(phone: Served) -> None:
    c = client(phone, "tcp")
    result = c.oem("device-info", allowed=("device-info",))
    assert "Device unlocked: true" in result.info
    with pytest.raises(UsageError, match="allow-list"):
        c.oem("stage-log", allowed=("device-info",))
    for forbidden in ("unlock", "lock", "unlock-go", "relock now"):
        with pytest.raises(UsageError, match="lock state"):
            c.oem(forbidden, allowed=(forbidden, forbidden.split()[0]))
    with pytest.raises(FastbootFailure, match="unknown command"):
        c.oem("get-blocksize", allowed=("get-blocksize",))
    c.close()


@LINKS
def test_info_keeps_a_slow_flash_alive(serve: ServeFactory, link: str) -> None:
    served = serve(faults=PhoneFaults(flash_delay_s=1.2, info_every_s=0.2))
    infos: list[str] = []
    c = FastbootClient(
        open_link(link, host="127.0.0.1", port=served.port, timeout_s=5.0),
        options=ClientOptions(command_timeout_s=0.6, min_flash_bytes_per_s=1 << 40),
        on_info=infos.append,
    )
    with closing(c):
        report = c.flash("boot_a", b"\xaa" * 4096)
    assert len(report.info) >= 3 and infos == list(report.info)
    assert served.part("boot_a")[:4096] == b"\xaa" * 4096


@LINKS
def test_device_vanishing_mid_download(serve: ServeFactory, link: str, tmp_path: Path) -> None:
    served = serve(faults=PhoneFaults(disconnect_after_bytes=1 * MiB, offline_s=0.5))
    random_image(tmp_path / "boot.img", 3 * MiB)
    c = FastbootClient(
        open_link(link, host="127.0.0.1", port=served.port, timeout_s=5.0),
        options=ClientOptions(command_timeout_s=1.0, data_timeout_s=1.0),
    )
    started = time.monotonic()
    with closing(c), pytest.raises(TransportError) as e:
        c.flash("boot_a", tmp_path / "boot.img")
    assert not isinstance(e.value, p.FastbootProtocolError)
    assert "fastboot device" in e.value.message and "resume" in e.value.hint
    assert time.monotonic() - started < 10
    assert served.part("boot_a") == bytes(4 * MiB)
    # It comes back; a new session flashes the image.
    assert served.phone.wait_online(5.0)
    again = client(served, link)
    again.flash("boot_a", tmp_path / "boot.img")
    assert served.part("boot_a")[: 3 * MiB] == (tmp_path / "boot.img").read_bytes()
    again.close()


def test_fail_is_a_device_error(serve: ServeFactory) -> None:
    served = serve(faults=PhoneFaults(fail_partition="boot_a"))
    c = client(served, "tcp")
    with pytest.raises(FastbootFailure, match="flash write error") as e:
        c.flash("boot_a", b"\1" * 4096)
    assert e.value.command == "flash:boot_a"
    with pytest.raises(FastbootFailure, match="not found"):
        c.erase("nothing")
    with pytest.raises(FastbootFailure, match="too large"):
        c.flash("vbmeta_a", bytes(128 * KiB))
    c.close()


def test_locked_fail_hints_at_unlocking(serve: ServeFactory) -> None:
    served = serve(unlocked=False)
    c = client(served, "tcp")
    with pytest.raises(FastbootFailure) as e:
        c.flash("boot_a", b"\1" * 4096)
    assert "fastboot flashing unlock" in e.value.hint
    assert "never unlocks" in e.value.hint
    c.close()


def _listener() -> tuple[socket.socket, int]:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    return server, server.getsockname()[1]


def test_tcp_not_fastboot_and_no_device() -> None:
    server, port = _listener()

    def answer() -> None:
        conn, _ = server.accept()
        conn.recv(4)
        conn.sendall(b"HTTP")
        conn.close()

    thread = threading.Thread(target=answer)
    thread.start()
    with pytest.raises(p.FastbootProtocolError, match="FBnn"):
        TcpLink.connect("127.0.0.1", port, timeout_s=2.0)
    thread.join()
    server.close()
    waits: list[str] = []
    started = time.monotonic()
    with pytest.raises(TransportError, match="no fastboot device answered"):
        TcpLink.connect("127.0.0.1", port, timeout_s=0.5, on_wait=waits.append)
    assert 0.4 < time.monotonic() - started < 3
    assert waits == [f"waiting for device at tcp:127.0.0.1:{port}"]


def test_udp_no_device() -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    waits: list[str] = []
    with pytest.raises(TransportError, match="no answer"):
        UdpLink.connect("127.0.0.1", port, timeout_s=1.2, on_wait=waits.append)
    assert waits
    sock.close()


def test_tcp_device_closing_mid_response() -> None:
    server, port = _listener()

    def device() -> None:
        conn, _ = server.accept()
        conn.recv(4)
        conn.sendall(b"FB01")
        conn.recv(100)
        conn.sendall(p.frame_header(10) + b"OKAY")
        conn.close()

    thread = threading.Thread(target=device)
    thread.start()
    c = FastbootClient(TcpLink.connect("127.0.0.1", port, timeout_s=2.0))
    with pytest.raises(TransportError, match="connection was lost"):
        c.getvar("version")
    thread.join()
    c.close()
    server.close()


def test_unexpected_answers() -> None:
    server, port = _listener()
    answers = [b"DATA00000010", b"OKAY", b"BOGUS", b"OKAY"]

    def device() -> None:
        conn, _ = server.accept()
        conn.recv(4)
        conn.sendall(b"FB01")
        for answer in answers:
            conn.recv(100)
            conn.sendall(p.encode_frame(answer))
        conn.recv(100)
        conn.close()

    thread = threading.Thread(target=device)
    thread.start()
    c = FastbootClient(TcpLink.connect("127.0.0.1", port, timeout_s=2.0))
    with pytest.raises(p.FastbootProtocolError, match="expected OKAY or FAIL"):
        c.getvar("version")
    c._max_download = 1 << 20
    with pytest.raises(p.FastbootProtocolError, match="expected DATA"):
        c.download(b"x" * 16)
    with pytest.raises(p.FastbootProtocolError, match="unknown response status"):
        c.getvar("version")
    c.close()
    thread.join()
    server.close()
