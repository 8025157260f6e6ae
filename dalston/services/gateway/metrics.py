"""Prometheus metrics, read live from NATS: the engines' heartbeats and the task queues.

Queue depth per runtime and model is what an autoscaler wants (more engines of a runtime when
its queues grow); the engines' own counters say how busy and how big each one is.
"""

from __future__ import annotations

from dalston.bus.connection import Bus
from dalston.contracts import TASKS_STREAM
from dalston.engines import EngineWatch


def _line(name: str, labels: dict[str, str], value: float) -> str:
    rendered = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return f"{name}{{{rendered}}} {value:g}"


async def render_metrics(bus: Bus, engines: EngineWatch) -> str:
    lines = [
        "# HELP dalston_engine_up A live engine (1), by runtime, engine and status.",
        "# TYPE dalston_engine_up gauge",
    ]
    beats = engines.live()
    for beat in beats:
        lines.append(_line("dalston_engine_up", {"runtime": beat.runtime, "engine": beat.engine,
                                                 "status": beat.status}, 1))
    for name, help_text, field in (
        ("dalston_engine_tasks_done_total", "Tasks an engine finished.", "tasks_done"),
        ("dalston_engine_tasks_failed_total", "Tasks an engine failed.", "tasks_failed"),
        ("dalston_engine_model_loads_total", "Models an engine loaded.", "model_loads"),
        ("dalston_engine_rss_bytes", "Resident memory of an engine.", "rss_bytes"),
    ):
        kind = "counter" if name.endswith("_total") else "gauge"
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        lines += [_line(name, {"runtime": b.runtime, "engine": b.engine}, getattr(b, field)) for b in beats]
    lines += ["# HELP dalston_tasks_queued Tasks waiting in a queue (subject tasks.<runtime>.<model>).",
              "# TYPE dalston_tasks_queued gauge"]
    for subject, count in sorted((await bus.messages_by_subject(TASKS_STREAM, "tasks.>")).items()):
        _, runtime, model = subject.split(".", 2)
        lines.append(_line("dalston_tasks_queued", {"runtime": runtime, "model": model}, count))
    return "\n".join(lines) + "\n"
