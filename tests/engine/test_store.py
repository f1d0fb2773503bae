"""The job journal: one contract suite for both stores, and the SQLite store's durability."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from unbrick.engine.events import Event
from unbrick.engine.store import (
    SCHEMA_VERSION,
    JobRecord,
    JobStore,
    MemoryStore,
    SQLiteStore,
    new_job_id,
)
from unbrick.errors import JobError, SourceError, UsageError


class Clock:
    """A clock that moves one second per reading."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def make_job(serial: str = "SN1", created_at: float = 1_600_000_000.0, **kw: Any) -> JobRecord:
    job = JobRecord.new(
        "flash",
        device_uri="sim://router",
        device_identity={"model": "R1", "serial": serial, "extra": {"mac": "00:11"}},
        image={
            "path": "/img/fw.bin",
            "name": "fw.bin",
            "version": "1.2",
            "sha256": "ab" * 32,
            "size": 4096,
        },
        plan={"regions": ("firmware",), "target": {"offset": 65536}},
        options={"forced": {"battery": "on bench supply"}, "allow_downgrade": False},
        operator="alice",
        now_s=created_at,
    )
    return replace(job, **kw)


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[JobStore]:
    s: JobStore
    if request.param == "memory":
        s = MemoryStore(clock=Clock())
    else:
        s = SQLiteStore(tmp_path / "jobs.sqlite3", clock=Clock())
    yield s
    s.close()


# ------------------------------------------------------------------ contract


def test_job_round_trip(store: JobStore) -> None:
    job = make_job()
    store.create_job(job)
    got = store.get_job(job.id)
    assert got.id == job.id and got.kind == "flash" and got.state == "planned"
    assert got.outcome is None and got.operator == "alice"
    assert got.created_at == job.created_at
    assert got.device_identity == {"model": "R1", "serial": "SN1", "extra": {"mac": "00:11"}}
    assert got.image is not None and got.image["sha256"] == "ab" * 32
    # Stored as JSON: a tuple comes back as a list.
    assert got.plan == {"regions": ["firmware"], "target": {"offset": 65536}}
    assert got.options["forced"] == {"battery": "on bench supply"}
    assert got.device_serial == "SN1"


def test_job_without_image(store: JobStore) -> None:
    job = make_job(image=None, kind="backup")
    store.create_job(job)
    assert store.get_job(job.id).image is None


def test_unknown_job_names_how_to_find_ids(store: JobStore) -> None:
    with pytest.raises(JobError) as err:
        store.get_job("J000NOPE")
    assert "J000NOPE" in err.value.message
    assert "unbrick log" in err.value.one_line()
    for call in (
        lambda: store.update_job("J000NOPE", state="write"),
        lambda: store.begin_step("J000NOPE", "write", {}),
        lambda: store.steps("J000NOPE"),
        lambda: store.add_event("J000NOPE", Event("log", "console")),
        lambda: store.events("J000NOPE"),
        lambda: store.set_checkpoint("J000NOPE", "write", {}),
        lambda: store.checkpoints("J000NOPE"),
    ):
        with pytest.raises(JobError):
            call()


def test_duplicate_and_invalid_jobs_are_refused(store: JobStore) -> None:
    job = make_job()
    store.create_job(job)
    with pytest.raises(JobError, match="already exists"):
        store.create_job(job)
    with pytest.raises(UsageError, match="kind"):
        store.create_job(make_job(kind="dance"))
    with pytest.raises(UsageError, match="outcome"):
        store.create_job(make_job(outcome="maybe"))
    bad = make_job(data={"when": object()})
    with pytest.raises(UsageError, match="JSON"):
        store.create_job(bad)
    with pytest.raises(JobError):
        store.get_job(bad.id)
    assert [j.id for j in store.list_jobs()] == [job.id]


def test_update_job_merges_data_and_keeps_outcome(store: JobStore) -> None:
    job = make_job(data={"a": 1})
    store.create_job(job)
    store.update_job(job.id, state="backup", data={"backup_id": "ff" * 32})
    got = store.get_job(job.id)
    assert got.state == "backup" and got.outcome is None
    assert got.data == {"a": 1, "backup_id": "ff" * 32}
    first_update = got.updated_at
    assert first_update > job.updated_at
    store.update_job(job.id, state="done", outcome="success", data={"a": 2})
    store.update_job(job.id, state="done")
    got = store.get_job(job.id)
    assert got.outcome == "success" and got.data == {"a": 2, "backup_id": "ff" * 32}
    assert got.updated_at > first_update
    with pytest.raises(UsageError):
        store.update_job(job.id, state="done", outcome="great")
    with pytest.raises(UsageError):
        store.update_job(job.id, state="done", data={"x": {1, 2}})
    assert store.get_job(job.id).data == {"a": 2, "backup_id": "ff" * 32}


