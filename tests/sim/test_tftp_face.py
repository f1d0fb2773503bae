"""The simulator's TFTP recovery face: a soft-bricked router takes a firmware image by ``put``
from unbrick's client and from tftp-hpa, checks it, writes it and boots it."""

from __future__ import annotations

import json
import random
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import need
from tests.tftp.conftest import SeededLoss
from unbrick.errors import TransportError
from unbrick.model.profile import Region
from unbrick.model.uri import parse_device_uri
from unbrick.sim.device import Faults, SimDevice
from unbrick.sim.firmware import build_firmware
from unbrick.sim.kinds import create_device
from unbrick.sim.server import SimServer
from unbrick.sim.tftp_face import (
    ROUTER_BLKSIZE_MAX,
    RecoveryUpload,
    TftpFace,
    TftpFaceConfig,
    check_recovery_image,
)
from unbrick.transports.sim import RegistryEntry, open_sim, read_registry, write_registry
from unbrick.transports.tftp import ErrorCode, TftpRemoteError, tftp_get, tftp_put
from unbrick.transports.tftp.codec import (
    Ack,
    Error,
    MalformedPacket,
    Opcode,
    OptionAck,
    Request,
    decode,
    encode,
)

FAST = Faults(power_on_delay_s=0.01)
QUICK = TftpFaceConfig(timeout_s=0.2, retries=3, dally_s=0.3)
FW_OFFSET = 0x80000
IMAGE_BYTES = 256 * 1024


def image(
    version: str,
    *,
    model: str = "SimRouter",
    security_version: int = 1,
    hw: tuple[str, ...] = ("B2",),
    size: int = IMAGE_BYTES,
) -> bytes:
    return build_firmware(
        model,
        version,
        security_version=security_version,
        hw_revisions=hw,
        regions=("EU",),
        size_bytes=size,
    )


def hpa_put(
    port: int, local: Path, remote: str = "firmware.bin"
) -> subprocess.CompletedProcess[str]:
    """tftp-hpa's ``put`` in binary mode (512-byte blocks, no options)."""
    need("tftp")
    argv = ["tftp", "-m", "binary", "127.0.0.1", str(port), "-c", "put", str(local), remote]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


class Bench:
    """A device with its TFTP face on 127.0.0.1."""

    def __init__(self, device: SimDevice, config: TftpFaceConfig = QUICK) -> None:
        self.device = device
        self.face = TftpFace(device, "127.0.0.1", 0, config)
        self.port = self.face.start()

    def region(self, name: str = "firmware") -> Region:
        found = self.device.config.find_region(name)
        assert found is not None
        return found

    def flash(self, offset: int, length: int) -> bytes:
        return self.device.spi_read(offset, length)

    def put(self, data: bytes, **kw: object) -> None:
        kw.setdefault("timeout_s", 0.2)
        tftp_put("127.0.0.1", self.port, "firmware.bin", data, **kw)  # type: ignore[arg-type]

    def upload(self, after: int = 0) -> RecoveryUpload:
        return self.face.wait_for_upload(10.0, after=after)

    def booted(self, timeout_s: float = 10.0) -> str | None:
        self.device.wait_state(("firmware",), timeout_s)
        return self.device.firmware_version

    def close(self) -> None:
        self.face.stop()


@pytest.fixture
def soft_bricked(tmp_path: Path) -> Iterator[SimDevice]:
    """A soft-bricked router: firmware half-written, bootloader alive."""
    dev = create_device("router", tmp_path / "state", "t1", faults=FAST)
    dev.simulate_brick("soft")
    assert dev.state == "bootloader"
    yield dev
    dev.close()


@pytest.fixture
def bricked(soft_bricked: SimDevice) -> Iterator[Bench]:
    """The soft-bricked router with its TFTP face."""
    bench = Bench(soft_bricked)
    yield bench
    bench.close()


# -- the bootloader's check (pure) -------------------------------------------------------------


def _verdict(data: bytes, capacity: int = 0x380000) -> tuple[bool, str, str | None]:
    v = check_recovery_image(
        data, model="SimRouter", hw_revision="B2", min_security_version=1, capacity_bytes=capacity
    )
    return v.ok, v.reason, v.version


