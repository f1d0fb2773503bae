"""The one wrapper around the ``flashrom`` program.

A :class:`Request` (typed: programmer, operation, files, layout, includes) becomes an argument
list (:func:`build_argv`); :class:`Flashrom` runs it through :mod:`unbrick.tools` with a
timeout sized by the chip (:class:`TimeoutPolicy`), parses the output
(:func:`~unbrick.transports.flashrom.output.parse_output`) and judges it
(:func:`check_report`): success returns the report, anything else raises an unbrick error with
a one-line message quoting flashrom and a hint.

``flashrom://PROGRAMMER?key=value&...`` addresses become a :class:`Programmer`: the query
parameters are the programmer's parameters in the order given
(``flashrom://dummy?emulate=W25Q128FV&image=/tmp/x.bin`` ->
``-p dummy:emulate=W25Q128FV,image=/tmp/x.bin``), except ``chip=NAME`` (flashrom's ``-c NAME``)
and ``expect=PART`` (the chip the user expects; the driver refuses another one).
"""

from __future__ import annotations

import enum
import logging
import re
import subprocess  # only for subprocess.TimeoutExpired, raised through unbrick.tools
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from unbrick.errors import DeviceError, ToolError, UsageError, VerifyError
from unbrick.model.uri import DeviceAddress
from unbrick.tools import Tool, ToolResult
from unbrick.transports.flashrom.output import FlashromReport, parse_output

log = logging.getLogger(__name__)

#: URI query parameters that are not programmer parameters.
RESERVED_PARAMS = ("chip", "expect")
#: Layout sources flashrom reads from the chip itself.
LAYOUT_SOURCES = ("fmap", "ifd")

_NAME = re.compile(r"^[A-Za-z0-9_]{1,64}$")
_REGION = re.compile(r"^[^\s:]{1,256}$")


class Operation(enum.Enum):
    """What one flashrom run does (at most one of ``-r``, ``-w``, ``-v``, ``-E``)."""

    PROBE = "probe"
    READ = "read"
    WRITE = "write"
    VERIFY = "verify"
    ERASE = "erase"


@dataclass(frozen=True)
class Programmer:
    """flashrom's ``-p NAME:key=value,...`` and ``-c CHIP``."""

    name: str
    params: tuple[tuple[str, str], ...] = ()
    #: flashrom's chip definition name for ``-c`` (needed when several definitions match).
    chip: str | None = None

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise UsageError(
                f"'{self.name}' is not a flashrom programmer name",
                hint="use e.g. flashrom://ch341a_spi, flashrom://dummy?emulate=W25Q128FV",
            )
        for key, value in self.params:
            if not _NAME.match(key):
                raise UsageError(f"flashrom programmer parameter name {key!r} is not valid")
            if "," in value or "\n" in value or "\0" in value:
                raise UsageError(
                    f"flashrom programmer parameter {key}={value!r} contains a comma or a "
                    "control character, which flashrom cannot take",
                    hint="rename the file or device so that its path has no comma",
                )
        if self.chip is not None and (not self.chip.strip() or any(c in self.chip for c in "\n\0")):
            raise UsageError(f"chip={self.chip!r} is not a flashrom chip name")

    @classmethod
    def from_address(cls, address: DeviceAddress) -> Programmer:
        """The programmer of a ``flashrom://PROGRAMMER?params`` address."""
        if address.protocol != "flashrom" or not address.name:
            raise UsageError(
                f"{address.uri} is not a flashrom programmer address",
                hint="use flashrom://PROGRAMMER?param=value, e.g. flashrom://ch341a_spi",
            )
        params = tuple((k, v) for k, v in address.params if k not in RESERVED_PARAMS)
        chip = address.param("chip")
        return cls(address.name, params, chip or None)

    @property
    def argument(self) -> str:
        """The value of ``-p``."""
        if not self.params:
            return self.name
        return self.name + ":" + ",".join(f"{k}={v}" for k, v in self.params)

    def param(self, key: str) -> str | None:
        for k, v in self.params:
            if k == key:
                return v
        return None

    def describe(self) -> str:
        return f"flashrom -p {self.argument}" + (f" -c {self.chip}" if self.chip else "")


