"""`dalston serve wyoming`: Home Assistant's Wyoming protocol on DALSTON_WYOMING_HOST and
DALSTON_WYOMING_PORT (127.0.0.1:10300), its jobs taken in over NATS by the intake the gateway
uses, with no HTTP in between.

Wyoming carries no credentials. Beyond loopback the server therefore refuses to start without
DALSTON_WYOMING_API_KEY, a Dalston key (`dalston keys create`): every job of its clients
belongs to that key, and it has the key's share of the queue and only the models it may run.
On loopback, without a key, its jobs are the one user's, as the gateway's are. At most
DALSTON_WYOMING_MAX_CONNECTIONS clients are served at once; more are told it is busy."""

from __future__ import annotations

import asyncio
import contextlib

from wyoming.error import Error
from wyoming.event import async_write_event
from wyoming.info import Info

from dalston.bus.connection import connect
from dalston.catalog import Catalog
from dalston.config import LOOPBACK_HOSTS, ConfigError, Settings
from dalston.engines import EngineWatch
from dalston.keys import ApiKey, KeyStore
from dalston.logs import get_logger
from dalston.services.intake import Intake
from dalston.services.wyoming.connection import ClientError, Connection
from dalston.services.wyoming.framing import MAX_HEADER_BYTES
from dalston.services.wyoming.info import describe

log = get_logger("dalston.wyoming")

# How long a client turned away (busy) is given to take its error event, and how long a closing
# connection reads what its client still sends: closed with bytes unread, it would be reset, and
# the client could lose the error event that said why.
CLOSING_SECONDS = 1.0
CLOSING_READ_BYTES = 4 * 1024 * 1024


def listen_problem(settings: Settings) -> str | None:
    """Why the server must not start as configured, or None."""
    if settings.wyoming_host in LOOPBACK_HOSTS or settings.wyoming_api_key:
        return None
    return (f"DALSTON_WYOMING_HOST={settings.wyoming_host} listens beyond loopback, and Wyoming carries no "
            "credentials: set DALSTON_WYOMING_API_KEY to the key its jobs run under "
            "(`dalston keys create home-assistant`)")


class WyomingServer:
    def __init__(self, settings: Settings, catalog: Catalog) -> None:
        if (problem := listen_problem(settings)) is not None:
            raise ConfigError(problem)
        self.settings, self.catalog = settings, catalog
        self.gateway_url = settings.public_url or f"http://{settings.http_host}:{settings.http_port}"
        self.intake: Intake | None = None
        self._keys: KeyStore | None = None
        self._connections: set[asyncio.Task] = set()
        self._stop = asyncio.Event()

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        settings = self.settings
        bus = await connect(settings, name="dalston-wyoming")
        engines = EngineWatch()
        try:
            if settings.wyoming_api_key:
                self._keys = await KeyStore.open(bus)
                try:
                    await self.key()
                except ClientError:
                    raise ConfigError("DALSTON_WYOMING_API_KEY is not a valid key; create one with "
                                      "`dalston keys create home-assistant`") from None
            await engines.start(bus)
            self.intake = Intake.build(bus, settings, self.catalog, engines)
            await self.intake.start()
            server = await asyncio.start_server(self._connected, settings.wyoming_host, settings.wyoming_port,
                                                limit=MAX_HEADER_BYTES)
            log.info("wyoming listening", host=settings.wyoming_host, port=settings.wyoming_port)
            try:
                await self._stop.wait()
            finally:
                server.close()
                for task in self._connections:
                    task.cancel()
                await asyncio.gather(*self._connections, return_exceptions=True)
        finally:
            if self.intake is not None:
                await self.intake.stop()
            await engines.stop()
            await bus.close()

    def info(self) -> Info:
        return describe(self.catalog, self.intake.models, self.gateway_url)

    async def key(self) -> ApiKey | None:
        """The key jobs run under, checked again each time (it may have been revoked); None
        where none is configured."""
        if self._keys is None:
            return None
        record = await self._keys.verify(self.settings.wyoming_api_key)
        if record is None:
            raise ClientError("invalid_api_key", "the server's DALSTON_WYOMING_API_KEY is not a valid key "
                                                 "(revoked?); its operator must set a new one")
        return record

    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if len(self._connections) >= self.settings.wyoming_max_connections:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(async_write_event(Error(
                        text=f"{len(self._connections)} clients are connected, the most this server takes at "
                             "once (DALSTON_WYOMING_MAX_CONNECTIONS); try again soon", code="busy").event(),
                        writer), CLOSING_SECONDS)
                return
            task = asyncio.current_task()
            self._connections.add(task)
            try:
                await Connection(self, reader, writer).serve()
            finally:
                self._connections.discard(task)
        finally:
            with contextlib.suppress(Exception):
                writer.write_eof()
                await asyncio.wait_for(_read_off(reader), CLOSING_SECONDS)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), CLOSING_SECONDS)


async def _read_off(reader: asyncio.StreamReader) -> None:
    """Read and drop what the client still sends, up to its end or CLOSING_READ_BYTES."""
    left = CLOSING_READ_BYTES
    while left > 0 and (data := await reader.read(min(left, 65536))):
        left -= len(data)
