"""Build the Workbench the commands use, from the environment and the command line."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from unbrick.engine.events import EventSink
from unbrick.engine.paths import WorkbenchPaths
from unbrick.engine.store import SQLiteStore
from unbrick.engine.vault import BackupVault
from unbrick.engine.workflow import Workbench
from unbrick.errors import SourceError, UsageError
from unbrick.model.profile_toml import ProfileSet, builtin_profile_sources, load_profile
from unbrick.model.uri import DeviceAddress
from unbrick.ops.images import ReportCache
from unbrick.transports.base import Device
from unbrick.transports.block.group import WriteGroup
from unbrick.transports.registry import OpenOptions, open_device


def paths() -> WorkbenchPaths:
    p = WorkbenchPaths.from_env(os.environ)
    p.ensure()
    return p


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise SourceError(f"{path}: cannot read the profile: {e.strerror}") from e


def profile_set(p: WorkbenchPaths, profile: str | None) -> tuple[ProfileSet, str | None]:
    """Built-in profiles, the user's (config dir ``profiles/*.toml``), and ``--profile``.

    ``--profile`` is a profile id or a TOML file; returns the set and the id to force.
    """
    user: list[tuple[str, bytes]] = []
    user_dir = p.config_dir / "profiles"
    if user_dir.is_dir():
        user.extend((str(f), _read(f)) for f in sorted(user_dir.glob("*.toml")))
    chosen: str | None = None
    if profile is not None:
        candidate = Path(profile)
        if candidate.suffix == ".toml" or candidate.is_file():
            if not candidate.is_file():
                raise UsageError(f"profile file {profile} does not exist")
            data = _read(candidate)
            chosen = load_profile(data, str(candidate)).id
            user.append((str(candidate), data))
        else:
            chosen = profile
    profiles = ProfileSet.from_sources(builtin_profile_sources(), user)
    if chosen is not None:
        profiles.get(chosen)  # UsageError listing the known ids when unknown
    return profiles, chosen


@contextmanager
def workbench(
    sink: EventSink,
    profile: str | None = None,
    forced: Mapping[str, str] | None = None,
    block_group: WriteGroup | None = None,
    image_reports: ReportCache | None = None,
) -> Iterator[tuple[Workbench, str | None]]:
    """``forced``: overridable checks drivers make as they open (``block.removable``);
    ``block_group``: block targets of one command that share one read of the image;
    ``image_reports``: the image checks shared by the jobs of one command."""
    p = paths()
    profiles, chosen = profile_set(p, profile)
    store = SQLiteStore(p.db_path)
    vault = BackupVault(p.vault_dir, p.key_file)
    sim_registry = os.environ.get("UNBRICK_SIM_DIR")
    options = OpenOptions(
        sim_registry=Path(sim_registry) if sim_registry else None,
        forced=dict(forced or {}),
        block_group=block_group,
    )

    def opener(address: DeviceAddress) -> Device:
        return open_device(address, options)

    wb = Workbench(
        store=store,
        vault=vault,
        profiles=profiles,
        open_device=opener,
        sink=sink,
        workdir=p.state_dir / "work",
        image_reports=image_reports,
    )
    try:
        yield wb, chosen
    finally:
        store.close()
