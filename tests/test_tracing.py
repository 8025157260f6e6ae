"""Traces (dalston.tracing): off by default; on, one job is one trace, its spans in causal order
(orchestrator steps -> tasks with their queue wait -> work), kept across an orchestrator's
restart. In one process on the in-memory bus with the SDK's in-memory exporter: seconds, no
nats-server. Across real processes: test_tracing_stack.py."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from actors.audio_prepare.actor import AudioPrepareActor
from actors.merge.actor import MergeActor
from dalston import tracing
from dalston.bus.memory import MemoryBus
from dalston.config import ConfigError
from dalston.contracts import SUBMIT_SUBJECT, JobRequest
from dalston.services.orchestrator import Orchestrator
from tests.test_inprocess import SayingTranscriber, engines, events_of, running, settings, until, wav


@dataclass
class Span:
    """A finished span, from either exporter: ids as hex."""

    name: str
    trace: str
    id: str
    parent: str
    start: int  # ns
    end: int
    attributes: dict
    service: str = ""


def ancestry(spans: list[Span], span: Span) -> list[str]:
    """The names of `span`'s parents, nearest first, as far as the spans go."""
    by_id = {s.id: s for s in spans}
    names = []
    while span.parent in by_id:
        span = by_id[span.parent]
        names.append(span.name)
    return names


def children(spans: list[Span], span: Span) -> list[str]:
    return sorted(s.name for s in spans if s.parent == span.id)


def one(spans: list[Span], name: str, **attributes) -> Span:
    (found,) = [s for s in spans if s.name == name
                and all(s.attributes.get(f"dalston.{k}") == v for k, v in attributes.items())]
    return found


# --- off by default ------------------------------------------------------------------------------


def test_traces_are_off_unless_an_exporter_or_endpoint_is_named():
    assert tracing.exporter_names({}) == []
    assert tracing.exporter_names({"OTEL_TRACES_EXPORTER": "none"}) == []
    assert tracing.exporter_names({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}) == []
    assert tracing.exporter_names({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}) == ["otlp"]
    assert tracing.exporter_names({"OTEL_TRACES_EXPORTER": "console, otlp"}) == ["console", "otlp"]
    assert tracing.setup("gateway", {}) is False
    # Off: messages get no headers of it, and spans are nothing.
    assert not tracing.enabled()
    assert tracing.headers() is None and tracing.headers({"Nats-Msg-Id": "m"}) == {"Nats-Msg-Id": "m"}
    with tracing.span("nothing") as span:
        assert span is None
    assert tracing.carrier() == {}


