"""Prometheus metrics (prometheus_client, one registry per app).

Two kinds. What NATS holds now, read at each scrape: live engines and their own counters, tasks
queued per runtime and model (what an autoscaler wants: more engines of a runtime when its
queues grow), and the unfinished jobs that the bound on queued jobs counts. And what happened to
jobs, observed as each one ends (the gateway follows every job record, see admission.py): job
latency and queue wait, audio seconds, real-time factor, refusals.

Every gateway follows every job, so each one's job metrics describe the whole Dalston: with
several gateways scrape one, or take the max across them, never the sum. Refusals at the front
door (`via="http"`) are each gateway's own and do add up.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from dalston.bus.connection import Bus
from dalston.contracts import TASKS_STREAM, JobRecord
from dalston.engines import EngineWatch

# Speech jobs take from a fraction of a second (a short clip, warm model) to an hour (a long
# recording in a queue).
SECONDS_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
# Processing seconds per audio second: 0.01 is a GPU at full speed, above 1 slower than real time.
RTF_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10)


class GatewayMetrics:
    def __init__(self, engines: EngineWatch, unfinished_jobs: Callable[[], int],
                 max_queued_jobs: int) -> None:
        self.registry = CollectorRegistry()
        self._live = _LiveState(engines, unfinished_jobs, max_queued_jobs)
        self.registry.register(self._live)
        self._jobs = Counter("dalston_jobs", "Jobs that ended, by model and status.",
                             ["model", "status"], registry=self.registry)
        self._latency = Histogram("dalston_job_duration_seconds",
                                  "Submission to result of completed jobs, by model.",
                                  ["model"], buckets=SECONDS_BUCKETS, registry=self.registry)
        self._queue_wait = Histogram("dalston_job_queue_wait_seconds",
                                     "Time a completed job had no task running (waiting in queues), "
                                     "by model.",
                                     ["model"], buckets=SECONDS_BUCKETS, registry=self.registry)
        self._audio = Counter("dalston_audio_seconds", "Seconds of audio transcribed, by model.",
                              ["model"], registry=self.registry)
        self._rtf = Histogram("dalston_real_time_factor",
                              "Seconds a transcribe task ran per second of its audio (a model load "
                              "it waited for included), by model and runtime.",
                              ["model", "runtime"], buckets=RTF_BUCKETS, registry=self.registry)
        self._refusals = Counter("dalston_refusals",
                                 "Requests and jobs refused by the front door's bounds, by reason "
                                 "(overloaded: DALSTON_MAX_QUEUED_JOBS, uploads_busy: "
                                 "DALSTON_MAX_CONCURRENT_UPLOADS) and where (http: this gateway; "
                                 "nats: jobs published straight to NATS, refused by the orchestrator).",
                                 ["reason", "via"], registry=self.registry)

    def refused(self, reason: str, via: str = "http") -> None:
        self._refusals.labels(reason, via).inc()

    def job_ended(self, record: JobRecord) -> None:
        self._jobs.labels(record.model, record.status).inc()
        if record.failure is not None and record.failure.code == "overloaded":
            self.refused("overloaded", "nats")
        if record.status != "completed":
            return
        latency = max(0.0, (record.finished_at or record.updated_at) - record.created_at)
        self._latency.labels(record.model).observe(latency)
        self._queue_wait.labels(record.model).observe(max(0.0, latency - _worked_seconds(record)))
        if record.duration:
            self._audio.labels(record.model).inc(record.duration)
            for task in record.tasks.values():
                if task.stage == "transcribe" and task.started_at and task.finished_at:
                    self._rtf.labels(record.model, record.runtime).observe(
                        (task.finished_at - task.started_at) / record.duration)

    async def render(self, bus: Bus) -> bytes:
        self._live.queued = await bus.messages_by_subject(TASKS_STREAM, "tasks.>")
        return generate_latest(self.registry)


def _worked_seconds(record: JobRecord) -> float:
    """Seconds in which at least one of the job's tasks ran (parallel tasks counted once)."""
    spans = sorted((t.started_at, t.finished_at) for t in record.tasks.values()
                   if t.started_at and t.finished_at)
    worked, reached = 0.0, float("-inf")
    for start, end in spans:
        if end > reached:
            worked += end - max(start, reached)
            reached = end
    return worked


class _LiveState(Collector):
    """Engines (from their heartbeats), queues and unfinished jobs as they are at the scrape."""

    def __init__(self, engines: EngineWatch, unfinished_jobs: Callable[[], int],
                 max_queued_jobs: int) -> None:
        self._engines = engines
        self._unfinished_jobs = unfinished_jobs
        self._max_queued_jobs = max_queued_jobs
        self.queued: dict[str, int] = {}  # tasks per subject, read just before the scrape

    def collect(self) -> Iterator[Metric]:
        beats = self._engines.live()
        up = GaugeMetricFamily("dalston_engine_up", "A live engine (1), by runtime, engine and status.",
                               labels=["runtime", "engine", "status"])
        for beat in beats:
            up.add_metric([beat.runtime, beat.engine, beat.status], 1)
        yield up
        for name, help_text, field in (
            ("dalston_engine_tasks_done", "Tasks an engine finished.", "tasks_done"),
            ("dalston_engine_tasks_failed", "Tasks an engine failed.", "tasks_failed"),
            ("dalston_engine_model_loads", "Models an engine loaded.", "model_loads"),
        ):
            counter = CounterMetricFamily(name, help_text, labels=["runtime", "engine"])
            for beat in beats:
                counter.add_metric([beat.runtime, beat.engine], getattr(beat, field))
            yield counter
        rss = GaugeMetricFamily("dalston_engine_rss_bytes", "Resident memory of an engine.",
                                labels=["runtime", "engine"])
        for beat in beats:
            rss.add_metric([beat.runtime, beat.engine], beat.rss_bytes)
        yield rss
        queued = GaugeMetricFamily("dalston_tasks_queued",
                                   "Tasks waiting in a queue (subject tasks.<runtime>.<model>).",
                                   labels=["runtime", "model"])
        for subject, count in sorted(self.queued.items()):
            _, runtime, model = subject.split(".", 2)
            queued.add_metric([runtime, model], count)
        yield queued
        yield GaugeMetricFamily("dalston_jobs_unfinished",
                                "Jobs queued or running, as the bound on queued jobs counts them.",
                                value=self._unfinished_jobs())
        yield GaugeMetricFamily("dalston_max_queued_jobs", "The bound on unfinished jobs "
                                "(DALSTON_MAX_QUEUED_JOBS).", value=self._max_queued_jobs)
