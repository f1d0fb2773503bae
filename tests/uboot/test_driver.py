"""The driver's pure parts: address map, RAM plan, what it remembers, URI options."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.uboot.fake import Clock, FakeUBoot, probe_answers
from unbrick.errors import DeviceError, UsageError
from unbrick.model.uri import parse_device_uri
from unbrick.transports.uboot import parse as P
from unbrick.transports.uboot.console import CTRL_C, ConsoleState
from unbrick.transports.uboot.driver import (
    Shadow,
    StorageMap,
    UBootDriver,
    UBootOptions,
    _spans,
    default_map,
    open_uboot,
    plan_ram,
)

pytestmark = pytest.mark.unit

DATA = Path(__file__).parent / "data"
BANKS = P.parse_flinfo((DATA / "flinfo.txt").read_text())
VIRTIO = P.BlockDevice("virtio", 0, "QEMU VirtIO Block Device", 512, 131072)  # 64 MiB
NVME = P.BlockDevice("nvme", 0, "QEMU NVMe", 512, 1 << 21)  # 1 GiB


def test_default_map_puts_the_disk_at_0_and_nor_at_its_cpu_address() -> None:
    smap = default_map((NVME, VIRTIO), BANKS)
    assert smap.describe() == "virtio:0@0x0+0x4000000; nor:0x04000000@0x4000000+0x2000000"
    assert smap.size_bytes == 0x06000000
    ((win, off, n),) = smap.split(0x100000, 0x1000)
    assert (win.name, win.kind, off, n, win.unit) == ("virtio:0", "block", 0x100000, 0x1000, 512)
    ((win, off, n),) = smap.split(0x04040000, 0x400000)
    assert (win.name, win.kind, win.base + off, win.unit) == (
        "nor:0x04000000",
        "nor",
        0x04040000,
        0x20000,
    )
    pieces = smap.split(0x03FFF000, 0x2000)
    assert [(w.name, o, n) for w, o, n in pieces] == [
        ("virtio:0", 0x03FFF000, 0x1000),
        ("nor:0x04000000", 0, 0x1000),
    ]


def test_a_larger_disk_is_cut_at_the_nor_window_and_small_disks_leave_a_hole() -> None:
    smap = default_map((NVME,), BANKS, preferred="nvme:0")
    assert smap.windows[0].size == 0x04000000
    small = P.BlockDevice("virtio", 0, "", 512, 81920)  # 40 MiB
    smap = default_map((small,), BANKS)
    with pytest.raises(UsageError, match="0x2800000 is on none of this device's storages"):
        smap.split(0x2700000, 0x200000)
    with pytest.raises(DeviceError, match="no block device mmc:1"):
        default_map((VIRTIO,), BANKS, preferred="mmc:1")
    assert default_map((), ()).windows == ()
    assert StorageMap(()).size_bytes == 0


def test_boot_bank_maps_the_flash_at_0_instead_of_the_disk() -> None:
    smap = default_map((VIRTIO,), BANKS, boot_bank=True)
    assert [w.name for w in smap.windows] == ["nor:0x00000000", "nor:0x04000000"]
    ((win, off, _),) = smap.split(0x80000, 0x10000)
    assert (win.kind, win.base + off) == ("nor", 0x80000)
    on = UBootOptions.from_address(parse_device_uri("uboot+tcp://127.0.0.1:1?boot_bank=on"))
    assert on.boot_bank is True
    assert UBootOptions.from_address(parse_device_uri("uboot+tcp://h:1")).boot_bank is False
    with pytest.raises(UsageError, match="boot_bank='maybe': use on or off"):
        UBootOptions.from_address(parse_device_uri("uboot+tcp://h:1?boot_bank=maybe"))


def test_ram_buffers_sit_at_loadaddr_below_what_uboot_reserved() -> None:
    board = P.BoardInfo(
        fields={},
        dram=((0x40000000, 0x20000000),),
        build_bits=64,
        reserved=((0x5DDB2000, 0x60000000),),
        relocaddr=0x5FEF7000,
    )
    ram = plan_ram(board, {"loadaddr": "0x40200000"}, 256 * 1024)
    assert ram.transfer == 0x40200000
    assert ram.stage >= ram.transfer + 256 * 1024 + 1024
    assert ram.fill_bytes >= 256 * 1024
    assert len({ram.transfer, ram.stage, ram.fill_ff, ram.fill_00, ram.scratch}) == 5
    assert ram.end < 0x5DDB2000
    assert plan_ram(board, {}, 256 * 1024).transfer == 0x40200000  # DRAM start + 2 MiB
    with pytest.raises(DeviceError, match="overlap memory U-Boot uses"):
        plan_ram(board, {"loadaddr": "0x5dc00000"}, 256 * 1024)
    with pytest.raises(DeviceError, match="not inside DRAM"):
        plan_ram(board, {}, 256 * 1024, base=0x80000000)


def test_shadow_keeps_bytes_and_fills_and_forgets_what_changed() -> None:
    s = Shadow(cap_bytes=1000)
    s.put(100, b"a" * 100)
    s.put_fill(200, 50, 0xFF)
    assert s.get(150, 100) == b"a" * 50 + b"\xff" * 50
    assert s.get(90, 20) is None and s.get(240, 20) is None
    s.put(140, b"b" * 20)
    assert s.get(130, 40) == b"a" * 10 + b"b" * 20 + b"a" * 10
    s.drop(150, 60)
    assert s.get(100, 50) == b"a" * 40 + b"b" * 10 and s.get(150, 10) is None
    s.put(2000, b"c" * 960)  # over the cap: the oldest byte segment goes
    assert s.get(2000, 960) == b"c" * 960 and s.get(100, 10) is None
    assert s.get(140, 10) == b"b" * 10
    assert s.get(210, 40) == b"\xff" * 40  # fills cost nothing and stay
    s.clear()
    assert s.get(2000, 1) is None


@settings(max_examples=100, deadline=None)
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["put", "fill", "drop"]),
            st.integers(min_value=0, max_value=400),
            st.integers(min_value=1, max_value=120),
            st.integers(min_value=0, max_value=255),
        ),
        max_size=25,
    )
)
def test_shadow_agrees_with_a_plain_model(ops: list[tuple[str, int, int, int]]) -> None:
    s = Shadow(cap_bytes=1 << 20)
    model: dict[int, int] = {}
    for op, off, n, value in ops:
        if op == "put":
            data = bytes((value + i) % 256 for i in range(n))
            s.put(off, data)
            model.update({off + i: data[i] for i in range(n)})
        elif op == "fill":
            s.put_fill(off, n, value)
            model.update({off + i: value for i in range(n)})
        else:
            s.drop(off, n)
            for i in range(n):
                model.pop(off + i, None)
    for start in range(0, 520, 13):
        for n in (1, 7, 40):
            want = [model.get(a) for a in range(start, start + n)]
            got = s.get(start, n)
            if None in want:
                assert got is None
            else:
                assert got == bytes(want)  # type: ignore[arg-type]


def test_word_program_spans_skip_erased_words() -> None:
    data = b"\x01\x02" + b"\xff" * 100 + b"\x03\x04" + b"\xff" * 6 + b"\x05\x06"
    assert list(_spans(data, 0, len(data), 2)) == [(0, 2), (102, len(data))]
    assert list(_spans(b"\xff" * 64, 0, 64, 4)) == []
    assert list(_spans(b"\x00" * 64, 8, 32, 4)) == [(8, 32)]


def test_options_from_the_uri() -> None:
    addr = parse_device_uri(
        "uboot+tcp://127.0.0.1:5000?baud=57600&interrupt=space&block=nvme:0&firmware=os"
        "&nor_fallback=off&nor_word=4&transfer=loady&ram=0x41000000&timeout=3"
    )
    opts = UBootOptions.from_address(addr)
    assert opts.baudrate == 57600 and opts.console.interrupt == b" "
    assert opts.block == "nvme:0" and opts.firmware == "os"
    assert not opts.nor_fallback and opts.nor_word_bytes == 4
    assert opts.transfer == "loady" and opts.ram_base == 0x41000000
    assert opts.console.command_timeout_s == 3.0
    plain = UBootOptions.from_address(parse_device_uri("uboot+tcp://127.0.0.1:5000"))
    assert plain == UBootOptions()
    assert plain.console.interrupt == CTRL_C
    keyed = UBootOptions.from_address(parse_device_uri("uboot+tcp://h:1?interrupt=tpl"))
    assert keyed.console.interrupt == b"tpl"
    for bad, message in [
        ("block=sd:0", "not a block device"),
        ("firmware=linux", "firmware='linux'"),
        ("nor_fallback=maybe", "use on or off"),
        ("timeout=-1", "out of range"),
        ("nor_word=3", "nor_word must be"),
    ]:
        with pytest.raises(UsageError, match=message):
            UBootOptions.from_address(parse_device_uri(f"uboot+tcp://h:1?{bad}"))


# -- first boot, against the scripted console -----------------------------------------------------


def _driver(
    vendor: str, outcome: str, uri: str = "uboot+tcp://127.0.0.1:9"
) -> tuple[UBootDriver, FakeUBoot]:
    clock = Clock()
    fake = FakeUBoot(clock, answers=probe_answers(DATA, vendor=vendor))
    fake.boot_outcome = outcome
    opts = UBootOptions(boot_quiet_s=3.0)
    drv = open_uboot(parse_device_uri(uri), options=opts, link=fake)
    drv.console.clock = clock
    drv._clock = clock
    return drv, fake


def test_reboot_into_an_operating_system_that_starts() -> None:
    drv, fake = _driver("acme", "kernel")
    assert drv.firmware_mode == "os"
    report = drv.reboot(60)
    assert report.state == "firmware"
    assert "Starting kernel" in report.log and "login:" in report.log
    assert fake.state == "os"
    assert drv.console.state is ConsoleState.LOST  # the OS owns the console now


def test_reboot_that_falls_back_to_the_prompt_is_not_a_good_boot() -> None:
    drv, _ = _driver("acme", "bad-crc")
    report = drv.reboot(60)
    assert report.state == "bootloader"
    assert "Bad Data CRC" in report.log
    assert drv.command("version").startswith("U-Boot 2023.01")  # still usable for a rollback


def test_a_boot_loop_is_seen_and_stopped_at_the_prompt() -> None:
    drv, fake = _driver("acme", "loop")
    report = drv.reboot(60)
    assert report.state == "bootloader"
    assert report.log.count("U-Boot 2023.01") == 2 and "Kernel panic" in report.log
    assert fake.state == "prompt" and drv.console.state is ConsoleState.PROMPT


def test_a_device_that_says_nothing_after_reset_is_dead() -> None:
    drv, fake = _driver("acme", "kernel")
    fake.hang_on = "reset"
    report = drv.reboot(10)
    assert (report.state, report.log) == ("dead", "")


def test_on_qemu_uboot_itself_is_the_firmware() -> None:
    drv, fake = _driver("emulation", "bad-crc")
    assert drv.firmware_mode == "uboot"
    report = drv.reboot(60)
    assert report.state == "firmware"
    assert report.firmware_version == "2023.01+dfsg-2+deb12u3"
    assert report.log.startswith("resetting ...")
    assert report.log.endswith("Hit any key to stop autoboot")
    assert fake.state == "prompt"  # autoboot stopped: the driver keeps the console
    forced, _ = _driver("emulation", "kernel", uri="uboot+tcp://127.0.0.1:9?firmware=os")
    assert forced.firmware_mode == "os" and forced.reboot(60).state == "firmware"


def test_identity_from_the_probe() -> None:
    drv, _ = _driver("emulation", "kernel")
    ident = drv.identify()
    assert (ident.model, ident.serial, ident.bootloader_version) == (
        "qemu-arm",
        "",
        "2023.01+dfsg-2+deb12u3",
    )
    assert ident.firmware_version is None
    assert (
        ident.extra["storage_map"] == "virtio:0@0x0+0x2800000; nor:0x04000000@0x4000000+0x2000000"
    )
    assert ident.storage is not None and ident.storage.size_bytes == 0x06000000
