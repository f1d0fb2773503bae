"""The job journal: jobs, their steps, events and resume checkpoints.

Storage sits behind the small :class:`JobStore` Protocol so that the server can add another
backend (PostgreSQL) later. Two implementations live here: :class:`SQLiteStore`, the durable one
(every write is committed, WAL-journalled with ``synchronous=FULL``, before the call returns, so
a step journaled before it runs survives ``kill -9`` and a power cut), and :class:`MemoryStore`
for tests. Both keep the same semantics, checked by one contract test suite:

- dict fields are stored as JSON: tuples come back as lists, and a value that is not JSON is a
  UsageError at the call that passes it;
- an unknown job or step id is a JobError;
- ``update_job`` merges ``data`` into the job's data (top-level keys replaced); ``outcome=None``
  leaves the outcome as it is;
- ``list_jobs`` returns the newest jobs first.
"""

from __future__ import annotations

import contextlib
import copy
import getpass
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from unbrick.engine.events import Event
from unbrick.errors import JobError, SourceError, UsageError

log = logging.getLogger(__name__)

KINDS = ("flash", "restore", "backup", "update")
OUTCOMES = ("success", "refused", "failed", "rolled_back", "cancelled")
STEP_RESULTS = ("ok", "failed", "skipped")

#: Crockford's base32: no I, L, O, U; case-insensitive when typed.
_B32 = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_FIND_IDS = "list job ids with 'unbrick log'"


def new_job_id(now_s: float | None = None, entropy: bytes | None = None) -> str:
    """A short, unique, time-sortable job id: ``J`` + 9 base32 digits of the time in
    milliseconds + 4 random base32 digits (``J01JB3ZK5QX7M``, 14 characters).

    Ids created later sort after earlier ones (to the millisecond); 20 random bits make two
    jobs started in the same millisecond unlikely to collide, and ``create_job`` refuses a
    duplicate anyway.
    """
    ms = int((time.time() if now_s is None else now_s) * 1000)
    rand = int.from_bytes(entropy if entropy is not None else os.urandom(3), "big") & 0xFFFFF
    digits = []
    for _ in range(9):
        digits.append(_B32[ms & 31])
        ms >>= 5
    stamp = "".join(reversed(digits))
    tail = "".join(_B32[(rand >> shift) & 31] for shift in (15, 10, 5, 0))
    return f"J{stamp}{tail}"


