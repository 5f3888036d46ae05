// The switchd page: live status, switching with a progress bar, and chat.
// One event stream per page (/v1/events), resumed with Last-Event-ID.

import { api, apiKey, readEvents, saveApiKey, Unauthorized } from "./api.js";

const $ = (id) => document.getElementById(id);
const STAGE_EVENTS = new Set([
  "queued", "memory_check", "drain", "unload", "unloaded", "sleep", "slept", "freed",
  "wake", "woken", "start", "loading", "log", "ready", "result", "error",
]);
const LOG_LINES = 40;
const NARROW_PERCENT = 6; // a bar segment this thin shows no text: it would be cut to a glyph

const state = {
  status: null,      // the last /v1/models/status body
  lastEventId: null, // for Last-Event-ID on reconnect
  job: null,         // {id, target, done, progress}
  sending: false,    // a chat answer is streaming
  keyWanted: null,   // resolves when a key is saved
};

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

// ---- status: GPU bars, models table, model select -------------------------------

function gb(value) {
  return value == null ? "–" : `${Number(value).toFixed(2)} GB`;
}

// 1 -> "1", 2.14 -> "2.1", 0.063 -> "0.063": seconds as people read them.
function secs(value) {
  return String(Number(Number(value).toPrecision(2)));
}

function heldGb(model) {
  return model.gpu_memory_used_gb ?? model.size_gb;
}

function sleeping(model) {
  return model.status === "sleeping" && model.sleep ? model.sleep : null;
}

function renderStatus() {
  const status = state.status;
  if (!status) return;
  renderDevices(status);
  renderModels(status.models);
  renderSelect(status.models);
}

function renderDevices(status) {
  const devices = $("devices");
  devices.replaceChildren();
  for (const device of status.gpu.devices) {
    const box = document.createElement("div");
    box.className = "device";
    const label = document.createElement("div");
    label.className = "device-label";
    label.innerHTML = "<span></span><span></span>";
    label.children[0].textContent = `GPU ${device.index}: ${device.name}`;
    label.children[1].textContent =
      `${device.used_gb.toFixed(2)} of ${device.total_gb.toFixed(2)} GB used, ${device.available_gb.toFixed(2)} GB free`;
    const bar = document.createElement("div");
    bar.className = "bar";
    bar.setAttribute("role", "img");
    let accounted = 0;
    const parts = [];
    // What each model holds on this device, as switchd accounts it (placed, measured).
    for (const [name, onDevice] of Object.entries(device.models || {})) {
      const model = status.models[name];
      if (!model) continue;
      const held = Math.min(onDevice, device.total_gb - accounted);
      accounted += held;
      const sleep = sleeping(model);
      parts.push({ name, held, css: `model ${model.status}`, sleep, what: sleep ? " asleep" : "" });
    }
    const other = device.used_gb - accounted;
    if (other > 0.05) parts.push({ name: "other", held: other, css: "other" });
    for (const part of parts) {
      const span = document.createElement("span");
      span.className = part.css;
      const percent = (100 * part.held) / device.total_gb;
      span.style.width = `${percent}%`;
      if (percent < NARROW_PERCENT) span.classList.add("narrow"); // its title and the note say it
      span.textContent = `${part.name}${part.what || ""} ${part.held.toFixed(1)} GB`;
      span.title = part.sleep
        ? `${span.textContent} (${part.sleep.level}), kept while asleep`
        : span.textContent;
      bar.append(span);
    }
    bar.setAttribute("aria-label",
      `${label.children[1].textContent}: ${parts.map((p) => `${p.name}${p.what || ""} ${p.held.toFixed(1)} GB`).join(", ") || "empty"}`);
    box.append(label, bar);
    const sleepers = parts.filter((part) => part.sleep);
    if (sleepers.length) box.append(sleepNote(sleepers));
    devices.append(box);
  }
}

