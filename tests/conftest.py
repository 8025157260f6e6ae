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



# `make test` runs the files on several pytest-xdist workers (--dist loadfile): most of the
# suite's time is spent waiting on services, on audio sent at 1x speed and on timeouts. A file is
# one unit of work, so its module stack serves it on one worker; the files on the session `stack`
# are STACK_GROUPS units, so that no more than STACK_GROUPS such stacks start. Workers take units
# in collection order, longest first: seconds per file (or per group) measured on this 2-core
# machine; a file not named here counts as short.
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
    "test_wyoming.py": 16, "test_diarization_api.py": 16, "test_tracing_stack.py": 15,
}
# The files whose tests use the session `stack`, in groups of about equal time. The
# scheduler sees only test ids, so they are named here; collection checks the list.
STACK_GROUPS = [
    {"test_read_speech.py", "test_resilience.py", "test_live_no_speech.py", "test_e2e.py",
     "test_webhooks.py", "test_translations.py", "test_known_speakers.py", "test_diarization_api.py"},
    {"test_realtime.py", "test_elevenlabs_realtime.py", "test_diarize.py", "test_streaming.py",
     "test_web.py", "test_cli_live.py", "test_hostile.py", "test_elevenlabs.py", "test_wyoming.py",
     "test_tracing_stack.py"},
]


def unit_of(file: str) -> str:
    """The unit of work that the file `tests/NAME.py` belongs to."""
    name = file.rsplit("/", 1)[-1]
    return next((f"stack-{n}" for n, group in enumerate(STACK_GROUPS) if name in group), file)


def seconds_of(unit: str) -> float:
    if unit.startswith("stack-"):
        return sum(SECONDS.get(name, 1) for name in STACK_GROUPS[int(unit[6:])])
    return SECONDS.get(unit.rsplit("/", 1)[-1], 1)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class FileUnits(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return unit_of(nodeid.split("::", 1)[0])

    return FileUnits(config, log) if config.getvalue("dist") == "loadfile" else None


def pytest_collection_modifyitems(config, items):
    files: dict[str, list] = {}
    for item in items:
        files.setdefault(item.path.name, []).append(item)
    unlisted = {name for name, tests in files.items() if name not in set().union(*STACK_GROUPS)
                and any("stack" in test.fixturenames for test in tests)}
    if unlisted:
        raise pytest.UsageError(f"tests/conftest.py: put {sorted(unlisted)} in a STACK_GROUPS group")
    order = sorted(files, key=lambda name: (-seconds_of(unit_of(name)), unit_of(name), -SECONDS.get(name, 1)))
    items[:] = [item for name in order for item in files[name]]
