// GPU memory bars, one per device: what each model holds there, as switchd accounts it.
// A segment too narrow for its label shows no text; the legend under the bar names it
// instead, so nothing is ever cut to "mistral-7".

import { element, secs } from "./format.js";

function sleeping(model) {
  return model.status === "sleeping" && model.sleep ? model.sleep : null;
}

// The segments of one device's bar: each model's share, then what nobody accounts for.
function parts(device, models) {
  const found = [];
  let accounted = 0;
  for (const [name, onDevice] of Object.entries(device.models || {})) {
    const model = models[name];
    if (!model) continue;
    const held = Math.min(onDevice, device.total_gb - accounted);
    accounted += held;
    const sleep = sleeping(model);
    found.push({ name, held, tone: sleep ? "sleeping" : model.status, sleep, what: sleep ? " asleep" : "" });
  }
  const other = device.used_gb - accounted;
  if (other > 0.05) found.push({ name: "other", held: other, tone: "other" });
  return found;
}

function partLabel(part) {
  return `${part.name}${part.what || ""} ${part.held.toFixed(1)} GB`;
}

function segment(part, device) {
  const span = element("span", part.tone === "other" ? "other" : `model ${part.tone}`, partLabel(part));
  span.style.width = `${(100 * part.held) / device.total_gb}%`;
  span.dataset.name = part.name;
  if (part.sleep) span.dataset.sleeping = "true";
  span.title = part.sleep ? `${span.textContent} (${part.sleep.level}), kept while asleep` : span.textContent;
  return span;
}

// Under a bar: its sleeping models' residues are too thin to carry their own label.
function sleepNote(sleepers) {
  const note = element("p", "bar-note");
  for (const part of sleepers) {
    const item = element("span");
    const wake = secs(part.sleep.estimated_wake_seconds);
    item.append(element("span", "swatch sleeping"),
      `${part.name} asleep (${part.sleep.level}): ${part.held.toFixed(1)} GB kept, wakes in ~${wake} s`);
    note.append(item);
  }
  return note;
}

function deviceBlock(device, models) {
  const box = element("div", "device");
  box.dataset.device = String(device.index);
  const label = element("div", "device-label");
  const used = `${device.used_gb.toFixed(2)} of ${device.total_gb.toFixed(2)} GB used, ` +
    `${device.available_gb.toFixed(2)} GB free`;
  label.append(element("span", "", `GPU ${device.index}: ${device.name}`), element("span", "", used));
  const bar = element("div", "bar");
  bar.setAttribute("role", "img");
  const found = parts(device, models);
  bar.append(...found.map((part) => segment(part, device)));
  bar.setAttribute("aria-label", `${used}: ${found.map(partLabel).join(", ") || "empty"}`);
  const legend = element("ul", "bar-legend");
  legend.setAttribute("aria-label", `Models on GPU ${device.index} too narrow to label`);
  legend.hidden = true;
  box.append(label, bar, legend);
  const sleepers = found.filter((part) => part.sleep);
  if (sleepers.length) box.append(sleepNote(sleepers));
  return box;
}

export function renderDevices(box, status) {
  box.replaceChildren(...status.gpu.devices.map((device) => deviceBlock(device, status.models)));
  fitLabels(box);
}

// Hides the text of every segment it does not fit, and names those in the legend
// under the bar (sleepers have their own note). Runs again when the width changes.
export function fitLabels(box) {
  for (const device of box.querySelectorAll(".device")) {
    const moved = [];
    for (const span of device.querySelectorAll(".bar > span")) {
      span.classList.remove("narrow");
      if (span.scrollWidth > span.clientWidth) {
        span.classList.add("narrow");
        if (!span.dataset.sleeping) moved.push(span);
      }
    }
    const legend = device.querySelector(".bar-legend");
    legend.replaceChildren(...moved.map((span) => {
      const item = element("li");
      item.dataset.name = span.dataset.name;
      const tone = [...span.classList].filter((name) => name !== "narrow").join(" ");
      item.append(element("span", `swatch ${tone}`), span.textContent);
      return item;
    }));
    legend.hidden = moved.length === 0;
  }
}

let refitQueued = false;
export function refitOnResize(box) {
  window.addEventListener("resize", () => {
    if (refitQueued) return;
    refitQueued = true;
    requestAnimationFrame(() => {
      refitQueued = false;
      fitLabels(box);
    });
  });
}
