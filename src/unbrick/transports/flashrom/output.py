"""Pure parsers of what the ``flashrom`` program prints, and of its exit status.

:func:`parse_output` takes one run's stdout, stderr and exit status and returns a
:class:`FlashromReport`: every fact the run stated (chips found, the several definitions that
matched, ``VERIFIED.``, ``FAILED at 0x...``, "Chip content is identical to the requested image",
whether a failed write changed the chip, write-protect status, layout entries of ``--fmap`` and
``--ifd``, ``--flash-name``/``--flash-size``). It never raises for any text: what it does not
recognise is kept as error lines. Deciding what a report means for an operation (success, or
which unbrick error) is :func:`unbrick.transports.flashrom.runner.check_report`.

The formats are those of flashrom 1.3 (``cli_classic.c``, ``flashrom.c``, ``layout.c``,
``fmap.c``, ``ich_descriptors.c``, ``writeprotect.c``), observed with its dummy programmer.
Nothing here does I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from unbrick.errors import ToolError

#: Longest output a parser looks at (a ``-VVV`` log of a large chip stays far below this).
MAX_OUTPUT_CHARS = 64 * 1024 * 1024

#: Protection modes flashrom 1.3 reports with ``--wp-status``.
WP_MODES = ("disabled", "hardware", "power_cycle", "permanent")


@dataclass(frozen=True)
class Chip:
    """One ``Found VENDOR flash chip "NAME" (N kB, BUS) on PROGRAMMER.`` line."""

    vendor: str
    #: flashrom's chip definition name, e.g. "W25Q128.V" ("." stands for any one character).
    name: str
    size_bytes: int
    #: "SPI", "Parallel", "LPC, FWH", "Programmer-specific"...
    bus: str
    #: True for ``Assuming ...`` (flashrom was forced with ``-f``, the chip was not probed).
    assumed: bool = False

    @property
    def is_generic(self) -> bool:
        """flashrom's placeholder for a chip it could not identify (``unknown SPI chip``)."""
        return self.size_bytes == 0 or self.name.lower().startswith("unknown ")


@dataclass(frozen=True)
class WriteProtect:
    """What ``--wp-status`` reported (or that the chip has no write-protect support)."""

    supported: bool
    #: One of :data:`WP_MODES`, or None when not reported.
    mode: str | None = None
    start: int = 0
    length: int = 0
    #: flashrom's description of the range: "none", "all", "upper 1/2"...
    label: str = ""
    #: Why the status is unknown (flashrom's message) when ``supported`` is False.
    detail: str = ""

    @property
    def end(self) -> int:
        """First byte after the protected range."""
        return self.start + self.length

    def overlaps(self, offset: int, length: int) -> bool:
        """True when the protected range covers any byte of ``offset``..``offset+length``."""
        return self.length > 0 and length > 0 and offset < self.end and self.start < offset + length

    @property
    def locked(self) -> bool:
        """True when flashrom cannot lift the protection itself: the status register is
        locked (hardware pin active, until power cycle, or permanently). In mode "disabled"
        flashrom clears the block-protect bits before it erases."""
        return self.mode is not None and self.mode != "disabled"

    def blocks(self, offset: int, length: int) -> bool:
        """True when a write of ``offset``..``offset+length`` would be refused by the chip."""
        return self.locked and self.overlaps(offset, length)

    def describe(self) -> str:
        if not self.supported:
            return f"unknown ({self.detail})" if self.detail else "unknown"
        span = (f"0x{self.start:x}-0x{self.end - 1:x}" if self.length else "no range") + (
            f" ({self.label})" if self.label else ""
        )
        return f"mode {self.mode or 'unknown'}, {span}"


@dataclass(frozen=True)
class VerifyFailure:
    """``FAILED at 0x00123456! Expected=0x00, Found=0xc1, failed byte count from
    0x00000000-0x00ffffff: 0x2``."""

    offset: int
    expected: int
    found: int
    #: The span flashrom compared (inclusive end) and how many bytes in it differ.
    range_start: int | None = None
    range_end: int | None = None
    failed_bytes: int | None = None


@dataclass(frozen=True)
class LayoutEntry:
    """``Added layout entry 00010000 - 0001ffff named FMAP`` (``end`` is inclusive)."""

    start: int
    end: int
    name: str

    @property
    def size_bytes(self) -> int:
        return self.end - self.start + 1


