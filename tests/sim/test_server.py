"""The sim server and the driver, end to end over TCP on 127.0.0.1."""

from __future__ import annotations

import hashlib
import logging
import re
import socket
import threading
import time
from pathlib import Path

import pytest

from tests.sim.conftest import Served, reboot, to_recovery
from unbrick.errors import DeviceError, TransportError, UsageError
from unbrick.model.uri import parse_device_uri
from unbrick.sim.device import Faults, SimDevice
from unbrick.sim.firmware import build_firmware
from unbrick.sim.kinds import KINDS
from unbrick.transports.base import (
    BootControl,
    Capability,
    DeviceHash,
    FlashErase,
    FlashRead,
    FlashWrite,
    Identify,
    Reboot,
)
from unbrick.transports.sim import (
    NO_ANSWER,
    RegistryEntry,
    SimDriver,
    default_registry_dir,
    open_sim,
    write_registry,
)
from unbrick.transports.simproto import FrameDecoder, Request, decode_response, encode_request

FW = KINDS["router"].region("firmware")
SLOT_B = KINDS["router-ab"].region("firmware_b")


def fw_image(model: str = "SimRouter", version: str = "2.0.0", size: int = 600 * 1024) -> bytes:
    return build_firmware(model, version, security_version=1, size_bytes=size)


def flash_bytes(dev: SimDevice, offset: int, length: int) -> bytes:
    """The chip's contents, read through the SPI face of the device object."""
    step = 1 << 20
    return b"".join(
        dev.spi_read(pos, min(step, offset + length - pos))
        for pos in range(offset, offset + length, step)
    )


# -- the driver over the generic face -------------------------------------------------------------


def test_driver_identifies_and_declares_capabilities(served: Served) -> None:
    with served.open() as drv:
        caps = drv.capabilities
        assert caps == {
            Capability.IDENTIFY,
            Capability.READ,
            Capability.ERASE,
            Capability.WRITE,
            Capability.DEVICE_HASH,
            Capability.REBOOT,
        }
        for proto in (Identify, FlashRead, FlashErase, FlashWrite, DeviceHash, Reboot):
            assert isinstance(drv, proto)
        ident = drv.identify()
        assert (ident.model, ident.firmware_version) == ("SimRouter", "1.0.0")
        assert ident.serial == served.device.config.serial
        assert drv.max_transfer == 256 * 1024


def test_flash_ops_are_refused_until_recovery(served: Served) -> None:
    with served.open() as drv:
        with pytest.raises(DeviceError, match="running firmware; enter recovery first"):
            drv.read(0, 16)
        drv.enter_recovery(5.0)
        assert drv.state()["state"] == "bootloader"
        drv.enter_recovery(5.0)  # already there: nothing happens
        assert drv.read(0, 8) == b"SIMBOOT1"


def test_read_erase_program_hash_end_to_end(served: Served) -> None:
    image = fw_image()
    with served.open() as drv:
        drv.enter_recovery(5.0)
        drv.erase(FW.offset, FW.size)
        assert drv.read(FW.offset, 4096) == b"\xff" * 4096
        drv.program(FW.offset, image)  # several chunks of max_transfer
        assert drv.read(FW.offset, len(image)) == image
        assert flash_bytes(served.device, FW.offset, len(image)) == image
        assert drv.device_hash(FW.offset, len(image)) == hashlib.sha256(image).hexdigest()
        assert (
            drv.device_hash(0, 8 << 20)
            == hashlib.sha256(flash_bytes(served.device, 0, 8 << 20)).hexdigest()
        )
        assert (
            drv.device_hash(0, 100, "md5")
            == hashlib.md5(flash_bytes(served.device, 0, 100)).hexdigest()
        )
        with pytest.raises(DeviceError, match="not aligned"):
            drv.erase(FW.offset + 1, 4096)
        report = drv.reboot(5.0)
    assert report.state == "firmware"
    assert report.firmware_version == "2.0.0"
    assert "SimRouter firmware 2.0.0 booted" in report.log
    assert report.booted_slot is None


def test_reboot_reports_a_soft_brick(served: Served) -> None:
    with served.open() as drv:
        drv.enter_recovery(5.0)
        drv.erase(FW.offset, 0x10000)
        report = drv.reboot(5.0)
        assert report.state == "bootloader" and report.firmware_version is None
        assert "Wrong Image Format for bootm command" in report.log
        assert drv.identify().extra["state"] == "bootloader"  # the link survived the reset


def test_ab_boot_control_over_the_driver(served_ab: Served) -> None:
    with served_ab.open() as drv:
        assert Capability.BOOT_CONTROL in drv.capabilities
        assert isinstance(drv, BootControl)
        drv.enter_recovery(5.0)
        drv.erase(SLOT_B.offset, SLOT_B.size)
        drv.program(SLOT_B.offset, fw_image("SimRouterAB", "2.0.0"))
        drv.set_trial("b")
        st = drv.boot_state()
        assert (st.active_slot, st.trial_slot, st.bootcount, st.bootlimit) == ("a", "b", 0, 3)
        report = drv.reboot(5.0)
        assert (report.state, report.booted_slot, report.firmware_version) == (
            "firmware",
            "b",
            "2.0.0",
        )
        drv.commit("b")
        assert drv.boot_state().active_slot == "b"
        with pytest.raises(DeviceError, match="active slot"):
            drv.set_trial("b")


