"""Shared test helpers.

``need(program)``: a test that needs a real peer program. Missing peer: the test fails when the
``CI`` environment variable is set (CI must run every cross-check) and skips otherwise.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest


def need(*programs: str) -> None:
    for program in programs:
        if shutil.which(program) is None:
            msg = f"peer program '{program}' is not installed (run ./scripts/install-deps)"
            if os.environ.get("CI"):
                pytest.fail(msg)
            pytest.skip(msg)


def run(argv: Sequence[str | Path], **kw: Any) -> subprocess.CompletedProcess[bytes]:
    """Run a peer program, failing the test with its output when it fails."""
    proc = subprocess.run(
        [str(a) for a in argv], capture_output=True, timeout=300, check=False, **kw
    )
    if proc.returncode != 0:
        pytest.fail(
            f"{argv[0]} exited {proc.returncode}:\n{proc.stdout.decode(errors='replace')}"
            f"\n{proc.stderr.decode(errors='replace')}"
        )
    return proc
