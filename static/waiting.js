// "Waiting": who waits for what right now, from /v1/models/status. Requests wait
// for a model that is not serving (per model: how many, the oldest wait); explicit
// switches wait in a FIFO queue behind the running job.

import { element, secs } from "./format.js";

function waitingModels(status) {
  return Object.entries(status.models)
    .filter(([, model]) => model.waiting > 0)
    .sort(([, a], [, b]) => (b.oldest_wait_seconds ?? 0) - (a.oldest_wait_seconds ?? 0));
}

function requestItem(name, model) {
  const item = element("li");
  item.dataset.model = name;
  const oldest = model.oldest_wait_seconds;
  item.append(element("strong", "", name),
    ` ${model.waiting} waiting` + (oldest != null ? `, oldest for ${secs(oldest)} s` : ""));
  return item;
}

// Position N waits behind the running job (N = 1) or the one queued before it.
function queuedItem(target, index, status) {
  const item = element("li");
  item.dataset.target = target;
  item.dataset.position = String(index + 1);
  const behind = index === 0 ? status.switch.target : status.switch.queued[index - 1];
  item.append(element("strong", "", target), ` queued, position ${index + 1} (after ${behind})`);
  return item;
}

export function renderWaiting(box, status) {
  const requests = waitingModels(status);
  const queued = status.switch ? status.switch.queued || [] : [];
  const requestList = box.querySelector("#waiting-requests");
  const queueList = box.querySelector("#waiting-switches");
  requestList.replaceChildren(...requests.map(([name, model]) => requestItem(name, model)));
  queueList.replaceChildren(...queued.map((target, index) => queuedItem(target, index, status)));
  requestList.hidden = requests.length === 0;
  queueList.hidden = queued.length === 0;
  box.querySelector("#waiting-switches-title").hidden = queued.length === 0;
  box.querySelector("#waiting-requests-title").hidden = requests.length === 0;
  box.querySelector("#nothing-waits").hidden = requests.length > 0 || queued.length > 0;
}
