"""The dashboard, driven by Textual's Pilot at 80x24, against a real NATS with real engines."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import pytest
from textual.widgets import Static

from dalston.dashboard.app import DashboardApp
from tests.stack import AUDIO, DIALOGUE_WORDS, words
from tests.stack import TestStack as Stack

# The README's screenshot is this test's: it is rewritten only when asked, so test runs leave
# the checkout clean.
DOCS = Path(__file__).resolve().parents[1] / "docs"
UPDATE_SCREENSHOT = os.environ.get("DALSTON_UPDATE_SCREENSHOT") == "1"
SIZE = (80, 24)
# A killed engine's row is removed this long after it is marked gone.
FORGET_AFTER = 3.0


@pytest.fixture(scope="module")
def system(tmp_path_factory):
    stack = Stack.running(tmp_path_factory.mktemp("dashboard"), "fw")
    yield stack
    stack.close()


def dashboard(system: Stack) -> DashboardApp:
    return DashboardApp(system.settings, forget_after=FORGET_AFTER)


def cell(app: DashboardApp, table: str, row: str, column: str) -> str | None:
    """What the table shows at (row, column); None while the row is absent."""
    widget = app.query_one(f"#{table}-table")
    return str(widget.get_cell(row, column)) if row in widget.rows else None


async def until(pilot, condition, timeout: float, what: str) -> float:
    """Let the app run until `condition()` holds; returns the seconds it took."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, f"{what}: not within {timeout} s"
        await pilot.pause(0.05)
    return time.monotonic() - started


async def transcribe(system: Stack, model: str, name: str = "dialogue.wav") -> str:
    async with httpx.AsyncClient(timeout=120) as client:
        with open(AUDIO / name, "rb") as audio:
            response = await client.post(f"{system.url}/v1/audio/transcriptions",
                                         files={"file": audio}, data={"model": model})
    response.raise_for_status()
    return response.json()["text"]


def engine(name: str, runtime: str = "faster-whisper") -> str:
    return f"heartbeat.{runtime}.admin.{name}"  # the stack's engines connect as admin


async def test_live_engines_show_within_one_heartbeat(system):
    async with dashboard(system).run_test(size=SIZE) as pilot:
        took = await until(pilot, lambda: all(
            cell(pilot.app, "engines", engine(name, runtime), "status") == "idle"
            for runtime, name in (("audio-prepare", "audio-prepare"), ("merge", "merge"),
                                  ("faster-whisper", "fw"))), 10, "the running engines")
        assert took < system.settings.heartbeat_interval + 0.5  # the last beats are delivered at once


async def test_a_pull_from_the_models_table_reaches_installed(system):
    model = "faster-whisper-base"
    async with dashboard(system).run_test(size=SIZE) as pilot:
        app = pilot.app
        await pilot.press("2")
        table = app.query_one("#models-table")
        await until(pilot, lambda: cell(app, "models", model, "installed") == "no", 10, "the catalog")
        table.move_cursor(row=table.get_row_index(model))
        await pilot.press("p")
        await until(pilot, lambda: cell(app, "models", model, "installed") == "yes", 120, "the pull")
        # Installed as the gateway's progress messages said, not only as the store shows.
        assert app.data.pulls[model].status == "installed"
    assert (system.root / "models" / "faster-whisper" / "base" / "model.bin").is_file()


async def test_a_second_model_shows_in_the_engine_row_and_jobs_open(system, tmp_path):
    async with dashboard(system).run_test(size=SIZE) as pilot:
        app = pilot.app
        assert words(await transcribe(system, "faster-whisper-tiny.en")) == DIALOGUE_WORDS
        await until(pilot, lambda: cell(app, "engines", engine("fw"), "loaded") == "tiny.en", 60, "tiny.en loaded")
        assert words(await transcribe(system, "faster-whisper-base", "speaker2.wav")) == \
            words("What do you mean? I was really serious about it.")
        # Both fit in the engine's memory, so base joins tiny.en rather than replacing it.
        await until(pilot, lambda: "base" in (cell(app, "engines", engine("fw"), "loaded") or "").split(","),
                    60, "base loaded")
        await pilot.press("m")
        await until(pilot, lambda: cell(app, "models", "faster-whisper-base", "loaded on") == "fw", 5, "loaded on")

        # The jobs table, newest first; Enter opens the job's transcript.
        await pilot.press("j")
        jobs = app.query_one("#jobs-table")
        await until(pilot, lambda: jobs.row_count >= 2 and str(jobs.get_row_at(0)[1]) == "completed", 10, "jobs")
        assert str(jobs.get_row_at(0)[3]) == "speaker2.wav"
        jobs.move_cursor(row=1)
        await pilot.press("enter")
        text = app.screen.query_one("#job-text", Static)
        await until(pilot, lambda: "hilarious" in str(text.content), 10, "the transcript")
        assert words(str(text.content)) == DIALOGUE_WORDS
        await pilot.press("escape")

        await pilot.press("1")
        await pilot.pause(1.0)  # a fresh beat, so "last seen" reads well
        shots = DOCS if UPDATE_SCREENSHOT else tmp_path
        app.save_screenshot(filename="dashboard.svg", path=str(shots))
    assert (shots / "dashboard.svg").read_text().count("faster-whisper") >= 1


async def test_a_killed_engine_is_shown_gone_then_removed(system):
    async with dashboard(system).run_test(size=SIZE) as pilot:
        app = pilot.app
        system.start_engine("faster-whisper", "fw-doomed")
        await until(pilot, lambda: cell(app, "engines", engine("fw-doomed"), "status") == "idle", 60,
                    "the new engine")
        system.processes["fw-doomed"].send_signal(signal.SIGKILL)
        system.stop("fw-doomed")
        # Silent for three beats (1 s each) means gone.
        took = await until(pilot, lambda: cell(app, "engines", engine("fw-doomed"), "status") == "gone", 10,
                           "gone")
        assert took < 5
        assert cell(app, "engines", engine("fw"), "status") == "idle"
        await until(pilot, lambda: cell(app, "engines", engine("fw-doomed"), "status") is None,
                    FORGET_AFTER + 5, "removed")
