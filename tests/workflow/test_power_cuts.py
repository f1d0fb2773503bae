"""Power cuts injected at many points of a flash, on simulated routers over loopback.

A/B router: wherever the power is lost, the device boots a complete slot (the old firmware or
the new one, never a half-written one). Single-slot router: a cut mid-write leaves it soft-bricked;
``Workbench.resume`` finishes the job, and ``Workbench.restore`` of the job's backup brings the
old firmware back.

Cut points are "the Nth flash operation (erase or program) of the flash", with N ranging over the
operations a clean flash performs (counted once per link transfer size, with the simulator's op
counter). Smaller transfers split the write into more program operations, so varying the
transfer size multiplies the distinct places a cut can strike. Every point starts from the
factory flash contents (restored block by block through the SPI face, then a power cycle) and
runs a fresh job.
"""

from __future__ import annotations

import itertools
import random
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.workflow.conftest import Bench, make_bench
from unbrick.engine.events import Event, ListSink
from unbrick.engine.store import JobStore, MemoryStore, SQLiteStore
from unbrick.engine.vault import BackupVault
from unbrick.engine.workflow import FlashRequest, JobResult, Workbench
from unbrick.engine.writer import VERIFY_RANGE
from unbrick.errors import DeviceError, UnbrickError
from unbrick.model.profile_toml import ProfileSet, builtin_profile_sources
from unbrick.model.uri import DeviceAddress
from unbrick.sim.device import Faults, SimDevice
from unbrick.transports.base import Device
from unbrick.transports.sim import SimDriver, open_sim

KIB = 1024
OLD, NEW = "1.0.0", "2.0.0"
SEED = 0x5EED_C0DE
SETTLED = ("firmware", "bootloader", "dead")


# ------------------------------------------------------------------------------ helpers


class OpMarks:
    """An event sink that notes the device's flash-op count when each step starts, so that a
    cut point (op number) can be named by the step it strikes in."""

    def __init__(self, device: SimDevice) -> None:
        self.device = device
        self.base = 0
        self.marks: list[tuple[int, str]] = []

    def start(self) -> None:
        self.base = self.device.flash.ops
        self.marks.clear()

    def emit(self, event: Event) -> None:
        if event.kind == "step-start":
            self.marks.append((self.device.flash.ops - self.base, event.name))

    def step_of(self, op: int) -> str:
        """The step during which op number ``op`` (1-based) ran."""
        name = "?"
        for done, step in self.marks:
            if done < op:
                name = step
        return name


class Fanout:
    def __init__(self, *sinks: Any) -> None:
        self.sinks = sinks

    def emit(self, event: Event) -> None:
        for sink in self.sinks:
            sink.emit(event)


class ArmAt:
    """An event sink that sets the device's faults when a named step starts.

    Armed at the backup, after the device was reset into recovery: a cut then keeps the device
    off (a long power-on delay) until the test powers it on, whatever the machine's load, so the
    driver's own retry can never ride the cut out and every job is really interrupted.
    """

    def __init__(self, device: SimDevice) -> None:
        self.device = device
        self.pending: tuple[str, Faults] | None = None

    def arm(self, step: str, faults: Faults) -> None:
        self.pending = (step, faults)

    def emit(self, event: Event) -> None:
        if self.pending is not None and event.kind == "step-start":
            step, faults = self.pending
            if event.name == step:
                self.device.set_faults(faults)
                self.pending = None


class Factory:
    """The factory flash contents of a bench's device, and a way back to them."""

    def __init__(self, bench: Bench) -> None:
        self.bench = bench
        self.image = bench.flash_bytes()
        self.security_version = bench.device.config.security_version

    def restore(self) -> None:
        """Rewrite the erase blocks that differ from the factory image, then power-cycle."""
        dev = self.bench.device
        dev.set_faults(Faults(power_on_delay_s=0.0))
        if dev.state == "off":
            dev.power_on()
        dev.wait_state(SETTLED, 10.0)
        eb = dev.flash.geometry.erase_block_bytes
        for off in range(0, len(self.image), eb):
            want = self.image[off : off + eb]
            if dev.spi_read(off, eb) != want:
                dev.spi_erase(off, eb)
                dev.spi_program(off, want)
                assert dev.spi_read(off, eb) == want
        # A committed image may raise the anti-rollback counter; the ones used here do not.
        assert dev.config.security_version == self.security_version
        dev.reset()
        assert dev.wait_state(SETTLED, 10.0) == "firmware"
        assert dev.firmware_version == OLD

    def region(self, s: slice) -> bytes:
        return self.image[s]