def test_steps_are_journaled_in_order(store: JobStore) -> None:
    job = make_job()
    store.create_job(job)
    s1 = store.begin_step(job.id, "preflight", {"checks": 3})
    running = store.steps(job.id)
    assert len(running) == 1 and running[0].result is None and running[0].ended_at is None
    store.end_step(s1, result="ok", detail={"passed": ["battery"]}, error=None)
    s2 = store.begin_step(job.id, "write", {"offset": 65536})
    store.end_step(s2, result="failed", detail={"written": 4096}, error="link lost")
    s3 = store.begin_step(job.id, "verify", {})
    steps = store.steps(job.id)
    assert [s.id for s in steps] == [s1, s2, s3] and s1 < s2 < s3
    assert [s.name for s in steps] == ["preflight", "write", "verify"]
    assert steps[0].args == {"checks": 3} and steps[0].detail == {"passed": ["battery"]}
    assert steps[0].result == "ok" and steps[0].duration_s is not None
    assert steps[0].duration_s > 0
    assert steps[1].result == "failed" and steps[1].error == "link lost"
    assert steps[2].result is None and steps[2].duration_s is None
    assert all(s.job_id == job.id for s in steps)


def test_step_errors(store: JobStore) -> None:
    job = make_job()
    store.create_job(job)
    sid = store.begin_step(job.id, "write", {})
    with pytest.raises(UsageError, match="result"):
        store.end_step(sid, result="great", detail={}, error=None)
    store.end_step(sid, result="skipped", detail={}, error=None)
    with pytest.raises(JobError, match="already ended"):
        store.end_step(sid, result="ok", detail={}, error=None)
    with pytest.raises(JobError, match="no step"):
        store.end_step(sid + 1000, result="ok", detail={}, error=None)
    assert store.steps(job.id)[0].result == "skipped"


def test_events_round_trip(store: JobStore) -> None:
    job = make_job()
    store.create_job(job)
    store.add_event(job.id, Event("log", "console", at=5.5, data={"line": "U-Boot 2024.01"}))
    store.add_event(
        job.id,
        Event(
            "log", "warning", job="other", at=6.0, data={"level": "warning", "message": "slow link"}
        ),
    )
    events = store.events(job.id)
    assert [(e.kind, e.name, e.at, e.job) for e in events] == [
        ("log", "console", 5.5, job.id),
        ("log", "warning", 6.0, job.id),
    ]
    assert events[0].data == {"line": "U-Boot 2024.01"}
    with pytest.raises(UsageError):
        store.add_event(job.id, Event("log", "x", data={"bad": b"bytes"}))
    assert len(store.events(job.id)) == 2


def test_list_jobs_newest_first_by_device(store: JobStore) -> None:
    jobs = [make_job(serial="A" if i % 2 else "B", created_at=1000.0 + i) for i in range(7)]
    for job in random.Random(3).sample(jobs, len(jobs)):
        store.create_job(job)
    listed = store.list_jobs()
    assert [j.id for j in listed] == [j.id for j in reversed(jobs)]
    assert [j.created_at for j in store.list_jobs(device_serial="A")] == [1005.0, 1003.0, 1001.0]
    assert [j.created_at for j in store.list_jobs(limit=2)] == [1006.0, 1005.0]
    assert store.list_jobs(device_serial="nobody") == []
    with pytest.raises(UsageError):
        store.list_jobs(limit=0)


def test_checkpoints(store: JobStore) -> None:
    a, b = make_job(), make_job()
    store.create_job(a)
    store.create_job(b)
    assert store.checkpoints(a.id) == {}
    store.set_checkpoint(a.id, "write", {"pos": 4096})
    store.set_checkpoint(a.id, "backup:firmware", {"chunk": 3})
    store.set_checkpoint(a.id, "write", {"pos": 8192})
    assert store.checkpoints(a.id) == {"write": {"pos": 8192}, "backup:firmware": {"chunk": 3}}
    assert store.checkpoints(b.id) == {}


def test_values_are_copies(store: JobStore) -> None:
    job = make_job(data={"list": [1]})
    store.create_job(job)
    job.data["list"].append(2)
    got = store.get_job(job.id)
    assert got.data == {"list": [1]}
    got.data["list"].append(3)
    assert store.get_job(job.id).data == {"list": [1]}
    args: dict[str, Any] = {"x": [1]}
    store.begin_step(job.id, "s", args)
    args["x"].append(2)
    assert store.steps(job.id)[0].args == {"x": [1]}


# ------------------------------------------------------------------ ids


@pytest.mark.unit
def test_job_ids_are_short_sortable_and_unique() -> None:
    ids = [new_job_id(1_700_000_000.0 + i * 0.001) for i in range(200)]
    assert ids == sorted(ids)
    assert all(len(i) == 14 and i[0] == "J" for i in ids)
    assert all(set(i[1:]) <= set("0123456789ABCDEFGHJKMNPQRSTVWXYZ") for i in ids)
    same_ms = {new_job_id(1_700_000_000.0) for _ in range(200)}
    assert len(same_ms) >= 199
    assert new_job_id(1.0, b"\0\0\0") < new_job_id(1.002, b"\xff\xff\xff")


@pytest.mark.unit
def test_job_new_defaults_operator_to_os_user() -> None:
    job = JobRecord.new("restore", device_uri="sim://x", device_identity={"serial": "1"})
    assert job.operator and job.outcome is None and job.created_at == job.updated_at


