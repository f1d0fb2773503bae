"""The error hierarchy: distinct exit codes, all documented, one-line messages."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from unbrick.errors import ALL_ERRORS, ImageError, UnbrickError

DOC = Path(__file__).resolve().parents[1] / "docs" / "exit-codes.md"


def test_exit_codes_are_distinct_except_for_documented_subclasses() -> None:
    for a in ALL_ERRORS:
        for b in ALL_ERRORS:
            if a is not b and a.exit_code == b.exit_code:
                assert issubclass(a, b) or issubclass(b, a), (a.__name__, b.__name__)


def test_workflow_exit_codes() -> None:
    from unbrick import errors

    assert errors.PreflightError.exit_code == 3
    assert errors.IntegrityError.exit_code == errors.SignatureError.exit_code == 4
    assert errors.DeviceError.exit_code == errors.TransportError.exit_code == 5
    assert errors.VerifyError.exit_code == 6
    assert errors.RolledBack.exit_code == 7


def test_every_error_class_is_documented_with_its_code() -> None:
    table = {
        m.group(2): int(m.group(1))  # one row per class
        for m in re.finditer(r"^\|\s*(\d+)\s*\|\s*`(\w+)`", DOC.read_text(), re.MULTILINE)
    }
    for cls in ALL_ERRORS:
        assert table.get(cls.__name__) == cls.exit_code, cls.__name__


@pytest.mark.parametrize("cls", ALL_ERRORS)
def test_every_error_derives_from_the_root(cls: type[UnbrickError]) -> None:
    assert issubclass(cls, UnbrickError)


def test_one_line_joins_message_and_hint_without_newlines() -> None:
    err = ImageError("header\ntruncated", hint="download it\nagain", offset=4)
    assert err.one_line() == "header truncated; download it again"
    assert err.offset == 4
