"""Where the workbench keeps its files.

``$UNBRICK_HOME`` (when set and not empty) holds everything: ``data/``, ``config/`` and
``state/``. Otherwise the XDG base directories are used: ``$XDG_DATA_HOME/unbrick``
(``~/.local/share/unbrick``), ``$XDG_CONFIG_HOME/unbrick`` (``~/.config/unbrick``) and
``$XDG_STATE_HOME/unbrick`` (``~/.local/state/unbrick``); an XDG variable that is not an
absolute path is ignored, as the specification says.

The job journal and the backup vault live in the data directory (they are records worth
keeping), the vault key in the config directory: never beside the data it encrypts, so a copy
of the data directory alone reveals nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from unbrick.errors import SourceError, UsageError

APP = "unbrick"


@dataclass(frozen=True)
class WorkbenchPaths:
    data_dir: Path
    config_dir: Path
    state_dir: Path
    db_path: Path
    vault_dir: Path
    key_file: Path

    @classmethod
    def under(cls, data_dir: Path, config_dir: Path, state_dir: Path) -> WorkbenchPaths:
        return cls(
            data_dir=data_dir,
            config_dir=config_dir,
            state_dir=state_dir,
            db_path=data_dir / "jobs.sqlite3",
            vault_dir=data_dir / "vault",
            key_file=config_dir / "vault.key",
        )

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> WorkbenchPaths:
        """The paths for this environment (pure: reads ``env`` only, creates nothing)."""
        home_override = env.get("UNBRICK_HOME", "")
        if home_override:
            root = Path(home_override)
            return cls.under(root / "data", root / "config", root / "state")

        def base(var: str, default: tuple[str, ...]) -> Path:
            value = env.get(var, "")
            if value and Path(value).is_absolute():
                return Path(value)
            home = env.get("HOME", "")
            if not home:
                raise UsageError(
                    f"cannot find the home directory: HOME is not set (and neither is {var})",
                    hint="set UNBRICK_HOME to the directory unbrick should use",
                )
            return Path(home).joinpath(*default)

        return cls.under(
            base("XDG_DATA_HOME", (".local", "share")) / APP,
            base("XDG_CONFIG_HOME", (".config",)) / APP,
            base("XDG_STATE_HOME", (".local", "state")) / APP,
        )

    def ensure(self) -> WorkbenchPaths:
        """Create the directories (mode 0700 for those created here); returns ``self``."""
        for directory in (self.data_dir, self.config_dir, self.state_dir, self.vault_dir):
            if directory.is_dir():
                continue
            try:
                missing = [directory, *(p for p in directory.parents if not p.exists())]
                directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            except OSError as e:
                raise SourceError(f"{directory}: cannot create the directory: {e.strerror}") from e
            for created in missing:
                # mkdir's mode is reduced by the umask; the intermediate ones too.
                with contextlib.suppress(OSError):
                    created.chmod(0o700)
        return self


__all__ = ["WorkbenchPaths"]