def default_operator() -> str:
    """The OS user name (``unknown`` when the system cannot say)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


@dataclass(frozen=True)
class JobRecord:
    """One job as journaled. Times are seconds since the epoch (``time.time()``)."""

    id: str
    created_at: float
    updated_at: float
    #: flash | restore | backup | update
    kind: str
    #: The workflow state name (unbrick.engine.states.JobState values).
    state: str
    #: None until finished: success | refused | failed | rolled_back | cancelled
    outcome: str | None
    #: Who ran the job.
    operator: str
    device_uri: str
    device_identity: dict[str, Any]
    #: path, name, version, sha256, size (and whatever else the workflow records), or None.
    image: dict[str, Any] | None
    plan: dict[str, Any] = field(default_factory=dict)
    #: ``forced`` ({check_id: reason}) and the flags the job was started with.
    options: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def device_serial(self) -> str | None:
        serial = self.device_identity.get("serial")
        return None if serial is None else str(serial)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "kind": self.kind,
            "state": self.state,
            "outcome": self.outcome,
            "operator": self.operator,
            "device_uri": self.device_uri,
            "device_identity": self.device_identity,
            "image": self.image,
            "plan": self.plan,
            "options": self.options,
            "data": self.data,
        }

    @classmethod
    def new(
        cls,
        kind: str,
        *,
        device_uri: str,
        device_identity: dict[str, Any],
        image: dict[str, Any] | None = None,
        plan: dict[str, Any] | None = None,
        options: dict[str, Any] | None = None,
        data: dict[str, Any] | None = None,
        operator: str | None = None,
        state: str = "planned",
        now_s: float | None = None,
    ) -> JobRecord:
        """A fresh job with a new id, created and updated ``now_s``."""
        now = time.time() if now_s is None else now_s
        return cls(
            id=new_job_id(now),
            created_at=now,
            updated_at=now,
            kind=kind,
            state=state,
            outcome=None,
            operator=operator or default_operator(),
            device_uri=device_uri,
            device_identity=dict(device_identity),
            image=None if image is None else dict(image),
            plan=dict(plan or {}),
            options=dict(options or {}),
            data=dict(data or {}),
        )


@dataclass(frozen=True)
class StepRecord:
    """One journaled step. ``ended_at``/``result`` stay None while the step runs (or when the
    process died during it: that is how ``resume`` finds the interrupted step)."""

    id: int
    job_id: str
    name: str
    args: dict[str, Any]
    started_at: float
    ended_at: float | None = None
    #: ok | failed | skipped
    result: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def duration_s(self) -> float | None:
        return None if self.ended_at is None else max(0.0, self.ended_at - self.started_at)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "job_id": self.job_id,
            "name": self.name,
            "args": self.args,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "duration_s": self.duration_s,
            "result": self.result,
            "detail": self.detail,
            "error": self.error,
        }


class JobStore(Protocol):
    """Where jobs are journaled. Every write is durable when the call returns."""

    def create_job(self, job: JobRecord) -> None: ...

    def get_job(self, job_id: str) -> JobRecord: ...

    def update_job(
        self,
        job_id: str,
        *,
        state: str,
        outcome: str | None = None,
        data: dict[str, Any] | None = None,
    ) -> None: ...

    def begin_step(self, job_id: str, name: str, args: dict[str, Any]) -> int: ...

    def end_step(
        self, step_id: int, *, result: str, detail: dict[str, Any], error: str | None
    ) -> None: ...

    def steps(self, job_id: str) -> list[StepRecord]: ...

    def add_event(self, job_id: str, event: Event) -> None: ...

    def events(self, job_id: str) -> list[Event]: ...

    def list_jobs(
        self, *, device_serial: str | None = None, limit: int = 50
    ) -> list[JobRecord]: ...

    def set_checkpoint(self, job_id: str, key: str, value: dict[str, Any]) -> None: ...

    def checkpoints(self, job_id: str) -> dict[str, dict[str, Any]]: ...

    def close(self) -> None: ...


# ------------------------------------------------------------------ shared validation


def _dumps(value: Any, what: str) -> str:
    try:
        return json.dumps(value, sort_keys=True, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as e:
        raise UsageError(f"{what} is not JSON-serialisable: {e}", hint="pass plain data") from e


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def _check_dict(value: Any, what: str) -> None:
    if not isinstance(value, dict):
        raise UsageError(f"{what} must be a dict, not {type(value).__name__}")


def _check_job(job: JobRecord) -> None:
    if not job.id:
        raise UsageError("a job needs an id", hint="use new_job_id()")
    if job.kind not in KINDS:
        raise UsageError(f"job kind {job.kind!r} is not one of {', '.join(KINDS)}")
    _check_outcome(job.outcome)
    for name in ("device_identity", "plan", "options", "data"):
        _check_dict(getattr(job, name), f"job {name}")
    if job.image is not None:
        _check_dict(job.image, "job image")


def _check_outcome(outcome: str | None) -> None:
    if outcome is not None and outcome not in OUTCOMES:
        raise UsageError(f"outcome {outcome!r} is not one of {', '.join(OUTCOMES)}")


def _check_result(result: str) -> None:
    if result not in STEP_RESULTS:
        raise UsageError(f"step result {result!r} is not one of {', '.join(STEP_RESULTS)}")


def _unknown_job(job_id: str) -> JobError:
    return JobError(f"no job {job_id!r} in the journal", hint=_FIND_IDS)


def _unknown_step(step_id: int) -> JobError:
    return JobError(f"no step {step_id} in the journal", hint="begin_step() returns step ids")


def _step_ended(step_id: int) -> JobError:
    return JobError(f"step {step_id} has already ended", hint="a step is ended exactly once")


def _check_limit(limit: int) -> None:
    if limit < 1:
        raise UsageError(f"limit must be at least 1, not {limit}")


# ------------------------------------------------------------------ in memory


class MemoryStore:
    """The JobStore in memory (tests, dry runs). Values are copied through JSON on the way in
    and out, exactly as SQLiteStore stores them."""

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._jobs: dict[str, JobRecord] = {}
        self._steps: dict[int, StepRecord] = {}
        self._events: dict[str, list[Event]] = {}
        self._checkpoints: dict[str, dict[str, dict[str, Any]]] = {}
        self._next_step = 1

    @staticmethod
    def _copy(value: Any, what: str) -> Any:
        return json.loads(_dumps(value, what))

    def _job(self, job_id: str) -> JobRecord:
        try:
            return self._jobs[job_id]
        except KeyError:
            raise _unknown_job(job_id) from None

    def create_job(self, job: JobRecord) -> None:
        _check_job(job)
        stored = replace(
            job,
            device_identity=self._copy(job.device_identity, "job device_identity"),
            image=None if job.image is None else self._copy(job.image, "job image"),
            plan=self._copy(job.plan, "job plan"),
            options=self._copy(job.options, "job options"),
            data=self._copy(job.data, "job data"),
        )
        with self._lock:
            if job.id in self._jobs:
                raise JobError(f"job {job.id!r} already exists", hint="use new_job_id()")
            self._jobs[job.id] = stored
            self._events[job.id] = []
            self._checkpoints[job.id] = {}

    def get_job(self, job_id: str) -> JobRecord:
        with self._lock:
            return copy.deepcopy(self._job(job_id))

    def update_job(
        self,
        job_id: str,
        *,
        state: str,
        outcome: str | None = None,
        data: dict[str, Any] | None = None,
    ) -> None:
        _check_outcome(outcome)
        if data is not None:
            _check_dict(data, "job data")
            data = self._copy(data, "job data")
        with self._lock:
            job = self._job(job_id)
            merged = {**job.data, **(data or {})}
            self._jobs[job_id] = replace(
                job,
                state=state,
                outcome=outcome if outcome is not None else job.outcome,
                data=merged,
                updated_at=self._clock(),
            )

    def begin_step(self, job_id: str, name: str, args: dict[str, Any]) -> int:
        _check_dict(args, "step args")
        args = self._copy(args, "step args")
        with self._lock:
            self._job(job_id)
            step_id = self._next_step
            self._next_step += 1
            self._steps[step_id] = StepRecord(step_id, job_id, name, args, self._clock())
            return step_id

    def end_step(
        self, step_id: int, *, result: str, detail: dict[str, Any], error: str | None
    ) -> None:
        _check_result(result)
        _check_dict(detail, "step detail")
        detail = self._copy(detail, "step detail")
        with self._lock:
            step = self._steps.get(step_id)
            if step is None:
                raise _unknown_step(step_id)
            if step.ended_at is not None:
                raise _step_ended(step_id)
            self._steps[step_id] = replace(
                step, ended_at=self._clock(), result=result, detail=detail, error=error
            )

    def steps(self, job_id: str) -> list[StepRecord]:
        with self._lock:
            self._job(job_id)
            found = [s for s in self._steps.values() if s.job_id == job_id]
            return copy.deepcopy(sorted(found, key=lambda s: s.id))

    def add_event(self, job_id: str, event: Event) -> None:
        data = self._copy(event.data, "event data")
        with self._lock:
            self._job(job_id)
            self._events[job_id].append(Event(event.kind, event.name, job_id, event.at, data))

    def events(self, job_id: str) -> list[Event]:
        with self._lock:
            self._job(job_id)
            return copy.deepcopy(self._events[job_id])

    def list_jobs(self, *, device_serial: str | None = None, limit: int = 50) -> list[JobRecord]:
        _check_limit(limit)
        with self._lock:
            jobs = [
                j
                for j in self._jobs.values()
                if device_serial is None or j.device_serial == device_serial
            ]
            jobs.sort(key=lambda j: (j.created_at, j.id), reverse=True)
            return copy.deepcopy(jobs[:limit])

    def set_checkpoint(self, job_id: str, key: str, value: dict[str, Any]) -> None:
        _check_dict(value, "checkpoint value")
        value = self._copy(value, "checkpoint value")
        with self._lock:
            self._job(job_id)
            self._checkpoints[job_id][key] = value

    def checkpoints(self, job_id: str) -> dict[str, dict[str, Any]]:
        with self._lock:
            self._job(job_id)
            return copy.deepcopy(self._checkpoints[job_id])

    def close(self) -> None:
        return None


# ------------------------------------------------------------------ SQLite

#: Schema migrations: entry N (1-based) moves a database from version N-1 to N. Never edit a
#: released entry; append a new one.
_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE jobs (
            id TEXT PRIMARY KEY,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            kind TEXT NOT NULL,
            state TEXT NOT NULL,
            outcome TEXT,
            operator TEXT NOT NULL,
            device_uri TEXT NOT NULL,
            device_serial TEXT,
            device_identity TEXT NOT NULL,
            image TEXT,
            plan TEXT NOT NULL,
            options TEXT NOT NULL,
            data TEXT NOT NULL
        )""",
        "CREATE INDEX jobs_by_time ON jobs (created_at, id)",
        "CREATE INDEX jobs_by_serial ON jobs (device_serial, created_at, id)",
        """CREATE TABLE steps (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
            name TEXT NOT NULL,
            args TEXT NOT NULL,
            started_at REAL NOT NULL,
            ended_at REAL,
            result TEXT,
            detail TEXT NOT NULL DEFAULT '{}',
            error TEXT
        )""",
        "CREATE INDEX steps_by_job ON steps (job_id, id)",
        """CREATE TABLE events (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
            kind TEXT NOT NULL,
            name TEXT NOT NULL,
            at REAL NOT NULL,
            data TEXT NOT NULL
        )""",
        "CREATE INDEX events_by_job ON events (job_id, id)",
        """CREATE TABLE checkpoints (
            job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
            key TEXT NOT NULL,
            value TEXT NOT NULL,
            updated_at REAL NOT NULL,
            PRIMARY KEY (job_id, key)
        )""",
    ),
)
SCHEMA_VERSION = len(_MIGRATIONS)