def settle(dev: SimDevice) -> tuple[str, str | None]:
    """Let the device power back on (if a cut left it off) and report what it booted."""
    state = dev.wait_state(SETTLED, 10.0)
    return state, dev.firmware_version


def power_on_now(dev: SimDevice) -> tuple[str, str | None]:
    """Power a device that a cut left off (see ``ArmAt``) back on; what did it boot?"""
    assert dev.state == "off"
    dev.set_faults(Faults(power_on_delay_s=0.0))
    dev.power_on()
    return settle(dev)


def power_cycle(dev: SimDevice) -> tuple[str, str | None]:
    dev.reset()
    return settle(dev)


def make_workbench(
    bench: Bench,
    store: JobStore,
    sink: Any,
    *,
    connect_wait_s: float = 1.0,
    wrap: Callable[[SimDriver], Device] | None = None,
) -> Workbench:
    def opener(address: DeviceAddress) -> Device:
        driver = open_sim(
            address, registry_dir=bench.registry, timeout_s=5.0, connect_wait_s=connect_wait_s
        )
        return wrap(driver) if wrap is not None else driver

    return Workbench(
        store=store,
        vault=BackupVault(bench.paths.vault_dir, bench.paths.key_file),
        profiles=ProfileSet.from_sources(builtin_profile_sources(), []),
        open_device=opener,
        sink=sink,
        workdir=bench.paths.state_dir / "work",
    )


def flash_or_error(wb: Workbench, bench: Bench, request: FlashRequest) -> JobResult | UnbrickError:
    try:
        return wb.flash(bench.uri, request)
    except UnbrickError as e:
        return e


def count_ops(
    bench: Bench, factory: Factory, wb: Workbench, marks: OpMarks, request: FlashRequest
) -> int:
    """Flash operations of one clean flash at the server's current transfer size."""
    factory.restore()
    marks.start()
    result = wb.flash(bench.uri, request)
    assert result.outcome == "success"
    assert bench.device.firmware_version == NEW
    return bench.device.flash.ops - marks.base


def pick_points(points: list[tuple[int, int]], k: int, rng: random.Random) -> list[tuple[int, int]]:
    """``k`` cut points, distinct as long as there are enough of them."""
    if len(points) >= k:
        return rng.sample(points, k)
    return points + [rng.choice(points) for _ in range(k - len(points))]


@pytest.fixture
def ab_bench(tmp_path: Path) -> Iterator[Bench]:
    b = make_bench(tmp_path, "router-ab")
    try:
        yield b
    finally:
        b.close()


@pytest.fixture
def router(tmp_path: Path) -> Iterator[Bench]:
    b = make_bench(tmp_path, "router")
    try:
        yield b
    finally:
        b.close()


# ------------------------------------------------------------------------------ A/B


AB_CHUNKS = (2 * KIB, 4 * KIB, 8 * KIB, 16 * KIB, 32 * KIB, 64 * KIB, 256 * KIB)
AB_POINTS = 200