@pytest.mark.unit
def test_the_image_check_accepts_a_good_image_and_names_what_is_wrong_with_bad_ones() -> None:
    good = image("2.0.0")
    assert _verdict(good) == (True, "", "2.0.0")
    assert _verdict(image("2.0.0", hw=())) == (True, "", "2.0.0")
    assert _verdict(image("2.0.0", model="OtherRouter"))[:2] == (
        False,
        "image is for OtherRouter, this board is SimRouter",
    )
    assert _verdict(image("2.0.0", hw=("A1",)))[:2] == (
        False,
        "image supports hardware A1, this board is B2",
    )
    body = bytearray(good)
    body[5000] ^= 0x40
    assert _verdict(bytes(body))[:2] == (False, "Verifying Checksum ... Bad Data CRC")
    head = bytearray(good)
    head[20] ^= 1
    assert _verdict(bytes(head))[:2] == (False, "Bad Header Checksum")
    assert _verdict(good[:1000])[:2] == (False, "Verifying Checksum ... Bad Data CRC")
    assert _verdict(b"\x00" * 4096)[:2] == (False, "Wrong Image Format for bootm command")
    ok, reason, version = _verdict(image("0.9.0", security_version=0))
    assert not ok and version == "0.9.0"
    assert reason.startswith("ERROR: anti-rollback: image security version 0")
    assert _verdict(good, capacity=len(good) - 1)[:2] == (
        False,
        f"image of {len(good)} bytes does not fit the {len(good) - 1}-byte firmware partition",
    )


@pytest.mark.unit
@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2048))
def test_the_image_check_refuses_random_bytes(data: bytes) -> None:
    ok, reason, _ = _verdict(data)
    assert not ok and reason


# -- pushing an image --------------------------------------------------------------------------


def test_unbricks_client_pushes_an_image_to_a_soft_bricked_router(bricked: Bench) -> None:
    fw = image("2.0.0")
    region = bricked.region()
    result = tftp_put("127.0.0.1", bricked.port, "firmware.bin", fw, blksize=8192, windowsize=8)
    # A small router's stack: blksize cut to 1468, no windows, tsize acknowledged.
    assert result.negotiated
    assert (result.options.blksize, result.options.windowsize) == (ROUTER_BLKSIZE_MAX, 1)
    assert result.options.tsize == len(fw)
    up = bricked.upload()
    assert (up.accepted, up.flashed, up.error, up.version) == (True, True, "", "2.0.0")
    assert (up.size_bytes, up.blksize, up.region, up.filename) == (
        len(fw),
        ROUTER_BLKSIZE_MAX,
        "firmware",
        "firmware.bin",
    )
    assert bricked.booted() == "2.0.0"
    assert bricked.flash(region.offset, len(fw)) == fw
    assert "SimRouter firmware 2.0.0 booted" in bricked.device.boot_log


@pytest.mark.peer
def test_tftp_hpa_pushes_an_image_to_a_soft_bricked_router(bricked: Bench, tmp_path: Path) -> None:
    fw = image("2.1.0", size=300_000)
    local = tmp_path / "openwrt.bin"
    local.write_bytes(fw)
    proc = hpa_put(bricked.port, local)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Error" not in proc.stdout + proc.stderr
    up = bricked.upload()
    assert (up.flashed, up.blksize, up.size_bytes) == (True, 512, len(fw))
    assert bricked.booted() == "2.1.0"
    assert bricked.flash(bricked.region().offset, len(fw)) == fw


def test_bad_images_are_refused_before_the_last_ack_and_the_flash_is_untouched(
    bricked: Bench,
) -> None:
    region = bricked.region()
    before = bricked.flash(region.offset, region.size)
    corrupted = bytearray(image("2.0.0"))
    corrupted[100_000] ^= 0x01
    cases = [
        (image("2.0.0", model="OtherRouter"), "image is for OtherRouter, this board is SimRouter"),
        (bytes(corrupted), "Bad Data CRC"),
        (image("0.5.0", security_version=0), "anti-rollback"),
    ]
    for n, (data, why) in enumerate(cases):
        with pytest.raises(TftpRemoteError) as err:
            bricked.put(data)
        assert err.value.code == ErrorCode.NOT_DEFINED
        assert "image refused" in err.value.message and why in err.value.message
        up = bricked.upload(after=n)
        assert (up.accepted, up.flashed, up.size_bytes) == (False, False, len(data))
        assert why in up.error
    assert bricked.device.state == "bootloader"
    assert bricked.flash(region.offset, region.size) == before
    # Still in recovery: a good image goes in afterwards.
    bricked.put(image("2.0.0"))
    assert bricked.upload(after=len(cases)).flashed
    assert bricked.booted() == "2.0.0"


