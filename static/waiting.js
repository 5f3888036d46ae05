// "Waiting": who waits for what right now, from /v1/models/status. Requests wait
// for a model that is not serving (per model: how many, how long its demand has
// gone on, through clients that gave up, and the hold left before its turn);
// explicit switches wait in a FIFO queue behind the running job.

import { element, secs } from "./format.js";

function waitingModels(status) {
  return Object.entries(status.models)
    .filter(([, model]) => model.waiting > 0)
    .sort(([, a], [, b]) => (b.demand_age_seconds ?? 0) - (a.demand_age_seconds ?? 0));
}

function requestItem(name, model) {
  const item = element("li");
  item.dataset.model = name;
  const age = model.demand_age_seconds ?? model.oldest_wait_seconds;
  const parts = [`${model.waiting} waiting`];
  if (age != null) parts.push(`wanted for ${secs(age)} s`);
  if (model.given_up) parts.push(`${model.given_up} gave up`);
  if (model.hold_left_seconds) parts.push(`its turn in ${secs(model.hold_left_seconds)} s`);
  item.append(element("strong", "", name), " " + parts.join(", "));
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
