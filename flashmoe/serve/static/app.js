// The flashmoe web page: a chat over /v1/chat/completions (streamed) beside a live view of the experts each
// token reads, from the routing trace at /v1/trace (the lines `flashmoe generate --trace` writes).
// Plain JavaScript, no build step, no dependencies.
"use strict";

const $ = (id) => document.getElementById(id);
const history = [];  // the conversation in OpenAI's message form (system prompt added per request)
let controller = null;  // aborts the reply being streamed (the Stop button)

// ---- talking to the server ---------------------------------------------------------------------------

function headers() {
  const key = $("api_key").value.trim();
  return key ? { "Content-Type": "application/json", Authorization: `Bearer ${key}` }
             : { "Content-Type": "application/json" };
}

// Read a server-sent event stream, calling onData with each event's parsed JSON `data`.
async function readEvents(response, onData) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of block.split("\n")) {
        if (line.startsWith("data: ") && line !== "data: [DONE]") onData(JSON.parse(line.slice(6)));
      }
    }
  }
}

async function errorText(response) {
  try {
    const body = await response.json();
    return body.error?.message || JSON.stringify(body);
  } catch { return `HTTP ${response.status}`; }
}

// ---- the chat ----------------------------------------------------------------------------------------

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = `message ${role}`;
  if (role === "assistant") {
    div.innerHTML = '<div class="reasoning"></div><div class="content"></div>';
    div.querySelector(".content").textContent = text;
  } else {
    div.textContent = text;
  }
  $("messages").appendChild(div);
  $("messages").scrollTop = $("messages").scrollHeight;
  return div;
}

function sampling() {
  const body = {};
  for (const name of ["temperature", "top_p", "top_k", "max_tokens"]) {
    const value = $(name).value;
    if (value !== "") body[name] = Number(value);
  }
  return body;
}

async function send(text) {
  history.push({ role: "user", content: text });
  addMessage("user", text);
  const div = addMessage("assistant", "");
  const reasoning = div.querySelector(".reasoning"), content = div.querySelector(".content");
  const system = $("system").value.trim();
  const messages = system ? [{ role: "system", content: system }, ...history] : history;
  controller = new AbortController();
  setBusy(true);
  let reply = "";
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), signal: controller.signal,
      body: JSON.stringify({ messages, stream: true, stream_options: { include_usage: true }, ...sampling() }),
    });
    if (!response.ok) throw new Error(await errorText(response));
    await readEvents(response, (chunk) => {
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) showUsage(chunk.usage);
      const delta = chunk.choices?.[0]?.delta || {};
      if (delta.reasoning_content) reasoning.textContent += delta.reasoning_content;
      if (delta.content) { reply += delta.content; content.textContent = reply; }
      for (const call of delta.tool_calls || []) content.textContent += `\n[tool call ${call.function.name}]`;
      $("messages").scrollTop = $("messages").scrollHeight;
    });
  } catch (error) {
    if (error.name !== "AbortError") { div.classList.add("error"); content.textContent = reply + `\n${error.message}`; }
  } finally {
    if (reply) history.push({ role: "assistant", content: reply });  // a stopped reply stays, as in `flashmoe chat`
    div.dataset.done = "1";
    controller = null;
    setBusy(false);
  }
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

function showUsage(usage) {
  const cached = usage.prompt_tokens_details?.cached_tokens || 0;
  $("usage").textContent = `prompt ${usage.prompt_tokens} tokens (${cached} reused from the previous turn), ` +
    `reply ${usage.completion_tokens} tokens`;
}

// ---- the expert view ---------------------------------------------------------------------------------

const view = { layers: 0, experts: 0, heat: null, hit: null, last: null, decodeTimes: [], tokens: 0, bytes: 0,
               pending: false };
const FADE = 0.82;  // heat kept per token: a cell fades over about ten tokens

function onTrace(event) {
  if (event.type === "header") {
    view.layers = event.moe_layers.length;
    view.experts = event.num_experts;
    view.heat = new Float32Array(view.layers * view.experts);
    view.hit = new Uint8Array(view.layers * view.experts);
    $("axes").textContent = `experts 0–${view.experts - 1} →, MoE layers ${event.moe_layers[0]}–` +
      `${event.moe_layers[view.layers - 1]} ↓ · ${event.experts_per_token} experts per token per layer · ${event.io} reads`;
    return;
  }
  for (let i = 0; i < view.heat.length; i++) view.heat[i] *= FADE;
  event.experts.forEach((row, layer) => row.forEach((expert, slot) => {
    const i = layer * view.experts + expert;
    view.heat[i] = 1;
    view.hit[i] = event.hit ? (event.hit[layer][slot] ? 1 : 0) : 1;
  }));
  view.last = event;
  view.tokens += 1;
  view.bytes += (event.bytes_read || []).reduce((a, b) => a + b, 0);
  if (!event.prefill) view.decodeTimes = [...view.decodeTimes.slice(-15), event.t];
  document.body.dataset.traced = String(view.tokens);
  if (!view.pending) { view.pending = true; requestAnimationFrame(draw); }
}