def test_traces_off_do_not_even_import_opentelemetry():
    """Every CLI call and service goes through the bus: while off it loads nothing of it."""
    probe = ("import sys, dalston.bus.connection, dalston.sdk.engine, dalston.services.gateway.app; "
             "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                          env={k: v for k, v in os.environ.items() if not k.startswith("OTEL_")})
    assert done.stdout.strip() == "[]"


def test_an_exporter_that_cannot_be_had_stops_the_service_with_a_clear_error():
    with pytest.raises(ConfigError, match="OTEL_TRACES_EXPORTER='zipkin'"):
        tracing.setup("gateway", {"OTEL_TRACES_EXPORTER": "zipkin"})
    with pytest.raises(ConfigError, match="http/json"):
        tracing.setup("gateway", {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"})
    assert not tracing.enabled()


# --- in one process ---------------------------------------------------------------------------


@pytest.fixture
def memory_spans():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(provider)
    yield exporter
    tracing.install(None)


def finished(exporter: InMemorySpanExporter) -> list[Span]:
    """The spans finished so far; each one encodes as OTLP (an attribute of a wrong type would not)."""
    encode_spans(exporter.get_finished_spans())
    return [Span(name=s.name, trace=f"{s.context.trace_id:032x}", id=f"{s.context.span_id:016x}",
                 parent=f"{s.parent.span_id:016x}" if s.parent else "", start=s.start_time, end=s.end_time,
                 attributes=dict(s.attributes or {}))
            for s in exporter.get_finished_spans()]


async def test_a_job_on_the_memory_bus_is_one_trace_in_causal_order(tmp_path, memory_spans):
    config = settings(tmp_path)
    bus = MemoryBus(config)
    events = await events_of(bus)
    services = [Orchestrator(config), *engines(tmp_path, (AudioPrepareActor, "prepare"), (SayingTranscriber, "fw"),
                                               (MergeActor, "merge"))]
    async with running(bus, *services):
        with tracing.span("client"):
            await bus.publish(SUBMIT_SUBJECT, JobRequest(id="traced", audio=wav(3), filename="tone.wav"))
        assert (await events.ended("traced")).status == "completed"
    record = await bus.jobs.get("traced")
    assert record.trace["traceparent"].startswith("00-")  # kept with the job
    spans = finished(memory_spans)
    client = one(spans, "client")
    assert {s.trace for s in spans} == {client.trace}
    decode = one(spans, "decode")
    assert ancestry(spans, decode) == ["task transcribe", "orchestrator task event", "task prepare",
                                       "orchestrator submit", "client"]
    assert ancestry(spans, one(spans, "merge"))[:3] == ["task merge", "orchestrator task event", "task transcribe"]
    for stage in ("prepare", "transcribe", "merge"):
        task = one(spans, f"task {stage}", job="traced")
        wait = one([s for s in spans if s.parent == task.id], "queue wait")
        work = next(s for s in spans if s.parent == task.id and s.name != "queue wait")
        # The task's span starts at its publication: the wait, then the work.
        assert task.start == wait.start <= wait.end <= work.start <= work.end <= task.end


async def test_a_restarted_orchestrator_carries_on_in_the_jobs_trace(tmp_path, memory_spans):
    """The trace context is kept with what persists: the task messages in their stream, and the
    job's record (for steps no message starts, such as a timeout)."""
    config = settings(tmp_path)
    bus = MemoryBus(config)
    events = await events_of(bus)
    async with running(bus, Orchestrator(config), *engines(tmp_path, (AudioPrepareActor, "prepare"))):
        with tracing.span("client"):
            await bus.publish(SUBMIT_SUBJECT, JobRequest(id="restarted", audio=wav(3)))
        await until(lambda: bus.messages_by_subject("TASKS", "tasks.faster-whisper.>"))
    # Another orchestrator, and the engines the job waited for.
    waited_for = engines(tmp_path, (SayingTranscriber, "fw"), (MergeActor, "merge"))
    async with running(bus, Orchestrator(config), *waited_for):
        assert (await events.ended("restarted")).status == "completed"
    spans = finished(memory_spans)
    assert {s.trace for s in spans} == {one(spans, "client").trace}
    assert ancestry(spans, one(spans, "merge"))[-3:] == ["task prepare", "orchestrator submit", "client"]


async def test_a_timeout_joins_the_jobs_trace_by_its_record(tmp_path, memory_spans):
    config = settings(tmp_path, DALSTON_ENGINE_WAIT="0.1")
    bus = MemoryBus(config)
    events = await events_of(bus)
    async with running(bus, Orchestrator(config)):  # no engine: the job times out
        with tracing.span("client"):
            await bus.publish(SUBMIT_SUBJECT, JobRequest(id="waited", audio=wav(1)))
        assert (await events.ended("waited")).failure.code == "no_engine"
    spans = finished(memory_spans)
    assert ancestry(spans, one(spans, "orchestrator timeout")) == ["orchestrator submit", "client"]


def test_a_hostile_trace_header_starts_a_new_trace(memory_spans):
    for carried in ({"traceparent": "00-zz-not-hex-01"}, {"traceparent": "x" * 100_000, "tracestate": "y" * 100_000},
                    {"traceparent": 7}, {"tracestate": "only"}):
        with tracing.continued(carried), tracing.span("handled"):
            pass
    spans = finished(memory_spans)
    assert [s.name for s in spans] == ["handled"] * 4 and all(not s.parent for s in spans)
    assert len({s.trace for s in spans}) == 4
