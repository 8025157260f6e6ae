"""Applies `nats/streams.yaml` to a JetStream account, idempotently.

Where NATS has users (nats/accounts.conf), only admin may create or change streams, buckets and
consumers: the admin step (`dalston up`, compose's `layout` service: dalston/services/layout.py)
applies the layout, with a task queue for every model of the catalog, before the services start.
Every Dalston process still calls `ensure_layout` at start-up: it reads before it writes and
writes only what is missing or differs, so a service whose user may only read the layout waits
until it is in place, and on a NATS without users whichever process comes first creates it.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import yaml
from nats.js import JetStreamContext, api
from nats.js.errors import BadRequestError, NotFoundError

from dalston.config import Settings
from dalston.contracts import TASKS_STREAM, task_consumer, task_subject
from dalston.resources import data_dir

_ENUMS = {
    "retention": api.RetentionPolicy,
    "storage": api.StorageType,
    "discard": api.DiscardPolicy,
}


def load_layout(path: Path | None = None) -> dict:
    return yaml.safe_load((path or data_dir("nats") / "streams.yaml").read_text())


def _stream_config(name: str, spec: dict, replicas: int) -> api.StreamConfig:
    fields = {k: (_ENUMS[k](v) if k in _ENUMS else v) for k, v in spec.items()}
    return api.StreamConfig(name=name, num_replicas=replicas, **fields)


def _differs(current, wanted, fields) -> bool:
    return any(getattr(current, field) != getattr(wanted, field) for field in fields)


async def ensure_layout(js: JetStreamContext, settings: Settings,
                        task_queues: Iterable[tuple[str, str | None]] = ()) -> None:
    """The layout, and the shared task consumer of each (runtime, runtime model id) in
    `task_queues` (the admin step names every one of the catalog)."""
    layout = load_layout()
    replicas = settings.nats_replicas
    for name, spec in layout["streams"].items():
        config = _stream_config(name, spec, replicas)
        try:
            current = (await js.stream_info(name)).config
        except NotFoundError:
            try:
                await js.add_stream(config)
                continue
            except BadRequestError as exc:
                if exc.err_code != 10058:  # created by a concurrent starter: fine
                    raise
            current = (await js.stream_info(name)).config
        if _differs(current, config, [*spec, "num_replicas"]):
            await js.update_stream(config)
    for bucket, spec in layout["key_value"].items():
        ttl = _ttl(spec, settings)
        if not await _keep_for(js, f"KV_{bucket}", ttl):
            await js.create_key_value(api.KeyValueConfig(
                bucket=bucket, replicas=replicas, storage=api.StorageType(spec["storage"]),
                history=spec.get("history", 1), ttl=ttl, description=spec.get("description")))
    for bucket, spec in layout["object_stores"].items():
        ttl = _ttl(spec, settings)
        if not await _keep_for(js, f"OBJ_{bucket}", ttl):
            await js.create_object_store(bucket, api.ObjectStoreConfig(
                bucket=bucket, replicas=replicas, storage=api.StorageType(spec["storage"]),
                ttl=ttl, description=spec.get("description")))
    for stream, consumers in layout["consumers"].items():
        for durable, spec in consumers.items():
            config = api.ConsumerConfig(durable_name=durable, ack_policy=api.AckPolicy.EXPLICIT,
                                        num_replicas=replicas, **spec)
            try:
                current = (await js.consumer_info(stream, durable)).config
            except NotFoundError:
                current = None
            if current is None or _differs(current, config, [*spec, "num_replicas"]):
                await js.add_consumer(stream, config)
    consumers = TaskConsumers(js, settings)
    for runtime, runtime_model_id in task_queues:
        await consumers.ensure(runtime, runtime_model_id)


def _ttl(spec: dict, settings: Settings) -> float | None:
    """Seconds a bucket keeps an entry: the job retention for job data, else forever."""
    return settings.retention_hours * 3600 if spec.get("expires") == "retention" else None


async def _keep_for(js: JetStreamContext, stream: str, ttl: float | None) -> bool:
    """Whether the bucket behind `stream` exists; if it does, it now keeps entries for `ttl`.
    A bucket made under another DALSTON_RETENTION_HOURS (or before buckets expired) takes the
    current one, so job records and their artifacts always expire together."""
    try:
        config = (await js.stream_info(stream)).config
    except NotFoundError:
        return False
    wanted = ttl or 0.0
    if (config.max_age or 0.0) != wanted:
        config.max_age = wanted
        await js.update_stream(config)
    return True


async def ensure_task_consumer(js: JetStreamContext, settings: Settings, runtime: str,
                               runtime_model_id: str | None) -> str:
    """The shared pull consumer for one (runtime, model), created where it is missing (a user
    that may not create consumers finds those of the catalog's models in place)."""
    durable = task_consumer(runtime, runtime_model_id)
    config = api.ConsumerConfig(
        durable_name=durable,
        filter_subject=task_subject(runtime, runtime_model_id),
        ack_policy=api.AckPolicy.EXPLICIT,
        ack_wait=settings.task_ack_wait,
        # Deliveries are counted by the engine, which fails the task with a reason; the server
        # must never drop it silently first.
        max_deliver=-1,
        num_replicas=settings.nats_replicas,
    )
    try:
        current = (await js.consumer_info(TASKS_STREAM, durable)).config
    except NotFoundError:
        current = None
    if current is None or _differs(current, config, ["filter_subject", "ack_wait", "num_replicas"]):
        await js.add_consumer(TASKS_STREAM, config)
    return durable


class TaskConsumers:
    """The task consumers one process has made sure of: each is created (or found) once, so
    publishing or taking a task costs no JetStream request for it after the first."""

    def __init__(self, js: JetStreamContext, settings: Settings) -> None:
        self._js = js
        self._settings = settings
        self._known: set[str] = set()

    async def ensure(self, runtime: str, runtime_model_id: str | None) -> str:
        durable = task_consumer(runtime, runtime_model_id)
        if durable not in self._known:
            await ensure_task_consumer(self._js, self._settings, runtime, runtime_model_id)
            self._known.add(durable)
        return durable
