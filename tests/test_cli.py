"""The `dalston` CLI as a user runs it: real subprocesses against a real stack (NATS, gateway,
orchestrator, engines) on the real tiny.en weights."""

from __future__ import annotations

import argparse
import importlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from dalston import cli
from dalston.cli import COMMANDS
from tests.stack import AUDIO, DIALOGUE_WORDS, words
from tests.stack import TestStack as Stack

MODEL = "faster-whisper-tiny.en"


def test_each_command_is_in_the_table_by_which_it_imports_its_module_alone():
    modules = {path.stem for path in Path(cli.__file__).parent.glob("*.py") if "def register(" in path.read_text()}
    assert set(COMMANDS.values()) == modules
    for module in modules:
        commands = argparse.ArgumentParser().add_subparsers()
        importlib.import_module(f"dalston.cli.{module}").register(commands)
        assert set(commands.choices) == {name for name, owner in COMMANDS.items() if owner == module}


@pytest.fixture(scope="module")
def system(tmp_path_factory):
    stack = Stack.running(tmp_path_factory.mktemp("cli"), "fw")
    yield stack
    stack.close()


def dalston(system: Stack, *args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    """`dalston ARGS` as a separate process, talking to the test stack's gateway."""
    return subprocess.run([sys.executable, "-m", "dalston", *args], capture_output=True, text=True,
                          timeout=timeout, env={**system.env, "DALSTON_SERVER": system.url, **env})


def ok(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize("fmt", ["text", "json", "srt", "vtt"])
def test_transcribe_prints_the_transcript(system, fmt):
    out = ok(dalston(system, "transcribe", str(AUDIO / "dialogue.wav"), "-m", MODEL, "-f", fmt))
    if fmt == "text":
        assert words(out) == DIALOGUE_WORDS
    elif fmt == "json":
        assert words(json.loads(out)["text"]) == DIALOGUE_WORDS
    elif fmt == "srt":
        assert out.startswith("1\n00:00:0") and " --> " in out
        assert words(" ".join(l for l in out.splitlines() if l and "-->" not in l and not l.isdigit())) \
            == DIALOGUE_WORDS
    else:
        assert out.startswith("WEBVTT") and " --> " in out


def test_transcribe_several_files_into_a_folder(system, tmp_path):
    ok(dalston(system, "transcribe", str(AUDIO / "speaker1.wav"), str(AUDIO / "speaker2.wav"),
               "-m", MODEL, "-f", "srt", "-o", str(tmp_path / "out")))
    assert "hilarious" in words((tmp_path / "out" / "speaker1.srt").read_text())
    assert "serious" in words((tmp_path / "out" / "speaker2.srt").read_text())


def test_transcribe_names_the_problem_of_a_bad_file(system):
    bad = AUDIO / "invalid" / "text_as_wav.wav"
    done = dalston(system, "transcribe", str(AUDIO / "speaker1.wav"), str(bad), "-m", MODEL)
    assert done.returncode == 1
    assert f"dalston: {bad}: " in done.stderr and "text, not audio" in done.stderr
    assert "Traceback" not in done.stderr
    # The good file of the same call is still delivered.
    assert "hilarious" in words(done.stdout)


def test_models_engines_jobs_and_status(system):
    ok(dalston(system, "transcribe", str(AUDIO / "speaker1.wav"), "-m", MODEL))

    models = {m["id"]: m for m in json.loads(ok(dalston(system, "models", "--json")))}
    assert models[MODEL]["installed"] is True and models[MODEL]["loaded_on"] == ["fw"]
    assert models["faster-whisper-large-v3"]["installed"] is False
    assert MODEL in ok(dalston(system, "models"))

    engines = {e["engine"]: e for e in json.loads(ok(dalston(system, "engines", "--json")))}
    assert {"audio-prepare", "merge", "fw"} <= set(engines)
    assert [m["model"] for m in engines["fw"]["loaded_models"]] == [MODEL]
    assert "fw" in ok(dalston(system, "engines"))

    jobs = json.loads(ok(dalston(system, "jobs", "--json")))
    newest = jobs[0]
    assert newest["status"] == "completed" and newest["filename"] == "speaker1.wav"
    assert json.loads(ok(dalston(system, "jobs", "get", newest["id"], "--json")))["id"] == newest["id"]
    assert json.loads(ok(dalston(system, "jobs", "--json", "wait", newest["id"])))["status"] == "completed"
    assert newest["id"] in ok(dalston(system, "jobs"))

    status = ok(dalston(system, "status"))
    assert "ready" in status and "reachable" in status and "fw" in status
    report = json.loads(ok(dalston(system, "status", "--json")))
    assert report["gateway"]["status"] == "ready" and report["nats"]["reachable"]
    assert report["nats"]["orchestrator"] is True


def test_models_pull_list_and_rm_in_a_local_store(system, tmp_path):
    store = {"DALSTON_MODELS_DIR": str(tmp_path / "store"), "HF_HUB_OFFLINE": "1"}
    answer = json.loads(ok(dalston(system, "models", "pull", MODEL, "--json", **store)))
    assert answer["status"] == "installed"
    assert (tmp_path / "store" / "faster-whisper" / "tiny.en" / "model.bin").stat().st_size > 10_000_000

    # No gateway: the installed state comes from the local store.
    offline = {**store, "DALSTON_SERVER": "http://127.0.0.1:9"}
    models = {m["id"]: m for m in json.loads(ok(dalston(system, "models", "--json", **offline)))}
    assert models[MODEL]["installed"] is True and models["faster-whisper-base"]["installed"] is False

    # The gateway says an engine holds the model: refused without --force.
    ok(dalston(system, "transcribe", str(AUDIO / "speaker2.wav"), "-m", MODEL))
    refused = dalston(system, "models", "rm", MODEL, **store)
    assert refused.returncode == 1 and "loaded on fw" in refused.stderr
    ok(dalston(system, "models", "rm", MODEL, "--force", **store))
    assert not (tmp_path / "store" / "faster-whisper" / "tiny.en").exists()
    gone = dalston(system, "models", "rm", MODEL, "--force", **store)
    assert gone.returncode == 1 and "not installed" in gone.stderr


def test_models_import_a_folder_and_a_nemo_file(system, tmp_path):
    store = {"DALSTON_MODELS_DIR": str(tmp_path / "store")}
    source = system.root / "models" / "faster-whisper" / "tiny.en"  # pulled by the engine
    ok(dalston(system, "models", "import", MODEL, str(source), **store))
    assert (tmp_path / "store" / "faster-whisper" / "tiny.en" / "model.bin").is_file()

    nemo = tmp_path / "parakeet.nemo"
    nemo.write_bytes(b"not really a model, but a file the store accepts")
    ok(dalston(system, "models", "import", "parakeet-tdt-0.6b-v2", str(nemo), **store))
    assert list((tmp_path / "store" / "nemo").glob("*/model.nemo"))

    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    (incomplete / "config.json").write_text("{}")
    done = dalston(system, "models", "import", "faster-whisper-base", str(incomplete), **store)
    assert done.returncode == 1 and "model.bin is missing" in done.stderr


@pytest.mark.parametrize("args", [("rm", "../../etc"), ("pull", "../../etc"),
                                  ("import", "../../etc", "/tmp"), ("pull", "no-such-model")])
def test_bad_model_ids_are_refused_cleanly(system, args, tmp_path):
    done = dalston(system, "models", *args, DALSTON_MODELS_DIR=str(tmp_path))
    assert done.returncode == 2
    assert done.stderr.startswith("dalston: ") and "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_cancelled_job_stops_its_running_task(system, tmp_path):
    if not shutil.which("ffmpeg"):
        pytest.skip("ffmpeg is not installed")
    long = tmp_path / "long.wav"
    subprocess.run(["ffmpeg", "-loglevel", "error", "-stream_loop", "15", "-i", str(AUDIO / "dialogue.wav"),
                    "-c", "copy", str(long)], check=True)
    with long.open("rb") as audio:
        job_id = httpx.post(f"{system.url}/v1/jobs", files={"file": audio}, data={"model": MODEL}).json()["id"]
    deadline = time.monotonic() + 60
    while (job := httpx.get(f"{system.url}/v1/jobs/{job_id}").json()).get("tasks", {}).get(
            "transcribe-0", {}).get("status") != "running":
        assert time.monotonic() < deadline and job["status"] not in ("completed", "failed")
        time.sleep(0.05)
    task_id = job["tasks"]["transcribe-0"]["id"]

    assert "cancel" in ok(dalston(system, "jobs", "cancel", job_id))
    done = dalston(system, "jobs", "wait", job_id, "--json")
    assert done.returncode == 1 and f"job {job_id} cancelled" in done.stderr
    record = json.loads(done.stdout)
    assert record["status"] == "cancelled"
    assert {t["status"] for t in record["tasks"].values()} == {"completed", "cancelled"}
    assert record["tasks"]["transcribe-0"]["status"] == "cancelled"
    assert "merge" not in record["tasks"]

    # The engine stopped the task itself rather than finishing it (it looks between segments,
    # which come slowly on a 2-core machine that runs other test files beside this one).
    deadline = time.monotonic() + 90
    while f"task failed task={task_id} code=cancelled" not in system.log_text("fw"):
        assert time.monotonic() < deadline, system.log_text("fw")[-2000:]
        time.sleep(0.2)
    assert f"task done task={task_id} ok=True" not in system.log_text("fw")
