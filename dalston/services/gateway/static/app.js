// Dalston's web page: a client of the gateway's own API, nothing more. The API key lives in
// sessionStorage (gone when the tab closes) and goes out as `Authorization: Bearer`, or, on the
// realtime WebSocket, where a browser cannot set headers, as the `openai-insecure-api-key.<key>`
// subprotocol.
"use strict";

const KEY_STORAGE = "dalston.api_key";
const SESSION_RATE = 24000; // /v1/realtime's audio/pcm
const POLL_MS = 500;
const ENDED = new Set(["completed", "failed", "cancelled"]);
const STAGE_ORDER = ["prepare", "transcribe", "diarize", "merge"];
const DOWNLOAD_TYPES = { srt: "srt", vtt: "vtt", verbose_json: "json" };

const $ = (id) => document.getElementById(id);
const state = { jobId: null, live: null };

// --- the API ----------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message, code) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE) || "";
}

async function api(path, { method = "GET", body } = {}) {
  const headers = apiKey() ? { Authorization: `Bearer ${apiKey()}` } : {};
  let response;
  try {
    response = await fetch(path, { method, body, headers });
  } catch (err) {
    throw new ApiError(0, `The gateway cannot be reached (${err.message}).`, "unreachable");
  }
  if (response.ok) return response;
  let message = `${response.status} ${response.statusText}`;
  let code = null;
  try {
    const error = (await response.json()).error || {};
    message = error.message || message;
    code = error.code || null;
  } catch (_) { /* not JSON: keep the status line */ }
  throw new ApiError(response.status, message, code);
}

const apiJson = async (path, options) => (await api(path, options)).json();

// A refused key is said once, plainly, at the top of the page and beside the key field.
function explain(err) {
  if (err.status === 401) {
    const what = err.code === "missing_api_key" ? "This gateway needs an API key." : "The API key was not accepted.";
    return `${what} Type a valid key in the API key field above (create one with \`dalston keys create NAME\`). ` +
      `The gateway said: ${err.message}`;
  }
  if (err.status === 403) return `This key may not do that: ${err.message}`;
  return err.message;
}

function showNotice(text) {
  const notice = $("notice");
  notice.textContent = text;
  notice.hidden = !text;
}

function report(err, statusId) {
  const text = explain(err);
  if (err.status === 401 || err.status === 403) {
    showNotice(text);
    setStatus("key-status", err.status === 401 ? "Key refused." : "Key lacks the rights.", "error");
  }
  if (statusId) setStatus(statusId, text, "error");
}

function setStatus(id, text, kind = "") {
  const element = $(id);
  element.textContent = text;
  element.className = `status ${kind}`.trim();
}

// --- the key ----------------------------------------------------------------------------

async function useKey(event) {
  event.preventDefault();
  const key = $("api-key").value.trim();
  if (key) sessionStorage.setItem(KEY_STORAGE, key);
  else sessionStorage.removeItem(KEY_STORAGE);
  $("api-key").value = "";
  await checkKey();
}

function forgetKey() {
  sessionStorage.removeItem(KEY_STORAGE);
  $("api-key").value = "";
  showNotice("");
  setStatus("key-status", "Key forgotten.");
}

// Loads what every part of the page needs; a refused key is reported here, before any upload.
async function checkKey() {
  try {
    await loadModels();
  } catch (err) {
    report(err);
    if (err.status !== 401 && err.status !== 403) showNotice(explain(err));
    return false;
  }
  showNotice("");
  setStatus("key-status", apiKey() ? "Key accepted (kept in this tab only)." : "No key: fine on loopback.", "ok");
  await refreshJobs();
  return true;
}

// --- models -----------------------------------------------------------------------------

function modelRank(model) {
  if (model.loaded_on && model.loaded_on.length) return 0;
  return model.installed ? 1 : 2;
}

async function loadModels() {
  const models = (await apiJson("/v1/models")).data.filter((m) => m.runtime !== "diarize");
  models.sort((a, b) => modelRank(a) - modelRank(b) || a.id.localeCompare(b.id));
  const select = $("model");
  const chosen = select.value;
  select.replaceChildren(...models.map((model) => {
    const where = ["loaded", "installed", "not installed"][modelRank(model)];
    const option = new Option(`${model.id} (${where})`, model.id);
    option.dataset.words = String(Boolean(model.capabilities && model.capabilities.word_timestamps));
    return option;
  }));
  if (models.some((m) => m.id === chosen)) select.value = chosen;
}