@pytest.mark.slow
def test_ab_power_cut_anywhere_boots_a_complete_slot(ab_bench: Bench) -> None:
    bench = ab_bench
    dev = bench.device
    fw = bench.firmware(NEW)
    factory = Factory(bench)
    marks = OpMarks(dev)
    sink = ListSink()
    wb = make_workbench(bench, MemoryStore(), Fanout(marks, sink))
    # Only what is written is backed up: a 200 KB image makes a quick job.
    request = FlashRequest(image=fw, backup_scope="target")
    # Bootloader, calibration and the active slot a: never written by an A/B update.
    untouched = ((0x000000, 0x040000), (0x060000, 0x010000), (0x080000, 0x380000))

    steps_at: dict[int, list[str]] = {}
    for chunk in AB_CHUNKS:
        bench.server.max_transfer = chunk
        total = count_ops(bench, factory, wb, marks, request)
        steps_at[chunk] = [marks.step_of(n) for n in range(1, total + 1)]
    every = [(c, n) for c, names in steps_at.items() for n in range(1, len(names) + 1)]
    rng = random.Random(SEED)
    chosen = pick_points(every, AB_POINTS, rng)

    hit_steps: Counter[str] = Counter()
    outcomes: Counter[str] = Counter()
    versions: Counter[str] = Counter()
    resumed = 0
    failures: list[str] = []
    for i, (chunk, n) in enumerate(chosen):
        factory.restore()
        bench.server.max_transfer = chunk
        delay = rng.choice((0.0, 0.01, 0.02))
        bench.set_faults(Faults(power_cut_after_ops=n, power_on_delay_s=delay))
        got = flash_or_error(wb, bench, request)
        where = f"cut at op {n} of {len(steps_at[chunk])} ({steps_at[chunk][n - 1]}), "
        where += f"transfer {chunk} B, power-on delay {delay} s"
        outcome = got.outcome if isinstance(got, JobResult) else type(got).__name__
        outcomes[outcome] += 1
        hit_steps[steps_at[chunk][n - 1]] += 1
        if dev.flash.power_cut_armed:
            failures.append(f"{where}: the cut never struck ({outcome})")
            continue
        after_cut = settle(dev)
        after_cycle = power_cycle(dev)
        versions[str(after_cycle[1])] += 1
        problems = []
        for label, (state, version) in (
            ("after the cut", after_cut),
            ("power-cycled", after_cycle),
        ):
            if state != "firmware" or version not in (OLD, NEW):
                problems.append(f"{label}: state {state!r}, version {version!r}")
        if isinstance(got, JobResult) and after_cycle[1] != NEW:
            problems.append(f"the job succeeded but the device runs {after_cycle[1]!r}")
        if any(dev.spi_read(o, k) != factory.image[o : o + k] for o, k in untouched):
            problems.append("the bootloader, calibration or the old slot changed")
        if not isinstance(got, JobResult) and i % 8 == 0 and not problems:
            # Some of the interrupted jobs are resumed: they end on the new firmware.
            resumed += 1
            try:
                again = wb.resume(last_job(sink))
                if again.outcome != "success" or power_cycle(dev) != ("firmware", NEW):
                    problems.append(f"resume ended {again.outcome}, device {settle(dev)}")
            except UnbrickError as e:
                problems.append(f"resume raised {e!r}")
        if problems:
            failures.append(f"{where} ({outcome}): " + "; ".join(problems))

    distinct = len(set(chosen))
    print(
        f"\nA/B power cuts: {len(chosen)} runs, {distinct} distinct points of {len(every)}; "
        f"steps hit {dict(hit_steps)}; outcomes {dict(outcomes)}; booted {dict(versions)}; "
        f"{resumed} interrupted jobs resumed"
    )
    assert not failures, f"{len(failures)} of {len(chosen)} cut points failed:\n" + "\n".join(
        failures[:20]
    )
    assert distinct >= 150
    # Every phase that touches the flash was cut at least once.
    assert {"write", "set-trial-slot", "reboot", "commit"} <= set(hit_steps)


