"use strict";
// The chat page: sends the conversation to /v1/chat/completions with "stream": true and shows the reply as its
// server-sent events arrive. A pretraining checkpoint (no chat template) gets each message as a plain-text
// prompt to /v1/completions instead.

const $ = (id) => document.getElementById(id);
const log = $("log"), input = $("input");
let history = [];        // the finished turns, {role, content}, sent again with every message
let controller = null;   // aborts the reply being streamed (Stop, Clear)
let chat = true;
let modelId = "";
let epoch = 0;            // counts Clears: a reply stopped by Clear must not come back into the history

function headers() {
  const h = {"Content-Type": "application/json"};
  const key = $("api_key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function add(kind, text) {
  const div = document.createElement("div");
  div.className = "msg " + kind;
  div.textContent = text;  // text, never HTML: a reply cannot inject markup
  log.appendChild(div);
  log.scrollTop = log.scrollHeight;
  return div;
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
  document.body.dataset.busy = busy ? "1" : "";
}

async function errorOf(response) {
  try {
    const j = await response.json();
    if (j.error && j.error.message) return j.error.message;
  } catch (e) { /* not JSON: fall through to the status line */ }
  return response.status + " " + response.statusText;
}

async function loadModel() {
  try {
    const r = await fetch("/v1/models", {headers: headers()});
    if (!r.ok) throw new Error(await errorOf(r));
    const m = (await r.json()).data[0];
    modelId = m.id;
    chat = m.chat !== false;
    $("model").textContent = m.id + " · context " + m.context_length + (chat ? "" : " · text continuation");
  } catch (e) {
    $("model").textContent = "model: " + e.message;
  }
}

// Yields the JSON payload of each `data:` event of a server-sent-events response body.
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();  // {stream: true} keeps a character split across network reads whole
  let buf = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buf += decoder.decode(value, {stream: true});
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (line.startsWith("data: ") && line !== "data: [DONE]") yield JSON.parse(line.slice(6));
      }
    }
  }
}

async function send(text) {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({role: "system", content: system});
  messages.push(...history, {role: "user", content: text});
  const body = {model: modelId, stream: true, temperature: parseFloat($("temperature").value),
                max_tokens: parseInt($("max_tokens").value, 10)};
  if (chat) body.messages = messages; else body.prompt = text;

  const mine = epoch;
  add("user", text);
  const out = add("assistant", "");
  controller = new AbortController();
  setBusy(true);
  let reply = "", finish = null;
  try {
    const r = await fetch(chat ? "/v1/chat/completions" : "/v1/completions",
                          {method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal});
    if (!r.ok) throw new Error(await errorOf(r));
    for await (const j of events(r)) {
      if (j.error) throw new Error(j.error.message);
      const c = j.choices[0];
      if (!c) continue;  // the usage chunk
      reply += chat ? (c.delta.content || "") : (c.text || "");
      out.textContent = reply;
      if (c.finish_reason) finish = c.finish_reason;
      log.scrollTop = log.scrollHeight;
    }
  } catch (e) {
    if (e.name !== "AbortError") {
      out.remove();
      add("error", e.message + " (not kept in the conversation)");
      controller = null;
      setBusy(false);
      return;
    }
    finish = "stopped";
  }
  controller = null;
  setBusy(false);
  if (mine !== epoch) return;
  if (finish === "length") add("note", "(cut at max tokens)");
  if (finish === "stopped") add("note", "(stopped)");
  if (chat) history.push({role: "user", content: text}, {role: "assistant", content: reply});
}

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = input.value;
  if (!text.trim() || controller) return;
  input.value = "";
  send(text);
});
input.addEventListener("keydown", (e) => {
  // isComposing: Enter that picks a Chinese/Japanese IME candidate must not send the message
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => { if (controller) controller.abort(); });
$("clear").addEventListener("click", () => {
  if (controller) controller.abort();
  epoch += 1;
  history = [];
  log.textContent = "";
  input.focus();
});
$("api_key").addEventListener("change", loadModel);
loadModel();
