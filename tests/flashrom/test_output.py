"""flashrom's output parsed, and judged per operation: real runs captured from flashrom 1.3's dummy
programmer (``tests/flashrom/data``, made by ``python -m tests.flashrom.capture``), and fuzz."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from unbrick.errors import (
    DeviceError,
    ToolError,
    UnbrickError,
    UsageError,
    VerifyError,
)
from unbrick.transports.flashrom.output import (
    Chip,
    FlashromReport,
    LayoutEntry,
    WriteProtect,
    chip_matches,
    parse_output,
)
from unbrick.transports.flashrom.runner import Operation, Programmer, Request, check_report

pytestmark = pytest.mark.unit

DATA = Path(__file__).parent / "data"


def captured(name: str) -> dict[str, Any]:
    path = DATA / f"{name}.json"
    if path.exists():
        return dict(json.loads(path.read_text()))
    return dict(json.loads(gzip.decompress((DATA / f"{name}.json.gz").read_bytes())))


def report_of(name: str) -> tuple[FlashromReport, Request]:
    d = captured(name)
    argv = d["argv"]
    op = Operation.PROBE
    for flag, o in (
        ("-r", Operation.READ),
        ("-w", Operation.WRITE),
        ("-v", Operation.VERIFY),
        ("-E", Operation.ERASE),
    ):
        if flag in argv:
            op = o
    image = Path("/x") if op in (Operation.READ, Operation.WRITE, Operation.VERIFY) else None
    layout = "fmap" if "--fmap" in argv else "ifd" if "--ifd" in argv else None
    request = Request(
        Programmer("dummy"),
        op,
        image=image,
        layout_from=layout,
        wp_status="--wp-status" in argv,
        verbose="-V" in argv,
    )
    return parse_output(d["stdout"], d["stderr"], d["returncode"]), request


W25Q128 = Chip("Winbond", "W25Q128.V", 16 << 20, "SPI")


def test_probe_finds_the_chip_and_its_write_protection() -> None:
    report, request = report_of("probe_w25q128")
    assert report.returncode == 0
    assert report.chip == W25Q128
    assert report.wp == WriteProtect(True, "disabled", 0, 0, "none")
    assert not report.wp.locked
    check_report(report, request)


def test_flash_name_and_size() -> None:
    name, _ = report_of("probe_flash_name")
    size, _ = report_of("probe_flash_size")
    assert name.flash_name == ("Winbond", "W25Q128.V")
    assert size.flash_size == 16 << 20


def test_several_definitions_ask_for_chip_with_the_names() -> None:
    report, request = report_of("probe_multiple")
    assert report.returncode == 1
    assert report.candidates == (
        "MX25L6405",
        "MX25L6405D",
        "MX25L6406E/MX25L6408E",
        "MX25L6436E/MX25L6445E/MX25L6465E/MX25L6473E/MX25L6473F",
    )
    assert report.chip is None and len(report.chips) == 4
    with pytest.raises(UsageError) as e:
        check_report(report, request)
    assert "MX25L6405D" in e.value.message and "MX25L6436E/MX25L6445E" in e.value.message
    assert "chip=" in e.value.hint


def test_chip_without_write_protect_support_still_probes() -> None:
    report, request = report_of("probe_wp_unsupported")
    assert report.returncode == 1
    assert report.chip == Chip("SST", "SST25VF032B", 4 << 20, "SPI")
    assert report.wp is not None and not report.wp.supported
    assert "not implemented" in report.wp.detail
    check_report(report, request)  # the chip is there; only its WP status is unknown


def test_locked_write_protection() -> None:
    report, request = report_of("probe_wp_locked")
    wp = report.wp
    assert wp == WriteProtect(True, "hardware", 0, 16 << 20, "all")
    assert wp.locked and wp.blocks(0x1000, 1) and wp.blocks(0, 16 << 20)
    assert not wp.blocks(16 << 20, 1)
    check_report(report, request)


def test_write_protect_overlap_rules() -> None:
    upper = WriteProtect(True, "hardware", 0x800000, 0x800000, "upper 1/2")
    assert not upper.blocks(0, 0x800000)
    assert upper.blocks(0x7FFFFF, 2)
    soft = WriteProtect(True, "disabled", 0, 16 << 20, "all")
    assert soft.overlaps(0, 1) and not soft.blocks(0, 1)  # flashrom lifts it itself
    assert not WriteProtect(False, detail="x").blocks(0, 1)
    assert "0x800000-0xffffff" in upper.describe()


def test_chip_that_does_not_answer_its_id() -> None:
    report, request = report_of("probe_blacklist_rdid")
    assert report.chip is not None and report.chip.is_generic
    with pytest.raises(DeviceError, match="unidentified chip"):
        check_report(report, request)


@pytest.mark.parametrize(
    ("name", "error", "text"),
    [
        ("probe_no_chip", DeviceError, "no flash chip answered"),
        ("probe_unknown_chip", UsageError, "does not know the chip 'NOSUCHCHIP'"),
        ("programmer_unknown", UsageError, "has no programmer 'bogus'"),
        ("programmer_bad_param", UsageError, "parameters 'bogus=1'"),
        ("programmer_bad_emulate", UsageError, "Invalid chip specified for emulation: NOPE"),
        ("read_blacklist", DeviceError, "could not read the chip: Read operation failed!"),
        ("verify_blacklist", DeviceError, "could not verify the chip"),
        ("write_size_mismatch", UsageError, "the image is 16 bytes but the chip holds 16777216"),
        ("erase_wp_locked", DeviceError, "Block protection could not be disabled"),
        ("fmap_missing", DeviceError, "no FMAP on the chip"),
    ],
)
def test_failures_become_unbrick_errors(name: str, error: type[UnbrickError], text: str) -> None:
    report, request = report_of(name)
    with pytest.raises(error) as e:
        check_report(report, request)
    assert type(e.value) is error
    assert text in e.value.message
    assert "\n" not in e.value.one_line()


def test_successes() -> None:
    for name in ("read_ok", "write_verified", "write_region", "verify_ok", "erase_ok"):
        report, request = report_of(name)
        check_report(report, request)
    assert report_of("read_ok")[0].read_done
    assert report_of("write_verified")[0].verified
    assert report_of("erase_ok")[0].write_done


def test_identical_content_is_recognised() -> None:
    report, request = report_of("write_identical")
    assert report.identical and not report.verified
    check_report(report, request)


def test_verify_failure_names_the_address() -> None:
    report, request = report_of("verify_failed")
    f = report.verify_failure
    assert f is not None and report.returncode == 3
    assert (f.offset, f.range_start, f.range_end) == (0, 0, 0xFFFFFF)
    assert f.failed_bytes is not None and f.failed_bytes > 0
    with pytest.raises(VerifyError) as e:
        check_report(report, request)
    assert "FAILED at 0x0" in e.value.message
    assert e.value.ranges == [(0, 16 << 20)]


def test_write_refused_by_write_protection_left_the_chip_unchanged() -> None:
    report, request = report_of("write_wp_locked")
    assert report.write_failed and report.chip_changed is False
    with pytest.raises(DeviceError) as e:
        check_report(report, request)
    assert "the chip was not changed" in e.value.message
    assert "Block protection could not be disabled" in e.value.message


def test_failed_write_that_changed_the_chip() -> None:
    report, request = report_of("write_blacklist")
    assert report.write_failed and report.chip_changed is True
    with pytest.raises(DeviceError) as e:
        check_report(report, request)
    assert "may have changed" in e.value.message
    assert "restore the backup" in e.value.hint


def test_write_whose_verification_failed() -> None:
    report, request = report_of("write_ignorelist")
    assert report.write_done and report.verify_failure is not None
    with pytest.raises(VerifyError) as e:
        check_report(report, request)
    assert "did not take" in e.value.message and "restore the backup" in e.value.hint


def test_layout_entries_from_fmap_and_ifd() -> None:
    fmap, request = report_of("fmap_layout")
    assert fmap.chip == W25Q128  # -V prints the chip twice
    assert fmap.layout == (
        LayoutEntry(0, 0xFFFF, "SI_DESC"),
        LayoutEntry(0x10000, 0x1FFFF, "FMAP"),
        LayoutEntry(0x20000, 0xFFFFFF, "RW"),
    )
    check_report(fmap, request)
    ifd, request = report_of("ifd_layout")
    assert [(e.name, e.start, e.end) for e in ifd.layout] == [
        ("fd", 0, 0xFFF),
        ("bios", 0x400000, 0xFFFFFF),
        ("me", 0x1000, 0x3FFFFF),
    ]
    check_report(ifd, request)


def test_exit_zero_without_the_expected_words_is_not_success() -> None:
    quiet = parse_output('Found Winbond flash chip "W25Q128.V" (16384 kB, SPI) on dummy.\n', "", 0)
    for op in (Operation.READ, Operation.WRITE, Operation.VERIFY, Operation.ERASE):
        request = Request(
            Programmer("dummy"), op, image=None if op is Operation.ERASE else Path("/x")
        )
        with pytest.raises(ToolError, match="exited 0 but"):
            check_report(quiet, request)
    with pytest.raises(ToolError, match="no chip"):
        check_report(parse_output("", "", 0), Request(Programmer("dummy")))


def test_internal_programmer_found_line() -> None:
    text = 'Found Winbond flash chip "W25Q64.V" (8192 kB, SPI) mapped at physical address 0x00000000ff800000.\n'  # noqa: E501
    report = parse_output(text, "", 0)
    assert report.chip == Chip("Winbond", "W25Q64.V", 8 << 20, "SPI")
    forced = parse_output(
        'Assuming SST flash chip "SST49LF008A" (1024 kB, LPC, FWH) on dummy.', "", 0
    )
    assert forced.chip == Chip("SST", "SST49LF008A", 1 << 20, "LPC, FWH", assumed=True)


@pytest.mark.parametrize(
    ("expected", "name", "match"),
    [
        ("W25Q128FV", "W25Q128.V", True),
        ("w25q128jv", "W25Q128.V", True),
        ("W25Q128.V", "W25Q128.V", True),
        ("W25Q64FV", "W25Q128.V", False),
        ("MX25L6436E", "MX25L6436E/MX25L6445E/MX25L6465E", True),
        ("MX25L6445E", "MX25L6436E/MX25L6445E/MX25L6465E", True),
        ("MX25L6405", "MX25L6436E/MX25L6445E/MX25L6465E", False),
        ("SST25VF032B", "SST25VF032B", True),
        ("", "W25Q128.V", False),
    ],
)
def test_chip_matches(expected: str, name: str, match: bool) -> None:
    assert chip_matches(expected, name) is match


_FLASHROM_WORDS = st.sampled_from(
    [
        'Found Winbond flash chip "W25Q128.V" (16384 kB, SPI) on dummy.',
        'Multiple flash chip definitions match the detected chip(s): "A", "B"',
        "Verifying flash... VERIFIED.",
        "FAILED at 0x00123456! Expected=0x00, Found=0xc1, failed byte count from "
        "0x00000000-0x00ffffff: 0x2",
        "Protection range: start=0x00000000 length=0x01000000 (all)",
        "Protection mode: hardware",
        "Added layout entry 00000000 - 0000ffff named X",
        "Adding fmap layout to global layout.",
        "Warning: Chip content is identical to the requested image.",
        "Uh oh. Erase/write failed. Checking if anything has changed.",
        "Good, writing to the flash chip apparently didn't do anything.",
        "Error: Unknown chip 'X' specified.",
        "No EEPROM/flash device found.",
        "Reading flash... done.",
        "12345",
    ]
)


@settings(max_examples=300, deadline=None)
@given(
    out=st.lists(st.one_of(st.text(max_size=80), _FLASHROM_WORDS), max_size=20),
    err=st.lists(st.one_of(st.text(max_size=80), _FLASHROM_WORDS), max_size=10),
    rc=st.integers(-255, 255),
    op=st.sampled_from(list(Operation)),
)
def test_fuzz_output_gives_typed_results_or_unbrick_errors(
    out: list[str], err: list[str], rc: int, op: Operation
) -> None:
    report = parse_output("\n".join(out), "\n".join(err), rc)
    assert isinstance(report, FlashromReport)
    assert all(isinstance(c, Chip) for c in report.chips)
    assert isinstance(report.reason(), str)
    image = None if op in (Operation.PROBE, Operation.ERASE) else Path("/x")
    request = Request(Programmer("dummy"), op, image=image, wp_status=True)
    try:
        check_report(report, request)
    except UnbrickError as e:
        assert e.one_line()
    else:
        # success needs flashrom's own words for it
        if op is Operation.WRITE:
            assert report.verified or report.identical
        elif op is Operation.READ:
            assert report.read_done and rc == 0
        elif op is Operation.VERIFY:
            assert report.verified and rc == 0
        elif op is Operation.ERASE:
            assert report.write_done and rc == 0
        else:
            assert report.chip is not None


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2000))
def test_fuzz_random_bytes(raw: bytes) -> None:
    text = raw.decode("utf-8", "replace")
    report = parse_output(text, text[::-1], 1)
    with pytest.raises(UnbrickError):
        check_report(report, Request(Programmer("dummy"), Operation.READ, image=Path("/x")))


def test_output_too_large_is_a_tool_error() -> None:
    with pytest.raises(ToolError):
        parse_output("x" * (64 * 1024 * 1024 + 1), "", 0)
