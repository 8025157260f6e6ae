"""Runs one service in this process until SIGINT or SIGTERM: gateway, orchestrator, webhooks,
the Wyoming server, an engine of one runtime, or the layout keeper (the admin step, as a service)."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import signal

from dalston import tracing
from dalston.catalog import Catalog
from dalston.config import Settings
from dalston.logs import configure, get_logger

log = get_logger("dalston.service")


# A service still running this long after it was told to stop is cancelled: one that cannot
# reach NATS keeps retrying its connect (minutes) and would not see its stop until then.
STOP_GRACE_SECONDS = 30.0


async def _until_signalled(service) -> None:
    loop = asyncio.get_running_loop()
    signalled = asyncio.Event()

    def stop() -> None:
        service.stop()
        signalled.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)
    run = asyncio.ensure_future(service.run())
    await asyncio.wait([run, asyncio.ensure_future(signalled.wait())], return_when=asyncio.FIRST_COMPLETED)
    try:
        await asyncio.wait_for(asyncio.shield(run), STOP_GRACE_SECONDS)
    except TimeoutError:
        log.warning("service not stopped in time; cancelled", seconds=STOP_GRACE_SECONDS)
        run.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await run


def actor_class(catalog: Catalog, runtime: str):
    """The actor class a runtime's catalog entry names (`module:Class`)."""
    module, _, name = catalog.runtime(runtime).actor.partition(":")
    return getattr(importlib.import_module(module), name)


def serve(service: str, settings: Settings, runtime: str | None = None) -> None:
    configure(settings.log_level, settings.log_format)
    # Traces where the OTEL_* variables ask for them: an engine is named by its runtime.
    if tracing.setup(runtime or settings.runtime if service == "engine" else service):
        log.info("traces on", exporters=",".join(tracing.exporter_names()))
    if service == "gateway":
        import uvicorn

        from dalston.services.gateway.app import create_app

        uvicorn.run(create_app(settings), host=settings.http_host, port=settings.http_port,
                    log_level="warning", access_log=False)
    elif service == "orchestrator":
        from dalston.services.orchestrator import Orchestrator

        asyncio.run(_until_signalled(Orchestrator(settings)))
    elif service == "layout":
        from dalston.services.layout import LayoutKeeper

        asyncio.run(_until_signalled(LayoutKeeper(settings)))
    elif service == "webhooks":
        from dalston.services.webhooks import WebhookService

        asyncio.run(_until_signalled(WebhookService(settings)))
    elif service == "wyoming":
        from dalston.services.wyoming.server import WyomingServer

        asyncio.run(_until_signalled(WyomingServer(settings, Catalog.from_settings(settings))))
    elif service == "engine":
        from dalston.sdk import memory
        from dalston.sdk.engine import Engine

        # Before the runtime's libraries start threads of their own: a thread that allocated
        # before the limit keeps an arena of its own, where freed model memory strands.
        memory.limit_malloc_arenas()
        catalog = Catalog.from_settings(settings)
        runtime = runtime or settings.runtime
        actor = actor_class(catalog, runtime)(settings)
        asyncio.run(_until_signalled(Engine(actor, settings, catalog)))
    else:
        raise ValueError(f"unknown service {service!r}")
