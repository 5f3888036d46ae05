// The models table: one row per model. Every cell carries its column's name
// (data-label) so that, on a narrow screen, CSS can show each row as a card of
// labelled fields instead of hiding columns.

import { clock, element, gb, plural, secs } from "./format.js";

const COLUMNS = ["Model", "Status", "Size", "Load time", "In flight", "Pinned"];

function sleeping(model) {
  return model.status === "sleeping" && model.sleep ? model.sleep : null;
}

// When a model that failed to load takes requests again, if that is still ahead.
function coolingUntil(model) {
  const until = model.cooldown_until ? new Date(model.cooldown_until) : null;
  return until && until.getTime() > Date.now() ? until : null;
}

function note(text) {
  return element("span", "cell-note", text);
}

// Behind `switchd gateway` (several hosts), where the model runs or sleeps, else the
// host a request for it would go to; a single switchd's status has no `hosts`.
function hostsNote(model) {
  const where = [...(model.loaded_on || []), ...(model.asleep_on || []).map((h) => `${h} (asleep)`)];
  const text = where.length ? `on ${where.join(", ")}` : `would load on ${model.host}`;
  const badge = element("span", "host-badge", text);
  badge.title = "The cluster's hosts where it is loaded or asleep; else where a request would load it";
  return badge;
}

function statusCell(cell, model) {
  const badge = element("span", `status ${model.status}`, model.status);
  cell.append(badge);
  const sleep = sleeping(model);
  if (sleep) {
    badge.textContent = `sleeping · ${sleep.level}`;
    const wake = `wakes in ~${secs(sleep.estimated_wake_seconds)} s`;
    const ram = sleep.host_ram_gb ? `, ${gb(sleep.host_ram_gb)} of host RAM` : "";
    badge.title = `Asleep since ${new Date(sleep.since).toLocaleTimeString()}${ram}; ${wake}`;
    cell.append(note(wake));
  }
  const until = coolingUntil(model);
  if (until) {
    // switchd refuses requests for it until then rather than retrying a broken engine.
    const line = element("span", "cooldown",
      `cooling down until ${clock(until)} (${plural(model.failures, "failure")})`);
    line.title = "Its engine failed to load: requests for it get 503 until then. " +
      "A switch to it tries again at once.";
    cell.append(line);
  }
  if (model.error) cell.append(element("span", "status-error", model.error.split("\n")[0]));
  if (model.hosts) cell.append(hostsNote(model));
}

// Where it is (its engine's devices) or may go (its configured ones), on a host of
// several GPUs; null where that says nothing (one GPU, or any of them).
function placement(model, deviceCount) {
  if (deviceCount < 2) return null;
  const devices = model.devices || (Array.isArray(model.gpus) ? model.gpus : null);
  if (!devices || !devices.length) return null;
  return `${devices.length > 1 ? "GPUs" : "GPU"} ${devices.join(", ")}`;
}

function memoryCell(cell, model, deviceCount) {
  if (sleeping(model)) {
    // What it keeps on the GPU asleep; what it takes back once woken.
    cell.append(gb(model.gpu_memory_used_gb), note(`asleep; ${gb(model.size_gb)} awake`));
  } else {
    const held = model.gpu_memory_used_gb ?? model.size_gb;
    cell.textContent = gb(model.status === "running" ? held : model.size_gb);
  }
  const where = placement(model, deviceCount);
  if (where) {
    const line = note(`on ${where}`);
    line.classList.add("devices");
    cell.append(line);
  }
}

export function renderModels(table, models, deviceCount = 1) {
  const body = table.tBodies[0];
  body.replaceChildren();
  for (const [name, model] of Object.entries(models)) {
    const row = body.insertRow();
    row.dataset.model = name;
    const cells = COLUMNS.map((label) => {
      const cell = row.insertCell();
      cell.dataset.label = label;
      return cell;
    });
    cells[0].textContent = name;
    statusCell(cells[1], model);
    memoryCell(cells[2], model, deviceCount);
    cells[3].textContent = `~${model.estimated_load_time_seconds} s`;
    cells[4].textContent = String(model.in_flight);
    cells[5].textContent = model.pinned ? "pinned" : "";
  }
}
