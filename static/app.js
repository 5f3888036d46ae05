// The switchd page: live status, switching with a progress bar, what waits, recent
// switches, memory over time, and chat. One event stream per page (/v1/events),
// resumed with Last-Event-ID; the views it feeds live in their own modules.

import { api, apiKey, firstEvent, readEvents, saveApiKey, Unauthorized } from "./api.js";
import { MemoryChart } from "./chart.js";
import { refitOnResize, renderDevices } from "./devices.js";
import { element, gb, setIfChanged } from "./format.js";
import { HISTORY_LIMIT, renderHistory } from "./history.js";
import { renderModels } from "./models.js";
import { renderWaiting } from "./waiting.js";

const $ = (id) => document.getElementById(id);
const STAGE_EVENTS = new Set([
  "queued", "memory_check", "drain", "unload", "unloaded", "sleep", "slept", "freed",
  "wake", "woken", "start", "loading", "log", "ready", "result", "error",
]);
const LOG_LINES = 40;
// Requests start waiting without any event (only jobs have events): the Waiting view
// and the memory chart read the status this often while the stream is live.
const POLL_MS = 2000;

const state = {
  status: null,      // the last /v1/models/status body
  lastEventId: null, // for Last-Event-ID on reconnect
  job: null,         // {id, target, kind, done, progress, locks}
  sending: false,    // a chat answer is streaming
  keyWanted: null,   // resolves when a key is saved
  live: false,       // the event stream is open
  stale: false,      // it was lost: the figures on show may be out of date
  mine: new Map(),   // job id -> {kind, target, position, behind}: jobs this page queued
  joined: null,      // the running switch's target, when this page asked for it again
  shown: {},         // view -> the JSON it was last drawn from: unchanged views are not redrawn
};

const chart = new MemoryChart($("memory-chart"));

// Runs `task` now, or once more after the run in progress when called meanwhile: a
// burst of triggers becomes one read, plus one that surely follows the last trigger.
function coalesced(task) {
  let running = false;
  let again = false;
  return async function run() {
    if (running) {
      again = true;
      return;
    }
    running = true;
    try {
      do {
        again = false;
        await task();
      } while (again);
    } finally {
      running = false;
    }
  };
}

// ---- the API key --------------------------------------------------------------

function askForKey(message) {
  $("key-panel").hidden = false;
  $("key-error").textContent = message || "";
  $("api-key").focus();
  if (!state.keyWanted) {
    state.keyWanted = new Promise((resolve) => { state.resolveKey = resolve; });
  }
  return state.keyWanted;
}

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  saveApiKey($("api-key").value.trim());
  $("key-panel").hidden = true;
  $("key-error").textContent = "";
  const resolve = state.resolveKey;
  state.keyWanted = null;
  if (resolve) resolve();
  refreshStatus();
});

// ---- status: GPU bars, chart, models, Waiting, the model select ------------------

function onStatus(status) {
  state.status = status;
  chart.add(status);
  renderStatus();
  // A status read while the stream is live: what the page shows is current again.
  if (state.live && state.stale) setStale(false);
  updateControls();
}

// Draws a view only when what it shows changed: the 2 s poll does not rebuild the
// page under the pointer (a hovered tooltip, an open dropdown, a text selection).
function redraw(view, key, draw) {
  if (state.shown[view] === key) return;
  state.shown[view] = key;
  draw();
}

// Fields the table does not show, which change at every read while requests wait.
const NOT_IN_TABLE = new Set([
  "oldest_wait_seconds", "waiting", "last_used", "demand_age_seconds", "given_up",
  "hold_left_seconds",
]);

function renderStatus() {
  const status = state.status;
  if (!status) return;
  const states = Object.fromEntries(
    Object.entries(status.models).map(([name, model]) => [name, [model.status, model.sleep]]));
  redraw("devices", JSON.stringify([status.gpu, states]), () => renderDevices($("devices"), status));
  const shown = JSON.stringify(status.models, (key, value) => (NOT_IN_TABLE.has(key) ? undefined : value));
  redraw("models", shown, () => renderModels($("models"), status.models, status.gpu.devices.length));
  renderSelect(status.models);
  renderWaiting($("waiting"), status);
  renderQueueNote();
}

