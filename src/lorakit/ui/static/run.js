// Run page: the resolved config, curves, eval report, advisor prediction vs measured memory, checkpoints,
// export with progress, and stop / resume.
"use strict";

nav("Runs");
const main = document.getElementById("main");
const runId = param("id");
const POLL_MS = 2000;
const $ = (id) => document.getElementById(id);

main.append(
  el("div", { class: "toolbar" }, el("h1", { id: "title" }, runId), el("span", { id: "status" }), el("span", { class: "spacer" }),
    el("span", { id: "actions" })),
  el("div", { id: "message" }),
  el("div", { class: "row" },
    el("div", { class: "card" }, el("h2", {}, "Summary"), el("div", { class: "kv", id: "summary" })),
    el("div", { class: "card meminfo" }, el("h2", {}, "Peak memory: advisor prediction vs measured"), el("div", { id: "memory" }, el("span", { class: "muted" }, "asking the advisor (it reads config.json and the data once)…")))),
  el("div", { class: "charts", id: "charts" }),
  el("div", { class: "row" },
    el("div", { class: "card" }, el("h2", {}, "Eval: base vs tuned"), el("div", { id: "eval" })),
    el("div", { class: "card" }, el("h2", {}, "Checkpoints"), el("div", { id: "checkpoints" }))),
  el("div", { class: "card" }, el("h2", {}, "Export"), el("div", { class: "toolbar", id: "export-buttons" }), el("div", { id: "export" })),
  el("div", { class: "row" },
    el("div", { class: "card" }, el("h2", {}, "Config (config.yaml)"), el("pre", { id: "config" })),
    el("div", { class: "card" }, el("h2", {}, "train.log"), el("pre", { id: "log" }, "–"))));

const curves = lossCharts($("charts"));
const feed = new MetricsFeed((runs) => curves.update(runs, () => runColor(runId, 0)));
feed.track([runId]);
let lastStatus = null;

async function act(action, body) {
  try {
    await api(`/api/run/${action}`, { id: runId, ...body });
    await refresh();
  } catch (error) { showError($("message"), error); }
}

for (const [label, kind, dtype] of [["Merge (transformers)", "merge"], ["GGUF f16", "gguf", "f16"], ["GGUF q8_0", "gguf", "q8_0"], ["GGUF + LoRA GGUF", "gguf-lora", "f16"]]) {
  $("export-buttons").append(el("button", { "data-export": `${kind}-${dtype || ""}`, onclick: () => act("export", { kind, dtype }) }, label));
}

function renderSummary(run, summary) {
  const s = summary || {};
  const items = [["status", run.status], ["method", run.method], ["base", run.base_model], ["task", run.task],
    ["steps", fmt.steps(run)], ["best eval loss", fmt.num(run.best_eval_loss)], ["wall time", fmt.seconds(run.wall_time_s)],
    ["tokens / s", fmt.num(s.tokens_per_s)], ["peak memory", fmt.bytes(s.peak_memory_bytes)], ["device", s.device || "–"],
    ["data hash", run.data_hash || "–"], ["final train loss", fmt.num(s.final_loss)]];
  $("summary").replaceChildren(...items.flatMap(([k, v]) => [el("div", {}, k), el("div", {}, v ?? "–")]));
}

function renderActions(run) {
  $("status").replaceChildren(badge(run.status));
  fill($("actions"),
    run.status === "running" ? el("button", { class: "danger", "data-action": "stop", onclick: () => act("stop") }, "Stop (saves a checkpoint)") : null,
    run.resumable ? el("button", { "data-action": "resume", onclick: () => act("resume") }, "Resume") : null,
    run.has_adapter ? el("a", { class: "button", href: `/chat?id=${encodeURIComponent(runId)}` }, "Chat with it") : null);
}

