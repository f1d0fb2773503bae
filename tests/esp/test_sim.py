"""The simulated ESP32 driven by a minimal client of our own (no esptool): protocol details."""

from __future__ import annotations

import hashlib
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import serial
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from unbrick.errors import UsageError
from unbrick.sim.esp_rom import (
    APP_DESC_MAGIC,
    EspChip,
    EspFaults,
    EspRomSim,
    SpiFlash,
)
from unbrick.transports.esp.protocol import (
    STUB_GREETING,
    SYNC_PAYLOAD,
    Command,
    DataBlock,
    Op,
    Response,
    SlipDecoder,
    checksum,
    slip_encode,
)

MiB = 1 << 20
STUB_ENTRY = 0x40080010


class Client:
    """Just enough of a host to talk to the simulator."""

    def __init__(self, port: str) -> None:
        self.ser = serial.Serial(port, 115200, timeout=0.05)
        self.decoder = SlipDecoder()
        self.frames: list[bytes] = []

    def close(self) -> None:
        self.ser.close()

    def send(self, op: int, data: bytes = b"", chk: int = 0) -> None:
        self.ser.write(slip_encode(Command(op, data, chk).encode()))

    def send_raw(self, data: bytes) -> None:
        self.ser.write(data)

    def frame(self, timeout_s: float = 2.0) -> bytes | None:
        deadline = time.monotonic() + timeout_s
        while not self.frames and time.monotonic() < deadline:
            self.frames += self.decoder.feed(self.ser.read(4096))
        return self.frames.pop(0) if self.frames else None

    def command(self, op: int, data: bytes = b"", chk: int = 0) -> Response:
        self.send(op, data, chk)
        while True:
            frame = self.frame()
            assert frame is not None, f"no answer to {Op(op).name}"
            r = Response.parse(frame)
            if r.op == op:
                return r

    def sync(self, expect: int = 8) -> list[Response]:
        """The answers to one SYNC (waiting for ``expect`` of them at most)."""
        self.send(Op.SYNC, SYNC_PAYLOAD)
        replies = []
        while len(replies) < expect and (frame := self.frame(0.3)) is not None:
            replies.append(Response.parse(frame))
        return replies

    def block(self, op: int, seq: int, data: bytes) -> Response:
        return self.command(op, DataBlock(seq, data).encode(), checksum(data))

    def upload_stub(self, entry: int = STUB_ENTRY) -> Response:
        code = bytes(range(64))
        assert self.command(Op.MEM_BEGIN, struct.pack("<IIII", 64, 1, 64, 0x40080000)).data == (
            b"\x00" * 4
        )
        assert self.block(Op.MEM_DATA, 0, code).status(4) == (0, 0)
        return self.command(Op.MEM_END, struct.pack("<II", 0, entry))


@pytest.fixture
def client(sim: EspRomSim) -> Iterator[Client]:
    c = Client(sim.port)
    yield c
    c.close()


def test_sync_is_answered_eight_times_by_the_rom(client: Client) -> None:
    replies = client.sync()
    assert len(replies) == 8
    assert all(r.op == Op.SYNC and r.value != 0 and r.data == b"\x00" * 4 for r in replies)


def test_registers_identify_an_esp32(flash_path: Path) -> None:
    chip = EspChip(mac=bytes.fromhex("a4cf12345678"), revision_major=1, revision_minor=0)
    with EspRomSim(flash_path, chip=chip) as sim:
        c = Client(sim.port)
        try:
            assert c.command(Op.READ_REG, struct.pack("<I", 0x40001000)).value == 0x00F01D83
            word1 = c.command(Op.READ_REG, struct.pack("<I", 0x3FF5A004)).value
            word2 = c.command(Op.READ_REG, struct.pack("<I", 0x3FF5A008)).value
            assert struct.pack(">II", word2, word1)[2:] == chip.mac
            apb = c.command(Op.READ_REG, struct.pack("<I", 0x3FF6607C)).value
            assert apb >> 31 == 0  # revision 1: only the first revision bit is set
            word3 = c.command(Op.READ_REG, struct.pack("<I", 0x3FF5A00C)).value
            assert (word3 >> 15) & 1 == 1
        finally:
            c.close()


def test_unknown_and_stub_only_commands_are_invalid_in_the_rom(client: Client) -> None:
    for op in (Op.GET_SECURITY_INFO, Op.READ_FLASH, 0x42):
        r = client.command(op, b"")
        assert r.status(4) == (1, 0x05)
    assert client.command(Op.READ_REG, struct.pack("<I", 0)).status(4) == (0, 0)