@pytest.mark.parametrize("phase", ["backup", "write", "set-trial-slot", "commit"])
def test_an_interrupted_ab_job_names_itself_and_resumes(ab_bench: Bench, phase: str) -> None:
    """Whatever step a cut interrupts, the error names the job and says to resume it, the
    interruption is journaled, and ``resume`` then finishes the job."""
    bench = ab_bench
    dev = bench.device
    fw = bench.firmware(NEW)
    factory = Factory(bench)
    sink = ListSink()
    armer = ArmAt(dev)
    cutter = CutOnRead(dev)
    request = FlashRequest(image=fw, backup_scope="target")
    if phase == "backup":
        # The device loses power between two backup reads and is back within the driver's
        # reconnect wait (the usual case): it booted its firmware, out of recovery mode.
        wb = make_workbench(bench, MemoryStore(), sink, wrap=cutter)
        factory.restore()
        dev.set_faults(Faults(power_on_delay_s=0.05))
        cutter.at_read = 1
    else:
        wb = make_workbench(bench, MemoryStore(), Fanout(sink, armer), connect_wait_s=0.0)
        factory.restore()
        # The first flash operation of the step loses power; the device stays off until
        # powered on below (armed when the step starts, so earlier resets are not slowed).
        armer.arm(phase, Faults(power_cut_after_ops=1, power_on_delay_s=OFF_S))
    got = flash_or_error(wb, bench, request)
    assert isinstance(got, DeviceError), repr(got)
    assert armer.pending is None and not dev.flash.power_cut_armed
    job_id = last_job(sink)
    job = wb.store.get_job(job_id)
    assert job.outcome is None
    if dev.state == "off":
        power_on_now(dev)
    # A/B: the old slot runs, or the new one as a trial once the trial was set.
    assert settle(dev) == ("firmware", NEW if phase == "commit" else OLD)

    result = wb.resume(job_id)
    assert result.outcome == "success"
    assert settle(dev) == ("firmware", NEW)
    assert power_cycle(dev) == ("firmware", NEW)
    assert dev.boot_state().active_slot == "b"

    assert job_id in got.message, got.one_line()
    assert f"unbrick resume {job_id}" in got.hint
    assert any(
        e.job == job_id and e.kind == "state" and "interrupted" in e.data for e in sink.events
    )


# ------------------------------------------------------------------------------ single slot


#: The single-slot image is bigger than the A/B one so that ``resume`` has something to skip:
#: it re-checks the device per 256 KiB range and continues at the first one that differs.
SINGLE_BYTES = 600_000
SINGLE_CHUNKS = (16 * KIB, 32 * KIB, 64 * KIB, 256 * KIB)
FIRMWARE_AT = 0x080000
#: Power-on delay after an armed cut: the device stays off until the test powers it on.
OFF_S = 30.0


@dataclass
class CutOnRead:
    """Wraps the driver of the next job opened: its ``at_read``-th flash read is preceded by a
    power cut (the device loses power, links drop, it boots again by itself)."""

    device: SimDevice
    at_read: int | None = None
    reads: int = 0
    log: list[str] = field(default_factory=list)

    def __call__(self, driver: SimDriver) -> Device:
        at, self.at_read = self.at_read, None
        if at is None:
            return driver
        return _ReadCounter(driver, self, at)


class _ReadCounter:
    def __init__(self, inner: SimDriver, owner: CutOnRead, at: int) -> None:
        self._inner = inner
        self._owner = owner
        self._left = at

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def read(self, offset: int, length: int) -> bytes:
        self._owner.reads += 1
        self._left -= 1
        if self._left == 0:
            self._owner.log.append(f"power cut before the read at 0x{offset:x}")
            self._owner.device.reset()
        return self._inner.read(offset, length)


def last_job(sink: ListSink) -> str:
    """The id of the last flash job the sink saw planned."""
    return next(e.job for e in reversed(sink.events) if (e.kind, e.name) == ("state", "planned"))


def check_journal(wb: Workbench, sink: ListSink, job_id: str) -> None:
    """Every step that ran (as the event stream saw it) is journaled, begun before it ended,
    in order, none overlapping the next."""
    steps = wb.store.steps(job_id)
    ran = [
        e.name
        for e in sink.events
        if e.job == job_id and e.kind == "step-start" and e.name != "backup-read"
    ]
    assert [s.name for s in steps] == ran
    for s in steps:
        assert s.ended_at is not None and s.result in ("ok", "failed"), s
        assert s.started_at <= s.ended_at, s
    for before, after in itertools.pairwise(steps):
        assert before.id < after.id
        assert before.ended_at is not None and before.ended_at <= after.started_at


