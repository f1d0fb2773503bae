"""Front ends for engine events: JSON Lines for scripts, rich progress for people."""

from __future__ import annotations

import json
import sys
import threading
from types import TracebackType
from typing import TYPE_CHECKING, Any

from unbrick.engine.events import Event

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress as RichProgress
    from rich.progress import TaskID


class JsonLinesSink:
    """Every event as one JSON object per line on stdout (``--json``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def emit(self, event: Event) -> None:
        with self._lock:
            sys.stdout.write(json.dumps(event.to_dict(), default=str) + "\n")
            sys.stdout.flush()

    def result(self, obj: dict[str, Any]) -> None:
        self.emit(Event("result", "result", obj.get("job", ""), data=obj))

    def __enter__(self) -> JsonLinesSink:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


_SKIP_DETAIL = {"checks", "problems", "duration_s"}


def _brief(data: dict[str, Any]) -> str:
    parts = []
    for key, raw in data.items():
        if key in _SKIP_DETAIL or raw in (None, "", [], {}):
            continue
        value: Any = raw
        if isinstance(raw, float):
            value = round(raw, 2)
        if isinstance(raw, str) and len(raw) > 24 and key.endswith("_id"):
            value = raw[:12]
        parts.append(f"{key}={value}")
    return " ".join(parts)


class ConsoleSink:
    """Steps as lines and one rich progress bar (phase, bytes, rate, ETA)."""

    def __init__(self, console: Console | None = None, *, show_progress: bool = True) -> None:
        from rich.console import Console

        self.console = console or Console(stderr=True, highlight=False)
        self._bar: RichProgress | None = None
        self._task: TaskID | None = None
        self._show = show_progress and self.console.is_terminal
        self._lock = threading.Lock()

    def __enter__(self) -> ConsoleSink:
        if self._show:
            from rich.progress import (
                BarColumn,
                Progress,
                TaskProgressColumn,
                TextColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(
                TextColumn("{task.description:<28}"),
                BarColumn(),
                TaskProgressColumn(),
                TextColumn("{task.fields[rate]}"),
                TimeRemainingColumn(),
                console=self.console,
                transient=True,
            )
            self._bar.start()
            self._task = self._bar.add_task("starting", total=1.0, rate="")
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def emit(self, event: Event) -> None:
        with self._lock:
            self._emit(event)

    def _emit(self, event: Event) -> None:
        d = event.data
        if event.kind == "progress":
            if self._bar is not None and self._task is not None:
                rate = ""
                if d.get("unit") == "B" and d.get("rate"):
                    rate = f"{d['rate'] / 1e6:.1f} MB/s"
                self._bar.update(
                    self._task,
                    completed=d.get("fraction", 0.0),
                    description=str(d.get("phase", "")),
                    rate=rate,
                )
            return
        if event.kind == "step-start":
            return
        if event.kind == "step-end":
            took = d.get("duration_s")
            self.console.print(
                f"[green]ok[/]   {event.name:<20} {_brief(d)}"
                + (f" [dim]({took:.2f} s)[/]" if isinstance(took, float | int) else "")
            )
        elif event.kind == "step-error":
            self.console.print(f"[red]FAIL[/] {event.name:<20} {d.get('error', '')}")
        elif event.kind == "state" and (d.get("reason") or d.get("cause")):
            self.console.print(f"[yellow]{event.name}[/]: {d.get('reason') or d.get('cause')}")
        elif event.kind == "log" and event.name == "warning":
            self.console.print(f"[yellow]warning[/]: {d.get('text', '')}")