def test_noise_before_a_frame_is_skipped(client: Client, sim: EspRomSim) -> None:
    client.send_raw(b"garbage\r\n\xdb\x01")
    assert len(client.sync()) == 8
    assert sim.stats.noise_bytes >= 9


def test_flash_commands_need_spi_attach_in_the_rom(client: Client) -> None:
    begin = struct.pack("<IIII", 4096, 1, 1024, 0)
    assert client.command(Op.FLASH_BEGIN, begin).status(4) == (1, 0x06)
    assert client.command(Op.SPI_ATTACH, bytes(8)).status(4) == (0, 0)
    assert client.command(Op.FLASH_BEGIN, begin).status(4) == (0, 0)


def test_rom_md5_is_hex_and_flash_size_defaults_to_2mib(client: Client, sim: EspRomSim) -> None:
    client.command(Op.SPI_ATTACH, bytes(8))
    r = client.command(Op.SPI_FLASH_MD5, struct.pack("<IIII", 0, 4096, 0, 0))
    assert r.payload(4) == hashlib.md5(b"\xff" * 4096).hexdigest().encode()
    beyond = struct.pack("<IIII", 3 * MiB, 4096, 0, 0)
    assert client.command(Op.SPI_FLASH_MD5, beyond).status(4) == (1, 0x06)
    params = struct.pack("<IIIIII", 0, 4 * MiB, 65536, 4096, 256, 0xFFFF)
    assert client.command(Op.SPI_SET_PARAMS, params).status(4) == (0, 0)
    assert client.command(Op.SPI_FLASH_MD5, beyond).status(4) == (0, 0)


def test_stub_upload_greets_and_changes_the_status_format(client: Client, sim: EspRomSim) -> None:
    end = client.upload_stub()
    assert end.data == b"\x00" * 4  # still the ROM's answer
    assert client.frame() == STUB_GREETING
    assert sim.state == "stub"
    replies = client.sync()
    assert replies and all(r.value == 0 and r.data == b"\x00\x00" for r in replies)
    r = client.command(Op.SPI_FLASH_MD5, struct.pack("<IIII", 0, 4096, 0, 0))
    assert r.payload(2) == hashlib.md5(b"\xff" * 4096).digest()


def test_bad_block_checksum_is_refused(client: Client) -> None:
    client.command(Op.MEM_BEGIN, struct.pack("<IIII", 4, 1, 4, 0x40080000))
    r = client.command(Op.MEM_DATA, DataBlock(0, b"abcd").encode(), checksum(b"abcd") ^ 1)
    assert r.status(4) == (1, 0x07)


def test_jump_outside_the_loaded_code_crashes(client: Client, sim: EspRomSim) -> None:
    client.upload_stub(entry=0x40090000)
    assert client.frame(0.3) is None
    assert sim.state == "firmware"
    assert client.sync() == []


def test_mem_begin_outside_ram_is_refused(client: Client) -> None:
    r = client.command(Op.MEM_BEGIN, struct.pack("<IIII", 64, 1, 64, 0x10000000))
    assert r.status(4) == (1, 0x06)


def test_read_flash_keeps_to_the_inflight_limit(client: Client, sim: EspRomSim) -> None:
    data = bytes(range(256)) * 32  # 8 KiB
    sim.flash.program(0x1000, data)
    client.upload_stub()
    assert client.frame() == STUB_GREETING
    r = client.command(Op.READ_FLASH, struct.pack("<IIII", 0x1000, len(data), 1024, 2))
    assert r.status(2) == (0, 0)
    got = b""
    for _ in range(2):
        packet = client.frame()
        assert packet is not None and len(packet) == 1024
        got += packet
    # Two packets in flight and none acknowledged: the stub waits.
    assert client.frame(0.2) is None
    while len(got) < len(data):
        client.send_raw(slip_encode(struct.pack("<I", len(got))))
        packet = client.frame()
        assert packet is not None and len(packet) == 1024
        got += packet
    client.send_raw(slip_encode(struct.pack("<I", len(got))))
    assert got == data
    assert client.frame() == hashlib.md5(data).digest()
    assert client.command(Op.READ_REG, struct.pack("<I", 0x40001000)).value == 0x00F01D83


