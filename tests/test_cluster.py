"""Dalston on a three-node NATS cluster (nats/cluster/node.conf, replicas 3): the node leading the
TASKS stream is killed while jobs run, and every job still completes, once."""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter

import httpx
import nats.errors
import nats.js.errors
import pytest
from nats.js.api import ConsumerConfig, DeliverPolicy

from dalston.contracts import EVENTS_STREAM, TASKS_STREAM, TERMINAL, JobEvent, JobRecord, decode
from tests.nats_nodes import NATS_DIR, NatsNode
from tests.stack import AUDIO, TestStack, free_port, submit, wait_for

NODES = ("a", "b", "c")
JOBS = 6


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster")
    cluster_ports = {name: free_port() for name in NODES}
    routes = ",".join(f"nats-route://127.0.0.1:{port}" for port in cluster_ports.values())
    nodes = {name: NatsNode(root, name, NATS_DIR / "cluster" / "node.conf") for name in NODES}
    for name, node in nodes.items():
        # The variables node.conf reads; the client and monitoring ports come from the command line.
        node.env.update(NODE=name, CLIENT_PORT=str(node.port), MONITOR_PORT=str(node.monitor_port),
                        CLUSTER_PORT=str(cluster_ports[name]), ROUTES=f"[{routes}]")
        node.start()
    for node in nodes.values():
        node.wait_healthy()
    yield nodes
    for node in nodes.values():
        node.stop()


@pytest.fixture(scope="module")
def system(cluster, tmp_path_factory):
    system = TestStack(tmp_path_factory.mktemp("cluster-stack"),
                       DALSTON_NATS_URL=",".join(node.url for node in cluster.values()),
                       DALSTON_NATS_REPLICAS="3",
                       # Watchers lose sight of engines for up to ~15 s while the heartbeats'
                       # node fails over (their ordered consumer resets after two missed idle
                       # heartbeats, 10 s): 20 s, TestStack's default, is too tight for that.
                       DALSTON_ENGINE_WAIT="60")
    system.start_pipeline()
    for engine in ("fw-a", "fw-b"):
        # Loaded before the jobs come, so they are in flight when the node dies.
        system.start_engine("faster-whisper", engine, DALSTON_PRELOAD_MODEL="faster-whisper-tiny.en")
    system.wait_engines("audio-prepare", "merge", "fw-a", "fw-b", timeout=90)
    yield system
    system.close()


async def completed_events(bus, job_ids: list[str]) -> Counter:
    """`completed` JobEvents per job, as the EVENTS stream holds them. Soon after a node dies, a new
    consumer may answer 503 until the cluster has placed it (seen under load): asked again."""
    subscription = await bus.js.pull_subscribe(
        "events.job.>", stream=EVENTS_STREAM,
        config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL, inactive_threshold=30))
    counts: Counter = Counter()
    deadline = time.monotonic() + 30
    while True:
        try:
            messages = await subscription.fetch(100, timeout=1)
        except nats.errors.TimeoutError:
            return counts
        except nats.js.errors.ServiceUnavailableError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)
            continue
        for msg in messages:
            event = decode(msg.data, JobEvent)
            if event.job_id in job_ids and event.status == "completed":
                counts[event.job_id] += 1
            await msg.ack()


async def test_jobs_survive_the_task_leader_dying(cluster, system):
    bus = await system.bus()
    try:
        info = await bus.js.stream_info(TASKS_STREAM)
        assert info.config.num_replicas == 3 and len(info.cluster.replicas) == 2
        leader = info.cluster.leader

        # What a live client sees: no job may announce its completion twice.
        seen: Counter = Counter()

        async def on_event(msg) -> None:
            event = decode(msg.data, JobEvent)
            if event.status == "completed":
                seen[event.job_id] += 1

        await bus.nc.subscribe("events.job.*", cb=on_event)

        files = sorted(AUDIO.glob("*.wav"))
        job_ids = [submit(system, files[i % len(files)], "faster-whisper-tiny.en") for i in range(JOBS)]
        async with httpx.AsyncClient(base_url=system.url, timeout=30) as http:
            async def statuses() -> list[str]:
                replies = [await http.get(f"/v1/jobs/{job_id}") for job_id in job_ids]
                # Not recorded yet (404), or the gateway's NATS failing over (5xx): not ended.
                return [decode(r.content, JobRecord).status if r.status_code == 200 else "submitted"
                        for r in replies]

            async def under_way() -> bool:
                return "running" in await statuses()

            async def all_ended() -> list[str] | None:
                current = await statuses()
                return current if TERMINAL.issuperset(current) else None

            # Kill the leader as soon as work is under way, with most jobs still to finish.
            await wait_for(under_way, timeout=60, interval=0.1)
            assert (await statuses()).count("completed") < JOBS
            cluster[leader].stop(signal.SIGKILL)
            ended = await wait_for(all_ended, timeout=60, interval=0.5)
            failures = [(await http.get(f"/v1/jobs/{job_id}")).json().get("failure") for job_id in job_ids]
        assert ended == ["completed"] * JOBS, failures

        new_leader = (await bus.js.stream_info(TASKS_STREAM)).cluster.leader
        assert new_leader not in (leader, None)
        assert await completed_events(bus, job_ids) == Counter({job_id: 1 for job_id in job_ids})
        assert all(count <= 1 for count in seen.values()), seen
    finally:
        await bus.close()

