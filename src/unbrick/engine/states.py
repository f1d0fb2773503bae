"""The job state machine: one enum, one transition table, one function that moves a job.

    PLANNED -> PREFLIGHT -> BACKUP -> STAGE_LOADER -> WRITE -> VERIFY -> REBOOT -> VALIDATE
            -> COMMIT -> DONE
    any state before WRITE -> REFUSED (a check said no) or FAILED (nothing was written)
    WRITE .. COMMIT -> ROLLING_BACK -> ROLLED_BACK, or UNRECOVERED if the restore failed too

A state names what the job is doing (or did last); it is journaled before the work starts, so
that ``resume`` knows where a crash or power cut interrupted it.
"""

from __future__ import annotations

import enum

from unbrick.errors import JobError


class JobState(enum.Enum):
    PLANNED = "planned"
    PREFLIGHT = "preflight"
    BACKUP = "backup"
    STAGE_LOADER = "stage-loader"
    WRITE = "write"
    VERIFY = "verify"
    REBOOT = "reboot"
    VALIDATE = "validate"
    COMMIT = "commit"
    DONE = "done"
    REFUSED = "refused"
    FAILED = "failed"
    ROLLING_BACK = "rolling-back"
    ROLLED_BACK = "rolled-back"
    UNRECOVERED = "unrecovered"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL

    @property
    def device_touched(self) -> bool:
        """True once the job may have changed the device's storage."""
        return self in _TOUCHED


TERMINAL = frozenset(
    {JobState.DONE, JobState.REFUSED, JobState.FAILED, JobState.ROLLED_BACK, JobState.UNRECOVERED}
)

_ORDER = (
    JobState.PLANNED,
    JobState.PREFLIGHT,
    JobState.BACKUP,
    JobState.STAGE_LOADER,
    JobState.WRITE,
    JobState.VERIFY,
    JobState.REBOOT,
    JobState.VALIDATE,
    JobState.COMMIT,
    JobState.DONE,
)
_TOUCHED = frozenset(
    {
        JobState.STAGE_LOADER,
        JobState.WRITE,
        JobState.VERIFY,
        JobState.REBOOT,
        JobState.VALIDATE,
        JobState.COMMIT,
        JobState.ROLLING_BACK,
        JobState.ROLLED_BACK,
        JobState.UNRECOVERED,
    }
)


def _build() -> dict[JobState, frozenset[JobState]]:
    table: dict[JobState, set[JobState]] = {s: set() for s in JobState}
    for i, state in enumerate(_ORDER[:-1]):
        # Forward, possibly skipping optional phases (no backup needed, no loader...).
        table[state].update(_ORDER[i + 1 :])
    for state in (JobState.PLANNED, JobState.PREFLIGHT, JobState.BACKUP):
        table[state].update({JobState.REFUSED, JobState.FAILED})
    for state in _TOUCHED - {JobState.ROLLING_BACK, JobState.ROLLED_BACK, JobState.UNRECOVERED}:
        table[state].update({JobState.ROLLING_BACK, JobState.FAILED})
    # A restore that ends writes the backup, reboots and validates like a flash.
    table[JobState.ROLLING_BACK].update({JobState.ROLLED_BACK, JobState.UNRECOVERED})
    # resume re-enters the phase it found (re-writing is idempotent; never silent: journaled).
    for state in _TOUCHED - TERMINAL:
        table[state].add(state)
    # An interrupted backup is taken again from the start.
    table[JobState.BACKUP].add(JobState.BACKUP)
    # A failed rollback can be resumed into another rollback attempt.
    table[JobState.UNRECOVERED].add(JobState.ROLLING_BACK)
    return {s: frozenset(t) for s, t in table.items()}


TRANSITIONS: dict[JobState, frozenset[JobState]] = _build()


def transition(current: JobState, target: JobState) -> JobState:
    """Return ``target`` if the table allows moving there from ``current``; else JobError."""
    if target not in TRANSITIONS[current]:
        allowed = ", ".join(sorted(s.value for s in TRANSITIONS[current])) or "none"
        raise JobError(
            f"a job in state '{current.value}' cannot move to '{target.value}' (allowed: {allowed})"
        )
    return target
