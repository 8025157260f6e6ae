"""What CLI commands print: tables, `--json`, errors, a progress bar and a progress line
(sizes, ages and the like are `dalston.formatting`, shared with the dashboard)."""

from __future__ import annotations

import itertools
import json
import sys
from collections.abc import Iterable, Sequence
from typing import Any

from dalston.formatting import percent, size

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


def bar(completed: int, total: int | None, width: int = 24) -> str:
    """`[#########.........]  45%  66.5 MB / 147.9 MB`, or just the bytes when the total is unknown."""
    if not total:
        return size(completed)
    filled = min(width, width * completed // total)
    return f"[{'#' * filled}{'.' * (width - filled)}] {percent(completed, total):>4}  {size(completed)} / {size(total)}"


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
