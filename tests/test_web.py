"""The web page at `/`, in a real browser (Debian's chromium, driven by selenium through
chromium-driver) against a real stack that demands keys: a file in, its transcript with speakers
and times read from the page; Chromium's fake microphone, fed a WAV file, through /v1/realtime;
a wrong key; keyboard use and contrast. Beside them, fast checks of the gateway's side: what is
served, with which headers, and the key as a WebSocket subprotocol.

`WEB_SCREENSHOT=docs/web-page.png pytest tests/test_web.py` saves the page, filled by the tests,
as the README shows it.
"""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import websockets
from litestar import Litestar, get
from litestar.testing import TestClient

from dalston.config import load_settings
from dalston.services.gateway.auth import require_key
from dalston.services.gateway.web import ASSETS, web_page
from dalston.synthetic_speech import word_error_rate, words
from tests.audio_fixtures import DIALOGUE, DIALOGUE_TEXT
from tests.stack import AUDIO, TestStack

MODEL = "faster-whisper-tiny.en"
CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
# The flags that let chromium run here (as root, in a container, offline) and its fake microphone.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1280,1400",
                  "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
                  "--autoplay-policy=no-user-gesture-required")


# --- the gateway's side, in-process -------------------------------------------------------

@get("/v1/protected")
async def protected() -> str:
    return "secret"


@pytest.fixture
def keyed_client():
    """The page's routes beside an API route, behind the key guard, with keys demanded."""
    app = Litestar([web_page, protected], guards=[require_key])
    app.state.settings = load_settings({"DALSTON_REQUIRE_AUTH": "true"})
    with TestClient(app) as client:
        yield client


def test_the_page_is_served_without_a_key_and_kept_to_its_origin(keyed_client):
    assert keyed_client.get("/v1/protected").status_code == 401
    page = keyed_client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "script-src 'self'" in policy and "frame-ancestors 'none'" in policy
    for name, media_type in ASSETS.items():
        response = keyed_client.get(f"/web/{name}")
        assert response.status_code == 200 and response.headers["content-type"].startswith(media_type)
        assert response.headers["content-security-policy"] == policy
        assert "http://" not in response.text and "https://" not in response.text  # nothing from elsewhere


@pytest.mark.parametrize("name", ["../web.py", "..%2Fweb.py", "%2e%2e/app.py", "nothing.js", "index.htm"])
def test_only_the_pages_files_are_served(keyed_client, name):
    assert keyed_client.get(f"/web/{name}").status_code == 404


# --- a real stack -------------------------------------------------------------------------

def _dalston(system: TestStack, *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "dalston", *args], env=system.env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.fixture(scope="module")
def keyed_stack(tmp_path_factory):
    """A Dalston that demands keys, with a faster-whisper engine and a diarize engine."""
    system = TestStack(tmp_path_factory.mktemp("web"), DALSTON_REQUIRE_AUTH="true")
    try:
        system.start_nats()
        system.start_pipeline()
        system.key = _dalston(system, "keys", "create", "webuser")
        admin = _dalston(system, "keys", "create", "webadmin", "--admin")
        system.start_engine("faster-whisper", "fw-web")
        system.start_engine("diarize", "dz-web")
        system.wait_engines("audio-prepare", "merge", "fw-web", "dz-web", timeout=120,
                            headers={"Authorization": f"Bearer {system.key}"})
        # A user key runs installed models only: the admin installs the two the page uses.
        for model in (MODEL, system.settings.diarize_model):
            subprocess.run([sys.executable, "-m", "dalston", "models", "pull", model], check=True, timeout=300,
                           env={**system.env, "DALSTON_API_KEY": admin}, capture_output=True)
    except BaseException:
        system.close()
        raise
    yield system
    system.close()


async def _first_event(url: str, protocols: list[str]) -> tuple[str | None, str]:
    async with websockets.connect(url, subprotocols=protocols) as socket:
        return socket.subprotocol, await asyncio.wait_for(socket.recv(), 10)


async def test_a_browser_sends_its_key_as_a_websocket_subprotocol(keyed_stack):
    url = f"ws://127.0.0.1:{keyed_stack.http_port}/v1/realtime?intent=transcription"
    chosen, first = await _first_event(url, ["realtime", f"openai-insecure-api-key.{keyed_stack.key}"])
    assert chosen == "realtime" and '"session.created"' in first
    for protocols in (["realtime"], ["realtime", "openai-insecure-api-key.dsk_wrong"]):
        with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
            await _first_event(url, protocols)
        assert refused.value.response.status_code == 403  # a refused WebSocket handshake
    assert keyed_stack.key not in keyed_stack.log_text("gateway") and "dsk_wrong" not in keyed_stack.log_text("gateway")


# --- the page in chromium -----------------------------------------------------------------

