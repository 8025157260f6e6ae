from pathlib import Path

import pytest

from dalston.bus.credentials import home_passwords, service_environment
from dalston.bus.server import EmbeddedNats
from dalston.catalog import Catalog
from dalston.store import ModelStore
from tests.audio_fixtures import looped_dialogue
from tests.stack import TestStack


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return Catalog.load()


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "models")


@pytest.fixture
def nats_env(tmp_path):
    """The settings of an admin of a fresh nats-server of its own."""
    passwords = home_passwords(tmp_path / "home")
    server = EmbeddedNats(tmp_path / "nats", -1, passwords)
    server.start()
    yield {"DALSTON_NATS_URL": server.url, **service_environment(passwords, "admin")}
    server.stop()


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    """One running Dalston (NATS, gateway, orchestrator, prepare, merge, two faster-whisper
    engines, a diarize and a redact engine) shared by the end-to-end tests."""
    system = TestStack.running(tmp_path_factory.mktemp("stack"), "fw-a", "fw-b")
    system.start_engine("diarize", "dz")  # who spoke, where a request asks
    system.start_engine("redact")  # redact=pii, where a request asks
    system.wait_engines("dz", "redact")
    yield system
    system.close()


@pytest.fixture(scope="session")
def long_audio(tmp_path_factory) -> Path:
    """The dialogue four times over (about 22 s): long enough to kill something mid-task, or
    to outlast a short keep-alive, and no longer, as every test that uses it runs it whole."""
    return looped_dialogue(4, tmp_path_factory.mktemp("long"))


# `make test` runs the files on several pytest-xdist workers (--dist loadgroup): most of the
# suite's time is spent waiting on services, audio sent at 1x speed and timeouts. A file is one
# unit of work, so its module stack serves it on one worker. The files on the session `stack`
# share it in STACK_GROUPS units: a worker that takes one starts one stack, and no more than
# STACK_GROUPS run at once. Workers take units in collection order, so the long files go first:
# seconds per file measured on this 2-core machine (what does not appear counts as short).
STACK_GROUPS = 2
SECONDS = {
    "test_models.py": 175, "test_read_speech.py": 117, "test_realtime.py": 111, "test_up.py": 93,
    "test_resilience.py": 84, "test_elevenlabs_realtime.py": 73, "test_diarize.py": 60,
    "test_session_bounds.py": 59, "test_cli.py": 57, "test_live_no_speech.py": 51,
    "test_front_door.py": 48, "test_e2e.py": 42, "test_streaming.py": 42, "test_cluster.py": 37,
    "test_web.py": 36, "test_webhooks.py": 35, "test_cli_live.py": 33, "test_dashboard.py": 33,
    "test_nemo.py": 32, "test_nats_permissions.py": 31, "test_translations.py": 28,
    "test_chunking.py": 28, "test_orchestrators.py": 27, "test_audio_limits.py": 27,
    "test_hostile.py": 25, "test_model_manager.py": 24, "test_elevenlabs.py": 22,
    "test_known_speakers.py": 22, "test_fair_share.py": 22, "test_auth.py": 21,
}


def pytest_collection_modifyitems(config, items):
    files: dict[str, list] = {}
    for item in items:
        files.setdefault(item.path.name, []).append(item)
    order = sorted(files, key=lambda name: -SECONDS.get(name, 1))
    load = [0] * STACK_GROUPS
    for name in order:
        if any("stack" in item.fixturenames for item in files[name]):
            group = min(range(STACK_GROUPS), key=load.__getitem__)
            load[group] += SECONDS.get(name, 1)
            group_name = f"stack-{group}"
        else:
            group_name = name
        for item in files[name]:
            item.add_marker(pytest.mark.xdist_group(group_name))
    items[:] = [item for name in order for item in files[name]]
