"""The chat page served at ``/``: one self-contained HTML file, no build step, no external assets.

It talks to the server's own OpenAI endpoint (``POST /v1/chat/completions`` with
``stream: true``, read as server-sent events), lets a person pick the model among those the server
can serve (``GET /v1/models``; a server of many models loads the one picked on its first message), the
tokens per second of each answer (from the streamed ``usage``), and the JSON-mode and tools
options (``response_format``, ``tools``). An API key, if the server wants one, is kept in the
browser's localStorage. Small enough for a phone on the Pi's Wi-Fi.
"""

PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>tinyinfer chat</title>
<style>
  :root { --bg:#f6f7f9; --fg:#1d2330; --mut:#687083; --acc:#2f6fed; --me:#dfe8fd; --bot:#ffffff; --bd:#d9dde5; }
  @media (prefers-color-scheme: dark) {
    :root { --bg:#14171c; --fg:#e6e9ef; --mut:#98a0b0; --acc:#6d9bff; --me:#24324f; --bot:#1d2128; --bd:#2c313b; } }
  * { box-sizing: border-box; }
  body { margin:0; font:16px/1.45 system-ui, sans-serif; background:var(--bg); color:var(--fg);
         display:flex; flex-direction:column; height:100vh; height:100dvh; }
  header { display:flex; gap:.6em; align-items:center; flex-wrap:wrap; padding:.5em .8em; border-bottom:1px solid var(--bd); }
  header b { font-size:1.05em; }
  #model { color:var(--fg); background:var(--bot); border:1px solid var(--bd); border-radius:6px;
           font-family:ui-monospace, monospace; font-size:.9em; max-width:60%; }
  #speed { margin-left:auto; color:var(--mut); font-size:.9em; font-variant-numeric:tabular-nums; }
  details { padding:.3em .8em; border-bottom:1px solid var(--bd); font-size:.92em; }
  details label { margin-right:1em; white-space:nowrap; }
  details textarea, details input[type=text], details input[type=password] { width:100%; font:13px ui-monospace, monospace;
         background:var(--bot); color:var(--fg); border:1px solid var(--bd); border-radius:6px; padding:.4em; }
  #log { flex:1; overflow-y:auto; padding:.8em; display:flex; flex-direction:column; gap:.6em; }
  .msg { max-width:46em; padding:.55em .8em; border-radius:12px; white-space:pre-wrap; word-wrap:break-word;
         border:1px solid var(--bd); }
  .user { align-self:flex-end; background:var(--me); }
  .assistant { align-self:flex-start; background:var(--bot); }
  .tool { font:13px ui-monospace, monospace; color:var(--mut); }
  .err { align-self:center; color:#c0392b; }
  .stats { display:block; color:var(--mut); font-size:.78em; margin-top:.3em; }
  form { display:flex; gap:.5em; padding:.6em .8em; border-top:1px solid var(--bd); }
  #input { flex:1; resize:none; font:inherit; padding:.5em .7em; border-radius:10px; border:1px solid var(--bd);
           background:var(--bot); color:var(--fg); min-height:2.6em; max-height:10em; }
  button { font:inherit; border:0; border-radius:10px; padding:0 1.1em; background:var(--acc); color:#fff; cursor:pointer; }
  button.ghost { background:transparent; color:var(--mut); border:1px solid var(--bd); padding:0 .8em; }
</style>
</head>
<body>
<header><b>tinyinfer</b><select id="model" title="model"><option>…</option></select><span id="speed"></span></header>
<details id="opts"><summary>Options</summary>
  <p>
    <label><input type="checkbox" id="json"> JSON output (<code>response_format: json_object</code>)</label>
    <label><input type="checkbox" id="usetools"> tools</label>
    <label>temperature <input type="number" id="temp" value="0.7" min="0" max="2" step="0.1" style="width:4.5em"></label>
    <label>max tokens <input type="number" id="maxtok" value="256" min="1" step="1" style="width:5.5em"></label>
  </p>
  <p><label for="system">system prompt</label><input type="text" id="system" placeholder="(none)"></p>
  <p><label for="tools">tools (OpenAI <code>tools</code> array, JSON)</label>
  <textarea id="tools" rows="6">[{"type": "function", "function": {"name": "get_weather",
  "description": "Current weather in a city",
  "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]</textarea></p>
  <p><label for="key">API key (only if the server was started with --api-key)</label>
  <input type="password" id="key" autocomplete="off"></p>
</details>
<div id="log" aria-live="polite"></div>
<form id="form">
  <textarea id="input" rows="1" placeholder="Message" autofocus></textarea>
  <button type="button" class="ghost" id="clear" title="new conversation">new</button>
  <button type="submit" id="send">Send</button>
</form>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const log = $("log"), input = $("input"), send = $("send");
let history = [], busy = null;
$("key").value = localStorage.getItem("tinyinfer-key") || "";
$("key").addEventListener("change", () => localStorage.setItem("tinyinfer-key", $("key").value));

function headers() {
  const h = {"Content-Type": "application/json"};
  if ($("key").value) h["Authorization"] = "Bearer " + $("key").value;
  return h;
}
function bubble(cls, text) {
  const d = document.createElement("div");
  d.className = "msg " + cls;
  d.textContent = text;
  log.appendChild(d);
  log.scrollTop = log.scrollHeight;
  return d;
}
async function loadModel() {
  try {
    const r = await fetch("/v1/models", {headers: headers()});
    const j = await r.json();
    const sel = $("model"), keep = localStorage.getItem("tinyinfer-model");
    sel.innerHTML = "";
    for (const m of (r.ok ? j.data : [{id: "(" + (j.error && j.error.message || r.status) + ")"}])) {
      const o = document.createElement("option");
      o.value = m.id;
      o.textContent = m.id + (m.status && m.status.value === "loaded" ? " ●" : "");
      sel.appendChild(o);
    }
    if (keep && [...sel.options].some((o) => o.value === keep)) sel.value = keep;
  } catch (e) { $("model").innerHTML = "<option>(server unreachable)</option>"; }
}
async function chat(text) {
  history.push({role: "user", content: text});
  bubble("user", text);
  const out = bubble("assistant", "");
  out.dataset.state = "streaming";
  const body = {model: $("model").value,
                messages: ($("system").value ? [{role: "system", content: $("system").value}] : []).concat(history),
                stream: true, stream_options: {include_usage: true},
                temperature: parseFloat($("temp").value), max_tokens: parseInt($("maxtok").value, 10)};
  if ($("json").checked) body.response_format = {type: "json_object"};
  if ($("usetools").checked) {
    try { body.tools = JSON.parse($("tools").value); }
    catch (e) { out.remove(); history.pop(); bubble("err", "tools: not valid JSON (" + e.message + ")"); return; }
  }
  busy = new AbortController();
  send.textContent = "Stop";
  const t0 = performance.now();
  let tFirst = null, nChunks = 0, text_ = "", usage = null, calls = {};
  try {
    const r = await fetch("/v1/chat/completions", {method: "POST", headers: headers(), body: JSON.stringify(body),
                                                   signal: busy.signal});
    if (!r.ok) {
      let msg = r.status + " " + r.statusText;
      try { const j = await r.json(); msg = (j.error && (j.error.message || j.error)) || msg; } catch (e) {}
      throw new Error(msg);
    }
    const reader = r.body.getReader(), dec = new TextDecoder();
    let buf = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buf += dec.decode(value, {stream: true});
      let i;
      while ((i = buf.indexOf("\n\n")) >= 0) {
        const event = buf.slice(0, i); buf = buf.slice(i + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") continue;
          const j = JSON.parse(data);
          if (j.error) throw new Error(j.error.message || JSON.stringify(j.error));
          if (j.usage) usage = j.usage;
          for (const c of j.choices || []) {
            const d = c.delta || {};
            if (d.content) {
              if (tFirst === null) tFirst = performance.now();
              nChunks++; text_ += d.content; out.textContent = text_;
            }
            for (const tc of d.tool_calls || []) {
              if (tFirst === null) tFirst = performance.now();
              nChunks++;
              const k = tc.index || 0, f = tc.function || {};
              calls[k] = calls[k] || {name: "", arguments: ""};
              if (f.name) calls[k].name += f.name;
              if (f.arguments) calls[k].arguments += f.arguments;
              out.textContent = text_ + Object.values(calls).map((c) => "\n🔧 " + c.name + "(" + c.arguments + ")").join("");
            }
          }
          log.scrollTop = log.scrollHeight;
        }
      }
    }
  } catch (e) {
    if (e.name !== "AbortError") bubble("err", String(e.message || e));
  } finally {
    busy = null; send.textContent = "Send";
  }
  const t1 = performance.now();
  const n = usage ? usage.completion_tokens : nChunks;
  const gen_s = (t1 - (tFirst || t1)) / 1000;
  const rate = n > 1 && gen_s > 0 ? ((n - 1) / gen_s) : 0;
  const stats = document.createElement("span");
  stats.className = "stats";
  stats.textContent = n + " tokens · " + rate.toFixed(1) + " tokens/s · first token " +
                      ((tFirst || t1) - t0).toFixed(0) + " ms";
  out.appendChild(stats);
  $("speed").textContent = rate ? rate.toFixed(1) + " tokens/s" : "";
  out.dataset.state = "done";
  const msg = {role: "assistant", content: text_};
  if (Object.keys(calls).length) msg.tool_calls = Object.entries(calls).map(([k, c]) =>
      ({id: "call_" + k, type: "function", function: {name: c.name, arguments: c.arguments}}));
  history.push(msg);
}
$("form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  if (busy) { busy.abort(); return; }
  const text = input.value.trim();
  if (!text) return;
  input.value = "";
  chat(text);
});
input.addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("form").requestSubmit(); }
});
$("clear").addEventListener("click", () => { if (!busy) { history = []; log.innerHTML = ""; $("speed").textContent = ""; } });
$("model").addEventListener("change", () => localStorage.setItem("tinyinfer-model", $("model").value));
loadModel();
</script>
</body>
</html>
"""
