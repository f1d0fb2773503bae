"""The repair log: JSON Lines and a Markdown report from the journal."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from unbrick.engine.events import Event
from unbrick.engine.replog import RepairLog, format_duration, summary_line
from unbrick.engine.store import JobRecord, JobStore, MemoryStore, SQLiteStore

T0 = 1_767_225_600.0  # 2026-01-01 00:00:00 UTC


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        self.now += 7.5
        return self.now


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[JobStore]:
    s: JobStore = (
        MemoryStore(clock=Clock())
        if request.param == "memory"
        else SQLiteStore(tmp_path / "j.sqlite3", clock=Clock())
    )
    yield s
    s.close()


def new_job(store: JobStore, **kw: object) -> JobRecord:
    kw.setdefault("options", {"forced": {"battery.level": "on a bench supply | checked"}})
    job = JobRecord.new(
        "flash",
        device_uri="uboot+serial:///dev/ttyUSB0?baud=115200",
        device_identity={
            "model": "Archer C7",
            "serial": "SN-77",
            "hw_revision": "v5",
            "firmware_version": "1.0.3",
        },
        image={
            "path": "/fw/openwrt.bin",
            "name": "openwrt.bin",
            "version": "23.05.3",
            "sha256": "c0ffee" + "0" * 58,
            "size": 8_000_000,
        },
        operator="bob",
        now_s=T0,
        **kw,  # type: ignore[arg-type]
    )
    store.create_job(job)
    return job


def rolled_back_job(store: JobStore) -> str:
    job = new_job(store)
    s = store.begin_step(job.id, "preflight", {"checks": 7})
    store.end_step(s, result="ok", detail={"passed": 7}, error=None)
    s = store.begin_step(job.id, "backup", {"scope": "full"})
    store.end_step(s, result="ok", detail={"backup_id": "ab" * 32}, error=None)
    store.update_job(job.id, state="backup", data={"backup_id": "ab" * 32})
    s = store.begin_step(job.id, "write", {"region": "firmware", "offset": 0x50000})
    store.add_event(job.id, Event("log", "console", at=T0 + 30, data={"line": "SF: erasing"}))
    store.add_event(
        job.id,
        Event("log", "console", at=T0 + 31, data={"line": "SF: 65536 bytes @ 0x50000 Written: OK"}),
    )
    store.add_event(
        job.id,
        Event(
            "log", "warning", at=T0 + 32, data={"level": "warning", "message": "slow link: 9 KiB/s"}
        ),
    )
    store.end_step(
        s,
        result="failed",
        detail={"written": 65536},
        error="the device stopped answering at 0x60000",
    )
    s = store.begin_step(job.id, "restore", {"backup": "ab" * 32})
    store.end_step(s, result="ok", detail={}, error=None)
    store.update_job(job.id, state="rolled-back", outcome="rolled_back")
    return job.id


def test_jsonl_parses_line_by_line(store: JobStore) -> None:
    job_id = rolled_back_job(store)
    text = RepairLog.from_store(store, job_id).to_jsonl()
    assert text.endswith("\n")
    lines = [json.loads(line) for line in text.splitlines()]
    assert [line["type"] for line in lines] == (
        ["header"] + ["step"] * 4 + ["event"] * 3 + ["footer"]
    )
    header, footer = lines[0], lines[-1]
    assert header["format"] == "unbrick-repair-log" and header["job"] == job_id
    assert header["operator"] == "bob" and header["device"]["serial"] == "SN-77"
    assert header["image"]["version"] == "23.05.3"
    assert header["forced"] == [{"check": "battery.level", "reason": "on a bench supply | checked"}]
    steps = lines[1:5]
    assert [s["name"] for s in steps] == ["preflight", "backup", "write", "restore"]
    assert steps[2]["result"] == "failed" and "stopped answering" in steps[2]["error"]
    assert all(s["duration_s"] == 7.5 for s in steps)
    assert lines[5]["data"] == {"line": "SF: erasing"}
    assert footer["outcome"] == "rolled_back" and footer["failed_steps"] == ["write"]
    assert footer["warnings"] == ["slow link: 9 KiB/s"]
    assert footer["duration_s"] == pytest.approx(footer["ended_at"] - T0)
    assert footer["duration_s"] > 0


def test_markdown_report_of_a_rolled_back_job(store: JobStore) -> None:
    job_id = rolled_back_job(store)
    log = RepairLog.from_store(store, job_id)
    md = log.to_markdown()
    first = md.splitlines()[0]
    assert first == "# Repair report: Archer C7 (serial SN-77) — rolled_back"
    assert "| Operator | bob |" in md
    assert "| Started | 2026-01-01 00:00:00Z |" in md
    assert "openwrt.bin 23.05.3" in md and "c0ffee" in md
    assert "| Hardware revision | v5 |" in md
    # Steps as a table, in order, with durations and results.
    rows = [r for r in md.splitlines() if r.startswith("| ") and r[2].isdigit()]
    assert [r.split(" | ")[1] for r in rows] == ["preflight", "backup", "write", "restore"]
    assert "| 7.50 s | failed | the device stopped answering at 0x60000 |" in rows[2]
    # Forced check with its reason; the pipe in it does not break the table.
    assert "`battery.level`: on a bench supply | checked" in md
    # Advice names the failed step and the backup.
    advice = md.split("## Next step", 1)[1].split("##", 1)[0]
    assert "restored to its previous firmware" in advice and "'write'" in advice
    assert "'unbrick restore uboot+serial:///dev/ttyUSB0?baud=115200 abababababab'" in advice
    # Excerpts in a code block; warnings listed apart.
    assert "```text\nSF: erasing\nSF: 65536 bytes @ 0x50000 Written: OK\n```" in md
    assert "## Warnings\n\n- slow link: 9 KiB/s" in md
    assert log.duration_s is not None and format_duration(log.duration_s) in md


def test_successful_job_has_no_advice(store: JobStore) -> None:
    job = new_job(store, options={})
    s = store.begin_step(job.id, "write", {})
    store.end_step(s, result="ok", detail={}, error=None)
    store.update_job(job.id, state="done", outcome="success")
    md = RepairLog.from_store(store, job.id).to_markdown()
    assert "— success" in md.splitlines()[0]
    assert "## Next step" not in md and "## Forced checks" not in md
    assert "## Log excerpts" not in md


@pytest.mark.parametrize(
    ("outcome", "state", "expect"),
    [
        ("refused", "refused", "Nothing was written"),
        ("failed", "failed", "unbrick resume"),
        ("cancelled", "write", "cancelled"),
        (None, "write", "did not finish"),
    ],
)
def test_advice_for_every_unsuccessful_outcome(
    store: JobStore, outcome: str | None, state: str, expect: str
) -> None:
    job = new_job(store)
    s = store.begin_step(job.id, "preflight", {})
    if outcome is not None:
        store.end_step(s, result="failed", detail={}, error="battery.level: 12% < 50%")
    store.update_job(job.id, state=state, outcome=outcome, data={"refusal": "battery low"})
    log = RepairLog.from_store(store, job.id)
    md = log.to_markdown()
    assert expect in md.split("## Next step", 1)[1]
    if outcome is None:
        assert "unfinished (write)" in md.splitlines()[0]
        assert "| interrupted |" in md
        assert log.ended_at is None and "| Duration | - |" in md
        assert f"unbrick resume {job.id}" in md
    if outcome == "refused":
        assert "battery low" in md and "--force CHECK_ID --reason" in md


@pytest.mark.unit
def test_excerpts_keep_the_tail_and_a_safe_fence() -> None:
    store = MemoryStore(clock=Clock())
    job = new_job(store)
    store.add_event(
        job.id, Event("log", "boot", data={"log": "\n".join(f"l{i}" for i in range(250))})
    )
    store.add_event(job.id, Event("console", "console", data={"text": "has ``` fence"}))
    store.add_event(job.id, Event("state", "write"))  # not an excerpt
    md = RepairLog.from_store(store, job.id).to_markdown()
    assert "(the last 200 of 250 lines)" in md
    assert "```text\nl50\n" in md and "\nl49\n" not in md and md.count("\nl249\n") == 1
    assert "````text\nhas ``` fence\n````" in md


@pytest.mark.unit
def test_summary_line_and_durations() -> None:
    store = MemoryStore(clock=Clock())
    job = new_job(store)
    line = summary_line(job)
    assert line.startswith(job.id) and "2026-01-01 00:00:00Z" in line
    assert "(planned)" in line and "Archer C7 (serial SN-77)" in line
    assert "openwrt.bin 23.05.3" in line and line.endswith("[bob]")
    assert "\n" not in line
    store.update_job(job.id, state="done", outcome="success")
    assert "success" in summary_line(store.get_job(job.id))
    assert [format_duration(s) for s in (None, 0.5, 12.34, 245, 3725)] == [
        "-",
        "0.50 s",
        "12.3 s",
        "4 min 05 s",
        "1 h 02 min",
    ]
