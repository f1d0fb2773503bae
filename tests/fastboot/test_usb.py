"""The USB link with a fake pyusb: interface matching, serials, waiting, bulk transfers, errors."""

from __future__ import annotations

import errno
from collections import deque
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest

from unbrick.errors import TransportError
from unbrick.transports.fastboot.client import FastbootClient
from unbrick.transports.fastboot.links import UsbLink, find_fastboot_interface

pytestmark = pytest.mark.unit

BULK = 2


class FakeUSBError(Exception):
    def __init__(self, text: str, errno_: int | None = None) -> None:
        super().__init__(text)
        self.errno = errno_


class Endpoint:
    def __init__(self, address: int) -> None:
        self.bEndpointAddress = address
        self.bmAttributes = BULK
        self.wMaxPacketSize = 512
        self.written: list[bytes] = []
        self.answers: deque[bytes | Exception] = deque()

    def write(self, data: Any, timeout: int) -> int:
        self.written.append(bytes(data))
        return len(data)

    def read(self, size: int, timeout: int) -> bytes:
        if not self.answers:
            raise FakeUSBError("Operation timed out", errno.ETIMEDOUT)
        answer = self.answers.popleft()
        if isinstance(answer, Exception):
            raise answer
        assert len(answer) <= size
        return answer


class Interface(list[Endpoint]):
    def __init__(self, number: int, cls: int, sub: int, proto: int) -> None:
        super().__init__([Endpoint(0x01), Endpoint(0x81)])
        self.bInterfaceNumber = number
        self.bInterfaceClass = cls
        self.bInterfaceSubClass = sub
        self.bInterfaceProtocol = proto


class Device:
    def __init__(self, serial: str, interfaces: list[Interface]) -> None:
        self.serial = serial
        self.iSerialNumber = 3
        self.config = interfaces
        self.claimed: list[int] = []

    def get_active_configuration(self) -> list[Interface]:
        return self.config

    def is_kernel_driver_active(self, number: int) -> bool:
        return False


def fastboot_device(serial: str) -> Device:
    return Device(serial, [Interface(0, 0xFF, 0x42, 0x01), Interface(1, 0xFF, 0x42, 0x03)])


def fake_usb(devices: Callable[[], list[Device]]) -> tuple[Any, Any]:
    core = SimpleNamespace(USBError=FakeUSBError, find=lambda find_all: devices())

    def find_descriptor(intf: Interface, custom_match: Callable[[Endpoint], bool]) -> Any:
        return next((ep for ep in intf if custom_match(ep)), None)

    def claim(dev: Device, number: int) -> None:
        dev.claimed.append(number)

    util = SimpleNamespace(
        get_string=lambda dev, index: dev.serial,
        claim_interface=claim,
        endpoint_type=lambda attrs: attrs & 3,
        endpoint_direction=lambda address: address & 0x80,
        ENDPOINT_TYPE_BULK=BULK,
        ENDPOINT_OUT=0,
        ENDPOINT_IN=0x80,
        find_descriptor=find_descriptor,
    )
    return core, util


def test_interface_match() -> None:
    dev = fastboot_device("X")
    assert find_fastboot_interface(dev).bInterfaceNumber == 1
    assert find_fastboot_interface(Device("Y", [Interface(0, 0xFF, 0x42, 0x01)])) is None


def test_open_by_serial_and_talk() -> None:
    devices = [fastboot_device("AAA"), fastboot_device("BBB")]
    usb = fake_usb(lambda: devices)
    link = UsbLink.open("BBB", timeout_s=1.0, usb_modules=usb)
    assert link.description == "usb:BBB"
    dev = devices[1]
    assert dev.claimed == [1]
    ep_out, ep_in = dev.config[1]
    ep_in.answers.extend([b"INFOhello", b"OKAYwalleye", b"DATA00000400", b"OKAY"])
    infos: list[str] = []
    client = FastbootClient(link, on_info=infos.append)
    assert client.getvar("product") == "walleye" and infos == ["hello"]
    client._max_download = 1 << 20
    client.download(b"\x5a" * 1024)
    assert ep_out.written == [b"getvar:product", b"download:00000400", b"\x5a" * 1024]
    ep_in.answers.append(FakeUSBError("No such device", errno.ENODEV))
    with pytest.raises(TransportError, match="usb:BBB") as e:
        client.getvar("product")
    assert "resume" in e.value.hint
    with pytest.raises(TransportError, match="no answer in time"):
        client.getvar("product")
    link.close()


def test_upload_over_usb() -> None:
    devices = [fastboot_device("AAA")]
    link = UsbLink.open(None, timeout_s=1.0, usb_modules=fake_usb(lambda: devices))
    ep_in = devices[0].config[1][1]
    ep_in.answers.extend([b"DATA00000600", b"x" * 1024, b"y" * 512, b"OKAY"])
    out = bytearray()

    class Sink:
        def write(self, data: bytes) -> int:
            out.extend(data)
            return len(data)

    assert FastbootClient(link).upload(Sink()) == 0x600  # type: ignore[arg-type]
    assert bytes(out) == b"x" * 1024 + b"y" * 512


def test_waiting_for_device() -> None:
    polls: list[int] = []
    devices: list[Device] = []

    def scan() -> list[Device]:
        polls.append(1)
        if len(polls) == 3:
            devices.append(fastboot_device("LATE"))
        return devices

    waits: list[str] = []
    link = UsbLink.open(
        None, timeout_s=5.0, usb_modules=fake_usb(scan), on_wait=waits.append, poll_s=0.01
    )
    assert link.description == "usb:LATE"
    assert waits == ["waiting for device (any serial)"]
    with pytest.raises(TransportError, match="no fastboot device") as e:
        UsbLink.open("NOPE", timeout_s=0.05, usb_modules=fake_usb(list), poll_s=0.01)
    assert "udev" in e.value.hint


def test_several_devices_need_a_serial() -> None:
    devices = [fastboot_device("A"), fastboot_device("B")]
    with pytest.raises(TransportError, match="2 fastboot devices are attached"):
        UsbLink.open(None, timeout_s=1.0, usb_modules=fake_usb(lambda: devices))


def test_claim_failure() -> None:
    dev = fastboot_device("A")
    core, util = fake_usb(lambda: [dev])

    def refuse(device: Device, number: int) -> None:
        raise FakeUSBError("Resource busy", errno.EBUSY)

    util.claim_interface = refuse
    with pytest.raises(TransportError, match="cannot claim") as e:
        UsbLink.open("A", timeout_s=1.0, usb_modules=(core, util))
    assert "adb" in e.value.hint


def test_no_backend() -> None:
    def broken(find_all: bool) -> list[Device]:
        raise FakeUSBError("No backend available")

    core, util = fake_usb(list)
    core.find = broken
    with pytest.raises(TransportError, match="cannot list USB devices"):
        UsbLink.open(None, timeout_s=1.0, usb_modules=(core, util))