@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("chromium and chromium-driver are not installed (scripts/system-deps installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    home = tmp_path_factory.mktemp("chromium")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={home / 'profile'}",
                 f"--use-file-for-fake-audio-capture={DIALOGUE}%noloop"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.downloads = home / "downloads"
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow",
                                                           "downloadPath": str(driver.downloads)})
    yield driver
    driver.quit()


def _wait(driver, condition, timeout: float = 60.0, what: str = "the page"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition(driver)
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"{what} did not happen in {timeout} s; page says: "
                         f"{driver.find_element('tag name', 'body').text[:2000]}")


def _text(driver, element_id: str) -> str:
    return driver.find_element("id", element_id).text


def _use_key(driver, key: str) -> None:
    field = driver.find_element("id", "api-key")
    field.clear()
    field.send_keys(key)
    driver.find_element("css selector", "#key-form button[type=submit]").click()


@pytest.fixture(scope="module")
def page(browser, keyed_stack):
    """The page, open, with the right key typed in."""
    browser.get(keyed_stack.url + "/")
    _use_key(browser, keyed_stack.key)
    _wait(browser, lambda d: "accepted" in _text(d, "key-status"), 20, "the key's acceptance")
    return browser


def test_a_wrong_key_shows_a_clear_message(page, keyed_stack):
    _use_key(page, "dsk_not-a-real-key")
    notice = _wait(page, lambda d: _text(d, "notice"), 20, "the refusal")
    assert "API key was not accepted" in notice and "dalston keys create" in notice
    assert "refused" in _text(page, "key-status").lower()
    _use_key(page, keyed_stack.key)
    _wait(page, lambda d: not d.find_element("id", "notice").is_displayed(), 20, "the notice's end")
    assert page.execute_script("return sessionStorage.getItem('dalston.api_key')") == keyed_stack.key
    assert page.find_element("id", "api-key").get_attribute("value") == ""  # not left in the field


def test_a_file_gives_its_transcript_with_speakers_and_times(page):
    page.find_element("css selector", f"#model option[value='{MODEL}']").click()
    diarize = page.find_element("id", "diarize")
    if not diarize.is_selected():
        diarize.click()
    page.find_element("id", "file").send_keys(str(DIALOGUE))
    _wait(page, lambda d: "completed" in _text(d, "file-status"), 120, "the transcript")
    rows = [[cell.text for cell in row.find_elements("tag name", "td")]
            for row in page.find_elements("css selector", "#transcript tbody tr")]
    assert rows and all(len(row) == 3 for row in rows)
    assert word_error_rate(DIALOGUE_TEXT, " ".join(text for _, _, text in rows)) <= 0.1, rows
    assert {speaker for _, speaker, _ in rows} == {"SPEAKER_0", "SPEAKER_1"}, rows
    assert rows[0][0].startswith("0:0") and all(" – " in time for time, _, _ in rows)
    stages = _text(page, "file-stages")
    assert all(f"{stage}: completed" in stages for stage in ("prepare", "transcribe", "diarize", "merge"))
    job_id = page.execute_script("return state.jobId")
    page.find_element("css selector", ".downloads button[data-format=srt]").click()
    srt = _wait(page, lambda d: _downloaded(d, f"{job_id}.srt"), 20, "the SRT download")
    assert "-->" in srt and "SPEAKER_0: " in srt


def _downloaded(driver, name: str) -> str | None:
    path = driver.downloads / name
    return path.read_text() if path.exists() and path.stat().st_size else None


def test_recent_jobs_show_their_stages(page):
    job_id = page.execute_script("return state.jobId")
    if job_id is None:
        pytest.skip("needs the file test's job")
    page.find_element("id", "refresh-jobs").click()
    # Read in one go: the table is rebuilt whenever the jobs are refreshed.
    row = _wait(page, lambda d: d.execute_script(
        "const row = document.querySelector(`#jobs tr[data-job='${arguments[0]}']`);"
        "return row && row.innerText", job_id), 20, "the job's row")
    assert "completed" in row and "merge: completed" in row and MODEL in row


def test_the_microphone_gives_a_live_transcript(page):
    page.find_element("css selector", f"#model option[value='{MODEL}']").click()
    toggle = page.find_element("id", "live-toggle")
    toggle.click()
    _wait(page, lambda d: toggle.get_attribute("aria-pressed") == "true", 10, "the start")
    # The fake microphone plays the dialogue once, then silence.
    # Both turns (of 10 and 9 words), give or take a word the model may miss.
    said = _wait(page, lambda d: _live_words(d, len(words(DIALOGUE_TEXT)) - 2), 90, "the live transcript")
    toggle.click()
    _wait(page, lambda d: "Stopped" in _text(d, "live-status"), 20, "the stop")
    assert word_error_rate(DIALOGUE_TEXT, said) <= 0.1, said
    screenshot = os.environ.get("WEB_SCREENSHOT")
    if screenshot:
        _screenshot(page, Path(screenshot))


