// "Recent switches": the finished jobs of GET /v1/switches, newest first. Each has a
// bar of its stages, one segment per stage, as long as the stage lasted (from the
// job's timeline: when each stage began), coloured by what the GPU was doing.

import { clock, element, secs } from "./format.js";

export const HISTORY_LIMIT = 20;
export const HISTORY_SHOWN = 8; // items listed; a run of no-op switches is one item

// A switch that found its model serving already: nothing put aside, nothing started.
export function isNoop(job) {
  return job.kind === "switch" && job.status === "succeeded" && !job.woken &&
    !job.unloaded_models.length && !job.slept_models.length &&
    !job.timeline.some((entry) => entry.stage === "start" || entry.stage === "wake");
}

// Runs of no-op switches to one model, as one entry (the newest) with their count.
export function collapseNoops(jobs) {
  const entries = [];
  for (const job of jobs) {
    const last = entries[entries.length - 1];
    if (last && last.noop && isNoop(job) && last.job.target === job.target) last.count += 1;
    else entries.push({ job, noop: isNoop(job), count: 1 });
  }
  return entries;
}

// What happens during each stage, for its colour. Checks and bookkeeping stages
// (memory_check, freed, …) last milliseconds; they keep a neutral colour.
const PHASES = {
  queued: "waiting", drain: "waiting",
  unload: "unloading", unloaded: "unloading", sleep: "unloading", slept: "unloading",
  start: "loading", wake: "loading", woken: "loading", ready: "loading",
};

function phase(stage) {
  return PHASES[stage] || "check";
}

// One segment per stage but the last (result or error: the moment it ended).
function segments(timeline) {
  return timeline.slice(0, -1).map((entry, index) => ({
    stage: entry.stage,
    from: entry.at_seconds,
    seconds: Math.max(0, timeline[index + 1].at_seconds - entry.at_seconds),
  }));
}

function totalSeconds(job) {
  const last = job.timeline[job.timeline.length - 1];
  if (last) return last.at_seconds;
  return job.finished ? (Date.parse(job.finished) - Date.parse(job.created)) / 1000 : 0;
}

// "gpt-oss-120b (asleep), mistral → gpt-oss-20b": what it put aside, and for what.
function fromTo(job) {
  const aside = [...job.unloaded_models, ...job.slept_models.map((name) => `${name} (asleep)`)];
  const line = element("span", "from-to");
  const from = element("span", "from", aside.length ? aside.join(", ") : "nothing put aside");
  const to = job.kind === "unload"
    ? element("span", "to", job.target === "all" ? "unload all" : `unload ${job.target}`)
    : element("span", "to", job.woken ? `${job.target} (woken)` : job.target);
  line.append(from, " → ", to);
  return line;
}

function outcome(job) {
  if (job.status === "succeeded") return element("span", "outcome succeeded", "succeeded");
  const why = job.error ? job.error.message : "";
  const span = element("span", "outcome failed", "failed");
  if (why) span.title = why;
  return span;
}

function stageBar(job, scale) {
  const bar = element("div", "stage-bar");
  const parts = segments(job.timeline);
  bar.setAttribute("role", "img");
  bar.setAttribute("aria-label",
    `Stages: ${parts.map((part) => `${part.stage} ${secs(part.seconds)} s`).join(", ") || "none"}`);
  // Bars share one time scale (the longest switch listed fills the width) so they compare.
  bar.style.width = `${Math.max(6, (100 * totalSeconds(job)) / scale)}%`;
  for (const part of parts) {
    const span = element("span", `seg ${phase(part.stage)}`);
    span.dataset.stage = part.stage;
    // In milliseconds: flex factors that sum below 1 would leave the bar part empty.
    span.style.flexGrow = String(Math.round(part.seconds * 1000));
    span.title = `${part.stage}: ${secs(part.seconds)} s (from ${secs(part.from)} s)`;
    bar.append(span);
  }
  return bar;
}

function historyItem(job, scale) {
  const item = element("li", "history-item");
  item.dataset.job = job.id;
  const head = element("p", "history-head");
  const when = element("time", "", clock(job.created));
  when.dateTime = job.created;
  when.title = new Date(job.created).toLocaleString();
  const total = element("span", "seconds", `${secs(totalSeconds(job))} s`);
  head.append(when, " ", element("span", `cause ${job.cause}`, job.cause), " ", fromTo(job), " ",
    outcome(job), " ", total);
  item.append(head, stageBar(job, scale));
  if (job.status === "failed" && job.error) item.append(element("p", "history-error", job.error.message));
  return item;
}

function noopItem(entry) {
  const { job, count } = entry;
  const item = element("li", "history-item noop");
  item.dataset.job = job.id;
  const head = element("p", "history-head");
  const when = element("time", "", clock(job.created));
  when.dateTime = job.created;
  const text = element("span", "from-to", `${job.target} was serving already`);
  head.append(when, " ", element("span", `cause ${job.cause}`, job.cause), " ", text);
  if (count > 1) head.append(" ", element("span", "repeat", `×${count}`));
  item.append(head);
  return item;
}

export function renderHistory(list, empty, jobs) {
  const finished = jobs.filter((job) => job.status === "succeeded" || job.status === "failed");
  const shown = collapseNoops(finished).slice(0, HISTORY_SHOWN);
  const scale = Math.max(0.001, ...shown.filter((e) => !e.noop).map((e) => totalSeconds(e.job)));
  list.replaceChildren(...shown.map((e) => (e.noop ? noopItem(e) : historyItem(e.job, scale))));
  empty.hidden = finished.length > 0;
}