@dataclass(frozen=True)
class FlashromReport:
    """Everything one flashrom run stated. Booleans are "the run printed it"."""

    returncode: int
    chips: tuple[Chip, ...] = ()
    #: Names listed after "Multiple flash chip definitions match the detected chip(s)".
    candidates: tuple[str, ...] = ()
    #: "No EEPROM/flash device found."
    no_chip: bool = False
    #: The ``-c`` name flashrom did not know ("Error: Unknown chip 'X' specified.").
    unknown_chip: str | None = None
    #: The programmer could not be started (unknown name, bad parameter, device absent).
    programmer_failed: bool = False
    #: Programmer parameters flashrom did not understand ("Unhandled programmer parameters").
    unhandled_params: str | None = None
    unknown_programmer: str | None = None
    #: "Verifying flash... VERIFIED."
    verified: bool = False
    verify_failure: VerifyFailure | None = None
    #: "Chip content is identical to the requested image." (nothing was erased or written)
    identical: bool = False
    #: "Erase/write done." (also printed by ``-E``)
    write_done: bool = False
    #: A write or erase failed ("FAILED!", "Erase/write failed", "Failed to erase flash!").
    write_failed: bool = False
    #: After a failed write: False for "writing to the flash chip apparently didn't do
    #: anything", True when flashrom says data changed or the chip is in an unknown state,
    #: None when it said neither.
    chip_changed: bool | None = None
    #: "Reading flash... done."
    read_done: bool = False
    #: "Reading flash... FAILED." / "Read operation failed!" / "Reading old flash chip
    #: contents... FAILED."
    read_failed: bool = False
    #: "Image size (N B) doesn't match the expected size (M B)!" as (N, M).
    size_mismatch: tuple[int, int] | None = None
    wp: WriteProtect | None = None
    #: Layout entries read from the chip by ``--fmap``/``--ifd`` (needs ``-V``).
    layout: tuple[LayoutEntry, ...] = ()
    #: Why ``--fmap``/``--ifd`` gave no layout ("Failed to read fmap from ROM."...).
    layout_error: str | None = None
    #: ``--flash-name``: (vendor, name).
    flash_name: tuple[str, str] | None = None
    #: ``--flash-size``: bytes.
    flash_size: int | None = None
    #: Lines that report an error, in the order printed (stderr first), boilerplate removed.
    errors: tuple[str, ...] = ()

    @property
    def chip(self) -> Chip | None:
        """The chip, when exactly one was found (None for none or several)."""
        return self.chips[0] if len(self.chips) == 1 else None

    def reason(self) -> str:
        """The most telling error line, for a one-line message ("" when there is none)."""
        for line in self.errors:
            if _GENERIC.match(line) is None:
                return line
        return self.errors[0] if self.errors else ""


# ---------------------------------------------------------------------------------------------
# Line patterns

_FOUND = re.compile(
    r"^(Found|Assuming) (.+?) flash chip \"(.*)\" \((\d+) kB, ([^)]*)\)"
    r"(?: mapped at physical address 0x[0-9a-fA-F]+| on [^\s.]+)?\.?\s*$"
)
_MULTIPLE = re.compile(r"^Multiple flash chip definitions match the detected chip\(s\): (.*)$")
_QUOTED = re.compile(r"\"([^\"]*)\"")
_UNKNOWN_CHIP = re.compile(r"^Error: Unknown chip '(.*)' specified\.")
_UNKNOWN_PROGRAMMER = re.compile(r"^Error: Unknown programmer \"(.*)\"")
_UNHANDLED = re.compile(r"^Unhandled programmer parameters(?: \([^)]*\))?: (.*)$")
_FAILED_AT = re.compile(
    r"FAILED at 0x([0-9a-fA-F]{1,16})! Expected=0x([0-9a-fA-F]{1,2}), Found=0x([0-9a-fA-F]{1,2})"
    r"(?:, failed byte count from 0x([0-9a-fA-F]{1,16})-0x([0-9a-fA-F]{1,16}): "
    r"0x([0-9a-fA-F]{1,16}))?"
)
_WP_RANGE = re.compile(
    r"^Protection range: start=0x([0-9a-fA-F]{1,16}) length=0x([0-9a-fA-F]{1,16})"
    r"(?: \((.*)\))?\s*$"
)
_WP_MODE = re.compile(r"^Protection mode: (\S+)\s*$")
_WP_FAILED = re.compile(r"^Failed to get WP status: (.*)$")
_LAYOUT_ENTRY = re.compile(
    r"^Added layout entry ([0-9a-fA-F]{1,16}) - ([0-9a-fA-F]{1,16}) named (.*)$"
)
#: Lines after which the layout entries are the chip's own (fmap or descriptor).
_LAYOUT_MARK = re.compile(
    r"^(?:Adding fmap layout to global layout\.|Reading ich descriptor\.\.\. done\.)"
)
_LAYOUT_ERROR = re.compile(
    r"^(Failed to read fmap from ROM\.|Couldn't parse the descriptor!"
    r"|Unable to find fmap in provided buffer\.|Failed to read fmap from file.*"
    r"|Error while reading ROM layout.*)$"
)
_FLASH_NAME = re.compile(r"^vendor=\"(.*)\" name=\"(.*)\"\s*$")
_FLASH_SIZE = re.compile(r"^(\d{1,20})\s*$")
_SIZE_MISMATCH = re.compile(
    r"Image size \((\d{1,20}) B\) doesn't match the expected size \((\d{1,20}) B\)"
)

