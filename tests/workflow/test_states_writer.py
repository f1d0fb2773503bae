"""The job state machine and the range writer/verifier against a fake NOR device."""

from __future__ import annotations

import hashlib
import io

import pytest

from unbrick.engine.events import Event, ListSink, Progress, progress_event
from unbrick.engine.states import TERMINAL, TRANSITIONS, JobState, transition
from unbrick.engine.writer import ImageData, Target, bad_ranges, verify_range, write_range
from unbrick.errors import JobError, UsageError, VerifyError
from unbrick.model.uri import parse_device_uri
from unbrick.transports.base import Capability

pytestmark = pytest.mark.unit
EB = 4096


class FakeNor:
    """NOR semantics: erase to 0xFF per block, program clears bits only."""

    def __init__(self, size: int, *, device_hash: bool = True, stuck: set[int] | None = None):
        self.mem = bytearray(b"\xff" * size)
        self.address = parse_device_uri("sim://fake")
        caps = {Capability.READ, Capability.ERASE, Capability.WRITE}
        if device_hash:
            caps.add(Capability.DEVICE_HASH)
        self.capabilities = frozenset(caps)
        self.max_transfer = 8192
        self.ops: list[tuple[str, int, int]] = []
        #: Byte offsets whose cells never program (a worn cell): verify must catch them.
        self.stuck = stuck or set()
        #: Program only the first half of the next N programs (a flaky link), then behave.
        self.flaky_programs = 0

    def erase(self, offset: int, length: int) -> None:
        assert offset % EB == 0 and length % EB == 0
        self.ops.append(("erase", offset, length))
        self.mem[offset : offset + length] = b"\xff" * length

    def program(self, offset: int, data: bytes) -> None:
        self.ops.append(("program", offset, len(data)))
        n = len(data)
        if self.flaky_programs:
            self.flaky_programs -= 1
            n //= 2
        for i in range(n):
            if offset + i in self.stuck:
                continue
            self.mem[offset + i] &= data[i]

    def read(self, offset: int, length: int) -> bytes:
        return bytes(self.mem[offset : offset + length])

    def device_hash(self, offset: int, length: int, algorithm: str = "sha256") -> str:
        return hashlib.new(algorithm, self.mem[offset : offset + length]).hexdigest()

    def close(self) -> None:
        return None


def image(n: int) -> ImageData:
    data = hashlib.shake_256(b"img").digest(n)
    return ImageData(io.BytesIO(data), n)


def test_forward_path_and_refusals() -> None:
    s = JobState.PLANNED
    for nxt in (
        JobState.PREFLIGHT,
        JobState.BACKUP,
        JobState.WRITE,
        JobState.VERIFY,
        JobState.REBOOT,
        JobState.VALIDATE,
        JobState.COMMIT,
        JobState.DONE,
    ):
        s = transition(s, nxt)
    assert s is JobState.DONE and s.terminal
    with pytest.raises(JobError, match="state 'done' cannot move to 'write'"):
        transition(JobState.DONE, JobState.WRITE)
    with pytest.raises(JobError, match="cannot move to 'refused'"):
        transition(JobState.WRITE, JobState.REFUSED)  # too late to refuse: roll back instead


def test_every_touched_state_can_roll_back_and_terminal_states_stay() -> None:
    for state in JobState:
        if state.device_touched and not state.terminal and state is not JobState.ROLLING_BACK:
            assert JobState.ROLLING_BACK in TRANSITIONS[state]
    for state in TERMINAL - {JobState.UNRECOVERED}:
        assert not TRANSITIONS[state]
    assert not JobState.BACKUP.device_touched and JobState.WRITE.device_touched


def test_write_then_verify_by_device_hash() -> None:
    dev = FakeNor(64 * 1024)
    target = Target("fw", 16384, 20000, EB)
    img = image(20000)
    marks: list[int] = []
    prog = Progress("w", total=20000)
    write_range(dev, target, img, progress=prog, checkpoint=marks.append)
    assert dev.mem[16384 : 16384 + 20000] == img.read(0, 20000)
    assert dev.mem[16384 + 20000 : 16384 + 20480] == b"\xff" * 480  # rest of the last block
    assert dev.mem[:16384] == b"\xff" * 16384  # nothing before the target touched
    assert marks == [8192, 16384, 20000]
    assert prog.fraction == 1.0
    assert verify_range(dev, target, img) == "device-hash"