@pytest.mark.peer
def test_tftp_hpa_sees_a_wrong_model_refused(bricked: Bench, tmp_path: Path) -> None:
    region = bricked.region()
    before = bricked.flash(region.offset, region.size)
    local = tmp_path / "other.bin"
    local.write_bytes(image("2.0.0", model="OtherRouter"))
    proc = hpa_put(bricked.port, local)
    out = proc.stdout + proc.stderr
    assert "Error code 0: image refused: image is for OtherRouter" in out
    assert bricked.upload().error.startswith("image refused")
    assert bricked.device.state == "bootloader"
    assert bricked.flash(region.offset, region.size) == before


def test_a_router_running_its_firmware_does_not_answer(tmp_path: Path) -> None:
    dev = create_device("router", tmp_path / "state", "t2", faults=FAST)
    assert dev.state == "firmware"
    region = dev.config.find_region("firmware")
    assert region is not None
    before = dev.spi_read(region.offset, region.size)
    silent = Bench(dev)
    answering = Bench(dev, TftpFaceConfig(timeout_s=0.2, answer_in_firmware=True))
    try:
        with pytest.raises(TransportError, match="no answer from TFTP server") as err:
            tftp_put("127.0.0.1", silent.port, "fw.bin", image("2.0.0"), timeout_s=0.1, retries=1)
        assert "TFTP recovery mode" in (err.value.hint or "")
        with pytest.raises(TftpRemoteError) as refused:
            answering.put(image("2.0.0"))
        assert refused.value.code == ErrorCode.ACCESS_VIOLATION
        assert "running its firmware" in refused.value.message
        assert silent.face.uploads() == [] and answering.face.uploads() == []
        assert dev.state == "firmware" and dev.firmware_version == "1.0.0"
        assert dev.spi_read(region.offset, region.size) == before
    finally:
        silent.close()
        answering.close()
        dev.close()


def test_read_requests_and_other_modes_are_refused(bricked: Bench, tmp_path: Path) -> None:
    with pytest.raises(TftpRemoteError) as err:
        tftp_get("127.0.0.1", bricked.port, "firmware.bin", tmp_path / "x.bin", timeout_s=0.2)
    assert err.value.code == ErrorCode.ACCESS_VIOLATION
    assert "Access violation" in err.value.message
    assert not (tmp_path / "x.bin").exists()
    with pytest.raises(TftpRemoteError) as mode:
        bricked.put(image("2.0.0"), mode="netascii")
    assert mode.value.code == ErrorCode.ILLEGAL_OPERATION
    assert bricked.face.uploads() == []
    assert bricked.device.state == "bootloader"


def test_an_oversized_image_is_refused_up_front(bricked: Bench) -> None:
    capacity = bricked.region().size
    with pytest.raises(TftpRemoteError) as err:
        bricked.put(b"\xff" * (capacity + 1))
    assert err.value.code == ErrorCode.DISK_FULL
    assert bricked.upload().size_bytes == 0


def test_ten_percent_loss_still_lands_the_exact_image(soft_bricked: SimDevice) -> None:
    loss = SeededLoss(0.10, seed=7)
    bench = Bench(soft_bricked, TftpFaceConfig(timeout_s=0.05, dally_s=0.3, loss=loss))
    try:
        fw = image("3.0.0", size=160 * 1024)
        bench.put(fw, timeout_s=0.05, retries=8)
        up = bench.upload()
        assert up.flashed and up.error == "" and up.retransmits > 0
        assert loss.dropped["in"] > 0 and loss.dropped["out"] > 0
        assert bench.booted() == "3.0.0"
        assert bench.flash(bench.region().offset, len(fw)) == fw
    finally:
        bench.close()


def test_a_power_cut_while_flashing_leaves_a_soft_brick_that_takes_the_image_again(
    bricked: Bench,
) -> None:
    dev = bricked.device
    dev.set_faults(Faults(power_on_delay_s=0.01, power_cut_after_ops=3))
    fw = image("2.0.0")
    bricked.put(fw)  # the last ACK comes before the flash is written, as on a router
    up = bricked.upload()
    assert up.accepted and not up.flashed
    assert up.error.startswith("power lost while writing the image")
    assert dev.wait_state(("bootloader", "firmware"), 5.0) == "bootloader"
    assert "Bad Data CRC" in dev.boot_log or "Wrong Image Format" in dev.boot_log
    bricked.put(fw)
    assert bricked.upload(after=1).flashed
    assert bricked.booted() == "2.0.0"


