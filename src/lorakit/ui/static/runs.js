// Runs page: every run under --runs, and the curves of the selected ones overlaid, updated as they train.
"use strict";

nav("Runs");
const main = document.getElementById("main");
const POLL_MS = 1500;
let selected = new Set(JSON.parse(localStorage.getItem("lorakit.selected") || "null") || []);
let chosen = localStorage.getItem("lorakit.selected") !== null;  // the user picked runs (else: a default pick)
let rows = [];

const logButtons = { linear: el("button", { "data-axis": "linear" }, "linear"), log: el("button", { "data-axis": "log" }, "log") };
const chartBox = el("div", { class: "charts", id: "charts" });
const table = el("table", { id: "runs" });
const message = el("div");
main.append(
  el("div", { class: "toolbar" }, el("h1", {}, "Runs"), el("span", { class: "spacer" }),
    el("span", { class: "muted" }, "loss axis"), el("span", { class: "seg" }, logButtons.linear, logButtons.log),
    el("a", { class: "button primary", href: "/new" }, "New run")),
  message, chartBox, el("div", { class: "card" }, table));

const curves = lossCharts(chartBox);
const colorOf = (id) => runColor(id, [...selected].sort().indexOf(id));
const feed = new MetricsFeed((runs) => curves.update(runs, colorOf));
function setAxis(log) {
  curves.setLog(log);
  logButtons.log.classList.toggle("on", log); logButtons.linear.classList.toggle("on", !log);
}
logButtons.linear.onclick = () => setAxis(false);
logButtons.log.onclick = () => setAxis(true);
setAxis(localStorage.getItem("lorakit.log") === "1");

function select(id, on) {
  chosen = true;
  if (on) selected.add(id); else selected.delete(id);
  localStorage.setItem("lorakit.selected", JSON.stringify([...selected]));
  feed.track([...selected]);
  feed.poll().then(() => curves.update(feed.runs, colorOf)).catch(() => {});
  renderTable();
}

async function act(action, id) {
  try {
    await api(`/api/run/${action}`, { id });
    await refresh();
  } catch (error) { showError(message, error); }
}

function renderTable() {
  const head = el("tr", {}, ["", "run", "status", "method", "base", "data hash", "steps", "best eval loss", "wall time", ""]
    .map((h, i) => el("th", { class: i >= 6 && i <= 8 ? "num" : null }, h)));
  const body = rows.map((r) => el("tr", { "data-run": r.id },
    el("td", {}, el("input", { type: "checkbox", title: "overlay this run's curves", checked: selected.has(r.id),
      onchange: (e) => select(r.id, e.target.checked) }),
      selected.has(r.id) ? el("span", { class: "swatch", style: `background:${colorOf(r.id)};margin-left:6px` }) : null),
    el("td", {}, el("a", { href: `/run?id=${encodeURIComponent(r.id)}` }, r.id)),
    el("td", {}, badge(r.status)),
    el("td", {}, r.method || "–"), el("td", { title: r.base_model || "" }, r.base),
    el("td", { title: r.data_hash || "" }, r.data_hash ? r.data_hash.slice(0, 10) : "–"),
    el("td", { class: "num" }, fmt.steps(r)), el("td", { class: "num" }, fmt.num(r.best_eval_loss)),
    el("td", { class: "num" }, fmt.seconds(r.wall_time_s)),
    el("td", {},
      r.status === "running" ? el("button", { class: "danger", "data-action": "stop", onclick: () => act("stop", r.id) }, "Stop") : null,
      r.resumable ? el("button", { "data-action": "resume", onclick: () => act("resume", r.id) }, "Resume") : null,
      r.has_adapter ? el("a", { class: "button", href: `/chat?id=${encodeURIComponent(r.id)}` }, "Chat") : null)));
  table.replaceChildren(el("thead", {}, head), el("tbody", {}, body.length ? body :
    el("tr", {}, el("td", { colspan: 10, class: "muted" }, "No runs yet: start one from New run."))));
}

async function refresh() {
  const data = await api("/api/runs");
  document.getElementById("where").textContent = data.root;
  rows = data.runs;
  const ids = new Set(rows.map((r) => r.id));
  selected = new Set([...selected].filter((id) => ids.has(id)));
  if (!chosen) {  // by default: the running runs, else the newest one
    const running = rows.filter((r) => r.status === "running").map((r) => r.id);
    selected = new Set(running.length ? running.slice(0, 4) : rows.slice(0, 1).map((r) => r.id));
  }
  feed.track([...selected]);
  renderTable();
}

async function loop() {
  try {
    await refresh();
    await feed.poll();
    message.replaceChildren();
  } catch (error) { showError(message, error); }
  setTimeout(loop, POLL_MS);
}
loop();
