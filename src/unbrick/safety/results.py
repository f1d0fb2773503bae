"""The outcome of one pre-flight check: shared by the workflow's checks
(:mod:`unbrick.safety.checks`) and the drivers that check at open time (block targets), which
do not need the rest of the checks (they load the profile and format machinery)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class CheckResult:
    id: str
    passed: bool
    overridable: bool
    forced: bool
    #: One line: what was expected, what was found, what to do.
    message: str
    detail: Mapping[str, Any] = field(default_factory=dict)
    #: The ``--reason`` of a forced check.
    reason: str | None = None
    #: The error class a failure maps to: PreflightError, IntegrityError or SignatureError.
    error: str = "PreflightError"

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "passed": self.passed,
            "overridable": self.overridable,
            "forced": self.forced,
            "reason": self.reason,
            "message": self.message,
            "detail": dict(self.detail),
        }