#: Lines that state an error (besides everything on stderr).
_ERROR_HINT = re.compile(
    r"(?:^Error\b|\bFAILED\b|\bfailed\b|\bFailed\b|^No EEPROM/flash device found"
    r"|^Read operation failed|\bwrite protected\b|could not be disabled|\bunknown state\b"
    r"|^Invalid |^Unhandled |^Couldn't |^Unable |^Cannot |^Can't |doesn't match)"
)
#: flashrom's boilerplate around errors: never the reason worth showing.
_BOILERPLATE = re.compile(
    r"^(?:Please report this|on IRC \(see|Please run \"flashrom --help\"|Run flashrom -L"
    r"|Note: flashrom can never write|Please check the connections|Good, writing to the flash"
    r"|Uh oh\. Erase/write failed\. Checking|Looking for another erase function|Thanks for"
    r"|DO NOT REBOOT OR POWEROFF|Your flash chip is in an unknown state|Apparently at least"
    r"|mailing list|flashrom@flashrom\.org|please report this|the programmer and the flash chip"
    r"|https://www\.flashrom\.org"
    # the list of programmer names after "Unknown programmer"
    r"|[a-z0-9_]+(?:, [a-z0-9_]+)*[,.]$)"
)
#: Error lines that say little on their own (a more specific one is preferred).
_GENERIC = re.compile(
    r"^(?:FAILED!?|Error: Programmer initialization failed\.|Aborting\."
    r"|Failed to erase flash!|Erasing and writing flash chip\.\.\. FAILED!?"
    r"|Verifying flash\.\.\. FAILED!?|Reading flash\.\.\. FAILED\.?"
    r"|Read operation failed!|Uh oh.*|.*failed during command execution.*)$"
)


def _int(text: str | None, base: int = 16) -> int | None:
    return int(text, base) if text is not None else None


def _lines(text: str) -> list[str]:
    return [line.rstrip("\r").strip() for line in text.split("\n")]


def _candidates(text: str) -> tuple[str, ...]:
    names = _QUOTED.findall(text)
    if names:
        return tuple(names)
    return tuple(part.strip().strip('"') for part in text.split(",") if part.strip())


