"""``kill -9`` of the command line mid-job, then ``unbrick resume``; a device swapped mid-job.

The command line runs in a subprocess (``python -m unbrick``) with its own ``UNBRICK_HOME``; the
simulated router it flashes is either served from this process (so that one device operation
can be held until the kill has landed: the kill point is exact, whatever the machine's load) or
run as ``unbrick sim`` in a subprocess of its own (with a power-on delay long enough to kill
during the reboot).

Why not ``unbrick sim --fault slow=BYTES_PER_S`` to stretch the write: the throttle applies to
the simulator's answers, and while a write sends 256 KiB programs answered by 39-byte frames,
the backup before it receives every byte of the flash. A rate that makes a 200 KB write last
seconds makes the backup (of even just the target) last hours.
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.workflow.conftest import Bench, make_bench
from unbrick.engine.events import ListSink
from unbrick.engine.store import SQLiteStore
from unbrick.engine.vault import BackupVault
from unbrick.engine.workflow import FlashRequest, Workbench
from unbrick.errors import JobError, PreflightError
from unbrick.model.identity import DeviceIdentity
from unbrick.model.profile_toml import ProfileSet, builtin_profile_sources
from unbrick.model.uri import DeviceAddress, parse_device_uri
from unbrick.sim.device import SimDevice
from unbrick.sim.firmware import build_firmware, manifest_for_image
from unbrick.transports.base import Device

NEW = "2.0.0"
FIRMWARE_AT = 0x080000
KILLED = -signal.SIGKILL


# ------------------------------------------------------------------------------ the CLI


def cli_env(home: Path, registry: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(UNBRICK_HOME=str(home), UNBRICK_SIM_DIR=str(registry))
    return env


def unbrick(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "unbrick", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


class EventStream:
    """A running ``unbrick ... --json``: its JSON Lines events, read by a thread."""

    def __init__(self, env: dict[str, str], *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "unbrick", *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.events: list[dict[str, Any]] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def until(self, done: Callable[[list[dict[str, Any]]], bool], timeout_s: float) -> None:
        """Read events until ``done(events)``; fails on timeout or when the command ends."""
        deadline = time.monotonic() + timeout_s
        while not done(self.events):
            left = deadline - time.monotonic()
            try:
                line = self._lines.get(timeout=max(left, 0.0))
            except queue.Empty:
                self.kill()
                pytest.fail(f"timed out; events so far: {[e['name'] for e in self.events]}")
            if line is None:
                err = self.proc.stderr.read() if self.proc.stderr else ""
                pytest.fail(f"the command ended early ({self.proc.wait()}): {err}")
            self.events.append(json.loads(line))

    @property
    def job_id(self) -> str:
        return next(str(e["job"]) for e in self.events if e.get("job"))

    def kill(self) -> int:
        self.proc.send_signal(signal.SIGKILL)
        rc = self.proc.wait(10)
        self._reader.join(10)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()
        return rc


def started(step: str) -> Callable[[list[dict[str, Any]]], bool]:
    return lambda events: any(e["kind"] == "step-start" and e["name"] == step for e in events)


def write_progress(events: list[dict[str, Any]]) -> bool:
    return started("write")(events) and any(
        e["kind"] == "progress" and e["data"]["phase"] == "write" and e["data"]["done"] > 0
        for e in events
    )


def check_journal_after_kill(db: Path, job_id: str, state: str) -> None:
    """The journal survived the kill: it opens cleanly and shows the job interrupted in
    ``state``, with that step begun and never ended."""
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    conn.close()
    store = SQLiteStore(db)
    try:
        job = store.get_job(job_id)
        assert (job.state, job.outcome) == (state, None)
        steps = store.steps(job_id)
        last = steps[-1]
        assert (last.name, last.ended_at, last.result) == (state, None, None)
        assert all(s.ended_at is not None for s in steps[:-1])
    finally:
        store.close()


def resume_and_check(env: dict[str, str], job_id: str, uri: str, then: list[str]) -> None:
    """``unbrick resume`` finishes the job; the device runs the new firmware; the log shows
    the resume step followed by the steps ``then``; resuming the finished job is refused with
    exit 13 and one line."""
    done = unbrick(env, "resume", job_id, "--json")
    assert done.returncode == 0, done.stderr
    result = [json.loads(line) for line in done.stdout.splitlines()][-1]
    assert result["kind"] == "result"
    assert result["data"]["outcome"] == "success"
    assert result["data"]["boot"]["firmware_version"] == NEW

    probe = unbrick(env, "device", "probe", uri, "--json")
    assert probe.returncode == 0, probe.stderr
    assert json.loads(probe.stdout)["identity"]["firmware_version"] == NEW

    log = unbrick(env, "log", job_id, "--json")
    assert log.returncode == 0, log.stderr
    lines = [json.loads(line) for line in log.stdout.splitlines()]
    steps = [x for x in lines if x.get("type") == "step"]
    names = [s["name"] for s in steps]
    assert names.count("resume") == 1
    resume = steps[names.index("resume")]
    assert resume["result"] == "ok" and resume["detail"]["image_unchanged"] is True
    at = names.index("resume")
    assert names[at + 1 :] == then
    for s in steps[at:]:
        assert s["result"] == "ok" and s["started_at"] <= s["ended_at"], s

    again = unbrick(env, "resume", job_id)
    assert again.returncode == JobError.exit_code == 13
    message = again.stderr.strip()
    assert "\n" not in message
    assert message.startswith("unbrick: error: ") and job_id in message


# ------------------------------------------------------------------------------ in-process sim


class Hold:
    """Makes the simulated device stop at the ``nth`` call of one operation (matching
    ``match``) until released; calls before it take ``pause_s`` each."""

    def __init__(
        self,
        monkeypatch: pytest.MonkeyPatch,
        device: SimDevice,
        op: str,
        nth: int,
        *,
        match: Callable[..., bool] = lambda *a: True,
        pause_s: float = 0.0,
    ) -> None:
        self.reached = threading.Event()
        self.release = threading.Event()
        self.calls = 0
        real = getattr(device, op)

        def held(*args: Any) -> Any:
            if match(*args):
                self.calls += 1
                if self.calls < nth:
                    time.sleep(pause_s)
                elif self.calls == nth:
                    self.reached.set()
                    self.release.wait(60)
            return real(*args)

        monkeypatch.setattr(device, op, held)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Bench]:
    b = make_bench(tmp_path, "router", name="bench-router")
    try:
        yield b
    finally:
        b.close()


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["write", "verify"])
def test_kill_9_mid_job_then_resume(
    served: Bench, monkeypatch: pytest.MonkeyPatch, phase: str
) -> None:
    bench = served
    fw = bench.firmware(NEW)
    size = fw.stat().st_size
    env = cli_env(bench.tmp / "home", bench.registry)
    seen: Callable[[list[dict[str, Any]]], bool]
    if phase == "write":
        # 4 KiB transfers: 49 programs; the 30th is held, the ones before take 20 ms each so
        # that progress events (at most one per 0.1 s) are seen first.
        bench.server.max_transfer = 4096
        hold = Hold(monkeypatch, bench.device, "program", 30, pause_s=0.02)
        seen = write_progress
    else:
        # The verification of the written image: one device-side hash over it.
        hold = Hold(
            monkeypatch,
            bench.device,
            "hash",
            1,
            match=lambda offset, length, *a: (offset, length) == (FIRMWARE_AT, size),
        )
        seen = started("verify")
    run = EventStream(env, "flash", bench.uri, str(fw), "--yes", "--json")
    try:
        run.until(seen, timeout_s=60)
        assert hold.reached.wait(30), "the device never reached the held operation"
    finally:
        rc = run.kill()
        hold.release.set()
    assert rc == KILLED
    job_id = run.job_id
    check_journal_after_kill(bench.paths.db_path, job_id, phase)
    assert bench.device.wait_state(("bootloader",), 5) == "bootloader"
    then = ["identity-recheck", "write"] if phase == "write" else []
    resume_and_check(env, job_id, bench.uri, [*then, "verify", "reboot", "validate", "commit"])
    assert bench.device.state == "firmware" and bench.device.firmware_version == NEW
    data = fw.read_bytes()
    assert bench.flash_bytes()[FIRMWARE_AT : FIRMWARE_AT + len(data)] == data


# ------------------------------------------------------------------------------ unbrick sim


@pytest.mark.slow
def test_kill_9_during_reboot_then_resume(tmp_path: Path) -> None:
    registry = tmp_path / "sims"
    env = cli_env(tmp_path / "home", registry)
    fw_bench = tmp_path / "fw"
    fw_bench.mkdir()
    image = build_firmware(
        "SimRouter",
        NEW,
        security_version=1,
        hw_revisions=("B1", "B2"),
        regions=("EU", "US"),
        size_bytes=200_000,
    )
    fw = fw_bench / f"fw-{NEW}.bin"
    fw.write_bytes(image)
    fw.with_name(fw.name + ".manifest.toml").write_text(
        manifest_for_image(image, target="firmware")
    )
    # The device takes 2 s to come back from a reset: the reboot step waits that long.
    sim = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "unbrick",
            "sim",
            "router",
            "--name",
            "lab",
            "--registry",
            str(registry),
            "--state-dir",
            str(tmp_path / "sim-state"),
            "--fault",
            "power-on-delay=2",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert sim.stdout is not None
        assert "listening" in sim.stdout.readline()
        run = EventStream(env, "flash", "sim://lab", str(fw), "--yes", "--json")
        try:
            run.until(started("reboot"), timeout_s=60)
        finally:
            rc = run.kill()
        assert rc == KILLED
        job_id = run.job_id
        check_journal_after_kill(tmp_path / "home" / "data" / "jobs.sqlite3", job_id, "reboot")
        resume_and_check(env, job_id, "sim://lab", ["reboot", "validate", "commit"])
    finally:
        sim.send_signal(signal.SIGTERM)
        try:
            sim.wait(10)
        except subprocess.TimeoutExpired:
            sim.kill()
            sim.wait()
        for pipe in (sim.stdout, sim.stderr):
            if pipe is not None:
                pipe.close()


# ------------------------------------------------------------------------------ device swap


class SwapOnSecondIdentify:
    """A driver whose device is replaced by another between the first ``identify()`` and the
    second: either a second simulated unit (``spare``), or the same one now reporting another
    serial number."""

    def __init__(self, first: Device, spare: Device | None) -> None:
        self._first = first
        self._spare = spare
        self._current = first
        self.identifies = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._current, name)

    def identify(self) -> DeviceIdentity:
        self.identifies += 1
        if self.identifies >= 2 and self._spare is not None:
            self._current = self._spare
        ident: DeviceIdentity = self._current.identify()  # type: ignore[attr-defined]
        if self.identifies >= 2 and self._spare is None:
            ident = dataclasses.replace(ident, serial=ident.serial + "X")
        return ident

    def close(self) -> None:
        self._first.close()
        if self._spare is not None:
            self._spare.close()


@pytest.mark.parametrize("swap", ["another-unit", "other-serial"])
def test_device_swapped_between_backup_and_write_is_refused(tmp_path: Path, swap: str) -> None:
    dut = make_bench(tmp_path / "dut", "router", name="dut")
    spare = make_bench(tmp_path / "spare", "router", name="spare")
    try:
        assert dut.device.config.serial != spare.device.config.serial
        fw = dut.firmware(NEW)
        before = {"dut": dut.flash_bytes(), "spare": spare.flash_bytes()}
        wrappers: list[SwapOnSecondIdentify] = []

        def opener(address: DeviceAddress) -> Device:
            other = spare.open(parse_device_uri(spare.uri)) if swap == "another-unit" else None
            wrapper = SwapOnSecondIdentify(dut.open(address), other)
            wrappers.append(wrapper)
            return wrapper

        sink = ListSink()
        store = SQLiteStore(dut.paths.db_path)
        wb = Workbench(
            store=store,
            vault=BackupVault(dut.paths.vault_dir, dut.paths.key_file),
            profiles=ProfileSet.from_sources(builtin_profile_sources(), []),
            open_device=opener,
            sink=sink,
            workdir=dut.paths.state_dir / "work",
        )
        try:
            with pytest.raises(PreflightError) as caught:
                wb.flash(dut.uri, FlashRequest(image=fw))
            err = caught.value
            assert (err.check_id, err.exit_code) == ("device.identity", 3)
            assert "changed" in err.message
            assert wrappers[0].identifies == 2
            job_id = next(e.job for e in sink.events if e.job)
            job = store.get_job(job_id)
            assert (job.state, job.outcome) == ("failed", "refused")
            steps = [(s.name, s.result) for s in store.steps(job_id)]
            assert ("backup", "ok") in steps
            assert steps[-1] == ("identity-recheck", "failed")
            assert "write" not in [name for name, _ in steps]
        finally:
            store.close()
        # Neither device was written: the one backed up, nor the one swapped in.
        assert spare.flash_bytes() == before["spare"]
        assert dut.flash_bytes() == before["dut"]
        assert (spare.device.state, spare.device.firmware_version) == ("firmware", "1.0.0")
    finally:
        dut.close()
        spare.close()
