"""The fastboot phone simulator: its UDP protocol machine, state, and ``unbrick sim``."""

from __future__ import annotations

import json
import selectors
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fastboot.conftest import LAYOUT, MiB
from unbrick.cli.sim import parse_phone_faults
from unbrick.errors import UsageError
from unbrick.sim.fastboot_phone import (
    FastbootPhone,
    PhoneFaults,
    _UdpDevice,
    parse_byte_size,
)
from unbrick.transports.fastboot import protocol as p
from unbrick.transports.fastboot.client import FastbootClient
from unbrick.transports.fastboot.links import open_link


def pkt(ident: int, seq: int, data: bytes = b"", flags: int = 0) -> bytes:
    return p.UdpPacket(ident, flags, seq, data).encode()


def answer(dev: _UdpDevice, datagram: bytes) -> p.UdpPacket:
    reply = dev.handle(datagram)
    assert reply is not None
    return p.decode_packet(reply)


@pytest.mark.unit
def test_udp_machine(tmp_path: Path) -> None:
    phone = FastbootPhone.open(tmp_path, layout=LAYOUT)
    dev = _UdpDevice(phone, 1024)
    q = answer(dev, pkt(p.PacketId.QUERY, 0))
    assert (q.ident, q.seq, p.parse_query(q.data)) == (p.PacketId.QUERY, 0, 0)
    # Fastboot packets before Init are an error.
    assert answer(dev, pkt(p.PacketId.FASTBOOT, 0, b"getvar:x")).ident == p.PacketId.ERROR
    init = answer(dev, pkt(p.PacketId.INIT, 1, p.encode_init(1, 8192)))
    assert p.parse_init(init.data) == (1, 1024) and init.seq == 1
    # A command split over continuation packets, acknowledged with empty packets.
    ack = answer(dev, pkt(p.PacketId.FASTBOOT, 2, b"getvar:pro", p.FLAG_CONTINUATION))
    assert (ack.ident, ack.seq, ack.data) == (p.PacketId.FASTBOOT, 2, b"")
    assert answer(dev, pkt(p.PacketId.FASTBOOT, 3, b"duct")).data == b""
    okay = answer(dev, pkt(p.PacketId.FASTBOOT, 4))
    assert okay.data == b"OKAYunbrick-phone"
    # A retransmission gets the same answer; an old one is ignored.
    assert dev.handle(pkt(p.PacketId.FASTBOOT, 4)) == okay.encode()
    assert dev.handle(pkt(p.PacketId.FASTBOOT, 2)) is None
    assert answer(dev, pkt(0x10, 5)).ident == p.PacketId.ERROR
    assert dev.handle(b"\x03") is None
    bad = answer(dev, pkt(p.PacketId.INIT, 6, p.encode_init(1, 100)))
    assert bad.ident == p.PacketId.ERROR
    # Upload data longer than a packet comes as continuation packets.
    answer(dev, pkt(p.PacketId.INIT, 7, p.encode_init(1, 512)))
    phone.state.boots = [{"target": "system", "slot": "a"}] * 100
    answer(dev, pkt(p.PacketId.FASTBOOT, 8, b"oem stage-log"))
    assert answer(dev, pkt(p.PacketId.FASTBOOT, 9)).data == b"OKAY"
    answer(dev, pkt(p.PacketId.FASTBOOT, 10, b"upload"))
    data = answer(dev, pkt(p.PacketId.FASTBOOT, 11))
    size = p.parse_response(data.data).size
    assert size is not None and size > 1500
    got = b""
    seq = 12
    while True:
        piece = answer(dev, pkt(p.PacketId.FASTBOOT, seq))
        seq += 1
        got += piece.data
        assert len(piece.data) <= 508
        if not piece.continuation:
            break
    assert len(got) == size and got.startswith(b"unbrick-phone boot record")
    assert answer(dev, pkt(p.PacketId.FASTBOOT, seq)).data == b"OKAY"