def _screenshot(driver, path: Path) -> None:
    """The whole page, 1280 pixels wide, as a PNG."""
    size = driver.execute_script("return [document.documentElement.scrollWidth, Math.ceil("
                                 "document.querySelector('main').getBoundingClientRect().bottom + scrollY)]")
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": size[0], "height": size[1], "scale": 1}})
    path.write_bytes(base64.b64decode(shot["data"]))


def _live_words(driver, count: int) -> str | None:
    turns = " ".join(t.text for t in driver.find_elements("css selector", "#live-turns li"))
    return turns if len(turns.split()) >= count else None


DROP = """
const [name, data] = arguments;
const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
const files = new DataTransfer();
files.items.add(new File([bytes], name, {type: 'audio/wav'}));
const drop = document.getElementById('drop');
for (const type of ['dragover', 'drop']) {
  drop.dispatchEvent(new DragEvent(type, {dataTransfer: files, bubbles: true, cancelable: true}));
}
"""


def _drop(driver, path: Path) -> None:
    """`path` dropped on the drop zone, as a drag from the desktop delivers it."""
    driver.execute_script(DROP, path.name, base64.b64encode(path.read_bytes()).decode())


def test_a_dropped_file_is_transcribed_and_a_bad_one_says_why(page):
    page.find_element("css selector", f"#model option[value='{MODEL}']").click()
    if page.find_element("id", "diarize").is_selected():
        page.find_element("id", "diarize").click()
    _drop(page, AUDIO / "speaker1.wav")
    _wait(page, lambda d: "completed" in _text(d, "file-status"), 120, "the transcript")
    rows = page.find_elements("css selector", "#transcript tbody tr")
    text = " ".join(row.find_elements("tag name", "td")[2].text for row in rows)
    assert word_error_rate("That was hilarious, I can't believe you said that.", text) <= 0.1, text
    assert all(row.find_elements("tag name", "td")[1].text == "" for row in rows)  # no speakers asked
    _drop(page, AUDIO / "invalid" / "text_as_wav.wav")
    status = _wait(page, lambda d: "failed" in _text(d, "file-status") and _text(d, "file-status"), 60,
                   "the failure")
    assert "error" in page.find_element("id", "file-status").get_attribute("class")
    assert not page.find_element("id", "result").is_displayed(), status
    assert len(status) > len("Job  failed") + 32  # the reason is said


CONTRAST = """
function luminance(color) {
  const [r, g, b] = color.match(/[\\d.]+/g).slice(0, 3).map(Number).map((v) => {
    v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; });
  return 0.2126 * r + 0.7152 * g + 0.0722 * b;
}
function background(element) {
  for (let e = element; e; e = e.parentElement) {
    const color = getComputedStyle(e).backgroundColor;
    if (!color.startsWith('rgba') || !color.endsWith(', 0)')) return color;
  }
  return 'rgb(255, 255, 255)';
}
const low = [];
for (const element of document.querySelectorAll('body *')) {
  const own = [...element.childNodes].some((n) => n.nodeType === 3 && n.textContent.trim());
  if (!own || !element.getClientRects().length) continue;
  const [a, b] = [luminance(getComputedStyle(element).color), luminance(background(element))];
  const ratio = (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
  if (ratio < 4.5) low.push(`${element.tagName}#${element.id} "${element.textContent.trim().slice(0, 40)}" ${ratio.toFixed(2)}`);
}
return low;
"""


def test_every_text_meets_wcag_aa_contrast(page):
    assert page.execute_script(CONTRAST) == []


def test_the_keyboard_reaches_everything_in_order(page):
    page.refresh()  # focus starts from the top; the key stays, in sessionStorage
    _wait(page, lambda d: "accepted" in _text(d, "key-status") and "job" in _text(d, "jobs-status"), 20,
          "the stored key's acceptance")
    page.execute_script("""document.getElementById('file').addEventListener('click', (event) => {
        window.choosers = (window.choosers || 0) + 1; event.preventDefault(); });""")
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    newest = page.execute_script("return document.querySelector('#jobs tbody button').textContent")
    order = []
    for _ in range(12):
        ActionChains(page).send_keys(Keys.TAB).perform()
        order.append(page.execute_script("const e = document.activeElement; return e.id || e.textContent.trim()"))
    assert order[:10] == ["Skip to the page", "api-key", "Use key", "forget-key", "model", "diarize", "drop",
                          "live-toggle", "refresh-jobs", newest], order
    drop = page.find_element("id", "drop")
    drop.send_keys(Keys.ENTER)
    drop.send_keys(Keys.SPACE)
    assert page.execute_script("return window.choosers") == 2
    outline = page.execute_script("return getComputedStyle(document.activeElement).outlineStyle")
    assert outline == "solid"  # the focus is visible


def test_nothing_is_fetched_from_another_origin(page, keyed_stack):
    entries = page.execute_script("return performance.getEntriesByType('resource').map((e) => e.name)")
    assert entries and all(name.startswith(keyed_stack.url) for name in entries), entries
    assert httpx.get(keyed_stack.url + "/").headers["content-security-policy"]
