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