function fitCanvas(canvas) {
  const ratio = window.devicePixelRatio || 1;
  const w = Math.round(canvas.clientWidth * ratio), h = Math.round(canvas.clientHeight * ratio);
  if (canvas.width !== w || canvas.height !== h) { canvas.width = w; canvas.height = h; }
  return canvas.getContext("2d");
}

function draw() {
  view.pending = false;
  const css = getComputedStyle(document.documentElement);
  const color = (name) => css.getPropertyValue(name).trim();
  const grid = $("grid"), g = fitCanvas(grid);
  g.clearRect(0, 0, grid.width, grid.height);
  const cw = grid.width / view.experts, ch = grid.height / view.layers;
  for (let layer = 0; layer < view.layers; layer++) {
    for (let expert = 0; expert < view.experts; expert++) {
      const i = layer * view.experts + expert;
      if (view.heat[i] < 0.03) continue;
      g.globalAlpha = view.heat[i];
      g.fillStyle = view.hit[i] ? color("--hit") : color("--miss");
      g.fillRect(expert * cw + 0.5, layer * ch + 0.5, Math.max(cw - 1, 1), Math.max(ch - 1, 1));
    }
  }
  g.globalAlpha = 1;
  drawBars(color);
  drawNumbers();
}

function drawBars(color) {
  const bars = $("bars"), b = fitCanvas(bars), last = view.last;
  b.clearRect(0, 0, bars.width, bars.height);
  if (!last || !last.io_wait_ms) return;
  const ch = bars.height / view.layers;
  const total = last.io_wait_ms.map((io, j) => io + last.compute_ms[j]);
  const scale = bars.width / Math.max(...total, 1e-3);
  last.io_wait_ms.forEach((io, j) => {
    b.fillStyle = color("--io");
    b.fillRect(0, j * ch + 1, io * scale, Math.max(ch - 2, 1));
    b.fillStyle = color("--compute");
    b.fillRect(io * scale, j * ch + 1, last.compute_ms[j] * scale, Math.max(ch - 2, 1));
  });
}

function drawNumbers() {
  const last = view.last, times = view.decodeTimes;
  $("n-tokens").textContent = String(view.tokens);
  if (times.length > 2) $("tok-s").textContent = ((times.length - 1) / (times[times.length - 1] - times[0])).toFixed(1);
  $("bytes-total").textContent = bytes(view.bytes);
  if (!last.hit) return;
  const flat = last.hit.flat();
  $("hits").textContent = `${flat.filter(Boolean).length} of ${flat.length}`;
  $("disk").textContent = bytes((last.disk_bytes || []).reduce((a, b) => a + b, 0));
  const ms = last.io_wait_ms.reduce((a, b) => a + b, 0) + last.compute_ms.reduce((a, b) => a + b, 0);
  $("ms").textContent = `${ms.toFixed(1)} (${(ms / view.layers).toFixed(2)} per layer)`;
}

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

// The trace stream; reconnects (after a dropped connection or a new API key) every 2 s until it stays up.
async function followTrace() {
  for (;;) {
    try {
      const response = await fetch("/v1/trace", { headers: headers() });
      if (response.ok) {
        $("status").textContent = "";
        await readEvents(response, onTrace);
      } else {
        $("status").textContent = `expert view: ${await errorText(response)}`;
      }
    } catch (error) {
      $("status").textContent = `expert view: ${error.message}`;
    }
    await new Promise((resolve) => setTimeout(resolve, 2000));
  }
}

async function showModel() {
  const response = await fetch("/v1/models", { headers: headers() });
  if (response.status === 401) {  // the server was started with --api-key: ask for it where it is typed
    $("model").textContent = "this server needs its API key (Settings)";
    $("settings").open = true;
    $("api_key").focus();
    return;
  }
  if (!response.ok) { $("model").textContent = await errorText(response); return; }
  const model = (await response.json()).data[0];
  $("model").textContent = `${model.id} · context ${model.max_model_len} tokens`;
}

// ---- wiring ------------------------------------------------------------------------------------------

$("api_key").value = localStorage.getItem("flashmoe-api-key") || "";
$("api_key").addEventListener("change", () => { localStorage.setItem("flashmoe-api-key", $("api_key").value); showModel(); });
$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("input").value.trim();
  if (!text || controller) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("composer").requestSubmit(); }
});
$("stop").addEventListener("click", () => controller?.abort());
$("clear").addEventListener("click", () => { history.length = 0; $("messages").replaceChildren(); $("usage").textContent = ""; });
showModel();
followTrace();