def parse_output(stdout: str, stderr: str, returncode: int) -> FlashromReport:
    """Parse one flashrom run. Never raises for any text, except :class:`ToolError` for output
    beyond :data:`MAX_OUTPUT_CHARS`."""
    if len(stdout) + len(stderr) > MAX_OUTPUT_CHARS:
        raise ToolError(
            f"flashrom printed {len(stdout) + len(stderr)} characters; too much to parse",
            hint="run it by hand with the same arguments and read its output",
        )
    out_lines = _lines(stdout)
    err_lines = _lines(stderr)

    chips: list[Chip] = []
    candidates: tuple[str, ...] = ()
    no_chip = programmer_failed = verified = identical = write_done = False
    write_failed = read_done = read_failed = False
    chip_changed: bool | None = None
    unknown_chip = unknown_programmer = unhandled = layout_error = None
    verify_failure: VerifyFailure | None = None
    size_mismatch: tuple[int, int] | None = None
    wp_mode: str | None = None
    wp_range: tuple[int, int, str] | None = None
    wp_failed: str | None = None
    entries: list[LayoutEntry] = []
    flash_name: tuple[str, str] | None = None
    flash_size: int | None = None
    errors: list[str] = []
    seen_errors: set[str] = set()

    for index, line in enumerate(err_lines + out_lines):
        if not line:
            continue
        on_stderr = index < len(err_lines)
        if m := _FOUND.match(line):
            found = Chip(m.group(2), m.group(3), int(m.group(4)) * 1024, m.group(5),
                         assumed=m.group(1) == "Assuming")  # fmt: skip
            if found not in chips:  # -V repeats the chip in a summary line
                chips.append(found)
            continue
        if m := _MULTIPLE.match(line):
            candidates = _candidates(m.group(1))
        elif line.startswith("No EEPROM/flash device found"):
            no_chip = True
        elif m := _UNKNOWN_CHIP.match(line):
            unknown_chip = m.group(1)
        elif m := _UNKNOWN_PROGRAMMER.match(line):
            unknown_programmer = m.group(1)
            programmer_failed = True
        elif m := _UNHANDLED.match(line):
            unhandled = m.group(1).strip()
        elif "Programmer initialization failed" in line:
            programmer_failed = True
        if m := _FAILED_AT.search(line):
            verify_failure = VerifyFailure(
                offset=int(m.group(1), 16),
                expected=int(m.group(2), 16),
                found=int(m.group(3), 16),
                range_start=_int(m.group(4)),
                range_end=_int(m.group(5)),
                failed_bytes=_int(m.group(6)),
            )
        if "VERIFIED." in line and line.startswith("Verifying flash..."):
            verified = True
        if "Chip content is identical to the requested image" in line:
            identical = True
        if "Erase/write done." in line:
            write_done = True
        if (
            "Erase/write failed" in line
            or line in ("FAILED!", "FAILED")
            or line.startswith("Failed to erase flash")
            or line.endswith("Erasing and writing flash chip... FAILED!")
        ):
            write_failed = True
        if "writing to the flash chip apparently didn't do anything" in line:
            chip_changed = False if chip_changed is None else chip_changed
        if (
            "Apparently at least some data has changed" in line
            or "Your flash chip is in an unknown state" in line
        ):
            chip_changed = True
        if line.startswith("Reading flash...") and line.endswith("done."):
            read_done = True
        if (
            (line.startswith("Reading flash...") and "FAILED" in line)
            or line.startswith("Read operation failed")
            or (line.startswith("Reading old flash chip contents...") and "FAILED" in line)
        ):
            read_failed = True
        if m := _SIZE_MISMATCH.search(line):
            size_mismatch = (int(m.group(1)), int(m.group(2)))
        if m := _WP_RANGE.match(line):
            wp_range = (int(m.group(1), 16), int(m.group(2), 16), (m.group(3) or "").strip())
        elif m := _WP_MODE.match(line):
            wp_mode = m.group(1)
        elif m := _WP_FAILED.match(line):
            wp_failed = m.group(1).strip()
        if m := _LAYOUT_ENTRY.match(line):
            entries.append(LayoutEntry(int(m.group(1), 16), int(m.group(2), 16), m.group(3)))
        elif _LAYOUT_MARK.match(line):
            entries.clear()  # what came before was flashrom's default "complete flash" entry
        elif m := _LAYOUT_ERROR.match(line):
            layout_error = layout_error or m.group(1)
        if m := _FLASH_NAME.match(line):
            flash_name = (m.group(1), m.group(2))
        elif (m := _FLASH_SIZE.match(line)) and chips:
            flash_size = int(m.group(1))
        if (
            (on_stderr or _ERROR_HINT.search(line) is not None)
            and _BOILERPLATE.match(line) is None
            and line not in seen_errors
        ):
            seen_errors.add(line)
            errors.append(line)

    wp: WriteProtect | None = None
    if wp_range is not None or wp_mode is not None:
        start, length, label = wp_range if wp_range is not None else (0, 0, "")
        wp = WriteProtect(True, wp_mode, start, length, label)
    elif wp_failed is not None:
        wp = WriteProtect(False, detail=wp_failed)

    layout: tuple[LayoutEntry, ...] = ()
    if entries and not (len(entries) == 1 and entries[0].name == "complete flash"):
        layout = tuple(entries)
    return FlashromReport(
        returncode=returncode,
        chips=tuple(chips),
        candidates=candidates,
        no_chip=no_chip,
        unknown_chip=unknown_chip,
        programmer_failed=programmer_failed,
        unhandled_params=unhandled,
        unknown_programmer=unknown_programmer,
        verified=verified,
        verify_failure=verify_failure,
        identical=identical,
        write_done=write_done,
        write_failed=write_failed,
        chip_changed=chip_changed,
        read_done=read_done,
        read_failed=read_failed,
        size_mismatch=size_mismatch,
        wp=wp,
        layout=layout,
        layout_error=layout_error,
        flash_name=flash_name,
        flash_size=flash_size,
        errors=tuple(errors),
    )


def chip_matches(expected: str, name: str) -> bool:
    """True when ``expected`` (a part number such as "W25Q128FV", or flashrom's own name)
    names the chip flashrom calls ``name``. flashrom names may list alternatives
    ("MX25L6436E/MX25L6445E") and use "." for any one character ("W25Q128.V"); case is
    ignored."""
    want = expected.strip().upper()
    have = name.strip().upper()
    if not want or not have:
        return False
    if want == have:
        return True
    for alternative in have.split("/"):
        alt = alternative.strip()
        if not alt:
            continue
        pattern = "".join("." if ch == "." else re.escape(ch) for ch in alt)
        if re.fullmatch(pattern, want) is not None:
            return True
    return False


__all__ = [
    "MAX_OUTPUT_CHARS",
    "WP_MODES",
    "Chip",
    "FlashromReport",
    "LayoutEntry",
    "VerifyFailure",
    "WriteProtect",
    "chip_matches",
    "parse_output",
]
