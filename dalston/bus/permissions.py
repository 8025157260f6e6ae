"""The users of Dalston's NATS, and what each engine's may do: one template, filled in per engine.

The services' users (admin, orchestrator, gateway, webhooks) and their permissions are
nats/accounts.conf's. Every engine has a user of its own, `engine-<name>`, whose permissions are
this module's one template with its name, its runtime and that runtime's task queues (the
catalog's): nats-server does not expand permission templates for password users, so the blocks
are written out, for `dalston up` (its engines, and those `dalston engines add` made) and compose
(one user per engine service, each replica a service of its own; nats/users.conf, made by
`python -m dalston.services.engine_users > nats/users.conf`).

An engine's user reads and writes no object and no job record (it asks the orchestrator for its
task's objects, with the task's grant: dalston/services/task_objects.py); its replies come to
its own inboxes; it takes tasks only from its runtime's queues; it hears only its runtime's
claims and rings and its own sessions' input, and speaks only on its own sessions' output, its
own heartbeats and its own dead letters (subjects that name its user).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping

from dalston.contracts import (DEADLETTER_SUBJECT, HEARTBEAT_SUBJECT, TASK_OBJECTS_SUBJECT, TASKS_STREAM,
                               subject_token)

ADMIN = "admin"
SERVICE_USERS = (ADMIN, "orchestrator", "gateway", "webhooks")
# compose.yaml's engine services and their runtimes (tests/test_deploy.py checks them): each
# replica a service, so that no two engines share a user (and hear each other's sessions).
COMPOSE_ENGINES = {"audio-prepare": "audio-prepare", "merge": "merge", "redact": "redact",
                   "diarize": "diarize", "faster-whisper-1": "faster-whisper",
                   "faster-whisper-2": "faster-whisper", "nemo": "nemo"}


def engine_user(name: str) -> str:
    return f"engine-{subject_token(name)}"


def password_variable(user: str) -> str:
    """The environment variable nats-server reads `user`'s password from."""
    return f"DALSTON_NATS_{re.sub(r'[^A-Z0-9]', '_', user.upper())}_PASSWORD"


def engine_permissions(user: str, runtime: str, queues: Iterable[str]) -> dict[str, list[str]]:
    """`user`'s rights as an engine of `runtime`, whose task queues (TASKS consumers) are
    `queues`: it takes and settles tasks only from those, its heartbeats and dead letters go
    only to subjects that name it."""
    runtime = subject_token(runtime)
    takes = [subject for queue in sorted(set(queues))
             for subject in (f"$JS.API.CONSUMER.MSG.NEXT.{TASKS_STREAM}.{queue}", f"$JS.ACK.{TASKS_STREAM}.{queue}.>")]
    return {
        "publish": [
            "events.task.>", HEARTBEAT_SUBJECT.format(runtime=runtime, identity=user, engine="*"),
            DEADLETTER_SUBJECT.format(source="tasks", identity=user),
            "models.progress.*", "transcript.*", f"session.{user}.*.out", TASK_OBJECTS_SUBJECT,
            "$JS.API.INFO", "$JS.API.STREAM.INFO.*", "$JS.API.STREAM.NAMES", "$JS.API.CONSUMER.INFO.*.*",
            "$JS.FC.>", "$JS.API.CONSUMER.LIST.TASKS", *takes,
            # Watching peers' heartbeats (an ordered consumer); the health check reads its own.
            "$JS.API.CONSUMER.CREATE.HEARTBEATS", "$JS.API.STREAM.MSG.GET.HEARTBEATS",
        ],
        "subscribe": [
            f"_INBOX_{user}.>", f"ring.tasks.{runtime}.*", "cancelled.*", f"sessions.{runtime}.*",
            f"session.{user}.*.in", f"voices.embed.{runtime}",
        ],
    }


def users_config(engines: Mapping[str, str], queues: Mapping[str, Iterable[str]],
                 accounts: str = "accounts.conf") -> str:
    """nats-server's `accounts` block: the service users, and one user per engine (`engines`:
    engine name -> runtime; `queues`: runtime -> its task queues), each password from its
    variable (`password_variable`). It includes
    `accounts` (nats/accounts.conf, a path relative to this config's directory): nats-server's
    variables reach only the file that includes their file."""
    lines = ["# The users of Dalston's NATS: made by dalston.bus.permissions (do not edit by hand).",
             "# The services' permissions are accounts.conf's; each engine's is one template's.",
             f"include {json.dumps(accounts)}", "accounts {", "  DALSTON {", "    jetstream: enabled", "    users: ["]
    for user in SERVICE_USERS:
        lines.append(f"      {{user: {user}, password: ${password_variable(user)}, "
                     f"permissions: ${user.upper()}_PERMISSIONS}}")
    for name, runtime in engines.items():
        user = engine_user(name)
        permissions = engine_permissions(user, runtime, queues.get(runtime, ()))
        lines += [f"      {{user: {user}, password: ${password_variable(user)}, permissions: {{",
                  "        allow_responses: true"]
        for kind in ("publish", "subscribe"):
            lines.append(f"        {kind}: [{', '.join(json.dumps(subject) for subject in permissions[kind])}]")
        lines.append("      }}")
    lines += ["    ]", "  }", "}", ""]
    return "\n".join(lines)

