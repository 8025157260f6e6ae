"""OpenTelemetry traces: off unless the standard `OTEL_*` variables ask for them.

A service calls `setup(service)` once at start. With no exporter named (OTEL_TRACES_EXPORTER
unset or `none`, and no OTLP endpoint) or OTEL_SDK_DISABLED=true, no SDK is loaded and every
helper here is a no-op: no span objects, no headers, and not even the OpenTelemetry API is
imported (every CLI call goes through the bus). Otherwise each process exports its spans
(OTLP over HTTP, or `console`) with the SDK's batch processor, which reads OTEL_BSP_* itself;
the OTLP exporter reads OTEL_EXPORTER_OTLP_* itself.

The W3C trace context (traceparent, tracestate) crosses processes in NATS message headers: the
bus injects it (`headers`) and restores it around a handler (`continued`); nothing else does.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from typing import Any

from dalston.config import ConfigError

_tracer: Any = None  # an opentelemetry Tracer while traces are on
_enabled = False
# Span kinds, by the names of opentelemetry.trace.SpanKind.
SERVER, INTERNAL = "SERVER", "INTERNAL"
# The header names of the W3C trace context; a message carries no others for tracing.
TRACE_HEADERS = ("traceparent", "tracestate")


def enabled() -> bool:
    return _enabled


def exporter_names(environ: Mapping[str, str] = os.environ) -> list[str]:
    """The span exporters the variables ask for; none: traces are off."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    named = [n.strip().lower() for n in environ.get("OTEL_TRACES_EXPORTER", "").split(",") if n.strip()]
    endpoint = environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    if not named and endpoint:
        named = ["otlp"]  # an endpoint alone says where to send them: send them
    return [n for n in named if n != "none"]


def _exporter(name: str, environ: Mapping[str, str]):
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if name != "otlp":
        raise ConfigError(f"OTEL_TRACES_EXPORTER={name!r}: Dalston exports traces by 'otlp' or 'console'")
    protocol = environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") \
        or "http/protobuf"
    try:
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        elif protocol == "http/protobuf":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        else:
            raise ConfigError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r}: Dalston sends 'http/protobuf' "
                              "(or 'grpc', with opentelemetry-exporter-otlp-proto-grpc installed)")
    except ImportError as exc:
        raise ConfigError(f"OTLP traces ({protocol}) need the OTLP exporter: pip install 'dalston[otel]' "
                          f"({exc})") from None
    return OTLPSpanExporter()


def setup(service: str, environ: Mapping[str, str] = os.environ) -> bool:
    """Export this process's spans as the `OTEL_*` variables say; whether traces are on. The
    service name is OTEL_SERVICE_NAME, else `dalston-<service>`. ConfigError (the service does
    not start) for an exporter that cannot be had."""
    names = exporter_names(environ)
    if not names:
        return False
    exporters = [_exporter(name, environ) for name in names]
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    # Resource.create reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES; attributes given
    # here would override them, so the default name is given only where none is set.
    default = {} if environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: f"dalston-{service}"}
    provider = TracerProvider(resource=Resource.create({**default, "dalston.service": service}))
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    from opentelemetry import trace

    trace.set_tracer_provider(provider)  # for libraries that trace through the global one
    install(provider)
    return True


def install(provider: Any) -> None:
    """Record Dalston's spans with `provider` (an SDK TracerProvider) from now on; None: record
    none again. `setup` calls it; tests install an in-memory one."""
    global _enabled, _tracer
    _enabled = provider is not None
    _tracer = provider.get_tracer("dalston") if provider is not None else None


def span(name: str, *, start: float | None = None, kind: str = INTERNAL, **attributes: Any):
    """A span around a block, current within it (children take it as parent). `start` (wall
    clock, seconds) begins it earlier: a task's span starts when the task was published.
    Attributes that are None are left out; the rest become `dalston.<name>`."""
    if not _enabled:
        return nullcontext()
    from opentelemetry.trace import SpanKind

    return _tracer.start_as_current_span(
        name, kind=SpanKind[kind], start_time=None if start is None else int(start * 1e9),
        attributes={k if "." in k else f"dalston.{k}": v for k, v in attributes.items() if v is not None})


def past_span(name: str, start: float | None) -> None:
    """A span from `start` (wall clock, seconds) to now, under the current one: what happened
    before anyone could open a span (a message's wait in its queue)."""
    if not _enabled or start is None:
        return
    _tracer.start_span(name, start_time=int(start * 1e9)).end(end_time=int(max(start, time.time()) * 1e9))


def headers(existing: dict[str, str] | None = None) -> dict[str, str] | None:
    """`existing` message headers with the current trace context added (none while off)."""
    if not _enabled:
        return existing
    from opentelemetry import propagate

    carrier = dict(existing or {})
    propagate.inject(carrier)
    return carrier or None


def carrier() -> dict[str, str]:
    """The current trace context as W3C headers, to keep with what outlives a message (a job's
    record); {} while off."""
    return headers() or {}


def continued(carried: Mapping[str, str] | None):
    """The trace context `carried` (message headers, a kept carrier) is current within the block."""
    if not _enabled or not carried or "traceparent" not in carried:
        return nullcontext()
    from opentelemetry import propagate

    # Only the W3C fields, bounded: headers come from any publisher.
    return _attached(propagate.extract({k: str(carried[k])[:512] for k in TRACE_HEADERS if k in carried}))


@contextmanager
def _attached(carried_context: Any) -> Iterator[None]:
    from opentelemetry import context

    token = context.attach(carried_context)
    try:
        yield
    finally:
        context.detach(token)


def record_status(current_span: Any, status: int) -> None:
    """An HTTP answer's status on its span (an error for 5xx, as the conventions say)."""
    if current_span is None:
        return
    current_span.set_attribute("http.response.status_code", status)
    if status >= 500:
        from opentelemetry.trace import Status, StatusCode

        current_span.set_status(Status(StatusCode.ERROR))