def test_a_second_client_is_told_the_server_is_busy(soft_bricked: SimDevice) -> None:
    bricked = Bench(soft_bricked, TftpFaceConfig(timeout_s=0.1, retries=1, dally_s=0.3))
    first = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    second = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for s in (first, second):
            s.bind(("127.0.0.1", 0))
            s.settimeout(2.0)
        wrq = encode(Request(Opcode.WRQ, "a.bin", "octet"))
        first.sendto(wrq, ("127.0.0.1", bricked.port))
        answer, tid = first.recvfrom(1024)
        assert decode(answer) == Ack(0)
        assert tid[1] != bricked.port  # a new transfer ID
        first.sendto(wrq, ("127.0.0.1", bricked.port))  # a retry of the same request: ignored
        second.sendto(encode(Request(Opcode.WRQ, "b.bin", "octet")), ("127.0.0.1", bricked.port))
        busy, _ = second.recvfrom(1024)
        packet = decode(busy)
        assert isinstance(packet, Error) and packet.code == ErrorCode.NOT_DEFINED
        assert "busy" in packet.message
        # The first client goes quiet: the face retransmits ACK 0, then gives up.
        up = bricked.upload()
        assert not up.flashed and "stopped sending" in up.error
        acks = []
        first.settimeout(0.1)
        while True:
            try:
                acks.append(first.recvfrom(1024)[0])
            except TimeoutError:
                break
        assert acks and all(a == b"\0\4\0\0" for a in acks)
        # Free again for the next upload.
        bricked.put(image("2.0.0"))
        assert bricked.upload(after=1).flashed
    finally:
        first.close()
        second.close()
        bricked.close()


def test_random_datagrams_get_only_tftp_errors_and_the_face_still_works(bricked: Bench) -> None:
    rng = random.Random(4)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    try:
        for n in range(300):
            size = rng.choice([0, 1, 2, 3, 4, 5, 20, 100, 600, 1500])
            datagram = rng.randbytes(size)
            if n % 3 == 0 and size >= 2:
                datagram = b"\0" + bytes([rng.choice([1, 3, 4, 5, 6])]) + datagram[2:]
            if datagram[:2] == b"\0\2":
                continue  # a write request would start an upload
            sock.sendto(datagram, ("127.0.0.1", bricked.port))
        sock.settimeout(0.5)
        answers = []
        while True:
            try:
                answers.append(sock.recvfrom(70000)[0])
            except TimeoutError:
                break
    finally:
        sock.close()
    assert answers
    for answer in answers:
        try:
            packet = decode(answer)
        except MalformedPacket as e:  # pragma: no cover - the assertion explains
            raise AssertionError(f"the face sent a malformed packet {answer!r}") from e
        assert isinstance(packet, Error)
    assert bricked.face.uploads() == []
    bricked.put(image("2.0.0"))
    assert bricked.upload().flashed
    assert bricked.booted() == "2.0.0"


def test_an_ab_router_gets_the_image_in_its_active_slot(tmp_path: Path) -> None:
    dev = create_device("router-ab", tmp_path / "state", "ab", faults=FAST)
    bench = Bench(dev)
    try:
        dev.simulate_brick("soft")
        assert dev.state == "bootloader"
        fw = build_firmware(
            "SimRouterAB", "4.0.0", security_version=1, hw_revisions=("B2",), size_bytes=IMAGE_BYTES
        )
        bench.put(fw)
        up = bench.upload()
        assert (up.flashed, up.region) == (True, "firmware_a")
        assert bench.booted() == "4.0.0" and dev.booted_slot == "a"
        assert bench.flash(bench.region("firmware_a").offset, len(fw)) == fw
    finally:
        bench.close()
        dev.close()


def test_a_nand_router_gets_the_image_around_its_bad_blocks(tmp_path: Path) -> None:
    # Blocks 13 and 15 are in the firmware partition (from block 12): the image skips them.
    dev = create_device("router-nand", tmp_path / "state", "nd", faults=FAST, bad_blocks=(13, 15))
    bench = Bench(dev)
    try:
        dev.simulate_brick("soft")
        assert dev.state == "bootloader"
        fw = build_firmware(
            "SimRouterNAND", "5.0.0", security_version=1, hw_revisions=("B2",), size_bytes=600_000
        )
        bench.put(fw)
        assert bench.upload().flashed
        assert bench.booted() == "5.0.0"
        eb = dev.config.geometry.erase_block_bytes
        start = bench.region().offset
        assert start // eb == 12
        assert dev.spi_read(start, eb) == fw[:eb]
        assert dev.spi_read(start + 2 * eb, eb) == fw[eb : 2 * eb]
        assert dev.spi_read(start + 4 * eb, eb) == fw[2 * eb : 3 * eb]
    finally:
        bench.close()
        dev.close()