// Under a bar: its sleeping models' residues are too thin to carry their own label.
function sleepNote(sleepers) {
  const note = document.createElement("p");
  note.className = "bar-note";
  for (const part of sleepers) {
    const item = document.createElement("span");
    const swatch = document.createElement("span");
    swatch.className = "swatch sleeping";
    const wake = secs(part.sleep.estimated_wake_seconds);
    item.append(swatch,
      `${part.name} asleep (${part.sleep.level}): ${part.held.toFixed(1)} GB kept, wakes in ~${wake} s`);
    note.append(item);
  }
  return note;
}

function statusCell(cell, model) {
  const badge = document.createElement("span");
  badge.className = `status ${model.status}`;
  badge.textContent = model.status;
  cell.append(badge);
  const sleep = sleeping(model);
  if (sleep) {
    badge.textContent = `sleeping · ${sleep.level}`;
    const wake = `wakes in ~${secs(sleep.estimated_wake_seconds)} s`;
    const ram = sleep.host_ram_gb ? `, ${gb(sleep.host_ram_gb)} of host RAM` : "";
    badge.title = `Asleep since ${new Date(sleep.since).toLocaleTimeString()}${ram}; ${wake}`;
    cell.append(note(wake));
  }
  if (model.error) {
    const why = document.createElement("span");
    why.className = "status-error";
    why.textContent = model.error.split("\n")[0];
    cell.append(why);
  }
}

function memoryCell(cell, model) {
  if (sleeping(model)) {
    // What it keeps on the GPU asleep; what it takes back once woken.
    cell.append(gb(model.gpu_memory_used_gb), note(`asleep; ${gb(model.size_gb)} awake`));
  } else {
    cell.textContent = gb(model.status === "running" ? heldGb(model) : model.size_gb);
  }
}

function note(text) {
  const line = document.createElement("span");
  line.className = "cell-note";
  line.textContent = text;
  return line;
}

function renderModels(models) {
  const body = $("models").tBodies[0];
  body.replaceChildren();
  for (const [name, model] of Object.entries(models)) {
    const row = body.insertRow();
    row.dataset.model = name;
    row.insertCell().textContent = name;
    statusCell(row.insertCell(), model);
    memoryCell(row.insertCell(), model);
    row.insertCell().textContent = `~${model.estimated_load_time_seconds} s`;
    row.insertCell().textContent = String(model.in_flight);
    row.insertCell().textContent = model.pinned ? "pinned" : "";
  }
}

function renderSelect(models) {
  const select = $("model");
  const chosen = select.value;
  select.replaceChildren();
  for (const [name, model] of Object.entries(models)) {
    const option = new Option(`${name} (${model.status})`, name);
    select.append(option);
  }
  if (chosen && models[chosen]) select.value = chosen;
  else {
    const running = Object.keys(models).find((name) => models[name].status === "running");
    if (running) select.value = running;
  }
}

let refreshing = false;
let refreshAgain = false;
async function refreshStatus() {
  // Bursts of model_state events become one read, plus one more if a change came
  // in while a read was on its way (that read may predate the change).
  if (refreshing) {
    refreshAgain = true;
    return;
  }
  refreshing = true;
  try {
    do {
      refreshAgain = false;
      const response = await api("/v1/models/status");
      if (response.ok) {
        state.status = await response.json();
        renderStatus();
      }
    } while (refreshAgain);
  } catch (error) {
    if (error instanceof Unauthorized) askForKey("That key was refused. Enter the API key.");
  } finally {
    refreshing = false;
  }
}

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
  state.job = { id: data.job, target: data.model, done: false, progress: 0, locks };
  $("banner").hidden = false;
  $("banner").className = "banner";
  $("timeline").replaceChildren();
  $("log").textContent = "";
  setProgress(0);
  if (locks) lockChat();
}

function setProgress(fraction) {
  const percent = Math.round(fraction * 100);
  // The bar never goes back within a job.
  if (state.job && percent < state.job.progress) return;
  if (state.job) state.job.progress = percent;
  $("progress").value = percent;
  $("progress-text").textContent = `${percent}%`;
}

