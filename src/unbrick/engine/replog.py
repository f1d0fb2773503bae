"""The repair log: one job's record for the customer, the workshop and the audit.

:meth:`RepairLog.from_store` gathers who ran the job and when, the device's identity, the image
(name, version, SHA-256), every step with its timing and result, console and log excerpts
(events), warnings, the checks that were forced (with the reasons given), the outcome and the
total duration. It renders as JSON Lines (:meth:`RepairLog.to_jsonl`: a header line, one line per
step, one per event, a footer) and as a Markdown report (:meth:`RepairLog.to_markdown`). Times
are shown in UTC so that a report reads the same wherever it is opened.

Conventions read from the journal:

- ``job.options["forced"]``: ``{check_id: reason}`` (a list of ``{"check"|"check_id", "reason"}``
  objects is accepted too);
- warnings: ``log`` events whose ``data["level"]`` is ``warning`` or ``error`` (or named
  ``warning``), plus ``job.data["warnings"]`` (a list of strings);
- excerpts: other ``log``/``console`` events; the text is ``data["line"]``,
  ``data["message"]``, ``data["text"]`` or ``data["log"]``;
- ``job.data["refusal"]`` and ``job.data["backup_id"]`` are used in the advice.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from unbrick.engine.events import Event
from unbrick.engine.store import JobRecord, JobStore, StepRecord

FORMAT = "unbrick-repair-log"
VERSION = 1
#: At most this many lines of each excerpt appear in the Markdown report (the last ones).
EXCERPT_LINES = 200
_TEXT_KEYS = ("line", "message", "text", "log")
_WARNING_LEVELS = ("warning", "error", "critical")


def _utc(ts: float | None) -> str:
    if ts is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(ts))


def format_duration(seconds: float | None) -> str:
    """``0.42 s``, ``12.3 s``, ``4 min 05 s``, ``1 h 02 min``; ``-`` for None."""
    if seconds is None:
        return "-"
    if seconds < 10:
        return f"{seconds:.2f} s"
    if seconds < 60:
        return f"{seconds:.1f} s"
    whole = round(seconds)
    if whole < 3600:
        return f"{whole // 60} min {whole % 60:02d} s"
    return f"{whole // 3600} h {whole % 3600 // 60:02d} min"


def _device_name(identity: dict[str, Any]) -> str:
    model = identity.get("model") or "unknown device"
    serial = identity.get("serial")
    return f"{model} (serial {serial})" if serial else str(model)


def _image_name(image: dict[str, Any] | None) -> str:
    if not image:
        return "-"
    name = str(image.get("name") or image.get("path") or "image")
    version = image.get("version")
    return f"{name} {version}" if version else name


def _event_text(event: Event) -> str | None:
    for key in _TEXT_KEYS:
        value = event.data.get(key)
        if isinstance(value, str):
            return value
    return None


def _is_warning(event: Event) -> bool:
    if event.kind != "log":
        return False
    level = str(event.data.get("level", "")).lower()
    return level in _WARNING_LEVELS or event.name == "warning"


def _forced(options: dict[str, Any]) -> list[tuple[str, str]]:
    raw = options.get("forced") or {}
    if isinstance(raw, dict):
        return [(str(k), str(v)) for k, v in raw.items()]
    out = []
    if isinstance(raw, list):
        for item in raw:
            if isinstance(item, dict):
                check = item.get("check") or item.get("check_id") or "?"
                out.append((str(check), str(item.get("reason", ""))))
            elif isinstance(item, list | tuple) and len(item) == 2:
                out.append((str(item[0]), str(item[1])))
    return out


def _cell(value: object) -> str:
    text = " ".join(str(value).split())
    return text.replace("|", "\\|") if text else "-"


def _fence(lines: Iterable[str]) -> str:
    body = "\n".join(lines)
    ticks = "```"
    while ticks in body:
        ticks += "`"
    return f"{ticks}text\n{body}\n{ticks}"


def _short_json(value: dict[str, Any], limit: int = 120) -> str:
    if not value:
        return ""
    text = json.dumps(value, sort_keys=True, separators=(", ", "="), default=str)
    text = text.strip("{}").replace('"', "")
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass(frozen=True)
class RepairLog:
    job: JobRecord
    steps: tuple[StepRecord, ...]
    events: tuple[Event, ...]

    @classmethod
    def from_store(cls, store: JobStore, job_id: str) -> RepairLog:
        job = store.get_job(job_id)
        return cls(job, tuple(store.steps(job_id)), tuple(store.events(job_id)))

    # ------------------------------------------------------------------ facts

    @property
    def finished(self) -> bool:
        return self.job.outcome is not None

    @property
    def started_at(self) -> float:
        return self.job.created_at

    @property
    def ended_at(self) -> float | None:
        """When the job ended (its last journal update), None while it has not."""
        if not self.finished:
            return None
        ends = [s.ended_at for s in self.steps if s.ended_at is not None]
        return max([self.job.updated_at, *ends])

    @property
    def duration_s(self) -> float | None:
        end = self.ended_at
        return None if end is None else max(0.0, end - self.started_at)

    @property
    def warnings(self) -> list[str]:
        found = [
            _event_text(e) or f"{e.name}: {_short_json(e.data)}"
            for e in self.events
            if _is_warning(e)
        ]
        extra = self.job.data.get("warnings")
        if isinstance(extra, list):
            found.extend(str(w) for w in extra)
        return found

    @property
    def forced(self) -> list[tuple[str, str]]:
        """``(check_id, reason)`` for each check the operator overrode."""
        return _forced(self.job.options)

    @property
    def failed_steps(self) -> list[StepRecord]:
        return [s for s in self.steps if s.result == "failed"]

    def excerpts(self) -> list[tuple[str, list[str]]]:
        """``(title, lines)`` blocks of console and log text, in the order they came."""
        blocks: list[tuple[str, list[str]]] = []
        for event in self.events:
            if event.kind not in ("log", "console") or _is_warning(event):
                continue
            text = _event_text(event)
            if text is None:
                continue
            title = event.name or event.kind
            lines = text.splitlines() or [""]
            if blocks and blocks[-1][0] == title:
                blocks[-1][1].extend(lines)
            else:
                blocks.append((title, list(lines)))
        return blocks

    def advice(self) -> str | None:
        """What to do next, when the job did not succeed."""
        job = self.job
        failed = self.failed_steps
        where = f" at step '{failed[-1].name}' ({failed[-1].error})" if failed else ""
        backup = job.data.get("backup_id")
        backup_text = (
            f" The backup {str(backup)[:12]} holds the device's previous content "
            f"('unbrick restore {job.device_uri} {str(backup)[:12]}')."
            if backup
            else ""
        )
        if job.outcome == "success":
            return None
        if job.outcome == "refused":
            why = job.data.get("refusal") or (failed[-1].error if failed else None)
            because = f": {why}" if why else ""
            return (
                f"Nothing was written to the device; a pre-flight check refused the job{because}. "
                "Fix what the check names and run the job again; override a check only when "
                "you are sure, with '--force CHECK_ID --reason TEXT' (the reason is recorded)."
            )
        if job.outcome == "rolled_back":
            return (
                f"The job failed{where} and the device was restored to its previous firmware. "
                "Find the cause of the failed step (cable, power, image, profile) before "
                f"flashing again.{backup_text}"
            )
        if job.outcome == "cancelled":
            return (
                f"The job was cancelled. Run 'unbrick resume {job.id}' to continue it or roll "
                f"it back.{backup_text}"
            )
        if job.outcome == "failed":
            return (
                f"The job failed{where}. Check the cable, power and the device's mode, then run "
                f"'unbrick resume {job.id}': it re-reads the device and continues or rolls "
                f"back.{backup_text}"
            )
        return (
            f"The job did not finish (it was in state '{job.state}' when the journal ended: the "
            f"process stopped or is still running). Run 'unbrick resume {job.id}'.{backup_text}"
        )

    # ------------------------------------------------------------------ JSON Lines

    def _header(self) -> dict[str, Any]:
        job = self.job
        return {
            "type": "header",
            "format": FORMAT,
            "version": VERSION,
            "job": job.id,
            "kind": job.kind,
            "operator": job.operator,
            "created_at": job.created_at,
            "device_uri": job.device_uri,
            "device": job.device_identity,
            "image": job.image,
            "plan": job.plan,
            "options": job.options,
            "forced": [{"check": c, "reason": r} for c, r in self.forced],
        }

    def _footer(self) -> dict[str, Any]:
        return {
            "type": "footer",
            "job": self.job.id,
            "state": self.job.state,
            "outcome": self.job.outcome,
            "ended_at": self.ended_at,
            "duration_s": self.duration_s,
            "steps": len(self.steps),
            "failed_steps": [s.name for s in self.failed_steps],
            "warnings": self.warnings,
            "data": self.job.data,
        }

    def to_jsonl(self) -> str:
        """One JSON object per line: header, steps, events, footer (ends with a newline)."""
        lines = [self._header()]
        lines += [{"type": "step", **s.to_dict()} for s in self.steps]
        lines += [{"type": "event", **e.to_dict()} for e in self.events]
        lines.append(self._footer())
        return "".join(
            json.dumps(line, sort_keys=True, separators=(",", ":"), default=str) + "\n"
            for line in lines
        )

    # ------------------------------------------------------------------ Markdown

    def to_markdown(self) -> str:
        """A human repair report."""
        job = self.job
        outcome = job.outcome or f"unfinished ({job.state})"
        out = [f"# Repair report: {_device_name(job.device_identity)} — {outcome}", ""]
        identity = job.device_identity
        rows = [
            ("Job", f"{job.id} ({job.kind})"),
            ("Outcome", outcome),
            ("Operator", job.operator),
            ("Started", _utc(self.started_at)),
            ("Ended", _utc(self.ended_at)),
            ("Duration", format_duration(self.duration_s)),
            ("Device", _device_name(identity)),
            ("Link", job.device_uri),
        ]
        for label, key in (
            ("Hardware revision", "hw_revision"),
            ("Firmware before", "firmware_version"),
            ("Bootloader", "bootloader_version"),
        ):
            if identity.get(key):
                rows.append((label, str(identity[key])))
        if job.image:
            rows.append(("Image", _image_name(job.image)))
            if job.image.get("sha256"):
                rows.append(("Image SHA-256", f"`{job.image['sha256']}`"))
        if job.data.get("backup_id"):
            rows.append(("Backup", f"`{job.data['backup_id']}`"))
        out += ["| | |", "|---|---|"]
        out += [f"| {label} | {_cell(value)} |" for label, value in rows]
        out.append("")

        advice = self.advice()
        if advice:
            out += ["## Next step", "", advice, ""]

        if self.forced:
            out += ["## Forced checks", ""]
            out += [
                f"- `{check}`: {reason or '(no reason given)'}" for check, reason in self.forced
            ]
            out.append("")

        out += ["## Steps", ""]
        if self.steps:
            out += [
                "| # | Step | Started | Duration | Result | Details |",
                "|---|---|---|---|---|---|",
            ]
            for n, step in enumerate(self.steps, 1):
                result = step.result or "interrupted"
                details = step.error or _short_json({**step.args, **step.detail})
                out.append(
                    f"| {n} | {_cell(step.name)} | {_utc(step.started_at)} | "
                    f"{format_duration(step.duration_s)} | {_cell(result)} | {_cell(details)} |"
                )
        else:
            out.append("No steps were journaled.")
        out.append("")

        warnings = self.warnings
        if warnings:
            out += ["## Warnings", ""]
            out += [f"- {' '.join(w.split())}" for w in warnings]
            out.append("")

        excerpts = self.excerpts()
        if excerpts:
            out += ["## Log excerpts", ""]
            for title, lines in excerpts:
                shown = lines[-EXCERPT_LINES:]
                out += [f"### {title}", ""]
                if len(lines) > len(shown):
                    out += [f"(the last {len(shown)} of {len(lines)} lines)", ""]
                out += [_fence(shown), ""]
        return "\n".join(out).rstrip("\n") + "\n"


def summary_line(job: JobRecord) -> str:
    """One line for job listings: id, time, kind, outcome, device, image, operator."""
    status = job.outcome or f"({job.state})"
    return (
        f"{job.id}  {_utc(job.created_at)}  {job.kind:<7}  {status:<12}  "
        f"{_device_name(job.device_identity)}  {_image_name(job.image)}  [{job.operator}]"
    )


__all__ = ["FORMAT", "VERSION", "RepairLog", "format_duration", "summary_line"]