function renderSelect(models) {
  const select = $("model");
  const labels = Object.entries(models).map(([name, model]) => [name, `${name} (${model.status})`]);
  redraw("select", JSON.stringify(labels), () => {
    const chosen = select.value;
    select.replaceChildren(...labels.map(([name, label]) => new Option(label, name)));
    if (chosen && models[chosen]) select.value = chosen;
    else {
      const running = Object.keys(models).find((name) => models[name].status === "running");
      if (running) select.value = running;
    }
  });
}

const refreshStatus = coalesced(async () => {
  try {
    const response = await api("/v1/models/status");
    if (response.ok) onStatus(await response.json());
  } catch (error) {
    if (error instanceof Unauthorized) askForKey("That key was refused. Enter the API key.");
  }
});

// Once a page: the samples switchd kept, so the chart does not start empty.
let memorySeeded = false;
async function seedMemoryChart() {
  if (memorySeeded) return;
  try {
    const response = await api("/v1/gpu/history");
    if (!response.ok) return;
    chart.seed((await response.json()).samples);
    memorySeeded = true;
  } catch {
    // An older switchd, or no key yet: the chart fills as the page reads the status.
  }
}

const refreshHistory = coalesced(async () => {
  try {
    const response = await api(`/v1/switches?limit=${HISTORY_LIMIT}`);
    if (response.ok) renderHistory($("history"), $("history-empty"), (await response.json()).switches);
  } catch {
    // Read again after the next job ends or the stream comes back.
  }
});

setInterval(() => {
  if (state.live && !document.hidden) refreshStatus();
}, POLL_MS);
refitOnResize($("devices"));

// ---- a switch in progress -------------------------------------------------------

function stageSentence(name, data) {
  const victim = data.victim;
  switch (name) {
    case "queued": return `Waiting for the switch to ${data.behind} to finish…`;
    case "memory_check": return memorySentence(data);
    case "drain": return `Waiting for ${data.in_flight} request(s) on ${victim} to finish…`;
    case "unload":
      // With its reason when it is stopped instead of put to sleep, or its wake failed.
      return data.message && data.message.startsWith(`Unloading ${victim}: `)
        ? data.message
        : `Unloading ${victim}…`;
    case "unloaded": return `${victim} unloaded: ${gb(data.freed_gb)} freed.`;
    case "sleep": return `${data.message}…`;
    case "slept": return `${data.message}.`;
    case "wake": return `${data.message}…`;
    case "woken": return `${data.message}.`;
    case "freed": return `Freed ${gb(data.freed_gb)}; ${gb(data.available_gb)} free.`;
    case "start": return `Starting ${data.model}…`;
    case "loading":
      return `Loading ${data.model} — ${Math.round(data.elapsed_seconds)} s of ~${Math.round(data.estimated_load_time_seconds)} s`;
    case "ready": {
      const how = state.job && state.job.woken ? "woke" : "loaded";
      return `${data.model} is ready (${how} in ${data.load_seconds} s).`;
    }
    case "result":
      return data.status === "already_loaded" ? `${data.model} is already running.` : data.message;
    case "error": return `Switch failed: ${data.message}`;
    default: return data.message;
  }
}

function memorySentence(data) {
  const needs = `${data.model} needs ${gb(data.required_gb)}; ${gb(data.available_gb)} free`;
  const asleep = data.to_sleep || [];
  const stopped = data.to_unload.filter((name) => !asleep.includes(name));
  const actions = [];
  if (asleep.length) actions.push(`sleeping ${asleep.join(", ")}`);
  if (stopped.length) actions.push(`unloading ${stopped.join(", ")}`);
  return actions.length ? `${needs}: ${actions.join(", ")}…` : `${needs}.`;
}

