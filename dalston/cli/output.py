"""What CLI commands print: tables, `--json`, sizes and ages, errors, and a progress line."""

from __future__ import annotations

import itertools
import json
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any

from dalston.contracts import JobRecord

SPINNER = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"


class CliError(Exception):
    """Ends a command: `message` goes to stderr as `dalston: message`, `code` is the exit status."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def add_json_option(parser, default: Any = False) -> None:
    """`--json`; subcommands of a group that has it pass `argparse.SUPPRESS`, so that
    `dalston jobs --json get ID` keeps the group's value."""
    parser.add_argument("--json", action="store_true", default=default, help="print JSON")


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str))


def error(message: str) -> None:
    print(f"dalston: {message}", file=sys.stderr)


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Plain columns, left-aligned, two spaces apart (as `docker ps` prints them)."""
    cells = [[str(h).upper() for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


def size(n: int | None) -> str:
    if not n:
        return "-"
    value, unit = float(n), "B"
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            break
        value /= 1000
    return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"


def ago(at: float | None, now: float | None = None) -> str:
    if not at:
        return "-"
    seconds = max(0.0, (now or time.time()) - at)
    if seconds < 90:
        return f"{seconds:.0f}s ago"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f}m ago"
    if seconds < 36 * 3600:
        return f"{seconds / 3600:.0f}h ago"
    return f"{seconds / 86400:.0f}d ago"


def percent(completed: int, total: int | None) -> str:
    return f"{100 * completed / total:.0f}%" if total else size(completed)


def bar(completed: int, total: int | None, width: int = 24) -> str:
    """`[#########.........]  45%  66.5 MB / 147.9 MB`, or just the bytes when the total is unknown."""
    if not total:
        return size(completed)
    filled = min(width, width * completed // total)
    return f"[{'#' * filled}{'.' * (width - filled)}] {percent(completed, total):>4}  {size(completed)} / {size(total)}"


def stages(record: JobRecord) -> str:
    """A job's tasks in DAG order, e.g. `prepare:completed transcribe-0:running(fw-a)`."""
    return " ".join(f"{key}:{task.status}" + (f"({task.engine})" if task.status == "running" and task.engine else "")
                    for key, task in record.tasks.items())


class StatusLine:
    """One self-rewriting line on stderr with a spinner; silent unless stderr is a terminal."""

    def __init__(self) -> None:
        self.enabled = sys.stderr.isatty()
        self._frames = itertools.cycle(SPINNER)

    def show(self, text: str) -> None:
        if self.enabled:
            sys.stderr.write(f"\r\x1b[K{next(self._frames)} {text}")
            sys.stderr.flush()

    def clear(self) -> None:
        if self.enabled:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()

    def __enter__(self) -> StatusLine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.clear()