@dataclass(frozen=True)
class Include:
    """``-i REGION[:FILE]``: one layout region, with the file that holds (or receives) it."""

    region: str
    file: Path | None = None

    def __post_init__(self) -> None:
        if not _REGION.match(self.region):
            raise UsageError(f"{self.region!r} is not a layout region name flashrom can take")

    @property
    def argument(self) -> str:
        return self.region if self.file is None else f"{self.region}:{self.file}"


@dataclass(frozen=True)
class Request:
    """One flashrom run, typed. ``image`` is the file of ``-r``/``-w``/``-v``."""

    programmer: Programmer
    operation: Operation = Operation.PROBE
    image: Path | None = None
    #: ``-l FILE`` (a layout file), or ``layout_from`` = "fmap"/"ifd" (read from the chip).
    layout_file: Path | None = None
    layout_from: str | None = None
    include: tuple[Include, ...] = ()
    wp_status: bool = False
    flash_name: bool = False
    flash_size: bool = False
    #: ``-V``: needed to see the layout entries flashrom read from the chip.
    verbose: bool = False
    #: ``-n``: no verification after writing (never used by the driver).
    noverify: bool = False
    #: ``-o FILE``: flashrom's full debug log.
    log_file: Path | None = None


def build_argv(request: Request) -> list[str]:
    """The argument list for ``request`` (without the program itself)."""
    r = request
    if r.layout_file is not None and r.layout_from is not None:
        raise UsageError("a flashrom run takes one layout: a layout file, fmap or ifd")
    if r.layout_from is not None and r.layout_from not in LAYOUT_SOURCES:
        raise UsageError(f"layout source {r.layout_from!r} is not one of {LAYOUT_SOURCES}")
    if r.include and r.layout_file is None and r.layout_from is None:
        raise UsageError("flashrom regions (-i) need a layout (-l, --fmap or --ifd)")
    needs_image = r.operation in (Operation.READ, Operation.WRITE, Operation.VERIFY)
    if needs_image and r.image is None:
        raise UsageError(f"a flashrom {r.operation.value} needs an image file")
    if not needs_image and r.image is not None:
        raise UsageError(f"a flashrom {r.operation.value} takes no image file")
    if r.noverify and r.operation is not Operation.WRITE:
        raise UsageError("-n (no verification) applies to writes only")
    argv = ["-p", r.programmer.argument]
    if r.programmer.chip:
        argv += ["-c", r.programmer.chip]
    if r.layout_file is not None:
        argv += ["-l", str(r.layout_file)]
    elif r.layout_from is not None:
        argv.append(f"--{r.layout_from}")
    for inc in r.include:
        argv += ["-i", inc.argument]
    if r.verbose:
        argv.append("-V")
    if r.flash_name:
        argv.append("--flash-name")
    if r.flash_size:
        argv.append("--flash-size")
    if r.wp_status:
        argv.append("--wp-status")
    if r.operation is Operation.READ:
        argv += ["-r", str(r.image)]
    elif r.operation is Operation.WRITE:
        argv += ["-w", str(r.image)]
        if r.noverify:
            argv.append("-n")
    elif r.operation is Operation.VERIFY:
        argv += ["-v", str(r.image)]
    elif r.operation is Operation.ERASE:
        argv.append("-E")
    if r.log_file is not None:
        argv += ["-o", str(r.log_file)]
    return argv


