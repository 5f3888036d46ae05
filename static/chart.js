// GPU memory used per device over the last 5 minutes, drawn as inline SVG (no
// chart library: the page loads only its own files). Samples come from every
// status the page reads: the snapshot, refreshes after model changes, and the
// 2 s poll; and, once on load, switchd's own recent samples (`seed`). Axis labels are HTML around the plot, so the plot can stretch to any
// width while the text keeps its size.

import { element } from "./format.js";

const SVG = "http://www.w3.org/2000/svg";
export const WINDOW_MS = 5 * 60 * 1000;
const GAP_MS = 7000; // no sample for this long (stream lost, tab hidden): the line breaks
const WIDTH = 1000; // the plot's own units; it is stretched to the box
const HEIGHT = 100;

function svg(tag, attributes = {}) {
  const made = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attributes)) made.setAttribute(name, String(value));
  return made;
}

export class MemoryChart {
  constructor(box) {
    this.box = box;
    this.samples = []; // {t, devices: [{index, used, total}]}
    this.lines = new Map(); // device index -> {path, dot}
    this.build();
  }

  build() {
    this.top = [element("span"), element("span"), element("span", "", "0 GB")];
    const yAxis = element("div", "y-axis");
    yAxis.append(...this.top);
    this.plot = svg("svg", { viewBox: `0 0 ${WIDTH} ${HEIGHT}`, preserveAspectRatio: "none",
      class: "chart-plot", role: "img" });
    for (const y of [0, HEIGHT / 2, HEIGHT]) {
      this.plot.append(svg("line", { x1: 0, x2: WIDTH, y1: y, y2: y, class: "grid" }));
    }
    const xAxis = element("div", "x-axis");
    xAxis.append(element("span", "", "-5 min"), element("span", "", "-2.5 min"), element("span", "", "now"));
    this.legend = element("ul", "chart-legend");
    const grid = element("div", "chart-grid");
    grid.append(yAxis, this.plot, element("span"), xAxis);
    this.box.replaceChildren(grid, this.legend);
  }

  // switchd's recent samples (GET /v1/gpu/history): the chart starts full on a page load.
  seed(samples, now = Date.now()) {
    const earlier = samples.map((sample) => ({
      t: Date.parse(sample.at),
      devices: sample.devices.map((d) => ({ index: d.index, used: d.used_gb, total: d.total_gb })),
    })).filter((sample) => sample.t < (this.samples[0]?.t ?? Infinity));
    this.samples = [...earlier, ...this.samples];
    const start = now - WINDOW_MS;
    while (this.samples.length > 2 && this.samples[1].t <= start) this.samples.shift();
    this.render(now);
  }

  add(status, now = Date.now()) {
    const devices = status.gpu.devices.map((device) => ({
      index: device.index, used: device.used_gb, total: device.total_gb,
    }));
    this.samples.push({ t: now, devices });
    // Keep one sample older than the window: the line starts at its left edge.
    const start = now - WINDOW_MS;
    while (this.samples.length > 2 && this.samples[1].t <= start) this.samples.shift();
    this.render(now);
  }

  // A device's line, and a dot on its last point: a page open for seconds has a line
  // too short to see. A zero-length stroke with round caps stays round however the
  // plot is stretched.
  line(index) {
    if (!this.lines.has(index)) {
      const path = svg("path", { class: `line dev-${index % 6}`, "vector-effect": "non-scaling-stroke" });
      const dot = svg("path", { class: `now dev-${index % 6}`, "vector-effect": "non-scaling-stroke" });
      path.dataset.device = String(index);
      this.plot.append(path, dot);
      this.lines.set(index, { path, dot });
    }
    return this.lines.get(index);
  }

  render(now) {
    const latest = this.samples[this.samples.length - 1];
    if (!latest || !latest.devices.length) return; // no GPU seen: nothing to draw
    const top = Math.max(...latest.devices.map((device) => device.total)) || 1;
    this.top[0].textContent = `${top.toFixed(2)} GB`;
    this.top[1].textContent = `${(top / 2).toFixed(2)} GB`;
    // The sample kept from before the window is drawn on its left edge. (The plot does
    // not clip: the dot on the last point would be cut in half at the edges.)
    const x = (t) => Math.max(0, ((t - (now - WINDOW_MS)) / WINDOW_MS) * WIDTH);
    const y = (used) => HEIGHT - (Math.min(used, top) / top) * HEIGHT;
    const items = [];
    for (const device of latest.devices) {
      const { path, dot } = this.line(device.index);
      const d = this.pathOf(device.index, x, y, now);
      path.setAttribute("d", d);
      dot.setAttribute("d", d ? `M ${d.split(" ").slice(-2).join(" ")} l 0 0` : "");
      path.dataset.lastGb = device.used.toFixed(2);
      path.dataset.totalGb = device.total.toFixed(2);
      const item = element("li");
      item.append(element("span", `swatch dev-${device.index % 6}`),
        `GPU ${device.index}: ${device.used.toFixed(2)} of ${device.total.toFixed(2)} GB used now`);
      items.push(item);
    }
    this.legend.replaceChildren(...items);
    this.plot.setAttribute("aria-label",
      `GPU memory used over the last 5 minutes; now ${items.map((item) => item.textContent).join("; ")}`);
  }

  // "M x y L x y …", broken where samples are missing, held flat up to now.
  pathOf(index, x, y, now) {
    let d = "";
    let last = null;
    for (const sample of this.samples) {
      const device = sample.devices.find((found) => found.index === index);
      if (!device) continue;
      const point = `${x(sample.t).toFixed(1)} ${y(device.used).toFixed(2)}`;
      d += last && sample.t - last.t <= GAP_MS ? ` L ${point}` : ` M ${point}`;
      last = { t: sample.t, used: device.used };
    }
    if (last && now - last.t <= GAP_MS) d += ` L ${x(now).toFixed(1)} ${y(last.used).toFixed(2)}`;
    return d.trim();
  }
}