function addTimeline(name, text) {
  const timeline = $("timeline");
  const last = timeline.lastElementChild;
  if (name === "loading" && last && last.dataset.stage === "loading") {
    last.textContent = text;
    return;
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
      // Another switch waits behind the one on show: note it, keep following this one.
      addTimeline("queued", `Then: ${data.model} (queued)`);
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
    $("banner").className = `banner ${name === "error" ? "failed" : "done"}`;
    if (name === "error" && data.last_lines) appendLog(data.last_lines);
    unlockChat();
    refreshStatus();
  }
}

function showRunningSwitch(current) {
  // A snapshot taken mid-switch: show where it is until its events arrive.
  if (!current || (state.job && state.job.id === current.id)) return;
  beginJob({ job: current.id, model: current.target, kind: current.kind });
  setProgress(current.progress);
  $("stage-text").textContent = `Switching to ${current.target}: ${current.stage}…`;
}

// ---- the page's one event stream ---------------------------------------------------

async function followEvents() {
  let delay = 500;
  for (;;) {
    try {
      const headers = { Accept: "text/event-stream" };
      if (state.lastEventId) headers["Last-Event-ID"] = state.lastEventId;
      const response = await api("/v1/events", { headers });
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      $("connection").textContent = "Live";
      delay = 500;
      for await (const message of readEvents(response)) {
        if (message.id) state.lastEventId = message.id;
        handleEvent(message.event, JSON.parse(message.data));
      }
      throw new Error("the stream ended");
    } catch (error) {
      if (error instanceof Unauthorized) {
        $("connection").textContent = "API key needed";
        await askForKey(apiKey() ? "That key was refused. Enter the API key." : "");
        continue;
      }
      $("connection").textContent = "Reconnecting…";
      await new Promise((resolve) => setTimeout(resolve, delay));
      delay = Math.min(delay * 2, 5000);
    }
  }
}

function handleEvent(name, data) {
  if (name === "snapshot") {
    state.status = data;
    renderStatus();
    if (state.job && !state.job.done && !data.switch) {
      // The job ended while we were away (or switchd restarted): do not stay locked.
      state.job.done = true;
      unlockChat();
    }
    showRunningSwitch(data.switch);
  } else if (name === "model_state") {
    refreshStatus();
  } else if (STAGE_EVENTS.has(name)) {
    onStageEvent(name, data);
  }
}

// ---- switching and chat ------------------------------------------------------------

$("switch-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const model = $("model").value;
  if (!model) return;
  try {
    const response = await api(`/v1/models/switch?target_model=${encodeURIComponent(model)}`, { method: "POST" });
    if (!response.ok && response.status >= 400 && response.status < 500) {
      const body = await response.json();
      if (!state.job || state.job.done) {
        $("banner").hidden = false;
        $("banner").className = "banner failed";
        $("stage-text").textContent = `Switch refused: ${body.message}`;
      }
    }
  } catch (error) {
    if (error instanceof Unauthorized) askForKey("Enter the API key to switch models.");
  }
});

function chatLocked() {
  return state.sending || Boolean(state.job && state.job.locks && !state.job.done);
}

function lockChat() {
  $("message").disabled = true;
  $("send").disabled = true;
}

function unlockChat() {
  if (chatLocked()) return;
  $("message").disabled = false;
  $("send").disabled = false;
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
  if (!text || !model || chatLocked()) return;
  $("message").value = "";
  addMessage("user", text);
  history.push({ role: "user", content: text });
  state.sending = true;
  lockChat();
  const answer = addMessage("assistant", "");
  try {
    const response = await api("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ model, messages: history, stream: true }),
    });
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      throw new Error(body.error ? body.error.message : `HTTP ${response.status}`);
    }
    for await (const message of readEvents(response)) {
      if (message.data === "[DONE]") break;
      const delta = JSON.parse(message.data).choices?.[0]?.delta?.content;
      if (delta) answer.textContent += delta;
    }
    history.push({ role: "assistant", content: answer.textContent });
  } catch (error) {
    answer.parentElement.remove();
    history.pop();
    if (error instanceof Unauthorized) askForKey("Enter the API key to chat.");
    else addMessage("error", String(error.message || error));
  } finally {
    state.sending = false;
    unlockChat();
    $("message").focus();
  }
});

$("message").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("chat-form").requestSubmit();
  }
});

followEvents();
