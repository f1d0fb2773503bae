"""U-Boot's ``tftpboot`` pulling images from unbrick's own TFTP server, in QEMU.

The guest's NIC is a ``-netdev dgram`` over unix sockets (tests/uboot/ethnet.py): the test
plays the one host on that wire, 10.0.2.2, and forwards its UDP port 69 to the TFTP server the
driver starts on 127.0.0.1. So the real U-Boot TFTP client (blksize 1468, windowsize from
``tftpwindowsize``) talks to our server, with nothing outside the test involved.
"""

from __future__ import annotations

import random
import socket
import time
import zlib
from pathlib import Path

import pytest

from tests.uboot.ethnet import GUEST_IP, HOST_IP
from tests.uboot.qemu import qemu_uboot
from tests.uboot.test_qemu import FIRMWARE, Bench, flash, image
from unbrick.errors import UsageError
from unbrick.model.uri import parse_device_uri
from unbrick.transports.uboot import open_uboot

pytestmark = [pytest.mark.peer, pytest.mark.slow]

MiB = 1 << 20


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def net_query(port: int, **extra: str) -> str:
    params = {
        "serverip": HOST_IP,
        "ipaddr": GUEST_IP,
        "tftp_listen": f"127.0.0.1:{port}",
        **extra,
    }
    return "?" + "&".join(f"{k}={v}" for k, v in params.items())


def test_flash_by_tftpboot_from_our_server_verifies_and_persists(tmp_path: Path) -> None:
    img = image(tmp_path, 3 * MiB + 4321, seed=11)
    port = free_udp_port()
    bench = Bench(tmp_path)
    with qemu_uboot(tmp_path, network=True, tftp_port=port) as q:
        uri = q.uri + net_query(port)
        started = time.monotonic()
        result = flash(bench, uri, img, "firmware")
        took = time.monotonic() - started
        assert result.outcome == "success"  # type: ignore[attr-defined]
        drv = bench.drivers[-1]
        # 3 MiB would take ~35 s by loadx here; every piece went over the network.
        assert drv.stats.net_loads == drv.stats.loads == 13
        assert drv.stats.net_failure == ""
        typed = q.relay.host_text() if q.relay else ""
        assert "tftpboot 0x" in typed and "loadx" not in typed and "loady" not in typed
        assert "setenv tftpblocksize 1468" in typed and "setenv tftpwindowsize 8" in typed
        assert q.net is not None and q.net.frames_out > 2000  # DATA blocks to the guest
        assert took < 120, took
        assert q.stop() == 0
    data = (tmp_path / "disk.img").read_bytes()
    assert data[FIRMWARE : FIRMWARE + img.stat().st_size] == img.read_bytes()


def test_a_network_that_drops_everything_falls_back_to_the_serial_line(tmp_path: Path) -> None:
    img = image(tmp_path, 40 * 1024, seed=12)
    port = free_udp_port()
    bench = Bench(tmp_path)
    with qemu_uboot(tmp_path, network=True, tftp_port=port, net_loss=1.0) as q:
        result = flash(bench, q.uri + net_query(port), img, "firmware")
        assert result.outcome == "success"  # type: ignore[attr-defined]
        drv = bench.drivers[-1]
        assert drv.stats.net_loads == 0
        assert "TFTP" in drv.stats.net_failure or "tftpboot" in drv.stats.net_failure
        typed = q.relay.host_text() if q.relay else ""
        assert typed.count("tftpboot 0x") == 1  # U-Boot gave up once: the serial line only
        assert "loadx 0x" in typed
        assert q.stop() == 0
    data = (tmp_path / "disk.img").read_bytes()
    assert data[FIRMWARE : FIRMWARE + img.stat().st_size] == img.read_bytes()


def test_tftp_with_lost_packets_still_lands_the_exact_bytes(tmp_path: Path) -> None:
    rng = random.Random(13)
    pieces = [rng.randbytes(256 * 1024), rng.randbytes(100_001)]
    port = free_udp_port()
    with qemu_uboot(tmp_path, network=True, tftp_port=port, net_loss=0.1) as q:
        uri = q.uri + net_query(port, transfer="tftp")
        with open_uboot(parse_device_uri(uri), timeout_s=20) as dev:
            for data in pieces:
                addr = dev.load(data)
                assert dev._crc32(addr, len(data)) == zlib.crc32(data)
            assert dev.stats.net_loads == 2
        assert q.net is not None and q.net.dropped > 10
        assert q.stop() == 0


def test_transfer_tftp_without_a_network_is_a_clear_error(tmp_path: Path) -> None:
    with qemu_uboot(tmp_path) as q:
        uri = parse_device_uri(q.uri + "?transfer=tftp")
        with (
            open_uboot(uri, timeout_s=20) as dev,
            pytest.raises(UsageError, match="transfer=tftp needs serverip="),
        ):
            dev.load(b"x" * 100)
        assert q.stop() == 0
