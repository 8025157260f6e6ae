"""The admin step: the JetStream layout, with a task queue for every model of the catalog,
applied as NATS's admin user before the services start (which may only read it: see
nats/accounts.conf). `dalston up` runs it whenever its embedded nats-server (re)starts; compose
runs it as the `layout` service, which also puts back what a restarted nats-server lost (its
memory stream of heartbeats)."""

from __future__ import annotations

import asyncio

from dalston.bus.connection import connect
from dalston.catalog import Catalog
from dalston.config import Settings
from dalston.contracts import HEARTBEATS_STREAM
from dalston.logs import get_logger

log = get_logger("dalston.layout")

CHECK_SECONDS = 5.0


def task_queues(catalog: Catalog) -> list[tuple[str, str | None]]:
    """Every (runtime, runtime model id) a task can be published for: each model of each
    runtime, and each runtime without one."""
    return [*{(m.runtime, m.runtime_model_id) for m in catalog.models.values()},
            *((runtime, None) for runtime in catalog.runtimes)]


async def apply_layout(settings: Settings) -> None:
    bus = await connect(settings, name="dalston-layout",
                        task_queues=task_queues(Catalog.from_settings(settings)))
    await bus.close()


class LayoutKeeper:
    """`dalston serve layout`: applies the layout, then applies it again whenever NATS has lost
    part of it (a restarted server has no memory streams)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        queues = task_queues(Catalog.from_settings(self.settings))
        bus = await connect(self.settings, name="dalston-layout", task_queues=queues)
        log.info("layout applied")
        try:
            while not self._stopping.is_set():
                try:
                    await asyncio.wait_for(self._stopping.wait(), CHECK_SECONDS)
                except TimeoutError:
                    pass
                if not self._stopping.is_set() and await bus.stream_problem(HEARTBEATS_STREAM):
                    try:
                        await bus.ensure_layout(queues)
                        log.info("layout applied again")
                    except Exception as exc:  # noqa: BLE001 - NATS restarting: next round
                        log.warning("layout not applied; retrying", error=repr(exc))
        finally:
            await bus.close()
