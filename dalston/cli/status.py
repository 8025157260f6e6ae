"""`dalston status`: what runs where."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from dalston.bus.consumers import consumer_state_at
from dalston.cli.client import Client, add_server_option, server_url
from dalston.cli.output import add_json_option, print_json, table
from dalston.config import Settings
from dalston.contracts import JOBS_STREAM, ORCHESTRATOR_JOBS_CONSUMER

NATS_TIMEOUT = 2.0


def register(commands) -> None:
    status = commands.add_parser("status", help="what runs where: NATS, gateway, orchestrator, engines")
    add_server_option(status)
    add_json_option(status)
    status.set_defaults(func=_status)


def _status(args, settings: Settings) -> int:
    url, _ = server_url(args, settings)
    gateway = _gateway(Client(url, settings.api_key))
    beats = gateway.pop("engines")
    report = {"gateway": gateway, "nats": asyncio.run(_nats(settings)), "engines": beats}
    if args.json:
        print_json(report)
    else:
        nats = report["nats"]
        print(table(["service", "where", "state"], [
            ("gateway", url, gateway["status"] + "".join(f"; {p}" for p in gateway["problems"])),
            ("nats", ",".join(settings.nats_servers), "reachable" if nats["reachable"] else nats["error"]),
            ("orchestrator", ORCHESTRATOR_JOBS_CONSUMER,
             {True: "running", False: "not seen", None: "unknown"}[nats["orchestrator"]]),
            *((f"engine {b['engine']}", f"{b['runtime']} on {b.get('host', '?')}", b["status"]) for b in beats),
        ]))
    return 0 if gateway["status"] == "ready" else 1


def _gateway(client: Client) -> dict[str, Any]:
    try:
        ready = client.http.get("/readyz", timeout=NATS_TIMEOUT)
        answer = ready.json()
    except (httpx.HTTPError, ValueError) as exc:
        return {"url": client.url, "status": "unreachable", "problems": [str(exc)], "engines": []}
    engines = client.get("/v1/engines")["data"] if ready.status_code == 200 else []
    return {"url": client.url, "status": answer.get("status", "unknown"),
            "problems": answer.get("problems", []), "engines": engines}


async def _nats(settings: Settings) -> dict[str, Any]:
    """Whether NATS answers here, and whether an orchestrator is fetching jobs from it."""
    try:
        intake = await consumer_state_at(settings, JOBS_STREAM, ORCHESTRATOR_JOBS_CONSUMER, NATS_TIMEOUT)
    except ConnectionError as exc:
        return {"servers": settings.nats_servers, "reachable": False, "error": str(exc),
                "orchestrator": None}
    return {"servers": settings.nats_servers, "reachable": True, "error": None,
            "orchestrator": None if intake is None else bool(intake.waiting)}
