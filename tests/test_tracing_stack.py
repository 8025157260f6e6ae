"""Traces across a real stack: every `dalston serve` process configured by the standard OTEL_*
variables alone, exporting over OTLP/HTTP to a receiver here that reads the protobuf as a
collector would. One job is one trace across the processes, its spans in causal order (HTTP
request -> admission -> orchestrator steps -> tasks with their queue wait, model load and decode
-> merge -> webhook); a realtime session is one trace, with a span per turn."""

from __future__ import annotations

import base64

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from tests.stack import AUDIO, TestStack, wait_for, wait_job
from tests.test_realtime import COMPLETED, RATE, configured, connect, pcm
from tests.test_tracing import Span, ancestry, children, one
from tests.test_webhooks import WEBHOOK_ENV
from tests.webhook_receiver import Receiver

MODEL = "faster-whisper-tiny.en"


def exported(collector: Receiver) -> list[Span]:
    """Every span the services sent to the collector, with its service's name."""
    spans = []
    for delivery in list(collector.deliveries):
        for resource in ExportTraceServiceRequest.FromString(delivery.body).resource_spans:
            service = next(a.value.string_value for a in resource.resource.attributes if a.key == "service.name")
            for scope in resource.scope_spans:
                for s in scope.spans:
                    attributes = {a.key: getattr(a.value, a.value.WhichOneof("value")) for a in s.attributes}
                    spans.append(Span(name=s.name, trace=s.trace_id.hex(), id=s.span_id.hex(),
                                      parent=s.parent_span_id.hex(), start=s.start_time_unix_nano,
                                      end=s.end_time_unix_nano, attributes=attributes, service=service))
    return spans


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    """A stack whose every process exports its spans over OTLP/HTTP to `collector`, told so by
    the OTEL_* variables alone; with the webhook service."""
    collector = Receiver()
    otel = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_BSP_SCHEDULE_DELAY": "100",
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{collector.server.server_port}"}
    stack = TestStack.running(tmp_path_factory.mktemp("traced"), "fw", **WEBHOOK_ENV, **otel)
    stack.start("webhooks", "webhooks")
    yield stack, collector
    stack.close()
    collector.close()


async def test_a_job_across_the_processes_is_one_trace_in_causal_order(traced):
    stack, collector = traced
    hooks = Receiver()
    try:
        with open(AUDIO / "speaker1.wav", "rb") as audio:
            response = httpx.post(f"{stack.url}/v1/jobs", files={"file": audio},
                                  data={"model": MODEL, "webhook_url": hooks.url})
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]
        assert (await wait_job(stack, job_id))["status"] == "completed"
        async def delivered():
            return hooks.accepted()
        await wait_for(delivered, 30)

        async def all_spans():
            spans = exported(collector)
            done = {s.name for s in spans if s.attributes.get("dalston.job") == job_id}
            return spans if {"webhook delivery", "admission"} <= done else None
        spans = await wait_for(all_spans, 30)
    finally:
        hooks.close()
    admission = one(spans, "admission", job=job_id)
    job = [s for s in spans if s.trace == admission.trace]
    # Every span of the job, and every process it crossed, in one trace.
    assert all(s.trace == admission.trace for s in spans if s.attributes.get("dalston.job") == job_id)
    assert {s.service for s in job} == {"dalston-gateway", "dalston-orchestrator", "dalston-audio-prepare",
                                        "dalston-faster-whisper", "dalston-merge", "dalston-webhooks"}
    request = one(job, "POST /v1/jobs")
    assert request.attributes["http.response.status_code"] == 202 and not request.parent
    assert ancestry(job, one(job, "decode")) == ["task transcribe", "orchestrator task event", "task prepare",
                                                 "orchestrator submit", "admission", "POST /v1/jobs"]
    transcribe = one(job, "task transcribe")
    assert {"queue wait", "model load", "decode"} <= set(children(job, transcribe))
    for stage in ("prepare", "transcribe", "merge"):
        task = one(job, f"task {stage}")
        wait = one([s for s in job if s.parent == task.id], "queue wait")
        assert task.start == wait.start <= wait.end <= task.end
    assert ancestry(job, one(job, "merge"))[:3] == ["task merge", "orchestrator task event", "task transcribe"]
    assert ancestry(job, one(job, "webhook delivery"))[:2] == ["orchestrator task event", "task merge"]


async def test_a_realtime_session_is_one_trace_with_a_span_per_turn(traced, tmp_path):
    stack, collector = traced
    audio = pcm(AUDIO / "speaker1.wav", tmp_path)
    async with connect(stack) as connection:
        events = await configured(connection, None)
        for turn in range(2):
            for start in range(0, len(audio), RATE * 2):  # a second at a time
                second = audio[start:start + RATE * 2]
                await connection.input_audio_buffer.append(audio=base64.b64encode(second).decode())
            await connection.input_audio_buffer.commit()
            await events.until(COMPLETED, turn + 1)
        events.stop()

    async def session_spans():
        spans = exported(collector)
        return spans if {"realtime session", "engine session"} <= {s.name for s in spans} else None
    spans = await wait_for(session_spans, 30)
    session = one(spans, "realtime session")
    in_trace = [s for s in spans if s.trace == session.trace]
    engine_session = one(in_trace, "engine session", session=session.attributes["dalston.session"])
    assert engine_session.parent == session.id and engine_session.service == "dalston-faster-whisper"
    turns = [s for s in in_trace if s.name == "turn"]
    assert len(turns) == 2 and all(t.parent == engine_session.id for t in turns)
    assert all(s.trace == session.trace for s in spans if s.name in ("turn", "engine session"))
