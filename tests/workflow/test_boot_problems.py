"""What makes a first boot good: patterns, the version (asked, or read in the boot log)."""

from __future__ import annotations

import pytest

from unbrick.engine.workflow import boot_problems
from unbrick.model.profile import Profile
from unbrick.model.profile_toml import builtin_profile_sources, load_profile
from unbrick.transports.base import BootReport

pytestmark = pytest.mark.unit


def _profile(pid: str = "sim-router") -> Profile:
    sources = dict(builtin_profile_sources())
    return load_profile(sources[f"builtin:{pid}.toml"], source=pid)


def test_the_boot_log_tells_the_version_when_the_link_cannot() -> None:
    log = "## Booting kernel from Legacy Image\nSimRouter firmware 2.1.0 booted\n\nlogin: "
    report = BootReport(log=log, state="firmware")
    assert boot_problems(_profile(), report, "2.1.0", None) == []
    assert boot_problems(_profile(), report, "2.2.0", None) == [
        "the device runs version '2.1.0', expected '2.2.0'"
    ]
    # A version the link reports wins over the log.
    asked = BootReport(log=log, state="firmware", firmware_version="2.2.0")
    assert boot_problems(_profile(), asked, "2.2.0", None) == []


def test_a_log_without_the_version_or_with_a_failure_is_not_a_good_boot() -> None:
    report = BootReport(log="Verifying Checksum ... Bad Data CRC\n", state="bootloader")
    problems = boot_problems(_profile(), report, "2.1.0", None)
    assert problems == [
        "the device did not boot its firmware (state 'bootloader')",
        "boot log shows 'Bad Data CRC'",
        "boot log lacks the success pattern /firmware .* booted/",
        "the device runs version None, expected '2.1.0'",
    ]