@dataclass(frozen=True)
class TimeoutPolicy:
    """How long one flashrom run may take: ``base_s`` plus the chip size at the slowest rate
    expected for the operation. The defaults allow slow USB and serial programmers (a CH341A
    reads about 100 KiB/s; serprog at 115200 baud about 10 KiB/s): raise them for slower ones.
    A write counts its own reading and verification (flashrom reads the chip before and after).
    """

    base_s: float = 60.0
    read_bytes_per_s: float = 16 * 1024
    write_bytes_per_s: float = 4 * 1024
    erase_bytes_per_s: float = 16 * 1024

    def __post_init__(self) -> None:
        rates = (self.read_bytes_per_s, self.write_bytes_per_s, self.erase_bytes_per_s)
        if self.base_s <= 0 or min(rates) <= 0:
            raise UsageError("flashrom timeouts and rates must be positive")

    def seconds(self, operation: Operation, size_bytes: int | None) -> float:
        """Timeout of ``operation`` on a chip of ``size_bytes`` (base only when unknown)."""
        size = max(0, size_bytes or 0)
        rate = {
            Operation.PROBE: 0.0,
            Operation.READ: self.read_bytes_per_s,
            Operation.VERIFY: self.read_bytes_per_s,
            Operation.WRITE: self.write_bytes_per_s,
            Operation.ERASE: self.erase_bytes_per_s,
        }[operation]
        return self.base_s + (size / rate if rate else 0.0)


class ToolRunner(Protocol):
    """What :class:`Flashrom` needs of :class:`unbrick.tools.Tool` (tests pass a fake)."""

    def run(
        self,
        args: Sequence[str],
        *,
        timeout_s: float = 60.0,
        check: bool = True,
        input_bytes: bytes | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
    ) -> ToolResult: ...


#: The flashrom program (Debian package flashrom).
FLASHROM = Tool("flashrom", "flashrom")

_BAD_PARAMETER = re.compile(
    r"(?i)invalid|parameter|unknown|not given|missing|unhandled|not supported|must be"
)


def _what(request: Request) -> str:
    regions = ", ".join(i.region for i in request.include)
    return f"region {regions}" if regions else "the chip"


def check_report(report: FlashromReport, request: Request) -> None:
    """Raise the unbrick error a run's report means for ``request``; return on success.

    A run that exits 0 without saying what the operation requires (``VERIFIED.``, identical
    content, ``Reading flash... done.``...) is a ToolError: nothing is taken as success unless
    flashrom said so.
    """
    prog = request.programmer
    reason = report.reason() or f"it stopped with exit status {report.returncode} and no message"
    if report.unknown_programmer is not None:
        raise UsageError(
            f"flashrom has no programmer '{report.unknown_programmer}'",
            hint="use one flashrom knows (ch341a_spi, ft2232_spi, linux_spi, serprog, dummy, "
            "internal...; flashrom -h lists them)",
        )
    if report.unhandled_params is not None:
        raise UsageError(
            f"flashrom did not accept the parameters '{report.unhandled_params}' of programmer "
            f"'{prog.name}'",
            hint="check the device URI's query parameters against 'man flashrom' "
            f"(section {prog.name})",
        )
    if report.programmer_failed:
        if _BAD_PARAMETER.search(reason):
            raise UsageError(
                f"flashrom could not start programmer '{prog.name}': {reason}",
                hint="check the device URI's query parameters against 'man flashrom'",
            )
        raise DeviceError(
            f"flashrom could not start programmer '{prog.name}': {reason}",
            hint="check that the programmer is plugged in and that you may use it "
            "(root or a udev rule), then retry",
        )
    if report.unknown_chip is not None:
        raise UsageError(
            f"flashrom does not know the chip '{report.unknown_chip}'",
            hint="chip= takes flashrom's name exactly as it prints it (case matters), "
            "e.g. one of the names it lists when it asks for -c; flashrom -L lists all",
        )
    if report.candidates:
        names = ", ".join(report.candidates)
        raise UsageError(
            f"several flash chip definitions match the chip on {prog.name}: {names}",
            hint=f"add chip=NAME to the device URI with the name printed on the chip's "
            f"package, e.g. chip={report.candidates[-1]}",
        )
    if report.no_chip:
        named = f" as {prog.chip}" if prog.chip else ""
        raise DeviceError(
            f"no flash chip answered on programmer '{prog.name}'{named}",
            hint="check the clip or wiring, the chip's supply voltage and the programmer; "
            "with chip=NAME check that it is this chip's name",
        )
    if report.size_mismatch is not None:
        have, want = report.size_mismatch
        raise UsageError(
            f"the image is {have} bytes but the chip holds {want}",
            hint="give an image of exactly the chip's size, or write a region",
        )
    op = request.operation
    if op is Operation.WRITE:
        _check_write(report, request, reason)
    elif op is Operation.READ:
        if report.read_failed or report.returncode != 0:
            raise DeviceError(
                f"flashrom could not read {_what(request)}: {reason}",
                hint="check the clip or wiring and retry; nothing was written",
            )
        if not report.read_done:
            raise ToolError(f"flashrom exited 0 but did not report the read as done: {reason}")
    elif op is Operation.VERIFY:
        if report.verify_failure is not None:
            err = _verify_error(report, f"{_what(request)} differs from the image")
            err.hint = (
                "the chip does not hold this data there; write it again or restore the backup"
            )
            raise err
        if report.returncode != 0:
            raise DeviceError(
                f"flashrom could not verify {_what(request)}: {reason}",
                hint="check the clip or wiring and retry",
            )
        if not report.verified:
            raise ToolError(f"flashrom exited 0 but did not report VERIFIED: {reason}")
    elif op is Operation.ERASE:
        if report.write_failed or report.returncode != 0:
            raise DeviceError(
                f"flashrom could not erase {_what(request)}: {reason}",
                hint="check write protection and the wiring; restore the backup if the chip "
                "was changed",
            )
        if not report.write_done:
            raise ToolError(f"flashrom exited 0 but did not report the erase as done: {reason}")
    else:
        _check_probe(report, request, reason)