function beginJob(data) {
  // An unload changes no model the chat could be waiting for: it locks nothing.
  const locks = data.kind !== "unload";
  state.job = { id: data.job, target: data.model, kind: data.kind, done: false, progress: 0, locks };
  state.mine.delete(data.job); // it waits no more
  state.joined = null;
  $("banner").hidden = false;
  $("banner").className = "banner";
  $("timeline").replaceChildren();
  $("log").textContent = "";
  setProgress(0);
  renderQueueNote();
  updateControls();
  refreshStatus(); // the queue in the Waiting view moved up
}

function setProgress(fraction) {
  const percent = Math.round(fraction * 100);
  // The bar never goes back within a job.
  if (state.job && percent < state.job.progress) return;
  if (state.job) state.job.progress = percent;
  $("progress").value = percent;
  $("progress-text").textContent = `${percent}%`;
}

// Lines about other jobs, noted in the timeline of the job on show.
const NOTES = new Set(["queued", "beside"]);

function addTimeline(name, text) {
  const timeline = $("timeline");
  if (name === "loading") {
    // One line for the whole load, updated every second, even with "Then: …" notes
    // of jobs queued meanwhile after it.
    let last = timeline.lastElementChild;
    while (last && NOTES.has(last.dataset.stage)) last = last.previousElementSibling;
    if (last && last.dataset.stage === "loading") {
      last.textContent = text;
      return;
    }
  }
  const item = document.createElement("li");
  item.dataset.stage = name;
  item.textContent = text;
  timeline.append(item);
}

function appendLog(lines) {
  const log = $("log");
  const kept = (log.textContent ? log.textContent.split("\n") : []).concat(lines).slice(-LOG_LINES);
  log.textContent = kept.join("\n");
  log.scrollTop = log.scrollHeight;
}

function onStageEvent(name, data) {
  if (!state.job || state.job.id !== data.job) {
    if (name === "log") return; // a line of a job this page did not see start
    if (name === "queued" && state.job && !state.job.done) {
      // Another job waits behind the one on show: note it, keep following this one.
      addTimeline("queued", `Then: ${data.model} (queued)`);
      refreshStatus();
      return;
    }
    if (state.job && !state.job.done) {
      // A load that needed no room, run beside the job on show: noted, not followed.
      noteBeside(name, data);
      return;
    }
    beginJob(data);
  }
  if (name === "log") {
    appendLog([data.line]);
    return;
  }
  setProgress(data.progress);
  if (name === "woken") state.job.woken = true;
  const sentence = stageSentence(name, data);
  $("stage-text").textContent = sentence;
  addTimeline(name, sentence);
  if (name === "result" || name === "error") {
    state.job.done = true;
    state.joined = null;
    $("banner").className = `banner ${name === "error" ? "failed" : "done"}`;
    if (name === "error" && data.last_lines) appendLog(data.last_lines);
    renderQueueNote();
    updateControls();
    refreshStatus();
    refreshHistory();
  }
}

function noteBeside(name, data) {
  if (name === "memory_check") addTimeline("beside", `Beside it: loading ${data.model}…`);
  if (name === "result") addTimeline("beside", `Beside it: ${data.model} is ready.`);
  if (name === "error") addTimeline("beside", `Beside it: ${data.model} failed: ${data.message}`);
  if (name === "result" || name === "error") refreshStatus();
}

function showRunningSwitch(current) {
  // A snapshot taken mid-switch: show where it is until its events arrive.
  if (!current || (state.job && state.job.id === current.id)) return;
  beginJob({ job: current.id, model: current.target, kind: current.kind });
  setProgress(current.progress);
  $("stage-text").textContent = `Switching to ${current.target}: ${current.stage}…`;
}

// Under the stage line: the jobs this page queued behind the one on show, with
// their place in the queue as the latest status has it.
function renderQueueNote() {
  const note = $("queue-note");
  const current = state.status && state.status.switch;
  const queue = current ? current.queued || [] : [];
  const lines = [];
  if (state.joined) lines.push(`Joined the switch to ${state.joined} already running.`);
  for (const mine of state.mine.values()) {
    const index = queue.indexOf(mine.target);
    const position = index >= 0 ? index + 1 : mine.position;
    const behind = index > 0 ? queue[index - 1] : index === 0 ? current.target : mine.behind;
    const what = mine.kind === "unload" ? `unload ${mine.target}` : `switch to ${mine.target}`;
    lines.push(`Queued behind ${behind} (position ${position}): ${what}`);
  }
  note.replaceChildren(...lines.map((line) => element("li", "", line)));
  note.hidden = lines.length === 0;
}

