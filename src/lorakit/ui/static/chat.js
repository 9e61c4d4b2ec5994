// Chat: the same prompt to the base and to a run's adapter, side by side, streamed from the server's engine
// (OpenAI's chat API under /serve/<slot>/v1, see chat.py). Each side keeps its own conversation.
"use strict";

nav("Chat");
const main = document.getElementById("main");
const $ = (id) => document.getElementById(id);
let target = null;  // {url, base_model, adapter_model}
const history = { base: [], adapter: [] };

function side(key, title) {
  return el("div", { class: "card" }, el("h2", {}, title, " ", el("span", { class: "muted", id: `${key}-model` })),
    el("div", { id: `${key}-turns` }), el("div", { class: "answer", id: `${key}-answer`, "data-side": key }));
}

main.append(
  el("h1", {}, "Chat: base vs adapter"),
  el("div", { class: "card" },
    el("div", { class: "toolbar" },
      el("label", {}, "run (its adapter, and its base)", el("select", { id: "run", onchange: () => prepare($("run").value) })),
      el("label", {}, "max tokens", el("input", { id: "max_tokens", type: "number", value: 64, min: 1, max: 512, style: "width:90px" })),
      el("label", {}, "temperature", el("input", { id: "temperature", type: "number", value: 0, min: 0, step: 0.1, style: "width:90px" })),
      el("label", {}, "top p", el("input", { id: "top_p", type: "number", value: 1, min: 0.01, max: 1, step: 0.05, style: "width:90px" })),
      el("label", {}, "system prompt (optional)", el("input", { id: "system", style: "width:260px" }))),
    el("div", { id: "chat-status", class: "muted" }, "pick a run"),
    el("div", { class: "toolbar", style: "margin-top:10px" },
      el("textarea", { id: "prompt", rows: 3, style: "flex:1", placeholder: "a prompt for both…",
        onkeydown: (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) send(); } }),
      el("button", { class: "primary", id: "send", onclick: send, disabled: true }, "Send to both"),
      el("button", { id: "clear", onclick: clear }, "Clear"))),
  el("div", { class: "chatcols" }, side("base", "Base"), side("adapter", "Adapter")));

async function prepare(id) {
  target = null;
  $("send").disabled = true;
  $("chat-status").textContent = `loading ${id} (its base model, then the adapter) …`;
  try {
    target = await api("/api/chat/prepare", { id });
    $("base-model").textContent = target.base_model.split("/").pop() + (target.quant === "nf4" ? " (NF4)" : "");
    $("adapter-model").textContent = target.adapter_model;
    $("chat-status").textContent = `ready: ${target.url}/chat/completions, model "${target.base_model}" and "${target.adapter_model}"`;
    $("send").disabled = false;
    clear();
  } catch (error) { showError($("chat-status"), error); }
}

function clear() {
  for (const key of ["base", "adapter"]) { history[key] = []; $(`${key}-turns`).replaceChildren(); $(`${key}-answer`).textContent = ""; }
}

// POST with stream: true and read the server-sent events as they arrive, appending each delta.
async function stream(key, model, messages, out) {
  const body = { model, messages, stream: true, max_tokens: +$("max_tokens").value, temperature: +$("temperature").value, top_p: +$("top_p").value };
  const response = await fetch(`${target.url}/chat/completions`, { method: "POST", body: JSON.stringify(body),
    headers: { "Content-Type": "application/json", "X-Lorakit-UI": "1" } });
  if (!response.ok) {
    const data = await response.json().catch(() => ({}));
    throw new Error((data.error && data.error.message) || data.error || response.statusText);
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "", text = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut); buffer = buffer.slice(cut + 2);
      const data = event.replace(/^data: /, "");
      if (data === "[DONE]") continue;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message || JSON.stringify(chunk.error));
      const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
      if (delta && delta.content) { text += delta.content; out.textContent = text; }
    }
  }
  return text;
}

async function send() {
  const prompt = $("prompt").value.trim();
  if (!prompt || !target) return;
  $("send").disabled = true;
  const system = $("system").value.trim();
  await Promise.all([["base", target.base_model], ["adapter", target.adapter_model]].map(async ([key, model]) => {
    const turns = $(`${key}-turns`), out = $(`${key}-answer`);
    const prior = history[key];
    if (prior.length) turns.append(el("div", { class: "muted" }, `you: ${prior[prior.length - 2].content}`), el("pre", {}, prior[prior.length - 1].content));
    const messages = [...(system ? [{ role: "system", content: system }] : []), ...prior, { role: "user", content: prompt }];
    out.textContent = ""; out.classList.add("streaming");
    try {
      const answer = await stream(key, model, messages, out);
      history[key].push({ role: "user", content: prompt }, { role: "assistant", content: answer });
      out.dataset.done = "1";
    } catch (error) { out.textContent = `error: ${error.message}`; }
    out.classList.remove("streaming");
  }));
  $("send").disabled = false;
}

async function init() {
  const data = await api("/api/runs");
  document.getElementById("where").textContent = data.root;
  const runs = data.runs.filter((r) => r.has_adapter);
  $("run").replaceChildren(...runs.map((r) => el("option", { value: r.id }, `${r.id} (${r.method}, ${r.base})`)));
  const wanted = param("id") && runs.some((r) => r.id === param("id")) ? param("id") : runs.length ? runs[0].id : null;
  if (!wanted) { $("chat-status").textContent = "no run with an adapter yet: train one first"; return; }
  $("run").value = wanted;
  prepare(wanted);
}
init().catch((error) => showError($("chat-status"), error));
