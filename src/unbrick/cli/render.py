"""Rendering helpers shared by commands: JSON output and rich tables."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table


def stdout_console() -> Console:
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True)


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=None, sort_keys=False) + "\n")
    sys.stdout.flush()


def _fmt_value(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0x10000:
        return f"{value} (0x{value:x})"
    if isinstance(value, list | dict):
        text = json.dumps(value)
        return text if len(text) <= 160 else text[:157] + "..."
    return str(value)


def details_table(details: dict[str, Any]) -> Table:
    from rich.table import Table

    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="dim")
    table.add_column()
    for key, value in details.items():
        table.add_row(key, _fmt_value(value))
    return table