function renderEval(report, lowerIsBetter) {
  if (!report) { $("eval").replaceChildren(el("span", { class: "muted" }, "No eval report yet (eval/eval.json is written when a run ends with eval.at_end, or by lorakit eval).")); return; }
  const j = report.json;
  const better = (r) => (r.delta === null || r.delta === 0 ? null : lowerIsBetter.includes(r.metric) ? r.delta < 0 : r.delta > 0);
  const table = el("table", {}, el("tr", {}, ["metric", "base", "tuned", "delta"].map((h, i) => el("th", { class: i ? "num" : null }, h))),
    (j.rows || []).map((r) => el("tr", {}, el("td", {}, r.metric + (lowerIsBetter.includes(r.metric) ? " ↓" : "")), el("td", { class: "num" }, fmt.num(r.base)), el("td", { class: "num" }, fmt.num(r.tuned)),
      el("td", { class: `num ${better(r) === null ? "" : better(r) ? "ok" : "bad"}` }, r.delta === null ? "–" : (r.delta > 0 ? "+" : "") + fmt.num(r.delta)))));
  const canary = j.canary ? el("p", { class: "muted" }, "canary: " + Object.entries(j.canary).map(([k, v]) => `${k} ${typeof v === "number" ? fmt.num(v) : v}`).join(", ")) : null;
  const samples = (j.samples || []).map((s) => el("div", { class: "card" },
    el("div", { class: "muted" }, "prompt"), el("pre", { class: "wrap" }, s.prompt), el("div", { class: "kv" },
      el("div", {}, "reference"), el("div", {}, s.reference), el("div", {}, "base"), el("div", {}, s.base), el("div", {}, "tuned"), el("div", {}, s.tuned ?? "–"))));
  fill($("eval"), table, canary, samples.length ? el("h2", { style: "margin-top:12px" }, "Sample generations") : null, ...samples);
}

function renderCheckpoints(list) {
  $("checkpoints").replaceChildren(list.length ? el("table", {}, el("tr", {}, el("th", {}, "checkpoint"), el("th", { class: "num" }, "step"), el("th", { class: "num" }, "size"), el("th", {}, "saved")),
    list.map((c) => el("tr", {}, el("td", {}, c.name), el("td", { class: "num" }, c.step), el("td", { class: "num" }, fmt.bytes(c.bytes)), el("td", {}, c.modified))))
    : el("span", { class: "muted" }, "none (train.save_every, or a stop, saves one)"));
}

function renderExport(job) {
  if (!job) { $("export").replaceChildren(el("span", { class: "muted" }, "Merge writes <run>/merged/ (a standard transformers model); GGUF writes <run>/gguf-<dtype>/ with an Ollama Modelfile.")); return; }
  fill($("export"), el("div", {}, `${job.kind} → ${job.out}: `, el("b", { id: "export-state" }, job.state), ` (${fmt.seconds(job.elapsed_s)})`),
    el("div", { class: "progress" }, el("div", { style: `width:${Math.round(job.progress * 100)}%` })),
    job.message ? el("pre", {}, job.message) : null);
}

async function renderMemory() {
  try {
    const m = await api(`/api/run/advice?id=${encodeURIComponent(runId)}`);
    if (m.error) { $("memory").replaceChildren(el("span", { class: "muted" }, m.error)); return; }
    const most = Math.max(m.predicted_bytes || 0, m.measured_bytes || 0) || 1;
    const bar = (label, bytes, cls) => el("div", { style: "margin:6px 0" }, el("div", {}, `${label}: `, el("b", {}, bytes ? fmt.bytes(bytes) : "not measured yet")),
      bytes ? el("div", { class: `bar ${cls}`, style: `width:${(100 * bytes) / most}%` }) : null);
    fill($("memory"), bar("predicted (advisor, from config.json)", m.predicted_bytes, "predicted"),
      bar(`measured (summary.json${m.device ? ", " + m.device : ""})`, m.measured_bytes, "measured"),
      m.error_share !== undefined ? el("div", { class: "muted" }, `prediction ${m.error_share >= 0 ? "over" : "under"} by ${Math.abs(m.error_share * 100).toFixed(1)}% · peak in ${m.peak_phase}`) : null);
  } catch (error) { $("memory").replaceChildren(el("span", { class: "bad" }, error.message)); }
}

async function refresh() {
  const data = await api(`/api/run?id=${encodeURIComponent(runId)}`);
  const run = data.run;
  for (const b of $("export-buttons").children) b.disabled = !run.has_adapter;
  renderActions(run); renderSummary(run, data.summary); renderEval(data.eval, data.lower_is_better); renderCheckpoints(data.checkpoints); renderExport(data.export);
  $("config").textContent = data.config_yaml || "–";
  $("log").textContent = data.log || "(no train.log: this run was not started from the dashboard)";
  if (run.status !== lastStatus) { lastStatus = run.status; renderMemory(); }
}

async function loop() {
  try {
    await refresh();
    await feed.poll();
  } catch (error) { showError($("message"), error); }
  setTimeout(loop, POLL_MS);
}
loop();