@pytest.mark.parametrize("reset_on_close", [True, False])
def test_closing_the_port_resets_the_chip(flash_path: Path, reset_on_close: bool) -> None:
    with EspRomSim(flash_path, reset_on_close=reset_on_close) as sim:
        c = Client(sim.port)
        c.upload_stub()
        assert c.frame() == STUB_GREETING
        c.close()
        deadline = time.monotonic() + 2
        while sim.host_connected and time.monotonic() < deadline:
            time.sleep(0.01)
        c = Client(sim.port)
        try:
            replies = c.sync()
        finally:
            c.close()
        assert replies
        assert (replies[0].value != 0) is reset_on_close
        assert sim.stats.connections == 2


def app_image(version: str) -> bytes:
    """The start of an ESP-IDF app image: header, segment header, esp_app_desc_t."""
    header = bytes([0xE9, 1, 2, 0x20]) + bytes(20)
    segment = struct.pack("<II", 0x3F400020, 256)
    desc = struct.pack("<IIII", APP_DESC_MAGIC, 0, 0, 0) + version.encode().ljust(32, b"\x00")
    return header + segment + desc.ljust(256, b"\x00")


def test_run_user_code_prints_the_boot_log(client: Client, sim: EspRomSim) -> None:
    sim.flash.program(0x1000, app_image("bootloader"))
    sim.flash.program(0x10000, app_image("v1.2.3"))
    client.upload_stub()
    assert client.frame() == STUB_GREETING
    client.send(Op.RUN_USER_CODE)
    time.sleep(0.2)
    text = client.ser.read(4096).decode()
    assert "boot:0x13 (SPI_FAST_FLASH_BOOT)" in text
    assert "App version:      v1.2.3" in text
    assert sim.state == "firmware"
    assert client.sync() == []
    sim.reset()
    assert len(client.sync()) == 8


def test_blank_flash_does_not_boot(sim: EspRomSim) -> None:
    assert "invalid header: 0xffffffff" in sim.boot_log()
    assert sim.app_version() is None


def test_no_sync_fault_is_silent_until_cleared(flash_path: Path) -> None:
    with EspRomSim(flash_path, faults=EspFaults(no_sync=True)) as sim:
        c = Client(sim.port)
        try:
            assert c.sync() == []
            sim.set_faults(EspFaults())
            assert len(c.sync()) == 8
        finally:
            c.close()


def test_flash_is_nor(tmp_path: Path) -> None:
    flash = SpiFlash(tmp_path / "f.bin", 64 * 1024, EspChip())
    try:
        flash.program(0, b"\x0f\xf0")
        flash.program(0, b"\xff\x0f")
        assert flash.read(0, 3) == b"\x0f\x00\xff"
        flash.erase(1, 1)  # the whole first sector
        assert flash.read(0, 2) == b"\xff\xff"
        assert flash.jedec_id == bytes([0xEF, 0x40, 0x10])
    finally:
        flash.close()


def test_flash_file_of_the_wrong_size_is_refused(tmp_path: Path) -> None:
    (tmp_path / "f.bin").write_bytes(b"\xff" * 1000)
    with pytest.raises(UsageError, match="holds 1000 bytes"):
        EspRomSim(tmp_path / "f.bin")
    with pytest.raises(UsageError, match="power of two"):
        EspRomSim(tmp_path / "g.bin", flash_size_bytes=3 * MiB)


def test_port_before_start_is_a_usage_error(flash_path: Path) -> None:
    sim = EspRomSim(flash_path)
    with pytest.raises(UsageError, match="not started"):
        _ = sim.port
    sim.stop()


frames = st.lists(
    st.tuples(
        st.sampled_from([*list(Op), 0x01, 0x42, 0xFF]),
        st.binary(max_size=64),
        st.integers(0, 255),
    ),
    max_size=25,
)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames, st.binary(max_size=200))
def test_fuzzed_commands_never_stop_the_simulator(
    tmp_path_factory: pytest.TempPathFactory,
    commands: list[tuple[int, bytes, int]],
    noise: bytes,
) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "flash.bin"
    with EspRomSim(path, flash_size_bytes=1 * MiB, read_timeout_s=0.1) as sim:
        c = Client(sim.port)
        try:
            c.send_raw(noise)
            for op, data, chk in commands:
                c.send(op, data, chk)
            # The simulator has read everything once it answers a register read.
            c.send(Op.READ_REG, struct.pack("<I", 0))
            c.frame(0.3)
            sim.reset()
            c.ser.reset_input_buffer()
            c.frames.clear()
            assert len(c.sync()) == 8
        finally:
            c.close()
