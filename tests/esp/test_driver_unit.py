"""Pure parts of the esp:// driver: options, error translation, boot logs, known bytes, and
that esptool stays an optional, lazily imported extra."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.esp.conftest import MiB
from unbrick.errors import DeviceError, TransportError, UsageError, VerifyError
from unbrick.model.uri import parse_device_uri
from unbrick.transports.esp import EspOptions, open_esp
from unbrick.transports.esp.driver import (
    DOWNLOAD_MODE_HINT,
    KnownBytes,
    boot_report,
    chip_key,
    load_esptool,
    parse_flash_size,
    translate_error,
)

pytestmark = pytest.mark.unit


def test_options_from_address() -> None:
    addr = parse_device_uri(
        "esp:///dev/ttyUSB0?baud=921600&chip=ESP32&stub=no&compress=0&max_transfer=0x10000"
        "&flash_size=8MB&boot_log=1.5&before=no-reset&connect_attempts=2"
    )
    opts = EspOptions.from_address(addr)
    assert opts == EspOptions(
        baud=921600,
        chip="esp32",
        stub=False,
        compress=False,
        max_transfer=0x10000,
        flash_size="8MB",
        boot_log_s=1.5,
        before="no-reset",
        connect_attempts=2,
    )
    assert EspOptions.from_address(parse_device_uri("esp://ttyUSB0")) == EspOptions()
    for bad, match in [
        ("chip=esp99", "chip='esp99'"),
        ("stub=maybe", "not on/off"),
        ("max_transfer=1000", "multiple of 4 KiB"),
        ("flash_size=3MB", "power of two"),
        ("before=whenever", "before="),
        ("boot_log=soon", "not seconds"),
        ("baud=12", "not a serial speed"),
    ]:
        with pytest.raises(UsageError, match=match):
            EspOptions.from_address(parse_device_uri(f"esp:///dev/ttyUSB0?{bad}"))


def test_small_helpers() -> None:
    assert parse_flash_size("4MB") == 4 * MiB
    assert parse_flash_size("512KB") == 512 * 1024
    assert chip_key("ESP32-S3") == "esp32s3"
    assert chip_key("ESP32-C3 (QFN32)") == "esp32c3"


class FatalError(RuntimeError):
    """Named like esptool's: the translation goes by message, not by class."""


@pytest.mark.parametrize(
    ("error", "kind", "words"),
    [
        (
            FatalError(
                "Failed to connect to ESP32: No serial data received.\nFor troubleshooting..."
            ),
            TransportError,
            "no answer from the ESP bootloader on P (Failed to connect to ESP32: No serial",
        ),
        (
            FatalError("Could not open /dev/ttyUSB0, the port is busy or doesn't exist."),
            TransportError,
            "cannot open P",
        ),
        (FatalError("Timed out waiting for packet header"), TransportError, "write on P"),
        (OSError(5, "Input/output error"), TransportError, "write on P"),
        (FatalError("MD5 of file does not match data in flash!"), VerifyError, "MD5 differs"),
        (
            FatalError("Failed to write to target flash after seq 3 (result was 01C4: x)"),
            DeviceError,
            "the ESP refused to write",
        ),
        (FatalError("Something new"), DeviceError, "write on P: Something new"),
    ],
)
def test_translate_error(error: BaseException, kind: type, words: str) -> None:
    err = translate_error(error, action="write", port="P", ranges=[(0, 4)])
    assert type(err) is kind
    assert words in err.message
    assert "\n" not in err.one_line()
    if kind is TransportError and "bootloader" in words:
        assert err.hint == DOWNLOAD_MODE_HINT
    if kind is VerifyError:
        assert err.ranges == [(0, 4)]  # type: ignore[attr-defined]


def test_boot_report() -> None:
    log = (
        "ets Jun  8 2016 00:22:57\r\nrst:0x1 (POWERON_RESET),boot:0x13 (SPI_FAST_FLASH_BOOT)\r\n"
        "I (210) app_init: App version:      v2.0.1\r\n"
    )
    assert boot_report(log).firmware_version == "v2.0.1"
    assert boot_report(log).state == "firmware"
    waiting = "rst:0x1 (POWERON_RESET),boot:0x3 (DOWNLOAD_BOOT(UART0))\r\nwaiting for download\r\n"
    assert boot_report(waiting).state == "bootloader"


def test_without_esptool_the_extra_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "esptool", None)
    with pytest.raises(UsageError, match="need esptool") as err:
        load_esptool()
    assert "pip install 'unbrick[esp]'" in err.value.hint
    with pytest.raises(UsageError, match="need esptool"):
        open_esp(parse_device_uri("esp:///dev/ttyUSB0"))


def test_esptool_is_not_imported_with_the_package() -> None:
    code = (
        "import sys, unbrick.transports.esp, unbrick.transports.esp.driver, unbrick.sim.esp_rom;"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('esptool', 'esp_pylib')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["put", "drop"]),
            st.integers(0, 600),
            st.integers(0, 200),
            st.integers(0, 255),
        ),
        max_size=30,
    ),
    st.integers(0, 700),
    st.integers(1, 100),
)
def test_known_bytes_match_a_model(
    ops: list[tuple[str, int, int, int]], q_off: int, q_len: int
) -> None:
    known = KnownBytes(cap_bytes=10_000)
    model: dict[int, int] = {}
    for op, off, n, value in ops:
        if op == "put":
            known.put(off, bytes([value]) * n)
            model.update({a: value for a in range(off, off + n)})
        else:
            known.drop(off, n)
            for a in range(off, off + n):
                model.pop(a, None)
    got = known.get(q_off, q_len)
    if all(a in model for a in range(q_off, q_off + q_len)):
        assert got == bytes(model[a] for a in range(q_off, q_off + q_len))
    else:
        assert got is None


def test_known_bytes_forget_the_oldest_beyond_the_cap() -> None:
    known = KnownBytes(cap_bytes=100)
    known.put(0, b"a" * 60)
    known.put(100, b"b" * 60)
    assert known.get(0, 1) is None
    assert known.get(100, 60) == b"b" * 60
    known.put(500, b"c" * 101)  # larger than the cap: not kept
    assert known.get(500, 1) is None
