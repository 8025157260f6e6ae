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
    """A job's stages in DAG order, e.g. `prepare:completed transcribe:3/10(fw-a,fw-b)`:
    a stage of one task shows its status, a stage of many (chunks, channels) how many are done,
    and the engines running it."""
    by_stage: dict[str, list] = {}
    for task in record.tasks.values():
        by_stage.setdefault(task.stage, []).append(task)
    parts = []
    for stage, tasks in by_stage.items():
        engines = ",".join(sorted({t.engine for t in tasks if t.status == "running" and t.engine}))
        done = sum(t.status == "completed" for t in tasks)
        state = tasks[0].status if len(tasks) == 1 else f"{done}/{len(tasks)}"
        parts.append(f"{stage}:{state}" + (f"({engines})" if engines else ""))
    return " ".join(parts)


def install_status(installed: bool, pull: PullProgress | None) -> str:
    """A model's `installed` column: a pull under way, a pull that failed, else yes or no."""
    if pull is not None and pull.status not in PULL_ENDED:
        return f"{pull.status} {percent(pull.completed_bytes, pull.total_bytes)}" if pull.total_bytes \
            else pull.message or pull.status
    if pull is not None and pull.status == "failed" and not installed:
        return "pull failed"
    return "yes" if installed else "no"