def resume_after(
    wb: Workbench, bench: Bench, sink: ListSink, job_id: str, fw: bytes, factory: Factory
) -> dict[str, Any]:
    """Resume ``job_id`` and check the device runs the new firmware; returns the resume step's
    detail."""
    result = wb.resume(job_id)
    assert result.outcome == "success"
    assert result.boot is not None and result.boot.firmware_version == NEW
    assert settle(bench.device) == ("firmware", NEW)
    job = wb.store.get_job(job_id)
    assert (job.state, job.outcome) == ("done", "success")
    image = bench.flash_bytes()
    erase_end = FIRMWARE_AT + -(-len(fw) // 0x10000) * 0x10000
    assert image[:FIRMWARE_AT] == factory.image[:FIRMWARE_AT]
    assert image[FIRMWARE_AT : FIRMWARE_AT + len(fw)] == fw
    assert image[erase_end:] == factory.image[erase_end:]
    check_journal(wb, sink, job_id)
    names = [s.name for s in wb.store.steps(job_id)]
    assert names.count("resume") == 1
    after = names[names.index("resume") :]
    assert after[-5:] == ["write", "verify", "reboot", "validate", "commit"]
    step = next(s for s in wb.store.steps(job_id) if s.name == "resume")
    assert step.detail["image_unchanged"] is True
    return step.detail


@pytest.mark.slow
def test_single_slot_power_cut_then_resume_finishes_the_job(router: Bench) -> None:
    bench = router
    dev = bench.device
    fw_path = bench.firmware(NEW, size_bytes=SINGLE_BYTES)
    fw = fw_path.read_bytes()
    factory = Factory(bench)
    marks = OpMarks(dev)
    sink = ListSink()
    armer = ArmAt(dev)
    cutter = CutOnRead(dev)
    # connect_wait_s=0: the driver's retry does not wait for the device to come back.
    wb = make_workbench(
        bench,
        SQLiteStore(bench.paths.db_path),
        Fanout(marks, sink, armer),
        connect_wait_s=0.0,
        wrap=cutter,
    )
    request = FlashRequest(image=fw_path, backup_scope="target")

    total = {}
    for chunk in SINGLE_CHUNKS:
        bench.server.max_transfer = chunk
        total[chunk] = count_ops(bench, factory, wb, marks, request)
        assert {marks.step_of(n) for n in range(1, total[chunk] + 1)} == {"write"}
    rng = random.Random(SEED + 1)
    every = [(c, n) for c, t in total.items() for n in range(1, t + 1)]
    chosen = pick_points(every, 60, rng)

    resumed_at: list[int] = []
    for chunk, n in chosen:
        factory.restore()
        bench.server.max_transfer = chunk
        armer.arm("backup", Faults(power_cut_after_ops=n, power_on_delay_s=OFF_S))
        got = flash_or_error(wb, bench, request)
        where = f"cut at write op {n} of {total[chunk]}, transfer {chunk} B"
        assert not dev.flash.power_cut_armed, where
        assert isinstance(got, DeviceError), f"{where}: {got!r}"
        job_id = last_job(sink)
        job = wb.store.get_job(job_id)
        assert (job.state, job.outcome) == ("write", None), where
        assert job.data.get("backup_id"), where
        # The cut left a half-written firmware: the device stops in its bootloader.
        assert power_on_now(dev) == ("bootloader", None), where
        checkpoint = wb.store.checkpoints(job_id).get("write", {}).get("pos", 0)
        detail = resume_after(wb, bench, sink, job_id, fw, factory)
        at = detail["continue_write_at"]
        # Resume never skips a range it did not finish, and redoes at most one verify range.
        assert (checkpoint // VERIFY_RANGE) * VERIFY_RANGE <= at <= checkpoint, (where, at)
        resumed_at.append(at)

    # The device back within the driver's reconnect wait: the retried (addressed, idempotent)
    # operation lands on a device that stopped in its bootloader, and the write goes on.
    patient = make_workbench(bench, wb.store, sink, connect_wait_s=1.0)
    ridden = 0
    for chunk, n in pick_points(every, 8, rng):
        factory.restore()
        bench.server.max_transfer = chunk
        bench.set_faults(Faults(power_cut_after_ops=n, power_on_delay_s=0.0))
        got = flash_or_error(patient, bench, request)
        where = f"cut at write op {n} of {total[chunk]}, transfer {chunk} B, quick power-on"
        assert not dev.flash.power_cut_armed, where
        if isinstance(got, JobResult):
            ridden += 1
            assert got.outcome == "success", where
            assert settle(dev) == ("firmware", NEW), where
            check_journal(patient, sink, got.job_id)
        else:
            # The machine was too slow for the retry: an ordinary interrupted job.
            assert isinstance(got, DeviceError), f"{where}: {got!r}"
            resume_after(patient, bench, sink, last_job(sink), fw, factory)
        assert bench.flash_bytes()[FIRMWARE_AT : FIRMWARE_AT + len(fw)] == fw, where

    # Cuts before the backup was stored: no backup id in the job; resume takes it again.
    bench.server.max_transfer = 16 * KIB
    reads_per_backup = -(-SINGLE_BYTES // 0x10000) * 0x10000 // (16 * KIB)
    early = rng.sample(range(1, reads_per_backup + 1), 10)
    for k in early:
        factory.restore()
        armer.arm("backup", Faults(power_on_delay_s=OFF_S))
        cutter.at_read = k
        got = flash_or_error(wb, bench, request)
        where = f"power cut before backup read {k} of {reads_per_backup}"
        assert cutter.reads >= k, where
        cutter.reads = 0
        assert isinstance(got, DeviceError), f"{where}: {got!r}"
        job_id = last_job(sink)
        job = wb.store.get_job(job_id)
        assert (job.state, job.outcome) == ("backup", None), where
        assert "backup_id" not in job.data, where
        # Nothing was written: the device boots its old firmware.
        assert power_on_now(dev) == ("firmware", OLD), where
        assert bench.flash_bytes() == factory.image, where
        resume_after(wb, bench, sink, job_id, fw, factory)
        assert wb.store.get_job(job_id).data.get("backup_id")

    print(
        f"\nsingle-slot resume: {len(chosen)} write cuts ({len(set(chosen))} distinct of "
        f"{len(every)}), resumed at offsets {sorted(Counter(resumed_at).items())}; "
        f"{len(early)} cuts during the backup; {ridden} of 8 cuts ridden out by the retry"
    )
    assert len(set(chosen)) >= 50
    # Late cuts resume past the start: the finished ranges are not written again.
    assert max(resumed_at) >= VERIFY_RANGE


@pytest.mark.slow
def test_single_slot_power_cut_then_restore_brings_the_old_firmware_back(router: Bench) -> None:
    bench = router
    dev = bench.device
    fw_path = bench.firmware(NEW, size_bytes=SINGLE_BYTES)
    factory = Factory(bench)
    marks = OpMarks(dev)
    sink = ListSink()
    armer = ArmAt(dev)
    wb = make_workbench(
        bench, SQLiteStore(bench.paths.db_path), Fanout(marks, sink, armer), connect_wait_s=0.0
    )
    # A whole-flash backup: what an operator restores after a failed update.
    request = FlashRequest(image=fw_path)

    total = {}
    for chunk in SINGLE_CHUNKS:
        bench.server.max_transfer = chunk
        total[chunk] = count_ops(bench, factory, wb, marks, request)
    rng = random.Random(SEED + 2)
    every = [(c, n) for c, t in total.items() for n in range(1, t + 1)]
    chosen = pick_points(every, 20, rng)

    for chunk, n in chosen:
        factory.restore()
        bench.server.max_transfer = chunk
        armer.arm("backup", Faults(power_cut_after_ops=n, power_on_delay_s=OFF_S))
        got = flash_or_error(wb, bench, request)
        where = f"cut at write op {n} of {total[chunk]}, transfer {chunk} B"
        assert not dev.flash.power_cut_armed, where
        assert isinstance(got, DeviceError), f"{where}: {got!r}"
        job_id = last_job(sink)
        assert wb.store.get_job(job_id).state == "write", where
        backup_id = wb.store.get_job(job_id).data["backup_id"]
        assert power_on_now(dev) == ("bootloader", None), where
        restored = wb.restore(bench.uri, backup_id)
        assert restored.outcome == "success", where
        assert restored.boot is not None and restored.boot.firmware_version == OLD, where
        assert settle(dev) == ("firmware", OLD), where
        assert bench.flash_bytes() == factory.image, where
        assert power_cycle(dev) == ("firmware", OLD), where
        check_journal(wb, sink, restored.job_id)
        # The interrupted flash job is left as it was: resumable, not silently closed.
        assert wb.store.get_job(job_id).outcome is None

    print(f"\nsingle-slot restore: {len(chosen)} cut points, {len(set(chosen))} distinct")