// --- a file -----------------------------------------------------------------------------

function chooseFile() {
  if ($("drop").getAttribute("aria-disabled") !== "true") $("file").click();
}

async function transcribeFile(file) {
  const drop = $("drop");
  drop.setAttribute("aria-disabled", "true");
  $("result").hidden = true;
  $("file-stages").replaceChildren();
  setStatus("file-status", `Uploading ${file.name}…`);
  const form = new FormData();
  form.append("file", file, file.name);
  form.append("model", $("model").value);
  form.append("response_format", "verbose_json");
  if ($("diarize").checked) form.append("diarize", "true");
  try {
    const job = await apiJson("/v1/jobs", { method: "POST", body: form });
    state.jobId = job.id;
    setStatus("file-status", `Job ${job.id} queued.`);
    await showJob(await followJob(job.id));
  } catch (err) {
    report(err, "file-status");
  } finally {
    drop.removeAttribute("aria-disabled");
    $("file").value = "";
    refreshJobs();
  }
}

async function followJob(jobId) {
  for (;;) {
    let record;
    try {
      record = await apiJson(`/v1/jobs/${encodeURIComponent(jobId)}`);
    } catch (err) {
      if (err.status !== 404) throw err; // 404: the orchestrator has not recorded it yet
      record = { id: jobId, status: "queued", tasks: {} };
    }
    showStages($("file-stages"), record, "li");
    if (ENDED.has(record.status)) return record;
    const progress = record.chunks_total ? ` (${record.chunks_done} of ${record.chunks_total} pieces)` : "";
    setStatus("file-status", `Job ${jobId} ${record.status}${progress}…`);
    await new Promise((resolve) => setTimeout(resolve, POLL_MS));
  }
}

async function showJob(record) {
  state.jobId = record.id;
  if (record.status !== "completed") {
    const reason = record.failure ? `: ${record.failure.message}` : "";
    setStatus("file-status", `Job ${record.id} ${record.status}${reason}`, "error");
    $("result").hidden = true;
    return;
  }
  const transcript = await apiJson(`/v1/jobs/${encodeURIComponent(record.id)}/transcript?format=verbose_json`);
  const rows = (transcript.segments || []).map((segment) => transcriptRow(segment));
  $("transcript").tBodies[0].replaceChildren(...rows);
  const seconds = transcript.duration ? ` of ${transcript.duration.toFixed(1)} s` : "";
  setStatus("file-status", `Job ${record.id} completed: ${rows.length} segments${seconds}.`, "ok");
  $("result").hidden = false;
}

function transcriptRow(segment) {
  const row = document.createElement("tr");
  const time = cell(`${clock(segment.start)} – ${clock(segment.end)}`);
  const speaker = cell(segment.speaker || "");
  speaker.className = "speaker";
  row.append(time, speaker, cell(segment.text.trim()));
  return row;
}

function cell(text) {
  const td = document.createElement("td");
  td.textContent = text;
  return td;
}

function clock(seconds) {
  const minutes = Math.floor(seconds / 60);
  return `${minutes}:${(seconds - minutes * 60).toFixed(1).padStart(4, "0")}`;
}

async function download(format) {
  if (!state.jobId) return;
  try {
    const response = await api(`/v1/jobs/${encodeURIComponent(state.jobId)}/transcript?format=${format}`);
    const url = URL.createObjectURL(await response.blob());
    const link = document.createElement("a");
    link.href = url;
    link.download = `${state.jobId}.${DOWNLOAD_TYPES[format]}`;
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  } catch (err) {
    report(err, "file-status");
  }
}

// --- stages and recent jobs -------------------------------------------------------------

