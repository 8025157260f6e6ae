"""The passwords of the embedded nats-server's users, kept in DALSTON_HOME for one OS account.

`dalston up` makes them once per home and hands each service the user of its role; the CLI,
run by the same account, connects as admin with them while that `up` runs. Other local accounts
cannot read the file, so they cannot connect at all. The users and what each may do are
nats/accounts.conf's and dalston.bus.permissions'; each engine's password is made for one run
(`engine_passwords`).
"""

from __future__ import annotations

import json
import os
import secrets
import stat
from pathlib import Path

from collections.abc import Iterable

from dalston.bus.permissions import ADMIN, SERVICE_USERS
from dalston.bus.server import HomeLock
from dalston.config import Settings

CREDENTIALS_FILE = "nats-credentials.json"


def read_passwords(home: Path) -> dict[str, str] | None:
    """The passwords this home holds, or None where it holds no usable ones."""
    try:
        passwords = json.loads((home / CREDENTIALS_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(passwords, dict) or not all(isinstance(passwords.get(u), str) for u in SERVICE_USERS):
        return None
    return {user: passwords[user] for user in SERVICE_USERS}


def home_passwords(home: Path) -> dict[str, str]:
    """This home's passwords, made on first use. A file another account could read (or wrote)
    holds passwords that may be known: new ones replace them."""
    path = home / CREDENTIALS_FILE
    passwords = read_passwords(home)
    if passwords is not None and _private(path):
        return passwords
    passwords = {user: new_password() for user in SERVICE_USERS}
    write_private(path, passwords)
    return passwords


def write_private(path: Path, content: object) -> None:
    """`content` as JSON in `path`, created 0600 (never readable by others, not even for a
    moment), complete, then renamed over the old file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    temporary.unlink(missing_ok=True)
    with os.fdopen(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as file:
        json.dump(content, file)
    os.replace(temporary, path)


def new_password() -> str:
    # nats-server reads an all-digit password as a number: a letter first.
    return f"p{secrets.token_hex(16)}"


def engine_passwords(users: Iterable[str]) -> dict[str, str]:
    """A new password for each engine user."""
    return {user: new_password() for user in users}


def _private(path: Path) -> bool:
    info = path.stat()
    return info.st_uid == os.getuid() and not info.st_mode & (stat.S_IRWXG | stat.S_IRWXO)


def inbox_prefix(user: str) -> str:
    return f"_INBOX_{user}"


def service_environment(passwords: dict[str, str], user: str) -> dict[str, str]:
    """What a service reads its NATS user from (Settings.nats_user, nats_password)."""
    return {"DALSTON_NATS_USER": user, "DALSTON_NATS_PASSWORD": passwords[user]}


def login(settings: Settings) -> dict[str, str]:
    """The user and password to connect with, as nats.connect's keywords: DALSTON_NATS_USER's;
    else, while this home's `dalston up` runs its embedded server (no DALSTON_NATS_URL), its
    admin's (for the CLI of the account that runs it); else none. Not while it is down: whoever
    listens on its port then is not Dalston's server, and must not learn the password.

    A named user's replies (JetStream's deliveries too) come to inboxes of its own,
    `_INBOX_<user>.>`, the only ones nats/accounts.conf lets it subscribe to: no user reads
    another's replies."""
    if settings.nats_user:
        return {"user": settings.nats_user, "password": settings.nats_password,
                "inbox_prefix": inbox_prefix(settings.nats_user)}
    if settings.nats_url or (passwords := read_passwords(settings.home)) is None:
        return {}
    return {"user": ADMIN, "password": passwords[ADMIN]} if HomeLock(settings.home).holder() else {}
