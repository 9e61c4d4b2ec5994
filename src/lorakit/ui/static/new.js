// New run: a form over the config; the server answers with the YAML that will run, every problem (the CLI's
// own messages) and the advisor's verdict; Start launches `lorakit train` as its own process.
"use strict";

nav("New run");
const main = document.getElementById("main");
const $ = (id) => document.getElementById(id);
const GROUPS = [
  ["Run", ["method", "base_model"]],
  ["Data", ["data.train", "data.max_seq_len"]],
  ["LoRA", ["lora.r", "lora.alpha", "lora.dropout", "lora.target_modules"]],
  ["Training", ["train.max_steps", "train.lr", "train.micro_batch_size", "train.grad_accum", "train.log_every", "train.eval_every", "train.save_every"]],
];
const HINTS = {
  base_model: "demo, a hub id or a model directory", "data.train": "empty = the built-in demo task",
  "lora.target_modules": "minimal | attention | all-linear | [q_proj, v_proj]", "train.max_steps": "empty = use train.epochs",
  "train.eval_every": "empty = at epoch ends", "train.save_every": "empty = only at the end",
};
let reporters = [];
let timer = null;

function field(key, value) {
  const id = `f-${key}`;
  if (key === "method") {
    return el("label", {}, key, el("select", { id, name: key, oninput: schedule },
      ["lora", "qlora", "full"].map((m) => el("option", { value: m, selected: m === value }, m))));
  }
  return el("label", {}, key, el("input", { id, name: key, value, placeholder: HINTS[key] || "", oninput: schedule }));
}

function collect() {
  const fields = {};
  for (const [, keys] of GROUPS) for (const key of keys) fields[key] = $(`f-${key}`).value.trim();
  const on = reporters.filter((r) => $(`r-${r}`).checked);
  fields["train.report_to"] = `[${on.join(", ")}]`;
  fields["eval.at_end"] = $("f-eval.at_end").checked ? "true" : "false";
  return { name: $("f-name").value.trim(), fields, extra: $("f-extra").value };
}

function schedule() { clearTimeout(timer); timer = setTimeout(preview, 500); }

function renderVerdict(advice) {
  if (!advice) return el("span", { class: "muted" }, "fix the problems to see the advisor's prediction");
  if (advice.error) return el("span", { class: "muted" }, advice.error);
  return el("div", {},
    el("div", { class: `verdict ${advice.fits ? "fits" : "nofit"}`, id: "verdict" },
      advice.fits ? `fits: peak ${advice.peak} of ${advice.available} on ${advice.device}` : `does NOT fit: peak ${advice.peak} > ${advice.available} on ${advice.device}`),
    el("div", { class: "muted" }, `peak in ${advice.peak_phase}; ${advice.step_time}/step` + (advice.total_time ? `, ${advice.total_steps} steps ≈ ${advice.total_time}` : "")),
    advice.notes.length ? el("ul", {}, advice.notes.map((n) => el("li", { class: "muted" }, n))) : null);
}

// Problems and YAML at once; the advisor's verdict after (it reads the model's config.json, maybe remotely).
let asked = 0;
async function preview() {
  const form = collect(), ticket = ++asked;
  try {
    const data = await api("/api/form/preview", { ...form, advice: false });
    if (ticket !== asked) return;  // a newer edit is on its way
    $("yaml").textContent = data.yaml;
    $("problems").replaceChildren(data.problems.length ? el("ul", { class: "problems", id: "problem-list" }, data.problems.map((p) => el("li", {}, p))) : el("span", { class: "ok" }, "valid: lorakit train accepts this config"));
    $("start").disabled = data.problems.length > 0;
    if (data.problems.length) { $("advice").replaceChildren(renderVerdict(null)); return; }
    $("advice").replaceChildren(el("span", { class: "muted" }, "asking the advisor…"));
    const advised = await api("/api/form/preview", { ...form, advice: true });
    if (ticket === asked) $("advice").replaceChildren(renderVerdict(advised.advice));
  } catch (error) { showError($("problems"), error); $("start").disabled = true; }
}

async function start() {
  $("start").disabled = true;
  try {
    const data = await api("/api/form/start", collect());
    location.href = `/run?id=${encodeURIComponent(data.id)}`;
  } catch (error) { showError($("problems"), error); $("start").disabled = false; }
}

async function init() {
  const data = await api("/api/form");
  reporters = data.reporters;
  const f = data.fields;
  const form = el("form", { id: "form", onsubmit: (e) => e.preventDefault() },
    el("fieldset", {}, el("legend", {}, "Name"), el("label", {}, "run name (a folder under --runs)", el("input", { id: "f-name", value: data.name, oninput: schedule }))),
    GROUPS.map(([title, keys]) => el("fieldset", {}, el("legend", {}, title), el("div", { class: "grid" }, keys.map((k) => field(k, f[k]))))),
    el("fieldset", {}, el("legend", {}, "Logging and eval"),
      reporters.map((r) => el("label", { class: "check" }, el("input", { type: "checkbox", id: `r-${r}`, checked: (f["train.report_to"] || "").includes(r), onchange: schedule }), `report to ${r}`)),
      el("label", { class: "check" }, el("input", { type: "checkbox", id: "f-eval.at_end", checked: f["eval.at_end"] === "true", onchange: schedule }), "evaluate base vs tuned when training ends (eval.at_end)")),
    el("fieldset", {}, el("legend", {}, "Other keys"), el("label", {}, "one KEY=VALUE per line, as lorakit train --set (see lorakit config)",
      el("textarea", { id: "f-extra", rows: 4, placeholder: "train.warmup_steps=10\ndata.packing=false", oninput: schedule }))),
    el("button", { class: "primary", id: "start", type: "button", onclick: start, disabled: true }, "Start training"));
  main.append(el("h1", {}, "New run"), el("div", { class: "row" },
    el("div", { class: "card" }, form),
    el("div", { class: "card" }, el("h2", {}, "Advisor"), el("div", { id: "advice" }, "…"), el("h2", { style: "margin-top:14px" }, "Problems"),
      el("div", { id: "problems" }), el("h2", { style: "margin-top:14px" }, "YAML (this file is what runs)"), el("pre", { id: "yaml" }))));
  preview();
}
init().catch((error) => showError(main, error));
