"""Facts as people read them, shared by the CLI and the dashboard: sizes, ages, progress, a
job's stages and a model's install state."""

from __future__ import annotations

import time

from dalston.contracts import PULL_ENDED, JobRecord, PullProgress


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


def stages(record: JobRecord) -> str:
    """A job's tasks in DAG order, e.g. `prepare:completed transcribe-0:running(fw-a)`."""
    return " ".join(f"{key}:{task.status}" + (f"({task.engine})" if task.status == "running" and task.engine else "")
                    for key, task in record.tasks.items())


def install_status(installed: bool, pull: PullProgress | None) -> str:
    """A model's `installed` column: a pull under way, a pull that failed, else yes or no."""
    if pull is not None and pull.status not in PULL_ENDED:
        return f"{pull.status} {percent(pull.completed_bytes, pull.total_bytes)}" if pull.total_bytes \
            else pull.message or pull.status
    if pull is not None and pull.status == "failed" and not installed:
        return "pull failed"
    return "yes" if installed else "no"
