"""The embedded NATS's passwords in DALSTON_HOME: made once, this account's alone, and found by
the CLI for this home's own server only. (`dalston up` with them, for real: test_up.py.)"""

from __future__ import annotations

import os
import stat

from dalston.bus.credentials import CREDENTIALS_FILE, home_passwords, login, read_passwords
from dalston.bus.permissions import SERVICE_USERS as USERS
from dalston.bus.server import HomeLock
from dalston.config import load_settings


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_passwords_are_made_once_readable_by_this_account_only(tmp_path):
    old_umask = os.umask(0)  # what the file gets must not depend on the umask
    try:
        passwords = home_passwords(tmp_path / "home")
    finally:
        os.umask(old_umask)
    assert set(passwords) == set(USERS) and len(set(passwords.values())) == len(USERS)
    # nats-server would read an all-digit password as a number.
    assert all(p[0].isalpha() and len(p) > 30 for p in passwords.values())
    assert mode(tmp_path / "home" / CREDENTIALS_FILE) == 0o600
    assert home_passwords(tmp_path / "home") == passwords == read_passwords(tmp_path / "home")
    assert [p.name for p in (tmp_path / "home").iterdir()] == [CREDENTIALS_FILE]


def test_passwords_others_could_read_are_replaced(tmp_path):
    passwords = home_passwords(tmp_path)
    (tmp_path / CREDENTIALS_FILE).chmod(0o644)
    replaced = home_passwords(tmp_path)
    assert set(replaced.values()).isdisjoint(passwords.values())
    assert mode(tmp_path / CREDENTIALS_FILE) == 0o600


def test_a_broken_file_holds_no_passwords_and_is_replaced(tmp_path):
    (tmp_path / CREDENTIALS_FILE).write_text('{"admin": "p1"}')
    assert read_passwords(tmp_path) is None
    assert set(home_passwords(tmp_path)) == set(USERS)


def test_login_is_the_named_user_else_the_admin_of_this_homes_running_server(tmp_path):
    home = {"DALSTON_HOME": str(tmp_path)}
    assert login(load_settings(home)) == {}  # no server made here: anonymous
    passwords = home_passwords(tmp_path)
    # Made, but no `dalston up` runs it: whoever listens on its port now must not learn them.
    assert login(load_settings(home)) == {}
    up = HomeLock(tmp_path)
    up.acquire()
    try:
        assert login(load_settings(home)) == {"user": "admin", "password": passwords["admin"]}
        named = {**home, "DALSTON_NATS_USER": "gateway", "DALSTON_NATS_PASSWORD": "pw"}
        # Its replies come to inboxes only it may subscribe to (nats/accounts.conf).
        assert login(load_settings(named)) == {"user": "gateway", "password": "pw",
                                               "inbox_prefix": "_INBOX_gateway"}
        # Another server never gets this home's admin password.
        assert login(load_settings({**home, "DALSTON_NATS_URL": "nats://elsewhere:4222"})) == {}
    finally:
        up.release()