# The column lists below are constants, never user input (hence the S608 exemptions).
_JOB_COLUMNS = (
    "id, created_at, updated_at, kind, state, outcome, operator, device_uri, "
    "device_identity, image, plan, options, data"
)
_STEP_COLUMNS = "id, job_id, name, args, started_at, ended_at, result, detail, error"


class SQLiteStore:
    """The durable JobStore: one SQLite file, safe to open from several processes.

    Each write call is one transaction, committed (the WAL fsynced) before it returns. Another
    process holding the write lock is waited for up to ``busy_timeout_s``.
    """

    def __init__(
        self,
        path: Path,
        *,
        clock: Callable[[], float] = time.time,
        busy_timeout_s: float = 30.0,
    ) -> None:
        self.path = Path(path)
        self._clock = clock
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(
                str(self.path),
                timeout=busy_timeout_s,
                isolation_level=None,  # autocommit: transactions are explicit
                check_same_thread=False,  # calls are serialised by self._lock
            )
        except sqlite3.Error as e:
            raise SourceError(f"{self.path}: cannot open the job database: {e}") from e
        try:
            self._setup(busy_timeout_s)
        except BaseException:
            self._db.close()
            raise

    def __enter__(self) -> SQLiteStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _setup(self, busy_timeout_s: float) -> None:
        with self._translate("open"):
            self._db.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
            mode = self._journal_mode_wal(busy_timeout_s)
            if str(mode).lower() != "wal":
                log.warning(
                    "%s: WAL journal mode unavailable (got %s); writes stay durable but "
                    "readers may wait for writers",
                    self.path,
                    mode,
                )
            self._db.execute("PRAGMA synchronous = FULL")
            self._db.execute("PRAGMA foreign_keys = ON")
            self._migrate()

    def _journal_mode_wal(self, busy_timeout_s: float) -> str:
        """Switch to WAL. Two connections opening a new database at once can get "database is
        locked" here at once (SQLite does not wait on the busy handler for this change), so the
        switch is retried until the busy timeout."""
        deadline = time.monotonic() + busy_timeout_s
        while True:
            try:
                return str(self._db.execute("PRAGMA journal_mode = WAL").fetchone()[0])
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() >= deadline:
                    raise
                time.sleep(0.05)

    def _migrate(self) -> None:
        with self._write():
            self._db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = self._db.execute("SELECT MAX(version) FROM schema_version").fetchone()
            current = int(row[0] or 0)
            if current > SCHEMA_VERSION:
                raise SourceError(
                    f"{self.path}: job database schema version {current} is newer than this "
                    f"unbrick understands ({SCHEMA_VERSION})",
                    hint="upgrade unbrick, or point it at another data directory",
                )
            for version in range(current + 1, SCHEMA_VERSION + 1):
                for statement in _MIGRATIONS[version - 1]:
                    self._db.execute(statement)
                self._db.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
                log.info("%s: job database migrated to schema version %d", self.path, version)

    @contextlib.contextmanager
    def _translate(self, action: str) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as e:
            raise SourceError(
                f"{self.path}: job database {action} failed: {e}",
                hint="check the disk and the file; another unbrick may hold it locked",
            ) from e

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, committed before the block's caller returns."""
        with self._lock, self._translate("write"):
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._lock, self._translate("read"):
            yield self._db

    def _require_job(self, db: sqlite3.Connection, job_id: str) -> None:
        if db.execute("SELECT 1 FROM jobs WHERE id = ?", (job_id,)).fetchone() is None:
            raise _unknown_job(job_id)

    @staticmethod
    def _job_from_row(row: tuple[Any, ...]) -> JobRecord:
        return JobRecord(
            id=row[0],
            created_at=row[1],
            updated_at=row[2],
            kind=row[3],
            state=row[4],
            outcome=row[5],
            operator=row[6],
            device_uri=row[7],
            device_identity=_loads(row[8]),
            image=_loads(row[9]),
            plan=_loads(row[10]),
            options=_loads(row[11]),
            data=_loads(row[12]),
        )

    @staticmethod
    def _step_from_row(row: tuple[Any, ...]) -> StepRecord:
        return StepRecord(
            id=row[0],
            job_id=row[1],
            name=row[2],
            args=_loads(row[3]),
            started_at=row[4],
            ended_at=row[5],
            result=row[6],
            detail=_loads(row[7]),
            error=row[8],
        )

    def create_job(self, job: JobRecord) -> None:
        _check_job(job)
        values = (
            job.id,
            job.created_at,
            job.updated_at,
            job.kind,
            job.state,
            job.outcome,
            job.operator,
            job.device_uri,
            job.device_serial,
            _dumps(job.device_identity, "job device_identity"),
            None if job.image is None else _dumps(job.image, "job image"),
            _dumps(job.plan, "job plan"),
            _dumps(job.options, "job options"),
            _dumps(job.data, "job data"),
        )
        with self._write() as db:
            if db.execute("SELECT 1 FROM jobs WHERE id = ?", (job.id,)).fetchone() is not None:
                raise JobError(f"job {job.id!r} already exists", hint="use new_job_id()")
            db.execute(
                "INSERT INTO jobs (id, created_at, updated_at, kind, state, outcome, operator, "
                "device_uri, device_serial, device_identity, image, plan, options, data) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                values,
            )

    def get_job(self, job_id: str) -> JobRecord:
        with self._read() as db:
            row = db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()  # noqa: S608
        if row is None:
            raise _unknown_job(job_id)
        return self._job_from_row(row)

    def update_job(
        self,
        job_id: str,
        *,
        state: str,
        outcome: str | None = None,
        data: dict[str, Any] | None = None,
    ) -> None:
        _check_outcome(outcome)
        if data is not None:
            _check_dict(data, "job data")
            _dumps(data, "job data")
        with self._write() as db:
            row = db.execute("SELECT data FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise _unknown_job(job_id)
            merged = {**_loads(row[0]), **(data or {})}
            db.execute(
                "UPDATE jobs SET state = ?, outcome = COALESCE(?, outcome), data = ?, "
                "updated_at = ? WHERE id = ?",
                (state, outcome, _dumps(merged, "job data"), self._clock(), job_id),
            )

    def begin_step(self, job_id: str, name: str, args: dict[str, Any]) -> int:
        _check_dict(args, "step args")
        text = _dumps(args, "step args")
        with self._write() as db:
            self._require_job(db, job_id)
            cur = db.execute(
                "INSERT INTO steps (job_id, name, args, started_at) VALUES (?, ?, ?, ?)",
                (job_id, name, text, self._clock()),
            )
            step_id = cur.lastrowid
        assert step_id is not None
        return int(step_id)

    def end_step(
        self, step_id: int, *, result: str, detail: dict[str, Any], error: str | None
    ) -> None:
        _check_result(result)
        _check_dict(detail, "step detail")
        text = _dumps(detail, "step detail")
        with self._write() as db:
            row = db.execute("SELECT ended_at FROM steps WHERE id = ?", (step_id,)).fetchone()
            if row is None:
                raise _unknown_step(step_id)
            if row[0] is not None:
                raise _step_ended(step_id)
            db.execute(
                "UPDATE steps SET ended_at = ?, result = ?, detail = ?, error = ? WHERE id = ?",
                (self._clock(), result, text, error, step_id),
            )

    def steps(self, job_id: str) -> list[StepRecord]:
        with self._read() as db:
            self._require_job(db, job_id)
            rows = db.execute(
                f"SELECT {_STEP_COLUMNS} FROM steps WHERE job_id = ? ORDER BY id",  # noqa: S608
                (job_id,),
            ).fetchall()
        return [self._step_from_row(r) for r in rows]

    def add_event(self, job_id: str, event: Event) -> None:
        text = _dumps(event.data, "event data")
        with self._write() as db:
            self._require_job(db, job_id)
            db.execute(
                "INSERT INTO events (job_id, kind, name, at, data) VALUES (?, ?, ?, ?, ?)",
                (job_id, event.kind, event.name, event.at, text),
            )

    def events(self, job_id: str) -> list[Event]:
        with self._read() as db:
            self._require_job(db, job_id)
            rows = db.execute(
                "SELECT kind, name, at, data FROM events WHERE job_id = ? ORDER BY id",
                (job_id,),
            ).fetchall()
        return [Event(kind, name, job_id, at, _loads(data)) for kind, name, at, data in rows]

    def list_jobs(self, *, device_serial: str | None = None, limit: int = 50) -> list[JobRecord]:
        _check_limit(limit)
        with self._read() as db:
            if device_serial is None:
                rows = db.execute(
                    f"SELECT {_JOB_COLUMNS} FROM jobs ORDER BY created_at DESC, id DESC LIMIT ?",  # noqa: S608
                    (limit,),
                ).fetchall()
            else:
                rows = db.execute(
                    f"SELECT {_JOB_COLUMNS} FROM jobs WHERE device_serial = ? "  # noqa: S608
                    "ORDER BY created_at DESC, id DESC LIMIT ?",
                    (device_serial, limit),
                ).fetchall()
        return [self._job_from_row(r) for r in rows]

    def set_checkpoint(self, job_id: str, key: str, value: dict[str, Any]) -> None:
        _check_dict(value, "checkpoint value")
        text = _dumps(value, "checkpoint value")
        with self._write() as db:
            self._require_job(db, job_id)
            db.execute(
                "INSERT INTO checkpoints (job_id, key, value, updated_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (job_id, key) DO UPDATE SET value = excluded.value, "
                "updated_at = excluded.updated_at",
                (job_id, key, text, self._clock()),
            )

    def checkpoints(self, job_id: str) -> dict[str, dict[str, Any]]:
        with self._read() as db:
            self._require_job(db, job_id)
            rows = db.execute(
                "SELECT key, value FROM checkpoints WHERE job_id = ? ORDER BY key", (job_id,)
            ).fetchall()
        return {key: _loads(value) for key, value in rows}

    def close(self) -> None:
        with self._lock:
            self._db.close()


__all__ = [
    "KINDS",
    "OUTCOMES",
    "SCHEMA_VERSION",
    "STEP_RESULTS",
    "JobRecord",
    "JobStore",
    "MemoryStore",
    "SQLiteStore",
    "StepRecord",
    "default_operator",
    "new_job_id",
]