def test_single_slot_driver_has_no_boot_control(served: Served) -> None:
    with served.open() as drv, pytest.raises(UsageError, match="does not offer boot-control"):
        drv.boot_state()


def test_several_clients_at_once(served: Served) -> None:
    to_recovery(served.device)
    errors: list[BaseException] = []
    results: dict[int, str] = {}

    def worker(i: int) -> None:
        try:
            with served.open() as drv:
                for _ in range(3):
                    data = drv.read(i * 0x100000, 0x40000)
                    results[i] = hashlib.sha256(data).hexdigest()
                    assert drv.device_hash(i * 0x100000, 0x40000) == results[i]
        except BaseException as e:  # collected for the main thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    for i in range(5):
        want = hashlib.sha256(flash_bytes(served.device, i * 0x100000, 0x40000)).hexdigest()
        assert results[i] == want


# -- faults ------------------------------------------------------------------------------------


def test_bit_errors_are_detected_and_the_retry_recovers(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    to_recovery(served.device)
    served.device.set_faults(Faults(link_bit_error_rate=0.1, seed=3, power_on_delay_s=0.01))
    want = flash_bytes(served.device, 0, 4 << 20)
    with caplog.at_level(logging.INFO, logger="unbrick.transports.sim"), served.open() as drv:
        assert drv.read(0, 4 << 20) == want  # 16 chunks; some corrupted once, retried
    retried = [r for r in caplog.records if "CRC mismatch" in r.getMessage()]
    assert retried  # the seed makes some frames corrupt: the CRC caught them


def test_a_link_that_always_corrupts_fails_with_a_transport_error(served: Served) -> None:
    to_recovery(served.device)
    served.device.set_faults(Faults(link_bit_error_rate=1.0, power_on_delay_s=0.01))
    with served.open() as drv, pytest.raises(TransportError, match=r"read failed 2 times.*CRC"):
        drv.read(0, 4096)


def test_disconnects_are_survived(served: Served) -> None:
    to_recovery(served.device)
    served.device.set_faults(Faults(disconnect_after_frames=3, power_on_delay_s=0.01))
    image = fw_image(size=1 << 20)
    with served.open() as drv:
        drv.erase(FW.offset, FW.size)
        drv.program(FW.offset, image)
        assert drv.read(FW.offset, len(image)) == image
        assert drv.device_hash(FW.offset, len(image)) == hashlib.sha256(image).hexdigest()
        report = drv.reboot(5.0)
        assert (report.state, report.firmware_version) == ("firmware", "2.0.0")


def test_a_power_cut_mid_write_is_survived_by_the_retry(served: Served) -> None:
    """The cut chunk is half-written; the device comes back soft-bricked (in its bootloader),
    so the retried chunk (addressed, idempotent) completes the write."""
    to_recovery(served.device)
    image = fw_image(size=1 << 20)
    with served.open() as drv:
        drv.erase(FW.offset, FW.size)
        served.device.set_faults(Faults(power_cut_after_ops=2, power_on_delay_s=0.05))
        drv.program(FW.offset, image)
        assert served.device.boot_id == 3  # the factory boot, recovery, and the cut
        assert drv.read(FW.offset, len(image)) == image
        assert drv.reboot(5.0).firmware_version == "2.0.0"


def test_a_power_cut_that_reboots_into_firmware_stops_the_write(served_ab: Served) -> None:
    to_recovery(served_ab.device)
    served_ab.device.program(SLOT_B.offset + 0x300000, b"marker")
    with served_ab.open() as drv:
        served_ab.device.set_faults(Faults(power_cut_after_ops=1, power_on_delay_s=0.02))
        with pytest.raises(DeviceError, match="running firmware"):
            drv.erase(SLOT_B.offset, SLOT_B.size)  # slot b is not booted: a comes back up
        assert served_ab.device.state == "firmware"
        first = flash_bytes(served_ab.device, SLOT_B.offset, 0x1C0000)
        assert first == b"\xff" * 0x1C0000  # half of the erase happened
        assert flash_bytes(served_ab.device, SLOT_B.offset + 0x300000, 6) == b"marker"


def test_slow_link(served: Served) -> None:
    to_recovery(served.device)
    served.device.set_faults(Faults(slow_link_bytes_per_s=400_000, power_on_delay_s=0.01))
    with served.open() as drv:
        start = time.monotonic()
        assert len(drv.read(0, 128 * 1024)) == 128 * 1024
        assert time.monotonic() - start >= 0.25


# -- a device that does not answer ----------------------------------------------------------------


def test_a_hard_bricked_device_answers_only_on_spi(served: Served) -> None:
    served.device.simulate_brick("hard")
    with pytest.raises(TransportError, match="device does not answer"):
        served.open(wait_s=0.2)
    with served.open("?via=spi") as spi:
        assert spi.capabilities == {
            Capability.IDENTIFY,
            Capability.READ,
            Capability.ERASE,
            Capability.WRITE,
        }
        chip = spi.identify()
        assert (chip.model, chip.extra["jedec_id"]) == ("W25Q64JV", "ef4017")
        assert chip.storage is not None and chip.storage.size_bytes == 8 << 20
        from unbrick.sim.firmware import build_bootloader

        spi.erase(0, 0x40000)
        spi.program(0, build_bootloader("2023.01-sim"))
        assert spi.read(0, 8) == b"SIMBOOT1"
        with pytest.raises(UsageError, match="does not offer"):
            spi.reboot(1.0)
    assert reboot(served.device) == "firmware"
    with served.open() as drv:
        assert drv.identify().bootloader_version == "2023.01-sim"


def test_reboot_into_a_dead_device_reports_dead(served: Served) -> None:
    to_recovery(served.device)
    with served.open() as drv:
        drv.erase(0, 0x10000)
        report = drv.reboot(0.5)
    assert (report.state, report.log) == ("dead", "")


def test_connection_refused_and_missing_registry(tmp_path: Path) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    write_registry(tmp_path, RegistryEntry("gone", "127.0.0.1", port, port, 1, "router"))
    with pytest.raises(TransportError, match=re.escape(NO_ANSWER)):
        open_sim(parse_device_uri("sim://gone"), registry_dir=tmp_path, connect_wait_s=0.1)
    with pytest.raises(TransportError, match="no simulator named 'nobody'"):
        open_sim(parse_device_uri("sim://nobody"), registry_dir=tmp_path)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(TransportError, match="damaged"):
        open_sim(parse_device_uri("sim://bad"), registry_dir=tmp_path)


def test_registry_dir_resolution(served: Served, tmp_path: Path) -> None:
    uri = f"sim://{served.device.name}?dir={served.registry}"
    with open_sim(parse_device_uri(uri), registry_dir=tmp_path / "elsewhere") as drv:
        assert drv.identify().model == "SimRouter"
    with pytest.raises(UsageError, match="via"):
        open_sim(parse_device_uri("sim://x?via=jtag"), registry_dir=tmp_path)
    assert default_registry_dir({"UNBRICK_SIM_DIR": "/x/y"}, Path("/home/u")) == Path("/x/y")
    assert default_registry_dir({}, Path("/home/u")) == Path("/home/u/.local/state/unbrick/sim")


# -- the server itself ---------------------------------------------------------------------------


def _raw_call(port: int, req: Request) -> dict[str, object]:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(encode_request(req))
        decoder = FrameDecoder()
        while True:
            frames = decoder.feed(s.recv(65536))
            if frames:
                resp = decode_response(frames[0])
                return {"ok": resp.ok, "error": resp.error, **resp.fields}


def test_server_answers_errors_and_refuses_spi_only_ops(served: Served) -> None:
    port, spi = served.ports.port, served.ports.spi_port
    hello = _raw_call(port, Request("hello", 1, {"version": 1}))
    assert (hello["ok"], hello["kind"], hello["state"], hello["face"]) == (
        True,
        "router",
        "firmware",
        "generic",
    )
    old = _raw_call(port, Request("hello", 2, {"version": 99}))
    assert old["ok"] is False and "protocol version 99" in str(old["error"])
    assert "not offered by the SPI face" in str(_raw_call(spi, Request("reboot", 3))["error"])
    assert "not offered by the recovery" in str(_raw_call(port, Request("chip", 4))["error"])
    to_recovery(served.device)
    big = _raw_call(port, Request("read", 5, {"offset": 0, "length": 5 << 20}))
    assert big["ok"] is False and "exceeds" in str(big["error"])


def test_garbage_from_a_client_drops_only_that_client(served: Served) -> None:
    with socket.create_connection(("127.0.0.1", served.ports.port), timeout=5) as s:
        s.sendall(b"\xff\xff\xff\xffGARBAGE")
        assert s.recv(100) == b""
    with served.open() as drv:
        assert drv.identify().model == "SimRouter"


def test_stop_closes_clients_and_listeners(router: SimDevice, tmp_path: Path) -> None:
    s = Served(router, tmp_path / "reg")
    drv = s.open()
    s.server.stop()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", s.ports.port), timeout=2).close()
    with pytest.raises(TransportError):
        drv._call("state", retry=False)
    drv.close()
    s.server.stop()  # twice is fine
    assert not [t for t in threading.enumerate() if t.name.startswith("sim-") and t.is_alive()]


def test_driver_on_a_direct_endpoint(served: Served) -> None:
    addr = parse_device_uri("sim://direct")
    with SimDriver(addr, host="127.0.0.1", port=served.ports.port, timeout_s=5.0) as drv:
        assert drv.kind == "router"
    with pytest.raises(UsageError, match="unknown face"):
        SimDriver(addr, host="127.0.0.1", port=served.ports.port, face="jtag")
