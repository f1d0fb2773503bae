"""Device URIs parse into immutable descriptors; bad ones are clear usage errors."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from unbrick.errors import UsageError
from unbrick.model.uri import SCHEMES, parse_device_uri

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("uri", "expect"),
    [
        ("sim://router1", {"protocol": "sim", "name": "router1"}),
        ("sim://lab-7?dir=/tmp/x", {"name": "lab-7", "params": (("dir", "/tmp/x"),)}),
        (
            "uboot+serial:///dev/ttyUSB0?baud=115200",
            {"protocol": "uboot", "link": "serial", "path": "/dev/ttyUSB0"},
        ),
        ("uboot+tcp://127.0.0.1:4000", {"host": "127.0.0.1", "port": 4000, "link": "tcp"}),
        ("uboot+rfc2217://localhost:7000", {"link": "rfc2217", "port": 7000}),
        ("fastboot+usb://0123456789ABCDEF", {"protocol": "fastboot", "name": "0123456789ABCDEF"}),
        ("fastboot+usb://", {"name": None}),
        ("fastboot+tcp://[::1]:5554", {"host": "::1", "port": 5554}),
        ("fastboot+udp://127.0.0.1:5554", {"link": "udp"}),
        ("tftp+server://0.0.0.0:69", {"protocol": "tftp", "link": "server", "port": 69}),
        ("tftp+client://192.168.1.1:69", {"link": "client", "host": "192.168.1.1"}),
        (
            "flashrom://ch341a_spi",
            {"protocol": "flashrom", "name": "ch341a_spi", "params": ()},
        ),
        (
            "flashrom://dummy?emulate=W25Q128FV&image=/tmp/f.bin",
            {"params": (("emulate", "W25Q128FV"), ("image", "/tmp/f.bin"))},
        ),
        ("block:///dev/sdb", {"protocol": "block", "path": "/dev/sdb"}),
        ("block:///srv/images/disk.img", {"path": "/srv/images/disk.img"}),
        ("esp:///dev/ttyUSB1", {"protocol": "esp", "path": "/dev/ttyUSB1"}),
        ("esp://ttyACM0", {"path": "/dev/ttyACM0"}),
    ],
)
def test_supported_forms(uri: str, expect: dict[str, object]) -> None:
    addr = parse_device_uri(uri)
    for key, value in expect.items():
        assert getattr(addr, key) == value, key
    assert addr.uri == uri
    with pytest.raises(dataclasses.FrozenInstanceError):
        addr.host = "x"  # type: ignore[misc]


def test_pyserial_urls() -> None:
    assert parse_device_uri("uboot+tcp://h:1").pyserial_url == "socket://h:1"
    assert parse_device_uri("uboot+rfc2217://h:2").pyserial_url == "rfc2217://h:2"
    assert parse_device_uri("uboot+serial:///dev/ttyS0").pyserial_url == "/dev/ttyS0"
    assert parse_device_uri("uboot+serial:///dev/ttyS0?baud=9600").int_param("baud", 115200) == 9600
    with pytest.raises(UsageError):
        _ = parse_device_uri("sim://x").pyserial_url


@pytest.mark.parametrize(
    ("uri", "words"),
    [
        ("ftp://host/x", ["unknown device scheme", "sim://NAME"]),
        ("/dev/ttyUSB0", ["not a device URI"]),
        ("uboot+tcp://host", ["needs a host and a port"]),
        ("uboot+tcp://host:99999", ["malformed"]),
        ("uboot+serial://dev/ttyUSB0", ["three slashes"]),
        ("sim://", ["does not name a simulated device"]),
        ("flashrom://", ["programmer"]),
        ("block://", ["absolute path"]),
        ("esp://", ["serial port"]),
        ("sim://a#frag", ["fragment"]),
        ("flashrom://dummy?=x&&", ["malformed parameters"]),
    ],
)
def test_malformed_uris_are_usage_errors(uri: str, words: list[str]) -> None:
    with pytest.raises(UsageError) as info:
        parse_device_uri(uri)
    text = info.value.one_line()
    assert "\n" not in text
    for word in words:
        assert word in text


def test_unknown_scheme_lists_every_supported_form() -> None:
    with pytest.raises(UsageError) as info:
        parse_device_uri("gopher://x:1")
    for _, _, form in SCHEMES.values():
        assert form in info.value.one_line()


@given(st.text(max_size=80))
def test_arbitrary_text_parses_or_is_a_usage_error(text: str) -> None:
    try:
        addr = parse_device_uri(text)
    except UsageError:
        return
    assert addr.scheme in SCHEMES


def test_profile_defaults_fill_only_the_parameters_the_uri_leaves_out() -> None:
    address = parse_device_uri("uboot+tcp://127.0.0.1:4000?baud=9600")
    merged = address.with_defaults({"baud": "115200", "boot_bank": "on"})
    assert merged.param("baud") == "9600"
    assert merged.param("boot_bank") == "on"
    assert merged.uri == address.uri  # shown as the user typed it
    assert address.with_defaults({"baud": "1"}) is address
