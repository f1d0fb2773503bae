"""The one wrapper through which unbrick runs external programs.

Argument lists only (never a shell string), a timeout on every run, output captured, and
failures translated into :class:`~unbrick.errors.ToolError`. Callers that need to interpret a
non-zero exit status themselves pass ``check=False``. Tests replace :data:`Runner` instances
to fake a program.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from unbrick.errors import ToolError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ToolResult:
    argv: tuple[str, ...]
    returncode: int
    stdout: bytes
    stderr: bytes

    @property
    def out(self) -> str:
        return self.stdout.decode("utf-8", "replace")

    @property
    def err(self) -> str:
        return self.stderr.decode("utf-8", "replace")


@dataclass(frozen=True)
class Tool:
    """An external program, found on PATH or at a given path, with a Debian package to hint."""

    name: str
    package: str = ""

    def path(self) -> str:
        found = shutil.which(self.name)
        if found is None:
            pkg = f" (Debian package {self.package})" if self.package else ""
            raise ToolError(
                f"program '{self.name}' is not installed",
                hint=f"install it{pkg}, e.g. with ./scripts/install-deps as root",
            )
        return found

    def available(self) -> bool:
        return shutil.which(self.name) is not None

    def run(
        self,
        args: Sequence[str],
        *,
        timeout_s: float = 60.0,
        check: bool = True,
        input_bytes: bytes | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
    ) -> ToolResult:
        """Run the program with ``args``; raise ToolError on timeout or (with check) failure."""
        argv = (self.path(), *args)
        log.debug("running %s", argv)
        try:
            proc = subprocess.run(
                argv,
                input=input_bytes,
                capture_output=True,
                timeout=timeout_s,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                check=False,
            )
        except subprocess.TimeoutExpired as e:
            raise ToolError(f"'{self.name}' did not finish within {timeout_s:g} s") from e
        except OSError as e:
            raise ToolError(f"'{self.name}' could not be started: {e.strerror}") from e
        result = ToolResult(argv, proc.returncode, proc.stdout, proc.stderr)
        if check and proc.returncode != 0:
            last = (result.err.strip() or result.out.strip()).splitlines()
            detail = last[-1] if last else "no output"
            raise ToolError(f"'{self.name}' failed with exit status {proc.returncode}: {detail}")
        return result
