// lorakit dashboard: helpers every page uses. Plain JavaScript, no framework, no build step.
"use strict";

// GET when body is undefined, else POST JSON. Every write carries X-Lorakit-UI (see security.py).
async function api(path, body) {
  const init = body === undefined ? {} : {
    method: "POST", body: JSON.stringify(body),
    headers: { "Content-Type": "application/json", "X-Lorakit-UI": "1" },
  };
  const response = await fetch(path, init);
  const data = await response.json().catch(() => ({ error: `${response.status} ${response.statusText}` }));
  if (!response.ok) {
    const error = new Error(data.error || (data.detail && JSON.stringify(data.detail)) || response.statusText);
    error.problems = data.problems || [];
    error.status = response.status;
    throw error;
  }
  return data;
}

// el("td", {class: "num"}, "1.23"): an element with attributes (on* = listeners) and children.
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function nav(active) {
  const links = [["/", "Runs"], ["/new", "New run"], ["/chat", "Chat"]];
  const header = el("header", { class: "top" }, el("span", { class: "brand" }, "lorakit"),
    el("nav", {}, links.map(([href, text]) => el("a", { href, class: text === active ? "active" : null }, text))),
    el("span", { class: "where", id: "where" }));
  document.body.prepend(header);
}

const fmt = {
  num(x, digits = 4) {
    if (x === null || x === undefined || Number.isNaN(x)) return "–";
    if (Math.abs(x) >= 1000) return Math.round(x).toLocaleString();
    return Number(x).toPrecision(digits).replace(/\.?0+$/, "").replace(/\.?0+e/, "e");
  },
  seconds(s) {
    if (s === null || s === undefined) return "–";
    if (s < 60) return `${s.toFixed(1)} s`;
    if (s < 3600) return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
    return `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min`;
  },
  bytes(n) {
    if (!n) return "–";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
  },
  steps(row) {
    if (row.step === null || row.step === undefined) return "–";
    return row.total_steps ? `${row.step}/${row.total_steps}` : String(row.step);
  },
};

function badge(status) { return el("span", { class: `badge ${status}`, "data-status": status }, status); }

function showError(container, error) {
  const box = el("div", { class: "error" }, error.message || String(error));
  if (error.problems && error.problems.length) box.append(el("ul", { class: "problems" }, error.problems.map((p) => el("li", {}, p))));
  container.replaceChildren(box);
}

function param(name) { return new URLSearchParams(location.search).get(name); }

// One color per run, stable across pages and reloads (a hash of its id into a palette).
const PALETTE = ["#2f6fde", "#e4572e", "#17a398", "#9b5de5", "#f0a202", "#d7263d", "#4d9078", "#5c6bc0", "#8d6e63", "#00838f"];
function runColor(id, index) {
  if (index !== undefined) return PALETTE[index % PALETTE.length];
  let h = 0;
  for (const c of id) h = (h * 31 + c.charCodeAt(0)) >>> 0;
  return PALETTE[h % PALETTE.length];
}

// Live metrics of several runs: each poll asks only for the bytes of metrics.jsonl after the last read.
class MetricsFeed {
  constructor(onChange) { this.runs = new Map(); this.onChange = onChange; }
  track(ids) {
    for (const id of [...this.runs.keys()]) if (!ids.includes(id)) { this.runs.delete(id); this.dirty = true; }
    for (const id of ids) if (!this.runs.has(id)) { this.runs.set(id, { rows: [], offset: 0, ino: 0, status: null }); this.dirty = true; }
  }
  async poll() {
    let changed = false;
    await Promise.all([...this.runs.entries()].map(async ([id, run]) => {
      const q = new URLSearchParams({ id, offset: run.offset, ino: run.ino });
      const data = await api(`/api/metrics?${q}`);
      if (data.reset) run.rows = [];
      if (data.reset || data.rows.length || data.status !== run.status) changed = true;
      run.rows.push(...data.rows);
      run.offset = data.offset; run.ino = data.ino; run.status = data.status;
    }));
    if (changed || this.dirty) this.onChange(this.runs);
    this.dirty = false;
    return this.runs;
  }
}

// The three charts every page with curves shows: loss (train + eval), learning rate, tokens/s.
function lossCharts(container) {
  const charts = {
    loss: new LineChart({ title: "loss (train —, eval ●‑‑)", yLabel: "loss", log: localStorage.getItem("lorakit.log") === "1" }),
    lr: new LineChart({ title: "learning rate", yLabel: "lr", width: 380 }),
    speed: new LineChart({ title: "supervised tokens / s", yLabel: "tokens/s", width: 380 }),
  };
  container.replaceChildren(...Object.values(charts).map((c) => c.node));
  return {
    charts,
    setLog(on) { charts.loss.setLog(on); localStorage.setItem("lorakit.log", on ? "1" : "0"); },
    update(runs, colors) {
      const loss = [], lr = [], speed = [];
      for (const [id, run] of runs) {
        const color = colors(id);
        const pick = (key) => run.rows.filter((r) => typeof r[key] === "number").map((r) => [r.step, r[key]]);
        loss.push({ name: `${id} train`, run: id, color, points: pick("loss") });
        loss.push({ name: `${id} eval`, run: id, color, points: pick("eval_loss"), dash: "5 4", markers: true });
        lr.push({ name: id, run: id, color, points: pick("lr") });
        speed.push({ name: id, run: id, color, points: pick("tokens_per_s") });
      }
      charts.loss.setSeries(loss); charts.lr.setSeries(lr); charts.speed.setSeries(speed);
    },
  };
}

// replaceChildren without the nulls a conditional child leaves.
function fill(node, ...children) { node.replaceChildren(...children.flat(Infinity).filter((c) => c !== null && c !== undefined && c !== false)); }