def _verify_error(report: FlashromReport, what: str) -> VerifyError:
    f = report.verify_failure
    assert f is not None
    end = f.range_end + 1 if f.range_end is not None and f.range_end >= f.offset else f.offset + 1
    count = ""
    if f.failed_bytes is not None:
        count = f" ({f.failed_bytes} byte{'s' if f.failed_bytes != 1 else ''} differ)"
    return VerifyError(
        f"{what}: flashrom verify FAILED at 0x{f.offset:x} (expected 0x{f.expected:02x}, "
        f"found 0x{f.found:02x}){count}",
        ranges=[(f.offset, end - f.offset)],
    )


def _check_write(report: FlashromReport, request: Request, reason: str) -> None:
    what = _what(request)
    if report.verify_failure is not None:
        err = _verify_error(report, f"the write of {what} did not take")
        err.hint = "the chip holds neither the old nor the new content: restore the backup"
        raise err
    if report.read_failed and not report.write_done and not report.write_failed:
        raise DeviceError(
            f"flashrom could not read the chip before writing {what}: {reason}",
            hint="check the clip or wiring; nothing was written",
        )
    if report.write_failed or report.returncode != 0:
        if report.chip_changed is False:
            raise DeviceError(
                f"flashrom could not write {what}: {reason}; the chip was not changed",
                hint="check write protection (WP pin, status register) and the wiring",
            )
        raise DeviceError(
            f"flashrom failed while writing {what}: {reason}; the chip content may have changed",
            hint="restore the backup before the device is powered on; check the wiring",
        )
    if report.identical or report.verified:
        return
    if request.noverify and report.write_done:
        return
    raise ToolError(f"flashrom exited 0 but did not report the write as verified: {reason}")


