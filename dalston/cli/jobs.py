"""`dalston jobs [list|get|wait|cancel]`: the server's jobs."""

from __future__ import annotations

import argparse

import msgspec

from dalston.cli.client import add_server_option, connect
from dalston.cli.output import StatusLine, add_json_option, error, print_json, table
from dalston.config import Settings
from dalston.contracts import JobRecord
from dalston.formatting import ago, stages


def register(commands) -> None:
    jobs = commands.add_parser("jobs", help="list, inspect, wait for or cancel jobs")
    jobs.add_argument("--limit", type=int, default=20, help="jobs to list (default: 20)")
    add_server_option(jobs)
    add_json_option(jobs)
    jobs.set_defaults(func=_list)
    actions = jobs.add_subparsers(dest="action", metavar="ACTION")
    for name, func, help_text in (("list", _list, "recent jobs, newest first"),
                                  ("get", _get, "a job's status and tasks"),
                                  ("wait", _wait, "wait until a job ends (exit 1 unless it completed)"),
                                  ("cancel", _cancel, "cancel a job")):
        action = actions.add_parser(name, help=help_text)
        if name == "list":
            action.add_argument("--limit", type=int, default=argparse.SUPPRESS)
        else:
            action.add_argument("id", metavar="ID")
        add_server_option(action, default=argparse.SUPPRESS)
        add_json_option(action, default=argparse.SUPPRESS)
        action.set_defaults(func=func)


def _list(args, settings: Settings) -> int:
    data = connect(args, settings, start=True).get("/v1/jobs", limit=args.limit)["data"]
    if args.json:
        print_json(data)
        return 0
    records = [msgspec.convert(item, JobRecord) for item in data]
    print(table(["id", "status", "model", "file", "created"],
                [(r.id, r.status, r.model, r.filename, ago(r.created_at)) for r in records]))
    return 0


def _get(args, settings: Settings) -> int:
    _show(connect(args, settings, start=True).job(args.id), args.json)
    return 0


def _wait(args, settings: Settings) -> int:
    client = connect(args, settings, start=True)
    with StatusLine() as line:
        record = client.wait(args.id, lambda r: line.show(f"{r.id}: {r.status} {stages(r)}"))
    _show(record, args.json)
    if record.status != "completed":
        error(f"job {record.id} {record.status}: {record.failure.message if record.failure else ''}".rstrip(": "))
        return 1
    return 0


def _cancel(args, settings: Settings) -> int:
    answer = connect(args, settings, start=True).request("DELETE", f"/v1/jobs/{args.id}").json()
    if args.json:
        print_json(answer)
    else:
        print(f"{args.id}: {answer.get('status', 'cancelling')}")
    return 0


def _show(record: JobRecord, as_json: bool) -> None:
    if as_json:
        print_json(msgspec.to_builtins(record))
        return
    facts = [("id", record.id), ("status", record.status), ("model", record.model),
             ("file", record.filename), ("created", ago(record.created_at)),
             ("duration", f"{record.duration:.1f} s" if record.duration else "-"),
             ("language", record.language or "-")]
    if record.failure:
        facts.append(("failure", f"{record.failure.code}: {record.failure.message}"))
    width = max(len(name) for name, _ in facts)
    print("\n".join(f"{name.ljust(width)}  {value}" for name, value in facts))
    print()
    print(table(["task", "stage", "status", "engine", "attempt", "seconds"], [
        (key, t.stage, t.status, t.engine or "-", t.attempt,
         f"{t.finished_at - t.started_at:.1f}" if t.finished_at and t.started_at else "-")
        for key, t in record.tasks.items()]))