# ------------------------------------------------------------------ SQLite specifics


def test_sqlite_persists_and_uses_wal_full_sync(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    job = make_job()
    with SQLiteStore(path) as s:
        s.create_job(job)
        sid = s.begin_step(job.id, "write", {"offset": 1})
        assert s._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert s._db.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    with SQLiteStore(path) as s:
        assert s.get_job(job.id).id == job.id
        assert [st.id for st in s.steps(job.id)] == [sid]
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("SELECT MAX(version) FROM schema_version").fetchone()[0] == SCHEMA_VERSION
    finally:
        db.close()


def test_sqlite_two_handles_see_each_others_writes(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    with SQLiteStore(path) as a, SQLiteStore(path) as b:
        job = make_job()
        a.create_job(job)
        b.update_job(job.id, state="write")
        b.set_checkpoint(job.id, "write", {"pos": 1})
        assert a.get_job(job.id).state == "write"
        assert a.checkpoints(job.id) == {"write": {"pos": 1}}


def test_sqlite_refuses_newer_schema_and_non_databases(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    SQLiteStore(path).close()
    db = sqlite3.connect(path)
    db.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION + 1,))
    db.commit()
    db.close()
    with pytest.raises(SourceError, match="newer"):
        SQLiteStore(path)
    junk = tmp_path / "junk.sqlite3"
    junk.write_bytes(b"this is not a database at all" * 100)
    with pytest.raises(SourceError, match=r"junk\.sqlite3"):
        SQLiteStore(junk)
    with pytest.raises(SourceError):
        SQLiteStore(tmp_path / "missing-dir" / "jobs.sqlite3")


_WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from unbrick.engine.store import SQLiteStore

    store = SQLiteStore(Path(sys.argv[1]))
    job_id, tag = sys.argv[2], sys.argv[3]
    count = int(sys.argv[4])
    i = 0
    while count < 0 or i < count:
        sid = store.begin_step(job_id, f"{tag}-{i}", {"i": i, "pad": "x" * (i % 700)})
        print("begin", sid, flush=True)
        store.end_step(sid, result="ok", detail={"i": i}, error=None)
        print("end", sid, flush=True)
        store.set_checkpoint(job_id, tag, {"i": i})
        print("checkpoint", tag, i, flush=True)
        i += 1
    """
)


def _spawn_writer(path: Path, job_id: str, tag: str, count: int = -1) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(path), job_id, tag, str(count)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_sqlite_survives_kill_9_with_every_committed_step(tmp_path: Path) -> None:
    """A writer is killed at random moments; every step it reported committed is there."""
    path = tmp_path / "jobs.sqlite3"
    job = make_job()
    with SQLiteStore(path) as s:
        s.create_job(job)
    rng = random.Random(1234)
    begun: set[int] = set()
    ended: set[int] = set()
    for round_no in range(5):
        tag = f"w{round_no}"
        checkpoint = -1
        proc = _spawn_writer(path, job.id, tag)
        assert proc.stdout is not None
        first = proc.stdout.readline()  # the writer is journaling from here on
        assert first.startswith("begin"), proc.stderr.read() if proc.stderr else ""
        time.sleep(rng.uniform(0.0, 0.3))
        os.kill(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        lines = [first, *out.splitlines(keepends=True)]
        for line in lines:
            if not line.endswith("\n"):
                continue  # cut by the kill: not reported
            word, *rest = line.split()
            if word == "begin":
                begun.add(int(rest[0]))
            elif word == "end":
                ended.add(int(rest[0]))
            elif word == "checkpoint":
                checkpoint = max(checkpoint, int(rest[1]))
        with SQLiteStore(path) as s:
            steps = {st.id: st for st in s.steps(job.id)}
            assert begun <= set(steps), f"round {round_no}: committed steps missing"
            assert all(steps[i].result == "ok" for i in ended)
            if checkpoint >= 0:
                assert s.checkpoints(job.id)[tag]["i"] >= checkpoint
            assert s._db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            # The journal stays writable after the crash.
            s.end_step(s.begin_step(job.id, "after-crash", {}), result="ok", detail={}, error=None)
    assert len(begun) > 5


def test_sqlite_concurrent_writers_from_two_processes(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    job = make_job()
    with SQLiteStore(path) as s:
        s.create_job(job)
    procs = [_spawn_writer(path, job.id, tag, 40) for tag in ("a", "b")]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    with SQLiteStore(path) as s:
        steps = s.steps(job.id)
        names = {st.name for st in steps}
        assert len(steps) == 80 and all(st.result == "ok" for st in steps)
        assert names == {f"{t}-{i}" for t in "ab" for i in range(40)}
        assert s.checkpoints(job.id) == {"a": {"i": 39}, "b": {"i": 39}}


def test_many_stores_opening_a_new_database_at_once(tmp_path: Path) -> None:
    import threading

    errors: list[BaseException] = []
    path = tmp_path / "jobs.sqlite3"

    def open_close() -> None:
        try:
            SQLiteStore(path).close()
        except BaseException as e:  # collected for the assertion
            errors.append(e)

    threads = [threading.Thread(target=open_close) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
