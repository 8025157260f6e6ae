"""The users of Dalston's NATS, and what each engine's may do: one template, filled in per engine.

The services' users (admin, orchestrator, gateway, webhooks) and their permissions are
nats/accounts.conf's. Every engine has a user of its own, `engine-<name>`, whose permissions are
this module's one template with its name and runtime: nats-server does not expand permission
templates for password users, so the blocks are written out here, for `dalston up` (its
engines) and compose (one user per engine service: the replicas of a service share it;
nats/users.conf, made by `python -m dalston.bus.permissions > nats/users.conf`).

An engine's user reads and writes no object and no job record (it asks the orchestrator for its
task's objects, with the task's grant: dalston/services/task_objects.py); its replies come to
its own inboxes; it hears only its runtime's claims and rings and its own sessions' input, and
speaks only on its own sessions' output and its runtime's heartbeats.
"""

from __future__ import annotations

import json
import re
import sys

from dalston.contracts import TASK_OBJECTS_SUBJECT, subject_token

ADMIN = "admin"
SERVICE_USERS = (ADMIN, "orchestrator", "gateway", "webhooks")
# compose.yaml's engine services and their runtimes (tests/test_deploy.py checks them).
COMPOSE_ENGINES = {"audio-prepare": "audio-prepare", "merge": "merge", "redact": "redact",
                   "diarize": "diarize", "faster-whisper": "faster-whisper", "nemo": "nemo"}


def engine_user(name: str) -> str:
    return f"engine-{subject_token(name)}"


def password_variable(user: str) -> str:
    """The environment variable nats-server reads `user`'s password from."""
    return f"DALSTON_NATS_{re.sub(r'[^A-Z0-9]', '_', user.upper())}_PASSWORD"


def engine_permissions(user: str, runtime: str) -> dict[str, list[str]]:
    runtime = subject_token(runtime)
    return {
        "publish": [
            "events.task.>", f"heartbeat.{runtime}.*", "deadletter.>", "models.progress.*", "transcript.*",
            f"session.{user}.*.out", TASK_OBJECTS_SUBJECT,
            "$JS.API.INFO", "$JS.API.STREAM.INFO.*", "$JS.API.STREAM.NAMES", "$JS.API.CONSUMER.INFO.*.*",
            "$JS.FC.>",
            "$JS.API.CONSUMER.LIST.TASKS", "$JS.API.CONSUMER.MSG.NEXT.TASKS.*", "$JS.ACK.TASKS.>",
            # Watching peers' heartbeats (an ordered consumer); the health check reads its own.
            "$JS.API.CONSUMER.CREATE.HEARTBEATS", "$JS.API.STREAM.MSG.GET.HEARTBEATS",
        ],
        "subscribe": [
            f"_INBOX_{user}.>", f"ring.tasks.{runtime}.*", "cancelled.*", f"sessions.{runtime}.*",
            f"session.{user}.*.in", f"voices.embed.{runtime}",
        ],
    }


def users_config(engines: dict[str, str], accounts: str = "accounts.conf") -> str:
    """nats-server's `accounts` block: the service users, and one user per engine (`engines`:
    engine name -> runtime), each password from its variable (`password_variable`). It includes
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
        permissions = engine_permissions(user, runtime)
        lines += [f"      {{user: {user}, password: ${password_variable(user)}, permissions: {{",
                  "        allow_responses: true"]
        for kind in ("publish", "subscribe"):
            lines.append(f"        {kind}: [{', '.join(json.dumps(subject) for subject in permissions[kind])}]")
        lines.append("      }}")
    lines += ["    ]", "  }", "}", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(users_config({name: runtime for name, runtime in COMPOSE_ENGINES.items()}))