def test_resume_from_a_checkpoint_writes_only_the_rest() -> None:
    dev = FakeNor(64 * 1024)
    target = Target("fw", 0, 32768, EB)
    img = image(32768)
    write_range(dev, target, img, start_at=16384)
    assert {o for kind, o, _ in dev.ops if kind == "erase"} == {16384, 24576}
    assert bad_ranges(dev, target, img) == [(0, 32768)]  # first half never written
    write_range(dev, target, img)
    assert bad_ranges(dev, target, img) == []


def test_unaligned_offset_is_refused_before_any_write() -> None:
    dev = FakeNor(16384)
    with pytest.raises(UsageError, match="not aligned"):
        write_range(dev, Target("fw", 100, 10, EB), image(10))
    assert dev.ops == []


def test_flaky_write_is_rewritten_once_and_passes() -> None:
    dev = FakeNor(64 * 1024, device_hash=False)
    target = Target("fw", 0, 24576, EB)
    img = image(24576)
    dev.flaky_programs = 1
    write_range(dev, target, img)
    assert bad_ranges(dev, target, img) == [(0, 24576)]
    assert verify_range(dev, target, img) == "read-back"
    assert bytes(dev.mem[:24576]) == img.read(0, 24576)


def test_a_bad_cell_is_reported_by_its_range() -> None:
    dev = FakeNor(1 << 20, stuck={300_000})
    target = Target("fw", 0, 600_000, EB)
    data = bytearray(img_bytes := image(600_000).read(0, 600_000))
    data[300_000] = 0x00  # ensure the stuck cell (left at 0xFF) differs
    img = ImageData(io.BytesIO(bytes(data)), len(data))
    assert img_bytes  # the image itself is fine
    write_range(dev, target, img)
    with pytest.raises(VerifyError) as info:
        verify_range(dev, target, img)
    assert info.value.ranges == [(262144, 262144)]
    assert "0x40000-0x7ffff" in info.value.message


def test_cancellation_stops_at_a_safe_point() -> None:
    dev = FakeNor(64 * 1024)
    calls = iter([False, True])
    with pytest.raises(JobError, match="cancelled at offset 0x2000"):
        write_range(dev, Target("fw", 0, 32768, EB), image(32768), cancelled=lambda: next(calls))


def test_progress_is_weighted_and_never_goes_back() -> None:
    sink = ListSink()
    root = Progress("job", on_change=lambda n: sink.emit(progress_event(n, "J1")), interval_s=0)
    a = root.child("backup", weight=3, total=300)
    b = root.child("write", weight=1, total=100)
    seen = []
    for _ in range(3):
        a.advance(100)
        seen.append(root.fraction)
    with root.phase("extra", weight=0) as _:
        pass
    b.advance(50)
    seen.append(root.fraction)
    b.finish()
    seen.append(root.fraction)
    assert seen == sorted(seen)
    assert seen[2] == pytest.approx(0.75) and seen[-1] == 1.0
    events = [e for e in sink.events if e.kind == "progress"]
    assert events and events[-1].data["fraction"] == 1.0
    assert isinstance(events[0], Event) and events[0].job == "J1"


def test_docs_list_every_check_with_its_override_rule() -> None:
    import re
    from pathlib import Path

    from unbrick.safety.checks import CHECKS

    doc = (Path(__file__).resolve().parents[2] / "docs" / "workflow.md").read_text()
    rows = dict(re.findall(r"^\| `([a-z_.]+)` \|.*\| (yes|no)\b", doc, re.MULTILINE))
    for c in CHECKS:
        assert rows.get(c.id) == ("yes" if c.overridable else "no"), c.id


def test_docs_list_every_capability_with_its_protocol() -> None:
    import re
    from pathlib import Path

    from unbrick.transports import base

    doc = (Path(__file__).resolve().parents[2] / "docs" / "workflow.md").read_text()
    section = doc.split("### Capabilities", 1)[1].split("\n###", 1)[0]
    rows = dict(re.findall(r"^\| `([a-z-]+)` \| `?([A-Za-z-]+)`? \|", section, re.MULTILINE))
    assert set(rows) == {c.value for c in base.Capability}
    for protocol in rows.values():
        assert protocol == "-" or isinstance(getattr(base, protocol, None), type), protocol
