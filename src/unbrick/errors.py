"""The one error hierarchy of unbrick.

Every error the library raises on purpose derives from :class:`UnbrickError`. Each class
carries a distinct process exit code (used by the CLI) and a default hint that tells the user
what to do next. The full table lives in ``docs/exit-codes.md``; ``tests/test_errors.py`` keeps
the two in step.
"""

from __future__ import annotations

from typing import ClassVar


class UnbrickError(Exception):
    """Root of every deliberate unbrick error.

    ``message`` says what was wrong; ``hint`` says what to do about it. Both are one line.
    """

    exit_code: ClassVar[int] = 20
    default_hint: ClassVar[str] = ""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint if hint is not None else self.default_hint

    def one_line(self) -> str:
        """The message and hint joined into a single line for a terminal."""
        text = " ".join(self.message.split())
        if self.hint:
            text = f"{text}; {' '.join(self.hint.split())}"
        return text


class InvalidImage(UnbrickError):
    """Not an error raised by parsers: the CLI's exit status for "parsed, but invalid"."""

    exit_code = 1


class UsageError(UnbrickError):
    """The command line or the parameters of a library call were wrong."""

    exit_code = 2
    default_hint = "see --help"


class ImageError(UnbrickError):
    """An image could not be parsed: malformed, truncated or inconsistent structure."""

    exit_code = 8
    default_hint = "the file is damaged or not a firmware image; download it again"

    def __init__(
        self,
        message: str,
        *,
        hint: str | None = None,
        format: str | None = None,
        offset: int | None = None,
    ) -> None:
        super().__init__(message, hint=hint)
        self.format = format
        self.offset = offset


class LimitError(ImageError):
    """A safety limit stopped the work: decompression bomb, nesting depth, path escape."""

    exit_code = 9
    default_hint = "the file is hostile or damaged; raise the limit only for a file you trust"


class IntegrityError(UnbrickError):
    """A checksum did not match, or a requested checksum could not be checked."""

    exit_code = 4
    default_hint = "do not flash this file; download it again from the official source"


class SignatureError(IntegrityError):
    """A signature was bad, missing, or made by a key the user did not give.

    Shares the exit status of IntegrityError: both mean "this file must not be flashed".
    """

    exit_code = 4
    default_hint = "do not flash this file; check that you have the right key and file"


class KeyFileError(UnbrickError):
    """A key, keyring or CA certificate given by the user could not be used."""

    exit_code = 10
    default_hint = "check the key file path and format"


class SourceError(UnbrickError):
    """A file could not be opened, read or written."""

    exit_code = 11
    default_hint = "check the path and its permissions"


class ToolError(UnbrickError):
    """An external program is missing, timed out, or failed in an unexpected way."""

    exit_code = 12
    default_hint = "install the program (see README) or check its output in the log"


class PreflightError(UnbrickError):
    """A named pre-flight check refused the job before anything was written to the device.

    ``check_id`` names the check (see docs/workflow.md); ``overridable`` says whether
    ``--force CHECK_ID --reason TEXT`` may override it.
    """

    exit_code = 3
    default_hint = "nothing was written to the device"

    def __init__(
        self,
        message: str,
        *,
        check_id: str,
        overridable: bool = False,
        hint: str | None = None,
    ) -> None:
        super().__init__(message, hint=hint)
        self.check_id = check_id
        self.overridable = overridable


class DeviceError(UnbrickError):
    """The device failed, went away, or answered something unexpected."""

    exit_code = 5
    default_hint = "check the cable, power and the device's mode, then run 'unbrick resume'"


class TransportError(DeviceError):
    """The link to the device failed (timeout, disconnect, corrupt frames).

    Shares the exit status of DeviceError: both are failures of the device or its link.
    """

    exit_code = 5


class VerifyError(UnbrickError):
    """What was written did not read back (or hash) as the image; ``ranges`` names the bad ones."""

    exit_code = 6
    default_hint = "the write did not take; retry with a slower link or restore the backup"

    def __init__(
        self, message: str, *, ranges: list[tuple[int, int]] | None = None, hint: str | None = None
    ) -> None:
        super().__init__(message, hint=hint)
        self.ranges = list(ranges or [])


class RolledBack(UnbrickError):
    """The job failed after writing and the device was restored to its previous state."""

    exit_code = 7
    default_hint = "the device runs what it ran before; see 'unbrick log' for the failed step"


class JobError(UnbrickError):
    """A job cannot be found, resumed or continued in its current state."""

    exit_code = 13
    default_hint = "see 'unbrick log' for the job's steps"


class InternalError(UnbrickError):
    """A bug in unbrick; never raised for bad input."""

    exit_code = 70
    default_hint = "please report this with the command line you used"


ALL_ERRORS: tuple[type[UnbrickError], ...] = (
    UnbrickError,
    InvalidImage,
    UsageError,
    ImageError,
    LimitError,
    IntegrityError,
    SignatureError,
    KeyFileError,
    SourceError,
    ToolError,
    PreflightError,
    DeviceError,
    TransportError,
    VerifyError,
    RolledBack,
    JobError,
    InternalError,
)
