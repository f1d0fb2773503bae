"""Structured events and hierarchical, weighted progress, delivered to an injected sink.

Every device operation emits a step event (start, end, args, result or error, duration); the
repair log and (later) the audit log subscribe to them. Progress is a tree of weighted phases:
a parent's fraction is the weighted sum of its children's, so the overall bar never jumps back
when a phase starts.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class Event:
    """One thing that happened. ``kind``: step-start, step-end, step-error, progress, log,
    state, prompt. ``job`` is the job id (empty outside a job)."""

    kind: str
    name: str
    job: str = ""
    at: float = field(default_factory=time.time)
    data: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "job": self.job,
            "at": self.at,
            **({"data": self.data} if self.data else {}),
        }


class EventSink(Protocol):
    def emit(self, event: Event) -> None: ...


class NullSink:
    def emit(self, event: Event) -> None:
        return None


class ListSink:
    """Keeps every event (tests, and the repair log of one job)."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self._lock = threading.Lock()

    def emit(self, event: Event) -> None:
        with self._lock:
            self.events.append(event)

    def names(self, kind: str | None = None) -> list[str]:
        return [e.name for e in self.events if kind is None or e.kind == kind]


class FanOut:
    """Delivers each event to several sinks."""

    def __init__(self, *sinks: EventSink) -> None:
        self.sinks = list(sinks)

    def emit(self, event: Event) -> None:
        for sink in self.sinks:
            sink.emit(event)


class Progress:
    """A node of the progress tree.

    ``child(name, weight)`` adds a phase; ``advance(n)``/``set(done)`` move a leaf measured in
    ``total`` units (bytes, usually). Updates are reported to ``on_change`` of the root at most
    every ``interval_s`` seconds (and always on completion).
    """

    def __init__(
        self,
        name: str = "job",
        total: float = 1.0,
        *,
        parent: Progress | None = None,
        weight: float = 1.0,
        unit: str = "",
        on_change: Callable[[Progress], None] | None = None,
        interval_s: float = 0.1,
    ) -> None:
        self.name = name
        self.total = max(total, 0.0)
        self.done = 0.0
        self.unit = unit
        self.weight = weight
        self.parent = parent
        self.children: list[Progress] = []
        self.on_change = on_change
        self.interval_s = interval_s
        self.started = time.monotonic()
        self._last_report = 0.0
        self.finished = False

    @property
    def root(self) -> Progress:
        node = self
        while node.parent is not None:
            node = node.parent
        return node

    @property
    def path(self) -> str:
        parts = []
        node: Progress | None = self
        while node is not None:
            parts.append(node.name)
            node = node.parent
        return "/".join(reversed(parts))

    def child(self, name: str, weight: float = 1.0, total: float = 1.0, unit: str = "") -> Progress:
        node = Progress(name, total, parent=self, weight=weight, unit=unit)
        self.children.append(node)
        return node

    @property
    def fraction(self) -> float:
        if self.finished:
            return 1.0
        if self.children:
            weights = sum(c.weight for c in self.children)
            if weights <= 0:
                return 0.0
            return min(1.0, sum(c.fraction * c.weight for c in self.children) / weights)
        if self.total <= 0:
            return 0.0
        return min(1.0, self.done / self.total)

    def rate(self) -> float:
        """Units per second of this leaf since it started."""
        elapsed = time.monotonic() - self.started
        return self.done / elapsed if elapsed > 0 else 0.0

    def eta_s(self) -> float | None:
        f = self.root.fraction
        elapsed = time.monotonic() - self.root.started
        if f <= 0.0 or elapsed <= 0:
            return None
        return elapsed * (1 - f) / f

    def advance(self, n: float) -> None:
        self.done = min(self.total, self.done + n) if self.total else self.done + n
        self._changed(False)

    def set(self, done: float) -> None:
        self.done = done
        self._changed(False)

    def finish(self) -> None:
        self.done = self.total
        self.finished = True
        self._changed(True)

    @contextmanager
    def phase(
        self, name: str, weight: float = 1.0, total: float = 1.0, unit: str = ""
    ) -> Iterator[Progress]:
        node = self.child(name, weight, total, unit)
        node._changed(True)
        try:
            yield node
        finally:
            node.finish()

    def _changed(self, force: bool) -> None:
        root = self.root
        if root.on_change is None:
            return
        now = time.monotonic()
        if force or now - root._last_report >= root.interval_s:
            root._last_report = now
            root.on_change(self)


def progress_event(node: Progress, job: str = "") -> Event:
    return Event(
        kind="progress",
        name=node.path,
        job=job,
        data={
            "fraction": round(node.root.fraction, 4),
            "phase": node.name,
            "done": node.done,
            "total": node.total,
            "unit": node.unit,
            "rate": round(node.rate(), 1),
            "eta_s": None if (eta := node.eta_s()) is None else round(eta, 1),
        },
    )