def _check_probe(report: FlashromReport, request: Request, reason: str) -> None:
    if request.layout_from is not None and report.layout_error is not None:
        source = "FMAP" if request.layout_from == "fmap" else "Intel flash descriptor"
        raise DeviceError(
            f"flashrom found no {source} on the chip: {report.layout_error}",
            hint="give the region by offset and size instead",
        )
    wp_unsupported = request.wp_status and report.wp is not None and not report.wp.supported
    if report.returncode != 0 and not (wp_unsupported and report.chip is not None):
        raise DeviceError(
            f"flashrom failed on programmer '{request.programmer.name}': {reason}",
            hint="check the programmer, the clip or wiring and retry",
        )
    chip = report.chip
    if chip is None:
        raise ToolError(f"flashrom reported no chip and no error ({reason})")
    if chip.is_generic:
        raise DeviceError(
            f"flashrom found only an unidentified chip ({chip.name}, {chip.size_bytes} bytes) "
            f"on programmer '{request.programmer.name}'",
            hint="the chip did not answer its ID command: check the wiring and power; "
            "or name it with chip=NAME",
        )


@dataclass
class RunStats:
    """Counters of one :class:`Flashrom` (runs and seconds spent per operation)."""

    runs: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, operation: Operation, seconds: float) -> None:
        key = operation.value
        self.runs[key] = self.runs.get(key, 0) + 1
        self.seconds[key] = self.seconds.get(key, 0.0) + seconds


class Flashrom:
    """Runs flashrom requests. ``tool`` replaces the program (tests); ``timeouts`` sizes each
    run's timeout by the chip size passed to :meth:`run`."""

    def __init__(
        self,
        tool: ToolRunner | None = None,
        *,
        timeouts: TimeoutPolicy | None = None,
    ) -> None:
        self.tool: ToolRunner = tool if tool is not None else FLASHROM
        self.timeouts = timeouts or TimeoutPolicy()
        self.stats = RunStats()

    def execute(self, request: Request, *, size_bytes: int | None = None) -> FlashromReport:
        """Run ``request`` and parse what flashrom printed, without judging it.

        A missing program is a ToolError; a run that outlives its timeout is stopped and is a
        DeviceError (the programmer or chip hung).
        """
        argv = build_argv(request)
        timed = request.operation
        if timed is Operation.PROBE and request.layout_from is not None:
            timed = Operation.READ  # flashrom may read the whole chip looking for the layout
        timeout_s = self.timeouts.seconds(timed, size_bytes)
        t0 = time.monotonic()
        try:
            result = self.tool.run(argv, timeout_s=timeout_s, check=False)
        except ToolError as e:
            if isinstance(e.__cause__, subprocess.TimeoutExpired):
                changed = request.operation in (Operation.WRITE, Operation.ERASE)
                raise DeviceError(
                    f"flashrom did not finish the {request.operation.value} of "
                    f"{_what(request)} within {timeout_s:.0f} s and was stopped"
                    + ("; the chip may be partly changed" if changed else ""),
                    hint=(
                        "restore the backup; for a slow programmer allow more time (TimeoutPolicy)"
                        if changed
                        else "check the programmer; for a slow one allow more time"
                    ),
                ) from e
            raise
        elapsed = time.monotonic() - t0
        self.stats.add(request.operation, elapsed)
        report = parse_output(result.out, result.err, result.returncode)
        log.info(
            "flashrom %s: exit %d in %.2f s (%s)",
            request.operation.value,
            result.returncode,
            elapsed,
            " ".join(argv),
        )
        return report

    def run(self, request: Request, *, size_bytes: int | None = None) -> FlashromReport:
        """Run ``request``; return its report when flashrom says it succeeded, else raise
        (see :func:`check_report`)."""
        report = self.execute(request, size_bytes=size_bytes)
        check_report(report, request)
        return report


__all__ = [
    "FLASHROM",
    "LAYOUT_SOURCES",
    "RESERVED_PARAMS",
    "Flashrom",
    "Include",
    "Operation",
    "Programmer",
    "Request",
    "RunStats",
    "TimeoutPolicy",
    "ToolRunner",
    "build_argv",
    "check_report",
]