// One badge per stage: its tasks' worst status (a stage with a failed task failed; with any
// unfinished, it runs), and how many are done where a stage has several (chunks, channels).
function stageSummary(tasks) {
  const byStage = new Map();
  for (const task of Object.values(tasks || {})) {
    if (!byStage.has(task.stage)) byStage.set(task.stage, []);
    byStage.get(task.stage).push(task.status);
  }
  return [...byStage.entries()]
    .sort(([a], [b]) => STAGE_ORDER.indexOf(a) - STAGE_ORDER.indexOf(b))
    .map(([stage, statuses]) => {
      const done = statuses.filter((s) => s === "completed").length;
      const status = statuses.includes("failed") ? "failed" : statuses.includes("cancelled") ? "cancelled"
        : done === statuses.length ? "completed" : statuses.some((s) => s === "running") ? "running" : "waiting";
      const count = statuses.length > 1 ? ` ${done}/${statuses.length}` : "";
      return { stage, status, label: `${stage}: ${status}${count}` };
    });
}

function showStages(container, record, tag) {
  container.replaceChildren(...stageSummary(record.tasks).map(({ status, label }) => {
    const badge = document.createElement(tag);
    badge.className = `stage ${status}`;
    badge.textContent = label;
    return badge;
  }));
}

async function refreshJobs() {
  setStatus("jobs-status", "Loading…");
  let jobs;
  try {
    jobs = (await apiJson("/v1/jobs?limit=20")).data;
  } catch (err) {
    report(err, "jobs-status");
    return;
  }
  $("jobs").tBodies[0].replaceChildren(...jobs.map(jobRow));
  const count = jobs.length === 1 ? "1 job." : `${jobs.length} jobs, newest first.`;
  setStatus("jobs-status", jobs.length ? count : "No jobs yet.");
}

function jobRow(record) {
  const row = document.createElement("tr");
  row.dataset.job = record.id;
  const open = document.createElement("button");
  open.type = "button";
  open.textContent = record.id;
  open.setAttribute("aria-label", `Show job ${record.id}`);
  open.addEventListener("click", () => openJob(record.id));
  const idCell = document.createElement("td");
  idCell.append(open);
  const stages = document.createElement("td");
  showStages(stages, record, "span");
  const submitted = record.created_at ? new Date(record.created_at * 1000).toLocaleString() : "";
  const status = cell(record.failure ? `${record.status}: ${record.failure.message}` : record.status);
  row.append(idCell, cell(submitted), cell(record.model), status, stages);
  return row;
}

async function openJob(jobId) {
  try {
    const record = await apiJson(`/v1/jobs/${encodeURIComponent(jobId)}`);
    showStages($("file-stages"), record, "li");
    await showJob(record);
    $("file-title").scrollIntoView({ behavior: "smooth" });
  } catch (err) {
    report(err, "file-status");
  }
}

// --- live -------------------------------------------------------------------------------