// ---- the page's one event stream ---------------------------------------------------

function setStale(stale) {
  state.stale = stale;
  $("main").classList.toggle("stale", stale);
  $("stale-banner").hidden = !stale;
  updateControls();
}

async function followEvents() {
  let delay = 500;
  for (;;) {
    try {
      const headers = { Accept: "text/event-stream" };
      if (state.lastEventId) headers["Last-Event-ID"] = state.lastEventId;
      const response = await api("/v1/events", { headers });
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      $("connection").textContent = "Live";
      state.live = true;
      delay = 500;
      // Resumed with Last-Event-ID, switchd replays what was missed and sends no
      // snapshot: a fresh status read says when the figures are current again.
      if (state.stale) statusAfterResume();
      for await (const message of readEvents(response)) {
        if (message.id) state.lastEventId = message.id;
        handleEvent(message.event, JSON.parse(message.data));
      }
      throw new Error("the stream ended");
    } catch (error) {
      state.live = false;
      if (error instanceof Unauthorized) {
        $("connection").textContent = "API key needed";
        await askForKey(apiKey() ? "That key was refused. Enter the API key." : "");
        continue;
      }
      $("connection").textContent = "Reconnecting…";
      setStale(true);
      await new Promise((resolve) => setTimeout(resolve, delay));
      delay = Math.min(delay * 2, 5000);
    }
  }
}

// A status read after the stream came back says no job runs, or another one: the
// job on show ended while the page was away (switchd restarted, or was killed and
// never said so). Its progress banner goes, and nothing stays locked.
function dropEndedJob(current) {
  if (state.job && !state.job.done && !(current && current.id === state.job.id)) {
    state.job.done = true;
    $("banner").hidden = true;
  }
}

// After a resume (no snapshot comes): a fresh status, read now, ends a job on show
// that no longer runs.
async function statusAfterResume() {
  try {
    const response = await api("/v1/models/status");
    if (!response.ok) return;
    const status = await response.json();
    dropEndedJob(status.switch);
    onStatus(status);
    updateControls();
  } catch (error) {
    if (error instanceof Unauthorized) askForKey("That key was refused. Enter the API key.");
  }
}

function handleEvent(name, data) {
  if (name === "snapshot") {
    dropEndedJob(data.switch);
    if (!data.switch) {
      state.mine.clear();
      state.joined = null;
    }
    onStatus(data);
    showRunningSwitch(data.switch);
    refreshHistory();
    seedMemoryChart();
  } else if (name === "model_state") {
    refreshStatus();
  } else if (STAGE_EVENTS.has(name)) {
    onStageEvent(name, data);
  }
}

// ---- switching and unloading ---------------------------------------------------------

// The job on show, or the one the last status says runs.
function runningJob() {
  if (state.job && !state.job.done) return state.job;
  const current = state.status && state.status.switch;
  if (current && !(state.job && state.job.id === current.id)) return current;
  return null;
}

function canUnload(name) {
  const model = state.status && state.status.models[name];
  return Boolean(model) && ["running", "loading", "sleeping"].includes(model.status);
}

// Every control's state from the page's state, in one place.
function updateControls() {
  const model = $("model").value;
  const running = runningJob();
  const joins = running && running.kind !== "unload" && running.target === model;
  const button = $("switch-button");
  setIfChanged(button, "textContent", !running ? "Switch" : joins ? "Join switch" : "Queue switch");
  setIfChanged(button, "title", !running ? ""
    : joins ? `A switch to ${model} is running: follow it`
      : `A job for ${running.target} is running: this switch waits behind it`);
  setIfChanged(button, "disabled", state.stale || !model);
  setIfChanged($("unload-button"), "disabled", state.stale || !canUnload(model));
  setIfChanged($("message"), "disabled", chatLocked());
  setIfChanged($("send"), "disabled", chatLocked() || state.stale);
}