@pytest.mark.unit
def test_state_and_layout(tmp_path: Path) -> None:
    phone = FastbootPhone.open(tmp_path / "s", layout=LAYOUT, product="walleye")
    assert phone.partitions()["system_a"] == 16 * MiB
    assert phone.slot_names() == ["a", "b"]
    assert phone.variable("has-slot:boot") == "yes"
    assert phone.variable("has-slot:misc") == "no"
    assert phone.variable("has-slot:nothing") is None
    assert phone.variable("partition-size:misc") == "0x10000"
    assert phone.variable("slot-retry-count:b") == "7"
    assert phone.variable("slot-successful:c") is None
    assert phone.variable("unknown") is None
    state = json.loads((tmp_path / "s" / "fastboot-phone.json").read_text())
    assert state["product"] == "walleye"
    again = FastbootPhone.open(tmp_path / "s", max_download_size=1 * MiB, unlocked=False)
    assert again.state.product == "walleye" and not again.state.unlocked
    assert again.variable("max-download-size") == "0x100000"
    assert sorted(p.name for p in (tmp_path / "s").glob("*.img"))[0] == "boot_a.img"
    with pytest.raises(UsageError):
        FastbootPhone.open(tmp_path / "s", max_download_size=10)
    with pytest.raises(UsageError):
        FastbootPhone.open(tmp_path / "t", layout=(("../evil", 4096),))


@pytest.mark.unit
def test_option_parsers() -> None:
    assert parse_byte_size("256M") == 256 * MiB
    assert parse_byte_size("0x1000") == 4096
    assert parse_byte_size("64k") == 65536
    with pytest.raises(UsageError):
        parse_byte_size("lots")
    faults = parse_phone_faults(
        (
            "disconnect-after-bytes=0x100000",
            "offline=2",
            "reboot-delay=0.1",
            "flash-delay=1.5",
            "fail-partition=boot_a",
            "no-fetch=1",
        )
    )
    assert faults == PhoneFaults(
        disconnect_after_bytes=1 << 20,
        offline_s=2.0,
        reboot_offline_s=0.1,
        flash_delay_s=1.5,
        fail_partition="boot_a",
        no_fetch=True,
    )
    for bad in ("power-cut-after=1", "offline=soon", "nothing"):
        with pytest.raises(UsageError):
            parse_phone_faults((bad,))


def _first_line(proc: subprocess.Popen[str], timeout_s: float = 20.0) -> str:
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    if not sel.select(timeout_s):
        proc.kill()
        pytest.fail("the simulator printed nothing")
    return proc.stdout.readline().rstrip("\n")


def test_cli_fastboot_phone(tmp_path: Path) -> None:
    argv = [
        sys.executable,
        "-m",
        "unbrick.cli.sim",
        "fastboot-phone",
        "--listen",
        "127.0.0.1:0",
        "--state-dir",
        str(tmp_path / "phone"),
        "--product",
        "walleye",
        "--max-download-size",
        "1M",
    ]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            line = _first_line(proc)
            assert line.startswith("fastboot-phone walleye (UNBRICK0001) listening on tcp ")
            port = int(line.split("tcp 127.0.0.1:")[1].split()[0])
            assert f"udp 127.0.0.1:{port}" in line
            for link in ("tcp", "udp"):
                client = FastbootClient(open_link(link, host="127.0.0.1", port=port, timeout_s=5.0))
                assert client.getvar("product") == "walleye"
                assert client.max_download_size() == 1 * MiB
                client.flash("boot", b"\x42" * 8192)
                client.close()
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(10) == 0
    boot = (tmp_path / "phone" / "boot_a.img").read_bytes()
    assert boot[:8192] == b"\x42" * 8192 and len(boot) == 64 * MiB
    assert (tmp_path / "phone" / "userdata.img").stat().st_size == 512 * MiB


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["fastboot-phone", "--listen", "127.0.0.1:0"], "needs --state-dir"),
        (["fastboot-phone", "--state-dir", "x", "--brick", "soft"], "router kinds"),
        (["router", "--state-dir", "x"], "--name is required"),
        (["router", "--name", "r", "--product", "p"], "fastboot-phone only"),
    ],
)
def test_cli_usage_errors(tmp_path: Path, args: list[str], message: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "unbrick.cli.sim", *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 2
    assert message in proc.stderr
