import pytest

from tests.stack import TestStack


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    """One running Dalston (NATS, gateway, orchestrator, prepare, merge, two faster-whisper
    engines) shared by the end-to-end tests."""
    system = TestStack(tmp_path_factory.mktemp("stack"))
    system.start_nats()
    system.start_pipeline()
    system.start_engine("faster-whisper", "fw-a")
    system.start_engine("faster-whisper", "fw-b")
    system.wait_engines("audio-prepare", "merge", "fw-a", "fw-b")
    yield system
    system.close()