// Asks for a job, and reads only its first event: `queued` says it waits behind
// another job. The page's own event stream shows the rest; closing this stream does
// not cancel the job.
async function requestJob(kind, model) {
  $("switch-error").textContent = "";
  const running = runningJob();
  const path = kind === "unload"
    ? `/v1/models/unload?model=${encodeURIComponent(model)}`
    : `/v1/models/switch?target_model=${encodeURIComponent(model)}`;
  try {
    const response = await api(path, { method: "POST", headers: { Accept: "text/event-stream" } });
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      const verb = kind === "unload" ? "Unload" : "Switch";
      $("switch-error").textContent = `${verb} refused: ${body.message || `HTTP ${response.status}`}`;
      return;
    }
    const first = await firstEvent(response);
    if (first && first.event === "queued") {
      const data = JSON.parse(first.data);
      const started = state.job && state.job.id === data.job; // the job ahead ended meanwhile
      if (!started) {
        state.mine.set(data.job, { kind, target: model, position: data.position, behind: data.behind });
      }
    } else if (running && running.kind === kind && running.target === model) {
      state.joined = model;
    }
    renderQueueNote();
  } catch (error) {
    if (error instanceof Unauthorized) askForKey(`Enter the API key to ${kind} models.`);
    // Otherwise the connection dropped: the stale banner says so.
  }
}

$("switch-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const model = $("model").value;
  if (model && !state.stale) requestJob("switch", model);
});

$("unload-button").addEventListener("click", () => {
  const model = $("model").value;
  if (model && !state.stale) requestJob("unload", model);
});

$("model").addEventListener("change", updateControls);

// ---- chat ------------------------------------------------------------------------------

function chatLocked() {
  return state.sending || Boolean(state.job && state.job.locks && !state.job.done);
}

function addMessage(role, text) {
  const box = document.createElement("div");
  box.className = `message ${role}`;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = role === "user" ? "You" : role === "error" ? "Error" : $("model").value;
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  box.append(who, body);
  $("messages").append(box);
  return body;
}

const history = [];

$("chat-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const text = $("message").value.trim();
  const model = $("model").value;
  if (!text || !model || chatLocked() || state.stale) return;
  $("message").value = "";
  addMessage("user", text);
  history.push({ role: "user", content: text });
  state.sending = true;
  updateControls();
  const answer = addMessage("assistant", "");
  // While its model loads, switchd tells this request's progress as reasoning lines
  // (X-Switchd-Progress: on): the bubble shows the latest until the answer begins.
  const progress = document.createElement("span");
  progress.className = "progress";
  progress.setAttribute("role", "status");
  answer.before(progress);
  try {
    const response = await api("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json", "X-Switchd-Progress": "on" },
      body: JSON.stringify({ model, messages: history, stream: true }),
    });
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      throw new Error(body.error ? body.error.message : `HTTP ${response.status}`);
    }
    for await (const message of readEvents(response)) {
      if (message.data === "[DONE]") break;
      const chunk = JSON.parse(message.data);
      if (chunk.error) throw new Error(chunk.error.message); // a load that failed
      const delta = chunk.choices?.[0]?.delta || {};
      if (delta.reasoning_content) progress.textContent = delta.reasoning_content.trim();
      if (delta.content) {
        progress.remove();
        answer.textContent += delta.content;
      }
    }
    history.push({ role: "assistant", content: answer.textContent });
  } catch (error) {
    answer.parentElement.remove();
    history.pop();
    if (error instanceof Unauthorized) askForKey("Enter the API key to chat.");
    else addMessage("error", String(error.message || error));
  } finally {
    progress.remove();
    state.sending = false;
    updateControls();
    $("message").focus();
  }
});

$("message").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("chat-form").requestSubmit();
  }
});

updateControls();
followEvents();