function realtimeUrl() {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${location.host}/v1/realtime?intent=transcription`;
}

function bytesToBase64(buffer) {
  const bytes = new Uint8Array(buffer);
  let text = "";
  for (let i = 0; i < bytes.length; i += 0x8000) text += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(text);
}

async function startLive() {
  if (!(await checkKey())) {
    setStatus("live-status", "Not started: the key above was refused.", "error");
    return;
  }
  const protocols = ["realtime", ...(apiKey() ? [`openai-insecure-api-key.${apiKey()}`] : [])];
  const live = { socket: new WebSocket(realtimeUrl(), protocols), partial: new Map(), stopping: false };
  state.live = live;
  setLiveButton(true);
  setStatus("live-status", "Connecting…");
  live.socket.addEventListener("open", () => openLive(live));
  live.socket.addEventListener("message", (event) => onLiveEvent(live, JSON.parse(event.data)));
  live.socket.addEventListener("close", (event) => closedLive(live, event));
}

async function openLive(live) {
  live.socket.send(JSON.stringify({ type: "session.update", session: { type: "transcription", audio: { input: {
    format: { type: "audio/pcm", rate: SESSION_RATE },
    transcription: { model: $("model").value },
    turn_detection: { type: "server_vad", silence_duration_ms: 500 },
  } } } }));
  try {
    live.stream = await navigator.mediaDevices.getUserMedia({ audio: { channelCount: 1, echoCancellation: true } });
    live.context = new AudioContext();
    await live.context.audioWorklet.addModule("/web/microphone.js");
    const recorder = new AudioWorkletNode(live.context, "pcm-recorder", { processorOptions: { rate: SESSION_RATE } });
    recorder.port.onmessage = (event) => {
      if (live.socket.readyState === WebSocket.OPEN && !live.stopping) {
        live.socket.send(JSON.stringify({ type: "input_audio_buffer.append", audio: bytesToBase64(event.data) }));
      }
    };
    live.context.createMediaStreamSource(live.stream).connect(recorder);
    recorder.connect(live.context.destination); // it outputs silence; connected, it is pulled
    setStatus("live-status", "Listening: speak, and each turn appears when you pause.", "ok");
  } catch (err) {
    setStatus("live-status", `The microphone could not be opened: ${err.message}`, "error");
    stopLive(false);
  }
}

function onLiveEvent(live, event) {
  if (event.type === "conversation.item.input_audio_transcription.delta") {
    live.partial.set(event.item_id, (live.partial.get(event.item_id) || "") + event.delta);
    $("live-partial").textContent = [...live.partial.values()].join(" ");
  } else if (event.type === "conversation.item.input_audio_transcription.completed") {
    live.partial.delete(event.item_id);
    $("live-partial").textContent = [...live.partial.values()].join(" ");
    if (event.transcript.trim()) {
      const turn = document.createElement("li");
      turn.textContent = event.transcript.trim();
      $("live-turns").append(turn);
    }
    if (live.stopping && !live.partial.size) live.socket.close(1000);
  } else if (event.type === "input_audio_buffer.speech_started") {
    if (!live.stopping) setStatus("live-status", "Hearing speech…", "ok");
  } else if (event.type === "input_audio_buffer.committed") {
    live.partial.set(event.item_id, live.partial.get(event.item_id) || "");
    if (!live.stopping) setStatus("live-status", "Transcribing the turn…", "ok");
  } else if (event.type === "error") {
    if (live.stopping && event.error.code === "input_audio_buffer_commit_empty") {
      if (!live.partial.size) live.socket.close(1000);
      return;
    }
    setStatus("live-status", `The session said: ${event.error.message}`, "error");
  }
}

function closedLive(live, event) {
  releaseMicrophone(live);
  if (state.live === live) state.live = null;
  setLiveButton(false);
  if (live.stopping) setStatus("live-status", "Stopped.");
  else if (event.code === 1006 || event.code === 4401 || event.code === 4403) {
    setStatus("live-status", "The live connection was refused or lost. Check the API key above and that " +
      "a transcription engine is running.", "error");
  } else setStatus("live-status", `The live connection closed (${event.code} ${event.reason}).`, "error");
}

// Stopping commits what was said last and waits (a few seconds at most) for its text.
function stopLive(commit = true) {
  const live = state.live;
  if (!live || live.stopping) return;
  live.stopping = true;
  releaseMicrophone(live);
  setStatus("live-status", "Finishing the last turn…");
  if (commit && live.socket.readyState === WebSocket.OPEN) {
    live.socket.send(JSON.stringify({ type: "input_audio_buffer.commit" }));
    setTimeout(() => live.socket.close(1000), 8000);
  } else live.socket.close(1000);
}

function releaseMicrophone(live) {
  if (live.stream) live.stream.getTracks().forEach((track) => track.stop());
  if (live.context && live.context.state !== "closed") live.context.close();
  live.stream = live.context = null;
}

function setLiveButton(on) {
  const button = $("live-toggle");
  button.setAttribute("aria-pressed", String(on));
  button.textContent = on ? "Stop listening" : "Start listening";
}

// --- wiring -----------------------------------------------------------------------------

function wire() {
  $("key-form").addEventListener("submit", useKey);
  $("forget-key").addEventListener("click", forgetKey);
  const drop = $("drop");
  drop.addEventListener("click", chooseFile);
  drop.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") {
      event.preventDefault();
      chooseFile();
    }
  });
  drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    const file = event.dataTransfer.files[0];
    if (file && drop.getAttribute("aria-disabled") !== "true") transcribeFile(file);
  });
  $("file").addEventListener("change", () => {
    if ($("file").files[0]) transcribeFile($("file").files[0]);
  });
  document.querySelectorAll(".downloads button").forEach((button) => {
    button.addEventListener("click", () => download(button.dataset.format));
  });
  $("refresh-jobs").addEventListener("click", refreshJobs);
  $("live-toggle").addEventListener("click", () => (state.live ? stopLive() : startLive()));
}

wire();
checkKey();