def test_a_reset_during_an_upload_ends_it(bricked: Bench) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(2.0)
    try:
        sock.sendto(encode(Request(Opcode.WRQ, "a.bin", "octet")), ("127.0.0.1", bricked.port))
        answer, _ = sock.recvfrom(1024)
        assert decode(answer) == Ack(0)
        bricked.device.reset(recovery=True)
        up = bricked.upload()
        assert not up.flashed and up.error
    finally:
        sock.close()
    assert bricked.device.wait_state(("bootloader",), 5.0) == "bootloader"
    bricked.put(image("2.0.0"))
    assert bricked.upload(after=1).flashed


# -- the sim server, its registry and the command -----------------------------------------------


def test_the_sim_server_opens_the_tftp_face(bricked: Bench, tmp_path: Path) -> None:
    dev = bricked.device
    bricked.close()
    server = SimServer(dev, tftp=QUICK)
    ports = server.start()
    try:
        assert ports.tftp_port > 0
        oack = _raw_wrq(ports.tftp_port, (("blksize", "65464"), ("windowsize", "16")))
        assert oack == OptionAck((("blksize", str(ROUTER_BLKSIZE_MAX)),))
        server.tftp.wait_for_upload(5.0)
        tftp_put("127.0.0.1", ports.tftp_port, "fw.bin", image("2.0.0"), timeout_s=0.2)
        assert server.tftp.wait_for_upload(5.0, after=1).flashed
        assert dev.wait_state(("firmware",), 10.0) == "firmware"
    finally:
        server.stop()
    # Stopped: nothing answers any more.
    with pytest.raises(TransportError):
        tftp_put("127.0.0.1", ports.tftp_port, "x", b"x", timeout_s=0.1, retries=0)


def _raw_wrq(port: int, options: tuple[tuple[str, str], ...]) -> object:
    """Send a WRQ with ``options``; the decoded answer (the upload is then abandoned with an
    ERROR to the transfer ID)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(2.0)
        sock.sendto(encode(Request(Opcode.WRQ, "fw.bin", "octet", options)), ("127.0.0.1", port))
        answer, tid = sock.recvfrom(1024)
        sock.sendto(encode(Error(ErrorCode.NOT_DEFINED, "changed my mind")), tid)
        return decode(answer)


def test_the_registry_carries_the_tftp_port_and_reads_old_entries(tmp_path: Path) -> None:
    entry = RegistryEntry("r", "127.0.0.1", 1, 2, 3, "router", console_port=4, tftp_port=5)
    write_registry(tmp_path, entry)
    assert json.loads((tmp_path / "r.json").read_text())["tftp_port"] == 5
    assert read_registry(tmp_path, "r") == entry
    old = {"host": "127.0.0.1", "port": 1, "spi_port": 2, "pid": 3, "kind": "router"}
    (tmp_path / "o.json").write_text(json.dumps(old))
    assert read_registry(tmp_path, "o").tftp_port is None


def test_the_sim_command_prints_its_tftp_port_and_a_soft_brick_takes_an_image(
    tmp_path: Path,
) -> None:
    argv = [
        sys.executable, "-m", "unbrick.cli.sim", "router", "--name", "tf",
        "--registry", str(tmp_path / "reg"), "--state-dir", str(tmp_path / "state"),
        "--brick", "soft", "--fault", "power-on-delay=0.01",
    ]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        entry = json.loads((tmp_path / "reg" / "tf.json").read_text())
        expected = (
            f"sim tf (router) listening on 127.0.0.1:{entry['port']}, "
            f"spi 127.0.0.1:{entry['spi_port']}, console 127.0.0.1:{entry['console_port']}, "
            f"tftp 127.0.0.1:{entry['tftp_port']}"
        )
        assert line == expected
        match = re.search(r", tftp 127\.0\.0\.1:(\d+)$", line)
        assert match is not None
        fw = image("2.0.0")
        tftp_put("127.0.0.1", int(match.group(1)), "firmware.bin", fw)
        drv = open_sim(
            parse_device_uri("sim://tf"),
            registry_dir=tmp_path / "reg",
            timeout_s=5.0,
            connect_wait_s=0.3,
        )
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            try:
                ident = drv.identify()  # the device restarts after the write
            except TransportError:
                continue
            if ident.extra.get("state") == "firmware":
                break
            time.sleep(0.1)
        assert (ident.extra["state"], ident.firmware_version) == ("firmware", "2.0.0")
        drv.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
    assert rc == 0
